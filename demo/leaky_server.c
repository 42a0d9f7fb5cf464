/* leaky_server: a tiny HTTP/1.0 server on 127.0.0.1 with two memory bugs, for the demo.
 *
 *   GET /login?user=NAME  creates a session and appends it to a list nobody prunes:
 *                         unbounded accumulation (the memory stays reachable).
 *   GET /upload           copies the request into a buffer that an error path forgets:
 *                         a true leak (unreachable).
 *   GET /health           allocates temporaries and frees them all.
 *
 * Usage: leaky_server [PORT]   (0 or none: any free port; the port is printed on stdout) */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

struct session {
    char user[32];
    char *history; /* grows per session */
    struct session *next;
};

static struct session *sessions; /* never pruned */
static unsigned long requests;

static struct session *session_create(const char *user) {
    struct session *s = calloc(1, sizeof *s);
    snprintf(s->user, sizeof s->user, "%s", user);
    s->history = malloc(512);
    snprintf(s->history, 512, "login %lu", requests);
    s->next = sessions;
    sessions = s;
    return s;
}

static int parse_upload(const char *req, size_t len) {
    char *copy = malloc(len + 1024);
    memcpy(copy, req, len);
    copy[len] = '\0';
    if (strstr(copy, "X-Checksum") == NULL) {
        return -1; /* BUG: copy is leaked on this path */
    }
    free(copy);
    return 0;
}

static void health(void) {
    for (int i = 0; i < 8; i++) {
        char *tmp = malloc(64 + i * 32);
        snprintf(tmp, 64, "probe %d", i);
        free(tmp);
    }
}

static void handle(int fd) {
    char req[2048];
    ssize_t n = read(fd, req, sizeof req - 1);
    if (n <= 0) return;
    req[n] = '\0';
    requests++;
    const char *status = "200 OK";
    if (strncmp(req, "GET /login", 10) == 0) {
        const char *user = strstr(req, "user=");
        session_create(user ? user + 5 : "anonymous");
    } else if (strncmp(req, "GET /upload", 11) == 0) {
        if (parse_upload(req, (size_t)n) != 0) status = "400 Bad Request";
    } else if (strncmp(req, "GET /health", 11) == 0) {
        health();
    } else {
        status = "404 Not Found";
    }
    char resp[128];
    int len = snprintf(resp, sizeof resp, "HTTP/1.0 %s\r\nContent-Length: 3\r\n\r\nok\n", status);
    (void)!write(fd, resp, (size_t)len);
}

int main(int argc, char **argv) {
    int port = argc > 1 ? atoi(argv[1]) : 0;
    signal(SIGPIPE, SIG_IGN); /* a client that hangs up must not kill the server */
    int lfd = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((unsigned short)port)};
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(lfd, (struct sockaddr *)&addr, sizeof addr) != 0 || listen(lfd, 64) != 0) {
        perror("leaky_server: bind/listen");
        return 1;
    }
    socklen_t alen = sizeof addr;
    getsockname(lfd, (struct sockaddr *)&addr, &alen);
    printf("listening on 127.0.0.1:%d pid %d\n", ntohs(addr.sin_port), getpid());
    fflush(stdout);
    for (;;) {
        int fd = accept(lfd, NULL, NULL);
        if (fd < 0) continue;
        handle(fd);
        close(fd);
    }
}
