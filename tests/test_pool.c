/* test_pool.c - worker pools and futures (>>pool). */
#define CONC_IMPLEMENTATION
#include "conc.h"
#include "tap.h"
#include "test_util.h"

#include <stdatomic.h>

/* ---- jobs ---- */

static _Atomic long ran_total;

static int job_count(void *arg, conc_ctx_t *ctx) {
    (void)ctx;
    if (arg) atomic_fetch_add((_Atomic int *)arg, 1);
    atomic_fetch_add(&ran_total, 1);
    return 0;
}

static int job_ret(void *arg, conc_ctx_t *ctx) {
    (void)ctx;
    return (int)(intptr_t)arg;
}

/* Blocks until the gate channel is closed (or the pool's context ends). */
typedef struct {
    conc_chan_t *gate;
    _Atomic int started, finished;
} gate_arg;

static int job_gate(void *arg, conc_ctx_t *ctx) {
    gate_arg *g = (gate_arg *)arg;
    atomic_fetch_add(&g->started, 1);
    conc_case cs[2] = {CONC_RECV(g->gate, NULL), CONC_DONE(ctx)};
    int rc = conc_select(cs, 2, NULL);
    atomic_fetch_add(&g->finished, 1);
    return rc == 1 ? conc_ctx_err(ctx) : 7;
}

/* Blocks until the gate channel is closed, whatever its context says. */
static int job_gate_only(void *arg, conc_ctx_t *ctx) {
    gate_arg *g = (gate_arg *)arg;
    atomic_fetch_add(&g->started, 1);
    (void)conc_chan_recv(g->gate, NULL, NULL);
    atomic_fetch_add(&g->finished, 1);
    return conc_ctx_err(ctx);
}

static bool wait_started(gate_arg *g, int n) {
    int64_t end = conc_now() + 10 * CONC_SECOND;
    while (atomic_load(&g->started) < n) {
        if (conc_now() > end) return false;
        nap();
    }
    return true;
}

static bool wait_stat(conc_pool_t *p, uint64_t blocked, size_t queued) {
    int64_t end = conc_now() + 10 * CONC_SECOND;
    for (;;) {
        conc_pool_stats s;
        conc_pool_stats_get(p, &s);
        if (s.blocked >= blocked && s.queued >= queued) return true;
        if (conc_now() > end) return false;
        nap();
    }
}

/* ---- basic semantics ---- */

TEST(new_submit_shutdown_free) {
    EXPECT(conc_pool_new(0, 4, NULL) == NULL);
    conc_pool_t *p = conc_pool_new(3, 8, NULL);
    ASSERT(p != NULL);
    _Atomic int n = 0;
    for (int i = 0; i < 1000; i++) ASSERT_EQ(conc_pool_submit(p, job_count, (void *)&n, NULL), 0);
    EXPECT_EQ(conc_pool_submit(p, NULL, NULL, NULL), CONC_INVALID);
    EXPECT_EQ(conc_pool_submit(NULL, job_count, NULL, NULL), CONC_INVALID);
    EXPECT_EQ(conc_pool_shutdown(p, NULL, NULL, NULL), 0);
    EXPECT_EQ(atomic_load(&n), 1000);
    /* after shutdown: refused, counted as rejected */
    EXPECT_EQ(conc_pool_submit(p, job_count, (void *)&n, NULL), CONC_SHUTDOWN);
    EXPECT_EQ(conc_pool_try_submit(p, job_count, (void *)&n), CONC_SHUTDOWN);
    EXPECT_EQ(conc_pool_shutdown(p, NULL, NULL, NULL), 0); /* idempotent */
    conc_pool_stats s;
    conc_pool_stats_get(p, &s);
    EXPECT_EQ(s.submitted, 1000);
    EXPECT_EQ(s.completed, 1000);
    EXPECT_EQ(s.rejected, 2);
    EXPECT_EQ(s.unrun, 0);
    EXPECT_EQ(s.queued, 0);
    EXPECT_EQ(s.running, 0);
    EXPECT(s.high_water <= 8);
    conc_pool_free(p);
    conc_pool_free(NULL);
    /* free without shutdown drains everything */
    p = conc_pool_new(2, 0, NULL);
    ASSERT(p != NULL);
    atomic_store(&n, 0);
    for (int i = 0; i < 100; i++) ASSERT_EQ(conc_pool_submit(p, job_count, (void *)&n, NULL), 0);
    conc_pool_free(p);
    EXPECT_EQ(atomic_load(&n), 100);
}

TEST(try_submit_fails_fast_when_saturated) {
    gate_arg g = {conc_chan_new(0, 0), 0, 0};
    conc_pool_t *p = conc_pool_new(2, 1, NULL);
    ASSERT(p && g.gate);
    ASSERT_EQ(conc_pool_submit(p, job_gate, &g, NULL), 0);
    ASSERT_EQ(conc_pool_submit(p, job_gate, &g, NULL), 0);
    ASSERT(wait_started(&g, 2));
    EXPECT_EQ(conc_pool_try_submit(p, job_gate, &g), 0); /* the one slot */
    EXPECT_EQ(conc_pool_try_submit(p, job_gate, &g), CONC_WOULD_BLOCK);
    conc_future_t *f = (conc_future_t *)1;
    EXPECT_EQ(conc_pool_try_submit_future(p, job_gate, &g, &f), CONC_WOULD_BLOCK);
    EXPECT(f == NULL);
    conc_pool_stats s;
    conc_pool_stats_get(p, &s);
    EXPECT_EQ(s.rejected, 2);
    EXPECT_EQ(s.queued, 1);
    EXPECT_EQ(s.running, 2);
    EXPECT_EQ(s.high_water, 1);
    conc_chan_close(g.gate);
    EXPECT_EQ(conc_pool_shutdown(p, NULL, NULL, NULL), 0);
    EXPECT_EQ(atomic_load(&g.finished), 3);
    conc_pool_free(p);
    conc_chan_free(g.gate);
}

TEST(unbuffered_is_hand_off) {
    /* cap 0: only as many jobs are accepted as there are waiting workers */
    gate_arg g = {conc_chan_new(0, 0), 0, 0};
    conc_pool_t *p = conc_pool_new(2, 0, NULL);
    ASSERT(p && g.gate);
    /* workers may still be starting: a blocking submit waits for them */
    ASSERT_EQ(conc_pool_submit(p, job_gate, &g, NULL), 0);
    ASSERT_EQ(conc_pool_submit(p, job_gate, &g, NULL), 0);
    ASSERT(wait_started(&g, 2));
    EXPECT_EQ(conc_pool_try_submit(p, job_gate, &g), CONC_WOULD_BLOCK);
    conc_ctx_t *c = conc_ctx_with_timeout(NULL, 20 * CONC_MILLISECOND);
    EXPECT_EQ(conc_pool_submit(p, job_gate, &g, c), CONC_DEADLINE_EXCEEDED);
    conc_ctx_release(c);
    conc_pool_stats s;
    conc_pool_stats_get(p, &s);
    EXPECT_EQ(s.canceled, 1);
    EXPECT_EQ(s.high_water, 0);
    EXPECT(s.blocked >= 1);
    EXPECT(s.blocked_ns > 0);
    conc_chan_close(g.gate);
    EXPECT_EQ(conc_pool_shutdown(p, NULL, NULL, NULL), 0);
    EXPECT_EQ(atomic_load(&g.started), 2);
    conc_pool_free(p);
    conc_chan_free(g.gate);
}

typedef struct {
    conc_pool_t *p;
    gate_arg *g;
    int rc;
} submitter_arg;

static void *submitter(void *a) {
    submitter_arg *s = (submitter_arg *)a;
    s->rc = conc_pool_submit(s->p, job_gate, s->g, NULL);
    return NULL;
}

TEST(blocked_submit_is_granted_in_order_and_refused_by_shutdown) {
    gate_arg g = {conc_chan_new(0, 0), 0, 0};
    conc_pool_t *p = conc_pool_new(1, 1, NULL);
    ASSERT(p && g.gate);
    ASSERT_EQ(conc_pool_submit(p, job_gate, &g, NULL), 0);
    ASSERT(wait_started(&g, 1));
    ASSERT_EQ(conc_pool_submit(p, job_gate, &g, NULL), 0); /* queued */
    submitter_arg sa = {p, &g, 99}, sb = {p, &g, 99};
    pthread_t ta, tb;
    spawn(&ta, submitter, &sa);
    ASSERT(wait_stat(p, 1, 1));
    spawn(&tb, submitter, &sb);
    ASSERT(wait_stat(p, 2, 1));
    /* one job finishes: the first blocked submitter's job takes the freed slot */
    ASSERT_EQ(conc_chan_send(g.gate, NULL, NULL), 0);
    pthread_join(ta, NULL);
    EXPECT_EQ(sa.rc, 0);
    /* shutdown refuses the other blocked submit at once; its deadline then cancels the
       pool's context, which ends the running gate job */
    conc_ctx_t *c = conc_ctx_with_timeout(NULL, 5 * CONC_MILLISECOND);
    EXPECT_EQ(conc_pool_shutdown(p, NULL, NULL, c), CONC_DEADLINE_EXCEEDED);
    conc_ctx_release(c);
    pthread_join(tb, NULL);
    EXPECT_EQ(sb.rc, CONC_SHUTDOWN);
    /* the queued job was either reported unrun or taken by the worker first (whoever
       pops it owns it): each of the 3 accepted jobs is counted exactly once */
    EXPECT_EQ(conc_pool_shutdown(p, NULL, NULL, NULL), 0);
    conc_pool_stats s;
    conc_pool_stats_get(p, &s);
    EXPECT_EQ(s.submitted, 3);
    EXPECT_EQ(s.completed + s.unrun, 3);
    EXPECT_EQ(s.rejected, 1);
    conc_pool_free(p);
    conc_chan_free(g.gate);
}

/* ---- shutdown with a context that ends: every job exactly once ---- */

typedef struct {
    _Atomic int ran, unrun;
    _Atomic int *seen; /* per job id: 1 ran, 2 reported */
    int n;
} account;

typedef struct {
    account *acc;
    int id;
    conc_chan_t *gate;
} acct_job;

static int job_acct(void *arg, conc_ctx_t *ctx) {
    acct_job *j = (acct_job *)arg;
    if (j->gate) {
        conc_case cs[2] = {CONC_RECV(j->gate, NULL), CONC_DONE(ctx)};
        (void)conc_select(cs, 2, NULL);
    }
    atomic_fetch_add(&j->acc->seen[j->id], 1);
    atomic_fetch_add(&j->acc->ran, 1);
    return 0;
}

static void on_unrun(conc_task_fn fn, void *arg, void *unrun_arg) {
    acct_job *j = (acct_job *)arg;
    account *a = (account *)unrun_arg;
    if (fn != job_acct || a != j->acc) return;
    atomic_fetch_add(&j->acc->seen[j->id], 2);
    atomic_fetch_add(&a->unrun, 1);
}

typedef struct {
    conc_pool_t *p;
    acct_job *jobs;
    int from, to;
    int *rcs;
    conc_ctx_t *ctx;
    uint64_t seed;
} acct_submitter;

static void *acct_submit(void *a) {
    acct_submitter *s = (acct_submitter *)a;
    for (int i = s->from; i < s->to; i++) {
        jitter(&s->seed);
        s->rcs[i] = conc_pool_submit(s->p, job_acct, &s->jobs[i], s->ctx);
    }
    return NULL;
}

TEST(stress_shutdown_while_saturated_accounts_every_job_once) {
    long rounds = tap_iters(200);
    enum { NJ = 64, NS = 4 };
    for (long r = 0; r < rounds; r++) {
        account acc;
        _Atomic int seen[NJ];
        int rcs[NJ];
        acct_job jobs[NJ];
        memset(&acc, 0, sizeof acc);
        for (int i = 0; i < NJ; i++) atomic_init(&seen[i], 0);
        acc.seen = seen;
        acc.n = NJ;
        conc_chan_t *gate = conc_chan_new(0, 0);
        size_t cap = (size_t)(r % 3 == 0 ? 0 : r % 3 == 1 ? 2 : 8);
        conc_pool_t *p = conc_pool_new(1 + (size_t)(r % 3), cap, NULL);
        ASSERT(p && gate);
        /* some submits have a context that may end while they are blocked */
        conc_ctx_t *sctx = conc_ctx_with_timeout(NULL, (r % 4) * 100 * CONC_MICROSECOND + 1);
        for (int i = 0; i < NJ; i++) jobs[i] = (acct_job){&acc, i, (i % 5 == 0) ? gate : NULL};
        acct_submitter ss[NS];
        pthread_t th[NS];
        for (int k = 0; k < NS; k++) {
            ss[k] = (acct_submitter){p, jobs, k * NJ / NS, (k + 1) * NJ / NS, rcs, k % 2 ? sctx : NULL,
                                     (uint64_t)(r * 7 + k + 1)};
            spawn(&th[k], acct_submit, &ss[k]);
        }
        uint64_t seed = (uint64_t)r + 99;
        for (int k = 0; k < (int)(rnd(&seed) % 50); k++) sched_yield();
        /* shut down with a context that ends soon (or at once) */
        conc_ctx_t *dctx = conc_ctx_with_timeout(NULL, (int64_t)(rnd(&seed) % 300) * CONC_MICROSECOND);
        int src = conc_pool_shutdown(p, on_unrun, &acc, dctx);
        EXPECT(src == 0 || src == CONC_DEADLINE_EXCEEDED);
        conc_chan_close(gate);
        for (int k = 0; k < NS; k++) pthread_join(th[k], NULL);
        conc_pool_free(p); /* joins: every job that ran has finished */
        int accepted = 0;
        for (int i = 0; i < NJ; i++) {
            int sv = atomic_load(&seen[i]);
            if (rcs[i] == 0) {
                accepted++;
                if (sv != 1 && sv != 2) {
                    EXPECT(sv == 1 || sv == 2);
                    printf("#   round %ld job %d rc %d seen %d\n", r, i, rcs[i], sv);
                }
            } else {
                EXPECT(rcs[i] == CONC_SHUTDOWN || rcs[i] == CONC_DEADLINE_EXCEEDED);
                EXPECT_EQ(sv, 0);
            }
        }
        EXPECT_EQ(atomic_load(&acc.ran) + atomic_load(&acc.unrun), accepted);
        conc_ctx_release(sctx);
        conc_ctx_release(dctx);
        conc_chan_free(gate);
        if (tap__cur_failed) return;
    }
}

/* A blocked submit whose context is cancelled just as a worker frees up: returns 0 iff
   the job ran (exactly once). */
typedef struct {
    conc_ctx_t *ctx;
    uint64_t seed;
} canceller_arg;

static void *canceller(void *a) {
    canceller_arg *c = (canceller_arg *)a;
    jitter(&c->seed);
    jitter(&c->seed);
    conc_ctx_cancel(c->ctx);
    return NULL;
}

TEST(stress_cancel_races_worker_taking_the_job) {
    long rounds = tap_iters(2000);
    conc_pool_t *p = conc_pool_new(1, 0, NULL);
    ASSERT(p != NULL);
    long ok = 0, canc = 0;
    for (long r = 0; r < rounds; r++) {
        _Atomic int a = 0, b = 0;
        /* occupy the worker with a short job, then race a blocked submit's cancel
           against the worker coming back for more */
        ASSERT_EQ(conc_pool_submit(p, job_count, (void *)&a, NULL), 0);
        conc_ctx_t *c = conc_ctx_with_cancel(NULL);
        canceller_arg ca = {c, (uint64_t)r + 1};
        pthread_t t;
        spawn(&t, canceller, &ca);
        int rc = conc_pool_submit(p, job_count, (void *)&b, c);
        pthread_join(t, NULL);
        /* a third job through the one worker orders us after b's run, if b ran */
        _Atomic int z = 0;
        conc_future_t *f;
        ASSERT_EQ(conc_pool_submit_future(p, job_count, (void *)&z, &f, NULL), 0);
        ASSERT_EQ(conc_future_wait(f, NULL, NULL), 0);
        conc_future_free(f);
        if (rc == 0) {
            ok++;
            EXPECT_EQ(atomic_load(&b), 1);
        } else {
            canc++;
            EXPECT_EQ(rc, CONC_CANCELED);
            EXPECT_EQ(atomic_load(&b), 0);
        }
        conc_ctx_release(c);
        if (tap__cur_failed) break;
    }
    printf("# accepted %ld, cancelled %ld\n", ok, canc);
    conc_pool_stats s;
    conc_pool_stats_get(p, &s);
    EXPECT_EQ(s.canceled, (uint64_t)canc);
    conc_pool_free(p);
}

/* ---- futures ---- */

TEST(future_wait_result_and_ctx) {
    conc_pool_t *p = conc_pool_new(2, 4, NULL);
    ASSERT(p != NULL);
    conc_future_t *f[10];
    for (int i = 0; i < 10; i++) ASSERT_EQ(conc_pool_submit_future(p, job_ret, (void *)(intptr_t)(i + 100), &f[i], NULL), 0);
    for (int i = 0; i < 10; i++) {
        int res = -1;
        EXPECT_EQ(conc_future_wait(f[i], &res, NULL), 0);
        EXPECT_EQ(res, i + 100);
        res = -1;
        EXPECT_EQ(conc_future_try_wait(f[i], &res), 0); /* again: the same answer */
        EXPECT_EQ(res, i + 100);
        EXPECT_EQ(conc_future_free(f[i]), 0);
    }
    EXPECT_EQ(conc_pool_submit_future(p, job_ret, NULL, NULL, NULL), CONC_INVALID);
    /* a wait whose context ends first; then the job finishes and the wait succeeds */
    gate_arg g = {conc_chan_new(0, 0), 0, 0};
    conc_future_t *fg;
    ASSERT_EQ(conc_pool_submit_future(p, job_gate, &g, &fg, NULL), 0);
    conc_ctx_t *c = conc_ctx_with_timeout(NULL, 10 * CONC_MILLISECOND);
    int res = -1;
    EXPECT_EQ(conc_future_wait(fg, &res, c), CONC_DEADLINE_EXCEEDED);
    EXPECT_EQ(conc_future_try_wait(fg, &res), CONC_WOULD_BLOCK);
    conc_ctx_release(c);
    conc_chan_close(g.gate);
    EXPECT_EQ(conc_future_wait(fg, &res, NULL), 0);
    EXPECT_EQ(res, 7);
    conc_future_free(fg);
    /* free before the job ran: the job still runs, nothing leaks */
    _Atomic int n = 0;
    ASSERT_EQ(conc_pool_submit_future(p, job_count, (void *)&n, &fg, NULL), 0);
    conc_future_free(fg);
    conc_pool_free(p);
    EXPECT_EQ(atomic_load(&n), 1);
    conc_chan_free(g.gate);
}

typedef struct {
    conc_future_t *f;
    int rc, res;
} fwaiter;

static void *future_waiter(void *a) {
    fwaiter *w = (fwaiter *)a;
    w->rc = conc_future_wait(w->f, &w->res, NULL);
    return NULL;
}

TEST(future_of_unrun_job_and_many_waiters) {
    gate_arg g = {conc_chan_new(0, 0), 0, 0};
    conc_pool_t *p = conc_pool_new(1, 4, NULL);
    ASSERT(p && g.gate);
    conc_future_t *running, *queued;
    /* the running job ignores the context: the queued one stays queued until shutdown
       takes it out */
    ASSERT_EQ(conc_pool_submit_future(p, job_gate_only, &g, &running, NULL), 0);
    ASSERT(wait_started(&g, 1));
    ASSERT_EQ(conc_pool_submit_future(p, job_ret, (void *)5, &queued, NULL), 0);
    fwaiter w[3] = {{queued, 9, 9}, {queued, 9, 9}, {running, 9, 9}};
    pthread_t t[3];
    for (int i = 0; i < 3; i++) spawn(&t[i], future_waiter, &w[i]);
    conc_ctx_t *c = conc_ctx_with_timeout(NULL, 5 * CONC_MILLISECOND);
    EXPECT_EQ(conc_pool_shutdown(p, NULL, NULL, c), CONC_DEADLINE_EXCEEDED);
    conc_ctx_release(c);
    EXPECT_EQ(conc_ctx_err(conc_pool_ctx(p)), CONC_CANCELED);
    for (int i = 0; i < 2; i++) pthread_join(t[i], NULL);
    EXPECT_EQ(w[0].rc, CONC_SHUTDOWN);
    EXPECT_EQ(w[1].rc, CONC_SHUTDOWN);
    int res = 9;
    EXPECT_EQ(conc_future_try_wait(queued, &res), CONC_SHUTDOWN);
    EXPECT_EQ(conc_future_try_wait(running, &res), CONC_WOULD_BLOCK); /* still running */
    conc_chan_close(g.gate);
    pthread_join(t[2], NULL);
    EXPECT_EQ(w[2].rc, 0);
    EXPECT_EQ(w[2].res, CONC_CANCELED); /* the job saw the pool's context cancelled */
    EXPECT_EQ(conc_pool_shutdown(p, NULL, NULL, NULL), 0); /* now waits for it */
    conc_pool_stats s;
    conc_pool_stats_get(p, &s);
    EXPECT_EQ(s.unrun, 1);
    EXPECT_EQ(s.completed, 1);
    conc_future_free(running);
    conc_future_free(queued);
    conc_pool_free(p);
    conc_chan_free(g.gate);
}

/* The handle freed while threads wait on the future, then the job completes: the waits
   keep the future alive and get the result (ASan/memcheck would see a use after free).
   Half the rounds give one waiter a context cancelled at about the moment the job ends. */
typedef struct {
    conc_future_t *f;
    conc_ctx_t *ctx;
    int rc, res;
    _Atomic int *queued;
} fwaiter_ctx;

static void *future_waiter_ctx(void *a) {
    fwaiter_ctx *w = (fwaiter_ctx *)a;
    atomic_fetch_add(w->queued, 1);
    w->rc = conc_future_wait(w->f, &w->res, w->ctx);
    return NULL;
}

static int queued_future_waiters(conc_future_t *f) { /* white box */
    int n = 0;
    pthread_mutex_lock(&f->mu);
    for (conc__waiter *x = f->waiters.head; x; x = x->next) n++;
    pthread_mutex_unlock(&f->mu);
    return n;
}

TEST(future_freed_while_waited) {
    conc_pool_t *p = conc_pool_new(1, 0, NULL);
    ASSERT(p != NULL);
    long rounds = tap_iters(400);
    int bad = 0;
    uint64_t seed = 77;
    for (long r = 0; r < rounds; r++) {
        gate_arg g = {conc_chan_new(0, 0), 0, 0};
        conc_future_t *f;
        if (conc_pool_submit_future(p, job_gate_only, &g, &f, NULL) != 0) {
            bad++;
            break;
        }
        _Atomic int queued = 0;
        conc_ctx_t *ctx = (r & 1) ? conc_ctx_with_cancel(NULL) : NULL;
        fwaiter_ctx w[2] = {{f, NULL, 9, 9, &queued}, {f, ctx, 9, 9, &queued}};
        pthread_t t[2];
        for (int i = 0; i < 2; i++) spawn(&t[i], future_waiter_ctx, &w[i]);
        while (queued_future_waiters(f) < 2) sched_yield();
        EXPECT_EQ(conc_future_free(f), 0); /* while both wait */
        if (ctx && rnd(&seed) % 2) conc_ctx_cancel(ctx);
        jitter(&seed);
        conc_chan_close(g.gate); /* the job returns 0 (its context is live) */
        if (ctx) conc_ctx_cancel(ctx);
        for (int i = 0; i < 2; i++) pthread_join(t[i], NULL);
        if (w[0].rc != 0 || w[0].res != 0) bad++;
        if (!((w[1].rc == 0 && w[1].res == 0) || (ctx && w[1].rc == CONC_CANCELED))) bad++;
        conc_ctx_release(ctx);
        conc_chan_free(g.gate);
    }
    EXPECT_EQ(bad, 0);
    conc_pool_free(p);
}

/* Two shutdowns at once: each returns 0 only once every worker has been joined. */
typedef struct {
    conc_pool_t *p;
    uint64_t scope;
    int rc, leaked;
} shut_arg;

static void *shutdown_and_check(void *a) {
    shut_arg *x = (shut_arg *)a;
    x->rc = conc_pool_shutdown(x->p, NULL, NULL, NULL);
    size_t n = 0;
    conc_leak_check(x->scope, 0, NULL, NULL, 0, &n); /* no grace: they must have ended */
    x->leaked = (int)n;
    return NULL;
}

TEST(concurrent_shutdowns_both_join) {
    long rounds = tap_iters(100);
    int bad = 0;
    for (long r = 0; r < rounds; r++) {
        uint64_t scope = conc_leak_begin();
        conc_pool_t *p = conc_pool_new(3, 4, NULL);
        ASSERT(p != NULL);
        for (int i = 0; i < 6; i++) conc_pool_submit(p, job_count, NULL, NULL);
        shut_arg a[2] = {{p, scope, 9, 9}, {p, scope, 9, 9}};
        pthread_t t[2];
        for (int i = 0; i < 2; i++) spawn(&t[i], shutdown_and_check, &a[i]);
        for (int i = 0; i < 2; i++) pthread_join(t[i], NULL);
        for (int i = 0; i < 2; i++)
            if (a[i].rc != 0 || a[i].leaked != 0) bad++;
        conc_pool_free(p);
    }
    EXPECT_EQ(bad, 0);
}

/* ---- contexts ---- */

static int job_ctx_probe(void *arg, conc_ctx_t *ctx) {
    *(conc_ctx_t **)arg = ctx;
    return conc_ctx_err(ctx);
}

TEST(jobs_get_the_pools_context) {
    conc_ctx_t *parent = conc_ctx_with_cancel(NULL);
    conc_pool_t *p = conc_pool_new(1, 0, parent);
    ASSERT(p != NULL);
    conc_ctx_t *seen = NULL;
    conc_future_t *f;
    int res = -1;
    ASSERT_EQ(conc_pool_submit_future(p, job_ctx_probe, &seen, &f, NULL), 0);
    EXPECT_EQ(conc_future_wait(f, &res, NULL), 0);
    EXPECT(seen == conc_pool_ctx(p));
    EXPECT_EQ(res, 0);
    conc_future_free(f);
    conc_ctx_cancel(parent);
    /* the pool still runs jobs; they see their context ended */
    ASSERT_EQ(conc_pool_submit_future(p, job_ctx_probe, &seen, &f, NULL), 0);
    EXPECT_EQ(conc_future_wait(f, &res, NULL), 0);
    EXPECT_EQ(res, CONC_CANCELED);
    conc_future_free(f);
    conc_pool_free(p);
    conc_ctx_release(parent);
}

/* ---- many short-lived pools, many threads ---- */

typedef struct {
    conc_pool_t *p;
    int n;
    _Atomic int *count;
    uint64_t seed;
} mixer_arg;

static void *mixer(void *a) {
    mixer_arg *m = (mixer_arg *)a;
    for (int i = 0; i < m->n; i++) {
        jitter(&m->seed);
        int rc;
        if (rnd(&m->seed) % 3 == 0) {
            while ((rc = conc_pool_try_submit(m->p, job_count, (void *)m->count)) == CONC_WOULD_BLOCK) sched_yield();
        } else {
            rc = conc_pool_submit(m->p, job_count, (void *)m->count, NULL);
        }
        if (rc != 0) {
            printf("# submit: %s\n", conc_strerror(rc));
            abort();
        }
    }
    return NULL;
}

TEST(stress_many_submitters_many_pools) {
    long rounds = tap_iters(100);
    long before = atomic_load(&ran_total);
    long expect = 0;
    for (long r = 0; r < rounds; r++) {
        _Atomic int count = 0;
        conc_pool_t *p = conc_pool_new(1 + (size_t)(r % 4), (size_t)(r % 5 == 0 ? 0 : r % 7), NULL);
        ASSERT(p != NULL);
        enum { NM = 5 };
        mixer_arg m[NM];
        pthread_t t[NM];
        int per = (int)tap_iters(300) + 1;
        for (int k = 0; k < NM; k++) {
            m[k] = (mixer_arg){p, per, &count, (uint64_t)(r * 13 + k + 1)};
            spawn(&t[k], mixer, &m[k]);
        }
        for (int k = 0; k < NM; k++) pthread_join(t[k], NULL);
        if (r % 2) EXPECT_EQ(conc_pool_shutdown(p, NULL, NULL, NULL), 0);
        conc_pool_stats s;
        conc_pool_free(p);
        (void)s;
        EXPECT_EQ(atomic_load(&count), NM * per);
        expect += NM * per;
        if (tap__cur_failed) return;
    }
    EXPECT_EQ(atomic_load(&ran_total) - before, expect);
}

/* Counts the registry's threads started since scope with this purpose; checks file:line. */
static int count_threads(uint64_t scope, const char *purpose, int line) {
    conc_thread_info info[64];
    size_t n = conc_threads_list(info, 64);
    int k = 0;
    for (size_t i = 0; i < n && i < 64; i++) {
        if (info[i].id <= scope || strcmp(info[i].purpose, purpose) != 0) continue;
        k++;
        EXPECT(strcmp(info[i].file, __FILE__) == 0);
        EXPECT_EQ(info[i].line, line);
        EXPECT(!info[i].service);
    }
    return k;
}

TEST(threads_are_registered_and_reused) {
    uint64_t scope = conc_leak_begin();
    int line = __LINE__ + 1;
    conc_pool_t *p = conc_pool_new(3, 0, NULL);
    ASSERT(p != NULL);
    for (int i = 0; i < 2000; i++) ASSERT_EQ(conc_pool_submit(p, job_count, NULL, NULL), 0);
    EXPECT_EQ(count_threads(scope, "pool worker", line), 3); /* 2000 jobs, 3 threads */
    EXPECT_EQ(conc_pool_shutdown(p, NULL, NULL, NULL), 0);
    EXPECT_EQ(count_threads(scope, "pool worker", line), 0); /* shutdown joined them */
    conc_pool_free(p);
    EXPECT_EQ(conc_leak_check(scope, CONC_SECOND, NULL, NULL, 0, NULL), 0);
}

TEST(no_thread_leaks_after_everything) {
    /* every pool above was freed: nothing of theirs runs */
    EXPECT_EQ(conc_leak_check(0, CONC_SECOND, NULL, NULL, 0, NULL), 0);
}

/* A job handed to a waiting worker counts as running from the hand-off, not from when the
   worker thread wakes (on a loaded machine that can be much later), for every capacity. */
static conc_chan_t *hold_gate;
static int job_hold(void *arg, conc_ctx_t *ctx) {
    (void)arg, (void)ctx;
    conc_chan_recv(hold_gate, NULL, NULL);
    return 0;
}

/* true once n receives by the pool's workers have blocked on its jobs channel (white box) */
static bool workers_parked(conc_pool_t *p, size_t n) {
    if (!p->jobs) { /* cap 0: the engine's workers wait in boxes */
        size_t posted = 0;
        for (int i = 0; i < CONC__BOXES; i++)
            posted += atomic_load(&p->core.box[i].s.fired) == CONC__UNFIRED;
        return posted >= n;
    }
    conc_chan_stats cs;
    conc_chan_stats_get(p->jobs, &cs);
    return cs.blocked_recvs >= n;
}

TEST(stats_count_a_handed_off_job_as_running) {
    size_t caps[] = {0, 1, 8};
    for (int k = 0; k < 3; k++) {
        hold_gate = conc_chan_new(0, 0);
        conc_pool_t *p = conc_pool_new(2, caps[k], NULL);
        ASSERT(p && hold_gate);
        int64_t end = conc_now() + 10 * CONC_SECOND;
        while (!workers_parked(p, 2) && conc_now() < end) nap();
        ASSERT_EQ(conc_pool_submit(p, job_hold, NULL, NULL), 0);
        conc_pool_stats s;
        conc_pool_stats_get(p, &s); /* the worker may not have run yet: it has the job */
        EXPECT_EQ(s.submitted, 1);
        EXPECT_EQ(s.queued + s.running, 1);
        EXPECT_EQ(s.running, 1);
        conc_chan_close(hold_gate);
        EXPECT_EQ(conc_pool_shutdown(p, NULL, NULL, NULL), 0);
        conc_pool_stats_get(p, &s);
        EXPECT_EQ(s.running, 0);
        EXPECT_EQ(s.submitted, s.completed + s.unrun);
        conc_pool_free(p);
        conc_chan_free(hold_gate);
    }
}

/* The running count never exceeds the workers, also polled while a stream of hand-offs
   to one worker comes and goes (lock-free, between the count's two scans: in the race
   build a yield sits there). */
typedef struct poll_arg {
    conc_pool_t *p;
    _Atomic int stop;
    size_t max_running;
} poll_arg;

static void *poll_stats(void *arg) {
    poll_arg *a = (poll_arg *)arg;
    while (!atomic_load(&a->stop)) {
        conc_pool_stats s;
        conc_pool_stats_get(a->p, &s);
        if (s.running > a->max_running) a->max_running = s.running;
        sched_yield(); /* the stats take the lock the submits need now and then */
    }
    return NULL;
}

TEST(stats_running_never_above_the_workers) {
    poll_arg a = {conc_pool_new(1, 0, NULL), 0, 0};
    ASSERT(a.p != NULL);
    pthread_t t = spawn_thread(poll_stats, &a);
    long n = tap_iters(20000);
    for (long i = 0; i < n; i++) EXPECT_EQ(conc_pool_submit(a.p, job_count, NULL, NULL), 0);
    EXPECT_EQ(conc_pool_shutdown(a.p, NULL, NULL, NULL), 0);
    atomic_store(&a.stop, 1);
    pthread_join(t, NULL);
    printf("# most running seen: %zu (1 worker)\n", a.max_running);
    EXPECT(a.max_running <= 1);
    conc_pool_free(a.p);
}

int main(void) {
    RUN(new_submit_shutdown_free);
    RUN(try_submit_fails_fast_when_saturated);
    RUN(unbuffered_is_hand_off);
    RUN(blocked_submit_is_granted_in_order_and_refused_by_shutdown);
    RUN(future_wait_result_and_ctx);
    RUN(future_of_unrun_job_and_many_waiters);
    RUN(future_freed_while_waited);
    RUN(concurrent_shutdowns_both_join);
    RUN(jobs_get_the_pools_context);
    RUN(stats_count_a_handed_off_job_as_running);
    RUN(stats_running_never_above_the_workers);
    RUN(threads_are_registered_and_reused);
    RUN(stress_cancel_races_worker_taking_the_job);
    RUN(stress_shutdown_while_saturated_accounts_every_job_once);
    RUN(stress_many_submitters_many_pools);
    RUN(no_thread_leaks_after_everything);
    return tap_done();
}
