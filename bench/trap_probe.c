/* Attach BPF-less uprobes (perf uprobe PMU) to a process and hold them until stdin closes.
 * Used by bench/trap_cost.sh to measure what the trap alone costs at a given instruction.
 * Usage: trap_probe PID FILE OFFSET[r] ...   (OFFSET is a file offset; a trailing 'r' makes it a
 * uretprobe). Prints "attached" once every probe is live. */
#include <linux/perf_event.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: %s PID FILE OFFSET[r]...\n", argv[0]);
        return 2;
    }
    FILE *f = fopen("/sys/bus/event_source/devices/uprobe/type", "r");
    int type;
    if (!f || fscanf(f, "%d", &type) != 1) {
        perror("uprobe PMU type");
        return 1;
    }
    for (int i = 3; i < argc; i++) {
        struct perf_event_attr a;
        memset(&a, 0, sizeof a);
        a.size = sizeof a;
        a.type = type;
        a.config = strchr(argv[i], 'r') ? 1 : 0; /* format/retprobe is config:0 */
        a.config1 = (unsigned long)argv[2];
        a.config2 = strtoul(argv[i], NULL, 0);
        if (syscall(SYS_perf_event_open, &a, atoi(argv[1]), -1, -1, 0) < 0) {
            perror(argv[i]);
            return 1;
        }
    }
    printf("attached\n");
    fflush(stdout);
    char b;
    while (read(0, &b, 1) > 0) {}
    return 0;
}
