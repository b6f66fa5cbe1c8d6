"""Binding: the source's byte lane (csrc/source.c, declared in csrc/pch.h): answers plain REQ_PAGES
and streams the pages postcopy_core/source.py's strategy picked."""

INCLUDES = '#include "pch.h"'

TYPES = """
#define PCH_SENT_STREAM ...
#define PCH_SENT_URGENT ...
#define PCH_SERVE_CONTROL ...
#define PCH_SERVE_REST ...
#define PCH_SERVE_EOF ...
#define PCH_SERVE_MORE ...
#define PCH_SERVE_REQUESTS ...

struct pch_source {
    int fd;
    int id_known;
    const struct pch_rp_reader *rp;
    int resend_streamed;
    const uint8_t *image;
    const uint8_t *zero;
    uint8_t *sent;
    uint64_t page_size, ram_size;
    uint64_t requests, pages_urgent, pages_zero, requested_already_sent, bytes_sent, pages_stream;
    uint32_t *requested;
    uint64_t requested_cap, requested_len;
    uint64_t pages_pushed;
};

struct pch_pump {
    int rp_fd, ctl_fd, stream_fd;
    const uint32_t *order;
    uint64_t norder, pos;
    uint32_t max_run;
    struct pch_frame_hdr hdr;
    const uint8_t *part[2];
    uint64_t part_len[2];
    uint8_t *rest;
    uint64_t cap, rest_len;
    uint32_t spin;
};
"""

FUNCTIONS = """
int64_t pch_source_answer(struct pch_source *s, const uint8_t *buf, uint64_t len);
int64_t pch_source_push(struct pch_source *s, const uint32_t *pages, uint64_t n);
int pch_source_pump(struct pch_source *s, struct pch_pump *p);
int pch_pump_finish(struct pch_pump *p);
"""

SOURCES = ["source.c"]
