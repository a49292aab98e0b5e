/* conc.h - v0.1.0 - Go-style concurrency for C on POSIX threads

   Do this:
      #define CONC_IMPLEMENTATION
   before you include this file in *one* C file to create the implementation.
   Every other file includes "conc.h" without the define. Link with -pthread.

   // i.e. it should look like this:
   #include ...
   #include ...
   #define CONC_IMPLEMENTATION
   #include "conc.h"

   The implementation needs C11 (<stdatomic.h>) and POSIX.1-2008; compile it with
   -D_POSIX_C_SOURCE=200809L (or _GNU_SOURCE / _DEFAULT_SOURCE). The public API below also
   compiles as C99 and as C++.

QUICK START

   conc_chan_t *ch = conc_chan_new(sizeof(int), 0);       // unbuffered, like make(chan int)
   conc_ctx_t *ctx = conc_ctx_with_timeout(NULL, 2 * CONC_SECOND);
   int v = 42;
   int rc = conc_chan_send(ch, &v, ctx);  // 0, CONC_CLOSED or CONC_DEADLINE_EXCEEDED
   ...
   conc_ctx_release(ctx);                 // Go's `defer cancel()`
   conc_chan_free(ch);

COMPILE-TIME OPTIONS

   #define CONC_STATIC            (set where the implementation is compiled) make every
                                  function static: a private copy for one .c file.
   #define CONC_API               (set globally) decoration for every public function;
                                  default `extern`.
   #define CONC_MALLOC(sz) / CONC_FREE(p)
                                  (set where the implementation is compiled) the allocator;
                                  define both or neither. Default malloc/free.
   #define CONC_ASSERT(c)         (set where the implementation is compiled) internal
                                  invariant checks; default assert() from <assert.h>.
   #define CONC_SPIN_NS n         (set where the implementation is compiled) the longest a
                                  blocked thread keeps checking between sched_yield()s
                                  before it sleeps, in ns; default 20000. 0: no spinning
                                  or yielding, sleep at once.
   #define CONC_GROUP_IDLE_NS n   (set where the implementation is compiled) how long an
                                  error group's thread waits for a next task before it
                                  ends, in ns; default 1 s. A burst of tasks does not keep
                                  its threads for the rest of the group's life.
   #define CONC_NO_WAIT_TIME      (set where the implementation is compiled) leave the
                                  wait-time statistics (send_wait_ns, recv_wait_ns) at 0:
                                  they cost two clock reads per blocked operation, which
                                  is measurable on the fastest hand-offs (tens of ns on a
                                  ~400 ns ping-pong round trip). Counts and the high-water
                                  mark cost nothing and are always kept.
   #define CONC_VALGRIND          (set where the implementation is compiled) annotate the
                                  happens-before edges carried by C11 atomics for Helgrind
                                  (needs <valgrind/helgrind.h>; costs nothing outside
                                  Valgrind). The tests build with it.

TIME

   Times are int64_t nanoseconds on CLOCK_MONOTONIC: conc_now() reads that clock, deadlines
   are absolute values of it, durations are differences. CONC_MILLISECOND, CONC_SECOND, ...
   help write them. A wall-clock step never moves a deadline.

CONTEXTS  (>>ctx)

   A context carries cancellation, a deadline and values down a tree, as Go's context
   package does. Every call in conc.h that can block takes a context as its last argument;
   NULL means "never cancelled" (Go's context.Background()).

   - conc_ctx_with_cancel / _with_deadline / _with_timeout / _with_value derive a child from a
     parent (NULL parent = background). They return NULL only when out of memory.
   - Cancelling a context (conc_ctx_cancel, _cancel_cause, its deadline passing, or its parent
     ending) ends it and every descendant at once, wakes every call blocked on any of them,
     and runs their after-funcs. A child never touches its parent. A child's deadline is the
     earlier of its own and its parent's.
   - A cancel or release returns only once every descendant has ended, also when another
     thread (or the deadline) is ending the same context at that moment: as in Go, a
     second cancel waits for the first one's propagation. Only conc_ctx_err read on another
     thread may show a context ended a few microseconds before its descendants (Go's Err
     would wait for the lock there).
   - conc_ctx_err() is 0 while the context lives, then CONC_CANCELED or
     CONC_DEADLINE_EXCEEDED for ever. conc_ctx_cause() is the cause given to
     conc_ctx_cancel_cause() (a positive user code, say), else the same as err. A child
     ended by its parent inherits the parent's err and cause.
   - Lifetimes: every context you create you release once with conc_ctx_release() (Go's
     `defer cancel()`): it cancels the context if it can be cancelled and is still live,
     detaches it from its parent, and gives up your reference. Release a context only when
     no other thread uses it any more (as you would before free()). Children, timers and
     blocked calls hold references of their own, so a child may outlive its released parent:
     the child was cancelled with it, and its values and deadline stay readable.
   - conc_ctx_background() is a static context that is never cancelled; releasing it does
     nothing.
   - conc_ctx_after_func(ctx, fn, arg) runs fn(arg) once when ctx ends: on the thread that
     cancels it, after conc has let go of its locks; when a deadline or a signal ends it, on
     conc's runner thread (never on the timer thread, so fn may itself sleep or wait on timers;
     only if the system cannot start that thread does fn run on the thread that ended ctx);
     at once on the calling thread if ctx has already ended. conc_after_func_stop() prevents the
     call if it has not started, returns whether it did, and frees the handle: call it
     exactly once per handle.

CHANNELS  (>>chan)

   conc_chan_new(elem_size, cap) makes a channel of elements of elem_size bytes (0 allowed)
   with a buffer of cap elements; cap 0 is a rendezvous: a send returns only once a receiver
   has taken the value. Values are copied in and out with memcpy.

   - send blocks while the buffer is full (or, unbuffered, until a receiver takes the value);
     recv blocks while it is empty. Both return the context's err if it ends first; an
     operation that can complete without blocking completes even if the context has ended.
   - close: receivers drain what is buffered, then get CONC_CLOSED (and a zeroed element);
     senders, also those blocked at the moment of the close, get CONC_CLOSED; a second close
     returns CONC_CLOSED. None of these panic, unlike Go.
   - Exactly once: a call that returns 0 transferred its value exactly once; a call that
     returns anything else transferred nothing - also when its context ends at the instant
     a peer arrives, and when close races with either.
   - Order: FIFO per sender; blocked senders and blocked receivers are served in arrival
     order.
   - Statistics (conc_chan_stats_get): the buffer's high-water mark, how many sends and
     receives had to wait, and how long they waited in total: the backpressure a channel
     exerts. The counts are free; the wait times cost two clock reads per blocked call
     (CONC_NO_WAIT_TIME leaves them out).
   - conc_chan_free refuses (CONC_BUSY) while threads are blocked on the channel (or still
     leaving a call on it). Free a channel only when no thread uses it any more.

SELECT  (>>select)

   conc_select(cases, n, ctx) waits until one of n cases can proceed, performs it and returns
   its index. Cases are built with CONC_SEND(ch, &v), CONC_RECV(ch, &v),
   CONC_RECV_OK(ch, &v, &ok) and CONC_DONE(ctx) (ready once that context has ended), or the
   conc_case_*() functions. A case with a NULL channel is never ready (Go's nil channel).
   conc_try_select() is the form with Go's `default:` and returns CONC_WOULD_BLOCK when no
   case is ready.

   - Among ready cases the choice is uniformly random; a select completes exactly one case,
     exactly once, and leaves nothing behind on the channels that did not fire.
   - The fired case's `status` member tells what happened: 0, or CONC_CLOSED (a receive from
     a closed, drained channel - `ok` is then false and the element zeroed - or a send on a
     closed channel, which Go would panic on), or the context's err for CONC_DONE.
   - The same channel may appear in several cases, also as send and receive at once.

WAIT GROUPS  (>>wg)

   A wait group counts outstanding work, as Go's sync.WaitGroup: conc_wg_add(wg, n) before
   starting n jobs, conc_wg_done(wg) as each finishes, conc_wg_wait(wg, ctx) to block until
   the count is 0. Unlike Go:
   - a wait takes a context, and returns its err if it ends first;
   - a counter that would go negative is refused with CONC_NEGATIVE_COUNT and left as it was
     (Go panics); the wait group stays usable;
   - a wait group may be reused at once: an add after the counter reached 0 starts a new
     round even if waiters of the last round have not yet returned (Go panics there).
   add and done are one atomic operation when nobody waits (a few ns); only the change to 0
   with waiters takes the lock, and wakes every waiter.

SEMAPHORES  (>>sem)

   conc_sem_new(size) makes a weighted semaphore of size permits, as Go's
   golang.org/x/sync/semaphore: conc_sem_acquire(sem, n, ctx) takes n at once,
   conc_sem_release(sem, n) gives them back.
   - FIFO: waiters are served in arrival order, and a request at the head that does not fit
     holds back every request behind it, even those that would fit: a large request is never
     starved by a stream of small ones.
   - A waiter whose context ends gives up, returns the ctx's err and holds nothing; if it
     was at the head, the ones behind it that now fit go ahead. If permits are granted to it
     at the very moment its context ends, whichever came first wins: 0 means it holds the
     permits, anything else that it holds none. No permit is ever lost or leaked.
   - An acquire that can be granted at once is, even if its context has ended (as a channel
     send that need not block; newer x/sync versions fail there instead).
   - n > size returns CONC_INVALID at once (Go blocks until the context ends); a release of
     more than is held returns CONC_OVER_RELEASE and changes nothing (Go panics).
   - conc_sem_try_acquire fails while others wait, even if n would fit (Go's TryAcquire).

ONCE  (>>once)

   A conc_once_t runs an initialiser exactly once, as Go's sync.Once and
   sync.OnceValue(s). It needs no new or free, so it can be a static:

      static conc_once_t tables_once = CONC_ONCE_INIT;   // or zeroed memory
      int rc = conc_once_do(&tables_once, load_tables, NULL, ctx);

   - The first caller runs fn(arg) on its own thread; callers that come while fn runs
     block until it returns; every caller, then and later, gets what fn returned - also a
     failure: fn never runs again (Go's OnceValue caches an error too). To retry after a
     failure, use a new once. conc_once_do_value is the same for an fn that also gives a
     pointer (Go's OnceValues): status and pointer are both kept.
   - A caller that has to wait takes a context: if ctx ends first, it returns ctx's err;
     fn keeps running and a later call gets its result. If ctx ends at the instant fn
     returns, the call returns one or the other, never a mix, and leaves nothing behind.
     The caller that runs fn never waits, so it ignores ctx (also one that has ended), and
     a call on a once that is done returns the result at once, whatever ctx says.
   - fn's status shares the int with conc's own: return 0 or a positive code of your own
     to tell fn's results from CONC_RECURSIVE and a ctx's err.
   - A once runs one fn: the fn and arg of later calls are ignored.
   - fn calling its own once (directly or deeper down, on its thread) gets CONC_RECURSIVE
     at once (Go deadlocks). Two onces whose fns wait for each other on two threads still
     deadlock, as in Go, unless a context ends the wait. fn must return: no
     pthread_exit, longjmp or C++ exception out of it (the once would stay running).
   - Once done, a call costs one acquire load (about a nanosecond). A once must not be
     copied, moved or freed while a call on it runs; there is no reset. Waiting callers
     are kept in a small table of locks shared by all onces, inside the implementation:
     with CONC_STATIC, use a once only from the file that holds its copy.

POOLS  (>>pool)

   conc_pool_new(workers, cap, parent) starts `workers` threads and a job queue of `cap`
   jobs; the pool's context is a child of parent (NULL = background). A job is a function
   and an argument, int fn(void *arg, conc_ctx_t *ctx), called on a worker with the pool's
   context (conc_pool_ctx). Its threads are registered (>>thread) as "pool worker" with the
   file:line of the conc_pool_new call, and they are reused for every job. Inside, a pool
   with cap > 0 is what a Go programmer would write: a channel of jobs (>>chan) that the
   workers receive from until it is closed, so the queue has the channel's guarantees and
   its cost. With cap 0 there is nothing to queue, and a submit hands its job straight to
   a waiting worker through a cache line that worker waits on (one compare-and-swap, no
   lock: the cheapest hand-off between threads), with the same guarantees.

   - conc_pool_submit(p, fn, arg, ctx) hands the job to a waiting worker, else queues it,
     else blocks until a worker or a slot frees up (returning the ctx's err if ctx ends
     first: the job was then not taken). With cap 0 the pool is a pure hand-off, as an
     unbuffered Go channel ranged over by the workers: a submit returns once a waiting
     worker has the job, so at most `workers` jobs are accepted and not finished, and the
     submitter feels backpressure at once. conc_pool_try_submit never blocks and returns
     CONC_WOULD_BLOCK where submit would block (fail fast).
   - Exactly once: a submit that returns 0 gave its job to the pool, and the job then runs
     exactly once or, if a shutdown gives up waiting, is reported unrun exactly once; any
     other return means the job was not taken and never will be - also when its context
     ends at the very moment a worker frees up.
   - Order: blocked submitters are served in arrival order; queued jobs start in order.
   - conc_pool_submit_future(p, fn, arg, &f, ctx) also gives a future: conc_future_wait(f,
     &result, ctx) blocks until the job has run and returns 0 with what it returned, or
     CONC_SHUTDOWN if it never will (reported unrun); any number of threads may wait on it.
     conc_future_free(f) may come before the job has run (the result is then dropped),
     and while other threads wait on f (they still get the result).
     No thread is started per job or per future.
   - conc_pool_shutdown(p, unrun, unrun_arg, ctx): from its first call on, submits return
     CONC_SHUTDOWN (blocked ones too, at once); queued and running jobs are drained, then
     the workers are joined and it returns 0. If ctx ends first it takes every job still
     queued out of the queue (a worker that frees up meanwhile may still start one: each
     job is either taken back or started, never both), cancels the pool's context (so running
     jobs can stop early), calls unrun(fn, arg, unrun_arg) for each job it took (and
     completes its future with CONC_SHUTDOWN), then returns the ctx's err without waiting
     for the running jobs: call shutdown again, or free, to wait for them. Nothing is
     dropped silently.
   - The pool's context ending (its parent cancelled) does not stop the pool: jobs still
     run and see their context ended.
   - Statistics (conc_pool_stats_get): jobs submitted, completed, rejected (try_submit on a
     saturated pool, submits after shutdown began), cancelled while blocked, unrun; how
     many submits blocked and for how long in total; the queue's high-water mark; queued
     and running now.
   - conc_pool_free(p) shuts down without a deadline (drains everything), joins and frees.
     It must be the last use of p: also after a shutdown, call it only once the submits
     that shutdown refused have returned.

ERRGROUPS  (>>group)

   Go's golang.org/x/sync/errgroup, with errgroup.WithContext: conc_group_new(parent) makes
   a group whose context (conc_group_ctx) is a child of parent.

   - conc_group_go(g, fn, arg, ctx) runs fn(arg, group ctx) on one of the group's
     threads. Threads are started on demand and reused: a task goes to a thread that has
     finished its last task, and a new thread is started only when none waits. They are
     registered as "errgroup worker" with the file:line of the conc_group_new call (not of
     the go that happened to start them). A thread that has had no task for
     CONC_GROUP_IDLE_NS (default 1 s) ends; conc_group_free joins the others.
   - fn returns 0 or an error: a positive code of the user's own, or a conc status. The
     first non-zero one cancels the group's context with that error as its cause
     (conc_ctx_cause) and is what conc_group_wait returns; later errors never replace it.
     conc_group_errors(g, out, cap) lists every error in the order they were recorded, each
     with its task's arg, so none is lost.
   - conc_group_wait(g, ctx) blocks until every task has returned, then cancels the group's
     context (as Go's Wait does) and returns the first error, or 0. If ctx ends first it
     returns the ctx's err and the tasks go on; conc_group_try_wait never blocks
     (CONC_WOULD_BLOCK while tasks run).
   - conc_group_set_limit(g, n): at most n tasks run at once; conc_group_go blocks while n
     run (that is why it takes a context: it returns the ctx's err if that ends first, and
     the task is then not started), conc_group_try_go returns CONC_WOULD_BLOCK. n < 0: no
     limit (the default); 0: no task can be added. As in Go the limit may change only while
     no task runs (CONC_BUSY otherwise; Go panics); a go made at the same moment as a
     set_limit, from another thread, may run under either limit. A group whose limit is
     set before its first go never has more than n threads ready for tasks at once (threads
     started earlier without a limit stay until they have been idle for
     CONC_GROUP_IDLE_NS; a thread that has just ended its idle wait may still be exiting,
     joining the one that ended before it, when its replacement starts). A go
     never runs the task on the calling thread: a task may wait for something its caller
     does after go returns. If a thread cannot be started, that go returns CONC_NOMEM or
     CONC_SYSTEM and a go blocked on the limit tries again.
   - Without a limit every task gets a thread of its own while it runs (tasks may wait for
     each other, as goroutines may), so a burst of blocking tasks starts as many threads;
     they wait for more tasks, and each ends once idle for CONC_GROUP_IDLE_NS.
   - A group can be reused after wait (its context stays cancelled, as in Go).
   - conc_group_free(g) waits for the tasks still running, joins the threads and frees.

RATE LIMITERS  (>>limiter)

   conc_limiter_new(rate, burst) is a token bucket, as golang.org/x/time/rate's Limiter:
   tokens accrue at rate per second up to burst, and the bucket starts full. An event
   takes n tokens:
   - conc_limiter_allow(l, n) takes them if they are there now, else returns false.
   - conc_limiter_wait(l, n, ctx) reserves them now and sleeps until they exist. If ctx's
     deadline comes before they would, it returns CONC_DEADLINE_EXCEEDED at once and takes
     nothing (the ctx itself has not ended: x/time/rate's "would exceed context
     deadline"); if ctx ends while it sleeps, it gives the tokens back (those no later
     reservation counts on) and returns ctx's err. Waiters act in the order they
     reserved: each one's time is fixed when it calls.
   - conc_limiter_reserve(l, n, &r) takes them now, on credit if need be, and says when
     they may be used (conc_reservation_delay); conc_reservation_cancel gives back what no
     later reservation has counted on, as x/time/rate's Reservation.Cancel.
   - n > burst can never be satisfied: CONC_INVALID (x/time/rate's Wait errors, its
     Reserve is not ok). n == 0 is always granted at once (x/time/rate would make it wait
     out a debt).
   - Accuracy: the bucket is computed from CLOCK_MONOTONIC nanoseconds, not refilled by a
     timer, and does not drift: while there are waiters, exactly burst + rate * t events
     go through in t, however late each waiter wakes (a waiter's lateness does not delay
     the next one's time). Tokens that would go beyond burst are lost, so a bucket that
     nobody asks of for a while (or whose callers are all descheduled) loses that time's
     capacity, as x/time/rate's does. A wait never returns before its time.
   - rate > 0 (INFINITY: no limit, any n granted); burst >= 0. conc_limiter_set_rate and
     conc_limiter_set_burst change them at any time, as x/time/rate's SetLimit and
     SetBurst: the bucket is first brought up to date at the old rate, so what accrued
     stays; reservations already made keep their time (a sleeping wait is not woken
     earlier or later); from an infinite rate to a finite one, the bucket starts full.
   - conc_limiter_free refuses (CONC_BUSY) while waits are sleeping on the limiter.

TIMERS  (>>timer)

   conc_timer_after(d) and conc_timer_tick(period) give a timer whose channel
   (conc_timer_chan, capacity 1, element int64_t: the conc_now() time it fired) receives one
   value after d, or one per period; a tick that finds the buffer full is dropped (Go's
   Ticker). conc_timer_stop and conc_timer_reset leave no stale value in the channel (Go 1.23
   semantics). conc_sleep(d, ctx) sleeps unless ctx ends first.
   All timers, tickers, sleeps and deadlines share one internal thread; after-funcs of
   contexts that reach their deadline run on a second one. Each starts on first use, ends
   after a second without work and is joined at exit, so leak checkers see nothing.

SIGNALS  (>>signal)

   conc_signal_notify(parent, sigs, n, &s) gives a context, conc_signal_ctx(s), that is
   cancelled when the process receives one of the n signals, as Go's
   signal.NotifyContext: its err is then CONC_CANCELED and its cause the signal number
   (positive, as a user code: conc_ctx_cause(ctx) == SIGTERM). conc_signal_stop(s) ends
   the context if no signal did, gives the signals back and joins the thread. A graceful
   shutdown:

      int main(void) {
          static const int sigs[] = {SIGINT, SIGTERM};
          conc_signal_t *s;
          // first thing, before any thread starts: threads inherit the blocked mask
          if (conc_signal_notify(NULL, sigs, 2, &s) != 0) return 1;
          conc_ctx_t *ctx = conc_signal_ctx(s);
          start_workers(ctx);        // each returns once ctx has ended
          conc_ctx_wait(ctx);        // Ctrl+C, or `kill <pid>`
          conc_signal_stop(s);       // from now on a second Ctrl+C kills at once
          wait_for_workers();
      }

   What the application must do, and why:
   - No signal handler does the work. notify blocks the signals in the calling thread and
     starts one thread that takes them with sigwait(). A signal sent to the process stays
     pending until that thread takes it - provided every thread has it blocked: a thread
     that has it unblocked may get it instead, with its old action (for SIGINT and SIGTERM,
     death). So call notify in main before any thread starts (a thread inherits its
     creator's mask), or block the signals yourself there first:

        sigset_t set;
        sigemptyset(&set);
        sigaddset(&set, SIGINT);
        sigaddset(&set, SIGTERM);
        pthread_sigmask(SIG_BLOCK, &set, NULL);  // in main, before any pthread_create

     conc.h's own threads block every signal. Threads that libraries start must be
     started after this point too.
   - Only signals sent to the process count: kill(1), kill(), sigqueue(), Ctrl+C in the
     terminal. raise() and pthread_kill() aim at one thread, which has the signal blocked,
     so it stays pending there. To start a shutdown from inside the program, call
     conc_ctx_cancel_cause(conc_signal_ctx(s), SIGTERM), or kill(getpid(), SIGTERM).
   - A signal whose action ignores it - SIG_IGN (nohup ignores SIGHUP, a shell's
     background job SIGINT), or SIG_DFL for SIGCHLD, SIGURG, SIGWINCH - gets an empty
     handler while s lives, as Go's signal.Notify un-ignores, since POSIX lets the kernel
     drop an ignored signal instead of keeping it for sigwait(); stop puts the old action
     back. No other action is changed. A signal already pending when notify is called
     ends the context at once.
   - Until stop the thread keeps taking the signals: later ones (a second Ctrl+C) are
     swallowed, also after the context has ended through its parent. Call stop once the
     shutdown has begun, if a second signal should have its old effect. stop unblocks the
     signals that notify blocked, when called on the thread that called notify (a mask
     belongs to a thread; from another thread it leaves that mask alone); signals that
     were blocked before notify stay blocked. A signal that arrives while stop runs is
     either swallowed or meets the old action.
   - One owner per signal: notify with a signal that a live signal context already has
     returns CONC_BUSY and changes nothing. Contexts on disjoint sets work side by side;
     for several parts of a program to react to the same signal, derive their contexts
     from one signal context.
   - The context's after-funcs run on conc's runner thread (the signal thread never runs
     user code), so an after-func may call conc_signal_stop.
   - A program you start inherits the signal mask (exec keeps it): reset it for the child,
     e.g. with posix_spawnattr_setsigmask and POSIX_SPAWN_SETSIGMASK. A signal that notify
     un-ignored starts there with SIG_DFL, not SIG_IGN (exec resets handlers).

THREADS AND LEAK CHECKS  (>>thread)

   Every thread conc.h starts - conc_go's, the timer and runner threads, signal threads,
   pool and group workers - is registered with its purpose and the file:line that started
   it (the caller's line: functions that start threads are macros over an _at function).
   - conc_go(wg, fn, arg) is Go's `go` with a wait group: it adds 1 to wg (NULL: none),
     runs fn(arg) on a new thread and calls conc_wg_done(wg) when fn returns. Nobody joins
     the thread: conc.h does, once it has ended (at the next conc_go or leak check, and at
     exit), so Valgrind sees nothing. A thread start costs tens of microseconds: for many
     small tasks use a pool or an errgroup, which reuse their threads.
   - conc_threads_live() is the number of conc's threads running now, for a metrics
     page; conc_threads_list(out, cap) describes each.
   - A leak check for tests, as Go's goleak:

        uint64_t scope = conc_leak_begin();
        run_code_under_test();
        conc_thread_info leaked[8];
        size_t n;
        if (conc_leak_check(scope, CONC_SECOND, NULL, leaked, 8, &n) != 0)
            for (size_t i = 0; i < n && i < 8; i++)
                fprintf(stderr, "leaked thread %s started at %s:%d\n",
                        leaked[i].purpose, leaked[i].file, leaked[i].line);

     It waits, up to the grace period, for every thread started since conc_leak_begin to
     end (threads that are winding down get the time to), and names those still running.
     Service threads (the timer and runner threads, which start on demand and leave after
     a second without work) are skipped, as goleak skips the runtime's own goroutines;
     a signal context's thread counts until conc_signal_stop, a pool's workers until its
     free. Threads started directly with pthread_create are not seen.

PARALLEL MAP  (>>map)

   conc_parallel_map(ctx, in, in_size, out, out_size, n, limit, fn, arg) calls
   fn(i, &in[i], &out[i], arg, mctx) for every i < n (in and out are arrays of elements of
   in_size and out_size bytes, either may be NULL with size 0), with at most limit calls
   in flight (0: one per CPU), and returns once all have returned:

      static int square(size_t i, const void *in, void *out, void *arg, conc_ctx_t *ctx) {
          *(double *)out = *(const double *)in * *(const double *)in;
          return 0;                            // or a code of yours (> 0) to stop the map
      }
      int rc = conc_parallel_map(ctx, xs, sizeof(double), ys, sizeof(double), n, 4, square, NULL);

   - Results land at their input's index, whatever order the calls run in.
   - The first non-zero return of fn cancels mctx (a child of ctx, cause = that value):
     calls not yet started never start, calls running see mctx end; the map returns that
     first value, never a later one. If ctx ends, the same happens and the map returns its
     err. An item that did not run leaves its out[i] untouched; 0 means every item ran.
   - The caller's thread is one of the workers and limit-1 threads are started per call
     (registered as "parallel map", site of the call) and joined before it returns; if no
     thread can be started, fewer workers do the work. A limit above 1024 is taken as
     1024. Indices are claimed in chunks that
     shrink as the work runs out, so a cheap fn costs a few ns per item.

THREAD SAFETY AND BLOCKING

   Every function may be called from any thread at the same time, except the _free and
   _release functions, which must be the last use of their object (free a channel only
   after every call on it has returned). A blocked call spins with `pause` for a couple
   of microseconds, then checks between sched_yield()s for up to CONC_SPIN_NS (adapted
   per thread: halved after waits that outlast it), then sleeps on its thread's condition
   variable: a thread blocked for long costs no CPU, and a yielding waiter hands its core
   to whichever thread can run. Channel locks are spinlocks held for a few dozen
   instructions, with the same pause-then-yield backoff.
   fork(): only the forking thread survives in the child; conc.h's locks may be held there.
   The child may only call async-signal-safe functions or exec.

ERRORS

   Functions return int: 0 is success, negative values are conc's own outcomes, positive
   values are the user's own error codes carried unchanged (context causes). conc_strerror()
   names each:

      CONC_OK                  0  success
      CONC_CLOSED             -1  the channel is closed (send, second close, recv drained)
      CONC_CANCELED           -2  the context was cancelled
      CONC_DEADLINE_EXCEEDED  -3  the context's deadline passed
      CONC_WOULD_BLOCK        -4  a try_ call (or try_select) could not proceed at once
      CONC_NOMEM              -5  out of memory
      CONC_INVALID            -6  an argument is invalid (NULL object, size mismatch, ...)
      CONC_BUSY               -7  the object is still in use (free with waiters), a
                                  signal already has a signal context, or a group's limit
                                  is changed while tasks run (Go panics)
      CONC_SYSTEM             -8  a system call failed (pthread_create, ...)
      CONC_NEGATIVE_COUNT     -9  conc_wg_add would take the counter below 0 (Go panics)
      CONC_OVER_RELEASE      -10  conc_sem_release of more than is held (Go panics)
      CONC_LEAKED            -11  conc_leak_check: threads started in the scope still run
      CONC_RECURSIVE         -12  a once's fn called that once (conc_once_do/_value; Go
                                  deadlocks there)
      CONC_SHUTDOWN          -13  the pool or group is shutting down or shut down (submit
                                  after conc_pool_shutdown began; a future whose job was
                                  reported unrun)

REVISION HISTORY

   0.1.0  contexts, channels, select, timers, wait groups, weighted semaphores, signal
          contexts (graceful shutdown), conc_go, thread registry and leak checks,
          parallel map, once (Go's sync.Once/OnceValue, with a context on the wait), rate
          limiters (x/time/rate's token bucket: allow, wait, reserve/cancel, set rate and
          burst), worker pools with futures, error groups (x/sync/errgroup with limits and
          every error).
*/
#ifndef CONC_H_INCLUDED
#define CONC_H_INCLUDED

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define CONC_VERSION_MAJOR 0
#define CONC_VERSION_MINOR 1
#define CONC_VERSION_PATCH 0
#define CONC_VERSION_STRING "0.1.0"

#ifndef CONC_API
#ifdef CONC_STATIC
#if defined(__GNUC__) || defined(__clang__)
#define CONC_API static __attribute__((unused)) /* a private copy need not use everything */
#else
#define CONC_API static
#endif
#else
#define CONC_API extern
#endif
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* ---- status codes (one list: the enum and conc_strerror come from it) ---- */
#define CONC__STATUS_LIST(X)                                     \
    X(CONC_OK, 0, "success")                                     \
    X(CONC_CLOSED, -1, "channel closed")                         \
    X(CONC_CANCELED, -2, "context canceled")                     \
    X(CONC_DEADLINE_EXCEEDED, -3, "context deadline exceeded")   \
    X(CONC_WOULD_BLOCK, -4, "operation would block")             \
    X(CONC_NOMEM, -5, "out of memory")                           \
    X(CONC_INVALID, -6, "invalid argument")                      \
    X(CONC_BUSY, -7, "object still in use")                      \
    X(CONC_SYSTEM, -8, "system call failed")                     \
    X(CONC_NEGATIVE_COUNT, -9, "wait group counter would go negative") \
    X(CONC_OVER_RELEASE, -10, "release of more than was acquired") \
    X(CONC_LEAKED, -11, "threads started in the scope still run") \
    X(CONC_RECURSIVE, -12, "once called from inside its own function") \
    X(CONC_SHUTDOWN, -13, "pool or group shut down")

typedef enum conc_status {
#define CONC__STATUS_ENUM(name, value, text) name = value,
    CONC__STATUS_LIST(CONC__STATUS_ENUM)
#undef CONC__STATUS_ENUM
    CONC__STATUS_MIN = -13
} conc_status;

CONC_API const char *conc_strerror(int status);

/* ---- time (>>time) ---- */
#define CONC_NANOSECOND ((int64_t)1)
#define CONC_MICROSECOND ((int64_t)1000)
#define CONC_MILLISECOND ((int64_t)1000000)
#define CONC_SECOND ((int64_t)1000000000)

CONC_API int64_t conc_now(void);

/* ---- contexts (>>ctx) ---- */
typedef struct conc_ctx conc_ctx_t;
typedef struct conc_after_func conc_after_func_t;

CONC_API conc_ctx_t *conc_ctx_background(void);
CONC_API conc_ctx_t *conc_ctx_with_cancel(conc_ctx_t *parent);
CONC_API conc_ctx_t *conc_ctx_with_deadline(conc_ctx_t *parent, int64_t deadline_ns);
CONC_API conc_ctx_t *conc_ctx_with_timeout(conc_ctx_t *parent, int64_t timeout_ns);
CONC_API conc_ctx_t *conc_ctx_with_value(conc_ctx_t *parent, const void *key, void *value);
CONC_API void conc_ctx_cancel(conc_ctx_t *ctx);
CONC_API void conc_ctx_cancel_cause(conc_ctx_t *ctx, int cause);
CONC_API void conc_ctx_release(conc_ctx_t *ctx);
CONC_API int conc_ctx_err(const conc_ctx_t *ctx);
CONC_API int conc_ctx_cause(const conc_ctx_t *ctx);
CONC_API bool conc_ctx_deadline(const conc_ctx_t *ctx, int64_t *deadline_ns);
CONC_API void *conc_ctx_value(const conc_ctx_t *ctx, const void *key);
CONC_API int conc_ctx_wait(conc_ctx_t *ctx);
CONC_API conc_after_func_t *conc_ctx_after_func(conc_ctx_t *ctx, void (*fn)(void *arg), void *arg);
CONC_API bool conc_after_func_stop(conc_after_func_t *af);

/* ---- channels (>>chan) ---- */
typedef struct conc_chan conc_chan_t;

typedef struct conc_chan_stats {
    size_t high_water;        /* most elements ever buffered at once (a value a waiting
                                 receiver takes at once may pass through the buffer) */
    uint64_t sends, recvs;    /* completed sends / receives */
    uint64_t blocked_sends;   /* sends that had to wait for a receiver or for room */
    uint64_t blocked_recvs;   /* receives that had to wait for a value */
    int64_t send_wait_ns;     /* total time blocked sends waited (a select that waited on */
    int64_t recv_wait_ns;     /* several channels adds its wait to each), receives likewise */
} conc_chan_stats;

CONC_API conc_chan_t *conc_chan_new(size_t elem_size, size_t cap);
CONC_API int conc_chan_free(conc_chan_t *ch);
CONC_API int conc_chan_send(conc_chan_t *ch, const void *elem, conc_ctx_t *ctx);
CONC_API int conc_chan_recv(conc_chan_t *ch, void *elem, conc_ctx_t *ctx);
CONC_API int conc_chan_try_send(conc_chan_t *ch, const void *elem);
CONC_API int conc_chan_try_recv(conc_chan_t *ch, void *elem);
CONC_API int conc_chan_close(conc_chan_t *ch);
CONC_API size_t conc_chan_len(conc_chan_t *ch);
CONC_API size_t conc_chan_cap(const conc_chan_t *ch);
CONC_API size_t conc_chan_elem_size(const conc_chan_t *ch);
CONC_API void conc_chan_stats_get(conc_chan_t *ch, conc_chan_stats *out);

/* ---- select (>>select) ---- */
typedef enum conc_case_kind {
    CONC_CASE_SEND = 1, /* send *elem on ch */
    CONC_CASE_RECV = 2, /* receive into elem (NULL: discard) from ch */
    CONC_CASE_DONE = 3  /* ready once ctx has ended */
} conc_case_kind;

typedef struct conc_case {
    conc_case_kind kind;
    conc_chan_t *ch;  /* SEND/RECV: NULL = never ready */
    void *elem;       /* SEND: value to send; RECV: where to put the value (or NULL) */
    bool *ok;         /* RECV, optional: true if a value was received, false if closed */
    conc_ctx_t *ctx;  /* DONE: the context; NULL = never ready */
    int status;       /* out, for the fired case: 0, CONC_CLOSED, or the ctx's err */
} conc_case;

#define CONC_SEND(ch, elem) {CONC_CASE_SEND, (ch), (void *)(elem), NULL, NULL, 0}
#define CONC_RECV(ch, elem) {CONC_CASE_RECV, (ch), (void *)(elem), NULL, NULL, 0}
#define CONC_RECV_OK(ch, elem, okp) {CONC_CASE_RECV, (ch), (void *)(elem), (okp), NULL, 0}
#define CONC_DONE(c) {CONC_CASE_DONE, NULL, NULL, NULL, (c), 0}

static inline conc_case conc_case_send(conc_chan_t *ch, const void *elem) {
    conc_case c = CONC_SEND(ch, elem);
    return c;
}
static inline conc_case conc_case_recv(conc_chan_t *ch, void *elem, bool *ok) {
    conc_case c = CONC_RECV_OK(ch, elem, ok);
    return c;
}
static inline conc_case conc_case_done(conc_ctx_t *ctx) {
    conc_case c = CONC_DONE(ctx);
    return c;
}

CONC_API int conc_select(conc_case *cases, size_t n, conc_ctx_t *ctx);
CONC_API int conc_try_select(conc_case *cases, size_t n);

/* ---- wait groups (>>wg) ---- */
typedef struct conc_wg conc_wg_t;

CONC_API conc_wg_t *conc_wg_new(void);
CONC_API int conc_wg_free(conc_wg_t *wg);
CONC_API int conc_wg_add(conc_wg_t *wg, int64_t delta);
CONC_API int conc_wg_done(conc_wg_t *wg);
CONC_API int conc_wg_wait(conc_wg_t *wg, conc_ctx_t *ctx);
CONC_API int64_t conc_wg_count(conc_wg_t *wg);

/* ---- semaphores (>>sem) ---- */
typedef struct conc_sem conc_sem_t;

CONC_API conc_sem_t *conc_sem_new(int64_t size);
CONC_API int conc_sem_free(conc_sem_t *sem);
CONC_API int conc_sem_acquire(conc_sem_t *sem, int64_t n, conc_ctx_t *ctx);
CONC_API int conc_sem_try_acquire(conc_sem_t *sem, int64_t n);
CONC_API int conc_sem_release(conc_sem_t *sem, int64_t n);
CONC_API int64_t conc_sem_available(conc_sem_t *sem);

/* ---- once (>>once) ---- */
typedef struct conc_once {
    int state;     /* private: 0 new, 1 running, 2 done (read atomically by conc.h) */
    int result;    /* private: the status fn returned */
    void *value;   /* private: the value fn gave (conc_once_do_value) */
    void *owner;   /* private: names the thread running fn */
    void *waiters; /* private: callers blocked until fn returns */
} conc_once_t;

/* A new once, for static or automatic storage; zeroed memory is a new once too. */
#define CONC_ONCE_INIT {0, 0, NULL, NULL, NULL}

CONC_API int conc_once_do(conc_once_t *once, int (*fn)(void *arg), void *arg, conc_ctx_t *ctx);
CONC_API int conc_once_do_value(conc_once_t *once, int (*fn)(void *arg, void **value), void *arg, void **value,
                                conc_ctx_t *ctx);
CONC_API bool conc_once_done(conc_once_t *once);

/* ---- pools (>>pool) ---- */
typedef struct conc_pool conc_pool_t;
typedef struct conc_future conc_future_t;

/* A job or a group task: gets its argument and the pool's (group's) context; returns 0, a
   positive code of the user's own, or a conc status. */
typedef int (*conc_task_fn)(void *arg, conc_ctx_t *ctx);
/* Told about each accepted job that never ran (a shutdown whose context ended first). */
typedef void (*conc_pool_unrun_fn)(conc_task_fn fn, void *arg, void *unrun_arg);

typedef struct conc_pool_stats {
    uint64_t submitted;   /* jobs accepted (submit / try_submit returned 0) */
    uint64_t completed;   /* jobs that ran and returned */
    uint64_t rejected;    /* try_submits that found the pool saturated; submits once shut down */
    uint64_t canceled;    /* blocked submits whose context ended first (the job was not taken) */
    uint64_t unrun;       /* accepted jobs that never ran: reported by conc_pool_shutdown */
    uint64_t blocked;     /* submits that had to wait for a worker or for room */
    int64_t blocked_ns;   /* total time those submits waited */
    size_t high_water;    /* most jobs ever queued at once (0 with a queue of capacity 0; a
                             job a waiting worker takes at once may pass through the queue) */
    size_t queued;        /* jobs queued now */
    size_t running;       /* jobs running (or handed to a worker) now */
} conc_pool_stats;

/* workers >= 1 threads, a queue of `cap` jobs (0: hand-off), context derived from parent. */
#define conc_pool_new(workers, cap, parent) conc_pool_new_at((workers), (cap), (parent), __FILE__, __LINE__)
CONC_API conc_pool_t *conc_pool_new_at(size_t workers, size_t cap, conc_ctx_t *parent, const char *file, int line);
CONC_API void conc_pool_free(conc_pool_t *pool);
CONC_API int conc_pool_submit(conc_pool_t *pool, conc_task_fn fn, void *arg, conc_ctx_t *ctx);
CONC_API int conc_pool_try_submit(conc_pool_t *pool, conc_task_fn fn, void *arg);
CONC_API int conc_pool_submit_future(conc_pool_t *pool, conc_task_fn fn, void *arg, conc_future_t **out,
                                     conc_ctx_t *ctx);
CONC_API int conc_pool_try_submit_future(conc_pool_t *pool, conc_task_fn fn, void *arg, conc_future_t **out);
CONC_API int conc_pool_shutdown(conc_pool_t *pool, conc_pool_unrun_fn unrun, void *unrun_arg, conc_ctx_t *ctx);
CONC_API conc_ctx_t *conc_pool_ctx(const conc_pool_t *pool);
CONC_API void conc_pool_stats_get(conc_pool_t *pool, conc_pool_stats *out);

CONC_API int conc_future_wait(conc_future_t *f, int *result, conc_ctx_t *ctx);
CONC_API int conc_future_try_wait(conc_future_t *f, int *result);
CONC_API int conc_future_free(conc_future_t *f);

/* ---- error groups (>>group) ---- */
typedef struct conc_group conc_group_t;

typedef struct conc_group_error {
    int err;   /* what the task returned (non-zero) */
    void *arg; /* the task's argument: which task it was */
} conc_group_error;

typedef struct conc_group_stats {
    uint64_t started;     /* tasks accepted (go / try_go returned 0) */
    uint64_t finished;    /* tasks that returned */
    uint64_t failed;      /* of those, how many returned non-zero */
    uint64_t blocked;     /* go calls that waited for the limit */
    int64_t blocked_ns;   /* total time they waited */
    uint64_t threads;     /* threads ever started for the group's tasks */
    size_t threads_live;  /* of those, how many have not ended (idle ones end, see go) */
    size_t running;       /* tasks running now */
} conc_group_stats;

/* A group whose context is a child of parent; its threads are registered with this call's
   file:line. */
#define conc_group_new(parent) conc_group_new_at((parent), __FILE__, __LINE__)
CONC_API conc_group_t *conc_group_new_at(conc_ctx_t *parent, const char *file, int line);
CONC_API void conc_group_free(conc_group_t *g);
CONC_API int conc_group_set_limit(conc_group_t *g, int64_t n);
CONC_API int conc_group_go(conc_group_t *g, conc_task_fn fn, void *arg, conc_ctx_t *ctx);
CONC_API int conc_group_try_go(conc_group_t *g, conc_task_fn fn, void *arg);
CONC_API int conc_group_wait(conc_group_t *g, conc_ctx_t *ctx);
CONC_API int conc_group_try_wait(conc_group_t *g);
CONC_API size_t conc_group_errors(conc_group_t *g, conc_group_error *out, size_t cap);
CONC_API conc_ctx_t *conc_group_ctx(const conc_group_t *g);
CONC_API void conc_group_stats_get(conc_group_t *g, conc_group_stats *out);

/* ---- rate limiters (>>limiter) ---- */
typedef struct conc_limiter conc_limiter_t;

/* Filled by conc_limiter_reserve; the caller owns it (no free). */
typedef struct conc_reservation {
    conc_limiter_t *lim; /* private */
    int64_t tokens;      /* private: tokens taken; 0 once cancelled */
    int64_t time_to_act; /* private: conc_now() time the tokens exist */
    double per_ns;       /* private: the rate it was made at (tokens per ns) */
    bool ok;             /* private: the reservation was made */
} conc_reservation_t;

CONC_API conc_limiter_t *conc_limiter_new(double rate_per_s, int64_t burst);
CONC_API int conc_limiter_free(conc_limiter_t *lim);
CONC_API bool conc_limiter_allow(conc_limiter_t *lim, int64_t n);
CONC_API int conc_limiter_wait(conc_limiter_t *lim, int64_t n, conc_ctx_t *ctx);
CONC_API int conc_limiter_reserve(conc_limiter_t *lim, int64_t n, conc_reservation_t *r);
CONC_API int64_t conc_reservation_delay(const conc_reservation_t *r);
CONC_API void conc_reservation_cancel(conc_reservation_t *r);
CONC_API double conc_limiter_tokens(conc_limiter_t *lim);
CONC_API int conc_limiter_set_rate(conc_limiter_t *lim, double rate_per_s);
CONC_API int conc_limiter_set_burst(conc_limiter_t *lim, int64_t burst);
CONC_API double conc_limiter_rate(conc_limiter_t *lim);
CONC_API int64_t conc_limiter_burst(conc_limiter_t *lim);

/* ---- timers (>>timer) ---- */
typedef struct conc_timer conc_timer_t;

CONC_API conc_timer_t *conc_timer_after(int64_t delay_ns);
CONC_API conc_timer_t *conc_timer_tick(int64_t period_ns);
CONC_API conc_chan_t *conc_timer_chan(conc_timer_t *t);
CONC_API bool conc_timer_stop(conc_timer_t *t);
CONC_API bool conc_timer_reset(conc_timer_t *t, int64_t delay_ns);
CONC_API void conc_timer_free(conc_timer_t *t);
CONC_API int conc_sleep(int64_t duration_ns, conc_ctx_t *ctx);

/* ---- signals (>>signal) ---- */
typedef struct conc_signal conc_signal_t;

#define conc_signal_notify(parent, signals, n, out) \
    conc_signal_notify_at((parent), (signals), (n), (out), __FILE__, __LINE__)
CONC_API int conc_signal_notify_at(conc_ctx_t *parent, const int *signals, size_t n, conc_signal_t **out,
                                   const char *file, int line);
CONC_API conc_ctx_t *conc_signal_ctx(const conc_signal_t *s);
CONC_API void conc_signal_stop(conc_signal_t *s);

/* ---- threads and leak checks (>>thread) ---- */
typedef struct conc_thread_info {
    uint64_t id;          /* 1, 2, ... in the order conc.h started its threads */
    const char *purpose;  /* what it is for: "conc_go", "timer", "signal", ... */
    const char *file;     /* the call that started it (conc.h itself for service threads) */
    int line;
    int64_t started_ns;   /* conc_now() when it started */
    bool service;         /* conc's own on-demand helper (timer, runner): leak checks skip it */
} conc_thread_info;

#define conc_go(wg, fn, arg) conc_go_at((wg), (fn), (arg), __FILE__, __LINE__)
CONC_API int conc_go_at(conc_wg_t *wg, void (*fn)(void *arg), void *arg, const char *file, int line);
CONC_API size_t conc_threads_live(void);
CONC_API size_t conc_threads_list(conc_thread_info *out, size_t cap);
CONC_API uint64_t conc_leak_begin(void);
CONC_API int conc_leak_check(uint64_t scope, int64_t grace_ns, conc_ctx_t *ctx, conc_thread_info *leaked, size_t cap,
                             size_t *n_leaked);

/* ---- parallel map (>>map) ---- */
typedef int (*conc_map_fn)(size_t i, const void *in, void *out, void *arg, conc_ctx_t *ctx);

#define conc_parallel_map(ctx, in, in_size, out, out_size, n, limit, fn, arg) \
    conc_parallel_map_at((ctx), (in), (in_size), (out), (out_size), (n), (limit), (fn), (arg), __FILE__, __LINE__)
CONC_API int conc_parallel_map_at(conc_ctx_t *ctx, const void *in, size_t in_size, void *out, size_t out_size,
                                  size_t n, size_t limit, conc_map_fn fn, void *arg, const char *file, int line);

/* ==== per-function documentation ========================================

   conc_strerror(status)      The name of a status: a static string. A positive value (a
                              user code) gives "user error"; an unknown negative one
                              "unknown status".

   ---- >>ctx
   conc_ctx_background()      The root context: never cancelled, no deadline, no values.
                              Returns: a static object; releasing it does nothing.
   conc_ctx_with_cancel(p)    A child of p (NULL = background) that conc_ctx_cancel ends.
                              Returns: the child, or NULL when out of memory. If p has
                              ended, the child starts ended with p's err and cause.
   conc_ctx_with_deadline(p, t)  As with_cancel, and ends with CONC_DEADLINE_EXCEEDED at
                              conc_now() time t (or at once if t has passed).
   conc_ctx_with_timeout(p, d)   with_deadline(p, conc_now() + d).
   conc_ctx_with_value(p, k, v)  A child of p that carries value v under key k (compared by
                              address); it ends only when p does. Returns NULL when out of
                              memory.
   conc_ctx_cancel(c)         Ends c and its descendants with CONC_CANCELED. Idempotent; a
                              no-op on background and value contexts. Blocks: only while
                              another thread's cancel of c (or of an ancestor, or its
                              deadline) is still ending c's descendants; returns once all
                              have ended. Thread safety: any thread, any time before release.
   conc_ctx_cancel_cause(c, cause)  As cancel, recording cause (conc_ctx_cause); cause 0
                              means CONC_CANCELED.
   conc_ctx_release(c)        Cancels c (if cancellable), detaches it from its parent and
                              gives up the creator's reference. NULL is a no-op. Must be
                              the creator's last use of c.
   conc_ctx_err(c)            0 while c lives; then CONC_CANCELED or CONC_DEADLINE_EXCEEDED.
                              Never blocks; NULL gives 0.
   conc_ctx_cause(c)          0 while c lives; then the cause it ended with.
   conc_ctx_deadline(c, &t)   true and the effective deadline in t if c has one.
   conc_ctx_value(c, k)       The value for key k nearest to c on the way up, or NULL.
   conc_ctx_wait(c)           Blocks: until c ends. Returns: its err. NULL blocks for ever
                              (background never ends): pass a context that can end.
   conc_ctx_after_func(c, fn, arg)  Runs fn(arg) once when c ends (see CONTEXTS). Returns a
                              handle for conc_after_func_stop, or NULL when out of memory
                              (fn is then not registered).
   conc_after_func_stop(h)    Returns: true if it stopped fn from running, false if fn has
                              started or run. Frees h. Does not wait for a running fn.

   ---- >>chan
   conc_chan_new(size, cap)   Returns: a channel, or NULL when out of memory or when
                              size * cap overflows.
   conc_chan_free(ch)         Returns: 0, or CONC_BUSY (nothing freed) while threads are
                              blocked on ch, or still on their way out of a call on it (one
                              whose context just ended, a select that another case just
                              completed). NULL is a no-op (0).
   conc_chan_send(ch, &v, ctx)   Blocks: while the buffer is full / until a receiver takes
                              v (cap 0). Returns: 0 (sent, exactly once), CONC_CLOSED, the
                              ctx's err, CONC_INVALID (ch NULL, or v NULL with elem_size >
                              0).
   conc_chan_recv(ch, &v, ctx)   Blocks: until a value comes. v may be NULL (discard).
                              Returns: 0, CONC_CLOSED (closed and drained; v zeroed), the
                              ctx's err, CONC_INVALID.
   conc_chan_try_send / try_recv  Never block. Return CONC_WOULD_BLOCK where send/recv
                              would block; otherwise as send/recv.
   conc_chan_close(ch)        Wakes every blocked receiver (CONC_CLOSED once drained) and
                              sender (CONC_CLOSED). Returns: 0, CONC_CLOSED if already
                              closed, CONC_INVALID for NULL.
   conc_chan_len / cap / elem_size  Buffered elements now / capacity / element size.
   conc_chan_stats_get(ch, &s)  A consistent snapshot of ch's statistics.

   ---- >>select
   conc_select(cases, n, ctx) Blocks: until a case is ready or ctx ends. Returns: the index
                              of the case performed (cases[i].status says how), the ctx's
                              err, or CONC_INVALID (cases NULL with n > 0, n == 0 with no
                              ctx that can end, n > 65535, a bad kind, a send case with a
                              NULL elem on a channel of non-zero element size), CONC_NOMEM
                              (n > 16 and no memory for the waiters).
   conc_try_select(cases, n)  Never blocks. Returns an index, CONC_WOULD_BLOCK, or as
                              conc_select CONC_INVALID / CONC_NOMEM.

   ---- >>wg
   conc_wg_new()              A wait group with counter 0. Returns NULL when out of memory.
   conc_wg_free(wg)           Returns: 0, or CONC_BUSY (nothing freed) while threads are
                              blocked in conc_wg_wait. NULL is a no-op (0). Free only after
                              every call on wg has returned.
   conc_wg_add(wg, delta)     Adds delta (may be negative) to the counter; when it reaches 0
                              every blocked wait returns 0. Never blocks (takes the lock
                              only to wake waiters). Returns: 0; CONC_NEGATIVE_COUNT if
                              the counter would go below 0 (it is left unchanged);
                              CONC_INVALID if wg is NULL or the counter would pass
                              2^62 - 1. Thread safety: any thread, concurrently with
                              every call but free.
   conc_wg_done(wg)           conc_wg_add(wg, -1).
   conc_wg_wait(wg, ctx)      Blocks: until the counter is 0 (returns at once if it is).
                              Returns: 0; the ctx's err if ctx ends first (also if it had
                              ended and the counter is not 0); CONC_INVALID (wg NULL).
                              NULL ctx: never cancelled.
   conc_wg_count(wg)          The counter now (0 for NULL); a snapshot, for tests and logs.

   ---- >>sem
   conc_sem_new(size)         A semaphore of size >= 0 permits, all available. Returns NULL
                              when out of memory or size < 0.
   conc_sem_free(sem)         Returns: 0, or CONC_BUSY (nothing freed) while threads are
                              blocked in conc_sem_acquire. NULL is a no-op (0). Permits
                              still held are not checked.
   conc_sem_acquire(sem, n, ctx)  Blocks: until n permits are granted, in FIFO order (see
                              SEMAPHORES). Returns: 0 (the caller holds n permits); the
                              ctx's err if it ended first (holds none); CONC_INVALID (sem
                              NULL, n < 0, or n > size: Go would block until ctx ends).
                              n == 0 succeeds once no one waits ahead of it.
   conc_sem_try_acquire(sem, n)  Never blocks. Returns: 0 (holds n); CONC_WOULD_BLOCK if
                              fewer than n are available or others are waiting;
                              CONC_INVALID as acquire.
   conc_sem_release(sem, n)   Gives back n permits and grants waiters at the head that now
                              fit, in order. Never blocks. Returns: 0; CONC_OVER_RELEASE if
                              n exceeds what is held (nothing changes); CONC_INVALID (sem
                              NULL or n < 0).
   conc_sem_available(sem)    Permits not held now (size - held; 0 for NULL): a snapshot.
                              Thread safety (every >>sem function but free): any thread,
                              concurrently.

   ---- >>once
   conc_once_do(o, fn, arg, ctx)  Runs fn(arg) if no call on o has run it. Blocks: while
                              another thread runs o's fn, until it returns or ctx ends (the
                              caller that runs fn never waits and ignores ctx). Returns:
                              what fn returned, to every caller for ever (a failure too);
                              the ctx's err if ctx ended while waiting (fn keeps running:
                              a later call gets its result); CONC_RECURSIVE if called from
                              inside o's own fn on its thread (nothing runs);
                              CONC_INVALID (o or fn NULL). Keep fn's results apart from
                              conc's negative codes (0 or a positive code of your own).
                              Once done: one acquire load, whatever ctx says. Thread
                              safety: any thread, concurrently.
   conc_once_do_value(o, fn, arg, &v, ctx)  As conc_once_do for fn(arg, &value) that also
                              gives a pointer (Go's OnceValues); *v gets that pointer (v may
                              be NULL). Returns: as conc_once_do (fn's status). On any
                              other outcome (ctx's err, CONC_RECURSIVE, CONC_INVALID) *v is
                              NULL; after a conc_once_do ran o, *v is NULL.
   conc_once_done(o)          Whether o's fn has returned (false for NULL). Never blocks.

   ---- >>pool
   conc_pool_new(workers, cap, parent)  A macro over conc_pool_new_at(..., __FILE__,
                              __LINE__): starts workers (>= 1) registered threads with a
                              queue of cap jobs (0: hand-off) and a context derived from
                              parent (NULL = background). Returns: the pool, or NULL (workers
                              0, out of memory, or a thread could not be started; nothing is
                              left running).
   conc_pool_free(p)          conc_pool_shutdown(p, NULL, NULL, NULL) if not done, joins the
                              workers, frees. Blocks: until the running jobs return. NULL is a
                              no-op. Thread safety: the last use of p.
   conc_pool_submit(p, fn, arg, ctx)  Blocks: while no worker waits and the queue is full.
                              Returns: 0 (accepted: runs, or is reported unrun, exactly once);
                              the ctx's err (not taken); CONC_SHUTDOWN (shutdown has begun, also
                              while it blocked); CONC_INVALID (p or fn NULL).
   conc_pool_try_submit(p, fn, arg)  Never blocks. Returns: CONC_WOULD_BLOCK where submit
                              would block; otherwise as submit.
   conc_pool_submit_future(p, fn, arg, &f, ctx) / conc_pool_try_submit_future(p, fn, arg, &f)
                              As submit / try_submit, and on 0 puts in *f a future for the
                              job's result (free it with conc_future_free); on failure *f is
                              NULL. Returns also CONC_NOMEM (no future), CONC_INVALID (f NULL).
   conc_pool_shutdown(p, unrun, unrun_arg, ctx)  Stops accepting and refuses blocked submits;
                              Blocks: until queued and running jobs are done and the workers
                              joined, or ctx ends. Returns: 0; or the ctx's err, after
                              taking every job still queued out of the queue, cancelling
                              the pool's context and calling unrun(fn, arg, unrun_arg) (may
                              be NULL) on this thread for each job taken (their futures
                              complete with CONC_SHUTDOWN); jobs running then go on.
                              CONC_INVALID (p NULL). May be called again.
   conc_pool_ctx(p)           The pool's context (owned by p; valid until free).
   conc_pool_stats_get(p, &s) A snapshot of p's statistics, each read at one moment
                              (the counters are not frozen together: running and queued
                              may be off by the jobs moving at that moment). With cap > 0,
                              submitted, blocked, blocked_ns and high_water are the jobs
                              channel's own statistics (conc_chan_stats_get); with cap 0,
                              high_water and queued are 0.
   conc_future_wait(f, &r, ctx)  Blocks: until the job has run. Returns: 0 with the job's
                              return value in r (r may be NULL); CONC_SHUTDOWN (the job never
                              ran: shutdown reported it); the ctx's err; CONC_INVALID (f NULL).
                              May be called again, from any number of threads.
   conc_future_try_wait(f, &r)  Never blocks. CONC_WOULD_BLOCK until the job has run; then as
                              conc_future_wait.
   conc_future_free(f)        Drops the caller's handle. The job keeps its own reference until
                              it has run, and each blocked conc_future_wait its own until it
                              returns, so free may come at any time: waits already blocked
                              still get the result. The handle's last use (no new wait or
                              try_wait on f after it). Returns: 0. NULL is a no-op.
                              Thread safety (every >>pool function but the frees): any thread,
                              concurrently; also from a job, except shutdown and free (they
                              wait for the job itself). A job that waits for its own pool's
                              later jobs can deadlock a saturated pool, as in Go.

   ---- >>group
   conc_group_new(parent)     A macro over conc_group_new_at(parent, __FILE__, __LINE__): the
                              group, its context a child of parent (NULL = background), no
                              limit, no thread yet (threads start on demand and are registered
                              with this file:line). Returns NULL when out of memory.
   conc_group_free(g)         Waits for the running tasks, joins every thread, frees. Blocks:
                              until the tasks return. NULL is a no-op. The last use of g.
   conc_group_set_limit(g, n) At most n tasks run at once (n < 0: no limit; 0: none can be
                              added). Never blocks. Returns: 0; CONC_BUSY (tasks run or a go
                              waits: nothing changes); CONC_INVALID (g NULL). Thread safety:
                              a go racing it from another thread may run under either limit.
   conc_group_go(g, fn, arg, ctx)  Runs fn(arg, group ctx) on one of the group's threads.
                              Blocks: while the limit's number of tasks run. Returns: 0 (the
                              task is started); the ctx's err (not started); CONC_SYSTEM or
                              CONC_NOMEM (no thread could be started: not started);
                              CONC_INVALID (g or fn NULL).
   conc_group_try_go(g, fn, arg)  Never blocks (but may start a thread). Returns:
                              CONC_WOULD_BLOCK where go would block; otherwise as go.
   conc_group_wait(g, ctx)    Blocks: until every task accepted so far has returned. Then
                              cancels the group's context. Returns: the first task error, or 0;
                              the ctx's err if ctx ended first (tasks go on; call again);
                              CONC_INVALID (g NULL). A task error equal to the ctx's err is
                              told apart with conc_group_try_wait.
   conc_group_try_wait(g)     Never blocks. CONC_WOULD_BLOCK while tasks run; else as wait.
   conc_group_errors(g, out, cap)  Copies up to cap of the errors recorded so far, oldest
                              first (out may be NULL with cap 0). Returns: how many there are.
   conc_group_ctx(g)          The group's context (owned by g; valid until free).
   conc_group_stats_get(g, &s)  A snapshot: tasks started, finished, failed, go calls that
                              blocked and their total wait, threads started and still
                              live, tasks running.
                              Thread safety (every >>group function but free): any thread,
                              concurrently; also from a task (a task may call go on its own
                              group; with a limit it then needs a free slot like anyone), except
                              wait and free (they would wait for the task itself).

   ---- >>limiter
   conc_limiter_new(rate, burst)  A full bucket of burst >= 0 tokens refilled at rate
                              tokens per second (> 0; INFINITY: no limit). Returns NULL
                              when out of memory or on a bad argument (rate <= 0 or NaN,
                              burst < 0).
   conc_limiter_free(l)       Returns: 0, or CONC_BUSY (nothing freed) while waits sleep on
                              l. NULL is a no-op (0). Reservations on l must not be used
                              afterwards; free only after every call on l has returned.
   conc_limiter_allow(l, n)   Takes n tokens if they are there now. Never blocks. Returns:
                              true if taken; false if not (nothing taken), also for n >
                              burst with a finite rate, n < 0, l NULL. n == 0: true.
   conc_limiter_wait(l, n, ctx)  Reserves n tokens and sleeps until they exist. Blocks:
                              until then, or until ctx ends. Returns: 0 (taken);
                              CONC_DEADLINE_EXCEEDED at once, taking nothing, if ctx's
                              deadline comes before the tokens would (ctx itself may not
                              have ended yet); the ctx's err if it had ended (nothing
                              taken) or ends while waiting (the tokens no later
                              reservation counts on are given back); CONC_INVALID (l NULL,
                              n < 0, n > burst with a finite rate). n == 0 returns 0 at
                              once unless ctx has ended. If ctx ends just as the tokens
                              come due, whichever came first wins: 0, or ctx's err with
                              the tokens spent (x/time/rate does the same). CONC_NOMEM or
                              CONC_SYSTEM if it had to sleep and the timer (its heap, or
                              its thread) could not be set up: the tokens are given back
                              as when ctx ends.
   conc_limiter_reserve(l, n, &r)  Takes n tokens now, on credit if need be. Never blocks.
                              Returns: 0 (conc_reservation_delay(&r) says when to act);
                              CONC_INVALID (l NULL, n < 0, n > burst: r is then not ok, its
                              delay INT64_MAX and its cancel a no-op). r may be NULL (the
                              tokens are taken all the same).
   conc_reservation_delay(&r) Nanoseconds from now until r's tokens exist: 0 if they do,
                              INT64_MAX if r is not ok (or NULL). Act on r only after that.
   conc_reservation_cancel(&r)  Gives back r's tokens, minus those a later reservation has
                              counted on (x/time/rate's Reservation.Cancel); nothing if
                              their time has come (they are spent). Idempotent; NULL and
                              a reservation that is not ok are no-ops. Thread safety: any
                              thread, but not concurrently on the same reservation.
   conc_limiter_tokens(l)     Tokens in the bucket now (negative: reserved ahead); a
                              snapshot (0 for NULL).
   conc_limiter_set_rate(l, rate)  From now on tokens accrue at rate per second (> 0;
                              INFINITY: no limit); those accrued so far at the old rate
                              stay. Leaving INFINITY fills the bucket. Reservations already
                              made keep their time, and a cancel gives back at the rate a
                              reservation was made at (as x/time/rate). Never blocks. Returns: 0; CONC_INVALID
                              (l NULL, rate <= 0 or NaN: nothing changed).
   conc_limiter_set_burst(l, burst)  From now on the bucket holds at most burst >= 0 tokens:
                              a smaller burst throws away what is above it, a larger one
                              adds nothing at once. As set_rate otherwise (CONC_INVALID for
                              burst < 0).
   conc_limiter_rate(l), conc_limiter_burst(l)  The current rate (as given, INFINITY
                              included) and burst; 0 for NULL. Thread safety (every
                              >>limiter function but free): any thread, concurrently.

   ---- >>timer
   conc_timer_after(d)        One value after d ns. Returns NULL when out of memory.
   conc_timer_tick(p)         A value every p ns (p > 0, else NULL).
   conc_timer_chan(t)         The timer's channel (capacity 1, int64_t elements).
   conc_timer_stop(t)         Returns: true if the timer was active: a value was still to
                              come, or sat unreceived in the channel (Go 1.23). Afterwards
                              no value is buffered or will come.
   conc_timer_reset(t, d)     Restarts t to fire after d (then every d for a ticker),
                              dropping any buffered value. Returns as stop. A ticker needs
                              d > 0 (Go panics): d <= 0 changes nothing and returns false.
   conc_timer_free(t)         Stops and frees t. NULL is a no-op.
   conc_sleep(d, ctx)         Blocks: for d ns. Returns: 0, or the ctx's err if it ends
                              first; CONC_NOMEM or CONC_SYSTEM (no sleep) if the timer (its
                              heap, or its thread) could not be set up.

   ---- >>signal
   conc_signal_notify(p, sigs, n, &s)  Starts taking the n signals sigs[] (repeats allowed):
                              blocks them in the calling thread, starts the signal thread,
                              and puts in *s a handle whose context, a child of p (NULL =
                              background), is cancelled with cause = the signal number when
                              the first of them arrives (see SIGNALS). Never blocks.
                              Returns: 0; CONC_INVALID (s NULL, sigs NULL, n 0, a number
                              that is not a signal, SIGKILL, SIGSTOP, or one the C library
                              keeps for itself); CONC_BUSY (a live signal context has one of
                              them); CONC_NOMEM; CONC_SYSTEM (no thread could be started).
                              On failure *s is NULL and nothing has changed. Thread safety:
                              any thread, concurrently. A macro over conc_signal_notify_at
                              (..., file, line), which registers the thread with that site.
   conc_signal_ctx(s)         s's context (NULL for NULL). Owned by s: do not release it;
                              it is valid until conc_signal_stop(s), and contexts derived
                              from it may outlive s (they end with it).
   conc_signal_stop(s)        Ends the context with CONC_CANCELED if no signal has, wakes
                              and joins the signal thread, puts back the actions notify
                              replaced (see SIGNALS), and, called on the thread that called
                              notify, unblocks what notify blocked there. Frees s; NULL is a no-op.
                              Blocks: only for the join (the signal thread runs no user
                              code). Thread safety: any thread (also an after-func of the
                              context), once; the last use of s and of conc_signal_ctx(s).

   ---- >>thread
   conc_go(wg, fn, arg)       Adds 1 to wg (unless NULL), starts a thread that runs fn(arg)
                              then conc_wg_done(wg), and returns. The thread blocks every
                              signal; conc.h joins it once it has ended. A macro over
                              conc_go_at(wg, fn, arg, file, line), which records the site.
                              Returns: 0; CONC_INVALID (fn NULL); CONC_NOMEM; CONC_SYSTEM (no
                              thread could be started); conc_wg_add's error. On failure wg
                              is as it was and fn does not run. Never blocks (but a thread
                              start costs tens of us).
   conc_threads_live()        How many threads conc.h started are running now (fn not yet
                              returned), service threads included: a snapshot.
   conc_threads_list(out, cap)  Describes up to cap of them in out (oldest first; out may be
                              NULL with cap 0). Returns: how many there are.
   conc_leak_begin()          Begins a leak-check scope: returns its mark (the id of the last
                              thread started so far). Never blocks.
   conc_leak_check(scope, grace, ctx, leaked, cap, &n)  Blocks: until every non-service
                              thread started since conc_leak_begin returned scope has ended,
                              for at most grace ns (polling with growing gaps, 1 ms to
                              100 ms), or until ctx ends. Describes up to cap of the threads
                              still running in leaked[] (may be NULL with cap 0) and puts
                              their number in *n (n may be NULL). Returns: 0 (none runs);
                              CONC_LEAKED (some still run after the grace); the ctx's err if
                              it ended first while some still ran; CONC_NOMEM or CONC_SYSTEM
                              if a pause between polls could not be timed (see conc_sleep).
                              Called from a thread started in the scope (a conc_go thread),
                              it counts that thread too: check from outside the scope.
                              Thread safety (>>thread): any thread, concurrently.

   ---- >>map
   conc_parallel_map(ctx, in, in_size, out, out_size, n, limit, fn, arg)  Blocks: until
                              fn has returned for every item it was called for (see
                              PARALLEL MAP). Returns: 0 (fn returned 0 for all n items);
                              fn's first non-zero value; ctx's err if it ended before every
                              item had run; CONC_INVALID (fn NULL; in or out NULL with a
                              non-zero size; n * size overflows); CONC_NOMEM. n == 0 returns
                              0 at once. A macro over conc_parallel_map_at(..., file, line).
                              Thread safety: any thread, concurrently; fn runs on several
                              threads at once.
*/

#ifdef __cplusplus
}
#endif
#endif /* CONC_H_INCLUDED */

/* ======================================================================== */
/*                              IMPLEMENTATION                              */
/* ======================================================================== */
#ifdef CONC_IMPLEMENTATION
#ifndef CONC__IMPLEMENTATION_DONE
#define CONC__IMPLEMENTATION_DONE

#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#if !defined(_POSIX_C_SOURCE) || _POSIX_C_SOURCE < 200809L
#error "conc.h's implementation needs POSIX.1-2008: compile it with -D_POSIX_C_SOURCE=200809L (or _GNU_SOURCE)"
#endif

#if defined(CONC_MALLOC) && defined(CONC_FREE)
#elif !defined(CONC_MALLOC) && !defined(CONC_FREE)
#define CONC_MALLOC(sz) malloc(sz)
#define CONC_FREE(p) free(p)
#else
#error "conc.h: define both CONC_MALLOC and CONC_FREE, or neither"
#endif

#ifndef CONC_ASSERT
#include <assert.h>
#define CONC_ASSERT(c) assert(c)
#endif

#ifndef CONC_SPIN_NS
#define CONC_SPIN_NS 20000
#endif

#ifndef CONC_GROUP_IDLE_NS
#define CONC_GROUP_IDLE_NS (1000 * 1000 * 1000) /* 1 s, as the timer thread */
#endif

/* ---- Valgrind: Helgrind does not see the happens-before edges that C11 atomics carry.
   With CONC_VALGRIND the release/acquire points are annotated and the atomic words
   themselves are excluded from race checking; without it these are no-ops. */
#ifdef CONC_VALGRIND
#include <valgrind/helgrind.h>
/* An annotation names the object's second byte, not its address. DRD reads these
   annotations too, but ignores FORGET_ALL and keeps what it knows of a stack frame after
   the frame has ended (unless run with --check-stack-var=yes, ~10x slower): the annotation
   on a blocked call's waiter, which lives on its stack, outlived the call, and a mutex or
   condition variable later made at that address was "not a mutex". No pthread object
   starts at an odd address, and every annotated object is wider than a byte. */
#define CONC__HB_KEY(a) ((const char *)(a) + 1)
#define CONC__HB_BEFORE(a) ANNOTATE_HAPPENS_BEFORE(CONC__HB_KEY(a))
#define CONC__HB_AFTER(a) ANNOTATE_HAPPENS_AFTER(CONC__HB_KEY(a))
#define CONC__HB_FORGET(a) ANNOTATE_HAPPENS_BEFORE_FORGET_ALL(CONC__HB_KEY(a)) /* before the memory is reused */
#define CONC__UNCHECKED(a) VALGRIND_HG_DISABLE_CHECKING((a), sizeof *(a))
#define CONC__CHECKED(a) VALGRIND_HG_ENABLE_CHECKING((a), sizeof *(a))
#define CONC__ON_VALGRIND() (RUNNING_ON_VALGRIND != 0)
#else
#define CONC__HB_BEFORE(a) ((void)0)
#define CONC__HB_AFTER(a) ((void)0)
#define CONC__HB_FORGET(a) ((void)0)
#define CONC__UNCHECKED(a) ((void)0)
#define CONC__CHECKED(a) ((void)0)
#define CONC__ON_VALGRIND() 0
#endif

/* for the few helpers shared by two hot paths that differ by a constant (send / receive);
   and for slow paths kept out of line, so that the fast path around them needs no frame */
/* A point inside a narrow race window (between the two halves of a Dekker pair, say):
   nothing in a build for use. The race tests define it, before including conc.h, to a
   random yield, so that the other side of the race runs there often instead of once in
   millions of tries (tests/race_point.h). */
#ifndef CONC__RACE_POINT
#define CONC__RACE_POINT() ((void)0)
#endif

#if defined(__GNUC__) || defined(__clang__)
#define CONC__ALWAYS_INLINE static inline __attribute__((always_inline))
#define CONC__OUT_OF_LINE static __attribute__((noinline, cold))
#else
#define CONC__ALWAYS_INLINE static inline
#define CONC__OUT_OF_LINE static
#endif

#if defined(__x86_64__) || defined(__i386__)
#define CONC__PAUSE() __builtin_ia32_pause()
#elif defined(__aarch64__)
#define CONC__PAUSE() __asm__ __volatile__("yield")
#else
#define CONC__PAUSE() ((void)0)
#endif

#define CONC__LOCK(m) pthread_mutex_lock(m)
#define CONC__UNLOCK(m) pthread_mutex_unlock(m)
#define CONC__RELAXED memory_order_relaxed
#define CONC__ACQUIRE memory_order_acquire
#define CONC__RELEASE memory_order_release
#define CONC__ACQ_REL memory_order_acq_rel
#define CONC__SEQ_CST memory_order_seq_cst

/* ======================================================================== */
/* >>internal: status strings, clock, random numbers, locks                 */
/* ======================================================================== */

CONC_API const char *conc_strerror(int status) {
    switch (status) {
#define CONC__STATUS_CASE(name, value, text) \
    case value: return text;
        CONC__STATUS_LIST(CONC__STATUS_CASE)
#undef CONC__STATUS_CASE
    default: return status > 0 ? "user error" : "unknown status";
    }
}

CONC_API int64_t conc_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * CONC_SECOND + ts.tv_nsec;
}

static struct timespec conc__timespec(int64_t t) {
    struct timespec ts;
    if (t < 0) t = 0;
    ts.tv_sec = (time_t)(t / CONC_SECOND);
    ts.tv_nsec = (long)(t % CONC_SECOND);
    return ts;
}

/* xorshift64*: per-thread, for select's random order. */
static _Thread_local uint64_t conc__rng_state;
static uint32_t conc__rand(void) {
    uint64_t x = conc__rng_state;
    if (x == 0) x = (uint64_t)conc_now() ^ (uint64_t)(uintptr_t)&conc__rng_state ^ 0x9E3779B97F4A7C15u;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    conc__rng_state = x;
    return (uint32_t)((x * 0x2545F4914F6CDD1Du) >> 32);
}
static uint32_t conc__rand_below(uint32_t n) { return (uint32_t)(((uint64_t)conc__rand() * n) >> 32); }

/* A number naming the calling thread that no other thread ever gets: a pthread_t may be
   reused by a thread created after the first one was joined. */
static uint64_t conc__thread_serial(void) {
    static _Atomic uint64_t next = 1;
    static _Thread_local uint64_t me;
    if (me == 0) me = atomic_fetch_add_explicit(&next, 1, CONC__RELAXED);
    return me;
}

/* Channel and context mutexes are held for a few dozen instructions; glibc's adaptive
   mutex spins briefly before sleeping instead of paying a futex round trip (~13 us to
   wake a sleeper on the other vCPU) for every collision. */
static void conc__mutex_init(pthread_mutex_t *m) {
#if defined(PTHREAD_ADAPTIVE_MUTEX_INITIALIZER_NP) && defined(__GLIBC__)
    pthread_mutexattr_t a;
    pthread_mutexattr_init(&a);
    pthread_mutexattr_settype(&a, PTHREAD_MUTEX_ADAPTIVE_NP);
    pthread_mutex_init(m, &a);
    pthread_mutexattr_destroy(&a);
#else
    pthread_mutex_init(m, NULL);
#endif
}

/* Channel locks guard a few dozen instructions and are taken by every operation, so
   their cost under contention decides channel throughput. A pthread mutex sends both the
   waiting locker and the unlocker through futex syscalls once its short adaptive spin
   fails; this lock is an exchange to take and a plain store to drop, and a locker that
   finds it taken backs off with pause, then with sched_yield (which lets a preempted
   holder run again when threads outnumber cores). It is never held across anything
   that blocks. Built with CONC_VALGRIND and running under Valgrind, it is a pthread
   mutex instead, so that Helgrind checks the locking discipline; ThreadSanitizer checks
   the spinning one. */
typedef struct conc__spinlock {
    _Atomic int held;
#ifdef CONC_VALGRIND
    pthread_mutex_t *vg; /* used instead when running under Valgrind (kept off the hot line) */
#endif
} conc__spinlock;

static int conc__spin_init(conc__spinlock *l) {
    atomic_init(&l->held, 0);
#ifdef CONC_VALGRIND
    l->vg = (pthread_mutex_t *)CONC_MALLOC(sizeof *l->vg);
    if (!l->vg) return CONC_NOMEM;
    conc__mutex_init(l->vg);
#endif
    return 0;
}
static void conc__spin_destroy(conc__spinlock *l) {
#ifdef CONC_VALGRIND
    pthread_mutex_destroy(l->vg);
    CONC_FREE(l->vg);
#endif
    (void)l;
}
static void conc__spin_lock_slow(conc__spinlock *l) {
    for (unsigned round = 0;; round++) {
        if (round < 6) {
            for (unsigned k = 0; k < (4u << round); k++) CONC__PAUSE();
        } else {
            sched_yield();
        }
        if (atomic_load_explicit(&l->held, CONC__RELAXED) == 0 &&
            atomic_exchange_explicit(&l->held, 1, CONC__ACQUIRE) == 0)
            return;
    }
}
static inline void conc__spin_lock(conc__spinlock *l) {
    if (CONC__ON_VALGRIND()) {
#ifdef CONC_VALGRIND
        pthread_mutex_lock(l->vg);
#endif
        return;
    }
    if (atomic_exchange_explicit(&l->held, 1, CONC__ACQUIRE) != 0) conc__spin_lock_slow(l);
}
static inline void conc__spin_unlock(conc__spinlock *l) {
    if (CONC__ON_VALGRIND()) {
#ifdef CONC_VALGRIND
        pthread_mutex_unlock(l->vg);
#endif
        return;
    }
    atomic_store_explicit(&l->held, 0, CONC__RELEASE);
}

static int conc__ncpu(void) {
    static _Atomic int n;
    int k = atomic_load_explicit(&n, CONC__RELAXED);
    if (k == 0) {
        long v = sysconf(_SC_NPROCESSORS_ONLN);
        k = v < 1 ? 1 : (int)v;
        atomic_store_explicit(&n, k, CONC__RELAXED);
    }
    return k;
}

/* ======================================================================== */
/* >>internal: waiters and parking                                          */
/* ======================================================================== */
/* Every blocked call (a send, a receive, a select, a context wait, a sleep) owns one
   conc__sel on its stack and one conc__waiter per place it waits on (a channel's send or
   receive queue, a context's waiter list, the timer heap).

   Invariants:
   - sel.fired goes once from CONC__UNFIRED to the index of the case that completes the
     call (CONC__OWN_CTX when the call's own context ended). Whoever wins that CAS (the
     "claim") is the only one that may write the call's status and its element, and must
     then wake it. Everyone else who finds the waiter just unlinks it (a stale waiter).
   - A waiter is only linked, unlinked or inspected under the lock of the queue it is on;
     `queued` says whether it is linked. The owner unlinks what is still linked before the
     call returns, so nothing outlives the stack frame.
   - A claimed call cannot return before it is woken, so the claimer may touch the waiter
     after it has dropped the queue's lock, up to the wake.
   - Parking: park goes WAITING -> DONE (the waker's CAS, while the owner spins) or
     WAITING -> the address of the owner's parker, i.e. sleeping (the owner, under that
     parker's mutex) -> DONE (the waker, under that mutex, with a signal). The waker
     touches the parker only if it found its address there, and then the owner cannot
     leave before the waker unlocks. A timed park that runs out leaves park at the
     parker's address: the owner is still asleep as far as wakers know.
   - Layout: a single send/receive's waiter and the hot words of its sel fill exactly one
     cache line, which is all a completer touches of the blocked call besides its element. */

#define CONC__UNFIRED INT_MIN
#define CONC__OWN_CTX (-1)
#define CONC__PARK_WAITING ((uintptr_t)0)
#define CONC__PARK_DONE ((uintptr_t)1) /* any other value: the sleeping owner's conc__parker */

/* Each thread sleeps on its own mutex and condition variable, made once, never freed. */
typedef struct conc__parker {
    pthread_mutex_t mu;
    pthread_cond_t cv; /* on CLOCK_REALTIME: a static initializer cannot choose the clock */
} conc__parker;
static _Thread_local conc__parker conc__self_parker = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER};

typedef struct conc__sel {
    _Atomic int fired;        /* CONC__UNFIRED, then the index of the completing case (CAS) */
    int status;               /* written by the claimer before the wake */
    _Atomic uintptr_t park;   /* WAITING, DONE, or the sleeping owner's conc__parker */
} conc__sel;

typedef struct conc__waiter {
    struct conc__waiter *prev, *next; /* (queue's lock) */
    conc__sel *sel;                   /* the blocked call; NULL = not registered */
    void *elem;                       /* send: the value; receive: destination or NULL */
    int case_index;                   /* what sel.fired becomes if this waiter completes it */
    bool queued;                      /* (queue's lock) */
    int64_t since;                    /* channel waiters: when it queued (wait statistics) */
} conc__waiter;
_Static_assert(sizeof(conc__waiter) + sizeof(conc__sel) <= 64, "a blocked call's waiter and sel share one cache line");

typedef struct conc__wq {
    conc__waiter *head, *tail;
} conc__wq;

static void conc__wq_push(conc__wq *q, conc__waiter *w) {
    w->next = NULL;
    w->prev = q->tail;
    if (q->tail) q->tail->next = w;
    else q->head = w;
    q->tail = w;
    w->queued = true;
}

/* LIFO use (the group's idle workers: the most recent is the likeliest still spinning). */
static void conc__wq_push_front(conc__wq *q, conc__waiter *w) {
    w->prev = NULL;
    w->next = q->head;
    if (q->head) q->head->prev = w;
    else q->tail = w;
    q->head = w;
    w->queued = true;
}

static void conc__wq_remove(conc__wq *q, conc__waiter *w) {
    if (w->prev) w->prev->next = w->next;
    else q->head = w->next;
    if (w->next) w->next->prev = w->prev;
    else q->tail = w->prev;
    w->prev = w->next = NULL;
    w->queued = false;
}

static void conc__sel_init(conc__sel *s) {
    CONC__UNCHECKED(&s->fired);
    CONC__UNCHECKED(&s->park);
    atomic_init(&s->fired, CONC__UNFIRED);
    atomic_init(&s->park, CONC__PARK_WAITING);
    s->status = 0;
}

static void conc__sel_fini(conc__sel *s) {
    CONC__HB_FORGET(s);
    CONC__HB_FORGET(&s->park);
    CONC__CHECKED(&s->fired);
    CONC__CHECKED(&s->park);
    (void)s;
}

static bool conc__sel_claim(conc__sel *s, int index) {
    int expect = CONC__UNFIRED;
    return atomic_compare_exchange_strong_explicit(&s->fired, &expect, index, CONC__ACQ_REL, CONC__ACQUIRE);
}

/* Pops waiters until one can be claimed; stale ones are dropped on the way. */
static conc__waiter *conc__wq_claim(conc__wq *q) {
    conc__waiter *w;
    while ((w = q->head) != NULL) {
        conc__wq_remove(q, w);
        if (conc__sel_claim(w->sel, w->case_index)) return w;
    }
    return NULL;
}

/* Wakes the owner of a claimed sel. The owner may return the moment park reads DONE. */
static void conc__sel_wake(conc__sel *s) {
    uintptr_t expect = CONC__PARK_WAITING;
    CONC__HB_BEFORE(s);
    if (atomic_compare_exchange_strong_explicit(&s->park, &expect, CONC__PARK_DONE, CONC__RELEASE, CONC__ACQUIRE)) return;
    CONC_ASSERT(expect != CONC__PARK_DONE);
    CONC__HB_AFTER(&s->park);
    conc__parker *p = (conc__parker *)expect;
    CONC__LOCK(&p->mu);
    {
        atomic_store_explicit(&s->park, CONC__PARK_DONE, CONC__RELEASE);
        pthread_cond_signal(&p->cv);
    }
    CONC__UNLOCK(&p->mu);
}

/* The owner completes its own call (its timer fired, or a context it waits on had already
   ended while it registered). No-op if someone else claimed it first. */
static void conc__sel_complete_self(conc__sel *s, int index, int status) {
    if (!conc__sel_claim(s, index)) return;
    s->status = status;
    atomic_store_explicit(&s->park, CONC__PARK_DONE, CONC__RELEASE);
}

/* Wakes every claimed waiter of a list linked through `next` (built under some lock). */
static void conc__wake_list(conc__waiter *w) {
    while (w) {
        conc__waiter *next = w->next; /* read before the wake: the owner may return */
        conc__sel_wake(w->sel);
        w = next;
    }
}

/* Spinning. A hand-off between threads running on two vCPUs takes well under a
   microsecond; a sleep costs the waker ~13 us. So a blocked call first spins with `pause`
   for about CONC__SPIN_PAUSES iterations, then keeps checking between sched_yield()s
   until its budget runs out, then sleeps. The yield phase hands the CPU to any runnable
   thread - the peer it waits for, if both share a vCPU, or anyone else when threads
   outnumber cores - so spinning never keeps a runnable thread off a core for more than
   the short pause phase. Each thread adapts its budget: doubled after a spin that paid,
   halved after one that did not. Under Valgrind threads run one at a time: no spin. */
#define CONC__SPIN_PAUSES 128
#define CONC__SPIN_MIN_NS (CONC_SPIN_NS / 8)
static _Thread_local int64_t conc__spin_budget = CONC_SPIN_NS;
static bool conc__sel_is_done(conc__sel *s) {
    return atomic_load_explicit(&s->park, CONC__ACQUIRE) == CONC__PARK_DONE;
}

/* Spins until ready(arg) (true), or false when it is time to sleep: the phases above. */
CONC__ALWAYS_INLINE bool conc__spin(bool (*ready)(void *), void *arg) {
    if (ready(arg)) return true;
#if CONC_SPIN_NS > 0
    if (!CONC__ON_VALGRIND() && conc__ncpu() > 1) {
        for (int i = 0; i < CONC__SPIN_PAUSES; i++) {
            if (ready(arg)) return true;
            CONC__PAUSE();
        }
        /* the budget bounds the yield phase only; it never drops so low that a peer
           sharing our vCPU gets no chance to run before we sleep */
        int64_t budget = conc__spin_budget, t0 = conc_now();
        do {
            sched_yield();
            if (ready(arg)) {
                conc__spin_budget = budget * 2 < CONC_SPIN_NS ? budget * 2 : CONC_SPIN_NS;
                return true;
            }
        } while (conc_now() - t0 < budget);
        if (budget > CONC__SPIN_MIN_NS) conc__spin_budget = budget / 2;
    }
#endif
    return false;
}

static bool conc__sel_ready(void *s) { return conc__sel_is_done((conc__sel *)s); }

/* The spin phase of a park: true once the sel is DONE, false when it is time to sleep. */
static bool conc__sel_spin(conc__sel *s) { return conc__spin(conc__sel_ready, s); }

/* The sleep phase of a park: registers the owner's parker in park (unless a timed park
   that ran out left it there) and waits under its mutex for DONE, or until *until
   (CLOCK_REALTIME; NULL: no limit). True once DONE. */
static bool conc__sel_sleep(conc__sel *s, const struct timespec *until) {
    conc__parker *p = &conc__self_parker;
    bool done = true;
    CONC__HB_BEFORE(&s->park); /* the parker is published by the CAS below */
    CONC__LOCK(&p->mu);
    {
        uintptr_t expect = CONC__PARK_WAITING; /* fails on DONE, or on p already there */
        atomic_compare_exchange_strong_explicit(&s->park, &expect, (uintptr_t)p, CONC__ACQ_REL, CONC__ACQUIRE);
        while (atomic_load_explicit(&s->park, CONC__ACQUIRE) != CONC__PARK_DONE) {
            if (!until) {
                pthread_cond_wait(&p->cv, &p->mu);
            } else if (pthread_cond_timedwait(&p->cv, &p->mu, until) == ETIMEDOUT &&
                       atomic_load_explicit(&s->park, CONC__ACQUIRE) != CONC__PARK_DONE) {
                done = false; /* park keeps p: wakers still find the owner asleep */
                break;
            }
        }
    }
    CONC__UNLOCK(&p->mu);
    return done;
}

/* Blocks until the sel is DONE. */
static void conc__sel_park(conc__sel *s) {
    if (!conc__sel_spin(s)) conc__sel_sleep(s, NULL);
    CONC__HB_AFTER(s);
}

/* Blocks until the sel is DONE (true), or for about timeout_ns (false). The time-out is
   on CLOCK_REALTIME (the parker's clock; giving every thread a CLOCK_MONOTONIC one would
   mean an init and a destroy per thread): use it only where a wall-clock step does no
   harm - it moves when an idle thread ends, never a deadline of the user's. On false the
   owner is still registered asleep (park holds its parker), so a waker that claims it
   meanwhile stores DONE under the parker's mutex and signals, as usual. The owner must
   then settle under the lock of the queue its waiter is on: still queued means unclaimed
   (unlink it and go: nobody will touch the sel), else call this again - it goes on
   waiting, and sees DONE only under the mutex, so only once the waker has let go of it. */
static bool conc__sel_park_for(conc__sel *s, int64_t timeout_ns) {
    bool asleep = atomic_load_explicit(&s->park, CONC__ACQUIRE) != CONC__PARK_WAITING; /* DONE, or ran out */
    if (asleep || !conc__sel_spin(s)) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        ts = conc__timespec((int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec + timeout_ns);
        if (!conc__sel_sleep(s, &ts)) return false;
    }
    CONC__HB_AFTER(s);
    return true;
}


/* ======================================================================== */
/* >>internal: the thread registry                                          */
/* ======================================================================== */
/* Every thread conc.h starts - the timer and runner threads, signal threads, conc_go's
   threads, pool and group workers - goes through conc__thread_start and is listed here
   with its purpose and the file:line that started it, for conc_threads_list and the leak
   checks (>>thread). A record lives from just before pthread_create until the thread is
   joined: by its owner (conc__thread_join), or, for conc_go's threads, which nobody joins,
   by the registry (conc__threads_reap) once they have ended.

   Invariants:
   - state goes RUNNING -> ENDED once, when fn has returned (the thread touches its record
     no more after that). live counts the RUNNING records.
   - handle is valid once has_handle is set; has_handle and state are read and written
     under conc__threads.mu, so a reaper that sees both has a handle to join.
   - info is immutable once the record is listed.
   Lock order: conc__threads.mu is a leaf (held for list updates only; nothing is taken or
   joined under it). */

enum { CONC__THREAD_SERVICE = 1u, CONC__THREAD_REAP = 2u };
enum { CONC__TH_RUNNING, CONC__TH_ENDED };

typedef struct conc__thread {
    struct conc__thread *prev, *next; /* (threads.mu) the list, oldest first */
    pthread_t handle;                 /* (threads.mu) valid once has_handle */
    bool has_handle;                  /* (threads.mu) */
    int state;                        /* (threads.mu) CONC__TH_* */
    unsigned flags;                   /* immutable: CONC__THREAD_* */
    void (*fn)(void *arg);            /* immutable */
    void *arg;
    conc_wg_t *wg;                    /* immutable: conc_go's group, done after fn */
    conc_thread_info info;            /* immutable */
} conc__thread;

static struct {
    pthread_mutex_t mu;
    conc__thread *head, *tail; /* (mu) */
    uint64_t last_id;          /* (mu) ids are 1, 2, ... in start order */
    size_t live;               /* (mu) RUNNING records */
    size_t to_reap;            /* (mu) ENDED REAP records not yet joined: reaps skip the walk */
} conc__threads = {PTHREAD_MUTEX_INITIALIZER, NULL, NULL, 0, 0, 0};
static pthread_once_t conc__threads_once = PTHREAD_ONCE_INIT;

static void conc__threads_unlink(conc__thread *t) { /* threads.mu held */
    if (t->prev) t->prev->next = t->next;
    else conc__threads.head = t->next;
    if (t->next) t->next->prev = t->prev;
    else conc__threads.tail = t->prev;
    t->prev = t->next = NULL;
}

/* Joins and frees conc_go's threads that have ended (nobody else joins them): memory and
   the kernel's thread slot come back without waiting for the process to exit. */
static void conc__threads_reap(void) {
    conc__thread *ended = NULL;
    CONC__LOCK(&conc__threads.mu);
    if (conc__threads.to_reap > 0) {
        conc__thread *t = conc__threads.head;
        while (t) {
            conc__thread *next = t->next;
            if ((t->flags & CONC__THREAD_REAP) && t->state == CONC__TH_ENDED && t->has_handle) {
                conc__threads_unlink(t);
                conc__threads.to_reap--;
                t->next = ended;
                ended = t;
            }
            t = next;
        }
    }
    CONC__UNLOCK(&conc__threads.mu);
    while (ended) {
        conc__thread *next = ended->next;
        pthread_join(ended->handle, NULL); /* it has ended: returns at once */
        CONC_FREE(ended);
        ended = next;
    }
}

static void conc__threads_init(void) { atexit(conc__threads_reap); }

static void *conc__thread_main(void *p) {
    conc__thread *t = (conc__thread *)p;
    t->fn(t->arg);
    conc_wg_t *wg = t->wg; /* the record may be reaped once ENDED is seen */
    CONC__LOCK(&conc__threads.mu);
    {
        t->state = CONC__TH_ENDED;
        conc__threads.live--;
        if (t->flags & CONC__THREAD_REAP) conc__threads.to_reap++;
    }
    CONC__UNLOCK(&conc__threads.mu);
    if (wg) conc_wg_done(wg);
    return NULL;
}

/* Starts fn(arg) on a new thread with every signal blocked (conc's threads never take
   signals: applications can sigwait in a thread of theirs), registered with purpose (a
   static string) and file:line (the user's call site). flags: CONC__THREAD_*. wg: done
   after fn returns (REAP threads). Returns 0, CONC_NOMEM or CONC_SYSTEM. */
static int conc__thread_start_wg(conc__thread **out, void (*fn)(void *arg), void *arg, const char *purpose,
                                 const char *file, int line, unsigned flags, conc_wg_t *wg) {
    pthread_once(&conc__threads_once, conc__threads_init);
    conc__thread *t = (conc__thread *)CONC_MALLOC(sizeof *t);
    if (!t) return CONC_NOMEM;
    memset(t, 0, sizeof *t);
    t->state = CONC__TH_RUNNING;
    t->flags = flags;
    t->fn = fn;
    t->arg = arg;
    t->wg = wg;
    t->info.purpose = purpose;
    t->info.file = file;
    t->info.line = line;
    t->info.started_ns = conc_now();
    t->info.service = (flags & CONC__THREAD_SERVICE) != 0;
    CONC__LOCK(&conc__threads.mu);
    {
        t->info.id = ++conc__threads.last_id;
        t->prev = conc__threads.tail;
        if (conc__threads.tail) conc__threads.tail->next = t;
        else conc__threads.head = t;
        conc__threads.tail = t;
        conc__threads.live++;
    }
    CONC__UNLOCK(&conc__threads.mu);

    sigset_t all, old;
    pthread_t handle;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    int rc = pthread_create(&handle, NULL, conc__thread_main, t);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    CONC__LOCK(&conc__threads.mu);
    {
        if (rc == 0) {
            t->handle = handle;
            t->has_handle = true;
        } else {
            conc__threads_unlink(t);
            conc__threads.live--;
        }
    }
    CONC__UNLOCK(&conc__threads.mu);
    if (rc != 0) {
        CONC_FREE(t);
        return CONC_SYSTEM;
    }
    if (out) *out = t;
    return 0;
}

static int conc__thread_start(conc__thread **out, void (*fn)(void *arg), void *arg, const char *purpose,
                              const char *file, int line, unsigned flags) {
    return conc__thread_start_wg(out, fn, arg, purpose, file, line, flags & ~(unsigned)CONC__THREAD_REAP, NULL);
}

/* Waits for the thread to end and frees its record. Once per record, by its owner. */
static void conc__thread_join(conc__thread *t) {
    pthread_t h;
    CONC__LOCK(&conc__threads.mu);
    h = t->handle;
    CONC__UNLOCK(&conc__threads.mu);
    pthread_join(h, NULL);
    CONC__LOCK(&conc__threads.mu);
    conc__threads_unlink(t);
    CONC__UNLOCK(&conc__threads.mu);
    CONC_FREE(t);
}

static pthread_t conc__thread_handle(conc__thread *t) {
    pthread_t h;
    CONC__LOCK(&conc__threads.mu);
    h = t->handle;
    CONC__UNLOCK(&conc__threads.mu);
    return h;
}

/* ======================================================================== */
/* >>internal: the timer thread                                             */
/* ======================================================================== */
/* One thread serves every deadline, timer, ticker and sleep: a binary min-heap of entries
   ordered by `when`, guarded by conc__timers.mu. The thread starts with the first entry,
   leaves after CONC__TIMER_IDLE_NS without entries, and is joined by whoever starts the
   next one, or at exit.

   Invariants:
   - entry.idx is its heap position while it is in the heap, CONC__NOT_IN_HEAP otherwise
     (guarded by conc__timers.mu). Whoever takes an entry out of the heap - the thread
     when it fires, or conc__timer_remove - owns whatever reference the entry held.
   - Most entries fire under conc__timers.mu (a try_send into a timer's channel, waking a
     sleeper), so stop/reset see a timer either before or after its fire, never during.
     Context deadlines fire without it (cancellation runs user after-funcs).
   Lock order: conc__timers.mu -> channel locks (a timer fires into its channel). */

#define CONC__NOT_IN_HEAP SIZE_MAX
#define CONC__TIMER_IDLE_NS (1 * CONC_SECOND)

typedef struct conc__tentry {
    int64_t when;                                      /* (timers.mu) */
    size_t idx;                                        /* (timers.mu) heap position */
    void (*fire)(struct conc__tentry *e, int64_t now); /* immutable once added */
    bool fire_unlocked;                                /* fire without timers.mu */
} conc__tentry;

/* A call deferred to the runner thread (after-funcs of contexts that reached their
   deadline: user code must not hold up the timer thread, which it may itself need). */
typedef struct conc__deferred {
    struct conc__deferred *next;                /* (timers.mu) while queued */
    void (*run)(struct conc__deferred *d, bool really); /* really=false: discard at exit */
} conc__deferred;

/* conc's own threads: started on demand, leave when idle, joined by the next start or at
   exit. Each blocks every signal. */
enum { CONC__TT_NONE, CONC__TT_RUNNING, CONC__TT_EXITED };
typedef struct conc__svc {
    conc__thread *thread; /* (timers.mu) valid unless state == CONC__TT_NONE */
    int state;        /* (timers.mu) CONC__TT_* */
} conc__svc;

static struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;         /* CLOCK_MONOTONIC; signalled when the earliest entry changes */
    pthread_cond_t runner_cv;  /* CLOCK_MONOTONIC; signalled when a call is deferred */
    conc__tentry **heap;       /* (mu) */
    size_t n, cap;             /* (mu) */
    conc__deferred *dq_head, *dq_tail; /* (mu) FIFO of deferred calls */
    conc__svc timer, runner;   /* (mu) */
    bool stopping;             /* (mu) set at exit: no thread starts any more */
} conc__timers = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, PTHREAD_COND_INITIALIZER, NULL, 0, 0,
                  NULL, NULL, {0}, {0}, false};
static pthread_once_t conc__timers_once = PTHREAD_ONCE_INIT;

static void conc__svc_join(conc__svc *svc) {
    conc__thread *t;
    int state;
    CONC__LOCK(&conc__timers.mu);
    t = svc->thread;
    state = svc->state;
    CONC__UNLOCK(&conc__timers.mu);
    if (state == CONC__TT_NONE || pthread_equal(conc__thread_handle(t), pthread_self())) return; /* exit() from our own thread */
    conc__thread_join(t);
    CONC__LOCK(&conc__timers.mu);
    svc->state = CONC__TT_NONE;
    CONC__UNLOCK(&conc__timers.mu);
}

static void conc__timer_atexit(void) {
    CONC__LOCK(&conc__timers.mu);
    conc__timers.stopping = true;
    pthread_cond_signal(&conc__timers.cv);
    pthread_cond_signal(&conc__timers.runner_cv);
    CONC__UNLOCK(&conc__timers.mu);
    conc__svc_join(&conc__timers.timer);
    conc__svc_join(&conc__timers.runner);
    conc__deferred *d;
    CONC__LOCK(&conc__timers.mu);
    {
        /* entries still pending at exit never fire; only the array is ours */
        for (size_t i = 0; i < conc__timers.n; i++) conc__timers.heap[i]->idx = CONC__NOT_IN_HEAP;
        CONC_FREE(conc__timers.heap);
        conc__timers.heap = NULL;
        conc__timers.n = conc__timers.cap = 0;
        d = conc__timers.dq_head;
        conc__timers.dq_head = conc__timers.dq_tail = NULL;
    }
    CONC__UNLOCK(&conc__timers.mu);
    while (d) { /* like goroutines at exit, deferred calls that have not started never do */
        conc__deferred *next = d->next;
        d->run(d, false);
        d = next;
    }
}

static void conc__timers_init(void) {
    pthread_condattr_t a;
    pthread_condattr_init(&a);
    pthread_condattr_setclock(&a, CLOCK_MONOTONIC);
    pthread_cond_init(&conc__timers.cv, &a);
    pthread_cond_init(&conc__timers.runner_cv, &a);
    pthread_condattr_destroy(&a);
    atexit(conc__timer_atexit);
}

/* timers.mu held. Starts svc's thread if it has none; joins one that left while idle. */
static int conc__svc_ensure(conc__svc *svc, void (*main_fn)(void *), const char *purpose) {
    if (svc->state == CONC__TT_RUNNING || conc__timers.stopping) return 0;
    if (svc->state == CONC__TT_EXITED) {
        conc__thread_join(svc->thread); /* it no longer takes the lock we hold */
        svc->state = CONC__TT_NONE;
    }
    int rc = conc__thread_start(&svc->thread, main_fn, NULL, purpose, __FILE__, __LINE__, CONC__THREAD_SERVICE);
    if (rc != 0) return rc;
    svc->state = CONC__TT_RUNNING;
    return 0;
}

static void conc__heap_set(size_t i, conc__tentry *e) {
    conc__timers.heap[i] = e;
    e->idx = i;
}

static void conc__heap_up(size_t i) {
    conc__tentry *e = conc__timers.heap[i];
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (conc__timers.heap[p]->when <= e->when) break;
        conc__heap_set(i, conc__timers.heap[p]);
        i = p;
    }
    conc__heap_set(i, e);
}

static void conc__heap_down(size_t i) {
    conc__tentry *e = conc__timers.heap[i];
    size_t n = conc__timers.n;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= n) break;
        if (c + 1 < n && conc__timers.heap[c + 1]->when < conc__timers.heap[c]->when) c++;
        if (e->when <= conc__timers.heap[c]->when) break;
        conc__heap_set(i, conc__timers.heap[c]);
        i = c;
    }
    conc__heap_set(i, e);
}

/* timers.mu held */
static void conc__heap_remove(conc__tentry *e) {
    size_t i = e->idx;
    conc__tentry *last = conc__timers.heap[--conc__timers.n];
    e->idx = CONC__NOT_IN_HEAP;
    if (last == e) return;
    conc__heap_set(i, last);
    if (i > 0 && conc__timers.heap[(i - 1) / 2]->when > last->when) conc__heap_up(i);
    else conc__heap_down(i);
}

/* timers.mu held; returns with it held. Waits up to the idle time for work; false once
   the thread should leave. */
static bool conc__svc_idle_wait(pthread_cond_t *cv, bool (*has_work)(void)) {
    struct timespec ts = conc__timespec(conc_now() + CONC__TIMER_IDLE_NS);
    while (!conc__timers.stopping && !has_work())
        if (pthread_cond_timedwait(cv, &conc__timers.mu, &ts) == ETIMEDOUT) return has_work() && !conc__timers.stopping;
    return !conc__timers.stopping;
}

static bool conc__heap_has_work(void) { return conc__timers.n > 0; }
static bool conc__dq_has_work(void) { return conc__timers.dq_head != NULL; }

static void conc__timer_main(void *arg) {
    (void)arg;
    CONC__LOCK(&conc__timers.mu);
    while (!conc__timers.stopping) {
        if (conc__timers.n == 0) {
            if (!conc__svc_idle_wait(&conc__timers.cv, conc__heap_has_work)) break;
            continue;
        }
        conc__tentry *e = conc__timers.heap[0];
        int64_t now = conc_now();
        if (e->when > now) {
            struct timespec ts = conc__timespec(e->when);
            pthread_cond_timedwait(&conc__timers.cv, &conc__timers.mu, &ts);
            continue;
        }
        conc__heap_remove(e);
        if (e->fire_unlocked) {
            CONC__UNLOCK(&conc__timers.mu);
            e->fire(e, now);
            CONC__LOCK(&conc__timers.mu);
        } else {
            e->fire(e, now);
        }
    }
    conc__timers.timer.state = CONC__TT_EXITED;
    CONC__UNLOCK(&conc__timers.mu);
}

static void conc__runner_main(void *arg) {
    (void)arg;
    CONC__LOCK(&conc__timers.mu);
    while (conc__svc_idle_wait(&conc__timers.runner_cv, conc__dq_has_work)) {
        conc__deferred *d = conc__timers.dq_head;
        conc__timers.dq_head = d->next;
        if (!d->next) conc__timers.dq_tail = NULL;
        CONC__UNLOCK(&conc__timers.mu);
        d->run(d, true);
        CONC__LOCK(&conc__timers.mu);
    }
    conc__timers.runner.state = CONC__TT_EXITED;
    CONC__UNLOCK(&conc__timers.mu);
}

/* Queues a list of deferred calls (linked through next) for the runner thread; runs them
   here if no thread can be started. */
static void conc__defer(conc__deferred *list) {
    if (!list) return;
    pthread_once(&conc__timers_once, conc__timers_init);
    conc__deferred *last = list;
    while (last->next) last = last->next;
    bool exiting;
    CONC__LOCK(&conc__timers.mu);
    exiting = conc__timers.stopping;
    int rc = exiting ? 0 : conc__svc_ensure(&conc__timers.runner, conc__runner_main, "deadline runner");
    if (rc == 0 && !exiting) {
        if (conc__timers.dq_tail) conc__timers.dq_tail->next = list;
        else conc__timers.dq_head = list;
        conc__timers.dq_tail = last;
        pthread_cond_signal(&conc__timers.runner_cv);
        list = NULL;
    }
    CONC__UNLOCK(&conc__timers.mu);
    /* at exit they never run, as those still queued (conc__timer_atexit); with no runner
       thread to be had (the system is out of threads) they run here, late rather than never */
    while (list) {
        conc__deferred *next = list->next;
        list->run(list, !exiting);
        list = next;
    }
}

/* timers.mu held. */
static int conc__timer_add_locked(conc__tentry *e) {
    if (conc__timers.n == conc__timers.cap) {
        size_t cap = conc__timers.cap ? conc__timers.cap * 2 : 64;
        conc__tentry **h = (conc__tentry **)CONC_MALLOC(cap * sizeof *h);
        if (!h) return CONC_NOMEM;
        if (conc__timers.n) memcpy(h, conc__timers.heap, conc__timers.n * sizeof *h);
        CONC_FREE(conc__timers.heap);
        conc__timers.heap = h;
        conc__timers.cap = cap;
    }
    int rc = conc__svc_ensure(&conc__timers.timer, conc__timer_main, "timer");
    if (rc != 0) return rc;
    conc__heap_set(conc__timers.n++, e);
    conc__heap_up(e->idx);
    if (e->idx == 0) pthread_cond_signal(&conc__timers.cv);
    return 0;
}

static int conc__timer_add(conc__tentry *e) {
    pthread_once(&conc__timers_once, conc__timers_init);
    int rc;
    CONC__LOCK(&conc__timers.mu);
    rc = conc__timer_add_locked(e);
    CONC__UNLOCK(&conc__timers.mu);
    return rc;
}

/* Returns true if e was still pending (the caller now owns what the entry held). */
static bool conc__timer_remove(conc__tentry *e) {
    bool was = false;
    pthread_once(&conc__timers_once, conc__timers_init);
    CONC__LOCK(&conc__timers.mu);
    if (e->idx != CONC__NOT_IN_HEAP) {
        conc__heap_remove(e);
        was = true;
    }
    CONC__UNLOCK(&conc__timers.mu);
    return was;
}

/* ======================================================================== */
/* >>ctx: contexts                                                          */
/* ======================================================================== */
/* A tree of heap nodes, each with its own mutex.

   Invariants:
   - err goes once from 0 to CONC_CANCELED / CONC_DEADLINE_EXCEEDED, under mu, after cause
     is written; it is read without the lock (acquire). Once err is set the node has no
     kids, no waiters and no pending after-funcs, and never gets any.
   - A node that can end (can_end: it is cancellable or has an ancestor that is) and has
     not ended is linked in its parent's kids list if the parent can end. The list holds
     no reference; a node unlinks itself before it is freed.
   - refs counts: the creator's (dropped by release), one per child (child->parent), one
     for a pending deadline entry, one per after-func handle, and one per cancellation walk
     that is processing the node. Walks take theirs only if refs is not already 0
     (a node at 0 is being freed and is just unlinked).
   - Once err is set no kid is linked any more; the kids linked before are ended and
     detached by the walk that set it.
   - walking is set, under mu and before err, on the root of a cancellation walk and on
     every node the walk will end the kids of, and cleared (release) when the whole walk is
     done, after every descendant's err: so a cancel that reads err set and walking clear
     may return without the lock, and a second call
     that ends a node (a racing cancel, release or deadline), finding err set, waits while
     walking is set, and returns, as the first does, only once every descendant has ended
     (Go holds the node's lock for the whole propagation; this walk holds one at a time).
     A walk meets nodes ended by another walk only as that walk's root (a node ended as a
     kid is detached from its parent at once, so no other walk reaches it): it waits for
     such a root's walk before its own ends. Those roots lie strictly below its own, so
     walks wait for walks further down the tree only: no cycle.
   Lock order: parent.mu -> child.mu (the cancel walk ends each kid under its parent's lock;
   nothing takes a parent's lock while holding a child's). Channel locks -> ctx.mu (a
   blocked call registers while holding its channels). */

enum { CONC__CTX_BACKGROUND, CONC__CTX_CANCEL, CONC__CTX_VALUE };

struct conc_after_func {
    conc_after_func_t *prev, *next; /* (ctx->mu) while pending; then the run list */
    conc_ctx_t *ctx;                /* holds a reference until stop */
    void (*fn)(void *arg);
    void *arg;
    int state;                      /* (ctx->mu) CONC__AF_* */
    bool linked;                    /* (ctx->mu) in ctx->afs */
    _Atomic int refs;               /* the handle; a pending run */
    conc__deferred deferred;        /* when a deadline ended ctx: run on the runner thread */
};
enum { CONC__AF_PENDING, CONC__AF_STARTED, CONC__AF_STOPPED };

struct conc_ctx {
    pthread_mutex_t mu;
    _Atomic int err;                  /* see invariants */
    int cause;                        /* (mu) written before err */
    _Atomic int refs;
    conc_ctx_t *parent;               /* immutable; holds a reference */
    conc_ctx_t *sib_prev, *sib_next;  /* (parent->mu) */
    bool linked;                      /* (parent->mu) in parent->kids */
    conc_ctx_t *kids;                 /* (mu) */
    conc_ctx_t *work_next;            /* owned by the walk that unlinked this node */
    _Atomic bool walking;             /* a walk is ending its descendants (invariants): written
                                         under mu, set before err, cleared (release) at the end */
    conc__wq waiters;                 /* (mu) blocked calls */
    conc_after_func_t *afs;           /* (mu) pending after-funcs */
    int64_t deadline;                 /* immutable: effective deadline or INT64_MAX */
    conc__tentry timer;               /* own deadline, when earlier than the parent's */
    const void *key;                  /* immutable (value contexts) */
    void *value;
    unsigned char kind;               /* immutable: CONC__CTX_* */
    bool can_end;                     /* immutable */
    bool has_timer;                   /* immutable */
};

static conc_ctx_t conc__background = {PTHREAD_MUTEX_INITIALIZER, 0, 0, 0, NULL, NULL, NULL, false, NULL, NULL,
                                      false, {NULL, NULL}, NULL, INT64_MAX, {0, CONC__NOT_IN_HEAP, NULL, false},
                                      NULL, NULL, CONC__CTX_BACKGROUND, false, false};

static void conc__ctx_ref(conc_ctx_t *c) {
    if (c->kind != CONC__CTX_BACKGROUND) atomic_fetch_add_explicit(&c->refs, 1, CONC__RELAXED);
}

static bool conc__ctx_ref_unless_zero(conc_ctx_t *c) {
    int r = atomic_load_explicit(&c->refs, CONC__RELAXED);
    while (r != 0)
        if (atomic_compare_exchange_weak_explicit(&c->refs, &r, r + 1, CONC__RELAXED, CONC__RELAXED)) return true;
    return false;
}

/* Takes c out of its parent's kids list, if it is still there. */
static void conc__ctx_unlink(conc_ctx_t *c) {
    conc_ctx_t *p = c->parent;
    if (!p->can_end) return;
    CONC__LOCK(&p->mu);
    if (c->linked) {
        if (c->sib_prev) c->sib_prev->sib_next = c->sib_next;
        else p->kids = c->sib_next;
        if (c->sib_next) c->sib_next->sib_prev = c->sib_prev;
        c->linked = false;
    }
    CONC__UNLOCK(&p->mu);
}

/* Drops a reference; frees the node (and, iteratively, ancestors that drop to 0). */
static void conc__ctx_unref(conc_ctx_t *c) {
    while (c && c->kind != CONC__CTX_BACKGROUND) {
        CONC__HB_BEFORE(&c->refs);
        if (atomic_fetch_sub_explicit(&c->refs, 1, CONC__ACQ_REL) != 1) return;
        CONC__HB_AFTER(&c->refs);
        conc_ctx_t *p = c->parent;
        conc__ctx_unlink(c);
        pthread_mutex_destroy(&c->mu);
        CONC__HB_FORGET(&c->err);
        CONC__HB_FORGET(&c->refs);
        CONC__HB_FORGET(&c->walking);
        CONC__CHECKED(&c->err);
        CONC__CHECKED(&c->refs);
        CONC__CHECKED(&c->walking);
        CONC_FREE(c);
        c = p;
    }
}

static void conc__af_unref(conc_after_func_t *af) {
    CONC__HB_BEFORE(&af->refs);
    if (atomic_fetch_sub_explicit(&af->refs, 1, CONC__ACQ_REL) != 1) return;
    CONC__HB_AFTER(&af->refs);
    CONC__HB_FORGET(&af->refs);
    CONC__CHECKED(&af->refs);
    CONC_FREE(af);
}

/* x->mu held. Ends x itself, if it is live: collects its waiters (claimed, to wake) and
   its after-funcs (to run). Its kids are the walk's business. */
static void conc__ctx_end_node(conc_ctx_t *x, int err, int cause, conc__waiter **wake, conc_after_func_t **run) {
    conc__waiter *w;
    if (atomic_load_explicit(&x->err, CONC__RELAXED) != 0) return;
    x->cause = cause;
    CONC__HB_BEFORE(&x->err);
    atomic_store_explicit(&x->err, err, CONC__RELEASE);
    while ((w = x->waiters.head) != NULL) {
        conc__wq_remove(&x->waiters, w);
        if (conc__sel_claim(w->sel, w->case_index)) {
            w->sel->status = err;
            w->next = *wake;
            *wake = w;
        }
    }
    for (conc_after_func_t *af = x->afs, *next; af; af = next) {
        next = af->next;
        af->state = CONC__AF_STARTED;
        af->linked = false;
        af->next = *run;
        *run = af;
    }
    x->afs = NULL;
}

/* x->mu held, x ended. Ends each kid under its own lock (parent before child is the one
   nesting the tree allows); kids that have kids or a timer go on the work list with a
   reference (and walking set), the rest (the leaves) cost no atomic operation. A kid
   already ended is another walk's root: if that walk is not done, it goes on `others`
   with a reference, to be waited for. */
static void conc__ctx_end_kids(conc_ctx_t *x, int err, int cause, conc__waiter **wake, conc_after_func_t **run,
                               conc_ctx_t **work, conc_ctx_t **others) {
    for (conc_ctx_t *k = x->kids, *next; k; k = next) {
        next = k->sib_next;
        k->linked = false;
        k->sib_prev = k->sib_next = NULL;
        CONC__LOCK(&k->mu);
        {
            if (atomic_load_explicit(&k->err, CONC__RELAXED) != 0) {
                if (atomic_load_explicit(&k->walking, CONC__RELAXED) && conc__ctx_ref_unless_zero(k)) {
                    k->work_next = *others;
                    *others = k;
                }
            } else {
                /* refs == 0: k is being freed (its freer waits for x->mu); it has no kids */
                if ((k->kids || k->has_timer) && conc__ctx_ref_unless_zero(k)) {
                    atomic_store_explicit(&k->walking, true, CONC__RELAXED); /* before err */
                    k->work_next = *work;
                    *work = k;
                }
                conc__ctx_end_node(k, err, cause, wake, run);
            }
        }
        CONC__UNLOCK(&k->mu);
    }
    x->kids = NULL;
}

/* The walk over x's descendants is done: every err it stored happens before a load that
   reads walking clear. */
static void conc__ctx_walk_done(conc_ctx_t *x) {
    CONC__LOCK(&x->mu);
    CONC__HB_BEFORE(&x->walking);
    atomic_store_explicit(&x->walking, false, CONC__RELEASE);
    CONC__UNLOCK(&x->mu);
}

/* Waits until the walk ending x is done (x->walking clear); x->mu held on entry and on
   return. The walk holds no lock a waiter holds and takes microseconds: yield meanwhile. */
static void conc__ctx_wait_walk_locked(conc_ctx_t *x) {
    while (atomic_load_explicit(&x->walking, CONC__RELAXED)) {
        CONC__UNLOCK(&x->mu);
        sched_yield();
        CONC__LOCK(&x->mu);
    }
}

static void conc__af_run_deferred(conc__deferred *d, bool really) {
    conc_after_func_t *af = (conc_after_func_t *)(void *)((char *)d - offsetof(conc_after_func_t, deferred));
    if (really) af->fn(af->arg);
    conc__af_unref(af);
}

/* Ends c and every descendant with err/cause. Iterative: a walk over a chain of any depth
   uses no stack. Waiters are woken and after-funcs run once every lock is released: here,
   or on the runner thread if `defer_funcs` (the timer thread must not run user code). */
static void conc__ctx_end(conc_ctx_t *c, int err, int cause, bool defer_funcs) {
    conc__waiter *wake = NULL;
    conc_after_func_t *run = NULL;
    conc_ctx_t *work = NULL;
    conc_ctx_t *others = NULL, *done = NULL;
    CONC__LOCK(&c->mu);
    if (atomic_load_explicit(&c->err, CONC__RELAXED) != 0) { /* its ender does the rest: wait for it */
        conc__ctx_wait_walk_locked(c);
        CONC__UNLOCK(&c->mu);
        return;
    }
    atomic_store_explicit(&c->walking, true, CONC__RELAXED); /* before err (see cancel) */
    conc__ctx_end_node(c, err, cause, &wake, &run);
    conc__ctx_end_kids(c, err, cause, &wake, &run, &work, &others);
    CONC__UNLOCK(&c->mu);
    CONC__RACE_POINT(); /* c ended, its descendants not yet: second callers must wait */
    if (c->has_timer && conc__timer_remove(&c->timer)) conc__ctx_unref(c); /* the entry's ref */
    while (work) {
        conc_ctx_t *x = work;
        work = x->work_next;
        CONC__LOCK(&x->mu);
        conc__ctx_end_kids(x, err, cause, &wake, &run, &work, &others);
        CONC__UNLOCK(&x->mu);
        CONC__RACE_POINT(); /* one level more ended; another walk may meet ours now */
        if (x->has_timer && conc__timer_remove(&x->timer)) conc__ctx_unref(x);
        x->work_next = done; /* walking stays set, and the walk's ref held, until the end */
        done = x;
    }
    while (others) { /* other walks' roots below ours: their subtrees are part of ours */
        conc_ctx_t *x = others;
        others = x->work_next;
        CONC__LOCK(&x->mu);
        conc__ctx_wait_walk_locked(x);
        CONC__UNLOCK(&x->mu);
        conc__ctx_unref(x);
    }
    while (done) {
        conc_ctx_t *x = done;
        done = x->work_next;
        conc__ctx_walk_done(x);
        conc__ctx_unref(x); /* the walk's ref */
    }
    conc__ctx_walk_done(c);
    conc__wake_list(wake);
    if (defer_funcs) {
        conc__deferred *list = NULL;
        for (; run; run = run->next) {
            run->deferred.run = conc__af_run_deferred;
            run->deferred.next = list;
            list = &run->deferred;
        }
        conc__defer(list);
        return;
    }
    while (run) {
        conc_after_func_t *next = run->next;
        run->fn(run->arg);
        conc__af_unref(run);
        run = next;
    }
}

static void conc__ctx_deadline_fire(conc__tentry *e, int64_t now) {
    conc_ctx_t *c = (conc_ctx_t *)(void *)((char *)e - offsetof(conc_ctx_t, timer));
    (void)now;
    conc__ctx_end(c, CONC_DEADLINE_EXCEEDED, CONC_DEADLINE_EXCEEDED, true);
    conc__ctx_unref(c); /* the entry's ref */
}

static conc_ctx_t *conc__ctx_new(conc_ctx_t *parent, int kind, int64_t deadline, const void *key, void *value) {
    if (!parent) parent = &conc__background;
    conc_ctx_t *c = (conc_ctx_t *)CONC_MALLOC(sizeof *c);
    if (!c) return NULL;
    memset(c, 0, sizeof *c);
    conc__mutex_init(&c->mu);
    CONC__UNCHECKED(&c->err);
    CONC__UNCHECKED(&c->refs);
    CONC__UNCHECKED(&c->walking);
    atomic_init(&c->err, 0);
    atomic_init(&c->refs, 1);
    atomic_init(&c->walking, false);
    c->parent = parent;
    conc__ctx_ref(parent);
    c->kind = (unsigned char)kind;
    c->key = key;
    c->value = value;
    c->can_end = kind == CONC__CTX_CANCEL || parent->can_end;
    c->deadline = parent->deadline;
    c->timer.idx = CONC__NOT_IN_HEAP;
    if (deadline < parent->deadline) {
        c->deadline = deadline;
        c->has_timer = true;
        c->timer.when = deadline;
        c->timer.fire = conc__ctx_deadline_fire;
        c->timer.fire_unlocked = true;
    }
    if (parent->can_end) {
        CONC__LOCK(&parent->mu);
        {
            int e = atomic_load_explicit(&parent->err, CONC__RELAXED);
            if (e) {
                c->cause = parent->cause;
                atomic_store_explicit(&c->err, e, CONC__RELEASE);
            } else {
                c->sib_next = parent->kids;
                if (parent->kids) parent->kids->sib_prev = c;
                parent->kids = c;
                c->linked = true;
            }
        }
        CONC__UNLOCK(&parent->mu);
    }
    if (c->has_timer && atomic_load_explicit(&c->err, CONC__ACQUIRE) == 0) {
        if (deadline <= conc_now()) {
            conc__ctx_end(c, CONC_DEADLINE_EXCEEDED, CONC_DEADLINE_EXCEEDED, false);
        } else {
            conc__ctx_ref(c); /* the entry's */
            if (conc__timer_add(&c->timer) != 0) {
                conc__ctx_unref(c);
                conc_ctx_release(c);
                return NULL;
            }
            /* ended meanwhile by its parent: its walk may have looked for the entry too soon */
            if (atomic_load_explicit(&c->err, CONC__ACQUIRE) != 0 && conc__timer_remove(&c->timer)) conc__ctx_unref(c);
        }
    }
    return c;
}

CONC_API conc_ctx_t *conc_ctx_background(void) { return &conc__background; }

CONC_API conc_ctx_t *conc_ctx_with_cancel(conc_ctx_t *parent) {
    return conc__ctx_new(parent, CONC__CTX_CANCEL, INT64_MAX, NULL, NULL);
}

CONC_API conc_ctx_t *conc_ctx_with_deadline(conc_ctx_t *parent, int64_t deadline_ns) {
    return conc__ctx_new(parent, CONC__CTX_CANCEL, deadline_ns, NULL, NULL);
}

CONC_API conc_ctx_t *conc_ctx_with_timeout(conc_ctx_t *parent, int64_t timeout_ns) {
    int64_t now = conc_now();
    int64_t d = timeout_ns > INT64_MAX - now ? INT64_MAX : now + timeout_ns;
    return conc__ctx_new(parent, CONC__CTX_CANCEL, d, NULL, NULL);
}

CONC_API conc_ctx_t *conc_ctx_with_value(conc_ctx_t *parent, const void *key, void *value) {
    return conc__ctx_new(parent, CONC__CTX_VALUE, INT64_MAX, key, value);
}

CONC_API void conc_ctx_cancel_cause(conc_ctx_t *ctx, int cause) {
    if (!ctx || ctx->kind != CONC__CTX_CANCEL) return;
    /* ended, and the walk that ended it done (walking is set before err): nothing to wait for */
    if (atomic_load_explicit(&ctx->err, CONC__ACQUIRE) != 0 && !atomic_load_explicit(&ctx->walking, CONC__ACQUIRE)) {
        CONC__HB_AFTER(&ctx->walking);
        return;
    }
    conc__ctx_end(ctx, CONC_CANCELED, cause ? cause : CONC_CANCELED, false);
}

CONC_API void conc_ctx_cancel(conc_ctx_t *ctx) { conc_ctx_cancel_cause(ctx, 0); }

CONC_API void conc_ctx_release(conc_ctx_t *ctx) {
    if (!ctx || ctx->kind == CONC__CTX_BACKGROUND) return;
    if (ctx->kind == CONC__CTX_CANCEL) {
        conc_ctx_cancel(ctx);
        conc__ctx_unlink(ctx); /* ended, so never cancelled again: leave the parent's list now */
    }
    /* a value context stays linked while children need it to pass cancellation down */
    conc__ctx_unref(ctx);
}

CONC_API int conc_ctx_err(const conc_ctx_t *ctx) {
    if (!ctx) return 0;
    int e = atomic_load_explicit(&((conc_ctx_t *)ctx)->err, CONC__ACQUIRE);
    if (e) CONC__HB_AFTER(&ctx->err);
    return e;
}

CONC_API int conc_ctx_cause(const conc_ctx_t *ctx) {
    return conc_ctx_err(ctx) ? ctx->cause : 0;
}

CONC_API bool conc_ctx_deadline(const conc_ctx_t *ctx, int64_t *deadline_ns) {
    if (!ctx || ctx->deadline == INT64_MAX) return false;
    if (deadline_ns) *deadline_ns = ctx->deadline;
    return true;
}

CONC_API void *conc_ctx_value(const conc_ctx_t *ctx, const void *key) {
    for (; ctx; ctx = ctx->parent)
        if (ctx->kind == CONC__CTX_VALUE && ctx->key == key) return ctx->value;
    return NULL;
}

static bool conc__ctx_can_end(const conc_ctx_t *ctx) { return ctx && ctx->can_end; }

/* Registers a blocked call on ctx. Returns 0, or ctx's err if it has already ended (then
   nothing is registered). Once registered, a canceller may claim the call at any moment,
   so the call must end in conc__sel_park (then unregister) or conc__ctx_leave: never just
   unregister and return. */
static int conc__ctx_register(conc_ctx_t *ctx, conc__waiter *w, conc__sel *s, int index) {
    int e;
    w->sel = s;
    w->case_index = index;
    w->elem = NULL;
    CONC__LOCK(&ctx->mu);
    {
        e = atomic_load_explicit(&ctx->err, CONC__RELAXED);
        if (e == 0) conc__wq_push(&ctx->waiters, w);
    }
    CONC__UNLOCK(&ctx->mu);
    return e;
}

static void conc__ctx_unregister(conc_ctx_t *ctx, conc__waiter *w) {
    CONC__LOCK(&ctx->mu);
    if (w->queued) conc__wq_remove(&ctx->waiters, w);
    CONC__UNLOCK(&ctx->mu);
}

/* A call that registered on ctx but leaves without parking (it found it need not block
   after all) must not return while a canceller that claimed it may still wake it: after
   unlinking, it claims its own sel, or waits for the wake of whoever claimed it first. */
static void conc__ctx_leave(conc_ctx_t *ctx, conc__waiter *w, conc__sel *s) {
    conc__ctx_unregister(ctx, w);
    if (!conc__sel_claim(s, CONC__OWN_CTX)) conc__sel_park(s);
}

CONC_API int conc_ctx_wait(conc_ctx_t *ctx) {
    conc_case c = CONC_DONE(ctx);
    if (!ctx) ctx = &conc__background; /* never ends: blocks for ever, as documented */
    c.ctx = ctx;
    int rc = conc_select(&c, 1, NULL);
    return rc < 0 ? rc : c.status;
}

CONC_API conc_after_func_t *conc_ctx_after_func(conc_ctx_t *ctx, void (*fn)(void *arg), void *arg) {
    if (!ctx) ctx = &conc__background;
    if (!fn) return NULL;
    conc_after_func_t *af = (conc_after_func_t *)CONC_MALLOC(sizeof *af);
    if (!af) return NULL;
    memset(af, 0, sizeof *af);
    CONC__UNCHECKED(&af->refs);
    atomic_init(&af->refs, 1);
    af->ctx = ctx;
    af->fn = fn;
    af->arg = arg;
    conc__ctx_ref(ctx);
    bool run_now = false;
    if (ctx->can_end) {
        CONC__LOCK(&ctx->mu);
        if (atomic_load_explicit(&ctx->err, CONC__RELAXED) == 0) {
            atomic_fetch_add_explicit(&af->refs, 1, CONC__RELAXED); /* the pending run's */
            af->next = ctx->afs;
            if (ctx->afs) ctx->afs->prev = af;
            ctx->afs = af;
            af->linked = true;
        } else {
            af->state = CONC__AF_STARTED;
            run_now = true;
        }
        CONC__UNLOCK(&ctx->mu);
    }
    if (run_now) fn(arg);
    return af;
}

CONC_API bool conc_after_func_stop(conc_after_func_t *af) {
    if (!af) return false;
    conc_ctx_t *ctx = af->ctx;
    bool stopped = false, drop_run = false;
    CONC__LOCK(&ctx->mu);
    if (af->state == CONC__AF_PENDING) {
        if (af->linked) {
            if (af->prev) af->prev->next = af->next;
            else ctx->afs = af->next;
            if (af->next) af->next->prev = af->prev;
            af->linked = false;
            drop_run = true;
        }
        af->state = CONC__AF_STOPPED;
        stopped = true;
    }
    CONC__UNLOCK(&ctx->mu);
    if (drop_run) conc__af_unref(af);
    conc__af_unref(af);
    conc__ctx_unref(ctx);
    return stopped;
}

/* ======================================================================== */
/* >>chan: channels                                                         */
/* ======================================================================== */
/* A buffered channel's values live in a ring of slots that senders and receivers use
   without the channel lock while nobody waits (the fast path); the lock guards the wait
   queues, close, and every step that involves a waiter (the slow path). An unbuffered
   channel has no ring: every operation takes the lock, and a value goes straight from a
   sender to a receiver, as in Go.

   The ring (cap > 0). Positions count up from 0 and never wrap (2^62 operations); the slot
   of position p is p % cap. `tail` and `head` hold the next position to fill and to empty,
   shifted left by one; their bit 0 (CONC__RSLOW) shuts that side's fast path. A slot's word
   is its state shifted left by one, bit 0 being its mark (CONC__RMARK); the state is
   2p ("free, for position p") or 2p+1 ("holds the value of position p"). A sender claims
   position p by moving `tail` from p to p+1 (CAS) when slot p reads free-for-p, copies its
   value in and publishes with an exchange to holds-p; a receiver claims p by moving `head`
   when slot p reads holds-p, copies out and releases with an exchange to free-for-p+cap.
   Each side owns its own cache line; the slots carry the value from one to the other
   (Vyukov's bounded MPMC queue, with the two states per position that make cap 1 work).

   Invariants:
   - (Q) sendq non-empty => the RSLOW bit of `tail` is set; recvq non-empty => that of
     `head`. closed => tail's bit is set for ever. A bit may be set with an empty queue
     only while the lock is held (a select freezing the channel, see >>select), or until
     the next slow-path operation clears it. While a side's bit is set, only lock holders
     move that side's position, so under the lock it stands still.
   - (M) Outside the lock, if recvq holds a waiter then slot `head` is marked or a thread
     has taken a mark off it and is on its way to the lock (it will run conc__ring_settle);
     likewise for sendq and slot `tail`. A slot changes state only by the exchange of a
     publish or a release, and that exchange returns the mark it removed: so a value cannot
     appear at `head` while receivers wait, nor room at `tail` while senders wait, without
     the thread that made it taking the lock afterwards. The mark and the exchange are
     read-modify-writes of one word, so they are totally ordered: no fence, no lost wake-up.
   - (S) conc__ring_settle, under the lock, gives values at `head` to queued receivers and
     room at `tail` to queued senders' values, in queue order, until neither is possible;
     then clears the bit of an empty queue, or marks the slot of a non-empty one (if the
     slot turned ready meanwhile, it goes round again). Every slow-path step that changes a
     queue, and every thread that took a mark off a slot, ends with it.
   - FIFO: a newcomer never overtakes a waiter: with senders queued the fast path is shut
     (Q), and a lock holder settles first and then finds either the queue empty or no room.
     Values leave in position order, so per sender FIFO holds.
   - A value moves once: a position is claimed by exactly one CAS on `tail` (one sender)
     and one on `head` (one receiver). A send that claimed a position returns 0 and its
     value will be received; one that did not claim returns an error and wrote nothing.
     For a queued waiter the claim word (sel.fired) decides, as on the unbuffered path.
   - close (under the lock): sets closed and tail's bit, then waits (pause, sched_yield)
     until every claimed position has been published - a claimed send is a few
     instructions from publishing and never takes the lock - so that from then on an empty
     ring under the lock means drained for ever. It completes queued senders with
     CONC_CLOSED, settles (queued receivers get what is buffered), and completes the
     receivers left with CONC_CLOSED.
   - Statistics: sends and recvs are tail and head; high_water is raised by senders (CAS)
     from a cached view of head refreshed only when it could matter; everything else is
     written under the lock.
   - Under Valgrind (CONC_VALGRIND) every operation takes the lock, so the ring is only
     ever touched under it and Helgrind checks the lock discipline; ThreadSanitizer checks
     the fast path.

   Unbuffered channels (Go's runtime/chan.go, for the same reasons):
   - At least one of sendq and recvq holds no live waiter. Stale waiters (claimed
     elsewhere) may linger on either queue until someone pops them or their owner unlinks
     them.
   - A value moves once: from the sender's memory straight into a waiting receiver's
     memory, under the lock, by whoever claimed the waiter.
   - Once closed, nothing queues; close completed every waiter with CONC_CLOSED.

   Both kinds: `inside` counts the queued waiters whose owner will still lock mu. A waiter
   joins it when queued (a blocked send or receive, or a select's case); it leaves when a
   peer or close claims it through this channel (its owner then never comes back here),
   or when its owner, claimed elsewhere (its context, another case of its select), locks
   mu to unlink itself. A stale waiter popped off a queue stays counted: its owner is on
   its way. So free refuses while inside is not 0; empty queues are not enough.
   Lock order: timers.mu -> channels (by address, when a select holds several) -> ctx.mu. */

#define CONC__RSLOW ((size_t)1)
#define CONC__RMARK ((size_t)1)
#define CONC__RFREE(p) ((size_t)(p) << 2)          /* slot word: free for position p */
#define CONC__RFULL(p) (((size_t)(p) << 2) | 2u)   /* slot word: holds position p */

/* Fields are grouped by who writes them, one cache line per group: the lock and all it
   guards (written by the slow path only), the senders' position, the receivers' position,
   and the immutable sizes, shared in every cache. */
struct conc_chan {
    _Alignas(64) conc__spinlock mu;         /* the slow path's line */
    bool closed;                            /* (mu) */
    bool frozen;                            /* (mu) a select holds the ring's bits set */
    conc__wq sendq, recvq;                  /* (mu) blocked senders / receivers, FIFO */
    uint64_t sends, recvs;                  /* (mu) unbuffered only; the ring counts itself */
    uint64_t blocked_sends, blocked_recvs;  /* (mu) */
    int64_t send_wait_ns, recv_wait_ns;     /* (mu) added by whoever completes or unlinks a waiter */
    size_t inside;                          /* (mu) queued waiters whose owner will still lock mu */
    _Alignas(64) _Atomic size_t tail;       /* the senders' line: next position to fill << 1 | RSLOW */
    _Atomic size_t high_water;              /* raised by senders (CAS) */
    _Atomic size_t head_seen;               /* a past value of head's position (high_water) */
    _Alignas(64) _Atomic size_t head;       /* the receivers' line: next position to empty << 1 | RSLOW */
    _Alignas(64) size_t elem_size, cap;     /* immutable: read by all, shared in every cache */
    size_t stride, mask;                    /* slot size; cap - 1 if cap is a power of two, else 0 */
    unsigned char *buf;                     /* cap slots, right after this struct */
    void *alloc;                            /* what CONC_MALLOC returned */
};

typedef struct conc__rslot {
    _Atomic size_t word; /* state << 1 | mark; the element follows */
} conc__rslot;

CONC_API conc_chan_t *conc_chan_new(size_t elem_size, size_t cap) {
    size_t stride = sizeof(conc__rslot) + (elem_size + sizeof(size_t) - 1) / sizeof(size_t) * sizeof(size_t);
    if (elem_size > SIZE_MAX / 2 || (cap && stride > (SIZE_MAX - sizeof(conc_chan_t) - 64) / cap)) return NULL;
    /* one block: the struct on a cache-line boundary, then the slots */
    void *alloc = CONC_MALLOC(sizeof(conc_chan_t) + 63 + cap * stride);
    if (!alloc) return NULL;
    conc_chan_t *ch = (conc_chan_t *)(void *)(((uintptr_t)alloc + 63) & ~(uintptr_t)63);
    memset(ch, 0, sizeof *ch);
    ch->alloc = alloc;
    if (conc__spin_init(&ch->mu) != 0) {
        CONC_FREE(alloc);
        return NULL;
    }
    ch->elem_size = elem_size;
    ch->cap = cap;
    ch->stride = stride;
    ch->mask = (cap & (cap - 1)) == 0 && cap ? cap - 1 : 0;
    atomic_init(&ch->tail, 0);
    atomic_init(&ch->head, 0);
    atomic_init(&ch->high_water, 0);
    atomic_init(&ch->head_seen, 0);
    if (cap) {
        ch->buf = (unsigned char *)(ch + 1);
        for (size_t i = 0; i < cap; i++) atomic_init(&((conc__rslot *)(void *)(ch->buf + i * stride))->word, CONC__RFREE(i));
    }
    return ch;
}

CONC_API int conc_chan_free(conc_chan_t *ch) {
    if (!ch) return 0;
    int busy;
    conc__spin_lock(&ch->mu);
    busy = ch->inside != 0; /* a waiter claimed elsewhere may be off the queues, still to come back */
    conc__spin_unlock(&ch->mu);
    if (busy) return CONC_BUSY;
    conc__spin_destroy(&ch->mu);
    CONC_FREE(ch->alloc);
    return 0;
}

/* Timestamps for the wait-time statistics (see CONC_NO_WAIT_TIME). */
#ifdef CONC_NO_WAIT_TIME
#define CONC__STAMP() ((int64_t)0)
#else
#define CONC__STAMP() conc_now()
#endif

static inline void conc__copy(void *dst, const void *src, size_t n) {
    if (!dst) return;
#if defined(__GNUC__) || defined(__clang__)
    /* hides where the pointers come from: inlined into a caller that sends a long, gcc -O3
       would check the 16-byte case against that object (-Warray-bounds), for a size that
       is known only at run time */
    __asm__("" : "+r"(dst), "+r"(src));
#endif
    switch (n) { /* the common sizes inline, without a call */
    case 0: return;
    case 4: memcpy(dst, src, 4); return;
    case 8: memcpy(dst, src, 8); return;
    case 16: memcpy(dst, src, 16); return;
    default: memcpy(dst, src, n);
    }
}

/* Pushes w on the list to wake after unlocking (linked through `next`: it is off every queue). */
static void conc__wake_push(conc__waiter **wake, conc__waiter *w) {
    w->next = *wake;
    *wake = w;
}

/* ch->mu held. Claims the first live waiter of q, one of ch's queues: its owner will not
   come back to ch (see `inside`). */
static conc__waiter *conc__chan_claim(conc_chan_t *ch, conc__wq *q) {
    conc__waiter *w = conc__wq_claim(q);
    if (w) ch->inside--;
    return w;
}

/* ---- the ring ---- */

static conc__rslot *conc__rslot_at(const conc_chan_t *ch, size_t pos) {
    size_t i = ch->mask ? pos & ch->mask : pos % ch->cap;
    return (conc__rslot *)(void *)(ch->buf + i * ch->stride);
}
static size_t conc__rslot_state(conc__rslot *s) { return atomic_load_explicit(&s->word, CONC__ACQUIRE) & ~CONC__RMARK; }

enum { CONC__R_OK, CONC__R_OK_MARKED, CONC__R_NONE, CONC__R_SLOW, CONC__R_AGAIN };

/* Waiting for another thread's claimed position to be published or released: it is a
   copy away, unless that thread was preempted - then yield to it. */
static void conc__ring_backoff(unsigned *spins) {
    if (*spins < 64) CONC__PAUSE();
    else sched_yield();
    ++*spins;
}

/* A send that has claimed position pos raises the high-water mark. head_seen only lags
   head, so end - head_seen bounds the count from above: head is read (a miss on the
   receivers' line) only when that bound exceeds the mark. */
CONC__OUT_OF_LINE void conc__ring_raise_high_water(conc_chan_t *ch, size_t end, size_t hw) {
    size_t h = atomic_load_explicit(&ch->head, CONC__RELAXED) >> 1;
    atomic_store_explicit(&ch->head_seen, h, CONC__RELAXED);
    if (h >= end) return;
    size_t n = end - h; /* <= cap: position end - 1 was free, so end - 1 - cap was taken */
    while (n > hw && !atomic_compare_exchange_weak_explicit(&ch->high_water, &hw, n, CONC__RELAXED, CONC__RELAXED)) {
    }
}
CONC__ALWAYS_INLINE void conc__ring_note_len(conc_chan_t *ch, size_t end) {
    size_t hw = atomic_load_explicit(&ch->high_water, CONC__RELAXED);
    if (hw >= ch->cap || end - atomic_load_explicit(&ch->head_seen, CONC__RELAXED) <= hw) return;
    conc__ring_raise_high_water(ch, end, hw);
}

/* The caller has claimed position pos: fill copies *elem in and publishes the slot full,
   take copies the value out and frees the slot for pos + cap. Return CONC__R_OK, or
   CONC__R_OK_MARKED if the slot was marked (invariant M: the caller settles). */
CONC__ALWAYS_INLINE int conc__ring_fill(conc_chan_t *ch, conc__rslot *s, size_t pos, const void *elem) {
    conc__copy(s + 1, elem, ch->elem_size);
    size_t old = atomic_exchange_explicit(&s->word, CONC__RFULL(pos), CONC__ACQ_REL);
    conc__ring_note_len(ch, pos + 1);
    return (old & CONC__RMARK) ? CONC__R_OK_MARKED : CONC__R_OK;
}
CONC__ALWAYS_INLINE int conc__ring_take(conc_chan_t *ch, conc__rslot *s, size_t pos, void *elem) {
    conc__copy(elem, s + 1, ch->elem_size);
    size_t old = atomic_exchange_explicit(&s->word, CONC__RFREE(pos + ch->cap), CONC__ACQ_REL);
    return (old & CONC__RMARK) ? CONC__R_OK_MARKED : CONC__R_OK;
}

/* The common case, inlined into send and receive: the slot at tail (head) is ready and
   the claim is not contended. Anything else returns CONC__R_AGAIN, for the full loop. */
CONC__ALWAYS_INLINE int conc__ring_once(conc_chan_t *ch, bool is_send, void *elem) {
    _Atomic size_t *end = is_send ? &ch->tail : &ch->head;
    size_t x = atomic_load_explicit(end, CONC__RELAXED), pos = x >> 1;
    conc__rslot *s = conc__rslot_at(ch, pos);
    if ((x & CONC__RSLOW) || conc__rslot_state(s) != (is_send ? CONC__RFREE(pos) : CONC__RFULL(pos)) ||
        !atomic_compare_exchange_strong_explicit(end, &x, x + 2, CONC__RELAXED, CONC__RELAXED))
        return CONC__R_AGAIN;
    return is_send ? conc__ring_fill(ch, s, pos, elem) : conc__ring_take(ch, s, pos, elem);
}

/* The full loop behind conc__ring_push and conc__ring_pop (is_send a constant in each):
   claims the next position on its side and fills or empties it. owner: the caller holds
   the lock and may ignore the side's RSLOW bit. */
CONC__ALWAYS_INLINE int conc__ring_claim(conc_chan_t *ch, bool is_send, void *elem, bool owner) {
    _Atomic size_t *end = is_send ? &ch->tail : &ch->head, *other = is_send ? &ch->head : &ch->tail;
    size_t x = atomic_load_explicit(end, CONC__RELAXED);
    unsigned spins = 0;
    for (;;) {
        if ((x & CONC__RSLOW) && !owner) return CONC__R_SLOW;
        size_t pos = x >> 1, ready = is_send ? CONC__RFREE(pos) : CONC__RFULL(pos);
        conc__rslot *s = conc__rslot_at(ch, pos);
        size_t st = conc__rslot_state(s);
        if (st == ready) {
            if (atomic_compare_exchange_weak_explicit(end, &x, x + 2, CONC__RELAXED, CONC__RELAXED))
                return is_send ? conc__ring_fill(ch, s, pos, elem) : conc__ring_take(ch, s, pos, elem);
            continue;
        }
        if ((ptrdiff_t)(st - ready) < 0) {
            /* Behind. A send: the slot holds position pos - cap (or a send of it is copying):
               full, unless a receive has claimed that position and is copying it out. A
               receive: free for pos, or pos - cap still being emptied: empty, unless a send
               has claimed pos and is copying its value in. Either way: wait for that copy. */
            size_t o = atomic_load_explicit(other, CONC__SEQ_CST) >> 1;
            if (o + (is_send ? ch->cap : 0) <= pos) return CONC__R_NONE;
            conc__ring_backoff(&spins);
        }
        x = atomic_load_explicit(end, CONC__RELAXED); /* or another thread of this side got there first */
    }
}

/* Fills the next position with *elem. Returns CONC__R_OK, CONC__R_OK_MARKED (sent, and the
   slot was marked: the caller must settle the channel), CONC__R_NONE (no room), CONC__R_SLOW. */
static int conc__ring_push(conc_chan_t *ch, const void *elem, bool owner) {
    return conc__ring_claim(ch, true, (void *)elem, owner);
}

/* Empties the next position into elem (NULL: discard). As conc__ring_push. */
static int conc__ring_pop(conc_chan_t *ch, void *elem, bool owner) { return conc__ring_claim(ch, false, elem, owner); }

/* ch->mu held, the side's RSLOW bit set. Marks the slot of position pos unless it is
   already in state `ready`; returns whether it is (invariant M). */
static bool conc__ring_mark(conc_chan_t *ch, size_t pos, size_t ready) {
    conc__rslot *s = conc__rslot_at(ch, pos);
    size_t w = atomic_load_explicit(&s->word, CONC__ACQUIRE);
    for (;;) {
        if ((w & ~CONC__RMARK) == ready) return true;
        if (w & CONC__RMARK) return false;
        if (atomic_compare_exchange_weak_explicit(&s->word, &w, w | CONC__RMARK, CONC__ACQ_REL, CONC__ACQUIRE)) return false;
    }
}

static void conc__ring_set_slow(_Atomic size_t *side) {
    if (!(atomic_load_explicit(side, CONC__RELAXED) & CONC__RSLOW)) atomic_fetch_or_explicit(side, CONC__RSLOW, CONC__ACQ_REL);
}
static void conc__ring_clear_slow(_Atomic size_t *side) {
    if (atomic_load_explicit(side, CONC__RELAXED) & CONC__RSLOW) atomic_fetch_and_explicit(side, ~CONC__RSLOW, CONC__RELEASE);
}

/* ch->mu held. Invariant S: moves values between the ring and queued waiters until
   neither queue can proceed, then restores Q and M. Claimed waiters go on *wake. */
static void conc__ring_settle(conc_chan_t *ch, conc__waiter **wake) {
    for (;;) {
        conc__waiter *w;
        size_t pos;
        while (ch->recvq.head) {
            CONC_ASSERT(atomic_load_explicit(&ch->head, CONC__RELAXED) & CONC__RSLOW);
            pos = atomic_load_explicit(&ch->head, CONC__RELAXED) >> 1;
            if (conc__rslot_state(conc__rslot_at(ch, pos)) != CONC__RFULL(pos)) break;
            if ((w = conc__chan_claim(ch, &ch->recvq)) == NULL) break;
            int r = conc__ring_pop(ch, w->elem, true);
            CONC_ASSERT(r == CONC__R_OK || r == CONC__R_OK_MARKED);
            (void)r; /* a mark taken here is ours: the senders' loop below runs anyway */
            w->sel->status = 0;
            ch->recv_wait_ns += CONC__STAMP() - w->since;
            conc__wake_push(wake, w);
        }
        while (ch->sendq.head) {
            CONC_ASSERT(atomic_load_explicit(&ch->tail, CONC__RELAXED) & CONC__RSLOW);
            pos = atomic_load_explicit(&ch->tail, CONC__RELAXED) >> 1;
            if (conc__rslot_state(conc__rslot_at(ch, pos)) != CONC__RFREE(pos)) break;
            if ((w = conc__chan_claim(ch, &ch->sendq)) == NULL) break;
            int r = conc__ring_push(ch, w->elem, true);
            CONC_ASSERT(r == CONC__R_OK || r == CONC__R_OK_MARKED);
            (void)r;
            w->sel->status = 0;
            ch->send_wait_ns += CONC__STAMP() - w->since;
            conc__wake_push(wake, w);
        }
        if (ch->recvq.head) {
            pos = atomic_load_explicit(&ch->head, CONC__RELAXED) >> 1;
            if (conc__ring_mark(ch, pos, CONC__RFULL(pos))) continue; /* a value came meanwhile */
        } else if (!ch->frozen) {
            conc__ring_clear_slow(&ch->head);
        }
        if (ch->sendq.head) {
            pos = atomic_load_explicit(&ch->tail, CONC__RELAXED) >> 1;
            if (conc__ring_mark(ch, pos, CONC__RFREE(pos))) continue; /* room came meanwhile */
        } else if (!ch->frozen && !ch->closed) {
            conc__ring_clear_slow(&ch->tail);
        }
        return;
    }
}

/* ch->mu held: a waiter joins a ring channel's queue (settle afterwards). */
static void conc__ring_enqueue(conc_chan_t *ch, bool is_send, conc__waiter *w) {
    conc__wq_push(is_send ? &ch->sendq : &ch->recvq, w);
    conc__ring_set_slow(is_send ? &ch->tail : &ch->head);
}

/* Settles after a fast-path operation took a mark off a slot (invariant M). */
static void conc__ring_settle_unlocked(conc_chan_t *ch) {
    conc__waiter *wake = NULL;
    conc__spin_lock(&ch->mu);
    conc__ring_settle(ch, &wake);
    conc__spin_unlock(&ch->mu);
    conc__wake_list(wake);
}

/* The fast path: is it open to this caller? Under Valgrind every operation locks. */
static bool conc__ring_fast(const conc_chan_t *ch) { return ch->cap > 0 && !CONC__ON_VALGRIND(); }

/* Before a buffered send queues itself on a full buffer (or a receive on an empty one), it
   watches the slot it wants without the lock for the pause phase: a peer streaming on the
   other side usually makes room within a few hundred ns, and taking it then costs a
   fast-path operation instead of a waiter hand-off and a wake. It stops as soon as the
   side's fast path is shut (someone queued): the newcomer then queues behind. */
#define CONC__WATCH_BATCH 32 /* slots a sender that found the buffer full waits for */
static bool conc__chan_may_watch(const conc_chan_t *ch) {
    /* with one slot, the hand-off beats watching */
    return CONC_SPIN_NS > 0 && ch->cap > 1 && !CONC__ON_VALGRIND() && conc__ncpu() > 1;
}

static void conc__chan_watch(conc_chan_t *ch, bool for_room) {
    /* A sender that found the buffer full waits for a batch of room, not one slot: the
       receivers are behind anyway, and filling a slot the moment it frees would take the
       line the receiver is emptying, one slot at a time. Past the pause phase one slot
       will do. */
    size_t batch = for_room ? (ch->cap / 2 < CONC__WATCH_BATCH ? ch->cap / 2 : CONC__WATCH_BATCH) : 1;
    if (batch < 1) batch = 1;
    /* polls with growing gaps: each poll pulls the slot's line away from the peer */
    for (int spent = 0, gap = 1; spent < CONC__SPIN_PAUSES; spent += gap, gap = gap < 16 ? gap * 2 : gap) {
        size_t x = atomic_load_explicit(for_room ? &ch->tail : &ch->head, CONC__RELAXED);
        if (x & CONC__RSLOW) return;
        size_t pos = (x >> 1) + batch - 1, st = conc__rslot_state(conc__rslot_at(ch, pos));
        if (st == (for_room ? CONC__RFREE(pos) : CONC__RFULL(pos))) return;
        for (int k = 0; k < gap; k++) CONC__PAUSE();
    }
}

/* ---- operations under the lock ---- */

/* ch->mu held. A send that can complete now does; returns CONC_WOULD_BLOCK otherwise.
   *wake: waiters this claimed, to wake after unlocking. */
static int conc__send_locked(conc_chan_t *ch, const void *elem, conc__waiter **wake) {
    if (ch->closed) return CONC_CLOSED;
    if (ch->cap > 0) {
        conc__ring_settle(ch, wake);
        if (ch->sendq.head) return CONC_WOULD_BLOCK; /* senders wait for room before us */
        int r = conc__ring_push(ch, elem, true);
        if (r == CONC__R_NONE) return CONC_WOULD_BLOCK;
        if (r == CONC__R_OK_MARKED || ch->recvq.head) conc__ring_settle(ch, wake);
        return 0;
    }
    conc__waiter *r = conc__chan_claim(ch, &ch->recvq);
    if (r) {
        conc__copy(r->elem, elem, ch->elem_size);
        r->sel->status = 0;
        ch->sends++;
        ch->recvs++;
        ch->recv_wait_ns += CONC__STAMP() - r->since;
        conc__wake_push(wake, r);
        return 0;
    }
    return CONC_WOULD_BLOCK;
}

/* ch->mu held. As conc__send_locked, for a receive. */
static int conc__recv_locked(conc_chan_t *ch, void *elem, conc__waiter **wake) {
    if (ch->cap > 0) {
        conc__ring_settle(ch, wake);
        if (!ch->recvq.head) { /* else receivers wait for values before us */
            int r = conc__ring_pop(ch, elem, true);
            if (r != CONC__R_NONE) {
                if (r == CONC__R_OK_MARKED || ch->sendq.head) conc__ring_settle(ch, wake);
                return 0;
            }
        }
    } else {
        conc__waiter *s = conc__chan_claim(ch, &ch->sendq);
        if (s) {
            conc__copy(elem, s->elem, ch->elem_size);
            s->sel->status = 0;
            ch->sends++;
            ch->recvs++;
            ch->send_wait_ns += CONC__STAMP() - s->since;
            conc__wake_push(wake, s);
            return 0;
        }
    }
    if (ch->closed) { /* and drained: close waited for every claimed send to publish */
        if (elem && ch->elem_size) memset(elem, 0, ch->elem_size);
        return CONC_CLOSED;
    }
    return CONC_WOULD_BLOCK;
}

/* The blocking step shared by channels and the worker engine (its blocked submitters and
   its waits for no active task; all guard their queues with a conc__spinlock). mu held on
   entry, released on return. Queues the caller on q with elem, counts it in *blocked
   (under mu; may be NULL), parks until a peer claims it (the peer sets the status and,
   for channels, moves the value) or ctx ends. On ctx's claim it unlinks
   itself if still queued and, under mu, counts that in *canceled and adds the wait to
   *cancel_wait_ns (either may be NULL; a failed registration counts as canceled too).
   *waited (may be NULL) gets the whole wait. Returns the sel's status: 0 or the error
   the claimer set, or the ctx's err.
   ring: the buffered channel whose queue q is (NULL for the engine and unbuffered channels):
   joining or leaving its queue changes the ring's RSLOW bits and marks, so it settles
   (invariants Q, M, S). inside: the channel's count of waiters that will still lock mu
   (NULL for the engine): one more while queued, one less when the caller unlinks itself
   (a peer that claims the waiter counts it out). wake: waiters the caller's own attempt claimed under mu, woken
   once mu is released (with whatever the settles claim). */
static int conc__block_queued(conc__spinlock *mu, conc__wq *q, void *elem, conc_ctx_t *ctx, conc_chan_t *ring,
                              size_t *inside, conc__waiter *wake, uint64_t *blocked, uint64_t *canceled,
                              int64_t *cancel_wait_ns, int64_t *waited) {
    /* the waiter and the hot words of its sel share one cache line: the peer that
       completes this call touches just that line (and the element) */
    struct {
        _Alignas(64) conc__waiter w;
        conc__sel s;
    } op;
    conc__waiter cw;
    bool reg = conc__ctx_can_end(ctx);
    if (waited) *waited = 0;
    conc__sel_init(&op.s);
    if (reg) {
        int e = conc__ctx_register(ctx, &cw, &op.s, CONC__OWN_CTX);
        if (e) {
            if (canceled) ++*canceled;
            conc__spin_unlock(mu);
            conc__wake_list(wake);
            conc__sel_fini(&op.s);
            return e;
        }
    }
    op.w.sel = &op.s;
    op.w.elem = elem;
    op.w.case_index = 0;
    op.w.since = CONC__STAMP();
    if (blocked) ++*blocked;
    if (inside) ++*inside;
    if (ring) {
        conc__ring_enqueue(ring, q == &ring->sendq, &op.w);
        conc__ring_settle(ring, &wake); /* may complete us at once: then the park returns */
    } else {
        conc__wq_push(q, &op.w);
    }
    conc__spin_unlock(mu);
    conc__wake_list(wake);

    conc__sel_park(&op.s);
    if (waited) *waited = CONC__STAMP() - op.w.since;
    if (atomic_load_explicit(&op.s.fired, CONC__RELAXED) == CONC__OWN_CTX) {
        wake = NULL;
        conc__spin_lock(mu);
        {
            if (op.w.queued) conc__wq_remove(q, &op.w);
            if (inside) --*inside; /* the last count of this call: free may go once mu is dropped */
            if (canceled) ++*canceled;
            if (cancel_wait_ns) *cancel_wait_ns += CONC__STAMP() - op.w.since;
            if (ring) conc__ring_settle(ring, &wake); /* our leaving may reopen the fast path */
        }
        conc__spin_unlock(mu);
        conc__wake_list(wake);
    } else if (reg) {
        conc__ctx_unregister(ctx, &cw);
    }
    conc__sel_fini(&op.s);
    return op.s.status;
}

/* ch->mu held on entry, released on return. Queues the caller and parks it; wakes *wake
   (claimed by the caller's own attempt) once unlocked. The completer adds the wait time
   of calls it completes; a cancelled one adds its own. */
static int conc__chan_block(conc_chan_t *ch, bool is_send, void *elem, conc_ctx_t *ctx, conc__waiter *wake) {
    conc_chan_t *ring = ch->cap > 0 ? ch : NULL;
    if (is_send)
        return conc__block_queued(&ch->mu, &ch->sendq, elem, ctx, ring, &ch->inside, wake, &ch->blocked_sends, NULL,
                                  &ch->send_wait_ns, NULL);
    return conc__block_queued(&ch->mu, &ch->recvq, elem, ctx, ring, &ch->inside, wake, &ch->blocked_recvs, NULL,
                              &ch->recv_wait_ns, NULL);
}

/* A send (elem is read) or a receive (elem is written; NULL: discard) that the first try
   of the ring did not complete: the ring's loop, watching a full or empty buffer for a
   moment before giving up on it; else under the lock; else (block) queue and park. Out
   of line, so that the first try needs no stack frame. */
CONC__OUT_OF_LINE int conc__chan_op_slow(conc_chan_t *ch, bool is_send, void *elem, conc_ctx_t *ctx, bool block) {
    conc__waiter *wake = NULL;
    int rc;
    if (conc__ring_fast(ch)) {
        for (bool watched = false;; watched = true) {
            int r = is_send ? conc__ring_push(ch, elem, false) : conc__ring_pop(ch, elem, false);
            if (r == CONC__R_OK) return 0;
            if (r == CONC__R_OK_MARKED) {
                conc__ring_settle_unlocked(ch);
                return 0;
            }
            if (r == CONC__R_SLOW || !block || watched || !conc__chan_may_watch(ch)) break;
            conc__chan_watch(ch, is_send);
        }
    }
    conc__spin_lock(&ch->mu);
    rc = is_send ? conc__send_locked(ch, elem, &wake) : conc__recv_locked(ch, elem, &wake);
    if (rc == CONC_WOULD_BLOCK && block) return conc__chan_block(ch, is_send, elem, ctx, wake);
    conc__spin_unlock(&ch->mu);
    conc__wake_list(wake);
    return rc;
}

CONC__ALWAYS_INLINE int conc__chan_op(conc_chan_t *ch, bool is_send, void *elem, conc_ctx_t *ctx, bool block) {
    if (conc__ring_fast(ch)) {
        int r = conc__ring_once(ch, is_send, elem);
        if (r == CONC__R_OK) return 0;
        if (r == CONC__R_OK_MARKED) {
            conc__ring_settle_unlocked(ch);
            return 0;
        }
    }
    return conc__chan_op_slow(ch, is_send, elem, ctx, block);
}

static int conc__chan_send(conc_chan_t *ch, const void *elem, conc_ctx_t *ctx, bool block) {
    if (!ch || (!elem && ch->elem_size)) return CONC_INVALID;
    return conc__chan_op(ch, true, (void *)elem, ctx, block);
}

static int conc__chan_recv(conc_chan_t *ch, void *elem, conc_ctx_t *ctx, bool block) {
    if (!ch) return CONC_INVALID;
    return conc__chan_op(ch, false, elem, ctx, block);
}

CONC_API int conc_chan_send(conc_chan_t *ch, const void *elem, conc_ctx_t *ctx) {
    return conc__chan_send(ch, elem, ctx, true);
}
CONC_API int conc_chan_recv(conc_chan_t *ch, void *elem, conc_ctx_t *ctx) {
    return conc__chan_recv(ch, elem, ctx, true);
}
CONC_API int conc_chan_try_send(conc_chan_t *ch, const void *elem) {
    return conc__chan_send(ch, elem, NULL, false);
}
CONC_API int conc_chan_try_recv(conc_chan_t *ch, void *elem) {
    return conc__chan_recv(ch, elem, NULL, false);
}

CONC_API int conc_chan_close(conc_chan_t *ch) {
    conc__waiter *wake = NULL, *w;
    if (!ch) return CONC_INVALID;
    conc__spin_lock(&ch->mu);
    if (ch->closed) {
        conc__spin_unlock(&ch->mu);
        return CONC_CLOSED;
    }
    ch->closed = true;
    int64_t now = CONC__STAMP();
    while ((w = conc__chan_claim(ch, &ch->sendq)) != NULL) {
        w->sel->status = CONC_CLOSED;
        ch->send_wait_ns += now - w->since;
        conc__wake_push(&wake, w);
    }
    if (ch->cap > 0) {
        /* shut the senders' fast path for good, then let every claimed send publish */
        size_t t = atomic_fetch_or_explicit(&ch->tail, CONC__RSLOW, CONC__ACQ_REL) >> 1;
        for (size_t p = t > ch->cap ? t - ch->cap : 0; p < t; p++) {
            conc__rslot *s = conc__rslot_at(ch, p);
            unsigned spins = 0;
            while (conc__rslot_state(s) == CONC__RFREE(p)) conc__ring_backoff(&spins);
        }
        conc__ring_settle(ch, &wake); /* queued receivers take what is buffered */
    }
    while ((w = conc__chan_claim(ch, &ch->recvq)) != NULL) {
        if (w->elem && ch->elem_size) memset(w->elem, 0, ch->elem_size);
        w->sel->status = CONC_CLOSED;
        ch->recv_wait_ns += now - w->since;
        conc__wake_push(&wake, w);
    }
    if (ch->cap > 0) conc__ring_settle(ch, &wake); /* clears head's bit */
    conc__spin_unlock(&ch->mu);
    conc__wake_list(wake);
    return 0;
}

/* ch->mu held: a ring channel's positions, with both fast paths shut for the reading so
   that the two agree with each other (claimed sends count: they complete). */
static void conc__ring_freeze(conc_chan_t *ch) {
    ch->frozen = true;
    conc__ring_set_slow(&ch->head);
    conc__ring_set_slow(&ch->tail);
}
static void conc__ring_thaw(conc_chan_t *ch, conc__waiter **wake) {
    ch->frozen = false;
    conc__ring_settle(ch, wake);
}

CONC_API size_t conc_chan_len(conc_chan_t *ch) {
    size_t n = 0;
    if (!ch || ch->cap == 0) return 0;
    conc__waiter *wake = NULL;
    conc__spin_lock(&ch->mu);
    {
        conc__ring_freeze(ch);
        n = (atomic_load_explicit(&ch->tail, CONC__RELAXED) >> 1) - (atomic_load_explicit(&ch->head, CONC__RELAXED) >> 1);
        conc__ring_thaw(ch, &wake);
    }
    conc__spin_unlock(&ch->mu);
    conc__wake_list(wake);
    return n;
}

CONC_API size_t conc_chan_cap(const conc_chan_t *ch) { return ch ? ch->cap : 0; }
CONC_API size_t conc_chan_elem_size(const conc_chan_t *ch) { return ch ? ch->elem_size : 0; }

CONC_API void conc_chan_stats_get(conc_chan_t *ch, conc_chan_stats *out) {
    if (!out) return;
    memset(out, 0, sizeof *out);
    if (!ch) return;
    conc__waiter *wake = NULL;
    conc__spin_lock(&ch->mu);
    {
        if (ch->cap > 0) {
            conc__ring_freeze(ch);
            out->sends = atomic_load_explicit(&ch->tail, CONC__RELAXED) >> 1;
            out->recvs = atomic_load_explicit(&ch->head, CONC__RELAXED) >> 1;
            out->high_water = atomic_load_explicit(&ch->high_water, CONC__RELAXED);
            conc__ring_thaw(ch, &wake);
        } else {
            out->sends = ch->sends;
            out->recvs = ch->recvs;
        }
        out->blocked_sends = ch->blocked_sends;
        out->blocked_recvs = ch->blocked_recvs;
        out->send_wait_ns = ch->send_wait_ns;
        out->recv_wait_ns = ch->recv_wait_ns;
    }
    conc__spin_unlock(&ch->mu);
    conc__wake_list(wake);
}

/* ======================================================================== */
/* >>select                                                                 */
/* ======================================================================== */
/* Go's selectgo: poll the cases in a random order and perform the first ready one (pass 1
   takes one channel lock at a time; pass 2 takes every channel lock of the select, in
   address order, each once); if none is ready with every lock held, queue one waiter per
   case (in that random order) plus one on each context, all sharing one conc__sel, unlock,
   and park. The first completer claims the sel; after the wake the select unlinks its
   other waiters, one channel lock at a time. Holding all locks during the poll gives the
   poll one instant (no smeared view) and lets no peer slip between poll and queueing.

   Buffered channels (see >>chan): pass 1 tries a case's fast path first and takes its
   lock only if that cannot decide. Pass 2 freezes every buffered channel it locked (sets
   both RSLOW bits, so no fast-path operation can start on it: the poll still sees one
   instant) and thaws it - a settle, which clears the bits or, where the select queued,
   marks the slot (invariant M) - just before unlocking. A claimed but unpublished send is
   not ready yet; if it publishes while the select queues, the thaw's settle finds the
   value and hands it to the first receiver queued, so it is never missed, and taken once
   (a position has one receiver). Losers unlink under each lock and settle there too. */

#define CONC__SELECT_STACK 16

static void conc__select_lock(conc_case *cases, const uint16_t *lockorder, size_t nlock) {
    conc_chan_t *last = NULL;
    for (size_t k = 0; k < nlock; k++) {
        conc_chan_t *ch = cases[lockorder[k]].ch;
        if (ch != last) conc__spin_lock(&ch->mu);
        last = ch;
    }
}

/* Pass 2's locks are held: shut the fast path of every buffered channel among them. */
static void conc__select_freeze(conc_case *cases, const uint16_t *lockorder, size_t nlock) {
    for (size_t k = 0; k < nlock; k++) {
        conc_chan_t *ch = cases[lockorder[k]].ch;
        if (ch->cap > 0 && (k == 0 || cases[lockorder[k - 1]].ch != ch)) conc__ring_freeze(ch);
    }
}

/* Thaws (settles) and unlocks pass 2's channels, then wakes whoever the settles claimed. */
static void conc__select_unlock(conc_case *cases, const uint16_t *lockorder, size_t nlock) {
    conc__waiter *wake = NULL;
    for (size_t k = nlock; k-- > 0;) {
        conc_chan_t *ch = cases[lockorder[k]].ch;
        if (k == 0 || cases[lockorder[k - 1]].ch != ch) {
            if (ch->cap > 0) conc__ring_thaw(ch, &wake);
            conc__spin_unlock(&ch->mu);
        }
    }
    conc__wake_list(wake);
}

static int conc__select(conc_case *cases, size_t n, conc_ctx_t *ctx, bool block) {
    uint16_t order_buf[CONC__SELECT_STACK], lock_buf[CONC__SELECT_STACK] = {0}; /* {0}: gcc -O1 cannot see nlock bounds reads */
    conc__waiter wait_buf[CONC__SELECT_STACK];
    uint16_t *order = order_buf, *lockorder = lock_buf;
    conc__waiter *w = wait_buf;
    void *heap = NULL;
    conc__waiter *held = NULL; /* claimed by settles in pass 2, woken after unlocking */
    size_t nlock = 0;
    int result;

    if (!cases && n) return CONC_INVALID;
    if (n == 0 && block && !conc__ctx_can_end(ctx)) return CONC_INVALID; /* would block for ever */
    if (n > UINT16_MAX) return CONC_INVALID;
    for (size_t i = 0; i < n; i++) {
        conc_case *c = &cases[i];
        if (c->kind != CONC_CASE_SEND && c->kind != CONC_CASE_RECV && c->kind != CONC_CASE_DONE) return CONC_INVALID;
        if (c->kind == CONC_CASE_SEND && c->ch && c->ch->elem_size && !c->elem) return CONC_INVALID;
    }
    if (n > CONC__SELECT_STACK) {
        heap = CONC_MALLOC(n * (2 * sizeof(uint16_t) + sizeof(conc__waiter)) + sizeof(conc__waiter));
        if (!heap) return CONC_NOMEM;
        w = (conc__waiter *)heap;
        order = (uint16_t *)(void *)(w + n);
        lockorder = order + n;
    }
    /* random poll order (Fisher-Yates), channel cases sorted by address for locking */
    for (size_t i = 0; i < n; i++) {
        size_t j = conc__rand_below((uint32_t)i + 1);
        order[i] = order[j];
        order[j] = (uint16_t)i;
        if (cases[i].kind != CONC_CASE_DONE && cases[i].ch) {
            size_t k = nlock++;
            while (k > 0 && (uintptr_t)cases[lockorder[k - 1]].ch > (uintptr_t)cases[i].ch) {
                lockorder[k] = lockorder[k - 1];
                k--;
            }
            lockorder[k] = (uint16_t)i;
        }
        w[i].sel = NULL;
        w[i].queued = false;
    }

    /* Pass 1: the first ready case in the random order, one channel lock at a time.
       Performing one case under its own lock is atomic, so a case found ready here is as
       good as one found with every lock held; only "nothing is ready" needs pass 2. */
    for (int pass = 1; pass <= 2; pass++) {
        if (pass == 2) {
            conc__select_lock(cases, lockorder, nlock);
            conc__select_freeze(cases, lockorder, nlock);
        }
        for (size_t k = 0; k < n; k++) {
            size_t i = order[k];
            conc_case *c = &cases[i];
            conc__waiter *wake = NULL;
            int st;
            if (c->kind == CONC_CASE_DONE) {
                st = conc_ctx_err(c->ctx);
                if (st == 0) continue;
            } else if (!c->ch) {
                continue;
            } else {
                if (pass == 1 && conc__ring_fast(c->ch)) {
                    bool send = c->kind == CONC_CASE_SEND;
                    int r = conc__ring_once(c->ch, send, c->elem);
                    if (r == CONC__R_AGAIN)
                        r = send ? conc__ring_push(c->ch, c->elem, false) : conc__ring_pop(c->ch, c->elem, false);
                    if (r == CONC__R_OK_MARKED) conc__ring_settle_unlocked(c->ch);
                    if (r == CONC__R_OK || r == CONC__R_OK_MARKED) {
                        st = 0;
                        goto done_case;
                    }
                    /* full, and not closed (close shuts the fast path): not ready */
                    if (r == CONC__R_NONE && c->kind == CONC_CASE_SEND) continue;
                }
                /* a settle may claim waiters even when this case is not ready: in pass 1
                   they are woken at once, in pass 2 once every lock is dropped */
                conc__waiter **wp = pass == 1 ? &wake : &held;
                if (pass == 1) conc__spin_lock(&c->ch->mu);
                st = c->kind == CONC_CASE_SEND ? conc__send_locked(c->ch, c->elem, wp)
                                               : conc__recv_locked(c->ch, c->elem, wp);
                if (pass == 1) {
                    conc__spin_unlock(&c->ch->mu);
                    conc__wake_list(wake);
                }
                if (st == CONC_WOULD_BLOCK) continue;
            }
            if (pass == 2) {
                conc__select_unlock(cases, lockorder, nlock);
                conc__wake_list(held);
            }
        done_case:
            c->status = st;
            if (c->ok) *c->ok = st == 0;
            result = (int)i;
            goto out;
        }
    }
    if (!block) {
        conc__select_unlock(cases, lockorder, nlock);
        conc__wake_list(held);
        result = CONC_WOULD_BLOCK;
        goto out;
    }
    {
        conc__sel s;
        conc__waiter own;
        bool own_reg = false;
        int64_t now = CONC__STAMP();
        conc__sel_init(&s);
        /* queue everywhere, in the random order; a context found ended completes at once */
        for (size_t k = 0; k < n; k++) {
            size_t i = order[k];
            conc_case *c = &cases[i];
            if (c->kind == CONC_CASE_DONE) {
                if (!conc__ctx_can_end(c->ctx)) continue;
                int e = conc__ctx_register(c->ctx, &w[i], &s, (int)i);
                if (e) {
                    w[i].sel = NULL;
                    conc__sel_complete_self(&s, (int)i, e);
                    break;
                }
            } else if (c->ch) {
                w[i].sel = &s;
                w[i].elem = c->elem;
                w[i].case_index = (int)i;
                w[i].since = now;
                bool is_send = c->kind == CONC_CASE_SEND;
                if (c->ch->cap > 0) conc__ring_enqueue(c->ch, is_send, &w[i]); /* the thaw settles */
                else conc__wq_push(is_send ? &c->ch->sendq : &c->ch->recvq, &w[i]);
                if (is_send) c->ch->blocked_sends++;
                else c->ch->blocked_recvs++;
                c->ch->inside++;
            }
        }
        if (conc__ctx_can_end(ctx) && atomic_load_explicit(&s.fired, CONC__RELAXED) == CONC__UNFIRED) {
            int e = conc__ctx_register(ctx, &own, &s, CONC__OWN_CTX);
            if (e) conc__sel_complete_self(&s, CONC__OWN_CTX, e);
            else own_reg = true;
        }
        conc__select_unlock(cases, lockorder, nlock);
        conc__wake_list(held);

        conc__sel_park(&s);
        int fired = atomic_load_explicit(&s.fired, CONC__RELAXED);
        for (size_t i = 0; i < n; i++) {
            conc_case *c = &cases[i];
            if (!w[i].sel) continue;
            if (c->kind == CONC_CASE_DONE) {
                if ((int)i != fired) conc__ctx_unregister(c->ctx, &w[i]);
                continue;
            }
            if ((int)i == fired) continue; /* its completer unlinked it and counted its wait */
            conc__waiter *wake = NULL;
            conc__spin_lock(&c->ch->mu);
            {
                if (w[i].queued) conc__wq_remove(c->kind == CONC_CASE_SEND ? &c->ch->sendq : &c->ch->recvq, &w[i]);
                c->ch->inside--; /* this case's last touch of the channel but the unlock */
                *(c->kind == CONC_CASE_SEND ? &c->ch->send_wait_ns : &c->ch->recv_wait_ns) += CONC__STAMP() - now;
                if (c->ch->cap > 0) conc__ring_settle(c->ch, &wake); /* clears a bit, or re-marks */
            }
            conc__spin_unlock(&c->ch->mu);
            conc__wake_list(wake);
        }
        if (own_reg && fired != CONC__OWN_CTX) conc__ctx_unregister(ctx, &own);
        conc__sel_fini(&s);
        if (fired == CONC__OWN_CTX) {
            result = s.status;
        } else {
            cases[fired].status = s.status;
            if (cases[fired].ok) *cases[fired].ok = s.status == 0;
            result = fired;
        }
    }
out:
    CONC_FREE(heap);
    return result;
}

CONC_API int conc_select(conc_case *cases, size_t n, conc_ctx_t *ctx) { return conc__select(cases, n, ctx, true); }
CONC_API int conc_try_select(conc_case *cases, size_t n) { return conc__select(cases, n, NULL, false); }

/* ======================================================================== */
/* >>wg: wait groups                                                        */
/* ======================================================================== */
/* One atomic word holds the counter and a "someone waits" bit (Go's WaitGroup keeps a
   waiter count there instead; a waiter that gives up on its context would have to
   decrement it, a bit is enough); the mutex guards only the waiter list. With nobody
   waiting, an add or a done is one CAS.

   Invariants:
   - state = counter << 1 | CONC__WG_WAITERS, counter <= CONC__WG_MAX. Every change of state
     is an atomic read-modify-write: adds are a CAS, so one that would take the counter
     below 0 or past CONC__WG_MAX is simply not done (no add ever sees a counter out of
     range); the bit is cleared with a fetch_and.
   - The bit is set and cleared only under mu, and under mu: bit set <=> waiters is not
     empty (live or stale waiters: an owner unlinks its own waiter before it returns).
   - bit set => counter > 0. A waiter sets the bit only while the counter is not 0 (CAS);
     an add that would take the counter to 0 while the bit is set does it under mu, setting
     the whole word to 0 and emptying the list in the same critical section: it claims each
     waiter (status 0) and wakes them after unlocking. So a waiter is never queued on a
     counter of 0, and a wait group can be reused at once.
   - Happens-before: every add is a release RMW on state, and as every change is an RMW
     each continues the release sequences before it; so an acquire load that reads counter
     0 (the wait fast path), or the acq_rel CAS that takes it to 0 and then wakes the
     waiters through their sel, sees every write made before every add.
   - inside counts the blocked waits that will still lock mu: queued ones, and those their
     context claimed until they have left (one may already be unlinked, stale, by the add
     that took the counter to 0). The add that claims a waiter counts it out. Free refuses
     while inside is not 0; an empty list is not enough.
   Lock order: wg.mu -> ctx.mu (a blocked wait registers on its context while holding mu). */

#define CONC__WG_WAITERS ((uint64_t)1)
#define CONC__WG_MAX ((uint64_t)INT64_MAX >> 1) /* the largest counter the word holds */
#define CONC__WG_BACKOFF 64u                       /* most pauses after a lost CAS */

struct conc_wg {
    _Atomic uint64_t state; /* counter << 1 | CONC__WG_WAITERS; see invariants */
    pthread_mutex_t mu;     /* guards waiters and every change of the WAITERS bit */
    conc__wq waiters;       /* (mu) blocked waits, FIFO */
    size_t inside;          /* (mu) blocked waits that will still lock mu (see invariants) */
};

CONC_API conc_wg_t *conc_wg_new(void) {
    conc_wg_t *wg = (conc_wg_t *)CONC_MALLOC(sizeof *wg);
    if (!wg) return NULL;
    memset(wg, 0, sizeof *wg);
    CONC__UNCHECKED(&wg->state);
    atomic_init(&wg->state, 0);
    conc__mutex_init(&wg->mu);
    return wg;
}

CONC_API int conc_wg_free(conc_wg_t *wg) {
    if (!wg) return 0;
    bool busy;
    /* taking mu also waits out an add still emptying the list (after it unlocks, that add
       touches only the waiters' sels) */
    CONC__LOCK(&wg->mu);
    busy = wg->inside != 0;
    CONC__UNLOCK(&wg->mu);
    if (busy) return CONC_BUSY;
    pthread_mutex_destroy(&wg->mu);
    CONC__HB_FORGET(&wg->state);
    CONC__CHECKED(&wg->state);
    CONC_FREE(wg);
    return 0;
}

/* The counter after adding delta to c, in *out; or the status that refuses it. */
static inline int conc__wg_next(uint64_t c, int64_t delta, uint64_t *out) {
    if (delta < 0) {
        uint64_t d = (uint64_t)0 - (uint64_t)delta; /* |delta|, also for INT64_MIN */
        if (d > c) return CONC_NEGATIVE_COUNT;
        *out = c - d;
    } else {
        if ((uint64_t)delta > CONC__WG_MAX - c) return CONC_INVALID;
        *out = c + (uint64_t)delta;
    }
    return 0;
}

/* An add that takes the counter to 0 while someone waits: under mu, where the WAITERS bit
   cannot change, so the CAS loop below only races other adds. */
CONC__OUT_OF_LINE int conc__wg_add_slow(conc_wg_t *wg, int64_t delta) {
    conc__waiter *wake = NULL, *w;
    int rc;
    CONC__LOCK(&wg->mu);
    {
        uint64_t s = atomic_load_explicit(&wg->state, CONC__RELAXED), nc;
        for (;;) {
            rc = conc__wg_next(s >> 1, delta, &nc);
            if (rc != 0) break;
            uint64_t ns = nc == 0 ? 0 : (nc << 1 | (s & CONC__WG_WAITERS));
            CONC__HB_BEFORE(&wg->state);
            if (atomic_compare_exchange_weak_explicit(&wg->state, &s, ns, CONC__ACQ_REL, CONC__RELAXED)) {
                if (nc == 0 && (s & CONC__WG_WAITERS)) {
                    CONC__HB_AFTER(&wg->state);
                    /* stale waiters (their context won) are just unlinked */
                    while ((w = conc__wq_claim(&wg->waiters)) != NULL) {
                        wg->inside--; /* claimed: its owner does not come back */
                        w->sel->status = 0;
                        w->next = wake;
                        wake = w;
                    }
                }
                break;
            }
        }
    }
    CONC__UNLOCK(&wg->mu);
    conc__wake_list(wake);
    return rc;
}

CONC_API int conc_wg_add(conc_wg_t *wg, int64_t delta) {
    if (!wg) return CONC_INVALID;
    /* A CAS, not Go's single fetch_add (which panics after the fact): a decrement that
       would go below 0 must never be visible, or a legal done racing it could be refused
       and a wait could return early. Increments are a CAS too, for the same reason at
       CONC__WG_MAX: an overshoot undone later would be seen by other adds while it lasted.
       A CAS can fail where a fetch_add cannot: one that lost to another add backs off
       (pause, doubling up to CONC__WG_BACKOFF), so that two threads hammering one group
       stop taking the line from each other mid-update (wg_adddone_2threads with the two
       vCPUs on one core: 42 -> 28 ns; Go's two fetch_adds: 22). */
    uint64_t s = atomic_load_explicit(&wg->state, CONC__RELAXED), nc;
    for (unsigned backoff = 1;; backoff = backoff < CONC__WG_BACKOFF ? 2 * backoff : backoff) {
        int rc = conc__wg_next(s >> 1, delta, &nc);
        if (rc != 0) return rc;
        if (nc == 0 && (s & CONC__WG_WAITERS)) return conc__wg_add_slow(wg, delta);
        CONC__HB_BEFORE(&wg->state);
        if (atomic_compare_exchange_weak_explicit(&wg->state, &s, nc << 1 | (s & CONC__WG_WAITERS), CONC__RELEASE,
                                                  CONC__RELAXED))
            return 0;
        for (unsigned i = 0; i < backoff; i++) CONC__PAUSE();
    }
}

CONC_API int conc_wg_done(conc_wg_t *wg) { return conc_wg_add(wg, -1); }

/* Queues the caller on wg and parks it until the counter is 0 or ctx ends. */
static int conc__wg_block(conc_wg_t *wg, conc_ctx_t *ctx) {
    conc__sel s;
    conc__waiter w, cw;
    bool reg = conc__ctx_can_end(ctx);
    conc__sel_init(&s);
    CONC__LOCK(&wg->mu);
    if (reg) {
        int e = conc__ctx_register(ctx, &cw, &s, CONC__OWN_CTX);
        if (e) {
            /* the counter may have reached 0 meanwhile: a wait that need not block doesn't */
            uint64_t st = atomic_load_explicit(&wg->state, CONC__ACQUIRE);
            CONC__UNLOCK(&wg->mu);
            conc__sel_fini(&s);
            if ((st >> 1) == 0) {
                CONC__HB_AFTER(&wg->state);
                return 0;
            }
            return e;
        }
    }
    uint64_t st = atomic_load_explicit(&wg->state, CONC__ACQUIRE);
    for (;;) {
        if ((st >> 1) == 0) { /* the last done came first */
            CONC__UNLOCK(&wg->mu);
            if (reg) conc__ctx_leave(ctx, &cw, &s);
            conc__sel_fini(&s);
            CONC__HB_AFTER(&wg->state);
            return 0;
        }
        if ((st & CONC__WG_WAITERS) ||
            atomic_compare_exchange_weak_explicit(&wg->state, &st, st | CONC__WG_WAITERS, CONC__ACQ_REL,
                                                  CONC__ACQUIRE))
            break;
    }
    w.sel = &s;
    w.elem = NULL;
    w.case_index = 0;
    w.since = 0;
    conc__wq_push(&wg->waiters, &w);
    wg->inside++;
    CONC__UNLOCK(&wg->mu);

    conc__sel_park(&s);
    if (atomic_load_explicit(&s.fired, CONC__RELAXED) == CONC__OWN_CTX) {
        CONC__LOCK(&wg->mu);
        {
            if (w.queued) conc__wq_remove(&wg->waiters, &w);
            if (!wg->waiters.head) atomic_fetch_and_explicit(&wg->state, ~CONC__WG_WAITERS, CONC__RELAXED);
            wg->inside--; /* the last touch of wg: free may run once mu is unlocked */
        }
        CONC__UNLOCK(&wg->mu);
    } else {
        if (reg) conc__ctx_unregister(ctx, &cw);
        CONC__HB_AFTER(&wg->state);
    }
    conc__sel_fini(&s);
    return s.status;
}

CONC_API int conc_wg_wait(conc_wg_t *wg, conc_ctx_t *ctx) {
    if (!wg) return CONC_INVALID;
    if ((atomic_load_explicit(&wg->state, CONC__ACQUIRE) >> 1) == 0) {
        CONC__HB_AFTER(&wg->state);
        return 0;
    }
    return conc__wg_block(wg, ctx);
}

CONC_API int64_t conc_wg_count(conc_wg_t *wg) {
    if (!wg) return 0;
    return (int64_t)(atomic_load_explicit(&wg->state, CONC__RELAXED) >> 1);
}

/* ======================================================================== */
/* >>sem: weighted semaphores                                               */
/* ======================================================================== */
/* x/sync/semaphore's design: one mutex guards the count and a FIFO of blocked acquires.
   A waiter is a conc__waiter whose elem points at the n it asks for (an int64_t in the
   blocked call's frame).

   Invariants:
   - 0 <= held <= size. Permits move only under mu: acquire and try_acquire take them,
     release gives them back, and a grant moves them to a waiter as it claims it (so a
     claimed waiter holds its permits before it even wakes).
   - The head of waiters, if live, does not fit (size - held < its n): whoever changes held
     or the head (release, a cancelled head leaving, an acquire pruning stale heads) runs
     conc__sem_grant_locked, which grants live heads in order until one does not fit. A new
     acquire queues behind anyone queued, fitting or not (no overtaking).
   - A waiter is granted only by claiming its sel (index 0) under mu; its context's cancel
     claims it with CONC__OWN_CTX. The claim decides: a granted waiter returns 0 and holds
     its permits; a cancelled one took none, and on waking unlinks itself and, if it was
     the head, grants those behind it. A cancelled waiter still linked (stale) is unlinked
     by whoever finds it at the head.
   - inside counts the blocked acquires that will still lock mu: queued ones, and those
     their context claimed until they have left (one may already be unlinked, stale, by a
     grant). A grant that claims a waiter counts it out: its owner never touches sem
     again. Free refuses while inside is not 0; an empty queue is not enough.
   Lock order: sem.mu -> ctx.mu (a blocked acquire registers on its context under mu). */

struct conc_sem {
    pthread_mutex_t mu;
    int64_t size;     /* immutable */
    int64_t held;     /* (mu) permits acquired and not yet released */
    conc__wq waiters; /* (mu) blocked acquires, FIFO; elem -> the int64_t n asked for */
    int64_t inside;   /* (mu) blocked acquires that will still lock mu (see invariants) */
};

CONC_API conc_sem_t *conc_sem_new(int64_t size) {
    if (size < 0) return NULL;
    conc_sem_t *sem = (conc_sem_t *)CONC_MALLOC(sizeof *sem);
    if (!sem) return NULL;
    memset(sem, 0, sizeof *sem);
    conc__mutex_init(&sem->mu);
    sem->size = size;
    return sem;
}

CONC_API int conc_sem_free(conc_sem_t *sem) {
    if (!sem) return 0;
    bool busy;
    CONC__LOCK(&sem->mu);
    busy = sem->inside != 0; /* cancelled ones too, linked or not: their owners will still lock mu */
    CONC__UNLOCK(&sem->mu);
    if (busy) return CONC_BUSY;
    pthread_mutex_destroy(&sem->mu);
    CONC_FREE(sem);
    return 0;
}

/* sem->mu held. Grants live waiters at the head, in order, while they fit; drops stale
   ones met on the way. The granted are pushed on *wake, to be woken after unlocking. */
static void conc__sem_grant_locked(conc_sem_t *sem, conc__waiter **wake) {
    conc__waiter *w;
    while ((w = sem->waiters.head) != NULL) {
        int64_t n = *(const int64_t *)w->elem;
        if (sem->size - sem->held < n) {
            /* a head that does not fit blocks the rest, unless its context already won */
            if (atomic_load_explicit(&w->sel->fired, CONC__ACQUIRE) == CONC__UNFIRED) break;
            conc__wq_remove(&sem->waiters, w);
            continue;
        }
        conc__wq_remove(&sem->waiters, w);
        if (!conc__sel_claim(w->sel, 0)) continue; /* cancelled meanwhile: stale */
        sem->inside--; /* granted: its owner does not come back */
        sem->held += n;
        w->sel->status = 0;
        w->next = *wake;
        *wake = w;
    }
}

/* sem->mu held on entry, released on return; *wake: waiters granted by the caller. */
static int conc__sem_block(conc_sem_t *sem, int64_t n, conc_ctx_t *ctx, conc__waiter *wake) {
    conc__sel s;
    conc__waiter w, cw;
    int64_t want = n; /* what w.elem points at: read by granters under mu */
    bool reg = conc__ctx_can_end(ctx);
    conc__sel_init(&s);
    if (reg) {
        int e = conc__ctx_register(ctx, &cw, &s, CONC__OWN_CTX);
        if (e) {
            CONC__UNLOCK(&sem->mu);
            conc__wake_list(wake);
            conc__sel_fini(&s);
            return e;
        }
    }
    w.sel = &s;
    w.elem = &want;
    w.case_index = 0;
    w.since = 0;
    conc__wq_push(&sem->waiters, &w);
    sem->inside++;
    CONC__UNLOCK(&sem->mu);
    conc__wake_list(wake);

    conc__sel_park(&s);
    if (atomic_load_explicit(&s.fired, CONC__RELAXED) == CONC__OWN_CTX) {
        wake = NULL;
        CONC__LOCK(&sem->mu);
        if (w.queued) {
            bool was_head = sem->waiters.head == &w;
            conc__wq_remove(&sem->waiters, &w);
            if (was_head) conc__sem_grant_locked(sem, &wake); /* let the next ones go */
        }
        sem->inside--; /* the last touch of sem: free may run once mu is unlocked */
        CONC__UNLOCK(&sem->mu);
        conc__wake_list(wake);
    } else if (reg) {
        conc__ctx_unregister(ctx, &cw); /* granted: the permits are ours, whatever ctx says */
    }
    conc__sel_fini(&s);
    return s.status;
}

/* Fast path of acquire / try_acquire. sem->mu held; returns with it held. */
static bool conc__sem_take_locked(conc_sem_t *sem, int64_t n, conc__waiter **wake) {
    if (sem->waiters.head) conc__sem_grant_locked(sem, wake); /* drops stale heads */
    if (sem->waiters.head || sem->size - sem->held < n) return false;
    sem->held += n;
    return true;
}

CONC_API int conc_sem_acquire(conc_sem_t *sem, int64_t n, conc_ctx_t *ctx) {
    conc__waiter *wake = NULL;
    if (!sem || n < 0 || n > sem->size) return CONC_INVALID;
    CONC__LOCK(&sem->mu);
    if (!conc__sem_take_locked(sem, n, &wake)) return conc__sem_block(sem, n, ctx, wake);
    CONC__UNLOCK(&sem->mu);
    conc__wake_list(wake);
    return 0;
}

CONC_API int conc_sem_try_acquire(conc_sem_t *sem, int64_t n) {
    conc__waiter *wake = NULL;
    bool ok;
    if (!sem || n < 0 || n > sem->size) return CONC_INVALID;
    CONC__LOCK(&sem->mu);
    ok = conc__sem_take_locked(sem, n, &wake);
    CONC__UNLOCK(&sem->mu);
    conc__wake_list(wake);
    return ok ? 0 : CONC_WOULD_BLOCK;
}

CONC_API int conc_sem_release(conc_sem_t *sem, int64_t n) {
    conc__waiter *wake = NULL;
    int rc = 0;
    if (!sem || n < 0) return CONC_INVALID;
    CONC__LOCK(&sem->mu);
    {
        if (n > sem->held) {
            rc = CONC_OVER_RELEASE;
        } else {
            sem->held -= n;
            conc__sem_grant_locked(sem, &wake);
        }
    }
    CONC__UNLOCK(&sem->mu);
    conc__wake_list(wake);
    return rc;
}

CONC_API int64_t conc_sem_available(conc_sem_t *sem) {
    int64_t a;
    if (!sem) return 0;
    CONC__LOCK(&sem->mu);
    a = sem->size - sem->held;
    CONC__UNLOCK(&sem->mu);
    return a;
}

/* ======================================================================== */
/* >>once: run a function exactly once                                      */
/* ======================================================================== */
/* A conc_once_t is the user's object, static or zeroed, with no constructor and no
   destructor, and the public zone does not include <pthread.h>: it cannot hold a mutex.
   Its state word is guarded by a mutex from a small global table, chosen by hashing the
   once's address (unrelated onces rarely share one; a table lock is held for a few
   instructions, never across fn, so fn may use other onces that hash to the same lock).
   Blocked callers park on their own conc__sel as every blocked call in conc.h does; the
   list head lives in the once.

   Invariants:
   - state goes NEW -> RUNNING -> DONE, each step under the table lock. DONE is stored with
     release after result and value are written, so the fast path (an acquire load that
     reads DONE) may read them without the lock. Helgrind does not see that edge: under
     Valgrind the fast path is skipped and the lock always taken (TSan checks the fast
     path, Helgrind the locked protocol).
   - owner (table lock) is &conc__once_self of the thread running fn while RUNNING, else
     NULL: a caller that finds RUNNING and itself as owner is fn recursing.
   - waiters (table lock): a doubly linked list (through prev/next, head only) of blocked
     callers, linked only while RUNNING. A waiter is completed by claiming its sel: the
     runner claims with index 0 when fn has returned, the waiter's context with
     CONC__OWN_CTX when it ends. The claim decides: claimed by the runner = the result,
     by the context = the ctx's err (fn keeps running; a later call gets its result).
   - The runner unlinks every waiter when it sets DONE, in the same critical section, and
     wakes only those it claimed, after unlocking. A waiter its context claimed unlinks
     itself under the lock if it is still linked, so none outlives its frame; the runner
     touches a stale waiter only while holding the lock that its owner must take.
   - Happens-before for the result: the runner writes result/value before the release
     store (fast path), before taking the lock to set DONE (lock path), and before the
     wake (a woken waiter's park is the acquire).
   Lock order: once table lock -> ctx.mu (a waiter registers on its context under the
   table lock). Nothing is held while fn runs. */

#define CONC__ONCE_NEW 0
#define CONC__ONCE_RUNNING 1
#define CONC__ONCE_DONE 2
#define CONC__ONCE_LOCKS 64 /* a power of two */

static pthread_mutex_t conc__once_locks[CONC__ONCE_LOCKS];
static pthread_once_t conc__once_locks_once = PTHREAD_ONCE_INIT;
static _Thread_local char conc__once_self; /* its address names the thread while it lives */

_Static_assert(sizeof(_Atomic int) == sizeof(int) && _Alignof(_Atomic int) == _Alignof(int),
               "conc_once_t's int state is accessed as an _Atomic int");

static void conc__once_locks_init(void) {
    for (int i = 0; i < CONC__ONCE_LOCKS; i++) conc__mutex_init(&conc__once_locks[i]);
}

static pthread_mutex_t *conc__once_lock(const conc_once_t *o) {
    uint64_t a = (uint64_t)(uintptr_t)o;
    a ^= a >> 7;
    a *= 0x9E3779B97F4A7C15u;
    pthread_once(&conc__once_locks_once, conc__once_locks_init);
    return &conc__once_locks[(a >> 32) & (CONC__ONCE_LOCKS - 1)];
}

static _Atomic int *conc__once_state(conc_once_t *o) { return (_Atomic int *)(void *)&o->state; }

/* The fast path: fn has returned and its result may be read without the lock. */
static inline bool conc__once_is_done(conc_once_t *o) {
    return !CONC__ON_VALGRIND() && atomic_load_explicit(conc__once_state(o), CONC__ACQUIRE) == CONC__ONCE_DONE;
}

/* Runs fn (or fnv) if no one has, else waits for whoever runs it. Returns 0 once o is DONE
   (its result may then be read), CONC_RECURSIVE, or ctx's err. */
static int conc__once_slow(conc_once_t *o, int (*fn)(void *), int (*fnv)(void *, void **), void *arg,
                           conc_ctx_t *ctx) {
    pthread_mutex_t *mu = conc__once_lock(o);
    conc__sel s;
    conc__waiter w, cw;
    CONC__LOCK(mu);
    int st = atomic_load_explicit(conc__once_state(o), CONC__RELAXED);
    if (st == CONC__ONCE_DONE) {
        CONC__UNLOCK(mu);
        return 0;
    }
    if (st == CONC__ONCE_NEW) {
        conc__waiter *wake = NULL, *x, *next;
        atomic_store_explicit(conc__once_state(o), CONC__ONCE_RUNNING, CONC__RELAXED);
        o->owner = (void *)&conc__once_self;
        CONC__UNLOCK(mu);

        void *v = NULL; /* fn writes here, not into o: a recursive call may write its own out */
        int r = fn ? fn(arg) : fnv(arg, &v); /* no lock held: fn may block, use other onces */
        o->result = r;
        o->value = v;

        CONC__LOCK(mu);
        {
            o->owner = NULL;
            atomic_store_explicit(conc__once_state(o), CONC__ONCE_DONE, CONC__RELEASE);
            for (x = (conc__waiter *)o->waiters; x; x = next) {
                next = x->next;
                x->prev = x->next = NULL;
                x->queued = false;
                if (!conc__sel_claim(x->sel, 0)) continue; /* its context won: stale */
                x->sel->status = 0;
                x->next = wake;
                wake = x;
            }
            o->waiters = NULL;
        }
        CONC__UNLOCK(mu);
        conc__wake_list(wake);
        return 0;
    }
    if (o->owner == (void *)&conc__once_self) {
        CONC__UNLOCK(mu);
        return CONC_RECURSIVE; /* fn called its own once: Go deadlocks here */
    }

    /* RUNNING on another thread: wait for it, or for ctx. */
    bool reg = conc__ctx_can_end(ctx);
    conc__sel_init(&s);
    if (reg) {
        int e = conc__ctx_register(ctx, &cw, &s, CONC__OWN_CTX);
        if (e) {
            CONC__UNLOCK(mu);
            conc__sel_fini(&s);
            return e;
        }
    }
    w.sel = &s;
    w.elem = NULL;
    w.case_index = 0;
    w.since = 0;
    w.prev = NULL;
    w.next = (conc__waiter *)o->waiters;
    if (w.next) w.next->prev = &w;
    o->waiters = &w;
    w.queued = true;
    CONC__UNLOCK(mu);

    conc__sel_park(&s);
    if (atomic_load_explicit(&s.fired, CONC__RELAXED) == CONC__OWN_CTX) {
        CONC__LOCK(mu);
        if (w.queued) {
            if (w.prev) w.prev->next = w.next;
            else o->waiters = w.next;
            if (w.next) w.next->prev = w.prev;
            w.queued = false;
        }
        CONC__UNLOCK(mu);
    } else if (reg) {
        conc__ctx_unregister(ctx, &cw); /* fn has returned: the result is ours, whatever ctx says */
    }
    conc__sel_fini(&s);
    return s.status;
}

CONC_API int conc_once_do(conc_once_t *once, int (*fn)(void *arg), void *arg, conc_ctx_t *ctx) {
    if (!once || !fn) return CONC_INVALID;
    if (!conc__once_is_done(once)) {
        int rc = conc__once_slow(once, fn, NULL, arg, ctx);
        if (rc != 0) return rc;
    }
    return once->result;
}

CONC_API int conc_once_do_value(conc_once_t *once, int (*fn)(void *arg, void **value), void *arg, void **value,
                                conc_ctx_t *ctx) {
    if (value) *value = NULL;
    if (!once || !fn) return CONC_INVALID;
    if (!conc__once_is_done(once)) {
        int rc = conc__once_slow(once, NULL, fn, arg, ctx);
        if (rc != 0) return rc;
    }
    if (value) *value = once->value;
    return once->result;
}

CONC_API bool conc_once_done(conc_once_t *once) {
    if (!once) return false;
    if (CONC__ON_VALGRIND()) {
        pthread_mutex_t *mu = conc__once_lock(once);
        int st;
        CONC__LOCK(mu);
        st = atomic_load_explicit(conc__once_state(once), CONC__RELAXED);
        CONC__UNLOCK(mu);
        return st == CONC__ONCE_DONE;
    }
    return atomic_load_explicit(conc__once_state(once), CONC__ACQUIRE) == CONC__ONCE_DONE;
}

/* ======================================================================== */
/* >>internal: the worker engine (hand-off pools and groups)                */
/* ======================================================================== */
typedef struct conc__job {
    conc_task_fn fn;
    void *arg;
    conc_future_t *fut; /* pools: completed with the job's result; may be NULL */
} conc__job;

/* The engine (conc__core): a set of worker threads, the waiting workers and the blocked
   submitters. It is an unbuffered channel whose receivers are the workers (runtime/chan.go
   again), plus a limit on the jobs running at once and threads started on demand: a
   submit hands its job straight to a waiting worker, else starts a worker with it, else
   (at the limit) blocks; a worker that finishes takes the next job straight from a
   blocked submitter, else waits.

   Boxes: the hand-off without a lock. The first CONC__BOXES workers to wait each take a
   box of the core's (a cache line: a sel and a job) and from then on wait in it: the
   worker "posts" the box (sel.fired back to UNFIRED, a release store), a submit claims it
   (the sel's CAS), writes the job and wakes the worker (the park word): one line goes to
   the submitter and back per job, which is the least any hand-off between threads costs
   (see floor_handoff2 in bench/bench_pool.c). Workers beyond the boxes wait on `idle`
   under mu, as every worker does while the rare cases below need the lock.
   `flags` (a line read by every submit, written under mu) sends submits to the lock while
   a submitter is blocked (FIFO: a newcomer must not overtake it), during a shutdown, and
   while there are more workers than the limit allows to run at once (only then must a
   submit count the jobs running). A worker counts its finished job (done) and posts its
   box without mu, then re-reads flags; a submitter that blocks, a shutdown and a wait for
   no job running set their flag under mu, then look at the boxes (fired, done). All four
   accesses of such a pair are seq_cst, so they fall in one total order and one of the two
   sees the other (Dekker; no standalone fence, which ThreadSanitizer cannot check): a job
   never waits in the queue beside a free box, and a posted box never misses a shutdown or
   a wait for the last job.

   Invariants (all under mu but the box protocol):
   - A job is accepted exactly once and then runs exactly once: it moves from the
     submitter's frame into a box or a worker's slot by claiming that sel (which makes the
     claimer its only writer until the wake), or into a new worker, or is taken from a
     blocked submitter by a worker, under mu. A blocked submitter's job moves only by
     claiming its sel (index 0): the claim decides between a worker taking it (submit
     returns 0), the shutdown refusing it (CONC_SHUTDOWN) and its context (the ctx's err),
     exactly as a channel send racing its cancellation.
   - A box is free (fired UNFIRED) only while its owner waits in it. It is claimed by a
     submit (status 0, a job), by the shutdown (CONC_SHUTDOWN: leave) and by its owner,
     under mu, to take a blocked job, to leave, or to stop waiting (CONC__BOX_SELF).
     Unowned boxes stay claimed. given counts the jobs handed through a box (by the claimer
     or the owner, before the owner runs it), done those its owner has finished (after
     the outcome is recorded): given - done is 0 or 1.
   - Jobs running = active (jobs of workers without a box: handed under mu, finished under
     mu) + the sum over the boxes of given - done, read as every done, then every given: a
     task that hands a child to one box and ends in another while the sum is read is then
     counted with its child or still running, never as neither (box by box, the child's
     box may be read before the hand-off and the parent's after its end).
     The limit bounds it. While nworkers <= limit (flag OVER clear) a free worker proves a
     free slot, so the submit's lock-free path needs no count; threads are started only
     while nworkers < limit.
   - idle holds workers without a box, LIFO (the most recently idle is the likeliest to be
     still spinning), each with a freshly initialised sel, claimed only by a submit (status
     0, job in its slot) or by the shutdown (status CONC_SHUTDOWN).
   - nworkers counts workers started and not yet left; `live` (a wait group) reaches 0 once
     every worker has left its loop.
   - A worker idle for idle_ns leaves only if, under mu, it is still unclaimed (off idle
     unclaimed, or its box claimed back by itself) and its start is recorded; it moves
     itself from all to left and folds its count into finished_left. left holds at most
     one worker between two leaves: each leaver joins those before it; the joiner joins the
     rest.
   - Once shutting is set nothing is accepted but by a submit already past flags (its job
     runs before the workers leave), no worker waits any more, blocked submitters were
     refused; workers leave.
   Lock order: core.mu -> ctx.mu (a blocked submit registers on its context under mu). No
   user code, wake or thread start runs under mu. */

struct conc__core;

#define CONC__BOXES 8
#define CONC__BOX_SELF 1   /* sel.fired of a box its owner (or nobody) holds: not free */
#define CONC__CORE_RETRY 1 /* status of a blocked submit: a failed thread start gave back a slot; accept again */

/* core.flags */
#define CONC__CF_BLOCKED 1u /* blocked may hold a submitter: submits go through mu */
#define CONC__CF_SHUT 2u    /* shutting */
#define CONC__CF_DRAIN 4u   /* drained may hold a wait: a worker that finished looks under mu */
#define CONC__CF_OVER 8u    /* limit >= 0 and nworkers > limit: submits count the jobs running */
#define CONC__CF_CAPPED 16u /* limit >= 0 and nworkers >= limit: no thread to start, so a submit
                               that finds no free box watches the boxes for a moment */
#define CONC__CF_IDLE 32u   /* idle holds a worker: a submit that finds no free box has one under mu */

typedef struct conc__box {
    _Alignas(64) conc__sel s;   /* fired UNFIRED: free, its owner waits in it */
    conc__job job;              /* written by the claimer before the wake */
    _Atomic uint64_t given;     /* jobs handed through this box (the claimer, or the owner under mu) */
    _Atomic uint64_t done;      /* of those, finished (the owner) */
    _Alignas(64) conc__waiter w; /* (mu) the box on a wake list; w.sel = &s */
    struct conc__worker *owner;  /* (mu) NULL: unowned (and claimed) */
} conc__box;

typedef struct conc__worker {
    conc__waiter w;             /* on core.idle while waiting without a box; w.sel = &s */
    conc__sel s;                /* re-initialised for each wait */
    conc__job job;              /* written by whoever claims s with status 0 */
    struct conc__core *core;    /* immutable */
    conc__box *box;             /* (mu; read by this worker without it) the box it waits in, or NULL */
    conc__thread *thread;       /* (core.mu) set once started; joined by the core's joiner */
    struct conc__worker *next;  /* (core.mu) core.all */
    _Atomic uint64_t finished;  /* tasks this worker ran: written by it only (release, after the task) */
} conc__worker;

typedef struct conc__core {
    conc__spinlock mu;
    conc__wq idle;              /* (mu) waiting workers without a box, LIFO */
    conc__wq blocked;           /* (mu) blocked submitters, FIFO; elem -> their conc__job */
    conc__wq drained;           /* (mu) waits for no job running */
    int64_t limit;              /* (mu) most jobs running at once; -1: none */
    int64_t active;             /* (mu) jobs of workers without a box: handed, not finished */
    size_t nworkers;            /* (mu) started and not yet left */
    uint64_t finished_left;     /* (mu) tasks run by workers that left (idle, or joined) */
    bool shutting;              /* (mu) */
    int64_t idle_ns;            /* immutable: how long a worker waits before it ends; < 0: for ever */
    bool pool;                  /* immutable: a pool's engine (else a group's): which per-job hook */
    pthread_mutex_t join_mu;    /* held by a joiner: a second shutdown returns after the first joined */
    conc__worker *all;          /* (mu) every worker started and not left, for the joiner */
    conc__worker *left;         /* (mu) workers that left while idle, not yet joined */
    conc_ctx_t *ctx;            /* immutable: the jobs' context; the core's reference */
    conc_wg_t *live;            /* workers that have not left their loop */
    const char *purpose, *file; /* immutable: for the thread registry */
    int line;
    /* statistics (mu) */
    uint64_t submitted, blocked_n, threads; /* submitted: jobs accepted but not through a box */
    _Atomic int64_t blocked_ns; /* added without mu by submits that were granted */
    _Alignas(64) _Atomic unsigned flags; /* CONC__CF_*: written under mu, read by all */
    _Atomic int nbox;           /* boxes ever owned (a prefix of box); never shrinks */
    conc__box box[CONC__BOXES];
} conc__core;

/* ---- the engine ---- */

static void conc__core_task_done(struct conc__core *core, conc__worker *wk, const conc__job *job, int rc);

static bool conc__worker_asleep(conc__worker *wk) {
    return atomic_load_explicit(&wk->s.park, CONC__RELAXED) > CONC__PARK_DONE;
}

/* mu held. Sets or clears flag bits (seq_cst: BLOCKED, SHUT and DRAIN are one side of a
   Dekker pair with the boxes, see above). */
static void conc__core_flag_locked(conc__core *c, unsigned bits, bool on) {
    unsigned f = atomic_load_explicit(&c->flags, CONC__RELAXED);
    unsigned nf = on ? f | bits : f & ~bits;
    if (nf == f) return;
    atomic_store_explicit(&c->flags, nf, CONC__SEQ_CST);
}

/* mu held: OVER and CAPPED from limit and nworkers (call after either changes). */
static void conc__core_limit_flags_locked(conc__core *c) {
    bool lim = c->limit >= 0;
    conc__core_flag_locked(c, CONC__CF_OVER, lim && (int64_t)c->nworkers > c->limit);
    conc__core_flag_locked(c, CONC__CF_CAPPED, lim && (int64_t)c->nworkers >= c->limit);
}

/* mu held: jobs accepted and not finished (see the invariants). */
static int64_t conc__core_running_locked(conc__core *c) {
    int64_t n = c->active;
    int nb = atomic_load_explicit(&c->nbox, CONC__RELAXED);
    /* every done first, then every given: a task that hands a child to a box and finishes
       while we scan is seen either still running (its done not read yet) or together with
       its child's given (read after its done: the hand-off happens before it) */
    for (int i = 0; i < nb; i++) {
        n -= (int64_t)atomic_load_explicit(&c->box[i].done, CONC__SEQ_CST); /* Dekker with DRAIN */
        CONC__HB_AFTER(&c->box[i].done); /* the finished tasks happen before whoever counts them */
        CONC__RACE_POINT(); /* a task may hand a child to another box and end now */
    }
    for (int i = 0; i < nb; i++) n += (int64_t)atomic_load_explicit(&c->box[i].given, CONC__RELAXED);
    return n;
}

/* mu held. Jobs running, for the statistics. conc__core_running_locked may count too many
   (never too few, which is what waits and the limit need): the lock-free hand-offs that
   came and finished between its scan of done and its scan of given. Read until done
   stands still across the count, and never more than the workers. */
static int64_t conc__core_running_stat_locked(conc__core *c) {
    int nb = atomic_load_explicit(&c->nbox, CONC__RELAXED);
    int64_t n = 0;
    for (int tries = 0; tries < 8; tries++) {
        uint64_t d0 = 0, d1 = 0;
        for (int i = 0; i < nb; i++) d0 += atomic_load_explicit(&c->box[i].done, CONC__RELAXED);
        n = conc__core_running_locked(c);
        for (int i = 0; i < nb; i++) d1 += atomic_load_explicit(&c->box[i].done, CONC__RELAXED);
        if (d0 == d1) break;
    }
    if (n > (int64_t)c->nworkers) n = (int64_t)c->nworkers;
    return n < 0 ? 0 : n;
}

/* mu held: jobs accepted so far, and finished so far (statistics). */
static void conc__core_totals_locked(conc__core *c, uint64_t *accepted, uint64_t *finished) {
    uint64_t a = c->submitted, f = c->finished_left;
    /* finished first (acquire: a job's hand-off happens before its count), then given */
    for (conc__worker *w = c->all; w; w = w->next) f += atomic_load_explicit(&w->finished, CONC__ACQUIRE);
    for (int i = 0; i < atomic_load_explicit(&c->nbox, CONC__RELAXED); i++)
        a += atomic_load_explicit(&c->box[i].given, CONC__RELAXED);
    *accepted = a;
    *finished = f;
}

/* mu held: may one more job run? */
static bool conc__core_has_slot_locked(conc__core *c) {
    return !(atomic_load_explicit(&c->flags, CONC__RELAXED) & CONC__CF_OVER) || conc__core_running_locked(c) < c->limit;
}

/* ---- boxes ---- */

/* The owner makes its box free again (the last job's reads happen before the next
   claimer's writes); seq_cst: the owner then reads flags (Dekker, see above). */
static void conc__box_post(conc__box *b) {
    b->s.status = 0;
    atomic_store_explicit(&b->s.park, CONC__PARK_WAITING, CONC__RELAXED);
    CONC__HB_BEFORE(&b->job);
    atomic_store_explicit(&b->s.fired, CONC__UNFIRED, CONC__SEQ_CST);
}

/* Claims a free box, preferring one whose owner is awake (waking a sleeper costs the
   waker ~13 us); NULL if none is free. */
static conc__box *conc__core_claim_box(conc__core *c) {
    int nb = atomic_load_explicit(&c->nbox, CONC__ACQUIRE);
    conc__box *sleeper = NULL;
    for (int i = 0; i < nb; i++) {
        conc__box *b = &c->box[i];
        if (atomic_load_explicit(&b->s.fired, CONC__SEQ_CST) != CONC__UNFIRED) continue; /* Dekker */
        if (atomic_load_explicit(&b->s.park, CONC__RELAXED) > CONC__PARK_DONE) {
            if (!sleeper) sleeper = b;
        } else if (conc__sel_claim(&b->s, 0)) {
            return b;
        }
    }
    if (sleeper && conc__sel_claim(&sleeper->s, 0)) return sleeper;
    return NULL;
}

/* The claimer of b writes what it hands over (job NULL: status only), then wakes the
   owner (conc__sel_wake(&b->s), outside mu). */
static void conc__box_fill(conc__box *b, const conc__job *job, int status) {
    CONC__HB_AFTER(&b->job); /* after the owner's reads of the job before */
    if (job) {
        b->job = *job;
        atomic_store_explicit(&b->given, atomic_load_explicit(&b->given, CONC__RELAXED) + 1, CONC__RELAXED);
    }
    b->s.status = status;
}

/* The lock-free submit: a free box, else (no thread to start) watch the boxes for as long
   as a blocked call would spin. True once the job is handed over. */
typedef struct conc__box_watch {
    conc__core *c;
    conc__box *got;
} conc__box_watch;

static bool conc__box_watch_ready(void *arg) {
    conc__box_watch *bw = (conc__box_watch *)arg;
    if (atomic_load_explicit(&bw->c->flags, CONC__RELAXED) != CONC__CF_CAPPED) return true; /* the lock decides */
    bw->got = conc__core_claim_box(bw->c);
    return bw->got != NULL;
}

static bool conc__core_submit_box(conc__core *c, const conc__job *job, bool block) {
    unsigned f = atomic_load_explicit(&c->flags, CONC__RELAXED);
    if (f & (CONC__CF_BLOCKED | CONC__CF_SHUT | CONC__CF_OVER)) return false;
    CONC__RACE_POINT(); /* a submitter blocking, a shutdown or a lower limit may come now */
    conc__box_watch bw = {c, conc__core_claim_box(c)};
    if (!bw.got && block && f == CONC__CF_CAPPED) conc__spin(conc__box_watch_ready, &bw);
    if (!bw.got) return false;
    conc__box_fill(bw.got, job, 0);
    conc__sel_wake(&bw.got->s);
    return true;
}

/* mu held: gives the worker an unowned box, if one is left. */
static conc__box *conc__core_take_box_locked(conc__core *c, conc__worker *wk) {
    for (int i = 0; i < CONC__BOXES; i++) {
        conc__box *b = &c->box[i];
        if (b->owner) continue;
        b->owner = wk;
        wk->box = b;
        if (i >= atomic_load_explicit(&c->nbox, CONC__RELAXED)) atomic_store_explicit(&c->nbox, i + 1, CONC__RELEASE);
        return b;
    }
    return NULL;
}

/* ---- accepting and taking jobs ---- */

/* mu held. Tries to accept *job without blocking: free boxes go to blocked submitters
   first (FIFO), then to the job; then a waiting worker without a box; then a new worker
   (*spawn). 0: accepted (the claimed go on *wake, woken after unlocking); else
   CONC_SHUTDOWN or CONC_WOULD_BLOCK. */
static int conc__core_accept_locked(conc__core *c, const conc__job *job, conc__waiter **wake, bool *spawn) {
    if (c->shutting) return CONC_SHUTDOWN;
    for (;;) {
        if (!conc__core_has_slot_locked(c)) return CONC_WOULD_BLOCK;
        conc__box *b = conc__core_claim_box(c);
        if (!b) break;
        conc__waiter *w = conc__wq_claim(&c->blocked);
        conc__box_fill(b, w ? (const conc__job *)w->elem : job, 0);
        conc__wake_push(wake, &b->w);
        if (!w) return 0;
        w->sel->status = 0;
        conc__wake_push(wake, w);
    }
    while (c->blocked.head && atomic_load_explicit(&c->blocked.head->sel->fired, CONC__RELAXED) != CONC__UNFIRED)
        conc__wq_remove(&c->blocked, c->blocked.head); /* stale: its owner was claimed by its ctx */
    if (c->blocked.head) return CONC_WOULD_BLOCK; /* behind the blocked ones */
    conc__waiter *iw = c->idle.head;
    if (iw) {
        /* the first worker that is awake (among the first 8: spinners are recent, so near
           the head), else the most recent sleeper */
        int k = 0;
        for (conc__waiter *x = iw; x && k < 8; x = x->next, k++)
            if (!conc__worker_asleep((conc__worker *)(void *)x)) {
                iw = x;
                break;
            }
        conc__worker *wk = (conc__worker *)(void *)iw; /* w is the first member */
        conc__wq_remove(&c->idle, iw);
        if (!c->idle.head) conc__core_flag_locked(c, CONC__CF_IDLE, false);
        bool claimed = conc__sel_claim(&wk->s, 0); /* idle workers are claimed only here and by shutdown */
        CONC_ASSERT(claimed);
        (void)claimed;
        wk->job = *job;
        wk->s.status = 0;
        c->active++;
        c->submitted++;
        conc__wake_push(wake, iw);
        return 0;
    }
    if (c->limit >= 0 && (int64_t)c->nworkers >= c->limit) return CONC_WOULD_BLOCK;
    c->nworkers++; /* no worker waits: start one (threads grow on demand, up to the limit) */
    conc__core_limit_flags_locked(c);
    c->active++;
    c->submitted++;
    *spawn = true;
    return 0;
}

/* mu held. A worker's next job: straight from the first blocked submitter, if the limit
   allows; counted in the worker's box (claimed back by it), or in active. *wake: the
   submitter to wake. */
static bool conc__core_next_locked(conc__core *c, conc__box *box, conc__job *out, conc__waiter **wake) {
    if (!conc__core_has_slot_locked(c)) return false;
    conc__waiter *b = conc__wq_claim(&c->blocked);
    if (!b) {
        conc__core_flag_locked(c, CONC__CF_BLOCKED, false);
        return false;
    }
    *out = *(const conc__job *)b->elem;
    b->sel->status = 0;
    if (box) {
        atomic_store_explicit(&box->given, atomic_load_explicit(&box->given, CONC__RELAXED) + 1, CONC__RELAXED);
    } else {
        c->submitted++;
        c->active++;
    }
    conc__wake_push(wake, b);
    return true;
}

static void conc__core_run(conc__core *c, conc__worker *wk, conc__job *job) {
    conc__core_task_done(c, wk, job, job->fn(job->arg, c->ctx));
}

/* mu held: once no job runs, the waits for that are claimed (status 0) onto *wake. */
static void conc__core_drained_locked(conc__core *c, conc__waiter **wake) {
    conc__waiter *w;
    if (!c->drained.head) {
        conc__core_flag_locked(c, CONC__CF_DRAIN, false);
        return;
    }
    if (conc__core_running_locked(c) != 0) return;
    while ((w = conc__wq_claim(&c->drained)) != NULL) {
        w->sel->status = 0;
        conc__wake_push(wake, w);
    }
    conc__core_flag_locked(c, CONC__CF_DRAIN, false);
}

/* ---- workers ---- */

/* Joins and frees workers that left while idle (a list through next). */
static void conc__core_join_list(conc__worker *w) {
    while (w) {
        conc__worker *next = w->next;
        conc__thread_join(w->thread);
        CONC__CHECKED(&w->finished);
        CONC_FREE(w);
        w = next;
    }
}

/* mu held: the worker gives its box up and stops counting in nworkers. */
static void conc__worker_quit_locked(conc__core *c, conc__worker *wk) {
    if (wk->box) {
        wk->box->owner = NULL; /* the box stays claimed: nobody hands anything to it */
        wk->box = NULL;
    }
    c->nworkers--;
    conc__core_limit_flags_locked(c);
}

/* A worker idle for idle_ns leaves: true once it has (its thread returns). False: a
   submit or the shutdown claimed it meanwhile (the claimer wakes it), or its start is not
   recorded yet (thread NULL: its starter still holds a pointer to it); either way it parks
   again. Under mu, a worker still unclaimed (on idle, or its box free) can be taken off,
   and nobody reaches it once it is off idle, its box and all. It waits on `left` to be
   joined by the next worker that leaves or by the joiner, and joins those that left
   before it: a group keeps at most one ended thread unjoined, and every thread is joined
   (its stack comes back, and Helgrind sees its end). */
static bool conc__worker_leave_idle(conc__core *c, conc__worker *wk) {
    conc__spin_lock(&c->mu);
    if (wk->thread == NULL || (wk->box ? !conc__sel_claim(&wk->box->s, CONC__BOX_SELF) : !wk->w.queued)) {
        conc__spin_unlock(&c->mu);
        return false;
    }
    if (!wk->box) {
        conc__wq_remove(&c->idle, &wk->w);
        if (!c->idle.head) conc__core_flag_locked(c, CONC__CF_IDLE, false);
    }
    conc__worker_quit_locked(c, wk);
    conc__worker **p = &c->all;
    while (*p != wk) p = &(*p)->next;
    *p = wk->next;
    c->finished_left += atomic_load_explicit(&wk->finished, CONC__RELAXED);
    conc__worker *before = c->left;
    wk->next = NULL;
    c->left = wk;
    conc__spin_unlock(&c->mu);
    conc__sel_fini(&wk->s);
    conc__core_join_list(before);
    conc_wg_done(c->live); /* the last touch of c and of wk */
    return true;
}

/* Waits until s is claimed (true) or the worker has left for being idle (false). */
static bool conc__worker_wait(conc__core *c, conc__worker *wk, conc__sel *s) {
    if (c->idle_ns < 0) {
        conc__sel_park(s);
        return true;
    }
    while (!conc__sel_park_for(s, c->idle_ns))
        if (conc__worker_leave_idle(c, wk)) return false;
    return true;
}

/* The worker's loop. A worker with a box and nothing to settle under mu posts its box and
   waits without the lock; else it settles under mu: drops a finished job of its own from
   active, takes a blocked job, completes the waits for no job running, leaves on shutdown,
   takes a box, or waits on idle. */
static void conc__worker_main(void *arg) {
    conc__worker *wk = (conc__worker *)arg;
    conc__core *c = wk->core;
    conc__job job = wk->job; /* a worker started for a job has it already (counted in active) */
    bool have = job.fn != NULL, boxed = false; /* boxed: the job counts in wk->box */
    for (;;) {
        conc__waiter *wake = NULL;
        conc__box *b = wk->box;
        bool posted = false;
        unsigned f = 0;
        if (have) {
            conc__core_run(c, wk, &job);
            if (boxed) {
                CONC__HB_BEFORE(&b->done);
                atomic_store_explicit(&b->done, atomic_load_explicit(&b->done, CONC__RELAXED) + 1, CONC__SEQ_CST);
            }
        }
        CONC__RACE_POINT(); /* a wait for no job running may look at the boxes now */
        if (b && (!have || boxed) && !(atomic_load_explicit(&c->flags, CONC__RELAXED) & (CONC__CF_BLOCKED | CONC__CF_SHUT))) {
            conc__box_post(b);
            CONC__RACE_POINT(); /* a flag may be set, and the boxes looked at, now */
            f = atomic_load_explicit(&c->flags, CONC__SEQ_CST); /* the Dekker pair with the flags' setters */
            posted = true;
            if (!(f & (CONC__CF_BLOCKED | CONC__CF_SHUT | CONC__CF_DRAIN))) goto wait;
        }
        conc__spin_lock(&c->mu);
        {
            if (have && !boxed) c->active--;
            have = false;
            conc__core_drained_locked(c, &wake);
            if (posted && !((f & (CONC__CF_BLOCKED | CONC__CF_SHUT)) && conc__sel_claim(&b->s, CONC__BOX_SELF))) {
                /* posted and staying so: nothing else to settle, or the box was claimed
                   meanwhile (a job or the shutdown is on its way) */
                conc__spin_unlock(&c->mu);
                conc__wake_list(wake);
                goto wait;
            }
            have = conc__core_next_locked(c, b, &job, &wake);
            boxed = have && b != NULL;
            if (!have) {
                if (c->shutting) {
                    conc__worker_quit_locked(c, wk);
                    conc__spin_unlock(&c->mu);
                    conc__wake_list(wake);
                    break;
                }
                if (!b) b = conc__core_take_box_locked(c, wk);
                if (b) {
                    conc__box_post(b); /* under mu: every flag a post must not miss is set under mu */
                } else {
                    conc__sel_init(&wk->s);
                    wk->w.sel = &wk->s;
                    wk->w.elem = &wk->job;
                    wk->w.case_index = 0;
                    conc__wq_push_front(&c->idle, &wk->w);
                    conc__core_flag_locked(c, CONC__CF_IDLE, true);
                }
            }
        }
        conc__spin_unlock(&c->mu);
        conc__wake_list(wake);
        if (have) continue;
    wait:
        b = wk->box;
        if (!conc__worker_wait(c, wk, b ? &b->s : &wk->s)) return; /* left: its thread ends */
        int st = b ? b->s.status : wk->s.status;
        if (!b) conc__sel_fini(&wk->s);
        if (st != 0) { /* the shutdown claimed us: nothing is handed over */
            conc__spin_lock(&c->mu);
            conc__worker_quit_locked(c, wk);
            conc__spin_unlock(&c->mu);
            break;
        }
        job = b ? b->job : wk->job;
        have = true;
        boxed = b != NULL;
    }
    conc_wg_done(c->live); /* the last touch of c: after it the core may be freed (after a join) */
}

/* Starts one worker (with a first job, or none) and links it for the joiner. The caller
   counted it in nworkers (and the job in active). */
static int conc__core_start_worker(conc__core *c, const conc__job *first) {
    conc__worker *wk = (conc__worker *)CONC_MALLOC(sizeof *wk);
    if (!wk) return CONC_NOMEM;
    memset(wk, 0, sizeof *wk);
    CONC__UNCHECKED(&wk->finished); /* read by the stats without the worker's sync */
    wk->core = c;
    if (first) wk->job = *first;
    conc_wg_add(c->live, 1);
    conc__spin_lock(&c->mu);
    {
        wk->next = c->all;
        c->all = wk;
        c->threads++;
    }
    conc__spin_unlock(&c->mu);
    conc__thread *t = NULL;
    int rc = conc__thread_start(&t, conc__worker_main, wk, c->purpose, c->file, c->line, 0);
    conc__spin_lock(&c->mu);
    {
        if (rc == 0) {
            wk->thread = t;
        } else {
            conc__worker **p = &c->all;
            while (*p != wk) p = &(*p)->next;
            *p = wk->next;
            c->threads--;
        }
    }
    conc__spin_unlock(&c->mu);
    if (rc != 0) {
        conc_wg_done(c->live);
        CONC__CHECKED(&wk->finished);
        CONC_FREE(wk);
    }
    return rc;
}

static void conc__core_fini_boxes(conc__core *c) {
    for (int i = 0; i < CONC__BOXES; i++) {
        conc__box *b = &c->box[i];
        conc__sel_fini(&b->s);
        CONC__HB_FORGET(&b->job);
        CONC__HB_FORGET(&b->done);
        CONC__CHECKED(&b->given);
        CONC__CHECKED(&b->done);
    }
    CONC__CHECKED(&c->blocked_ns);
    CONC__CHECKED(&c->flags);
    CONC__CHECKED(&c->nbox);
}

/* c is 64-byte aligned (its flags and boxes are). */
static int conc__core_init(conc__core *c, conc_ctx_t *parent, int64_t idle_ns, const char *purpose, const char *file,
                           int line) {
    memset(c, 0, sizeof *c);
    c->limit = -1;
    c->idle_ns = idle_ns;
    c->purpose = purpose;
    c->file = file;
    c->line = line;
    /* statistics and hints read without mu: Helgrind is told not to check them */
    CONC__UNCHECKED(&c->blocked_ns);
    CONC__UNCHECKED(&c->flags);
    CONC__UNCHECKED(&c->nbox);
    atomic_init(&c->blocked_ns, 0);
    atomic_init(&c->flags, 0);
    atomic_init(&c->nbox, 0);
    for (int i = 0; i < CONC__BOXES; i++) {
        conc__box *b = &c->box[i];
        conc__sel_init(&b->s);
        atomic_store_explicit(&b->s.fired, CONC__BOX_SELF, CONC__RELAXED); /* unowned: not free */
        CONC__UNCHECKED(&b->given);
        CONC__UNCHECKED(&b->done);
        atomic_init(&b->given, 0);
        atomic_init(&b->done, 0);
        b->w.sel = &b->s;
    }
    if (conc__spin_init(&c->mu) != 0) goto fail_mu;
    conc__mutex_init(&c->join_mu);
    if (!(c->live = conc_wg_new())) goto fail_join;
    if (!(c->ctx = conc_ctx_with_cancel(parent))) goto fail_wg;
    return 0;
fail_wg:
    conc_wg_free(c->live);
fail_join:
    pthread_mutex_destroy(&c->join_mu);
    conc__spin_destroy(&c->mu);
fail_mu:
    conc__core_fini_boxes(c);
    return CONC_NOMEM;
}

/* Refuses new work, refuses every blocked submitter and lets every waiting worker go. */
static void conc__core_begin_shutdown(conc__core *c) {
    conc__waiter *wake = NULL, *w;
    conc__spin_lock(&c->mu);
    if (!c->shutting) {
        c->shutting = true;
        conc__core_flag_locked(c, CONC__CF_SHUT, true); /* then the boxes (Dekker) */
        CONC__RACE_POINT();
        while ((w = conc__wq_claim(&c->blocked)) != NULL) {
            w->sel->status = CONC_SHUTDOWN;
            conc__wake_push(&wake, w);
        }
        while ((w = c->idle.head) != NULL) {
            conc__wq_remove(&c->idle, w);
            bool claimed = conc__sel_claim(w->sel, 0);
            CONC_ASSERT(claimed);
            (void)claimed;
            w->sel->status = CONC_SHUTDOWN;
            conc__wake_push(&wake, w);
        }
        conc__core_flag_locked(c, CONC__CF_IDLE, false);
        for (int i = 0; i < CONC__BOXES; i++) {
            conc__box *b = &c->box[i];
            if (b->owner && atomic_load_explicit(&b->s.fired, CONC__SEQ_CST) == CONC__UNFIRED && /* Dekker */
                conc__sel_claim(&b->s, 0)) {
                conc__box_fill(b, NULL, CONC_SHUTDOWN);
                conc__wake_push(&wake, &b->w);
            }
        }
    }
    conc__spin_unlock(&c->mu);
    conc__wake_list(wake);
}

/* Joins every worker that has left (all of them: called once `live` is 0). */
static void conc__core_join(conc__core *c) {
    conc__worker *all, *left;
    CONC__LOCK(&c->join_mu); /* a later joiner waits until the first has joined them all */
    conc__spin_lock(&c->mu);
    all = c->all;
    left = c->left;
    c->all = c->left = NULL;
    for (conc__worker *w = all; w; w = w->next) /* final: they have left their loop; the stats keep them */
        c->finished_left += atomic_load_explicit(&w->finished, CONC__ACQUIRE);
    conc__spin_unlock(&c->mu);
    conc__core_join_list(all);
    conc__core_join_list(left);
    CONC__UNLOCK(&c->join_mu);
}

static void conc__core_destroy(conc__core *c) {
    conc__core_begin_shutdown(c);
    conc_wg_wait(c->live, NULL);
    conc__core_join(c);
    conc_ctx_release(c->ctx);
    conc_wg_free(c->live);
    pthread_mutex_destroy(&c->join_mu);
    conc__spin_destroy(&c->mu);
    conc__core_fini_boxes(c);
}

/* Accepts *job, blocking the caller as a submitter while the limit is reached (block). */
static int conc__core_submit(conc__core *c, const conc__job *job, conc_ctx_t *ctx, bool block) {
    if (conc__core_submit_box(c, job, block)) return 0;
    for (;;) {
        conc__waiter *wake = NULL;
        bool spawn = false;
        conc__spin_lock(&c->mu);
        int rc = conc__core_accept_locked(c, job, &wake, &spawn);
        if (rc == CONC_WOULD_BLOCK && block) {
            /* flag first, then look at the boxes again: a box posted after this look
               has its owner see the flag (Dekker), and it takes the queue's head */
            conc__core_flag_locked(c, CONC__CF_BLOCKED, true);
            CONC__RACE_POINT(); /* a worker may post its box now */
            rc = conc__core_accept_locked(c, job, &wake, &spawn);
            if (rc == CONC_WOULD_BLOCK) {
                conc__job mine = *job; /* the waiter's elem: the granting worker copies it under mu */
                int64_t waited;
                rc = conc__block_queued(&c->mu, &c->blocked, &mine, ctx, NULL, NULL, wake, &c->blocked_n, NULL, NULL,
                                        &waited);
                atomic_fetch_add_explicit(&c->blocked_ns, waited, CONC__RELAXED);
                if (rc == CONC__CORE_RETRY) continue; /* a failed start gave back the slot we waited for */
                return rc;
            }
        }
        if (!c->blocked.head) conc__core_flag_locked(c, CONC__CF_BLOCKED, false);
        conc__spin_unlock(&c->mu);
        conc__wake_list(wake);
        if (!spawn) return rc;
        rc = conc__core_start_worker(c, job);
        if (rc == 0) return 0;
        /* take the reservation back. The slot is free again: the first submit blocked on
           the limit must not wait for an unrelated job to end (which may wait for its
           caller): it tries again - a free worker, a thread start of its own (which may
           fail in turn, and pass the slot on the same way), or the queue. */
        conc__waiter *w = NULL;
        wake = NULL;
        conc__spin_lock(&c->mu);
        {
            c->nworkers--;
            conc__core_limit_flags_locked(c);
            c->active--;
            c->submitted--;
            w = conc__wq_claim(&c->blocked);
            if (w) w->sel->status = CONC__CORE_RETRY;
            else conc__core_drained_locked(c, &wake);
        }
        conc__spin_unlock(&c->mu);
        if (w) conc__sel_wake(w->sel);
        conc__wake_list(wake);
        return rc;
    }
}

/* ======================================================================== */
/* >>pool: worker pools and futures                                         */
/* ======================================================================== */
/* Futures, then pools: a jobs channel and the threads that receive from it, or (cap 0)
   the worker engine of the section above. */

/* ---- futures ---- */
/* A future is shared by the job (one reference, dropped when it completes it), the
   submitter (dropped by conc_future_free) and each blocked wait (taken under mu when it
   queues, dropped after its last read of f).
   Invariants: state goes once from 0 to 1, under mu, after result and status are written;
   read without the lock (acquire) by the fast paths. Waiters queue on `waiters` (mu) only
   while state is 0; completion claims them all.
   Lock order: future.mu -> ctx.mu. */
struct conc_future {
    pthread_mutex_t mu;
    _Atomic int state;    /* 0 pending, 1 done */
    int status;           /* (mu, then immutable) 0: the job ran; CONC_SHUTDOWN: it never will */
    int result;           /* (mu, then immutable) what the job returned */
    conc__wq waiters;     /* (mu) blocked waits */
    _Atomic int refs;
};

static conc_future_t *conc__future_new(void) {
    conc_future_t *f = (conc_future_t *)CONC_MALLOC(sizeof *f);
    if (!f) return NULL;
    memset(f, 0, sizeof *f);
    conc__mutex_init(&f->mu);
    CONC__UNCHECKED(&f->state);
    CONC__UNCHECKED(&f->refs);
    atomic_init(&f->state, 0);
    atomic_init(&f->refs, 2);
    return f;
}

static void conc__future_unref(conc_future_t *f) {
    CONC__HB_BEFORE(&f->refs);
    if (atomic_fetch_sub_explicit(&f->refs, 1, CONC__ACQ_REL) != 1) return;
    CONC__HB_AFTER(&f->refs);
    pthread_mutex_destroy(&f->mu);
    CONC__HB_FORGET(&f->state);
    CONC__HB_FORGET(&f->refs);
    CONC__CHECKED(&f->state);
    CONC__CHECKED(&f->refs);
    CONC_FREE(f);
}

/* The job's side: records the outcome, wakes every waiter, drops the job's reference. */
static void conc__future_complete(conc_future_t *f, int status, int result) {
    conc__waiter *wake = NULL, *w;
    CONC__LOCK(&f->mu);
    {
        f->status = status;
        f->result = result;
        CONC__HB_BEFORE(&f->state);
        atomic_store_explicit(&f->state, 1, CONC__RELEASE);
        while ((w = conc__wq_claim(&f->waiters)) != NULL) {
            w->sel->status = 0;
            w->next = wake;
            wake = w;
        }
    }
    CONC__UNLOCK(&f->mu);
    conc__wake_list(wake);
    conc__future_unref(f);
}

static int conc__future_get(conc_future_t *f, int *result) {
    CONC__HB_AFTER(&f->state);
    if (result) *result = f->status == 0 ? f->result : 0;
    return f->status;
}

CONC_API int conc_future_try_wait(conc_future_t *f, int *result) {
    if (!f) return CONC_INVALID;
    if (atomic_load_explicit(&f->state, CONC__ACQUIRE) == 0) return CONC_WOULD_BLOCK;
    return conc__future_get(f, result);
}

CONC_API int conc_future_wait(conc_future_t *f, int *result, conc_ctx_t *ctx) {
    conc__sel s;
    conc__waiter w, cw;
    if (!f) return CONC_INVALID;
    if (atomic_load_explicit(&f->state, CONC__ACQUIRE) != 0) return conc__future_get(f, result);
    bool reg = conc__ctx_can_end(ctx);
    conc__sel_init(&s);
    CONC__LOCK(&f->mu);
    if (atomic_load_explicit(&f->state, CONC__RELAXED) != 0) {
        CONC__UNLOCK(&f->mu);
        conc__sel_fini(&s);
        return conc__future_get(f, result);
    }
    if (reg) {
        int e = conc__ctx_register(ctx, &cw, &s, CONC__OWN_CTX);
        if (e) {
            CONC__UNLOCK(&f->mu);
            conc__sel_fini(&s);
            return e;
        }
    }
    w.sel = &s;
    w.elem = NULL;
    w.case_index = 0;
    w.since = 0;
    conc__wq_push(&f->waiters, &w);
    /* a blocked wait holds its own reference: the handle may be freed meanwhile, and the
       job's reference is dropped as soon as it has woken us, before we read the result */
    atomic_fetch_add_explicit(&f->refs, 1, CONC__RELAXED);
    CONC__UNLOCK(&f->mu);

    conc__sel_park(&s);
    int rc;
    if (atomic_load_explicit(&s.fired, CONC__RELAXED) == CONC__OWN_CTX) {
        CONC__LOCK(&f->mu);
        if (w.queued) conc__wq_remove(&f->waiters, &w);
        CONC__UNLOCK(&f->mu);
        rc = s.status;
    } else {
        if (reg) conc__ctx_unregister(ctx, &cw);
        rc = conc__future_get(f, result);
    }
    conc__sel_fini(&s);
    conc__future_unref(f); /* after the last read of f */
    return rc;
}

CONC_API int conc_future_free(conc_future_t *f) {
    if (f) conc__future_unref(f); /* waits still blocked keep it alive with their own */
    return 0;
}

/* ---- pools ---- */
/* A pool is the worker pool as Go programs write it: `workers` threads and a jobs channel
   of capacity cap that they receive from until it is closed and drained. With cap > 0 it
   is exactly that (jobs, a conc_chan_t): a job's journey is the channel's, with all its
   guarantees - a submit is a send (blocking with its context, or a try_send), accepted
   exactly once, FIFO, with the channel's backpressure statistics and its lock-free ring.
   With cap 0 it is the same hand-off without a channel: the worker engine (see above) with
   its limit at `workers` and every worker started up front, never ending while idle, so a
   job goes from the submitter to a waiting worker's box with one CAS. The pool adds the
   context handed to every job, futures, and the shutdown's take-back.

   Invariants:
   - A job is accepted exactly when its submit returns 0. Then (cap > 0) exactly one
     receive takes it: a worker's (the job runs once) or, once a shutdown has run out of
     time, the shutdown's (the job is reported unrun once); nothing else receives from
     jobs. With cap 0 an accepted job is a worker's already (the engine's invariants) and
     runs once.
   - Shutdown closes jobs (cap 0: the engine's shutdown) first: submits after it and
     submits blocked then get CONC_SHUTDOWN; the workers drain what was accepted and
     leave their loop; `live` counts the workers that have not left it.
   - Each worker counts its completed jobs itself, on a cache line of its own (two workers
     bumping one shared counter would move it between them on every job). A job counts
     as running from the receive that took it (the channel counts receives under its lock)
     until its worker's count or unrun includes it.
   Lock order: join_mu is taken alone (around the joins). */

typedef struct conc__pool_worker {
    _Alignas(64) _Atomic uint64_t completed; /* written by this worker only, after the job returned */
    conc_pool_t *pool;                    /* immutable */
    conc__thread *thread;                 /* immutable once started; joined by conc__pool_join */
} conc__pool_worker;

struct conc_pool {
    conc__core core;             /* cap 0: the engine and its threads (first: its workers' core pointer casts back) */
    void *alloc;                 /* what CONC_MALLOC returned (the pool is 64-byte aligned in it) */
    conc_chan_t *jobs;           /* cap > 0: the queue, of conc__job; NULL with cap 0 */
    conc_ctx_t *ctx;             /* handed to every job; cancelled by a shutdown out of time (cap 0: core.ctx) */
    conc_wg_t *live;             /* cap > 0: workers still in their loop */
    conc__pool_worker *workers;  /* cap > 0: nworkers, cache-line aligned inside workers_alloc */
    void *workers_alloc;
    size_t nworkers;             /* cap > 0: workers started (immutable once the pool is returned) */
    pthread_mutex_t join_mu;     /* held by the joiner: a second shutdown returns after the first has joined */
    bool joined;                 /* (join_mu) */
    _Atomic uint64_t rejected, canceled, unrun;
};

/* The engine's per-job hook for a pool (cap 0): count, then complete the future. */
static void conc__pool_task_done(conc__worker *wk, const conc__job *job, int rc) {
    atomic_store_explicit(&wk->finished, atomic_load_explicit(&wk->finished, CONC__RELAXED) + 1, CONC__RELEASE);
    if (job->fut) conc__future_complete(job->fut, 0, rc);
}

static void conc__pool_worker_main(void *arg) {
    conc__pool_worker *wk = (conc__pool_worker *)arg;
    conc_pool_t *p = wk->pool;
    conc__job job;
    while (conc_chan_recv(p->jobs, &job, NULL) == 0) {
        int rc = job.fn(job.arg, p->ctx);
        atomic_store_explicit(&wk->completed, atomic_load_explicit(&wk->completed, CONC__RELAXED) + 1,
                              CONC__RELEASE);
        if (job.fut) conc__future_complete(job.fut, 0, rc);
    }
    conc_wg_done(p->live); /* the last touch of p: after it the pool may be freed (after a join) */
}

/* Joins every worker (all have left their loop: live is 0). */
static void conc__pool_join(conc_pool_t *p) {
    if (!p->jobs) {
        conc__core_join(&p->core);
        return;
    }
    CONC__LOCK(&p->join_mu);
    if (!p->joined) {
        for (size_t i = 0; i < p->nworkers; i++) conc__thread_join(p->workers[i].thread);
        p->joined = true;
    }
    CONC__UNLOCK(&p->join_mu);
}

/* Frees what conc_pool_new_at set up, once every started worker has left and been joined
   (cap 0: conc__core_destroy did that). */
static void conc__pool_destroy(conc_pool_t *p) {
    for (size_t i = 0; i < p->nworkers; i++) {
        CONC__CHECKED(&p->workers[i].completed);
    }
    CONC__CHECKED(&p->rejected);
    CONC__CHECKED(&p->canceled);
    CONC__CHECKED(&p->unrun);
    if (p->jobs) {
        conc_ctx_release(p->ctx);
        conc_wg_free(p->live);
        conc_chan_free(p->jobs);
    }
    pthread_mutex_destroy(&p->join_mu);
    CONC_FREE(p->workers_alloc);
    CONC_FREE(p->alloc);
}

/* cap 0: the engine, limited to `workers`, each started now. */
static int conc__pool_start_core(conc_pool_t *p, size_t workers, conc_ctx_t *parent, const char *file, int line) {
    conc__core *c = &p->core;
    if (conc__core_init(c, parent, -1, "pool worker", file, line) != 0) return CONC_NOMEM;
    c->pool = true;
    c->limit = workers > (size_t)INT64_MAX ? INT64_MAX : (int64_t)workers;
    p->ctx = c->ctx;
    for (size_t i = 0; i < workers; i++) {
        conc__spin_lock(&c->mu);
        c->nworkers++;
        conc__core_limit_flags_locked(c);
        conc__spin_unlock(&c->mu);
        int rc = conc__core_start_worker(c, NULL);
        if (rc != 0) {
            conc__spin_lock(&c->mu);
            c->nworkers--;
            conc__core_limit_flags_locked(c);
            conc__spin_unlock(&c->mu);
            conc__core_destroy(c); /* the started ones leave at once: nothing was accepted */
            return rc;
        }
    }
    return 0;
}

CONC_API conc_pool_t *conc_pool_new_at(size_t workers, size_t cap, conc_ctx_t *parent, const char *file, int line) {
    if (workers == 0 || workers > (SIZE_MAX - 63) / sizeof(conc__pool_worker)) return NULL;
    void *alloc = CONC_MALLOC(sizeof(conc_pool_t) + 63);
    if (!alloc) return NULL;
    conc_pool_t *p = (conc_pool_t *)(void *)(((uintptr_t)alloc + 63) & ~(uintptr_t)63);
    memset(p, 0, sizeof *p);
    p->alloc = alloc;
    conc__mutex_init(&p->join_mu);
    /* counters read without a lock by conc_pool_stats_get: Helgrind is told not to check them */
    CONC__UNCHECKED(&p->rejected);
    CONC__UNCHECKED(&p->canceled);
    CONC__UNCHECKED(&p->unrun);
    atomic_init(&p->rejected, 0);
    atomic_init(&p->canceled, 0);
    atomic_init(&p->unrun, 0);
    if (cap == 0) {
        if (conc__pool_start_core(p, workers, parent, file, line) != 0) {
            conc__pool_destroy(p);
            return NULL;
        }
        return p;
    }
    p->jobs = conc_chan_new(sizeof(conc__job), cap);
    p->ctx = conc_ctx_with_cancel(parent);
    p->live = conc_wg_new();
    p->workers_alloc = CONC_MALLOC(workers * sizeof(conc__pool_worker) + 63);
    if (!p->jobs || !p->ctx || !p->live || !p->workers_alloc) {
        if (!p->jobs) { /* destroy frees the channel's parts only with a channel */
            conc_ctx_release(p->ctx);
            conc_wg_free(p->live);
        }
        conc__pool_destroy(p); /* each part is NULL or fresh: freeing NULL is a no-op */
        return NULL;
    }
    p->workers = (conc__pool_worker *)(void *)(((uintptr_t)p->workers_alloc + 63) & ~(uintptr_t)63);
    for (size_t i = 0; i < workers; i++) {
        conc__pool_worker *wk = &p->workers[i];
        CONC__UNCHECKED(&wk->completed);
        atomic_init(&wk->completed, 0);
        wk->pool = p;
        conc_wg_add(p->live, 1);
        if (conc__thread_start(&wk->thread, conc__pool_worker_main, wk, "pool worker", file, line, 0) != 0) {
            conc_wg_done(p->live);
            CONC__CHECKED(&wk->completed); /* not counted in nworkers: destroy skips it */
            conc_chan_close(p->jobs); /* the started ones leave at once: nothing was accepted */
            conc_wg_wait(p->live, NULL);
            conc__pool_join(p);
            conc__pool_destroy(p);
            return NULL;
        }
        p->nworkers = i + 1;
    }
    return p;
}

CONC_API conc_ctx_t *conc_pool_ctx(const conc_pool_t *pool) { return pool ? pool->ctx : NULL; }

static int conc__pool_submit(conc_pool_t *pool, conc_task_fn fn, void *arg, conc_future_t **out, conc_ctx_t *ctx,
                             bool block) {
    conc__job job;
    int rc;
    if (out) *out = NULL;
    if (!pool || !fn) return CONC_INVALID;
    job.fn = fn;
    job.arg = arg;
    job.fut = NULL;
    if (out && !(job.fut = conc__future_new())) return CONC_NOMEM;
    if (!pool->jobs) {
        rc = conc__core_submit(&pool->core, &job, ctx, block);
    } else {
        rc = block ? conc_chan_send(pool->jobs, &job, ctx) : conc_chan_try_send(pool->jobs, &job);
        if (rc == CONC_CLOSED) rc = CONC_SHUTDOWN;
    }
    if (rc == CONC_WOULD_BLOCK || rc == CONC_SHUTDOWN) atomic_fetch_add_explicit(&pool->rejected, 1, CONC__RELAXED);
    else if (rc != 0) atomic_fetch_add_explicit(&pool->canceled, 1, CONC__RELAXED); /* the ctx's err */
    if (out) {
        if (rc == 0) {
            *out = job.fut;
        } else {
            conc__future_unref(job.fut); /* the job's reference and the caller's */
            conc__future_unref(job.fut);
        }
    }
    return rc;
}

CONC_API int conc_pool_submit(conc_pool_t *pool, conc_task_fn fn, void *arg, conc_ctx_t *ctx) {
    return conc__pool_submit(pool, fn, arg, NULL, ctx, true);
}
CONC_API int conc_pool_try_submit(conc_pool_t *pool, conc_task_fn fn, void *arg) {
    return conc__pool_submit(pool, fn, arg, NULL, NULL, false);
}
CONC_API int conc_pool_submit_future(conc_pool_t *pool, conc_task_fn fn, void *arg, conc_future_t **out,
                                     conc_ctx_t *ctx) {
    if (!out) return CONC_INVALID;
    return conc__pool_submit(pool, fn, arg, out, ctx, true);
}
CONC_API int conc_pool_try_submit_future(conc_pool_t *pool, conc_task_fn fn, void *arg, conc_future_t **out) {
    if (!out) return CONC_INVALID;
    return conc__pool_submit(pool, fn, arg, out, NULL, false);
}

/* A job the shutdown took back: it never runs. */
static void conc__pool_report_unrun(const conc__job *job, conc_pool_unrun_fn unrun, void *unrun_arg) {
    if (job->fut) conc__future_complete(job->fut, CONC_SHUTDOWN, 0);
    if (unrun) unrun(job->fn, job->arg, unrun_arg);
}

CONC_API int conc_pool_shutdown(conc_pool_t *pool, conc_pool_unrun_fn unrun, void *unrun_arg, conc_ctx_t *ctx) {
    if (!pool) return CONC_INVALID;
    if (!pool->jobs) { /* cap 0: nothing is queued, so nothing to take back */
        conc__core_begin_shutdown(&pool->core);
        int rc = conc_wg_wait(pool->core.live, ctx);
        if (rc == 0) conc__pool_join(pool);
        else conc_ctx_cancel(pool->ctx);
        return rc;
    }
    conc_chan_close(pool->jobs); /* CONC_CLOSED from a second shutdown: nothing to do */
    int rc = conc_wg_wait(pool->live, ctx);
    if (rc == 0) {
        conc__pool_join(pool);
        return 0;
    }
    /* out of time: first take back what never started, so that no worker starts it with
       the context about to end, then stop what runs and report. A worker may still take
       a job meanwhile: whoever receives it owns it. Without memory for the list, one job
       at a time after the cancel. */
    size_t cap = conc_chan_len(pool->jobs), nleft = 0; /* no more can come: jobs is closed */
    conc__job *left = cap ? (conc__job *)CONC_MALLOC(cap * sizeof *left) : NULL;
    if (left)
        while (nleft < cap && conc_chan_try_recv(pool->jobs, &left[nleft]) == 0) {
            nleft++;
            atomic_fetch_add_explicit(&pool->unrun, 1, CONC__RELEASE); /* as it leaves the channel: stats' running */
        }
    conc_ctx_cancel(pool->ctx);
    for (size_t i = 0; i < nleft; i++) conc__pool_report_unrun(&left[i], unrun, unrun_arg);
    CONC_FREE(left);
    conc__job job;
    while (conc_chan_try_recv(pool->jobs, &job) == 0) {
        atomic_fetch_add_explicit(&pool->unrun, 1, CONC__RELEASE);
        conc__pool_report_unrun(&job, unrun, unrun_arg);
    }
    return rc;
}

CONC_API void conc_pool_free(conc_pool_t *pool) {
    if (!pool) return;
    if (!pool->jobs) {
        conc__core_destroy(&pool->core); /* the running jobs end first, as in a shutdown */
    } else {
        conc_chan_close(pool->jobs);
        conc_wg_wait(pool->live, NULL); /* the queued jobs run first, as in a shutdown */
        conc__pool_join(pool);
    }
    conc__pool_destroy(pool);
}

CONC_API void conc_pool_stats_get(conc_pool_t *pool, conc_pool_stats *out) {
    if (!out) return;
    memset(out, 0, sizeof *out);
    if (!pool) return;
    out->rejected = atomic_load_explicit(&pool->rejected, CONC__RELAXED);
    out->canceled = atomic_load_explicit(&pool->canceled, CONC__RELAXED);
    if (!pool->jobs) {
        conc__core *c = &pool->core;
        conc__spin_lock(&c->mu);
        {
            conc__core_totals_locked(c, &out->submitted, &out->completed);
            out->blocked = c->blocked_n;
            out->running = (size_t)conc__core_running_stat_locked(c);
        }
        conc__spin_unlock(&c->mu);
        out->blocked_ns = atomic_load_explicit(&c->blocked_ns, CONC__RELAXED);
        return;
    }
    conc_chan_stats cs;
    uint64_t completed = 0;
    /* completed and unrun before the channel's receives: every job they count was received
       first, so running (received, neither completed nor taken back) never looks negative.
       A job handed to a worker counts from the hand-off, not from when the worker wakes. */
    for (size_t i = 0; i < pool->nworkers; i++)
        completed += atomic_load_explicit(&pool->workers[i].completed, CONC__ACQUIRE);
    uint64_t unrun = atomic_load_explicit(&pool->unrun, CONC__ACQUIRE);
    conc_chan_stats_get(pool->jobs, &cs);
    out->submitted = cs.sends;
    out->completed = completed;
    out->unrun = unrun;
    out->blocked = cs.blocked_sends;
    out->blocked_ns = cs.send_wait_ns;
    out->high_water = cs.high_water;
    out->queued = conc_chan_len(pool->jobs);
    out->running = cs.recvs >= completed + unrun ? (size_t)(cs.recvs - completed - unrun) : 0;
}

/* ======================================================================== */
/* >>group: error groups                                                    */
/* ======================================================================== */
/* ---- groups ---- */
/* x/sync/errgroup on the engine above: no queue, no fixed worker count (a go that finds
   no waiting worker and is under the limit starts one; workers stay for the next tasks
   until idle for CONC_GROUP_IDLE_NS, so threads are reused), and the tasks running bounded
   by the limit. A wait waits for none to run (queued on the core's `drained`: no counter
   of its own that the submitter and the workers would pass between them on every task).

   Invariants:
   - A task's outcome is recorded (emu) before its worker counts it finished (its box's
     done, or active under core.mu), so a wait that sees none running sees every error;
     first is set once, by the first non-zero outcome, and the group's context is
     cancelled with it as the cause right after (outside emu).
   - limit changes only while no task is accepted and unfinished and no go waits
     (set_limit refuses otherwise).
   Lock order: emu is taken alone; core.mu as above. */

struct conc_group {
    conc__core core;        /* first: the worker's core pointer casts back */
    void *alloc;            /* what CONC_MALLOC returned (the group is 64-byte aligned in it) */
    pthread_mutex_t emu;
    int first;              /* (emu) the first error, 0 if none */
    conc_group_error *errs; /* (emu) every error, in the order they were recorded */
    size_t nerr, errcap;    /* (emu) */
    _Atomic uint64_t failed; /* counted without emu (finished: per worker) */
};

static void conc__group_task_done(conc__core *core, conc__worker *wk, const conc__job *job, int rc) {
    conc_group_t *g = (conc_group_t *)(void *)core;
    bool first = false;
    if (rc != 0) {
        atomic_fetch_add_explicit(&g->failed, 1, CONC__RELAXED);
        CONC__LOCK(&g->emu);
        {
            if (g->first == 0) {
                g->first = rc;
                first = true;
            }
            if (g->nerr == g->errcap) {
                size_t ncap = g->errcap ? g->errcap * 2 : 8;
                conc_group_error *e = (conc_group_error *)CONC_MALLOC(ncap * sizeof *e);
                if (e) {
                    if (g->nerr) memcpy(e, g->errs, g->nerr * sizeof *e);
                    CONC_FREE(g->errs);
                    g->errs = e;
                    g->errcap = ncap;
                }
            }
            if (g->nerr < g->errcap) { /* out of memory: the error is counted, not listed */
                g->errs[g->nerr].err = rc;
                g->errs[g->nerr].arg = job->arg;
                g->nerr++;
            }
        }
        CONC__UNLOCK(&g->emu);
    }
    atomic_store_explicit(&wk->finished, atomic_load_explicit(&wk->finished, CONC__RELAXED) + 1, CONC__RELEASE);
    if (first) conc_ctx_cancel_cause(core->ctx, rc);
}

static void conc__core_task_done(conc__core *core, conc__worker *wk, const conc__job *job, int rc) {
    if (core->pool) conc__pool_task_done(wk, job, rc);
    else conc__group_task_done(core, wk, job, rc);
}

/* Blocks until no task runs (each task's outcome was recorded before its worker counted
   it finished), or ctx ends. */
static int conc__group_drain(conc_group_t *g, conc_ctx_t *ctx) {
    conc__core *c = &g->core;
    conc__spin_lock(&c->mu);
    if (conc__core_running_locked(c) != 0) /* then flag and look again (Dekker with the boxes) */
        conc__core_flag_locked(c, CONC__CF_DRAIN, true);
    CONC__RACE_POINT(); /* a worker may finish a job and post its box now */
    if (conc__core_running_locked(c) == 0) {
        conc__spin_unlock(&c->mu);
        return 0;
    }
    return conc__block_queued(&c->mu, &c->drained, NULL, ctx, NULL, NULL, NULL, NULL, NULL, NULL, NULL);
}

CONC_API conc_group_t *conc_group_new_at(conc_ctx_t *parent, const char *file, int line) {
    void *alloc = CONC_MALLOC(sizeof(conc_group_t) + 63);
    if (!alloc) return NULL;
    conc_group_t *g = (conc_group_t *)(void *)(((uintptr_t)alloc + 63) & ~(uintptr_t)63);
    memset(g, 0, sizeof *g);
    g->alloc = alloc;
    if (conc__core_init(&g->core, parent, CONC_GROUP_IDLE_NS, "errgroup worker", file, line) != 0) {
        CONC_FREE(alloc);
        return NULL;
    }
    conc__mutex_init(&g->emu);
    CONC__UNCHECKED(&g->failed);
    return g;
}

CONC_API void conc_group_free(conc_group_t *g) {
    if (!g) return;
    conc__group_drain(g, NULL);
    conc__core_destroy(&g->core);
    pthread_mutex_destroy(&g->emu);
    CONC__CHECKED(&g->failed);
    CONC_FREE(g->errs);
    CONC_FREE(g->alloc);
}

CONC_API int conc_group_set_limit(conc_group_t *g, int64_t n) {
    int rc = 0;
    if (!g) return CONC_INVALID;
    conc__spin_lock(&g->core.mu);
    if (conc__core_running_locked(&g->core) != 0 || g->core.blocked.head != NULL) {
        rc = CONC_BUSY;
    } else {
        g->core.limit = n < 0 ? -1 : n;
        conc__core_limit_flags_locked(&g->core);
    }
    conc__spin_unlock(&g->core.mu);
    return rc;
}

static int conc__group_go(conc_group_t *g, conc_task_fn fn, void *arg, conc_ctx_t *ctx, bool block) {
    conc__job job;
    if (!g || !fn) return CONC_INVALID;
    job.fn = fn;
    job.arg = arg;
    job.fut = NULL;
    return conc__core_submit(&g->core, &job, ctx, block);
}

CONC_API int conc_group_go(conc_group_t *g, conc_task_fn fn, void *arg, conc_ctx_t *ctx) {
    return conc__group_go(g, fn, arg, ctx, true);
}
CONC_API int conc_group_try_go(conc_group_t *g, conc_task_fn fn, void *arg) {
    return conc__group_go(g, fn, arg, NULL, false);
}

static int conc__group_first(conc_group_t *g) {
    int e;
    CONC__LOCK(&g->emu);
    e = g->first;
    CONC__UNLOCK(&g->emu);
    return e;
}

CONC_API int conc_group_wait(conc_group_t *g, conc_ctx_t *ctx) {
    if (!g) return CONC_INVALID;
    int rc = conc__group_drain(g, ctx);
    if (rc != 0) return rc;
    int e = conc__group_first(g);
    conc_ctx_cancel_cause(g->core.ctx, e); /* as errgroup.WithContext's Wait */
    return e;
}

CONC_API int conc_group_try_wait(conc_group_t *g) {
    if (!g) return CONC_INVALID;
    conc__spin_lock(&g->core.mu);
    int64_t active = conc__core_running_locked(&g->core);
    conc__spin_unlock(&g->core.mu);
    if (active != 0) return CONC_WOULD_BLOCK;
    int e = conc__group_first(g);
    conc_ctx_cancel_cause(g->core.ctx, e);
    return e;
}

CONC_API size_t conc_group_errors(conc_group_t *g, conc_group_error *out, size_t cap) {
    size_t n;
    if (!g) return 0;
    CONC__LOCK(&g->emu);
    {
        n = g->nerr;
        if (out && g->errs) memcpy(out, g->errs, (cap < n ? cap : n) * sizeof *out);
    }
    CONC__UNLOCK(&g->emu);
    return n;
}

CONC_API conc_ctx_t *conc_group_ctx(const conc_group_t *g) { return g ? g->core.ctx : NULL; }

CONC_API void conc_group_stats_get(conc_group_t *g, conc_group_stats *out) {
    if (!out) return;
    memset(out, 0, sizeof *out);
    if (!g) return;
    conc__spin_lock(&g->core.mu);
    {
        conc__core_totals_locked(&g->core, &out->started, &out->finished);
        out->blocked = g->core.blocked_n;
        out->blocked_ns = atomic_load_explicit(&g->core.blocked_ns, CONC__RELAXED);
        out->threads = g->core.threads;
        out->running = (size_t)conc__core_running_stat_locked(&g->core);
        out->threads_live = g->core.nworkers;
    }
    conc__spin_unlock(&g->core.mu);
    out->failed = atomic_load_explicit(&g->failed, CONC__RELAXED);
}

/* ======================================================================== */
/* >>limiter: token-bucket rate limiters                                    */
/* ======================================================================== */
/* golang.org/x/time/rate's design: nothing refills the bucket on a clock; its content is
   computed from the time elapsed since `last`, and may go negative: a reservation takes its
   tokens at once, and the debt says how long until they exist. A waiter then sleeps until
   its time to act (conc_sleep on its context); there is no queue, and the order in which
   waiters may act is fixed by the order in which they reserved.

   Accuracy: tokens is a double brought up to date with (now - last) * per_ns, where now and
   last are integer conc_now() nanoseconds, so the bucket does not drift: a late wake-up
   does not delay the next reservation (its time comes from the debt, not from when the
   previous caller woke), and rounding does not accumulate (a duration computed from tokens
   is rounded up to the next nanosecond, so nobody acts early). Over any span in which the
   bucket never reaches burst, exactly burst + rate * span tokens are handed out; it
   reaches burst only when nobody asks (all reservations are due), and what it cannot hold
   then is lost, as in x/time/rate. `overflow` counts that loss, so a test can check the
   books exactly whatever the scheduler does (while the rate is finite):
       tokens handed out + overflow + tokens == earned + rate * (last - rate_since)
   where earned is what the bucket was given before rate_since: burst at creation, the
   refill at earlier rates, and what leaving an infinite rate filled in (with a fixed
   rate: earned == burst, rate_since == created).

   Invariants:
   - tokens <= burst, and last never moves backwards. The clock is read before locking
     (a clock read costs ~25 ns: kept out of the critical section); a time older than
     last is taken as last (conc__lim_time), which only makes that caller see the bucket
     as it was at last. (x/time/rate moves last back there and credits the span twice.)
   - A reservation changes tokens/last only if it is granted (a refused allow leaves the
     bucket as it was: the next look recomputes the same content from the same last).
   - last_event is the latest time to act handed out (or as restored by a cancel): a
     reservation's cancel gives back only what no later reservation has counted on,
     x/time/rate's rule: tokens - (last_event - its time to act) * rate.
   - sleepers counts waits sleeping on a reservation (free refuses while it is not 0).
   - inf (rate infinite): every request is granted at once; nothing is counted.
   - A change of rate or burst first brings tokens up to its time at the old rate (and
     folds that into earned), so the bucket's past is never re-priced at the new rate.
   Lock order: limiter.mu is a leaf; a waiter sleeps without it. */

struct conc_limiter {
    pthread_mutex_t mu;
    double per_ns;      /* (mu) tokens per nanosecond (0 while inf) */
    double rate;        /* (mu) the rate as given (tokens per second) */
    bool inf;           /* (mu) no limit */
    int64_t burst;      /* (mu) */
    int64_t created;    /* immutable: conc_now() at new, the first last */
    double earned;      /* (mu) tokens given before rate_since (see the books above) */
    int64_t rate_since; /* (mu) when the rate was last set (created at first) */
    double tokens;      /* (mu) content at time last; negative = debt */
    int64_t last;       /* (mu) when tokens was last brought up to date */
    int64_t last_event; /* (mu) latest time to act handed out */
    double overflow;    /* (mu) tokens the burst cap threw away (for tests and diagnostics) */
    int64_t sleepers;   /* (mu) waits sleeping on a reservation */
};

/* mu held. now, read before locking, made no earlier than last. */
static int64_t conc__lim_time(const conc_limiter_t *l, int64_t now) { return now < l->last ? l->last : now; }

/* Nanoseconds until tok tokens accrue, rounded up; INT64_MAX if beyond range. */
static int64_t conc__lim_dur(double per_ns, double tok) {
    if (tok <= 0) return 0;
    double d = tok / per_ns;
    if (!(d < 9.0e18)) return INT64_MAX;
    int64_t n = (int64_t)d;
    return (double)n < d ? n + 1 : n;
}

/* mu held. The bucket's content at now (>= last), and in *over what the cap cut off. */
static double conc__lim_content(const conc_limiter_t *l, int64_t now, double *over) {
    double t = l->tokens + (double)(now - l->last) * l->per_ns;
    *over = 0;
    if (t > (double)l->burst) {
        *over = t - (double)l->burst;
        t = (double)l->burst;
    }
    return t;
}

/* mu held. x/time/rate's reserveN: takes n tokens if their time to act is within
   max_wait of now; fills r. */
static void conc__lim_reserve_locked(conc_limiter_t *l, int64_t now, int64_t n, int64_t max_wait,
                                     conc_reservation_t *r) {
    double over;
    r->lim = l;
    r->tokens = 0;
    r->time_to_act = now;
    r->per_ns = l->per_ns;
    r->ok = false;
    if (l->inf || n == 0) { /* nothing to count (x/time/rate would make n == 0 wait out a debt) */
        r->ok = true;
        return;
    }
    if (n > l->burst) return;
    double t = conc__lim_content(l, now, &over) - (double)n;
    int64_t wait = conc__lim_dur(l->per_ns, -t);
    if (wait > max_wait) return;
    r->ok = true;
    r->tokens = n;
    r->time_to_act = wait > INT64_MAX - now ? INT64_MAX : now + wait;
    l->tokens = t;
    l->last = now;
    l->overflow += over;
    if (r->time_to_act > l->last_event) l->last_event = r->time_to_act;
}

/* mu held. x/time/rate's CancelAt(now), made idempotent (r->tokens = 0 afterwards). */
static void conc__lim_cancel_locked(conc_limiter_t *l, conc_reservation_t *r, int64_t now) {
    if (l->inf || r->tokens == 0) return;
    if (r->time_to_act >= now) { /* tokens already due are spent */
        /* at the rate r was made under, as x/time/rate (set_rate may have changed it since) */
        double restore = (double)r->tokens - (double)(l->last_event - r->time_to_act) * r->per_ns;
        if (restore > 0) {
            double over;
            double t = conc__lim_content(l, now, &over) + restore;
            if (t > (double)l->burst) {
                over += t - (double)l->burst;
                t = (double)l->burst;
            }
            l->tokens = t;
            l->last = now;
            l->overflow += over;
            if (r->time_to_act == l->last_event) {
                /* the latest reservation is gone: the one before it is the latest */
                int64_t prev = r->time_to_act - conc__lim_dur(r->per_ns, (double)r->tokens);
                if (prev >= now) l->last_event = prev;
            }
        }
    }
    r->tokens = 0;
}

CONC_API conc_limiter_t *conc_limiter_new(double rate_per_s, int64_t burst) {
    if (!(rate_per_s > 0) || burst < 0) return NULL; /* also NaN */
    conc_limiter_t *l = (conc_limiter_t *)CONC_MALLOC(sizeof *l);
    if (!l) return NULL;
    memset(l, 0, sizeof *l);
    conc__mutex_init(&l->mu);
    l->inf = rate_per_s - rate_per_s != 0; /* inf - inf is NaN: isinf() without <math.h> */
    l->per_ns = l->inf ? 0 : rate_per_s / 1e9;
    l->rate = rate_per_s;
    l->burst = burst;
    l->tokens = l->earned = (double)burst; /* starts full, as x/time/rate */
    l->created = l->last = l->last_event = l->rate_since = conc_now();
    return l;
}

CONC_API int conc_limiter_free(conc_limiter_t *lim) {
    if (!lim) return 0;
    bool busy;
    CONC__LOCK(&lim->mu);
    busy = lim->sleepers != 0;
    CONC__UNLOCK(&lim->mu);
    if (busy) return CONC_BUSY;
    pthread_mutex_destroy(&lim->mu);
    CONC_FREE(lim);
    return 0;
}

CONC_API int conc_limiter_reserve(conc_limiter_t *lim, int64_t n, conc_reservation_t *r) {
    conc_reservation_t tmp;
    if (!r) r = &tmp;
    r->lim = lim;
    r->tokens = 0;
    r->time_to_act = 0;
    r->per_ns = 0;
    r->ok = false;
    if (!lim || n < 0) return CONC_INVALID;
    int64_t now = conc_now();
    CONC__LOCK(&lim->mu);
    conc__lim_reserve_locked(lim, conc__lim_time(lim, now), n, INT64_MAX, r);
    CONC__UNLOCK(&lim->mu);
    return r->ok ? 0 : CONC_INVALID; /* with no bound on the wait only n > burst fails */
}

CONC_API bool conc_limiter_allow(conc_limiter_t *lim, int64_t n) {
    conc_reservation_t r;
    if (!lim || n < 0) return false;
    int64_t now = conc_now();
    CONC__LOCK(&lim->mu);
    conc__lim_reserve_locked(lim, conc__lim_time(lim, now), n, 0, &r);
    CONC__UNLOCK(&lim->mu);
    return r.ok;
}

CONC_API int64_t conc_reservation_delay(const conc_reservation_t *r) {
    if (!r || !r->ok) return INT64_MAX;
    int64_t d = r->time_to_act - conc_now();
    return d > 0 ? d : 0;
}

CONC_API void conc_reservation_cancel(conc_reservation_t *r) {
    if (!r || !r->ok || !r->lim || r->tokens == 0) return;
    conc_limiter_t *l = r->lim;
    int64_t now = conc_now();
    CONC__LOCK(&l->mu);
    conc__lim_cancel_locked(l, r, conc__lim_time(l, now));
    CONC__UNLOCK(&l->mu);
}

CONC_API int conc_limiter_wait(conc_limiter_t *lim, int64_t n, conc_ctx_t *ctx) {
    conc_reservation_t r;
    int64_t deadline, now;
    bool too_many;
    if (!lim || n < 0) return CONC_INVALID;
    CONC__LOCK(&lim->mu);
    too_many = n > lim->burst && !lim->inf;
    CONC__UNLOCK(&lim->mu);
    if (too_many) return CONC_INVALID;
    int e = conc_ctx_err(ctx);
    if (e) return e;
    bool has_deadline = conc_ctx_deadline(ctx, &deadline);
    now = conc_now();
    CONC__LOCK(&lim->mu);
    {
        now = conc__lim_time(lim, now);
        /* negative once the deadline has passed (the ctx may not be marked ended yet): then
           even tokens that are there now exceed it, as in x/time/rate (n == 0 and an
           infinite rate are granted before the limit is looked at) */
        int64_t max_wait = !has_deadline ? INT64_MAX : deadline - now;
        too_many = n > lim->burst && !lim->inf; /* the burst may have changed since */
        if (!too_many) conc__lim_reserve_locked(lim, now, n, max_wait, &r);
        if (!too_many && r.ok && r.time_to_act > now) lim->sleepers++;
    }
    CONC__UNLOCK(&lim->mu);
    if (too_many) return CONC_INVALID;
    if (!r.ok) return CONC_DEADLINE_EXCEEDED; /* the deadline would pass first: no wait, nothing taken */
    if (r.time_to_act <= now) return 0;
    /* conc_sleep's timer fires at conc_now() + d >= time_to_act: never early */
    e = conc_sleep(r.time_to_act - now, ctx);
    now = conc_now();
    CONC__LOCK(&lim->mu);
    {
        lim->sleepers--;
        if (e) conc__lim_cancel_locked(lim, &r, conc__lim_time(lim, now)); /* give back what no later one counts on */
    }
    CONC__UNLOCK(&lim->mu); /* the last touch of lim: free may run as soon as it is unlocked */
    return e;
}

CONC_API double conc_limiter_tokens(conc_limiter_t *lim) {
    double t, over;
    if (!lim) return 0;
    int64_t now = conc_now();
    CONC__LOCK(&lim->mu);
    t = lim->inf ? (double)lim->burst : conc__lim_content(lim, conc__lim_time(lim, now), &over);
    CONC__UNLOCK(&lim->mu);
    return t;
}

/* mu held. Brings the bucket up to now (>= last) at the current rate, before a change. */
static void conc__lim_settle_locked(conc_limiter_t *l, int64_t now) {
    if (!l->inf) {
        double over;
        l->tokens = conc__lim_content(l, now, &over);
        l->overflow += over;
    }
    l->last = now;
}

CONC_API int conc_limiter_set_rate(conc_limiter_t *lim, double rate_per_s) {
    if (!lim || !(rate_per_s > 0)) return CONC_INVALID; /* also NaN */
    bool inf = rate_per_s - rate_per_s != 0;
    int64_t now = conc_now();
    CONC__LOCK(&lim->mu);
    {
        now = conc__lim_time(lim, now);
        conc__lim_settle_locked(lim, now);
        lim->earned += (double)(now - lim->rate_since) * lim->per_ns; /* 0 while inf */
        if (lim->inf && !inf) { /* x/time/rate: an infinite rate has filled the bucket */
            lim->earned += (double)lim->burst - lim->tokens;
            lim->tokens = (double)lim->burst;
        }
        lim->rate_since = now;
        lim->inf = inf;
        lim->per_ns = inf ? 0 : rate_per_s / 1e9;
        lim->rate = rate_per_s;
    }
    CONC__UNLOCK(&lim->mu);
    return 0;
}

CONC_API int conc_limiter_set_burst(conc_limiter_t *lim, int64_t burst) {
    if (!lim || burst < 0) return CONC_INVALID;
    int64_t now = conc_now();
    CONC__LOCK(&lim->mu);
    {
        conc__lim_settle_locked(lim, conc__lim_time(lim, now));
        lim->burst = burst;
        if (!lim->inf && lim->tokens > (double)burst) { /* what no longer fits is lost */
            lim->overflow += lim->tokens - (double)burst;
            lim->tokens = (double)burst;
        }
    }
    CONC__UNLOCK(&lim->mu);
    return 0;
}

CONC_API double conc_limiter_rate(conc_limiter_t *lim) {
    double r;
    if (!lim) return 0;
    CONC__LOCK(&lim->mu);
    r = lim->rate;
    CONC__UNLOCK(&lim->mu);
    return r;
}

CONC_API int64_t conc_limiter_burst(conc_limiter_t *lim) {
    int64_t b;
    if (!lim) return 0;
    CONC__LOCK(&lim->mu);
    b = lim->burst;
    CONC__UNLOCK(&lim->mu);
    return b;
}

/* ======================================================================== */
/* >>timer: timers, tickers, sleep                                          */
/* ======================================================================== */
/* A timer is an entry of the timer thread's heap plus a channel of capacity 1. It fires
   under conc__timers.mu with a try_send, so stop/reset (which also hold it) can remove the
   entry and drain the channel atomically: no stale value survives them. */

struct conc_timer {
    conc__tentry e;     /* first: the fire callback casts back */
    conc_chan_t *ch;    /* immutable */
    int64_t period;     /* (timers.mu) 0 for a one-shot timer */
};

/* The time d ns after t, as late as INT64_MAX: a duration up to INT64_MAX means "practically
   never", not an overflow into the past (which fired at once). d <= 0: t. */
static int64_t conc__time_after(int64_t t, int64_t d) {
    if (d <= 0) return t;
    return d > INT64_MAX - t ? INT64_MAX : t + d;
}

static void conc__timer_fire(conc__tentry *e, int64_t now) {
    conc_timer_t *t = (conc_timer_t *)(void *)e;
    (void)conc_chan_try_send(t->ch, &now); /* full: the tick is dropped, as Go's Ticker */
    if (t->period > 0) {
        int64_t next = conc__time_after(e->when, t->period);
        if (next <= now) next = conc__time_after(now, t->period - (now - e->when) % t->period); /* skip missed ticks */
        e->when = next;
        (void)conc__timer_add_locked(e);
    }
}

static conc_timer_t *conc__timer_new(int64_t delay, int64_t period) {
    conc_timer_t *t = (conc_timer_t *)CONC_MALLOC(sizeof *t);
    if (!t) return NULL;
    memset(t, 0, sizeof *t);
    t->ch = conc_chan_new(sizeof(int64_t), 1);
    if (!t->ch) {
        CONC_FREE(t);
        return NULL;
    }
    t->period = period;
    t->e.idx = CONC__NOT_IN_HEAP;
    t->e.fire = conc__timer_fire;
    t->e.when = conc__time_after(conc_now(), delay);
    if (conc__timer_add(&t->e) != 0) {
        conc_chan_free(t->ch);
        CONC_FREE(t);
        return NULL;
    }
    return t;
}

CONC_API conc_timer_t *conc_timer_after(int64_t delay_ns) { return conc__timer_new(delay_ns, 0); }

CONC_API conc_timer_t *conc_timer_tick(int64_t period_ns) {
    return period_ns > 0 ? conc__timer_new(period_ns, period_ns) : NULL;
}

CONC_API conc_chan_t *conc_timer_chan(conc_timer_t *t) { return t ? t->ch : NULL; }

/* timers.mu held */
static bool conc__timer_stop_locked(conc_timer_t *t) {
    bool active = t->e.idx != CONC__NOT_IN_HEAP;
    if (active) conc__heap_remove(&t->e);
    /* Go 1.23: a value not yet received means the timer had not yet fired for its user */
    if (conc_chan_try_recv(t->ch, NULL) == 0) active = true;
    return active;
}

CONC_API bool conc_timer_stop(conc_timer_t *t) {
    bool active;
    if (!t) return false;
    CONC__LOCK(&conc__timers.mu);
    active = conc__timer_stop_locked(t);
    CONC__UNLOCK(&conc__timers.mu);
    return active;
}

CONC_API bool conc_timer_reset(conc_timer_t *t, int64_t delay_ns) {
    bool active;
    if (!t || (t->period > 0 && delay_ns <= 0)) return false; /* a ticker's period must be > 0 */
    CONC__LOCK(&conc__timers.mu);
    {
        active = conc__timer_stop_locked(t);
        if (t->period > 0) t->period = delay_ns;
        t->e.when = conc__time_after(conc_now(), delay_ns);
        (void)conc__timer_add_locked(&t->e);
    }
    CONC__UNLOCK(&conc__timers.mu);
    return active;
}

CONC_API void conc_timer_free(conc_timer_t *t) {
    if (!t) return;
    conc_timer_stop(t);
    conc_chan_free(t->ch);
    CONC_FREE(t);
}

/* A sleep is a stack entry whose fire completes the sleeping call directly. */
typedef struct conc__sleeper {
    conc__tentry e; /* first */
    conc__sel *sel;
} conc__sleeper;

static void conc__sleeper_fire(conc__tentry *e, int64_t now) {
    conc__sel *s = ((conc__sleeper *)(void *)e)->sel;
    (void)now;
    if (conc__sel_claim(s, 0)) {
        s->status = 0;
        conc__sel_wake(s);
    }
}

CONC_API int conc_sleep(int64_t duration_ns, conc_ctx_t *ctx) {
    conc__sel s;
    conc__sleeper sl;
    conc__waiter cw;
    bool reg = conc__ctx_can_end(ctx);
    if (duration_ns <= 0) return conc_ctx_err(ctx);
    conc__sel_init(&s);
    sl.sel = &s;
    sl.e.idx = CONC__NOT_IN_HEAP;
    sl.e.fire = conc__sleeper_fire;
    sl.e.fire_unlocked = false;
    sl.e.when = conc__time_after(conc_now(), duration_ns);
    if (reg) {
        int e = conc__ctx_register(ctx, &cw, &s, CONC__OWN_CTX);
        if (e) {
            conc__sel_fini(&s);
            return e;
        }
    }
    int rc = conc__timer_add(&sl.e);
    if (rc != 0) {
        if (reg) conc__ctx_leave(ctx, &cw, &s);
        conc__sel_fini(&s);
        return rc;
    }
    conc__sel_park(&s);
    conc__timer_remove(&sl.e);
    if (reg && atomic_load_explicit(&s.fired, CONC__RELAXED) != CONC__OWN_CTX) conc__ctx_unregister(ctx, &cw);
    conc__sel_fini(&s);
    return s.status;
}

/* ======================================================================== */
/* >>signal: signal contexts                                                */
/* ======================================================================== */
/* Each conc_signal_t owns a set of signals and one thread that takes them with sigwait().
   The signals are blocked in every thread (conc's own threads block all of them, the
   application blocks them in its threads, notify in its caller), so the kernel keeps a
   signal sent to the process pending until that thread takes it. No handler runs and the
   thread may do anything: it ends the context, with its after-funcs deferred to the
   runner thread, so that no user code runs on the signal thread (an after-func may then
   stop the very handle whose thread cancelled it without that thread joining itself).

   Waking the thread to stop: stop sets `stopping`, then pthread_kill()s the thread with
   one of its own signals. Sent to a thread, a signal is pending on that thread alone and
   no other thread can take it; the thread takes it with its next sigwait() at the latest,
   so the wake is never lost. A self-pipe would need poll() and a second wait primitive;
   this needs none. The thread reads `stopping` after every sigwait(), so the wake is never
   taken for a delivery: any signal it takes once `stopping` is set is dropped.

   Invariants:
   - A signal is in the set of at most one live handle: notify checks and links the new
     handle in conc__signals.list in one critical section, and a handle stays linked until
     stop has put back the actions and the mask, so two handles never change the same
     signal's action or mask bit.
   - The context is ended only by the signal thread (conc__ctx_end, cause = the signal), its
     parent, or stop's release; the handle's reference keeps it alive until the thread is
     joined.
   - The thread leaves only once it has read stopping == true under mu; stop sets it before
     the wake, and joins before touching the actions, the mask or the registry.
   Lock order: conc__signals.mu and signal.mu are each taken alone (nothing else is locked
   while either is held). */

typedef struct conc__sigslot {
    int signo;             /* immutable */
    bool replaced;         /* immutable after notify: the action ignored it; now the noop */
    struct sigaction old;  /* immutable after notify: the action notify replaced */
} conc__sigslot;

struct conc_signal {
    pthread_mutex_t mu;
    pthread_cond_t cv;       /* (mu) signalled by stop; waited on only after a sigwait error */
    bool stopping;           /* (mu) set once, by stop */
    conc_ctx_t *ctx;         /* immutable; the handle's reference, dropped by stop */
    sigset_t set;            /* immutable: the signals taken */
    sigset_t blocked_here;   /* immutable: those notify added to its caller's mask */
    uint64_t caller;         /* immutable: conc__thread_serial() of the thread that called notify */
    conc__thread *thread;    /* immutable after notify: the signal thread */
    conc_signal_t *next;     /* (conc__signals.mu) the registry */
    size_t n;                /* immutable: slots */
    conc__sigslot slots[];   /* one per distinct signal, in the order given */
};

static struct {
    pthread_mutex_t mu;
    conc_signal_t *list; /* (mu) live handles */
} conc__signals = {PTHREAD_MUTEX_INITIALIZER, NULL};

/* Put in place of an action that ignores the signal: the signal stays blocked, so this
   runs only in a thread that has it unblocked against the rules, and then does what the
   old action did: nothing. */
static void conc__signal_noop(int signo) { (void)signo; }

static bool conc__signal_is_noop(const struct sigaction *sa) {
    return !(sa->sa_flags & SA_SIGINFO) && sa->sa_handler == conc__signal_noop;
}

/* Whether an action discards the signal. POSIX leaves it open whether such a signal,
   blocked, is kept pending for sigwait() or dropped at once (Linux keeps it while the
   thread it is sent to blocks it); so notify puts the noop in its place. */
static bool conc__signal_ignored(int signo, const struct sigaction *sa) {
    if (sa->sa_flags & SA_SIGINFO) return false;
    if (sa->sa_handler == SIG_IGN) return true;
    if (sa->sa_handler != SIG_DFL) return false;
    if (signo == SIGCHLD || signo == SIGURG) return true; /* ignored by default */
#ifdef SIGWINCH
    if (signo == SIGWINCH) return true;
#endif
    return false;
}

static void conc__signal_main(void *arg) {
    conc_signal_t *h = (conc_signal_t *)arg;
    for (;;) {
        int signo = 0;
        int rc = sigwait(&h->set, &signo);
        if (rc == EINTR) continue; /* POSIX lets some systems return it (PITFALLS 11) */
        bool stop;
        CONC__LOCK(&h->mu);
        {
            /* cannot happen with a set notify validated; never spin on it: wait for stop */
            if (rc != 0)
                while (!h->stopping) pthread_cond_wait(&h->cv, &h->mu);
            stop = h->stopping;
        }
        CONC__UNLOCK(&h->mu);
        if (stop) break;
        /* the first one ends it; later ones find it ended (swallowed, until stop) */
        if (atomic_load_explicit(&h->ctx->err, CONC__ACQUIRE) == 0) conc__ctx_end(h->ctx, CONC_CANCELED, signo, true);
    }
}

/* Puts back the actions notify replaced (unless the application has set its own since). */
static void conc__signal_restore_actions(conc_signal_t *h) {
    for (size_t i = 0; i < h->n; i++) {
        struct sigaction cur;
        if (!h->slots[i].replaced) continue;
        if (sigaction(h->slots[i].signo, NULL, &cur) == 0 && conc__signal_is_noop(&cur))
            sigaction(h->slots[i].signo, &h->slots[i].old, NULL);
    }
}

static void conc__signal_unlink(conc_signal_t *h) {
    CONC__LOCK(&conc__signals.mu);
    for (conc_signal_t **p = &conc__signals.list; *p; p = &(*p)->next) {
        if (*p == h) {
            *p = h->next;
            break;
        }
    }
    CONC__UNLOCK(&conc__signals.mu);
}

static void conc__signal_free(conc_signal_t *h) {
    pthread_cond_destroy(&h->cv);
    pthread_mutex_destroy(&h->mu);
    CONC_FREE(h);
}

CONC_API int conc_signal_notify_at(conc_ctx_t *parent, const int *signals, size_t n, conc_signal_t **out,
                                   const char *file, int line) {
    sigset_t set;
    size_t distinct = 0;
    if (!out) return CONC_INVALID;
    *out = NULL;
    if (!signals || n == 0) return CONC_INVALID;
    sigemptyset(&set);
    for (size_t i = 0; i < n; i++) {
        int s = signals[i];
        if (s <= 0 || s == SIGKILL || s == SIGSTOP) return CONC_INVALID;
        int m = sigismember(&set, s);
        if (m < 0) return CONC_INVALID; /* not a signal, or one the C library reserves */
        if (m == 0) {
            if (sigaddset(&set, s) != 0) return CONC_INVALID;
            distinct++;
        }
    }
    conc_signal_t *h = (conc_signal_t *)CONC_MALLOC(sizeof *h + distinct * sizeof h->slots[0]);
    if (!h) return CONC_NOMEM;
    memset(h, 0, sizeof *h + distinct * sizeof h->slots[0]);
    h->set = set;
    sigemptyset(&h->blocked_here);
    for (size_t i = 0; i < n; i++) {
        bool seen = false;
        for (size_t k = 0; k < h->n; k++) seen = seen || h->slots[k].signo == signals[i];
        if (!seen) h->slots[h->n++].signo = signals[i];
    }
    conc__mutex_init(&h->mu);
    pthread_cond_init(&h->cv, NULL);
    h->ctx = conc_ctx_with_cancel(parent);
    if (!h->ctx) {
        conc__signal_free(h);
        return CONC_NOMEM;
    }

    bool busy = false;
    CONC__LOCK(&conc__signals.mu);
    {
        for (conc_signal_t *o = conc__signals.list; o && !busy; o = o->next)
            for (size_t k = 0; k < h->n && !busy; k++) busy = sigismember(&o->set, h->slots[k].signo) == 1;
        if (!busy) {
            h->next = conc__signals.list;
            conc__signals.list = h;
        }
    }
    CONC__UNLOCK(&conc__signals.mu);
    if (busy) {
        conc_ctx_release(h->ctx);
        conc__signal_free(h);
        return CONC_BUSY;
    }

    /* block first: from here a signal sent to the process waits for the thread */
    sigset_t prev;
    pthread_sigmask(SIG_BLOCK, &set, &prev);
    for (size_t k = 0; k < h->n; k++)
        if (sigismember(&prev, h->slots[k].signo) == 0) sigaddset(&h->blocked_here, h->slots[k].signo);
    h->caller = conc__thread_serial();
    for (size_t k = 0; k < h->n; k++) {
        conc__sigslot *sl = &h->slots[k];
        if (sigaction(sl->signo, NULL, &sl->old) != 0) continue;
        if (conc__signal_ignored(sl->signo, &sl->old)) {
            struct sigaction sa;
            memset(&sa, 0, sizeof sa);
            sa.sa_handler = conc__signal_noop;
            sigfillset(&sa.sa_mask);
            sa.sa_flags = SA_RESTART;
            sl->replaced = sigaction(sl->signo, &sa, NULL) == 0;
        }
    }
    /* the thread starts with every signal blocked, as conc's other threads */
    int rc = conc__thread_start(&h->thread, conc__signal_main, h, "signal", file, line, 0);
    if (rc != 0) {
        conc__signal_restore_actions(h);
        pthread_sigmask(SIG_UNBLOCK, &h->blocked_here, NULL);
        conc__signal_unlink(h);
        conc_ctx_release(h->ctx);
        conc__signal_free(h);
        return rc;
    }
    *out = h;
    return 0;
}

CONC_API conc_ctx_t *conc_signal_ctx(const conc_signal_t *s) { return s ? s->ctx : NULL; }

CONC_API void conc_signal_stop(conc_signal_t *s) {
    if (!s) return;
    CONC__LOCK(&s->mu);
    {
        s->stopping = true;
        pthread_cond_signal(&s->cv);
    }
    CONC__UNLOCK(&s->mu);
    pthread_kill(conc__thread_handle(s->thread), s->slots[0].signo); /* pending on that thread alone: the wake */
    conc__thread_join(s->thread);
    /* actions before the mask: a signal that came meanwhile and waits, blocked, meets the
       old action once unblocked */
    conc__signal_restore_actions(s);
    if (conc__thread_serial() == s->caller) pthread_sigmask(SIG_UNBLOCK, &s->blocked_here, NULL);
    conc__signal_unlink(s); /* last: only now may another handle take these signals */
    conc_ctx_release(s->ctx);
    conc__signal_free(s);
}

/* ======================================================================== */
/* >>thread: tracked threads and leak checks                                */
/* ======================================================================== */
/* conc_go starts a REAP thread (see the registry above); the leak checks read the
   registry's list. A scope is the last id issued when it began: the threads started in it
   are those with a larger id.
   Lock order: conc__threads.mu is a leaf; the check sleeps with no lock held. */

typedef struct conc__go_args {
    void (*fn)(void *arg);
    void *arg;
} conc__go_args;

static void conc__go_main(void *p) {
    conc__go_args a = *(conc__go_args *)p;
    CONC_FREE(p);
    a.fn(a.arg);
}

CONC_API int conc_go_at(conc_wg_t *wg, void (*fn)(void *arg), void *arg, const char *file, int line) {
    if (!fn) return CONC_INVALID;
    conc__threads_reap(); /* the ones that ended since the last start */
    conc__go_args *a = (conc__go_args *)CONC_MALLOC(sizeof *a);
    if (!a) return CONC_NOMEM;
    a->fn = fn;
    a->arg = arg;
    if (wg) {
        int rc = conc_wg_add(wg, 1);
        if (rc != 0) {
            CONC_FREE(a);
            return rc;
        }
    }
    int rc = conc__thread_start_wg(NULL, conc__go_main, a, "conc_go", file, line, CONC__THREAD_REAP, wg);
    if (rc != 0) {
        CONC_FREE(a);
        if (wg) conc_wg_done(wg);
    }
    return rc;
}

CONC_API size_t conc_threads_live(void) {
    size_t n;
    CONC__LOCK(&conc__threads.mu);
    n = conc__threads.live;
    CONC__UNLOCK(&conc__threads.mu);
    return n;
}

/* Copies up to cap running threads with an id above scope (skipping service threads
   unless with_service) into out; returns how many there are. */
static size_t conc__threads_snapshot(uint64_t scope, bool with_service, conc_thread_info *out, size_t cap) {
    size_t n = 0;
    CONC__LOCK(&conc__threads.mu);
    for (conc__thread *t = conc__threads.head; t; t = t->next) {
        if (t->state != CONC__TH_RUNNING || t->info.id <= scope) continue;
        if (t->info.service && !with_service) continue;
        if (out && n < cap) out[n] = t->info;
        n++;
    }
    CONC__UNLOCK(&conc__threads.mu);
    return n;
}

CONC_API size_t conc_threads_list(conc_thread_info *out, size_t cap) {
    return conc__threads_snapshot(0, true, out, cap);
}

CONC_API uint64_t conc_leak_begin(void) {
    uint64_t id;
    CONC__LOCK(&conc__threads.mu);
    id = conc__threads.last_id;
    CONC__UNLOCK(&conc__threads.mu);
    return id;
}

#define CONC__LEAK_POLL_FIRST_NS (1 * CONC_MILLISECOND)
#define CONC__LEAK_POLL_MAX_NS (100 * CONC_MILLISECOND)

CONC_API int conc_leak_check(uint64_t scope, int64_t grace_ns, conc_ctx_t *ctx, conc_thread_info *leaked, size_t cap,
                             size_t *n_leaked) {
    /* as goleak: threads that are winding down get a grace period, polled with growing
       gaps (they end on their own; nothing here could be woken by it) */
    int64_t deadline = conc__time_after(conc_now(), grace_ns);
    int64_t gap = CONC__LEAK_POLL_FIRST_NS;
    int rc;
    size_t n;
    for (;;) {
        conc__threads_reap();
        n = conc__threads_snapshot(scope, false, leaked, cap);
        if (n == 0) {
            rc = 0;
            break;
        }
        int64_t left = deadline - conc_now();
        if (left <= 0) {
            rc = CONC_LEAKED;
            break;
        }
        rc = conc_sleep(gap < left ? gap : left, ctx);
        if (rc != 0) {
            n = conc__threads_snapshot(scope, false, leaked, cap);
            if (n == 0) rc = 0;
            break;
        }
        gap = gap * 2 < CONC__LEAK_POLL_MAX_NS ? gap * 2 : CONC__LEAK_POLL_MAX_NS;
    }
    if (n_leaked) *n_leaked = n;
    return rc;
}

/* ======================================================================== */
/* >>map: parallel map                                                      */
/* ======================================================================== */
/* The caller and up to limit-1 registered threads take indices from one counter, in
   chunks that shrink as the work runs out (a quarter of an equal share of what is left,
   at most CONC__MAP_CHUNK_MAX): cheap functions do not fight over the counter's cache
   line, and the tail stays balanced. Every worker checks the map's context before each
   item, so once it ends no item starts.

   Invariants:
   - An index is claimed by exactly one worker (CAS on next), and that worker runs it at
     most once: out[i] is written by fn(i) alone, or not at all.
   - first_err goes from 0 to the first non-zero return of fn once; its setter then cancels
     the map's context with that cause. The result is first_err, else 0 if every item ran,
     else the context's err (only an ended context skips items).
   - The threads are joined before the call returns: nothing outlives it.
   Lock order: none (atomics; fn runs with no conc lock held). */

#define CONC__MAP_CHUNK_MAX 1024
#define CONC__MAP_MAX_WORKERS 1024 /* a larger limit is taken as this (a thread each) */

typedef struct conc__map {
    conc_ctx_t *ctx; /* the map's context, a child of the caller's */
    const char *in;
    char *out;
    size_t in_size, out_size, n, workers;
    conc_map_fn fn;
    void *arg;
    _Atomic size_t next;   /* the first index no worker has claimed */
    _Atomic size_t ran;    /* items fn returned 0 for (added per worker at its end) */
    _Atomic int first_err; /* 0, then the first non-zero return of fn */
} conc__map;

static void conc__map_work(void *p) {
    conc__map *m = (conc__map *)p;
    size_t ran = 0;
    size_t start = atomic_load_explicit(&m->next, CONC__RELAXED);
    while (start < m->n) {
        size_t take = (m->n - start) / m->workers / 4;
        take = take < 1 ? 1 : take > CONC__MAP_CHUNK_MAX ? CONC__MAP_CHUNK_MAX : take;
        if (!atomic_compare_exchange_weak_explicit(&m->next, &start, start + take, CONC__RELAXED, CONC__RELAXED))
            continue; /* start now holds the current value */
        for (size_t i = start; i < start + take; i++) {
            if (conc_ctx_err(m->ctx) != 0) goto out;
            int rc = m->fn(i, m->in ? m->in + i * m->in_size : NULL, m->out ? m->out + i * m->out_size : NULL, m->arg,
                           m->ctx);
            if (rc != 0) {
                int none = 0;
                if (atomic_compare_exchange_strong_explicit(&m->first_err, &none, rc, CONC__ACQ_REL, CONC__ACQUIRE))
                    conc_ctx_cancel_cause(m->ctx, rc);
                goto out;
            }
            ran++;
        }
        start = atomic_load_explicit(&m->next, CONC__RELAXED);
    }
out:
    atomic_fetch_add_explicit(&m->ran, ran, CONC__RELAXED); /* read after the joins */
}

#define CONC__MAP_STACK_THREADS 16

CONC_API int conc_parallel_map_at(conc_ctx_t *parent, const void *in, size_t in_size, void *out, size_t out_size,
                                  size_t n, size_t limit, conc_map_fn fn, void *arg, const char *file, int line) {
    if (!fn || (n > 0 && ((!in && in_size) || (!out && out_size)))) return CONC_INVALID;
    if (n > 0 && ((in_size && n > SIZE_MAX / in_size) || (out_size && n > SIZE_MAX / out_size))) return CONC_INVALID;
    if (n == 0) return 0;
    conc__map m;
    m.ctx = conc_ctx_with_cancel(parent);
    if (!m.ctx) return CONC_NOMEM;
    m.in = (const char *)in;
    m.out = (char *)out;
    m.in_size = in_size;
    m.out_size = out_size;
    m.n = n;
    m.workers = limit ? limit : (size_t)conc__ncpu();
    if (m.workers > CONC__MAP_MAX_WORKERS) m.workers = CONC__MAP_MAX_WORKERS;
    if (m.workers > n) m.workers = n;
    m.fn = fn;
    m.arg = arg;
    atomic_init(&m.next, 0);
    atomic_init(&m.ran, 0);
    atomic_init(&m.first_err, 0);

    /* the caller is one of the workers; if threads cannot be had, fewer do the work */
    conc__thread *stack_threads[CONC__MAP_STACK_THREADS];
    conc__thread **threads = stack_threads;
    size_t helpers = m.workers - 1, started = 0;
    if (helpers > CONC__MAP_STACK_THREADS) {
        threads = (conc__thread **)CONC_MALLOC(helpers * sizeof *threads);
        if (!threads) {
            threads = stack_threads;
            helpers = CONC__MAP_STACK_THREADS;
        }
    }
    for (; started < helpers; started++)
        if (conc__thread_start(&threads[started], conc__map_work, &m, "parallel map", file, line, 0) != 0) break;
    conc__map_work(&m);
    for (size_t i = 0; i < started; i++) conc__thread_join(threads[i]);
    if (threads != stack_threads) CONC_FREE(threads);

    int rc = atomic_load_explicit(&m.first_err, CONC__ACQUIRE);
    if (rc == 0 && atomic_load_explicit(&m.ran, CONC__RELAXED) != n) rc = conc_ctx_err(m.ctx);
    conc_ctx_release(m.ctx);
    return rc;
}

#endif /* CONC__IMPLEMENTATION_DONE */
#endif /* CONC_IMPLEMENTATION */

/*
------------------------------------------------------------------------------
This software is available under 2 licenses -- choose whichever you prefer.
------------------------------------------------------------------------------
ALTERNATIVE A - MIT License
Copyright (c) 2026 conc.h developers
Permission is hereby granted, free of charge, to any person obtaining a copy of
this software and associated documentation files (the "Software"), to deal in
the Software without restriction, including without limitation the rights to
use, copy, modify, merge, publish, distribute, sublicense, and/or sell copies
of the Software, and to permit persons to whom the Software is furnished to do
so, subject to the following conditions:
The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.
THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE.
------------------------------------------------------------------------------
ALTERNATIVE B - Public Domain (www.unlicense.org)
This is free and unencumbered software released into the public domain.
Anyone is free to copy, modify, publish, use, compile, sell, or distribute this
software, either in source code form or as a compiled binary, for any purpose,
commercial or non-commercial, and by any means.
In jurisdictions that recognize copyright laws, the author or authors of this
software dedicate any and all copyright interest in the software to the public
domain. We make this dedication in the spirit of continual improvement for the
benefit of humanity and to the detriment of our heirs and successors. We intend
this dedication to be an overt act of relinquishment in perpetuity of all
present and future rights to this software under copyright law.
THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE.
------------------------------------------------------------------------------
*/
