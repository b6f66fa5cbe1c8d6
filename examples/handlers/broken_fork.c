/* broken_fork.c - uffd_handler.c with one mistake made on purpose, for the harness to catch:
 * UFFD_EVENT_FORK ignored: the new uffd it carries, the forked child's, is never served (the child waits for ever).
 *   cc -O2 -o broken_fork broken_fork.c   (uffd_handler.c must sit next to it) */
#define BROKEN_FORK 1
#include "uffd_handler.c"
