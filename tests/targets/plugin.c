/* A shared library the dlopen test target loads after leakprobe attached. */
#include <stdlib.h>

void *volatile plugin_kept[16];

__attribute__((noinline)) static void plugin_leak_inner(int i) { plugin_kept[i] = malloc(4096); }

__attribute__((noinline)) void plugin_leak(void) {
    for (int i = 0; i < 8; i++) plugin_leak_inner(i);
}
