/* server.c - a job server that shuts down gracefully on SIGTERM or Ctrl+C.

   A producer takes requests at a limited rate (a token bucket), hands them to a pool of
   workers with a small queue (a full queue pushes back on the producer), and stops when a
   signal arrives. The shutdown then gives the pool a deadline: jobs still queued when it
   passes are reported, not dropped; jobs running see their context end. Finally a leak
   check shows that every thread the program started has ended.

   To try it by hand: run it and press Ctrl+C. Run as a test, it sends itself SIGTERM
   once it has served a few hundred requests. */
#define CONC_IMPLEMENTATION
#include "conc.h"

#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <unistd.h>

static atomic_int done_ok, done_cut;

/* One request: ~2 ms of "work" that stops early if the pool's context ends. */
static int handle(void *arg, conc_ctx_t *ctx) {
    (void)arg;
    if (conc_sleep(2 * CONC_MILLISECOND, ctx) != 0) {
        atomic_fetch_add(&done_cut, 1);
        return conc_ctx_err(ctx);
    }
    if (atomic_fetch_add(&done_ok, 1) + 1 == 300) kill(getpid(), SIGTERM); /* the demo's Ctrl+C */
    return 0;
}

static void report_unrun(conc_task_fn fn, void *arg, void *counter) {
    (void)fn, (void)arg;
    ++*(int *)counter;
}

int main(void) {
    static const int sigs[] = {SIGINT, SIGTERM};
    conc_signal_t *sig;
    uint64_t scope = conc_leak_begin();
    /* first, before any thread starts: every thread inherits the blocked signals */
    if (conc_signal_notify(NULL, sigs, 2, &sig) != 0) return 1;
    conc_ctx_t *ctx = conc_signal_ctx(sig);

    conc_pool_t *pool = conc_pool_new(4, 16, NULL); /* its own context: a signal does not
                                                       cut running jobs, the deadline does */
    conc_limiter_t *lim = conc_limiter_new(5000.0, 100); /* at most 5000 requests/s */
    if (!pool || !lim) return 1;

    int accepted = 0;
    while (conc_limiter_wait(lim, 1, ctx) == 0) {
        if (conc_pool_submit(pool, handle, NULL, ctx) != 0) break; /* ctx ended while blocked */
        accepted++;
    }
    printf("server: signal %d, shutting down with %d requests accepted\n", conc_ctx_cause(ctx), accepted);
    conc_signal_stop(sig); /* a second Ctrl+C now kills at once */

    int unrun = 0;
    conc_ctx_t *grace = conc_ctx_with_timeout(NULL, 5 * CONC_MILLISECOND);
    int rc = conc_pool_shutdown(pool, report_unrun, &unrun, grace);
    conc_ctx_release(grace);
    conc_pool_free(pool); /* waits for jobs that were still running */
    conc_limiter_free(lim);

    int ok = atomic_load(&done_ok), cut = atomic_load(&done_cut);
    printf("server: shutdown %s: %d served, %d cut short, %d never started\n", rc == 0 ? "drained" : "timed out", ok,
           cut, unrun);

    size_t leaked = 0;
    if (conc_leak_check(scope, CONC_SECOND, NULL, NULL, 0, &leaked) != 0) printf("server: %zu threads leaked\n", leaked);
    /* every accepted request is accounted for exactly once */
    return ok + cut + unrun == accepted && leaked == 0 ? 0 : 1;
}
