#include <cstdio>

void leak_example() {
    int* p = new int[100];
    std::printf("%p\n", static_cast<void*>(p) == nullptr ? nullptr : &p);
}

int main() {
    leak_example();
    return 0;
}
