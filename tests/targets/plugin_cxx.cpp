// A C++ shared library the dlopen test target loads after leakprobe attached: loading it maps
// libstdc++ into a process that had no C++ runtime at attach time.
#include <array>

static std::array<char, 4096> *volatile plugin_cxx_kept[16];

__attribute__((noinline)) static void plugin_cxx_leak_inner(int i) {
    plugin_cxx_kept[i] = new std::array<char, 4096>();
}

extern "C" __attribute__((noinline)) void plugin_leak(void) {
    for (int i = 0; i < 8; i++) plugin_cxx_leak_inner(i);
}
