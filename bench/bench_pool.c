/* bench_pool.c - worker pool and error group benchmarks for conc.h.

   Each case does the work of the Go peer of the same name (go_NAME in
   ../shared/peers/go/gobench/main.go: `pool`, and go/goxsync/main.go: the errgroup cases)
   with the same default N, and checks that every task ran exactly once. Run
   `bench_pool --list`, `bench_pool --case NAME [--n N]`, or no argument for every case and
   a table (see bench.h).

   Cases:
     pool2_unbuf_1M_empty    one empty job through a pool of 2 workers with a queue of
                             capacity 0: the submitter hands each job to a waiting worker
     pool2_cap64_1M_empty    the same with a queue of 64
     pool2_unbuf_1M_1us      jobs of ~1 us busy work (bench_busy_ns, as the peers), 2
                             workers, capacity 0; maxrss_kb must not grow with N
     errgroup_limit2_1M_empty / errgroup_limit2_1M_1us
                             one task through conc_group_go with conc_group_set_limit(2),
                             then conc_group_wait
     floor_handoff2_empty / floor_handoff2_1us
                             not conc.h: the least a hand-off from one thread to 2 worker
                             threads costs on this machine (see below); the floor under
                             the four cases above
   Extras: blocked_frac (submits that had to wait), threads (threads the group started). */
#define CONC_IMPLEMENTATION
#include "conc.h"

#include <sched.h>
#include <stdatomic.h>

#include "bench.h"

/* Jobs count themselves so the bench can check that every job ran exactly once. Each
   worker counts on its own cache line: one shared atomic counter would move between the
   workers on every job (~200 ns a move here), a cost Go's empty job does not pay. */
enum { RAN_SLOTS = 64 };
static struct {
    _Alignas(64) int64_t n;
} bench_ran_slot[RAN_SLOTS];
static _Atomic int bench_ran_next;
static _Atomic int64_t bench_ran_more; /* jobs of threads beyond the slots */
static _Thread_local int bench_ran_me = -1;

static void bench_ran_one(void) {
    if (bench_ran_me < 0) bench_ran_me = atomic_fetch_add(&bench_ran_next, 1);
    if (bench_ran_me < RAN_SLOTS) bench_ran_slot[bench_ran_me].n++;
    else atomic_fetch_add(&bench_ran_more, 1);
}

static void bench_ran_reset(void) {
    for (int i = 0; i < RAN_SLOTS; i++) bench_ran_slot[i].n = 0;
    atomic_store(&bench_ran_more, 0);
}

/* Called after the pool or group has joined its workers (a happens-before edge). */
static int64_t bench_ran_total(void) {
    int64_t t = atomic_load(&bench_ran_more);
    for (int i = 0; i < RAN_SLOTS; i++) t += bench_ran_slot[i].n;
    return t;
}

/* Voluntary context switches of the whole process per operation: how often a thread went
   to sleep (a futex wait) - the cost this machine punishes most. */
static double csw_per_op(int64_t n) {
    struct rusage ru;
    if (getrusage(RUSAGE_SELF, &ru) != 0) return -1;
    return (double)ru.ru_nvcsw / (double)n;
}

static int job_empty(void *arg, conc_ctx_t *ctx) {
    (void)arg;
    (void)ctx;
    bench_ran_one();
    return 0;
}

static int job_1us(void *arg, conc_ctx_t *ctx) {
    (void)arg;
    (void)ctx;
    bench_busy_ns(1000);
    bench_ran_one();
    return 0;
}

static int pool_case(int64_t n, size_t cap, conc_task_fn fn, bench_out *out) {
    bench_ran_reset();
    int64_t t0 = bench_now();
    conc_pool_t *p = conc_pool_new(2, cap, NULL);
    if (!p) return bench_fail("conc_pool_new returned NULL");
    for (int64_t i = 0; i < n; i++) {
        int rc = conc_pool_submit(p, fn, NULL, NULL);
        if (rc != 0) return bench_fail("conc_pool_submit: %s", conc_strerror(rc));
    }
    int rc = conc_pool_shutdown(p, NULL, NULL, NULL);
    out->elapsed_ns = bench_now() - t0;
    out->ops = n;
    if (rc != 0) return bench_fail("conc_pool_shutdown: %s", conc_strerror(rc));
    conc_pool_stats st;
    conc_pool_stats_get(p, &st);
    conc_pool_free(p);
    if (bench_ran_total() != n || st.completed != (uint64_t)n || st.submitted != (uint64_t)n)
        return bench_fail("ran %lld, completed %llu of %lld", (long long)bench_ran_total(),
                          (unsigned long long)st.completed, (long long)n);
    bench_extra(out, "blocked_frac=%.3f sleeps_per_op=%.3f", (double)st.blocked / (double)n, csw_per_op(n));
    return 0;
}

static int case_pool_unbuf_empty(int64_t n, bench_out *out) { return pool_case(n, 0, job_empty, out); }
static int case_pool_cap64_empty(int64_t n, bench_out *out) { return pool_case(n, 64, job_empty, out); }
static int case_pool_unbuf_1us(int64_t n, bench_out *out) { return pool_case(n, 0, job_1us, out); }

static int group_case(int64_t n, conc_task_fn fn, bench_out *out) {
    bench_ran_reset();
    int64_t t0 = bench_now();
    conc_group_t *g = conc_group_new(NULL);
    if (!g) return bench_fail("conc_group_new returned NULL");
    conc_group_set_limit(g, 2);
    for (int64_t i = 0; i < n; i++) {
        int rc = conc_group_go(g, fn, NULL, NULL);
        if (rc != 0) return bench_fail("conc_group_go: %s", conc_strerror(rc));
    }
    int rc = conc_group_wait(g, NULL);
    out->elapsed_ns = bench_now() - t0;
    out->ops = n;
    if (rc != 0) return bench_fail("conc_group_wait: %s", conc_strerror(rc));
    conc_group_stats st;
    conc_group_stats_get(g, &st);
    conc_group_free(g);
    if (bench_ran_total() != n || st.finished != (uint64_t)n)
        return bench_fail("ran %lld of %lld", (long long)bench_ran_total(), (long long)n);
    bench_extra(out, "blocked_frac=%.3f threads=%llu sleeps_per_op=%.3f", (double)st.blocked / (double)n,
                (unsigned long long)st.threads, csw_per_op(n));
    return 0;
}

static int case_group_empty(int64_t n, bench_out *out) { return group_case(n, job_empty, out); }
static int case_group_1us(int64_t n, bench_out *out) { return group_case(n, job_1us, out); }

/* ---- floor_handoff2_empty / floor_handoff2_1us ------------------------------------------ */
/* Not conc.h: the least that handing each task from one thread to one of 2 worker threads
   costs here. Each worker owns one cache line, its mailbox: a sequence word and the task.
   The main thread gives each task to the first free worker with a plain release store and
   the worker hands the mailbox back the same way: no lock, no queue, no read-modify-write,
   no limit to check, and nobody ever sleeps, so no wake-up is paid. Waiting is what conc.h
   does before it sleeps: `pause` for a while, then sched_yield() so that a thread sharing
   the vCPU can run (three threads, two vCPUs).

   Whatever a pool or an errgroup must do besides - more than one submitter, a context per
   blocked call, sleeping when idle, shutdown, statistics - only adds to this. If this floor
   is above Go's figure for a case, no design on OS threads meets that target on this
   machine in its current mode (see floor_atomic_pingpong in bench_chan). */
enum { FLOOR_WORKERS = 2, FLOOR_PAUSES = 128 };

typedef struct {
    _Alignas(64) _Atomic int64_t seq; /* 2k: free, k tasks done; 2k+1: task k+1 given */
    int (*fn)(void *, conc_ctx_t *);  /* written before seq goes odd */
    _Atomic bool stop;
} floor_mailbox;

static floor_mailbox floor_box[FLOOR_WORKERS];

static void floor_wait(int i) {
    if (i < FLOOR_PAUSES) bench_pause();
    else sched_yield();
}

static void *floor_worker(void *p) {
    floor_mailbox *m = p;
    for (int64_t k = 0;; k++) {
        for (int i = 0; atomic_load_explicit(&m->seq, memory_order_acquire) != 2 * k + 1; i++) {
            if (atomic_load_explicit(&m->stop, memory_order_relaxed)) return NULL;
            floor_wait(i);
        }
        m->fn(NULL, NULL);
        atomic_store_explicit(&m->seq, 2 * k + 2, memory_order_release);
    }
}

static int floor_case(int64_t n, conc_task_fn fn, bench_out *out) {
    bench_ran_reset();
    pthread_t t[FLOOR_WORKERS];
    int64_t given[FLOOR_WORKERS] = {0}; /* the main thread's own copy of each mailbox's count */
    for (int w = 0; w < FLOOR_WORKERS; w++) {
        atomic_store(&floor_box[w].seq, 0);
        atomic_store(&floor_box[w].stop, false);
        if (bench_spawn(&t[w], floor_worker, &floor_box[w])) return 1;
    }
    int64_t t0 = bench_now();
    int w = 0;
    for (int64_t k = 0; k < n; k++) {
        for (int i = 0; atomic_load_explicit(&floor_box[w].seq, memory_order_acquire) != 2 * given[w]; i++) {
            w = (w + 1) % FLOOR_WORKERS; /* the next worker may be free first */
            floor_wait(i);
        }
        floor_box[w].fn = fn;
        atomic_store_explicit(&floor_box[w].seq, 2 * given[w] + 1, memory_order_release);
        given[w]++;
        w = (w + 1) % FLOOR_WORKERS;
    }
    for (w = 0; w < FLOOR_WORKERS; w++)
        for (int i = 0; atomic_load_explicit(&floor_box[w].seq, memory_order_acquire) != 2 * given[w]; i++) floor_wait(i);
    out->elapsed_ns = bench_now() - t0;
    out->ops = n;
    for (w = 0; w < FLOOR_WORKERS; w++) atomic_store(&floor_box[w].stop, true);
    for (w = 0; w < FLOOR_WORKERS; w++) pthread_join(t[w], NULL);
    if (bench_ran_total() != n) return bench_fail("ran %lld of %lld", (long long)bench_ran_total(), (long long)n);
    return 0;
}

static int case_floor_empty(int64_t n, bench_out *out) { return floor_case(n, job_empty, out); }
static int case_floor_1us(int64_t n, bench_out *out) { return floor_case(n, job_1us, out); }

static const bench_case cases[] = {
    {"pool2_unbuf_1M_empty", 1000000, case_pool_unbuf_empty, 0},
    {"pool2_cap64_1M_empty", 1000000, case_pool_cap64_empty, 0},
    {"pool2_unbuf_1M_1us", 1000000, case_pool_unbuf_1us, 0},
    {"errgroup_limit2_1M_empty", 1000000, case_group_empty, 0},
    {"errgroup_limit2_1M_1us", 1000000, case_group_1us, 0},
    {"floor_handoff2_empty", 1000000, case_floor_empty, 0},
    {"floor_handoff2_1us", 1000000, case_floor_1us, 0},
};

int main(int argc, char **argv) {
    return bench_main(argc, argv, cases, sizeof cases / sizeof cases[0]);
}
