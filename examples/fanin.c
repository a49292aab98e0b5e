/* fanin.c - merge two producers into one loop with select, for a limited time.

   One timeout context bounds the whole thing: the consumer's select gives up when it
   expires, and the producers, which send with the same context, stop too. A producer
   that finishes early closes its channel; the consumer then sets that channel to NULL,
   which select never picks again (Go's nil-channel idiom). */
#define CONC_IMPLEMENTATION
#include "conc.h"

#include <pthread.h>
#include <stdio.h>

struct producer {
    const char *name;
    int64_t every; /* ns between messages */
    int count;     /* messages to send; 0 = until cancelled */
    conc_chan_t *out;
    conc_ctx_t *ctx;
};

static void *produce(void *arg) {
    struct producer *p = arg;
    for (int i = 0; p->count == 0 || i < p->count; i++) {
        if (conc_sleep(p->every, p->ctx) != 0) break;        /* cancelled or timed out */
        if (conc_chan_send(p->out, &i, p->ctx) != 0) break;  /* ditto, while blocked */
    }
    conc_chan_close(p->out);
    return NULL;
}

int main(void) {
    conc_ctx_t *ctx = conc_ctx_with_timeout(NULL, 150 * CONC_MILLISECOND);
    struct producer ps[2] = {
        {"ticker", 10 * CONC_MILLISECOND, 0, conc_chan_new(sizeof(int), 0), ctx},
        {"batch", 5 * CONC_MILLISECOND, 3, conc_chan_new(sizeof(int), 0), ctx},
    };
    if (!ctx || !ps[0].out || !ps[1].out) return 1;
    pthread_t th[2];
    for (int i = 0; i < 2; i++) pthread_create(&th[i], NULL, produce, &ps[i]);

    conc_chan_t *in[2] = {ps[0].out, ps[1].out};
    int got[2] = {0, 0};
    while (in[0] || in[1]) {
        int v;
        bool ok;
        conc_case cases[2] = {CONC_RECV_OK(in[0], &v, &ok), CONC_RECV_OK(in[1], &v, &ok)};
        int i = conc_select(cases, 2, ctx);
        if (i < 0) break; /* the timeout: stop listening */
        if (!ok) { /* closed: never select it again */
            printf("fanin: %s is done\n", ps[i].name);
            in[i] = NULL;
            continue;
        }
        got[i]++;
        printf("fanin: %s says %d\n", ps[i].name, v);
    }
    /* The ticker only stops at the deadline, so that is always how this ends. */
    int err = conc_ctx_err(ctx);
    printf("fanin: %s; %d from ticker, %d from batch\n", conc_strerror(err), got[0], got[1]);

    conc_ctx_release(ctx); /* cancels it, if the producers were somehow still going */
    for (int i = 0; i < 2; i++) pthread_join(th[i], NULL);
    conc_chan_free(ps[0].out);
    conc_chan_free(ps[1].out);
    return err == CONC_DEADLINE_EXCEEDED ? 0 : 1;
}
