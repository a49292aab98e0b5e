/* test_sem.c - weighted semaphores: basics and argument errors, FIFO with a large request
   at the head (not starved, not overtaken), try_acquire failing while others wait,
   over-release, cancellation and deadlines of blocked acquires (a cancelled head lets the
   next ones go), and the stress test: acquires cancelled while permits are being released
   and granted never lose or leak a permit.

   Go's golang.org/x/sync/semaphore is the reference. Threads are never ordered with sleeps:
   a test that needs a thread blocked polls the semaphore's queue (white box) until it is. */
#define CONC_IMPLEMENTATION
#include "conc.h"
#include "tap.h"
#include "test_util.h"

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>

static int queued(conc_sem_t *sem) {
    int n = 0;
    pthread_mutex_lock(&sem->mu);
    for (conc__waiter *w = sem->waiters.head; w; w = w->next) n++;
    pthread_mutex_unlock(&sem->mu);
    return n;
}

static void until_queued(conc_sem_t *sem, int n) {
    while (queued(sem) < n) sched_yield();
}

typedef struct acq_arg {
    conc_sem_t *sem;
    int64_t n;
    conc_ctx_t *ctx;
    int rc;
    int64_t took_ns;
    int64_t end; /* conc_now() when the call returned */
} acq_arg;

static void *acquirer(void *p) {
    acq_arg *a = (acq_arg *)p;
    int64_t t0 = conc_now();
    a->rc = conc_sem_acquire(a->sem, a->n, a->ctx);
    a->end = conc_now();
    a->took_ns = a->end - t0;
    return NULL;
}

/* ---- basics ---- */

TEST(sem_basics) {
    EXPECT(conc_sem_new(-1) == NULL);
    conc_sem_t *sem = conc_sem_new(3);
    ASSERT(sem != NULL);
    EXPECT_EQ(conc_sem_available(sem), 3);
    EXPECT_EQ(conc_sem_acquire(sem, 2, NULL), 0);
    EXPECT_EQ(conc_sem_available(sem), 1);
    EXPECT_EQ(conc_sem_try_acquire(sem, 2), CONC_WOULD_BLOCK);
    EXPECT_EQ(conc_sem_try_acquire(sem, 1), 0);
    EXPECT_EQ(conc_sem_available(sem), 0);
    EXPECT_EQ(conc_sem_try_acquire(sem, 0), 0);
    EXPECT_EQ(conc_sem_acquire(sem, 0, NULL), 0);
    EXPECT_EQ(conc_sem_release(sem, 3), 0);
    EXPECT_EQ(conc_sem_available(sem), 3);
    /* argument errors */
    EXPECT_EQ(conc_sem_acquire(sem, 4, NULL), CONC_INVALID); /* Go would block for ever */
    EXPECT_EQ(conc_sem_try_acquire(sem, 4), CONC_INVALID);
    EXPECT_EQ(conc_sem_acquire(sem, -1, NULL), CONC_INVALID);
    EXPECT_EQ(conc_sem_release(sem, -1), CONC_INVALID);
    EXPECT_EQ(conc_sem_acquire(NULL, 1, NULL), CONC_INVALID);
    EXPECT_EQ(conc_sem_try_acquire(NULL, 1), CONC_INVALID);
    EXPECT_EQ(conc_sem_release(NULL, 1), CONC_INVALID);
    EXPECT_EQ(conc_sem_available(NULL), 0);
    EXPECT_EQ(conc_sem_free(NULL), 0);
    /* an acquire that need not block completes even on an ended context */
    conc_ctx_t *c = conc_ctx_with_cancel(NULL);
    ASSERT(c != NULL);
    conc_ctx_cancel(c);
    EXPECT_EQ(conc_sem_acquire(sem, 3, c), 0);
    EXPECT_EQ(conc_sem_acquire(sem, 1, c), CONC_CANCELED); /* would block: the ctx's err */
    EXPECT_EQ(queued(sem), 0);
    EXPECT_EQ(conc_sem_release(sem, 3), 0);
    conc_ctx_release(c);
    EXPECT_EQ(conc_sem_free(sem), 0);

    conc_sem_t *zero = conc_sem_new(0);
    ASSERT(zero != NULL);
    EXPECT_EQ(conc_sem_acquire(zero, 0, NULL), 0);
    EXPECT_EQ(conc_sem_acquire(zero, 1, NULL), CONC_INVALID);
    EXPECT_EQ(conc_sem_free(zero), 0);
}

TEST(sem_over_release) {
    conc_sem_t *sem = conc_sem_new(5);
    ASSERT(sem != NULL);
    EXPECT_EQ(conc_sem_release(sem, 1), CONC_OVER_RELEASE);
    EXPECT_EQ(conc_sem_available(sem), 5);
    EXPECT_EQ(conc_sem_acquire(sem, 2, NULL), 0);
    EXPECT_EQ(conc_sem_release(sem, 3), CONC_OVER_RELEASE);
    EXPECT_EQ(conc_sem_available(sem), 3); /* unchanged */
    EXPECT_EQ(conc_sem_release(sem, 2), 0);
    EXPECT_EQ(conc_sem_available(sem), 5);
    EXPECT_EQ(conc_sem_release(sem, 0), 0);
    EXPECT_EQ(conc_sem_free(sem), 0);
}

/* ---- FIFO ---- */

TEST(sem_fifo_large_head_not_starved) {
    conc_sem_t *sem = conc_sem_new(10);
    ASSERT(sem != NULL);
    EXPECT_EQ(conc_sem_acquire(sem, 10, NULL), 0);
    acq_arg big = {sem, 8, NULL, 99, 0, 0}, small1 = {sem, 1, NULL, 99, 0, 0}, small2 = {sem, 2, NULL, 99, 0, 0};
    pthread_t tb = spawn_thread(acquirer, &big);
    until_queued(sem, 1);
    pthread_t ts1 = spawn_thread(acquirer, &small1);
    until_queued(sem, 2);
    pthread_t ts2 = spawn_thread(acquirer, &small2);
    until_queued(sem, 3);
    EXPECT_EQ(conc_sem_free(sem), CONC_BUSY);

    /* small releases: the small requests would fit, but the big head holds them back */
    EXPECT_EQ(conc_sem_release(sem, 3), 0);
    EXPECT_EQ(queued(sem), 3);
    EXPECT_EQ(conc_sem_available(sem), 3);
    EXPECT_EQ(conc_sem_try_acquire(sem, 1), CONC_WOULD_BLOCK); /* others wait */
    EXPECT_EQ(conc_sem_release(sem, 4), 0);
    EXPECT_EQ(queued(sem), 3);
    EXPECT_EQ(conc_sem_available(sem), 7);
    /* 8 available: the head is granted, the rest (which would have fitted before) wait on */
    EXPECT_EQ(conc_sem_release(sem, 1), 0);
    pthread_join(tb, NULL);
    EXPECT_EQ(big.rc, 0);
    EXPECT_EQ(conc_sem_available(sem), 0);
    EXPECT_EQ(queued(sem), 2);
    /* 2 available: small1 (1) is granted, small2 (2) does not fit in the 1 left */
    EXPECT_EQ(conc_sem_release(sem, 2), 0);
    pthread_join(ts1, NULL);
    EXPECT_EQ(small1.rc, 0);
    EXPECT_EQ(queued(sem), 1);
    EXPECT_EQ(conc_sem_available(sem), 1);
    EXPECT_EQ(conc_sem_release(sem, 6), 0); /* the rest of big's */
    pthread_join(ts2, NULL);
    EXPECT_EQ(small2.rc, 0);
    EXPECT_EQ(conc_sem_release(sem, 5), 0); /* big's last 2, small1's and small2's */
    EXPECT_EQ(conc_sem_available(sem), 10);
    EXPECT_EQ(conc_sem_free(sem), 0);
}

TEST(sem_try_acquire_fails_while_others_wait) {
    conc_sem_t *sem = conc_sem_new(4);
    ASSERT(sem != NULL);
    EXPECT_EQ(conc_sem_acquire(sem, 4, NULL), 0);
    acq_arg a = {sem, 2, NULL, 99, 0, 0};
    pthread_t t = spawn_thread(acquirer, &a);
    until_queued(sem, 1);
    EXPECT_EQ(conc_sem_release(sem, 1), 0);
    EXPECT_EQ(conc_sem_available(sem), 1);
    EXPECT_EQ(conc_sem_try_acquire(sem, 1), CONC_WOULD_BLOCK); /* would fit, but a waiter is first */
    EXPECT_EQ(conc_sem_release(sem, 1), 0);
    pthread_join(t, NULL);
    EXPECT_EQ(a.rc, 0);
    EXPECT_EQ(conc_sem_try_acquire(sem, 1), CONC_WOULD_BLOCK); /* none left */
    EXPECT_EQ(conc_sem_release(sem, 4), 0);
    EXPECT_EQ(conc_sem_try_acquire(sem, 4), 0);
    EXPECT_EQ(conc_sem_release(sem, 4), 0);
    EXPECT_EQ(conc_sem_free(sem), 0);
}

/* ---- cancellation ---- */

TEST(sem_cancel_at_head_lets_next_proceed) {
    conc_sem_t *sem = conc_sem_new(10);
    conc_ctx_t *ctx = conc_ctx_with_cancel(NULL);
    ASSERT(sem != NULL && ctx != NULL);
    EXPECT_EQ(conc_sem_acquire(sem, 6, NULL), 0); /* 4 left */
    acq_arg big = {sem, 8, ctx, 99, 0, 0}, small = {sem, 3, NULL, 99, 0, 0}, mid = {sem, 2, NULL, 99, 0, 0};
    pthread_t tb = spawn_thread(acquirer, &big);
    until_queued(sem, 1);
    pthread_t ts = spawn_thread(acquirer, &small);
    until_queued(sem, 2);
    pthread_t tm = spawn_thread(acquirer, &mid);
    until_queued(sem, 3);
    conc_ctx_cancel(ctx);
    pthread_join(tb, NULL);
    EXPECT_EQ(big.rc, CONC_CANCELED);
    pthread_join(ts, NULL); /* 3 of the 4 fit: granted once the head left */
    EXPECT_EQ(small.rc, 0);
    EXPECT_EQ(conc_sem_available(sem), 1);
    EXPECT_EQ(queued(sem), 1); /* mid (2) does not fit in 1 */
    EXPECT_EQ(conc_sem_release(sem, 3), 0);
    pthread_join(tm, NULL);
    EXPECT_EQ(mid.rc, 0);
    EXPECT_EQ(conc_sem_release(sem, 8), 0);
    EXPECT_EQ(conc_sem_available(sem), 10);
    conc_ctx_release(ctx);

    /* a cancelled waiter that is not at the head leaves the others as they were */
    ctx = conc_ctx_with_cancel(NULL);
    ASSERT(ctx != NULL);
    EXPECT_EQ(conc_sem_acquire(sem, 10, NULL), 0);
    acq_arg h = {sem, 5, NULL, 99, 0, 0}, c = {sem, 1, ctx, 99, 0, 0};
    pthread_t th = spawn_thread(acquirer, &h);
    until_queued(sem, 1);
    pthread_t tc = spawn_thread(acquirer, &c);
    until_queued(sem, 2);
    conc_ctx_cancel(ctx);
    pthread_join(tc, NULL);
    EXPECT_EQ(c.rc, CONC_CANCELED);
    EXPECT_EQ(queued(sem), 1);
    EXPECT_EQ(conc_sem_release(sem, 5), 0);
    pthread_join(th, NULL);
    EXPECT_EQ(h.rc, 0);
    EXPECT_EQ(conc_sem_release(sem, 10), 0);
    EXPECT_EQ(conc_sem_available(sem), 10);
    conc_ctx_release(ctx);
    EXPECT_EQ(conc_sem_free(sem), 0);
}

TEST(sem_acquire_deadline) {
    conc_sem_t *sem = conc_sem_new(2);
    ASSERT(sem != NULL);
    EXPECT_EQ(conc_sem_acquire(sem, 1, NULL), 0);
    conc_ctx_t *ctx = conc_ctx_with_timeout(NULL, 20 * CONC_MILLISECOND);
    ASSERT(ctx != NULL);
    acq_arg a = {sem, 2, ctx, 99, 0, 0};
    acquirer(&a);
    EXPECT_EQ(a.rc, CONC_DEADLINE_EXCEEDED);
    int64_t dl = 0;
    EXPECT(conc_ctx_deadline(ctx, &dl));
    EXPECT(a.end >= dl); /* not before the deadline */
    EXPECT_EQ(conc_sem_available(sem), 1);
    EXPECT_EQ(queued(sem), 0);
    conc_ctx_release(ctx);
    EXPECT_EQ(conc_sem_release(sem, 1), 0);
    EXPECT_EQ(conc_sem_free(sem), 0);
}

/* ---- stress: cancelled acquires racing releases ----
   ACQUIRERS threads loop: make a cancellable context, hand it to the canceller thread
   through their slot, acquire a random n (1..SIZE) with it, and if granted hold the
   permits a moment and release them. The canceller cancels whatever contexts it finds in
   the slots, at random moments, so cancels land before the acquire, while it waits, and
   just as a release grants it. Every successful acquire is counted into `in_use`, which
   must never pass SIZE; at the end every permit is back. */

#define SIZE 4
#define ACQUIRERS 3

typedef struct stress {
    conc_sem_t *sem;
    long iters;             /* per acquirer */
    _Atomic int in_use;     /* permits held by acquirers, by their own count */
    _Atomic int over;       /* times in_use passed SIZE */
    _Atomic int bad;        /* unexpected statuses */
    _Atomic long granted, cancelled, granted_late; /* late: granted though ctx had ended */
    _Atomic int running;
    _Atomic(conc_ctx_t *) slot[ACQUIRERS];
    _Atomic int taken[ACQUIRERS]; /* the canceller took slot i and has finished with it */
} stress;

typedef struct stress_arg {
    stress *s;
    int id;
} stress_arg;

static void *stress_acquirer(void *p) {
    stress_arg *sa = (stress_arg *)p;
    stress *s = sa->s;
    uint64_t x = 0x9E3779B97F4A7C15u * (uint64_t)(sa->id + 1);
    for (long i = 0; i < s->iters; i++) {
        x ^= x << 13, x ^= x >> 7, x ^= x << 17;
        int64_t n = 1 + (int64_t)(x % SIZE);
        conc_ctx_t *ctx = conc_ctx_with_cancel(NULL);
        if (!ctx) {
            atomic_fetch_add(&s->bad, 1);
            break;
        }
        atomic_store(&s->taken[sa->id], 0);
        CONC__HB_BEFORE(&s->slot[sa->id]); /* Helgrind: the test's own hand-offs */
        atomic_store(&s->slot[sa->id], ctx);
        int rc = conc_sem_acquire(s->sem, n, ctx);
        if (rc == 0) {
            int now = atomic_fetch_add(&s->in_use, (int)n) + (int)n;
            if (now > SIZE) atomic_fetch_add(&s->over, 1);
            atomic_fetch_add(&s->granted, 1);
            if (conc_ctx_err(ctx)) atomic_fetch_add(&s->granted_late, 1);
            if (x & 32) sched_yield();
            atomic_fetch_sub(&s->in_use, (int)n);
            if (conc_sem_release(s->sem, n) != 0) atomic_fetch_add(&s->bad, 1);
        } else if (rc == CONC_CANCELED) {
            atomic_fetch_add(&s->cancelled, 1);
        } else {
            atomic_fetch_add(&s->bad, 1);
        }
        /* take the context back; if the canceller has it, wait until it is done with it */
        if (atomic_exchange(&s->slot[sa->id], NULL) == NULL)
            while (!atomic_load(&s->taken[sa->id])) sched_yield();
        CONC__HB_AFTER(&s->taken[sa->id]);
        conc_ctx_release(ctx);
    }
    atomic_fetch_sub(&s->running, 1);
    return NULL;
}

static void *stress_canceller(void *p) {
    stress *s = (stress *)p;
    uint64_t x = 2463534242u;
    while (atomic_load(&s->running) > 0) {
        for (int i = 0; i < ACQUIRERS; i++) {
            x ^= x << 13, x ^= x >> 7, x ^= x << 17;
            if (x % 3 == 0) continue; /* leave some acquires alone */
            conc_ctx_t *ctx = atomic_exchange(&s->slot[i], NULL);
            if (!ctx) continue;
            CONC__HB_AFTER(&s->slot[i]);
            if (x & 8) sched_yield(); /* cancel sometimes later, while it waits or is granted */
            conc_ctx_cancel(ctx);
            CONC__HB_BEFORE(&s->taken[i]);
            atomic_store(&s->taken[i], 1);
        }
        sched_yield();
    }
    return NULL;
}

TEST(sem_stress_cancel_vs_release) {
    stress s;
    s.sem = conc_sem_new(SIZE);
    ASSERT(s.sem != NULL);
    s.iters = tap_iters(100000) / ACQUIRERS + 1;
    atomic_init(&s.in_use, 0);
    atomic_init(&s.over, 0);
    atomic_init(&s.bad, 0);
    atomic_init(&s.granted, 0);
    atomic_init(&s.cancelled, 0);
    atomic_init(&s.granted_late, 0);
    atomic_init(&s.running, ACQUIRERS);
    for (int i = 0; i < ACQUIRERS; i++) {
        atomic_init(&s.slot[i], NULL);
        atomic_init(&s.taken[i], 0);
    }
    stress_arg args[ACQUIRERS];
    pthread_t t[ACQUIRERS], c;
    for (int i = 0; i < ACQUIRERS; i++) {
        args[i] = (stress_arg){&s, i};
        t[i] = spawn_thread(stress_acquirer, &args[i]);
    }
    c = spawn_thread(stress_canceller, &s);
    for (int i = 0; i < ACQUIRERS; i++) pthread_join(t[i], NULL);
    pthread_join(c, NULL);
    printf("# %ld acquires: %ld granted (%ld of them after their ctx ended), %ld cancelled\n",
           s.iters * ACQUIRERS, atomic_load(&s.granted), atomic_load(&s.granted_late), atomic_load(&s.cancelled));
    EXPECT_EQ(atomic_load(&s.bad), 0);
    EXPECT_EQ(atomic_load(&s.over), 0);
    EXPECT_EQ(atomic_load(&s.granted) + atomic_load(&s.cancelled), s.iters * ACQUIRERS);
    EXPECT_EQ(conc_sem_available(s.sem), SIZE); /* no permit lost or leaked */
    EXPECT_EQ(queued(s.sem), 0);
    EXPECT_EQ(conc_sem_free(s.sem), 0);
}

int main(void) {
    RUN(sem_basics);
    RUN(sem_over_release);
    RUN(sem_fifo_large_head_not_starved);
    RUN(sem_try_acquire_fails_while_others_wait);
    RUN(sem_cancel_at_head_lets_next_proceed);
    RUN(sem_acquire_deadline);
    RUN(sem_stress_cancel_vs_release);
    return tap_done();
}
