/* Test target that loads a plugin after attach. Protocol: prints "ready"; "dlopen PATH" ->
 * dlopen(PATH) and prints "loaded"; "leak" -> calls the plugin's plugin_leak() through
 * call_plugin() and prints "done"; "exit". */
#include <dlfcn.h>
#include <stdio.h>
#include <string.h>

static void (*leak_fn)(void);

__attribute__((noinline)) void call_plugin(void) { leak_fn(); __asm__ volatile(""); }

int main(void) {
    char line[4096];
    setvbuf(stdout, NULL, _IONBF, 0);
    printf("ready\n");
    while (fgets(line, sizeof line, stdin)) {
        line[strcspn(line, "\n")] = '\0';
        if (strncmp(line, "dlopen ", 7) == 0) {
            void *h = dlopen(line + 7, RTLD_NOW);
            leak_fn = h ? (void (*)(void))dlsym(h, "plugin_leak") : NULL;
            printf(leak_fn ? "loaded\n" : "failed\n");
        } else if (strcmp(line, "leak") == 0 && leak_fn) {
            call_plugin();
            printf("done\n");
        } else if (strcmp(line, "exit") == 0) {
            break;
        }
    }
    return 0;
}
