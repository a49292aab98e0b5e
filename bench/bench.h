/* bench.h - the small harness shared by conc.h's benchmark executables.

   Not part of conc.h. Each bench_*.c is one translation unit: it defines
   CONC_IMPLEMENTATION, includes conc.h and this file, fills a table of bench_case and
   calls bench_main(). The command line is the contract of ../shared/peers/README.md:

      EXE --list                 the case names, one a line
      EXE --case NAME [--n N]    run one case once; print
                                 `case=NAME ns_op=X ops_s=Y [key=value ...]`
      EXE [--n N]                run every case once, each in a fresh child process,
                                 print each machine line as it comes and a table at the end
                                 (--n then sets the count of every case that counts
                                 operations; a case timing one wait keeps its default)
      --timeout S                give up on a case after S seconds (exit 3); default 600,
                                 0 = never

   A case whose result is wrong (a lost item, a bad sum, an unexpected status) says why on
   stderr, prints no machine line and makes the executable exit 1, so a driver records
   nothing rather than a time for broken work. Every machine line ends with maxrss_kb, the
   process's peak resident set (getrusage), measured when the case has finished. */
#ifndef CONC_BENCH_H_INCLUDED
#define CONC_BENCH_H_INCLUDED

#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

typedef struct bench_out {
    int64_t elapsed_ns; /* the timed part of the case */
    int64_t ops;        /* how many operations that time covers */
    char extra[768];    /* " key=value" pairs, appended with bench_extra() */
} bench_out;

/* Runs the case with n operations (its own meaning of "operation"); fills out.
   Returns 0 when the work was verified correct, non-zero otherwise (after saying why
   on stderr). */
typedef int (*bench_fn)(int64_t n, bench_out *out);

typedef struct bench_case {
    const char *name;
    int64_t default_n; /* the Go peer's N for the same case */
    bench_fn fn;
    int n_is_duration; /* N is a time, not a count: a run of every case leaves it at its
                          default whatever --n says (--case NAME --n N still sets it) */
} bench_case;

/* A spin-wait hint (the x86 `pause`; nothing elsewhere). */
static inline void bench_pause(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

static inline int64_t bench_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static inline int64_t bench_clock_ns(clockid_t id) {
    struct timespec ts;
    clock_gettime(id, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* ~ns of busy work, spinning on the clock: the method the Go and C peers use. */
static inline void bench_busy_ns(int64_t ns) {
    int64_t t0 = bench_now();
    while (bench_now() - t0 < ns) {
    }
}

#if defined(__GNUC__)
__attribute__((format(printf, 2, 3)))
#endif
static inline void bench_extra(bench_out *out, const char *fmt, ...) {
    size_t len = strlen(out->extra);
    if (len + 1 >= sizeof out->extra) return;
    out->extra[len++] = ' ';
    out->extra[len] = '\0';
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(out->extra + len, sizeof out->extra - len, fmt, ap);
    va_end(ap);
}

/* Says what went wrong in the current case; returns 1 so a case can `return bench_fail(...)`. */
#if defined(__GNUC__)
__attribute__((format(printf, 1, 2)))
#endif
static inline int bench_fail(const char *fmt, ...) {
    va_list ap;
    fputs("bench: FAILED: ", stderr);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    return 1;
}

/* pthread_create that reports failure instead of returning it. */
static inline int bench_spawn(pthread_t *t, void *(*fn)(void *), void *arg) {
    int rc = pthread_create(t, NULL, fn, arg);
    if (rc != 0) return bench_fail("pthread_create: %s", strerror(rc));
    return 0;
}

static inline long bench_maxrss_kb(void) {
    struct rusage ru;
    if (getrusage(RUSAGE_SELF, &ru) != 0) return -1;
    return ru.ru_maxrss; /* kilobytes on Linux */
}

/* ---- the driver ---------------------------------------------------------------------- */

static const char *bench__current = "?";

static void bench__on_alarm(int sig) {
    static const char msg1[] = "bench: FAILED: timed out in case ";
    (void)sig;
    /* only async-signal-safe calls here */
    ssize_t w = write(2, msg1, sizeof msg1 - 1);
    w = write(2, bench__current, strlen(bench__current));
    w = write(2, "\n", 1);
    (void)w;
    _exit(3);
}

static int bench__run_one(const bench_case *c, int64_t n, unsigned timeout_s) {
    bench_out out;
    memset(&out, 0, sizeof out);
    if (n <= 0) n = c->default_n;
    bench__current = c->name;
    if (timeout_s) {
        signal(SIGALRM, bench__on_alarm);
        alarm(timeout_s);
    }
    int rc = c->fn(n, &out);
    if (timeout_s) alarm(0);
    if (rc != 0) {
        fprintf(stderr, "bench: case %s (n=%" PRId64 ") gave a wrong result\n", c->name, n);
        return 1;
    }
    if (out.ops <= 0) out.ops = 1;
    double ns = (double)out.elapsed_ns / (double)out.ops;
    printf("case=%s ns_op=%.2f ops_s=%.0f%s maxrss_kb=%ld\n", c->name, ns,
           ns > 0 ? 1e9 / ns : 0.0, out.extra, bench_maxrss_kb());
    fflush(stdout);
    return 0;
}

/* Runs case c in a child process (fresh heap, its own peak RSS, a crash stays there) and
   copies the child's machine line into line. Returns the child's exit status. */
static int bench__run_child(const bench_case *c, int64_t n, unsigned timeout_s, char *line,
                            size_t cap) {
    int fd[2];
    line[0] = '\0';
    if (pipe(fd) != 0) return bench_fail("pipe: %s", strerror(errno));
    fflush(stdout);
    fflush(stderr);
    pid_t pid = fork();
    if (pid < 0) return bench_fail("fork: %s", strerror(errno));
    if (pid == 0) {
        close(fd[0]);
        if (dup2(fd[1], 1) < 0) _exit(4);
        close(fd[1]);
        int rc = bench__run_one(c, n, timeout_s);
        fflush(stdout);
        _exit(rc);
    }
    close(fd[1]);
    size_t len = 0;
    for (;;) {
        ssize_t k = read(fd[0], line + len, cap - 1 - len);
        if (k < 0 && errno == EINTR) continue;
        if (k <= 0) break;
        len += (size_t)k;
        if (len == cap - 1) break;
    }
    line[len] = '\0';
    close(fd[0]);
    int st = 0;
    while (waitpid(pid, &st, 0) < 0 && errno == EINTR) {
    }
    if (WIFEXITED(st)) return WEXITSTATUS(st);
    if (WIFSIGNALED(st)) {
        fprintf(stderr, "bench: case %s died with signal %d\n", c->name, WTERMSIG(st));
        return 128 + WTERMSIG(st);
    }
    return 1;
}

/* Pulls the value of " key=" out of a machine line into buf ("-" if absent). */
static void bench__field(const char *line, const char *key, char *buf, size_t cap) {
    size_t kl = strlen(key);
    const char *p = line;
    while ((p = strstr(p, key)) != NULL) {
        if ((p == line || p[-1] == ' ') && p[kl] == '=') break;
        p += kl;
    }
    if (!p) {
        snprintf(buf, cap, "-");
        return;
    }
    p += kl + 1;
    size_t i = 0;
    while (p[i] && p[i] != ' ' && p[i] != '\n' && i + 1 < cap) {
        buf[i] = p[i];
        i++;
    }
    buf[i] = '\0';
}

/* The part of a machine line after ops_s=...: the extras. */
static const char *bench__extras(const char *line) {
    const char *p = strstr(line, " ops_s=");
    if (!p) return "";
    p += 7;
    while (*p && *p != ' ') p++;
    while (*p == ' ') p++;
    return p;
}

static void bench__usage(const char *argv0) {
    fprintf(stderr,
            "usage: %s [--list] [--case NAME] [--n N] [--timeout SECONDS]\n"
            "  --list        print the case names, one a line\n"
            "  --case NAME   run one case once and print its machine line\n"
            "  --n N         operations per case instead of the default\n"
            "  (no --case)   run every case once: machine lines, then a table\n",
            argv0);
}

static int bench_main(int argc, char **argv, const bench_case *cases, size_t ncases) {
    const char *want = NULL;
    int64_t n = 0;
    unsigned timeout_s = 600;
    int list = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--list") || !strcmp(a, "-list")) {
            list = 1;
        } else if ((!strcmp(a, "--case") || !strcmp(a, "-case")) && i + 1 < argc) {
            want = argv[++i];
        } else if ((!strcmp(a, "--n") || !strcmp(a, "-n")) && i + 1 < argc) {
            char *end;
            n = strtoll(argv[++i], &end, 10);
            if (*end || n <= 0) {
                fprintf(stderr, "bench: --n wants a positive integer, not %s\n", argv[i]);
                return 2;
            }
        } else if (!strcmp(a, "--timeout") && i + 1 < argc) {
            timeout_s = (unsigned)strtoul(argv[++i], NULL, 10);
        } else if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            bench__usage(argv[0]);
            return 0;
        } else {
            bench__usage(argv[0]);
            return 2;
        }
    }
    if (list) {
        for (size_t i = 0; i < ncases; i++) printf("%s\n", cases[i].name);
        return 0;
    }
    if (want) {
        for (size_t i = 0; i < ncases; i++)
            if (!strcmp(cases[i].name, want)) return bench__run_one(&cases[i], n, timeout_s);
        fprintf(stderr, "bench: unknown case %s (see --list)\n", want);
        return 2;
    }

    /* every case, each in its own process */
    static char lines[64][1024];
    int status[64];
    size_t m = ncases < 64 ? ncases : 64;
    int worst = 0;
    for (size_t i = 0; i < m; i++) {
        int64_t ni = cases[i].n_is_duration ? 0 : n;
        status[i] = bench__run_child(&cases[i], ni, timeout_s, lines[i], sizeof lines[i]);
        if (status[i] != 0 && worst == 0) worst = status[i];
        fputs(lines[i], stdout);
        fflush(stdout);
    }
    printf("\n%-30s %14s %14s  %s\n", "case", "ns/op", "ops/s", "extras");
    for (size_t i = 0; i < m; i++) {
        char ns[32], ops[32];
        if (status[i] != 0 || !lines[i][0]) {
            printf("%-30s %14s %14s  (exit status %d, see stderr)\n", cases[i].name, "FAILED",
                   "-", status[i]);
            continue;
        }
        bench__field(lines[i], "ns_op", ns, sizeof ns);
        bench__field(lines[i], "ops_s", ops, sizeof ops);
        const char *ex = bench__extras(lines[i]);
        size_t exl = strcspn(ex, "\n");
        printf("%-30s %14s %14s  %.*s\n", cases[i].name, ns, ops, (int)exl, ex);
    }
    return worst;
}

#endif /* CONC_BENCH_H_INCLUDED */
