/* The attacker's program: unsigned, placed in the enforced scope. Its marker on stdout is
 * the proof that it ran. Built static and dynamic (the dynamic one can be started by ld.so
 * as a program and fits inside the allowed target of the MAP_SHARED attacks).
 *
 * EG_LINGER_MS keeps it alive a little after the marker, so a kill that comes late (the
 * kill backend's agent kills after verifying) is visible as "ran, then SIGKILL".
 */
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

int main(void) {
    static const char marker[] = "EG-PWNED payload\n";
    /* write(2), not stdio: the line is out before any late SIGKILL */
    if (write(1, marker, sizeof marker - 1) < 0) return 1;
    const char *linger = getenv("EG_LINGER_MS");
    if (linger != NULL) {
        long ms = atol(linger);
        struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
        nanosleep(&ts, NULL);
    }
    return 0;
}
