/* An unsigned shared library: its constructor runs inside whatever (signed) program loads
 * it, through LD_PRELOAD or dlopen. */
#include <unistd.h>

__attribute__((constructor)) static void pwned(void) {
    static const char marker[] = "EG-PWNED preload\n";
    if (write(1, marker, sizeof marker - 1) < 0) _exit(1);
}
