/* broken_eagain.c - uffd_handler.c with one mistake made on purpose, for the harness to catch:
 * every copy through the next vCPU's uffd, and a copy refused with EAGAIN (that process has a REMOVE event pending) dropped: nothing placed, nobody woken.
 *   cc -O2 -o broken_eagain broken_eagain.c   (uffd_handler.c must sit next to it) */
#define BROKEN_EAGAIN 1
#include "uffd_handler.c"
