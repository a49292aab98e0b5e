// test_compile.cpp - conc.h's public API from C++17 (STYLE 20), linked with the C
// implementation built by tests/meson.build: extern "C" linkage, the case macros as
// aggregate initialisers, the inline constructors, the status enum.
#include "conc.h"
#include "conc.h"  // a second include is harmless

#include "tap.h"

TEST(status_names) {
    EXPECT(conc_strerror(CONC_CLOSED) != nullptr);
    EXPECT(strcmp(conc_strerror(CONC_OK), conc_strerror(CONC_CLOSED)) != 0);
    conc_status s = CONC_DEADLINE_EXCEEDED;
    EXPECT_EQ(s, -3);
}

TEST(select_from_cpp) {
    conc_chan_t *ch = conc_chan_new(sizeof(long), 2);
    ASSERT(ch != nullptr);
    long in = 5, out = 0;
    bool ok = false;
    conc_case cases[] = {CONC_SEND(ch, &in), CONC_RECV(nullptr, &out), CONC_DONE(nullptr)};
    EXPECT_EQ(conc_try_select(cases, 3), 0);
    conc_case recv[] = {conc_case_recv(ch, &out, &ok), conc_case_done(nullptr)};
    EXPECT_EQ(conc_select(recv, 2, nullptr), 0);
    EXPECT(ok);
    EXPECT_EQ(out, 5);
    conc_case send = conc_case_send(ch, &in);
    EXPECT_EQ(send.kind, CONC_CASE_SEND);
    EXPECT_EQ(conc_chan_free(ch), 0);
}

TEST(context_from_cpp) {
    conc_ctx_t *ctx = conc_ctx_with_timeout(conc_ctx_background(), CONC_SECOND);
    ASSERT(ctx != nullptr);
    int64_t deadline = 0;
    EXPECT(conc_ctx_deadline(ctx, &deadline));
    EXPECT(deadline > conc_now());
    conc_ctx_cancel_cause(ctx, 17);
    EXPECT_EQ(conc_ctx_err(ctx), CONC_CANCELED);
    EXPECT_EQ(conc_ctx_cause(ctx), 17);
    conc_ctx_release(ctx);
}

int main() {
    RUN(status_names);
    RUN(select_from_cpp);
    RUN(context_from_cpp);
    return tap_done();
}
