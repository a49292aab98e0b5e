/* ticker.c - do something every 20 ms until a deadline:

       ticker := time.NewTicker(20 * time.Millisecond)
       defer ticker.Stop()
       for {
           select {
           case t := <-ticker.C: ...
           case <-ctx.Done(): return
           }
       }
*/
#define CONC_IMPLEMENTATION
#include "conc.h"

#include <stdio.h>

int main(void) {
    int64_t start = conc_now();
    conc_ctx_t *ctx = conc_ctx_with_timeout(NULL, 200 * CONC_MILLISECOND);
    conc_timer_t *ticker = conc_timer_tick(20 * CONC_MILLISECOND);
    if (!ctx || !ticker) return 1;

    int ticks = 0;
    for (;;) {
        int64_t at;
        conc_case cases[2] = {CONC_RECV(conc_timer_chan(ticker), &at), CONC_DONE(ctx)};
        if (conc_select(cases, 2, NULL) == 1) break; /* the deadline */
        ticks++;
        printf("tick %d at +%lld ms\n", ticks, (long long)((at - start) / CONC_MILLISECOND));
    }
    int err = conc_ctx_err(ctx);
    printf("stopped after %d ticks, %lld ms: %s\n", ticks,
           (long long)((conc_now() - start) / CONC_MILLISECOND), conc_strerror(err));

    conc_timer_free(ticker);
    conc_ctx_release(ctx);
    return err == CONC_DEADLINE_EXCEEDED ? 0 : 1;
}
