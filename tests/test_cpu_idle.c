/* test_cpu_idle.c - a blocked thread costs no CPU (PITFALLS 19: polling instead of
   blocking). Each blocking call below waits 500 ms for a deadline; the CPU time the
   waiting thread used meanwhile, read from CLOCK_THREAD_CPUTIME_ID in that thread, must
   stay under 20 ms. The short adaptive spin before parking is far below that.

   Not run under Valgrind (which makes every instruction expensive). */
#define CONC_IMPLEMENTATION
#include "conc.h"
#include "tap.h"

#include <pthread.h>
#include <time.h>

#define MS CONC_MILLISECOND
#define WAIT (500 * MS)
#define CPU_LIMIT (20 * MS)

static int64_t thread_cpu_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (int64_t)ts.tv_sec * CONC_SECOND + ts.tv_nsec;
}

enum what { RECV, SELECT, CTX_WAIT, SLEEP, TIMER_RECV };

struct probe {
    enum what what;
    int rc;
    int64_t wall, cpu;
};

static void *probe_thread(void *arg) {
    struct probe *p = arg;
    conc_chan_t *ch = conc_chan_new(sizeof(int), 0);
    conc_chan_t *other = conc_chan_new(sizeof(int), 4);
    conc_timer_t *tm = conc_timer_after(3600 * CONC_SECOND);
    int v;
    if (!ch || !other || !tm) {
        p->rc = CONC_NOMEM;
        return NULL;
    }
    int64_t t0 = conc_now(), c0 = thread_cpu_ns();
    conc_ctx_t *ctx = conc_ctx_with_timeout(NULL, WAIT);
    switch (p->what) {
    case RECV: p->rc = conc_chan_recv(ch, &v, ctx); break;
    case SELECT: {
        conc_case cs[3] = {CONC_RECV(ch, &v), CONC_RECV(other, &v),
                           CONC_RECV(conc_timer_chan(tm), NULL)};
        p->rc = conc_select(cs, 3, ctx);
        break;
    }
    case CTX_WAIT: p->rc = conc_ctx_wait(ctx); break;
    case SLEEP: p->rc = conc_sleep(WAIT, NULL); break;
    case TIMER_RECV: {
        conc_timer_t *t = conc_timer_after(WAIT);
        int64_t when;
        p->rc = t ? conc_chan_recv(conc_timer_chan(t), &when, NULL) : CONC_NOMEM;
        conc_timer_free(t);
        break;
    }
    }
    p->cpu = thread_cpu_ns() - c0;
    p->wall = conc_now() - t0;
    conc_ctx_release(ctx);
    conc_timer_free(tm);
    conc_chan_free(other);
    conc_chan_free(ch);
    return NULL;
}

/* The status each kind of wait ends with: the three with a context hit its deadline. */
static int expected_rc(enum what w) {
    return w == SLEEP || w == TIMER_RECV ? 0 : CONC_DEADLINE_EXCEEDED;
}

static void probe(enum what what, const char *name) {
    struct probe p = {what, -100, 0, 0};
    pthread_t th;
    ASSERT(pthread_create(&th, NULL, probe_thread, &p) == 0);
    pthread_join(th, NULL);
    printf("# %-10s blocked %.1f ms, used %.3f ms of CPU\n", name, (double)p.wall / 1e6,
           (double)p.cpu / 1e6);
    EXPECT_EQ(p.rc, expected_rc(what));
    EXPECT(p.wall >= WAIT);
    EXPECT(p.cpu < CPU_LIMIT);
}

TEST(recv_blocked_is_idle) { probe(RECV, "recv"); }
TEST(select_blocked_is_idle) { probe(SELECT, "select"); }
TEST(ctx_wait_blocked_is_idle) { probe(CTX_WAIT, "ctx_wait"); }
TEST(sleep_is_idle) { probe(SLEEP, "sleep"); }
TEST(timer_recv_is_idle) { probe(TIMER_RECV, "timer"); }

/* Several at once: nobody spins waiting for a spare core. */
TEST(many_blocked_are_idle) {
    enum { N = 6 };
    struct probe p[N];
    pthread_t th[N];
    for (int i = 0; i < N; i++) {
        p[i] = (struct probe){(enum what)(i % 3), -100, 0, 0};
        ASSERT(pthread_create(&th[i], NULL, probe_thread, &p[i]) == 0);
    }
    int64_t total = 0;
    for (int i = 0; i < N; i++) {
        pthread_join(th[i], NULL);
        EXPECT_EQ(p[i].rc, expected_rc(p[i].what));
        EXPECT(p[i].cpu < CPU_LIMIT);
        total += p[i].cpu;
    }
    printf("# %d blocked threads used %.3f ms of CPU in all\n", N, (double)total / 1e6);
}

int main(void) {
    RUN(recv_blocked_is_idle);
    RUN(select_blocked_is_idle);
    RUN(ctx_wait_blocked_is_idle);
    RUN(sleep_is_idle);
    RUN(timer_recv_is_idle);
    RUN(many_blocked_are_idle);
    return tap_done();
}
