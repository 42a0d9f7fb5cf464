/* Allocation-heavy loop for overhead measurements: after "go" on stdin, each of THREADS
 * threads runs N malloc/free pairs (sizes 16 B..4 KiB) from DEPTH nested calls; prints the
 * wall time per pair per thread in ns.
 * Usage: alloc_loop [N] [DEPTH] [THREADS] */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

void *volatile sink;

__attribute__((noinline)) static long nest(int depth, long n) {
    if (depth > 0) return nest(depth - 1, n) + 1; /* not a tail call: a real frame each */
    for (long i = 0; i < n; i++) {
        void *p = malloc(16 + (i * 37) % 4081);
        sink = p;
        free(p);
    }
    return 0;
}

static long n_pairs;
static int nest_depth;

static void *worker(void *arg) {
    (void)arg;
    nest(nest_depth, n_pairs);
    return NULL;
}

int main(int argc, char **argv) {
    long n = argc > 1 ? atol(argv[1]) : 1000000;
    int depth = argc > 2 ? atoi(argv[2]) : 0;
    int threads = argc > 3 ? atoi(argv[3]) : 1;
    if (threads < 1 || threads > 64) threads = 1;
    n_pairs = n;
    nest_depth = depth;
    char line[16];
    setvbuf(stdout, NULL, _IONBF, 0);
    printf("ready\n");
    while (fgets(line, sizeof line, stdin)) {
        if (strncmp(line, "go", 2) != 0) break;
        struct timespec a, b;
        clock_gettime(CLOCK_MONOTONIC, &a);
        pthread_t tid[64];
        for (int t = 1; t < threads; t++) pthread_create(&tid[t], NULL, worker, NULL);
        worker(NULL);
        for (int t = 1; t < threads; t++) pthread_join(tid[t], NULL);
        clock_gettime(CLOCK_MONOTONIC, &b);
        double ns = (b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec);
        printf("%.1f ns/pair\n", ns / n);
    }
    return 0;
}
