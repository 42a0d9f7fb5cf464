/* Test target for load and process changes. Protocol: prints "ready"; then
 *   "leak"  -> 64 threads each leak 100 blocks of 100 B from thread_leak() and churn 1000
 *              malloc/free pairs; prints "done" when all joined.
 *   "fork"  -> forks a child that leaks 10 x 64 KiB from child_leak() and exits 0; the parent
 *              reaps it and prints "forked <exit status>".
 *   "exec"  -> execs itself (the new image prints "ready" again).
 *   "spin"  -> starts 16 threads that malloc/free without pause; prints "spinning".
 *   "rate"  -> prints "rate N": malloc/free pairs per second over the next 200 ms.
 *   "exit"  -> exits 0. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#define THREADS 64
#define PER_THREAD 100
static void *volatile kept[THREADS][PER_THREAD];
void *volatile sink;

__attribute__((noinline)) void thread_leak(int t, int i) { kept[t][i] = malloc(100); }

static void *worker(void *arg) {
    int t = (int)(long)arg;
    for (int i = 0; i < 1000; i++) {
        void *p = malloc(32 + i % 200);
        sink = p;
        free(p);
        if (i % 10 == 0) thread_leak(t, i / 10);
    }
    return NULL;
}

static volatile unsigned long spins;

static void *spinner(void *arg) {
    (void)arg;
    for (;;) {
        void *p = malloc(64);
        sink = p;
        free(p);
        __atomic_fetch_add(&spins, 1, __ATOMIC_RELAXED);
    }
    return NULL;
}

__attribute__((noinline)) void child_leak(void) {
    for (int i = 0; i < 10; i++) sink = malloc(64 * 1024);
}

int main(int argc, char **argv) {
    (void)argc;
    char line[64];
    setvbuf(stdout, NULL, _IONBF, 0);
    printf("ready\n");
    while (fgets(line, sizeof line, stdin)) {
        if (strncmp(line, "leak", 4) == 0) {
            pthread_t tid[THREADS];
            for (long t = 0; t < THREADS; t++) pthread_create(&tid[t], NULL, worker, (void *)t);
            for (int t = 0; t < THREADS; t++) pthread_join(tid[t], NULL);
            printf("done\n");
        } else if (strncmp(line, "fork", 4) == 0) {
            pid_t pid = fork();
            if (pid == 0) {
                child_leak();
                _exit(0);
            }
            int status = 0;
            waitpid(pid, &status, 0);
            printf("forked %d\n", WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status));
        } else if (strncmp(line, "spin", 4) == 0) {
            pthread_t tid;
            for (int t = 0; t < 16; t++) pthread_create(&tid, NULL, spinner, NULL);
            printf("spinning\n");
        } else if (strncmp(line, "rate", 4) == 0) {
            unsigned long a = __atomic_load_n(&spins, __ATOMIC_RELAXED);
            usleep(200000);
            unsigned long b = __atomic_load_n(&spins, __ATOMIC_RELAXED);
            printf("rate %lu\n", (b - a) * 5);
        } else if (strncmp(line, "exec", 4) == 0) {
            execv("/proc/self/exe", argv);
            perror("execv");
        } else if (strncmp(line, "exit", 4) == 0) {
            break;
        }
    }
    return 0;
}
