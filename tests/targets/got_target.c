/* Test target for GOT planning (inprocess::got): calls malloc and free at start, so their
 * slots are bound even when lazily linked, and keeps calloc, posix_memalign and the static
 * table's free (a data relocation) for the "call" command, so those stay lazy until then.
 *
 * Protocol (stdin/stdout, one word per line): prints "ready"; on "call" makes the other
 * calls once and prints "done"; on "exit" (or EOF) exits 0. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* A load-time function pointer in .data: R_X86_64_64 against free. */
void (*tbl[])(void *) = { free };

/* volatile: the compiler must not drop the allocations. */
void *volatile sink;

static void call_rest(void) {
    sink = calloc(4, 32);
    tbl[0](sink);
    void *p = NULL;
    if (posix_memalign(&p, 64, 128) == 0) sink = p;
    free(sink);
}

int main(void) {
    sink = malloc(100);
    free(sink);
    setvbuf(stdout, NULL, _IOLBF, 0);
    puts("ready");
    char line[64];
    while (fgets(line, sizeof line, stdin)) {
        if (strncmp(line, "call", 4) == 0) {
            call_rest();
            puts("done");
        } else if (strncmp(line, "exit", 4) == 0) {
            break;
        }
    }
    return 0;
}
