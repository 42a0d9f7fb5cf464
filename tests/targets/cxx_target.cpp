// Test target (C++): leaks through new[] and grows an unordered_map cache; churns
// std::string and std::vector temporaries that are all freed.
// Protocol as alloc_funcs.c: "ready"; "leak" -> "done"; "exit".
#include <cstdio>
#include <cstring>
#include <iostream>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#define NOINLINE __attribute__((noinline))

char *volatile kept[16];
volatile int nkept;

NOINLINE void leak_array() { kept[nkept++] = new char[3000]; }

struct Widget {
    char payload[120];
    long id;
};

Widget *volatile widgets[8];
static std::shared_ptr<Widget> shared[8];

NOINLINE void leak_new(int i) { widgets[i] = new Widget{{0}, i}; }
NOINLINE void keep_shared(int i) { shared[i] = std::make_shared<Widget>(); }

static std::unordered_map<int, std::string> cache;

NOINLINE void cache_insert(int key) {
    // A value longer than the small-string buffer, so it owns a heap block.
    cache.emplace(key, std::string(200, 'x'));
}

NOINLINE void churn() {
    for (int i = 0; i < 300; i++) {
        std::vector<int> v(64 + i);
        std::string s(100 + i, 'y');
        kept[15] = reinterpret_cast<char *>(v.data()) + s.size();
    }
}

int main() {
    std::string line;
    std::cout << "ready" << std::endl;
    static int next_key;
    while (std::getline(std::cin, line)) {
        if (line == "leak") {
            for (int i = 0; i < 5; i++) leak_array();
            for (int i = 0; i < 4; i++) leak_new(i);
            for (int i = 0; i < 3; i++) keep_shared(i);
            for (int i = 0; i < 50; i++) cache_insert(next_key++);
            churn();
            std::cout << "done" << std::endl;
        } else if (line == "exit") {
            break;
        }
    }
    return 0;
}
