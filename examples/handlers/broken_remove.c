/* broken_remove.c - uffd_handler.c with one mistake made on purpose, for the harness to catch:
 * UFFD_EVENT_REMOVE ignored: a page the guest dropped comes back with the file's old bytes instead of zeros.
 *   cc -O2 -o broken_remove broken_remove.c   (uffd_handler.c must sit next to it) */
#define BROKEN_REMOVE 1
#include "uffd_handler.c"
