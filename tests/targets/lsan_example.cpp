// The seed's LeakSanitizer example: built -O0 so that the allocation is not elided.

void leak_example() { int* p = new int[100]; (void)p; }

int main() {
    leak_example();
    return 0;
}
