/* Test target for the reachability scan: each case keeps its blocks alive in one known way
 * (or not at all). Built without frame pointers.
 *
 *   scan_cases CASE
 *
 * Protocol (stdin/stdout): prints "ready"; each "leak" runs the case once (ROUND blocks, or
 * ROUND rings) and prints "done"; "exit" or EOF returns from main (exit status 0).
 *
 * Cases, with what valgrind --leak-check=full says of their blocks:
 *   definite   malloc'd blocks whose last pointer is dropped          definitely lost
 *   interior   blocks pointed at only 16 bytes in                     possibly lost
 *   list       a singly linked list from the global `cache_head`      still reachable
 *   map        a global std::unordered_map<int, std::vector<char>>    still reachable
 *   ring       shared_ptr Session <-> Connection rings, then dropped  definitely (1) + indirectly (1) per ring
 *   register   a block whose only pointer is in r12 of a thread blocked in pause()   reachable
 *   stack      a block whose only pointer is on a blocked thread's stack             reachable
 *   tls        a block whose only pointer is a blocked thread's __thread variable    reachable
 *   mmap       a block whose only pointer is in an anonymous mmap region             reachable
 *   dontfork   the same, in a region marked MADV_DONTFORK (a fork lacks it)            reachable
 *   wipeonfork the same, in a region marked MADV_WIPEONFORK (zeros in a fork)          reachable
 *   objects    polymorphic Widget objects (new, never deleted, pointers dropped)     definitely lost
 *   churn      2000 small blocks allocated and all freed: tcache and fastbins full   (nothing)
 *   info       prints glibc's own malloc_info(0, stdout) XML before "done"
 *   corrupt    overwrites the size field of a chunk's header (the heap is broken from then on:
 *              send nothing but "exit", which may crash)
 */
#include <pthread.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <malloc.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#define NOINLINE __attribute__((noinline))
static const int ROUND = 10;

/* ---- definite ---- */
void *volatile last_definite;
NOINLINE void leak_definite() {
    for (int i = 0; i < ROUND; i++) last_definite = malloc(100);
    last_definite = nullptr;
}

/* ---- interior: only base+16 is kept (contents zero: no valgrind heuristic applies) ---- */
char *volatile interior_ptrs[64];
volatile int n_interior;
NOINLINE void leak_interior() {
    for (int i = 0; i < ROUND && n_interior < 64; i++) {
        char *p = static_cast<char *>(calloc(1, 64));
        interior_ptrs[n_interior++] = p + 16;
    }
}

/* ---- list: reachable from the global cache_head ---- */
struct Node {
    Node *next;
    char payload[56];
};
Node *cache_head;
NOINLINE void grow_list() {
    for (int i = 0; i < ROUND; i++) {
        Node *n = static_cast<Node *>(calloc(1, sizeof(Node)));
        n->next = cache_head;
        cache_head = n;
    }
}

/* ---- map: a global unordered_map cache ---- */
std::unordered_map<int, std::vector<char>> *sessions_by_id;
NOINLINE void grow_map() {
    if (!sessions_by_id) sessions_by_id = new std::unordered_map<int, std::vector<char>>();
    static int next_id;
    for (int i = 0; i < ROUND; i++) (*sessions_by_id)[next_id++] = std::vector<char>(200);
}

/* ---- ring: Session <-> Connection through shared_ptr, never broken ---- */
struct Connection;
struct Session {
    std::shared_ptr<Connection> conn;
    char state[40];
};
struct Connection {
    std::shared_ptr<Session> session;
    char buffer[88];
};
NOINLINE void make_ring() {
    auto s = std::make_shared<Session>();
    auto c = std::make_shared<Connection>();
    s->conn = c;
    c->session = s;
}
NOINLINE void leak_rings() {
    for (int i = 0; i < ROUND; i++) make_ring();
}

/* ---- register / stack / tls: a thread per block, blocked in pause() ---- */
NOINLINE void *new_block(size_t n) { return calloc(1, n); }

static void *hold_in_register(void *) {
    void *p = new_block(300);
    /* The pointer lives in r12 only while the thread sleeps; the compiler's copy is the
     * input operand, and `p` is dead after the asm. */
    asm volatile("mov %0, %%r12\n\t"
                 "xor %0, %0\n\t"
                 "1: mov $34, %%eax\n\t" /* pause */
                 "syscall\n\t"
                 "jmp 1b\n\t"
                 : "+r"(p)
                 :
                 : "r12", "rax", "rcx", "r11", "memory");
    return nullptr;
}

static void *hold_on_stack(void *) {
    void *volatile on_stack = new_block(400);
    (void)on_stack;
    for (;;) pause();
    return nullptr;
}

__thread void *tls_block;
static void *hold_in_tls(void *) {
    tls_block = new_block(500);
    for (;;) pause();
    return nullptr;
}

static void spawn_holders(void *(*fn)(void *)) {
    for (int i = 0; i < ROUND; i++) {
        pthread_t t;
        pthread_create(&t, nullptr, fn, nullptr);
        pthread_detach(t);
    }
    usleep(100000); /* let them reach pause() */
}

/* ---- mmap: the only pointers are in an anonymous mapping ---- */
NOINLINE void hold_in_mmap() {
    void **region = static_cast<void **>(
        mmap(nullptr, 1 << 16, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
    if (region == MAP_FAILED) return;
    for (int i = 0; i < ROUND; i++) region[i * 8] = new_block(600);
    /* `region` itself is forgotten: only the mapping holds the pointers. */
}

/* ---- dontfork / wipeonfork: the region a copy-on-write snapshot would not carry ---- */
NOINLINE void hold_in_special_mmap(int advice) {
    void **region = static_cast<void **>(
        mmap(nullptr, 1 << 16, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
    if (region == MAP_FAILED || madvise(region, 1 << 16, advice) != 0) {
        perror("madvise");
        exit(3);
    }
    for (int i = 0; i < ROUND; i++) region[i * 8] = new_block(700);
}

/* ---- objects: leaked polymorphic objects, named by their vtable ---- */
struct Widget {
    virtual ~Widget() = default;
    virtual int area() const { return w * h; }
    int w = 3, h = 4;
    char name[40] = {};
};
Widget *volatile last_widget;
NOINLINE void leak_widgets() {
    for (int i = 0; i < ROUND; i++) last_widget = new Widget();
    last_widget = nullptr;
}

/* ---- churn: small blocks freed just before a census ---- */
NOINLINE void churn_small() {
    static void *tmp[2000];
    for (int i = 0; i < 2000; i++) tmp[i] = malloc(16 + (i % 8) * 16);
    for (int i = 0; i < 2000; i++) free(tmp[i]);
}

/* ---- corrupt: a chunk whose size field is garbage ---- */
void *volatile corrupted;
NOINLINE void corrupt_heap() {
    size_t *p = static_cast<size_t *>(malloc(64));
    p[-1] = 0x7ffffff1; /* not a multiple of 16, far past the heap's end */
    corrupted = p;
}

int main(int argc, char **argv) {
    const std::string which = argc > 1 ? argv[1] : "";
    setvbuf(stdout, nullptr, _IOLBF, 0);
    printf("ready\n");
    char line[64];
    while (fgets(line, sizeof line, stdin)) {
        if (strncmp(line, "exit", 4) == 0) break;
        if (strncmp(line, "leak", 4) != 0) continue;
        if (which == "definite") leak_definite();
        else if (which == "interior") leak_interior();
        else if (which == "list") grow_list();
        else if (which == "map") grow_map();
        else if (which == "ring") leak_rings();
        else if (which == "register") spawn_holders(hold_in_register);
        else if (which == "stack") spawn_holders(hold_on_stack);
        else if (which == "tls") spawn_holders(hold_in_tls);
        else if (which == "mmap") hold_in_mmap();
        else if (which == "objects") leak_widgets();
        else if (which == "churn") churn_small();
        else if (which == "info") {
            grow_list();
            leak_definite();
            malloc_info(0, stdout);
            fflush(stdout);
        } else if (which == "corrupt") corrupt_heap();
        else if (which == "dontfork") hold_in_special_mmap(MADV_DONTFORK);
        else if (which == "wipeonfork") hold_in_special_mmap(MADV_WIPEONFORK);
        else {
            fprintf(stderr, "unknown case %s\n", which.c_str());
            return 2;
        }
        printf("done\n");
    }
    return 0;
}
