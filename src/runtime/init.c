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
 * counts, never buffered. The command is looked up in PATH and run with
 * execve(2), as the Engine itself would: no shell fallback. Anything wrong
 * ends the container with exit code 127 and one line on STDERR starting
 * "hyperfuncd-init: ", which the daemon reports as a failure to start.
 * While it waits, SIGTERM ends it at once (it is PID 1, which ignores
 * signals it has no handler for).
 *
 * Built static by build.rs so it runs in any image, `FROM scratch` included.
 */
#include <errno.h>
#include <signal.h>
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

static void on_term(int sig) {
    (void)sig;
    _exit(143);
}

/* Runs argv[0] like the Engine does: a name with a slash as is, else the
 * first match in PATH (the image's, or the call's if it sets one). */
static void exec_command(char **argv) {
    extern char **environ;
    const char *path = getenv("PATH");
    const char *name = argv[0];
    size_t len = strlen(name);
    int saved = ENOENT;
    if (strchr(name, '/') != NULL) {
        execve(name, argv, environ);
        die(name, strerror(errno));
    }
    if (path == NULL || *path == '\0') {
        path = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
    }
    while (*path != '\0') {
        const char *end = strchr(path, ':');
        size_t dir = end != NULL ? (size_t)(end - path) : strlen(path);
        char *full = malloc(dir + len + 2);
        if (full == NULL) {
            die("out of memory", NULL);
        }
        memcpy(full, path, dir);
        full[dir] = '/';
        memcpy(full + dir + 1, name, len + 1);
        execve(dir == 0 ? name : full, argv, environ);
        /* Not here, or not for us: try the next directory. */
        if (errno != ENOENT && errno != ENOTDIR && errno != EACCES) {
            die(name, strerror(errno));
        }
        if (errno == EACCES) {
            saved = EACCES;
        }
        free(full);
        path = end != NULL ? end + 1 : path + dir;
    }
    die(name, saved == EACCES ? strerror(EACCES) : "executable file not found in $PATH");
}

int main(int argc, char **argv) {
    unsigned char head[4];
    uint32_t n;
    char *frame;
    char *p;

    if (argc < 2) {
        die("no command to run", NULL);
    }
    /* A handler, unlike SIG_IGN, does not survive the exec. */
    signal(SIGTERM, on_term);
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
    exec_command(argv + 1);
    return 127;
}
