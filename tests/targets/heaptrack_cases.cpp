// Cases for heaptrack's per-site figures (issue 26), one per argv[1]:
//   seed         the seed's cache: cache[id] = std::string(1000, 'x') for 100,000 ids, kept
//   temporaries  5,000 buffers, each freed before the next allocation
//   peaks        one site grows to 10 MiB, frees it all, grows to 4 MiB and keeps it
// Each runs once and exits 0.
#include <cstdlib>
#include <cstring>
#include <map>
#include <string>

// A cache nobody destroys (a leaked global), as on a server that never exits cleanly.
static std::map<int, std::string>& cache = *new std::map<int, std::string>;

__attribute__((noinline)) void process_item(int id) {
    cache[id] = std::string(1000, 'x');
}

__attribute__((noinline)) void scratch(int n) {
    for (int i = 0; i < n; i++) {
        char* volatile p = static_cast<char*>(malloc(256));
        memset(p, i, 256);
        free(p);
    }
}

__attribute__((noinline)) void* grow_block() {
    return malloc(64 << 10);
}

static void* held[160];
static void* volatile* kept;
static volatile int grow[2] = {160, 64};
static volatile int drop[2] = {160, 0};
static volatile int nrounds = 2;

// Every block comes from the same stack: grow_block <- fill <- peaks (one call site each).
__attribute__((noinline)) void fill(int n) {
    for (int i = 0; i < n; i++) held[i] = grow_block();
}

__attribute__((noinline)) void release(int n) {
    for (int i = 0; i < n; i++) free(held[i]);
}

// O0: a loop optimized would call fill from two places (two stacks, two sites).
__attribute__((noinline, optimize("O0"))) void peaks() {
    for (int r = 0; r < nrounds; r++) {
        fill(grow[r]);
        release(drop[r]);
    }
    kept = held;
}

int main(int argc, char** argv) {
    const char* mode = argc > 1 ? argv[1] : "seed";
    if (!strcmp(mode, "seed")) {
        for (int id = 0; id < 100000; id++) process_item(id);
    } else if (!strcmp(mode, "temporaries")) {
        scratch(5000);
    } else if (!strcmp(mode, "peaks")) {
        peaks();
    } else {
        return 2;
    }
    return 0;
}
