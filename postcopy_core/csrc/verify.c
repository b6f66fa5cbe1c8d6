/* verify.c - see verify.h. */
#include "verify.h"
#include "content.h"
#include "pch.h"

#include <stddef.h>

#define STORE_TAG 0xc5ull                 /* the top byte of every store's value */
#define LOW56 ((1ull << 56) - 1)
#define SEQ_BITS 36
#define OLDER_GENS 8                      /* precopy generations looked at for a stale page */

uint64_t pch_store_word(uint64_t page_size, uint32_t vcpu)
{
    return 1 + vcpu % (page_size / 8 - 1);
}

/* what masks a store's vCPU and number: a store copied to another page does not decode there */
static inline uint64_t store_mask(uint64_t seed, uint64_t page)
{
    return pch_mix64(pch_page_key(seed, page) ^ 0x5713e5a1c0ffeeull) & LOW56;
}

uint64_t pch_store_value(uint64_t seed, uint64_t page, uint32_t vcpu, uint64_t seq)
{
    uint64_t raw = ((uint64_t)(vcpu & 0xfffff) << SEQ_BITS) | (seq & ((1ull << SEQ_BITS) - 1));
    return STORE_TAG << 56 | (raw ^ store_mask(seed, page));
}

int pch_store_decode(uint64_t seed, uint64_t page, uint64_t value, uint32_t *vcpu, uint64_t *seq)
{
    if (value >> 56 != STORE_TAG)
        return 0;
    uint64_t raw = (value & LOW56) ^ store_mask(seed, page);
    *vcpu = (uint32_t)(raw >> SEQ_BITS);
    *seq = raw & ((1ull << SEQ_BITS) - 1);
    return 1;
}

/* word k of generation `gen` of a page: gen 0 is the original content (image or generated) */
static uint64_t gen_word(const struct pch_content *c, uint64_t page, uint32_t gen, uint64_t k)
{
    if (gen == PCH_GEN_REMOVED)
        return 0;
    if (gen)
        return pch_page_word(pch_gen_key(c->seed, page, gen), k);
    if (c->ref)
        return ((const uint64_t *)(c->ref + page * c->page_size))[k];
    if (pch_page_is_zero(c->seed, page, c->zero_permille))
        return 0;
    return pch_page_word(pch_page_key(c->seed, page), k);
}

uint64_t pch_source_word(const struct pch_content *c, uint64_t page, uint64_t k)
{
    return gen_word(c, page, c->gens ? c->gens[page] : 0, k);
}

/* the page holds an older precopy generation of itself, apart from word `skip` */
static int older_generation(const struct pch_content *c, uint64_t page, const uint64_t *w, uint64_t skip)
{
    uint32_t gen = c->gens ? c->gens[page] : 0;
    if (gen == PCH_GEN_REMOVED) /* what it held before the guest gave it back */
        gen = 1;
    for (uint32_t g = gen; g-- > 0 && gen - g <= OLDER_GENS;) {
        uint64_t k = 0, words = c->page_size / 8;
        while (k < words && (k == skip || w[k] == gen_word(c, page, g, k)))
            k++;
        if (k == words)
            return 1;
    }
    return 0;
}

int pch_judge_word(const struct pch_content *c, uint64_t page, uint64_t k, uint64_t expected, uint64_t found)
{
    uint64_t src = pch_source_word(c, page, k);
    uint32_t gen = c->gens ? c->gens[page] : 0, v, fv;
    uint64_t seq, fseq;
    if (found == src && expected != src)
        return PCH_BAD_REVERTED;
    if (found == 0)
        return PCH_BAD_ZEROED;
    if (gen == PCH_GEN_REMOVED)
        return found == gen_word(c, page, 0, k) ? PCH_BAD_STALE : PCH_BAD_FOREIGN;
    for (uint32_t g = gen; g-- > 0 && gen - g <= OLDER_GENS;)
        if (found == gen_word(c, page, g, k))
            return PCH_BAD_STALE;
    if (pch_store_decode(c->seed, page, expected, &v, &seq) && pch_store_decode(c->seed, page, found, &fv, &fseq)
        && fv == v && fseq < seq)
        return PCH_BAD_STALE;
    return PCH_BAD_FOREIGN;
}

/* a store of some vCPU that owns word k: what a page may hold where no store is known (OWN) */
static int any_store(const struct pch_content *c, uint64_t page, uint64_t k, uint64_t value)
{
    uint32_t v;
    uint64_t seq;
    return k && pch_store_decode(c->seed, page, value, &v, &seq) && pch_store_word(c->page_size, v) == k;
}

int pch_judge_page(const struct pch_content *c, uint64_t page, const uint8_t *p, int mode, uint64_t want,
                   uint64_t lo, uint64_t hi, struct pch_finding *f)
{
    const uint64_t *w = (const uint64_t *)p;
    uint64_t words = c->page_size / 8, wk = words; /* wk: the word a store must be in (words: none) */
    uint32_t wv = 0;
    uint64_t wseq = 0;
    if (mode == PCH_WRITES_OWN && want && pch_store_decode(c->seed, page, want, &wv, &wseq))
        wk = pch_store_word(c->page_size, wv);
    else if (mode == PCH_WRITES_COUNT)
        wk = PCH_COUNTER_WORD;
    uint64_t base_bad = 0, first_bad = words, nonzero = 0;
    for (uint64_t k = 0; k < words; k++) {
        uint64_t found = w[k];
        if (k == wk)
            continue;
        nonzero |= found; /* of the words no store of the expected writer is in */
        if (found == pch_source_word(c, page, k))
            continue;
        if (mode == PCH_WRITES_OWN && !want && any_store(c, page, k, found))
            continue;
        base_bad++;
        if (first_bad == words)
            first_bad = k;
    }
    int wkind = -1;
    uint64_t expected = 0;
    if (wk < words) {
        uint64_t found = w[wk], src = pch_source_word(c, page, wk);
        if (mode == PCH_WRITES_OWN && found != want) {
            expected = want;
            wkind = pch_judge_word(c, page, wk, want, found);
        } else if (mode == PCH_WRITES_COUNT && (found - src < lo || found - src > hi)) {
            expected = src + lo;
            wkind = found == src && lo ? PCH_BAD_REVERTED : found == 0 ? PCH_BAD_ZEROED
                    : found - src < lo ? PCH_BAD_STALE : PCH_BAD_FOREIGN;
        }
    }
    if (!base_bad && wkind < 0)
        return -1;
    int kind;
    if (!base_bad)
        kind = wkind;
    else if (!nonzero)
        kind = PCH_BAD_ZEROED;
    else if (older_generation(c, page, w, wk))
        kind = PCH_BAD_STALE;
    else if (base_bad < words - (wk < words))
        kind = PCH_BAD_TORN;
    else
        kind = PCH_BAD_FOREIGN;
    if (f && f->page < 0) {
        uint64_t k = wkind >= 0 && !base_bad ? wk : first_bad;
        int store_word = k == wk; /* the finding is about a store, else about the source's content */
        *f = (struct pch_finding){ .page = (int64_t)page, .kind = kind, .word = k, .found = w[k],
                                   .vcpu = store_word && mode == PCH_WRITES_OWN ? (int32_t)wv : -1,
                                   .seq = !store_word ? 0 : mode == PCH_WRITES_OWN ? wseq : lo,
                                   .expected = store_word ? expected : pch_source_word(c, page, k),
                                   .words_bad = base_bad + (wkind >= 0) };
    }
    return kind;
}

static uint64_t pending_on(const struct pch_ram_check *r, uint64_t page)
{
    /* sorted: the first entry >= page + 1, then count the equal ones */
    uint64_t lo = 0, hi = r->npending, n = 0;
    while (lo < hi) {
        uint64_t mid = (lo + hi) / 2;
        if (r->pending[mid] < page + 1)
            lo = mid + 1;
        else
            hi = mid;
    }
    while (lo + n < r->npending && r->pending[lo + n] == page + 1)
        n++;
    return n;
}

void pch_check_ram(const struct pch_content *c, struct pch_ram_check *r)
{
    r->first.page = -1;
    for (uint64_t page = 0; page < r->npages; page++) {
        if (r->received && !r->received[page])
            continue;
        uint64_t want = 0, lo = 0, hi = 0, cut = r->npending ? pending_on(r, page) : 0;
        int wrote = 0, mode = r->mode;
        if (r->mode == PCH_WRITES_OWN) {
            want = cut ? 0 : r->ledger[page]; /* a store cut short: the page may hold it or not */
            wrote = r->ledger[page] != 0;
            mode = want || cut ? mode : PCH_WRITES_NONE; /* nobody wrote it: the source's bytes, exactly */
            r->writes_checked += wrote;
        } else if (r->mode == PCH_WRITES_COUNT) {
            hi = r->ledger[page];
            lo = hi > cut ? hi - cut : 0;
            wrote = hi != 0;
            r->writes_checked += hi;
        }
        r->pages_checked++;
        int kind = pch_judge_page(c, page, r->ram + page * c->page_size, mode, want, lo, hi, &r->first);
        if (kind < 0)
            continue;
        r->bad_pages++;
        r->by_kind[kind]++;
        r->lost_writes += (uint64_t)wrote;
    }
}
