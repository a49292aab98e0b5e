/* test_pool_fault.c - pools when allocations or thread starts fail (fault injection
   through CONC_MALLOC and pthread_create), and exactly-once accounting under everything at
   once: blocked, try and future submits (some with contexts that end), busy workers, a full
   queue, two concurrent shutdowns whose contexts end (one without memory for its take-back
   list), then a final shutdown; checked per job and against the statistics. */
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>

static _Thread_local int fail_allocs; /* this thread's allocations fail */
static _Atomic long live_allocs;
static _Atomic int fail_at = -1; /* allocations to let through before one fails; -1: none */
static void *fault_malloc(size_t n) {
    if (fail_allocs) return NULL;
    if (atomic_load(&fail_at) >= 0 && atomic_fetch_sub(&fail_at, 1) == 0) return NULL;
    void *p = malloc(n);
    if (p) atomic_fetch_add(&live_allocs, 1);
    return p;
}
static void fault_free(void *p) {
    if (p) {
        atomic_fetch_sub(&live_allocs, 1);
        free(p);
    }
}
static _Atomic int create_fail_at = -1;
static int fault_create(pthread_t *t, const pthread_attr_t *a, void *(*fn)(void *), void *arg) {
    if (atomic_load(&create_fail_at) >= 0 && atomic_fetch_sub(&create_fail_at, 1) == 0) return EAGAIN;
    return pthread_create(t, a, fn, arg);
}
#define CONC_MALLOC(n) fault_malloc(n)
#define CONC_FREE(p) fault_free(p)
#define pthread_create fault_create
#define CONC_IMPLEMENTATION
#include "conc.h"
#undef pthread_create
#include "tap.h"
#include "test_util.h"

static int job_nop(void *a, conc_ctx_t *c) {
    (void)a, (void)c;
    return 0;
}

/* conc_pool_new_at when the k-th allocation (mode 0) or thread start (mode 1) fails: NULL,
   no thread left running, nothing left allocated. */
TEST(new_fails_cleanly) {
    size_t base_threads = conc_threads_live();
    for (int mode = 0; mode < 2; mode++) {
        int nulls = 0;
        for (int k = 0; k < 16; k++) {
            long before = atomic_load(&live_allocs);
            if (mode == 0) atomic_store(&fail_at, k);
            else atomic_store(&create_fail_at, k);
            conc_pool_t *p = conc_pool_new(4, 8, NULL);
            atomic_store(&fail_at, -1);
            atomic_store(&create_fail_at, -1);
            if (p) {
                EXPECT_EQ(conc_pool_submit(p, job_nop, NULL, NULL), 0);
                conc_pool_free(p);
            } else {
                nulls++;
            }
            EXPECT_EQ(atomic_load(&live_allocs) - before, 0);
            EXPECT_EQ(conc_threads_live(), base_threads);
        }
        EXPECT(nulls >= 4); /* every step of new_at was made to fail */
    }
}

enum { NJ = 96, NS = 4 };
typedef struct round_s round_s;
typedef struct { round_s *r; int id; int hold; } jarg;
struct round_s {
    conc_pool_t *p;
    conc_chan_t *gate;
    jarg jobs[NJ];
    _Atomic int seen[NJ];
    int rc[NJ];
    int kind[NJ]; /* 0 submit, 1 submit+ctx, 2 try, 3 future */
    conc_future_t *fut[NJ];
    _Atomic int shut_returned;
    int after_shut[NJ];
    conc_ctx_t *sctx;
    uint64_t seed;
};
static int job(void *a, conc_ctx_t *ctx) {
    jarg *j = (jarg *)a;
    if (j->hold) {
        conc_case cs[2] = {CONC_RECV(j->r->gate, NULL), CONC_DONE(ctx)};
        (void)conc_select(cs, 2, NULL);
    } else {
        for (volatile int i = 0; i < 2000; i++) {
        }
    }
    atomic_fetch_add(&j->r->seen[j->id], 1);
    return j->id;
}
static void unrun_cb(conc_task_fn fn, void *a, void *ua) {
    jarg *j = (jarg *)a;
    if (fn != job || ua != j->r) { printf("FAIL unrun_cb args\n"); exit(1); }
    atomic_fetch_add(&j->r->seen[j->id], 16);
}
typedef struct { round_s *r; int from, to; uint64_t seed; } sub_arg;
#define xs rnd
static void *submitter(void *a) {
    sub_arg *s = (sub_arg *)a;
    round_s *r = s->r;
    for (int i = s->from; i < s->to; i++) {
        if (xs(&s->seed) % 4 == 0) sched_yield();
        r->after_shut[i] = atomic_load(&r->shut_returned);
        switch (r->kind[i]) {
        case 0: r->rc[i] = conc_pool_submit(r->p, job, &r->jobs[i], NULL); break;
        case 1: r->rc[i] = conc_pool_submit(r->p, job, &r->jobs[i], r->sctx); break;
        case 2: r->rc[i] = conc_pool_try_submit(r->p, job, &r->jobs[i]); break;
        default: r->rc[i] = conc_pool_submit_future(r->p, job, &r->jobs[i], &r->fut[i], NULL); break;
        }
    }
    return NULL;
}
typedef struct { round_s *r; int64_t ns; int nomem; int rc; } shut_arg;
static void *shutter(void *a) {
    shut_arg *s = (shut_arg *)a;
    conc_ctx_t *c = s->ns >= 0 ? conc_ctx_with_timeout(NULL, s->ns) : NULL;
    fail_allocs = s->nomem;
    s->rc = conc_pool_shutdown(s->r->p, unrun_cb, s->r, c);
    fail_allocs = 0;
    atomic_store(&s->r->shut_returned, 1);
    conc_ctx_release(c);
    return NULL;
}

TEST(stress_everything_at_once_accounts_every_job_once) {
    long rounds = tap_iters(300);
    static round_s R;
    for (long n = 0; n < rounds; n++) {
        round_s *r = &R;
        memset(r, 0, sizeof *r);
        r->seed = (uint64_t)n * 2654435761u + 1;
        size_t caps[] = {0, 1, 2, 5, 8};
        size_t cap = caps[n % 5], workers = 1 + (size_t)(n / 5 % 3);
        r->p = conc_pool_new(workers, cap, NULL);
        r->gate = conc_chan_new(0, 0);
        r->sctx = conc_ctx_with_timeout(NULL, (int64_t)(xs(&r->seed) % 400) * CONC_MICROSECOND);
        for (int i = 0; i < NJ; i++) {
            r->jobs[i] = (jarg){r, i, (int)(xs(&r->seed) % 6 == 0)};
            r->kind[i] = (int)(xs(&r->seed) % 4);
            atomic_init(&r->seen[i], 0);
        }
        pthread_t th[NS], sh[2];
        sub_arg sa[NS];
        for (int k = 0; k < NS; k++) {
            sa[k] = (sub_arg){r, k * NJ / NS, (k + 1) * NJ / NS, r->seed + (uint64_t)k};
            spawn(&th[k], submitter, &sa[k]);
        }
        for (int k = 0; k < (int)(xs(&r->seed) % 40); k++) sched_yield();
        shut_arg ss[2] = {{r, (int64_t)(xs(&r->seed) % 300) * CONC_MICROSECOND, (int)(n % 2), 99},
                          {r, n % 3 == 0 ? -1 : (int64_t)(xs(&r->seed) % 300) * CONC_MICROSECOND, 0, 99}};
        for (int k = 0; k < 2; k++) spawn(&sh[k], shutter, &ss[k]);
        for (int k = 0; k < NS; k++) pthread_join(th[k], NULL);
        for (int k = 0; k < 2; k++) pthread_join(sh[k], NULL);
        conc_chan_close(r->gate);
        int frc = conc_pool_shutdown(r->p, unrun_cb, r, NULL);
        EXPECT_EQ(frc, 0);
        conc_pool_stats s;
        conc_pool_stats_get(r->p, &s);
        uint64_t acc = 0, rej = 0, canc = 0, ran = 0, unrun = 0;
        for (int i = 0; i < NJ; i++) {
            int sv = atomic_load(&r->seen[i]);
            if (r->rc[i] == 0) {
                acc++;
                if (sv == 1) ran++;
                else if (sv == 16) unrun++;
                else { printf("FAIL round %ld job %d kind %d accepted, seen %d\n", n, i, r->kind[i], sv); tap__cur_failed = 1; }
                if (r->after_shut[i]) { printf("FAIL round %ld job %d accepted after a shutdown returned\n", n, i); tap__cur_failed = 1; }
                if (r->kind[i] == 3) {
                    int res = -1, frc2 = conc_future_try_wait(r->fut[i], &res);
                    if (!((sv == 1 && frc2 == 0 && res == i) || (sv == 16 && frc2 == CONC_SHUTDOWN))) {
                        printf("FAIL round %ld job %d future %d/%d seen %d\n", n, i, frc2, res, sv); tap__cur_failed = 1;
                    }
                    conc_future_free(r->fut[i]);
                }
            } else {
                if (sv != 0) { printf("FAIL round %ld job %d refused (%d) but seen %d\n", n, i, r->rc[i], sv); tap__cur_failed = 1; }
                if (r->rc[i] == CONC_SHUTDOWN || r->rc[i] == CONC_WOULD_BLOCK) rej++;
                else if (r->rc[i] == CONC_DEADLINE_EXCEEDED && r->kind[i] == 1) canc++;
                else { printf("FAIL round %ld job %d kind %d rc %d\n", n, i, r->kind[i], r->rc[i]); tap__cur_failed = 1; }
            }
        }
        if (s.submitted != acc || s.completed != ran || s.unrun != unrun || s.rejected != rej || s.canceled != canc ||
            s.submitted != s.completed + s.unrun || s.queued || s.running) {
            printf("FAIL round %ld cap %zu w %zu stats sub %llu/%llu comp %llu/%llu unrun %llu/%llu rej %llu/%llu canc "
                   "%llu/%llu q %zu run %zu (shutdowns %d %d)\n",
                   n, cap, workers, (unsigned long long)s.submitted, (unsigned long long)acc,
                   (unsigned long long)s.completed, (unsigned long long)ran, (unsigned long long)s.unrun,
                   (unsigned long long)unrun, (unsigned long long)s.rejected, (unsigned long long)rej,
                   (unsigned long long)s.canceled, (unsigned long long)canc, s.queued, s.running, ss[0].rc, ss[1].rc);
            tap__cur_failed = 1;
        }
        conc_pool_free(r->p);
        conc_chan_free(r->gate);
        conc_ctx_release(r->sctx);
        if (tap__cur_failed) break;
    }
}

int main(void) {
    RUN(new_fails_cleanly);
    RUN(stress_everything_at_once_accounts_every_job_once);
    return tap_done();
}
