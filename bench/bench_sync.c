/* bench_sync.c - benchmarks of conc.h's coordination primitives: wait groups, semaphores,
   tracked threads, parallel map, once, rate limiters.

   wg_adddone_uncontended         one thread: conc_wg_add(wg, 1) + conc_wg_done(wg); one op
                                  is the pair (Go's N: 50 000 000).
   wg_adddone_2threads            two threads, N pairs each, on one wait group; ns per op is
                                  the total time over 2N (Go's go_wg_adddone_2goroutines).
   sem_weighted_pair_uncontended  one thread: conc_sem_acquire(sem, 1, NULL) +
                                  conc_sem_release(sem, 1) on a semaphore of size 2 (Go's
                                  x/sync/semaphore case; N 20 000 000).
   go_start_wait                  conc_go(wg, empty, NULL) then conc_wg_wait: the cost of one
                                  tracked thread, start to joined (no Go peer: a goroutine is
                                  not a thread; a bare pthread_create+join is ~33 us here).
   parallel_map_1M_empty          conc_parallel_map over N int64 (out = in + 1), limit 2;
                                  ns per item, thread starts included.
   parallel_map_1M_1us            the same with ~1 us of busy work per item: 2 workers on 2
                                  CPUs, so ideal is ~500 ns per item.
   once_done                      one thread: conc_once_do on a once that is done (the fast
                                  path: one acquire load), N 100 000 000.
   limiter_allow_uncontended      one thread: conc_limiter_allow(l, 1) on a limiter whose
                                  rate (10^12/s) always has a token: lock, clock read,
                                  bucket arithmetic, unlock (x/time/rate's AllowN case).
   limiter_allow_2threads         two threads, N allows each, on one such limiter; ns per op
                                  is the total time over 2N.

   Run `bench_sync --list`, `bench_sync --case NAME [--n N]`, or no argument (see bench.h). */
#define CONC_IMPLEMENTATION
#include "conc.h"

#include "bench.h"

#include <stdatomic.h>

static int case_wg_uncontended(int64_t n, bench_out *out) {
    conc_wg_t *wg = conc_wg_new();
    if (!wg) return bench_fail("wg: out of memory");
    int bad = 0;
    int64_t t0 = bench_now();
    for (int64_t i = 0; i < n; i++) {
        bad |= conc_wg_add(wg, 1);
        bad |= conc_wg_done(wg);
    }
    int64_t t1 = bench_now();
    if (bad || conc_wg_count(wg) != 0) return bench_fail("wg: a call failed or the counter is not 0");
    if (conc_wg_wait(wg, NULL) != 0 || conc_wg_free(wg) != 0) return bench_fail("wg: wait/free failed");
    out->elapsed_ns = t1 - t0;
    out->ops = n;
    return 0;
}

typedef struct wg2 {
    conc_wg_t *wg;
    int64_t n;        /* pairs per thread */
    _Atomic int ready; /* threads at the start line */
    _Atomic int go;
    _Atomic int bad;
} wg2;

static void *wg2_thread(void *p) {
    wg2 *a = (wg2 *)p;
    int bad = 0;
    atomic_fetch_add(&a->ready, 1);
    while (!atomic_load_explicit(&a->go, memory_order_acquire)) {
    }
    conc_wg_t *wg = a->wg; /* locals: no shared line read in the loop */
    int64_t n = a->n;
    for (int64_t i = 0; i < n; i++) {
        bad |= conc_wg_add(wg, 1);
        bad |= conc_wg_done(wg);
    }
    if (bad) atomic_store(&a->bad, 1);
    return NULL;
}

static int case_wg_2threads(int64_t n, bench_out *out) {
    wg2 a;
    pthread_t t[2];
    a.wg = conc_wg_new();
    if (!a.wg) return bench_fail("wg2: out of memory");
    a.n = n;
    atomic_init(&a.ready, 0);
    atomic_init(&a.go, 0);
    atomic_init(&a.bad, 0);
    for (int i = 0; i < 2; i++)
        if (bench_spawn(&t[i], wg2_thread, &a) != 0) return 1;
    while (atomic_load(&a.ready) < 2) {
    }
    int64_t t0 = bench_now();
    atomic_store_explicit(&a.go, 1, memory_order_release);
    for (int i = 0; i < 2; i++) pthread_join(t[i], NULL);
    int64_t t1 = bench_now();
    if (atomic_load(&a.bad) || conc_wg_count(a.wg) != 0) return bench_fail("wg2: a call failed or the counter is not 0");
    if (conc_wg_free(a.wg) != 0) return bench_fail("wg2: free failed");
    out->elapsed_ns = t1 - t0;
    out->ops = 2 * n;
    return 0;
}

static int case_sem_uncontended(int64_t n, bench_out *out) {
    conc_sem_t *sem = conc_sem_new(2);
    if (!sem) return bench_fail("sem: out of memory");
    int bad = 0;
    int64_t t0 = bench_now();
    for (int64_t i = 0; i < n; i++) {
        bad |= conc_sem_acquire(sem, 1, NULL);
        bad |= conc_sem_release(sem, 1);
    }
    int64_t t1 = bench_now();
    if (bad || conc_sem_available(sem) != 2) return bench_fail("sem: a call failed or permits are missing");
    if (conc_sem_free(sem) != 0) return bench_fail("sem: free failed");
    out->elapsed_ns = t1 - t0;
    out->ops = n;
    return 0;
}

static void empty_job(void *arg) { (void)arg; }

static int case_go_start_wait(int64_t n, bench_out *out) {
    conc_wg_t *wg = conc_wg_new();
    if (!wg) return bench_fail("go: out of memory");
    int bad = 0;
    int64_t t0 = bench_now();
    for (int64_t i = 0; i < n; i++) {
        bad |= conc_go(wg, empty_job, NULL);
        bad |= conc_wg_wait(wg, NULL);
    }
    int64_t t1 = bench_now();
    if (bad || conc_leak_check(0, CONC_SECOND, NULL, NULL, 0, NULL) != 0) return bench_fail("go: a call failed");
    if (conc_wg_free(wg) != 0) return bench_fail("go: free failed");
    out->elapsed_ns = t1 - t0;
    out->ops = n;
    return 0;
}

static int map_inc(size_t i, const void *in, void *out, void *arg, conc_ctx_t *ctx) {
    (void)ctx, (void)i, (void)arg;
    *(int64_t *)out = *(const int64_t *)in + 1;
    return 0;
}

static int map_inc_1us(size_t i, const void *in, void *out, void *arg, conc_ctx_t *ctx) {
    int64_t t0 = bench_now();
    while (bench_now() - t0 < 1000) {
    }
    return map_inc(i, in, out, arg, ctx);
}

static int map_case(int64_t n, bench_out *out, conc_map_fn fn) {
    int64_t *in = (int64_t *)malloc((size_t)n * sizeof *in), *res = (int64_t *)malloc((size_t)n * sizeof *res);
    if (!in || !res) return bench_fail("map: out of memory");
    for (int64_t i = 0; i < n; i++) in[i] = i, res[i] = 0; /* no page faults in the timing */
    int64_t t0 = bench_now();
    int rc = conc_parallel_map(NULL, in, sizeof *in, res, sizeof *res, (size_t)n, 2, fn, NULL);
    int64_t t1 = bench_now();
    int64_t wrong = 0;
    for (int64_t i = 0; i < n; i++) wrong += res[i] != i + 1;
    free(in);
    free(res);
    if (rc != 0 || wrong) return bench_fail("map: failed or wrong results");
    out->elapsed_ns = t1 - t0;
    out->ops = n;
    return 0;
}

static int case_map_empty(int64_t n, bench_out *out) { return map_case(n, out, map_inc); }
static int case_map_1us(int64_t n, bench_out *out) { return map_case(n, out, map_inc_1us); }

static int bench_once_fn(void *arg) { return *(int *)arg; }

static int case_once_done(int64_t n, bench_out *out) {
    static conc_once_t once = CONC_ONCE_INIT;
    int v = 3;
    if (conc_once_do(&once, bench_once_fn, &v, NULL) != 3) return bench_fail("once: first call");
    int64_t sum = 0;
    int64_t t0 = bench_now();
    for (int64_t i = 0; i < n; i++) sum += conc_once_do(&once, bench_once_fn, &v, NULL);
    int64_t t1 = bench_now();
    if (sum != 3 * n) return bench_fail("once: a call did not give the cached result");
    out->elapsed_ns = t1 - t0;
    out->ops = n;
    return 0;
}

#define BENCH_LIMITER_RATE 1e12 /* a thousand tokens per ns: allow(1) always succeeds */
#define BENCH_LIMITER_BURST ((int64_t)1 << 40)

static int case_limiter_allow(int64_t n, bench_out *out) {
    conc_limiter_t *l = conc_limiter_new(BENCH_LIMITER_RATE, BENCH_LIMITER_BURST);
    if (!l) return bench_fail("limiter: out of memory");
    int64_t ok = 0;
    int64_t t0 = bench_now();
    for (int64_t i = 0; i < n; i++) ok += conc_limiter_allow(l, 1);
    int64_t t1 = bench_now();
    if (conc_limiter_free(l) != 0) return bench_fail("limiter: free failed");
    if (ok != n) return bench_fail("limiter: %lld of %lld allows refused", (long long)(n - ok), (long long)n);
    out->elapsed_ns = t1 - t0;
    out->ops = n;
    return 0;
}

typedef struct lim2 {
    conc_limiter_t *l;
    int64_t n;         /* allows per thread */
    _Atomic int ready; /* threads at the start line */
    _Atomic int go;
    _Atomic int64_t ok;
} lim2;

static void *lim2_thread(void *p) {
    lim2 *a = (lim2 *)p;
    int64_t ok = 0;
    atomic_fetch_add(&a->ready, 1);
    while (!atomic_load_explicit(&a->go, memory_order_acquire)) {
    }
    conc_limiter_t *l = a->l; /* locals: no shared line read in the loop */
    int64_t n = a->n;
    for (int64_t i = 0; i < n; i++) ok += conc_limiter_allow(l, 1);
    atomic_fetch_add(&a->ok, ok);
    return NULL;
}

static int case_limiter_allow_2threads(int64_t n, bench_out *out) {
    lim2 a;
    pthread_t t[2];
    a.l = conc_limiter_new(BENCH_LIMITER_RATE, BENCH_LIMITER_BURST);
    if (!a.l) return bench_fail("limiter2: out of memory");
    a.n = n;
    atomic_init(&a.ready, 0);
    atomic_init(&a.go, 0);
    atomic_init(&a.ok, 0);
    for (int i = 0; i < 2; i++)
        if (bench_spawn(&t[i], lim2_thread, &a) != 0) return 1;
    while (atomic_load(&a.ready) < 2) {
    }
    int64_t t0 = bench_now();
    atomic_store_explicit(&a.go, 1, memory_order_release);
    for (int i = 0; i < 2; i++) pthread_join(t[i], NULL);
    int64_t t1 = bench_now();
    if (conc_limiter_free(a.l) != 0) return bench_fail("limiter2: free failed");
    if (atomic_load(&a.ok) != 2 * n) return bench_fail("limiter2: some allows were refused");
    out->elapsed_ns = t1 - t0;
    out->ops = 2 * n;
    return 0;
}

static const bench_case cases[] = {
    {"wg_adddone_uncontended", 50000000, case_wg_uncontended, 0},
    {"wg_adddone_2threads", 20000000, case_wg_2threads, 0},
    {"sem_weighted_pair_uncontended", 20000000, case_sem_uncontended, 0},
    {"go_start_wait", 20000, case_go_start_wait, 0},
    {"parallel_map_1M_empty", 1000000, case_map_empty, 0},
    {"parallel_map_1M_1us", 1000000, case_map_1us, 0},
    {"once_done", 100000000, case_once_done, 0},
    {"limiter_allow_uncontended", 20000000, case_limiter_allow, 0},
    {"limiter_allow_2threads", 5000000, case_limiter_allow_2threads, 0},
};

int main(int argc, char **argv) {
    return bench_main(argc, argv, cases, sizeof cases / sizeof cases[0]);
}
