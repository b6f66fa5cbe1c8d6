/*
 * verify.h - what a guest store writes, and how a page is judged against what it must hold.
 *
 * A store of the value a page already holds proves nothing: a destination that puts the source's
 * old bytes back after the guest wrote would pass.  So every store carries information:
 *  - PCH_WRITES_OWN (workloads where each page has one writer): the vCPU's store number `seq`
 *    goes into its own word of the page (pch_store_word), as a value that only that store, on that
 *    page, could have written (pch_store_value: a tag, the vCPU and seq, masked by the page);
 *  - PCH_WRITES_COUNT (pages several vCPUs write: hotset, shared): a store is an atomic increment
 *    of the page's counter word, and a shared ledger counts the increments made (as the kernel's
 *    uffd-stress bounce test counts its own), so the final count must match.
 * The ledger (one uint64 per page, shared by the workers and read by the orchestrator) holds, per
 * page, the last value stored (OWN) or the increments made (COUNT).  A worker writes the ledger
 * before the page, so a worker killed between the two leaves the ledger one store ahead: it says
 * so in its `pending` slot (page + 1 while a store is under way), and the checks allow that store.
 */
#ifndef PCH_VERIFY_H
#define PCH_VERIFY_H
#include <stdint.h>

#define PCH_WRITES_NONE 0   /* no stores: every page must hold the source's content */
#define PCH_WRITES_OWN 1
#define PCH_WRITES_COUNT 2
#define PCH_COUNTER_WORD 1  /* COUNT: the word of a page that its stores increment */
/* a page generation (struct pch_content.gens): the guest gave the page back (run --remove-rate,
 * MADV_REMOVE), so it reads zeros from then on; its old bytes there are stale */
#define PCH_GEN_REMOVED 0xffffffffu

/* what a wrong page (or word) looks like: verification.by-kind in the report */
#define PCH_BAD_REVERTED 0  /* the source's bytes are back where a store was */
#define PCH_BAD_ZEROED 1    /* zeros where the page is not all zeros */
#define PCH_BAD_STALE 2     /* an older write: an earlier store, fewer increments, an older precopy generation */
#define PCH_BAD_TORN 3      /* part of the page is right and part is not */
#define PCH_BAD_FOREIGN 4   /* bytes nobody wrote here: another page's content, another vCPU's store, garbage */
#define PCH_BAD_KINDS 5

struct pch_content {        /* what guest RAM holds before the guest writes */
    uint64_t seed, page_size;
    uint32_t zero_permille;
    const uint8_t *ref;     /* an image file's bytes (run --image), or NULL: the seed generator */
    const uint32_t *gens;   /* per page its final precopy generation (run --precopy), or NULL: all 0 */
};

struct pch_finding {        /* the first wrong page or word found: what the error line names */
    int64_t page;           /* -1: nothing found */
    int32_t kind;           /* PCH_BAD_* */
    int32_t vcpu;           /* the writer whose store was expected there, or -1 (the source's content was) */
    uint64_t seq;           /* OWN: that store's number; COUNT: the increments expected (at least) */
    uint64_t word, expected, found;
    uint64_t words_bad;     /* wrong 64-bit words in that page (1 for a single word's check) */
};

/* the word of a page that vCPU `vcpu`'s stores go to (OWN); never word 0, the one every access reads */
uint64_t pch_store_word(uint64_t page_size, uint32_t vcpu);
uint64_t pch_store_value(uint64_t seed, uint64_t page, uint32_t vcpu, uint64_t seq);
/* 1 and the store's vCPU and number if `value` is a store made on `page`, else 0 */
int pch_store_decode(uint64_t seed, uint64_t page, uint64_t value, uint32_t *vcpu, uint64_t *seq);
/* word k of page `page` as the source holds it (the final generation) */
uint64_t pch_source_word(const struct pch_content *c, uint64_t page, uint64_t k);

/* Judge the page at p against what it must hold: the source's content, and
 *  OWN:   `want`, the last value stored on it (0: its writer is not known; any word may then hold the source's
 *         value or a store of whichever vCPU owns that word);
 *  COUNT: between `lo` and `hi` increments on its counter word.
 * Returns -1 when it is right, else its PCH_BAD_* (and fills *f if f->page is still -1). */
int pch_judge_page(const struct pch_content *c, uint64_t page, const uint8_t *p, int mode, uint64_t want,
                   uint64_t lo, uint64_t hi, struct pch_finding *f);
/* The kind of a single wrong word: `found` at word k of `page` where `expected` should be. */
int pch_judge_word(const struct pch_content *c, uint64_t page, uint64_t k, uint64_t expected, uint64_t found);

/* The final check: all of guest RAM against the source image with every page's last write applied. */
struct pch_ram_check {
    /* in */
    const uint8_t *ram;
    uint64_t npages;
    const uint8_t *received;  /* check only pages placed (a run that ended early), or NULL: every page */
    int mode;                 /* PCH_WRITES_* */
    const uint64_t *ledger;   /* per page (see the top), or NULL with PCH_WRITES_NONE */
    const uint64_t *pending;  /* sorted pages + 1 of stores a lost worker left under way */
    uint64_t npending;
    /* out */
    uint64_t pages_checked, bad_pages, writes_checked, lost_writes;
    uint64_t by_kind[PCH_BAD_KINDS];
    struct pch_finding first;
};
void pch_check_ram(const struct pch_content *c, struct pch_ram_check *r);

#endif
