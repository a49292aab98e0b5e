/* test_chan.c - channels: rendezvous, buffering, close, contexts, order, statistics.

   Threads are never ordered with sleeps: a test that needs "this thread is blocked now"
   waits until conc_chan_stats_get() shows the blocked count rose (wait_blocked). */
#include <stdlib.h>

/* An allocator that fails on request, for this thread only. */
static _Thread_local int fail_allocs; /* fail the next n allocations */
static _Thread_local int fail_skip;   /* ... after letting this many through */
static void *test_malloc(size_t n) {
    if (fail_skip > 0) {
        fail_skip--;
        return malloc(n);
    }
    if (fail_allocs > 0) {
        fail_allocs--;
        return NULL;
    }
    return malloc(n);
}
#define CONC_MALLOC(sz) test_malloc(sz)
#define CONC_FREE(p) free(p)

#define CONC_IMPLEMENTATION
#include "conc.h"
#include "tap.h"
#include "test_util.h"

#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <time.h>

/* The one-operation threads (op_start, op_start_blocked, op_done) are in test_util.h. */

/* ---- basics ------------------------------------------------------------------------- */

TEST(new_len_cap_elem_size) {
    conc_chan_t *ch = conc_chan_new(sizeof(long), 5);
    ASSERT(ch != NULL);
    EXPECT_EQ(conc_chan_cap(ch), 5);
    EXPECT_EQ(conc_chan_elem_size(ch), sizeof(long));
    EXPECT_EQ(conc_chan_len(ch), 0);
    long v = 1;
    EXPECT_EQ(conc_chan_try_send(ch, &v), 0);
    EXPECT_EQ(conc_chan_send(ch, &v, NULL), 0);
    EXPECT_EQ(conc_chan_len(ch), 2);
    EXPECT_EQ(conc_chan_recv(ch, &v, NULL), 0);
    EXPECT_EQ(conc_chan_len(ch), 1);
    EXPECT_EQ(conc_chan_free(ch), 0);

    ch = conc_chan_new(3, 0);
    ASSERT(ch != NULL);
    EXPECT_EQ(conc_chan_cap(ch), 0);
    EXPECT_EQ(conc_chan_elem_size(ch), 3);
    EXPECT_EQ(conc_chan_len(ch), 0);
    EXPECT_EQ(conc_chan_free(ch), 0);

    /* size * cap overflows: NULL, not a tiny buffer. */
    EXPECT(conc_chan_new(SIZE_MAX / 2, 4) == NULL);
    EXPECT(conc_chan_new(((size_t)1 << (sizeof(size_t) * 4)) + 1, ((size_t)1 << (sizeof(size_t) * 4))) == NULL);
}

TEST(new_out_of_memory) {
    /* Whichever allocation fails, conc_chan_new returns NULL and leaks nothing (the
       memcheck run checks the leaks). */
    for (int skip = 0; skip < 4; skip++) {
        for (size_t cap = 0; cap <= 8; cap += 8) {
            fail_skip = skip;
            fail_allocs = 1;
            conc_chan_t *ch = conc_chan_new(sizeof(long), cap);
            bool failed = fail_allocs == 0; /* an allocation was refused */
            fail_skip = fail_allocs = 0;
            if (failed) {
                EXPECT(ch == NULL);
            } else {
                ASSERT(ch != NULL);
                long v = 1;
                EXPECT_EQ(conc_chan_try_send(ch, &v), cap ? 0 : CONC_WOULD_BLOCK);
            }
            EXPECT_EQ(conc_chan_free(ch), 0);
        }
    }
}

TEST(null_arguments) {
    long v = 7;
    EXPECT_EQ(conc_chan_send(NULL, &v, NULL), CONC_INVALID);
    EXPECT_EQ(conc_chan_recv(NULL, &v, NULL), CONC_INVALID);
    EXPECT_EQ(conc_chan_try_send(NULL, &v), CONC_INVALID);
    EXPECT_EQ(conc_chan_try_recv(NULL, &v), CONC_INVALID);
    EXPECT_EQ(conc_chan_close(NULL), CONC_INVALID);
    EXPECT_EQ(conc_chan_free(NULL), 0);
    EXPECT_EQ(v, 7);
    /* A send needs a value to copy unless elements are empty. */
    conc_chan_t *ch = conc_chan_new(sizeof(long), 1);
    conc_chan_t *z = conc_chan_new(0, 1);
    ASSERT(ch && z);
    EXPECT_EQ(conc_chan_send(ch, NULL, NULL), CONC_INVALID);
    EXPECT_EQ(conc_chan_try_send(ch, NULL), CONC_INVALID);
    EXPECT_EQ(conc_chan_len(ch), 0);
    EXPECT_EQ(conc_chan_try_send(z, NULL), 0);
    EXPECT_EQ(conc_chan_try_recv(z, NULL), 0);
    EXPECT_EQ(conc_chan_free(ch), 0);
    EXPECT_EQ(conc_chan_free(z), 0);
    /* An ended context does not turn INVALID into CANCELED. */
    conc_ctx_t *c = conc_ctx_with_cancel(NULL);
    conc_ctx_cancel(c);
    EXPECT_EQ(conc_chan_send(NULL, &v, c), CONC_INVALID);
    EXPECT_EQ(conc_chan_recv(NULL, &v, c), CONC_INVALID);
    conc_ctx_release(c);
}

TEST(unbuffered_rendezvous) {
    conc_chan_t *ch = conc_chan_new(sizeof(long), 0);
    ASSERT(ch != NULL);
    long v = 0;
    /* Nobody on the other side: the try_ forms would block. */
    EXPECT_EQ(conc_chan_try_send(ch, &v), CONC_WOULD_BLOCK);
    EXPECT_EQ(conc_chan_try_recv(ch, &v), CONC_WOULD_BLOCK);

    /* A send does not return before a receiver has taken its value. */
    op s;
    op_start_blocked(&s, OP_SEND, ch, 42, NULL);
    for (int i = 0; i < 200; i++) sched_yield();
    EXPECT(!op_done(&s));
    EXPECT_EQ(conc_chan_len(ch), 0);
    EXPECT_EQ(conc_chan_try_recv(ch, &v), 0);
    EXPECT_EQ(v, 42);
    op_join(&s);
    EXPECT_EQ(s.rc, 0);
    EXPECT_EQ(conc_chan_try_recv(ch, &v), CONC_WOULD_BLOCK);

    /* A blocked receiver takes a value handed over by try_send. */
    op r;
    op_start_blocked(&r, OP_RECV, ch, -1, NULL);
    EXPECT(!op_done(&r));
    v = 43;
    EXPECT_EQ(conc_chan_try_send(ch, &v), 0);
    op_join(&r);
    EXPECT_EQ(r.rc, 0);
    EXPECT_EQ(r.val, 43);

    /* Send from this thread: when it returns, the receiver owns the value. */
    op_start(&r, OP_RECV, ch, -1, NULL);
    v = 44;
    EXPECT_EQ(conc_chan_send(ch, &v, NULL), 0);
    op_join(&r);
    EXPECT_EQ(r.rc, 0);
    EXPECT_EQ(r.val, 44);
    EXPECT_EQ(conc_chan_free(ch), 0);
}

typedef struct pingpong {
    conc_chan_t *ping, *pong;
    long n;
} pingpong;

static void *pong_main(void *arg) {
    pingpong *p = arg;
    for (long i = 0; i < p->n; i++) {
        long v;
        if (conc_chan_recv(p->ping, &v, NULL) != 0) return NULL;
        v = v * 2 + 1;
        if (conc_chan_send(p->pong, &v, NULL) != 0) return NULL;
    }
    return NULL;
}

TEST(unbuffered_ping_pong) {
    pingpong p = {conc_chan_new(sizeof(long), 0), conc_chan_new(sizeof(long), 0), tap_iters(20000)};
    ASSERT(p.ping && p.pong);
    pthread_t th;
    ASSERT(pthread_create(&th, NULL, pong_main, &p) == 0);
    long bad = 0;
    for (long i = 0; i < p.n; i++) {
        long v = i;
        if (conc_chan_send(p.ping, &v, NULL) != 0) bad++;
        if (conc_chan_recv(p.pong, &v, NULL) != 0 || v != i * 2 + 1) bad++;
    }
    pthread_join(th, NULL);
    EXPECT_EQ(bad, 0);
    EXPECT_EQ(conc_chan_free(p.ping), 0);
    EXPECT_EQ(conc_chan_free(p.pong), 0);
}

TEST(buffered_fifo) {
    conc_chan_t *ch = conc_chan_new(sizeof(long), 8);
    ASSERT(ch != NULL);
    for (long i = 0; i < 8; i++) EXPECT_EQ(conc_chan_try_send(ch, &i), 0);
    long v = 99;
    EXPECT_EQ(conc_chan_try_send(ch, &v), CONC_WOULD_BLOCK);
    EXPECT_EQ(conc_chan_len(ch), 8);
    for (long i = 0; i < 8; i++) {
        EXPECT_EQ(conc_chan_try_recv(ch, &v), 0);
        EXPECT_EQ(v, i);
    }
    EXPECT_EQ(conc_chan_try_recv(ch, &v), CONC_WOULD_BLOCK);
    EXPECT_EQ(conc_chan_len(ch), 0);
    EXPECT_EQ(conc_chan_free(ch), 0);

    /* Wrap the ring many times with a varying fill level. */
    ch = conc_chan_new(sizeof(long), 3);
    ASSERT(ch != NULL);
    long next_in = 0, next_out = 0, bad = 0;
    for (long round = 0; round < 1000; round++) {
        long level = next_in - next_out; /* never blocks: at most cap buffered */
        long k = 1 + round % 3;
        if (k > 3 - level) k = 3 - level;
        for (long j = 0; j < k; j++, next_in++)
            if (conc_chan_send(ch, &next_in, NULL) != 0) bad++;
        if ((long)conc_chan_len(ch) != next_in - next_out) bad++;
        long m = 1 + (round * 7) % (level + k);
        for (long j = 0; j < m; j++, next_out++)
            if (conc_chan_recv(ch, &v, NULL) != 0 || v != next_out) bad++;
    }
    while (next_out < next_in) {
        if (conc_chan_try_recv(ch, &v) != 0 || v != next_out) bad++;
        next_out++;
    }
    EXPECT_EQ(bad, 0);
    EXPECT_EQ(conc_chan_len(ch), 0);
    EXPECT_EQ(conc_chan_free(ch), 0);
}

TEST(recv_null_discards) {
    conc_chan_t *ch = conc_chan_new(sizeof(long), 2);
    ASSERT(ch != NULL);
    long v = 5;
    EXPECT_EQ(conc_chan_send(ch, &v, NULL), 0);
    v = 6;
    EXPECT_EQ(conc_chan_send(ch, &v, NULL), 0);
    EXPECT_EQ(conc_chan_recv(ch, NULL, NULL), 0);
    EXPECT_EQ(conc_chan_try_recv(ch, &v), 0);
    EXPECT_EQ(v, 6);
    EXPECT_EQ(conc_chan_try_recv(ch, NULL), CONC_WOULD_BLOCK);
    EXPECT_EQ(conc_chan_close(ch), 0);
    EXPECT_EQ(conc_chan_recv(ch, NULL, NULL), CONC_CLOSED);
    EXPECT_EQ(conc_chan_free(ch), 0);
}

/* ---- element sizes ------------------------------------------------------------------ */

typedef struct zsend {
    conc_chan_t *ch;
    int n, ok;
} zsend;

static void *zero_sender(void *arg) {
    zsend *z = arg;
    char dummy = 0;
    for (int i = 0; i < z->n; i++)
        if (conc_chan_send(z->ch, &dummy, NULL) == 0) z->ok++;
    return NULL;
}

TEST(elem_size_zero) {
    char dummy = 0;
    conc_chan_t *ch = conc_chan_new(0, 4);
    ASSERT(ch != NULL);
    EXPECT_EQ(conc_chan_elem_size(ch), 0);
    for (int i = 0; i < 4; i++) EXPECT_EQ(conc_chan_try_send(ch, &dummy), 0);
    EXPECT_EQ(conc_chan_try_send(ch, &dummy), CONC_WOULD_BLOCK);
    EXPECT_EQ(conc_chan_len(ch), 4);
    for (int i = 0; i < 4; i++) EXPECT_EQ(conc_chan_recv(ch, &dummy, NULL), 0);
    EXPECT_EQ(conc_chan_try_recv(ch, &dummy), CONC_WOULD_BLOCK);
    EXPECT_EQ(conc_chan_try_send(ch, &dummy), 0);
    EXPECT_EQ(conc_chan_close(ch), 0);
    EXPECT_EQ(conc_chan_recv(ch, NULL, NULL), 0);
    EXPECT_EQ(conc_chan_recv(ch, NULL, NULL), CONC_CLOSED);
    EXPECT_EQ(conc_chan_free(ch), 0);

    /* Unbuffered signals, as chan struct{}. */
    ch = conc_chan_new(0, 0);
    ASSERT(ch != NULL);
    zsend z = {ch, 1000, 0};
    pthread_t th;
    ASSERT(pthread_create(&th, NULL, zero_sender, &z) == 0);
    int got = 0;
    for (int i = 0; i < 1000; i++)
        if (conc_chan_recv(ch, (i & 1) ? NULL : &dummy, NULL) == 0) got++;
    pthread_join(th, NULL);
    EXPECT_EQ(got, 1000);
    EXPECT_EQ(z.ok, 1000);
    EXPECT_EQ(conc_chan_free(ch), 0);
}

typedef struct big {
    unsigned char b[1000];
} big;

static void big_fill(big *x, unsigned seed) {
    for (unsigned i = 0; i < sizeof x->b; i++) x->b[i] = (unsigned char)(seed * 131u + i * 7u + (i >> 8));
}
static bool big_check(const big *x, unsigned seed) {
    big y;
    big_fill(&y, seed);
    return memcmp(x->b, y.b, sizeof y.b) == 0;
}

typedef struct bigsend {
    conc_chan_t *ch;
    unsigned n;
} bigsend;

static void *big_sender(void *arg) {
    bigsend *bs = arg;
    for (unsigned i = 0; i < bs->n; i++) {
        big x;
        big_fill(&x, i);
        if (conc_chan_send(bs->ch, &x, NULL) != 0) break;
    }
    return NULL;
}

TEST(large_elements) {
    for (size_t cap = 0; cap <= 4; cap += 4) {
        conc_chan_t *ch = conc_chan_new(sizeof(big), cap);
        ASSERT(ch != NULL);
        EXPECT_EQ(conc_chan_elem_size(ch), sizeof(big));
        bigsend bs = {ch, 300};
        pthread_t th;
        ASSERT(pthread_create(&th, NULL, big_sender, &bs) == 0);
        int bad = 0;
        for (unsigned i = 0; i < bs.n; i++) {
            big x;
            memset(&x, 0xEE, sizeof x);
            if (conc_chan_recv(ch, &x, NULL) != 0 || !big_check(&x, i)) bad++;
        }
        pthread_join(th, NULL);
        EXPECT_EQ(bad, 0);
        /* The zeroed element of a closed channel covers all 1000 bytes. */
        EXPECT_EQ(conc_chan_close(ch), 0);
        big x;
        memset(&x, 0xAA, sizeof x);
        EXPECT_EQ(conc_chan_recv(ch, &x, NULL), CONC_CLOSED);
        big zero;
        memset(&zero, 0, sizeof zero);
        EXPECT(memcmp(&x, &zero, sizeof x) == 0);
        EXPECT_EQ(conc_chan_free(ch), 0);
    }
}

/* ---- close -------------------------------------------------------------------------- */

TEST(close_buffered_drains_then_closed) {
    conc_chan_t *ch = conc_chan_new(sizeof(long), 4);
    ASSERT(ch != NULL);
    for (long i = 1; i <= 3; i++) EXPECT_EQ(conc_chan_send(ch, &i, NULL), 0);
    EXPECT_EQ(conc_chan_close(ch), 0);
    EXPECT_EQ(conc_chan_close(ch), CONC_CLOSED);
    long v = 9;
    EXPECT_EQ(conc_chan_try_send(ch, &v), CONC_CLOSED);
    EXPECT_EQ(conc_chan_send(ch, &v, NULL), CONC_CLOSED);
    EXPECT_EQ(conc_chan_len(ch), 3);
    for (long i = 1; i <= 3; i++) {
        EXPECT_EQ(conc_chan_recv(ch, &v, NULL), 0);
        EXPECT_EQ(v, i);
    }
    v = 0x5A5A5A5A;
    EXPECT_EQ(conc_chan_recv(ch, &v, NULL), CONC_CLOSED);
    EXPECT_EQ(v, 0);
    v = 0x5A5A5A5A;
    EXPECT_EQ(conc_chan_try_recv(ch, &v), CONC_CLOSED);
    EXPECT_EQ(v, 0);
    EXPECT_EQ(conc_chan_len(ch), 0);
    EXPECT_EQ(conc_chan_close(ch), CONC_CLOSED);
    EXPECT_EQ(conc_chan_free(ch), 0);
}

TEST(close_unbuffered) {
    conc_chan_t *ch = conc_chan_new(sizeof(long), 0);
    ASSERT(ch != NULL);
    EXPECT_EQ(conc_chan_close(ch), 0);
    EXPECT_EQ(conc_chan_close(ch), CONC_CLOSED);
    long v = 3;
    EXPECT_EQ(conc_chan_send(ch, &v, NULL), CONC_CLOSED);
    EXPECT_EQ(conc_chan_try_send(ch, &v), CONC_CLOSED);
    v = -1;
    EXPECT_EQ(conc_chan_recv(ch, &v, NULL), CONC_CLOSED);
    EXPECT_EQ(v, 0);
    v = -1;
    EXPECT_EQ(conc_chan_try_recv(ch, &v), CONC_CLOSED);
    EXPECT_EQ(v, 0);
    EXPECT_EQ(conc_chan_free(ch), 0);
}

TEST(close_wakes_blocked_receivers) {
    for (size_t cap = 0; cap <= 2; cap += 2) {
        conc_chan_t *ch = conc_chan_new(sizeof(long), cap);
        ASSERT(ch != NULL);
        op r[4];
        for (int i = 0; i < 4; i++) op_start_blocked(&r[i], OP_RECV, ch, -1, NULL);
        EXPECT_EQ(conc_chan_close(ch), 0);
        for (int i = 0; i < 4; i++) {
            op_join(&r[i]);
            EXPECT_EQ(r[i].rc, CONC_CLOSED);
            EXPECT_EQ(r[i].val, 0);
        }
        EXPECT_EQ(conc_chan_free(ch), 0);
    }
}

TEST(close_wakes_blocked_senders) {
    /* Unbuffered: every blocked sender gets CONC_CLOSED and no value survives. */
    conc_chan_t *ch = conc_chan_new(sizeof(long), 0);
    ASSERT(ch != NULL);
    op s[4];
    for (int i = 0; i < 4; i++) op_start_blocked(&s[i], OP_SEND, ch, 100 + i, NULL);
    EXPECT_EQ(conc_chan_close(ch), 0);
    for (int i = 0; i < 4; i++) {
        op_join(&s[i]);
        EXPECT_EQ(s[i].rc, CONC_CLOSED);
    }
    long v = -1;
    EXPECT_EQ(conc_chan_try_recv(ch, &v), CONC_CLOSED);
    EXPECT_EQ(v, 0);
    EXPECT_EQ(conc_chan_free(ch), 0);

    /* Buffered and full: blocked senders get CONC_CLOSED; only the buffered values drain. */
    ch = conc_chan_new(sizeof(long), 2);
    ASSERT(ch != NULL);
    for (long i = 1; i <= 2; i++) EXPECT_EQ(conc_chan_send(ch, &i, NULL), 0);
    for (int i = 0; i < 4; i++) op_start_blocked(&s[i], OP_SEND, ch, 100 + i, NULL);
    EXPECT_EQ(conc_chan_close(ch), 0);
    for (int i = 0; i < 4; i++) {
        op_join(&s[i]);
        EXPECT_EQ(s[i].rc, CONC_CLOSED);
    }
    EXPECT_EQ(conc_chan_len(ch), 2);
    for (long i = 1; i <= 2; i++) {
        EXPECT_EQ(conc_chan_recv(ch, &v, NULL), 0);
        EXPECT_EQ(v, i);
    }
    EXPECT_EQ(conc_chan_recv(ch, &v, NULL), CONC_CLOSED);
    EXPECT_EQ(conc_chan_free(ch), 0);
}

/* ---- free --------------------------------------------------------------------------- */

TEST(free_with_blocked_waiter_is_busy) {
    conc_chan_t *ch = conc_chan_new(sizeof(long), 0);
    ASSERT(ch != NULL);
    op r;
    op_start_blocked(&r, OP_RECV, ch, -1, NULL);
    EXPECT_EQ(conc_chan_free(ch), CONC_BUSY);
    long v = 11;
    EXPECT_EQ(conc_chan_send(ch, &v, NULL), 0); /* the channel still works */
    op_join(&r);
    EXPECT_EQ(r.rc, 0);
    EXPECT_EQ(r.val, 11);

    op s;
    op_start_blocked(&s, OP_SEND, ch, 12, NULL);
    EXPECT_EQ(conc_chan_free(ch), CONC_BUSY);
    EXPECT_EQ(conc_chan_close(ch), 0);
    op_join(&s);
    EXPECT_EQ(s.rc, CONC_CLOSED);
    EXPECT_EQ(conc_chan_free(ch), 0);

    /* A full buffered channel with a blocked sender. */
    ch = conc_chan_new(sizeof(long), 1);
    ASSERT(ch != NULL);
    EXPECT_EQ(conc_chan_send(ch, &v, NULL), 0);
    op_start_blocked(&s, OP_SEND, ch, 13, NULL);
    EXPECT_EQ(conc_chan_free(ch), CONC_BUSY);
    EXPECT_EQ(conc_chan_recv(ch, &v, NULL), 0);
    EXPECT_EQ(v, 11);
    op_join(&s);
    EXPECT_EQ(s.rc, 0);
    EXPECT_EQ(conc_chan_recv(ch, &v, NULL), 0);
    EXPECT_EQ(v, 13);
    EXPECT_EQ(conc_chan_free(ch), 0); /* an open, empty channel frees fine */
}

/* ---- contexts ----------------------------------------------------------------------- */

TEST(cancel_blocked_recv_leaves_channel_untouched) {
    /* PITFALLS 21: a cancelled receive leaves the channel as if it never started. */
    for (size_t cap = 0; cap <= 2; cap += 2) {
        conc_chan_t *ch = conc_chan_new(sizeof(long), cap);
        ASSERT(ch != NULL);
        conc_ctx_t *c = conc_ctx_with_cancel(NULL);
        ASSERT(c != NULL);
        op r;
        op_start_blocked(&r, OP_RECV, ch, -7, c);
        conc_ctx_cancel(c);
        op_join(&r);
        EXPECT_EQ(r.rc, CONC_CANCELED);
        EXPECT_EQ(r.val, -7); /* nothing written */
        long v = 1;
        if (cap == 0) {
            /* No stale receiver left to swallow a value. */
            EXPECT_EQ(conc_chan_try_send(ch, &v), CONC_WOULD_BLOCK);
        } else {
            EXPECT_EQ(conc_chan_len(ch), 0);
            EXPECT_EQ(conc_chan_try_send(ch, &v), 0);
            v = 2;
            EXPECT_EQ(conc_chan_try_send(ch, &v), 0);
            EXPECT_EQ(conc_chan_try_send(ch, &v), CONC_WOULD_BLOCK);
            EXPECT_EQ(conc_chan_len(ch), 2);
            EXPECT_EQ(conc_chan_try_recv(ch, &v), 0);
            EXPECT_EQ(v, 1);
            EXPECT_EQ(conc_chan_try_recv(ch, &v), 0);
            EXPECT_EQ(v, 2);
        }
        EXPECT_EQ(conc_chan_try_recv(ch, &v), CONC_WOULD_BLOCK);
        conc_ctx_release(c);
        EXPECT_EQ(conc_chan_free(ch), 0); /* no waiter left behind */
    }
}

TEST(cancel_blocked_send_leaves_channel_untouched) {
    /* Unbuffered: the cancelled value is not delivered later. */
    conc_chan_t *ch = conc_chan_new(sizeof(long), 0);
    ASSERT(ch != NULL);
    conc_ctx_t *c = conc_ctx_with_cancel(NULL);
    op s;
    op_start_blocked(&s, OP_SEND, ch, 77, c);
    conc_ctx_cancel(c);
    op_join(&s);
    EXPECT_EQ(s.rc, CONC_CANCELED);
    long v = -1;
    EXPECT_EQ(conc_chan_try_recv(ch, &v), CONC_WOULD_BLOCK);
    EXPECT_EQ(v, -1);
    conc_ctx_release(c);
    EXPECT_EQ(conc_chan_free(ch), 0);

    /* Full buffer: the buffer keeps exactly what it had. */
    ch = conc_chan_new(sizeof(long), 2);
    ASSERT(ch != NULL);
    for (long i = 1; i <= 2; i++) EXPECT_EQ(conc_chan_send(ch, &i, NULL), 0);
    c = conc_ctx_with_cancel(NULL);
    op_start_blocked(&s, OP_SEND, ch, 77, c);
    conc_ctx_cancel(c);
    op_join(&s);
    EXPECT_EQ(s.rc, CONC_CANCELED);
    EXPECT_EQ(conc_chan_len(ch), 2);
    for (long i = 1; i <= 2; i++) {
        EXPECT_EQ(conc_chan_try_recv(ch, &v), 0);
        EXPECT_EQ(v, i);
    }
    EXPECT_EQ(conc_chan_try_recv(ch, &v), CONC_WOULD_BLOCK);
    conc_ctx_release(c);
    EXPECT_EQ(conc_chan_free(ch), 0);
}

TEST(cancel_middle_waiter_keeps_queue_order) {
    /* Receivers A, B(ctx), C queue in that order; B is cancelled; A and C still get the
       values in order. */
    conc_chan_t *ch = conc_chan_new(sizeof(long), 0);
    ASSERT(ch != NULL);
    conc_ctx_t *c = conc_ctx_with_cancel(NULL);
    op r[3];
    op_start_blocked(&r[0], OP_RECV, ch, -1, NULL);
    op_start_blocked(&r[1], OP_RECV, ch, -1, c);
    op_start_blocked(&r[2], OP_RECV, ch, -1, NULL);
    conc_ctx_cancel(c);
    op_join(&r[1]);
    EXPECT_EQ(r[1].rc, CONC_CANCELED);
    long v = 1;
    EXPECT_EQ(conc_chan_send(ch, &v, NULL), 0);
    v = 2;
    EXPECT_EQ(conc_chan_send(ch, &v, NULL), 0);
    op_join(&r[0]);
    op_join(&r[2]);
    EXPECT_EQ(r[0].rc, 0);
    EXPECT_EQ(r[0].val, 1);
    EXPECT_EQ(r[2].rc, 0);
    EXPECT_EQ(r[2].val, 2);
    conc_ctx_release(c);

    /* Same with senders. */
    c = conc_ctx_with_cancel(NULL);
    op s[3];
    op_start_blocked(&s[0], OP_SEND, ch, 10, NULL);
    op_start_blocked(&s[1], OP_SEND, ch, 11, c);
    op_start_blocked(&s[2], OP_SEND, ch, 12, NULL);
    conc_ctx_cancel(c);
    op_join(&s[1]);
    EXPECT_EQ(s[1].rc, CONC_CANCELED);
    EXPECT_EQ(conc_chan_recv(ch, &v, NULL), 0);
    EXPECT_EQ(v, 10);
    EXPECT_EQ(conc_chan_recv(ch, &v, NULL), 0);
    EXPECT_EQ(v, 12);
    op_join(&s[0]);
    op_join(&s[2]);
    EXPECT_EQ(s[0].rc, 0);
    EXPECT_EQ(s[2].rc, 0);
    EXPECT_EQ(conc_chan_try_recv(ch, &v), CONC_WOULD_BLOCK);
    conc_ctx_release(c);
    EXPECT_EQ(conc_chan_free(ch), 0);
}

TEST(cancel_returns_err_not_cause) {
    conc_chan_t *ch = conc_chan_new(sizeof(long), 0);
    ASSERT(ch != NULL);
    conc_ctx_t *c = conc_ctx_with_cancel(NULL);
    op r;
    op_start_blocked(&r, OP_RECV, ch, -1, c);
    conc_ctx_cancel_cause(c, 77);
    op_join(&r);
    EXPECT_EQ(r.rc, CONC_CANCELED);
    EXPECT_EQ(conc_ctx_cause(c), 77);
    conc_ctx_release(c);

    /* A child whose parent is cancelled reports the parent's err. */
    conc_ctx_t *parent = conc_ctx_with_cancel(NULL);
    conc_ctx_t *child = conc_ctx_with_cancel(parent);
    op_start_blocked(&r, OP_RECV, ch, -1, child);
    conc_ctx_cancel(parent);
    op_join(&r);
    EXPECT_EQ(r.rc, CONC_CANCELED);
    conc_ctx_release(child);
    conc_ctx_release(parent);
    EXPECT_EQ(conc_chan_free(ch), 0);
}

TEST(deadline_exceeded) {
    conc_chan_t *ch = conc_chan_new(sizeof(long), 0);
    conc_chan_t *bch = conc_chan_new(sizeof(long), 1);
    ASSERT(ch && bch);
    long v = 1;

    int64_t t0 = conc_now();
    conc_ctx_t *c = conc_ctx_with_timeout(NULL, 30 * CONC_MILLISECOND);
    EXPECT_EQ(conc_chan_recv(ch, &v, c), CONC_DEADLINE_EXCEEDED);
    int64_t dt = conc_now() - t0;
    EXPECT(dt >= 30 * CONC_MILLISECOND);
    EXPECT(dt < 5 * CONC_SECOND);
    EXPECT_EQ(conc_ctx_err(c), CONC_DEADLINE_EXCEEDED);
    conc_ctx_release(c);

    t0 = conc_now();
    c = conc_ctx_with_timeout(NULL, 20 * CONC_MILLISECOND);
    EXPECT_EQ(conc_chan_send(ch, &v, c), CONC_DEADLINE_EXCEEDED);
    EXPECT(conc_now() - t0 >= 20 * CONC_MILLISECOND);
    conc_ctx_release(c);

    /* A full buffered channel. */
    EXPECT_EQ(conc_chan_send(bch, &v, NULL), 0);
    c = conc_ctx_with_timeout(NULL, 10 * CONC_MILLISECOND);
    v = 2;
    EXPECT_EQ(conc_chan_send(bch, &v, c), CONC_DEADLINE_EXCEEDED);
    conc_ctx_release(c);
    EXPECT_EQ(conc_chan_len(bch), 1);

    /* A deadline already in the past: a blocking operation fails at once... */
    c = conc_ctx_with_deadline(NULL, conc_now() - CONC_SECOND);
    EXPECT_EQ(conc_chan_recv(ch, &v, c), CONC_DEADLINE_EXCEEDED);
    EXPECT_EQ(conc_chan_send(bch, &v, c), CONC_DEADLINE_EXCEEDED);
    /* ... but a ready one completes. */
    EXPECT_EQ(conc_chan_recv(bch, &v, c), 0);
    EXPECT_EQ(v, 1);
    EXPECT_EQ(conc_chan_send(bch, &v, c), 0);
    conc_ctx_release(c);

    /* A deadline passing while other receivers wait: only the timed one leaves. */
    op r;
    op_start_blocked(&r, OP_RECV, ch, -1, NULL);
    c = conc_ctx_with_timeout(NULL, 10 * CONC_MILLISECOND);
    EXPECT_EQ(conc_chan_recv(ch, &v, c), CONC_DEADLINE_EXCEEDED);
    conc_ctx_release(c);
    v = 5;
    EXPECT_EQ(conc_chan_send(ch, &v, NULL), 0);
    op_join(&r);
    EXPECT_EQ(r.rc, 0);
    EXPECT_EQ(r.val, 5);

    EXPECT_EQ(conc_chan_free(ch), 0);
    EXPECT_EQ(conc_chan_free(bch), 0);
}

TEST(ready_operation_ignores_ended_ctx) {
    conc_ctx_t *c = conc_ctx_with_cancel(NULL);
    conc_ctx_cancel(c);
    conc_chan_t *b = conc_chan_new(sizeof(long), 1);
    conc_chan_t *u = conc_chan_new(sizeof(long), 0);
    ASSERT(b && u);
    long v = 3;
    /* Buffered: room to send, then a value to receive. */
    EXPECT_EQ(conc_chan_send(b, &v, c), 0);
    EXPECT_EQ(conc_chan_send(b, &v, c), CONC_CANCELED); /* full now: would block */
    v = 0;
    EXPECT_EQ(conc_chan_recv(b, &v, c), 0);
    EXPECT_EQ(v, 3);
    EXPECT_EQ(conc_chan_recv(b, &v, c), CONC_CANCELED); /* empty: would block */

    /* Unbuffered with a waiting peer. */
    op r;
    op_start_blocked(&r, OP_RECV, u, -1, NULL);
    v = 8;
    EXPECT_EQ(conc_chan_send(u, &v, c), 0);
    op_join(&r);
    EXPECT_EQ(r.rc, 0);
    EXPECT_EQ(r.val, 8);
    op s;
    op_start_blocked(&s, OP_SEND, u, 9, NULL);
    EXPECT_EQ(conc_chan_recv(u, &v, c), 0);
    EXPECT_EQ(v, 9);
    op_join(&s);
    EXPECT_EQ(s.rc, 0);
    EXPECT_EQ(conc_chan_send(u, &v, c), CONC_CANCELED);
    EXPECT_EQ(conc_chan_recv(u, &v, c), CONC_CANCELED);

    /* Closed: the outcome is CONC_CLOSED, which needs no waiting. */
    EXPECT_EQ(conc_chan_close(b), 0);
    EXPECT_EQ(conc_chan_send(b, &v, c), CONC_CLOSED);
    v = 4;
    EXPECT_EQ(conc_chan_recv(b, &v, c), CONC_CLOSED);
    EXPECT_EQ(v, 0);
    conc_ctx_release(c);
    EXPECT_EQ(conc_chan_free(b), 0);
    EXPECT_EQ(conc_chan_free(u), 0);
}

/* ---- order -------------------------------------------------------------------------- */

TEST(blocked_receivers_fifo) {
    enum { N = 6 };
    for (size_t cap = 0; cap <= 3; cap += 3) {
        conc_chan_t *ch = conc_chan_new(sizeof(long), cap);
        ASSERT(ch != NULL);
        op r[N];
        for (int i = 0; i < N; i++) op_start_blocked(&r[i], OP_RECV, ch, -1, NULL);
        for (long i = 0; i < N; i++) EXPECT_EQ(conc_chan_send(ch, &i, NULL), 0);
        for (int i = 0; i < N; i++) {
            op_join(&r[i]);
            EXPECT_EQ(r[i].rc, 0);
            EXPECT_EQ(r[i].val, i);
        }
        EXPECT_EQ(conc_chan_len(ch), 0);
        EXPECT_EQ(conc_chan_free(ch), 0);
    }
}

TEST(freed_slot_completes_blocked_sender) {
    /* A buffered receive that frees a slot while a sender waits moves that sender's value
       in before it returns - also when it took the value without the lock - so the sender
       returns without any further receive. */
    for (size_t cap = 1; cap <= 3; cap++) {
        conc_chan_t *ch = conc_chan_new(sizeof(long), cap);
        ASSERT(ch != NULL);
        for (long i = 0; i < (long)cap; i++) EXPECT_EQ(conc_chan_send(ch, &i, NULL), 0);
        op s;
        op_start_blocked(&s, OP_SEND, ch, 99, NULL);
        long v = -1;
        EXPECT_EQ(conc_chan_recv(ch, &v, NULL), 0);
        EXPECT_EQ(v, 0);
        op_join(&s);
        EXPECT_EQ(s.rc, 0);
        EXPECT_EQ(conc_chan_len(ch), cap);
        for (long i = 1; i <= (long)cap; i++) {
            EXPECT_EQ(conc_chan_try_recv(ch, &v), 0);
            EXPECT_EQ(v, i < (long)cap ? i : 99);
        }
        EXPECT_EQ(conc_chan_try_recv(ch, &v), CONC_WOULD_BLOCK);
        EXPECT_EQ(conc_chan_free(ch), 0);
    }
}

TEST(blocked_senders_fifo) {
    enum { N = 6 };
    /* Unbuffered. */
    conc_chan_t *ch = conc_chan_new(sizeof(long), 0);
    ASSERT(ch != NULL);
    op s[N];
    for (int i = 0; i < N; i++) op_start_blocked(&s[i], OP_SEND, ch, i, NULL);
    for (long i = 0; i < N; i++) {
        long v = -1;
        EXPECT_EQ(conc_chan_recv(ch, &v, NULL), 0);
        EXPECT_EQ(v, i);
    }
    for (int i = 0; i < N; i++) {
        op_join(&s[i]);
        EXPECT_EQ(s[i].rc, 0);
    }
    EXPECT_EQ(conc_chan_free(ch), 0);

    /* Full buffer: the buffered values come first, then the senders' in arrival order. */
    ch = conc_chan_new(sizeof(long), 2);
    ASSERT(ch != NULL);
    for (long i = 100; i < 102; i++) EXPECT_EQ(conc_chan_send(ch, &i, NULL), 0);
    for (int i = 0; i < N; i++) op_start_blocked(&s[i], OP_SEND, ch, i, NULL);
    long expect[N + 2] = {100, 101};
    for (int i = 0; i < N; i++) expect[i + 2] = i;
    for (int i = 0; i < N + 2; i++) {
        long v = -1, late = -2;
        EXPECT_EQ(conc_chan_recv(ch, &v, NULL), 0);
        EXPECT_EQ(v, expect[i]);
        /* while senders are queued, each freed slot goes to the first of them: a newcomer
           never sees room (what lets a waiting send watch the count without overtaking) */
        if (i < N) EXPECT_EQ(conc_chan_try_send(ch, &late), CONC_WOULD_BLOCK);
    }
    for (int i = 0; i < N; i++) {
        op_join(&s[i]);
        EXPECT_EQ(s[i].rc, 0);
    }
    EXPECT_EQ(conc_chan_len(ch), 0);
    EXPECT_EQ(conc_chan_free(ch), 0);
}

/* ---- signals ------------------------------------------------------------------------ */

static void on_signal(int sig) { (void)sig; }

/* PITFALLS 11: a signal delivered to a blocked thread (handler installed without
   SA_RESTART, so interruptible calls see EINTR) neither fails the call nor loses the
   wake-up that follows, and a deadline still holds. */
TEST(signals_do_not_disturb_blocked_calls) {
    struct sigaction sa, old;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = 0;
    ASSERT(sigaction(SIGUSR1, &sa, &old) == 0);

    conc_chan_t *ch = conc_chan_new(sizeof(long), 0);
    ASSERT(ch != NULL);
    op r;
    op_start_blocked(&r, OP_RECV, ch, -1, NULL);
    for (int i = 0; i < 50; i++) {
        pthread_kill(r.th, SIGUSR1);
        sched_yield();
    }
    EXPECT(!op_done(&r));
    long v = 5;
    EXPECT_EQ(conc_chan_send(ch, &v, NULL), 0);
    op_join(&r);
    EXPECT_EQ(r.rc, 0);
    EXPECT_EQ(r.val, 5);

    /* A sender, and a timed receive, pelted with signals. */
    op s;
    op_start_blocked(&s, OP_SEND, ch, 6, NULL);
    for (int i = 0; i < 50; i++) {
        pthread_kill(s.th, SIGUSR1);
        sched_yield();
    }
    EXPECT(!op_done(&s));
    EXPECT_EQ(conc_chan_recv(ch, &v, NULL), 0);
    EXPECT_EQ(v, 6);
    op_join(&s);
    EXPECT_EQ(s.rc, 0);

    int64_t t0 = conc_now();
    conc_ctx_t *c = conc_ctx_with_timeout(NULL, 30 * CONC_MILLISECOND);
    /* not op_start_blocked: on a loaded machine (Valgrind, parallel tests) the thread may
       start after the deadline, and then it never blocks */
    op_start(&r, OP_RECV, ch, -1, c);
    while (!op_done(&r)) {
        pthread_kill(r.th, SIGUSR1);
        sched_yield();
        nap();
    }
    op_join(&r);
    EXPECT_EQ(r.rc, CONC_DEADLINE_EXCEEDED);
    EXPECT(conc_now() - t0 >= 30 * CONC_MILLISECOND);
    conc_ctx_release(c);
    EXPECT_EQ(conc_chan_free(ch), 0);
    sigaction(SIGUSR1, &old, NULL);
}

/* ---- statistics --------------------------------------------------------------------- */

/* ---- the stack a blocked call used --------------------------------------------------- */

/* A blocked call's waiter lives on its own stack (STYLE 15); once the call has returned,
   that memory is the caller's again, for anything - a mutex, say. Under DRD a happens-
   before annotation conc.h made on the waiter outlived the frame (DRD ignores
   ANNOTATE_HAPPENS_BEFORE_FORGET_ALL, and keeps what it knows of a dead stack unless run
   with --check-stack-var=yes), and a mutex made there later was "not a mutex". Here two
   receives block - one woken by a sender, one by its deadline - then a mutex is made,
   used and destroyed at every 8-byte step of the stack below. Only DRD can fail it. */
static void *send_to_blocked_receiver(void *arg) {
    conc_chan_t *ch = arg;
    long v = 7;
    EXPECT(wait_blocked(ch, 0, 1));
    EXPECT_EQ(conc_chan_send(ch, &v, NULL), 0);
    return NULL;
}

__attribute__((noinline)) static void block_twice(conc_chan_t *ch) {
    long v = 0;
    pthread_t t = spawn_thread(send_to_blocked_receiver, ch);
    EXPECT_EQ(conc_chan_recv(ch, &v, NULL), 0);
    EXPECT_EQ(v, 7);
    pthread_join(t, NULL);
    conc_ctx_t *ctx = conc_ctx_with_timeout(NULL, CONC_MILLISECOND);
    ASSERT(ctx != NULL);
    EXPECT_EQ(conc_chan_recv(ch, &v, ctx), CONC_DEADLINE_EXCEEDED);
    conc_ctx_release(ctx);
}

/* Called from where block_twice was, so its array covers the frames block_twice's calls had. */
__attribute__((noinline)) static int mutexes_over_the_stack(void) {
    _Alignas(pthread_mutex_t) unsigned char area[16384];
    int failed = 0;
    for (size_t off = 0; off + sizeof(pthread_mutex_t) <= sizeof area; off += 8) {
        pthread_mutex_t *m = (pthread_mutex_t *)(void *)(area + off);
        if (pthread_mutex_init(m, NULL) != 0) {
            failed++;
            continue;
        }
        if (pthread_mutex_lock(m) != 0 || pthread_mutex_unlock(m) != 0) failed++;
        if (pthread_mutex_destroy(m) != 0) failed++;
    }
    return failed;
}

TEST(blocked_call_leaves_its_stack_reusable) {
    conc_chan_t *ch = conc_chan_new(sizeof(long), 0);
    ASSERT(ch != NULL);
    block_twice(ch);
    EXPECT_EQ(mutexes_over_the_stack(), 0);
    EXPECT_EQ(conc_chan_free(ch), 0);
}

TEST(stats) {
    conc_chan_t *ch = conc_chan_new(sizeof(long), 4);
    ASSERT(ch != NULL);
    conc_chan_stats s;
    conc_chan_stats_get(ch, &s);
    EXPECT_EQ(s.high_water, 0);
    EXPECT_EQ(s.sends, 0);
    EXPECT_EQ(s.recvs, 0);
    EXPECT_EQ(s.blocked_sends, 0);
    EXPECT_EQ(s.blocked_recvs, 0);
    EXPECT_EQ(s.send_wait_ns, 0);
    EXPECT_EQ(s.recv_wait_ns, 0);

    long v = 1;
    for (int i = 0; i < 3; i++) EXPECT_EQ(conc_chan_send(ch, &v, NULL), 0);
    for (int i = 0; i < 3; i++) EXPECT_EQ(conc_chan_recv(ch, &v, NULL), 0);
    EXPECT_EQ(conc_chan_send(ch, &v, NULL), 0);
    conc_chan_stats_get(ch, &s);
    EXPECT_EQ(s.high_water, 3);
    EXPECT_EQ(s.sends, 4);
    EXPECT_EQ(s.recvs, 3);
    EXPECT_EQ(s.blocked_sends, 0);
    EXPECT_EQ(s.blocked_recvs, 0);
    for (int i = 0; i < 3; i++) EXPECT_EQ(conc_chan_try_send(ch, &v), 0);
    EXPECT_EQ(conc_chan_try_send(ch, &v), CONC_WOULD_BLOCK); /* a try_ never waits */
    conc_chan_stats_get(ch, &s);
    EXPECT_EQ(s.high_water, 4);
    EXPECT_EQ(s.sends, 7);
    EXPECT_EQ(s.blocked_sends, 0);

    /* A send that blocks on the full buffer. */
    op o;
    op_start_blocked(&o, OP_SEND, ch, 5, NULL);
    for (int i = 0; i < 5; i++) EXPECT_EQ(conc_chan_recv(ch, &v, NULL), 0);
    EXPECT_EQ(v, 5);
    op_join(&o);
    EXPECT_EQ(o.rc, 0);
    conc_chan_stats_get(ch, &s);
    EXPECT_EQ(s.high_water, 4); /* never above cap */
    EXPECT_EQ(s.blocked_sends, 1);
    EXPECT_EQ(s.blocked_recvs, 0);
    EXPECT_EQ(s.sends, 8);
    EXPECT_EQ(s.recvs, 8);
    EXPECT(s.send_wait_ns > 0);
    EXPECT_EQ(s.recv_wait_ns, 0);

    /* A receive that blocks on the empty buffer. */
    op_start_blocked(&o, OP_RECV, ch, -1, NULL);
    v = 6;
    EXPECT_EQ(conc_chan_send(ch, &v, NULL), 0);
    op_join(&o);
    EXPECT_EQ(o.val, 6);
    conc_chan_stats_get(ch, &s);
    EXPECT_EQ(s.blocked_recvs, 1);
    EXPECT(s.recv_wait_ns > 0);
    EXPECT_EQ(s.sends, 9);
    EXPECT_EQ(s.recvs, 9);
    EXPECT_EQ(conc_chan_free(ch), 0);

    /* Unbuffered: nothing is ever buffered. */
    ch = conc_chan_new(sizeof(long), 0);
    ASSERT(ch != NULL);
    op_start_blocked(&o, OP_SEND, ch, 1, NULL);
    EXPECT_EQ(conc_chan_recv(ch, &v, NULL), 0);
    op_join(&o);
    conc_chan_stats_get(ch, &s);
    EXPECT_EQ(s.high_water, 0);
    EXPECT_EQ(s.sends, 1);
    EXPECT_EQ(s.recvs, 1);
    EXPECT_EQ(s.blocked_sends, 1);
    EXPECT_EQ(s.blocked_recvs, 0);
    EXPECT(s.send_wait_ns > 0);
    EXPECT_EQ(conc_chan_free(ch), 0);
}

int main(void) {
    RUN(new_len_cap_elem_size);
    RUN(new_out_of_memory);
    RUN(null_arguments);
    RUN(unbuffered_rendezvous);
    RUN(unbuffered_ping_pong);
    RUN(buffered_fifo);
    RUN(recv_null_discards);
    RUN(elem_size_zero);
    RUN(large_elements);
    RUN(close_buffered_drains_then_closed);
    RUN(close_unbuffered);
    RUN(close_wakes_blocked_receivers);
    RUN(close_wakes_blocked_senders);
    RUN(free_with_blocked_waiter_is_busy);
    RUN(cancel_blocked_recv_leaves_channel_untouched);
    RUN(cancel_blocked_send_leaves_channel_untouched);
    RUN(cancel_middle_waiter_keeps_queue_order);
    RUN(cancel_returns_err_not_cause);
    RUN(deadline_exceeded);
    RUN(ready_operation_ignores_ended_ctx);
    RUN(blocked_receivers_fifo);
    RUN(blocked_senders_fifo);
    RUN(freed_slot_completes_blocked_sender);
    RUN(signals_do_not_disturb_blocked_calls);
    RUN(blocked_call_leaves_its_stack_reusable);
    RUN(stats);
    return tap_done();
}
