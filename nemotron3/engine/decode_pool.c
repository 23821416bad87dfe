/* The threads of a decode step (included by decode_step.c).
 *
 * A step runs SPMD: `parallel(fn, arg, nt)` calls fn(arg, t, nt) on the caller (t = 0) and nt - 1 pool
 * threads at once; fn splits each phase of the step over t and separates phases with `barrier`. Pool
 * threads are created on first need and kept. Every wait (a pool thread for the next job, a thread at a
 * barrier, the caller for the job's end) spins briefly, then sleeps on a futex: the machine may have fewer
 * free cores than threads (other processes), where long spinning would stall the whole step. One step
 * runs at a time (a mutex), whatever the number of Python threads calling in. */
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#if defined(__linux__)
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#define MAX_THREADS 256
#define SPINS 4000

typedef void (*job_fn)(void *arg, int t, int nt);

static pthread_mutex_t run_lock = PTHREAD_MUTEX_INITIALIZER;
static int n_workers;                            /* pool threads created (ids 1..n_workers) */
static atomic_int job_gen, job_done, sleepers;
static job_fn job;
static void *job_arg;
static int job_nt;
static atomic_int bar_count, bar_phase;

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#else
    atomic_signal_fence(memory_order_seq_cst);
#endif
}

/* Wait until *addr != old: spin SPINS times, then sleep (futex on Linux, else yield). */
static void wait_change(atomic_int *addr, int old) {
    for (int i = 0; i < SPINS; i++) {
        if (atomic_load_explicit(addr, memory_order_acquire) != old) return;
        cpu_relax();
    }
    atomic_fetch_add_explicit(&sleepers, 1, memory_order_seq_cst);
    while (atomic_load_explicit(addr, memory_order_seq_cst) == old) {
#if defined(__linux__)
        syscall(SYS_futex, (int *)addr, FUTEX_WAIT_PRIVATE, old, NULL, NULL, 0);
#else
        sched_yield();
#endif
    }
    atomic_fetch_sub_explicit(&sleepers, 1, memory_order_seq_cst);
}

/* Change *addr (already stored) is published: wake any sleeper. */
static void wake_all(atomic_int *addr) {
#if defined(__linux__)
    if (atomic_load_explicit(&sleepers, memory_order_seq_cst))
        syscall(SYS_futex, (int *)addr, FUTEX_WAKE_PRIVATE, MAX_THREADS, NULL, NULL, 0);
#else
    (void)addr;
#endif
}

/* All nt threads of the current job wait here until every one has arrived. */
static void barrier(int nt) {
    if (nt == 1) return;
    const int phase = atomic_load_explicit(&bar_phase, memory_order_acquire);
    if (atomic_fetch_add_explicit(&bar_count, 1, memory_order_acq_rel) == nt - 1) {
        atomic_store_explicit(&bar_count, 0, memory_order_relaxed);
        atomic_store_explicit(&bar_phase, phase + 1, memory_order_seq_cst);
        wake_all(&bar_phase);
        return;
    }
    wait_change(&bar_phase, phase);
}

static void *worker(void *p) {
    const int t = (int)(intptr_t)p;
    int seen = 0;
    for (;;) {
        wait_change(&job_gen, seen);
        seen = atomic_load_explicit(&job_gen, memory_order_acquire);
        if (t < job_nt) {
            job(job_arg, t, job_nt);
            atomic_fetch_add_explicit(&job_done, 1, memory_order_seq_cst);
            wake_all(&job_done);
        }
    }
    return NULL;
}

/* fn(arg, t, nt) for t < nt on nt threads (fewer if threads cannot be created); returns the nt used. */
static int parallel(job_fn fn, void *arg, int nt) {
    pthread_mutex_lock(&run_lock);
    if (nt > MAX_THREADS) nt = MAX_THREADS;
    while (n_workers < nt - 1) {
        pthread_t th;
        pthread_attr_t at;
        pthread_attr_init(&at);
        pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
        const int ok = pthread_create(&th, &at, worker, (void *)(intptr_t)(n_workers + 1)) == 0;
        pthread_attr_destroy(&at);
        if (!ok) break;
        n_workers++;
    }
    if (nt > n_workers + 1) nt = n_workers + 1;
    if (nt > 1) {
        job = fn, job_arg = arg, job_nt = nt;
        atomic_store_explicit(&job_done, 0, memory_order_relaxed);
        atomic_fetch_add_explicit(&job_gen, 1, memory_order_seq_cst);
        wake_all(&job_gen);
    }
    fn(arg, 0, nt);
    for (int done; nt > 1 && (done = atomic_load_explicit(&job_done, memory_order_acquire)) < nt - 1;)
        wait_change(&job_done, done);
    pthread_mutex_unlock(&run_lock);
    return nt;
}

/* [*a, *b) = thread t's share of n items, in blocks of `align` (the last share takes the remainder). */
static inline void share(int64_t n, int t, int nt, int64_t align, int64_t *a, int64_t *b) {
    const int64_t blocks = (n + align - 1) / align, per = blocks / nt, extra = blocks % nt;
    const int64_t s = t * per + (t < extra ? t : extra), e = s + per + (t < extra);
    *a = s * align < n ? s * align : n;
    *b = e * align < n ? e * align : n;
}
