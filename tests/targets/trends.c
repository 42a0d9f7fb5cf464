/* Memory-growth patterns for the verdict tests. After "go" on stdin, runs MODE until killed:
 *   leak   64 KiB (16 x 4 KiB, each holding a secret string) leaked every 100 ms from
 *          leak_sessions(): a steady leak;
 *   frag   allocator retention: glibc told (mallopt) to neither mmap blocks under 32 MiB nor
 *          trim its heap; every 50 ms a block 64 KiB larger than the last (256 KiB at first)
 *          is allocated, written and freed at once. Freed memory stays resident, so RSS
 *          grows ~64 KiB per round (~1.3 MiB/s, for ~25 s) while the live heap stays at zero;
 *   cache  a 2000-entry cache of 1 KiB values filled over ~2 s (10 per 10 ms), then every
 *          insert evicts the oldest: outstanding bytes flat once full.
 * Prints "ready" at start and "filled" when the cache is full. */
#include <malloc.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static void nap(long ms) {
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

void *volatile keep;

/* What the leaked blocks hold: a report must never contain it. */
static const char SECRET[] = "hunter2-SESSION-SECRET-7f3a9c";

__attribute__((noinline)) void leak_sessions(void) {
    for (int i = 0; i < 16; i++) {
        char *p = malloc(4096);
        memset(p, 1, 4096);
        memcpy(p, SECRET, sizeof SECRET);
        keep = p;
    }
}

__attribute__((noinline)) void retain_round(int round) {
    size_t big = 256 * 1024 + (size_t)round * 64 * 1024;
    char *p = malloc(big);
    memset(p, 2, big);
    /* The writes must happen (pages touched) though the block is freed right after. */
    __asm__ volatile("" : : "r"(p) : "memory");
    free(p);
}

#define CACHE 2000
static char *cache[CACHE];

__attribute__((noinline)) char *cache_value(void) {
    char *v = malloc(1024);
    memset(v, 4, 1024);
    return v;
}

__attribute__((noinline)) void cache_put(long n) {
    int slot = (int)(n % CACHE);
    free(cache[slot]);
    cache[slot] = cache_value();
}

int main(int argc, char **argv) {
    const char *mode = argc > 1 ? argv[1] : "leak";
    char line[16];
    setvbuf(stdout, NULL, _IONBF, 0);
    printf("ready\n");
    if (!fgets(line, sizeof line, stdin)) return 1;
    if (strcmp(mode, "leak") == 0) {
        for (;;) {
            leak_sessions();
            nap(100);
        }
    } else if (strcmp(mode, "frag") == 0) {
        mallopt(M_MMAP_THRESHOLD, 32 << 20); /* the most glibc allows */
        mallopt(M_TRIM_THRESHOLD, 1 << 30);
        for (int round = 0;; round++) {
            retain_round(round);
            nap(50);
        }
    } else {
        for (long n = 0;; n++) {
            cache_put(n);
            if (n == CACHE) printf("filled\n");
            if (n % 10 == 9) nap(10);
        }
    }
}
