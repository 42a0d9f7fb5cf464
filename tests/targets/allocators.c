/* Test target for other allocators: the same leaks and churn through whichever allocator it
 * is linked with (glibc, jemalloc, tcmalloc, mimalloc, musl; dynamic or static), plus that
 * allocator's own API when built with -DUSE_JEMALLOC / -DUSE_TCMALLOC / -DUSE_MIMALLOC.
 *
 * Protocol (stdin/stdout): prints "ready"; on "leak" does one round and prints "done"; on
 * "exit" or EOF exits 0. Each round leaks, per function (see the test):
 *   leak_malloc 4 x 1000, leak_calloc 3 x 10*100, leak_realloc 2 x 2048,
 *   leak_posix_memalign 3 x 512, leak_aligned_alloc 2 x 1024,
 *   and with an allocator API: leak_api 2 x 4096 (mallocx / tc_malloc / mi_malloc),
 *   leak_api_realloc 1 x 3000 (rallocx / tc_realloc / mi_realloc), leak_new 3 x 200
 *   (operator new, defined by the allocator).
 * Everything else it allocates is freed, including through sized frees (sdallocx, dallocx,
 * tc_free_sized, mi_free_size, sized operator delete). */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#if defined(USE_JEMALLOC)
#include <jemalloc/jemalloc.h>
#elif defined(USE_TCMALLOC)
#include <gperftools/tcmalloc.h>
#elif defined(USE_MIMALLOC)
#include <mimalloc.h>
#endif

#if defined(USE_JEMALLOC) || defined(USE_TCMALLOC) || defined(USE_MIMALLOC)
#define HAVE_API 1
/* C++ operators by their mangled names: the allocator defines them. */
void *_Znwm(unsigned long);
void _ZdlPvm(void *, unsigned long);
void _ZdlPv(void *);
#endif

void *volatile keep[4096];
volatile int nkeep;
void *volatile sink;

#define NOINLINE __attribute__((noinline))
#define KEEP(p) (keep[nkeep++ % 4096] = (p))

NOINLINE void leak_malloc(void) { KEEP(malloc(1000)); }
NOINLINE void leak_calloc(void) { KEEP(calloc(10, 100)); }
NOINLINE void *seed(void) { return malloc(16); }
NOINLINE void leak_realloc(void) { KEEP(realloc(seed(), 2048)); }
NOINLINE void leak_posix_memalign(void) {
    void *p = NULL;
    if (posix_memalign(&p, 64, 512) == 0) KEEP(p);
}
NOINLINE void leak_aligned_alloc(void) { KEEP(aligned_alloc(128, 1024)); }

#ifdef HAVE_API
NOINLINE void leak_api(void) {
#if defined(USE_JEMALLOC)
    KEEP(mallocx(4096, 0));
#elif defined(USE_TCMALLOC)
    KEEP(tc_malloc(4096));
#else
    KEEP(mi_malloc(4096));
#endif
}
NOINLINE void leak_api_realloc(void) {
#if defined(USE_JEMALLOC)
    KEEP(rallocx(mallocx(100, 0), 3000, 0));
#elif defined(USE_TCMALLOC)
    KEEP(tc_realloc(tc_malloc(100), 3000));
#else
    KEEP(mi_realloc(mi_malloc(100), 3000));
#endif
}
NOINLINE void leak_new(void) { KEEP(_Znwm(200)); }

NOINLINE void churn_api(void) {
    for (int i = 0; i < 300; i++) {
        size_t n = 64 + i;
#if defined(USE_JEMALLOC)
        void *a = mallocx(n, 0);
        void *b = mallocx(n, MALLOCX_ZERO);
        b = rallocx(b, 2 * n, 0);
        sink = a;
        sink = b;
        sdallocx(a, n, 0);
        dallocx(b, 0);
#elif defined(USE_TCMALLOC)
        void *a = tc_malloc(n);
        void *b = tc_calloc(2, n);
        sink = a;
        sink = b;
        tc_free_sized(a, n);
        tc_free(b);
#else
        void *a = mi_malloc(n);
        void *b = mi_zalloc(n);
        sink = a;
        sink = b;
        mi_free_size(a, n);
        mi_free(b);
#endif
        void *c = _Znwm(n);
        void *d = _Znwm(n);
        sink = c;
        sink = d;
        _ZdlPvm(c, n);
        _ZdlPv(d);
    }
}
#endif

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
}

NOINLINE void do_leaks(void) {
    for (int i = 0; i < 4; i++) leak_malloc();
    for (int i = 0; i < 3; i++) leak_calloc();
    for (int i = 0; i < 2; i++) leak_realloc();
    for (int i = 0; i < 3; i++) leak_posix_memalign();
    for (int i = 0; i < 2; i++) leak_aligned_alloc();
#ifdef HAVE_API
    for (int i = 0; i < 2; i++) leak_api();
    leak_api_realloc();
    for (int i = 0; i < 3; i++) leak_new();
    churn_api();
#endif
    churn();
}

int main(void) {
    char line[64];
    setvbuf(stdout, NULL, _IOLBF, 0);
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
