/* test_errgroup_fault.c - error groups when a worker thread cannot be started (fault
   injection through CONC_MALLOC): the go that hit the failure returns it and gives its
   limit slot back, and a go that was blocked on that slot meanwhile is not left waiting
   for an unrelated task (which may itself wait for that go's caller): it tries again,
   and gets a thread, or its own start's failure. */
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>

static _Thread_local int fail_next_alloc; /* the calling thread's next allocation fails */
static void *fault_group;
static void until_a_go_blocked(void);
static void *fault_malloc(size_t n) {
    if (fail_next_alloc) {
        fail_next_alloc = 0;
        until_a_go_blocked(); /* the race: another go blocks on the slot this one holds */
        return NULL;
    }
    return malloc(n);
}
#define CONC_MALLOC(n) fault_malloc(n)
#define CONC_FREE(p) free(p)
#define CONC_IMPLEMENTATION
#include "conc.h"
#include "tap.h"
#include "test_util.h"

static _Atomic uint64_t blocked_before;

static void until_a_go_blocked(void) {
    conc_group_stats s;
    do {
        sched_yield();
        conc_group_stats_get((conc_group_t *)fault_group, &s);
    } while (s.blocked <= atomic_load(&blocked_before));
}

static conc_chan_t *gate;
static int hold(void *arg, conc_ctx_t *ctx) {
    (void)arg, (void)ctx;
    conc_chan_recv(gate, NULL, NULL); /* until the test closes the gate */
    return 0;
}
static int quick(void *arg, conc_ctx_t *ctx) {
    (void)ctx;
    if (arg) atomic_fetch_add((_Atomic int *)arg, 1);
    return 0;
}

typedef struct {
    conc_group_t *g;
    int rc;
} failing_go;

static void *go_whose_start_fails(void *p) {
    failing_go *f = (failing_go *)p;
    fail_next_alloc = 1;
    f->rc = conc_group_go(f->g, quick, NULL, NULL);
    return NULL;
}

/* limit 2: a task holds one slot; go#2 takes the other and its thread start fails while
   go#3 blocks on the limit. go#3 must get the slot back at once, not when the holder ends.
   If main_fails, go#3's own start fails too: it returns that failure (no hang). */
static void run(bool main_fails) {
    gate = conc_chan_new(0, 0);
    conc_group_t *g = conc_group_new(NULL);
    ASSERT(gate && g);
    fault_group = g;
    atomic_store(&blocked_before, 0);
    EXPECT_EQ(conc_group_set_limit(g, 2), 0);
    EXPECT_EQ(conc_group_go(g, hold, NULL, NULL), 0);
    failing_go f = {g, 99};
    pthread_t th;
    spawn(&th, go_whose_start_fails, &f);
    conc_group_stats s;
    do {
        sched_yield();
        conc_group_stats_get(g, &s);
    } while (s.running < 2); /* go#2 holds the second slot */
    _Atomic int ran = 0;
    conc_ctx_t *guard = conc_ctx_with_timeout(NULL, 20 * CONC_SECOND); /* a hang fails, not hangs */
    ASSERT(guard != NULL);
    fail_next_alloc = main_fails;
    int rc = conc_group_go(g, quick, &ran, guard); /* go#3: blocks until go#2 gives the slot back */
    fail_next_alloc = 0;
    pthread_join(th, NULL);
    EXPECT_EQ(f.rc, CONC_NOMEM);
    EXPECT_EQ(rc, main_fails ? CONC_NOMEM : 0);
    conc_chan_close(gate);
    EXPECT_EQ(conc_group_wait(g, NULL), 0);
    EXPECT_EQ(atomic_load(&ran), main_fails ? 0 : 1);
    /* the group still works after the failures */
    EXPECT_EQ(conc_group_go(g, quick, &ran, NULL), 0);
    EXPECT_EQ(conc_group_wait(g, NULL), 0);
    EXPECT_EQ(atomic_load(&ran), main_fails ? 1 : 2);
    conc_ctx_release(guard);
    conc_group_free(g);
    conc_chan_free(gate);
}

TEST(failed_start_passes_the_slot_on) { run(false); }
TEST(failed_start_then_failed_retry) { run(true); }

int main(void) {
    RUN(failed_start_passes_the_slot_on);
    RUN(failed_start_then_failed_retry);
    return tap_done();
}
