/* stress_select.c - select under load.

   select_stress       Go's TestSelectStress: plain and select senders and receivers on four
                       channels (two unbuffered, two buffered); every value exactly once.
   fairness            Go's TestSelectFairness: two always-ready channels among idle ones,
                       each chosen 45-55% of the time (PITFALLS 6).
   no_growth           10^6 selects on quiet channels while values arrive on another: memory
                       (RSS) stays flat and no registration is left behind (PITFALLS 18, 4).
   peers_race          K peers race to complete one select, for receive and send selects:
                       exactly one wins (PITFALLS 4).
   close_cancel_races  a select racing a sender, a close, a receiver and its own context's
                       cancellation: the outcome it reports is the one that happened (PITFALLS
                       8).
   close_wakes_selects many selects parked on a channel that gets closed all wake (PITFALLS 3).
   try_select_sees_one_moment
                       a try_select never misses a case that was ready the whole time
                       (PITFALLS 7).
   select_lock_order   selects taking the same channels in every order, parking and meeting
                       each other: no deadlock, no self-pairing, totals agree (PITFALLS 5).

   Loop counts scale with tap_iters(). Threads are released together with barriers, never
   ordered with sleeps. */
#define CONC_IMPLEMENTATION
#include "conc.h"
#include "tap.h"
#include "test_util.h"

#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <time.h>
#include <unistd.h>

/* ---- helpers ------------------------------------------------------------------------ */

/* A crew of worker threads that run one function per round, released together. */
typedef struct crew crew;
typedef struct crew_arg {
    crew *c;
    int who;
} crew_arg;
struct crew {
    pthread_barrier_t start, end;
    bool quit; /* written before a start barrier */
    int n;
    pthread_t th[8];
    crew_arg args[8];
    void (*fn)(void *state, int who);
    void *state;
};

static void *crew_main(void *arg) {
    crew_arg *a = arg;
    crew *c = a->c;
    for (;;) {
        pthread_barrier_wait(&c->start);
        if (c->quit) return NULL;
        c->fn(c->state, a->who);
        pthread_barrier_wait(&c->end);
    }
}

static void crew_start(crew *c, int n, void (*fn)(void *, int), void *state) {
    c->quit = false;
    c->n = n;
    c->fn = fn;
    c->state = state;
    pthread_barrier_init(&c->start, NULL, (unsigned)n + 1);
    pthread_barrier_init(&c->end, NULL, (unsigned)n + 1);
    for (int i = 0; i < n; i++) {
        c->args[i] = (crew_arg){c, i};
        spawn(&c->th[i], crew_main, &c->args[i]);
    }
}

/* One round: everybody starts together; returns once everybody is done. */
static void crew_round(crew *c) {
    pthread_barrier_wait(&c->start);
    pthread_barrier_wait(&c->end);
}

static void crew_stop(crew *c) {
    c->quit = true;
    pthread_barrier_wait(&c->start);
    for (int i = 0; i < c->n; i++) pthread_join(c->th[i], NULL);
    pthread_barrier_destroy(&c->start);
    pthread_barrier_destroy(&c->end);
}

/* ---- select_stress ------------------------------------------------------------------ */

enum { SS_CHANS = 4 };

typedef struct ss {
    conc_chan_t *c[SS_CHANS];
    long n; /* per channel, per sender kind */
} ss;

typedef struct ss_thread {
    pthread_t th;
    ss *s;
    int k;               /* plain: the channel */
    unsigned char *seen; /* receivers: count per value */
    long got, errs;
    uint64_t seed;
} ss_thread;

/* Values: ((channel * 2 + sender kind) * n + seq); kind 0 = plain sender, 1 = select sender. */
static void *ss_plain_send(void *arg) {
    ss_thread *t = arg;
    for (long i = 0; i < t->s->n; i++) {
        long v = ((long)t->k * 2) * t->s->n + i;
        if (conc_chan_send(t->s->c[t->k], &v, NULL) != 0) t->errs++;
        if (rnd(&t->seed) % 32 == 0) sched_yield();
    }
    return NULL;
}

static void *ss_select_send(void *arg) {
    ss_thread *t = arg;
    long seq[SS_CHANS] = {0}, vals[SS_CHANS];
    for (long done = 0; done < SS_CHANS * t->s->n;) {
        conc_case cs[SS_CHANS];
        for (int k = 0; k < SS_CHANS; k++) {
            vals[k] = ((long)k * 2 + 1) * t->s->n + seq[k];
            /* A channel whose quota is sent drops out: a nil case. */
            cs[k] = conc_case_send(seq[k] < t->s->n ? t->s->c[k] : NULL, &vals[k]);
        }
        int rc = conc_select(cs, SS_CHANS, NULL);
        if (rc < 0 || rc >= SS_CHANS || cs[rc].status != 0) {
            t->errs++;
            break;
        }
        seq[rc]++;
        done++;
        if (rnd(&t->seed) % 32 == 0) sched_yield();
    }
    return NULL;
}

static void ss_mark(ss_thread *t, long v) {
    if (v < 0 || v >= SS_CHANS * 2 * t->s->n) {
        t->errs++;
        return;
    }
    if (t->seen[v] < 255) t->seen[v]++;
    t->got++;
}

static void *ss_plain_recv(void *arg) {
    ss_thread *t = arg;
    for (long i = 0; i < t->s->n; i++) {
        long v = -1;
        if (conc_chan_recv(t->s->c[t->k], &v, NULL) != 0) t->errs++;
        else ss_mark(t, v);
        if (rnd(&t->seed) % 32 == 0) sched_yield();
    }
    return NULL;
}

static void *ss_select_recv(void *arg) {
    ss_thread *t = arg;
    long count[SS_CHANS] = {0};
    for (long done = 0; done < SS_CHANS * t->s->n;) {
        long v = -1;
        conc_case cs[SS_CHANS];
        for (int k = 0; k < SS_CHANS; k++) cs[k] = conc_case_recv(count[k] < t->s->n ? t->s->c[k] : NULL, &v, NULL);
        int rc = conc_select(cs, SS_CHANS, NULL);
        if (rc < 0 || rc >= SS_CHANS || cs[rc].status != 0) {
            t->errs++;
            break;
        }
        count[rc]++;
        done++;
        ss_mark(t, v);
        if (rnd(&t->seed) % 32 == 0) sched_yield();
    }
    return NULL;
}

TEST(select_stress) {
    ss s = {.n = tap_iters(5000)};
    static const size_t caps[SS_CHANS] = {0, 0, 2, 3};
    for (int k = 0; k < SS_CHANS; k++) ASSERT((s.c[k] = conc_chan_new(sizeof(long), caps[k])) != NULL);
    long range = SS_CHANS * 2 * s.n;
    /* 4 plain senders, 1 select sender, 4 plain receivers, 1 select receiver. */
    ss_thread t[10];
    for (int i = 0; i < 10; i++) {
        t[i] = (ss_thread){.s = &s, .k = i % 5, .seed = 0x2545F4914F6CDD1Dull * (uint64_t)(i + 1)};
        if (i >= 5) {
            t[i].seen = calloc((size_t)range, 1);
            ASSERT(t[i].seen != NULL);
        }
    }
    for (int i = 0; i < 4; i++) spawn(&t[i].th, ss_plain_send, &t[i]);
    spawn(&t[4].th, ss_select_send, &t[4]);
    for (int i = 5; i < 9; i++) {
        t[i].k = i - 5;
        spawn(&t[i].th, ss_plain_recv, &t[i]);
    }
    spawn(&t[9].th, ss_select_recv, &t[9]);
    for (int i = 0; i < 10; i++) pthread_join(t[i].th, NULL);

    long errs = 0, got = 0, dup = 0, lost = 0;
    for (int i = 0; i < 10; i++) {
        errs += t[i].errs;
        got += t[i].got;
    }
    for (long v = 0; v < range; v++) {
        int c = 0;
        for (int i = 5; i < 10; i++) c += t[i].seen[v];
        if (c == 0) lost++;
        if (c > 1) dup++;
    }
    EXPECT_EQ(errs, 0);
    EXPECT_EQ(got, range);
    EXPECT_EQ(dup, 0);
    EXPECT_EQ(lost, 0);
    for (int k = 0; k < SS_CHANS; k++) {
        EXPECT_EQ(conc_chan_len(s.c[k]), 0);
        EXPECT_EQ(conc_chan_free(s.c[k]), 0);
    }
    for (int i = 5; i < 10; i++) free(t[i].seen);
}

/* ---- fairness ----------------------------------------------------------------------- */

typedef struct fair {
    conc_chan_t *c1, *c2, *c3, *c4, *out;
    conc_ctx_t *done;
    int errs;
} fair;

static void *fair_main(void *arg) {
    fair *f = arg;
    for (;;) {
        unsigned char b = 0;
        conc_case pick[] = {CONC_RECV(f->c3, &b), CONC_RECV(f->c4, &b), CONC_RECV(f->c1, &b), CONC_RECV(f->c2, &b)};
        int rc = conc_select(pick, 4, NULL);
        if (rc < 2) f->errs++;
        conc_case fwd[] = {CONC_SEND(f->out, &b), CONC_DONE(f->done)};
        if (conc_select(fwd, 2, NULL) != 0) return NULL;
    }
}

TEST(fairness) {
    /* Go's TestSelectFairness: two channels with plenty buffered, two idle, one thread
       selecting and forwarding; each busy channel should win about half the time. */
    enum { TRIALS = 10000 };
    fair f = {conc_chan_new(1, TRIALS + 1), conc_chan_new(1, TRIALS + 1), conc_chan_new(1, 0), conc_chan_new(1, 0),
              conc_chan_new(1, 0), conc_ctx_with_cancel(NULL), 0};
    ASSERT(f.c1 && f.c2 && f.c3 && f.c4 && f.out && f.done);
    unsigned char one = 1, two = 2;
    for (int i = 0; i < TRIALS + 1; i++) {
        conc_chan_send(f.c1, &one, NULL);
        conc_chan_send(f.c2, &two, NULL);
    }
    pthread_t th;
    spawn(&th, fair_main, &f);
    long cnt[3] = {0, 0, 0};
    for (int i = 0; i < TRIALS; i++) {
        unsigned char b = 0;
        if (conc_chan_recv(f.out, &b, NULL) != 0 || b < 1 || b > 2)
            cnt[0]++;
        else
            cnt[b]++;
    }
    conc_ctx_cancel(f.done);
    pthread_join(th, NULL);
    printf("#   c1 chosen %ld, c2 chosen %ld of %d\n", cnt[1], cnt[2], TRIALS);
    EXPECT_EQ(cnt[0], 0);
    EXPECT_EQ(f.errs, 0);
    EXPECT(cnt[1] >= TRIALS * 45 / 100 && cnt[1] <= TRIALS * 55 / 100);
    EXPECT(cnt[2] >= TRIALS * 45 / 100 && cnt[2] <= TRIALS * 55 / 100);
    conc_ctx_release(f.done);
    conc_chan_free(f.c1);
    conc_chan_free(f.c2);
    EXPECT_EQ(conc_chan_free(f.c3), 0);
    EXPECT_EQ(conc_chan_free(f.c4), 0);
    EXPECT_EQ(conc_chan_free(f.out), 0);

    /* The same from one thread, blocking form, without the forwarding. */
    conc_chan_t *a = conc_chan_new(1, TRIALS), *b = conc_chan_new(1, TRIALS), *idle = conc_chan_new(1, 0);
    ASSERT(a && b && idle);
    for (int i = 0; i < TRIALS; i++) {
        conc_chan_send(a, &one, NULL);
        conc_chan_send(b, &two, NULL);
    }
    long ca = 0, cb = 0;
    for (int i = 0; i < TRIALS; i++) {
        unsigned char x;
        conc_case cs[] = {CONC_RECV(idle, &x), CONC_RECV(a, &x), CONC_SEND(idle, &x), CONC_RECV(b, &x)};
        int rc = conc_select(cs, 4, NULL);
        ca += rc == 1;
        cb += rc == 3;
    }
    EXPECT_EQ(ca + cb, TRIALS);
    EXPECT(ca >= TRIALS * 45 / 100 && ca <= TRIALS * 55 / 100);
    EXPECT_EQ(conc_chan_free(a), 0);
    EXPECT_EQ(conc_chan_free(b), 0);
    EXPECT_EQ(conc_chan_free(idle), 0);
}

/* ---- no growth ---------------------------------------------------------------------- */

/* AddressSanitizer keeps freed memory in quarantine, so RSS grows with malloc/free churn
   that is not a leak; there LeakSanitizer does the leak check instead. */
#if defined(__SANITIZE_ADDRESS__)
#define RSS_MEANINGFUL 0
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define RSS_MEANINGFUL 0
#endif
#endif
#ifndef RSS_MEANINGFUL
#define RSS_MEANINGFUL 1
#endif

static long rss_bytes(void) {
    FILE *f = fopen("/proc/self/statm", "r");
    if (!f) return -1;
    long size = 0, resident = -1;
    if (fscanf(f, "%ld %ld", &size, &resident) != 2) resident = -1;
    fclose(f);
    return resident < 0 ? -1 : resident * sysconf(_SC_PAGESIZE);
}

typedef struct feeder {
    pthread_t th;
    conc_chan_t *ch;
    long n;
    int errs;
} feeder;

static void *feed(void *arg) {
    feeder *f = arg;
    for (long i = 0; i < f->n; i++)
        if (conc_chan_send(f->ch, &i, NULL) != 0) f->errs++;
    return NULL;
}

enum { NQ = 6 }; /* quiet channels: even ones unbuffered, odd ones buffered */

/* n selects with nquiet cases on the quiet channels (never ready: both directions of the
   unbuffered ones, receive from the empty buffered ones) and one receive from `active`;
   the feeder sends 0 .. n-1 on active. */
static void quiet_select_loop(conc_chan_t **quiet, int nquiet, conc_chan_t *active, long n, long *bad) {
    conc_case cs[32];
    long v = -1, w = -1, out = 5;
    int ai = nquiet / 2;
    for (long i = 0; i < n; i++) {
        int k = 0;
        for (int q = 0; q < nquiet; q++) {
            if (q == ai) cs[k++] = conc_case_recv(active, &v, NULL);
            conc_chan_t *qc = quiet[q % NQ];
            cs[k++] = (q & 2) && conc_chan_cap(qc) == 0 ? conc_case_send(qc, &out) : conc_case_recv(qc, &w, NULL);
        }
        int rc = conc_select(cs, (size_t)k, NULL);
        if (rc != ai || v != i || w != -1) {
            printf("#   select %ld returned %d (want %d), v %ld, w %ld\n", i, rc, ai, v, w);
            (*bad)++;
            conc_chan_close(active); /* releases the feeder */
            return;
        }
    }
}

static void run_quiet(conc_chan_t **quiet, int nquiet, size_t active_cap, long n, long *bad) {
    conc_chan_t *active = conc_chan_new(sizeof(long), active_cap);
    if (!active) {
        (*bad)++;
        return;
    }
    feeder f = {.ch = active, .n = n};
    spawn(&f.th, feed, &f);
    quiet_select_loop(quiet, nquiet, active, n, bad);
    pthread_join(f.th, NULL);
    *bad += f.errs;
    if (conc_chan_free(active) != 0) (*bad)++;
}

TEST(no_growth) {
    /* Quiet channels (both directions of unbuffered and buffered ones) in every select;
       values arrive on another. With a buffered active channel most selects complete at
       once and some park; with an unbuffered one nearly all park, and with 20 cases the
       waiters no longer fit on the stack. Every registration must be removed and every
       allocation freed. */
    conc_chan_t *quiet[NQ];
    for (int q = 0; q < NQ; q++) ASSERT((quiet[q] = conc_chan_new(sizeof(long), (size_t)(q % 2) * 4)) != NULL);
    long bad = 0;
    run_quiet(quiet, 4, 64, tap_iters(20000), &bad); /* warm-up */
    run_quiet(quiet, 19, 0, tap_iters(2000), &bad);
    long before = rss_bytes();
    int64_t t0 = conc_now();
    long n = tap_iters(1000000), m = tap_iters(20000);
    run_quiet(quiet, 4, 64, n, &bad);
    int64_t t1 = conc_now();
    run_quiet(quiet, 19, 0, m, &bad);
    long after = rss_bytes();
    printf("#   %ld selects (4 cases, buffered) in %.2f s; %ld (20 cases, unbuffered) in %.2f s; RSS %ld KiB -> %ld KiB\n", n,
           (double)(t1 - t0) / 1e9, m, (double)(conc_now() - t1) / 1e9, before / 1024, after / 1024);
    EXPECT_EQ(bad, 0);
    /* A leaked 20-case waiter array (about 1 KB a select) would be over 20 MB at full
       scale; 8 MB leaves room for what sanitizers and Valgrind add. */
    EXPECT(before > 0 && after > 0);
    if (RSS_MEANINGFUL)
        EXPECT(after - before < 8 * 1024 * 1024);
    else
        printf("#   RSS bound not checked under AddressSanitizer\n");
    /* No registration left: the quiet channels have nobody waiting. */
    long x = 1;
    for (int q = 0; q < NQ; q++) {
        if (q % 2 == 0) {
            EXPECT_EQ(conc_chan_try_send(quiet[q], &x), CONC_WOULD_BLOCK);
            EXPECT_EQ(conc_chan_try_recv(quiet[q], &x), CONC_WOULD_BLOCK);
        }
        EXPECT_EQ(conc_chan_len(quiet[q]), 0);
        EXPECT_EQ(conc_chan_free(quiet[q]), 0);
    }
}

/* ---- peers race to complete one select ---------------------------------------------- */

enum { K = 4 };

typedef struct peers {
    int mode; /* 0: the select receives, peers send; 1: the select sends, peers receive */
    int peer_form; /* 0: plain send/recv with ctx; 1: select with a DONE case */
    conc_chan_t *ch[K];
    conc_ctx_t *ctx; /* the peers' context, cancelled by the selector when it is done */
    long round;
    int sel_rc;
    long sel_val;
    int peer_rc[K];
    long peer_val[K];
    uint64_t seed[K + 1];
} peers;

static void peers_fn(void *state, int who) {
    peers *p = state;
    jitter(&p->seed[who]);
    if (who == 0) {
        conc_case cs[K];
        long vals[K];
        long got = -1;
        for (int k = 0; k < K; k++) {
            vals[k] = p->round * 10 + k;
            cs[k] = p->mode == 0 ? conc_case_recv(p->ch[k], &got, NULL) : conc_case_send(p->ch[k], &vals[k]);
        }
        p->sel_rc = conc_select(cs, K, NULL);
        p->sel_val = got;
        conc_ctx_cancel(p->ctx); /* the losers give up */
        return;
    }
    int k = who - 1;
    long v = p->mode == 0 ? p->round * 10 + k : -1;
    int rc;
    if (p->peer_form == 0) {
        rc = p->mode == 0 ? conc_chan_send(p->ch[k], &v, p->ctx) : conc_chan_recv(p->ch[k], &v, p->ctx);
    } else {
        conc_case cs[2] = {CONC_DONE(p->ctx), p->mode == 0 ? conc_case_send(p->ch[k], &v) : conc_case_recv(p->ch[k], &v, NULL)};
        rc = conc_select(cs, 2, NULL);
        rc = rc == 1 ? cs[1].status : rc == 0 ? cs[0].status : rc;
    }
    p->peer_rc[k] = rc;
    p->peer_val[k] = v;
}

TEST(peers_race) {
    peers p;
    memset(&p, 0, sizeof p);
    for (int k = 0; k < K; k++) ASSERT((p.ch[k] = conc_chan_new(sizeof(long), 0)) != NULL);
    for (int i = 0; i <= K; i++) p.seed[i] = 0x9E3779B97F4A7C15ull * (uint64_t)(i + 3);
    crew c;
    crew_start(&c, K + 1, peers_fn, &p);
    long rounds = tap_iters(2500), bad = 0, wins[K] = {0};
    for (long r = 0; r < 4 * rounds; r++) {
        p.mode = (int)(r & 1);
        p.peer_form = (int)((r >> 1) & 1);
        p.round = r;
        p.ctx = conc_ctx_with_cancel(NULL);
        p.sel_rc = 12345;
        p.sel_val = -1;
        crew_round(&c);
        bool good = p.sel_rc >= 0 && p.sel_rc < K;
        int winners = 0;
        for (int k = 0; k < K; k++) {
            if (p.peer_rc[k] == 0) {
                winners++;
                if (k != p.sel_rc) good = false;
                if (p.mode == 0 && p.sel_val != r * 10 + k) good = false;
                if (p.mode == 1 && p.peer_val[k] != r * 10 + k) good = false;
            } else if (p.peer_rc[k] != CONC_CANCELED) {
                good = false;
            }
            long x;
            if (conc_chan_try_recv(p.ch[k], &x) != CONC_WOULD_BLOCK || conc_chan_try_send(p.ch[k], &x) != CONC_WOULD_BLOCK)
                good = false;
        }
        if (winners != 1) good = false;
        if (good) wins[p.sel_rc]++;
        if (!good && bad++ < 5)
            printf("#   round %ld (mode %d, form %d): select %d (value %ld), peers %d %d %d %d, %d winners\n", r, p.mode,
                   p.peer_form, p.sel_rc, p.sel_val, p.peer_rc[0], p.peer_rc[1], p.peer_rc[2], p.peer_rc[3], winners);
        conc_ctx_release(p.ctx);
    }
    crew_stop(&c);
    printf("#   wins per channel: %ld %ld %ld %ld\n", wins[0], wins[1], wins[2], wins[3]);
    EXPECT_EQ(bad, 0);
    for (int k = 0; k < K; k++) EXPECT_EQ(conc_chan_free(p.ch[k]), 0);
}

/* ---- select vs close vs cancel ------------------------------------------------------ */

typedef struct scc {
    conc_chan_t *c1;  /* A sends here */
    conc_chan_t *c2;  /* B closes it (new each round) */
    conc_chan_t *c3;  /* D receives here */
    conc_ctx_t *sel_ctx, *a_ctx, *d_ctx;
    long v, w;        /* A's value; the select's send value */
    int sel_rc, a_rc, d_rc;
    long x, y, z;     /* received: by the select from c1, from c2; by D */
    bool ok1, ok2;
    int status[3];
    uint64_t seed[5];
} scc;

static void scc_fn(void *state, int who) {
    scc *s = state;
    jitter(&s->seed[who]);
    switch (who) {
    case 0: { /* the select */
        long x = -1, y = -1;
        bool ok1 = false, ok2 = true;
        conc_case cs[] = {CONC_RECV_OK(s->c1, &x, &ok1), CONC_RECV_OK(s->c2, &y, &ok2), CONC_SEND(s->c3, &s->w)};
        for (int i = 0; i < 3; i++) cs[i].status = 999;
        s->sel_rc = conc_select(cs, 3, s->sel_ctx);
        for (int i = 0; i < 3; i++) s->status[i] = cs[i].status;
        s->x = x;
        s->y = y;
        s->ok1 = ok1;
        s->ok2 = ok2;
        conc_ctx_cancel(s->a_ctx);
        conc_ctx_cancel(s->d_ctx);
        break;
    }
    case 1: { /* A */
        long v = s->v;
        s->a_rc = conc_chan_send(s->c1, &v, s->a_ctx);
        break;
    }
    case 2: /* B */
        conc_chan_close(s->c2);
        break;
    case 3: /* C */
        conc_ctx_cancel(s->sel_ctx);
        break;
    case 4: { /* D */
        long z = -1;
        s->d_rc = conc_chan_recv(s->c3, &z, s->d_ctx);
        s->z = z;
        break;
    }
    }
}

TEST(close_cancel_races) {
    scc s;
    memset(&s, 0, sizeof s);
    s.c1 = conc_chan_new(sizeof(long), 0);
    s.c3 = conc_chan_new(sizeof(long), 0);
    ASSERT(s.c1 && s.c3);
    for (int i = 0; i < 5; i++) s.seed[i] = 0xBF58476D1CE4E5B9ull * (uint64_t)(i + 11);
    crew c;
    crew_start(&c, 5, scc_fn, &s);
    long rounds = tap_iters(10000), bad = 0, outcome[4] = {0};
    for (long r = 0; r < rounds; r++) {
        /* Half the rounds use a buffered c2 with nothing in it: same outcomes. */
        s.c2 = conc_chan_new(sizeof(long), (size_t)(r & 1));
        ASSERT(s.c2 != NULL);
        s.sel_ctx = conc_ctx_with_cancel(NULL);
        s.a_ctx = conc_ctx_with_cancel(NULL);
        s.d_ctx = conc_ctx_with_cancel(NULL);
        s.v = 2 * r + 1;
        s.w = 2 * r + 2;
        s.sel_rc = s.a_rc = s.d_rc = 12345;
        crew_round(&c);
        bool good = true;
        switch (s.sel_rc) {
        case 0:
            good = s.status[0] == 0 && s.ok1 && s.x == s.v && s.a_rc == 0 && s.d_rc == CONC_CANCELED;
            break;
        case 1:
            good = s.status[1] == CONC_CLOSED && !s.ok2 && s.y == 0 && s.a_rc == CONC_CANCELED && s.d_rc == CONC_CANCELED;
            break;
        case 2:
            good = s.status[2] == 0 && s.d_rc == 0 && s.z == s.w && s.a_rc == CONC_CANCELED;
            break;
        case CONC_CANCELED:
            good = s.a_rc == CONC_CANCELED && s.d_rc == CONC_CANCELED;
            break;
        default:
            good = false;
        }
        if (s.sel_rc >= 0 && s.sel_rc <= 2) outcome[s.sel_rc]++;
        else if (s.sel_rc == CONC_CANCELED) outcome[3]++;
        long x;
        good = good && conc_chan_try_recv(s.c1, &x) == CONC_WOULD_BLOCK && conc_chan_try_send(s.c3, &x) == CONC_WOULD_BLOCK;
        if (!good && bad++ < 5)
            printf("#   round %ld: select %d (status %d %d %d, x %ld y %ld), A %d, D %d (z %ld)\n", r, s.sel_rc, s.status[0],
                   s.status[1], s.status[2], s.x, s.y, s.a_rc, s.d_rc, s.z);
        conc_ctx_release(s.sel_ctx);
        conc_ctx_release(s.a_ctx);
        conc_ctx_release(s.d_ctx);
        EXPECT_EQ(conc_chan_free(s.c2), 0);
    }
    crew_stop(&c);
    printf("#   outcomes: recv %ld, closed %ld, send %ld, cancelled %ld\n", outcome[0], outcome[1], outcome[2], outcome[3]);
    EXPECT_EQ(bad, 0);
    EXPECT_EQ(conc_chan_free(s.c1), 0);
    EXPECT_EQ(conc_chan_free(s.c3), 0);
}

/* Select-send and select-receive against a plain peer, the select's context cancelled as
   the peer arrives: the select's result and the peer's agree. */
typedef struct sxp {
    conc_chan_t *ch, *quiet;
    conc_ctx_t *sel_ctx, *peer_ctx;
    int mode; /* 0: select receives; 1: select sends */
    long v;
    int sel_rc, peer_rc;
    long sel_got, peer_got;
    uint64_t seed[3];
} sxp;

static void sxp_fn(void *state, int who) {
    sxp *s = state;
    jitter(&s->seed[who]);
    if (who == 0) {
        long got = -1, out = s->v;
        conc_case cs[] = {CONC_RECV(s->quiet, &got), s->mode == 0 ? conc_case_recv(s->ch, &got, NULL) : conc_case_send(s->ch, &out)};
        s->sel_rc = conc_select(cs, 2, s->sel_ctx);
        s->sel_got = got;
        conc_ctx_cancel(s->peer_ctx);
    } else if (who == 1) {
        long v = s->mode == 0 ? s->v : -1;
        s->peer_rc = s->mode == 0 ? conc_chan_send(s->ch, &v, s->peer_ctx) : conc_chan_recv(s->ch, &v, s->peer_ctx);
        s->peer_got = v;
    } else {
        conc_ctx_cancel(s->sel_ctx);
    }
}

TEST(select_cancel_vs_peer) {
    sxp s;
    memset(&s, 0, sizeof s);
    for (size_t cap = 0; cap <= 1; cap++) {
        s.ch = conc_chan_new(sizeof(long), cap);
        s.quiet = conc_chan_new(sizeof(long), 0);
        ASSERT(s.ch && s.quiet);
        for (int i = 0; i < 3; i++) s.seed[i] = 0x94D049BB133111EBull * (uint64_t)(i + 5 + cap);
        crew c;
        crew_start(&c, 3, sxp_fn, &s);
        long rounds = tap_iters(8000), bad = 0, done = 0;
        for (long r = 0; r < rounds; r++) {
            s.mode = (int)(r & 1);
            s.v = r + 1;
            s.sel_ctx = conc_ctx_with_cancel(NULL);
            s.peer_ctx = conc_ctx_with_cancel(NULL);
            s.sel_rc = s.peer_rc = 12345;
            crew_round(&c);
            bool sel_ok = s.sel_rc == 1, peer_ok = s.peer_rc == 0;
            bool good = (sel_ok || s.sel_rc == CONC_CANCELED) && (peer_ok || s.peer_rc == CONC_CANCELED);
            long left = -1;
            int lrc = conc_chan_try_recv(s.ch, &left);
            if (cap == 0) {
                good = good && sel_ok == peer_ok && lrc == CONC_WOULD_BLOCK;
                if (sel_ok) good = good && (s.mode == 0 ? s.sel_got == s.v : s.peer_got == s.v);
            } else if (s.mode == 0) {
                /* Buffered: the peer's send always finds room; the value is with the
                   select iff it reports success, else still buffered. */
                good = good && peer_ok && (sel_ok ? (s.sel_got == s.v && lrc == CONC_WOULD_BLOCK) : (lrc == 0 && left == s.v));
            } else {
                /* The select's send always finds room; the peer has it iff it reports so. */
                good = good && sel_ok && (peer_ok ? (s.peer_got == s.v && lrc == CONC_WOULD_BLOCK) : (lrc == 0 && left == s.v));
            }
            good = good && conc_chan_try_send(s.quiet, &left) == CONC_WOULD_BLOCK;
            done += sel_ok;
            if (!good && bad++ < 5)
                printf("#   cap %zu round %ld mode %d: select %d (got %ld), peer %d (got %ld), left %d/%ld\n", cap, r, s.mode,
                       s.sel_rc, s.sel_got, s.peer_rc, s.peer_got, lrc, left);
            conc_ctx_release(s.sel_ctx);
            conc_ctx_release(s.peer_ctx);
        }
        crew_stop(&c);
        printf("#   cap %zu: %ld of %ld selects completed\n", cap, done, rounds);
        EXPECT_EQ(bad, 0);
        EXPECT_EQ(conc_chan_free(s.ch), 0);
        EXPECT_EQ(conc_chan_free(s.quiet), 0);
    }
}

/* ---- no smeared try_select ---------------------------------------------------------- */

typedef struct mover {
    pthread_t th;
    conc_chan_t *a, *b;
    conc_ctx_t *stop;
    long moves;
    int errs;
} mover;

/* Moves tokens between a and b one at a time, holding at most one. */
static void *move_tokens(void *arg) {
    mover *m = arg;
    while (conc_ctx_err(m->stop) == 0) {
        long t;
        if (conc_chan_try_recv(m->a, &t) == 0) {
            if (conc_chan_send(m->b, &t, NULL) != 0) m->errs++;
            m->moves++;
        } else if (conc_chan_try_recv(m->b, &t) == 0) {
            if (conc_chan_send(m->a, &t, NULL) != 0) m->errs++;
            m->moves++;
        }
    }
    return NULL;
}

TEST(try_select_sees_one_moment) {
    /* PITFALLS 7. Two tokens live in channels a and b (capacity 2 each); a mover shifts
       them between the two, holding at most one at a time, and this thread holds none
       while it selects. So at every instant a or b holds a token, and a try_select over
       both must never say CONC_WOULD_BLOCK. One that looks at a, lets go, then looks at b
       can miss the token travelling from b to a. */
    conc_chan_t *a = conc_chan_new(sizeof(long), 2), *b = conc_chan_new(sizeof(long), 2);
    ASSERT(a && b);
    long t1 = 1, t2 = 2;
    conc_chan_send(a, &t1, NULL);
    conc_chan_send(b, &t2, NULL);
    mover m = {.a = a, .b = b, .stop = conc_ctx_with_cancel(NULL)};
    spawn(&m.th, move_tokens, &m);
    long n = tap_iters(200000), missed = 0, errs = 0;
    for (long i = 0; i < n; i++) {
        long t = -1;
        conc_case cs[] = {CONC_RECV(a, &t), CONC_RECV(b, &t)};
        if (i & 1) {
            conc_case tmp = cs[0];
            cs[0] = cs[1];
            cs[1] = tmp;
        }
        int rc = conc_try_select(cs, 2);
        if (rc == CONC_WOULD_BLOCK) {
            missed++;
            continue;
        }
        if (rc < 0 || (t != 1 && t != 2)) {
            errs++;
            continue;
        }
        /* Give the token back (there is room: two tokens, capacity two). */
        if (conc_chan_try_send(cs[rc].ch, &t) != 0) errs++;
    }
    conc_ctx_cancel(m.stop);
    pthread_join(m.th, NULL);
    conc_ctx_release(m.stop);
    printf("#   %ld try_selects, %ld moves by the mover, %ld missed\n", n, m.moves, missed);
    EXPECT_EQ(missed, 0);
    EXPECT_EQ(errs, 0);
    EXPECT_EQ(m.errs, 0);
    EXPECT_EQ(conc_chan_len(a) + conc_chan_len(b), 2);
    EXPECT_EQ(conc_chan_free(a), 0);
    EXPECT_EQ(conc_chan_free(b), 0);
}

/* ---- lock order --------------------------------------------------------------------- */

enum { LO_CHANS = 3, LO_THREADS = 4 };

typedef struct lo {
    pthread_t th;
    conc_chan_t **chans;
    conc_ctx_t *quit;
    int64_t id;
    long limit; /* selects to do; < 0: until quit */
    long sent, recvd, self;
    int64_t ssum, rsum;
    int errs;
    uint64_t seed;
} lo;

/* Selects over send and receive on every channel, cases shuffled each time, so that
   selects take the channels in every order (PITFALLS 5) and meet each other parked. */
static void *lo_main(void *arg) {
    lo *l = arg;
    int64_t seq = 0;
    for (long i = 0; l->limit < 0 || i < l->limit; i++) {
        int64_t out = (l->id << 32) | seq, in = -1;
        conc_case cs[2 * LO_CHANS + 1];
        int n = 0;
        for (int k = 0; k < LO_CHANS; k++) {
            cs[n++] = conc_case_send(l->chans[k], &out);
            cs[n++] = conc_case_recv(l->chans[k], &in, NULL);
        }
        cs[n++] = conc_case_done(l->quit);
        for (int j = n - 1; j > 0; j--) {
            int r = (int)(rnd(&l->seed) % (uint64_t)(j + 1));
            conc_case tmp = cs[j];
            cs[j] = cs[r];
            cs[r] = tmp;
        }
        int rc = conc_select(cs, (size_t)n, NULL);
        if (rc < 0 || rc >= n || (cs[rc].kind != CONC_CASE_DONE && cs[rc].status != 0)) {
            l->errs++;
            break;
        }
        if (cs[rc].kind == CONC_CASE_DONE) break;
        if (cs[rc].kind == CONC_CASE_SEND) {
            l->sent++;
            l->ssum += out;
            seq++;
        } else {
            l->recvd++;
            l->rsum += in;
            if ((in >> 32) == l->id && conc_chan_cap(cs[rc].ch) == 0) l->self++;
        }
    }
    return NULL;
}

TEST(select_lock_order) {
    conc_chan_t *chans[LO_CHANS];
    for (int k = 0; k < LO_CHANS; k++) ASSERT((chans[k] = conc_chan_new(sizeof(int64_t), k == 2 ? 1 : 0)) != NULL);
    conc_ctx_t *quit = conc_ctx_with_cancel(NULL);
    lo w[LO_THREADS + 1];
    for (int i = 0; i <= LO_THREADS; i++) {
        w[i] = (lo){.chans = chans, .quit = quit, .id = i + 1, .limit = i == 0 ? tap_iters(8000) : -1,
                    .seed = 0x853C49E6748FEA9Bull * (uint64_t)(i + 1)};
        if (i > 0) spawn(&w[i].th, lo_main, &w[i]);
    }
    lo_main(&w[0]); /* this thread takes part, then stops everybody */
    conc_ctx_cancel(quit);
    for (int i = 1; i <= LO_THREADS; i++) pthread_join(w[i].th, NULL);
    long sent = 0, recvd = 0, self = 0, errs = 0;
    int64_t ssum = 0, rsum = 0;
    for (int i = 0; i <= LO_THREADS; i++) {
        sent += w[i].sent;
        recvd += w[i].recvd;
        self += w[i].self;
        errs += w[i].errs;
        ssum += w[i].ssum;
        rsum += w[i].rsum;
    }
    /* What is still buffered counts as sent, not received. */
    int64_t left;
    while (conc_chan_try_recv(chans[2], &left) == 0) {
        recvd++;
        rsum += left;
    }
    printf("#   %ld values exchanged\n", recvd);
    EXPECT_EQ(errs, 0);
    EXPECT_EQ(self, 0);
    EXPECT_EQ(sent, recvd);
    EXPECT(ssum == rsum);
    conc_ctx_release(quit);
    for (int k = 0; k < LO_CHANS; k++) EXPECT_EQ(conc_chan_free(chans[k]), 0);
}

/* ---- close wakes parked selects ----------------------------------------------------- */

typedef struct parked {
    pthread_t th;
    conc_chan_t *ch, *quiet;
    bool send;
    int rc, status;
    long v;
    bool ok;
} parked;

static void *parked_main(void *arg) {
    parked *p = arg;
    p->v = p->send ? 1 : -1;
    p->ok = true;
    conc_case cs[] = {CONC_RECV(p->quiet, NULL), p->send ? conc_case_send(p->ch, &p->v) : conc_case_recv(p->ch, &p->v, &p->ok)};
    cs[1].status = 999;
    p->rc = conc_select(cs, 2, NULL);
    p->status = cs[1].status;
    return NULL;
}

TEST(close_wakes_selects) {
    enum { N = 16 };
    long rounds = tap_iters(20);
    for (long r = 0; r < rounds; r++) {
        conc_chan_t *rch = conc_chan_new(sizeof(long), (size_t)(r & 1) * 2); /* empty */
        conc_chan_t *sch = conc_chan_new(sizeof(long), (size_t)(r & 1));     /* full if buffered */
        conc_chan_t *quiet = conc_chan_new(sizeof(long), 0);
        ASSERT(rch && sch && quiet);
        long fill = 9;
        if (r & 1) conc_chan_send(sch, &fill, NULL);
        parked p[2 * N];
        for (int i = 0; i < 2 * N; i++) {
            p[i] = (parked){.ch = i < N ? rch : sch, .quiet = quiet, .send = i >= N, .rc = 12345};
            spawn(&p[i].th, parked_main, &p[i]);
        }
        EXPECT(wait_blocked_long(rch, 0, N));
        EXPECT(wait_blocked_long(sch, N, 0));
        EXPECT(wait_blocked_long(quiet, 0, 2 * N));
        EXPECT_EQ(conc_chan_close(rch), 0);
        EXPECT_EQ(conc_chan_close(sch), 0);
        int bad = 0;
        for (int i = 0; i < 2 * N; i++) {
            pthread_join(p[i].th, NULL);
            if (p[i].rc != 1 || p[i].status != CONC_CLOSED) bad++;
            if (!p[i].send && (p[i].ok || p[i].v != 0)) bad++;
        }
        EXPECT_EQ(bad, 0);
        long x = 1;
        EXPECT_EQ(conc_chan_try_send(quiet, &x), CONC_WOULD_BLOCK);
        EXPECT_EQ(conc_chan_len(sch), (size_t)(r & 1));
        EXPECT_EQ(conc_chan_free(rch), 0);
        EXPECT_EQ(conc_chan_free(sch), 0);
        EXPECT_EQ(conc_chan_free(quiet), 0);
    }
}

int main(void) {
    RUN(select_stress);
    RUN(fairness);
    RUN(no_growth);
    RUN(peers_race);
    RUN(close_cancel_races);
    RUN(select_cancel_vs_peer);
    RUN(close_wakes_selects);
    RUN(try_select_sees_one_moment);
    RUN(select_lock_order);
    return tap_done();
}
