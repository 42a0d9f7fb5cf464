// A pre-fork server, as nginx, gunicorn or php-fpm run: the master listens on 127.0.0.1 (a
// free port, printed as "port N"), forks WORKERS workers that accept on the same socket, and
// forks a replacement whenever one exits. Every request ("GET\n") leaks LEAK bytes in the
// worker that serves it (a per-request cache nobody frees), and the reply says who served it
// and how many it has served: "pid P served N\n". With RECYCLE > 0 a worker exits after that
// many requests, as workers recycled every N requests do.
//
//   prefork WORKERS LEAK RECYCLE
//
// The master exits (and takes its workers with it) when its stdin closes.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

static int listener;
static long leak_bytes;
static long recycle;

// Each request's cache entry: a linked list nobody frees.
struct entry {
    struct entry* next;
    char data[];
};
static struct entry* cache;

__attribute__((noinline)) void remember_request(int n) {
    struct entry* e = malloc(sizeof(struct entry) + leak_bytes - sizeof(struct entry));
    memset(e->data, n, leak_bytes - sizeof(struct entry));
    e->next = cache;
    cache = e;
}

__attribute__((noinline)) static void serve(void) {
    for (long served = 0; recycle == 0 || served < recycle;) {
        int c = accept(listener, NULL, NULL);
        if (c < 0) continue;
        char buf[64];
        ssize_t n = read(c, buf, sizeof buf);
        if (n > 0) {
            // A scratch buffer per request, freed: not a leak.
            char* scratch = malloc(4096);
            remember_request((int)served);
            served++;
            int len = snprintf(scratch, 4096, "pid %d served %ld\n", getpid(), served);
            if (write(c, scratch, len) != len) {
            }
            free(scratch);
        }
        close(c);
    }
    _exit(0);
}

static pid_t spawn(void) {
    pid_t p = fork();
    if (p == 0) serve();
    return p;
}

int main(int argc, char** argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: prefork WORKERS LEAK RECYCLE\n");
        return 2;
    }
    int workers = atoi(argv[1]);
    leak_bytes = atol(argv[2]);
    recycle = atol(argv[3]);
    if (leak_bytes < (long)sizeof(struct entry)) leak_bytes = sizeof(struct entry);
    listener = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof a;
    if (bind(listener, (struct sockaddr*)&a, sizeof a) || listen(listener, 512) ||
        getsockname(listener, (struct sockaddr*)&a, &len)) {
        perror("listen");
        return 1;
    }
    pid_t* pids = calloc(workers, sizeof(pid_t));
    for (int i = 0; i < workers; i++) pids[i] = spawn();
    printf("port %d\n", ntohs(a.sin_port));
    fflush(stdout);
    struct pollfd in = {.fd = 0, .events = POLLIN};
    for (;;) {
        int status;
        pid_t dead;
        while ((dead = waitpid(-1, &status, WNOHANG)) > 0) {
            for (int i = 0; i < workers; i++)
                if (pids[i] == dead) pids[i] = spawn();
        }
        if (poll(&in, 1, 5) > 0) {
            char b;
            if (read(0, &b, 1) <= 0) break;
        }
    }
    for (int i = 0; i < workers; i++) kill(pids[i], SIGTERM);
    while (wait(NULL) > 0) {
    }
    return 0;
}
