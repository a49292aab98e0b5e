/* test_errgroup.c - error groups (>>group). */
#define CONC_IMPLEMENTATION
#include "conc.h"
#include "tap.h"
#include "test_util.h"

#include <stdatomic.h>

static int task_ok(void *arg, conc_ctx_t *ctx) {
    (void)ctx;
    if (arg) atomic_fetch_add((_Atomic int *)arg, 1);
    return 0;
}

static int task_ret(void *arg, conc_ctx_t *ctx) {
    (void)ctx;
    return (int)(intptr_t)arg;
}

/* Waits for the group's context to end; returns what it saw. */
static int task_wait_ctx(void *arg, conc_ctx_t *ctx) {
    if (arg) atomic_fetch_add((_Atomic int *)arg, 1);
    return conc_ctx_wait(ctx);
}

TEST(all_ok) {
    conc_group_t *g = conc_group_new(NULL);
    ASSERT(g != NULL);
    _Atomic int n = 0;
    for (int i = 0; i < 100; i++) ASSERT_EQ(conc_group_go(g, task_ok, (void *)&n, NULL), 0);
    EXPECT_EQ(conc_group_wait(g, NULL), 0);
    EXPECT_EQ(atomic_load(&n), 100);
    EXPECT_EQ(conc_group_try_wait(g), 0);
    EXPECT_EQ(conc_group_errors(g, NULL, 0), 0);
    conc_group_error none[2];
    EXPECT_EQ(conc_group_errors(g, none, 2), 0); /* no error yet: nothing copied (UBSan) */
    /* as errgroup.WithContext: Wait cancels the group's context */
    EXPECT_EQ(conc_ctx_err(conc_group_ctx(g)), CONC_CANCELED);
    EXPECT_EQ(conc_group_go(g, NULL, NULL, NULL), CONC_INVALID);
    EXPECT_EQ(conc_group_go(NULL, task_ok, NULL, NULL), CONC_INVALID);
    conc_group_free(g);
    conc_group_free(NULL);
}

TEST(first_error_cancels_and_is_never_replaced) {
    conc_ctx_t *parent = conc_ctx_with_cancel(NULL);
    conc_group_t *g = conc_group_new(parent);
    ASSERT(g != NULL);
    _Atomic int waiting = 0;
    for (int i = 0; i < 4; i++) ASSERT_EQ(conc_group_go(g, task_wait_ctx, (void *)&waiting, NULL), 0);
    while (atomic_load(&waiting) < 4) nap();
    EXPECT_EQ(conc_group_try_wait(g), CONC_WOULD_BLOCK);
    ASSERT_EQ(conc_group_go(g, task_ret, (void *)42, NULL), 0);
    EXPECT_EQ(conc_group_wait(g, NULL), 42);
    EXPECT_EQ(conc_ctx_cause(conc_group_ctx(g)), 42);
    EXPECT_EQ(conc_ctx_err(parent), 0); /* a child never touches its parent */
    /* the waiting tasks returned CONC_CANCELED: later errors, listed, not first */
    conc_group_error errs[8];
    size_t ne = conc_group_errors(g, errs, 8);
    EXPECT_EQ(ne, 5);
    EXPECT_EQ(errs[0].err, 42);
    EXPECT(errs[0].arg == (void *)42);
    for (size_t i = 1; i < ne && i < 8; i++) EXPECT_EQ(errs[i].err, CONC_CANCELED);
    /* and later errors, after wait, do not replace it either */
    ASSERT_EQ(conc_group_go(g, task_ret, (void *)43, NULL), 0);
    EXPECT_EQ(conc_group_wait(g, NULL), 42);
    EXPECT_EQ(conc_group_errors(g, NULL, 0), 6);
    conc_group_stats st;
    conc_group_stats_get(g, &st);
    EXPECT_EQ(st.started, 6);
    EXPECT_EQ(st.finished, 6);
    EXPECT_EQ(st.failed, 6);
    conc_group_free(g);
    conc_ctx_release(parent);
}

TEST(parent_cancel_reaches_tasks) {
    conc_ctx_t *parent = conc_ctx_with_cancel(NULL);
    conc_group_t *g = conc_group_new(parent);
    ASSERT(g != NULL);
    _Atomic int waiting = 0;
    for (int i = 0; i < 3; i++) ASSERT_EQ(conc_group_go(g, task_wait_ctx, (void *)&waiting, NULL), 0);
    conc_ctx_t *c = conc_ctx_with_timeout(NULL, 10 * CONC_MILLISECOND);
    EXPECT_EQ(conc_group_wait(g, c), CONC_DEADLINE_EXCEEDED); /* tasks still run */
    conc_ctx_release(c);
    conc_ctx_cancel_cause(parent, 77);
    EXPECT_EQ(conc_group_wait(g, NULL), CONC_CANCELED);
    EXPECT_EQ(conc_ctx_cause(conc_group_ctx(g)), 77);
    conc_group_free(g);
    conc_ctx_release(parent);
}

typedef struct {
    conc_chan_t *gate;
    _Atomic int started, running, max_running;
} lim_arg;

static int task_gated(void *arg, conc_ctx_t *ctx) {
    lim_arg *l = (lim_arg *)arg;
    int now = atomic_fetch_add(&l->running, 1) + 1;
    int m = atomic_load(&l->max_running);
    while (now > m && !atomic_compare_exchange_weak(&l->max_running, &m, now)) {
    }
    atomic_fetch_add(&l->started, 1);
    conc_case cs[2] = {CONC_RECV(l->gate, NULL), CONC_DONE(ctx)};
    (void)conc_select(cs, 2, NULL);
    atomic_fetch_sub(&l->running, 1);
    return 0;
}

typedef struct {
    conc_group_t *g;
    lim_arg *l;
    int rc;
} goer_arg;

static void *goer(void *a) {
    goer_arg *ga = (goer_arg *)a;
    ga->rc = conc_group_go(ga->g, task_gated, ga->l, NULL);
    return NULL;
}

TEST(set_limit_blocks_go_and_try_go) {
    conc_group_t *g = conc_group_new(NULL);
    ASSERT(g != NULL);
    lim_arg l = {conc_chan_new(0, 0), 0, 0, 0};
    ASSERT_EQ(conc_group_set_limit(g, 2), 0);
    ASSERT_EQ(conc_group_go(g, task_gated, &l, NULL), 0);
    ASSERT_EQ(conc_group_go(g, task_gated, &l, NULL), 0);
    EXPECT_EQ(conc_group_try_go(g, task_gated, &l), CONC_WOULD_BLOCK);
    EXPECT_EQ(conc_group_set_limit(g, 5), CONC_BUSY); /* Go panics here */
    conc_ctx_t *c = conc_ctx_with_timeout(NULL, 10 * CONC_MILLISECOND);
    EXPECT_EQ(conc_group_go(g, task_gated, &l, c), CONC_DEADLINE_EXCEEDED);
    conc_ctx_release(c);
    goer_arg ga = {g, &l, 99};
    pthread_t t;
    spawn(&t, goer, &ga);
    for (;;) { /* until the goer is blocked */
        conc_group_stats st;
        conc_group_stats_get(g, &st);
        if (st.blocked >= 2) break;
        nap();
    }
    EXPECT_EQ(ga.rc, 99);
    ASSERT_EQ(conc_chan_send(l.gate, NULL, NULL), 0); /* one ends: the goer's task starts */
    pthread_join(t, NULL);
    EXPECT_EQ(ga.rc, 0);
    conc_chan_close(l.gate);
    EXPECT_EQ(conc_group_wait(g, NULL), 0);
    EXPECT_EQ(atomic_load(&l.started), 3);
    EXPECT_EQ(atomic_load(&l.max_running), 2);
    conc_group_stats st;
    conc_group_stats_get(g, &st);
    EXPECT(st.threads <= 2);
    EXPECT(st.blocked_ns > 0); /* the wait began after the ctx was made: less than its 10 ms */
    /* limit 0: nothing can be added (Go's SetLimit(0)) */
    ASSERT_EQ(conc_group_set_limit(g, 0), 0);
    EXPECT_EQ(conc_group_try_go(g, task_ok, NULL), CONC_WOULD_BLOCK);
    ASSERT_EQ(conc_group_set_limit(g, -1), 0);
    EXPECT_EQ(conc_group_try_go(g, task_ok, NULL), 0);
    EXPECT_EQ(conc_group_wait(g, NULL), 0);
    conc_group_free(g);
    conc_chan_free(l.gate);
}

/* As task_gated, deaf to the group's context (a wait has cancelled it). */
static int task_gated_only(void *arg, conc_ctx_t *ctx) {
    lim_arg *l = (lim_arg *)arg;
    (void)ctx;
    atomic_fetch_add(&l->started, 1);
    conc_chan_recv(l->gate, NULL, NULL);
    return 0;
}

/* With `limit` gated tasks running, a try_go is refused; they are released after. */
static bool try_go_fails_at_limit(conc_group_t *g, int limit) {
    lim_arg l = {conc_chan_new(0, 0), 0, 0, 0};
    bool ok = true;
    for (int i = 0; i < limit; i++) ok = ok && conc_group_go(g, task_gated_only, &l, NULL) == 0;
    while (ok && atomic_load(&l.started) < limit) nap();
    ok = ok && conc_group_try_go(g, task_gated, &l) == CONC_WOULD_BLOCK;
    conc_chan_close(l.gate);
    ok = ok && conc_group_wait(g, NULL) == 0;
    conc_chan_free(l.gate);
    return ok;
}

/* A go racing a worker on its way back to wait (the lock-free hand-off): several
   submitters, a limit of 2, tasks that finish at random moments, and some gos whose
   context is cancelled meanwhile. Every go returns 0 exactly when its task ran, once; a
   go that blocked while the last worker went to wait would hang here. */
typedef struct {
    conc_group_t *g;
    int n;
    uint64_t seed;
    _Atomic int *ran; /* n slots */
    int *rc;          /* n results */
} racer_arg;

static int task_mark(void *arg, conc_ctx_t *ctx) {
    (void)ctx;
    atomic_fetch_add((_Atomic int *)arg, 1);
    return 0;
}

static void *go_racer(void *p) {
    racer_arg *a = (racer_arg *)p;
    for (int i = 0; i < a->n; i++) {
        conc_ctx_t *c = NULL;
        if (rnd(&a->seed) % 8 == 0) {
            c = conc_ctx_with_cancel(NULL);
            if (rnd(&a->seed) % 2) conc_ctx_cancel(c); /* the go may still find a free worker */
        }
        a->rc[i] = conc_group_go(a->g, task_mark, (void *)&a->ran[i], c);
        conc_ctx_release(c);
        if (rnd(&a->seed) % 4 == 0) jitter(&a->seed);
    }
    return NULL;
}

TEST(stress_go_races_worker_going_idle) {
    enum { NS = 4 };
    int n = (int)tap_iters(3000);
    conc_group_t *g = conc_group_new(NULL);
    ASSERT(g != NULL);
    ASSERT_EQ(conc_group_set_limit(g, 2), 0);
    racer_arg a[NS];
    pthread_t t[NS];
    for (int k = 0; k < NS; k++) {
        a[k] = (racer_arg){g, n, (uint64_t)k * 7919 + 1, calloc((size_t)n, sizeof(_Atomic int)), calloc((size_t)n, sizeof(int))};
        ASSERT(a[k].ran && a[k].rc);
        spawn(&t[k], go_racer, &a[k]);
    }
    for (int k = 0; k < NS; k++) pthread_join(t[k], NULL);
    EXPECT_EQ(conc_group_wait(g, NULL), 0);
    long accepted = 0;
    for (int k = 0; k < NS; k++) {
        for (int i = 0; i < n; i++) {
            int ran = atomic_load(&a[k].ran[i]);
            if (a[k].rc[i] == 0) {
                accepted++;
                if (ran != 1) {
                    EXPECT_EQ(ran, 1);
                    break;
                }
            } else if (a[k].rc[i] != CONC_CANCELED || ran != 0) {
                EXPECT_EQ(a[k].rc[i], CONC_CANCELED);
                EXPECT_EQ(ran, 0);
                break;
            }
        }
        free(a[k].ran);
        free(a[k].rc);
    }
    conc_group_stats st;
    conc_group_stats_get(g, &st);
    EXPECT_EQ(st.started, (uint64_t)accepted);
    EXPECT_EQ(st.finished, (uint64_t)accepted);
    EXPECT_EQ(st.running, 0);
    EXPECT(st.threads_live <= 2);
    conc_group_free(g);
}

/* Counts the tasks running at once. */
static int task_count_running(void *arg, conc_ctx_t *ctx) {
    lim_arg *l = (lim_arg *)arg;
    (void)ctx;
    int now = atomic_fetch_add(&l->running, 1) + 1;
    int m = atomic_load(&l->max_running);
    while (now > m && !atomic_compare_exchange_weak(&l->max_running, &m, now)) {
    }
    atomic_fetch_add(&l->started, 1);
    if (now % 3 == 0) sched_yield();
    atomic_fetch_sub(&l->running, 1);
    return 0;
}

typedef struct {
    conc_group_t *g;
    lim_arg *l;
    int n;
} counter_arg;

static void *go_counters(void *p) {
    counter_arg *a = (counter_arg *)p;
    for (int i = 0; i < a->n; i++)
        if (conc_group_go(a->g, task_count_running, a->l, NULL) != 0) break;
    return NULL;
}

/* More threads than a limit set later: 12 tasks at once start 12 threads (more than the
   engine's lock-free places to wait), then a limit of 3 must still hold while all of
   them wait for work; raised again, they are all reused. */
TEST(limit_below_the_threads_still_bounds_running) {
    enum { WIDE = 12, NS = 3 };
    conc_group_t *g = conc_group_new(NULL);
    ASSERT(g != NULL);
    lim_arg l = {conc_chan_new(0, 0), 0, 0, 0};
    for (int i = 0; i < WIDE; i++) ASSERT_EQ(conc_group_go(g, task_gated, &l, NULL), 0);
    while (atomic_load(&l.started) < WIDE) nap();
    conc_chan_close(l.gate);
    ASSERT_EQ(conc_group_wait(g, NULL), 0);
    conc_group_stats st;
    conc_group_stats_get(g, &st);
    EXPECT_EQ(st.threads, WIDE);

    lim_arg c = {NULL, 0, 0, 0};
    ASSERT_EQ(conc_group_set_limit(g, 3), 0);
    counter_arg ca = {g, &c, (int)tap_iters(2000)};
    pthread_t t[NS];
    for (int k = 0; k < NS; k++) spawn(&t[k], go_counters, &ca);
    for (int k = 0; k < NS; k++) pthread_join(t[k], NULL);
    EXPECT_EQ(conc_group_wait(g, NULL), 0);
    EXPECT_EQ(atomic_load(&c.started), NS * ca.n);
    EXPECT(atomic_load(&c.max_running) <= 3);
    EXPECT(try_go_fails_at_limit(g, 3));

    ASSERT_EQ(conc_group_set_limit(g, -1), 0);
    lim_arg l2 = {conc_chan_new(0, 0), 0, 0, 0};
    for (int i = 0; i < WIDE; i++) ASSERT_EQ(conc_group_go(g, task_gated_only, &l2, NULL), 0);
    while (atomic_load(&l2.started) < WIDE) nap();
    conc_chan_close(l2.gate);
    ASSERT_EQ(conc_group_wait(g, NULL), 0);
    conc_group_stats_get(g, &st);
    EXPECT_EQ(st.finished, (uint64_t)(2 * WIDE + NS * ca.n + 3));
    conc_group_free(g);
    conc_chan_free(l.gate);
    conc_chan_free(l2.gate);
}

/* The registry's threads started since scope with this purpose; checks file:line. */
static int count_threads(uint64_t scope, const char *purpose, int line) {
    conc_thread_info info[64];
    size_t n = conc_threads_list(info, 64);
    int k = 0;
    for (size_t i = 0; i < n && i < 64; i++) {
        if (info[i].id <= scope || strcmp(info[i].purpose, purpose) != 0) continue;
        k++;
        EXPECT(strcmp(info[i].file, __FILE__) == 0);
        EXPECT_EQ(info[i].line, line);
    }
    return k;
}

/* White box: a worker of g waits for a task (in its box, or on the idle list). */
static bool group_worker_waiting(conc_group_t *g) {
    conc__spin_lock(&g->core.mu);
    bool w = g->core.idle.head != NULL;
    for (int i = 0; i < CONC__BOXES && !w; i++)
        w = g->core.box[i].owner && atomic_load(&g->core.box[i].s.fired) == CONC__UNFIRED;
    conc__spin_unlock(&g->core.mu);
    return w;
}

TEST(threads_are_reused) {
    uint64_t scope = conc_leak_begin();
    int line = __LINE__ + 1;
    conc_group_t *g = conc_group_new(NULL);
    ASSERT(g != NULL);
    ASSERT_EQ(conc_group_set_limit(g, 3), 0);
    _Atomic int n = 0;
    for (int i = 0; i < 3000; i++) ASSERT_EQ(conc_group_go(g, task_ok, (void *)&n, NULL), 0);
    EXPECT_EQ(conc_group_wait(g, NULL), 0);
    EXPECT_EQ(atomic_load(&n), 3000);
    conc_group_stats st;
    conc_group_stats_get(g, &st);
    EXPECT(st.threads >= 1 && st.threads <= 3);
    EXPECT_EQ(count_threads(scope, "errgroup worker", line), (int)st.threads);
    conc_group_free(g);
    EXPECT_EQ(conc_leak_check(scope, CONC_SECOND, NULL, NULL, 0, NULL), 0);
    /* without a limit, sequential go/wait rounds reuse the one waiting thread */
    g = conc_group_new(NULL);
    ASSERT(g != NULL);
    for (int i = 0; i < 200; i++) {
        ASSERT_EQ(conc_group_go(g, task_ok, (void *)&n, NULL), 0);
        while (conc_group_try_wait(g) == CONC_WOULD_BLOCK) sched_yield();
        /* the task is done, but its worker may not wait again yet (it counts the task
           done, then posts its box): a go in between starts a thread. Wait for it (white
           box), so that the check is about reuse, not about that window (which the race
           build holds open) */
        int64_t end = conc_now() + CONC_SECOND;
        while (!group_worker_waiting(g) && conc_now() < end) sched_yield();
    }
    conc_group_stats_get(g, &st);
    EXPECT(st.threads <= 3);
    conc_group_free(g);
    EXPECT_EQ(conc_leak_check(scope, CONC_SECOND, NULL, NULL, 0, NULL), 0);
}

TEST(no_thread_leaks_after_everything) {
    EXPECT_EQ(conc_leak_check(0, CONC_SECOND, NULL, NULL, 0, NULL), 0);
}

/* ---- stress: many threads calling go, errors racing, many short-lived groups ---- */

typedef struct {
    conc_group_t *g;
    int n, fail_at;
    uint64_t seed;
    _Atomic int *ran;
} gstress_arg;

static int task_maybe_fail(void *arg, conc_ctx_t *ctx) {
    intptr_t v = (intptr_t)arg;
    (void)ctx;
    if (v > 0) return (int)v;
    return 0;
}

static void *gstress(void *a) {
    gstress_arg *s = (gstress_arg *)a;
    for (int i = 0; i < s->n; i++) {
        jitter(&s->seed);
        intptr_t v = (i == s->fail_at) ? (intptr_t)(1000 + (int)(rnd(&s->seed) % 1000)) : 0;
        int rc;
        if (rnd(&s->seed) % 4 == 0) {
            while ((rc = conc_group_try_go(s->g, task_maybe_fail, (void *)v)) == CONC_WOULD_BLOCK) sched_yield();
        } else {
            rc = conc_group_go(s->g, task_maybe_fail, (void *)v, NULL);
        }
        if (rc != 0) {
            printf("# go: %s\n", conc_strerror(rc));
            abort();
        }
    }
    return NULL;
}

TEST(stress_many_groups_errors_and_limits) {
    long rounds = tap_iters(150);
    for (long r = 0; r < rounds; r++) {
        conc_group_t *g = conc_group_new(NULL);
        ASSERT(g != NULL);
        if (r % 3) ASSERT_EQ(conc_group_set_limit(g, 1 + r % 4), 0);
        enum { NG = 4 };
        gstress_arg a[NG];
        pthread_t t[NG];
        int per = (int)tap_iters(200) + 2;
        for (int k = 0; k < NG; k++) {
            a[k] = (gstress_arg){g, per, (r % 2 && k == 1) ? per / 2 : -1, (uint64_t)(r * 31 + k + 1), NULL};
            spawn(&t[k], gstress, &a[k]);
        }
        for (int k = 0; k < NG; k++) pthread_join(t[k], NULL);
        int rc = conc_group_wait(g, NULL);
        conc_group_stats st;
        conc_group_stats_get(g, &st);
        EXPECT_EQ(st.started, (uint64_t)(NG * per));
        EXPECT_EQ(st.finished, (uint64_t)(NG * per));
        if (r % 2) {
            EXPECT(rc >= 1000 && rc < 2000);
            EXPECT_EQ(conc_group_errors(g, NULL, 0), 1);
            EXPECT_EQ(conc_ctx_cause(conc_group_ctx(g)), rc);
        } else {
            EXPECT_EQ(rc, 0);
        }
        if (r % 3) EXPECT(st.threads <= (uint64_t)(1 + r % 4));
        conc_group_free(g);
        if (tap__cur_failed) return;
    }
}

/* Waits queued while tasks run: every wait without a context returns only once every task
   accepted before it has returned (each task counts itself as its last act), waits with a
   short deadline return CONC_DEADLINE_EXCEEDED or 0, and none is left behind. */
typedef struct {
    conc_group_t *g;
    _Atomic int *done;
    int want;   /* tasks accepted before the wait started */
    int64_t timeout;
    int rc, seen;
} drain_arg;

static int task_jitter_count(void *arg, conc_ctx_t *ctx) {
    (void)ctx;
    uint64_t seed = (uint64_t)(uintptr_t)arg;
    jitter(&seed);
    atomic_fetch_add((_Atomic int *)arg, 1);
    return 0;
}

static void *drain_waiter(void *p) {
    drain_arg *a = p;
    conc_ctx_t *c = a->timeout ? conc_ctx_with_timeout(NULL, a->timeout) : NULL;
    a->rc = conc_group_wait(a->g, c);
    a->seen = atomic_load(a->done);
    conc_ctx_release(c);
    return NULL;
}

TEST(stress_waits_wake_when_drained) {
    long rounds = tap_iters(200);
    for (long r = 0; r < rounds; r++) {
        conc_group_t *g = conc_group_new(NULL);
        ASSERT(g != NULL);
        if (r % 2) ASSERT_EQ(conc_group_set_limit(g, 2), 0);
        _Atomic int done = 0;
        int n = 6 + (int)(r % 5);
        for (int i = 0; i < n; i++) ASSERT_EQ(conc_group_go(g, task_jitter_count, (void *)&done, NULL), 0);
        enum { NW = 3 };
        drain_arg a[NW];
        pthread_t t[NW];
        for (int k = 0; k < NW; k++) {
            a[k] = (drain_arg){g, &done, n, k == 2 ? (int64_t)(r % 3) * 20000 : 0, -99, -1};
            spawn(&t[k], drain_waiter, &a[k]);
        }
        for (int k = 0; k < NW; k++) pthread_join(t[k], NULL);
        for (int k = 0; k < NW; k++) {
            if (a[k].timeout) {
                EXPECT(a[k].rc == 0 || a[k].rc == CONC_DEADLINE_EXCEEDED);
                if (a[k].rc == 0) EXPECT_EQ(a[k].seen, n);
            } else {
                EXPECT_EQ(a[k].rc, 0);
                EXPECT_EQ(a[k].seen, n);
            }
        }
        EXPECT_EQ(conc_group_try_wait(g), 0);
        conc_group_free(g);
        if (tap__cur_failed) return;
    }
}

/* Several tasks fail at about the same time: exactly one is first, wait returns it, the
   context's cause is it, and every error is listed. */
TEST(stress_racing_errors) {
    long rounds = tap_iters(300);
    for (long r = 0; r < rounds; r++) {
        conc_group_t *g = conc_group_new(NULL);
        ASSERT(g != NULL);
        for (intptr_t i = 1; i <= 6; i++) ASSERT_EQ(conc_group_go(g, task_ret, (void *)i, NULL), 0);
        int rc = conc_group_wait(g, NULL);
        conc_group_error e[6];
        ASSERT_EQ(conc_group_errors(g, e, 6), 6);
        EXPECT_EQ(e[0].err, rc);
        EXPECT_EQ(conc_ctx_cause(conc_group_ctx(g)), rc);
        int sum = 0;
        for (int i = 0; i < 6; i++) sum += e[i].err;
        EXPECT_EQ(sum, 21);
        conc_group_free(g);
        if (tap__cur_failed) return;
    }
}

/* A blocked go whose context ends as the limit frees up: 0 iff the task ran. */
typedef struct {
    conc_ctx_t *ctx;
    uint64_t seed;
} canceller_arg;

static void *canceller(void *a) {
    canceller_arg *c = (canceller_arg *)a;
    jitter(&c->seed);
    conc_ctx_cancel(c->ctx);
    return NULL;
}

TEST(stress_go_cancel_races_limit) {
    long rounds = tap_iters(1500);
    conc_group_t *g = conc_group_new(NULL);
    ASSERT(g != NULL);
    ASSERT_EQ(conc_group_set_limit(g, 1), 0);
    for (long r = 0; r < rounds; r++) {
        _Atomic int a = 0, b = 0;
        ASSERT_EQ(conc_group_go(g, task_ok, (void *)&a, NULL), 0);
        conc_ctx_t *c = conc_ctx_with_cancel(NULL);
        canceller_arg ca = {c, (uint64_t)r + 5};
        pthread_t t;
        spawn(&t, canceller, &ca);
        int rc = conc_group_go(g, task_ok, (void *)&b, c);
        pthread_join(t, NULL);
        conc_ctx_release(c);
        /* wait cancels the group's context; tasks do not care here */
        ASSERT_EQ(conc_group_wait(g, NULL), 0);
        EXPECT_EQ(atomic_load(&a), 1);
        if (rc == 0) EXPECT_EQ(atomic_load(&b), 1);
        else {
            EXPECT_EQ(rc, CONC_CANCELED);
            EXPECT_EQ(atomic_load(&b), 0);
        }
        if (tap__cur_failed) break;
    }
    conc_group_free(g);
}

/* A task hands a child task to a box (one of the first 8 workers to wait) and returns
   while a wait counts the tasks running. The parent waits in a high box, the child lands
   in a low one (the low ones' short tasks have just ended): a count that reads box by box
   (given - done of box 0, then of box 7) sees the child not yet given and the parent
   already done, and a wait returns 0 with the child still running. */
typedef struct {
    conc_group_t *g;
    _Atomic long xdone, child_done;
    long xwant;
} spawn_arg;
static spawn_arg spawn_a;

static int spawn_child(void *arg, conc_ctx_t *ctx) {
    (void)ctx;
    spawn_arg *s = (spawn_arg *)arg;
    for (volatile int i = 0; i < 3000; i++) {
    }
    atomic_fetch_add(&s->child_done, 1);
    return 0;
}
static int spawn_x(void *arg, conc_ctx_t *ctx) {
    (void)ctx;
    atomic_fetch_add(&((spawn_arg *)arg)->xdone, 1);
    return 0;
}
static int spawn_parent(void *arg, conc_ctx_t *ctx) {
    (void)ctx;
    spawn_arg *s = (spawn_arg *)arg;
    while (atomic_load(&s->xdone) < s->xwant) sched_yield();
    return conc_group_go(s->g, spawn_child, s, NULL);
}

TEST(stress_wait_counts_tasks_started_by_tasks) {
    long rounds = tap_iters(1500);
    spawn_arg *s = &spawn_a;
    s->g = conc_group_new(NULL);
    ASSERT(s->g != NULL);
    atomic_store(&s->xdone, 0);
    atomic_store(&s->child_done, 0);
    s->xwant = 0;
    for (long r = 1; r <= rounds; r++) {
        for (int i = 0; i < 6; i++) ASSERT_EQ(conc_group_go(s->g, spawn_x, s, NULL), 0);
        s->xwant += 6; /* read by the parent: the go below publishes it */
        ASSERT_EQ(conc_group_go(s->g, spawn_parent, s, NULL), 0);
        if (r % 4 != 0) { /* polling counts far more often than a wait does */
            while (conc_group_try_wait(s->g) == CONC_WOULD_BLOCK) {
            }
        } else {
            ASSERT_EQ(conc_group_wait(s->g, NULL), 0);
        }
        long d = atomic_load(&s->child_done);
        EXPECT_EQ(d, r); /* the child ran before the wait saw no task running */
        if (d != r) {
            while (atomic_load(&s->child_done) != r) sched_yield();
            break;
        }
    }
    conc_group_free(s->g);
}

int main(void) {
    RUN(all_ok);
    RUN(first_error_cancels_and_is_never_replaced);
    RUN(parent_cancel_reaches_tasks);
    RUN(set_limit_blocks_go_and_try_go);
    RUN(threads_are_reused);
    RUN(limit_below_the_threads_still_bounds_running);
    RUN(stress_go_races_worker_going_idle);
    RUN(stress_waits_wake_when_drained);
    RUN(stress_racing_errors);
    RUN(stress_go_cancel_races_limit);
    RUN(stress_many_groups_errors_and_limits);
    RUN(stress_wait_counts_tasks_started_by_tasks);
    RUN(no_thread_leaks_after_everything);
    return tap_done();
}
