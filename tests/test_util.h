/* test_util.h - helpers shared by the test programs in tests/.

   Include it after "conc.h" and "tap.h". Everything here is static inline, so a program
   that does not use a helper gets no unused-function warning. Only helpers that are the
   same in several programs live here; a helper that one program needs differently stays
   in that program. */
#ifndef CONC_TEST_UTIL_H
#define CONC_TEST_UTIL_H

#include <pthread.h>
#include <sched.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

/* ---- threads ---- */

/* Starts fn(arg) on a new thread stored in *th; bails out of the whole TAP run if that fails. */
static inline void spawn(pthread_t *th, void *(*fn)(void *), void *arg) {
    if (pthread_create(th, NULL, fn, arg) != 0) {
        printf("Bail out! pthread_create failed\n");
        exit(1);
    }
}

/* The same, returning the thread. */
static inline pthread_t spawn_thread(void *(*fn)(void *), void *arg) {
    pthread_t t;
    spawn(&t, fn, arg);
    return t;
}

/* ---- randomness ---- */

/* xorshift64: the next value of the generator whose state is *s (never 0). */
static inline uint64_t rnd(uint64_t *s) {
    uint64_t x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return *s = x;
}

/* A little random delay: nothing, a few spins, or a yield. Shuffles who arrives first. */
static inline void jitter(uint64_t *s) {
    uint64_t r = rnd(s) % 8;
    if (r < 3) return;
    if (r < 6) {
        for (volatile int i = 0; i < (int)(r * 20); i++) {
        }
        return;
    }
    sched_yield();
}

/* ---- waiting until threads are blocked ---- */

/* Sleeps 200 us: the pause between two polls. */
static inline void nap(void) {
    struct timespec ts = {0, 200 * 1000};
    nanosleep(&ts, NULL);
}

/* Waits (at most `timeout` ns) until ch has seen at least `sends` blocked sends and `recvs`
   blocked receives: the blocked threads are then queued on ch. False on time-out. */
static inline bool wait_blocked_within(conc_chan_t *ch, uint64_t sends, uint64_t recvs, int64_t timeout) {
    int64_t end = conc_now() + timeout;
    for (;;) {
        conc_chan_stats s;
        conc_chan_stats_get(ch, &s);
        if (s.blocked_sends >= sends && s.blocked_recvs >= recvs) return true;
        if (conc_now() > end) return false;
        sched_yield();
        nap();
    }
}

/* wait_blocked_within with a 10 s guard (the unit tests). */
static inline bool wait_blocked(conc_chan_t *ch, uint64_t sends, uint64_t recvs) {
    return wait_blocked_within(ch, sends, recvs, 10 * CONC_SECOND);
}

/* wait_blocked_within with a 20 s guard (the stress tests, with many busy threads). */
static inline bool wait_blocked_long(conc_chan_t *ch, uint64_t sends, uint64_t recvs) {
    return wait_blocked_within(ch, sends, recvs, 20 * CONC_SECOND);
}

/* ---- one channel operation on its own thread ---- */

enum { OP_SEND, OP_RECV };

typedef struct op {
    pthread_t th;
    int kind;
    conc_chan_t *ch;
    conc_ctx_t *ctx;
    long val; /* SEND: the value; RECV: what arrived (pre-set to a marker) */
    int rc;
    int done; /* set under op_mu() once the operation has returned: read it with op_done */
} op;

/* The lock `done` goes through, so Helgrind sees the edge. */
static inline pthread_mutex_t *op_mu(void) {
    static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
    return &mu;
}

static inline void *op_main(void *arg) {
    op *o = arg;
    int rc = o->kind == OP_SEND ? conc_chan_send(o->ch, &o->val, o->ctx) : conc_chan_recv(o->ch, &o->val, o->ctx);
    o->rc = rc;
    pthread_mutex_lock(op_mu());
    { o->done = 1; }
    pthread_mutex_unlock(op_mu());
    return NULL;
}

/* Starts a send of val (OP_SEND) or a receive (OP_RECV, val the marker) on ch under ctx. */
static inline void op_start(op *o, int kind, conc_chan_t *ch, long val, conc_ctx_t *ctx) {
    o->kind = kind;
    o->ch = ch;
    o->ctx = ctx;
    o->val = val;
    o->rc = 12345;
    o->done = 0;
    spawn(&o->th, op_main, o);
}

static inline void op_join(op *o) { pthread_join(o->th, NULL); }

/* Whether the operation has returned (it may not be joined yet). */
static inline bool op_done(op *o) {
    int d;
    pthread_mutex_lock(op_mu());
    { d = o->done; }
    pthread_mutex_unlock(op_mu());
    return d != 0;
}

/* Starts an operation and waits until ch counts it as blocked (so ops queue in order). */
static inline void op_start_blocked(op *o, int kind, conc_chan_t *ch, long val, conc_ctx_t *ctx) {
    conc_chan_stats s;
    conc_chan_stats_get(ch, &s);
    op_start(o, kind, ch, val, ctx);
    EXPECT(wait_blocked(ch, s.blocked_sends + (kind == OP_SEND), s.blocked_recvs + (kind == OP_RECV)));
}

#endif /* CONC_TEST_UTIL_H */
