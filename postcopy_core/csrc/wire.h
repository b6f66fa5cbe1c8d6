/*
 * wire.h - the wire between source and destination, declared once: every message's layout is a
 * packed struct here, which the C lanes (dest.c, source.c) read and write through, and from which
 * postcopy_core/protocol.py makes its struct formats (through cffi's view of these structs).
 *
 * Every multi-byte field on the wire is BIG endian (QEMU's return path is, and the page stream
 * follows it): read a field with be16toh/be32toh/be64toh, write it with htobe16/32/64 (<endian.h>).
 * What each field may hold, and the checks, are documented in protocol.py.
 */
#ifndef PCH_WIRE_H
#define PCH_WIRE_H
#include <endian.h>
#include <errno.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#ifndef PCH_PACKED
#define PCH_PACKED __attribute__((packed))
#endif
/* ---- page stream (source -> destination, on the stream and the urgent channel) ---- */
#define PCH_MSG_HELLO 1
#define PCH_MSG_PAGES 2
#define PCH_MSG_ZERO 3
#define PCH_MSG_EOS 4
/* precopy (run --precopy), stream channel only, before postcopy starts: DISCARD (pages dirtied
 * since they were sent, dropped so that they fault again) and POSTCOPY_START (no payload; the
 * vCPUs may run from now on) */
#define PCH_MSG_DISCARD 5
#define PCH_MSG_POSTCOPY_START 6
#define PCH_DISCARD_MAX_RANGES 12 /* QEMU's batch: at most this many ranges per discard command */
#define PCH_FLAG_URGENT 1
#define PCH_PROTO_VERSION 1

struct PCH_PACKED pch_frame_hdr { /* every page-stream message starts with it; the payload follows */
    uint8_t type;                 /* PCH_MSG_* */
    uint8_t flags;                /* PCH_FLAG_* */
    uint16_t count;               /* PAGES/ZERO: pages; DISCARD: ranges */
    uint32_t payload_len;         /* bytes after this header */
    uint64_t offset;              /* PAGES/ZERO: RAM offset of the first page, in bytes */
};
struct PCH_PACKED pch_hello {     /* HELLO's payload; the RAM block's id (idlen bytes) follows */
    char magic[4];                /* "PCHS" */
    uint16_t version;             /* PCH_PROTO_VERSION */
    uint32_t page_size;
    uint64_t ram_size;
    uint8_t idlen;
};
struct PCH_PACKED pch_discard_range { /* DISCARD's payload: `count` of these, in bytes */
    uint64_t offset, length;
};
/* the sizes, as integer constants for cffi and array bounds; the compiler holds them to the structs */
#define PCH_HDR_SIZE 16
#define PCH_HELLO_SIZE 19
#define PCH_DISCARD_RANGE_SIZE 16

/* ---- return path (destination -> source), QEMU's numbers ---- */
#define PCH_RP_SHUT 1
#define PCH_RP_REQ_PAGES_ID 3
#define PCH_RP_REQ_PAGES 4
/* postcopy recovery: a destination that lost its source tells the new one what it holds:
 * RECV_BITMAP messages (then one bit per page, LSB first, 1 = received), then RESUME; the re-sent
 * requests follow */
#define PCH_RP_RECV_BITMAP 7
#define PCH_RP_RESUME 8
#define PCH_BITMAP_CHUNK 32768 /* bitmap bytes per RECV_BITMAP message (be16 length) */

struct PCH_PACKED pch_rp_hdr {    /* every return-path message starts with it; `len` payload bytes follow */
    uint16_t type;                /* PCH_RP_* */
    uint16_t len;
};
struct PCH_PACKED pch_rp_req {    /* REQ_PAGES's payload; REQ_PAGES_ID's adds u8 idlen and the id */
    uint64_t offset;              /* bytes, in the RAM block */
    uint32_t length;
};
struct PCH_PACKED pch_rp_shut {   /* SHUT: the destination is done */
    uint32_t status;
};
struct PCH_PACKED pch_rp_bitmap { /* RECV_BITMAP's payload; (pages + 7) / 8 bytes of bits follow */
    uint64_t first;               /* first page */
    uint32_t pages;
};
struct PCH_PACKED pch_rp_resume { /* RESUME: ends the bitmap */
    uint64_t received;            /* pages received in all */
};
#define PCH_REQ_PAGES_SIZE 16 /* a whole REQ_PAGES message: header + payload */
#define PCH_BITMAP_HDR 12

_Static_assert(sizeof(struct pch_frame_hdr) == PCH_HDR_SIZE, "page stream header");
_Static_assert(sizeof(struct pch_hello) == PCH_HELLO_SIZE, "HELLO payload");
_Static_assert(sizeof(struct pch_discard_range) == PCH_DISCARD_RANGE_SIZE, "DISCARD range");
_Static_assert(sizeof(struct pch_rp_hdr) + sizeof(struct pch_rp_req) == PCH_REQ_PAGES_SIZE, "REQ_PAGES");
_Static_assert(sizeof(struct pch_rp_bitmap) == PCH_BITMAP_HDR, "RECV_BITMAP payload header");

/* ---- the return-path parser, the only one: source.c's lane and protocol.py (through cffi) call it.
 * Here, inline, with the layouts it reads: the lane's loop gets it inlined, and the wire is one file. */
struct pch_rp_reader {            /* what a message is checked against */
    uint64_t page_size, ram_size; /* the RAM geometry the source announced in HELLO */
    const char *idstr;            /* its RAM block's id (NUL-terminated) */
    int id_known;                 /* a REQ_PAGES_ID named the block: plain REQ_PAGES are valid */
    int resumed;                  /* RESUME came: no more RECV_BITMAP/RESUME */
};
struct pch_rp_msg {               /* one message, decoded (host byte order) */
    uint16_t type;                /* PCH_RP_* */
    uint64_t offset, length;      /* REQ_PAGES(_ID): checked whole pages inside RAM */
    uint32_t status;              /* SHUT */
    uint64_t first, pages;        /* RECV_BITMAP: checked inside RAM; */
    uint64_t bits_at;             /* its bits start this many bytes into the message */
    uint64_t received;            /* RESUME */
    char error[192];              /* the one-line error when pch_rp_parse returns -EPROTO */
};

__attribute__((format(printf, 2, 3))) static inline int64_t rp_bad(struct pch_rp_msg *m, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(m->error, sizeof m->error, fmt, ap);
    va_end(ap);
    return -EPROTO;
}

/* The id as Python's repr shows a str: quoted, anything unprintable escaped, so the line stays one line. */
static inline void rp_quoted(char *out, size_t cap, const uint8_t *id, unsigned n)
{
    size_t k = 0;
    out[k++] = '\'';
    for (unsigned i = 0; i < n && k + 6 < cap; i++) {
        uint8_t c = id[i];
        if (c == '\'' || c == '\\')
            k += (size_t)snprintf(out + k, cap - k, "\\%c", c);
        else if (c >= 0x20 && c < 0x7f)
            out[k++] = (char)c;
        else
            k += (size_t)snprintf(out + k, cap - k, "\\x%02x", c);
    }
    out[k++] = '\'';
    out[k] = 0;
}

/* REQ_PAGES(_ID)'s range: whole pages inside RAM */
static inline int64_t rp_range(const struct pch_rp_reader *r, struct pch_rp_msg *m, const struct pch_rp_req *q,
                             int64_t size)
{
    m->offset = be64toh(q->offset);
    m->length = be32toh(q->length);
    unsigned long long off = m->offset, len = m->length;
    if (off % r->page_size || len == 0 || len % r->page_size)
        return rp_bad(m, "page request 0x%llx+0x%llx is not page aligned (page size %llu)", off, len,
                   (unsigned long long)r->page_size);
    if (len > r->ram_size || off > r->ram_size - len)
        return rp_bad(m, "page request 0x%llx+0x%llx is past the end of RAM (0x%llx)", off, len,
                   (unsigned long long)r->ram_size);
    return size;
}

static inline int64_t rp_req_pages_id(const struct pch_rp_reader *r, struct pch_rp_msg *m, const uint8_t *body,
                            unsigned blen, int64_t size)
{
    if (blen < sizeof(struct pch_rp_req) + 2)
        return rp_bad(m, "REQ_PAGES_ID: payload of %u bytes is too short", blen);
    unsigned idlen = body[sizeof(struct pch_rp_req)];
    const uint8_t *id = body + sizeof(struct pch_rp_req) + 1;
    if (blen != sizeof(struct pch_rp_req) + 1 + idlen || idlen == 0)
        return rp_bad(m, "REQ_PAGES_ID: id length %u does not match payload of %u bytes", idlen, blen);
    if (idlen != strlen(r->idstr) || memcmp(id, r->idstr, idlen)) {
        char q[4 * 255 + 3];
        rp_quoted(q, sizeof q, id, idlen);
        return rp_bad(m, "REQ_PAGES_ID: unknown RAM block %s", q);
    }
    return rp_range(r, m, (const struct pch_rp_req *)body, size);
}

/* RECV_BITMAP / RESUME: the received map of a destination that lost its source */
static inline int64_t rp_recovery(const struct pch_rp_reader *r, struct pch_rp_msg *m, const uint8_t *body, unsigned blen,
                        int64_t size)
{
    if (r->resumed)
        return rp_bad(m, "RECV_BITMAP/RESUME after RESUME");
    if (m->type == PCH_RP_RESUME) {
        if (blen != sizeof(struct pch_rp_resume))
            return rp_bad(m, "RESUME: payload is %u bytes, expected %zu", blen, sizeof(struct pch_rp_resume));
        m->received = be64toh(((const struct pch_rp_resume *)body)->received);
        return size;
    }
    if (blen < sizeof(struct pch_rp_bitmap))
        return rp_bad(m, "RECV_BITMAP: payload of %u bytes is too short", blen);
    const struct pch_rp_bitmap *b = (const struct pch_rp_bitmap *)body;
    uint64_t npages = r->ram_size / r->page_size;
    m->first = be64toh(b->first);
    m->pages = be32toh(b->pages);
    if (m->pages == 0 || m->first > npages || m->pages > npages - m->first)
        return rp_bad(m, "RECV_BITMAP: pages %llu+%llu outside RAM of %llu pages", (unsigned long long)m->first,
                   (unsigned long long)m->pages, (unsigned long long)npages);
    if (blen != sizeof *b + (m->pages + 7) / 8)
        return rp_bad(m, "RECV_BITMAP: %u bytes of bits for %llu pages", blen - (unsigned)sizeof *b,
                   (unsigned long long)m->pages);
    m->bits_at = sizeof(struct pch_rp_hdr) + sizeof *b;
    return size;
}

/* Decodes and checks the message at buf[0..len).  Returns its length in bytes (> 0), 0 while it is
 * not all there, or -EPROTO with m->error set.  It changes nothing in r: the caller, having acted on
 * the message, sets id_known (REQ_PAGES_ID) or resumed (RESUME), so that a lane may look at a
 * message and leave it to another caller. */
static inline int64_t pch_rp_parse(const struct pch_rp_reader *r, const uint8_t *buf, uint64_t len, struct pch_rp_msg *m)
{
    if (len < sizeof(struct pch_rp_hdr))
        return 0;
    const struct pch_rp_hdr *h = (const struct pch_rp_hdr *)buf;
    unsigned blen = be16toh(h->len);
    if (len - sizeof *h < blen)
        return 0;
    const uint8_t *body = buf + sizeof *h;
    int64_t size = (int64_t)(sizeof *h + blen);
    m->type = be16toh(h->type);
    switch (m->type) {
    case PCH_RP_REQ_PAGES:
        if (blen != sizeof(struct pch_rp_req))
            return rp_bad(m, "REQ_PAGES: payload is %u bytes, expected %zu", blen, sizeof(struct pch_rp_req));
        if (!r->id_known)
            return rp_bad(m, "REQ_PAGES before any REQ_PAGES_ID named the RAM block");
        return rp_range(r, m, (const struct pch_rp_req *)body, size);
    case PCH_RP_REQ_PAGES_ID:
        return rp_req_pages_id(r, m, body, blen, size);
    case PCH_RP_SHUT:
        if (blen != sizeof(struct pch_rp_shut))
            return rp_bad(m, "SHUT: payload is %u bytes, expected %zu", blen, sizeof(struct pch_rp_shut));
        m->status = be32toh(((const struct pch_rp_shut *)body)->status);
        return size;
    case PCH_RP_RECV_BITMAP:
    case PCH_RP_RESUME:
        return rp_recovery(r, m, body, blen, size);
    default:
        return rp_bad(m, "return path: unknown message type %u", (unsigned)m->type);
    }
}

#endif
