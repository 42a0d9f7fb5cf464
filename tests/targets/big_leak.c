/* Test target for sampling accuracy: on "leak", leaks exactly 64 MiB in 65536 blocks (half of
 * 512 B, half of 1536 B, interleaved) from leak_block(), and churns 100000 blocks that are
 * freed. Protocol as alloc_funcs.c: "ready"; "leak" -> "done"; "exit". */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define BLOCKS 65536
static void *volatile kept[BLOCKS];
void *volatile sink;

/* Stores the block itself, so it is a frame of its own (no tail call into malloc). */
__attribute__((noinline)) void leak_block(int i) { kept[i] = malloc(i % 2 ? 1536 : 512); }

__attribute__((noinline)) void churn(void) {
    for (int i = 0; i < 100000; i++) {
        void *p = malloc(256);
        sink = p;
        free(p);
    }
}

int main(void) {
    char line[64];
    setvbuf(stdout, NULL, _IONBF, 0);
    printf("ready\n");
    while (fgets(line, sizeof line, stdin)) {
        if (strncmp(line, "leak", 4) == 0) {
            for (int i = 0; i < BLOCKS; i++) leak_block(i);
            churn();
            printf("done\n");
        } else if (strncmp(line, "exit", 4) == 0) {
            break;
        }
    }
    return 0;
}
