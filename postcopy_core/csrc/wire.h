/*
 * wire.h - the wire between source and destination, written once: the C lanes (dest.c, source.c)
 * include it and the Python side (postcopy_core/protocol.py) reads the same numbers through cffi.
 * Layouts and field checks are documented in protocol.py.
 */
#ifndef PCH_WIRE_H
#define PCH_WIRE_H

/* page stream (source -> destination): 16-byte header u8 type, u8 flags, be16 count,
 * be32 payload_len, be64 offset */
#define PCH_MSG_HELLO 1
#define PCH_MSG_PAGES 2
#define PCH_MSG_ZERO 3
#define PCH_MSG_EOS 4
/* precopy (run --precopy), stream channel only, before postcopy starts:
 * DISCARD: count = ranges (1..PCH_DISCARD_MAX_RANGES), offset 0, payload = count * (be64 offset,
 * be64 length) in bytes: pages dirtied since they were sent, dropped so that they fault again;
 * POSTCOPY_START: no payload; the vCPUs may run from now on */
#define PCH_MSG_DISCARD 5
#define PCH_MSG_POSTCOPY_START 6
#define PCH_DISCARD_MAX_RANGES 12 /* QEMU's batch: at most this many ranges per discard command */
#define PCH_DISCARD_RANGE_SIZE 16
#define PCH_FLAG_URGENT 1
#define PCH_HDR_SIZE 16
#define PCH_PROTO_VERSION 1
/* HELLO payload: 4s magic "PCHS", be16 version, be32 page_size, be64 ram_size, u8 idlen, idstr */
#define PCH_HELLO_SIZE 19

/* return path (destination -> source), QEMU's numbers: be16 type, be16 len, payload */
#define PCH_RP_SHUT 1
#define PCH_RP_REQ_PAGES_ID 3
#define PCH_RP_REQ_PAGES 4
#define PCH_REQ_PAGES_SIZE 16 /* header + be64 offset + be32 length */
/* postcopy recovery: a destination that lost its source tells the new one what it holds.
 * RECV_BITMAP payload: be64 first page, be32 pages, then one bit per page (LSB first, 1 = received);
 * RESUME payload: be64 pages received in all; it ends the bitmap, the re-sent requests follow. */
#define PCH_RP_RECV_BITMAP 7
#define PCH_RP_RESUME 8
#define PCH_BITMAP_HDR 12
#define PCH_BITMAP_CHUNK 32768 /* bitmap bytes per RECV_BITMAP message (be16 length) */

#endif
