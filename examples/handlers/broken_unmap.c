/* broken_unmap.c - uffd_handler.c with one mistake made on purpose, for the harness to catch:
 * UFFD_EVENT_UNMAP taken as final (the range is refused once it is mapped back and registered again)
 * and UFFD_EVENT_REMAP ignored (the moved piece's faults, at its new address, are in no region).
 *   cc -O2 -o broken_unmap broken_unmap.c   (uffd_handler.c must sit next to it) */
#define BROKEN_UNMAP 1
#include "uffd_handler.c"
