/* test_select.c - select: ready and blocking cases, nil channels, DONE cases, status and
   ok flags, uniform choice, one channel in several cases, contexts, n == 0.

   Threads are never ordered with sleeps. Where a test needs a thread to be blocked it
   waits for the channel's blocked count (wait_blocked; a parked select counts as a waiting
   send or receive on each of its channels), or has the peer itself block until the select
   arrives. Only where a select has no channel to watch does a helper cancel "soon", and
   there the outcome does not depend on the order. */
#include <stdlib.h>

/* An allocator that fails on request, for this thread only (conc's own threads allocate
   too). Set where the implementation is compiled, as the doc says. */
static _Thread_local int fail_allocs;
static void *test_malloc(size_t n) {
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

/* ---- helpers ------------------------------------------------------------------------ */

/* A select on its own thread. */
typedef struct selop {
    pthread_t th;
    conc_case *cases;
    size_t n;
    conc_ctx_t *ctx;
    int rc;
} selop;

static void *selop_main(void *arg) {
    selop *s = arg;
    s->rc = conc_select(s->cases, s->n, s->ctx);
    return NULL;
}

static void selop_start(selop *s, conc_case *cases, size_t n, conc_ctx_t *ctx) {
    s->cases = cases;
    s->n = n;
    s->ctx = ctx;
    s->rc = 12345;
    spawn(&s->th, selop_main, s);
}

/* Cancels a context a little later; used only where the outcome does not depend on
   whether the cancel lands before or after the other thread blocks. */
static void *cancel_soon(void *arg) {
    conc_sleep(10 * CONC_MILLISECOND, NULL);
    conc_ctx_cancel(arg);
    return NULL;
}

static conc_ctx_t *ended_ctx(void) {
    conc_ctx_t *c = conc_ctx_with_cancel(NULL);
    conc_ctx_cancel(c);
    return c;
}

/* ---- ready cases -------------------------------------------------------------------- */

TEST(recv_and_send_ready) {
    conc_chan_t *ch = conc_chan_new(sizeof(long), 2);
    ASSERT(ch != NULL);
    long a = 41, b = -1;
    bool ok = false;
    conc_case send1[] = {CONC_SEND(ch, &a)};
    send1[0].status = 999;
    EXPECT_EQ(conc_select(send1, 1, NULL), 0);
    EXPECT_EQ(send1[0].status, 0);
    EXPECT_EQ(conc_chan_len(ch), 1);
    a = 42;
    EXPECT_EQ(conc_try_select(send1, 1), 0);
    EXPECT_EQ(conc_chan_len(ch), 2);

    conc_case recv1[] = {CONC_RECV_OK(ch, &b, &ok)};
    recv1[0].status = 999;
    EXPECT_EQ(conc_select(recv1, 1, NULL), 0);
    EXPECT_EQ(recv1[0].status, 0);
    EXPECT_EQ(b, 41);
    EXPECT(ok);
    ok = false;
    conc_case recv2[] = {conc_case_recv(ch, &b, &ok)};
    EXPECT_EQ(conc_try_select(recv2, 1), 0);
    EXPECT_EQ(b, 42);
    EXPECT(ok);
    EXPECT_EQ(conc_chan_len(ch), 0);

    /* RECV with a NULL element discards the value. */
    EXPECT_EQ(conc_chan_send(ch, &a, NULL), 0);
    conc_case disc[] = {CONC_RECV(ch, NULL)};
    EXPECT_EQ(conc_try_select(disc, 1), 0);
    EXPECT_EQ(conc_chan_len(ch), 0);
    EXPECT_EQ(conc_chan_free(ch), 0);
}

TEST(ready_case_beats_blocking_cases) {
    conc_chan_t *empty = conc_chan_new(sizeof(long), 0);
    conc_chan_t *full = conc_chan_new(sizeof(long), 1);
    conc_chan_t *ready = conc_chan_new(sizeof(long), 1);
    ASSERT(empty && full && ready);
    long x = 1, y = 0;
    EXPECT_EQ(conc_chan_send(full, &x, NULL), 0);
    int bad = 0;
    for (long i = 0; i < 1000; i++) {
        if (conc_chan_send(ready, &i, NULL) != 0) bad++;
        conc_case cs[] = {CONC_RECV(empty, &y), CONC_SEND(full, &x), CONC_RECV(ready, &y), CONC_SEND(empty, &x)};
        int rc = (i & 1) ? conc_select(cs, 4, NULL) : conc_try_select(cs, 4);
        if (rc != 2 || y != i || cs[2].status != 0) bad++;
    }
    EXPECT_EQ(bad, 0);
    EXPECT_EQ(conc_chan_len(full), 1);
    EXPECT_EQ(conc_chan_len(ready), 0);
    EXPECT_EQ(conc_chan_free(empty), 0);
    EXPECT_EQ(conc_chan_free(full), 0);
    EXPECT_EQ(conc_chan_free(ready), 0);
}

TEST(exactly_one_case_fires) {
    conc_chan_t *c[3];
    for (int i = 0; i < 3; i++) ASSERT((c[i] = conc_chan_new(sizeof(long), 1000)) != NULL);
    long v = 7, got = 0;
    for (int i = 0; i < 3; i++)
        for (int j = 0; j < 1000; j++) conc_chan_try_send(c[i], &v);
    int count[3] = {0, 0, 0}, bad = 0;
    for (int k = 0; k < 1500; k++) {
        size_t before = conc_chan_len(c[0]) + conc_chan_len(c[1]) + conc_chan_len(c[2]);
        conc_case cs[] = {CONC_RECV(c[0], &got), CONC_RECV(c[1], &got), CONC_RECV(c[2], &got)};
        int rc = conc_try_select(cs, 3);
        if (rc < 0 || rc > 2) {
            bad++;
            continue;
        }
        count[rc]++;
        size_t after = conc_chan_len(c[0]) + conc_chan_len(c[1]) + conc_chan_len(c[2]);
        if (after + 1 != before) bad++;
    }
    EXPECT_EQ(bad, 0);
    for (int i = 0; i < 3; i++) EXPECT_EQ(conc_chan_len(c[i]), 1000 - count[i]);
    for (int i = 0; i < 3; i++) EXPECT_EQ(conc_chan_free(c[i]), 0);
}

TEST(waiting_peer_makes_case_ready) {
    conc_chan_t *ch = conc_chan_new(sizeof(long), 0);
    ASSERT(ch != NULL);
    long v = -1;
    conc_case r[] = {CONC_RECV(ch, &v)};
    EXPECT_EQ(conc_try_select(r, 1), CONC_WOULD_BLOCK);
    op s;
    op_start_blocked(&s, OP_SEND, ch, 5, NULL);
    EXPECT_EQ(conc_try_select(r, 1), 0);
    EXPECT_EQ(v, 5);
    op_join(&s);
    EXPECT_EQ(s.rc, 0);

    long w = 6;
    conc_case snd[] = {CONC_SEND(ch, &w)};
    EXPECT_EQ(conc_try_select(snd, 1), CONC_WOULD_BLOCK);
    op rr;
    op_start_blocked(&rr, OP_RECV, ch, -1, NULL);
    EXPECT_EQ(conc_try_select(snd, 1), 0);
    op_join(&rr);
    EXPECT_EQ(rr.rc, 0);
    EXPECT_EQ(rr.val, 6);
    EXPECT_EQ(conc_chan_free(ch), 0);
}

/* ---- blocking ----------------------------------------------------------------------- */

TEST(blocked_select_recv_completed_by_sender) {
    conc_chan_t *c1 = conc_chan_new(sizeof(long), 0);
    conc_chan_t *c2 = conc_chan_new(sizeof(long), 0);
    ASSERT(c1 && c2);
    long v1 = -1, v2 = -1;
    bool ok2 = false;
    conc_case cs[] = {CONC_RECV(c1, &v1), CONC_RECV_OK(c2, &v2, &ok2)};
    cs[1].status = 999;
    selop s;
    selop_start(&s, cs, 2, NULL);
    long x = 77;
    EXPECT_EQ(conc_chan_send(c2, &x, NULL), 0); /* blocks until the select takes it */
    pthread_join(s.th, NULL);
    EXPECT_EQ(s.rc, 1);
    EXPECT_EQ(cs[1].status, 0);
    EXPECT_EQ(v2, 77);
    EXPECT(ok2);
    EXPECT_EQ(v1, -1);
    /* Nothing left behind on the case that did not fire. */
    EXPECT_EQ(conc_chan_try_send(c1, &x), CONC_WOULD_BLOCK);
    EXPECT_EQ(conc_chan_free(c1), 0);
    EXPECT_EQ(conc_chan_free(c2), 0);
}

TEST(blocked_select_send_completed_by_receiver) {
    conc_chan_t *c1 = conc_chan_new(sizeof(long), 0);
    conc_chan_t *c2 = conc_chan_new(sizeof(long), 0);
    conc_chan_t *c3 = conc_chan_new(sizeof(long), 0);
    ASSERT(c1 && c2 && c3);
    long a = 1, b = 2, r = -1;
    conc_case cs[] = {CONC_SEND(c1, &a), CONC_SEND(c2, &b), CONC_RECV(c3, &r)};
    selop s;
    selop_start(&s, cs, 3, NULL);
    long got = -1;
    EXPECT_EQ(conc_chan_recv(c2, &got, NULL), 0);
    pthread_join(s.th, NULL);
    EXPECT_EQ(s.rc, 1);
    EXPECT_EQ(got, 2);
    EXPECT_EQ(cs[1].status, 0);
    EXPECT_EQ(conc_chan_try_recv(c1, &got), CONC_WOULD_BLOCK);
    EXPECT_EQ(conc_chan_try_send(c3, &got), CONC_WOULD_BLOCK);
    EXPECT_EQ(conc_chan_free(c1), 0);
    EXPECT_EQ(conc_chan_free(c2), 0);
    EXPECT_EQ(conc_chan_free(c3), 0);
}

TEST(blocked_select_buffered) {
    /* A select blocked on an empty buffered channel takes the first value sent. */
    conc_chan_t *c = conc_chan_new(sizeof(long), 4);
    conc_chan_t *quiet = conc_chan_new(sizeof(long), 4);
    ASSERT(c && quiet);
    long v = -1, q = -1;
    conc_case cs[] = {CONC_RECV(quiet, &q), CONC_RECV(c, &v)};
    selop s;
    selop_start(&s, cs, 2, NULL);
    /* Whether the select is parked yet or not, it must end up with this value. */
    long x = 31;
    EXPECT_EQ(conc_chan_send(c, &x, NULL), 0);
    pthread_join(s.th, NULL);
    EXPECT_EQ(s.rc, 1);
    EXPECT_EQ(v, 31);
    EXPECT_EQ(conc_chan_len(c), 0);
    EXPECT_EQ(conc_chan_len(quiet), 0);
    EXPECT_EQ(conc_chan_try_send(quiet, &x), 0);
    EXPECT_EQ(conc_chan_try_recv(quiet, &q), 0);
    EXPECT_EQ(q, 31);
    EXPECT_EQ(conc_chan_free(c), 0);
    EXPECT_EQ(conc_chan_free(quiet), 0);
}

TEST(blocked_select_woken_by_close) {
    conc_chan_t *c1 = conc_chan_new(sizeof(long), 0);
    conc_chan_t *c2 = conc_chan_new(sizeof(long), 0);
    ASSERT(c1 && c2);
    long v1 = -1, v2 = 0x5A5A;
    bool ok = true;
    conc_case cs[] = {CONC_RECV(c1, &v1), CONC_RECV_OK(c2, &v2, &ok)};
    cs[1].status = 999;
    selop s;
    selop_start(&s, cs, 2, NULL);
    EXPECT(wait_blocked(c2, 0, 1)); /* parked (a parked select counts as a waiting receive) */
    EXPECT_EQ(conc_chan_close(c2), 0);
    pthread_join(s.th, NULL);
    EXPECT_EQ(s.rc, 1);
    EXPECT_EQ(cs[1].status, CONC_CLOSED);
    EXPECT(!ok);
    EXPECT_EQ(v2, 0);
    EXPECT_EQ(v1, -1);

    /* A blocked send case on a channel that gets closed. */
    conc_chan_t *c3 = conc_chan_new(sizeof(long), 1);
    ASSERT(c3 != NULL);
    long x = 1;
    EXPECT_EQ(conc_chan_send(c3, &x, NULL), 0); /* full */
    conc_case ss[] = {CONC_RECV(c1, &v1), CONC_SEND(c3, &x)};
    ss[1].status = 999;
    selop_start(&s, ss, 2, NULL);
    EXPECT(wait_blocked(c3, 1, 0));
    EXPECT_EQ(conc_chan_close(c3), 0);
    pthread_join(s.th, NULL);
    EXPECT_EQ(s.rc, 1);
    EXPECT_EQ(ss[1].status, CONC_CLOSED);
    EXPECT_EQ(conc_chan_len(c3), 1);
    EXPECT_EQ(conc_chan_try_send(c1, &x), CONC_WOULD_BLOCK);
    EXPECT_EQ(conc_chan_free(c1), 0);
    EXPECT_EQ(conc_chan_free(c2), 0);
    EXPECT_EQ(conc_chan_free(c3), 0);
}

/* ---- nil channels, DONE, try_select ------------------------------------------------- */

TEST(nil_channel_never_ready) {
    long v = -1;
    conc_case nils[] = {CONC_RECV(NULL, &v), CONC_SEND(NULL, &v), CONC_DONE(NULL)};
    EXPECT_EQ(conc_try_select(nils, 3), CONC_WOULD_BLOCK);
    int64_t t0 = conc_now();
    conc_ctx_t *c = conc_ctx_with_timeout(NULL, 20 * CONC_MILLISECOND);
    EXPECT_EQ(conc_select(nils, 3, c), CONC_DEADLINE_EXCEEDED);
    EXPECT(conc_now() - t0 >= 20 * CONC_MILLISECOND);
    conc_ctx_release(c);
    EXPECT_EQ(v, -1);

    /* DONE on the background context is never ready either. */
    conc_case bg[] = {CONC_DONE(conc_ctx_background())};
    EXPECT_EQ(conc_try_select(bg, 1), CONC_WOULD_BLOCK);

    /* Mixed with a ready case: always the ready one. */
    conc_chan_t *ch = conc_chan_new(sizeof(long), 1);
    ASSERT(ch != NULL);
    int bad = 0;
    for (long i = 0; i < 1000; i++) {
        conc_chan_send(ch, &i, NULL);
        conc_case cs[] = {CONC_RECV(NULL, &v), CONC_SEND(NULL, &v), CONC_RECV(ch, &v), CONC_DONE(NULL)};
        if (conc_try_select(cs, 4) != 2 || v != i) bad++;
    }
    EXPECT_EQ(bad, 0);
    EXPECT_EQ(conc_chan_free(ch), 0);
}

TEST(try_select_would_block_touches_nothing) {
    conc_chan_t *u = conc_chan_new(sizeof(long), 0);
    conc_chan_t *e = conc_chan_new(sizeof(long), 2);
    conc_chan_t *f = conc_chan_new(sizeof(long), 1);
    ASSERT(u && e && f);
    long one = 1, v = -1, w = -1;
    EXPECT_EQ(conc_chan_send(f, &one, NULL), 0);
    bool ok = true;
    long s1 = 10, s2 = 20;
    conc_case cs[] = {CONC_RECV(u, &v), CONC_SEND(u, &s1), CONC_RECV_OK(e, &w, &ok), CONC_SEND(f, &s2)};
    EXPECT_EQ(conc_try_select(cs, 4), CONC_WOULD_BLOCK);
    EXPECT_EQ(v, -1);
    EXPECT_EQ(w, -1);
    EXPECT(ok);
    EXPECT_EQ(conc_chan_len(e), 0);
    EXPECT_EQ(conc_chan_len(f), 1);
    EXPECT_EQ(conc_chan_try_recv(u, &v), CONC_WOULD_BLOCK);
    EXPECT_EQ(conc_chan_try_send(u, &v), CONC_WOULD_BLOCK);
    EXPECT_EQ(conc_chan_try_recv(f, &v), 0);
    EXPECT_EQ(v, 1);
    EXPECT_EQ(conc_chan_free(u), 0);
    EXPECT_EQ(conc_chan_free(e), 0);
    EXPECT_EQ(conc_chan_free(f), 0);
}

TEST(done_case) {
    conc_ctx_t *c = ended_ctx();
    conc_chan_t *ch = conc_chan_new(sizeof(long), 0);
    ASSERT(ch != NULL);
    long v = -1;
    conc_case cs[] = {CONC_RECV(ch, &v), CONC_DONE(c)};
    cs[1].status = 999;
    EXPECT_EQ(conc_try_select(cs, 2), 1);
    EXPECT_EQ(cs[1].status, CONC_CANCELED);
    cs[1].status = 999;
    EXPECT_EQ(conc_select(cs, 2, NULL), 1);
    EXPECT_EQ(cs[1].status, CONC_CANCELED);
    conc_ctx_release(c);

    /* The status is the context's err, also when cancelled with a cause. */
    c = conc_ctx_with_cancel(NULL);
    conc_ctx_cancel_cause(c, 77);
    conc_case cc[] = {conc_case_done(c)};
    EXPECT_EQ(conc_select(cc, 1, NULL), 0);
    EXPECT_EQ(cc[0].status, CONC_CANCELED);
    conc_ctx_release(c);

    /* A deadline. */
    int64_t t0 = conc_now();
    c = conc_ctx_with_timeout(NULL, 15 * CONC_MILLISECOND);
    conc_case cd[] = {CONC_RECV(ch, &v), CONC_DONE(c)};
    EXPECT_EQ(conc_select(cd, 2, NULL), 1);
    EXPECT(conc_now() - t0 >= 15 * CONC_MILLISECOND);
    EXPECT_EQ(cd[1].status, CONC_DEADLINE_EXCEEDED);
    EXPECT_EQ(v, -1);
    conc_ctx_release(c);
    EXPECT_EQ(conc_chan_try_send(ch, &v), CONC_WOULD_BLOCK);
    EXPECT_EQ(conc_chan_free(ch), 0);
}

TEST(done_case_on_the_selects_own_ctx) {
    /* Already ended: the DONE case is ready, and a ready case wins over the ended ctx. */
    conc_chan_t *idle = conc_chan_new(sizeof(long), 0);
    ASSERT(idle != NULL);
    long v = -1;
    conc_ctx_t *c = ended_ctx();
    conc_case cs[] = {CONC_RECV(idle, &v), CONC_DONE(c)};
    cs[1].status = 999;
    EXPECT_EQ(conc_select(cs, 2, c), 1);
    EXPECT_EQ(cs[1].status, CONC_CANCELED);
    conc_ctx_release(c);
    /* Ending while parked: either outcome names the cancellation. */
    c = conc_ctx_with_cancel(NULL);
    cs[1] = conc_case_done(c);
    cs[1].status = 999;
    selop s;
    selop_start(&s, cs, 2, c);
    EXPECT(wait_blocked(idle, 0, 1));
    conc_ctx_cancel(c);
    pthread_join(s.th, NULL);
    EXPECT(s.rc == CONC_CANCELED || (s.rc == 1 && cs[1].status == CONC_CANCELED));
    conc_ctx_release(c);
    EXPECT_EQ(conc_chan_free(idle), 0);
}

TEST(select_with_only_done_case) {
    conc_ctx_t *c = conc_ctx_with_cancel(NULL);
    conc_case cs[] = {CONC_DONE(c)};
    cs[0].status = 999;
    EXPECT_EQ(conc_try_select(cs, 1), CONC_WOULD_BLOCK);
    pthread_t th;
    spawn(&th, cancel_soon, c);
    EXPECT_EQ(conc_select(cs, 1, NULL), 0);
    pthread_join(th, NULL);
    EXPECT_EQ(cs[0].status, CONC_CANCELED);
    conc_ctx_release(c);

    /* A DONE case on a child, ended by its parent. */
    conc_ctx_t *parent = conc_ctx_with_timeout(NULL, 10 * CONC_MILLISECOND);
    conc_ctx_t *child = conc_ctx_with_cancel(parent);
    conc_case cd[] = {CONC_DONE(child)};
    EXPECT_EQ(conc_select(cd, 1, NULL), 0);
    EXPECT_EQ(cd[0].status, CONC_DEADLINE_EXCEEDED);
    conc_ctx_release(child);
    conc_ctx_release(parent);
}

/* ---- status and ok ------------------------------------------------------------------ */

TEST(status_and_ok_flags) {
    conc_chan_t *ch = conc_chan_new(sizeof(long), 2);
    ASSERT(ch != NULL);
    long x = 3, v = -1;
    bool ok = false;
    EXPECT_EQ(conc_chan_send(ch, &x, NULL), 0);
    EXPECT_EQ(conc_chan_close(ch), 0);

    /* A closed channel still delivers what it buffered: ok true, status 0. */
    conc_case cs[] = {CONC_RECV_OK(ch, &v, &ok)};
    cs[0].status = 999;
    EXPECT_EQ(conc_select(cs, 1, NULL), 0);
    EXPECT_EQ(cs[0].status, 0);
    EXPECT(ok);
    EXPECT_EQ(v, 3);

    /* Drained: ok false, status CONC_CLOSED, element zeroed. */
    v = 0x7777;
    ok = true;
    cs[0].status = 999;
    EXPECT_EQ(conc_select(cs, 1, NULL), 0);
    EXPECT_EQ(cs[0].status, CONC_CLOSED);
    EXPECT(!ok);
    EXPECT_EQ(v, 0);
    v = 0x7777;
    ok = true;
    cs[0].status = 999;
    EXPECT_EQ(conc_try_select(cs, 1), 0);
    EXPECT_EQ(cs[0].status, CONC_CLOSED);
    EXPECT(!ok);
    EXPECT_EQ(v, 0);

    /* Without an ok pointer. */
    conc_case plain[] = {CONC_RECV(ch, &v)};
    plain[0].status = 999;
    v = 5;
    EXPECT_EQ(conc_try_select(plain, 1), 0);
    EXPECT_EQ(plain[0].status, CONC_CLOSED);
    EXPECT_EQ(v, 0);

    /* Send on a closed channel: the case fires with CONC_CLOSED. */
    conc_case snd[] = {CONC_SEND(ch, &x)};
    snd[0].status = 999;
    EXPECT_EQ(conc_select(snd, 1, NULL), 0);
    EXPECT_EQ(snd[0].status, CONC_CLOSED);
    snd[0].status = 999;
    EXPECT_EQ(conc_try_select(snd, 1), 0);
    EXPECT_EQ(snd[0].status, CONC_CLOSED);
    EXPECT_EQ(conc_chan_len(ch), 0);

    /* The ok flag is set to true on a received value. */
    conc_chan_t *c2 = conc_chan_new(sizeof(long), 1);
    ASSERT(c2 != NULL);
    EXPECT_EQ(conc_chan_send(c2, &x, NULL), 0);
    ok = false;
    conc_case r2[] = {CONC_RECV_OK(c2, &v, &ok)};
    EXPECT_EQ(conc_try_select(r2, 1), 0);
    EXPECT(ok);
    EXPECT_EQ(r2[0].status, 0);
    EXPECT_EQ(conc_chan_free(ch), 0);
    EXPECT_EQ(conc_chan_free(c2), 0);
}

/* ---- randomness --------------------------------------------------------------------- */

static bool within(long count, long expect, long pct) {
    long d = count > expect ? count - expect : expect - count;
    return d * 100 <= expect * pct;
}

TEST(uniform_choice_among_ready_cases) {
    conc_chan_t *c1 = conc_chan_new(sizeof(long), 0);
    conc_chan_t *c2 = conc_chan_new(sizeof(long), 0);
    ASSERT(c1 && c2);
    conc_chan_close(c1);
    conc_chan_close(c2);
    conc_ctx_t *done = ended_ctx();
    long v;
    enum { N = 30000 };

    for (int blocking = 0; blocking < 2; blocking++) {
        long count[3] = {0, 0, 0}, bad = 0;
        for (int i = 0; i < N; i++) {
            conc_case cs[] = {CONC_RECV(c1, &v), CONC_DONE(done), CONC_RECV(c2, &v)};
            int rc = blocking ? conc_select(cs, 3, NULL) : conc_try_select(cs, 3);
            if (rc < 0 || rc > 2)
                bad++;
            else
                count[rc]++;
        }
        EXPECT_EQ(bad, 0);
        for (int k = 0; k < 3; k++) {
            if (!within(count[k], N / 3, 10)) printf("#   case %d chosen %ld of %d times\n", k, count[k], N);
            EXPECT(within(count[k], N / 3, 10));
        }
    }

    /* Two ready cases among never-ready ones: about half each, never the others. */
    conc_chan_t *idle = conc_chan_new(sizeof(long), 0);
    ASSERT(idle != NULL);
    long count[5] = {0, 0, 0, 0, 0}, bad = 0;
    for (int i = 0; i < N; i++) {
        conc_case cs[] = {CONC_RECV(idle, &v), CONC_RECV(c1, &v), CONC_RECV(NULL, &v), CONC_DONE(done), CONC_SEND(idle, &v)};
        int rc = conc_try_select(cs, 5);
        if (rc < 0 || rc > 4)
            bad++;
        else
            count[rc]++;
    }
    EXPECT_EQ(bad, 0);
    EXPECT_EQ(count[0] + count[2] + count[4], 0);
    EXPECT(within(count[1], N / 2, 5));
    EXPECT(within(count[3], N / 2, 5));

    conc_ctx_release(done);
    EXPECT_EQ(conc_chan_free(c1), 0);
    EXPECT_EQ(conc_chan_free(c2), 0);
    EXPECT_EQ(conc_chan_free(idle), 0);
}

/* ---- one channel in several cases --------------------------------------------------- */

TEST(same_channel_send_and_recv_buffered) {
    conc_chan_t *ch = conc_chan_new(sizeof(long), 1);
    ASSERT(ch != NULL);
    int bad = 0;
    for (long i = 0; i < 200; i++) {
        long out = i, in = -1;
        conc_case cs[] = {CONC_RECV(ch, &in), CONC_SEND(ch, &out)};
        /* Empty: only the send can proceed. */
        if (conc_select(cs, 2, NULL) != 1) bad++;
        /* Full: only the receive can, and it gets what was just sent. */
        if (conc_select(cs, 2, NULL) != 0 || in != i) bad++;
    }
    EXPECT_EQ(bad, 0);
    EXPECT_EQ(conc_chan_len(ch), 0);
    EXPECT_EQ(conc_chan_free(ch), 0);
}

TEST(same_channel_does_not_pair_with_itself) {
    conc_chan_t *ch = conc_chan_new(sizeof(long), 0);
    ASSERT(ch != NULL);
    long out = 1, in = -1;
    conc_case cs[] = {CONC_SEND(ch, &out), CONC_RECV(ch, &in)};
    EXPECT_EQ(conc_try_select(cs, 2), CONC_WOULD_BLOCK);
    conc_ctx_t *c = conc_ctx_with_timeout(NULL, 20 * CONC_MILLISECOND);
    EXPECT_EQ(conc_select(cs, 2, c), CONC_DEADLINE_EXCEEDED);
    conc_ctx_release(c);
    EXPECT_EQ(in, -1);
    EXPECT_EQ(conc_chan_try_send(ch, &out), CONC_WOULD_BLOCK);
    EXPECT_EQ(conc_chan_try_recv(ch, &in), CONC_WOULD_BLOCK);

    /* A peer completes one of the two cases. */
    selop s;
    selop_start(&s, cs, 2, NULL);
    long got = -1;
    EXPECT_EQ(conc_chan_recv(ch, &got, NULL), 0);
    pthread_join(s.th, NULL);
    EXPECT_EQ(s.rc, 0);
    EXPECT_EQ(got, 1);
    in = -1;
    selop_start(&s, cs, 2, NULL);
    long x = 9;
    EXPECT_EQ(conc_chan_send(ch, &x, NULL), 0);
    pthread_join(s.th, NULL);
    EXPECT_EQ(s.rc, 1);
    EXPECT_EQ(in, 9);
    EXPECT_EQ(conc_chan_free(ch), 0);
}

TEST(same_channel_twice_recv) {
    conc_chan_t *ch = conc_chan_new(sizeof(long), 1);
    ASSERT(ch != NULL);
    int bad = 0, first = 0;
    for (long i = 0; i < 1000; i++) {
        long a = -1, b = -1;
        conc_chan_send(ch, &i, NULL);
        conc_case cs[] = {CONC_RECV(ch, &a), CONC_RECV(ch, &b)};
        int rc = conc_select(cs, 2, NULL);
        if (rc == 0) {
            first++;
            if (a != i || b != -1) bad++;
        } else if (rc == 1) {
            if (b != i || a != -1) bad++;
        } else {
            bad++;
        }
    }
    EXPECT_EQ(bad, 0);
    EXPECT(first > 350 && first < 650);
    EXPECT_EQ(conc_chan_len(ch), 0);
    EXPECT_EQ(conc_chan_free(ch), 0);
}

typedef struct selfsel {
    conc_chan_t *ch;
    long id, n, sent, recvd, self, errs;
} selfsel;

static void *selfsel_main(void *arg) {
    selfsel *p = arg;
    for (long i = 0; i < p->n; i++) {
        long out = p->id, in = -1;
        conc_case cs[2];
        /* Vary the case order as well. */
        if ((i + p->id) & 1) {
            cs[0] = conc_case_send(p->ch, &out);
            cs[1] = conc_case_recv(p->ch, &in, NULL);
        } else {
            cs[0] = conc_case_recv(p->ch, &in, NULL);
            cs[1] = conc_case_send(p->ch, &out);
        }
        int rc = conc_select(cs, 2, NULL);
        if (rc < 0) {
            p->errs++;
            continue;
        }
        if (cs[rc].kind == CONC_CASE_SEND) {
            p->sent++;
        } else {
            p->recvd++;
            if (in == p->id) p->self++;
        }
    }
    return NULL;
}

TEST(two_selects_on_one_channel_pair) {
    /* Go's TestSelfSelect: two threads each select over send and receive on the same
       channel. Unbuffered, each must pair with the other, never with itself. */
    for (size_t cap = 0; cap <= 10; cap += 10) {
        conc_chan_t *ch = conc_chan_new(sizeof(long), cap);
        ASSERT(ch != NULL);
        long n = tap_iters(5000);
        selfsel p[2] = {{ch, 0, n, 0, 0, 0, 0}, {ch, 1, n, 0, 0, 0, 0}};
        pthread_t th[2];
        for (int i = 0; i < 2; i++) spawn(&th[i], selfsel_main, &p[i]);
        for (int i = 0; i < 2; i++) pthread_join(th[i], NULL);
        EXPECT_EQ(p[0].errs + p[1].errs, 0);
        EXPECT_EQ(p[0].sent + p[0].recvd, n);
        EXPECT_EQ(p[1].sent + p[1].recvd, n);
        long left = (long)conc_chan_len(ch);
        EXPECT_EQ(p[0].sent + p[1].sent, p[0].recvd + p[1].recvd + left);
        if (cap == 0) {
            EXPECT_EQ(p[0].self + p[1].self, 0);
            EXPECT_EQ(p[0].sent, p[1].recvd);
            EXPECT_EQ(p[1].sent, p[0].recvd);
        }
        while (conc_chan_try_recv(ch, NULL) == 0) {
        }
        EXPECT_EQ(conc_chan_free(ch), 0);
    }
}

/* ---- contexts ----------------------------------------------------------------------- */

TEST(ctx_ends_while_blocked) {
    conc_chan_t *c1 = conc_chan_new(sizeof(long), 0);
    conc_chan_t *c2 = conc_chan_new(sizeof(long), 1);
    ASSERT(c1 && c2);
    long one = 1, v = -1, w = 5;
    EXPECT_EQ(conc_chan_send(c2, &one, NULL), 0); /* full */

    conc_ctx_t *c = conc_ctx_with_cancel(NULL);
    conc_case cs[] = {CONC_RECV(c1, &v), CONC_SEND(c2, &w), CONC_SEND(c1, &w)};
    selop s;
    selop_start(&s, cs, 3, c);
    EXPECT(wait_blocked(c2, 1, 0)); /* parked on every channel */
    conc_ctx_cancel(c);
    pthread_join(s.th, NULL);
    EXPECT_EQ(s.rc, CONC_CANCELED);
    conc_ctx_release(c);
    EXPECT_EQ(v, -1);
    /* Nothing left behind: no stale receiver or sender on c1, c2 unchanged. */
    EXPECT_EQ(conc_chan_try_send(c1, &one), CONC_WOULD_BLOCK);
    EXPECT_EQ(conc_chan_try_recv(c1, &v), CONC_WOULD_BLOCK);
    EXPECT_EQ(conc_chan_len(c2), 1);
    EXPECT_EQ(conc_chan_try_recv(c2, &v), 0);
    EXPECT_EQ(v, 1);
    EXPECT_EQ(conc_chan_try_recv(c2, &v), CONC_WOULD_BLOCK);
    EXPECT_EQ(conc_chan_send(c2, &one, NULL), 0);

    /* A deadline. */
    int64_t t0 = conc_now();
    c = conc_ctx_with_timeout(NULL, 20 * CONC_MILLISECOND);
    EXPECT_EQ(conc_select(cs, 3, c), CONC_DEADLINE_EXCEEDED);
    EXPECT(conc_now() - t0 >= 20 * CONC_MILLISECOND);
    conc_ctx_release(c);

    /* Already ended and nothing ready: fails at once; with a ready case: the case. */
    c = ended_ctx();
    EXPECT_EQ(conc_select(cs, 3, c), CONC_CANCELED);
    conc_case rd[] = {CONC_RECV(c1, &v), CONC_RECV(c2, &v)};
    v = -1;
    EXPECT_EQ(conc_select(rd, 2, c), 1);
    EXPECT_EQ(v, 1);
    conc_ctx_release(c);

    EXPECT_EQ(conc_chan_try_send(c1, &one), CONC_WOULD_BLOCK);
    EXPECT_EQ(conc_chan_free(c1), 0);
    EXPECT_EQ(conc_chan_free(c2), 0);
}

TEST(cancelled_select_then_channel_works) {
    /* After a cancelled select, values sent on its channels go to the next receivers, in
       order (PITFALLS 4 and 21: no stale registration swallows them). */
    conc_chan_t *ch = conc_chan_new(sizeof(long), 0);
    ASSERT(ch != NULL);
    for (int round = 0; round < 20; round++) {
        conc_ctx_t *c = conc_ctx_with_timeout(NULL, CONC_MILLISECOND);
        long v = -1;
        conc_case cs[] = {CONC_RECV(ch, &v)};
        EXPECT_EQ(conc_select(cs, 1, c), CONC_DEADLINE_EXCEEDED);
        conc_ctx_release(c);
    }
    op r;
    op_start_blocked(&r, OP_RECV, ch, -1, NULL);
    long x = 123;
    EXPECT_EQ(conc_chan_send(ch, &x, NULL), 0);
    op_join(&r);
    EXPECT_EQ(r.rc, 0);
    EXPECT_EQ(r.val, 123);
    EXPECT_EQ(conc_chan_free(ch), 0);
}

static void on_signal(int sig) { (void)sig; }

TEST(signals_do_not_disturb_blocked_select) {
    /* PITFALLS 11: signals (no SA_RESTART) hitting a parked select. */
    struct sigaction sa, old;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    ASSERT(sigaction(SIGUSR1, &sa, &old) == 0);
    conc_chan_t *c1 = conc_chan_new(sizeof(long), 0), *c2 = conc_chan_new(sizeof(long), 0);
    ASSERT(c1 && c2);
    long v = -1;
    conc_case cs[] = {CONC_RECV(c1, &v), CONC_RECV(c2, &v)};
    selop s;
    selop_start(&s, cs, 2, NULL);
    EXPECT(wait_blocked(c2, 0, 1)); /* a parked select counts as a waiting receive */
    for (int i = 0; i < 50; i++) {
        pthread_kill(s.th, SIGUSR1);
        sched_yield();
    }
    long x = 8;
    EXPECT_EQ(conc_chan_send(c2, &x, NULL), 0);
    pthread_join(s.th, NULL);
    EXPECT_EQ(s.rc, 1);
    EXPECT_EQ(v, 8);
    EXPECT_EQ(conc_chan_try_send(c1, &x), CONC_WOULD_BLOCK);
    EXPECT_EQ(conc_chan_free(c1), 0);
    EXPECT_EQ(conc_chan_free(c2), 0);
    sigaction(SIGUSR1, &old, NULL);
}

/* ---- odd arguments ------------------------------------------------------------------ */

TEST(zero_cases) {
    conc_case cs[1] = {CONC_RECV(NULL, NULL)};
    EXPECT_EQ(conc_select(NULL, 0, NULL), CONC_INVALID);
    EXPECT_EQ(conc_select(cs, 0, NULL), CONC_INVALID);
    EXPECT_EQ(conc_select(cs, 0, conc_ctx_background()), CONC_INVALID);
    int64_t t0 = conc_now();
    conc_ctx_t *c = conc_ctx_with_timeout(NULL, 10 * CONC_MILLISECOND);
    EXPECT_EQ(conc_select(cs, 0, c), CONC_DEADLINE_EXCEEDED);
    EXPECT(conc_now() - t0 >= 10 * CONC_MILLISECOND);
    conc_ctx_release(c);
    c = conc_ctx_with_cancel(NULL);
    pthread_t th;
    spawn(&th, cancel_soon, c);
    EXPECT_EQ(conc_select(NULL, 0, c), CONC_CANCELED);
    pthread_join(th, NULL);
    conc_ctx_release(c);
    EXPECT_EQ(conc_try_select(cs, 0), CONC_WOULD_BLOCK);
    EXPECT_EQ(conc_try_select(NULL, 0), CONC_WOULD_BLOCK);
}

TEST(bad_kind_is_invalid) {
    conc_chan_t *ch = conc_chan_new(sizeof(long), 1);
    ASSERT(ch != NULL);
    long v = 1;
    conc_case cs[] = {CONC_SEND(ch, &v), CONC_RECV(ch, &v)};
    cs[1].kind = (conc_case_kind)42;
    EXPECT_EQ(conc_select(cs, 2, NULL), CONC_INVALID);
    cs[1].kind = (conc_case_kind)0;
    EXPECT_EQ(conc_select(cs, 2, NULL), CONC_INVALID);
    /* A send case without a value (elements are not empty). */
    conc_case nv[] = {CONC_RECV(ch, &v), CONC_SEND(ch, NULL)};
    EXPECT_EQ(conc_select(nv, 2, NULL), CONC_INVALID);
    /* Rejected before anything happened. */
    EXPECT_EQ(conc_chan_len(ch), 0);
    EXPECT_EQ(conc_chan_free(ch), 0);
}

typedef struct many_sender {
    conc_chan_t **chans;
    int idx;
    long val;
    int rc;
} many_sender;

static void *many_sender_main(void *arg) {
    many_sender *m = arg;
    m->rc = conc_chan_send(m->chans[m->idx], &m->val, NULL);
    return NULL;
}

TEST(many_cases) {
    /* More than 16 cases: the waiters no longer fit the on-stack array. */
    enum { N = 40 };
    conc_chan_t *chans[N];
    conc_case cs[N];
    long v = -1;
    for (int i = 0; i < N; i++) {
        ASSERT((chans[i] = conc_chan_new(sizeof(long), 0)) != NULL);
        cs[i] = conc_case_recv(chans[i], &v, NULL);
    }
    EXPECT_EQ(conc_try_select(cs, N), CONC_WOULD_BLOCK);
    for (int round = 0; round < 3; round++) {
        int target = (int[]){37, 0, N - 1}[round];
        many_sender m = {chans, target, 1000 + target, 12345};
        pthread_t th;
        spawn(&th, many_sender_main, &m);
        int rc = conc_select(cs, N, NULL);
        pthread_join(th, NULL);
        EXPECT_EQ(rc, target);
        EXPECT_EQ(v, 1000 + target);
        EXPECT_EQ(m.rc, 0);
    }
    /* Sends too, and the cancelled form leaves nothing behind. */
    conc_case ss[N];
    long out = 5;
    for (int i = 0; i < N; i++) ss[i] = conc_case_send(chans[i], &out);
    conc_ctx_t *c = conc_ctx_with_timeout(NULL, 5 * CONC_MILLISECOND);
    EXPECT_EQ(conc_select(ss, N, c), CONC_DEADLINE_EXCEEDED);
    conc_ctx_release(c);
    for (int i = 0; i < N; i++) EXPECT_EQ(conc_chan_try_recv(chans[i], &v), CONC_WOULD_BLOCK);
    for (int i = 0; i < N; i++) EXPECT_EQ(conc_chan_free(chans[i]), 0);
}

TEST(nomem_many_cases) {
    /* More than 16 cases need memory for the waiters; without it the select fails with
       CONC_NOMEM before touching any channel. */
    enum { N = 20 };
    conc_chan_t *chans[N];
    conc_case cs[N];
    long v = -1, out = 3;
    for (int i = 0; i < N; i++) {
        ASSERT((chans[i] = conc_chan_new(sizeof(long), 1)) != NULL);
        cs[i] = (i & 1) ? conc_case_send(chans[i], &out) : conc_case_recv(chans[i], &v, NULL);
    }
    fail_allocs = 1;
    EXPECT_EQ(conc_select(cs, N, NULL), CONC_NOMEM);
    fail_allocs = 0;
    for (int i = 0; i < N; i++) EXPECT_EQ(conc_chan_len(chans[i]), 0);
    EXPECT_EQ(v, -1);
    /* With memory it works (a send case is ready). */
    int rc = conc_select(cs, N, NULL);
    EXPECT(rc >= 0 && rc < N && (rc & 1));
    for (int i = 0; i < N; i++) EXPECT_EQ(conc_chan_free(chans[i]), 0);
}

TEST(free_refused_while_select_parked) {
    conc_chan_t *c1 = conc_chan_new(sizeof(long), 0), *c2 = conc_chan_new(sizeof(long), 0);
    ASSERT(c1 && c2);
    long v = -1;
    conc_case cs[] = {CONC_RECV(c1, &v), CONC_RECV(c2, &v)};
    selop s;
    selop_start(&s, cs, 2, NULL);
    EXPECT(wait_blocked(c1, 0, 1)); /* parked on both */
    EXPECT(wait_blocked(c2, 0, 1));
    EXPECT_EQ(conc_chan_free(c1), CONC_BUSY);
    EXPECT_EQ(conc_chan_free(c2), CONC_BUSY);
    long x = 4;
    EXPECT_EQ(conc_chan_send(c1, &x, NULL), 0);
    pthread_join(s.th, NULL);
    EXPECT_EQ(s.rc, 0);
    EXPECT_EQ(v, 4);
    EXPECT_EQ(conc_chan_free(c1), 0);
    EXPECT_EQ(conc_chan_free(c2), 0); /* the registration on c2 is gone */
}

int main(void) {
    RUN(recv_and_send_ready);
    RUN(ready_case_beats_blocking_cases);
    RUN(exactly_one_case_fires);
    RUN(waiting_peer_makes_case_ready);
    RUN(blocked_select_recv_completed_by_sender);
    RUN(blocked_select_send_completed_by_receiver);
    RUN(blocked_select_buffered);
    RUN(blocked_select_woken_by_close);
    RUN(nil_channel_never_ready);
    RUN(try_select_would_block_touches_nothing);
    RUN(done_case);
    RUN(done_case_on_the_selects_own_ctx);
    RUN(select_with_only_done_case);
    RUN(status_and_ok_flags);
    RUN(uniform_choice_among_ready_cases);
    RUN(same_channel_send_and_recv_buffered);
    RUN(same_channel_does_not_pair_with_itself);
    RUN(same_channel_twice_recv);
    RUN(two_selects_on_one_channel_pair);
    RUN(ctx_ends_while_blocked);
    RUN(cancelled_select_then_channel_works);
    RUN(signals_do_not_disturb_blocked_select);
    RUN(zero_cases);
    RUN(bad_kind_is_invalid);
    RUN(many_cases);
    RUN(nomem_many_cases);
    RUN(free_refused_while_select_parked);
    return tap_done();
}
