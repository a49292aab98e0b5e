/* test_wg.c - wait groups: counting, the negative-counter and overflow errors, waits
   cancelled by a context or a deadline, many waiters woken at once, add/done from more
   threads than cores with waiters coming and going, a wait racing the last done (the
   waiter then frees the wait group at once), and the last done racing the waiter's own
   cancellation.

   Go's sync.WaitGroup is the reference. Threads are never ordered with sleeps: a test that
   needs a thread to be blocked polls the wait group's waiter list (white box) until it is. */
#define CONC_IMPLEMENTATION
#include "conc.h"
#include "tap.h"
#include "test_util.h"

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>

/* How many waits are queued on wg now (white box: the implementation is in this file). */
static int queued_waiters(conc_wg_t *wg) {
    int n = 0;
    pthread_mutex_lock(&wg->mu);
    for (conc__waiter *w = wg->waiters.head; w; w = w->next) n++;
    pthread_mutex_unlock(&wg->mu);
    return n;
}

static void until_queued(conc_wg_t *wg, int n) {
    while (queued_waiters(wg) < n) sched_yield();
}

static bool waiters_bit(conc_wg_t *wg) { return (atomic_load(&wg->state) & CONC__WG_WAITERS) != 0; }

/* ---- basics ---- */

TEST(wg_basics) {
    conc_wg_t *wg = conc_wg_new();
    ASSERT(wg != NULL);
    EXPECT_EQ(conc_wg_count(wg), 0);
    EXPECT_EQ(conc_wg_wait(wg, NULL), 0); /* counter 0: returns at once */
    EXPECT_EQ(conc_wg_add(wg, 3), 0);
    EXPECT_EQ(conc_wg_count(wg), 3);
    EXPECT_EQ(conc_wg_add(wg, 0), 0);
    EXPECT_EQ(conc_wg_count(wg), 3);
    EXPECT_EQ(conc_wg_done(wg), 0);
    EXPECT_EQ(conc_wg_add(wg, -2), 0);
    EXPECT_EQ(conc_wg_count(wg), 0);
    EXPECT_EQ(conc_wg_wait(wg, NULL), 0);
    /* reuse at once */
    EXPECT_EQ(conc_wg_add(wg, 1), 0);
    EXPECT_EQ(conc_wg_done(wg), 0);
    EXPECT_EQ(conc_wg_wait(wg, NULL), 0);
    /* a counter of 0 completes a wait even on an ended context */
    conc_ctx_t *c = conc_ctx_with_cancel(NULL);
    ASSERT(c != NULL);
    conc_ctx_cancel(c);
    EXPECT_EQ(conc_wg_wait(wg, c), 0);
    conc_ctx_release(c);
    EXPECT_EQ(conc_wg_free(wg), 0);

    EXPECT_EQ(conc_wg_free(NULL), 0);
    EXPECT_EQ(conc_wg_add(NULL, 1), CONC_INVALID);
    EXPECT_EQ(conc_wg_done(NULL), CONC_INVALID);
    EXPECT_EQ(conc_wg_wait(NULL, NULL), CONC_INVALID);
    EXPECT_EQ(conc_wg_count(NULL), 0);
}

TEST(wg_negative_counter_is_refused) {
    conc_wg_t *wg = conc_wg_new();
    ASSERT(wg != NULL);
    EXPECT_EQ(conc_wg_done(wg), CONC_NEGATIVE_COUNT);
    EXPECT_EQ(conc_wg_count(wg), 0);
    EXPECT_EQ(conc_wg_add(wg, INT64_MIN), CONC_NEGATIVE_COUNT);
    EXPECT_EQ(conc_wg_add(wg, 2), 0);
    EXPECT_EQ(conc_wg_add(wg, -3), CONC_NEGATIVE_COUNT);
    EXPECT_EQ(conc_wg_count(wg), 2); /* left unchanged */
    EXPECT_EQ(conc_wg_add(wg, INT64_MAX), CONC_INVALID); /* more than the word holds */
    EXPECT_EQ(conc_wg_count(wg), 2);
    EXPECT_EQ(conc_wg_add(wg, (int64_t)CONC__WG_MAX - 1), CONC_INVALID); /* overflow: undone */
    EXPECT_EQ(conc_wg_count(wg), 2);
    EXPECT_EQ(conc_wg_add(wg, (int64_t)CONC__WG_MAX - 2), 0); /* exactly the maximum */
    EXPECT_EQ(conc_wg_count(wg), (int64_t)CONC__WG_MAX);
    EXPECT_EQ(conc_wg_add(wg, 1), CONC_INVALID);
    EXPECT_EQ(conc_wg_add(wg, -((int64_t)CONC__WG_MAX - 2)), 0);
    EXPECT_EQ(conc_wg_count(wg), 2);
    EXPECT_EQ(conc_wg_done(wg), 0);
    EXPECT_EQ(conc_wg_done(wg), 0);
    EXPECT_EQ(conc_wg_done(wg), CONC_NEGATIVE_COUNT);
    EXPECT_EQ(conc_wg_count(wg), 0);
    EXPECT_EQ(conc_wg_wait(wg, NULL), 0); /* still usable */
    EXPECT_EQ(conc_wg_add(wg, 1), 0);
    EXPECT_EQ(conc_wg_done(wg), 0);
    EXPECT_EQ(conc_wg_free(wg), 0);
}

/* ---- a blocked wait ---- */

typedef struct waiter_arg {
    conc_wg_t *wg;
    conc_ctx_t *ctx;
    int rc;
    int64_t took_ns;
    int64_t end; /* conc_now() when the call returned */
} waiter_arg;

static void *waiter_main(void *p) {
    waiter_arg *a = (waiter_arg *)p;
    int64_t t0 = conc_now();
    a->rc = conc_wg_wait(a->wg, a->ctx);
    a->end = conc_now();
    a->took_ns = a->end - t0;
    return NULL;
}

TEST(wg_wait_woken_by_done) {
    conc_wg_t *wg = conc_wg_new();
    ASSERT(wg != NULL);
    EXPECT_EQ(conc_wg_add(wg, 2), 0);
    waiter_arg a = {wg, NULL, 99, 0, 0};
    pthread_t t = spawn_thread(waiter_main, &a);
    until_queued(wg, 1);
    EXPECT(waiters_bit(wg));
    EXPECT_EQ(conc_wg_free(wg), CONC_BUSY);
    EXPECT_EQ(conc_wg_done(wg), 0);
    EXPECT_EQ(queued_waiters(wg), 1); /* 1 left: still waiting */
    EXPECT_EQ(conc_wg_done(wg), 0);
    pthread_join(t, NULL);
    EXPECT_EQ(a.rc, 0);
    EXPECT(!waiters_bit(wg));
    EXPECT_EQ(conc_wg_free(wg), 0);
}

TEST(wg_wait_cancelled) {
    conc_wg_t *wg = conc_wg_new();
    conc_ctx_t *ctx = conc_ctx_with_cancel(NULL);
    ASSERT(wg != NULL && ctx != NULL);
    EXPECT_EQ(conc_wg_add(wg, 1), 0);
    waiter_arg a = {wg, ctx, 99, 0, 0};
    pthread_t t = spawn_thread(waiter_main, &a);
    until_queued(wg, 1);
    conc_ctx_cancel(ctx);
    pthread_join(t, NULL);
    EXPECT_EQ(a.rc, CONC_CANCELED);
    EXPECT_EQ(conc_wg_count(wg), 1); /* a cancelled wait changes nothing */
    EXPECT_EQ(queued_waiters(wg), 0);
    EXPECT(!waiters_bit(wg));
    /* an ended context with a non-zero counter: returns its err at once */
    EXPECT_EQ(conc_wg_wait(wg, ctx), CONC_CANCELED);
    EXPECT_EQ(conc_wg_done(wg), 0);
    EXPECT_EQ(conc_wg_wait(wg, ctx), 0);
    conc_ctx_release(ctx);

    /* one of two waiters cancelled: the other still gets woken by the last done */
    ctx = conc_ctx_with_cancel(NULL);
    ASSERT(ctx != NULL);
    EXPECT_EQ(conc_wg_add(wg, 1), 0);
    waiter_arg a1 = {wg, ctx, 99, 0, 0}, a2 = {wg, NULL, 99, 0, 0};
    pthread_t t1 = spawn_thread(waiter_main, &a1);
    until_queued(wg, 1);
    pthread_t t2 = spawn_thread(waiter_main, &a2);
    until_queued(wg, 2);
    conc_ctx_cancel(ctx);
    pthread_join(t1, NULL);
    EXPECT_EQ(a1.rc, CONC_CANCELED);
    EXPECT(waiters_bit(wg)); /* the other one still waits */
    EXPECT_EQ(conc_wg_done(wg), 0);
    pthread_join(t2, NULL);
    EXPECT_EQ(a2.rc, 0);
    conc_ctx_release(ctx);
    EXPECT_EQ(conc_wg_free(wg), 0);
}

TEST(wg_wait_deadline) {
    conc_wg_t *wg = conc_wg_new();
    ASSERT(wg != NULL);
    EXPECT_EQ(conc_wg_add(wg, 1), 0);
    conc_ctx_t *ctx = conc_ctx_with_timeout(NULL, 20 * CONC_MILLISECOND);
    ASSERT(ctx != NULL);
    waiter_arg a = {wg, ctx, 99, 0, 0};
    waiter_main(&a);
    EXPECT_EQ(a.rc, CONC_DEADLINE_EXCEEDED);
    int64_t dl = 0;
    EXPECT(conc_ctx_deadline(ctx, &dl));
    EXPECT(a.end >= dl); /* not before the deadline */
    EXPECT_EQ(conc_wg_count(wg), 1);
    EXPECT(!waiters_bit(wg));
    conc_ctx_release(ctx);
    EXPECT_EQ(conc_wg_done(wg), 0);
    EXPECT_EQ(conc_wg_free(wg), 0);
}

#define MANY 12
TEST(wg_many_waiters_all_woken) {
    conc_wg_t *wg = conc_wg_new();
    conc_ctx_t *ctx = conc_ctx_with_cancel(NULL); /* half the waiters have one that never ends */
    ASSERT(wg != NULL && ctx != NULL);
    EXPECT_EQ(conc_wg_add(wg, 3), 0);
    waiter_arg a[MANY];
    pthread_t t[MANY];
    for (int i = 0; i < MANY; i++) {
        a[i] = (waiter_arg){wg, i % 2 ? ctx : NULL, 99, 0, 0};
        t[i] = spawn_thread(waiter_main, &a[i]);
    }
    until_queued(wg, MANY);
    EXPECT_EQ(conc_wg_free(wg), CONC_BUSY);
    EXPECT_EQ(conc_wg_add(wg, -2), 0);
    EXPECT_EQ(queued_waiters(wg), MANY);
    EXPECT_EQ(conc_wg_done(wg), 0);
    for (int i = 0; i < MANY; i++) {
        pthread_join(t[i], NULL);
        EXPECT_EQ(a[i].rc, 0);
    }
    EXPECT(!waiters_bit(wg));
    conc_ctx_release(ctx);
    EXPECT_EQ(conc_wg_free(wg), 0);
}

/* ---- many threads at once ---- */

#define STORM_THREADS 8 /* more than the cores */
typedef struct storm {
    conc_wg_t *wg;
    long iters;
    _Atomic int running;
    _Atomic long waits;
    _Atomic int bad;
} storm;

static void *storm_adder(void *p) {
    storm *s = (storm *)p;
    uint64_t x = (uint64_t)(uintptr_t)&x | 1;
    for (long i = 0; i < s->iters; i++) {
        x ^= x << 13, x ^= x >> 7, x ^= x << 17;
        int k = 1 + (int)(x % 3);
        if (conc_wg_add(s->wg, k) != 0) atomic_fetch_add(&s->bad, 1);
        if (x & 16) sched_yield();
        for (int j = 0; j < k; j++)
            if (conc_wg_done(s->wg) != 0) atomic_fetch_add(&s->bad, 1);
        if ((x & 0x300) == 0) sched_yield();
    }
    atomic_fetch_sub(&s->running, 1);
    return NULL;
}

/* Waits again and again while the adders run: every wait ends when the counter touches 0,
   which exercises the add that empties the waiter list while others add. */
static void *storm_waiter(void *p) {
    storm *s = (storm *)p;
    conc_ctx_t *ctx = conc_ctx_with_cancel(NULL);
    while (atomic_load(&s->running) > 0) {
        if (conc_wg_wait(s->wg, ctx) != 0) atomic_fetch_add(&s->bad, 1);
        atomic_fetch_add(&s->waits, 1);
        sched_yield(); /* a wait that returns at once must not starve the adders */
    }
    conc_ctx_release(ctx);
    return NULL;
}

TEST(wg_adddone_storm) {
    storm s;
    s.wg = conc_wg_new();
    ASSERT(s.wg != NULL);
    s.iters = tap_iters(40000);
    atomic_init(&s.running, STORM_THREADS);
    atomic_init(&s.waits, 0);
    atomic_init(&s.bad, 0);
    pthread_t t[STORM_THREADS], w[2];
    for (int i = 0; i < STORM_THREADS; i++) t[i] = spawn_thread(storm_adder, &s);
    for (int i = 0; i < 2; i++) w[i] = spawn_thread(storm_waiter, &s);
    for (int i = 0; i < STORM_THREADS; i++) pthread_join(t[i], NULL);
    for (int i = 0; i < 2; i++) pthread_join(w[i], NULL);
    EXPECT_EQ(atomic_load(&s.bad), 0);
    EXPECT_EQ(conc_wg_count(s.wg), 0);
    EXPECT_EQ(queued_waiters(s.wg), 0);
    EXPECT(!waiters_bit(s.wg));
    printf("# %ld add/done rounds per thread, %ld waits returned\n", s.iters, atomic_load(&s.waits));
    EXPECT_EQ(conc_wg_free(s.wg), 0);
}

/* ---- a wait racing the last done; the waiter frees the wait group at once ---- */

#define STOP_WG ((conc_wg_t *)(uintptr_t)1)
typedef struct race {
    _Atomic(conc_wg_t *) slot;
    long payload; /* written before done, read after wait: plain memory */
} race;

static void *race_worker(void *p) {
    race *r = (race *)p;
    uint64_t x = 88172645463325252u;
    for (long i = 0;; i++) {
        conc_wg_t *wg;
        while ((wg = atomic_exchange(&r->slot, NULL)) == NULL) sched_yield();
        CONC__HB_AFTER(&r->slot); /* Helgrind: the test's own hand-off through an atomic */
        if (wg == STOP_WG) break;
        x ^= x << 13, x ^= x >> 7, x ^= x << 17;
        if (x & 1) sched_yield(); /* sometimes let the waiter queue first */
        r->payload = i;
        conc_wg_done(wg);
    }
    return NULL;
}

TEST(wg_wait_races_last_done) {
    race r;
    atomic_init(&r.slot, NULL);
    r.payload = -1;
    pthread_t t = spawn_thread(race_worker, &r);
    conc_ctx_t *ctx = conc_ctx_with_cancel(NULL);
    ASSERT(ctx != NULL);
    long n = tap_iters(20000), bad = 0;
    for (long i = 0; i < n; i++) {
        conc_wg_t *wg = conc_wg_new();
        ASSERT(wg != NULL);
        conc_wg_add(wg, 1);
        CONC__HB_BEFORE(&r.slot);
        atomic_store(&r.slot, wg);
        if (conc_wg_wait(wg, i % 2 ? ctx : NULL) != 0) bad++;
        if (r.payload != i) bad++;
        if (conc_wg_free(wg) != 0) bad++; /* the waiter's last use, while done may be unwinding */
    }
    while (atomic_load(&r.slot) != NULL) sched_yield();
    CONC__HB_BEFORE(&r.slot);
    atomic_store(&r.slot, STOP_WG);
    pthread_join(t, NULL);
    conc_ctx_release(ctx);
    EXPECT_EQ(bad, 0);
}

/* ---- the last done racing the waiter's own cancellation ----
   Either may win; the wait returns 0 or CONC_CANCELED, and either way the wait group is
   left clean: no waiter queued, the waiters bit clear, free succeeds. */

typedef struct race2 {
    _Atomic int phase; /* 1: wg and ctx published; 2: the worker is done with both; 3: stop */
    conc_wg_t *wg;
    conc_ctx_t *ctx;
} race2;

static void *race2_worker(void *p) {
    race2 *r = (race2 *)p;
    uint64_t x = 0x2545F4914F6CDD1Du;
    for (;;) {
        int ph;
        while ((ph = atomic_load(&r->phase)) != 1 && ph != 3) sched_yield();
        if (ph == 3) break;
        CONC__HB_AFTER(&r->phase);
        x ^= x << 13, x ^= x >> 7, x ^= x << 17;
        if (x & 2) sched_yield();
        if (x & 1) {
            conc_ctx_cancel(r->ctx);
            conc_wg_done(r->wg);
        } else {
            conc_wg_done(r->wg);
            conc_ctx_cancel(r->ctx);
        }
        CONC__HB_BEFORE(&r->phase);
        atomic_store(&r->phase, 2);
    }
    return NULL;
}

TEST(wg_cancel_races_last_done) {
    race2 r;
    atomic_init(&r.phase, 0);
    pthread_t t = spawn_thread(race2_worker, &r);
    long n = tap_iters(20000), bad = 0, cancelled = 0;
    for (long i = 0; i < n; i++) {
        r.wg = conc_wg_new();
        r.ctx = conc_ctx_with_cancel(NULL);
        ASSERT(r.wg != NULL && r.ctx != NULL);
        conc_wg_add(r.wg, 1);
        CONC__HB_BEFORE(&r.phase);
        atomic_store(&r.phase, 1);
        int rc = conc_wg_wait(r.wg, r.ctx);
        if (rc == CONC_CANCELED) cancelled++;
        else if (rc != 0) bad++;
        if (conc_wg_wait(r.wg, NULL) != 0) bad++;
        while (atomic_load(&r.phase) != 2) sched_yield();
        CONC__HB_AFTER(&r.phase);
        if (queued_waiters(r.wg) != 0 || waiters_bit(r.wg)) bad++;
        if (conc_wg_free(r.wg) != 0) bad++;
        conc_ctx_release(r.ctx);
    }
    atomic_store(&r.phase, 3);
    pthread_join(t, NULL);
    printf("# %ld rounds, %ld waits cancelled\n", n, cancelled);
    EXPECT_EQ(bad, 0);
}

/* ---- counter limit under racing adds ---- */

/* Two adds that would each take a counter of CONC__WG_MAX past the limit, at once. Each
   must be refused and leave the counter as it was. (A fetch_add that overshoots and is
   undone afterwards needs room for as many maximal counters as there are racing adders
   plus one: with two, the word wraps and both undos are then refused as negative.) */
typedef struct overflow_race {
    conc_wg_t *wg;
    _Atomic long go, done;
    _Atomic int refused;
} overflow_race;

static void *overflow_adder(void *p) {
    overflow_race *r = (overflow_race *)p;
    for (long k = 1;; k++) {
        long g;
        for (int spins = 0; (g = atomic_load(&r->go)) >= 0 && g < k; spins++)
            if (spins > 100000) sched_yield();
        if (g < 0) return NULL;
        if (conc_wg_add(r->wg, (int64_t)CONC__WG_MAX) == CONC_INVALID) atomic_fetch_add(&r->refused, 1);
        atomic_store(&r->done, k);
    }
}

TEST(wg_racing_adds_past_the_limit) {
    overflow_race r;
    r.wg = conc_wg_new();
    ASSERT(r.wg != NULL);
    atomic_init(&r.go, 0);
    atomic_init(&r.done, 0);
    atomic_init(&r.refused, 0);
    pthread_t t = spawn_thread(overflow_adder, &r);
    long n = tap_iters(20000), bad = 0;
    ASSERT_EQ(conc_wg_add(r.wg, (int64_t)CONC__WG_MAX), 0);
    for (long k = 1; k <= n && bad == 0; k++) {
        atomic_store(&r.go, k);
        if (conc_wg_add(r.wg, (int64_t)CONC__WG_MAX) == CONC_INVALID) atomic_fetch_add(&r.refused, 1);
        while (atomic_load(&r.done) < k) sched_yield();
        if (conc_wg_count(r.wg) != (int64_t)CONC__WG_MAX) {
            printf("# iteration %ld: counter %lld, want %lld\n", k, (long long)conc_wg_count(r.wg),
                   (long long)CONC__WG_MAX);
            bad++;
        }
    }
    atomic_store(&r.go, -1);
    pthread_join(t, NULL);
    EXPECT_EQ(bad, 0);
    if (bad == 0) EXPECT_EQ(atomic_load(&r.refused), 2 * n);
    /* leave the counter at 0 so free succeeds even when it went wrong */
    conc_wg_add(r.wg, -conc_wg_count(r.wg));
    EXPECT_EQ(conc_wg_free(r.wg), 0);
}

int main(void) {
    RUN(wg_basics);
    RUN(wg_negative_counter_is_refused);
    RUN(wg_wait_woken_by_done);
    RUN(wg_wait_cancelled);
    RUN(wg_wait_deadline);
    RUN(wg_many_waiters_all_woken);
    RUN(wg_adddone_storm);
    RUN(wg_wait_races_last_done);
    RUN(wg_cancel_races_last_done);
    RUN(wg_racing_adds_past_the_limit);
    return tap_done();
}
