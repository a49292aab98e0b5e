/* test_once.c - once: fn runs exactly once with more racing threads than cores, every
   caller (blocked or late) gets fn's cached result (also a failure, as Go's OnceValue),
   the value form, CONC_ONCE_INIT statics, recursion reported as CONC_RECURSIVE instead of a
   deadlock, a once inside another once's fn, bad arguments, and waiting with a context:
   a waiter whose context ends returns its err while fn keeps running and a later call gets
   the result; a context that ends at the instant fn returns gives either outcome, never
   both, and leaves nothing behind (stress, with random yields).

   Go's sync.Once / sync.OnceValue(s) are the reference. Threads are never ordered with
   sleeps: fn waits until the other callers are queued on the once (white box). */
#define CONC_IMPLEMENTATION
#include "conc.h"
#include "tap.h"
#include "test_util.h"

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>

#define NTHREADS 12 /* more than the cores */

/* Callers blocked on o now (white box). */
static int queued(conc_once_t *o) {
    int n = 0;
    pthread_mutex_t *mu = conc__once_lock(o);
    pthread_mutex_lock(mu);
    for (conc__waiter *w = (conc__waiter *)o->waiters; w; w = w->next) n++;
    pthread_mutex_unlock(mu);
    return n;
}

static void until_queued(conc_once_t *o, int n) {
    while (queued(o) < n) sched_yield();
}

/* ---- basics ---- */

static atomic_int calls;
static int give(void *arg) {
    atomic_fetch_add(&calls, 1);
    return *(int *)arg;
}

static conc_once_t global_once = CONC_ONCE_INIT; /* static storage, no constructor call */

TEST(once_basics) {
    static conc_once_t o = CONC_ONCE_INIT;
    int a = 7, b = 9;
    atomic_store(&calls, 0);
    EXPECT(!conc_once_done(&o));
    EXPECT_EQ(conc_once_do(&o, give, &a, NULL), 7);
    EXPECT(conc_once_done(&o));
    EXPECT_EQ(conc_once_do(&o, give, &b, NULL), 7); /* fn and arg of later calls are ignored */
    EXPECT_EQ(atomic_load(&calls), 1);
    /* a failure is cached like any result (OnceValue): fn never runs again */
    conc_once_t e = CONC_ONCE_INIT;
    int err = 123;
    EXPECT_EQ(conc_once_do(&e, give, &err, NULL), 123);
    EXPECT_EQ(conc_once_do(&e, give, &a, NULL), 123);
    EXPECT_EQ(atomic_load(&calls), 2);
    /* a zeroed once is a new once */
    conc_once_t z;
    memset(&z, 0, sizeof z);
    EXPECT_EQ(conc_once_do(&z, give, &b, NULL), 9);
    /* the global */
    EXPECT(!conc_once_done(&global_once));
    EXPECT_EQ(conc_once_do(&global_once, give, &a, NULL), 7);
    EXPECT_EQ(atomic_load(&calls), 4);
}

TEST(once_invalid) {
    conc_once_t o = CONC_ONCE_INIT;
    void *v = &o;
    EXPECT_EQ(conc_once_do(NULL, give, NULL, NULL), CONC_INVALID);
    EXPECT_EQ(conc_once_do(&o, NULL, NULL, NULL), CONC_INVALID);
    EXPECT_EQ(conc_once_do_value(&o, NULL, NULL, &v, NULL), CONC_INVALID);
    EXPECT(v == NULL);
    EXPECT(!conc_once_done(&o));
    EXPECT(!conc_once_done(NULL));
}

/* OnceValues: a value and a status. */
static int make_ptr(void *arg, void **value) {
    atomic_fetch_add(&calls, 1);
    *value = arg;
    return 0;
}
static int make_fail(void *arg, void **value) {
    (void)arg;
    atomic_fetch_add(&calls, 1);
    *value = &calls; /* a value with an error: both are cached, as Go's OnceValues */
    return 55;
}

TEST(once_value) {
    conc_once_t o = CONC_ONCE_INIT;
    int x, y;
    void *v = NULL;
    atomic_store(&calls, 0);
    EXPECT_EQ(conc_once_do_value(&o, make_ptr, &x, &v, NULL), 0);
    EXPECT(v == &x);
    v = NULL;
    EXPECT_EQ(conc_once_do_value(&o, make_ptr, &y, &v, NULL), 0);
    EXPECT(v == &x);
    EXPECT_EQ(conc_once_do_value(&o, make_ptr, &y, NULL, NULL), 0); /* value may be NULL */
    EXPECT_EQ(atomic_load(&calls), 1);
    /* a failing initialiser: status and value cached */
    conc_once_t f = CONC_ONCE_INIT;
    EXPECT_EQ(conc_once_do_value(&f, make_fail, NULL, &v, NULL), 55);
    EXPECT(v == (void *)&calls);
    v = NULL;
    EXPECT_EQ(conc_once_do_value(&f, make_ptr, &x, &v, NULL), 55);
    EXPECT(v == (void *)&calls);
    EXPECT_EQ(atomic_load(&calls), 2);
    /* the two forms on one once: do sees the status, do_value after do a NULL value */
    EXPECT_EQ(conc_once_do(&f, give, &x, NULL), 55);
    conc_once_t g = CONC_ONCE_INIT;
    int seven = 7;
    EXPECT_EQ(conc_once_do(&g, give, &seven, NULL), 7);
    v = &v;
    EXPECT_EQ(conc_once_do_value(&g, make_ptr, &x, &v, NULL), 7);
    EXPECT(v == NULL);
}

/* ---- recursion ---- */

static conc_once_t rec_once = CONC_ONCE_INIT;
static int inner_rc;
static int recurse(void *arg) {
    (void)arg;
    inner_rc = conc_once_do(&rec_once, recurse, NULL, NULL);
    return 5;
}
static int recurse_val(void *arg, void **value) {
    void *v = &v;
    inner_rc = conc_once_do_value((conc_once_t *)arg, recurse_val, arg, &v, NULL);
    EXPECT(v == NULL);
    *value = arg;
    return 0;
}

TEST(once_recursion) {
    EXPECT_EQ(conc_once_do(&rec_once, recurse, NULL, NULL), 5);
    EXPECT_EQ(inner_rc, CONC_RECURSIVE);
    EXPECT_EQ(conc_once_do(&rec_once, recurse, NULL, NULL), 5); /* the once is done, unharmed */
    conc_once_t o = CONC_ONCE_INIT;
    void *v = NULL;
    inner_rc = 0;
    EXPECT_EQ(conc_once_do_value(&o, recurse_val, &o, &v, NULL), 0);
    EXPECT_EQ(inner_rc, CONC_RECURSIVE);
    EXPECT(v == &o);
    EXPECT_EQ(queued(&o), 0);
}

/* fn using another once is fine (no lock is held across fn, even if both share one) */
static conc_once_t nest_inner = CONC_ONCE_INIT;
static int nest_outer_fn(void *arg) {
    int a = 4;
    (void)arg;
    return conc_once_do(&nest_inner, give, &a, NULL) + 1;
}
#define CHAIN 200
static conc_once_t chain[CHAIN];
static int chain_fn(void *arg) {
    uintptr_t i = (uintptr_t)arg;
    if (i + 1 == CHAIN) return 1;
    return 1 + conc_once_do(&chain[i + 1], chain_fn, (void *)(i + 1), NULL);
}

TEST(once_nested) {
    conc_once_t o = CONC_ONCE_INIT;
    EXPECT_EQ(conc_once_do(&o, nest_outer_fn, NULL, NULL), 5);
    EXPECT(conc_once_done(&nest_inner));
    /* a chain of 200 onces, each fn calling the next: with 64 table locks several share
       one while their fns run */
    memset(chain, 0, sizeof chain);
    EXPECT_EQ(conc_once_do(&chain[0], chain_fn, (void *)(uintptr_t)0, NULL), CHAIN);
    for (int i = 0; i < CHAIN; i++) EXPECT(conc_once_done(&chain[i]));
}

/* ---- racing threads ---- */

typedef struct race {
    conc_once_t once;
    pthread_barrier_t start;
    atomic_int runs;
    int results[NTHREADS];
    int seq;
    bool hold; /* fn waits until every other caller is queued */
} race;

static int race_fn(void *arg) {
    race *r = (race *)arg;
    atomic_fetch_add(&r->runs, 1);
    if (r->hold) until_queued(&r->once, NTHREADS - 1);
    return 1000 + r->seq;
}

typedef struct racer {
    race *r;
    int id;
    uint64_t rng;
} racer;

static void *racer_main(void *arg) {
    racer *me = (racer *)arg;
    pthread_barrier_wait(&me->r->start);
    jitter(&me->rng);
    me->r->results[me->id] = conc_once_do(&me->r->once, race_fn, me->r, NULL);
    return NULL;
}

static void run_race(bool hold, long rounds) {
    race r;
    pthread_barrier_init(&r.start, NULL, NTHREADS);
    r.hold = hold;
    for (long k = 0; k < rounds; k++) {
        conc_once_t fresh = CONC_ONCE_INIT;
        pthread_t t[NTHREADS];
        racer rc[NTHREADS];
        r.once = fresh;
        atomic_store(&r.runs, 0);
        r.seq = (int)k;
        for (int i = 0; i < NTHREADS; i++) {
            rc[i].r = &r;
            rc[i].id = i;
            rc[i].rng = (uint64_t)(k * NTHREADS + i) * 0x9E3779B97F4A7C15u + 1;
            r.results[i] = -1;
            t[i] = spawn_thread(racer_main, &rc[i]);
        }
        for (int i = 0; i < NTHREADS; i++) pthread_join(t[i], NULL);
        int bad = 0;
        for (int i = 0; i < NTHREADS; i++) bad += r.results[i] != 1000 + (int)k;
        EXPECT_EQ(atomic_load(&r.runs), 1);
        EXPECT_EQ(bad, 0);
        EXPECT_EQ(queued(&r.once), 0);
        if (bad || atomic_load(&r.runs) != 1) break;
    }
    pthread_barrier_destroy(&r.start);
}

/* The winner holds fn until every other thread is blocked: all go through park and wake. */
TEST(once_race_all_blocked) { run_race(true, tap_iters(60)); }
/* Nobody waits for the others: late callers take the fast path, the lock, or park. */
TEST(once_race_free) { run_race(false, tap_iters(200)); }

/* ---- waiting with a context ---- */

typedef struct gate {
    conc_chan_t *ch; /* fn receives from it: the test decides when fn returns */
    atomic_int runs;
} gate;

static int gated_fn(void *arg) {
    gate *g = (gate *)arg;
    int v = 0;
    atomic_fetch_add(&g->runs, 1);
    EXPECT_EQ(conc_chan_recv(g->ch, &v, NULL), 0);
    return v;
}

typedef struct caller {
    conc_once_t *once;
    gate *g;
    conc_ctx_t *ctx;
    int rc;
} caller;

static atomic_int callers_returned;
static void *caller_main(void *arg) {
    caller *c = (caller *)arg;
    c->rc = conc_once_do(c->once, gated_fn, c->g, c->ctx);
    atomic_fetch_add(&callers_returned, 1);
    return NULL;
}

TEST(once_wait_ctx) {
    conc_once_t o = CONC_ONCE_INIT;
    gate g;
    g.ch = conc_chan_new(sizeof(int), 0);
    ASSERT(g.ch != NULL);
    atomic_init(&g.runs, 0);
    atomic_store(&callers_returned, 0);
    enum { K = 6 };
    conc_ctx_t *cancel_ctx = conc_ctx_with_cancel(NULL);
    conc_ctx_t *dl_ctx = conc_ctx_with_timeout(NULL, 20 * CONC_MILLISECOND);
    ASSERT(cancel_ctx != NULL && dl_ctx != NULL);
    caller run = {&o, &g, NULL, -100}, c[K];
    pthread_t rt = spawn_thread(caller_main, &run); /* becomes the runner (ctx ignored there) */
    while (atomic_load(&g.runs) == 0) sched_yield();
    pthread_t t[K];
    for (int i = 0; i < K; i++) {
        c[i].once = &o;
        c[i].g = &g;
        c[i].ctx = i < 2 ? cancel_ctx : i < 4 ? dl_ctx : NULL; /* two each: cancel, deadline, none */
        c[i].rc = -100;
        t[i] = spawn_thread(caller_main, &c[i]);
    }
    /* each is queued, or (the deadline ones, on a slow machine) already gone */
    while (queued(&o) + atomic_load(&callers_returned) < K) sched_yield();
    conc_ctx_cancel(cancel_ctx);
    pthread_join(t[0], NULL);
    pthread_join(t[1], NULL);
    pthread_join(t[2], NULL); /* the deadline ends them: fn still runs */
    pthread_join(t[3], NULL);
    EXPECT_EQ(c[0].rc, CONC_CANCELED);
    EXPECT_EQ(c[1].rc, CONC_CANCELED);
    EXPECT_EQ(c[2].rc, CONC_DEADLINE_EXCEEDED);
    EXPECT_EQ(c[3].rc, CONC_DEADLINE_EXCEEDED);
    EXPECT(!conc_once_done(&o));
    EXPECT_EQ(queued(&o), 2); /* the cancelled ones left the list */
    /* an ended context while fn runs: its err at once, nothing queued */
    EXPECT_EQ(conc_once_do(&o, gated_fn, &g, cancel_ctx), CONC_CANCELED);
    EXPECT_EQ(queued(&o), 2);
    /* let fn return 42: the uncancelled waiters and the runner get it */
    int v = 42;
    EXPECT_EQ(conc_chan_send(g.ch, &v, NULL), 0);
    pthread_join(rt, NULL);
    pthread_join(t[4], NULL);
    pthread_join(t[5], NULL);
    EXPECT_EQ(run.rc, 42);
    EXPECT_EQ(c[4].rc, 42);
    EXPECT_EQ(c[5].rc, 42);
    EXPECT_EQ(queued(&o), 0);
    /* a later call, even on the cancelled context, gets the result without waiting */
    EXPECT_EQ(conc_once_do(&o, gated_fn, &g, cancel_ctx), 42);
    EXPECT_EQ(conc_once_do(&o, gated_fn, &g, dl_ctx), 42);
    EXPECT_EQ(atomic_load(&g.runs), 1);
    /* a new once and an ended context: the caller runs fn (it waits for nobody) */
    conc_once_t n = CONC_ONCE_INIT;
    int nine = 9;
    EXPECT_EQ(conc_once_do(&n, give, &nine, cancel_ctx), 9);
    conc_ctx_release(cancel_ctx);
    conc_ctx_release(dl_ctx);
    EXPECT_EQ(conc_chan_free(g.ch), 0);
}

/* The runner returns while the waiters' context is being cancelled. Each waiter gets the
   result or the ctx's err (whoever claimed it first), nothing is left on the once, and the
   once is done with fn run once. ASan (detect_stack_use_after_return) and Helgrind watch
   the runner touching waiters that are about to leave. */
typedef struct cvc {
    conc_once_t once;
    conc_ctx_t *ctx;
    atomic_int go;     /* fn: every waiter queued; the canceller may fire */
    atomic_int runs;
    int nwait;
    int rc[NTHREADS];
    uint64_t rng;  /* the runner's */
    uint64_t crng; /* the canceller's */
} cvc;

static int cvc_fn(void *arg) {
    cvc *x = (cvc *)arg;
    atomic_fetch_add(&x->runs, 1);
    until_queued(&x->once, x->nwait);
    atomic_store(&x->go, 1);
    jitter(&x->rng);
    return 77;
}

typedef struct cvc_arg {
    cvc *x;
    int id;
} cvc_arg;

static void *cvc_caller(void *arg) {
    cvc_arg *a = (cvc_arg *)arg;
    a->x->rc[a->id] = conc_once_do(&a->x->once, cvc_fn, a->x, a->id == 0 ? NULL : a->x->ctx);
    return NULL;
}

static void *cvc_canceller(void *arg) {
    cvc *x = (cvc *)arg;
    uint64_t rng = x->crng;
    while (!atomic_load(&x->go)) sched_yield();
    jitter(&rng);
    conc_ctx_cancel(x->ctx);
    return NULL;
}

TEST(once_cancel_vs_complete) {
    long rounds = tap_iters(200);
    long got_result = 0, got_err = 0;
    for (long k = 0; k < rounds; k++) {
        static cvc x;
        conc_once_t fresh = CONC_ONCE_INIT;
        x.once = fresh;
        x.ctx = conc_ctx_with_cancel(NULL);
        ASSERT(x.ctx != NULL);
        atomic_store(&x.go, 0);
        atomic_store(&x.runs, 0);
        x.nwait = NTHREADS - 1;
        x.rng = (uint64_t)k * 0x9E3779B97F4A7C15u + 7;
        x.crng = x.rng ^ 0x5555;
        pthread_t t[NTHREADS], ct;
        cvc_arg a[NTHREADS];
        for (int i = 0; i < NTHREADS; i++) {
            a[i].x = &x;
            a[i].id = i;
            x.rc[i] = -100;
        }
        t[0] = spawn_thread(cvc_caller, &a[0]); /* the runner (no ctx) */
        while (atomic_load(&x.runs) == 0) sched_yield();
        for (int i = 1; i < NTHREADS; i++) t[i] = spawn_thread(cvc_caller, &a[i]);
        ct = spawn_thread(cvc_canceller, &x);
        for (int i = 0; i < NTHREADS; i++) pthread_join(t[i], NULL);
        pthread_join(ct, NULL);
        int bad = x.rc[0] != 77;
        for (int i = 1; i < NTHREADS; i++) {
            if (x.rc[i] == 77) got_result++;
            else if (x.rc[i] == CONC_CANCELED) got_err++;
            else bad++;
        }
        EXPECT_EQ(bad, 0);
        EXPECT_EQ(atomic_load(&x.runs), 1);
        EXPECT_EQ(queued(&x.once), 0);
        EXPECT_EQ(conc_once_do(&x.once, cvc_fn, &x, x.ctx), 77);
        conc_ctx_release(x.ctx);
        if (bad) break;
    }
    printf("# %ld waiters got the result, %ld the ctx's err\n", got_result, got_err);
}

/* ---- the fast path ---- */

typedef struct fast {
    conc_once_t *once;
    long iters;
    int bad;
} fast;

static void *fast_main(void *arg) {
    fast *f = (fast *)arg;
    int a = 3;
    for (long i = 0; i < f->iters; i++)
        if (conc_once_do(f->once, give, &a, NULL) != 3) f->bad++;
    return NULL;
}

TEST(once_fast_path_threads) {
    static conc_once_t o = CONC_ONCE_INIT;
    fast f[4];
    pthread_t t[4];
    atomic_store(&calls, 0);
    for (int i = 0; i < 4; i++) {
        f[i].once = &o;
        f[i].iters = tap_iters(100000);
        f[i].bad = 0;
        t[i] = spawn_thread(fast_main, &f[i]);
    }
    for (int i = 0; i < 4; i++) pthread_join(t[i], NULL);
    for (int i = 0; i < 4; i++) EXPECT_EQ(f[i].bad, 0);
    EXPECT_EQ(atomic_load(&calls), 1);
}

int main(void) {
    RUN(once_basics);
    RUN(once_invalid);
    RUN(once_value);
    RUN(once_recursion);
    RUN(once_nested);
    RUN(once_race_all_blocked);
    RUN(once_race_free);
    RUN(once_wait_ctx);
    RUN(once_cancel_vs_complete);
    RUN(once_fast_path_threads);
    return tap_done();
}
