/* Call sites that end, for the eviction tests. Prints "ready", then on "go":
 *   phase 1: startup work at 32 distinct call sites (one recursion depth each): every block
 *            allocated there is freed at once, so each of those sites ends with nothing
 *            outstanding and is never called again;
 *   phase 2: until killed, one 64-byte block leaked every 10 ms from leak_steadily(), and
 *            every 50 ms a block allocated and freed in churn() (a site that never idles).
 * Prints "phase2" when phase 1 is over. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static void nap(long ms) {
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

void *volatile keep;

/* Each depth is its own stack, so its own call site. */
__attribute__((noinline)) void startup(int depth) {
    if (depth > 0) {
        startup(depth - 1);
        __asm__ volatile("" ::: "memory"); /* not a tail call */
        return;
    }
    for (int i = 0; i < 4; i++) {
        char *p = malloc(256);
        memset(p, 3, 256);
        keep = p;
        free(p);
    }
}

__attribute__((noinline)) void leak_steadily(void) {
    char *p = malloc(64);
    memset(p, 4, 64);
    keep = p;
}

__attribute__((noinline)) void churn(void) {
    char *p = malloc(128);
    memset(p, 5, 128);
    keep = p;
    free(p);
}

int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("ready\n");
    char line[64];
    if (!fgets(line, sizeof line, stdin)) return 1;
    for (int d = 0; d < 32; d++) {
        for (int k = 0; k <= d; k++) startup(d);
    }
    printf("phase2\n");
    for (long i = 0;; i++) {
        leak_steadily();
        if (i % 5 == 0) churn();
        nap(10);
    }
}
