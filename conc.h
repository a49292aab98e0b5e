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
                                  blocked thread spins before it sleeps, in ns; default
                                  20000. 0 disables spinning.
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
     ends it (for a deadline, conc's timer thread) after conc has let go of its locks, or at
     once on the calling thread if ctx has already ended. conc_after_func_stop() prevents the
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
     exerts, cheap enough to stay on.
   - conc_chan_free refuses (CONC_BUSY) while threads are blocked on the channel. Free a
     channel only when no thread uses it any more.

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

TIMERS  (>>timer)

   conc_timer_after(d) and conc_timer_tick(period) give a timer whose channel
   (conc_timer_chan, capacity 1, element int64_t: the conc_now() time it fired) receives one
   value after d, or one per period; a tick that finds the buffer full is dropped (Go's
   Ticker). conc_timer_stop and conc_timer_reset leave no stale value in the channel (Go 1.23
   semantics). conc_sleep(d, ctx) sleeps unless ctx ends first.
   All timers, deadlines and after-funcs share one internal thread, started on first use and
   ended (and joined) when idle for a while and at exit, so leak checkers see nothing.

THREAD SAFETY AND BLOCKING

   Every function may be called from any thread at the same time, except the _free and
   _release functions, which must be the last use of their object. Blocked calls park on
   a per-call condition variable after a short adaptive spin (never while more threads
   spin than there are spare cores); a blocked thread costs no CPU.
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
      CONC_BUSY               -7  the object is still in use (free with waiters)
      CONC_SYSTEM             -8  a system call failed (pthread_create, ...)

REVISION HISTORY

   0.1.0  contexts, channels, select, timers.
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
#define CONC_API static
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
    X(CONC_SYSTEM, -8, "system call failed")

typedef enum conc_status {
#define CONC__STATUS_ENUM(name, value, text) name = value,
    CONC__STATUS_LIST(CONC__STATUS_ENUM)
#undef CONC__STATUS_ENUM
    CONC__STATUS_MIN = -8
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
    size_t high_water;        /* most elements ever buffered at once */
    uint64_t sends, recvs;    /* completed sends / receives */
    uint64_t blocked_sends;   /* sends that had to wait for a receiver or for room */
    uint64_t blocked_recvs;   /* receives that had to wait for a value */
    int64_t send_wait_ns;     /* total time blocked sends waited */
    int64_t recv_wait_ns;     /* total time blocked receives waited */
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

/* ---- timers (>>timer) ---- */
typedef struct conc_timer conc_timer_t;

CONC_API conc_timer_t *conc_timer_after(int64_t delay_ns);
CONC_API conc_timer_t *conc_timer_tick(int64_t period_ns);
CONC_API conc_chan_t *conc_timer_chan(conc_timer_t *t);
CONC_API bool conc_timer_stop(conc_timer_t *t);
CONC_API bool conc_timer_reset(conc_timer_t *t, int64_t delay_ns);
CONC_API void conc_timer_free(conc_timer_t *t);
CONC_API int conc_sleep(int64_t duration_ns, conc_ctx_t *ctx);

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
                              no-op on background and value contexts. Thread safety: any
                              thread, any time before release.
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
                              blocked on ch. NULL is a no-op (0).
   conc_chan_send(ch, &v, ctx)   Blocks: while the buffer is full / until a receiver takes
                              v (cap 0). Returns: 0 (sent, exactly once), CONC_CLOSED, the
                              ctx's err, CONC_INVALID (ch NULL).
   conc_chan_recv(ch, &v, ctx)   Blocks: until a value comes. v may be NULL (discard).
                              Returns: 0, CONC_CLOSED (closed and drained; v zeroed), the
                              ctx's err, CONC_INVALID.
   conc_chan_try_send / try_recv  Never block. Return CONC_WOULD_BLOCK where send/recv
                              would block; otherwise as send/recv.
   conc_chan_close(ch)        Wakes every blocked receiver (CONC_CLOSED once drained) and
                              sender (CONC_CLOSED). Returns: 0, or CONC_CLOSED if already
                              closed.
   conc_chan_len / cap / elem_size  Buffered elements now / capacity / element size.
   conc_chan_stats_get(ch, &s)  A consistent snapshot of ch's statistics.

   ---- >>select
   conc_select(cases, n, ctx) Blocks: until a case is ready or ctx ends. Returns: the index
                              of the case performed (cases[i].status says how), the ctx's
                              err, or CONC_INVALID (n == 0 with no ctx that can end, bad
                              kind), CONC_NOMEM (n > 16 and no memory for the waiters).
   conc_try_select(cases, n)  Never blocks. Returns an index, or CONC_WOULD_BLOCK.

   ---- >>timer
   conc_timer_after(d)        One value after d ns. Returns NULL when out of memory.
   conc_timer_tick(p)         A value every p ns (p > 0, else NULL).
   conc_timer_chan(t)         The timer's channel (capacity 1, int64_t elements).
   conc_timer_stop(t)         Returns: true if the timer was active (a value was still to
                              come). Afterwards no value is buffered or will come.
   conc_timer_reset(t, d)     Restarts t to fire after d (then every d for a ticker),
                              dropping any buffered value. Returns as stop.
   conc_timer_free(t)         Stops and frees t. NULL is a no-op.
   conc_sleep(d, ctx)         Blocks: for d ns. Returns: 0, or the ctx's err if it ends
                              first.
*/

#ifdef __cplusplus
}
#endif
#endif /* CONC_H_INCLUDED */
