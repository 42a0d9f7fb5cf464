/* holders: structures whose newest blocks are held through memory from before attach, or
 * that change without pause while they are scanned (the scan's holder tests).
 *
 *   holders list   a doubly linked list pushed at its head without pause by a worker thread,
 *                  its oldest nodes freed past 50,000: allocations and frees race every scan.
 *   holders fifo   a FIFO queue: its head and first 10,000 nodes made at start (before
 *                  attach), then a node appended at the tail every 100 us.
 *   holders map    a chained hash map whose bucket array is made at start (before attach);
 *                  an entry inserted every 100 us.
 *
 * Prints "ready" once the part from before attach exists; runs until killed. */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* list */
struct lnode {
    struct lnode *next, *prev;
    long value;
};
struct lnode *list_head, *list_tail;
static long list_len;

__attribute__((noinline)) static struct lnode *list_push(long v) {
    struct lnode *n = malloc(sizeof *n);
    n->value = v;
    n->prev = NULL;
    n->next = list_head;
    if (list_head) list_head->prev = n;
    list_head = n;
    if (!list_tail) list_tail = n;
    list_len++;
    return n;
}

static void list_pop_oldest(void) {
    struct lnode *t = list_tail;
    list_tail = t->prev;
    if (list_tail) list_tail->next = NULL; else list_head = NULL;
    list_len--;
    free(t);
}

/* fifo */
struct qnode {
    struct qnode *next;
    long value;
};
struct qnode *queue_head, *queue_tail;

__attribute__((noinline)) static void enqueue(long v) {
    struct qnode *n = malloc(sizeof *n);
    n->value = v;
    n->next = NULL;
    if (queue_tail) queue_tail->next = n; else queue_head = n;
    queue_tail = n;
}

/* map */
struct entry {
    struct entry *next;
    unsigned long key;
    char payload[40];
};
struct table {
    unsigned long nbuckets;
    struct entry **buckets;
} table;

__attribute__((noinline)) static void map_insert(unsigned long key) {
    struct entry *e = malloc(sizeof *e);
    e->key = key;
    memset(e->payload, 'x', sizeof e->payload);
    unsigned long b = (key * 2654435761u) % table.nbuckets;
    e->next = table.buckets[b];
    table.buckets[b] = e;
}

static void pause_us(long us) {
    struct timespec ts = {0, us * 1000};
    nanosleep(&ts, NULL);
}

static void *list_worker(void *arg) {
    (void)arg;
    for (long i = 0;; i++) {
        list_push(i);
        if (list_len > 50000) list_pop_oldest();
    }
    return NULL;
}

int main(int argc, char **argv) {
    const char *mode = argc > 1 ? argv[1] : "list";
    if (strcmp(mode, "list") == 0) {
        pthread_t t;
        pthread_create(&t, NULL, list_worker, NULL);
        puts("ready");
        fflush(stdout);
        for (;;) pause();
    } else if (strcmp(mode, "fifo") == 0) {
        for (long i = 0; i < 10000; i++) enqueue(i);
        puts("ready");
        fflush(stdout);
        for (long i = 10000;; i++) {
            enqueue(i);
            pause_us(100);
        }
    } else if (strcmp(mode, "map") == 0) {
        table.nbuckets = 4096;
        table.buckets = calloc(table.nbuckets, sizeof *table.buckets);
        puts("ready");
        fflush(stdout);
        for (unsigned long k = 1;; k++) {
            map_insert(k);
            pause_us(100);
        }
    }
    fprintf(stderr, "holders: unknown mode %s\n", mode);
    return 2;
}
