/* test_free_busy.c - conc_sem_free and conc_wg_free refuse (CONC_BUSY) while a thread is
   still inside conc_sem_acquire / conc_wg_wait, also one whose context has just ended.

   The interleaving: a waiter sleeps; its context is cancelled (the canceller claims it and
   wakes it); before it runs again, a release (or the last done) finds its waiter stale at
   the head and unlinks it; then free finds no waiter linked. The waiter, once it runs,
   still locks the object's mutex to leave: it must not have been freed.

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

int main(void) {
    pin_main();
    RUN(sem_free_waits_for_a_cancelled_acquire);
    RUN(wg_free_waits_for_a_cancelled_wait);
    unpin_main();
    for (size_t i = 0; i < quarantined; i++) free(quarantine[i]);
    return tap_done();
}
