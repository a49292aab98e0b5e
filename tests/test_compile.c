/* test_compile.c - conc.h compiles, links and runs in each mode a user may pick (STYLE 20).

   tests/meson.build builds this file several times:
     -DTEST_COMPILE_IMPL   this file also holds the implementation (else it links with one)
     -DTEST_COMPILE_MAIN   this file holds main() and the checks
   as strict C99 (API only), C11 (API and implementation) and C11 with CONC_STATIC, all at
   -Wall -Wextra -Wpedantic -Werror. Most of the work is done by the compiler: every public
   function is named once below, every case macro and inline constructor is expanded. */

/* The public zone needs only <stddef.h>, <stdint.h> and <stdbool.h> (STYLE 8). */
#include "conc.h"
#include "conc.h" /* a second include is harmless */
#ifdef PTHREAD_MUTEX_INITIALIZER
#error "conc.h's public API pulls in <pthread.h>"
#endif

#ifdef TEST_COMPILE_IMPL
#define CONC_IMPLEMENTATION
#include "conc.h"
#include "conc.h" /* so is a second include with the implementation */
#endif

#ifdef TEST_COMPILE_MAIN
#include "tap.h"

/* Every public function, so that a missing definition fails to link and, with CONC_STATIC,
   none is unused. */
typedef void (*any_fn)(void);
static const any_fn all_functions[] = {
    (any_fn)conc_strerror,
    (any_fn)conc_now,
    (any_fn)conc_ctx_background,
    (any_fn)conc_ctx_with_cancel,
    (any_fn)conc_ctx_with_deadline,
    (any_fn)conc_ctx_with_timeout,
    (any_fn)conc_ctx_with_value,
    (any_fn)conc_ctx_cancel,
    (any_fn)conc_ctx_cancel_cause,
    (any_fn)conc_ctx_release,
    (any_fn)conc_ctx_err,
    (any_fn)conc_ctx_cause,
    (any_fn)conc_ctx_deadline,
    (any_fn)conc_ctx_value,
    (any_fn)conc_ctx_wait,
    (any_fn)conc_ctx_after_func,
    (any_fn)conc_after_func_stop,
    (any_fn)conc_chan_new,
    (any_fn)conc_chan_free,
    (any_fn)conc_chan_send,
    (any_fn)conc_chan_recv,
    (any_fn)conc_chan_try_send,
    (any_fn)conc_chan_try_recv,
    (any_fn)conc_chan_close,
    (any_fn)conc_chan_len,
    (any_fn)conc_chan_cap,
    (any_fn)conc_chan_elem_size,
    (any_fn)conc_chan_stats_get,
    (any_fn)conc_select,
    (any_fn)conc_try_select,
    (any_fn)conc_timer_after,
    (any_fn)conc_timer_tick,
    (any_fn)conc_timer_chan,
    (any_fn)conc_timer_stop,
    (any_fn)conc_timer_reset,
    (any_fn)conc_timer_free,
    (any_fn)conc_sleep,
};

TEST(every_function_links) {
    size_t i;
    for (i = 0; i < sizeof all_functions / sizeof all_functions[0]; i++)
        EXPECT(all_functions[i] != NULL);
}

TEST(status_codes_have_names) {
    const char *names[9];
    int codes[9] = {CONC_OK,          CONC_CLOSED, CONC_CANCELED, CONC_DEADLINE_EXCEEDED,
                    CONC_WOULD_BLOCK, CONC_NOMEM,  CONC_INVALID,  CONC_BUSY,
                    CONC_SYSTEM};
    int i, j;
    EXPECT_EQ(CONC_OK, 0);
    for (i = 0; i < 9; i++) {
        EXPECT_EQ(codes[i], -i);
        names[i] = conc_strerror(codes[i]);
        ASSERT(names[i] != NULL && names[i][0] != '\0');
        for (j = 0; j < i; j++) EXPECT(strcmp(names[i], names[j]) != 0);
    }
    EXPECT(conc_strerror(42) != NULL);  /* a user's code */
    EXPECT(conc_strerror(-1000) != NULL);
}

TEST(time_units) {
    EXPECT_EQ(CONC_SECOND, 1000 * CONC_MILLISECOND);
    EXPECT_EQ(CONC_MILLISECOND, 1000 * CONC_MICROSECOND);
    EXPECT_EQ(CONC_MICROSECOND, 1000 * CONC_NANOSECOND);
    EXPECT(conc_now() > 0);
}

/* The case macros work as initialisers, the constructors as expressions. */
TEST(channel_and_select_round_trip) {
    conc_chan_t *ch = conc_chan_new(sizeof(int), 1);
    int in = 7, out = 0;
    bool ok = false;
    conc_chan_stats st;
    ASSERT(ch != NULL);
    {
        conc_case cases[4] = {CONC_SEND(ch, &in), CONC_RECV(NULL, &out),
                              CONC_RECV_OK(NULL, &out, &ok), CONC_DONE(NULL)};
        EXPECT_EQ(conc_try_select(cases, 4), 0);
        EXPECT_EQ(cases[0].status, CONC_OK);
    }
    EXPECT_EQ(conc_chan_len(ch), 1);
    EXPECT_EQ(conc_chan_cap(ch), 1);
    EXPECT_EQ(conc_chan_elem_size(ch), sizeof(int));
    {
        conc_case cases[3];
        cases[0] = conc_case_recv(ch, &out, &ok);
        cases[1] = conc_case_send(NULL, &in);
        cases[2] = conc_case_done(NULL);
        EXPECT_EQ(conc_select(cases, 3, NULL), 0);
        EXPECT(ok);
        EXPECT_EQ(out, 7);
    }
    EXPECT_EQ(conc_chan_try_recv(ch, &out), CONC_WOULD_BLOCK);
    conc_chan_stats_get(ch, &st);
    EXPECT_EQ(st.sends, 1);
    EXPECT_EQ(st.recvs, 1);
    EXPECT_EQ(conc_chan_free(ch), 0);
}

TEST(context_round_trip) {
    conc_ctx_t *ctx = conc_ctx_with_cancel(NULL);
    ASSERT(ctx != NULL);
    EXPECT_EQ(conc_ctx_err(ctx), 0);
    conc_ctx_cancel(ctx);
    EXPECT_EQ(conc_ctx_wait(ctx), CONC_CANCELED);
    conc_ctx_release(ctx);
}

int main(void) {
    RUN(every_function_links);
    RUN(status_codes_have_names);
    RUN(time_units);
    RUN(channel_and_select_round_trip);
    RUN(context_round_trip);
    return tap_done();
}
#endif /* TEST_COMPILE_MAIN */
