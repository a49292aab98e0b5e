/* test_ctx.c - contexts: cancellation, causes, trees, deadlines, values, lifetimes,
   conc_ctx_wait, after-funcs, and blocked channel calls woken by an ancestor's cancel.

   Go's context package is the reference. Run it under Valgrind too: the lifetime tests
   (a parent released before its child) are there to catch a use after free. */
#define CONC_IMPLEMENTATION
#include "conc.h"
#include "tap.h"
#include "test_util.h"

#include <pthread.h>
#include <time.h>
#include <unistd.h>

/* ---- helpers ---- */

/* A thread that has just announced "about to block" gets a moment to park, so that the
   wake-up path is what gets tested. Nothing depends on it: a call whose context has
   already ended returns the very same status. */
static void let_it_park(void) {
    struct timespec ts = {0, 5 * 1000 * 1000};
    nanosleep(&ts, NULL);
}

static const char key_a, key_b, key_c;  /* context keys compare by address */
static const char token;                /* what goes through 0-size channels */

/* ---- background ---- */

static int bg_fn_calls;
static void count_call(void *arg) { (*(int *)arg)++; }

TEST(background_never_ends) {
    conc_ctx_t *bg = conc_ctx_background();
    ASSERT(bg != NULL);
    EXPECT(conc_ctx_background() == bg);
    EXPECT_EQ(conc_ctx_err(bg), 0);
    EXPECT_EQ(conc_ctx_cause(bg), 0);
    int64_t t = 12345;
    EXPECT(!conc_ctx_deadline(bg, &t));
    EXPECT(conc_ctx_value(bg, &key_a) == NULL);

    conc_ctx_cancel(bg); /* a no-op */
    conc_ctx_cancel_cause(bg, 3);
    conc_ctx_release(bg); /* a no-op */
    conc_ctx_release(bg);
    EXPECT_EQ(conc_ctx_err(bg), 0);
    EXPECT_EQ(conc_ctx_cause(bg), 0);

    conc_ctx_release(NULL); /* a no-op */
    EXPECT_EQ(conc_ctx_err(NULL), 0);

    /* Never ends, so an after-func on it never runs and stop prevents it. */
    conc_after_func_t *h = conc_ctx_after_func(bg, count_call, &bg_fn_calls);
    ASSERT(h != NULL);
    EXPECT(conc_after_func_stop(h));
    EXPECT_EQ(bg_fn_calls, 0);

    /* A child of NULL is a child of background: no deadline, no values. */
    conc_ctx_t *c = conc_ctx_with_cancel(NULL);
    ASSERT(c != NULL);
    EXPECT(!conc_ctx_deadline(c, &t));
    EXPECT(conc_ctx_value(c, &key_a) == NULL);
    conc_ctx_release(c);
    EXPECT_EQ(conc_ctx_err(bg), 0);
}

/* ---- cancel, err, cause ---- */

TEST(cancel_err_cause) {
    conc_ctx_t *c = conc_ctx_with_cancel(NULL);
    ASSERT(c != NULL);
    EXPECT_EQ(conc_ctx_err(c), 0);
    EXPECT_EQ(conc_ctx_cause(c), 0);
    conc_ctx_cancel(c);
    EXPECT_EQ(conc_ctx_err(c), CONC_CANCELED);
    EXPECT_EQ(conc_ctx_cause(c), CONC_CANCELED);
    /* Idempotent: the first end is for ever. */
    conc_ctx_cancel(c);
    conc_ctx_cancel_cause(c, 7);
    EXPECT_EQ(conc_ctx_err(c), CONC_CANCELED);
    EXPECT_EQ(conc_ctx_cause(c), CONC_CANCELED);
    conc_ctx_release(c);

    /* Release cancels a live context: a child sees it. */
    c = conc_ctx_with_cancel(NULL);
    ASSERT(c != NULL);
    conc_ctx_t *k = conc_ctx_with_cancel(c);
    ASSERT(k != NULL);
    conc_ctx_release(c);
    EXPECT_EQ(conc_ctx_err(k), CONC_CANCELED);
    EXPECT_EQ(conc_ctx_cause(k), CONC_CANCELED);
    conc_ctx_release(k);
}

TEST(cancel_cause_user_code) {
    conc_ctx_t *c = conc_ctx_with_cancel(NULL);
    ASSERT(c != NULL);
    conc_ctx_t *k = conc_ctx_with_cancel(c);
    ASSERT(k != NULL);
    conc_ctx_cancel_cause(c, 42);
    EXPECT_EQ(conc_ctx_err(c), CONC_CANCELED);
    EXPECT_EQ(conc_ctx_cause(c), 42);
    EXPECT_EQ(conc_ctx_err(k), CONC_CANCELED);
    EXPECT_EQ(conc_ctx_cause(k), 42);
    /* The first cause stays. */
    conc_ctx_cancel_cause(c, 43);
    conc_ctx_cancel(c);
    EXPECT_EQ(conc_ctx_cause(c), 42);
    EXPECT_EQ(conc_ctx_cause(k), 42);
    conc_ctx_release(k);
    conc_ctx_release(c);

    /* Cause 0 means CONC_CANCELED. */
    c = conc_ctx_with_cancel(NULL);
    ASSERT(c != NULL);
    conc_ctx_cancel_cause(c, 0);
    EXPECT_EQ(conc_ctx_err(c), CONC_CANCELED);
    EXPECT_EQ(conc_ctx_cause(c), CONC_CANCELED);
    conc_ctx_release(c);

    /* A child's own cause does not reach its parent. */
    c = conc_ctx_with_cancel(NULL);
    ASSERT(c != NULL);
    k = conc_ctx_with_cancel(c);
    ASSERT(k != NULL);
    conc_ctx_cancel_cause(k, 5);
    EXPECT_EQ(conc_ctx_cause(k), 5);
    EXPECT_EQ(conc_ctx_err(c), 0);
    EXPECT_EQ(conc_ctx_cause(c), 0);
    conc_ctx_release(k);
    conc_ctx_release(c);

    EXPECT(strcmp(conc_strerror(42), "user error") == 0);
    EXPECT(strcmp(conc_strerror(CONC_CANCELED), "context canceled") == 0);
    EXPECT(strcmp(conc_strerror(CONC_DEADLINE_EXCEEDED), "context deadline exceeded") == 0);
}

/* ---- trees ---- */

/* root
    +- a (cancel)
    |   +- a1 (cancel) -- a1v (value) -- a1x (timeout 1h)   depth 3 below a
    |   +- a2 (value)
    +- b (timeout 1h)
        +- b1 (cancel)                                                        */
struct tree {
    conc_ctx_t *root, *a, *a1, *a1v, *a1x, *a2, *b, *b1;
};

static int make_tree(struct tree *t) {
    t->root = conc_ctx_with_cancel(NULL);
    if (!t->root) return 0;
    t->a = conc_ctx_with_cancel(t->root);
    t->a1 = conc_ctx_with_cancel(t->a);
    t->a1v = conc_ctx_with_value(t->a1, &key_a, (void *)&key_b);
    t->a1x = conc_ctx_with_timeout(t->a1v, 3600 * CONC_SECOND);
    t->a2 = conc_ctx_with_value(t->a, &key_a, NULL);
    t->b = conc_ctx_with_timeout(t->root, 3600 * CONC_SECOND);
    t->b1 = conc_ctx_with_cancel(t->b);
    return t->a && t->a1 && t->a1v && t->a1x && t->a2 && t->b && t->b1;
}

static void free_tree(struct tree *t) {
    /* Parents before children on purpose: children keep what they need. */
    conc_ctx_release(t->root);
    conc_ctx_release(t->a);
    conc_ctx_release(t->a1);
    conc_ctx_release(t->a2);
    conc_ctx_release(t->a1v);
    conc_ctx_release(t->b);
    conc_ctx_release(t->a1x);
    conc_ctx_release(t->b1);
}

TEST(cancel_parent_ends_tree) {
    struct tree t;
    ASSERT(make_tree(&t));
    conc_ctx_t *all[] = {t.root, t.a, t.a1, t.a1v, t.a1x, t.a2, t.b, t.b1};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) EXPECT_EQ(conc_ctx_err(all[i]), 0);
    conc_ctx_cancel_cause(t.root, 99);
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) {
        EXPECT_EQ(conc_ctx_err(all[i]), CONC_CANCELED);
        EXPECT_EQ(conc_ctx_cause(all[i]), 99);
    }
    free_tree(&t);
}

TEST(cancel_child_spares_parent_and_siblings) {
    struct tree t;
    ASSERT(make_tree(&t));
    conc_ctx_cancel(t.a1);
    EXPECT_EQ(conc_ctx_err(t.a1), CONC_CANCELED);
    EXPECT_EQ(conc_ctx_err(t.a1v), CONC_CANCELED);
    EXPECT_EQ(conc_ctx_err(t.a1x), CONC_CANCELED);
    EXPECT_EQ(conc_ctx_err(t.a), 0);
    EXPECT_EQ(conc_ctx_err(t.a2), 0);
    EXPECT_EQ(conc_ctx_err(t.root), 0);
    EXPECT_EQ(conc_ctx_err(t.b), 0);
    EXPECT_EQ(conc_ctx_err(t.b1), 0);

    conc_ctx_cancel_cause(t.b, 3);
    EXPECT_EQ(conc_ctx_cause(t.b1), 3);
    EXPECT_EQ(conc_ctx_err(t.root), 0);
    EXPECT_EQ(conc_ctx_err(t.a), 0);
    EXPECT_EQ(conc_ctx_err(t.a2), 0);

    /* Cancelling a value context is a no-op; it ends with its parent only. */
    conc_ctx_cancel(t.a2);
    EXPECT_EQ(conc_ctx_err(t.a2), 0);

    /* Cancelling the root now ends the rest but leaves the earlier causes alone. */
    conc_ctx_cancel_cause(t.root, 4);
    EXPECT_EQ(conc_ctx_cause(t.a), 4);
    EXPECT_EQ(conc_ctx_cause(t.a2), 4);
    EXPECT_EQ(conc_ctx_cause(t.a1), CONC_CANCELED);
    EXPECT_EQ(conc_ctx_cause(t.a1x), CONC_CANCELED);
    EXPECT_EQ(conc_ctx_cause(t.b), 3);
    EXPECT_EQ(conc_ctx_cause(t.b1), 3);
    free_tree(&t);
}

/* A chain 10000 deep, built, cancelled and released on a thread with a small stack, so
   that recursion over the depth (in cancel, in value lookup, in the final free) shows as
   a crash. */
#define CHAIN_DEPTH 10000
struct chain_result {
    int built, leaf_err, leaf_cause, mid_cause, value_ok, deadline_ok;
};

static void *chain_thread(void *arg) {
    struct chain_result *r = arg;
    conc_ctx_t **c = malloc(sizeof *c * (CHAIN_DEPTH + 1));
    if (!c) return NULL;
    int64_t dl = conc_now() + 3600 * CONC_SECOND;

    /* Pass 1: cancel the root, release leaf-first. */
    c[0] = conc_ctx_with_deadline(NULL, dl);
    c[1] = conc_ctx_with_value(c[0], &key_c, (void *)&key_a);
    for (int i = 2; i <= CHAIN_DEPTH; i++) {
        /* a mix of kinds; every one of them passes cancellation down */
        c[i] = (i % 3 == 0) ? conc_ctx_with_value(c[i - 1], &key_b, (void *)&c[i])
                            : conc_ctx_with_cancel(c[i - 1]);
        if (!c[i]) {
            free(c);
            return NULL;
        }
    }
    r->built = 1;
    int64_t got = 0;
    r->deadline_ok = conc_ctx_deadline(c[CHAIN_DEPTH], &got) && got == dl;
    r->value_ok = conc_ctx_value(c[CHAIN_DEPTH], &key_c) == &key_a &&
                  conc_ctx_value(c[CHAIN_DEPTH], &key_b) == (void *)&c[CHAIN_DEPTH - 1] &&
                  conc_ctx_value(c[CHAIN_DEPTH], &r) == NULL;
    conc_ctx_cancel_cause(c[0], 17);
    r->leaf_err = conc_ctx_err(c[CHAIN_DEPTH]);
    r->leaf_cause = conc_ctx_cause(c[CHAIN_DEPTH]);
    r->mid_cause = conc_ctx_cause(c[CHAIN_DEPTH / 2]);
    for (int i = CHAIN_DEPTH; i >= 0; i--) conc_ctx_release(c[i]);

    /* Pass 2: release root-first (that cancels the chain); the leaf's release then drops
       the last reference to the whole chain. */
    c[0] = conc_ctx_with_cancel(NULL);
    for (int i = 1; i <= CHAIN_DEPTH; i++) {
        c[i] = conc_ctx_with_cancel(c[i - 1]);
        if (!c[i]) {
            r->built = 0;
            free(c);
            return NULL;
        }
    }
    for (int i = 0; i < CHAIN_DEPTH; i++) conc_ctx_release(c[i]);
    if (conc_ctx_err(c[CHAIN_DEPTH]) != CONC_CANCELED) r->leaf_err = 0;
    conc_ctx_release(c[CHAIN_DEPTH]);
    free(c);
    return NULL;
}

TEST(deep_chain_no_recursion) {
    struct chain_result r = {0};
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 256 * 1024);
    pthread_t th;
    ASSERT(pthread_create(&th, &attr, chain_thread, &r) == 0);
    pthread_attr_destroy(&attr);
    pthread_join(th, NULL);
    ASSERT(r.built);
    EXPECT(r.deadline_ok);
    EXPECT(r.value_ok);
    EXPECT_EQ(r.leaf_err, CONC_CANCELED);
    EXPECT_EQ(r.leaf_cause, 17);
    EXPECT_EQ(r.mid_cause, 17);
}

/* ---- deadlines ---- */

TEST(deadline_and_timeout) {
    int64_t start = conc_now();
    conc_ctx_t *c = conc_ctx_with_timeout(NULL, 30 * CONC_MILLISECOND);
    ASSERT(c != NULL);
    conc_ctx_t *k = conc_ctx_with_cancel(c);
    ASSERT(k != NULL);
    int64_t dl = 0;
    EXPECT(conc_ctx_deadline(c, &dl));
    EXPECT(dl >= start + 30 * CONC_MILLISECOND);
    EXPECT(dl <= conc_now() + 30 * CONC_MILLISECOND);
    EXPECT_EQ(conc_ctx_wait(c), CONC_DEADLINE_EXCEEDED);
    EXPECT(conc_now() >= start + 30 * CONC_MILLISECOND);
    EXPECT_EQ(conc_ctx_err(c), CONC_DEADLINE_EXCEEDED);
    EXPECT_EQ(conc_ctx_cause(c), CONC_DEADLINE_EXCEEDED);
    /* A child ended by its parent's deadline inherits it. */
    EXPECT_EQ(conc_ctx_wait(k), CONC_DEADLINE_EXCEEDED);
    EXPECT_EQ(conc_ctx_cause(k), CONC_DEADLINE_EXCEEDED);
    /* Cancelling after the deadline changes nothing. */
    conc_ctx_cancel_cause(c, 8);
    EXPECT_EQ(conc_ctx_err(c), CONC_DEADLINE_EXCEEDED);
    EXPECT_EQ(conc_ctx_cause(c), CONC_DEADLINE_EXCEEDED);
    conc_ctx_release(c);
    conc_ctx_release(k);

    /* with_deadline on an absolute time. */
    start = conc_now();
    c = conc_ctx_with_deadline(NULL, start + 20 * CONC_MILLISECOND);
    ASSERT(c != NULL);
    EXPECT(conc_ctx_deadline(c, &dl));
    EXPECT_EQ(dl, start + 20 * CONC_MILLISECOND);
    EXPECT_EQ(conc_ctx_wait(c), CONC_DEADLINE_EXCEEDED);
    EXPECT(conc_now() >= start + 20 * CONC_MILLISECOND);
    conc_ctx_release(c);
}

TEST(deadline_is_min_of_own_and_parents) {
    int64_t now = conc_now();
    int64_t hour = 3600 * CONC_SECOND;
    conc_ctx_t *p = conc_ctx_with_deadline(NULL, now + hour);
    ASSERT(p != NULL);
    conc_ctx_t *later = conc_ctx_with_deadline(p, now + 2 * hour);
    conc_ctx_t *sooner = conc_ctx_with_deadline(p, now + hour / 2);
    conc_ctx_t *plain = conc_ctx_with_cancel(p);
    conc_ctx_t *val = conc_ctx_with_value(p, &key_a, NULL);
    conc_ctx_t *under_sooner = conc_ctx_with_timeout(sooner, 2 * hour);
    ASSERT(later && sooner && plain && val && under_sooner);
    int64_t t = 0;
    EXPECT(conc_ctx_deadline(p, &t));
    EXPECT_EQ(t, now + hour);
    EXPECT(conc_ctx_deadline(later, &t));
    EXPECT_EQ(t, now + hour);
    EXPECT(conc_ctx_deadline(sooner, &t));
    EXPECT_EQ(t, now + hour / 2);
    EXPECT(conc_ctx_deadline(plain, &t));
    EXPECT_EQ(t, now + hour);
    EXPECT(conc_ctx_deadline(val, &t));
    EXPECT_EQ(t, now + hour);
    EXPECT(conc_ctx_deadline(under_sooner, &t));
    EXPECT_EQ(t, now + hour / 2);
    conc_ctx_release(under_sooner);
    conc_ctx_release(val);
    conc_ctx_release(plain);
    conc_ctx_release(sooner);
    conc_ctx_release(later);
    conc_ctx_release(p);

    /* A parent whose deadline comes first ends the child with DEADLINE_EXCEEDED. */
    p = conc_ctx_with_timeout(NULL, 10 * CONC_MILLISECOND);
    ASSERT(p != NULL);
    later = conc_ctx_with_timeout(p, hour);
    ASSERT(later != NULL);
    EXPECT_EQ(conc_ctx_wait(later), CONC_DEADLINE_EXCEEDED);
    EXPECT_EQ(conc_ctx_cause(later), CONC_DEADLINE_EXCEEDED);
    conc_ctx_release(later);
    conc_ctx_release(p);
}

TEST(past_deadline_ends_at_once) {
    conc_ctx_t *c = conc_ctx_with_deadline(NULL, conc_now() - CONC_SECOND);
    ASSERT(c != NULL);
    EXPECT_EQ(conc_ctx_err(c), CONC_DEADLINE_EXCEEDED);
    EXPECT_EQ(conc_ctx_cause(c), CONC_DEADLINE_EXCEEDED);
    int64_t t = 0;
    EXPECT(conc_ctx_deadline(c, &t));
    conc_ctx_release(c);

    c = conc_ctx_with_timeout(NULL, -1);
    ASSERT(c != NULL);
    EXPECT_EQ(conc_ctx_err(c), CONC_DEADLINE_EXCEEDED);
    conc_ctx_release(c);

    /* Under a live parent too, and the parent stays live. */
    conc_ctx_t *p = conc_ctx_with_cancel(NULL);
    ASSERT(p != NULL);
    c = conc_ctx_with_timeout(p, -CONC_SECOND);
    ASSERT(c != NULL);
    EXPECT_EQ(conc_ctx_err(c), CONC_DEADLINE_EXCEEDED);
    EXPECT_EQ(conc_ctx_err(p), 0);
    conc_ctx_release(c);
    conc_ctx_release(p);
}

TEST(cancel_before_deadline_stays_canceled) {
    conc_ctx_t *c = conc_ctx_with_timeout(NULL, 10 * CONC_MILLISECOND);
    ASSERT(c != NULL);
    conc_ctx_cancel_cause(c, 12);
    EXPECT_EQ(conc_ctx_err(c), CONC_CANCELED);
    /* Wait until well past c's deadline: the first end is for ever. */
    conc_ctx_t *later = conc_ctx_with_timeout(NULL, 40 * CONC_MILLISECOND);
    ASSERT(later != NULL);
    EXPECT_EQ(conc_ctx_wait(later), CONC_DEADLINE_EXCEEDED);
    EXPECT_EQ(conc_ctx_err(c), CONC_CANCELED);
    EXPECT_EQ(conc_ctx_cause(c), 12);
    conc_ctx_release(later);
    conc_ctx_release(c);
}

/* ---- values ---- */

TEST(values_lookup_shadowing_missing) {
    int v1 = 1, v2 = 2, v3 = 3;
    conc_ctx_t *r = conc_ctx_with_value(NULL, &key_a, &v1);
    ASSERT(r != NULL);
    conc_ctx_t *c = conc_ctx_with_cancel(r);
    conc_ctx_t *d = c ? conc_ctx_with_value(c, &key_b, &v2) : NULL;
    conc_ctx_t *e = d ? conc_ctx_with_value(d, &key_a, &v3) : NULL;
    conc_ctx_t *f = e ? conc_ctx_with_timeout(e, 3600 * CONC_SECOND) : NULL;
    ASSERT(c && d && e && f);

    EXPECT(conc_ctx_value(r, &key_a) == &v1);
    EXPECT(conc_ctx_value(c, &key_a) == &v1); /* up the chain */
    EXPECT(conc_ctx_value(d, &key_a) == &v1);
    EXPECT(conc_ctx_value(d, &key_b) == &v2);
    EXPECT(conc_ctx_value(e, &key_a) == &v3); /* shadowed */
    EXPECT(conc_ctx_value(f, &key_a) == &v3);
    EXPECT(conc_ctx_value(f, &key_b) == &v2);
    EXPECT(conc_ctx_value(f, &key_c) == NULL); /* missing */
    EXPECT(conc_ctx_value(r, &key_b) == NULL); /* never down */
    EXPECT(conc_ctx_value(NULL, &key_a) == NULL);
    EXPECT(conc_ctx_value(conc_ctx_background(), &key_a) == NULL);

    /* A value context cannot be cancelled; it ends with its parent. */
    conc_ctx_cancel(r);
    EXPECT_EQ(conc_ctx_err(r), 0);
    EXPECT_EQ(conc_ctx_err(f), 0);
    conc_ctx_cancel_cause(c, 21);
    EXPECT_EQ(conc_ctx_err(d), CONC_CANCELED);
    EXPECT_EQ(conc_ctx_cause(e), 21);
    EXPECT_EQ(conc_ctx_cause(f), 21);
    EXPECT_EQ(conc_ctx_err(r), 0);
    /* Values stay readable after the end. */
    EXPECT(conc_ctx_value(f, &key_b) == &v2);

    conc_ctx_release(f);
    conc_ctx_release(e);
    conc_ctx_release(d);
    conc_ctx_release(c);
    conc_ctx_release(r);
}

/* ---- children of an ended parent ---- */

static int af_calls_ended;

TEST(child_of_ended_parent_starts_ended) {
    conc_ctx_t *p = conc_ctx_with_cancel(NULL);
    ASSERT(p != NULL);
    conc_ctx_cancel_cause(p, 11);
    conc_ctx_t *kids[4] = {
        conc_ctx_with_cancel(p),
        conc_ctx_with_timeout(p, 3600 * CONC_SECOND),
        conc_ctx_with_deadline(p, conc_now() - 1),
        conc_ctx_with_value(p, &key_a, NULL),
    };
    for (int i = 0; i < 4; i++) {
        ASSERT(kids[i] != NULL);
        EXPECT_EQ(conc_ctx_err(kids[i]), CONC_CANCELED);
        EXPECT_EQ(conc_ctx_cause(kids[i]), 11);
    }
    conc_ctx_t *gk = conc_ctx_with_cancel(kids[3]);
    ASSERT(gk != NULL);
    EXPECT_EQ(conc_ctx_cause(gk), 11);
    EXPECT_EQ(conc_ctx_wait(gk), CONC_CANCELED);
    conc_after_func_t *h = conc_ctx_after_func(gk, count_call, &af_calls_ended);
    EXPECT_EQ(af_calls_ended, 1);
    EXPECT(!conc_after_func_stop(h));
    conc_ctx_release(gk);
    for (int i = 0; i < 4; i++) conc_ctx_release(kids[i]);
    conc_ctx_release(p);

    /* Same with a parent ended by its deadline. */
    p = conc_ctx_with_timeout(NULL, -1);
    ASSERT(p != NULL);
    conc_ctx_t *k = conc_ctx_with_cancel(p);
    ASSERT(k != NULL);
    EXPECT_EQ(conc_ctx_err(k), CONC_DEADLINE_EXCEEDED);
    EXPECT_EQ(conc_ctx_cause(k), CONC_DEADLINE_EXCEEDED);
    conc_ctx_release(k);
    conc_ctx_release(p);
}

/* ---- lifetimes: parent released before child ---- */

static int af_calls_release;

TEST(release_parent_before_child) {
    int v = 5;
    int64_t dl = conc_now() + 3600 * CONC_SECOND;
    conc_ctx_t *root = conc_ctx_with_deadline(NULL, dl);
    ASSERT(root != NULL);
    conc_ctx_t *val = conc_ctx_with_value(root, &key_a, &v);
    ASSERT(val != NULL);
    conc_ctx_t *mid = conc_ctx_with_cancel(val);
    ASSERT(mid != NULL);
    conc_ctx_t *leaf = conc_ctx_with_value(mid, &key_b, &v);
    ASSERT(leaf != NULL);
    conc_after_func_t *h = conc_ctx_after_func(leaf, count_call, &af_calls_release);
    ASSERT(h != NULL);

    /* Releasing a value context cancels nothing. */
    conc_ctx_release(val);
    EXPECT_EQ(conc_ctx_err(mid), 0);
    EXPECT_EQ(conc_ctx_err(leaf), 0);
    EXPECT(conc_ctx_value(leaf, &key_a) == &v);
    EXPECT_EQ(af_calls_release, 0);

    /* Releasing the root cancels everything below; all stays readable. */
    conc_ctx_release(root);
    EXPECT_EQ(af_calls_release, 1);
    EXPECT_EQ(conc_ctx_err(mid), CONC_CANCELED);
    EXPECT_EQ(conc_ctx_cause(mid), CONC_CANCELED);
    EXPECT_EQ(conc_ctx_err(leaf), CONC_CANCELED);
    EXPECT_EQ(conc_ctx_cause(leaf), CONC_CANCELED);
    EXPECT(conc_ctx_value(leaf, &key_a) == &v);
    EXPECT(conc_ctx_value(leaf, &key_b) == &v);
    EXPECT(conc_ctx_value(mid, &key_a) == &v);
    EXPECT(conc_ctx_value(leaf, &key_c) == NULL);
    int64_t t = 0;
    EXPECT(conc_ctx_deadline(leaf, &t));
    EXPECT_EQ(t, dl);
    EXPECT_EQ(conc_ctx_wait(leaf), CONC_CANCELED);

    /* A new child of the orphan still works. */
    conc_ctx_t *late = conc_ctx_with_cancel(leaf);
    ASSERT(late != NULL);
    EXPECT_EQ(conc_ctx_err(late), CONC_CANCELED);
    EXPECT(conc_ctx_value(late, &key_a) == &v);
    conc_ctx_release(mid);
    EXPECT(conc_ctx_value(late, &key_a) == &v);
    conc_ctx_release(leaf);
    EXPECT(conc_ctx_value(late, &key_a) == &v);
    EXPECT(conc_ctx_deadline(late, &t));
    EXPECT_EQ(t, dl);
    conc_ctx_release(late);
    EXPECT(!conc_after_func_stop(h));
    EXPECT_EQ(af_calls_release, 1);

    /* Released while a deadline is pending: the timer must not touch freed memory
       (Valgrind watches). */
    root = conc_ctx_with_timeout(NULL, 5 * CONC_MILLISECOND);
    ASSERT(root != NULL);
    leaf = conc_ctx_with_timeout(root, 5 * CONC_MILLISECOND);
    ASSERT(leaf != NULL);
    conc_ctx_release(root);
    conc_ctx_release(leaf);
    conc_ctx_t *after = conc_ctx_with_timeout(NULL, 20 * CONC_MILLISECOND);
    ASSERT(after != NULL);
    EXPECT_EQ(conc_ctx_wait(after), CONC_DEADLINE_EXCEEDED);
    conc_ctx_release(after);
}

/* ---- conc_ctx_wait ---- */

struct waiter {
    conc_ctx_t *ctx;
    conc_chan_t *ready;
    int rc;
    int64_t woke;
};

static void *wait_thread(void *arg) {
    struct waiter *w = arg;
    conc_chan_send(w->ready, &token, NULL);
    w->rc = conc_ctx_wait(w->ctx);
    w->woke = conc_now();
    return NULL;
}

TEST(wait_woken_by_cancel_from_other_thread) {
    conc_ctx_t *root = conc_ctx_with_cancel(NULL);
    ASSERT(root != NULL);
    conc_ctx_t *mid = conc_ctx_with_value(root, &key_a, NULL);
    conc_ctx_t *leaf = mid ? conc_ctx_with_timeout(mid, 3600 * CONC_SECOND) : NULL;
    ASSERT(leaf != NULL);
    struct waiter w = {leaf, conc_chan_new(0, 0), -100, 0};
    ASSERT(w.ready != NULL);
    pthread_t th = spawn_thread(wait_thread, &w);
    EXPECT_EQ(conc_chan_recv(w.ready, NULL, NULL), 0);
    let_it_park();
    int64_t t0 = conc_now();
    conc_ctx_cancel_cause(root, 31);
    pthread_join(th, NULL);
    EXPECT_EQ(w.rc, CONC_CANCELED);
    EXPECT_EQ(conc_ctx_cause(leaf), 31);
    EXPECT(w.woke - t0 < 2 * CONC_SECOND);
    conc_ctx_release(leaf);
    conc_ctx_release(mid);
    conc_ctx_release(root);
    conc_chan_free(w.ready);
}

TEST(wait_returns_on_deadline_and_when_ended) {
    int64_t t0 = conc_now();
    conc_ctx_t *c = conc_ctx_with_timeout(NULL, 25 * CONC_MILLISECOND);
    ASSERT(c != NULL);
    struct waiter w = {c, conc_chan_new(0, 0), -100, 0};
    ASSERT(w.ready != NULL);
    pthread_t th = spawn_thread(wait_thread, &w);
    EXPECT_EQ(conc_chan_recv(w.ready, NULL, NULL), 0);
    pthread_join(th, NULL);
    EXPECT_EQ(w.rc, CONC_DEADLINE_EXCEEDED);
    EXPECT(w.woke >= t0 + 25 * CONC_MILLISECOND);
    /* Already ended: returns at once, again and again. */
    EXPECT_EQ(conc_ctx_wait(c), CONC_DEADLINE_EXCEEDED);
    EXPECT_EQ(conc_ctx_wait(c), CONC_DEADLINE_EXCEEDED);
    conc_ctx_release(c);
    conc_chan_free(w.ready);
}

/* ---- after-funcs ---- */

struct af_state {
    int calls;                /* written by fn only */
    pthread_t thread;         /* where fn ran */
    conc_chan_t *done;        /* fn sends here (cap >= 1) when not NULL */
};

static void af_fn(void *arg) {
    struct af_state *s = arg;
    s->calls++;
    s->thread = pthread_self();
    if (s->done) conc_chan_try_send(s->done, &token);
}

TEST(after_func_on_cancel) {
    conc_ctx_t *c = conc_ctx_with_cancel(NULL);
    ASSERT(c != NULL);
    struct af_state s = {0};
    conc_after_func_t *h = conc_ctx_after_func(c, af_fn, &s);
    ASSERT(h != NULL);
    EXPECT_EQ(s.calls, 0);
    conc_ctx_cancel(c);
    /* runs on the thread that ends the context, before cancel returns */
    EXPECT_EQ(s.calls, 1);
    EXPECT(s.calls == 1 && pthread_equal(s.thread, pthread_self()));
    conc_ctx_cancel(c);
    conc_ctx_cancel_cause(c, 2);
    EXPECT_EQ(s.calls, 1);
    EXPECT(!conc_after_func_stop(h)); /* after the end */
    conc_ctx_release(c);
    EXPECT_EQ(s.calls, 1);

    /* Several after-funcs on one context all run, once each. */
    c = conc_ctx_with_cancel(NULL);
    ASSERT(c != NULL);
    struct af_state m[5] = {{0}};
    conc_after_func_t *hs[5];
    for (int i = 0; i < 5; i++) {
        hs[i] = conc_ctx_after_func(c, af_fn, &m[i]);
        ASSERT(hs[i] != NULL);
    }
    EXPECT(conc_after_func_stop(hs[2]));
    conc_ctx_release(c); /* release cancels */
    for (int i = 0; i < 5; i++) EXPECT_EQ(m[i].calls, i == 2 ? 0 : 1);
    for (int i = 0; i < 5; i++)
        if (i != 2) EXPECT(!conc_after_func_stop(hs[i]));
}

TEST(after_func_on_deadline) {
    conc_ctx_t *c = conc_ctx_with_timeout(NULL, 15 * CONC_MILLISECOND);
    ASSERT(c != NULL);
    struct af_state s = {0, pthread_self(), conc_chan_new(0, 1)};
    ASSERT(s.done != NULL);
    conc_after_func_t *h = conc_ctx_after_func(c, af_fn, &s);
    ASSERT(h != NULL);
    /* The timer thread runs it; wait for its word. */
    conc_ctx_t *guard = conc_ctx_with_timeout(NULL, 10 * CONC_SECOND);
    ASSERT(guard != NULL);
    EXPECT_EQ(conc_chan_recv(s.done, NULL, guard), 0);
    EXPECT_EQ(conc_ctx_err(c), CONC_DEADLINE_EXCEEDED);
    EXPECT_EQ(s.calls, 1);
    EXPECT(!pthread_equal(s.thread, pthread_self()));
    EXPECT(!conc_after_func_stop(h));
    conc_ctx_release(c);
    EXPECT_EQ(s.calls, 1);
    EXPECT_EQ(conc_chan_try_recv(s.done, NULL), CONC_WOULD_BLOCK);
    conc_ctx_release(guard);
    conc_chan_free(s.done);
}

TEST(after_func_on_parent_cancel) {
    conc_ctx_t *p = conc_ctx_with_cancel(NULL);
    ASSERT(p != NULL);
    conc_ctx_t *v = conc_ctx_with_value(p, &key_a, NULL);
    conc_ctx_t *k = v ? conc_ctx_with_timeout(v, 3600 * CONC_SECOND) : NULL;
    ASSERT(k != NULL);
    struct af_state sk = {0}, sv = {0}, sp = {0};
    conc_after_func_t *hk = conc_ctx_after_func(k, af_fn, &sk);
    conc_after_func_t *hv = conc_ctx_after_func(v, af_fn, &sv);
    conc_after_func_t *hp = conc_ctx_after_func(p, af_fn, &sp);
    ASSERT(hk && hv && hp);
    /* A child's end runs only the child's. */
    conc_ctx_cancel(k);
    EXPECT_EQ(sk.calls, 1);
    EXPECT_EQ(sv.calls, 0);
    EXPECT_EQ(sp.calls, 0);
    conc_ctx_cancel(p);
    EXPECT_EQ(sk.calls, 1);
    EXPECT_EQ(sv.calls, 1);
    EXPECT_EQ(sp.calls, 1);
    EXPECT(!conc_after_func_stop(hk));
    EXPECT(!conc_after_func_stop(hv));
    EXPECT(!conc_after_func_stop(hp));
    conc_ctx_release(k);
    conc_ctx_release(v);
    conc_ctx_release(p);
}

TEST(after_func_on_ended_ctx_runs_at_once) {
    conc_ctx_t *c = conc_ctx_with_cancel(NULL);
    ASSERT(c != NULL);
    conc_ctx_cancel(c);
    struct af_state s = {0};
    conc_after_func_t *h = conc_ctx_after_func(c, af_fn, &s);
    ASSERT(h != NULL);
    EXPECT_EQ(s.calls, 1);
    EXPECT(s.calls == 1 && pthread_equal(s.thread, pthread_self()));
    EXPECT(!conc_after_func_stop(h));
    EXPECT_EQ(s.calls, 1);
    conc_ctx_release(c);
}

TEST(after_func_stop_before_end) {
    conc_ctx_t *c = conc_ctx_with_timeout(NULL, 30 * CONC_MILLISECOND);
    ASSERT(c != NULL);
    struct af_state s = {0, pthread_self(), conc_chan_new(0, 1)};
    ASSERT(s.done != NULL);
    conc_after_func_t *h = conc_ctx_after_func(c, af_fn, &s);
    ASSERT(h != NULL);
    conc_ctx_t *c2 = conc_ctx_with_cancel(NULL);
    ASSERT(c2 != NULL);
    struct af_state s2 = {0};
    conc_after_func_t *h2 = conc_ctx_after_func(c2, af_fn, &s2);
    ASSERT(h2 != NULL);
    EXPECT(conc_after_func_stop(h2));
    conc_ctx_cancel(c2);
    conc_ctx_release(c2);
    EXPECT_EQ(s2.calls, 0);

    /* Stopped before the deadline (on a very slow machine the deadline may win: then fn
       runs, once, and stop says so). */
    bool stopped = conc_after_func_stop(h);
    EXPECT_EQ(conc_ctx_wait(c), CONC_DEADLINE_EXCEEDED);
    conc_ctx_release(c);
    if (stopped) {
        conc_ctx_t *later = conc_ctx_with_timeout(NULL, 30 * CONC_MILLISECOND);
        ASSERT(later != NULL);
        EXPECT_EQ(conc_chan_recv(s.done, NULL, later), CONC_DEADLINE_EXCEEDED);
        conc_ctx_release(later);
        EXPECT_EQ(s.calls, 0);
    } else {
        printf("# deadline won the race against stop\n");
        EXPECT_EQ(conc_chan_recv(s.done, NULL, NULL), 0);
        EXPECT_EQ(s.calls, 1);
    }
    conc_chan_free(s.done);
}

/* An after-func may use the context API itself: it runs after conc has let go of its
   locks. It sees its context ended, can register more (they run at once), derive from it,
   and cancel other contexts. */
struct reentrant {
    conc_ctx_t *ctx, *sibling;
    int err_seen, child_err, inner_calls;
    bool inner_stop;
};

static void reentrant_inner(void *arg) { ((struct reentrant *)arg)->inner_calls++; }

static void reentrant_fn(void *arg) {
    struct reentrant *r = arg;
    r->err_seen = conc_ctx_err(r->ctx);
    conc_after_func_t *h = conc_ctx_after_func(r->ctx, reentrant_inner, r);
    r->inner_stop = h ? conc_after_func_stop(h) : true;
    conc_ctx_t *k = conc_ctx_with_timeout(r->ctx, 3600 * CONC_SECOND);
    r->child_err = k ? conc_ctx_err(k) : -100;
    conc_ctx_release(k);
    conc_ctx_cancel_cause(r->sibling, 6);
}

TEST(after_func_may_call_into_conc) {
    conc_ctx_t *root = conc_ctx_with_cancel(NULL);
    ASSERT(root != NULL);
    struct reentrant r = {conc_ctx_with_cancel(root), conc_ctx_with_cancel(root), 0, 0, 0, true};
    ASSERT(r.ctx && r.sibling);
    conc_after_func_t *h = conc_ctx_after_func(r.ctx, reentrant_fn, &r);
    ASSERT(h != NULL);
    conc_ctx_cancel(r.ctx);
    EXPECT_EQ(r.err_seen, CONC_CANCELED);
    EXPECT_EQ(r.inner_calls, 1);
    EXPECT(!r.inner_stop);
    EXPECT_EQ(r.child_err, CONC_CANCELED);
    EXPECT_EQ(conc_ctx_cause(r.sibling), 6);
    EXPECT_EQ(conc_ctx_err(root), 0);
    EXPECT(!conc_after_func_stop(h));
    conc_ctx_release(r.sibling);
    conc_ctx_release(r.ctx);
    conc_ctx_release(root);
}

/* Go runs an AfterFunc in its own goroutine, so it may block; here a deadline's
   after-func runs on conc's timer thread. One that sleeps (or waits on anything that
   needs a timer) must still complete. A watchdog on plain pthreads tells a hang from a
   pass, since every conc timeout would hang with the timer thread. */
static pthread_mutex_t wd_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t wd_cv = PTHREAD_COND_INITIALIZER;
static int wd_done, wd_sleep_rc = -100;

static void sleepy_fn(void *arg) {
    (void)arg;
    int rc = conc_sleep(CONC_MILLISECOND, NULL);
    pthread_mutex_lock(&wd_mu);
    wd_sleep_rc = rc;
    wd_done = 1;
    pthread_cond_signal(&wd_cv);
    pthread_mutex_unlock(&wd_mu);
}

TEST(deadline_after_func_may_block_on_timers) {
    conc_ctx_t *c = conc_ctx_with_timeout(NULL, 5 * CONC_MILLISECOND);
    ASSERT(c != NULL);
    conc_after_func_t *h = conc_ctx_after_func(c, sleepy_fn, NULL);
    ASSERT(h != NULL);
    struct timespec until;
    clock_gettime(CLOCK_REALTIME, &until);
    until.tv_sec += 10;
    pthread_mutex_lock(&wd_mu);
    while (!wd_done && pthread_cond_timedwait(&wd_cv, &wd_mu, &until) == 0) {
    }
    int done = wd_done, rc = wd_sleep_rc;
    pthread_mutex_unlock(&wd_mu);
    if (!done) {
        /* The timer thread is stuck in sleepy_fn: exit handlers would wait for it. */
        printf("not ok - deadline_after_func_may_block_on_timers: conc_sleep inside a "
               "deadline's after-func never returned (timer thread deadlocked)\n");
        printf("Bail out!\n");
        fflush(stdout);
        _exit(1);
    }
    EXPECT_EQ(rc, 0);
    EXPECT(!conc_after_func_stop(h));
    conc_ctx_release(c);
}

/* ---- blocked channel calls woken by an ancestor ---- */

struct blocked {
    conc_chan_t *ch, *ready;
    conc_ctx_t *ctx;
    int mode; /* 0 recv, 1 select(ctx), 2 select(CONC_DONE), 3 send */
    int rc, status;
    int64_t woke;
};

static void *blocked_thread(void *arg) {
    struct blocked *b = arg;
    int v = 0;
    conc_chan_send(b->ready, &token, NULL);
    switch (b->mode) {
    case 0: b->rc = conc_chan_recv(b->ch, &v, b->ctx); break;
    case 1: {
        conc_case cs[2] = {CONC_RECV(b->ch, &v), CONC_RECV(NULL, &v)};
        b->rc = conc_select(cs, 2, b->ctx);
        break;
    }
    case 2: {
        conc_case cs[2] = {CONC_RECV(b->ch, &v), CONC_DONE(b->ctx)};
        b->rc = conc_select(cs, 2, NULL);
        if (b->rc == 1) b->status = cs[1].status;
        break;
    }
    default: b->rc = conc_chan_send(b->ch, &v, b->ctx); break;
    }
    b->woke = conc_now();
    return NULL;
}

static void run_blocked(int mode, int cap) {
    conc_ctx_t *root = conc_ctx_with_cancel(NULL);
    ASSERT(root != NULL);
    conc_ctx_t *mid = conc_ctx_with_value(root, &key_a, NULL);
    conc_ctx_t *leaf = mid ? conc_ctx_with_cancel(mid) : NULL;
    ASSERT(leaf != NULL);
    struct blocked b = {conc_chan_new(sizeof(int), (size_t)cap), conc_chan_new(0, 0), leaf, mode,
                        -100, -100, 0};
    ASSERT(b.ch && b.ready);
    int one = 1;
    if (mode == 3 && cap > 0) EXPECT_EQ(conc_chan_try_send(b.ch, &one), 0); /* fill it */
    pthread_t th = spawn_thread(blocked_thread, &b);
    EXPECT_EQ(conc_chan_recv(b.ready, NULL, NULL), 0);
    let_it_park();
    int64_t t0 = conc_now();
    conc_ctx_cancel_cause(root, 44);
    pthread_join(th, NULL);
    if (mode == 2) {
        EXPECT_EQ(b.rc, 1);
        EXPECT_EQ(b.status, CONC_CANCELED);
    } else {
        EXPECT_EQ(b.rc, CONC_CANCELED);
    }
    EXPECT(b.woke - t0 < 2 * CONC_SECOND);
    /* The channel is as if the call had never started. */
    int got = 0;
    if (mode == 3) {
        if (cap > 0) {
            EXPECT_EQ(conc_chan_len(b.ch), 1);
            EXPECT_EQ(conc_chan_try_recv(b.ch, &got), 0);
            EXPECT_EQ(got, 1);
        }
        EXPECT_EQ(conc_chan_try_recv(b.ch, &got), CONC_WOULD_BLOCK);
    } else {
        EXPECT_EQ(conc_chan_try_send(b.ch, &one), cap > 0 ? 0 : CONC_WOULD_BLOCK);
    }
    EXPECT_EQ(conc_chan_free(b.ch), 0);
    conc_chan_free(b.ready);
    conc_ctx_release(root);
    conc_ctx_release(mid);
    conc_ctx_release(leaf);
}

TEST(recv_woken_by_ancestor_cancel) {
    run_blocked(0, 0);
    run_blocked(0, 4);
}
TEST(select_woken_by_ancestor_cancel) {
    run_blocked(1, 0);
    run_blocked(1, 2);
}
TEST(select_done_case_fires_on_ancestor_cancel) { run_blocked(2, 0); }
TEST(send_woken_by_ancestor_cancel) {
    run_blocked(3, 0);
    run_blocked(3, 1);
}

TEST(recv_and_select_end_on_deadline) {
    conc_chan_t *ch = conc_chan_new(sizeof(int), 0);
    ASSERT(ch != NULL);
    int v;
    int64_t t0 = conc_now();
    conc_ctx_t *c = conc_ctx_with_timeout(NULL, 20 * CONC_MILLISECOND);
    ASSERT(c != NULL);
    EXPECT_EQ(conc_chan_recv(ch, &v, c), CONC_DEADLINE_EXCEEDED);
    EXPECT(conc_now() >= t0 + 20 * CONC_MILLISECOND);
    conc_ctx_release(c);

    t0 = conc_now();
    c = conc_ctx_with_timeout(NULL, 20 * CONC_MILLISECOND);
    conc_ctx_t *k = c ? conc_ctx_with_cancel(c) : NULL;
    ASSERT(k != NULL);
    conc_case cs[1] = {CONC_RECV(ch, &v)};
    EXPECT_EQ(conc_select(cs, 1, k), CONC_DEADLINE_EXCEEDED);
    EXPECT(conc_now() >= t0 + 20 * CONC_MILLISECOND);
    conc_ctx_release(k);
    conc_ctx_release(c);

    /* An already-ended context does not stop a call that can complete at once. */
    conc_chan_t *b = conc_chan_new(sizeof(int), 1);
    ASSERT(b != NULL);
    c = conc_ctx_with_cancel(NULL);
    ASSERT(c != NULL);
    conc_ctx_cancel(c);
    v = 9;
    EXPECT_EQ(conc_chan_send(b, &v, c), 0);
    EXPECT_EQ(conc_chan_send(b, &v, c), CONC_CANCELED);
    v = 0;
    EXPECT_EQ(conc_chan_recv(b, &v, c), 0);
    EXPECT_EQ(v, 9);
    EXPECT_EQ(conc_chan_recv(b, &v, c), CONC_CANCELED);
    conc_ctx_release(c);
    conc_chan_free(b);
    EXPECT_EQ(conc_chan_free(ch), 0);
}

int main(void) {
    RUN(background_never_ends);
    RUN(cancel_err_cause);
    RUN(cancel_cause_user_code);
    RUN(cancel_parent_ends_tree);
    RUN(cancel_child_spares_parent_and_siblings);
    RUN(deep_chain_no_recursion);
    RUN(deadline_and_timeout);
    RUN(deadline_is_min_of_own_and_parents);
    RUN(past_deadline_ends_at_once);
    RUN(cancel_before_deadline_stays_canceled);
    RUN(values_lookup_shadowing_missing);
    RUN(child_of_ended_parent_starts_ended);
    RUN(release_parent_before_child);
    RUN(wait_woken_by_cancel_from_other_thread);
    RUN(wait_returns_on_deadline_and_when_ended);
    RUN(after_func_on_cancel);
    RUN(after_func_on_deadline);
    RUN(after_func_on_parent_cancel);
    RUN(after_func_on_ended_ctx_runs_at_once);
    RUN(after_func_stop_before_end);
    RUN(after_func_may_call_into_conc);
    RUN(recv_woken_by_ancestor_cancel);
    RUN(select_woken_by_ancestor_cancel);
    RUN(select_done_case_fires_on_ancestor_cancel);
    RUN(send_woken_by_ancestor_cancel);
    RUN(recv_and_select_end_on_deadline);
    RUN(deadline_after_func_may_block_on_timers); /* last: on failure it ends the run */
    return tap_done();
}
