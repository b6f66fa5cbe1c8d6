"""Binding: the wire between source and destination (csrc/wire.h): the message numbers, every
message's packed layout (postcopy_core/protocol.py makes its struct formats from these), and the
one return-path parser (``pch_rp_parse``, inline in wire.h)."""

INCLUDES = '#include "wire.h"'

TYPES = """
#define PCH_MSG_HELLO ...
#define PCH_MSG_PAGES ...
#define PCH_MSG_ZERO ...
#define PCH_MSG_EOS ...
#define PCH_MSG_DISCARD ...
#define PCH_MSG_POSTCOPY_START ...
#define PCH_DISCARD_MAX_RANGES ...
#define PCH_FLAG_URGENT ...
#define PCH_PROTO_VERSION ...
#define PCH_HDR_SIZE ...
#define PCH_HELLO_SIZE ...
#define PCH_DISCARD_RANGE_SIZE ...

#define PCH_RP_SHUT ...
#define PCH_RP_REQ_PAGES_ID ...
#define PCH_RP_REQ_PAGES ...
#define PCH_RP_RECV_BITMAP ...
#define PCH_RP_RESUME ...
#define PCH_BITMAP_CHUNK ...
#define PCH_REQ_PAGES_SIZE ...
#define PCH_BITMAP_HDR ...

struct pch_rp_reader {
    uint64_t page_size, ram_size;
    const char *idstr;
    int id_known;
    int resumed;
};
struct pch_rp_msg {
    uint16_t type;
    uint64_t offset, length;
    uint32_t status;
    uint64_t first, pages;
    uint64_t bits_at;
    uint64_t received;
    char error[192];
};
"""

# the wire's own layouts: big-endian fields, no padding (PCH_PACKED in C)
PACKED = """
struct pch_frame_hdr {
    uint8_t type;
    uint8_t flags;
    uint16_t count;
    uint32_t payload_len;
    uint64_t offset;
};
struct pch_hello {
    char magic[4];
    uint16_t version;
    uint32_t page_size;
    uint64_t ram_size;
    uint8_t idlen;
};
struct pch_discard_range {
    uint64_t offset, length;
};
struct pch_rp_hdr {
    uint16_t type;
    uint16_t len;
};
struct pch_rp_req {
    uint64_t offset;
    uint32_t length;
};
struct pch_rp_shut {
    uint32_t status;
};
struct pch_rp_bitmap {
    uint64_t first;
    uint32_t pages;
};
struct pch_rp_resume {
    uint64_t received;
};
"""

FUNCTIONS = """
int64_t pch_rp_parse(const struct pch_rp_reader *r, const uint8_t *buf, uint64_t len, struct pch_rp_msg *m);
"""

SOURCES: list[str] = []  # the parser is inline in wire.h
