/* Test target: stacks that do not fit the walker's stack windows (4 KiB each, four at most).
 * - leak_under_big_frame: one 12 KiB frame between main and malloc;
 * - leak_deep: 40 nested frames of ~700 B (28 KiB of stack) above malloc;
 * - leak_in_thread: malloc a few frames below a new thread's start, near the top of its stack.
 * Each leaks LEAK_BYTES once per "leak". The expected figures are in the test.
 *
 * Protocol (stdin/stdout, one word per line): prints "ready"; on "leak" does the work once
 * and prints "done"; on "exit" (or EOF) exits 0. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define NOINLINE __attribute__((noinline))
#define LEAK_BYTES 3000

void *volatile keep[64];
volatile int nkeep;

NOINLINE void leak_here(void) { keep[nkeep++] = malloc(LEAK_BYTES); }

/* The buffer is used after the call, so the frame cannot shrink or become a tail call. */
NOINLINE void leak_under_big_frame(void) {
    volatile char buf[12 * 1024];
    memset((char *)buf, 1, sizeof buf);
    leak_here();
    buf[0] = buf[sizeof buf - 1];
}

NOINLINE int leak_deep(int depth) {
    volatile char pad[700];
    pad[0] = (char)depth;
    if (depth == 0)
        leak_here();
    else
        pad[1] = (char)leak_deep(depth - 1);
    return pad[0] + pad[1];
}

NOINLINE void *leak_in_thread(void *arg) {
    (void)arg;
    leak_here();
    return NULL;
}

int main(void) {
    char line[64];
    setvbuf(stdout, NULL, _IONBF, 0);
    printf("ready\n");
    while (fgets(line, sizeof line, stdin)) {
        if (strncmp(line, "leak", 4) == 0) {
            leak_under_big_frame();
            leak_deep(40);
            pthread_t t;
            if (pthread_create(&t, NULL, leak_in_thread, NULL) == 0) pthread_join(t, NULL);
            printf("done\n");
        } else if (strncmp(line, "exit", 4) == 0) {
            break;
        }
    }
    return 0;
}
