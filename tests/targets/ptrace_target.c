/* Test target for the ptrace layer: N threads (argv[1], default 4), in turn
 *   spinning  (counting, with an invariant kept in general and vector registers),
 *   sleeping  (nanosleep 50 ms in a loop; waking early or with an error is an error),
 *   reading   (blocked in read() on a pipe nobody writes; returning is an error).
 * SIGUSR1's handler counts deliveries. With argv[2] "seccomp" it first installs an allow-all
 * seccomp filter (Seccomp: 2). Built without frame pointers.
 * Protocol: prints "ready"; then
 *   "count" -> "count <spins> <sleeps> <errors> <usr1>"
 *   "exit"  -> exits 0 if no thread saw an error, else 1. */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <pthread.h>
#include <sys/prctl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static volatile unsigned long spins, sleeps, errors;
static volatile sig_atomic_t usr1;
static int pipefd[2];

static void on_usr1(int sig) {
    (void)sig;
    usr1++;
}

static void *spinner(void *arg) {
    unsigned long i = 0, sq = 0;
    double f = 0.0;
    (void)arg;
    for (;;) {
        i++;
        sq += 2 * i - 1; /* sq == i*i */
        f += 1.0;        /* f == i */
        if ((i & 0xfffff) == 0) {
            if (sq != i * i || f != (double)i) __atomic_fetch_add(&errors, 1, __ATOMIC_RELAXED);
            __atomic_fetch_add(&spins, 1, __ATOMIC_RELAXED);
        }
    }
    return NULL;
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void *sleeper(void *arg) {
    (void)arg;
    for (;;) {
        struct timespec req = {0, 50 * 1000 * 1000};
        double t0 = now();
        int r = nanosleep(&req, NULL);
        double dt = now() - t0;
        /* SIGUSR1 may land here: EINTR is fine, anything else or an early return is not. */
        if ((r != 0 && errno != EINTR) || (r == 0 && dt < 0.049)) {
            fprintf(stderr, "sleeper: r=%d errno=%d dt=%f\n", r, errno, dt);
            __atomic_fetch_add(&errors, 1, __ATOMIC_RELAXED);
        }
        __atomic_fetch_add(&sleeps, 1, __ATOMIC_RELAXED);
    }
    return NULL;
}

static void *reader(void *arg) {
    char c;
    (void)arg;
    for (;;) {
        ssize_t r = read(pipefd[0], &c, 1);
        if (r < 0 && errno == EINTR) continue;
        fprintf(stderr, "reader: read returned %zd errno=%d\n", r, errno);
        __atomic_fetch_add(&errors, 1, __ATOMIC_RELAXED);
        return NULL;
    }
}

int main(int argc, char **argv) {
    int n = argc > 1 ? atoi(argv[1]) : 4;
    char line[64];
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_usr1;
    sa.sa_flags = SA_RESTART;
    sigaction(SIGUSR1, &sa, NULL);
    if (pipe(pipefd) != 0) return 2;
    if (argc > 2 && strcmp(argv[2], "seccomp") == 0) {
        struct sock_filter allow[] = {BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW)};
        struct sock_fprog prog = {1, allow};
        if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) || prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog)) return 2;
    }
    setvbuf(stdout, NULL, _IONBF, 0);
    for (int t = 0; t < n; t++) {
        pthread_t tid;
        void *(*fn)(void *) = t % 3 == 0 ? spinner : t % 3 == 1 ? sleeper : reader;
        if (pthread_create(&tid, NULL, fn, NULL) != 0) return 2;
    }
    printf("ready\n");
    while (fgets(line, sizeof line, stdin)) {
        if (strncmp(line, "count", 5) == 0) {
            printf("count %lu %lu %lu %d\n", spins, sleeps, errors, (int)usr1);
        } else if (strncmp(line, "exit", 4) == 0) {
            break;
        }
    }
    return errors ? 1 : 0;
}
