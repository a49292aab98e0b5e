/* race_point.h - makes a test a race test. Put in front of a test's source with
   `-include race_point.h` (tests/meson.build builds test_errgroup.c, test_pool.c and
   stress_ctx.c a second time so, as race_test_errgroup, race_test_pool and
   race_stress_ctx): conc.h's CONC__RACE_POINT()s sit inside narrow race windows of the
   worker engine (between the two halves of a Dekker pair, between a look at the flags and
   a claim, between the two scans of the running count) and of the context cancel walk
   (between its levels), and here each of them yields at random. The other side of each race then runs
   inside the window often, not once in millions of tries, and the tests' own checks
   (every job run exactly once, no go left blocked beside a free worker, a wait that never
   returns while a task runs) judge the outcome. */
#ifndef RACE_POINT_H
#define RACE_POINT_H

#include <sched.h>
#include <stdint.h>

static _Thread_local uint64_t race_point_rng;

static inline void race_point(void) {
    uint64_t x = race_point_rng;
    if (x == 0) x = (uint64_t)(uintptr_t)&race_point_rng | 1; /* differs per thread */
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    race_point_rng = x;
    switch (x % 8) {
    case 0:
    case 1: sched_yield(); break; /* let the other side run: more threads than cores */
    case 2:
    case 3:
        for (volatile int i = 0; i < 64; i++) { /* a short delay without leaving the CPU */
        }
        break;
    default: break;
    }
}

#define CONC__RACE_POINT() race_point()

#endif
