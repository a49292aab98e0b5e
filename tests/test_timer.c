/* test_timer.c - one-shot timers, tickers, stop and reset with Go 1.23 semantics (no stale
   value after either), timers in select, conc_sleep, 1000 timers at once.

   Timing checks are lower bounds (a timer never fires early) plus generous upper bounds:
   this runs on noisy shared machines and under Valgrind. Run it under memcheck too: the
   timer thread must be joined at exit, with nothing "possibly lost". */
#define CONC_IMPLEMENTATION
#include "conc.h"
#include "tap.h"

#include <pthread.h>
#include <time.h>

#define MS CONC_MILLISECOND

/* Receives the timer's next value, giving up (CONC_DEADLINE_EXCEEDED) after `within`. */
static int recv_within(conc_timer_t *t, int64_t *v, int64_t within) {
    conc_ctx_t *c = conc_ctx_with_timeout(NULL, within);
    if (!c) return CONC_NOMEM;
    int rc = conc_chan_recv(conc_timer_chan(t), v, c);
    conc_ctx_release(c);
    return rc;
}

/* Waits, using a timeout context, until the timer's value is buffered (it has fired and
   nobody has received it). Returns false if that takes more than 10 s. */
static bool wait_buffered(conc_timer_t *t) {
    int64_t give_up = conc_now() + 10 * CONC_SECOND;
    while (conc_chan_len(conc_timer_chan(t)) == 0) {
        if (conc_now() > give_up) return false;
        conc_sleep(2 * MS, NULL);
    }
    return true;
}

TEST(timer_chan_shape) {
    conc_timer_t *t = conc_timer_after(3600 * CONC_SECOND);
    ASSERT(t != NULL);
    conc_chan_t *ch = conc_timer_chan(t);
    ASSERT(ch != NULL);
    EXPECT_EQ(conc_chan_cap(ch), 1);
    EXPECT_EQ(conc_chan_elem_size(ch), sizeof(int64_t));
    EXPECT_EQ(conc_chan_len(ch), 0);
    conc_timer_free(t);
    conc_timer_free(NULL);
    EXPECT(conc_timer_tick(0) == NULL);
    EXPECT(conc_timer_tick(-MS) == NULL);
}

TEST(after_fires_once) {
    int64_t start = conc_now();
    conc_timer_t *t = conc_timer_after(20 * MS);
    ASSERT(t != NULL);
    int64_t v = 0;
    ASSERT_EQ(recv_within(t, &v, 10 * CONC_SECOND), 0);
    EXPECT(v >= start + 20 * MS);
    EXPECT(v <= conc_now());
    /* once only */
    EXPECT_EQ(recv_within(t, &v, 40 * MS), CONC_DEADLINE_EXCEEDED);
    EXPECT(!conc_timer_stop(t));
    conc_timer_free(t);

    /* Zero and negative delays fire at once (well, soon). */
    start = conc_now();
    conc_timer_t *z = conc_timer_after(0), *n = conc_timer_after(-5 * MS);
    ASSERT(z && n);
    EXPECT_EQ(recv_within(z, &v, 10 * CONC_SECOND), 0);
    EXPECT(v >= start);
    EXPECT_EQ(recv_within(n, &v, 10 * CONC_SECOND), 0);
    EXPECT(v >= start);
    conc_timer_free(z);
    conc_timer_free(n);
}

TEST(tick_is_periodic) {
    int64_t start = conc_now();
    conc_timer_t *t = conc_timer_tick(10 * MS);
    ASSERT(t != NULL);
    conc_ctx_t *c = conc_ctx_with_timeout(NULL, 200 * MS);
    ASSERT(c != NULL);
    int n = 0;
    int64_t v = 0, prev = start;
    bool increasing = true, early = false;
    while (conc_chan_recv(conc_timer_chan(t), &v, c) == 0) {
        if (v <= prev) increasing = false;
        if (v < start + 10 * MS) early = true;
        prev = v;
        n++;
    }
    printf("# %d ticks of 10 ms in 200 ms\n", n);
    EXPECT(n >= 5);
    EXPECT(n <= 25);
    EXPECT(increasing);
    EXPECT(!early);
    EXPECT(conc_timer_stop(t)); /* a ticker is active until stopped */
    EXPECT_EQ(conc_chan_try_recv(conc_timer_chan(t), &v), CONC_WOULD_BLOCK);
    EXPECT_EQ(recv_within(t, &v, 40 * MS), CONC_DEADLINE_EXCEEDED);
    EXPECT(!conc_timer_stop(t));
    conc_ctx_release(c);
    conc_timer_free(t);
}

TEST(tick_drops_when_full) {
    int64_t start = conc_now();
    conc_timer_t *t = conc_timer_tick(2 * MS);
    ASSERT(t != NULL);
    /* Do not receive for 50 periods. */
    conc_ctx_t *c = conc_ctx_with_timeout(NULL, 100 * MS);
    ASSERT(c != NULL);
    EXPECT_EQ(conc_ctx_wait(c), CONC_DEADLINE_EXCEEDED);
    conc_ctx_release(c);
    EXPECT(conc_chan_len(conc_timer_chan(t)) <= 1);
    int64_t v1 = 0, v2 = 0;
    ASSERT_EQ(recv_within(t, &v1, 10 * CONC_SECOND), 0);
    int64_t drained = conc_now();
    /* The buffered tick is an early one: the later ones found the buffer full and were
       dropped, not queued. */
    EXPECT(v1 < start + 50 * MS);
    /* At most one more is immediately there (it may have just come). */
    int extra = 0;
    while (conc_chan_try_recv(conc_timer_chan(t), &v2) == 0) extra++;
    EXPECT(extra <= 1);
    ASSERT_EQ(recv_within(t, &v2, 10 * CONC_SECOND), 0);
    EXPECT(v2 > v1);
    EXPECT(v2 > drained - 50 * MS); /* a fresh tick, not a queued old one */
    conc_timer_free(t);
}

TEST(stop_before_fire) {
    conc_timer_t *t = conc_timer_after(50 * MS);
    ASSERT(t != NULL);
    EXPECT(conc_timer_stop(t));
    int64_t v;
    EXPECT_EQ(conc_chan_try_recv(conc_timer_chan(t), &v), CONC_WOULD_BLOCK);
    EXPECT_EQ(recv_within(t, &v, 100 * MS), CONC_DEADLINE_EXCEEDED);
    EXPECT(!conc_timer_stop(t)); /* already stopped */
    conc_timer_free(t);
}

TEST(stop_after_fire_received) {
    conc_timer_t *t = conc_timer_after(5 * MS);
    ASSERT(t != NULL);
    int64_t v;
    ASSERT_EQ(recv_within(t, &v, 10 * CONC_SECOND), 0);
    EXPECT(!conc_timer_stop(t));
    EXPECT_EQ(conc_chan_try_recv(conc_timer_chan(t), &v), CONC_WOULD_BLOCK);
    conc_timer_free(t);
}

TEST(stop_after_fire_not_received_leaves_no_stale_value) {
    conc_timer_t *t = conc_timer_after(5 * MS);
    ASSERT(t != NULL);
    ASSERT(wait_buffered(t));
    /* Go 1.23: the program has not received the value, so as far as it can tell the timer
       was still active; Stop drains it and reports true. */
    EXPECT(conc_timer_stop(t));
    int64_t v;
    EXPECT_EQ(conc_chan_len(conc_timer_chan(t)), 0);
    EXPECT_EQ(conc_chan_try_recv(conc_timer_chan(t), &v), CONC_WOULD_BLOCK);
    EXPECT(!conc_timer_stop(t));
    conc_timer_free(t);

    /* A ticker too. */
    t = conc_timer_tick(5 * MS);
    ASSERT(t != NULL);
    ASSERT(wait_buffered(t));
    EXPECT(conc_timer_stop(t));
    EXPECT_EQ(conc_chan_try_recv(conc_timer_chan(t), &v), CONC_WOULD_BLOCK);
    EXPECT_EQ(recv_within(t, &v, 30 * MS), CONC_DEADLINE_EXCEEDED);
    conc_timer_free(t);
}

TEST(reset) {
    int64_t v = 0;
    /* Active: reset moves it. */
    conc_timer_t *t = conc_timer_after(3600 * CONC_SECOND);
    ASSERT(t != NULL);
    int64_t r0 = conc_now();
    EXPECT(conc_timer_reset(t, 20 * MS));
    ASSERT_EQ(recv_within(t, &v, 10 * CONC_SECOND), 0);
    EXPECT(v >= r0 + 20 * MS);
    EXPECT_EQ(conc_chan_try_recv(conc_timer_chan(t), &v), CONC_WOULD_BLOCK);

    /* Fired and received: reset returns false and it fires again. */
    int64_t r1 = conc_now();
    EXPECT(!conc_timer_reset(t, 10 * MS));
    ASSERT_EQ(recv_within(t, &v, 10 * CONC_SECOND), 0);
    EXPECT(v >= r1 + 10 * MS);

    /* Fired, not received: the stale value goes; only the new one comes. */
    EXPECT(!conc_timer_reset(t, 1 * MS));
    ASSERT(wait_buffered(t));
    int64_t r2 = conc_now();
    EXPECT(conc_timer_reset(t, 30 * MS)); /* Go 1.23 */
    EXPECT_EQ(conc_chan_try_recv(conc_timer_chan(t), &v), CONC_WOULD_BLOCK);
    ASSERT_EQ(recv_within(t, &v, 10 * CONC_SECOND), 0);
    EXPECT(v >= r2 + 30 * MS);

    /* Stopped: reset returns false and restarts it. */
    EXPECT(!conc_timer_reset(t, 3600 * CONC_SECOND));
    EXPECT(conc_timer_stop(t));
    int64_t r3 = conc_now();
    EXPECT(!conc_timer_reset(t, 5 * MS));
    ASSERT_EQ(recv_within(t, &v, 10 * CONC_SECOND), 0);
    EXPECT(v >= r3 + 5 * MS);
    conc_timer_free(t);

    /* A ticker's reset changes its period and start. */
    t = conc_timer_tick(3600 * CONC_SECOND);
    ASSERT(t != NULL);
    int64_t r4 = conc_now();
    EXPECT(conc_timer_reset(t, 10 * MS));
    int64_t a = 0, b = 0;
    ASSERT_EQ(recv_within(t, &a, 10 * CONC_SECOND), 0);
    ASSERT_EQ(recv_within(t, &b, 10 * CONC_SECOND), 0);
    EXPECT(a >= r4 + 10 * MS);
    EXPECT(b >= r4 + 20 * MS);
    EXPECT(b > a);
    /* a period of 0 or less is refused (Go panics): the ticker goes on as it was */
    EXPECT(!conc_timer_reset(t, 0));
    EXPECT(!conc_timer_reset(t, -5 * MS));
    int64_t c = 0;
    ASSERT_EQ(recv_within(t, &c, 10 * CONC_SECOND), 0);
    EXPECT(c >= r4 + 30 * MS); /* not at once: the third tick of the 10 ms period, or later */
    conc_timer_free(t);
}

TEST(timers_in_select) {
    conc_chan_t *ch = conc_chan_new(sizeof(int), 1);
    ASSERT(ch != NULL);
    int x = 0;
    int64_t when = 0;

    /* The timer wins when the channel stays quiet. */
    int64_t start = conc_now();
    conc_timer_t *t = conc_timer_after(20 * MS);
    ASSERT(t != NULL);
    conc_case cs[2] = {CONC_RECV(ch, &x), CONC_RECV(conc_timer_chan(t), &when)};
    EXPECT_EQ(conc_select(cs, 2, NULL), 1);
    EXPECT_EQ(cs[1].status, 0);
    EXPECT(when >= start + 20 * MS);
    conc_timer_free(t);

    /* The channel wins when it is ready; the timer is then stopped in time. */
    t = conc_timer_after(3600 * CONC_SECOND);
    ASSERT(t != NULL);
    x = 7;
    EXPECT_EQ(conc_chan_try_send(ch, &x), 0);
    x = 0;
    conc_case cs2[2] = {CONC_RECV(ch, &x), CONC_RECV(conc_timer_chan(t), &when)};
    EXPECT_EQ(conc_select(cs2, 2, NULL), 0);
    EXPECT_EQ(x, 7);
    EXPECT(conc_timer_stop(t));
    conc_timer_free(t);

    /* The earliest of several timers fires first; a DONE case against a long timer. */
    conc_timer_t *slow = conc_timer_after(3600 * CONC_SECOND);
    conc_timer_t *mid = conc_timer_after(200 * MS);
    conc_timer_t *fast = conc_timer_after(10 * MS);
    ASSERT(slow && mid && fast);
    conc_case cs3[3] = {CONC_RECV(conc_timer_chan(slow), &when),
                        CONC_RECV(conc_timer_chan(mid), &when),
                        CONC_RECV(conc_timer_chan(fast), &when)};
    EXPECT_EQ(conc_select(cs3, 3, NULL), 2);
    conc_ctx_t *c = conc_ctx_with_timeout(NULL, 15 * MS);
    ASSERT(c != NULL);
    conc_case cs4[2] = {CONC_RECV(conc_timer_chan(slow), &when), CONC_DONE(c)};
    EXPECT_EQ(conc_select(cs4, 2, NULL), 1);
    EXPECT_EQ(cs4[1].status, CONC_DEADLINE_EXCEEDED);
    /* and a select's own ctx against a long timer */
    EXPECT_EQ(conc_select(cs4, 1, c), CONC_DEADLINE_EXCEEDED);
    conc_ctx_release(c);
    /* a timer in try_select */
    conc_case cs5[1] = {CONC_RECV(conc_timer_chan(slow), &when)};
    EXPECT_EQ(conc_try_select(cs5, 1), CONC_WOULD_BLOCK);
    conc_timer_free(slow);
    conc_timer_free(mid);
    conc_timer_free(fast);
    conc_chan_free(ch);
}

/* ---- conc_sleep ---- */

struct sleeper {
    conc_ctx_t *ctx;
    conc_chan_t *ready;
    int rc;
    int64_t woke;
};

static void *sleep_thread(void *arg) {
    struct sleeper *s = arg;
    static const char token;
    conc_chan_send(s->ready, &token, NULL);
    s->rc = conc_sleep(3600 * CONC_SECOND, s->ctx);
    s->woke = conc_now();
    return NULL;
}

TEST(sleep_for_duration) {
    int64_t t0 = conc_now();
    EXPECT_EQ(conc_sleep(20 * MS, NULL), 0);
    EXPECT(conc_now() >= t0 + 20 * MS);
    EXPECT_EQ(conc_sleep(0, NULL), 0);
    EXPECT_EQ(conc_sleep(-MS, NULL), 0);

    /* A context that outlives the sleep does not matter. */
    conc_ctx_t *c = conc_ctx_with_timeout(NULL, 3600 * CONC_SECOND);
    ASSERT(c != NULL);
    t0 = conc_now();
    EXPECT_EQ(conc_sleep(10 * MS, c), 0);
    EXPECT(conc_now() >= t0 + 10 * MS);
    conc_ctx_release(c);

    /* A deadline that comes first. */
    t0 = conc_now();
    c = conc_ctx_with_timeout(NULL, 20 * MS);
    ASSERT(c != NULL);
    EXPECT_EQ(conc_sleep(3600 * CONC_SECOND, c), CONC_DEADLINE_EXCEEDED);
    EXPECT(conc_now() >= t0 + 20 * MS);
    conc_ctx_release(c);

    /* Already ended. */
    c = conc_ctx_with_cancel(NULL);
    ASSERT(c != NULL);
    conc_ctx_cancel(c);
    EXPECT_EQ(conc_sleep(3600 * CONC_SECOND, c), CONC_CANCELED);
    conc_ctx_release(c);
}

TEST(sleep_cancelled_from_other_thread) {
    conc_ctx_t *root = conc_ctx_with_cancel(NULL);
    ASSERT(root != NULL);
    conc_ctx_t *leaf = conc_ctx_with_cancel(root);
    ASSERT(leaf != NULL);
    struct sleeper s = {leaf, conc_chan_new(0, 0), -100, 0};
    ASSERT(s.ready != NULL);
    pthread_t th;
    ASSERT(pthread_create(&th, NULL, sleep_thread, &s) == 0);
    EXPECT_EQ(conc_chan_recv(s.ready, NULL, NULL), 0);
    int64_t t0 = conc_now();
    conc_ctx_cancel_cause(root, 5);
    pthread_join(th, NULL);
    EXPECT_EQ(s.rc, CONC_CANCELED);
    EXPECT(s.woke - t0 < 2 * CONC_SECOND);
    conc_ctx_release(leaf);
    conc_ctx_release(root);
    conc_chan_free(s.ready);
}

/* ---- many timers ---- */

static uint64_t rng_state = 0x9E3779B97F4A7C15u;
static uint64_t rng(void) {
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return rng_state;
}

#define NTIMERS 1000
static conc_timer_t *many[NTIMERS];
/* A timer's true deadline lies in [lo, hi]: our clock reads around its creation (under
   Valgrind a thread can lose the CPU for a long while in between). */
static int64_t many_lo[NTIMERS], many_hi[NTIMERS], many_got[NTIMERS];
static int order[NTIMERS];

static int by_due(const void *a, const void *b) {
    int64_t x = many_lo[*(const int *)a], y = many_lo[*(const int *)b];
    return (x > y) - (x < y);
}

TEST(many_timers_fire_in_deadline_order) {
    for (int i = 0; i < NTIMERS; i++) {
        int64_t d = (int64_t)(rng() % 100) * MS + (int64_t)(rng() % 1000) * CONC_MICROSECOND;
        many_lo[i] = conc_now() + d;
        many[i] = conc_timer_after(d);
        many_hi[i] = conc_now() + d;
        ASSERT(many[i] != NULL);
        order[i] = i;
    }
    qsort(order, NTIMERS, sizeof order[0], by_due);
    int late = 0, missing = 0, early = 0;
    for (int k = 0; k < NTIMERS; k++) {
        int i = order[k];
        if (recv_within(many[i], &many_got[i], 10 * CONC_SECOND) != 0) {
            missing++;
            continue;
        }
        if (many_got[i] < many_lo[i]) early++;
        if (many_got[i] > many_hi[i] + 2 * CONC_SECOND) late++;
    }
    /* One timer thread fires in deadline order: a timer certainly due before another
       never fires after it. */
    int inversions = 0;
    for (int i = 0; i < NTIMERS; i++)
        for (int j = 0; j < NTIMERS; j++)
            if (many_hi[i] < many_lo[j] && many_got[i] > many_got[j]) inversions++;
    EXPECT_EQ(missing, 0);
    EXPECT_EQ(early, 0);
    EXPECT_EQ(late, 0);
    EXPECT_EQ(inversions, 0);
    for (int i = 0; i < NTIMERS; i++) {
        int64_t v;
        EXPECT_EQ(conc_chan_try_recv(conc_timer_chan(many[i]), &v), CONC_WOULD_BLOCK);
        conc_timer_free(many[i]);
    }

    /* Many timers freed before they fire: taken out, nothing left behind. */
    for (int i = 0; i < NTIMERS; i++) {
        many[i] = (i % 2) ? conc_timer_after((int64_t)(1 + rng() % 50) * CONC_SECOND)
                          : conc_timer_tick((int64_t)(1 + rng() % 50) * CONC_SECOND);
        ASSERT(many[i] != NULL);
    }
    for (int i = 0; i < NTIMERS; i++) conc_timer_free(many[(i * 7) % NTIMERS]);

    /* The timer machinery still works afterwards. */
    conc_timer_t *t = conc_timer_after(MS);
    ASSERT(t != NULL);
    int64_t v;
    EXPECT_EQ(recv_within(t, &v, 10 * CONC_SECOND), 0);
    conc_timer_free(t);
}

/* Timers from several threads at once, each thread checking its own. */
static void *timer_user(void *arg) {
    int *bad = arg;
    uint64_t s = (uint64_t)(uintptr_t)arg * 2654435761u | 1;
    for (int i = 0; i < 50; i++) {
        s ^= s << 13, s ^= s >> 7, s ^= s << 17;
        int64_t d = (int64_t)(s % 3000) * CONC_MICROSECOND;
        int64_t t0 = conc_now();
        conc_timer_t *t = (i % 5 == 0) ? conc_timer_tick(d + MS) : conc_timer_after(d);
        if (!t) {
            (*bad)++;
            continue;
        }
        int64_t v;
        if (i % 3 == 0) {
            conc_timer_stop(t);
        } else if (recv_within(t, &v, 10 * CONC_SECOND) != 0 || v < t0 + d) {
            (*bad)++;
        }
        conc_timer_free(t);
    }
    return NULL;
}

TEST(timers_from_many_threads) {
    enum { N = 8 };
    pthread_t th[N];
    int bad[N] = {0};
    for (int i = 0; i < N; i++) ASSERT(pthread_create(&th[i], NULL, timer_user, &bad[i]) == 0);
    for (int i = 0; i < N; i++) {
        pthread_join(th[i], NULL);
        EXPECT_EQ(bad[i], 0);
    }
}

/* The timer thread leaves when it has been idle for a while (about a second) and a new
   one starts with the next timer; the old one must have been joined (memcheck would show
   its stack as "possibly lost"). Waiting with nanosleep keeps conc out of the way. */
TEST(timer_thread_restarts_after_idle) {
    for (int round = 0; round < 2; round++) {
        int64_t t0 = conc_now(), v = 0;
        conc_timer_t *t = conc_timer_after(MS);
        ASSERT(t != NULL);
        EXPECT_EQ(recv_within(t, &v, 10 * CONC_SECOND), 0);
        EXPECT(v >= t0 + MS);
        conc_timer_free(t);
        struct timespec idle = {1, 500 * 1000 * 1000};
        nanosleep(&idle, NULL);
    }
    conc_ctx_t *c = conc_ctx_with_timeout(NULL, 5 * MS);
    ASSERT(c != NULL);
    EXPECT_EQ(conc_ctx_wait(c), CONC_DEADLINE_EXCEEDED);
    conc_ctx_release(c);
    EXPECT_EQ(conc_sleep(MS, NULL), 0);
}

/* Durations up to INT64_MAX mean "practically never": conc_now() + d overflowed into the
   past and fired at once. */
TEST(longest_durations_do_not_wrap) {
    conc_ctx_t *c = conc_ctx_with_timeout(NULL, 30 * MS);
    ASSERT(c != NULL);
    EXPECT_EQ(conc_sleep(INT64_MAX, c), CONC_DEADLINE_EXCEEDED);
    conc_ctx_release(c);

    conc_timer_t *t = conc_timer_after(INT64_MAX);
    conc_timer_t *k = conc_timer_tick(INT64_MAX);
    ASSERT(t != NULL && k != NULL);
    int64_t v;
    conc_case cs[2] = {CONC_RECV(conc_timer_chan(t), &v), CONC_RECV(conc_timer_chan(k), &v)};
    c = conc_ctx_with_timeout(NULL, 30 * MS);
    ASSERT(c != NULL);
    EXPECT_EQ(conc_select(cs, 2, c), CONC_DEADLINE_EXCEEDED);
    conc_ctx_release(c);
    EXPECT(conc_timer_reset(t, INT64_MAX)); /* still to come */
    c = conc_ctx_with_timeout(NULL, 30 * MS);
    ASSERT(c != NULL);
    EXPECT_EQ(conc_chan_recv(conc_timer_chan(t), &v, c), CONC_DEADLINE_EXCEEDED);
    conc_ctx_release(c);
    EXPECT(conc_timer_stop(t));
    EXPECT(conc_timer_stop(k));
    conc_timer_free(t);
    conc_timer_free(k);
}

int main(void) {
    RUN(timer_chan_shape);
    RUN(after_fires_once);
    RUN(tick_is_periodic);
    RUN(tick_drops_when_full);
    RUN(stop_before_fire);
    RUN(stop_after_fire_received);
    RUN(stop_after_fire_not_received_leaves_no_stale_value);
    RUN(reset);
    RUN(timers_in_select);
    RUN(sleep_for_duration);
    RUN(sleep_cancelled_from_other_thread);
    RUN(many_timers_fire_in_deadline_order);
    RUN(timers_from_many_threads);
    RUN(timer_thread_restarts_after_idle);
    RUN(longest_durations_do_not_wrap);
    return tap_done();
}
