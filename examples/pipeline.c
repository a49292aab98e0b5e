/* pipeline.c - a generator feeds numbers to a few squarer threads, which feed a sink.

   Each stage closes its output when it is done, so the next stage's receive loop ends
   by itself (Go's `for x := range in`). The squarers share one output, which is closed
   once the last of them has finished (Go's wg.Wait(); close(out)). */
#define CONC_IMPLEMENTATION
#include "conc.h"

#include <pthread.h>
#include <stdio.h>

enum { N = 1000, SQUARERS = 4 };

static conc_chan_t *nums, *squares;

static void *generate(void *arg) {
    (void)arg;
    for (long i = 1; i <= N; i++) conc_chan_send(nums, &i, NULL);
    conc_chan_close(nums);
    return NULL;
}

static void *square(void *arg) {
    (void)arg;
    long x;
    while (conc_chan_recv(nums, &x, NULL) == 0) { /* CONC_CLOSED once nums is drained */
        long y = x * x;
        conc_chan_send(squares, &y, NULL);
    }
    return NULL;
}

static void *close_when_done(void *arg) {
    pthread_t *workers = arg;
    for (int i = 0; i < SQUARERS; i++) pthread_join(workers[i], NULL);
    conc_chan_close(squares);
    return NULL;
}

int main(void) {
    nums = conc_chan_new(sizeof(long), 0);      /* unbuffered: make(chan int) */
    squares = conc_chan_new(sizeof(long), 16);  /* make(chan int, 16) */
    if (!nums || !squares) return 1;

    pthread_t gen, workers[SQUARERS], closer;
    pthread_create(&gen, NULL, generate, NULL);
    for (int i = 0; i < SQUARERS; i++) pthread_create(&workers[i], NULL, square, NULL);
    pthread_create(&closer, NULL, close_when_done, workers);

    long y, n = 0, sum = 0;
    while (conc_chan_recv(squares, &y, NULL) == 0) {
        n++;
        sum += y;
    }
    pthread_join(gen, NULL);
    pthread_join(closer, NULL);

    conc_chan_stats st;
    conc_chan_stats_get(squares, &st);
    long want = (long)N * (N + 1) * (2 * N + 1) / 6;
    printf("pipeline: %ld squares, sum %ld (expected %ld)\n", n, sum, want);
    printf("pipeline: squares buffer peaked at %zu of 16; %llu sends waited for room\n",
           st.high_water, (unsigned long long)st.blocked_sends);

    conc_chan_free(nums);
    conc_chan_free(squares);
    return n == N && sum == want ? 0 : 1;
}
