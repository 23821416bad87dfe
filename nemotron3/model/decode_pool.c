/* The threads of a decode step (included by decode_step.c).
 *
 * A step runs SPMD: `parallel(fn, arg, nt)` calls fn(arg, t, nt) on the caller (t = 0) and nt - 1 pool
 * threads at once; fn splits each phase of the step over t and separates phases with `barrier`. Pool
 * threads are created on first need and kept; between calls they spin briefly on the job counter, then
 * sleep on a condition variable. The barrier spins, then yields: the machine may have fewer free cores
 * than threads (other processes), where pure spinning would stall the whole step. One step runs at a
 * time (a mutex), whatever the number of Python threads calling in. */
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>

#define MAX_THREADS 256
#define SPINS 20000

typedef void (*job_fn)(void *arg, int t, int nt);

static pthread_mutex_t run_lock = PTHREAD_MUTEX_INITIALIZER, wake_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t wake = PTHREAD_COND_INITIALIZER;
static int n_workers;                            /* pool threads created (ids 1..n_workers) */
static atomic_long job_gen, job_done;
static job_fn job;
static void *job_arg;
static int job_nt;
static atomic_int bar_count, bar_phase;

static inline void relax(long i) {
#if defined(__x86_64__) || defined(__i386__)
    if (i < SPINS) __builtin_ia32_pause();
#else
    if (i < SPINS) atomic_signal_fence(memory_order_seq_cst);
#endif
    else sched_yield();
}

/* All nt threads of the current job wait here until every one has arrived. */
static void barrier(int nt) {
    if (nt == 1) return;
    const int phase = atomic_load_explicit(&bar_phase, memory_order_acquire);
    if (atomic_fetch_add_explicit(&bar_count, 1, memory_order_acq_rel) == nt - 1) {
        atomic_store_explicit(&bar_count, 0, memory_order_relaxed);
        atomic_store_explicit(&bar_phase, phase + 1, memory_order_release);
        return;
    }
    for (long i = 0; atomic_load_explicit(&bar_phase, memory_order_acquire) == phase; i++) relax(i);
}

static void *worker(void *p) {
    const int t = (int)(intptr_t)p;
    long seen = 0;
    for (;;) {
        long g;
        for (long i = 0; (g = atomic_load_explicit(&job_gen, memory_order_acquire)) == seen; i++) {
            if (i < SPINS) { relax(i); continue; }
            pthread_mutex_lock(&wake_lock);
            while ((g = atomic_load_explicit(&job_gen, memory_order_acquire)) == seen)
                pthread_cond_wait(&wake, &wake_lock);
            pthread_mutex_unlock(&wake_lock);
            break;
        }
        seen = g;
        if (t < job_nt) {
            job(job_arg, t, job_nt);
            atomic_fetch_add_explicit(&job_done, 1, memory_order_acq_rel);
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
        pthread_mutex_lock(&wake_lock);
        atomic_fetch_add_explicit(&job_gen, 1, memory_order_acq_rel);
        pthread_cond_broadcast(&wake);
        pthread_mutex_unlock(&wake_lock);
    }
    fn(arg, 0, nt);
    for (long i = 0; atomic_load_explicit(&job_done, memory_order_acquire) < nt - 1; i++) relax(i);
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
