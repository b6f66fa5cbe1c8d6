"""Binding: what a guest store writes and how a page is judged (csrc/verify.h, csrc/verify.c)."""

INCLUDES = '#include "verify.h"'

TYPES = """
#define PCH_WRITES_NONE ...
#define PCH_WRITES_OWN ...
#define PCH_WRITES_COUNT ...
#define PCH_COUNTER_WORD ...
#define PCH_GEN_REMOVED ...
#define PCH_BAD_REVERTED ...
#define PCH_BAD_ZEROED ...
#define PCH_BAD_STALE ...
#define PCH_BAD_TORN ...
#define PCH_BAD_FOREIGN ...
#define PCH_BAD_KINDS 5

struct pch_content {
    uint64_t seed, page_size;
    uint32_t zero_permille;
    const uint8_t *ref;
    const uint32_t *gens;
};

struct pch_finding {
    int64_t page;
    int32_t kind;
    int32_t vcpu;
    uint64_t seq;
    uint64_t word, expected, found;
    uint64_t words_bad;
};

struct pch_ram_check {
    const uint8_t *ram;
    uint64_t npages;
    const uint8_t *received;
    int mode;
    const uint64_t *ledger;
    const uint64_t *pending;
    uint64_t npending;
    uint64_t pages_checked, bad_pages, writes_checked, lost_writes;
    uint64_t by_kind[PCH_BAD_KINDS];
    struct pch_finding first;
};
"""

FUNCTIONS = """
uint64_t pch_store_word(uint64_t page_size, uint32_t vcpu);
uint64_t pch_store_value(uint64_t seed, uint64_t page, uint32_t vcpu, uint64_t seq);
int pch_store_decode(uint64_t seed, uint64_t page, uint64_t value, uint32_t *vcpu, uint64_t *seq);
uint64_t pch_source_word(const struct pch_content *c, uint64_t page, uint64_t k);
int pch_judge_page(const struct pch_content *c, uint64_t page, const uint8_t *p, int mode, uint64_t want,
                   uint64_t lo, uint64_t hi, struct pch_finding *f);
int pch_judge_word(const struct pch_content *c, uint64_t page, uint64_t k, uint64_t expected, uint64_t found);
void pch_check_ram(const struct pch_content *c, struct pch_ram_check *r);
"""

SOURCES = ["verify.c"]
