/* stress_chan.c - channels under load: exactly-once delivery.

   mpmc                more threads than cores, every value delivered exactly once.
   cancel_races        a send or receive whose context is cancelled at the instant the peer
                       arrives: what the senders report as sent is exactly what the receivers
                       report as received (PITFALLS 8).
   close_races         the same with close racing send and receive.
   close_during_mpmc   close while many producers and consumers are busy.
   close_wakes_all     close while many senders and receivers are blocked (PITFALLS 3).
   ring_fifo_close     the lock-free ring of buffered channels (caps 1, 2, 3, 7, 64): producers
                       send (id, sequence) in 512-byte elements (a torn copy shows) with
                       send / try_send / select, consumers take with
                       recv / try_recv / select, close races the lot; every value sent is
                       received exactly once, each consumer sees each producer's sequence
                       rising, and once a receive reports CONC_CLOSED none gets a value.
   ring_select_mixed   selects over two buffered channels against plain fast-path receivers
                       and senders on the same channels, with the select's own context
                       cancelled at random: exactly once on both sides.

   Loop counts scale with tap_iters() (CONC_TEST_SCALE=0.05 under Valgrind). Threads are
   released together with barriers, never ordered with sleeps. */
#define CONC_IMPLEMENTATION
#include "conc.h"
#include "tap.h"
#include "test_util.h"

#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <time.h>

/* ---- helpers ------------------------------------------------------------------------ */

/* ---- mpmc --------------------------------------------------------------------------- */

enum { MAXPROD = 8, MAXCONS = 8 };

typedef struct producer {
    pthread_t th;
    conc_chan_t *ch;
    long first, n;   /* sends first .. first+n-1, or until closed */
    long sent;       /* successful sends */
    long long sum;   /* of the values sent */
    int errs;
    uint64_t seed;
} producer;

typedef struct consumer {
    pthread_t th;
    conc_chan_t *ch;
    unsigned char *seen; /* own bitmap: count per value (saturating) */
    long range;          /* values are 0 .. range-1 */
    long got;
    long long sum;
    int errs;
    uint64_t seed;
} consumer;

static void *produce(void *arg) {
    producer *p = arg;
    for (long i = 0; i < p->n; i++) {
        long v = p->first + i;
        if (rnd(&p->seed) % 16 == 0) sched_yield();
        int rc = (rnd(&p->seed) & 1) ? conc_chan_send(p->ch, &v, NULL) : conc_chan_try_send(p->ch, &v);
        if (rc == CONC_WOULD_BLOCK) rc = conc_chan_send(p->ch, &v, NULL);
        if (rc == CONC_CLOSED) break;
        if (rc != 0) {
            p->errs++;
            break;
        }
        p->sent++;
        p->sum += v;
    }
    return NULL;
}

static void *consume(void *arg) {
    consumer *c = arg;
    for (;;) {
        long v = -1;
        if (rnd(&c->seed) % 16 == 0) sched_yield();
        int rc = conc_chan_recv(c->ch, &v, NULL);
        if (rc == CONC_CLOSED) {
            if (v != 0) c->errs++;
            break;
        }
        if (rc != 0 || v < 0 || v >= c->range) {
            c->errs++;
            break;
        }
        if (c->seen[v] < 255) c->seen[v]++;
        c->got++;
        c->sum += v;
    }
    return NULL;
}

/* Runs 8 producers (n values each) and 8 consumers (4 and 4 under Valgrind, where the
   cost grows with the thread count) on a channel of capacity cap.
   If close_after >= 0, closes the channel once the consumers have taken close_after values
   (the producers then stop at CONC_CLOSED; n = 2 * close_after bounds them). Checks
   exactly-once delivery. */
static void run_mpmc(size_t cap, long n, long close_after) {
    if (close_after >= 0) n = 2 * close_after;
    const int nprod = tap_scale() < 1 ? 4 : MAXPROD, ncons = tap_scale() < 1 ? 4 : MAXCONS;
    long range = n * nprod;
    long per_range = n;
    conc_chan_t *ch = conc_chan_new(sizeof(long), cap);
    ASSERT(ch != NULL);
    producer prod[MAXPROD];
    consumer cons[MAXCONS];
    for (int i = 0; i < ncons; i++) {
        cons[i] = (consumer){.ch = ch, .range = range, .seed = 0x9E3779B97F4A7C15ull * (uint64_t)(i + 1)};
        cons[i].seen = calloc((size_t)range, 1);
        ASSERT(cons[i].seen != NULL);
        spawn(&cons[i].th, consume, &cons[i]);
    }
    for (int i = 0; i < nprod; i++) {
        prod[i] = (producer){.ch = ch, .first = i * per_range, .n = n, .seed = 0xD1B54A32D192ED03ull * (uint64_t)(i + 7)};
        spawn(&prod[i].th, produce, &prod[i]);
    }
    if (close_after >= 0) {
        /* Wait (through the channel's own counters) until enough went through. */
        for (;;) {
            conc_chan_stats s;
            conc_chan_stats_get(ch, &s);
            if ((long)s.recvs >= close_after) break;
            sched_yield();
            nap();
        }
        EXPECT_EQ(conc_chan_close(ch), 0);
        for (int i = 0; i < nprod; i++) pthread_join(prod[i].th, NULL);
    } else {
        for (int i = 0; i < nprod; i++) pthread_join(prod[i].th, NULL);
        EXPECT_EQ(conc_chan_close(ch), 0);
    }
    for (int i = 0; i < ncons; i++) pthread_join(cons[i].th, NULL);

    long sent = 0, got = 0, errs = 0;
    long long ssum = 0, rsum = 0;
    for (int i = 0; i < nprod; i++) {
        sent += prod[i].sent;
        ssum += prod[i].sum;
        errs += prod[i].errs;
        if (close_after < 0) EXPECT_EQ(prod[i].sent, n);
    }
    for (int i = 0; i < ncons; i++) {
        got += cons[i].got;
        rsum += cons[i].sum;
        errs += cons[i].errs;
    }
    EXPECT_EQ(errs, 0);
    EXPECT_EQ(sent, got);
    EXPECT(ssum == rsum);
    /* Per value: received at most once, and every sent value received. */
    long dup = 0, lost = 0;
    for (int p = 0; p < nprod; p++) {
        for (long i = 0; i < prod[p].sent; i++) {
            long v = prod[p].first + i;
            int count = 0;
            for (int c = 0; c < ncons; c++) count += cons[c].seen[v];
            if (count == 0) lost++;
            if (count > 1) dup++;
        }
        /* Nothing beyond what the producer reports as sent. */
        for (long i = prod[p].sent; i < prod[p].sent + 2 && i < per_range; i++)
            for (int c = 0; c < ncons; c++)
                if (cons[c].seen[prod[p].first + i]) dup++;
    }
    EXPECT_EQ(dup, 0);
    EXPECT_EQ(lost, 0);
    EXPECT_EQ(conc_chan_len(ch), 0);
    for (int i = 0; i < ncons; i++) free(cons[i].seen);
    EXPECT_EQ(conc_chan_free(ch), 0);
}

TEST(mpmc_unbuffered) { run_mpmc(0, tap_iters(8000), -1); }
TEST(mpmc_cap1) { run_mpmc(1, tap_iters(8000), -1); }
TEST(mpmc_cap16) { run_mpmc(16, tap_iters(8000), -1); }

TEST(close_during_mpmc) {
    for (int r = 0; r < 3; r++) {
        run_mpmc(0, 0, tap_iters(10000));
        run_mpmc(8, 0, tap_iters(10000));
    }
}

/* ---- racing rounds ------------------------------------------------------------------ */

/* One round: a sender thread S, a receiver thread R and a third thread C are released
   together by a barrier; C cancels one side's context (or closes the channel) while the
   other side arrives. The main thread sets the round up and checks it. */
enum {
    M_CANCEL_SEND_UNBUF, /* C cancels S's ctx; R receives, then is cancelled by S when S ends */
    M_CANCEL_RECV_UNBUF, /* C cancels R's ctx; S sends, then is cancelled by R when R ends */
    M_CANCEL_SEND_FULL,  /* cap 1 holding a token; S sends (must wait for room); R takes the
                            token; C cancels S */
    M_CANCEL_RECV_EMPTY, /* cap 1, empty; R receives; S sends; C cancels R */
    M_CLOSE_UNBUF,       /* S sends, R receives, C closes */
    M_CLOSE_BUF,         /* same on cap 1 */
    M_COUNT
};

typedef struct race {
    pthread_barrier_t start, end;
    bool quit;
    int mode;
    conc_chan_t *ch;
    conc_ctx_t *cs, *cr; /* S's and R's contexts */
    long v;              /* S's value */
    long x;              /* what R received */
    int s_rc, r_rc;
    uint64_t seed_s, seed_r, seed_c;
} race;

static void *race_s(void *arg) {
    race *r = arg;
    for (;;) {
        pthread_barrier_wait(&r->start);
        if (r->quit) return NULL;
        jitter(&r->seed_s);
        long v = r->v;
        r->s_rc = conc_chan_send(r->ch, &v, r->cs);
        if (r->mode == M_CANCEL_SEND_UNBUF) conc_ctx_cancel(r->cr);
        pthread_barrier_wait(&r->end);
    }
}

static void *race_r(void *arg) {
    race *r = arg;
    for (;;) {
        pthread_barrier_wait(&r->start);
        if (r->quit) return NULL;
        jitter(&r->seed_r);
        long x = -1;
        r->r_rc = conc_chan_recv(r->ch, &x, r->cr);
        r->x = x;
        if (r->mode == M_CANCEL_RECV_UNBUF) conc_ctx_cancel(r->cs);
        pthread_barrier_wait(&r->end);
    }
}

static void *race_c(void *arg) {
    race *r = arg;
    for (;;) {
        pthread_barrier_wait(&r->start);
        if (r->quit) return NULL;
        jitter(&r->seed_c);
        switch (r->mode) {
        case M_CANCEL_SEND_UNBUF:
        case M_CANCEL_SEND_FULL:
            conc_ctx_cancel(r->cs);
            break;
        case M_CANCEL_RECV_UNBUF:
        case M_CANCEL_RECV_EMPTY:
            conc_ctx_cancel(r->cr);
            break;
        default:
            conc_chan_close(r->ch);
            break;
        }
        pthread_barrier_wait(&r->end);
    }
}

typedef struct race_tally {
    long rounds, transferred, failed, bad;
} race_tally;

/* Checks one finished round; returns false (and says why) if it broke exactly-once. */
static bool race_check(race *r, race_tally *t) {
    bool s_ok = r->s_rc == 0, r_ok = r->r_rc == 0;
    long left = -1, extra = 0;
    int lrc;
    bool good = true;
    switch (r->mode) {
    case M_CANCEL_SEND_UNBUF:
    case M_CANCEL_RECV_UNBUF:
        good = (r->s_rc == 0 || r->s_rc == CONC_CANCELED) && (r->r_rc == 0 || r->r_rc == CONC_CANCELED) &&
               s_ok == r_ok && (!r_ok || r->x == r->v) && (r_ok || r->x == -1);
        good = good && conc_chan_try_recv(r->ch, &extra) == CONC_WOULD_BLOCK;
        break;
    case M_CANCEL_SEND_FULL:
        /* R always gets the token; the buffer then holds S's value iff S reports success. */
        good = r_ok && r->x == -7 && (r->s_rc == 0 || r->s_rc == CONC_CANCELED);
        lrc = conc_chan_try_recv(r->ch, &left);
        good = good && (s_ok ? (lrc == 0 && left == r->v) : lrc == CONC_WOULD_BLOCK);
        good = good && conc_chan_try_recv(r->ch, &extra) == CONC_WOULD_BLOCK;
        break;
    case M_CANCEL_RECV_EMPTY:
        /* S always succeeds (room); the value is with R iff R reports success, else still
           buffered. */
        good = s_ok && (r->r_rc == 0 || r->r_rc == CONC_CANCELED);
        lrc = conc_chan_try_recv(r->ch, &left);
        good = good && (r_ok ? (r->x == r->v && lrc == CONC_WOULD_BLOCK) : (r->x == -1 && lrc == 0 && left == r->v));
        break;
    case M_CLOSE_UNBUF:
    case M_CLOSE_BUF:
        good = (r->s_rc == 0 || r->s_rc == CONC_CLOSED) && (r->r_rc == 0 || r->r_rc == CONC_CLOSED) && s_ok == r_ok &&
               (r_ok ? r->x == r->v : r->x == 0);
        good = good && conc_chan_try_recv(r->ch, &extra) == CONC_CLOSED && conc_chan_len(r->ch) == 0;
        break;
    }
    t->rounds++;
    if (r->mode == M_CANCEL_SEND_FULL ? s_ok : r_ok)
        t->transferred++;
    else
        t->failed++;
    if (!good) {
        if (t->bad < 5)
            printf("#   mode %d round %ld: send rc %d, recv rc %d, sent %ld, received %ld, left %ld\n", r->mode, t->rounds,
                   r->s_rc, r->r_rc, r->v, r->x, left);
        t->bad++;
    }
    return good;
}

/* Runs `rounds` rounds of one mode (or of all modes in turn if mode < 0). */
static void run_races(int mode, long rounds, race_tally *tally) {
    race r;
    memset(&r, 0, sizeof r);
    pthread_barrier_init(&r.start, NULL, 4);
    pthread_barrier_init(&r.end, NULL, 4);
    r.seed_s = 0x1234567ull ^ (uint64_t)conc_now();
    r.seed_r = 0x89ABCDEull * 3 + 1;
    r.seed_c = 0xF00DFACEull;
    pthread_t th[3];
    spawn(&th[0], race_s, &r);
    spawn(&th[1], race_r, &r);
    spawn(&th[2], race_c, &r);
    conc_chan_t *unbuf = conc_chan_new(sizeof(long), 0), *buf = conc_chan_new(sizeof(long), 1);
    ASSERT(unbuf && buf);
    for (long i = 0; i < rounds; i++) {
        r.mode = mode >= 0 ? mode : (int)(i % M_COUNT);
        r.v = i + 1;
        r.x = -1;
        r.s_rc = r.r_rc = 12345;
        r.cs = conc_ctx_with_cancel(NULL);
        r.cr = conc_ctx_with_cancel(NULL);
        switch (r.mode) {
        case M_CANCEL_SEND_UNBUF:
        case M_CANCEL_RECV_UNBUF:
            r.ch = unbuf;
            break;
        case M_CANCEL_SEND_FULL: {
            long token = -7;
            r.ch = buf;
            conc_chan_send(buf, &token, NULL);
            break;
        }
        case M_CANCEL_RECV_EMPTY:
            r.ch = buf;
            break;
        case M_CLOSE_UNBUF:
            r.ch = conc_chan_new(sizeof(long), 0);
            break;
        case M_CLOSE_BUF:
            r.ch = conc_chan_new(sizeof(long), 1);
            break;
        }
        pthread_barrier_wait(&r.start);
        pthread_barrier_wait(&r.end);
        race_check(&r, tally);
        conc_ctx_release(r.cs);
        conc_ctx_release(r.cr);
        if (r.mode == M_CLOSE_UNBUF || r.mode == M_CLOSE_BUF) EXPECT_EQ(conc_chan_free(r.ch), 0);
    }
    r.quit = true;
    pthread_barrier_wait(&r.start);
    for (int i = 0; i < 3; i++) pthread_join(th[i], NULL);
    pthread_barrier_destroy(&r.start);
    pthread_barrier_destroy(&r.end);
    EXPECT_EQ(conc_chan_free(unbuf), 0);
    EXPECT_EQ(conc_chan_free(buf), 0);
}

static void report(const char *what, race_tally *t) {
    printf("#   %s: %ld rounds, %ld transferred, %ld not, %ld broke exactly-once\n", what, t->rounds, t->transferred,
           t->failed, t->bad);
}

TEST(cancel_races_unbuffered) {
    race_tally t = {0};
    run_races(M_CANCEL_SEND_UNBUF, tap_iters(30000), &t);
    run_races(M_CANCEL_RECV_UNBUF, tap_iters(30000), &t);
    report("cancel vs peer, unbuffered", &t);
    EXPECT_EQ(t.bad, 0);
    /* Both outcomes must actually have happened, or the race was not exercised. */
    if (tap_scale() >= 1.0) {
        EXPECT(t.transferred > 0);
        EXPECT(t.failed > 0);
    }
}

TEST(cancel_races_buffered) {
    race_tally t = {0};
    run_races(M_CANCEL_SEND_FULL, tap_iters(20000), &t);
    run_races(M_CANCEL_RECV_EMPTY, tap_iters(20000), &t);
    report("cancel vs peer, buffered", &t);
    EXPECT_EQ(t.bad, 0);
}

TEST(close_races) {
    race_tally t = {0};
    run_races(M_CLOSE_UNBUF, tap_iters(12000), &t);
    run_races(M_CLOSE_BUF, tap_iters(12000), &t);
    report("close vs send/recv", &t);
    EXPECT_EQ(t.bad, 0);
    if (tap_scale() >= 1.0) {
        EXPECT(t.transferred > 0);
        EXPECT(t.failed > 0);
    }
}

TEST(all_races_mixed) {
    race_tally t = {0};
    run_races(-1, tap_iters(12000), &t);
    report("all modes interleaved", &t);
    EXPECT_EQ(t.bad, 0);
}

/* ---- close wakes everybody ---------------------------------------------------------- */

typedef struct blocked_op {
    pthread_t th;
    conc_chan_t *ch;
    bool send;
    long val;
    int rc;
} blocked_op;

static void *blocked_main(void *arg) {
    blocked_op *b = arg;
    b->rc = b->send ? conc_chan_send(b->ch, &b->val, NULL) : conc_chan_recv(b->ch, &b->val, NULL);
    return NULL;
}

TEST(close_wakes_all) {
    enum { N = 16 };
    long rounds = tap_iters(20);
    for (long round = 0; round < rounds; round++) {
        conc_chan_t *rch = conc_chan_new(sizeof(long), round & 1 ? 4 : 0); /* receivers wait here */
        conc_chan_t *sch = conc_chan_new(sizeof(long), round & 1 ? 4 : 0); /* senders wait here */
        ASSERT(rch && sch);
        long fill = 1;
        for (size_t i = 0; i < conc_chan_cap(sch); i++) conc_chan_send(sch, &fill, NULL);
        blocked_op ops[2 * N];
        for (int i = 0; i < 2 * N; i++) {
            ops[i] = (blocked_op){.ch = i < N ? rch : sch, .send = i >= N, .val = i < N ? -1 : 1000 + i, .rc = 12345};
            spawn(&ops[i].th, blocked_main, &ops[i]);
        }
        EXPECT(wait_blocked_long(rch, 0, N));
        EXPECT(wait_blocked_long(sch, N, 0));
        /* Close in either order, sometimes from another thread's point of view. */
        if (round & 2) {
            EXPECT_EQ(conc_chan_close(sch), 0);
            EXPECT_EQ(conc_chan_close(rch), 0);
        } else {
            EXPECT_EQ(conc_chan_close(rch), 0);
            EXPECT_EQ(conc_chan_close(sch), 0);
        }
        int bad = 0;
        for (int i = 0; i < 2 * N; i++) {
            pthread_join(ops[i].th, NULL);
            if (ops[i].rc != CONC_CLOSED) bad++;
            if (i < N && ops[i].val != 0) bad++;
        }
        EXPECT_EQ(bad, 0);
        /* Only the original buffered values remain to drain. */
        EXPECT_EQ(conc_chan_len(sch), conc_chan_cap(sch));
        long v;
        for (size_t i = 0; i < conc_chan_cap(sch); i++) {
            EXPECT_EQ(conc_chan_recv(sch, &v, NULL), 0);
            EXPECT_EQ(v, 1);
        }
        EXPECT_EQ(conc_chan_recv(sch, &v, NULL), CONC_CLOSED);
        EXPECT_EQ(conc_chan_free(rch), 0);
        EXPECT_EQ(conc_chan_free(sch), 0);
    }
}

/* ---- the ring: FIFO per producer, exactly once, close racing ------------------------- */

enum { RING_P = 4, RING_C = 4, RING_WORDS = 64 };

/* A big element (512 bytes): a send's copy into the ring takes long enough for close and
   receivers to meet it half-done, and a torn copy shows as words that disagree. */
typedef struct ring_elem {
    long w[RING_WORDS];
} ring_elem;

static void ring_fill(ring_elem *e, long v) {
    for (int i = 0; i < RING_WORDS; i++) e->w[i] = v;
}
static bool ring_whole(const ring_elem *e) {
    for (int i = 1; i < RING_WORDS; i++)
        if (e->w[i] != e->w[0]) return false;
    return true;
}

typedef struct ring_prod {
    pthread_t th;
    conc_chan_t *ch;
    long id, n, sent;
    int errs;
    uint64_t seed;
} ring_prod;

typedef struct ring_cons {
    pthread_t th;
    conc_chan_t *ch;
    long n;                 /* values per producer */
    unsigned char *seen;    /* RING_P * n counters */
    long last[RING_P];      /* last sequence seen from each producer (FIFO per sender) */
    long got;
    int errs;
    uint64_t seed;
} ring_cons;

static void *ring_produce(void *arg) {
    ring_prod *p = arg;
    for (long i = 0; i < p->n; i++) {
        ring_elem v;
        ring_fill(&v, p->id * p->n + i);
        int rc;
        switch (rnd(&p->seed) % 3) {
        case 0: rc = conc_chan_send(p->ch, &v, NULL); break;
        case 1:
            rc = conc_chan_try_send(p->ch, &v);
            if (rc == CONC_WOULD_BLOCK) rc = conc_chan_send(p->ch, &v, NULL);
            break;
        default: {
            conc_case cs[] = {CONC_SEND(p->ch, &v)};
            rc = conc_select(cs, 1, NULL) == 0 ? cs[0].status : -999;
        }
        }
        if (rc == CONC_CLOSED) break;
        if (rc != 0) {
            p->errs++;
            break;
        }
        p->sent++;
    }
    return NULL;
}

static void *ring_consume(void *arg) {
    ring_cons *c = arg;
    bool closed = false;
    for (;;) {
        ring_elem e;
        bool ok = false;
        int rc;
        ring_fill(&e, -1);
        switch (rnd(&c->seed) % 3) {
        case 0: rc = conc_chan_recv(c->ch, &e, NULL); break;
        case 1:
            rc = conc_chan_try_recv(c->ch, &e);
            if (rc == CONC_WOULD_BLOCK) rc = conc_chan_recv(c->ch, &e, NULL);
            break;
        default: {
            conc_case cs[] = {CONC_RECV_OK(c->ch, &e, &ok)};
            rc = conc_select(cs, 1, NULL) == 0 ? cs[0].status : -999;
            if ((rc == 0) != ok) c->errs++;
        }
        }
        long v = e.w[0];
        if (!ring_whole(&e)) c->errs++;
        if (rc == CONC_CLOSED) {
            if (v != 0) c->errs++;
            if (closed) break;
            closed = true; /* once closed and drained, it stays so: a second look must agree */
            continue;
        }
        if (rc != 0 || closed || v < 0 || v >= RING_P * c->n) {
            c->errs++;
            break;
        }
        long id = v / c->n, seq = v % c->n;
        if (seq <= c->last[id]) c->errs++; /* overtaken, or a duplicate */
        c->last[id] = seq;
        if (c->seen[v] < 255) c->seen[v]++;
        c->got++;
    }
    return NULL;
}

static void ring_round(size_t cap, long n, bool close_early, uint64_t seed) {
    conc_chan_t *ch = conc_chan_new(sizeof(ring_elem), cap);
    ASSERT(ch != NULL);
    ring_prod prod[RING_P];
    ring_cons cons[RING_C];
    for (int i = 0; i < RING_C; i++) {
        cons[i] = (ring_cons){.ch = ch, .n = n, .seed = seed * 31 + (uint64_t)i + 1};
        for (int k = 0; k < RING_P; k++) cons[i].last[k] = -1;
        cons[i].seen = calloc((size_t)(RING_P * n), 1);
        ASSERT(cons[i].seen != NULL);
        spawn(&cons[i].th, ring_consume, &cons[i]);
    }
    for (int i = 0; i < RING_P; i++) {
        prod[i] = (ring_prod){.ch = ch, .id = i, .n = n, .seed = seed * 77 + (uint64_t)i + 1};
        spawn(&prod[i].th, ring_produce, &prod[i]);
    }
    if (close_early) {
        /* close while values stream: some sends are mid-copy in the ring right now */
        for (;;) {
            conc_chan_stats s;
            conc_chan_stats_get(ch, &s);
            if ((long)s.sends >= n) break;
            sched_yield();
        }
        EXPECT_EQ(conc_chan_close(ch), 0);
        for (int i = 0; i < RING_P; i++) pthread_join(prod[i].th, NULL);
    } else {
        for (int i = 0; i < RING_P; i++) pthread_join(prod[i].th, NULL);
        EXPECT_EQ(conc_chan_close(ch), 0);
    }
    for (int i = 0; i < RING_C; i++) pthread_join(cons[i].th, NULL);
    long errs = 0, sent = 0, got = 0, lost = 0, dup = 0;
    for (int i = 0; i < RING_P; i++) {
        errs += prod[i].errs;
        sent += prod[i].sent;
        if (!close_early) EXPECT_EQ(prod[i].sent, n);
    }
    for (int i = 0; i < RING_C; i++) {
        errs += cons[i].errs;
        got += cons[i].got;
    }
    for (int p = 0; p < RING_P; p++)
        for (long i = 0; i < n; i++) {
            int count = 0;
            for (int c = 0; c < RING_C; c++) count += cons[c].seen[p * n + i];
            if (i < prod[p].sent && count == 0) lost++;
            if (count > (i < prod[p].sent ? 1 : 0)) dup++; /* twice, or never sent */
        }
    EXPECT_EQ(errs, 0);
    EXPECT_EQ(sent, got);
    EXPECT_EQ(lost, 0);
    EXPECT_EQ(dup, 0);
    conc_chan_stats s;
    conc_chan_stats_get(ch, &s);
    EXPECT_EQ((long)s.sends, sent);
    EXPECT_EQ((long)s.recvs, got);
    EXPECT(s.high_water <= cap);
    EXPECT_EQ(conc_chan_len(ch), 0);
    for (int i = 0; i < RING_C; i++) free(cons[i].seen);
    EXPECT_EQ(conc_chan_free(ch), 0);
}

TEST(ring_fifo_close) {
    static const size_t caps[] = {1, 2, 3, 7, 64};
    long rounds = tap_iters(40), n = tap_iters(2000);
    if (n < 50) n = 50;
    for (long r = 0; r < rounds; r++) ring_round(caps[r % 5], n, r & 1, (uint64_t)r + 1);
}

/* ---- selects against the fast path -------------------------------------------------- */

typedef struct ring_sel {
    pthread_t th;
    conc_chan_t *a, *b;
    long n;
    bool selecting;  /* a select over a and b (else a plain receive on a, or b) */
    long got, sum, cancelled;
    int errs;
    uint64_t seed;
} ring_sel;

static void *ring_sel_main(void *arg) {
    ring_sel *s = arg;
    conc_chan_t *live[2] = {s->a, s->b}; /* NULL once closed and drained: never ready */
    while (live[0] || live[1]) {
        long v = -1;
        int rc, from;
        if (s->selecting) {
            conc_ctx_t *c = NULL;
            if (rnd(&s->seed) % 4 == 0) {
                c = conc_ctx_with_cancel(NULL);
                if (rnd(&s->seed) & 1) conc_ctx_cancel(c); /* ended before it starts */
            }
            conc_case cs[] = {CONC_RECV(live[0], &v), CONC_RECV(live[1], &v)};
            int i = conc_select(cs, 2, c);
            if (c) conc_ctx_release(c);
            if (i == CONC_CANCELED) {
                s->cancelled++;
                continue;
            }
            if (i < 0) {
                s->errs++;
                break;
            }
            rc = cs[i].status;
            from = i;
        } else {
            from = live[0] && live[1] ? (int)(rnd(&s->seed) & 1) : live[0] ? 0 : 1;
            rc = conc_chan_recv(live[from], &v, NULL);
        }
        if (rc == CONC_CLOSED) {
            live[from] = NULL;
            continue;
        }
        if (rc != 0 || v < 0 || v >= 2 * s->n) {
            s->errs++;
            break;
        }
        s->got++;
        s->sum += v;
    }
    return NULL;
}

static void *ring_sel_feed(void *arg) {
    ring_sel *s = arg;
    for (long i = 0; i < s->n; i++) {
        long v = (s->selecting ? s->n : 0) + i; /* the two feeders' values do not overlap */
        if (rnd(&s->seed) & 1) {
            conc_case cs[] = {CONC_SEND(s->a, &v), CONC_SEND(s->b, &v)};
            int k = conc_select(cs, 2, NULL);
            if (k < 0 || cs[k].status != 0) s->errs++;
        } else if (conc_chan_send(rnd(&s->seed) & 1 ? s->a : s->b, &v, NULL) != 0) {
            s->errs++;
        }
        s->got++;
        s->sum += v;
    }
    return NULL;
}

TEST(ring_select_mixed) {
    long rounds = tap_iters(20), n = tap_iters(5000);
    if (n < 50) n = 50;
    for (long r = 0; r < rounds; r++) {
        size_t cap = r % 3 == 0 ? 1 : r % 3 == 1 ? 4 : 64;
        conc_chan_t *a = conc_chan_new(sizeof(long), cap), *b = conc_chan_new(sizeof(long), cap);
        ASSERT(a && b);
        ring_sel rx[4], tx[2];
        for (int i = 0; i < 4; i++) {
            rx[i] = (ring_sel){.a = a, .b = b, .n = n, .selecting = i < 2, .seed = (uint64_t)(r * 8 + i + 1)};
            spawn(&rx[i].th, ring_sel_main, &rx[i]);
        }
        for (int i = 0; i < 2; i++) {
            tx[i] = (ring_sel){.a = a, .b = b, .n = n, .selecting = i == 1, .seed = (uint64_t)(r * 8 + i + 5)};
            spawn(&tx[i].th, ring_sel_feed, &tx[i]);
        }
        for (int i = 0; i < 2; i++) pthread_join(tx[i].th, NULL);
        EXPECT_EQ(conc_chan_close(a), 0);
        EXPECT_EQ(conc_chan_close(b), 0);
        long got = 0, sum = 0, errs = 0;
        for (int i = 0; i < 4; i++) {
            pthread_join(rx[i].th, NULL);
            got += rx[i].got;
            sum += rx[i].sum;
            errs += rx[i].errs;
        }
        errs += tx[0].errs + tx[1].errs;
        EXPECT_EQ(errs, 0);
        EXPECT_EQ(got, 2 * n);
        EXPECT_EQ(sum, tx[0].sum + tx[1].sum);
        EXPECT_EQ(conc_chan_len(a) + conc_chan_len(b), 0);
        EXPECT_EQ(conc_chan_free(a), 0);
        EXPECT_EQ(conc_chan_free(b), 0);
    }
}

int main(void) {
    RUN(mpmc_unbuffered);
    RUN(mpmc_cap1);
    RUN(mpmc_cap16);
    RUN(close_during_mpmc);
    RUN(cancel_races_unbuffered);
    RUN(cancel_races_buffered);
    RUN(close_races);
    RUN(all_races_mixed);
    RUN(close_wakes_all);
    RUN(ring_fifo_close);
    RUN(ring_select_mixed);
    return tap_done();
}
