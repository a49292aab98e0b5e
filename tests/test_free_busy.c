/* test_free_busy.c - conc_sem_free, conc_wg_free and conc_chan_free refuse (CONC_BUSY)
   while a thread is still inside conc_sem_acquire / conc_wg_wait / conc_chan_recv /
   conc_select, also one whose context has just ended, or whose select another channel
   completed.

   The interleaving: a waiter sleeps; its context is cancelled (the canceller claims it and
   wakes it), or a send on another channel of its select completes it; before it runs
   again, a release (the last done, a try_send) finds its waiter stale at the head and
   unlinks it; then free finds no waiter linked. The waiter, once it runs, still locks the
   object's lock to leave: it must not have been freed.

   To make the window wide, the blocked thread runs as SCHED_IDLE on the CPU of the main
   thread (Linux): once woken, it runs only when the main thread blocks (in the join).
   Frees go to a quarantine while the test runs, so that a free that comes too early is seen
   as a wrong status, not as a crash. White box: the test reads the waiter queues to know
   when the waiter sleeps. */
#define _GNU_SOURCE /* pthread_setaffinity_np, SCHED_IDLE */
#include <stdlib.h>
static void quarantine_free(void *p);
#define CONC_MALLOC(sz) malloc(sz)
#define CONC_FREE(p) quarantine_free(p)
#define CONC_IMPLEMENTATION
#include "conc.h"
#include "tap.h"
#include "test_util.h"

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>

static void *quarantine[1024];
static size_t quarantined;
static pthread_mutex_t quarantine_mu = PTHREAD_MUTEX_INITIALIZER;

static void quarantine_free(void *p) {
    if (!p) return;
    pthread_mutex_lock(&quarantine_mu);
    if (quarantined < sizeof quarantine / sizeof quarantine[0]) {
        quarantine[quarantined++] = p;
        p = NULL;
    }
    pthread_mutex_unlock(&quarantine_mu);
    free(p);
}

/* Whether the first waiter of q sleeps on its parker (not spinning: waking it takes a while). */
static bool head_sleeps(pthread_mutex_t *mu, conc__wq *q) {
    bool s;
    pthread_mutex_lock(mu);
    s = q->head && atomic_load(&q->head->sel->park) > CONC__PARK_DONE;
    pthread_mutex_unlock(mu);
    return s;
}

#if defined(__linux__) && defined(SCHED_IDLE)
static cpu_set_t main_cpu;
static void pin_main(void) {
    CPU_ZERO(&main_cpu);
    CPU_SET(sched_getcpu(), &main_cpu);
    pthread_setaffinity_np(pthread_self(), sizeof main_cpu, &main_cpu);
}
static void unpin_main(void) {
    cpu_set_t all;
    CPU_ZERO(&all);
    for (int i = 0; i < CPU_SETSIZE; i++) CPU_SET(i, &all);
    pthread_setaffinity_np(pthread_self(), sizeof all, &all);
}
/* the blocked thread: same CPU, runs only when nothing else there wants to */
static void idle_on_main_cpu(void) {
    struct sched_param sp = {0};
    pthread_setaffinity_np(pthread_self(), sizeof main_cpu, &main_cpu);
    pthread_setschedparam(pthread_self(), SCHED_IDLE, &sp);
}
#else
static void pin_main(void) {}
static void unpin_main(void) {}
static void idle_on_main_cpu(void) {}
#endif

typedef struct blocked_call {
    conc_sem_t *sem;
    conc_wg_t *wg;
    conc_ctx_t *ctx;
    _Atomic int returned;
    int rc;
} blocked_call;

static void *acquire_main(void *p) {
    blocked_call *b = (blocked_call *)p;
    idle_on_main_cpu();
    b->rc = conc_sem_acquire(b->sem, 1, b->ctx);
    atomic_store(&b->returned, 1);
    return NULL;
}

static void *wait_main(void *p) {
    blocked_call *b = (blocked_call *)p;
    idle_on_main_cpu();
    b->rc = conc_wg_wait(b->wg, b->ctx);
    atomic_store(&b->returned, 1);
    return NULL;
}

TEST(sem_free_waits_for_a_cancelled_acquire) {
    long rounds = tap_iters(20), early = 0;
    for (long k = 0; k < rounds; k++) {
        blocked_call b = {conc_sem_new(1), NULL, conc_ctx_with_cancel(NULL), 0, 99};
        ASSERT(b.sem && b.ctx);
        ASSERT_EQ(conc_sem_acquire(b.sem, 1, NULL), 0);
        pthread_t t = spawn_thread(acquire_main, &b);
        while (!head_sleeps(&b.sem->mu, &b.sem->waiters)) nap();
        conc_ctx_cancel(b.ctx);                  /* claims the waiter, wakes it */
        EXPECT_EQ(conc_sem_release(b.sem, 1), 0); /* unlinks it, stale, at the head */
        int rc = conc_sem_free(b.sem);
        if (rc == 0 && !atomic_load(&b.returned)) early++;
        pthread_join(t, NULL);
        EXPECT_EQ(b.rc, CONC_CANCELED);
        if (rc != 0) EXPECT_EQ(conc_sem_free(b.sem), 0);
        conc_ctx_release(b.ctx);
    }
    printf("# %ld of %ld frees came while the acquire still ran\n", early, rounds);
    EXPECT_EQ(early, 0);
}

TEST(wg_free_waits_for_a_cancelled_wait) {
    long rounds = tap_iters(20), early = 0;
    for (long k = 0; k < rounds; k++) {
        blocked_call b = {NULL, conc_wg_new(), conc_ctx_with_cancel(NULL), 0, 99};
        ASSERT(b.wg && b.ctx);
        ASSERT_EQ(conc_wg_add(b.wg, 1), 0);
        pthread_t t = spawn_thread(wait_main, &b);
        while (!head_sleeps(&b.wg->mu, &b.wg->waiters)) nap();
        conc_ctx_cancel(b.ctx);         /* claims the waiter, wakes it */
        EXPECT_EQ(conc_wg_done(b.wg), 0); /* to 0: unlinks it, stale */
        int rc = conc_wg_free(b.wg);
        if (rc == 0 && !atomic_load(&b.returned)) early++;
        pthread_join(t, NULL);
        EXPECT_EQ(b.rc, CONC_CANCELED);
        if (rc != 0) EXPECT_EQ(conc_wg_free(b.wg), 0);
        conc_ctx_release(b.ctx);
    }
    printf("# %ld of %ld frees came while the wait still ran\n", early, rounds);
    EXPECT_EQ(early, 0);
}

/* Channels: a receive whose context ended, or a select completed through another channel. */
typedef struct chan_call {
    conc_chan_t *ch, *other; /* other: the select's other channel (NULL: a plain receive) */
    conc_ctx_t *ctx;
    _Atomic int returned;
    int rc;
} chan_call;

static void *chan_recv_main(void *p) {
    chan_call *b = (chan_call *)p;
    int v = 0, u = 0;
    idle_on_main_cpu();
    if (b->other) {
        conc_case cs[2] = {conc_case_recv(b->other, &u, NULL), conc_case_recv(b->ch, &v, NULL)};
        b->rc = conc_select(cs, 2, NULL);
    } else {
        b->rc = conc_chan_recv(b->ch, &v, b->ctx);
    }
    atomic_store(&b->returned, 1);
    return NULL;
}

static bool chan_head_sleeps(conc_chan_t *ch) {
    bool s;
    conc__spin_lock(&ch->mu);
    s = ch->recvq.head && atomic_load(&ch->recvq.head->sel->park) > CONC__PARK_DONE;
    conc__spin_unlock(&ch->mu);
    return s;
}

static void chan_free_round(size_t cap, bool select, long *early) {
    chan_call b = {conc_chan_new(sizeof(int), cap), select ? conc_chan_new(sizeof(int), 0) : NULL,
                   select ? NULL : conc_ctx_with_cancel(NULL), 0, 99};
    ASSERT(b.ch && (select ? b.other != NULL : b.ctx != NULL));
    pthread_t t = spawn_thread(chan_recv_main, &b);
    while (!chan_head_sleeps(b.ch)) nap();
    int one = 1;
    if (select) EXPECT_EQ(conc_chan_try_send(b.other, &one), 0); /* completes the select */
    else conc_ctx_cancel(b.ctx);                                   /* claims the receive */
    int rc = conc_chan_try_send(b.ch, &one); /* pops the stale waiter (cap > 0: then buffers) */
    EXPECT_EQ(rc, cap > 0 ? 0 : CONC_WOULD_BLOCK);
    rc = conc_chan_free(b.ch);
    if (rc == 0 && !atomic_load(&b.returned)) ++*early;
    pthread_join(t, NULL);
    EXPECT_EQ(b.rc, select ? 0 : CONC_CANCELED);
    if (rc != 0) EXPECT_EQ(conc_chan_free(b.ch), 0);
    EXPECT_EQ(conc_chan_free(b.other), 0);
    conc_ctx_release(b.ctx);
}

TEST(chan_free_waits_for_a_cancelled_recv) {
    long rounds = tap_iters(20), early = 0;
    for (long k = 0; k < rounds; k++) chan_free_round(k % 2 ? 4 : 0, false, &early);
    printf("# %ld of %ld frees came while the receive still ran\n", early, rounds);
    EXPECT_EQ(early, 0);
}

TEST(chan_free_waits_for_a_select_completed_elsewhere) {
    long rounds = tap_iters(20), early = 0;
    for (long k = 0; k < rounds; k++) chan_free_round(k % 2 ? 4 : 0, true, &early);
    printf("# %ld of %ld frees came while the select still ran\n", early, rounds);
    EXPECT_EQ(early, 0);
}

int main(void) {
    pin_main();
    RUN(sem_free_waits_for_a_cancelled_acquire);
    RUN(wg_free_waits_for_a_cancelled_wait);
    RUN(chan_free_waits_for_a_cancelled_recv);
    RUN(chan_free_waits_for_a_select_completed_elsewhere);
    unpin_main();
    for (size_t i = 0; i < quarantined; i++) free(quarantine[i]);
    return tap_done();
}
