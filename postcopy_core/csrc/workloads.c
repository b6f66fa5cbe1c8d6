/* workloads.c - the vCPUs' access orders (see vcpu_workers/workloads.py for what each one means).
 * In C so that a worker needs no numpy: it fills its order array right after fork. */
#include "pch.h"

#include <math.h>
#include <stdlib.h>

#define STRIDE 16
#define HOTSET_ACCESSES 2
#define HOTSET_SKEW 1.1

/* splitmix64: a small, good generator; one stream per (seed, vcpu, purpose) */
struct rng { uint64_t s; };
static uint64_t next(struct rng *r)
{
    uint64_t z = (r->s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}
static struct rng stream(uint64_t seed, uint64_t a, uint64_t b)
{
    struct rng r = { seed };
    r.s = next(&r) ^ (a * 0xd1b54a32d192ed03ull);
    r.s = next(&r) ^ (b * 0x8cb92ba72f3d8dd7ull);
    return r;
}
static double uniform(struct rng *r) { return (double)(next(r) >> 11) * 0x1.0p-53; }

static void shuffle(uint32_t *a, uint64_t n, struct rng *r)
{
    for (uint64_t i = n; i > 1; i--) {
        uint64_t j = next(r) % i;
        uint32_t t = a[i - 1];
        a[i - 1] = a[j];
        a[j] = t;
    }
}

uint64_t pch_order_length(int kind, uint32_t vcpu, uint32_t nvcpus, uint64_t npages)
{
    uint64_t first = vcpu * npages / nvcpus, end = (vcpu + 1ull) * npages / nvcpus;
    if (kind == PCH_WL_SHARED)
        return npages;
    if (kind == PCH_WL_HOTSET)
        return HOTSET_ACCESSES * (end - first);
    return end - first;
}

/* Fills out[] (room for pch_order_length() entries); returns how many, or -1 for a bad kind. */
int64_t pch_make_order(int kind, uint32_t vcpu, uint32_t nvcpus, uint64_t npages, uint64_t seed, uint32_t *out)
{
    uint64_t first = vcpu * npages / nvcpus, end = (vcpu + 1ull) * npages / nvcpus, n = end - first;
    struct rng r = stream(seed, vcpu, 1);
    switch (kind) {
    case PCH_WL_SEQUENTIAL:
        for (uint64_t i = 0; i < n; i++)
            out[i] = (uint32_t)(first + i);
        return (int64_t)n;
    case PCH_WL_RANDOM:
        for (uint64_t i = 0; i < n; i++)
            out[i] = (uint32_t)(first + i);
        shuffle(out, n, &r);
        return (int64_t)n;
    case PCH_WL_STRIDE: { /* column by column: 0, 16, 32, ..., 1, 17, ... */
        uint64_t k = 0;
        for (uint64_t c = 0; c < STRIDE; c++)
            for (uint64_t i = c; i < n; i += STRIDE)
                out[k++] = (uint32_t)(first + i);
        return (int64_t)k;
    }
    case PCH_WL_SHARED: { /* one permutation of all pages, the same for every vCPU */
        struct rng s = stream(seed, 0x5eed, 2);
        for (uint64_t i = 0; i < npages; i++)
            out[i] = (uint32_t)i;
        shuffle(out, npages, &s);
        return (int64_t)npages;
    }
    case PCH_WL_HOTSET: {
        /* zipf-like ranks by inverting the continuous power law x^-s on [1, npages+1), mapped
         * through one permutation of all pages so the hot pages are the same for every vCPU and
         * scattered over RAM */
        uint32_t *hot = malloc(npages * sizeof *hot);
        if (!hot)
            return -2;
        struct rng s = stream(seed, 0xc0ffee, 3);
        for (uint64_t i = 0; i < npages; i++)
            hot[i] = (uint32_t)i;
        shuffle(hot, npages, &s);
        double e = 1.0 - HOTSET_SKEW, tail = 1.0 - pow((double)npages + 1.0, e);
        uint64_t m = HOTSET_ACCESSES * n;
        for (uint64_t i = 0; i < m; i++) {
            double x = pow(1.0 - uniform(&r) * tail, 1.0 / e);
            uint64_t rank = x < 1.0 ? 0 : (uint64_t)x - 1;
            out[i] = hot[rank < npages ? rank : npages - 1];
        }
        free(hot);
        return (int64_t)m;
    }
    }
    return -1;
}

/* Per access 1 = store, with probability `ratio`. */
void pch_make_writes(uint8_t *out, uint64_t n, double ratio, uint64_t seed, uint32_t vcpu)
{
    struct rng r = stream(seed, vcpu, 0x77);
    for (uint64_t i = 0; i < n; i++)
        out[i] = uniform(&r) < ratio;
}
