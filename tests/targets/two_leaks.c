// Two leaks for the suppression tests: 400 bytes from leak_a, 1000 from leak_b, both lost.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void *volatile sink;

__attribute__((noinline)) void leak_a(void) {
    sink = malloc(400);
    memset(sink, 1, 400);
    sink = NULL;
}

__attribute__((noinline)) void leak_b(void) {
    sink = malloc(1000);
    memset(sink, 2, 1000);
    sink = NULL;
}

int main(void) {
    leak_a();
    leak_b();
    puts("done");
    return 0;
}
