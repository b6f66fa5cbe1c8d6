/* broken_eexist.c - uffd_handler.c with one mistake made on purpose, for the harness to catch:
 * EEXIST from UFFDIO_COPY taken for success: the faulting vCPU is never woken (its page is there: a lost wake-up).
 *   cc -O2 -o broken_eexist broken_eexist.c   (uffd_handler.c must sit next to it) */
#define BROKEN_EEXIST 1
#include "uffd_handler.c"
