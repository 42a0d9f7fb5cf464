/* Test target: leaks a known number of bytes through each libc allocation function,
 * churns temporaries that are all freed, and otherwise sits idle.
 *
 * Protocol (stdin/stdout, one word per line): prints "ready"; on "leak" does the work once
 * and prints "done"; on "exit" (or EOF) exits 0. The expected figures are in the test. */
#define _GNU_SOURCE
#include <malloc.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

/* volatile: the compiler must not drop the stores, nor the allocations behind them. */
void *volatile keep[64];
volatile int nkeep;

/* noinline and no tail calls (built with -fno-optimize-sibling-calls): each leak_* function
 * is a frame of its own in every stack. */
#define NOINLINE __attribute__((noinline))
#define KEEP(p) (keep[nkeep++] = (p))

NOINLINE void leak_malloc(void) { KEEP(malloc(1000)); }
NOINLINE void leak_calloc(void) { KEEP(calloc(10, 100)); }
NOINLINE void *seed_for_realloc(void) { return malloc(16); }
NOINLINE void leak_realloc(void) { KEEP(realloc(seed_for_realloc(), 2048)); }
NOINLINE void leak_reallocarray(void) { KEEP(reallocarray(NULL, 25, 40)); }
NOINLINE void leak_posix_memalign(void) {
    void *p = NULL;
    if (posix_memalign(&p, 64, 512) == 0) KEEP(p);
}
NOINLINE void leak_aligned_alloc(void) { KEEP(aligned_alloc(128, 1024)); }
NOINLINE void leak_memalign(void) { KEEP(memalign(256, 768)); }
NOINLINE void leak_valloc(void) { KEEP(valloc(5000)); }
NOINLINE void leak_pvalloc(void) { KEEP(pvalloc(3000)); }
NOINLINE void leak_mmap(void) {
    void *p = mmap(NULL, 65536, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p != MAP_FAILED) KEEP(p);
}

/* Everything here is freed before it returns. Pointers escape through `sink` so the
 * compiler cannot elide the malloc/free pairs. */
void *volatile sink;
NOINLINE void churn(void) {
    for (int i = 0; i < 500; i++) {
        char *a = malloc(16 + i);
        char *b = calloc(4, 32);
        char *c = realloc(NULL, 100);
        c = realloc(c, 300);
        void *d = NULL;
        if (posix_memalign(&d, 32, 200) != 0) d = NULL;
        memset(a, 1, 16);
        sink = a;
        sink = b;
        sink = c;
        sink = d;
        free(a);
        free(b);
        free(c);
        free(d);
    }
    for (int i = 0; i < 10; i++) {
        void *m = mmap(NULL, 8192, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (m != MAP_FAILED) munmap(m, 8192);
    }
}

NOINLINE void do_leaks(void) {
    for (int i = 0; i < 4; i++) leak_malloc();
    for (int i = 0; i < 3; i++) leak_calloc();
    for (int i = 0; i < 2; i++) leak_realloc();
    for (int i = 0; i < 2; i++) leak_reallocarray();
    for (int i = 0; i < 3; i++) leak_posix_memalign();
    for (int i = 0; i < 2; i++) leak_aligned_alloc();
    for (int i = 0; i < 2; i++) leak_memalign();
    leak_valloc();
    leak_pvalloc();
    for (int i = 0; i < 2; i++) leak_mmap();
    churn();
}

int main(void) {
    char line[64];
    setvbuf(stdout, NULL, _IONBF, 0);
    /* stdio's own buffers are allocated now, before anyone attaches. */
    printf("ready\n");
    while (fgets(line, sizeof line, stdin)) {
        if (strncmp(line, "leak", 4) == 0) {
            do_leaks();
            printf("done\n");
        } else if (strncmp(line, "exit", 4) == 0) {
            break;
        }
    }
    return 0;
}
