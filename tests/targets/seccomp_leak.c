/* Test target: runs under a seccomp filter that denies clone and clone3 (EPERM), so the
 * reachability scan cannot fork a snapshot inside it.
 *
 * Protocol: prints "ready"; "leak" -> 10 blocks of 100 B dropped (definitely lost) and 10 of
 * 200 B kept in the global `kept_list` (reachable); prints "done"; "exit" -> exits 0.
 * 64 MiB of touched .bss make a copy of its memory take tens of milliseconds. */
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>

struct node {
    struct node *next;
    char payload[192];
};
struct node *kept_list;
void *volatile dropped;
static char ballast[64 << 20];

__attribute__((noinline)) void drop_blocks(void) {
    for (int i = 0; i < 10; i++) dropped = malloc(100);
    dropped = NULL;
}

__attribute__((noinline)) void keep_blocks(void) {
    for (int i = 0; i < 10; i++) {
        struct node *n = calloc(1, sizeof *n);
        n->next = kept_list;
        kept_list = n;
    }
}

static void deny_clone(void) {
    struct sock_filter f[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_clone, 2, 0),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_clone3, 1, 0),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | 1 /* EPERM */),
    };
    struct sock_fprog prog = {.len = sizeof f / sizeof f[0], .filter = f};
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 || prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog) != 0) {
        perror("seccomp");
        exit(3);
    }
}

int main(void) {
    memset(ballast, 1, sizeof ballast);
    deny_clone();
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("ready\n");
    char line[64];
    while (fgets(line, sizeof line, stdin)) {
        if (strncmp(line, "exit", 4) == 0) break;
        if (strncmp(line, "leak", 4) == 0) {
            drop_blocks();
            keep_blocks();
            printf("done\n");
        }
    }
    return 0;
}
