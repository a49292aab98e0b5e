/* test_gochan.c - Go's test/chan programs, rewritten for conc.h.

   sieve         prime sieve: a pipeline with one thread per filter (test/chan/sieve1.go).
   doubleselect  senders selecting over four channels; no value is received twice or lost.
   fifo          per-sender FIFO with several senders, buffered and unbuffered.
   nonblock      try_send / try_recv / try_select against every kind of channel state.
   select3       what must block and what must not: nil, closed, ready and blocking
                 channels, for send and receive, in every call form.
   select6       a select's failed case must not corrupt the other waiters' queue.
   select7       every receive form against every send form, discarding the value.
   pipeline      powser-style: 100 threads in a chain of unbuffered channels, torn down
                 by close in order, and by cancelling a context.

   The sieve and the pipelines use fewer threads when CONC_TEST_SCALE < 1 (Valgrind).

   "Blocks" is detected with a short timeout context; threads are never ordered with
   sleeps (a thread that must be blocked first is waited for through the channel's
   blocked count). */
#define CONC_IMPLEMENTATION
#include "conc.h"
#include "tap.h"
#include "test_util.h"

#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <time.h>

/* ---- helpers ------------------------------------------------------------------------ */

/* Thread counts for the many-thread programs: full size normally; under Valgrind
   (CONC_TEST_SCALE < 1) fewer threads, as DRD's cost grows with the thread count. */
static int thread_count(int full, int least) {
    long n = (long)((double)full * tap_scale());
    if (n > full) n = full;
    return n < least ? least : (int)n;
}

/* ---- sieve -------------------------------------------------------------------------- */

typedef struct stage {
    pthread_t th;
    conc_chan_t *in, *out;
    long prime;
    conc_ctx_t *ctx;
} stage;

static void *generate(void *arg) {
    stage *s = arg;
    for (long i = 2;; i++)
        if (conc_chan_send(s->out, &i, s->ctx) != 0) return NULL;
}

static void *filter(void *arg) {
    stage *s = arg;
    for (;;) {
        long v;
        if (conc_chan_recv(s->in, &v, s->ctx) != 0) return NULL;
        if (v % s->prime != 0 && conc_chan_send(s->out, &v, s->ctx) != 0) return NULL;
    }
}

TEST(sieve) {
    enum { MAXPRIMES = 100 };
    const int nprimes = thread_count(MAXPRIMES, 20);
    /* The reference: trial division. */
    long want[MAXPRIMES];
    int k = 0;
    for (long n = 2; k < MAXPRIMES; n++) {
        bool prime = true;
        for (long d = 2; d * d <= n; d++)
            if (n % d == 0) prime = false;
        if (prime) want[k++] = n;
    }
    EXPECT_EQ(want[MAXPRIMES - 1], 541);

    for (size_t cap = 0; cap <= 4; cap += 4) {
        conc_ctx_t *ctx = conc_ctx_with_cancel(NULL);
        conc_chan_t *chans[MAXPRIMES + 1];
        stage gen, filters[MAXPRIMES];
        ASSERT((chans[0] = conc_chan_new(sizeof(long), cap)) != NULL);
        gen.out = chans[0];
        gen.ctx = ctx;
        spawn(&gen.th, generate, &gen);
        conc_chan_t *ch = chans[0];
        int bad = 0;
        for (int i = 0; i < nprimes; i++) {
            long p = -1;
            if (conc_chan_recv(ch, &p, NULL) != 0 || p != want[i]) bad++;
            ASSERT((chans[i + 1] = conc_chan_new(sizeof(long), cap)) != NULL);
            filters[i] = (stage){.in = ch, .out = chans[i + 1], .prime = p, .ctx = ctx};
            spawn(&filters[i].th, filter, &filters[i]);
            ch = chans[i + 1];
        }
        EXPECT_EQ(bad, 0);
        /* Tear the pipeline down: every stage sees the context end. */
        conc_ctx_cancel(ctx);
        pthread_join(gen.th, NULL);
        for (int i = 0; i < nprimes; i++) pthread_join(filters[i].th, NULL);
        conc_ctx_release(ctx);
        for (int i = 0; i <= nprimes; i++) EXPECT_EQ(conc_chan_free(chans[i]), 0);
    }
}

/* ---- doubleselect ------------------------------------------------------------------- */

enum { DS_CHANS = 4, DS_SENDERS = 3 };

typedef struct ds_sender {
    pthread_t th;
    conc_chan_t **chans;
    long first, n;
    int errs;
} ds_sender;

static void *ds_send(void *arg) {
    ds_sender *s = arg;
    for (long i = s->first; i < s->first + s->n; i++) {
        conc_case cs[DS_CHANS];
        for (int c = 0; c < DS_CHANS; c++) cs[c] = conc_case_send(s->chans[c], &i);
        int rc = conc_select(cs, DS_CHANS, NULL);
        if (rc < 0 || rc >= DS_CHANS || cs[rc].status != 0) s->errs++;
    }
    return NULL;
}

typedef struct ds_mux {
    pthread_t th;
    conc_chan_t *in, *out;
} ds_mux;

static void *ds_forward(void *arg) {
    ds_mux *m = arg;
    long v;
    while (conc_chan_recv(m->in, &v, NULL) == 0) conc_chan_send(m->out, &v, NULL);
    return NULL;
}

TEST(doubleselect) {
    /* Several senders each put every value on whichever of four unbuffered channels is
       ready; one forwarder per channel feeds a common channel. Were a select to complete
       twice, a value would arrive twice; were a completion lost, a value would be missing
       (or a sender would hang). */
    long per = tap_iters(10000);
    long total = per * DS_SENDERS;
    conc_chan_t *chans[DS_CHANS];
    conc_chan_t *mux = conc_chan_new(sizeof(long), 0);
    ASSERT(mux != NULL);
    for (int c = 0; c < DS_CHANS; c++) ASSERT((chans[c] = conc_chan_new(sizeof(long), 0)) != NULL);
    ds_sender snd[DS_SENDERS];
    ds_mux fw[DS_CHANS];
    for (int c = 0; c < DS_CHANS; c++) {
        fw[c] = (ds_mux){.in = chans[c], .out = mux};
        spawn(&fw[c].th, ds_forward, &fw[c]);
    }
    for (int s = 0; s < DS_SENDERS; s++) {
        snd[s] = (ds_sender){.chans = chans, .first = s * per, .n = per};
        spawn(&snd[s].th, ds_send, &snd[s]);
    }
    unsigned char *seen = calloc((size_t)total, 1);
    ASSERT(seen != NULL);
    long dup = 0, range = 0;
    for (long i = 0; i < total; i++) {
        long v;
        if (conc_chan_recv(mux, &v, NULL) != 0 || v < 0 || v >= total) {
            range++;
            continue;
        }
        if (seen[v]++) dup++;
    }
    for (int s = 0; s < DS_SENDERS; s++) {
        pthread_join(snd[s].th, NULL);
        EXPECT_EQ(snd[s].errs, 0);
    }
    for (int c = 0; c < DS_CHANS; c++) conc_chan_close(chans[c]);
    for (int c = 0; c < DS_CHANS; c++) pthread_join(fw[c].th, NULL);
    long missing = 0;
    for (long i = 0; i < total; i++)
        if (!seen[i]) missing++;
    EXPECT_EQ(dup, 0);
    EXPECT_EQ(range, 0);
    EXPECT_EQ(missing, 0);
    long extra;
    EXPECT_EQ(conc_chan_try_recv(mux, &extra), CONC_WOULD_BLOCK);
    free(seen);
    for (int c = 0; c < DS_CHANS; c++) EXPECT_EQ(conc_chan_free(chans[c]), 0);
    EXPECT_EQ(conc_chan_free(mux), 0);
}

/* ---- fifo --------------------------------------------------------------------------- */

enum { FIFO_SENDERS = 4 };

typedef struct fifo_sender {
    pthread_t th;
    conc_chan_t *ch;
    long id, n;
} fifo_sender;

static void *fifo_send(void *arg) {
    fifo_sender *s = arg;
    for (long i = 0; i < s->n; i++) {
        long v = s->id * 100000000L + i;
        if (conc_chan_send(s->ch, &v, NULL) != 0) return NULL;
        if ((i & 15) == 0) sched_yield();
    }
    return NULL;
}

TEST(fifo) {
    /* One thread: a buffered channel is a queue. */
    enum { N = 100 };
    conc_chan_t *q = conc_chan_new(sizeof(long), N);
    ASSERT(q != NULL);
    for (long i = 0; i < N; i++) EXPECT_EQ(conc_chan_send(q, &i, NULL), 0);
    int bad = 0;
    for (long i = 0; i < N; i++) {
        long v;
        if (conc_chan_recv(q, &v, NULL) != 0 || v != i) bad++;
    }
    EXPECT_EQ(bad, 0);
    EXPECT_EQ(conc_chan_free(q), 0);

    /* Several senders: each one's values arrive in the order it sent them. */
    for (size_t cap = 0; cap <= 8; cap += 8) {
        conc_chan_t *ch = conc_chan_new(sizeof(long), cap);
        ASSERT(ch != NULL);
        long n = tap_iters(10000);
        fifo_sender s[FIFO_SENDERS];
        for (int i = 0; i < FIFO_SENDERS; i++) {
            s[i] = (fifo_sender){.ch = ch, .id = i, .n = n};
            spawn(&s[i].th, fifo_send, &s[i]);
        }
        long next[FIFO_SENDERS] = {0};
        long out_of_order = 0, errs = 0;
        for (long k = 0; k < n * FIFO_SENDERS; k++) {
            long v;
            if (conc_chan_recv(ch, &v, NULL) != 0) {
                errs++;
                continue;
            }
            long id = v / 100000000L, seq = v % 100000000L;
            if (id < 0 || id >= FIFO_SENDERS) {
                errs++;
                continue;
            }
            if (seq != next[id]) out_of_order++;
            next[id] = seq + 1;
        }
        for (int i = 0; i < FIFO_SENDERS; i++) pthread_join(s[i].th, NULL);
        EXPECT_EQ(errs, 0);
        EXPECT_EQ(out_of_order, 0);
        for (int i = 0; i < FIFO_SENDERS; i++) EXPECT_EQ(next[i], n);
        EXPECT_EQ(conc_chan_free(ch), 0);
    }
}

/* ---- nonblock ----------------------------------------------------------------------- */

/* Retries a try_ operation until it stops saying CONC_WOULD_BLOCK (at most ~10 s): Go's
   nonblock.go does the same while the peer goroutine gets going. */
static int retry_try_send(conc_chan_t *ch, long v) {
    int64_t end = conc_now() + 10 * CONC_SECOND;
    int rc;
    while ((rc = conc_chan_try_send(ch, &v)) == CONC_WOULD_BLOCK && conc_now() < end) {
        sched_yield();
        nap();
    }
    return rc;
}
static int retry_try_recv(conc_chan_t *ch, long *v) {
    int64_t end = conc_now() + 10 * CONC_SECOND;
    int rc;
    while ((rc = conc_chan_try_recv(ch, v)) == CONC_WOULD_BLOCK && conc_now() < end) {
        sched_yield();
        nap();
    }
    return rc;
}

typedef struct nb_peer {
    pthread_t th;
    conc_chan_t *ch;
    long val;
    int rc;
} nb_peer;

static void *nb_recv(void *arg) {
    nb_peer *p = arg;
    p->rc = conc_chan_recv(p->ch, &p->val, NULL);
    return NULL;
}
static void *nb_send(void *arg) {
    nb_peer *p = arg;
    p->rc = conc_chan_send(p->ch, &p->val, NULL);
    return NULL;
}

TEST(nonblock) {
    long v = 0;
    EXPECT_EQ(conc_chan_try_send(NULL, &v), CONC_INVALID);
    EXPECT_EQ(conc_chan_try_recv(NULL, &v), CONC_INVALID);
    static const size_t caps[] = {0, 1, 2, 8};
    for (size_t ci = 0; ci < sizeof caps / sizeof caps[0]; ci++) {
        size_t cap = caps[ci];
        conc_chan_t *ch = conc_chan_new(sizeof(long), cap);
        ASSERT(ch != NULL);
        v = -1;
        conc_case r[] = {CONC_RECV(ch, &v)};
        long sv = 0;
        conc_case s[] = {CONC_SEND(ch, &sv)};

        /* Empty. */
        EXPECT_EQ(conc_chan_try_recv(ch, &v), CONC_WOULD_BLOCK);
        EXPECT_EQ(conc_try_select(r, 1), CONC_WOULD_BLOCK);
        EXPECT_EQ(v, -1);
        /* Fill by try_send (cap values), then it would block. */
        for (long i = 0; i < (long)cap; i++) EXPECT_EQ((i & 1) ? conc_chan_try_send(ch, &i) : (sv = i, conc_try_select(s, 1)), 0);
        EXPECT_EQ(conc_chan_len(ch), cap);
        EXPECT_EQ(conc_chan_try_send(ch, &v), CONC_WOULD_BLOCK);
        EXPECT_EQ(conc_try_select(s, 1), CONC_WOULD_BLOCK);
        for (long i = 0; i < (long)cap; i++) {
            v = -1;
            EXPECT_EQ((i & 1) ? conc_chan_try_recv(ch, &v) : conc_try_select(r, 1), 0);
            EXPECT_EQ(v, i);
        }
        EXPECT_EQ(conc_chan_try_recv(ch, &v), CONC_WOULD_BLOCK);

        /* A receiver on the other side: try_send gets through. */
        nb_peer p = {.ch = ch, .val = -1};
        spawn(&p.th, nb_recv, &p);
        EXPECT_EQ(retry_try_send(ch, 55), 0);
        pthread_join(p.th, NULL);
        EXPECT_EQ(p.rc, 0);
        EXPECT_EQ(p.val, 55);

        /* A sender on the other side: try_recv gets its value. */
        p = (nb_peer){.ch = ch, .val = 66};
        spawn(&p.th, nb_send, &p);
        v = -1;
        EXPECT_EQ(retry_try_recv(ch, &v), 0);
        EXPECT_EQ(v, 66);
        pthread_join(p.th, NULL);
        EXPECT_EQ(p.rc, 0);

        /* Closed (with one value left if buffered): drain, then CONC_CLOSED. */
        if (cap > 0) {
            v = 77;
            EXPECT_EQ(conc_chan_try_send(ch, &v), 0);
        }
        EXPECT_EQ(conc_chan_close(ch), 0);
        EXPECT_EQ(conc_chan_try_send(ch, &v), CONC_CLOSED);
        s[0].status = 999;
        EXPECT_EQ(conc_try_select(s, 1), 0);
        EXPECT_EQ(s[0].status, CONC_CLOSED);
        if (cap > 0) {
            v = -1;
            EXPECT_EQ(conc_chan_try_recv(ch, &v), 0);
            EXPECT_EQ(v, 77);
        }
        v = -1;
        EXPECT_EQ(conc_chan_try_recv(ch, &v), CONC_CLOSED);
        EXPECT_EQ(v, 0);
        r[0].status = 999;
        EXPECT_EQ(conc_try_select(r, 1), 0);
        EXPECT_EQ(r[0].status, CONC_CLOSED);
        EXPECT_EQ(conc_chan_free(ch), 0);
    }
}

/* ---- select3: what blocks ----------------------------------------------------------- */

enum {
    ST_NIL,        /* NULL channel */
    ST_CLOSED,     /* closed and empty */
    ST_READY_BUF,  /* recv: a value buffered; send: room in the buffer */
    ST_READY_PEER, /* unbuffered with a peer blocked on the other side */
    ST_BLOCK_BUF,  /* recv: empty buffer; send: full buffer */
    ST_BLOCK_UNBUF, /* unbuffered, nobody on the other side */
    ST_COUNT
};
static const char *const st_name[] = {"nil", "closed", "ready-buffered", "ready-peer", "blocking-buffered", "blocking-unbuffered"};

enum { F_PLAIN, F_TRY, F_SELECT1, F_TRYSELECT1, F_SELECT_MIXED, F_TRYSELECT_MIXED, F_SELECT_DONE, F_COUNT };
static const char *const f_name[] = {"plain", "try", "select", "try_select", "select+never-ready", "try_select+never-ready", "select+DONE"};

enum { OUT_DONE, OUT_CLOSED, OUT_BLOCKS, OUT_INVALID };

/* The channel in state st, ready for an operation `kind` (a peer thread if needed). */
static conc_chan_t *s3_setup(int kind, int st, op *peer, bool *has_peer) {
    conc_chan_t *ch = NULL;
    long one = 1;
    *has_peer = false;
    switch (st) {
    case ST_NIL:
        break;
    case ST_CLOSED:
        ch = conc_chan_new(sizeof(long), 1);
        conc_chan_close(ch);
        break;
    case ST_READY_BUF:
        ch = conc_chan_new(sizeof(long), 1);
        if (kind == OP_RECV) {
            long x = 500;
            conc_chan_send(ch, &x, NULL);
        }
        break;
    case ST_READY_PEER:
        ch = conc_chan_new(sizeof(long), 0);
        op_start_blocked(peer, kind == OP_RECV ? OP_SEND : OP_RECV, ch, 600, NULL);
        *has_peer = true;
        break;
    case ST_BLOCK_BUF:
        ch = conc_chan_new(sizeof(long), 1);
        if (kind == OP_SEND) conc_chan_send(ch, &one, NULL);
        break;
    case ST_BLOCK_UNBUF:
        ch = conc_chan_new(sizeof(long), 0);
        break;
    }
    return ch;
}

static int s3_expect(int st, int form) {
    bool plain = form == F_PLAIN || form == F_TRY;
    switch (st) {
    case ST_NIL:
        return plain ? OUT_INVALID : OUT_BLOCKS; /* conc returns CONC_INVALID where Go would block */
    case ST_CLOSED:
        return OUT_CLOSED;
    case ST_READY_BUF:
    case ST_READY_PEER:
        return OUT_DONE;
    default:
        return OUT_BLOCKS;
    }
}

/* Runs the operation in one form; returns the observed outcome. */
static int s3_run(int kind, conc_chan_t *ch, int form, long *val, bool *ok) {
    conc_ctx_t *t = conc_ctx_with_timeout(NULL, 10 * CONC_MILLISECOND);
    conc_chan_t *never = conc_chan_new(sizeof(long), 0);
    long dummy = -1;
    conc_case c = kind == OP_SEND ? conc_case_send(ch, val) : conc_case_recv(ch, val, ok);
    conc_case cs[3];
    int out = -1, rc;
    c.status = 999;
    switch (form) {
    case F_PLAIN:
    case F_TRY:
        if (form == F_PLAIN)
            rc = kind == OP_SEND ? conc_chan_send(ch, val, t) : conc_chan_recv(ch, val, t);
        else
            rc = kind == OP_SEND ? conc_chan_try_send(ch, val) : conc_chan_try_recv(ch, val);
        if (ok) *ok = rc == 0;
        out = rc == 0                                                   ? OUT_DONE
              : rc == CONC_CLOSED                                       ? OUT_CLOSED
              : rc == CONC_INVALID                                      ? OUT_INVALID
              : rc == (form == F_PLAIN ? CONC_DEADLINE_EXCEEDED : CONC_WOULD_BLOCK) ? OUT_BLOCKS
                                                                        : -1;
        break;
    case F_SELECT1:
    case F_TRYSELECT1:
    case F_SELECT_MIXED:
    case F_TRYSELECT_MIXED: {
        size_t n = 1;
        cs[0] = c;
        if (form == F_SELECT_MIXED || form == F_TRYSELECT_MIXED) {
            /* Cases that are never ready: a nil channel, an idle unbuffered one, a DONE
               on a context that does not end. */
            cs[1] = conc_case_recv(NULL, &dummy, NULL);
            cs[2] = conc_case_send(never, &dummy);
            n = 3;
        }
        bool try_form = form == F_TRYSELECT1 || form == F_TRYSELECT_MIXED;
        rc = try_form ? conc_try_select(cs, n) : conc_select(cs, n, t);
        if (rc == 0)
            out = cs[0].status == 0 ? OUT_DONE : cs[0].status == CONC_CLOSED ? OUT_CLOSED : -1;
        else if (rc == (try_form ? CONC_WOULD_BLOCK : CONC_DEADLINE_EXCEEDED))
            out = OUT_BLOCKS;
        break;
    }
    case F_SELECT_DONE:
        cs[0] = c;
        cs[1] = conc_case_done(t);
        rc = conc_select(cs, 2, NULL);
        if (rc == 0)
            out = cs[0].status == 0 ? OUT_DONE : cs[0].status == CONC_CLOSED ? OUT_CLOSED : -1;
        else if (rc == 1 && cs[1].status == CONC_DEADLINE_EXCEEDED)
            out = OUT_BLOCKS;
        break;
    }
    conc_ctx_release(t);
    if (conc_chan_free(never) != 0) out = -2;
    return out;
}

TEST(select3_matrix) {
    static const char *const out_name[] = {"completes", "closed", "blocks", "invalid"};
    int failures = 0;
    for (int kind = OP_SEND; kind <= OP_RECV; kind++) {
        for (int st = 0; st < ST_COUNT; st++) {
            for (int form = 0; form < F_COUNT; form++) {
                op peer;
                bool has_peer;
                conc_chan_t *ch = s3_setup(kind, st, &peer, &has_peer);
                if (st != ST_NIL) ASSERT(ch != NULL);
                long val = kind == OP_SEND ? 700 : -1;
                bool ok = (st == ST_CLOSED) ? true : false;
                int want = s3_expect(st, form);
                int got = s3_run(kind, ch, form, &val, &ok);
                bool good = got == want;
                /* The values went where they should. */
                if (good && want == OUT_DONE && kind == OP_RECV) good = ok && val == (st == ST_READY_PEER ? 600 : 500);
                if (good && want == OUT_CLOSED && kind == OP_RECV) good = !ok && val == 0;
                if (has_peer) {
                    pthread_join(peer.th, NULL);
                    if (peer.rc != 0) good = false;
                    if (kind == OP_SEND && peer.val != 700) good = false;
                }
                if (good && want == OUT_DONE && kind == OP_SEND && st == ST_READY_BUF) {
                    long x = -1;
                    good = conc_chan_try_recv(ch, &x) == 0 && x == 700;
                }
                /* "Blocks" left the channel as it was. */
                if (good && want == OUT_BLOCKS && ch) {
                    size_t len = conc_chan_len(ch);
                    good = len == (st == ST_BLOCK_BUF && kind == OP_SEND ? 1u : 0u);
                    long x = 1;
                    if (st == ST_BLOCK_UNBUF)
                        good = good && (kind == OP_SEND ? conc_chan_try_send(ch, &x) : conc_chan_try_recv(ch, &x)) == CONC_WOULD_BLOCK;
                }
                if (!good) {
                    failures++;
                    printf("#   %s on %s channel, %s form: expected %s, got %s\n", kind == OP_SEND ? "send" : "recv",
                           st_name[st], f_name[form], out_name[want], got >= 0 ? out_name[got] : "an unexpected status");
                }
                if (ch) EXPECT_EQ(conc_chan_free(ch), 0);
            }
        }
    }
    EXPECT_EQ(failures, 0);

    /* Go's "empty select blocks": here it needs a context that can end. */
    conc_ctx_t *t = conc_ctx_with_timeout(NULL, 10 * CONC_MILLISECOND);
    EXPECT_EQ(conc_select(NULL, 0, t), CONC_DEADLINE_EXCEEDED);
    conc_ctx_release(t);
}

/* ---- select6 ------------------------------------------------------------------------ */

typedef struct s6 {
    conc_chan_t *c1, *c2, *c3;
    int rc_a, rc_b1, rc_b2;
    int idx_b;
    pthread_t a, b;
} s6;

static void *s6_a(void *arg) {
    s6 *s = arg;
    s->rc_a = conc_chan_recv(s->c1, NULL, NULL);
    return NULL;
}

static void *s6_b(void *arg) {
    s6 *s = arg;
    conc_case cs[] = {CONC_RECV(s->c1, NULL), CONC_RECV(s->c2, NULL)};
    s->idx_b = conc_select(cs, 2, NULL);
    char t = 1;
    s->rc_b1 = conc_chan_send(s->c3, &t, NULL);
    s->rc_b2 = conc_chan_recv(s->c1, NULL, NULL);
    return NULL;
}

TEST(select6_failed_case_keeps_queue_intact) {
    /* A waits on c1; B selects on c1 and c2 behind it. B's c2 case fires; its c1
       registration must vanish without disturbing A's, and B's later plain receive on c1
       must queue properly: both of this thread's sends on c1 are taken. */
    for (int round = 0; round < 50; round++) {
        s6 s = {.c1 = conc_chan_new(1, 0), .c2 = conc_chan_new(1, 0), .c3 = conc_chan_new(1, 0), .rc_a = 99, .rc_b1 = 99, .rc_b2 = 99, .idx_b = 99};
        ASSERT(s.c1 && s.c2 && s.c3);
        spawn(&s.a, s6_a, &s);
        EXPECT(wait_blocked(s.c1, 0, 1));
        spawn(&s.b, s6_b, &s);
        /* B's select is parked on both channels once c2 counts a blocked receive (a
           parked select counts as a waiting receive on each of its channels). */
        EXPECT(wait_blocked(s.c2, 0, 1));
        EXPECT(wait_blocked(s.c1, 0, 2));
        char t = 1;
        EXPECT_EQ(conc_chan_send(s.c2, &t, NULL), 0);
        EXPECT_EQ(conc_chan_recv(s.c3, &t, NULL), 0);
        conc_ctx_t *guard = conc_ctx_with_timeout(NULL, 10 * CONC_SECOND);
        EXPECT_EQ(conc_chan_send(s.c1, &t, guard), 0);
        EXPECT_EQ(conc_chan_send(s.c1, &t, guard), 0);
        conc_ctx_release(guard);
        pthread_join(s.a, NULL);
        pthread_join(s.b, NULL);
        EXPECT_EQ(s.idx_b, 1);
        EXPECT_EQ(s.rc_a, 0);
        EXPECT_EQ(s.rc_b1, 0);
        EXPECT_EQ(s.rc_b2, 0);
        EXPECT_EQ(conc_chan_free(s.c1), 0);
        EXPECT_EQ(conc_chan_free(s.c2), 0);
        EXPECT_EQ(conc_chan_free(s.c3), 0);
    }
}

/* ---- select7: receive forms x send forms -------------------------------------------- */

typedef struct s7 {
    pthread_t th;
    conc_chan_t *c, *other;
    int form;
    int rc;
} s7;

/* Receive forms: plain, single-case select, two-case select; all discard the value. */
static void *s7_recv(void *arg) {
    s7 *s = arg;
    if (s->form == 0) {
        s->rc = conc_chan_recv(s->c, NULL, NULL);
    } else if (s->form == 1) {
        conc_case cs[] = {CONC_RECV(s->c, NULL)};
        s->rc = conc_select(cs, 1, NULL);
    } else {
        conc_case cs[] = {CONC_RECV(s->other, NULL), CONC_RECV(s->c, NULL)};
        s->rc = conc_select(cs, 2, NULL) == 1 ? 0 : -100;
    }
    return NULL;
}

TEST(select7_discarding_receive_forms) {
    for (int rf = 0; rf < 3; rf++) {
        for (int sf = 0; sf < 3; sf++) {
            s7 s = {.c = conc_chan_new(sizeof(long), 0), .other = conc_chan_new(sizeof(long), 0), .form = rf, .rc = 99};
            conc_chan_t *other2 = conc_chan_new(sizeof(long), 0);
            ASSERT(s.c && s.other && other2);
            spawn(&s.th, s7_recv, &s);
            long one = 1;
            int rc;
            if (sf == 0) {
                rc = conc_chan_send(s.c, &one, NULL);
            } else if (sf == 1) {
                conc_case cs[] = {CONC_SEND(s.c, &one)};
                rc = conc_select(cs, 1, NULL);
            } else {
                conc_case cs[] = {CONC_SEND(s.c, &one), CONC_SEND(other2, &one)};
                rc = conc_select(cs, 2, NULL);
            }
            pthread_join(s.th, NULL);
            EXPECT_EQ(rc, 0);
            EXPECT_EQ(s.rc, 0);
            EXPECT_EQ(conc_chan_free(s.c), 0);
            EXPECT_EQ(conc_chan_free(s.other), 0);
            EXPECT_EQ(conc_chan_free(other2), 0);
        }
    }
}

/* ---- pipeline ----------------------------------------------------------------------- */

enum { MAXDEPTH = 100 };

typedef struct link {
    pthread_t th;
    conc_chan_t *in, *out;
    conc_ctx_t *ctx; /* NULL: torn down by close; else by cancellation (select form) */
    long passed;
    int errs;
} link_t;

static void *link_main(void *arg) {
    link_t *l = arg;
    for (;;) {
        long v;
        if (!l->ctx) {
            int rc = conc_chan_recv(l->in, &v, NULL);
            if (rc == CONC_CLOSED) break;
            if (rc != 0) {
                l->errs++;
                break;
            }
            v++;
            if (conc_chan_send(l->out, &v, NULL) != 0) l->errs++;
            l->passed++;
        } else {
            conc_case r[] = {CONC_RECV(l->in, &v), CONC_DONE(l->ctx)};
            if (conc_select(r, 2, NULL) != 0) return NULL;
            v++;
            conc_case s[] = {CONC_DONE(l->ctx), CONC_SEND(l->out, &v)};
            if (conc_select(s, 2, NULL) != 1) return NULL;
            l->passed++;
        }
    }
    /* Closed: pass the close on, in order. */
    if (conc_chan_close(l->out) != 0) l->errs++;
    return NULL;
}

typedef struct feeder {
    pthread_t th;
    conc_chan_t *out;
    long n;
    int errs;
} feeder;

static void *feed(void *arg) {
    feeder *f = arg;
    for (long i = 0; i < f->n; i++)
        if (conc_chan_send(f->out, &i, NULL) != 0) f->errs++;
    if (conc_chan_close(f->out) != 0) f->errs++;
    return NULL;
}

TEST(deep_pipeline_closed_in_order) {
    conc_chan_t *chans[MAXDEPTH + 1];
    link_t links[MAXDEPTH];
    const int depth = thread_count(MAXDEPTH, 16);
    for (int i = 0; i <= depth; i++) ASSERT((chans[i] = conc_chan_new(sizeof(long), 0)) != NULL);
    for (int i = 0; i < depth; i++) {
        links[i] = (link_t){.in = chans[i], .out = chans[i + 1]};
        spawn(&links[i].th, link_main, &links[i]);
    }
    feeder f = {.out = chans[0], .n = tap_iters(1000)};
    spawn(&f.th, feed, &f);
    long bad = 0, count = 0, v;
    int rc;
    while ((rc = conc_chan_recv(chans[depth], &v, NULL)) == 0) {
        if (v != count + depth) bad++;
        count++;
    }
    EXPECT_EQ(rc, CONC_CLOSED);
    EXPECT_EQ(bad, 0);
    EXPECT_EQ(count, f.n);
    /* The last close implies all earlier ones. */
    long x = 0;
    for (int i = 0; i <= depth; i++) EXPECT_EQ(conc_chan_try_send(chans[i], &x), CONC_CLOSED);
    pthread_join(f.th, NULL);
    EXPECT_EQ(f.errs, 0);
    for (int i = 0; i < depth; i++) {
        pthread_join(links[i].th, NULL);
        EXPECT_EQ(links[i].errs, 0);
        EXPECT_EQ(links[i].passed, f.n);
    }
    for (int i = 0; i <= depth; i++) EXPECT_EQ(conc_chan_free(chans[i]), 0);
}

TEST(deep_pipeline_cancelled) {
    conc_ctx_t *ctx = conc_ctx_with_cancel(NULL);
    conc_chan_t *chans[MAXDEPTH + 1];
    link_t links[MAXDEPTH];
    const int depth = thread_count(MAXDEPTH, 16);
    for (int i = 0; i <= depth; i++) ASSERT((chans[i] = conc_chan_new(sizeof(long), 0)) != NULL);
    for (int i = 0; i < depth; i++) {
        links[i] = (link_t){.in = chans[i], .out = chans[i + 1], .ctx = ctx};
        spawn(&links[i].th, link_main, &links[i]);
    }
    /* Keep values flowing, then cancel mid-stream: every link must leave. */
    long n = tap_iters(500), bad = 0;
    for (long i = 0; i < n; i++) {
        if (conc_chan_send(chans[0], &i, NULL) != 0) bad++;
        long v = -1;
        if (conc_chan_recv(chans[depth], &v, NULL) != 0 || v != i + depth) bad++;
    }
    EXPECT_EQ(bad, 0);
    conc_ctx_cancel(ctx);
    for (int i = 0; i < depth; i++) pthread_join(links[i].th, NULL);
    for (int i = 0; i < depth; i++) EXPECT_EQ(links[i].passed, n);
    conc_ctx_release(ctx);
    for (int i = 0; i <= depth; i++) EXPECT_EQ(conc_chan_free(chans[i]), 0);
}

int main(void) {
    RUN(sieve);
    RUN(doubleselect);
    RUN(fifo);
    RUN(nonblock);
    RUN(select3_matrix);
    RUN(select6_failed_case_keeps_queue_intact);
    RUN(select7_discarding_receive_forms);
    RUN(deep_pipeline_closed_in_order);
    RUN(deep_pipeline_cancelled);
    return tap_done();
}
