/* worker.c - a worker that serves jobs until its context is cancelled, with an
   after-func that cleans up (here: closes the job queue) when that happens.

   conc_ctx_after_func is Go's context.AfterFunc: the cleanup is tied to the context,
   not to whichever code path happens to notice the end first. */
#define CONC_IMPLEMENTATION
#include "conc.h"

#include <pthread.h>
#include <stdio.h>

struct worker {
    conc_ctx_t *ctx;
    conc_chan_t *jobs, *results;
    int served;
};

static void *serve(void *arg) {
    struct worker *w = arg;
    int job;
    while (conc_chan_recv(w->jobs, &job, w->ctx) == 0) {
        int result = job * job;
        if (conc_chan_send(w->results, &result, w->ctx) != 0) break;
        w->served++;
    }
    printf("worker: stopped after %d jobs: %s\n", w->served,
           conc_strerror(conc_ctx_err(w->ctx)));
    return NULL;
}

/* Runs once, on the thread that cancels the context. */
static void close_queue(void *arg) {
    printf("cleanup: closing the job queue\n");
    conc_chan_close(arg);
}

int main(void) {
    struct worker w = {conc_ctx_with_cancel(NULL), conc_chan_new(sizeof(int), 4),
                       conc_chan_new(sizeof(int), 0), 0};
    if (!w.ctx || !w.jobs || !w.results) return 1;
    conc_after_func_t *cleanup = conc_ctx_after_func(w.ctx, close_queue, w.jobs);
    if (!cleanup) return 1;

    pthread_t th;
    pthread_create(&th, NULL, serve, &w);
    for (int job = 1; job <= 5; job++) {
        int result;
        conc_chan_send(w.jobs, &job, NULL);
        conc_chan_recv(w.results, &result, NULL);
        printf("main: job %d -> %d\n", job, result);
    }

    conc_ctx_cancel(w.ctx); /* the worker wakes up and leaves; close_queue runs */
    pthread_join(th, NULL);

    int late = 6;
    int rc = conc_chan_send(w.jobs, &late, NULL);
    printf("main: a late job is refused: %s\n", conc_strerror(rc));
    bool stopped = conc_after_func_stop(cleanup); /* false: it has already run; frees it */

    conc_ctx_release(w.ctx);
    conc_chan_free(w.jobs);
    conc_chan_free(w.results);
    return w.served == 5 && rc == CONC_CLOSED && !stopped ? 0 : 1;
}
