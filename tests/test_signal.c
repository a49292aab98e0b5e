/* test_signal.c - signal contexts: real signals sent to the test process (the kill(1)
   command, kill() from another thread, sigqueue()), the cause, a signal outside the set
   and raise() not taken, the mask and the actions put back by stop (also SIG_IGN), the old
   action back after stop, a blocked receive woken by a signal, disjoint and overlapping
   contexts, stop from an after-func, a parent that ends, notify/stop cycles (thread
   joined: memcheck sees no leak), and threads racing notify for the same signals.

   Go's signal.NotifyContext is the reference. Threads are never ordered with sleeps: a
   signal sent to the process while every thread blocks it is pending at once (sigpending
   shows it), and a test that needs a thread to be blocked polls the context's waiter list
   (white box) until it is. */
#define CONC_IMPLEMENTATION
#include "conc.h"
#include "tap.h"

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <signal.h>
#include <spawn.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

extern char **environ;

static pthread_t spawn(void *(*fn)(void *), void *arg) {
    pthread_t t;
    if (pthread_create(&t, NULL, fn, arg) != 0) {
        printf("Bail out! pthread_create failed\n");
        exit(1);
    }
    return t;
}

static sigset_t cur_mask(void) {
    sigset_t m;
    pthread_sigmask(SIG_BLOCK, NULL, &m);
    return m;
}

static bool blocked(int signo) {
    sigset_t m = cur_mask();
    return sigismember(&m, signo) == 1;
}

static bool same_mask(const sigset_t *a, const sigset_t *b) {
    for (int s = 1; s < 65; s++) {
        int x = sigismember(a, s), y = sigismember(b, s);
        if (x >= 0 && y >= 0 && x != y) return false;
    }
    return true;
}

static void (*handler_of(int signo))(int) {
    struct sigaction sa;
    sigaction(signo, NULL, &sa);
    return sa.sa_handler;
}

static bool pending(int signo) {
    sigset_t p;
    sigpending(&p);
    return sigismember(&p, signo) == 1;
}

/* Takes a pending signo in this thread (it must be blocked here). */
static void drain(int signo) {
    sigset_t s;
    int got = 0;
    sigemptyset(&s);
    sigaddset(&s, signo);
    while (sigwait(&s, &got) != 0) {}
}

static void set_action(int signo, void (*fn)(int)) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = fn;
    sigemptyset(&sa.sa_mask);
    sigaction(signo, &sa, NULL);
}

static void unblock(int signo) {
    sigset_t s;
    sigemptyset(&s);
    sigaddset(&s, signo);
    pthread_sigmask(SIG_UNBLOCK, &s, NULL);
}

/* ---- arguments ---- */

TEST(signal_invalid_arguments) {
    conc_signal_t *s = (conc_signal_t *)&s;
    sigset_t before = cur_mask();
    const int term[] = {SIGTERM};
    EXPECT_EQ(conc_signal_notify(NULL, term, 1, NULL), CONC_INVALID);
    EXPECT_EQ(conc_signal_notify(NULL, NULL, 1, &s), CONC_INVALID);
    EXPECT(s == NULL);
    EXPECT_EQ(conc_signal_notify(NULL, term, 0, &s), CONC_INVALID);
    const int bad[][2] = {{SIGTERM, SIGKILL}, {SIGSTOP, SIGTERM}, {SIGTERM, 0}, {-1, SIGTERM}, {SIGTERM, 100000},
#ifdef __GLIBC__
                          {SIGTERM, 32}, /* glibc keeps 32 and 33 for itself */
#endif
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        s = (conc_signal_t *)&s;
        EXPECT_EQ(conc_signal_notify(NULL, bad[i], 2, &s), CONC_INVALID);
        EXPECT(s == NULL);
    }
    sigset_t after = cur_mask();
    EXPECT(same_mask(&before, &after)); /* nothing blocked on the way */
    EXPECT(conc_signal_ctx(NULL) == NULL);
    conc_signal_stop(NULL);
}

/* ---- the real thing: kill(1) on the test process ---- */

TEST(signal_kill_command_fires) {
    const int sigs[] = {SIGINT, SIGTERM, SIGTERM}; /* a repeat is allowed */
    conc_signal_t *s;
    sigset_t before = cur_mask();
    ASSERT_EQ(conc_signal_notify(NULL, sigs, 3, &s), 0);
    conc_ctx_t *ctx = conc_signal_ctx(s);
    EXPECT_EQ(conc_ctx_err(ctx), 0);
    EXPECT(blocked(SIGINT) && blocked(SIGTERM));

    char pid[32];
    snprintf(pid, sizeof pid, "%ld", (long)getpid());
    char *argv[] = {(char *)"kill", (char *)"-TERM", pid, NULL};
    pid_t child;
    int st = 0;
    ASSERT_EQ(posix_spawnp(&child, "kill", NULL, NULL, argv, environ), 0);
    ASSERT_EQ(waitpid(child, &st, 0), child);
    EXPECT(WIFEXITED(st) && WEXITSTATUS(st) == 0);

    EXPECT_EQ(conc_ctx_wait(ctx), CONC_CANCELED);
    EXPECT_EQ(conc_ctx_cause(ctx), SIGTERM); /* the signal number, a positive "user code" */
    conc_signal_stop(s);
    sigset_t after = cur_mask();
    EXPECT(same_mask(&before, &after));
    EXPECT(handler_of(SIGTERM) == SIG_DFL);
}

/* ---- kill() from another thread, sigqueue() ---- */

static void *kill_self(void *arg) {
    kill(getpid(), *(int *)arg);
    return NULL;
}

TEST(signal_kill_from_thread_and_sigqueue) {
    const int sigs[] = {SIGUSR1, SIGUSR2};
    conc_signal_t *s;
    ASSERT_EQ(conc_signal_notify(NULL, sigs, 2, &s), 0);
    int which = SIGUSR2;
    pthread_join(spawn(kill_self, &which), NULL); /* the thread inherits the blocked mask */
    EXPECT_EQ(conc_ctx_wait(conc_signal_ctx(s)), CONC_CANCELED);
    EXPECT_EQ(conc_ctx_cause(conc_signal_ctx(s)), SIGUSR2);
    conc_signal_stop(s);

    ASSERT_EQ(conc_signal_notify(NULL, sigs, 2, &s), 0);
    union sigval v;
    v.sival_int = 7;
    ASSERT_EQ(sigqueue(getpid(), SIGUSR1, v), 0);
    EXPECT_EQ(conc_ctx_wait(conc_signal_ctx(s)), CONC_CANCELED);
    EXPECT_EQ(conc_ctx_cause(conc_signal_ctx(s)), SIGUSR1);
    conc_signal_stop(s);
    EXPECT(!blocked(SIGUSR1) && !blocked(SIGUSR2));
}

/* ---- what is not taken ---- */

TEST(signal_outside_set_and_raise_not_taken) {
    const int sigs[] = {SIGUSR1};
    conc_signal_t *s;
    sigset_t u2;
    sigemptyset(&u2);
    sigaddset(&u2, SIGUSR2);
    pthread_sigmask(SIG_BLOCK, &u2, NULL);
    ASSERT_EQ(conc_signal_notify(NULL, sigs, 1, &s), 0);
    conc_ctx_t *ctx = conc_signal_ctx(s);

    kill(getpid(), SIGUSR2);   /* not in the set: pending on the process, for nobody */
    raise(SIGUSR1);            /* in the set, but aimed at this thread, which blocks it */
    EXPECT(pending(SIGUSR2));
    EXPECT(pending(SIGUSR1));
    EXPECT_EQ(conc_ctx_err(ctx), 0);
    drain(SIGUSR1);            /* the raise() one: it was ours, not the signal thread's */
    kill(getpid(), SIGUSR1);   /* to the process: taken */
    EXPECT_EQ(conc_ctx_wait(ctx), CONC_CANCELED);
    EXPECT_EQ(conc_ctx_cause(ctx), SIGUSR1);
    EXPECT(pending(SIGUSR2));  /* the signal thread went past it */
    drain(SIGUSR2);
    conc_signal_stop(s);
    EXPECT(!blocked(SIGUSR1));
    pthread_sigmask(SIG_UNBLOCK, &u2, NULL);
}

/* ---- stop puts back the mask and the actions ---- */

TEST(signal_stop_before_any_signal_restores) {
    set_action(SIGHUP, SIG_IGN);
    set_action(SIGTERM, SIG_DFL);
    unblock(SIGHUP);
    unblock(SIGTERM);
    sigset_t u1;
    sigemptyset(&u1);
    sigaddset(&u1, SIGUSR1);
    pthread_sigmask(SIG_BLOCK, &u1, NULL); /* blocked before: stays blocked */
    sigset_t before = cur_mask();

    const int sigs[] = {SIGHUP, SIGTERM, SIGUSR1};
    conc_signal_t *s;
    ASSERT_EQ(conc_signal_notify(NULL, sigs, 3, &s), 0);
    EXPECT(blocked(SIGHUP) && blocked(SIGTERM) && blocked(SIGUSR1));
    EXPECT(handler_of(SIGHUP) != SIG_IGN && handler_of(SIGHUP) != SIG_DFL); /* un-ignored */
    EXPECT(handler_of(SIGTERM) == SIG_DFL);                                /* untouched */
    conc_ctx_t *child = conc_ctx_with_cancel(conc_signal_ctx(s));
    ASSERT(child != NULL);
    conc_signal_stop(s);
    EXPECT_EQ(conc_ctx_err(child), CONC_CANCELED); /* stop ended it, as Go's stop does */
    EXPECT_EQ(conc_ctx_cause(child), CONC_CANCELED);
    conc_ctx_release(child);
    sigset_t after = cur_mask();
    EXPECT(same_mask(&before, &after));
    EXPECT(blocked(SIGUSR1));
    EXPECT(handler_of(SIGHUP) == SIG_IGN);
    EXPECT(handler_of(SIGTERM) == SIG_DFL);
    pthread_sigmask(SIG_UNBLOCK, &u1, NULL);
}

TEST(signal_default_ignored_signal_is_taken) {
    set_action(SIGCHLD, SIG_DFL); /* ignored by default */
    const int sigs[] = {SIGCHLD};
    conc_signal_t *s;
    ASSERT_EQ(conc_signal_notify(NULL, sigs, 1, &s), 0);
    EXPECT(handler_of(SIGCHLD) != SIG_DFL);
    kill(getpid(), SIGCHLD);
    EXPECT_EQ(conc_ctx_wait(conc_signal_ctx(s)), CONC_CANCELED);
    EXPECT_EQ(conc_ctx_cause(conc_signal_ctx(s)), SIGCHLD);
    conc_signal_stop(s);
    EXPECT(handler_of(SIGCHLD) == SIG_DFL);
}

TEST(signal_ignored_signal_is_taken) {
    set_action(SIGHUP, SIG_IGN); /* as under nohup */
    const int sigs[] = {SIGHUP};
    conc_signal_t *s;
    ASSERT_EQ(conc_signal_notify(NULL, sigs, 1, &s), 0);
    kill(getpid(), SIGHUP);
    EXPECT_EQ(conc_ctx_wait(conc_signal_ctx(s)), CONC_CANCELED);
    EXPECT_EQ(conc_ctx_cause(conc_signal_ctx(s)), SIGHUP);
    conc_signal_stop(s);
    EXPECT(handler_of(SIGHUP) == SIG_IGN);
    set_action(SIGHUP, SIG_DFL);
}

static volatile sig_atomic_t usr1_handled;
static void on_usr1(int signo) {
    (void)signo;
    usr1_handled++;
}

TEST(signal_old_action_back_after_stop) {
    set_action(SIGUSR1, on_usr1);
    usr1_handled = 0;
    const int sigs[] = {SIGUSR1};
    conc_signal_t *s;
    ASSERT_EQ(conc_signal_notify(NULL, sigs, 1, &s), 0);
    kill(getpid(), SIGUSR1);
    EXPECT_EQ(conc_ctx_wait(conc_signal_ctx(s)), CONC_CANCELED);
    EXPECT_EQ(usr1_handled, 0); /* the handler never ran: the thread took it */
    conc_signal_stop(s);
    ASSERT(!blocked(SIGUSR1));
    EXPECT(handler_of(SIGUSR1) == on_usr1);
    /* now the old action again: block, send, and let sigsuspend deliver it here */
    sigset_t u1, open;
    sigemptyset(&u1);
    sigaddset(&u1, SIGUSR1);
    pthread_sigmask(SIG_BLOCK, &u1, &open);
    kill(getpid(), SIGUSR1);
    sigsuspend(&open);
    pthread_sigmask(SIG_SETMASK, &open, NULL);
    EXPECT_EQ(usr1_handled, 1);
    set_action(SIGUSR1, SIG_DFL);
}

/* ---- a blocked call woken by a signal ---- */

typedef struct {
    conc_chan_t *ch;
    conc_ctx_t *ctx;
    int rc;
} recv_arg;

static void *recv_on(void *p) {
    recv_arg *a = (recv_arg *)p;
    int v;
    a->rc = conc_chan_recv(a->ch, &v, a->ctx);
    return NULL;
}

static bool ctx_has_waiters(conc_ctx_t *c) {
    bool any;
    pthread_mutex_lock(&c->mu);
    any = c->waiters.head != NULL;
    pthread_mutex_unlock(&c->mu);
    return any;
}

TEST(signal_wakes_blocked_recv) {
    const int sigs[] = {SIGTERM};
    conc_signal_t *s;
    ASSERT_EQ(conc_signal_notify(NULL, sigs, 1, &s), 0);
    recv_arg a = {conc_chan_new(sizeof(int), 0), conc_signal_ctx(s), 99};
    ASSERT(a.ch != NULL);
    pthread_t t = spawn(recv_on, &a);
    while (!ctx_has_waiters(a.ctx)) sched_yield();
    kill(getpid(), SIGTERM);
    pthread_join(t, NULL);
    EXPECT_EQ(a.rc, CONC_CANCELED);
    EXPECT_EQ(conc_ctx_cause(a.ctx), SIGTERM);
    EXPECT_EQ(conc_chan_free(a.ch), 0);
    conc_signal_stop(s);
}

/* ---- several at once ---- */

TEST(signal_two_contexts) {
    const int a_sigs[] = {SIGUSR1}, b_sigs[] = {SIGUSR2}, c_sigs[] = {SIGHUP, SIGUSR1};
    conc_signal_t *a, *b, *c = (conc_signal_t *)&c;
    ASSERT_EQ(conc_signal_notify(NULL, a_sigs, 1, &a), 0);
    ASSERT_EQ(conc_signal_notify(NULL, b_sigs, 1, &b), 0);
    bool hup_blocked = blocked(SIGHUP);
    EXPECT_EQ(conc_signal_notify(NULL, c_sigs, 2, &c), CONC_BUSY); /* SIGUSR1 is a's */
    EXPECT(c == NULL);
    EXPECT_EQ(blocked(SIGHUP), hup_blocked); /* nothing changed */

    kill(getpid(), SIGUSR2);
    EXPECT_EQ(conc_ctx_wait(conc_signal_ctx(b)), CONC_CANCELED);
    EXPECT_EQ(conc_ctx_cause(conc_signal_ctx(b)), SIGUSR2);
    EXPECT_EQ(conc_ctx_err(conc_signal_ctx(a)), 0);
    kill(getpid(), SIGUSR1);
    EXPECT_EQ(conc_ctx_wait(conc_signal_ctx(a)), CONC_CANCELED);
    EXPECT_EQ(conc_ctx_cause(conc_signal_ctx(a)), SIGUSR1);
    conc_signal_stop(b);
    EXPECT(blocked(SIGUSR1) && !blocked(SIGUSR2)); /* b gave back only its own */
    conc_signal_stop(a);
    ASSERT_EQ(conc_signal_notify(NULL, c_sigs, 2, &c), 0); /* free again */
    conc_signal_stop(c);
    EXPECT(!blocked(SIGUSR1) && !blocked(SIGUSR2) && !blocked(SIGHUP));
}

/* ---- stop from an after-func (runner thread), parent ending ---- */

typedef struct {
    conc_signal_t *s;
    conc_chan_t *done;
} stop_arg;

static void stop_in_after_func(void *p) {
    stop_arg *a = (stop_arg *)p;
    conc_signal_stop(a->s);
    int one = 1;
    conc_chan_send(a->done, &one, NULL);
}

TEST(signal_stop_from_after_func) {
    const int sigs[] = {SIGUSR2};
    stop_arg a;
    ASSERT_EQ(conc_signal_notify(NULL, sigs, 1, &a.s), 0);
    a.done = conc_chan_new(sizeof(int), 1);
    ASSERT(a.done != NULL);
    conc_after_func_t *af = conc_ctx_after_func(conc_signal_ctx(a.s), stop_in_after_func, &a);
    ASSERT(af != NULL);
    kill(getpid(), SIGUSR2);
    int v = 0;
    EXPECT_EQ(conc_chan_recv(a.done, &v, NULL), 0);
    EXPECT(!conc_after_func_stop(af)); /* it ran */
    EXPECT(blocked(SIGUSR2)); /* stopped on another thread: this mask is left alone */
    unblock(SIGUSR2);
    EXPECT_EQ(conc_chan_free(a.done), 0);
}

TEST(signal_parent_ends_first) {
    const int sigs[] = {SIGUSR1};
    conc_ctx_t *parent = conc_ctx_with_cancel(NULL);
    ASSERT(parent != NULL);
    conc_signal_t *s;
    ASSERT_EQ(conc_signal_notify(parent, sigs, 1, &s), 0);
    conc_ctx_cancel_cause(parent, 42);
    EXPECT_EQ(conc_ctx_wait(conc_signal_ctx(s)), CONC_CANCELED);
    EXPECT_EQ(conc_ctx_cause(conc_signal_ctx(s)), 42);
    conc_signal_stop(s);

    conc_signal_t *s2;
    ASSERT_EQ(conc_signal_notify(parent, sigs, 1, &s2), 0); /* parent already ended */
    EXPECT_EQ(conc_ctx_cause(conc_signal_ctx(s2)), 42);
    conc_signal_stop(s2);
    conc_ctx_release(parent);
    EXPECT(!blocked(SIGUSR1));
}

TEST(signal_notify_stop_cycles) {
    const int sigs[] = {SIGUSR1, SIGUSR2};
    long n = tap_iters(100);
    sigset_t before = cur_mask();
    for (long i = 0; i < n; i++) {
        conc_signal_t *s;
        ASSERT_EQ(conc_signal_notify(NULL, sigs, 2, &s), 0);
        if (i % 2) {
            kill(getpid(), i % 4 == 1 ? SIGUSR1 : SIGUSR2);
            EXPECT_EQ(conc_ctx_wait(conc_signal_ctx(s)), CONC_CANCELED);
        }
        conc_signal_stop(s);
    }
    sigset_t after = cur_mask();
    EXPECT(same_mask(&before, &after));
}

/* stop unblocks what notify blocked only on the thread that called notify: not on another
   thread, also not on one that got the id of that thread after it ended (glibc hands a
   joined thread's id to the next thread it creates). */
static void *notify_and_end(void *p) {
    const int sigs[] = {SIGUSR2};
    if (conc_signal_notify(NULL, sigs, 1, (conc_signal_t **)p) != 0) *(conc_signal_t **)p = NULL;
    return NULL;
}

typedef struct {
    conc_signal_t *s;
    bool blocked_after;
} reuse_arg;

static void *block_and_stop(void *p) {
    reuse_arg *a = (reuse_arg *)p;
    sigset_t u;
    sigemptyset(&u);
    sigaddset(&u, SIGUSR2);
    pthread_sigmask(SIG_BLOCK, &u, NULL); /* this thread's own choice: stop leaves it */
    conc_signal_stop(a->s);
    a->blocked_after = blocked(SIGUSR2);
    return NULL;
}

TEST(signal_stop_on_a_thread_with_the_callers_old_id) {
    EXPECT(!blocked(SIGUSR2));
    conc_signal_t *s = NULL;
    pthread_t a = spawn(notify_and_end, &s);
    pthread_join(a, NULL);
    ASSERT(s != NULL);
    reuse_arg arg = {.s = s, .blocked_after = false};
    pthread_t b = spawn(block_and_stop, &arg);
    pthread_join(b, NULL);
    EXPECT(arg.blocked_after);
    if (!pthread_equal(a, b)) printf("# the second thread did not get the first one's id\n");
    EXPECT(!blocked(SIGUSR2));
}

/* Threads racing notify/stop for the same signal: the registry lets one own it at a time. */
typedef struct {
    _Atomic int *owners;
    long won, busy;
    int bad;
} race_arg;

static void *notify_race(void *p) {
    race_arg *a = (race_arg *)p;
    const int sigs[] = {SIGUSR1, SIGUSR2};
    for (long i = 0; i < tap_iters(200); i++) {
        conc_signal_t *s;
        int rc = conc_signal_notify(NULL, sigs, 2, &s);
        if (rc == 0) {
            if (atomic_fetch_add(a->owners, 1) != 0) a->bad++;
            atomic_fetch_sub(a->owners, 1);
            conc_signal_stop(s);
            a->won++;
        } else if (rc == CONC_BUSY) {
            a->busy++;
        } else {
            a->bad++;
        }
    }
    return NULL;
}

TEST(signal_notify_race_one_owner) {
    _Atomic int owners = 0;
    race_arg a[4];
    pthread_t t[4];
    for (int i = 0; i < 4; i++) {
        a[i].owners = &owners;
        a[i].won = a[i].busy = 0;
        a[i].bad = 0;
        t[i] = spawn(notify_race, &a[i]);
    }
    long won = 0;
    for (int i = 0; i < 4; i++) {
        pthread_join(t[i], NULL);
        EXPECT_EQ(a[i].bad, 0);
        won += a[i].won;
    }
    EXPECT(won > 0);
    EXPECT(!blocked(SIGUSR1) && !blocked(SIGUSR2));
}

int main(void) {
    RUN(signal_invalid_arguments);
    RUN(signal_kill_command_fires);
    RUN(signal_kill_from_thread_and_sigqueue);
    RUN(signal_outside_set_and_raise_not_taken);
    RUN(signal_stop_before_any_signal_restores);
    RUN(signal_ignored_signal_is_taken);
    RUN(signal_default_ignored_signal_is_taken);
    RUN(signal_old_action_back_after_stop);
    RUN(signal_wakes_blocked_recv);
    RUN(signal_two_contexts);
    RUN(signal_stop_from_after_func);
    RUN(signal_parent_ends_first);
    RUN(signal_notify_stop_cycles);
    RUN(signal_notify_race_one_owner);
    RUN(signal_stop_on_a_thread_with_the_callers_old_id);
    return tap_done();
}
