/* Deterministic replay of the interleaving behind wg_racing_adds_past_the_limit (which
   needs a lucky schedule): thread B is inside conc_wg_add(wg, CONC__WG_MAX), past its
   fetch_add and before its undo, while thread A runs a whole conc_wg_add(wg, CONC__WG_MAX).
   White box: B's fetch_add is replayed on the word exactly as conc_wg_add does it. Only
   meaningful against the fetch_add implementation (before commit "wg: adds are a CAS"). */
#define CONC_IMPLEMENTATION
#include "conc.h"
#include <stdio.h>

int main(void) {
    int fails = 0;
    conc_wg_t *wg = conc_wg_new();
    const int64_t MAX = (int64_t)CONC__WG_MAX;
    conc_wg_add(wg, MAX);                                                /* counter = MAX */
    atomic_fetch_add_explicit(&wg->state, (uint64_t)MAX << 1, CONC__RELEASE); /* B: fetch_add */
    int a = conc_wg_add(wg, MAX);                                        /* A: whole call */
    (void)conc_wg_add(wg, -MAX);                                         /* B: its undo */
    printf("A returned %d (want %d); counter %lld (want %lld)\n", a, CONC_INVALID, (long long)conc_wg_count(wg),
           (long long)MAX);
    fails += conc_wg_count(wg) != MAX;

    /* the transient also makes a small add that fits fail, and a decrement that does not fit succeed */
    conc_wg_t *w2 = conc_wg_new();
    conc_wg_add(w2, 10);
    atomic_fetch_add_explicit(&w2->state, (uint64_t)MAX << 1, CONC__RELEASE); /* B: add(MAX) in flight */
    int small = conc_wg_add(w2, 1);  /* 10 + 1 fits */
    int dec = conc_wg_add(w2, -100); /* 10 (or 11) - 100 does not */
    int undo = conc_wg_add(w2, -MAX); /* B's undo */
    printf("add(1) on 10: %d (want 0); add(-100) on 10: %d (want %d); B's undo: %d; counter %lld\n", small, dec,
           CONC_NEGATIVE_COUNT, undo, (long long)conc_wg_count(w2));
    fails += small != 0 || dec != CONC_NEGATIVE_COUNT;
    printf("%s\n", fails ? "FAIL" : "ok");
    return fails != 0;
}
