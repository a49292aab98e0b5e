/* bench_chan.c - channel and select benchmarks for conc.h.

   Each case does the work of the Go peer of the same name (go_NAME in
   ../shared/peers/go/gobench/main.go) with the same default N, and checks its counts and
   sums. Run `bench_chan --list`, `bench_chan --case NAME [--n N]`, or no argument for all
   cases and a table (see bench.h).

   Cases:
     unbuf_pingpong        a round trip over two unbuffered channels
     spsc_cap1/64/1024     one item from a producer to a consumer, buffer of that size
     mpmc_4x4_cap64        one item, 4 producers and 4 consumers on one cap-64 channel
     select2_cap64/_unbuf  one item received by a conc_select over two channels, each fed
                           by its own producer thread
     backpressure_2p1c_cap64_1us
                           one item from 2 producers to 1 consumer that busies ~1 us per
                           item; blocked_send_frac / blocked_time_frac are measured as the Go
                           peer does (try_send, and on CONC_WOULD_BLOCK time the blocking
                           send), stats_* are what conc_chan_stats_get says
     floor_atomic_pingpong not conc.h: two threads pass one atomic word back and forth,
                           spinning. The round trip no design on two OS threads can beat on
                           this machine (compare unbuf_pingpong); it also shows the machine's
                           mode (two vCPUs sharing a host core make it several times faster)
     idle_wait_500ms       one thread blocked in conc_chan_recv until its context's deadline
                           (N ms, default 500); ns_op is the wall time, cpu_ms the CPU that
                           thread burnt (target: under 20 ms) */
#define CONC_IMPLEMENTATION
#include "conc.h"

#include <sched.h>
#include <stdatomic.h>

#include "bench.h"

/* ---- unbuf_pingpong ------------------------------------------------------------------ */

/* Argument blocks start on their own cache line, and threads copy what they read into
   locals before their loop and write results back after it: a field read in the loop
   from a line that another thread writes (a neighbour on the creator's stack, a sibling's
   counter) would cost a cache miss per operation - on this machine ~200 ns, more than the
   operation measured - and it would depend on the stack's random alignment. */
typedef struct {
    _Alignas(64) conc_chan_t *ping, *pong;
    int bad; /* a status other than 0 / CONC_CLOSED */
} pingpong_arg;

static void *pingpong_echo(void *p) {
    pingpong_arg *a = p;
    conc_chan_t *ping = a->ping, *pong = a->pong;
    int64_t v;
    for (;;) {
        int rc = conc_chan_recv(ping, &v, NULL);
        if (rc == CONC_CLOSED) break;
        if (rc != 0 || conc_chan_send(pong, &v, NULL) != 0) {
            a->bad = 1;
            break;
        }
    }
    return NULL;
}

static int case_unbuf_pingpong(int64_t n, bench_out *out) {
    pingpong_arg a = {conc_chan_new(sizeof(int64_t), 0), conc_chan_new(sizeof(int64_t), 0), 0};
    if (!a.ping || !a.pong) return bench_fail("conc_chan_new returned NULL");
    pthread_t t;
    if (bench_spawn(&t, pingpong_echo, &a)) return 1;
    int wrong = 0;
    int64_t t0 = bench_now();
    for (int64_t i = 0; i < n; i++) {
        int64_t v = -1;
        if (conc_chan_send(a.ping, &i, NULL) != 0 || conc_chan_recv(a.pong, &v, NULL) != 0 ||
            v != i) {
            wrong = 1;
            fprintf(stderr, "bench: round trip %" PRId64 " came back as %" PRId64 "\n", i, v);
            break;
        }
    }
    out->elapsed_ns = bench_now() - t0;
    out->ops = n;
    conc_chan_close(a.ping);
    pthread_join(t, NULL);
    conc_chan_free(a.ping);
    conc_chan_free(a.pong);
    if (wrong || a.bad) return bench_fail("unbuf_pingpong: a send or receive failed");
    return 0;
}

/* ---- spsc_cap* ------------------------------------------------------------------------- */

typedef struct {
    _Alignas(64) conc_chan_t *ch;
    int64_t count, sum;
    int last_rc;
} consumer_arg;

/* Receives until the channel is closed and drained. */
static void *drain(void *p) {
    consumer_arg *a = p;
    conc_chan_t *ch = a->ch;
    int64_t v, k = 0, s = 0;
    int rc;
    while ((rc = conc_chan_recv(ch, &v, NULL)) == 0) {
        k++;
        s += v;
    }
    a->count = k;
    a->sum = s;
    a->last_rc = rc;
    return NULL;
}

static int spsc(int64_t n, size_t cap, bench_out *out) {
    consumer_arg c = {conc_chan_new(sizeof(int64_t), cap), 0, 0, 0};
    if (!c.ch) return bench_fail("conc_chan_new returned NULL");
    pthread_t t;
    int bad = 0;
    int64_t t0 = bench_now();
    if (bench_spawn(&t, drain, &c)) return 1;
    for (int64_t i = 0; i < n; i++)
        if (conc_chan_send(c.ch, &i, NULL) != 0) bad++;
    conc_chan_close(c.ch);
    pthread_join(t, NULL);
    out->elapsed_ns = bench_now() - t0;
    out->ops = n;
    conc_chan_free(c.ch);
    if (bad || c.last_rc != CONC_CLOSED || c.count != n || c.sum != n * (n - 1) / 2)
        return bench_fail("spsc cap %zu: %d failed sends, received %" PRId64 " of %" PRId64
                          " items, sum %" PRId64 " (want %" PRId64 "), last recv %s",
                          cap, bad, c.count, n, c.sum, n * (n - 1) / 2,
                          conc_strerror(c.last_rc));
    return 0;
}

static int case_spsc_cap1(int64_t n, bench_out *out) { return spsc(n, 1, out); }
static int case_spsc_cap64(int64_t n, bench_out *out) { return spsc(n, 64, out); }
static int case_spsc_cap1024(int64_t n, bench_out *out) { return spsc(n, 1024, out); }

/* ---- mpmc_4x4_cap64 -------------------------------------------------------------------- */

typedef struct {
    _Alignas(64) conc_chan_t *ch;
    int64_t items; /* values 0..items-1 */
    int bad;
} producer_arg;

static void *produce(void *p) {
    producer_arg *a = p;
    conc_chan_t *ch = a->ch;
    int64_t items = a->items;
    int bad = 0;
    for (int64_t j = 0; j < items; j++)
        if (conc_chan_send(ch, &j, NULL) != 0) bad++;
    a->bad = bad;
    return NULL;
}

enum { MPMC_P = 4, MPMC_C = 4 };

static int case_mpmc_4x4_cap64(int64_t n, bench_out *out) {
    conc_chan_t *ch = conc_chan_new(sizeof(int64_t), 64);
    if (!ch) return bench_fail("conc_chan_new returned NULL");
    consumer_arg cons[MPMC_C];
    producer_arg prod[MPMC_P];
    pthread_t ct[MPMC_C], pt[MPMC_P];
    int64_t per = n / MPMC_P;
    int64_t t0 = bench_now();
    for (int i = 0; i < MPMC_C; i++) {
        cons[i] = (consumer_arg){ch, 0, 0, 0};
        if (bench_spawn(&ct[i], drain, &cons[i])) return 1;
    }
    for (int i = 0; i < MPMC_P; i++) {
        prod[i] = (producer_arg){ch, per, 0};
        if (bench_spawn(&pt[i], produce, &prod[i])) return 1;
    }
    for (int i = 0; i < MPMC_P; i++) pthread_join(pt[i], NULL);
    conc_chan_close(ch);
    for (int i = 0; i < MPMC_C; i++) pthread_join(ct[i], NULL);
    out->elapsed_ns = bench_now() - t0;
    out->ops = n;
    conc_chan_free(ch);
    int64_t k = 0, s = 0;
    int bad = 0;
    for (int i = 0; i < MPMC_C; i++) {
        k += cons[i].count;
        s += cons[i].sum;
        if (cons[i].last_rc != CONC_CLOSED) bad++;
    }
    for (int i = 0; i < MPMC_P; i++) bad += prod[i].bad;
    int64_t want = MPMC_P * (per * (per - 1) / 2);
    if (bad || k != per * MPMC_P || s != want)
        return bench_fail("mpmc: %d failed calls, received %" PRId64 " of %" PRId64
                          " items, sum %" PRId64 " (want %" PRId64 ")",
                          bad, k, per * MPMC_P, s, want);
    return 0;
}

/* ---- select2_* ------------------------------------------------------------------------- */

static int select2(int64_t n, size_t cap, bench_out *out) {
    conc_chan_t *a = conc_chan_new(sizeof(int64_t), cap);
    conc_chan_t *b = conc_chan_new(sizeof(int64_t), cap);
    if (!a || !b) return bench_fail("conc_chan_new returned NULL");
    int64_t half = n / 2;
    producer_arg pa = {a, half, 0}, pb = {b, half, 0};
    pthread_t ta, tb;
    int64_t va = 0, vb = 0, ka = 0, kb = 0, sa = 0, sb = 0;
    int bad = 0, badrc = 0;
    conc_case cs[2] = {CONC_RECV(a, &va), CONC_RECV(b, &vb)};
    int64_t t0 = bench_now();
    if (bench_spawn(&ta, produce, &pa) || bench_spawn(&tb, produce, &pb)) return 1;
    for (int64_t got = 0; got < 2 * half; got++) {
        int i = conc_select(cs, 2, NULL);
        if (i == 0 && cs[0].status == 0) {
            ka++;
            sa += va;
        } else if (i == 1 && cs[1].status == 0) {
            kb++;
            sb += vb;
        } else {
            bad = 1;
            badrc = i;
            break;
        }
    }
    out->elapsed_ns = bench_now() - t0;
    out->ops = n;
    if (bad) { /* let the producers finish so they can be joined */
        conc_chan_close(a);
        conc_chan_close(b);
    }
    pthread_join(ta, NULL);
    pthread_join(tb, NULL);
    conc_chan_free(a);
    conc_chan_free(b);
    int64_t want = half * (half - 1) / 2;
    if (bad)
        return bench_fail("select2 cap %zu: conc_select returned %d (%s)", cap, badrc,
                          badrc < 0 ? conc_strerror(badrc) : "case status not 0");
    if (pa.bad || pb.bad || ka != half || kb != half || sa != want || sb != want)
        return bench_fail("select2 cap %zu: failed sends %d+%d, counts %" PRId64 "+%" PRId64
                          " (want %" PRId64 " each), sums %" PRId64 "+%" PRId64
                          " (want %" PRId64 " each)",
                          cap, pa.bad, pb.bad, ka, kb, half, sa, sb, want);
    bench_extra(out, "from_a_frac=%.3f", (double)ka / (double)(ka + kb));
    return 0;
}

static int case_select2_cap64(int64_t n, bench_out *out) { return select2(n, 64, out); }
static int case_select2_unbuf(int64_t n, bench_out *out) { return select2(n, 0, out); }

/* ---- backpressure_2p1c_cap64_1us ------------------------------------------------------- */

enum { BP_PRODUCERS = 2 };

typedef struct {
    _Alignas(64) conc_chan_t *ch;
    int64_t items;
    int64_t sends, blocked, blocked_ns;
    int bad;
} bp_producer;

static void *bp_produce(void *p) {
    bp_producer *a = p;
    conc_chan_t *ch = a->ch;
    int64_t items = a->items, sends = 0, blocked = 0, blocked_ns = 0;
    int bad = 0;
    for (int64_t j = 0; j < items; j++) {
        int rc = conc_chan_try_send(ch, &j);
        if (rc == CONC_WOULD_BLOCK) {
            blocked++;
            int64_t tb = bench_now();
            rc = conc_chan_send(ch, &j, NULL);
            blocked_ns += bench_now() - tb;
        }
        if (rc != 0) bad++;
        sends++;
    }
    a->sends = sends;
    a->blocked = blocked;
    a->blocked_ns = blocked_ns;
    a->bad = bad;
    return NULL;
}

static void *bp_consume(void *p) {
    consumer_arg *a = p;
    conc_chan_t *ch = a->ch;
    int64_t v, k = 0, s = 0;
    int rc;
    while ((rc = conc_chan_recv(ch, &v, NULL)) == 0) {
        bench_busy_ns(1000);
        k++;
        s += v;
    }
    a->count = k;
    a->sum = s;
    a->last_rc = rc;
    return NULL;
}

static int case_backpressure(int64_t n, bench_out *out) {
    conc_chan_t *ch = conc_chan_new(sizeof(int64_t), 64);
    if (!ch) return bench_fail("conc_chan_new returned NULL");
    consumer_arg c = {ch, 0, 0, 0};
    bp_producer prod[BP_PRODUCERS];
    pthread_t ct, pt[BP_PRODUCERS];
    int64_t per = n / BP_PRODUCERS;
    int64_t t0 = bench_now();
    if (bench_spawn(&ct, bp_consume, &c)) return 1;
    for (int i = 0; i < BP_PRODUCERS; i++) {
        prod[i] = (bp_producer){ch, per, 0, 0, 0, 0};
        if (bench_spawn(&pt[i], bp_produce, &prod[i])) return 1;
    }
    for (int i = 0; i < BP_PRODUCERS; i++) pthread_join(pt[i], NULL);
    conc_chan_close(ch);
    pthread_join(ct, NULL);
    int64_t el = bench_now() - t0;
    out->elapsed_ns = el;
    out->ops = n;

    conc_chan_stats st;
    memset(&st, 0, sizeof st);
    conc_chan_stats_get(ch, &st);
    conc_chan_free(ch);

    int64_t sends = 0, blocked = 0, blocked_ns = 0;
    int bad = 0;
    for (int i = 0; i < BP_PRODUCERS; i++) {
        sends += prod[i].sends;
        blocked += prod[i].blocked;
        blocked_ns += prod[i].blocked_ns;
        bad += prod[i].bad;
    }
    int64_t total = per * BP_PRODUCERS;
    int64_t want = BP_PRODUCERS * (per * (per - 1) / 2);
    if (bad || c.last_rc != CONC_CLOSED || c.count != total || c.sum != want)
        return bench_fail("backpressure: %d failed sends, received %" PRId64 " of %" PRId64
                          ", sum %" PRId64 " (want %" PRId64 ")",
                          bad, c.count, total, c.sum, want);
    if (st.sends != (uint64_t)total || st.recvs != (uint64_t)total)
        return bench_fail("backpressure: conc_chan_stats_get counts %" PRIu64
                          " sends and %" PRIu64 " receives, want %" PRId64 " of each",
                          st.sends, st.recvs, total);
    double wall = (double)el * BP_PRODUCERS;
    bench_extra(out, "blocked_send_frac=%.4f", (double)blocked / (double)sends);
    bench_extra(out, "blocked_time_frac=%.4f", (double)blocked_ns / wall);
    bench_extra(out, "stats_blocked_send_frac=%.4f",
                st.sends ? (double)st.blocked_sends / (double)st.sends : 0.0);
    bench_extra(out, "stats_wait_frac=%.4f", (double)st.send_wait_ns / wall);
    bench_extra(out, "stats_high_water=%zu", st.high_water);
    bench_extra(out, "stats_blocked_recv_frac=%.4f",
                st.recvs ? (double)st.blocked_recvs / (double)st.recvs : 0.0);
    return 0;
}

/* ---- floor_atomic_pingpong ------------------------------------------------------------ */

typedef struct {
    _Alignas(64) _Atomic int64_t turn; /* 2k: the main thread's move k; 2k+1: the echo's */
    int64_t n;
} floor_arg;

/* pause, and past a while yield: with one CPU the peer must get it to move */
static void floor_spin(int i) {
    if (i < 4096) bench_pause();
    else sched_yield();
}

static void *floor_echo(void *p) {
    floor_arg *a = p;
    int64_t n = a->n;
    for (int64_t k = 0; k < n; k++) {
        for (int i = 0; atomic_load_explicit(&a->turn, memory_order_acquire) != 2 * k + 1; i++) floor_spin(i);
        atomic_store_explicit(&a->turn, 2 * k + 2, memory_order_release);
    }
    return NULL;
}

static int case_floor_atomic_pingpong(int64_t n, bench_out *out) {
    static floor_arg a; /* static: its own line, away from this thread's stack */
    atomic_store(&a.turn, 0);
    a.n = n;
    pthread_t t;
    if (bench_spawn(&t, floor_echo, &a)) return 1;
    int64_t t0 = bench_now();
    for (int64_t k = 0; k < n; k++) {
        atomic_store_explicit(&a.turn, 2 * k + 1, memory_order_release);
        for (int i = 0; atomic_load_explicit(&a.turn, memory_order_acquire) != 2 * k + 2; i++) floor_spin(i);
    }
    out->elapsed_ns = bench_now() - t0;
    out->ops = n;
    pthread_join(t, NULL);
    return 0;
}

/* ---- idle_wait_500ms ------------------------------------------------------------------- */

typedef struct {
    int64_t wait_ns;
    int64_t wall_ns, cpu_ns;
    int rc;
    int setup_failed;
} idle_arg;

static void *idle_waiter(void *p) {
    idle_arg *a = p;
    conc_chan_t *ch = conc_chan_new(sizeof(int64_t), 0);
    int64_t c0 = bench_clock_ns(CLOCK_THREAD_CPUTIME_ID);
    int64_t w0 = bench_now();
    conc_ctx_t *ctx = conc_ctx_with_timeout(NULL, a->wait_ns);
    if (!ch || !ctx) {
        a->setup_failed = 1;
    } else {
        int64_t v;
        a->rc = conc_chan_recv(ch, &v, ctx);
    }
    a->wall_ns = bench_now() - w0;
    a->cpu_ns = bench_clock_ns(CLOCK_THREAD_CPUTIME_ID) - c0;
    conc_ctx_release(ctx);
    conc_chan_free(ch);
    return NULL;
}

static int case_idle_wait(int64_t n, bench_out *out) {
    idle_arg a = {n * 1000000, 0, 0, 0, 0};
    pthread_t t;
    int64_t p0 = bench_clock_ns(CLOCK_PROCESS_CPUTIME_ID);
    if (bench_spawn(&t, idle_waiter, &a)) return 1;
    pthread_join(t, NULL);
    int64_t proc_cpu = bench_clock_ns(CLOCK_PROCESS_CPUTIME_ID) - p0;
    out->elapsed_ns = a.wall_ns;
    out->ops = 1;
    if (a.setup_failed) return bench_fail("idle_wait: conc_chan_new or ctx_with_timeout gave NULL");
    if (a.rc != CONC_DEADLINE_EXCEEDED)
        return bench_fail("idle_wait: conc_chan_recv returned %d (%s), want %d (%s)", a.rc,
                          conc_strerror(a.rc), CONC_DEADLINE_EXCEEDED,
                          conc_strerror(CONC_DEADLINE_EXCEEDED));
    if (a.wall_ns < a.wait_ns)
        return bench_fail("idle_wait: the deadline fired after %.3f ms, before its %.3f ms",
                          (double)a.wall_ns / 1e6, (double)a.wait_ns / 1e6);
    double cpu_ms = (double)a.cpu_ns / 1e6;
    bench_extra(out, "cpu_ms=%.3f", cpu_ms);
    bench_extra(out, "process_cpu_ms=%.3f", (double)proc_cpu / 1e6);
    bench_extra(out, "late_us=%.1f", (double)(a.wall_ns - a.wait_ns) / 1e3);
    bench_extra(out, "cpu_target_ms=20 cpu_ok=%d", cpu_ms < 20.0);
    if (cpu_ms >= 20.0)
        fprintf(stderr, "bench: idle_wait: the blocked thread used %.3f ms of CPU (target < 20)\n",
                cpu_ms);
    return 0;
}

/* ---- the table --------------------------------------------------------------------------- */

static const bench_case cases[] = {
    {"unbuf_pingpong", 2000000, case_unbuf_pingpong, 0},
    {"spsc_cap1", 4000000, case_spsc_cap1, 0},
    {"spsc_cap64", 10000000, case_spsc_cap64, 0},
    {"spsc_cap1024", 10000000, case_spsc_cap1024, 0},
    {"mpmc_4x4_cap64", 4000000, case_mpmc_4x4_cap64, 0},
    {"select2_cap64", 4000000, case_select2_cap64, 0},
    {"select2_unbuf", 2000000, case_select2_unbuf, 0},
    {"backpressure_2p1c_cap64_1us", 400000, case_backpressure, 0},
    {"floor_atomic_pingpong", 2000000, case_floor_atomic_pingpong, 0},
    {"idle_wait_500ms", 500, case_idle_wait, 1},
};

int main(int argc, char **argv) {
    return bench_main(argc, argv, cases, sizeof cases / sizeof cases[0]);
}
