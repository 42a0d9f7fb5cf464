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
 *   self       blocks whose only pointer is inside themselves (p->self = p)           definitely lost
 *   deadstack  a block whose only pointer is a returned callee's local, ~4 KiB below a blocked
 *              thread's stack pointer (dead stack)                                       definitely lost
 *   redzone    a block whose only pointer is in a blocked thread's red zone (64 bytes below
 *              its stack pointer, written by asm)                                        definitely lost
 *              (valgrind scans no stack word below the stack pointer, red zone included,
 *              though it keeps the red zone addressable)
 *   unaligned  blocks whose only pointers are memcpy'd to odd offsets of a global char array
 *                                                                                       definitely lost
 *   bigheld    1 MiB+ blocks (glibc mmaps them) held by a global, each holding a small one   reachable
 *   biglost    the same with the big blocks' pointers dropped      definitely (big) + indirectly (small)
 *   scratch    blocks whose only pointers are in caller-saved registers (rsi, rdx, ...) when
 *              main calls exit() (from asm; the "leak" round keeps them in a global)    definitely lost
 *   dlclose    pairs allocated by libscan_plugin.so (next to this binary), held only by its
 *              global, then dlclose'd                          definitely (first) + indirectly (second)
 *   maintls    a block whose only pointer is the main thread's __thread variable      reachable
 *   key        blocks whose only pointers are the main thread's pthread_setspecific values   reachable
 *   joined     blocks whose only pointer is a dead slot of a joined thread's stack (the stack
 *              stays mapped in glibc's cache, its contents intact)                      definitely lost
 *   coroutine  blocks whose only pointer is on a makecontext stack (a malloc'd block held by a
 *              global) switched out for good                                            reachable
 *   churn      2000 small blocks allocated and all freed: tcache and fastbins full   (nothing)
 *   info       prints glibc's own malloc_info(0, stdout) XML before "done"
 *   corrupt    overwrites the size field of a chunk's header (the heap is broken from then on:
 *              send nothing but "exit", which may crash)
 */
#include <dlfcn.h>
#include <pthread.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <malloc.h>
#include <ucontext.h>

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

/* ---- self: each block points at itself and at nothing else; nothing points at it ---- */
struct SelfRef {
    SelfRef *self;
    char payload[56];
};
SelfRef *volatile last_self;
NOINLINE void leak_self_ref() {
    for (int i = 0; i < ROUND; i++) {
        SelfRef *p = static_cast<SelfRef *>(calloc(1, sizeof(SelfRef)));
        p->self = p;
        last_self = p;
    }
    last_self = nullptr;
}

/* Blocks the calling thread for good: scratch registers zeroed (no stale copy of a pointer
 * left by the calls before), then pause() in a loop, all in asm (no stack written). */
[[noreturn]] static inline void block_forever() {
    asm volatile("xor %%edi, %%edi\n\t"
                 "xor %%esi, %%esi\n\t"
                 "xor %%edx, %%edx\n\t"
                 "xor %%r8d, %%r8d\n\t"
                 "xor %%r9d, %%r9d\n\t"
                 "xor %%r10d, %%r10d\n\t"
                 "1: mov $34, %%eax\n\t" /* pause */
                 "syscall\n\t"
                 "jmp 1b\n\t"
                 :
                 :
                 : "rax", "rcx", "rdx", "rsi", "rdi", "r8", "r9", "r10", "r11", "memory");
    __builtin_unreachable();
}

/* Runs `fn` about 4.5 KiB (9 frames of 512 bytes) below the caller's frame: whatever `fn`
 * leaves in its frame ends up far below the caller's stack pointer (out of any red zone)
 * once it has returned, and within glibc's 16 KiB that an exiting thread keeps (it
 * madvise(DONTNEED)s the rest of its stack). */
NOINLINE void call_deep(int depth, void (*fn)()) {
    volatile char pad[512];
    pad[0] = static_cast<char>(depth);
    if (depth > 0) call_deep(depth - 1, fn);
    else fn();
    pad[1] = pad[0]; /* the frame lives across the call: no tail call */
}

/* ---- deadstack: the pointer only in a returned callee's local, deep below SP ---- */
NOINLINE void stash_dead() {
    void *volatile slot = new_block(800);
    (void)slot;
}
static void *hold_in_dead_slot(void *) {
    call_deep(8, stash_dead);
    block_forever();
}

/* ---- redzone: the pointer only 64 bytes below SP of a blocked thread ---- */
static void *hold_in_red_zone(void *) {
    void *p = new_block(900);
    asm volatile("mov %0, -64(%%rsp)\n\t"
                 "xor %0, %0\n\t"
                 : "+r"(p)
                 :
                 : "memory");
    block_forever();
}

/* ---- unaligned: the only copies at odd offsets (valgrind scans aligned words only) ---- */
char unaligned_store[ROUND * 8 + 16];
NOINLINE void leak_unaligned() {
    for (int i = 0; i < ROUND; i++) {
        void *p = malloc(110);
        memcpy(unaligned_store + 1 + i * 8, &p, sizeof p);
    }
}

/* ---- bigheld / biglost: blocks glibc serves by mmap (over M_MMAP_THRESHOLD) ---- */
static const size_t BIG = (1 << 20) + 100;
struct Big {
    void *small;
    char rest[BIG - sizeof(void *)];
};
Big *big_held[ROUND];
NOINLINE void hold_big() {
    for (int i = 0; i < ROUND; i++) {
        Big *b = static_cast<Big *>(malloc(sizeof(Big)));
        b->small = calloc(1, 120);
        big_held[i] = b;
    }
}
Big *volatile last_big;
NOINLINE void leak_big() {
    for (int i = 0; i < ROUND; i++) {
        Big *b = static_cast<Big *>(malloc(sizeof(Big)));
        b->small = calloc(1, 130);
        last_big = b;
    }
    last_big = nullptr;
}

/* ---- scratch: at exit() the only pointers are in caller-saved registers ---- */
static const int N_SCRATCH = 5;
extern "C" {
void *scratch_ptrs[N_SCRATCH];
void exit_with_scratch_registers();
}
NOINLINE void leak_to_scratch() {
    for (int i = 0; i < N_SCRATCH; i++) scratch_ptrs[i] = malloc(140);
}
/* Moves scratch_ptrs[] into rsi, rdx, rcx, r8, r9, zeroes the array and calls exit(0): at
 * exit()'s entry those registers are the only copies (all are dead there: rdi holds the
 * status, the rest may be clobbered by exit itself). Not r10 or r11: the lazy PLT resolver
 * (the first call of exit) clobbers them before exit's entry. */
asm(".text\n"
    ".globl exit_with_scratch_registers\n"
    ".type exit_with_scratch_registers, @function\n"
    "exit_with_scratch_registers:\n"
    "  sub $8, %rsp\n" /* 16-byte aligned at the call */
    "  lea scratch_ptrs(%rip), %rax\n"
    "  mov 0(%rax), %rsi\n  movq $0, 0(%rax)\n"
    "  mov 8(%rax), %rdx\n  movq $0, 8(%rax)\n"
    "  mov 16(%rax), %rcx\n  movq $0, 16(%rax)\n"
    "  mov 24(%rax), %r8\n  movq $0, 24(%rax)\n"
    "  mov 32(%rax), %r9\n  movq $0, 32(%rax)\n"
    "  xor %eax, %eax\n"
    "  xor %edi, %edi\n"
    "  call exit@PLT\n"
    "  ud2\n"
    ".size exit_with_scratch_registers, .-exit_with_scratch_registers\n");

/* ---- dlclose: blocks whose only holder was a dlclose'd library's global ---- */
/* argv[0]: the library is next to it. (Its path is built on the stack when needed: a heap
 * block made at start would join the census tests' groups of blocks.) */
static const char *self_path;
/* Only the library's allocations have this frame (not dlopen's own). */
NOINLINE void make_pairs_via_plugin(void (*make_pair)()) {
    for (int i = 0; i < ROUND; i++) make_pair();
    asm volatile("" ::: "memory"); /* no tail call: this frame stays in the stacks */
}
NOINLINE void alloc_via_plugin() {
    char plugin_path[4096];
    const char *slash = strrchr(self_path, '/');
    snprintf(plugin_path, sizeof plugin_path, "%.*s/libscan_plugin.so",
             slash ? static_cast<int>(slash - self_path) : 1, slash ? self_path : ".");
    void *lib = dlopen(plugin_path, RTLD_NOW | RTLD_LOCAL);
    if (!lib) {
        fprintf(stderr, "dlopen %s: %s\n", plugin_path, dlerror());
        exit(3);
    }
    make_pairs_via_plugin(reinterpret_cast<void (*)()>(dlsym(lib, "plugin_make_pair")));
    dlclose(lib);
    /* Still mapped after dlclose: the library was not unloaded and the case tests nothing. */
    if (dlopen(plugin_path, RTLD_NOW | RTLD_NOLOAD)) {
        fprintf(stderr, "%s still loaded after dlclose\n", plugin_path);
        exit(3);
    }
}

/* ---- maintls: the main thread's __thread variable ---- */
__thread void *main_tls_block;
NOINLINE void hold_in_main_tls() { main_tls_block = new_block(150); }

/* ---- key: the main thread's pthread_setspecific values (keys < 32: in its struct pthread) ---- */
NOINLINE void hold_in_key() {
    for (int i = 0; i < ROUND; i++) {
        pthread_key_t key;
        if (pthread_key_create(&key, nullptr) != 0 || key >= 32) {
            fprintf(stderr, "pthread_key_create gave key %u\n", key);
            exit(3);
        }
        pthread_setspecific(key, new_block(160));
    }
}

/* ---- joined: a dead slot of a thread that has exited and been joined ---- */
NOINLINE void stash_joined() {
    void *volatile slot = new_block(170);
    (void)slot;
}
static void *exit_after_stash(void *) {
    call_deep(8, stash_joined);
    return nullptr;
}
NOINLINE void run_joined_threads() {
    /* Small stacks, all alive at once, then joined: glibc caches them (up to 40 MiB), not
     * reused by one another. */
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 256 << 10);
    pthread_t t[ROUND];
    for (int i = 0; i < ROUND; i++) pthread_create(&t[i], &attr, exit_after_stash, nullptr);
    for (int i = 0; i < ROUND; i++) pthread_join(t[i], nullptr);
    pthread_attr_destroy(&attr);
}

/* ---- coroutine: a pointer on a switched-out makecontext stack ---- */
static const size_t CO_STACK = 64 << 10;
static ucontext_t co_main, co_ctx[ROUND];
void *co_stacks[ROUND];
static int co_current;
NOINLINE void switch_out() {
    /* No stale copy in the registers swapcontext saves into co_ctx (a global). */
    asm volatile("xor %%edx, %%edx\n\t"
                 "xor %%ecx, %%ecx\n\t"
                 "xor %%r8d, %%r8d\n\t"
                 "xor %%r9d, %%r9d\n\t"
                 "xor %%eax, %%eax\n\t"
                 :
                 :
                 : "rax", "rcx", "rdx", "r8", "r9");
    swapcontext(&co_ctx[co_current], &co_main);
}
NOINLINE void coroutine_body() {
    void *volatile slot = new_block(180);
    (void)slot;
    switch_out(); /* never resumed */
}
NOINLINE void start_coroutines() {
    for (int i = 0; i < ROUND; i++) {
        co_stacks[i] = malloc(CO_STACK);
        getcontext(&co_ctx[i]);
        co_ctx[i].uc_stack.ss_sp = co_stacks[i];
        co_ctx[i].uc_stack.ss_size = CO_STACK;
        co_ctx[i].uc_link = &co_main;
        makecontext(&co_ctx[i], coroutine_body, 0);
        co_current = i;
        swapcontext(&co_main, &co_ctx[i]);
    }
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
    self_path = argv[0];
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
        else if (which == "self") leak_self_ref();
        else if (which == "deadstack") spawn_holders(hold_in_dead_slot);
        else if (which == "redzone") spawn_holders(hold_in_red_zone);
        else if (which == "unaligned") leak_unaligned();
        else if (which == "bigheld") hold_big();
        else if (which == "biglost") leak_big();
        else if (which == "scratch") leak_to_scratch();
        else if (which == "dlclose") alloc_via_plugin();
        else if (which == "maintls") hold_in_main_tls();
        else if (which == "key") hold_in_key();
        else if (which == "joined") run_joined_threads();
        else if (which == "coroutine") start_coroutines();
        else {
            fprintf(stderr, "unknown case %s\n", which.c_str());
            return 2;
        }
        printf("done\n");
    }
    if (which == "scratch") exit_with_scratch_registers();
    return 0;
}
