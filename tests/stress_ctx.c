/* stress_ctx.c - contexts under contention: children created and released while their
   parent is cancelled, cancel racing release (and after-func stop), many waiters on one
   tree woken by one cancel, a storm of short timeouts on the single timer thread, and
   racing ends of one tree: whichever call returns (the walk's own, a second cancel or
   release racing it, a deadline on the timer thread, a walk from further down), every
   descendant has ended by then, as in Go.

   Loop sizes scale with CONC_TEST_SCALE / tap_iters(). A lost wake-up shows as a failed
   check after a 10 s guard rather than a hang. */
#define CONC_IMPLEMENTATION
#include "conc.h"
#include "tap.h"
#include "test_util.h"

#include <pthread.h>
#include <stdatomic.h>

#define MS CONC_MILLISECOND
static const char token; /* what goes through 0-size channels */
static const char key;

/* ---- children of a shared parent, created and released while it is cancelled ---- */

enum { CHURN_THREADS = 8, HELD = 16, CAUSE = 77 };

struct churn {
    conc_ctx_t *parent;
    conc_chan_t *halfway; /* each worker says so once, then the parent is cancelled */
    uint64_t seed;
    long iters;
    long created, bad_start, bad_end, nomem;
};

static conc_ctx_t *make_child(conc_ctx_t *p, uint64_t r) {
    switch (r % 4) {
    case 0: return conc_ctx_with_cancel(p);
    case 1: return conc_ctx_with_timeout(p, 3600 * CONC_SECOND);
    case 2: return conc_ctx_with_value(p, &key, NULL);
    default: {
        /* A grandchild under a value context that is released at once: the parent's
           cancel must still reach it. */
        conc_ctx_t *m = conc_ctx_with_value(p, &key, NULL);
        conc_ctx_t *g = m ? conc_ctx_with_cancel(m) : NULL;
        conc_ctx_release(m);
        return g;
    }
    }
}

static void *churn_worker(void *arg) {
    struct churn *w = arg;
    conc_ctx_t *held[HELD] = {0};
    for (long i = 0; i < w->iters; i++) {
        if (i == w->iters / 2) conc_chan_send(w->halfway, &token, NULL);
        int slot = (int)(rnd(&w->seed) % HELD);
        conc_ctx_release(held[slot]);
        /* Whatever we saw of the parent before creating, the child sees at least. */
        int before = conc_ctx_err(w->parent);
        conc_ctx_t *c = make_child(w->parent, rnd(&w->seed));
        held[slot] = c;
        if (!c) {
            w->nomem++;
            continue;
        }
        w->created++;
        int e = conc_ctx_err(c);
        if (before != 0 && (e != CONC_CANCELED || conc_ctx_cause(c) != CAUSE)) w->bad_start++;
        if (e != 0 && e != CONC_CANCELED) w->bad_start++;
    }
    /* Every child still held ends with the parent's err and cause. */
    conc_ctx_wait(w->parent);
    for (int i = 0; i < HELD; i++) {
        if (!held[i]) continue;
        if (conc_ctx_wait(held[i]) != CONC_CANCELED || conc_ctx_cause(held[i]) != CAUSE)
            w->bad_end++;
        conc_ctx_release(held[i]);
    }
    return NULL;
}

TEST(children_created_while_parent_cancelled) {
    long rounds = tap_iters(20);
    for (long r = 0; r < rounds; r++) {
        conc_ctx_t *root = conc_ctx_with_cancel(NULL);
        conc_ctx_t *parent = root ? conc_ctx_with_value(root, &key, root) : NULL;
        conc_chan_t *halfway = conc_chan_new(0, CHURN_THREADS);
        ASSERT(parent && halfway);
        struct churn w[CHURN_THREADS];
        pthread_t th[CHURN_THREADS];
        for (int i = 0; i < CHURN_THREADS; i++) {
            uint64_t seed = 0x1234567ull * (uint64_t)(i + 1) + (uint64_t)r;
            w[i] = (struct churn){parent, halfway, seed, tap_iters(2000), 0, 0, 0, 0};
            th[i] = spawn_thread(churn_worker, &w[i]);
        }
        for (int i = 0; i < CHURN_THREADS; i++) conc_chan_recv(halfway, NULL, NULL);
        conc_ctx_cancel_cause(root, CAUSE);
        long created = 0;
        for (int i = 0; i < CHURN_THREADS; i++) {
            pthread_join(th[i], NULL);
            EXPECT_EQ(w[i].bad_start, 0);
            EXPECT_EQ(w[i].bad_end, 0);
            EXPECT_EQ(w[i].nomem, 0);
            created += w[i].created;
        }
        EXPECT(created > 0);
        EXPECT_EQ(conc_ctx_cause(parent), CAUSE);
        conc_ctx_release(parent);
        conc_ctx_release(root);
        conc_chan_free(halfway);
    }
}

/* ---- cancel racing release, after-func stop racing the end ---- */

struct race {
    pthread_barrier_t start, end;
    long iters;
    /* per iteration, set up by the main thread */
    conc_ctx_t *p, *c, *g;
    conc_after_func_t *h;
    int variant;
    bool stopped;
    atomic_int ran;
};

static void race_fn(void *arg) { atomic_fetch_add((atomic_int *)arg, 1); }

/* Side A: ends contexts. */
static void *race_a(void *arg) {
    struct race *r = arg;
    for (long i = 0; i < r->iters; i++) {
        pthread_barrier_wait(&r->start);
        switch (r->variant) {
        case 0: conc_ctx_cancel(r->p); break;
        case 1: conc_ctx_cancel_cause(r->p, 9); break;
        case 2: conc_ctx_release(r->p); r->p = NULL; break;
        default: conc_ctx_cancel(r->c); break;
        }
        pthread_barrier_wait(&r->end);
    }
    return NULL;
}

/* Side B: releases the descendants and stops the after-func. */
static void *race_b(void *arg) {
    struct race *r = arg;
    for (long i = 0; i < r->iters; i++) {
        pthread_barrier_wait(&r->start);
        r->stopped = conc_after_func_stop(r->h);
        conc_ctx_release(r->g);
        if (r->variant != 3) conc_ctx_release(r->c);
        pthread_barrier_wait(&r->end);
    }
    return NULL;
}

TEST(cancel_races_release) {
    struct race r;
    r.iters = tap_iters(20000);
    pthread_barrier_init(&r.start, NULL, 3);
    pthread_barrier_init(&r.end, NULL, 3);
    atomic_init(&r.ran, 0);
    pthread_t a = spawn_thread(race_a, &r), b = spawn_thread(race_b, &r);
    long mismatches = 0, nomem = 0, stops = 0;
    for (long i = 0; i < r.iters; i++) {
        r.variant = (int)(i % 4);
        r.p = conc_ctx_with_cancel(NULL);
        r.c = r.p ? conc_ctx_with_timeout(r.p, 3600 * CONC_SECOND) : NULL;
        r.g = r.c ? conc_ctx_with_value(r.c, &key, NULL) : NULL;
        r.h = r.g ? conc_ctx_after_func(r.g, race_fn, &r.ran) : NULL;
        if (!r.h) {
            nomem++;
            break;
        }
        atomic_store(&r.ran, 0);
        pthread_barrier_wait(&r.start);
        pthread_barrier_wait(&r.end);
        /* The after-func either was stopped or ran (on A's or B's thread, before they
           reached the barrier), never both, never neither. */
        int ran = atomic_load(&r.ran);
        if (ran != (r.stopped ? 0 : 1)) mismatches++;
        stops += r.stopped;
        if (r.variant == 3) {
            if (conc_ctx_err(r.c) != CONC_CANCELED) mismatches++;
            conc_ctx_release(r.c);
        }
        conc_ctx_release(r.p);
    }
    /* Let the helpers through their last round if we broke out early. */
    EXPECT_EQ(nomem, 0);
    EXPECT_EQ(mismatches, 0);
    printf("# after-func stopped in %ld of %ld races\n", stops, r.iters);
    if (nomem) exit(1);
    pthread_join(a, NULL);
    pthread_join(b, NULL);
    pthread_barrier_destroy(&r.start);
    pthread_barrier_destroy(&r.end);
}

/* ---- many waiters on one tree, one cancel ---- */

enum { WAITERS = 24 };

struct waiter {
    conc_ctx_t *root;
    conc_chan_t *ch, *ready, *done;
    int mode;
};

static void *waiter_thread(void *arg) {
    struct waiter *w = arg;
    conc_ctx_t *mid = conc_ctx_with_value(w->root, &key, w);
    conc_ctx_t *leaf = mid ? conc_ctx_with_cancel(mid) : NULL;
    int rc = CONC_NOMEM, v;
    conc_chan_send(w->ready, &token, NULL);
    if (leaf) {
        switch (w->mode) {
        case 0: rc = conc_ctx_wait(leaf); break;
        case 1: rc = conc_chan_recv(w->ch, &v, leaf); break;
        case 2: {
            conc_case cs[2] = {CONC_RECV(w->ch, &v), CONC_DONE(leaf)};
            rc = conc_select(cs, 2, NULL) == 1 ? cs[1].status : -100;
            break;
        }
        default: {
            conc_case cs[1] = {CONC_RECV(w->ch, &v)};
            rc = conc_select(cs, 1, leaf);
            break;
        }
        }
    }
    conc_ctx_release(leaf);
    conc_ctx_release(mid);
    conc_chan_send(w->done, &rc, NULL);
    return NULL;
}

TEST(one_cancel_wakes_all_waiters) {
    long rounds = tap_iters(50);
    conc_chan_t *ch = conc_chan_new(sizeof(int), 0);
    conc_chan_t *ready = conc_chan_new(0, WAITERS);
    conc_chan_t *done = conc_chan_new(sizeof(int), WAITERS);
    ASSERT(ch && ready && done);
    for (long r = 0; r < rounds; r++) {
        conc_ctx_t *root = conc_ctx_with_cancel(NULL);
        ASSERT(root != NULL);
        struct waiter w[WAITERS];
        pthread_t th[WAITERS];
        for (int i = 0; i < WAITERS; i++) {
            w[i] = (struct waiter){root, ch, ready, done, (int)((i + r) % 4)};
            th[i] = spawn_thread(waiter_thread, &w[i]);
        }
        for (int i = 0; i < WAITERS; i++) conc_chan_recv(ready, NULL, NULL);
        conc_ctx_cancel(root);
        conc_ctx_t *guard = conc_ctx_with_timeout(NULL, 10 * CONC_SECOND);
        ASSERT(guard != NULL);
        int woken = 0, wrong = 0;
        for (int i = 0; i < WAITERS; i++) {
            int rc;
            if (conc_chan_recv(done, &rc, guard) != 0) break;
            woken++;
            if (rc != CONC_CANCELED) wrong++;
        }
        conc_ctx_release(guard);
        EXPECT_EQ(woken, WAITERS);
        EXPECT_EQ(wrong, 0);
        if (woken != WAITERS) {
            printf("Bail out! %d of %d waiters never woke (lost wake-up)\n", WAITERS - woken,
                   WAITERS);
            exit(1);
        }
        for (int i = 0; i < WAITERS; i++) pthread_join(th[i], NULL);
        conc_ctx_release(root);
    }
    EXPECT_EQ(conc_chan_free(ch), 0);
    conc_chan_free(ready);
    conc_chan_free(done);
}

/* ---- a storm of short timeouts ---- */

enum { STORM_THREADS = 6 };

struct storm {
    conc_ctx_t *shared;    /* a long-lived parent for some of the timeouts */
    conc_chan_t *fired;    /* after-funcs report here */
    uint64_t seed;
    long iters, registered, bad;
};

static void storm_fn(void *arg) {
    conc_chan_t *fired = arg;
    if (conc_chan_try_send(fired, &token) != 0) abort(); /* cap covers every call */
}

static void *storm_thread(void *arg) {
    struct storm *s = arg;
    for (long i = 0; i < s->iters; i++) {
        uint64_t r = rnd(&s->seed);
        int64_t d = (int64_t)(r % 2000) * CONC_MICROSECOND; /* 0..2 ms */
        conc_ctx_t *parent = (r >> 12) % 2 ? s->shared : NULL;
        conc_ctx_t *c = conc_ctx_with_timeout(parent, d);
        if (!c) {
            s->bad++;
            continue;
        }
        conc_ctx_t *k = NULL;
        switch ((r >> 16) % 4) {
        case 0: break; /* released at once, usually before the deadline */
        case 1:
            if (conc_ctx_wait(c) != CONC_DEADLINE_EXCEEDED) s->bad++;
            break;
        case 2: {
            conc_after_func_t *h = conc_ctx_after_func(c, storm_fn, s->fired);
            if (!h) {
                s->bad++;
                break;
            }
            if ((r >> 20) % 2 && conc_after_func_stop(h)) break;
            /* not stopped: it runs once, by the deadline or by our release below */
            s->registered++;
            if ((r >> 20) % 2 == 0) {
                conc_ctx_release(c);
                c = NULL;
                conc_after_func_stop(h);
            }
            break;
        }
        default:
            /* a nested timeout, longer or shorter than its parent */
            k = conc_ctx_with_timeout(c, (int64_t)((r >> 24) % 2000) * CONC_MICROSECOND);
            if (!k) s->bad++;
            else if ((r >> 30) % 2 && conc_ctx_wait(k) != CONC_DEADLINE_EXCEEDED) s->bad++;
            break;
        }
        if ((r >> 31) % 2) {
            conc_ctx_release(c);
            conc_ctx_release(k);
        } else {
            conc_ctx_release(k);
            conc_ctx_release(c);
        }
    }
    return NULL;
}

TEST(timeout_storm) {
    long iters = tap_iters(5000);
    conc_ctx_t *shared = conc_ctx_with_timeout(NULL, 3600 * CONC_SECOND);
    conc_chan_t *fired = conc_chan_new(0, (size_t)(iters * STORM_THREADS));
    ASSERT(shared && fired);
    struct storm s[STORM_THREADS];
    pthread_t th[STORM_THREADS];
    for (int i = 0; i < STORM_THREADS; i++) {
        s[i] = (struct storm){shared, fired, 0xABCDEFull * (uint64_t)(i + 3), iters, 0, 0};
        th[i] = spawn_thread(storm_thread, &s[i]);
    }
    long registered = 0;
    for (int i = 0; i < STORM_THREADS; i++) {
        pthread_join(th[i], NULL);
        EXPECT_EQ(s[i].bad, 0);
        registered += s[i].registered;
    }
    /* Every after-func not stopped ran exactly once: some may still be finishing on the
       timer thread, so wait for their word. */
    conc_ctx_t *guard = conc_ctx_with_timeout(NULL, 10 * CONC_SECOND);
    ASSERT(guard != NULL);
    long got = 0;
    while (got < registered && conc_chan_recv(fired, NULL, guard) == 0) got++;
    conc_ctx_release(guard);
    EXPECT_EQ(got, registered);
    EXPECT_EQ(conc_chan_try_recv(fired, NULL), CONC_WOULD_BLOCK);
    printf("# %ld after-funcs ran\n", got);
    EXPECT_EQ(conc_ctx_err(shared), 0);
    conc_ctx_release(shared);
    conc_chan_free(fired);
}

/* ---- a call that ends a context returns once every descendant has ended ---- */

enum { TREE_KIDS = 32, TREE_DEPTH = 4 };

/* root -> mid -> TREE_KIDS chains of TREE_DEPTH */
typedef struct tree {
    conc_ctx_t *root, *mid, *node[TREE_KIDS][TREE_DEPTH];
    conc_ctx_t *end_first; /* the other thread cancels this one */
    _Atomic int go;
} tree;

static void tree_build(tree *t, int64_t root_timeout) {
    t->root = root_timeout > 0 ? conc_ctx_with_timeout(NULL, root_timeout) : conc_ctx_with_cancel(NULL);
    t->mid = conc_ctx_with_cancel(t->root);
    for (int k = 0; k < TREE_KIDS; k++) {
        conc_ctx_t *p = t->mid;
        for (int d = 0; d < TREE_DEPTH; d++) p = t->node[k][d] = conc_ctx_with_cancel(p);
    }
    atomic_store(&t->go, 0);
}

static int tree_live(tree *t) {
    int live = conc_ctx_err(t->mid) == 0;
    for (int k = 0; k < TREE_KIDS; k++)
        for (int d = 0; d < TREE_DEPTH; d++) live += conc_ctx_err(t->node[k][d]) == 0;
    return live;
}

static void tree_release(tree *t) {
    for (int k = 0; k < TREE_KIDS; k++)
        for (int d = TREE_DEPTH - 1; d >= 0; d--) conc_ctx_release(t->node[k][d]);
    conc_ctx_release(t->mid);
    conc_ctx_release(t->root);
}

static void *tree_cancel_main(void *arg) {
    tree *t = (tree *)arg;
    while (!atomic_load(&t->go)) {
    }
    conc_ctx_cancel(t->end_first);
    return NULL;
}

/* mode 0: another thread cancels the root, this one cancels it again once it reads it
   ended; mode 1: the root's deadline ends it (on the timer thread), this one cancels it
   once it reads it ended; mode 2: another thread cancels mid, the root's only kid, and
   this one cancels the root once it reads mid ended (its walk meets the other walk's
   root, and must wait for that walk). */
static long tree_round(int mode, uint64_t *rng) {
    tree t;
    tree_build(&t, mode == 1 ? (int64_t)(rnd(rng) % 200) * CONC_MICROSECOND + 1 : 0);
    pthread_t th = pthread_self(); /* set below when another thread takes part */
    bool other = mode != 1;
    if (other) {
        t.end_first = mode == 0 ? t.root : t.mid;
        th = spawn_thread(tree_cancel_main, &t);
        atomic_store(&t.go, 1);
    }
    while (conc_ctx_err(mode == 2 ? t.mid : t.root) == 0) jitter(rng);
    conc_ctx_cancel(t.root);
    long bad = tree_live(&t) != 0;
    if (other) pthread_join(th, NULL);
    tree_release(&t);
    return bad;
}

TEST(ending_calls_return_after_every_descendant) {
    uint64_t rng = 0x2545f4914f6cdd1du;
    long rounds = tap_iters(600), bad[3] = {0, 0, 0};
    for (long r = 0; r < rounds; r++) bad[r % 3] += tree_round((int)(r % 3), &rng);
    printf("# %ld rounds each: a descendant still live after the call returned: second cancel %ld, "
           "after a deadline %ld, over a walk from below %ld\n",
           (rounds + 2) / 3, bad[0], bad[1], bad[2]);
    EXPECT_EQ(bad[0], 0);
    EXPECT_EQ(bad[1], 0);
    EXPECT_EQ(bad[2], 0);
}

int main(void) {
    RUN(children_created_while_parent_cancelled);
    RUN(cancel_races_release);
    RUN(one_cancel_wakes_all_waiters);
    RUN(timeout_storm);
    RUN(ending_calls_return_after_every_descendant);
    return tap_done();
}
