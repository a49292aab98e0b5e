/* test_map.c - conc_parallel_map: results at their input's index, the bound on calls in
   flight (reached, never passed), limit 1 on the caller's thread, the first error cancels
   the rest and is never replaced by a later one, the caller's context ending, argument
   errors, element sizes, and a stress loop of maps with random errors where each item runs
   at most once and every thread is joined (leak check). */
#define CONC_IMPLEMENTATION
#include "conc.h"
#include "tap.h"
#include "test_util.h"

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <string.h>

static int square(size_t i, const void *in, void *out, void *arg, conc_ctx_t *ctx) {
    (void)ctx, (void)i, (void)arg;
    int64_t x = *(const int64_t *)in;
    *(int64_t *)out = x * x;
    return 0;
}

TEST(map_results_in_input_order) {
    enum { N = 10007 };
    static int64_t in[N], out[N];
    for (int i = 0; i < N; i++) {
        in[i] = i - 5000;
        out[i] = -1;
    }
    uint64_t scope = conc_leak_begin();
    EXPECT_EQ(conc_parallel_map(NULL, in, sizeof in[0], out, sizeof out[0], N, 4, square, NULL), 0);
    int wrong = 0;
    for (int i = 0; i < N; i++) wrong += out[i] != in[i] * in[i];
    EXPECT_EQ(wrong, 0);
    EXPECT_EQ(conc_leak_check(scope, 0, NULL, NULL, 0, NULL), 0); /* joined before returning */
}

/* limit 0 = one worker per CPU; limit above n is cut to n */
TEST(map_default_and_large_limits) {
    int64_t in[5] = {1, 2, 3, 4, 5}, out[5] = {0};
    EXPECT_EQ(conc_parallel_map(NULL, in, sizeof in[0], out, sizeof out[0], 5, 0, square, NULL), 0);
    EXPECT_EQ(out[4], 25);
    memset(out, 0, sizeof out);
    EXPECT_EQ(conc_parallel_map(NULL, in, sizeof in[0], out, sizeof out[0], 5, 100, square, NULL), 0);
    EXPECT_EQ(out[0] + out[1] + out[2] + out[3] + out[4], 55);
}

/* Element sizes: a 3-byte input to a 40-byte output; and no input or output at all. */
typedef struct wide {
    char text[40];
} wide;

static int spell(size_t i, const void *in, void *out, void *arg, conc_ctx_t *ctx) {
    (void)ctx, (void)arg;
    const unsigned char *b = (const unsigned char *)in;
    snprintf(((wide *)out)->text, sizeof(wide), "%zu:%u.%u.%u", i, b[0], b[1], b[2]);
    return 0;
}

static atomic_long calls;

static int count_call(size_t i, const void *in, void *out, void *arg, conc_ctx_t *ctx) {
    (void)ctx, (void)i, (void)arg;
    if (in || out) return 1;
    atomic_fetch_add(&calls, 1);
    return 0;
}

TEST(map_element_sizes) {
    unsigned char in[4][3] = {{1, 2, 3}, {4, 5, 6}, {7, 8, 9}, {10, 11, 12}};
    wide out[4];
    EXPECT_EQ(conc_parallel_map(NULL, in, 3, out, sizeof(wide), 4, 2, spell, NULL), 0);
    EXPECT(strcmp(out[3].text, "3:10.11.12") == 0);
    EXPECT(strcmp(out[0].text, "0:1.2.3") == 0);
    atomic_store(&calls, 0);
    EXPECT_EQ(conc_parallel_map(NULL, NULL, 0, NULL, 0, 1000, 3, count_call, NULL), 0);
    EXPECT_EQ(atomic_load(&calls), 1000);
}

TEST(map_invalid_arguments) {
    int64_t x[1] = {0};
    EXPECT_EQ(conc_parallel_map(NULL, x, 8, x, 8, 1, 1, NULL, NULL), CONC_INVALID);
    EXPECT_EQ(conc_parallel_map(NULL, NULL, 8, x, 8, 1, 1, square, NULL), CONC_INVALID);
    EXPECT_EQ(conc_parallel_map(NULL, x, 8, NULL, 8, 1, 1, square, NULL), CONC_INVALID);
    EXPECT_EQ(conc_parallel_map(NULL, x, SIZE_MAX / 2, x, 8, 3, 1, square, NULL), CONC_INVALID);
    EXPECT_EQ(conc_parallel_map(NULL, NULL, 8, NULL, 8, 0, 1, square, NULL), 0); /* n 0: nothing to do */
}

/* An index-only map may be huge, and its limit too: the worker count is capped (no
   overflow in the chunk arithmetic or the thread array), and a first error ends it at once. */
static int fail_at_once(size_t i, const void *in, void *out, void *arg, conc_ctx_t *ctx) {
    (void)i, (void)in, (void)out, (void)arg, (void)ctx;
    return 3;
}

TEST(map_huge_n_and_limit) {
    size_t n = (size_t)1 << (sizeof(size_t) * 8 - 2);
    EXPECT_EQ(conc_parallel_map(NULL, NULL, 0, NULL, 0, n, 4, fail_at_once, NULL), 3);
    if (CONC__ON_VALGRIND()) return; /* a thousand threads: too slow there */
    EXPECT_EQ(conc_parallel_map(NULL, NULL, 0, NULL, 0, n, n, fail_at_once, NULL), 3);
    EXPECT_EQ(conc_parallel_map(NULL, NULL, 0, NULL, 0, n / 2 + 2, SIZE_MAX, fail_at_once, NULL), 3);
}

/* limit 1 runs every item on the caller's thread, in order */
static int record_order(size_t i, const void *in, void *out, void *arg, conc_ctx_t *ctx) {
    (void)ctx, (void)in;
    pthread_t *caller = (pthread_t *)arg;
    *(size_t *)out = pthread_equal(*caller, pthread_self()) ? i : (size_t)-1;
    return 0;
}

TEST(map_limit_one_runs_inline) {
    size_t out[50];
    pthread_t self = pthread_self();
    EXPECT_EQ(conc_parallel_map(NULL, NULL, 0, out, sizeof out[0], 50, 1, record_order, &self), 0);
    int wrong = 0;
    for (size_t i = 0; i < 50; i++) wrong += out[i] != i;
    EXPECT_EQ(wrong, 0);
}

/* The bound: each worker's first call waits until `limit` are in flight (so it is
   reached), and no call ever sees more. */
typedef struct flight {
    atomic_int now, max;
    int limit, gen;
} flight;

static _Thread_local int flight_gen_seen;

static int in_flight(size_t i, const void *in, void *out, void *arg, conc_ctx_t *ctx) {
    (void)ctx, (void)in, (void)out;
    flight *f = (flight *)arg;
    int k = atomic_fetch_add(&f->now, 1) + 1;
    int m = atomic_load(&f->max);
    while (k > m && !atomic_compare_exchange_weak(&f->max, &m, k)) {
    }
    (void)i;
    if (flight_gen_seen != f->gen) { /* this thread's first call of this map */
        flight_gen_seen = f->gen;
        while (atomic_load(&f->max) < f->limit) sched_yield();
    } else {
        sched_yield();
    }
    atomic_fetch_sub(&f->now, 1);
    return 0;
}

TEST(map_bounds_calls_in_flight) {
    for (int limit = 2; limit <= 5; limit += 3) {
        flight f;
        atomic_init(&f.now, 0);
        atomic_init(&f.max, 0);
        f.limit = limit;
        f.gen = limit;
        EXPECT_EQ(conc_parallel_map(NULL, NULL, 0, NULL, 0, 200, (size_t)limit, in_flight, &f), 0);
        EXPECT_EQ(atomic_load(&f.max), limit);
    }
}

/* The first error cancels the rest, and later errors never replace it. Items 0-6 succeed,
   item 7 fails at once; every later item waits for the map's context to end and then
   fails with 99. */
typedef struct firsterr {
    atomic_int ran;
    atomic_int cause_ok;
} firsterr;

static int fail_at_seven(size_t i, const void *in, void *out, void *arg, conc_ctx_t *ctx) {
    (void)in, (void)out;
    firsterr *e = (firsterr *)arg;
    atomic_fetch_add(&e->ran, 1);
    if (i < 7) return 0;
    if (i == 7) return 7;
    conc_ctx_wait(ctx);
    if (conc_ctx_err(ctx) == CONC_CANCELED && conc_ctx_cause(ctx) == 7) atomic_fetch_add(&e->cause_ok, 1);
    return 99;
}

TEST(map_first_error_wins_and_cancels) {
    firsterr e;
    atomic_init(&e.ran, 0);
    atomic_init(&e.cause_ok, 0);
    /* 3 workers: the one that claimed 0-7 runs them; the other two may be blocked in a
       later item each, and leave it with 99 once item 7 has cancelled the map */
    EXPECT_EQ(conc_parallel_map(NULL, NULL, 0, NULL, 0, 1000, 3, fail_at_seven, &e), 7);
    int ran = atomic_load(&e.ran);
    EXPECT(ran >= 8 && ran <= 10);
    EXPECT_EQ(atomic_load(&e.cause_ok), ran - 8);
}

/* The caller's context ends while items run: the map returns its err, and stops starting. */
typedef struct parent_arg {
    conc_ctx_t *parent;
    atomic_int ran;
} parent_arg;

static int cancel_parent_at_50(size_t i, const void *in, void *out, void *arg, conc_ctx_t *ctx) {
    (void)in;
    parent_arg *p = (parent_arg *)arg;
    atomic_fetch_add(&p->ran, 1);
    if (i == 50) conc_ctx_cancel(p->parent);
    *(int *)out = 1;
    (void)ctx;
    return 0;
}

TEST(map_parent_cancelled) {
    parent_arg p;
    p.parent = conc_ctx_with_cancel(NULL);
    ASSERT(p.parent != NULL);
    atomic_init(&p.ran, 0);
    static int out[100000];
    memset(out, 0, sizeof out);
    EXPECT_EQ(conc_parallel_map(p.parent, NULL, 0, out, sizeof out[0], 100000, 2, cancel_parent_at_50, &p),
              CONC_CANCELED);
    int ran = atomic_load(&p.ran), marked = 0;
    for (int i = 0; i < 100000; i++) marked += out[i];
    EXPECT_EQ(marked, ran); /* out[i] written exactly for the items that ran */
    EXPECT(ran < 100000);
    /* already ended: nothing runs */
    atomic_store(&p.ran, 0);
    EXPECT_EQ(conc_parallel_map(p.parent, NULL, 0, out, sizeof out[0], 100, 4, cancel_parent_at_50, &p), CONC_CANCELED);
    EXPECT_EQ(atomic_load(&p.ran), 0);
    conc_ctx_release(p.parent);
}

/* Stress: many maps with random failing items; per map, each item ran at most once, the
   result is the value of a failing item that ran (the first to fail), or 0 with every item
   run once; every thread is joined. */
typedef struct stress_map {
    atomic_int *runs;
    int fail_at; /* -1: none */
    uint64_t seed;
} stress_map;

static int stress_item(size_t i, const void *in, void *out, void *arg, conc_ctx_t *ctx) {
    (void)ctx, (void)in;
    stress_map *s = (stress_map *)arg;
    atomic_fetch_add(&s->runs[i], 1);
    uint64_t seed = s->seed ^ (i * 0x9e3779b97f4a7c15ull) ^ 1;
    jitter(&seed);
    *(int *)out = (int)i + 1;
    return (int)i == s->fail_at ? 1000 + (int)i : 0;
}

TEST(map_stress_random_errors) {
    enum { N = 300 };
    static atomic_int runs[N];
    static int out[N];
    long rounds = tap_iters(2000);
    uint64_t seed = 12345;
    int bad = 0, failed = 0;
    uint64_t scope = conc_leak_begin();
    for (long r = 0; r < rounds; r++) {
        stress_map s;
        s.runs = runs;
        s.fail_at = rnd(&seed) % 3 == 0 ? (int)(rnd(&seed) % N) : -1;
        s.seed = rnd(&seed);
        for (int i = 0; i < N; i++) {
            atomic_store(&runs[i], 0);
            out[i] = 0;
        }
        size_t limit = 1 + rnd(&seed) % 6;
        int rc = conc_parallel_map(NULL, NULL, 0, out, sizeof out[0], N, limit, stress_item, &s);
        int total = 0;
        for (int i = 0; i < N; i++) {
            int k = atomic_load(&runs[i]);
            if (k > 1) bad++;
            if (k == 1 && out[i] != i + 1) bad++;
            if (k == 0 && out[i] != 0) bad++;
            total += k;
        }
        if (s.fail_at < 0) {
            if (rc != 0 || total != N) bad++;
        } else {
            if (rc != 1000 + s.fail_at || atomic_load(&runs[s.fail_at]) != 1) bad++;
            failed++;
        }
    }
    printf("# %ld maps, %d with a failing item\n", rounds, failed);
    EXPECT_EQ(bad, 0);
    EXPECT_EQ(conc_leak_check(scope, 0, NULL, NULL, 0, NULL), 0);
}

int main(void) {
    RUN(map_results_in_input_order);
    RUN(map_default_and_large_limits);
    RUN(map_element_sizes);
    RUN(map_invalid_arguments);
    RUN(map_huge_n_and_limit);
    RUN(map_limit_one_runs_inline);
    RUN(map_bounds_calls_in_flight);
    RUN(map_first_error_wins_and_cancels);
    RUN(map_parent_cancelled);
    RUN(map_stress_random_errors);
    return tap_done();
}
