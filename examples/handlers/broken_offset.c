/* broken_offset.c - uffd_handler.c with one mistake made on purpose, for the harness to catch:
 * each page copied from the file offset of the page after it.
 *   cc -O2 -o broken_offset broken_offset.c   (uffd_handler.c must sit next to it) */
#define BROKEN_OFFSET 1
#include "uffd_handler.c"
