/* bench_ctx.c - context benchmarks for conc.h.

   ctx_cancel_100k: N children (default 100000) of one conc_ctx_with_cancel parent; one op
   is one child's share of cancel(parent) + observing every child done
   (conc_ctx_err(kid) != 0; a child that is not yet done is waited for with conc_ctx_wait,
   as Go's `<-kid.Done()` would, and counted in waited=). The extras are the Go peer's
   (create_ns_per_child, cancel_ms, observe_ms, cancel_plus_observe_ms) and release_ms, the
   time to release every child and the parent after the timed part.

   Run `bench_ctx --list`, `bench_ctx --case NAME [--n N]`, or no argument (see bench.h). */
#define CONC_IMPLEMENTATION
#include "conc.h"

#include "bench.h"

static int case_ctx_cancel(int64_t n, bench_out *out) {
    conc_ctx_t *parent = conc_ctx_with_cancel(NULL);
    conc_ctx_t **kids = malloc((size_t)n * sizeof *kids);
    if (!parent || !kids) return bench_fail("ctx_cancel: out of memory before the start");

    int64_t t0 = bench_now();
    for (int64_t i = 0; i < n; i++) {
        kids[i] = conc_ctx_with_cancel(parent);
        if (!kids[i]) return bench_fail("ctx_cancel: conc_ctx_with_cancel returned NULL");
    }
    int64_t t1 = bench_now();
    conc_ctx_cancel(parent);
    int64_t t2 = bench_now();
    int64_t waited = 0, wrong = 0;
    for (int64_t i = 0; i < n; i++) {
        int err = conc_ctx_err(kids[i]);
        if (err == 0) {
            waited++;
            err = conc_ctx_wait(kids[i]);
        }
        if (err != CONC_CANCELED) wrong++;
    }
    int64_t t3 = bench_now();

    for (int64_t i = 0; i < n; i++) conc_ctx_release(kids[i]);
    conc_ctx_release(parent);
    int64_t t4 = bench_now();
    free(kids);

    if (wrong)
        return bench_fail("ctx_cancel: %" PRId64 " of %" PRId64
                          " children did not end with CONC_CANCELED",
                          wrong, n);
    out->elapsed_ns = t3 - t1;
    out->ops = n;
    bench_extra(out, "create_ns_per_child=%.1f", (double)(t1 - t0) / (double)n);
    bench_extra(out, "cancel_ms=%.3f", (double)(t2 - t1) / 1e6);
    bench_extra(out, "observe_ms=%.3f", (double)(t3 - t2) / 1e6);
    bench_extra(out, "cancel_plus_observe_ms=%.3f", (double)(t3 - t1) / 1e6);
    bench_extra(out, "release_ms=%.3f", (double)(t4 - t3) / 1e6);
    bench_extra(out, "waited=%" PRId64, waited);
    return 0;
}

static const bench_case cases[] = {
    {"ctx_cancel_100k", 100000, case_ctx_cancel, 0},
};

int main(int argc, char **argv) {
    return bench_main(argc, argv, cases, sizeof cases / sizeof cases[0]);
}
