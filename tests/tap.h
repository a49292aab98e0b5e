/* tap.h - the tests' tiny TAP harness.

   TEST(name) { ... }            defines a test; list it in main with RUN(name).
   EXPECT(cond)                  records a failure and goes on.
   ASSERT(cond)                  records a failure and leaves the test.
   EXPECT_EQ(a, b) / ASSERT_EQ   integer comparison that prints both sides.
   return tap_done();            prints the plan, exits 0 only if every test passed.

   Stress loops scale with tap_scale(): 1 normally, smaller under Valgrind (the build
   defines TAP_VALGRIND_SCALE for those setups) or with CONC_TEST_SCALE=0.1 in the
   environment. */
#ifndef TAP_H
#define TAP_H

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int tap__count, tap__failed_tests, tap__cur_failed;

#define TAP__FAIL(...)                                            \
    do {                                                          \
        tap__cur_failed = 1;                                      \
        printf("#   %s:%d: ", __FILE__, __LINE__);                \
        printf(__VA_ARGS__);                                      \
        printf("\n");                                             \
        fflush(stdout);                                           \
    } while (0)

#define EXPECT(c)                                                 \
    do {                                                          \
        if (!(c)) TAP__FAIL("expected: %s", #c);                  \
    } while (0)
#define ASSERT(c)                                                 \
    do {                                                          \
        if (!(c)) {                                               \
            TAP__FAIL("assertion failed: %s", #c);                \
            return;                                               \
        }                                                         \
    } while (0)
#define EXPECT_EQ(a, b)                                                           \
    do {                                                                          \
        long long tap__a = (long long)(a), tap__b = (long long)(b);               \
        if (tap__a != tap__b) TAP__FAIL("%s == %s: %lld != %lld", #a, #b, tap__a, tap__b); \
    } while (0)
#define ASSERT_EQ(a, b)                                                           \
    do {                                                                          \
        long long tap__a = (long long)(a), tap__b = (long long)(b);               \
        if (tap__a != tap__b) {                                                   \
            TAP__FAIL("%s == %s: %lld != %lld", #a, #b, tap__a, tap__b);          \
            return;                                                               \
        }                                                                         \
    } while (0)

#define TEST(name) static void name(void)
#define RUN(name)                                                                 \
    do {                                                                          \
        tap__cur_failed = 0;                                                      \
        name();                                                                   \
        tap__count++;                                                             \
        if (tap__cur_failed) tap__failed_tests++;                                 \
        printf("%s %d - %s\n", tap__cur_failed ? "not ok" : "ok", tap__count, #name); \
        fflush(stdout);                                                           \
    } while (0)

static inline int tap_done(void) {
    printf("1..%d\n", tap__count);
    return tap__failed_tests ? 1 : 0;
}

/* Multiplier for stress-loop sizes. */
static inline double tap_scale(void) {
    const char *s = getenv("CONC_TEST_SCALE");
    if (s && *s) return atof(s);
    return 1.0;
}
static inline long tap_iters(long n) {
    long k = (long)((double)n * tap_scale());
    return k < 1 ? 1 : k;
}

#endif
