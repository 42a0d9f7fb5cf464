/* Allocation-heavy loop for overhead measurements: after "go" on stdin, runs N malloc/free
 * pairs (sizes 16 B..4 KiB) from DEPTH nested calls and prints the mean ns per pair.
 * Usage: alloc_loop [N] [DEPTH] */
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

int main(int argc, char **argv) {
    long n = argc > 1 ? atol(argv[1]) : 1000000;
    int depth = argc > 2 ? atoi(argv[2]) : 0;
    char line[16];
    setvbuf(stdout, NULL, _IONBF, 0);
    printf("ready\n");
    while (fgets(line, sizeof line, stdin)) {
        if (strncmp(line, "go", 2) != 0) break;
        struct timespec a, b;
        clock_gettime(CLOCK_MONOTONIC, &a);
        sink = (void *)nest(depth, n);
        clock_gettime(CLOCK_MONOTONIC, &b);
        double ns = (b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec);
        printf("%.1f ns/pair\n", ns / n);
    }
    return 0;
}
