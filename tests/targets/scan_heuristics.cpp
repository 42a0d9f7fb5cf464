/* Test target for the reachability scan's interior-pointer heuristics (valgrind's
 * --leak-check-heuristics, all on by default): blocks reached from a global only through a
 * pointer into their middle, in the layouts valgrind recognises as still reachable. Built
 * with -D_GLIBCXX_USE_CXX11_ABI=0 so that std::string is the reference-counted string
 * (length, capacity, refcount, then the characters the object points at). Without frame
 * pointers.
 *
 *   scan_heuristics CASE
 *
 * Protocol as scan_cases: prints "ready"; each "leak" runs the case once (ROUND blocks) and
 * prints "done"; "exit" or EOF returns from main (exit status 0).
 *
 * Cases, with what valgrind --leak-check=full says of their blocks:
 *   string     std::string objects (in a global buffer, never destroyed) whose characters
 *              live in a block the string points at 24 bytes in   reachable (heuristic stdstring)
 *   newarray   new[] arrays of objects with a destructor: the pointer kept is 8 bytes in,
 *              past the element count                               reachable (heuristic newarray)
 *   multi      objects of a class with two polymorphic bases, kept only as pointers to the
 *              second base (32 bytes in)                 reachable (heuristic multipleinheritance)
 */
#include <cstdio>
#include <cstring>
#include <new>
#include <string>

#define NOINLINE __attribute__((noinline))
static const int ROUND = 10;

/* ---- string ---- */
alignas(std::string) char string_slots[ROUND][sizeof(std::string)];
NOINLINE void hold_strings() {
    for (int i = 0; i < ROUND; i++) new (string_slots[i]) std::string(200, static_cast<char>('a' + i));
}

/* ---- newarray ---- */
struct Tracked {
    int v[6] = {1, 2, 3, 4, 5, 6};
    ~Tracked();
};
Tracked::~Tracked() { v[0] = 0; }
Tracked *volatile arrays[ROUND];
NOINLINE void hold_new_arrays() {
    for (int i = 0; i < ROUND; i++) arrays[i] = new Tracked[5];
}

/* ---- multi ---- */
struct Named {
    virtual ~Named() {}
    char name[24] = {};
};
struct Counted {
    virtual ~Counted() {}
    long count = 1;
};
struct Resource : Named, Counted {
    char data[32] = {};
};
Counted *volatile counted_views[ROUND];
NOINLINE void hold_second_bases() {
    for (int i = 0; i < ROUND; i++) counted_views[i] = new Resource();
}

int main(int argc, char **argv) {
    const char *which = argc > 1 ? argv[1] : "";
    setvbuf(stdout, nullptr, _IOLBF, 0);
    printf("ready\n");
    char line[64];
    while (fgets(line, sizeof line, stdin)) {
        if (strncmp(line, "exit", 4) == 0) break;
        if (strncmp(line, "leak", 4) != 0) continue;
        if (!strcmp(which, "string")) hold_strings();
        else if (!strcmp(which, "newarray")) hold_new_arrays();
        else if (!strcmp(which, "multi")) hold_second_bases();
        else {
            fprintf(stderr, "unknown case %s\n", which);
            return 2;
        }
        printf("done\n");
    }
    return 0;
}
