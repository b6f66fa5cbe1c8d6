/*
 * content.h - the primitives of the page content generator, shared by pch.c (fill and check) and
 * verify.c (stores and the judging of pages).  C only: no binding (postcopy_core/_cffi_src/) declares it.
 */
#ifndef PCH_CONTENT_H
#define PCH_CONTENT_H
#include <stdint.h>

/* splitmix64's finaliser: a cheap, well-mixed bijection on 64-bit words. */
static inline uint64_t pch_mix64(uint64_t x)
{
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ull;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebull;
    x ^= x >> 31;
    return x;
}

static inline uint64_t pch_page_key(uint64_t seed, uint64_t page)
{
    return pch_mix64(pch_mix64(seed + 0x9e3779b97f4a7c15ull) ^ (page * 0xd6e8feb86659fd93ull));
}

/* word k of a non-zero page: never 0 for k == 0, so a zero-filled page always mismatches */
static inline uint64_t pch_page_word(uint64_t key, uint64_t k)
{
    uint64_t w = pch_mix64(key + k * 0x9e3779b97f4a7c15ull);
    return k == 0 && w == 0 ? 1 : w;
}

/* a rewritten page's key: another bijection of the page's own key, one per generation */
static inline uint64_t pch_gen_key(uint64_t seed, uint64_t page, uint32_t gen)
{
    uint64_t key = pch_page_key(seed, page);
    return gen ? pch_mix64(key ^ ((uint64_t)gen * 0xa0761d6478bd642full)) : key;
}

#endif
