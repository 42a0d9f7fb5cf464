/* Library for scan_cases' "dlclose" case: each call allocates a pair (a 64-byte block pointing
 * at a 48-byte one) and keeps it only in this library's own global, which goes away with the
 * library when the host dlclose's it. Built as libscan_plugin.so next to scan_cases, with frame
 * pointers (see scan.rs). */
#include <stdlib.h>

struct Pair {
    void *child;
    char payload[56];
};

/* Exported (not static): a store to it cannot be optimized away with the allocations. */
struct Pair *plugin_pairs[64];
static int n_pairs;

__attribute__((noinline)) void plugin_make_pair(void) {
    struct Pair *p = calloc(1, sizeof *p);
    p->child = calloc(1, 48);
    plugin_pairs[n_pairs++ % 64] = p;
}
