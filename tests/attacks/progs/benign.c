/* The allowed program: signed by the test key. It prints EG-BENIGN (so a control run
 * proves the signed program itself is allowed) and, given a number, sleeps that many
 * seconds: the ptrace attacks inject into it while it sleeps.
 *
 * Built static (large: the MAP_SHARED and tamper attacks overwrite its head with the
 * smaller dynamic payload) and dynamic (LD_PRELOAD needs a dynamic target).
 */
#include <stdlib.h>
#include <unistd.h>

int main(int argc, char **argv) {
    static const char line[] = "EG-BENIGN\n";
    if (write(1, line, sizeof line - 1) < 0) return 1;
    if (argc > 1) sleep((unsigned)atoi(argv[1]));
    return 0;
}
