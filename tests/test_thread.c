/* test_thread.c - conc_go, the thread registry and leak checks: tracked threads counted in
   a wait group, started from many threads at once (more than cores) and from inside each
   other; the live count and the list; a deliberately leaked thread found and named with its
   creation site; the grace period for a thread that is winding down; a check cut short by
   its context; service threads skipped; a signal context's thread counted until stop; ended
   threads reaped (joined) by conc.h.

   Threads are never ordered with sleeps: a thread that must be running waits on a context
   the test cancels. */
#define CONC_IMPLEMENTATION
#include "conc.h"
#include "tap.h"
#include "test_util.h"

#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <string.h>

static atomic_long ran;

static void count_one(void *arg) {
    (void)arg;
    atomic_fetch_add(&ran, 1);
}

/* Waits until the context passed as arg ends. */
static void wait_ctx(void *arg) { conc_ctx_wait((conc_ctx_t *)arg); }

/* How many registered threads with this purpose run now (white box: the list). */
static size_t running_with_purpose(const char *purpose) {
    conc_thread_info all[256];
    size_t n = conc_threads_list(all, 256), k = 0;
    for (size_t i = 0; i < n && i < 256; i++)
        if (strcmp(all[i].purpose, purpose) == 0) k++;
    return k;
}

/* How many records conc.h still holds (white box): running, or ended and not yet joined. */
static size_t records(void) {
    size_t n = 0;
    pthread_mutex_lock(&conc__threads.mu);
    for (conc__thread *t = conc__threads.head; t; t = t->next) n++;
    pthread_mutex_unlock(&conc__threads.mu);
    return n;
}

static bool ends_with(const char *s, const char *suffix) {
    size_t a = strlen(s), b = strlen(suffix);
    return a >= b && strcmp(s + a - b, suffix) == 0;
}

/* ---- conc_go ---- */

TEST(go_counts_in_wait_group) {
    conc_wg_t *wg = conc_wg_new();
    ASSERT(wg != NULL);
    atomic_store(&ran, 0);
    for (int i = 0; i < 20; i++) ASSERT_EQ(conc_go(wg, count_one, NULL), 0);
    EXPECT_EQ(conc_wg_wait(wg, NULL), 0);
    EXPECT_EQ(atomic_load(&ran), 20);
    EXPECT_EQ(conc_wg_count(wg), 0);
    EXPECT_EQ(conc_wg_free(wg), 0);
}

TEST(go_without_wait_group) {
    uint64_t scope = conc_leak_begin();
    atomic_store(&ran, 0);
    for (int i = 0; i < 5; i++) ASSERT_EQ(conc_go(NULL, count_one, NULL), 0);
    /* nothing to wait on but the registry: the check waits for them to end */
    EXPECT_EQ(conc_leak_check(scope, 10 * CONC_SECOND, NULL, NULL, 0, NULL), 0);
    EXPECT_EQ(atomic_load(&ran), 5);
}

TEST(go_invalid_leaves_group_alone) {
    conc_wg_t *wg = conc_wg_new();
    ASSERT(wg != NULL);
    EXPECT_EQ(conc_go(wg, NULL, NULL), CONC_INVALID);
    EXPECT_EQ(conc_wg_count(wg), 0);
    EXPECT_EQ(conc_wg_free(wg), 0);
}

/* conc_go from inside conc_go's threads: a tree of 1 + 3 + 9 + 27 threads. */
typedef struct tree_arg {
    conc_wg_t *wg;
    int depth;
} tree_arg;

static tree_arg tree_args[4];

static void tree_node(void *arg) {
    tree_arg *a = (tree_arg *)arg;
    atomic_fetch_add(&ran, 1);
    if (a->depth < 3)
        for (int i = 0; i < 3; i++)
            if (conc_go(a->wg, tree_node, &tree_args[a->depth + 1]) != 0) atomic_fetch_add(&ran, 1000000);
}

TEST(go_from_go_threads) {
    conc_wg_t *wg = conc_wg_new();
    ASSERT(wg != NULL);
    atomic_store(&ran, 0);
    for (int d = 0; d < 4; d++) tree_args[d] = (tree_arg){wg, d};
    ASSERT_EQ(conc_go(wg, tree_node, &tree_args[0]), 0);
    EXPECT_EQ(conc_wg_wait(wg, NULL), 0); /* every add happens before its parent's done */
    EXPECT_EQ(atomic_load(&ran), 1 + 3 + 9 + 27);
    EXPECT_EQ(conc_wg_free(wg), 0);
}

/* Several threads start tracked threads at once; afterwards every record is reaped. */
typedef struct storm_arg {
    conc_wg_t *wg;
    long n;
    uint64_t seed;
    atomic_long *failed;
} storm_arg;

static void *storm_starter(void *p) {
    storm_arg *a = (storm_arg *)p;
    for (long i = 0; i < a->n; i++) {
        jitter(&a->seed);
        if (conc_go(a->wg, count_one, NULL) != 0) atomic_fetch_add(a->failed, 1);
    }
    return NULL;
}

TEST(go_storm_then_reaped) {
    enum { STARTERS = 4 };
    conc_wg_t *wg = conc_wg_new();
    ASSERT(wg != NULL);
    atomic_long failed = 0;
    atomic_store(&ran, 0);
    long per = tap_iters(200);
    size_t before = records();
    pthread_t th[STARTERS];
    storm_arg args[STARTERS];
    for (int i = 0; i < STARTERS; i++) {
        args[i] = (storm_arg){wg, per, 0x9e3779b97f4a7c15ull * (uint64_t)(i + 1), &failed};
        spawn(&th[i], storm_starter, &args[i]);
    }
    for (int i = 0; i < STARTERS; i++) pthread_join(th[i], NULL);
    EXPECT_EQ(conc_wg_wait(wg, NULL), 0);
    EXPECT_EQ(atomic_load(&failed), 0);
    EXPECT_EQ(atomic_load(&ran), STARTERS * per);
    /* done comes after the thread's record is marked ended; the check reaps them all */
    EXPECT_EQ(conc_leak_check(0, 10 * CONC_SECOND, NULL, NULL, 0, NULL), 0);
    size_t after = records();
    EXPECT(after <= before);
    EXPECT_EQ(running_with_purpose("conc_go"), 0);
    EXPECT_EQ(conc_wg_free(wg), 0);
}

/* ---- live count and list ---- */

TEST(live_count_and_list) {
    conc_ctx_t *ctx = conc_ctx_with_cancel(NULL);
    ASSERT(ctx != NULL);
    conc_wg_t *wg = conc_wg_new();
    ASSERT(wg != NULL);
    size_t mine0 = running_with_purpose("conc_go");
    for (int i = 0; i < 3; i++) ASSERT_EQ(conc_go(wg, wait_ctx, ctx), 0);
    /* not against a count taken before: a service thread (timer, runner) may end its idle
       wait meanwhile */
    EXPECT(conc_threads_live() >= mine0 + 3);
    EXPECT_EQ(running_with_purpose("conc_go"), mine0 + 3);
    conc_thread_info one;
    EXPECT(conc_threads_list(&one, 1) >= 3); /* the count, even when out holds one */
    EXPECT(one.id > 0 && one.purpose != NULL && one.file != NULL && one.line > 0);
    conc_ctx_cancel(ctx);
    EXPECT_EQ(conc_wg_wait(wg, NULL), 0);
    EXPECT_EQ(running_with_purpose("conc_go"), mine0);
    EXPECT_EQ(conc_wg_free(wg), 0);
    conc_ctx_release(ctx);
}

/* ---- leak checks ---- */

TEST(leak_check_clean_scope) {
    uint64_t scope = conc_leak_begin();
    conc_wg_t *wg = conc_wg_new();
    ASSERT(wg != NULL);
    for (int i = 0; i < 4; i++) ASSERT_EQ(conc_go(wg, count_one, NULL), 0);
    EXPECT_EQ(conc_wg_wait(wg, NULL), 0);
    size_t n = 99;
    conc_thread_info leaked[4];
    EXPECT_EQ(conc_leak_check(scope, CONC_SECOND, NULL, leaked, 4, &n), 0);
    EXPECT_EQ(n, 0);
    EXPECT_EQ(conc_wg_free(wg), 0);
}

TEST(leak_check_names_the_leaked_thread) {
    conc_ctx_t *ctx = conc_ctx_with_cancel(NULL);
    ASSERT(ctx != NULL);
    conc_wg_t *wg = conc_wg_new();
    ASSERT(wg != NULL);
    uint64_t scope = conc_leak_begin();
    int line = __LINE__ + 1;
    ASSERT_EQ(conc_go(wg, wait_ctx, ctx), 0); /* the "leak": runs until ctx ends */
    conc_thread_info leaked[4];
    size_t n = 0;
    int64_t t0 = conc_now();
    EXPECT_EQ(conc_leak_check(scope, 50 * CONC_MILLISECOND, NULL, leaked, 4, &n), CONC_LEAKED);
    EXPECT(conc_now() - t0 >= 50 * CONC_MILLISECOND); /* it gave the grace period */
    EXPECT_EQ(n, 1);
    if (n >= 1) {
        EXPECT(strcmp(leaked[0].purpose, "conc_go") == 0);
        EXPECT(ends_with(leaked[0].file, "test_thread.c"));
        EXPECT_EQ(leaked[0].line, line);
        EXPECT(leaked[0].id > scope);
        EXPECT(!leaked[0].service);
        printf("# leaked thread #%llu (%s) started at %s:%d\n", (unsigned long long)leaked[0].id, leaked[0].purpose,
               leaked[0].file, leaked[0].line);
    }
    /* n counts them all even when leaked[] holds fewer */
    EXPECT_EQ(conc_leak_check(scope, 0, NULL, NULL, 0, &n), CONC_LEAKED);
    EXPECT_EQ(n, 1);
    conc_ctx_cancel(ctx);
    EXPECT_EQ(conc_wg_wait(wg, NULL), 0);
    EXPECT_EQ(conc_leak_check(scope, 10 * CONC_SECOND, NULL, leaked, 4, &n), 0);
    EXPECT_EQ(n, 0);
    EXPECT_EQ(conc_wg_free(wg), 0);
    conc_ctx_release(ctx);
}

/* Threads started before the scope began are not its business. */
TEST(leak_check_ignores_older_threads) {
    conc_ctx_t *ctx = conc_ctx_with_cancel(NULL);
    ASSERT(ctx != NULL);
    conc_wg_t *wg = conc_wg_new();
    ASSERT(wg != NULL);
    ASSERT_EQ(conc_go(wg, wait_ctx, ctx), 0);
    uint64_t scope = conc_leak_begin();
    EXPECT_EQ(conc_leak_check(scope, 0, NULL, NULL, 0, NULL), 0);
    uint64_t outer = scope - 1; /* a scope that began before it */
    size_t n = 0;
    EXPECT_EQ(conc_leak_check(outer, 0, NULL, NULL, 0, &n), CONC_LEAKED);
    EXPECT_EQ(n, 1);
    conc_ctx_cancel(ctx);
    EXPECT_EQ(conc_wg_wait(wg, NULL), 0);
    EXPECT_EQ(conc_wg_free(wg), 0);
    conc_ctx_release(ctx);
}

/* A thread that is still winding down when the check starts gets the grace period. */
static void nap_then_end(void *arg) {
    (void)arg;
    conc_sleep(30 * CONC_MILLISECOND, NULL);
}

TEST(leak_check_waits_for_winding_down) {
    uint64_t scope = conc_leak_begin();
    ASSERT_EQ(conc_go(NULL, nap_then_end, NULL), 0);
    int64_t t0 = conc_now();
    EXPECT_EQ(conc_leak_check(scope, 20 * CONC_SECOND, NULL, NULL, 0, NULL), 0);
    EXPECT(conc_now() - t0 < 20 * CONC_SECOND);
}

TEST(leak_check_cut_short_by_ctx) {
    conc_ctx_t *hold = conc_ctx_with_cancel(NULL);
    ASSERT(hold != NULL);
    conc_wg_t *wg = conc_wg_new();
    ASSERT(wg != NULL);
    uint64_t scope = conc_leak_begin();
    ASSERT_EQ(conc_go(wg, wait_ctx, hold), 0);
    conc_ctx_t *ctx = conc_ctx_with_timeout(NULL, 30 * CONC_MILLISECOND);
    ASSERT(ctx != NULL);
    size_t n = 0;
    int64_t t0 = conc_now();
    EXPECT_EQ(conc_leak_check(scope, 60 * CONC_SECOND, ctx, NULL, 0, &n), CONC_DEADLINE_EXCEEDED);
    EXPECT(conc_now() - t0 < 30 * CONC_SECOND);
    EXPECT_EQ(n, 1);
    conc_ctx_release(ctx);
    conc_ctx_cancel(hold);
    EXPECT_EQ(conc_wg_wait(wg, NULL), 0);
    EXPECT_EQ(conc_wg_free(wg), 0);
    conc_ctx_release(hold);
}

/* The timer thread starts inside the scope (first conc_sleep) and lingers a second: a
   service thread, listed but skipped by the check. */
TEST(leak_check_skips_service_threads) {
    uint64_t scope = conc_leak_begin();
    EXPECT_EQ(conc_sleep(CONC_MILLISECOND, NULL), 0);
    conc_thread_info all[64];
    size_t n = conc_threads_list(all, 64);
    bool timer_seen = false;
    for (size_t i = 0; i < n && i < 64; i++)
        if (strcmp(all[i].purpose, "timer") == 0) {
            timer_seen = true;
            EXPECT(all[i].service);
            EXPECT(ends_with(all[i].file, "conc.h"));
            EXPECT(all[i].id > scope); /* run first: no timer thread before it */
        }
    EXPECT(timer_seen);
    EXPECT_EQ(conc_leak_check(scope, 0, NULL, NULL, 0, NULL), 0);
}

/* A signal context's thread is the user's to stop: counted until conc_signal_stop, and
   named with the line of conc_signal_notify. */
TEST(leak_check_sees_signal_thread) {
    static const int sigs[] = {SIGUSR2};
    uint64_t scope = conc_leak_begin();
    conc_signal_t *s = NULL;
    int line = __LINE__ + 1;
    ASSERT_EQ(conc_signal_notify(NULL, sigs, 1, &s), 0);
    conc_thread_info leaked[2];
    size_t n = 0;
    EXPECT_EQ(conc_leak_check(scope, 0, NULL, leaked, 2, &n), CONC_LEAKED);
    EXPECT_EQ(n, 1);
    if (n >= 1) {
        EXPECT(strcmp(leaked[0].purpose, "signal") == 0);
        EXPECT(ends_with(leaked[0].file, "test_thread.c"));
        EXPECT_EQ(leaked[0].line, line);
    }
    conc_signal_stop(s);
    EXPECT_EQ(conc_leak_check(scope, 10 * CONC_SECOND, NULL, NULL, 0, &n), 0);
    EXPECT_EQ(n, 0);
}

/* Many scopes opened and checked while other threads start and end tracked threads: a
   check only ever reports threads of its own scope, and each is clean once its own
   threads are done. */
static atomic_int churn_stop;

static void *churner(void *p) {
    (void)p;
    conc_wg_t *wg = conc_wg_new();
    while (!atomic_load(&churn_stop)) {
        if (conc_go(wg, count_one, NULL) != 0) break;
        conc_wg_wait(wg, NULL);
    }
    conc_wg_free(wg);
    return NULL;
}

TEST(leak_scopes_under_churn) {
    atomic_store(&churn_stop, 0);
    pthread_t th[2];
    for (int i = 0; i < 2; i++) spawn(&th[i], churner, NULL);
    long rounds = tap_iters(100);
    int bad = 0;
    conc_ctx_t *ctx = conc_ctx_with_cancel(NULL);
    ASSERT(ctx != NULL);
    for (long r = 0; r < rounds; r++) {
        uint64_t scope = conc_leak_begin();
        conc_wg_t *wg = conc_wg_new();
        if (conc_go(wg, wait_ctx, ctx) != 0) bad++;
        conc_thread_info leaked[8];
        size_t n = 0;
        /* the churners' threads may be in scope too (started after begin): only ours may
           remain after their grace */
        int rc = conc_leak_check(scope, 0, NULL, leaked, 8, &n);
        if (rc != CONC_LEAKED || n < 1) bad++;
        conc_ctx_cancel(ctx);
        conc_wg_wait(wg, NULL);
        conc_wg_free(wg);
        conc_ctx_release(ctx);
        ctx = conc_ctx_with_cancel(NULL);
    }
    atomic_store(&churn_stop, 1);
    for (int i = 0; i < 2; i++) pthread_join(th[i], NULL);
    EXPECT_EQ(conc_leak_check(0, 10 * CONC_SECOND, NULL, NULL, 0, NULL), 0);
    EXPECT_EQ(bad, 0);
    conc_ctx_release(ctx);
}

/* A grace period of INT64_MAX ("as long as it takes"; a ctx may cut it short) waits like
   any long one: conc_now() + grace overflowed into the past and reported a leak at once. */
TEST(leak_check_longest_grace) {
    uint64_t scope = conc_leak_begin();
    ASSERT_EQ(conc_go(NULL, nap_then_end, NULL), 0);
    size_t n = 99;
    EXPECT_EQ(conc_leak_check(scope, INT64_MAX, NULL, NULL, 0, &n), 0);
    EXPECT_EQ(n, 0);
    EXPECT_EQ(conc_leak_check(scope, INT64_MAX, NULL, NULL, 0, NULL), 0); /* and it has ended */
}

int main(void) {
    /* SIGUSR2 blocked before any thread starts, as SIGNALS asks */
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGUSR2);
    pthread_sigmask(SIG_BLOCK, &set, NULL);

    RUN(leak_check_skips_service_threads); /* first: before any timer thread */
    RUN(go_counts_in_wait_group);
    RUN(go_without_wait_group);
    RUN(go_invalid_leaves_group_alone);
    RUN(go_from_go_threads);
    RUN(go_storm_then_reaped);
    RUN(live_count_and_list);
    RUN(leak_check_clean_scope);
    RUN(leak_check_names_the_leaked_thread);
    RUN(leak_check_ignores_older_threads);
    RUN(leak_check_waits_for_winding_down);
    RUN(leak_check_cut_short_by_ctx);
    RUN(leak_check_sees_signal_thread);
    RUN(leak_scopes_under_churn);
    RUN(leak_check_longest_grace);
    return tap_done();
}
