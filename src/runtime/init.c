/*
 * hyperfuncd-init: PID 1 of a warm-pool container (DESIGN 6).
 *
 * The container is created and started ahead of any call with this program as
 * its entrypoint and the function's real entrypoint + command as arguments.
 * It blocks on STDIN until the call arrives as one frame:
 *
 *     4 bytes, big-endian: N
 *     N bytes: the call's environment, "KEY=VALUE" entries each ended by NUL
 *
 * then sets that environment and execs the real command, which inherits the
 * rest of STDIN (the payload) untouched: STDIN is read with read(2) in exact
 * counts, never buffered. Anything wrong ends the container with exit code
 * 127 and a one-line reason on STDERR, which the call reports as FAILED.
 *
 * Built static by build.rs so it runs in any image, `FROM scratch` included.
 */
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define MAX_FRAME (1u << 20)

static void say(const char *s) {
    size_t n = strlen(s);
    while (n > 0) {
        ssize_t w = write(2, s, n);
        if (w <= 0) {
            return;
        }
        s += w;
        n -= (size_t)w;
    }
}

static void die(const char *what, const char *detail) {
    say("hyperfuncd-init: ");
    say(what);
    if (detail != NULL) {
        say(": ");
        say(detail);
    }
    say("\n");
    _exit(127);
}

/* Reads exactly n bytes; 0 on success, -1 on end of input or error. */
static int read_exact(unsigned char *buf, size_t n) {
    while (n > 0) {
        ssize_t r = read(0, buf, n);
        if (r < 0 && errno == EINTR) {
            continue;
        }
        if (r <= 0) {
            return -1;
        }
        buf += r;
        n -= (size_t)r;
    }
    return 0;
}

int main(int argc, char **argv) {
    unsigned char head[4];
    uint32_t n;
    char *frame;
    char *p;

    if (argc < 2) {
        die("no command to run", NULL);
    }
    if (read_exact(head, sizeof head) != 0) {
        die("STDIN ended before the call frame", NULL);
    }
    n = ((uint32_t)head[0] << 24) | ((uint32_t)head[1] << 16) | ((uint32_t)head[2] << 8) |
        (uint32_t)head[3];
    if (n > MAX_FRAME) {
        die("call frame too large", NULL);
    }
    frame = malloc((size_t)n + 1);
    if (frame == NULL) {
        die("out of memory", NULL);
    }
    if (read_exact((unsigned char *)frame, n) != 0) {
        die("STDIN ended inside the call frame", NULL);
    }
    frame[n] = '\0';
    /* The entries stay allocated: putenv keeps pointers into the frame. */
    for (p = frame; p < frame + n; p += strlen(p) + 1) {
        if (strchr(p, '=') != NULL && putenv(p) != 0) {
            die("cannot set the environment", strerror(errno));
        }
    }
    execvp(argv[1], argv + 1);
    die(argv[1], strerror(errno));
    return 127;
}
