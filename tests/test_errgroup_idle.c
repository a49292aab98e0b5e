/* test_errgroup_idle.c - error groups (>>group): threads that have been idle for
   CONC_GROUP_IDLE_NS end, and a go racing with a thread that is just ending loses nothing.
   The idle time is set to 1 ms here so that the race happens all the time. */
#define CONC_GROUP_IDLE_NS (1000 * 1000)
#define CONC_IMPLEMENTATION
#include "conc.h"
#include "tap.h"
#include "test_util.h"

#include <stdatomic.h>

/* Live registry threads started since scope with this purpose. */
static int live_workers(uint64_t scope) {
    conc_thread_info info[256];
    size_t n = conc_threads_list(info, 256);
    int k = 0;
    for (size_t i = 0; i < n && i < 256; i++)
        if (info[i].id > scope && strcmp(info[i].purpose, "errgroup worker") == 0) k++;
    return k;
}

/* Polls (up to 5 s) until the group has no live thread and the registry lists none. */
static bool wait_all_ended(conc_group_t *g, uint64_t scope) {
    int64_t end = conc_now() + 5 * CONC_SECOND;
    conc_group_stats st;
    do {
        conc_group_stats_get(g, &st);
        if (st.threads_live == 0 && live_workers(scope) == 0) return true;
        nap();
    } while (conc_now() < end);
    return false;
}

static int task_count(void *arg, conc_ctx_t *ctx) {
    (void)ctx;
    atomic_fetch_add((_Atomic int64_t *)arg, 1);
    return 0;
}

typedef struct {
    conc_wg_t *in;     /* each task is done with it once running */
    conc_chan_t *gate; /* closed to let every task return */
    _Atomic int ran;
} burst_arg;

static int task_hold(void *arg, conc_ctx_t *ctx) {
    burst_arg *b = (burst_arg *)arg;
    (void)ctx;
    atomic_fetch_add(&b->ran, 1);
    conc_wg_done(b->in);
    int v;
    return conc_chan_recv(b->gate, &v, NULL) == CONC_CLOSED ? 0 : 1;
}

/* A burst of 8 tasks that all run at once needs 8 threads; once idle they all end, the
   registry forgets them, and the group starts new ones for the next tasks. */
TEST(idle_threads_end_and_new_ones_start) {
    uint64_t scope = conc_leak_begin();
    conc_group_t *g = conc_group_new(NULL);
    ASSERT(g != NULL);
    for (int round = 0; round < 3; round++) {
        burst_arg b = {conc_wg_new(), conc_chan_new(sizeof(int), 0), 0};
        ASSERT(b.in && b.gate);
        ASSERT_EQ(conc_wg_add(b.in, 8), 0);
        for (int i = 0; i < 8; i++) ASSERT_EQ(conc_group_go(g, task_hold, &b, NULL), 0);
        ASSERT_EQ(conc_wg_wait(b.in, NULL), 0); /* all 8 run at once: 8 threads */
        conc_group_stats st;
        conc_group_stats_get(g, &st);
        EXPECT_EQ(st.threads_live, 8);
        EXPECT_EQ(st.running, 8);
        EXPECT_EQ(live_workers(scope), 8);
        conc_chan_close(b.gate);
        EXPECT_EQ(conc_group_wait(g, NULL), 0);
        EXPECT_EQ(atomic_load(&b.ran), 8);
        EXPECT(wait_all_ended(g, scope));
        conc_group_stats_get(g, &st);
        EXPECT_EQ(st.threads, (uint64_t)(8 * (round + 1))); /* the next round starts new ones */
        EXPECT_EQ(st.finished, (uint64_t)(8 * (round + 1))); /* ended threads still count */
        EXPECT_EQ(st.started, (uint64_t)(8 * (round + 1)));
        conc_wg_free(b.in);
        conc_chan_free(b.gate);
    }
    /* a group with a limit, all of whose threads ended, starts one again */
    ASSERT_EQ(conc_group_set_limit(g, 1), 0);
    _Atomic int64_t n = 0;
    for (int i = 0; i < 100; i++) ASSERT_EQ(conc_group_go(g, task_count, (void *)&n, NULL), 0);
    EXPECT_EQ(conc_group_wait(g, NULL), 0);
    EXPECT_EQ(atomic_load(&n), 100);
    conc_group_stats st;
    conc_group_stats_get(g, &st);
    EXPECT(st.threads > 24);
    EXPECT(wait_all_ended(g, scope));
    conc_group_free(g);
    EXPECT_EQ(conc_leak_check(scope, CONC_SECOND, NULL, NULL, 0, NULL), 0);
}

typedef struct {
    conc_group_t *g;
    _Atomic int64_t *ran;
    int64_t gone; /* tasks this thread's go accepted */
    uint64_t seed;
    int rounds;
} racer_arg;

/* Bursts of go separated by pauses around the idle time: workers time out just as a go
   claims them (the go must win or lose cleanly: a task handed to a worker that then
   leaves would never run, and wait would never return). */
static void *racer(void *p) {
    racer_arg *a = (racer_arg *)p;
    for (int r = 0; r < a->rounds; r++) {
        int k = 1 + (int)(rnd(&a->seed) % 4);
        for (int i = 0; i < k; i++)
            if (conc_group_go(a->g, task_count, (void *)a->ran, NULL) == 0) a->gone++;
        uint64_t pause = rnd(&a->seed) % 2400; /* 0..2.4 ms: the idle time is 1 ms */
        if (pause < 200) jitter(&a->seed);
        else {
            struct timespec ts = {0, (long)pause * 1000};
            nanosleep(&ts, NULL);
        }
    }
    return NULL;
}

TEST(stress_go_races_idle_exit) {
    uint64_t scope = conc_leak_begin();
    for (int limit = -1; limit <= 2; limit += 3) { /* no limit, then a limit of 2 */
        conc_group_t *g = conc_group_new(NULL);
        ASSERT(g != NULL);
        ASSERT_EQ(conc_group_set_limit(g, limit), 0);
        _Atomic int64_t ran = 0;
        racer_arg a[3];
        pthread_t th[3];
        int rounds = (int)tap_iters(400);
        for (int i = 0; i < 3; i++) {
            a[i] = (racer_arg){g, &ran, 0, 0x9e3779b97f4a7c15ull * (uint64_t)(i + 1 + limit * 7), rounds};
            spawn(&th[i], racer, &a[i]);
        }
        for (int i = 0; i < 3; i++) pthread_join(th[i], NULL);
        conc_ctx_t *d = conc_ctx_with_timeout(NULL, 10 * CONC_SECOND);
        ASSERT(d != NULL);
        EXPECT_EQ(conc_group_wait(g, d), 0); /* a lost task would keep it waiting */
        conc_ctx_release(d);
        int64_t gone = a[0].gone + a[1].gone + a[2].gone;
        EXPECT_EQ(atomic_load(&ran), gone);
        conc_group_stats st;
        conc_group_stats_get(g, &st);
        EXPECT_EQ(st.started, (uint64_t)gone);
        EXPECT_EQ(st.finished, (uint64_t)gone);
        EXPECT(st.threads_live <= st.threads);
        if (limit > 0) EXPECT(st.threads_live <= (size_t)limit);
        printf("# limit %d: %lld tasks, %llu threads started\n", limit, (long long)gone, (unsigned long long)st.threads);
        EXPECT(wait_all_ended(g, scope));
        conc_group_free(g);
        if (tap__cur_failed) break;
    }
    EXPECT_EQ(conc_leak_check(scope, CONC_SECOND, NULL, NULL, 0, NULL), 0);
}

/* Freeing a group while its threads are ending on their own joins the rest and loses
   nothing: free races the idle exits. */
TEST(stress_free_races_idle_exit) {
    uint64_t scope = conc_leak_begin();
    uint64_t seed = 12345;
    for (int r = 0; r < (int)tap_iters(300); r++) {
        conc_group_t *g = conc_group_new(NULL);
        ASSERT(g != NULL);
        _Atomic int64_t ran = 0;
        int k = 1 + (int)(rnd(&seed) % 3);
        for (int i = 0; i < k; i++) ASSERT_EQ(conc_group_go(g, task_count, (void *)&ran, NULL), 0);
        EXPECT_EQ(conc_group_wait(g, NULL), 0);
        struct timespec ts = {0, (long)(rnd(&seed) % 1500) * 1000}; /* around the idle time */
        nanosleep(&ts, NULL);
        conc_group_free(g);
        EXPECT_EQ(atomic_load(&ran), k);
        if (tap__cur_failed) break;
    }
    EXPECT_EQ(conc_leak_check(scope, CONC_SECOND, NULL, NULL, 0, NULL), 0);
}

int main(void) {
    RUN(idle_threads_end_and_new_ones_start);
    RUN(stress_go_races_idle_exit);
    RUN(stress_free_races_idle_exit);
    return tap_done();
}
