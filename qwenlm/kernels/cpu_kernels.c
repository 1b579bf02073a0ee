/* CPU kernels for qwenlm: matrix products over quantized weights, and a whole decoder layer.
 *
 * y[m, n] = sum_k x[m, k] * W[n, k] (+ bias[n]) for M rows of activations. Decoding is bound
 * by the bytes of W read per token, so the kernels read W once per call in its stored form
 * (float32, int8 per output channel, 4-bit groups, or GGUF's own block formats) and convert
 * in registers; every weight block read serves all M rows.
 *
 * Every output element is computed by the same instruction sequence whatever M, N or the
 * thread count are, so a row's result does not depend on how many rows were batched with it:
 * speculative decoding, batched decoding and prefill reproduce plain greedy decoding exactly.
 *
 * One source, compiled once per instruction-set level (qwenlm/kernels/__init__.py picks the
 * level from the CPU flags, or QWENLM_ISA): scalar, avx2, avxvnni, avx512, avx512vnni. The
 * GGUF kernels are written once over a small set of integer operations (the `vi_*` helpers)
 * that map to AVX2 instructions, to 512-bit AVX-512 ones (two 8-row groups a vector), to VNNI
 * dot products, or to plain C in the scalar build, so every level runs the same code
 * structure and gives bit-identical results.
 *
 * Work is split into small tasks claimed from an atomic counter by a pool of threads (see
 * run_phases): a thread that loses its core to another process delays at most the task it
 * holds, and waiting threads sleep instead of spinning once a wait grows long.
 */
#define _GNU_SOURCE /* syscall() for the futex */
#include <stdint.h>
#include <stdio.h>
#include <stddef.h>
#include <string.h>
#include <math.h>
#include <stdatomic.h>
#include <pthread.h>
#include <sched.h>
#include <time.h>
#include <limits.h>
#include <immintrin.h>
#ifdef __linux__
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#define NR 4 /* output rows computed together by the float/int8/int4 kernels */
#define ALWAYS static inline __attribute__((always_inline))
#define MIN(a, b) ((a) < (b) ? (a) : (b))

#if defined(__AVX512F__)
#define QLM_ISA "avx512"
#elif defined(__AVX2__)
#define QLM_ISA "avx2"
#else
#define QLM_ISA "scalar"
#endif
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define QLM_VNNI 1
#define dpbusd256 _mm256_dpbusd_epi32
#elif defined(__AVXVNNI__)
#define QLM_VNNI 1
#define dpbusd256 _mm256_dpbusd_avx_epi32
#endif

/* The level this library was built for, and whether it has VNNI dot products. */
const char *qlm_isa(void) {
#ifdef QLM_VNNI
    return QLM_ISA "+vnni";
#else
    return QLM_ISA;
#endif
}

static inline float half_to_float(uint16_t h) {
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h >> 15) << 31, exp = (h >> 10) & 0x1F, man = h & 0x3FF, bits;
    if (exp == 0x1F) {
        bits = sign | 0x7F800000u | (man << 13);
    } else if (exp) {
        bits = sign | ((exp + 112) << 23) | (man << 13);
    } else if (man) { /* subnormal half: normalise */
        int e = -1;
        do { man <<= 1; e++; } while (!(man & 0x400));
        bits = sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3FF) << 13);
    } else {
        bits = sign;
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
#endif
}

/* ---- the thread pool -------------------------------------------------------------------
 * A job is a list of phases, each a number of independent tasks; phase p starts once every
 * task of the phases before it is done. Each thread owns a contiguous slice of every phase's
 * tasks and claims them in order, so it streams its weights front to back (one task's rows
 * follow the last's: the hardware prefetcher keeps running, and the claim counter stays in
 * the thread's own cache); a thread done with its slice takes what is left of the others',
 * so the split adapts to whichever threads are running (measured on the 2-core EPYC: a
 * 137 MB output head read at 22 GB/s when two threads took 32-row tasks turn about from one
 * counter, 35 GB/s with slices). Nothing waits for a thread to *arrive*
 * anywhere (no barriers, no join): the caller returns once all tasks are done, and a worker
 * that was descheduled meanwhile finds nothing left when it wakes. Waits spin briefly, then
 * sleep on a futex, which hands the core to the thread being waited for.                   */

typedef void (*qlm_task_fn)(const void *ctx, int64_t i, int tid);
typedef struct {
    qlm_task_fn fn;
    const void *ctx;
    int64_t n;
} qlm_phase_t;

#define MAX_WORKERS 255
#define MAX_PHASES 16
#define SPIN_TASK_NS 50000   /* a peer's unfinished task: spin this long, then sleep */
/* An idle worker spins this long for the next job, then sleeps: longer than the Python
   between two decode steps (~0.5 ms from cold caches on the 2-core EPYC), so a step does not
   start by waking a sleeping worker (measured 0.5-1% of a 0.5B step; 0.3 ms before). */
#define SPIN_JOB_NS 1000000

static struct {
    pthread_mutex_t lock;         /* one job at a time */
    int nworkers;                 /* worker threads started: tids 1 .. nworkers */
    _Atomic uint32_t epoch;       /* bumped when a job is posted (a futex word) */
    _Atomic uint32_t done;        /* tasks of the current job finished (a futex word) */
    _Atomic int posting, active;  /* handshake: no worker reads a job while it is written */
    _Atomic int done_sleepers, job_sleepers; /* threads asleep on `done`, on `epoch` */
    _Atomic uint32_t standby; /* bumped when a job wants more threads than the one before */
    const qlm_phase_t *ph;
    int nph, nthreads;
    int64_t start[MAX_PHASES + 1]; /* first task of each phase; start[nph] = all tasks */
    _Atomic int tids[MAX_WORKERS + 1]; /* workers' kernel thread ids (qlm_run_delay_ns) */
} pool = {.lock = PTHREAD_MUTEX_INITIALIZER};

/* Thread t's slice of phase p: tasks next .. end-1 still unclaimed (one cache line each). */
typedef struct {
    _Atomic int64_t next;
    int64_t end;
    char pad[48];
} slice_t;
static slice_t slices[MAX_PHASES][MAX_WORKERS + 1] __attribute__((aligned(64)));

static inline void cpu_relax(void) { __builtin_ia32_pause(); }

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void futex_wait(_Atomic uint32_t *word, uint32_t seen) {
#ifdef __linux__
    struct timespec t = {0, 2000000}; /* a bounded sleep: re-check every 2 ms regardless */
    syscall(SYS_futex, (uint32_t *)word, FUTEX_WAIT_PRIVATE, seen, &t, NULL, 0);
#else
    (void)word, (void)seen;
    sched_yield();
#endif
}

static void futex_wake(_Atomic uint32_t *word) {
#ifdef __linux__
    syscall(SYS_futex, (uint32_t *)word, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
#else
    (void)word;
#endif
}

/* Wait until *word is at least `target` (or differs from it); `sleepers` counts the threads
   asleep on it, so that wakers make the syscall only when someone sleeps. */
static void wait_word(_Atomic uint32_t *word, uint32_t target, int differ, int64_t spin_ns,
                      _Atomic int *sleepers) {
    int64_t t0 = 0;
    for (int i = 0;; i++) {
        uint32_t v = atomic_load(word);
        if (differ ? v != target : v >= target) return;
        if (i < 64 || (i & 63)) {
            cpu_relax();
            continue;
        }
        int64_t t = now_ns();
        if (!t0) t0 = t;
        if (t - t0 < spin_ns) continue;
        atomic_fetch_add(sleepers, 1);
        v = atomic_load(word);
        if (!(differ ? v != target : v >= target)) futex_wait(word, v);
        atomic_fetch_sub(sleepers, 1);
    }
}

static void participate(int tid) {
    const int T = pool.nthreads;
    for (int p = 0; p < pool.nph; p++) {
        int64_t mine = 0; /* tasks of this phase this thread ran */
        for (int k = 0; k < T; k++) {
            slice_t *sl = &slices[p][(tid + k) % T];
            for (;;) {
                int64_t i = atomic_load_explicit(&sl->next, memory_order_relaxed);
                if (i >= sl->end) break;
                i = atomic_fetch_add(&sl->next, 1);
                if (i >= sl->end) break;
                if (!mine) /* the phases before must be finished */
                    wait_word(&pool.done, (uint32_t)pool.start[p], 0, SPIN_TASK_NS,
                              &pool.done_sleepers);
                pool.ph[p].fn(pool.ph[p].ctx, i, tid);
                mine++;
            }
        }
        /* Counted once per phase: the shared counter is touched T times a phase, not once
           a task. A thread adds only tasks it has finished, so `done` reaching start[p+1]
           still means every task of phase p is done. */
        if (mine) {
            atomic_fetch_add(&pool.done, (uint32_t)mine);
            if (atomic_load(&pool.done_sleepers)) futex_wake(&pool.done);
        }
    }
}

static void *worker_main(void *arg) {
    const int tid = (int)(intptr_t)arg;
#ifdef __linux__
    atomic_store(&pool.tids[tid], (int)syscall(SYS_gettid));
#endif
    uint32_t seen = atomic_load(&pool.epoch) - 1; /* started for the job about to be posted */
    int64_t spin = SPIN_JOB_NS;
    for (;;) {
        if (spin)
            wait_word(&pool.epoch, seen, 1, spin, &pool.job_sleepers);
        else /* beyond the last job's count: every job woke it to no purpose, taking a core
                from the threads at work; it waits for a job that wants more threads */
            while (atomic_load(&pool.epoch) == seen || tid >= pool.nthreads)
                futex_wait(&pool.standby, atomic_load(&pool.standby));
        for (;;) { /* enter unless the caller is writing the next job (Dekker handshake) */
            atomic_fetch_add(&pool.active, 1);
            if (!atomic_load(&pool.posting)) break;
            atomic_fetch_sub(&pool.active, 1);
            cpu_relax();
        }
        seen = atomic_load(&pool.epoch);
        /* a worker beyond the job's thread count sleeps at once, instead of spinning */
        spin = tid < pool.nthreads ? SPIN_JOB_NS : 0;
        if (tid < pool.nthreads) participate(tid);
        atomic_fetch_sub(&pool.active, 1);
    }
    return NULL;
}

static void pool_after_fork(void) {
    /* The child has none of the parent's workers: start afresh. */
    pthread_mutex_init(&pool.lock, NULL);
    pool.nworkers = 0;
    for (int t = 0; t <= MAX_WORKERS; t++) atomic_store(&pool.tids[t], 0);
    atomic_store(&pool.active, 0);
    atomic_store(&pool.posting, 0);
    atomic_store(&pool.done_sleepers, 0);
    atomic_store(&pool.job_sleepers, 0);
}

static void run_phases(const qlm_phase_t *ph, int nph, int nthreads) {
    if (nthreads < 1) nthreads = 1;
    if (nthreads > MAX_WORKERS + 1) nthreads = MAX_WORKERS + 1;
    int64_t total = 0;
    for (int p = 0; p < nph; p++) total += ph[p].n;
    if (nthreads == 1 || total <= 1) {
        for (int p = 0; p < nph; p++)
            for (int64_t i = 0; i < ph[p].n; i++) ph[p].fn(ph[p].ctx, i, 0);
        return;
    }
    pthread_mutex_lock(&pool.lock);
    static int fork_hook, last_nthreads;
    if (!fork_hook) fork_hook = !pthread_atfork(NULL, NULL, pool_after_fork);
    atomic_store(&pool.posting, 1);
    while (atomic_load(&pool.active)) sched_yield(); /* a previous job's late worker */
    while (pool.nworkers < nthreads - 1) {
        pthread_t t;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        int ok = !pthread_create(&t, &attr, worker_main, (void *)(intptr_t)(pool.nworkers + 1));
        pthread_attr_destroy(&attr);
        if (!ok) break;
        pool.nworkers++;
    }
    pool.ph = ph;
    pool.nph = nph;
    pool.nthreads = MIN(nthreads, pool.nworkers + 1);
    pool.start[0] = 0;
    for (int p = 0; p < nph; p++) {
        pool.start[p + 1] = pool.start[p] + ph[p].n;
        for (int t = 0; t < pool.nthreads; t++) {
            atomic_store_explicit(&slices[p][t].next, ph[p].n * t / pool.nthreads,
                                  memory_order_relaxed);
            slices[p][t].end = ph[p].n * (t + 1) / pool.nthreads;
        }
    }
    atomic_store(&pool.done, 0);
    atomic_fetch_add(&pool.epoch, 1);
    atomic_store(&pool.posting, 0);
    if (atomic_load(&pool.job_sleepers)) futex_wake(&pool.epoch);
    if (pool.nthreads > last_nthreads) {
        atomic_fetch_add(&pool.standby, 1);
        futex_wake(&pool.standby);
    }
    last_nthreads = pool.nthreads;
    participate(0);
    wait_word(&pool.done, (uint32_t)total, 0, SPIN_TASK_NS, &pool.done_sleepers);
    pthread_mutex_unlock(&pool.lock);
}

#ifdef __linux__
/* The second field of a schedstat file: nanoseconds runnable but waiting for a CPU. */
static int64_t schedstat_delay(const char *path) {
    FILE *f = fopen(path, "r");
    if (!f) return -1;
    unsigned long long run, wait;
    int got = fscanf(f, "%llu %llu", &run, &wait);
    fclose(f);
    return got == 2 ? (int64_t)wait : -1;
}
#endif

/* Nanoseconds the calling thread and the workers of the pool's last job have spent runnable
   but waiting for a CPU (Linux's per-thread schedstat), or -1 where the kernel does not say:
   the time a thread waits for a core that another process holds. qwenlm.kernels'
   ThreadGovernor runs fewer threads while it grows (a decode step waits for its slowest). */
int64_t qlm_run_delay_ns(void) {
#ifdef __linux__
    int64_t sum = schedstat_delay("/proc/thread-self/schedstat");
    if (sum < 0) return -1;
    for (int t = 1; t < MIN(pool.nthreads, MAX_WORKERS + 1); t++) { /* the last job's */
        int tid = atomic_load(&pool.tids[t]);
        if (!tid) continue;
        char path[64];
        snprintf(path, sizeof path, "/proc/self/task/%d/schedstat", tid);
        int64_t d = schedstat_delay(path);
        if (d > 0) sum += d;
    }
    return sum;
#else
    return -1;
#endif
}

/* Tasks over a range split into pieces of `per` items. */
static inline int64_t pieces(int64_t n, int64_t per) { return (n + per - 1) / per; }

/* ---- weight kinds and the descriptors Python fills in (fastpath.py mirrors them) -------- */

/* Mirrored by qwenlm.quant.linear.Kind; tests compare the two through qlm_kind_name. */
enum {
    QLM_F32 = 0,      /* float32 rows */
    QLM_I8 = 1,       /* int8 rows, one float scale per row */
    QLM_I8_TILED = 2, /* the same, GG rows interleaved as Q8_0's quants (see the GGUF kernels) */
    QLM_I4 = 3,       /* 4-bit groups of G with a half scale and minimum */
    QLM_Q4_0 = 4,     /* GGUF block formats, 8 rows interleaved per block (see gguf.py) */
    QLM_Q4_1 = 5,
    QLM_Q5_0 = 6,
    QLM_Q5_1 = 7,
    QLM_Q8_0 = 8,
    QLM_Q4_K = 9,
    QLM_Q5_K = 10,
    QLM_Q6_K = 11,
    QLM_KINDS
};

static const char *const KIND_NAMES[QLM_KINDS] = {
    "F32", "I8", "I8_TILED", "I4", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K",
};

const char *qlm_kind_name(int kind) { return kind >= 0 && kind < QLM_KINDS ? KIND_NAMES[kind] : ""; }

typedef struct qlm_linear {
    int64_t kind;
    const void *w;
    const void *scale; /* int8: float per row; 4-bit: half per group */
    const void *mins;  /* 4-bit: half per group */
    const float *bias;
    int64_t N, K, G;
    const struct qlm_linear *next; /* a fused projection's next part: its columns follow */
} qlm_linear_t;

typedef struct {
    qlm_linear_t qkv, o, gate_up, down;
    const float *ln1, *ln2;
    int64_t H, Hkv, D;
    float eps, scale;
} qlm_layer_t;

typedef struct {
    int64_t start, T, cap, past; /* rows start .. start + T - 1 of the batch; cache state */
    void *K, *V;                 /* [Hkv][cap][D] float32, or int8 with scales Ks, Vs */
    float *Ks, *Vs;
} qlm_segment_t;

/* sizeof and offsetof of the structs above, by name ("qlm_linear_t", "qlm_linear_t.w", ...),
   or -1: a test holds the ctypes mirrors to them. */
int64_t qlm_layout(const char *name) {
#define SZ(T) {#T, sizeof(T)}
#define OFF(T, f) {#T "." #f, offsetof(T, f)}
    static const struct { const char *name; int64_t value; } table[] = {
        SZ(qlm_linear_t), OFF(qlm_linear_t, kind), OFF(qlm_linear_t, w),
        OFF(qlm_linear_t, scale), OFF(qlm_linear_t, mins), OFF(qlm_linear_t, bias),
        OFF(qlm_linear_t, N), OFF(qlm_linear_t, K), OFF(qlm_linear_t, G),
        OFF(qlm_linear_t, next),
        SZ(qlm_layer_t), OFF(qlm_layer_t, qkv), OFF(qlm_layer_t, o), OFF(qlm_layer_t, gate_up),
        OFF(qlm_layer_t, down), OFF(qlm_layer_t, ln1), OFF(qlm_layer_t, ln2),
        OFF(qlm_layer_t, H), OFF(qlm_layer_t, Hkv), OFF(qlm_layer_t, D), OFF(qlm_layer_t, eps),
        OFF(qlm_layer_t, scale),
        SZ(qlm_segment_t), OFF(qlm_segment_t, start), OFF(qlm_segment_t, T),
        OFF(qlm_segment_t, cap), OFF(qlm_segment_t, past), OFF(qlm_segment_t, K),
        OFF(qlm_segment_t, V), OFF(qlm_segment_t, Ks), OFF(qlm_segment_t, Vs),
    };
#undef SZ
#undef OFF
    for (size_t i = 0; i < sizeof table / sizeof table[0]; i++)
        if (!strcmp(table[i].name, name)) return table[i].value;
    return -1;
}

/* ---- activations quantized to int8 in blocks of 32 ---------------------------------------
 * The integer kernels multiply int8 (or 4-bit) weights by int8 activations with integer
 * multiply-adds, four times denser than converting weights to float. Each block of 32
 * activations gets its own scale d = amax / 127 (as GGUF's Q8_0), which keeps the error far
 * below the weights' own quantization error. With each block go the sum of its codes (s32,
 * and xs = d * s32), with which the kernels fold in zero points and minimums exactly.
 * Layout for M rows of K (nb = K / 32 blocks a row), after the codes q[M][K]:
 * d[M][nb] float, xs[M][nb] float, s32[M][nb] int32, and -8 s32, -16 s32, -128 s32 (int32,
 * [M][nb] each): 6 M nb floats. The last three start the dot products of Q4_0, Q5_0 and
 * (VNNI's unsigned form) Q8_0 with their zero point's share: a broadcast load a row and
 * block instead of a shift and a subtraction on the vector ports.
 *
 * The K-quant kernels (Q4_K, Q5_K, Q6_K) take their own copy, as llama.cpp's Q8_K: one scale
 * per super-block of 256, so a super-block's integer sums add up across its 8 sub-blocks
 * before a single float step, instead of one per 32 (~20-30% fewer instructions a row).
 * After the blocks of 32, for K2 = K rounded down to 256: codes kq[M][K2], scales
 * kd[M][K2 / 256] float, and the codes' sums ks32[M][K2 / 32] and ks16[M][K2 / 16] int16 (the
 * minimums of each 32, Q6_K's offset per 16), and kz16[M][K2 / 16] int32 = -32 ks16 (where
 * Q6_K's products start). A row gets the copies its consumer needs.                        */

#define ACT_K2(K) ((K) / 256 * 256)
#define ACT_FLOATS(M, K) \
    ((M) * (6 * ((K) / 32) + ACT_K2(K) / 4 + ACT_K2(K) / 256 + ACT_K2(K) / 64 + ACT_K2(K) / 32 + \
            ACT_K2(K) / 16))

int64_t qlm_act_floats(int64_t M, int64_t K) { return ACT_FLOATS(M, K); }

enum { ACT_32 = 1, ACT_256 = 2 }; /* which copies a consumer reads (a bit mask) */

typedef struct {
    const int8_t *q;
    const float *d, *xs;
    const int32_t *s32, *z8, *z16, *z128; /* s32 and -8, -16, -128 times it */
    const int8_t *kq;
    const float *kd;
    const int16_t *ks32, *ks16;
    const int32_t *kz16; /* -32 ks16 */
    int64_t K;
} qlm_act_t;

static qlm_act_t act_view(int8_t *xq, float *xd, int64_t M, int64_t K) {
    const int64_t n = M * (K / 32), k2 = M * ACT_K2(K);
    float *kd = xd + 6 * n + k2 / 4;
    const int16_t *ks32 = (const int16_t *)(kd + k2 / 256);
    const int32_t *s32 = (const int32_t *)(xd + 2 * n);
    qlm_act_t a = {xq, xd, xd + n, s32, s32 + n, s32 + 2 * n, s32 + 3 * n,
                   (const int8_t *)(xd + 6 * n), kd, ks32, ks32 + k2 / 32,
                   (const int32_t *)(ks32 + k2 / 32 + k2 / 16), K};
    return a;
}

/* The largest |x| of 32 (a NaN is skipped). */
static float amax32(const float *xb) {
#if defined(__AVX2__)
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 mx = _mm256_setzero_ps();
    for (int i = 0; i < 4; i++)
        mx = _mm256_max_ps(_mm256_andnot_ps(sign, _mm256_loadu_ps(xb + 8 * i)), mx);
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_max_ss(h, _mm_shuffle_ps(h, h, 1)));
#else
    float amax = 0.0f;
    for (int j = 0; j < 32; j++) {
        float a = fabsf(xb[j]);
        amax = a > amax ? a : amax;
    }
    return amax;
#endif
}

/* Codes round(x * inv) of 32 (half away from zero) and the sums of each 16 of them. */
static void codes32(const float *xb, float inv, int8_t *q, int sum[2]) {
#if defined(__AVX2__)
    /* the same operations as the plain loop below, eight at a time: the same codes */
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256i c[4];
    for (int i = 0; i < 4; i++) {
        const __m256 t = _mm256_mul_ps(_mm256_loadu_ps(xb + 8 * i), _mm256_set1_ps(inv));
        /* round half away from zero: add 0.5 with t's sign, then truncate */
        c[i] = _mm256_cvttps_epi32(_mm256_add_ps(t, _mm256_or_ps(_mm256_and_ps(t, sign), _mm256_set1_ps(0.5f))));
    }
    const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(c[0], c[1]), _mm256_packs_epi32(c[2], c[3]));
    _mm256_storeu_si256((__m256i *)q, _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
    for (int half = 0; half < 2; half++) {
        __m256i t = _mm256_add_epi32(c[2 * half], c[2 * half + 1]);
        __m128i u = _mm_add_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256(t, 1));
        u = _mm_add_epi32(u, _mm_shuffle_epi32(u, 0x4E));
        sum[half] = _mm_cvtsi128_si32(_mm_add_epi32(u, _mm_shuffle_epi32(u, 0xB1)));
    }
#else
    sum[0] = sum[1] = 0;
    for (int j = 0; j < 32; j++) {
        float v = xb[j] * inv;
        int8_t c = (int8_t)(v < 0 ? v - 0.5f : v + 0.5f); /* round half away from 0 */
        q[j] = c;
        sum[j >> 4] += c;
    }
#endif
}

/* Blocks b0 .. b1-1 of 32 of row m (each block's codes and sums depend on that block alone). */
static void quantize_act_blocks(const float *x, int8_t *xq, float *xd, int64_t M, int64_t K,
                                int64_t m, int64_t b0, int64_t b1) {
    const int64_t nb = K / 32, n = M * nb;
    float *d = xd + m * nb, *xs = xd + n + m * nb;
    int32_t *s32 = (int32_t *)(xd + 2 * n) + m * nb, *z = s32 + n;
    x += m * K;
    int8_t *q = xq + m * K;
    for (int64_t b = b0; b < b1; b++) {
        const float amax = amax32(x + b * 32);
        int sum[2];
        codes32(x + b * 32, amax > 0 ? 127.0f / amax : 0.0f, q + b * 32, sum);
        d[b] = amax / 127.0f;
        s32[b] = sum[0] + sum[1];
        xs[b] = d[b] * (float)s32[b];
        z[b] = -8 * s32[b], z[n + b] = -16 * s32[b], z[2 * n + b] = -128 * s32[b];
    }
}

/* Super-blocks c0 .. c1-1 of 256 of row m, the K-quant kernels' copy. */
static void quantize_act_super(const float *x, int8_t *xq, float *xd, int64_t M, int64_t K,
                               int64_t m, int64_t c0, int64_t c1) {
    const qlm_act_t a = act_view(xq, xd, M, K);
    const int64_t K2 = ACT_K2(K);
    int8_t *q = (int8_t *)a.kq + m * K2;
    float *d = (float *)a.kd + m * (K2 / 256);
    int16_t *s32 = (int16_t *)a.ks32 + m * (K2 / 32), *s16 = (int16_t *)a.ks16 + m * (K2 / 16);
    int32_t *z16 = (int32_t *)a.kz16 + m * (K2 / 16);
    x += m * K;
    for (int64_t c = c0; c < c1; c++) {
        float amax = 0.0f;
        for (int i = 0; i < 8; i++) {
            const float t = amax32(x + 256 * c + 32 * i);
            amax = t > amax ? t : amax;
        }
        const float inv = amax > 0 ? 127.0f / amax : 0.0f;
        for (int i = 0; i < 8; i++) {
            int sum[2];
            codes32(x + 256 * c + 32 * i, inv, q + 256 * c + 32 * i, sum);
            s16[16 * c + 2 * i] = (int16_t)sum[0];
            s16[16 * c + 2 * i + 1] = (int16_t)sum[1];
            z16[16 * c + 2 * i] = -32 * sum[0], z16[16 * c + 2 * i + 1] = -32 * sum[1];
            s32[8 * c + i] = (int16_t)(sum[0] + sum[1]);
        }
        d[c] = amax / 127.0f;
    }
}

/* Row m's copies that `need` (ACT_32 | ACT_256) asks for. */
static void quantize_act_row(const float *x, int8_t *xq, float *xd, int64_t M, int64_t K,
                             int64_t m, int need) {
    if (need & ACT_32) quantize_act_blocks(x, xq, xd, M, K, m, 0, K / 32);
    if (need & ACT_256) quantize_act_super(x, xq, xd, M, K, m, 0, K / 256);
}

/* ---- float32 weights ------------------------------------------------------------------ */

static void dot4_f32(const float *x, const float *const w[NR], int64_t K, float out[NR]) {
    int64_t k = 0;
    float s[NR] = {0};
#if defined(__AVX512F__)
    __m512 a[NR];
    for (int r = 0; r < NR; r++) a[r] = _mm512_setzero_ps();
    for (; k + 16 <= K; k += 16) {
        __m512 xv = _mm512_loadu_ps(x + k);
        for (int r = 0; r < NR; r++) a[r] = _mm512_fmadd_ps(xv, _mm512_loadu_ps(w[r] + k), a[r]);
    }
    for (int r = 0; r < NR; r++) s[r] = _mm512_reduce_add_ps(a[r]);
#elif defined(__AVX2__) && defined(__FMA__)
    __m256 a[NR];
    for (int r = 0; r < NR; r++) a[r] = _mm256_setzero_ps();
    for (; k + 8 <= K; k += 8) {
        __m256 xv = _mm256_loadu_ps(x + k);
        for (int r = 0; r < NR; r++) a[r] = _mm256_fmadd_ps(xv, _mm256_loadu_ps(w[r] + k), a[r]);
    }
    for (int r = 0; r < NR; r++) {
        __m128 v = _mm_add_ps(_mm256_castps256_ps128(a[r]), _mm256_extractf128_ps(a[r], 1));
        v = _mm_add_ps(v, _mm_movehl_ps(v, v));
        v = _mm_add_ss(v, _mm_shuffle_ps(v, v, 1));
        s[r] = _mm_cvtss_f32(v);
    }
#endif
    for (; k < K; k++)
        for (int r = 0; r < NR; r++) s[r] += x[k] * w[r][k];
    for (int r = 0; r < NR; r++) out[r] = s[r];
}


#if defined(__AVX512BW__)
static inline __m512 sum_i8_pairs(__m512i u, __m512i s) {
    /* u unsigned bytes times s signed bytes, summed in 4s into 16 int32 lanes, as float */
    __m512i p = _mm512_madd_epi16(_mm512_maddubs_epi16(u, s), _mm512_set1_epi16(1));
    return _mm512_cvtepi32_ps(p);
}
static inline __m512 halves(float a, float b) {
    return _mm512_insertf32x8(_mm512_set1_ps(a), _mm256_set1_ps(b), 1);
}
#elif defined(__AVX2__) && defined(__FMA__)
static inline __m256 sum_i8_pairs(__m256i u, __m256i s) {
    __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
    return _mm256_cvtepi32_ps(p);
}
static inline float hsum256(__m256 a) {
    __m128 v = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    v = _mm_add_ps(v, _mm_movehl_ps(v, v));
    v = _mm_add_ss(v, _mm_shuffle_ps(v, v, 1));
    return _mm_cvtss_f32(v);
}
#endif

/* ---- int8 weights, one float scale per output row ------------------------------------- */

/* Plain rows, where the interleaved layout of the fast path (QLM_I8_TILED, run by the GGUF
 * kernels below) does not apply. Each row computes what the interleaved kernel computes for
 * it: the exact integer sum of each block of 32, then s = fma(sum, xd, s) block by block, so
 * a row's result does not depend on the layout either. */
static void dot4_i8(const int8_t *xq, const float *xd, const int8_t *const w[NR], int64_t K,
                    float out[NR]) {
#if defined(__AVX2__)
    __m128 s = _mm_setzero_ps(); /* row r in lane r */
    const __m256i ones = _mm256_set1_epi16(1);
    for (int64_t k = 0; k < K; k += 32) {
        const __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + k));
        const __m256i ax = _mm256_sign_epi8(xv, xv);
        __m256i p[NR];
        for (int r = 0; r < NR; r++) {
            /* |x| * (w with x's sign) keeps maddubs' unsigned operand unsigned */
            const __m256i wv = _mm256_loadu_si256((const __m256i *)(w[r] + k));
            p[r] = _mm256_madd_epi16(_mm256_maddubs_epi16(ax, _mm256_sign_epi8(wv, xv)), ones);
        }
        const __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(p[0], p[1]), _mm256_hadd_epi32(p[2], p[3]));
        const __m128i t = _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
        s = _mm_fmadd_ps(_mm_cvtepi32_ps(t), _mm_set1_ps(xd[k / 32]), s);
    }
    _mm_storeu_ps(out, s);
#else
    float s[NR] = {0};
    for (int r = 0; r < NR; r++)
        for (int64_t b = 0; b < K / 32; b++) {
            int32_t t = 0;
            for (int j = 0; j < 32; j++) t += (int32_t)xq[b * 32 + j] * (int32_t)w[r][b * 32 + j];
            s[r] = fmaf((float)t, xd[b], s[r]);
        }
    for (int r = 0; r < NR; r++) out[r] = s[r];
#endif
}

/* ---- 4-bit weights: groups of G (32, 64 or 128) along K, each with a half scale and min --
 * w = q * scale + min, q in 0..15. Within each 64 weights, byte j holds weight j in its low
 * nibble and weight j + 32 in its high nibble: one 32-byte load unpacks into 64 weights in
 * order. sum_k x_k w_k = sum_g scale_g * (sum_{k in g} x_k q_k) + min_g * (sum_{k in g} x_k). */

static void dot4_i4(const int8_t *xq, const float *xd, const float *xg,
                    const uint8_t *const w[NR], const uint16_t *const sc[NR],
                    const uint16_t *const mn[NR], int64_t K, int64_t G, float out[NR]) {
    float s[NR] = {0}, m[NR] = {0};
    int64_t per = G / 32;                          /* 32-blocks per group: 1, 2 or 4 */
    int shift = per == 1 ? 0 : per == 2 ? 1 : 2;   /* block -> group without a division */
#if defined(__AVX512BW__)
    const __m256i low = _mm256_set1_epi8(0x0F);
    __m512 a[NR];
    for (int r = 0; r < NR; r++) a[r] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 64) {
        __m512i xv = _mm512_loadu_si512(xq + k);
        __m512 d = halves(xd[k / 32], xd[k / 32 + 1]);
        int64_t g0 = (k >> 5) >> shift, g1 = ((k >> 5) + 1) >> shift;
        for (int r = 0; r < NR; r++) {
            __m256i b = _mm256_loadu_si256((const __m256i *)(w[r] + k / 2));
            __m256i lo = _mm256_and_si256(b, low);
            __m256i hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), low);
            __m512i wv = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
            __m512 ws = halves(half_to_float(sc[r][g0]), half_to_float(sc[r][g1]));
            a[r] = _mm512_fmadd_ps(_mm512_mul_ps(sum_i8_pairs(wv, xv), d), ws, a[r]);
        }
    }
    for (int r = 0; r < NR; r++) s[r] = _mm512_reduce_add_ps(a[r]);
#elif defined(__AVX2__) && defined(__FMA__)
    const __m256i low = _mm256_set1_epi8(0x0F);
    __m256 a[NR];
    for (int r = 0; r < NR; r++) a[r] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k += 64) {
        __m256i x0 = _mm256_loadu_si256((const __m256i *)(xq + k));
        __m256i x1 = _mm256_loadu_si256((const __m256i *)(xq + k + 32));
        float d0 = xd[k / 32], d1 = xd[k / 32 + 1];
        int64_t g0 = (k >> 5) >> shift, g1 = ((k >> 5) + 1) >> shift;
        for (int r = 0; r < NR; r++) {
            __m256i b = _mm256_loadu_si256((const __m256i *)(w[r] + k / 2));
            __m256i lo = _mm256_and_si256(b, low);
            __m256i hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), low);
            a[r] = _mm256_fmadd_ps(sum_i8_pairs(lo, x0), _mm256_set1_ps(d0 * half_to_float(sc[r][g0])), a[r]);
            a[r] = _mm256_fmadd_ps(sum_i8_pairs(hi, x1), _mm256_set1_ps(d1 * half_to_float(sc[r][g1])), a[r]);
        }
    }
    for (int r = 0; r < NR; r++) s[r] = hsum256(a[r]);
#else
    for (int r = 0; r < NR; r++)
        for (int64_t k = 0; k < K; k += 64)
            for (int h = 0; h < 2; h++) {
                int32_t t = 0;
                for (int j = 0; j < 32; j++) {
                    uint8_t byte = w[r][k / 2 + j];
                    int32_t q = h ? byte >> 4 : byte & 0xF;
                    t += q * (int32_t)xq[k + 32 * h + j];
                }
                s[r] += (float)t * xd[k / 32 + h] * half_to_float(sc[r][((k >> 5) + h) >> shift]);
            }
#endif
    /* The minimums' share: a dot product of each row's minimums with the group sums xg. */
    int64_t groups = K / G;
    for (int r = 0; r < NR; r++) {
        int64_t g = 0;
#if defined(__AVX512BW__)
        __m512 acc = _mm512_setzero_ps();
        for (; g < groups; g += 16) {
            __mmask16 valid = groups - g >= 16 ? 0xFFFF : (__mmask16)((1u << (groups - g)) - 1);
            __m512 mins = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(valid, mn[r] + g));
            acc = _mm512_fmadd_ps(mins, _mm512_maskz_loadu_ps(valid, xg + g), acc);
        }
        m[r] = _mm512_reduce_add_ps(acc);
#else
        for (; g < groups; g++) m[r] += half_to_float(mn[r][g]) * xg[g];
#endif
        out[r] = s[r] + m[r];
    }
}

static void dequant_i4_row(const uint8_t *q, const uint16_t *sc, const uint16_t *mn, float *o,
                           int64_t K, int64_t G) {
    for (int64_t k = 0; k < K; k += 64) {
        /* G >= 32: each run of 32 weights lies in one group */
        float s0 = half_to_float(sc[k / G]), m0 = half_to_float(mn[k / G]);
        float s1 = half_to_float(sc[(k + 32) / G]), m1 = half_to_float(mn[(k + 32) / G]);
#if defined(__AVX512F__)
        __m256i b = _mm256_loadu_si256((const __m256i *)(q + k / 2));
        __m256i lo = _mm256_and_si256(b, _mm256_set1_epi8(0x0F));
        __m256i hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), _mm256_set1_epi8(0x0F));
        __m128i part[4] = {_mm256_castsi256_si128(lo), _mm256_extracti128_si256(lo, 1),
                           _mm256_castsi256_si128(hi), _mm256_extracti128_si256(hi, 1)};
        for (int i = 0; i < 4; i++) {
            __m512 v = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(part[i]));
            __m512 sv = _mm512_set1_ps(i < 2 ? s0 : s1), mv = _mm512_set1_ps(i < 2 ? m0 : m1);
            _mm512_storeu_ps(o + k + 16 * i, _mm512_fmadd_ps(v, sv, mv));
        }
#else
        for (int j = 0; j < 32; j++) {
            uint8_t b = q[k / 2 + j];
            o[k + j] = (float)(b & 0xF) * s0 + m0;
            o[k + 32 + j] = (float)(b >> 4) * s1 + m1;
        }
#endif
    }
}

/* ---- one task's share of a linear part: output rows n0 .. n1-1 for all M input rows ----- */

static void f32_rows(const qlm_linear_t *L, const float *x, float *y, int64_t ldy, int64_t M,
                     int64_t n0, int64_t n1) {
    const float *w = L->w;
    const int64_t K = L->K, N = L->N;
    for (int64_t b = n0; b < n1; b += NR) {
        const float *rows[NR];
        for (int r = 0; r < NR; r++) rows[r] = w + MIN(b + r, N - 1) * K;
        for (int64_t m = 0; m < M; m++) {
            float out[NR];
            dot4_f32(x + m * K, rows, K, out);
            for (int r = 0; r < NR && b + r < n1; r++)
                y[m * ldy + b + r] = out[r] + (L->bias ? L->bias[b + r] : 0.0f);
        }
    }
}

static void i8_rows(const qlm_linear_t *L, const qlm_act_t *a, float *y, int64_t ldy, int64_t M,
                    int64_t n0, int64_t n1) {
    const int8_t *w = L->w;
    const float *scale = L->scale;
    const int64_t K = L->K, N = L->N;
    for (int64_t b = n0; b < n1; b += NR) {
        const int8_t *rows[NR];
        for (int r = 0; r < NR; r++) rows[r] = w + MIN(b + r, N - 1) * K;
        for (int64_t m = 0; m < M; m++) {
            float out[NR];
            dot4_i8(a->q + m * K, a->d + m * (K / 32), rows, K, out);
            for (int r = 0; r < NR && b + r < n1; r++)
                y[m * ldy + b + r] = out[r] * scale[b + r] + (L->bias ? L->bias[b + r] : 0.0f);
        }
    }
}

static void i4_rows(const qlm_linear_t *L, const qlm_act_t *a, float *y, int64_t ldy, int64_t M,
                    int64_t n0, int64_t n1) {
    const int64_t K = L->K, N = L->N, G = L->G, groups = K / G, per = G / 32;
    const uint8_t *w = L->w;
    const uint16_t *scale = L->scale, *minv = L->mins;
    for (int64_t b = n0; b < n1; b += NR) {
        const uint8_t *rows[NR];
        const uint16_t *sc[NR], *mn[NR];
        for (int r = 0; r < NR; r++) {
            int64_t n = MIN(b + r, N - 1);
            rows[r] = w + n * (K / 2);
            sc[r] = scale + n * groups;
            mn[r] = minv + n * groups;
        }
        for (int64_t m = 0; m < M; m++) {
            /* each group's activation sum, for the minimums: from the quantized blocks */
            float xg[groups], out[NR];
            const float *xd = a->d + m * (K / 32), *xs = a->xs + m * (K / 32);
            for (int64_t g = 0; g < groups; g++) {
                float t = 0.0f;
                for (int64_t j = g * per; j < (g + 1) * per; j++) t += xs[j];
                xg[g] = t;
            }
            dot4_i4(a->q + m * K, xd, xg, rows, sc, mn, K, G, out);
            for (int r = 0; r < NR && b + r < n1; r++)
                y[m * ldy + b + r] = out[r] + (L->bias ? L->bias[b + r] : 0.0f);
        }
    }
}

/* ---- GGUF block formats, as stored, and interleaved int8 rows ------------------------------
 * Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 (blocks of 32) and Q4_K Q5_K Q6_K (super-blocks of 256) keep their
 * bytes; at load (qwenlm/quant/gguf.py) each group of 8 output rows is interleaved per block,
 * so that one 32-byte load holds 4 weights of each of the 8 rows: lane r (4 bytes) belongs to
 * row r, one broadcast of 4 activation bytes serves all 8 rows, and the 8 sums land in the 8
 * lanes of one vector with no horizontal add. Per block and group (all little-endian):
 *   Q4_0  d[8] f16 | qs 4 x 32 B                     Q4_1  d[8] | m[8] | qs
 *   Q5_0  d[8] | H 32 B | B 4 x 32 B                 Q5_1  d[8] | m[8] | H | B
 *   Q8_0  d[8] | qs 8 x 32 B (int8)                 int8 rows (QLM_I8_TILED): qs only
 *   Q4_K  d[8] | dmin[8] | scales 3 x 32 B | qs 4 chunks x 8 x 32 B
 *   Q5_K  d[8] | dmin[8] | scales | qh 8 x 32 B | qs
 *   Q6_K  d[8] | scales 8 x 16 B | 8 x (ql 4 x 32 B | qh 2 x 32 B)
 * In a qs vector k, lane r, byte i: low nibble = element 4k + i of the 32-block, high nibble =
 * element 16 + 4k + i (Q4_K/Q5_K: low = sub-block 2c, high = 2c + 1, element 4k + i, chunk c):
 * nibble vectors p = 2k, 2k + 1. Q5_0/Q5_1 hold the same 8 vectors' 5-bit values so that
 * unpacking is cheap: byte i of lane r of B_k = value of vector k (bits 0-4) and bits 0-2 of
 * vector 4 + k's (bits 5-7); of H, bits 2k, 2k + 1 = bits 3, 4 of vector 4 + k's. Q5_K:
 * the 5th bit of nibble vector p is bit p of the same byte of the qh vector; Q6_K's top two
 * bits of vector p are bits 2(p%4)..2(p%4)+1 of qh vector p/4. K-quant scales: lane r of
 * scales vector i holds row r's i-th 32-bit word of its 12 packed scale bytes; Q6_K: lane r
 * of scales chunk s holds row r's int8 scales 2s, 2s+1 (16 elements each).
 *
 * Nibbles and 5/6-bit values are unpacked as unsigned (and/or/shift) and multiplied by the
 * signed int8 activations with maddubs; as many products as cannot overflow are summed in
 * int16 before one madd into int32; zero points (-8, -16, -32) and minimums are folded in
 * per block through the activations' block sums. Every integer sum is exact, so only the
 * float steps, the same for every row, decide the rounding.                                */

#define GG 8 /* output rows per interleaved group */

#if defined(__AVX512BW__)
/* 512-bit vectors hold two groups side by side: lanes 0-7 group g's 8 rows, lanes 8-15 group
   g + 1's (PAIR groups a vector). Each lane still runs its own row's instruction sequence,
   so every level computes the same numbers; only the number of rows per instruction grows. */
#define PAIR 2
typedef __m512i vi;
typedef __m512 vf;
#define vi_load(p) _mm512_loadu_si512((const void *)(p))
#define vi_zero _mm512_setzero_si512
#define vi_and _mm512_and_si512
#define vi_or _mm512_or_si512
#define vi_xor _mm512_xor_si512
#define vi_mullo32 _mm512_mullo_epi32
#define vi_srai32 _mm512_srai_epi32
#define vi_set8 _mm512_set1_epi8
#define vi_set16 _mm512_set1_epi16
#define vi_set32 _mm512_set1_epi32
#define vi_srli16 _mm512_srli_epi16
#define vi_slli16 _mm512_slli_epi16
#define vi_srli32 _mm512_srli_epi32
#define vi_slli32 _mm512_slli_epi32
#define vi_add16 _mm512_add_epi16
#define vi_add32 _mm512_add_epi32
#define vi_sub32 _mm512_sub_epi32
#define vi_maddubs _mm512_maddubs_epi16
#define vi_madd _mm512_madd_epi16
#define vi_shuffle8 _mm512_shuffle_epi8
#define vi_abs8 _mm512_abs_epi8
#ifdef QLM_VNNI
#define vi_dpbusd _mm512_dpbusd_epi32
#endif
#define vf_zero _mm512_setzero_ps
#define vf_set1 _mm512_set1_ps
#define vf_cvt _mm512_cvtepi32_ps
#define vf_mul _mm512_mul_ps
#define vf_fma _mm512_fmadd_ps
#define vf_fnma _mm512_fnmadd_ps
#define vf_store _mm512_storeu_ps
/* a with b's sign (b = 0 gives a, not 0: every caller multiplies by |b| = 0 there) */
ALWAYS vi vi_sign8(vi a, vi b) {
    return _mm512_mask_sub_epi8(a, _mm512_movepi8_mask(b), _mm512_setzero_si512(), a);
}
ALWAYS vi vi_bcast32(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return _mm512_set1_epi32(v);
}
/* 32 bytes at p (group g) and at q (group g + 1) */
ALWAYS vi vi_load2(const void *p, const void *q) {
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)p)),
                              _mm256_loadu_si256((const __m256i *)q), 1);
}
/* a 32-byte table (the same in each 128-bit lane) in every lane */
ALWAYS vi vi_table(const void *p) { return _mm512_broadcast_i64x4(_mm256_load_si256((const __m256i *)p)); }
ALWAYS vi vi_i8_to_i16_2(const int8_t *p, const int8_t *q) {
    return _mm512_cvtepi8_epi16(_mm256_inserti128_si256(
        _mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)p)), _mm_loadu_si128((const __m128i *)q), 1));
}
ALWAYS vf vf_load_h8_2(const uint8_t *p, const uint8_t *q) {
    return _mm512_cvtph_ps(_mm256_inserti128_si256(
        _mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)p)), _mm_loadu_si128((const __m128i *)q), 1));
}
#elif defined(__AVX2__)
#define PAIR 1
typedef __m256i vi;
typedef __m256 vf;
#define vi_load(p) _mm256_loadu_si256((const __m256i *)(p))
#define vi_zero _mm256_setzero_si256
#define vi_and _mm256_and_si256
#define vi_or _mm256_or_si256
#define vi_xor _mm256_xor_si256
#define vi_set8 _mm256_set1_epi8
#define vi_set16 _mm256_set1_epi16
#define vi_set32 _mm256_set1_epi32
#define vi_srli16 _mm256_srli_epi16
#define vi_slli16 _mm256_slli_epi16
#define vi_srli32 _mm256_srli_epi32
#define vi_slli32 _mm256_slli_epi32
#define vi_add16 _mm256_add_epi16
#define vi_add32 _mm256_add_epi32
#define vi_sub32 _mm256_sub_epi32
#define vi_maddubs _mm256_maddubs_epi16
#define vi_madd _mm256_madd_epi16
#define vi_shuffle8 _mm256_shuffle_epi8
#define vi_sign8 _mm256_sign_epi8
#define vi_abs8 _mm256_abs_epi8
#ifdef QLM_VNNI
#define vi_dpbusd dpbusd256
#endif
#define vf_zero _mm256_setzero_ps
#define vf_set1 _mm256_set1_ps
#define vf_cvt _mm256_cvtepi32_ps
#define vf_mul _mm256_mul_ps
#define vf_fma _mm256_fmadd_ps
#define vf_fnma _mm256_fnmadd_ps
#define vf_store _mm256_storeu_ps
ALWAYS vi vi_bcast32(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return _mm256_set1_epi32(v);
}
ALWAYS vi vi_i8_to_i16(const int8_t *p) {
    return _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)p));
}
ALWAYS vf vf_load_h8(const uint8_t *p) {
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
}
#else
/* The scalar build runs the same kernels on these plain-C versions of the instructions. */
#define PAIR 1
typedef union {
    uint8_t u8[32];
    int8_t i8[32];
    uint16_t u16[16];
    int16_t i16[16];
    int32_t i32[8];
    uint32_t u32[8];
} vi;
typedef struct {
    float f[8];
} vf;
#define VI_MAP(n, expr)                                                                        \
    vi r;                                                                                      \
    for (int i = 0; i < (n); i++) expr;                                                        \
    return r
ALWAYS vi vi_load(const void *p) {
    vi r;
    memcpy(&r, p, 32);
    return r;
}
ALWAYS vi vi_zero(void) { VI_MAP(8, r.i32[i] = 0); }
ALWAYS vi vi_and(vi a, vi b) { VI_MAP(8, r.u32[i] = a.u32[i] & b.u32[i]); }
ALWAYS vi vi_or(vi a, vi b) { VI_MAP(8, r.u32[i] = a.u32[i] | b.u32[i]); }
ALWAYS vi vi_xor(vi a, vi b) { VI_MAP(8, r.u32[i] = a.u32[i] ^ b.u32[i]); }
ALWAYS vi vi_set8(int8_t c) { VI_MAP(32, r.i8[i] = c); }
ALWAYS vi vi_set16(int16_t c) { VI_MAP(16, r.i16[i] = c); }
ALWAYS vi vi_set32(int32_t c) { VI_MAP(8, r.i32[i] = c); }
ALWAYS vi vi_srli16(vi a, int s) { VI_MAP(16, r.u16[i] = (uint16_t)(a.u16[i] >> s)); }
ALWAYS vi vi_slli16(vi a, int s) { VI_MAP(16, r.u16[i] = (uint16_t)(a.u16[i] << s)); }
ALWAYS vi vi_srli32(vi a, int s) { VI_MAP(8, r.u32[i] = a.u32[i] >> s); }
ALWAYS vi vi_slli32(vi a, int s) { VI_MAP(8, r.u32[i] = a.u32[i] << s); }
ALWAYS vi vi_add16(vi a, vi b) { VI_MAP(16, r.u16[i] = (uint16_t)(a.u16[i] + b.u16[i])); }
ALWAYS vi vi_add32(vi a, vi b) { VI_MAP(8, r.u32[i] = a.u32[i] + b.u32[i]); }
ALWAYS vi vi_sub32(vi a, vi b) { VI_MAP(8, r.u32[i] = a.u32[i] - b.u32[i]); }
ALWAYS vi vi_maddubs(vi a, vi b) {
    VI_MAP(16, {
        int32_t t = a.u8[2 * i] * b.i8[2 * i] + a.u8[2 * i + 1] * b.i8[2 * i + 1];
        r.i16[i] = (int16_t)(t > 32767 ? 32767 : t < -32768 ? -32768 : t);
    });
}
ALWAYS vi vi_madd(vi a, vi b) {
    VI_MAP(8, r.i32[i] = a.i16[2 * i] * b.i16[2 * i] + a.i16[2 * i + 1] * b.i16[2 * i + 1]);
}
ALWAYS vi vi_shuffle8(vi a, vi m) {
    VI_MAP(32, r.u8[i] = (m.u8[i] & 0x80) ? 0 : a.u8[(i & 16) + (m.u8[i] & 15)]);
}
ALWAYS vi vi_sign8(vi a, vi b) {
    VI_MAP(32, r.i8[i] = b.i8[i] < 0 ? (int8_t)-a.i8[i] : b.i8[i] ? a.i8[i] : 0);
}
ALWAYS vi vi_abs8(vi a) { VI_MAP(32, r.i8[i] = a.i8[i] < 0 ? (int8_t)-a.i8[i] : a.i8[i]); }
ALWAYS vi vi_bcast32(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return vi_set32(v);
}
ALWAYS vi vi_i8_to_i16(const int8_t *p) { VI_MAP(16, r.i16[i] = p[i]); }
#undef VI_MAP
#define VF_MAP(expr)                                                                           \
    vf r;                                                                                      \
    for (int i = 0; i < 8; i++) r.f[i] = expr;                                                 \
    return r
ALWAYS vf vf_zero(void) { VF_MAP(0.0f); }
ALWAYS vf vf_set1(float c) { VF_MAP(c); }
ALWAYS vf vf_cvt(vi a) { VF_MAP((float)a.i32[i]); }
ALWAYS vf vf_mul(vf a, vf b) { VF_MAP(a.f[i] * b.f[i]); }
ALWAYS vf vf_fma(vf a, vf b, vf c) { VF_MAP(fmaf(a.f[i], b.f[i], c.f[i])); }
ALWAYS vf vf_fnma(vf a, vf b, vf c) { VF_MAP(fmaf(-a.f[i], b.f[i], c.f[i])); }
ALWAYS vf vf_load_h8(const uint8_t *p) {
    uint16_t h[8];
    memcpy(h, p, 16);
    VF_MAP(half_to_float(h[i]));
}
#undef VF_MAP
ALWAYS void vf_store(float *p, vf a) { memcpy(p, a.f, 32); }
#endif
#if PAIR == 1 /* one group a vector: the second group's pointer is not read */
#define vi_load2(p, q) vi_load(p)
#define vi_table(p) vi_load(p)
#define vi_i8_to_i16_2(p, q) vi_i8_to_i16(p)
#define vf_load_h8_2(p, q) vf_load_h8(p)
#endif
/* A weight vector at p of the group(s) a vector holds: gs is the bytes from one group to the
   next (the caller's variable). */
#define WLOAD(p) vi_load2((p), (p) + gs)

/* Byte shuffles (the same in each 128-bit half): a 32-bit lane's byte j to an int16 pair,
   byte j alone, an int16 pair's first / second value to both, and bytes (0, 1) / (2, 3) to
   an int16 pair. */
static const int8_t SHUF[12][32] __attribute__((aligned(32))) = {
#define L4(a, b, c, d) a, b, c, d, a + 4, b + 4, c + 4, d + 4, a + 8, b + 8, c + 8, d + 8, \
                       a + 12, b + 12, c + 12, d + 12
#define LANES(a, b, c, d) {L4(a, b, c, d), L4(a, b, c, d)}
    LANES(0, -128, 0, -128), LANES(1, -127, 1, -127), LANES(2, -126, 2, -126),
    LANES(3, -125, 3, -125), LANES(0, -128, -128, -128), LANES(1, -127, -127, -127),
    LANES(2, -126, -126, -126), LANES(3, -125, -125, -125), LANES(0, 1, 0, 1), LANES(2, 3, 2, 3),
    LANES(0, -128, 1, -128), LANES(2, -128, 3, -128),
#undef LANES
#undef L4
};
/* (-128 + j keeps the high bit set after the +4/+8/+12 steps: a zero byte.) */
#define PAIR_OF(j) vi_table(SHUF[j])
#define BYTE_OF(j) vi_table(SHUF[4 + (j)])
#define FIRST_I16 vi_table(SHUF[8])
#define SECOND_I16 vi_table(SHUF[9])
#define BYTES_PAIR(j) vi_table(SHUF[10 + (j)]) /* j = 0: bytes 0 and 1, j = 1: bytes 2 and 3 */

/* Σ over n vectors of u (unsigned) · x (signed) per 32-bit lane, as int32, each lane's 16-bit
   pairs scaled by `scale` (ones for a plain sum); `per16` products fit in int16. The sum
   starts at `init` (int32 lanes). */
ALWAYS vi dot_u8(const vi *u, const vi *x, int n, int per16, vi scale, vi init) {
    vi acc = init;
    for (int p = 0; p < n; p += per16) {
        vi s = vi_maddubs(u[p], x[p]);
        for (int q = 1; q < per16; q++) s = vi_add16(s, vi_maddubs(u[p + q], x[p + q]));
        acc = vi_add32(acc, vi_madd(s, scale));
    }
    return acc;
}

/* The same plain sum, with VNNI's exact 4-product dot where the CPU has it. */
ALWAYS vi dot_u8_sum(const vi *u, const vi *x, int n, int per16, vi init) {
#ifdef QLM_VNNI
    (void)per16;
    vi a = init, b = vi_zero();
    for (int p = 0; p < n; p += 2) {
        a = vi_dpbusd(a, u[p], x[p]);
        b = vi_dpbusd(b, u[p + 1], x[p + 1]);
    }
    return vi_add32(a, b);
#else
    return dot_u8(u, x, n, per16, vi_set16(1), init);
#endif
}

/* The 8 nibble vectors of 4 qs vectors: u[2k] low nibbles of vector k, u[2k+1] high. */
ALWAYS void unpack_nibbles(const uint8_t *q, int64_t gs, vi *u, int nvec, int pairwise) {
    const vi m = vi_set8(0x0F);
    for (int k = 0; k < nvec; k++) {
        vi v = WLOAD(q + 32 * k);
        vi lo = vi_and(v, m), hi = vi_and(vi_srli16(v, 4), m);
        if (pairwise) { u[2 * k] = lo, u[2 * k + 1] = hi; }
        else { u[k] = lo, u[nvec + k] = hi; }
    }
}

/* Bits `bits` wide at position p * bits of h, moved to bit 4 (the value's top bits). */
ALWAYS vi top_bits(vi h, int p, int bits) {
    int s = 4 - p * bits;
    vi v = s > 0 ? vi_slli16(h, s) : s < 0 ? vi_srli16(h, -s) : h;
    return vi_and(v, vi_set8(bits == 1 ? 0x10 : 0x30));
}

/* lo[k] = the 4 activation bytes at x + 4k broadcast to every lane, hi[k] those at x + off + 4k. */
ALWAYS void broadcast_words(const int8_t *x, vi *lo, vi *hi, int n, int off) {
    for (int k = 0; k < n; k++) {
        lo[k] = vi_bcast32(x + 4 * k);
        hi[k] = vi_bcast32(x + off + 4 * k);
    }
}

#define ACT_ROW(a, m) ((a)->q + (m) * (a)->K)
#define ACT_D(a, m) ((a)->d + (m) * ((a)->K / 32))
#define ACT_XS(a, m) ((a)->xs + (m) * ((a)->K / 32))
#define ACT_KROW(a, m) ((a)->kq + (m) * (a)->K) /* the K-quants' copy (K a multiple of 256) */
#define ACT_KD(a, m) ((a)->kd + (m) * ((a)->K / 256))
#define ACT_KS32(a, m) ((a)->ks32 + (m) * ((a)->K / 32))
#define ACT_KS16(a, m) ((a)->ks16 + (m) * ((a)->K / 16))
#define ACT_KZ16(a, m) ((a)->kz16 + (m) * ((a)->K / 16))
/* A zero point's share of row m's block b, broadcast: -zp * s32 (zp 8, 16 or 128) */
#define ACT_ZP(a, zp, m, b) \
    vi_bcast32((const int8_t *)(((zp) == 8 ? (a)->z8 : (zp) == 16 ? (a)->z16 : (a)->z128) + \
                                (m) * ((a)->K / 32) + (b)))

/* Each kernel below runs R input rows (m0 .. m0+R-1) over all nb blocks of one group and
 * leaves each row's 8 sums in acc. R is a compile-time count (1 .. TILE), so the rows'
 * accumulators stay in registers while a block, unpacked once, serves all of them; a
 * group's blocks stay in L1/L2 for the next tile of rows. Every row runs the same
 * instructions in any tile, so its result never depends on R.                            */
#if defined(__AVX2__)
#define TILE 8
#else
#define TILE 1 /* plain C gains nothing from tiles, and one copy of each kernel builds faster */
#endif
/* With VNNI and 32 registers, tiles of at least this many rows run product-major (see q32_tile). */
#ifndef PM_ROWS
#define PM_ROWS 4
#endif
/* Read ahead of the blocks in use: a task's groups are one stream of a few KB, too short
   for the hardware prefetcher to ramp up on. */
#ifndef PF_BYTES
#define PF_BYTES 2048
#endif
ALWAYS void prefetch_record(const uint8_t *g, int64_t gs, int rec) {
    for (int o = 0; o < rec; o += 64) __builtin_prefetch(g + PF_BYTES + o, 0, 3);
#if PAIR > 1
    for (int o = 0; o < rec; o += 64) __builtin_prefetch(g + gs + PF_BYTES + o, 0, 3);
#else
    (void)gs;
#endif
}

/* Q4_0 Q4_1 Q5_0 Q5_1 Q8_0, and int8 rows (QLM_I8_TILED: Q8_0's layout with one float scale
   per row instead of a half per block, applied by the caller). */
ALWAYS void q32_tile(const int fmt, const uint8_t *g, int64_t gs, int64_t nb, const qlm_act_t *a,
                     int64_t m0, const int R, vf *acc) {
    const int mins = fmt == QLM_Q4_1 || fmt == QLM_Q5_1;
    const int five = fmt == QLM_Q5_0 || fmt == QLM_Q5_1;
    const int eight = fmt == QLM_Q8_0 || fmt == QLM_I8_TILED;
    const int scaled = fmt != QLM_I8_TILED;
    const int zero_point = fmt == QLM_Q4_0 ? 8 : fmt == QLM_Q5_0 ? 16 : 0;
    const int head = scaled ? 16 + (mins ? 16 : 0) : 0;
    const int rec = head + (five ? 32 : 0) + (eight ? 256 : 128);
    vf s[TILE];
    for (int m = 0; m < R; m++) s[m] = vf_zero();
    for (int64_t b = 0; b < nb; b++, g += rec) {
        prefetch_record(g, gs, rec);
        const vf d = scaled ? vf_load_h8_2(g, g + gs) : vf_zero();
        const vf mv = mins ? vf_load_h8_2(g + 16, g + gs + 16) : vf_zero();
        const uint8_t *q = g + head;
        vi u[8];
#if PAIR > 1 && !defined(QLM_VNNI)
        vi w8[8]; /* Q8_0's signed weights, kept for their signs */
#endif
        if (eight) {
#ifdef QLM_VNNI
            /* w + 128 (the sign bit flipped) is unsigned for dpbusd, whose 4-product sums
               do not saturate; each row takes 128 * sum(x) off again. Exact, as the sign
               trick below is, without its two operations per vector and row. */
            const vi flip = vi_set8((int8_t)0x80);
            for (int k = 0; k < 8; k++) u[k] = vi_xor(WLOAD(q + 32 * k), flip);
#else
            /* |w| * (x with w's sign) keeps maddubs' unsigned operand unsigned */
#if PAIR > 1
            for (int k = 0; k < 8; k++) u[k] = vi_abs8(w8[k] = WLOAD(q + 32 * k));
#else
            for (int k = 0; k < 8; k++) u[k] = vi_abs8(vi_load(q + 32 * k));
#endif
#endif
        } else if (five) {
            /* u[k] whole in B_k's low 5 bits; u[4 + k]: B_k's top 3 bits, and bits 2k, 2k + 1
               of H moved to bits 3-4 (16-bit shifts: the masks keep each byte's own bits) */
            const vi h = WLOAD(q), m5 = vi_set8(0x1F), m3 = vi_set8(0x07), m18 = vi_set8(0x18);
            for (int k = 0; k < 4; k++) {
                const vi b = WLOAD(q + 32 + 32 * k);
                const vi hk = k == 0 ? vi_slli16(h, 3) : k == 1 ? vi_slli16(h, 1) : vi_srli16(h, 2 * k - 3);
                u[k] = vi_and(b, m5);
                u[4 + k] = vi_or(vi_and(vi_srli16(b, 5), m3), vi_and(hk, m18));
            }
        } else {
            unpack_nibbles(q, gs, u, 4, 1);
        }
#if defined(QLM_VNNI) && PAIR > 1
        /* With 32 registers each row keeps one int32 sum and the block's 8 products run
           product-major: R independent dpbusd chains side by side. Row by row, each row was
           two 4-deep chains (20 cycles) the out-of-order window overlapped for a few rows
           only: 8 rows ran 1.2x slower (a block of 16 x 32 weights, 8 rows: 5.9 against
           7.1 ns). The same integer sums (int32 addition in any order). Fewer than 4 rows
           keep two chains each. */
        if (R >= PM_ROWS) {
            const int zp = eight ? 128 : zero_point;
            vi I[TILE];
            for (int m = 0; m < R; m++) I[m] = zp ? ACT_ZP(a, zp, m0 + m, b) : vi_zero();
            for (int p = 0; p < 8; p++) {
                const int off = eight ? 4 * p : (p & 1) * 16 + (p >> 1) * 4;
                for (int m = 0; m < R; m++)
                    I[m] = vi_dpbusd(I[m], u[p], vi_bcast32(ACT_ROW(a, m0 + m) + b * 32 + off));
            }
            for (int m = 0; m < R; m++) {
                const vf xd = vf_set1(ACT_D(a, m0 + m)[b]);
                vf t = vf_fma(vf_cvt(I[m]), scaled ? vf_mul(d, xd) : xd, s[m]);
                if (mins) t = vf_fma(mv, vf_set1(ACT_XS(a, m0 + m)[b]), t);
                s[m] = t;
            }
        } else
#endif
        for (int m = 0; m < R; m++) {
            const int8_t *x = ACT_ROW(a, m0 + m) + b * 32;
            vi xb[8], isum;
            if (eight) {
#ifdef QLM_VNNI
                for (int k = 0; k < 8; k++) xb[k] = vi_bcast32(x + 4 * k);
                isum = dot_u8_sum(u, xb, 8, 1, ACT_ZP(a, 128, m0 + m, b));
#else
#if PAIR > 1
                for (int k = 0; k < 8; k++) xb[k] = vi_sign8(vi_bcast32(x + 4 * k), w8[k]);
#else
                for (int k = 0; k < 8; k++) xb[k] = vi_sign8(vi_bcast32(x + 4 * k), vi_load(q + 32 * k));
#endif
                isum = dot_u8_sum(u, xb, 8, 1, vi_zero());
#endif
            } else {
                for (int k = 0; k < 4; k++) {
                    xb[2 * k] = vi_bcast32(x + 4 * k);
                    xb[2 * k + 1] = vi_bcast32(x + 16 + 4 * k);
                }
                /* the zero point's -zp * s32 where the sum starts */
                isum = dot_u8_sum(u, xb, 8, five ? 4 : 8,
                                  zero_point ? ACT_ZP(a, zero_point, m0 + m, b) : vi_zero());
            }
            const vf xd = vf_set1(ACT_D(a, m0 + m)[b]);
            vf t = vf_fma(vf_cvt(isum), scaled ? vf_mul(d, xd) : xd, s[m]);
            if (mins) t = vf_fma(mv, vf_set1(ACT_XS(a, m0 + m)[b]), t);
            s[m] = t;
        }
    }
    for (int m = 0; m < R; m++) acc[m] = s[m];
}

/* Q4_K Q5_K: w = d * sc_j * q - dmin * m_j for sub-block j (32 weights) of a super-block.
   With the activations' one scale dx per super-block (the K-quants' copy), a row's sum is
   dx * (d * sum_j sc_j (q . x)_j - dmin * sum_j m_j sum(x)_j): both sums in int32. */
ALWAYS void k45_tile(const int fmt, const uint8_t *g, int64_t gs, int64_t nsb, const qlm_act_t *a,
                     int64_t m0, const int R, vf *acc) {
    const int five = fmt == QLM_Q5_K;
    const int rec = five ? 1408 : 1152;
    vf s[TILE];
    vi I[TILE];
    for (int m = 0; m < R; m++) s[m] = vf_zero();
    for (int64_t sb = 0; sb < nsb; sb++, g += rec) {
        const vf d = vf_load_h8_2(g, g + gs), dmin = vf_load_h8_2(g + 16, g + gs + 16);
        /* 6-bit scales and minimums of 8 rows at once (ggml's 12-byte packing, per lane) */
        const vi U0 = WLOAD(g + 32), U1 = WLOAD(g + 64), U2 = WLOAD(g + 96);
        const vi m6 = vi_set8(0x3F), m4 = vi_set8(0x0F), m2 = vi_set8(0x03);
        const vi sc[2] = {vi_and(U0, m6),
                          vi_or(vi_and(U2, m4), vi_slli32(vi_and(vi_srli32(U0, 6), m2), 4))};
        const vi mi[2] = {vi_and(U1, m6), vi_or(vi_and(vi_srli32(U2, 4), m4),
                                                vi_slli32(vi_and(vi_srli32(U1, 6), m2), 4))};
        const uint8_t *qh = g + 128, *qs = g + 128 + (five ? 256 : 0);
        for (int m = 0; m < R; m++) I[m] = vi_zero();
        for (int c = 0; c < 4; c++) {
            prefetch_record(g + c * (rec / 4), gs, rec / 4);
            vi u[16]; /* u[k]: sub-block 2c, u[8 + k]: sub-block 2c + 1 */
            unpack_nibbles(qs + 256 * c, gs, u, 8, 0);
            if (five)
                for (int p = 0; p < 16; p++)
                    u[p] = vi_or(u[p], top_bits(WLOAD(qh + 32 * (2 * c + p / 8)), p % 8, 1));
            const int j0 = 2 * c, j1 = 2 * c + 1;
#if defined(QLM_VNNI) && PAIR > 1
            if (R >= PM_ROWS) {
                /* VNNI, 4+ rows: each sub-block's 8 products as one dpbusd chain per row, the
                   rows side by side, then times the sub-block's scale as an int32 (vpmulld):
                   22 operations a row here against maddubs' 34. The same integers: maddubs'
                   int16 sums never saturate for these codes (see dot_u8's callers). */
                const vi w0 = vi_shuffle8(sc[j0 / 4], BYTE_OF(j0 % 4));
                const vi w1 = vi_shuffle8(sc[j1 / 4], BYTE_OF(j1 % 4));
                for (int half = 0; half < 2; half++) {
                    vi A[TILE];
                    for (int m = 0; m < R; m++) A[m] = vi_zero();
                    for (int p = 0; p < 8; p++)
                        for (int m = 0; m < R; m++)
                            A[m] = vi_dpbusd(A[m], u[8 * half + p],
                                             vi_bcast32(ACT_KROW(a, m0 + m) + sb * 256 + 64 * c + 32 * half + 4 * p));
                    for (int m = 0; m < R; m++) I[m] = vi_add32(I[m], vi_mullo32(A[m], half ? w1 : w0));
                }
                continue;
            }
#endif
            const vi s0 = vi_shuffle8(sc[j0 / 4], PAIR_OF(j0 % 4));
            const vi s1 = vi_shuffle8(sc[j1 / 4], PAIR_OF(j1 % 4));
            for (int m = 0; m < R; m++) {
                vi x0[8], x1[8];
                broadcast_words(ACT_KROW(a, m0 + m) + sb * 256 + 64 * c, x0, x1, 8, 32);
                I[m] = vi_add32(I[m], vi_add32(dot_u8(u, x0, 8, five ? 4 : 8, s0, vi_zero()),
                                               dot_u8(u + 8, x1, 8, five ? 4 : 8, s1, vi_zero())));
            }
        }
        /* the minimums: pairs (m_j, m_j+1) times the pairs of code sums (s_j, s_j+1) */
        const vi mp[4] = {vi_shuffle8(mi[0], BYTES_PAIR(0)), vi_shuffle8(mi[0], BYTES_PAIR(1)),
                          vi_shuffle8(mi[1], BYTES_PAIR(0)), vi_shuffle8(mi[1], BYTES_PAIR(1))};
        for (int m = 0; m < R; m++) {
            const int8_t *xs = (const int8_t *)(ACT_KS32(a, m0 + m) + sb * 8);
            vi n = vi_madd(mp[0], vi_bcast32(xs));
            for (int p = 1; p < 4; p++) n = vi_add32(n, vi_madd(mp[p], vi_bcast32(xs + 4 * p)));
            const vf t = vf_fnma(dmin, vf_cvt(n), vf_mul(d, vf_cvt(I[m])));
            s[m] = vf_fma(t, vf_set1(ACT_KD(a, m0 + m)[sb]), s[m]);
        }
    }
    for (int m = 0; m < R; m++) acc[m] = s[m];
}

/* Q6_K: w = d * sc_i * (q - 32), q in 0..63, sc_i an int8 scale per 16 weights; with the
   activations' one scale dx per super-block: dx * d * sum_i sc_i ((q . x)_i - 32 sum(x)_i). */
ALWAYS void q6k_tile(const uint8_t *g, int64_t gs, int64_t nsb, const qlm_act_t *a, int64_t m0,
                     const int R, vf *acc) {
    vf s[TILE];
    vi I[TILE], O[TILE];
    for (int m = 0; m < R; m++) s[m] = vf_zero();
    for (int64_t sb = 0; sb < nsb; sb++, g += 1680) {
        const vf d = vf_load_h8_2(g, g + gs);
        for (int m = 0; m < R; m++) I[m] = O[m] = vi_zero();
        for (int c = 0; c < 8; c++) {
            const uint8_t *q = g + 144 + 192 * c;
            prefetch_record(q, gs, 192);
            vi u[8]; /* even: elements 4k.. (first 16), odd: 16 + 4k.. (second 16) */
            unpack_nibbles(q, gs, u, 4, 1);
            const vi h[2] = {WLOAD(q + 128), WLOAD(q + 160)};
            for (int p = 0; p < 8; p++) u[p] = vi_or(u[p], top_bits(h[p / 4], p % 4, 2));
            const int8_t *sc8 = (const int8_t *)g + 16 + 16 * c;
            const vi sp = vi_i8_to_i16_2(sc8, sc8 + gs); /* lane: (sc_a, sc_b) */
            const vi sa = vi_shuffle8(sp, FIRST_I16), sb_ = vi_shuffle8(sp, SECOND_I16);
            const vi ua[4] = {u[0], u[2], u[4], u[6]}, ub[4] = {u[1], u[3], u[5], u[7]};
#if defined(QLM_VNNI) && PAIR > 1
            if (R >= PM_ROWS) {
                /* VNNI, 4+ rows: each 16-value half as a dpbusd chain a row that starts at
                   -32 sum(x) (the offset folded in), the rows side by side, then times its
                   signed scale as an int32: the same integers as the maddubs form below. */
                const vi s32a = vi_srai32(vi_slli32(sp, 16), 16), s32b = vi_srai32(sp, 16);
                for (int half = 0; half < 2; half++) {
                    vi A[TILE];
                    for (int m = 0; m < R; m++)
                        A[m] = vi_bcast32((const int8_t *)(ACT_KZ16(a, m0 + m) + sb * 16 + 2 * c + half));
                    for (int p = 0; p < 4; p++)
                        for (int m = 0; m < R; m++)
                            A[m] = vi_dpbusd(A[m], half ? ub[p] : ua[p],
                                             vi_bcast32(ACT_KROW(a, m0 + m) + sb * 256 + 32 * c + 16 * half + 4 * p));
                    for (int m = 0; m < R; m++) I[m] = vi_add32(I[m], vi_mullo32(A[m], half ? s32b : s32a));
                }
                continue;
            }
#endif
            for (int m = 0; m < R; m++) {
                vi xa[4], xb[4];
                broadcast_words(ACT_KROW(a, m0 + m) + sb * 256 + 32 * c, xa, xb, 4, 16);
                I[m] = vi_add32(I[m], vi_add32(dot_u8(ua, xa, 4, 2, sa, vi_zero()), dot_u8(ub, xb, 4, 2, sb_, vi_zero())));
                /* the offset's sc_a * sum_a + sc_b * sum_b */
                const int8_t *xs = (const int8_t *)(ACT_KS16(a, m0 + m) + sb * 16 + 2 * c);
                O[m] = vi_add32(O[m], vi_madd(sp, vi_bcast32(xs)));
            }
        }
        for (int m = 0; m < R; m++) {
            const vi isum = vi_sub32(I[m], vi_slli32(O[m], 5));
            s[m] = vf_fma(vf_cvt(isum), vf_mul(d, vf_set1(ACT_KD(a, m0 + m)[sb])), s[m]);
        }
    }
    for (int m = 0; m < R; m++) acc[m] = s[m];
}

/* Bytes per group and block, and elements per block, of each interleaved kind. */
static const int GROUP_REC[QLM_KINDS] = {
    [QLM_I8_TILED] = 256, [QLM_Q4_0] = 144, [QLM_Q4_1] = 160, [QLM_Q5_0] = 176,
    [QLM_Q5_1] = 192, [QLM_Q8_0] = 272, [QLM_Q4_K] = 1152, [QLM_Q5_K] = 1408, [QLM_Q6_K] = 1680,
};
#define IS_GGUF(kind) ((kind) >= QLM_Q4_0 && (kind) <= QLM_Q6_K)
#define BLOCK_ELEMS(kind) ((kind) >= QLM_Q4_K ? 256 : 32)

ALWAYS void group_tile(const int fmt, const uint8_t *gp, int64_t gs, int64_t nb, const qlm_act_t *a,
                       int64_t m0, const int R, vf *acc) {
    if (fmt == QLM_Q6_K) q6k_tile(gp, gs, nb, a, m0, R, acc);
    else if (fmt >= QLM_Q4_K) k45_tile(fmt, gp, gs, nb, a, m0, R, acc);
    else q32_tile(fmt, gp, gs, nb, a, m0, R, acc);
}

/* Groups g0 .. g1-1 of an interleaved part for all M input rows, in tiles of up to TILE rows:
   8s, then the rest in one tile. Each row count is a compiled copy with its accumulators in
   registers; 5-7 rows as 4 + 1..3 cost 1.1-1.25x one tile of them (a second pass unpacking
   every block again), which speculative passes of 4-6 guesses and 5-7 clients hit. */
ALWAYS void interleaved_groups(const int fmt, const qlm_linear_t *L, const qlm_act_t *a, float *y,
                               int64_t ldy, int64_t M, int64_t g0, int64_t g1) {
    const int64_t nb = L->K / BLOCK_ELEMS(fmt), stride = nb * GROUP_REC[fmt];
    const float *scale = fmt == QLM_I8_TILED ? L->scale : 0;
    vf acc[TILE];
    float out[PAIR * GG];
    /* Tiles of rows outermost: a tile's activations stay in L1 across the task's groups (a few
       KB of weights, in L1 / L2), instead of all M rows streaming through L2 once a group. */
    for (int64_t m0 = 0, R; m0 < M; m0 += R) {
#if TILE > 1
        R = MIN(M - m0, TILE);
#else
        R = 1;
#endif
        for (int64_t g = g0; g < g1; g += PAIR) {
            const uint8_t *gp = (const uint8_t *)L->w + g * stride;
            /* a last group without a partner runs beside itself; its copy is not stored */
            const int64_t gs = g + 1 < g1 ? stride : 0;
            const int64_t n0 = g * GG, valid = MIN(MIN(PAIR, g1 - g) * GG, L->N - n0);
#if TILE > 1
            switch (R) {
            case 8: group_tile(fmt, gp, gs, nb, a, m0, 8, acc); break;
            case 7: group_tile(fmt, gp, gs, nb, a, m0, 7, acc); break;
            case 6: group_tile(fmt, gp, gs, nb, a, m0, 6, acc); break;
            case 5: group_tile(fmt, gp, gs, nb, a, m0, 5, acc); break;
            case 4: group_tile(fmt, gp, gs, nb, a, m0, 4, acc); break;
            case 3: group_tile(fmt, gp, gs, nb, a, m0, 3, acc); break;
            case 2: group_tile(fmt, gp, gs, nb, a, m0, 2, acc); break;
            default: group_tile(fmt, gp, gs, nb, a, m0, 1, acc);
            }
#else
            group_tile(fmt, gp, gs, nb, a, m0, 1, acc);
#endif
            for (int64_t m = 0; m < R; m++) {
                vf_store(out, acc[m]);
                float *yr = y + (m0 + m) * ldy + n0;
                for (int r = 0; r < valid; r++)
                    yr[r] = (scale ? out[r] * scale[n0 + r] : out[r]) + (L->bias ? L->bias[n0 + r] : 0.0f);
            }
        }
    }
}

#define GROUPS_FN(F)                                                                           \
    static void groups_##F(const qlm_linear_t *L, const qlm_act_t *a, float *y, int64_t ldy,   \
                           int64_t M, int64_t g0, int64_t g1) {                                \
        interleaved_groups(QLM_##F, L, a, y, ldy, M, g0, g1);                                  \
    }
GROUPS_FN(I8_TILED)
GROUPS_FN(Q4_0)
GROUPS_FN(Q4_1)
GROUPS_FN(Q5_0)
GROUPS_FN(Q5_1)
GROUPS_FN(Q8_0)
GROUPS_FN(Q4_K)
GROUPS_FN(Q5_K)
GROUPS_FN(Q6_K)
#undef GROUPS_FN

typedef void (*groups_fn)(const qlm_linear_t *, const qlm_act_t *, float *, int64_t, int64_t,
                          int64_t, int64_t);
static const groups_fn GROUP_KERNELS[QLM_KINDS] = {
    [QLM_I8_TILED] = groups_I8_TILED, [QLM_Q4_0] = groups_Q4_0, [QLM_Q4_1] = groups_Q4_1,
    [QLM_Q5_0] = groups_Q5_0, [QLM_Q5_1] = groups_Q5_1, [QLM_Q8_0] = groups_Q8_0,
    [QLM_Q4_K] = groups_Q4_K, [QLM_Q5_K] = groups_Q5_K, [QLM_Q6_K] = groups_Q6_K,
};
/* ---- a linear layer (one part or a fused chain of parts) as tasks ------------------------ */

#define ROWS_PER_TASK 32 /* output rows per task: a multiple of NR and GG */

typedef struct {
    const qlm_linear_t *L;
    const float *x; /* float input, for float32 parts */
    qlm_act_t a;    /* the input quantized, for the others */
    float *y;
    int64_t M, ldy;
} linear_ctx;

static int64_t linear_tasks(const qlm_linear_t *L) {
    int64_t n = 0;
    for (; L; L = L->next) n += pieces(L->N, ROWS_PER_TASK);
    return n;
}

static int64_t linear_width(const qlm_linear_t *L) {
    int64_t n = 0;
    for (; L; L = L->next) n += L->N;
    return n;
}

/* The activation copies (ACT_32 | ACT_256) the parts of L read; 0 for float32 parts alone. */
static int needs_act(const qlm_linear_t *L) {
    int need = 0;
    for (; L; L = L->next)
        if (L->kind != QLM_F32) need |= L->kind >= QLM_Q4_K && L->kind <= QLM_Q6_K ? ACT_256 : ACT_32;
    return need;
}

/* The part of L that task *i runs; *i becomes the task's index in that part, and *col the
   part's first output column. */
static const qlm_linear_t *task_part(const qlm_linear_t *P, int64_t *i, int64_t *col) {
    *col = 0;
    for (; *i >= pieces(P->N, ROWS_PER_TASK); P = P->next) {
        *i -= pieces(P->N, ROWS_PER_TASK);
        *col += P->N;
    }
    return P;
}

static void linear_task(const void *ctx, int64_t i, int tid) {
    (void)tid;
    const linear_ctx *c = ctx;
    int64_t col;
    const qlm_linear_t *P = task_part(c->L, &i, &col);
    const int64_t n0 = i * ROWS_PER_TASK, n1 = MIN(P->N, n0 + ROWS_PER_TASK);
    float *y = c->y + col;
    switch (P->kind) {
    case QLM_F32: f32_rows(P, c->x, y, c->ldy, c->M, n0, n1); break;
    case QLM_I8: i8_rows(P, &c->a, y, c->ldy, c->M, n0, n1); break;
    case QLM_I4: i4_rows(P, &c->a, y, c->ldy, c->M, n0, n1); break;
    default: GROUP_KERNELS[P->kind](P, &c->a, y, c->ldy, c->M, n0 / GG, pieces(n1, GG));
    }
}

typedef struct {
    const float *x;
    int8_t *xq;
    float *xd;
    int64_t M, K;
    int need;
} quant_ctx;

static void quant_task(const void *ctx, int64_t m, int tid) {
    (void)tid;
    const quant_ctx *c = ctx;
    quantize_act_row(c->x, c->xq, c->xd, c->M, c->K, m, c->need);
}

/* y (M rows of all parts' N) = x (M rows of K) through the linear L. Where a part is not
   float32, xq (M*K bytes) and xd (ACT_FLOATS(M, K) floats) are scratch for the quantized input. */
void qlm_linear(const qlm_linear_t *L, const float *x, float *y, int64_t M, int8_t *xq,
                float *xd, int nthreads) {
    const int64_t K = L->K;
    quant_ctx q = {x, xq, xd, M, K, needs_act(L)};
    linear_ctx c = {L, x, act_view(xq, xd, M, K), y, M, linear_width(L)};
    qlm_phase_t ph[2];
    int n = 0;
    if (needs_act(L)) ph[n++] = (qlm_phase_t){quant_task, &q, M};
    ph[n++] = (qlm_phase_t){linear_task, &c, linear_tasks(L)};
    run_phases(ph, n, nthreads);
}

/* Weights back to float32 rows, for large batches (dequantize once, then a dense matmul). */
typedef struct {
    const qlm_linear_t *L;
    float *out;
} dequant_ctx;

static void dequant_task(const void *ctx, int64_t i, int tid) {
    (void)tid;
    const dequant_ctx *c = ctx;
    const qlm_linear_t *L = c->L;
    const int64_t K = L->K, N = L->N, G = L->G;
    for (int64_t n = i * ROWS_PER_TASK; n < MIN(N, (i + 1) * ROWS_PER_TASK); n++) {
        float *o = c->out + n * K;
        if (L->kind == QLM_I4) {
            dequant_i4_row((const uint8_t *)L->w + n * (K / 2), (const uint16_t *)L->scale + n * (K / G),
                           (const uint16_t *)L->mins + n * (K / G), o, K, G);
            continue;
        }
        const float s = ((const float *)L->scale)[n];
        const int8_t *w = L->w;
        if (L->kind == QLM_I8_TILED) { /* group n / GG, lane n % GG of each 32-byte vector */
            const int8_t *q = w + (n / GG) * GG * K + (n % GG) * 4;
            for (int64_t k = 0; k < K; k += 4)
                for (int j = 0; j < 4; j++) o[k + j] = (float)q[k * GG + j] * s;
        } else {
            for (int64_t k = 0; k < K; k++) o[k] = (float)w[n * K + k] * s;
        }
    }
}

static void dequant(const qlm_linear_t *L, float *out, int nthreads) {
    dequant_ctx c = {L, out};
    qlm_phase_t ph = {dequant_task, &c, pieces(L->N, ROWS_PER_TASK)};
    run_phases(&ph, 1, nthreads);
}

void qlm_dequant_i8(const int8_t *w, int tiled, const float *scale, float *out, int64_t N,
                    int64_t K, int nthreads) {
    qlm_linear_t L = {tiled ? QLM_I8_TILED : QLM_I8, w, scale, 0, 0, N, K, 0, 0};
    dequant(&L, out, nthreads);
}

void qlm_dequant_i4(const uint8_t *w, const uint16_t *scale, const uint16_t *minv, float *out,
                    int64_t N, int64_t K, int64_t G, int nthreads) {
    qlm_linear_t L = {QLM_I4, w, scale, minv, 0, N, K, G, 0};
    dequant(&L, out, nthreads);
}

/* ---- rows of a table back to float32: embedding lookups --------------------------------
 * A decode step embeds one token a row; unpacking it in Python was ~0.2-0.4 ms of small ops
 * (a tenth of a millisecond even from a row cache) against a microsecond here. Each GGUF
 * row is rebuilt block by block as ggml stores it (the inverse of the interleaving above)
 * and dequantized with ggml's expressions in the same order as qwenlm/weights/quants.py, so
 * the values are identical to the Python path's.                                          */

/* Byte j of row r in a field stored as 32-byte vectors of 4 bytes per row (gguf.py _words). */
#define LANE_BYTE(p, r, j) ((p)[((j) / 4) * 32 + (r) * 4 + (j) % 4])

static inline float half_at(const uint8_t *p, int r) {
    uint16_t h;
    memcpy(&h, p + 2 * r, 2);
    return half_to_float(h);
}

/* The 6-bit scale and minimum of sub-block j of a Q4_K / Q5_K 12-byte field (ggml's order). */
static inline void k_scale_min(const uint8_t *q, int j, int *sc, int *mn) {
    if (j < 4) {
        *sc = q[j] & 63, *mn = q[j + 4] & 63;
    } else {
        *sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
        *mn = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

/* Row r (0..GG-1) of one interleaved block record p of kind fmt into y (its block's values). */
static void dequant_record_row(int fmt, const uint8_t *p, int r, float *y) {
    if (fmt <= QLM_Q8_0) {
        const int mins = fmt == QLM_Q4_1 || fmt == QLM_Q5_1, five = fmt == QLM_Q5_0 || fmt == QLM_Q5_1;
        const float d = half_at(p, r), m = mins ? half_at(p + 16, r) : 0.0f;
        const uint8_t *qh = p + (mins ? 32 : 16), *qs = qh + (five ? 32 : 0);
        if (fmt == QLM_Q8_0) {
            for (int e = 0; e < 32; e++) y[e] = (float)(int8_t)LANE_BYTE(qs, r, e) * d;
            return;
        }
        for (int e = 0; e < 32; e++) {
            const int j = e % 16;
            int q;
            if (five) { /* element e = (p % 2) 16 + 4 (p / 2) + i: nibble vector p, byte i */
                const int p = 2 * (j / 4) + e / 16, i = j % 4, k = p % 4;
                const int b = LANE_BYTE(qh + 32 * (1 + k), r, i); /* B_k */
                q = p < 4 ? b & 31 : (b >> 5) | ((qh[4 * r + i] >> (2 * k)) & 3) << 3;
            } else {
                const int b = LANE_BYTE(qs, r, j);
                q = e < 16 ? b & 15 : b >> 4;
            }
            const int zero = mins ? 0 : five ? 16 : 8;
            y[e] = mins ? (float)q * d + m : (float)(q - zero) * d;
        }
        return;
    }
    if (fmt == QLM_Q6_K) {
        const float d = half_at(p, r);
        for (int s = 0; s < 8; s++) { /* 32-element chunks: ql 4 x 32 B, qh 2 x 32 B */
            const uint8_t *ql = p + 144 + 192 * s, *qh = ql + 128;
            for (int e = 0; e < 32; e++) {
                const int h = e / 16, k = (e % 16) / 4, i = e % 4;
                const int lo = (ql[k * 32 + 4 * r + i] >> (4 * h)) & 15;
                const int hi = (qh[(k / 2) * 32 + 4 * r + i] >> (2 * (2 * (k % 2) + h))) & 3;
                const float dl = d * (float)(int8_t)p[16 + 16 * s + 2 * r + h]; /* scale 2 s + h */
                y[32 * s + e] = (float)((lo | hi << 4) - 32) * dl;
            }
        }
        return;
    }
    /* Q4_K, Q5_K: d[8] | dmin[8] | scales 3 x 32 B | (Q5_K: qh 8 x 32 B) | qs 4 x 8 x 32 B */
    const float d = half_at(p, r), dmin = half_at(p + 16, r);
    uint8_t sc12[12];
    for (int j = 0; j < 12; j++) sc12[j] = LANE_BYTE(p + 32, r, j);
    const int five = fmt == QLM_Q5_K;
    const uint8_t *qh = p + 128, *qs = p + (five ? 384 : 128);
    for (int j = 0; j < 8; j++) { /* sub-block j: nibbles of chunk j / 2, low or high */
        int sc, mn;
        k_scale_min(sc12, j, &sc, &mn);
        const float dl = d * (float)sc, ml = dmin * (float)mn;
        for (int l = 0; l < 32; l++) {
            const int b = LANE_BYTE(qs, r, 32 * (j / 2) + l);
            int q = j % 2 ? b >> 4 : b & 15;
            if (five) q |= ((qh[32 * j + 4 * r + l % 4] >> (l / 4)) & 1) << 4;
            y[32 * j + l] = (float)q * dl - ml;
        }
    }
}

/* Rows ids[0 .. n-1] of table L (one part: float32 or a GGUF kind) into out (n x K).
   Returns 0, -1 for a kind or chain it does not read, -2 for an id outside the table. */
int qlm_embed_rows(const qlm_linear_t *L, const int64_t *ids, int64_t n, float *out) {
    const int fmt = L->kind, K = (int)L->K;
    if (L->next || (fmt != QLM_F32 && !IS_GGUF(fmt))) return -1;
    for (int64_t j = 0; j < n; j++)
        if (ids[j] < 0 || ids[j] >= L->N) return -2;
    for (int64_t j = 0; j < n; j++) {
        const int64_t row = ids[j];
        float *o = out + j * K;
        if (fmt == QLM_F32) {
            memcpy(o, (const float *)L->w + row * K, (size_t)K * sizeof *o);
            continue;
        }
        const int be = BLOCK_ELEMS(fmt), nb = K / be;
        const uint8_t *g = (const uint8_t *)L->w + (row / GG) * (int64_t)nb * GROUP_REC[fmt];
        for (int b = 0; b < nb; b++) dequant_record_row(fmt, g + b * GROUP_REC[fmt], (int)(row % GG), o + b * be);
    }
    return 0;
}

/* ---- the rest of a decode step: norms, rotary embedding, attention, SwiGLU ------------
 * These replace dozens of small PyTorch ops per layer whose dispatch cost, not arithmetic,
 * dominates a one-token step. They work row by row, so a row's result never depends on the
 * batch it came in. `fv` is the widest float vector of the build (FW floats).              */

#if defined(__AVX512F__)
#define FW 16
typedef __m512 fv;
#define fv_load _mm512_loadu_ps
#define fv_store _mm512_storeu_ps
#define fv_set1 _mm512_set1_ps
#define fv_zero _mm512_setzero_ps
#define fv_add _mm512_add_ps
#define fv_sub _mm512_sub_ps
#define fv_mul _mm512_mul_ps
#define fv_div _mm512_div_ps
#define fv_fma _mm512_fmadd_ps
#define fv_hsum _mm512_reduce_add_ps
#define fv_load_i8(p) _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(p))))
#define fv_load_h(p) _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p)))
#define fv_min _mm512_min_ps
#define fv_max _mm512_max_ps
#define fv_fnma _mm512_fnmadd_ps
#define fv_round(x) _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#define fv_pow2n _mm512_scalef_ps /* p * 2^n */
#define EXP_LO -103.972077083992f
#elif defined(__AVX2__)
#define FW 8
typedef __m256 fv;
#define fv_load _mm256_loadu_ps
#define fv_store _mm256_storeu_ps
#define fv_set1 _mm256_set1_ps
#define fv_zero _mm256_setzero_ps
#define fv_add _mm256_add_ps
#define fv_sub _mm256_sub_ps
#define fv_mul _mm256_mul_ps
#define fv_div _mm256_div_ps
#define fv_fma _mm256_fmadd_ps
#define fv_load_i8(p) _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(p))))
#define fv_load_h(p) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p)))
static inline float fv_hsum(__m256 a) {
    __m128 v = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    v = _mm_add_ps(v, _mm_movehl_ps(v, v));
    v = _mm_add_ss(v, _mm_shuffle_ps(v, v, 1));
    return _mm_cvtss_f32(v);
}
#define fv_min _mm256_min_ps
#define fv_max _mm256_max_ps
#define fv_fnma _mm256_fnmadd_ps
#define fv_round(x) _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
static inline fv fv_pow2n(fv p, fv n) { /* p * 2^n, 2^n built in the exponent bits */
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
#define EXP_LO -87.3f /* 2^n stays a normal float */
#else
#define FW 1
typedef float fv;
#define fv_load(p) (*(p))
#define fv_store(p, v) (*(p) = (v))
#define fv_set1(v) (v)
#define fv_zero() 0.0f
#define fv_add(a, b) ((a) + (b))
#define fv_sub(a, b) ((a) - (b))
#define fv_mul(a, b) ((a) * (b))
#define fv_div(a, b) ((a) / (b))
#define fv_fma(a, b, c) ((a) * (b) + (c))
#define fv_hsum(a) (a)
#define fv_load_i8(p) ((float)*(p))
#define fv_load_h(p) half_to_float(*(p))
#define fv_exp expf
#endif

#if FW > 1
static inline fv fv_exp(fv x) {
    /* e^x = 2^n * e^r with r = x - n ln2 in [-ln2/2, ln2/2]; degree-6 polynomial, ~1 ulp */
    x = fv_max(fv_min(x, fv_set1(88.0f)), fv_set1(EXP_LO));
    fv n = fv_round(fv_mul(x, fv_set1(1.44269504088896341f)));
    fv r = fv_fnma(n, fv_set1(0.693359375f), x);
    r = fv_fnma(n, fv_set1(-2.12194440e-4f), r);
    fv p = fv_set1(1.9875691500E-4f);
    p = fv_fma(p, r, fv_set1(1.3981999507E-3f));
    p = fv_fma(p, r, fv_set1(8.3334519073E-3f));
    p = fv_fma(p, r, fv_set1(4.1665795894E-2f));
    p = fv_fma(p, r, fv_set1(1.6666665459E-1f));
    p = fv_fma(p, r, fv_set1(5.0000001201E-1f));
    p = fv_fma(p, fv_mul(r, r), fv_add(r, fv_set1(1.0f)));
    return fv_pow2n(p, n);
}
#endif

static inline float exp1(float x) {
#if FW > 1
    float v[FW];
    fv_store(v, fv_exp(fv_set1(x)));
    return v[0];
#else
    return expf(x);
#endif
}

/* Dot products of a float row with a float or int8 row. */
ALWAYS float dot_row(const float *a, const void *b, int64_t n, const int q8) {
    fv acc = fv_zero();
    int64_t i = 0;
    for (; i + FW <= n; i += FW)
        acc = fv_fma(fv_load(a + i), q8 ? fv_load_i8((const int8_t *)b + i) : fv_load((const float *)b + i), acc);
    float s = fv_hsum(acc);
    for (; i < n; i++) s += a[i] * (q8 ? (float)((const int8_t *)b)[i] : ((const float *)b)[i]);
    return s;
}

/* x += delta (if given), then y = x / rms(x) * w, for one row of D. */
static void add_rmsnorm_row(float *x, const float *delta, const float *w, float *y, int64_t D,
                            float eps) {
    fv acc = fv_zero();
    int64_t k = 0;
    for (; k + FW <= D; k += FW) {
        fv v = fv_load(x + k);
        if (delta) {
            v = fv_add(v, fv_load(delta + k));
            fv_store(x + k, v);
        }
        acc = fv_fma(v, v, acc);
    }
    float ss = fv_hsum(acc);
    for (; k < D; k++) {
        if (delta) x[k] += delta[k];
        ss += x[k] * x[k];
    }
    float inv = 1.0f / sqrtf(ss / (float)D + eps);
    for (k = 0; k < D; k++) y[k] = w[k] * (x[k] * inv);
}

/* Rotary embedding in place on `heads` heads of D (half-split layout), one row; cos/sin: the
   row's D values (the model's own tables). */
static void rope_row(float *v, int64_t heads, int64_t D, const float *c, const float *s) {
    int64_t half = D / 2;
    for (int64_t h = 0; h < heads; h++, v += D)
        for (int64_t i = 0; i < half; i++) {
            float a = v[i], b = v[i + half];
            v[i] = a * c[i] - b * s[i];
            v[i + half] = b * c[i + half] + a * s[i + half];
        }
}

/* SwiGLU for one row: out[i] = silu(g[i]) * u[i]. */
static void silu_mul_row(const float *g, const float *u, float *o, int64_t F) {
    int64_t i = 0;
    for (; i + FW <= F; i += FW) {
        fv x = fv_load(g + i);
        fv e = fv_exp(fv_sub(fv_zero(), x));
        fv_store(o + i, fv_mul(fv_div(x, fv_add(fv_set1(1.0f), e)), fv_load(u + i)));
    }
    for (; i < F; i++) o[i] = g[i] / (1.0f + exp1(-g[i])) * u[i];
}

/* An int8 KV row: D codes and a float scale (a quarter of float32's memory). */
static void q8_row(const float *x, int64_t D, int8_t *q, float *scale) {
    float amax = 0.0f;
    for (int64_t i = 0; i < D; i++) amax = fabsf(x[i]) > amax ? fabsf(x[i]) : amax;
    float inv = amax > 0 ? 127.0f / amax : 0.0f;
    for (int64_t i = 0; i < D; i++) q[i] = (int8_t)lrintf(x[i] * inv);
    *scale = amax / 127.0f;
}

/* Attention of one query row: the G query heads that share one KV head (grouped-query
 * attention) in one pass over the cached keys and values, n positions of float32 rows, or
 * int8 rows with per-row scales ks, vs. Two things made the per-head loop slow: every head
 * re-read the same K and V, and each output vector was one chain of n dependent FMAs
 * (latency-bound, 4 cycles apiece). Here the scores take 8 positions at a time (8 chains,
 * summed by one reduction) and the values pass keeps 2 vectors of each of up to AG heads in
 * flight. A head's arithmetic is the same whichever heads share its pass, so a row's result
 * never depends on how rows or heads are split into tasks. p: G * n floats of scratch.      */
#define AG 4 /* heads per pass over V: 2 * AG accumulators stay in registers */
#define PB 8 /* positions per block of scores */
#define VB 64 /* positions per block of values */

/* The KV cache's element types (the Python side passes them as `kv_type`). */
enum { KV_F32 = 0, KV_I8 = 1, KV_F16 = 2 };
#define KV_BYTES(t) ((t) == KV_I8 ? 1 : (t) == KV_F16 ? 2 : 4)

ALWAYS fv kv_load(const int kvt, const void *row, int64_t i) {
    if (kvt == KV_I8) return fv_load_i8((const int8_t *)row + i);
    if (kvt == KV_F16) return fv_load_h((const uint16_t *)row + i);
    return fv_load((const float *)row + i);
}
ALWAYS float kv_at(const int kvt, const void *row, int64_t i) {
    if (kvt == KV_I8) return (float)((const int8_t *)row)[i];
    if (kvt == KV_F16) return half_to_float(((const uint16_t *)row)[i]);
    return ((const float *)row)[i];
}

/* float32 to float16, rounding to nearest even (as F16C's vcvtps2ph and torch's .half()):
   overflow to infinity, NaN kept a (quiet) NaN, subnormal halves exact. */
static inline uint16_t float_to_half(float f) {
#if defined(__F16C__)
    return (uint16_t)_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT);
#else
    uint32_t x;
    memcpy(&x, &f, 4);
    const uint32_t sign = (x >> 16) & 0x8000, ax = x & 0x7FFFFFFF;
    if (ax > 0x7F800000) return (uint16_t)(sign | 0x7E00 | ((ax >> 13) & 0x3FF)); /* NaN */
    if (ax >= 0x477FF000) return (uint16_t)(sign | 0x7C00); /* rounds past 65504: infinity */
    if (ax >= 0x38800000) { /* a normal half */
        const uint32_t r = ax + 0xC8000FFF + ((ax >> 13) & 1); /* rebias exponent, round even */
        return (uint16_t)(sign | (r >> 13));
    }
    if (ax < 0x33000001) return (uint16_t)sign; /* under half the smallest subnormal: zero */
    /* a subnormal half: the 24-bit significand shifted right, rounded to nearest even */
    const int e = (int)(ax >> 23), shift = 126 - e; /* 14 .. 24 */
    const uint32_t m = (ax & 0x7FFFFF) | 0x800000;
    uint32_t h = m >> shift;
    const uint32_t rest = m & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rest > half || (rest == half && (h & 1))) h++;
    return (uint16_t)(sign | h);
#endif
}

static void f16_row(const float *x, int64_t D, uint16_t *out) {
    int64_t i = 0;
#if defined(__F16C__)
    for (; i + 8 <= D; i += 8)
        _mm_storeu_si128((__m128i *)(out + i),
                         _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
#endif
    for (; i < D; i++) out[i] = float_to_half(x[i]);
}

/* The 8 sums of a[0..7]'s lanes. With 8 lanes: a hadd tree, in the order that hsum8 below
   repeats for one vector, so a position's score is the same in a block and in the tail. */
ALWAYS void reduce8(const fv *a, float *out) {
#if FW == 8 && defined(__AVX2__)
    const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    const __m256 u = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
    /* t: lane r (< 4) = a[r]'s lanes 0-3 summed, lane 4 + r = its lanes 4-7 */
    const __m256 lo = _mm256_permute2f128_ps(t, u, 0x20), hi = _mm256_permute2f128_ps(t, u, 0x31);
    _mm256_storeu_ps(out, _mm256_add_ps(lo, hi));
#else
    for (int t = 0; t < 8; t++) out[t] = fv_hsum(a[t]);
#endif
}
ALWAYS float hsum8(fv a) {
#if FW == 8 && defined(__AVX2__)
    float l[8];
    _mm256_storeu_ps(l, a);
    return ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
#else
    return fv_hsum(a);
#endif
}

/* o[a] (+)= Σ_j p[a][j] v_j for positions j0 .. j1-1, columns i .. i + 2 FW, of A heads (A a
   compile-time count); o holds the running sums between blocks of positions (the same chain
   of FMAs as one pass over all of them), and the last block scales them by inv. */
ALWAYS void values_pass(const int kvt, const int A, const float *p, int64_t n, const void *V,
                        int64_t j0, int64_t j1, int64_t D, int64_t i, const float *inv, float *o) {
    fv acc[AG][2];
    for (int a = 0; a < A; a++) {
        acc[a][0] = j0 ? fv_load(o + a * D + i) : fv_zero();
        acc[a][1] = j0 ? fv_load(o + a * D + i + FW) : fv_zero();
    }
    for (int64_t j = j0; j < j1; j++) {
        const void *vj = (const char *)V + j * D * KV_BYTES(kvt);
        const fv v0 = kv_load(kvt, vj, i), v1 = kv_load(kvt, vj, i + FW);
        for (int a = 0; a < A; a++) {
            const fv pj = fv_set1(p[a * n + j]);
            acc[a][0] = fv_fma(pj, v0, acc[a][0]);
            acc[a][1] = fv_fma(pj, v1, acc[a][1]);
        }
    }
    for (int a = 0; a < A; a++) {
        const fv f = fv_set1(j1 == n ? inv[a] : 1.0f);
        fv_store(o + a * D + i, fv_mul(acc[a][0], f));
        fv_store(o + a * D + i + FW, fv_mul(acc[a][1], f));
    }
}

#if FW == 16
/* Lane t of the result: the sum of a[t]'s 16 lanes. Four rounds of shuffles and adds, each
   halving the vectors (45 operations for 16 sums, against ~9 for each alone); fed in the
   order below, input t's sum ends in lane t. */
ALWAYS fv reduce16(const fv *a) {
    fv x[16], b[8], c[4], e[2];
    /* the rounds leave input k's sum in lane 4 (k % 4) + k / 4 */
    for (int k = 0; k < 16; k++) x[k] = a[4 * (k % 4) + k / 4];
    for (int k = 0; k < 8; k++) /* 256-bit halves: [x.lo + x.hi, y.lo + y.hi] */
        b[k] = _mm512_add_ps(_mm512_shuffle_f32x4(x[2 * k], x[2 * k + 1], 0x44),
                             _mm512_shuffle_f32x4(x[2 * k], x[2 * k + 1], 0xEE));
    for (int k = 0; k < 4; k++) /* 128-bit quarters: one per input */
        c[k] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * k], b[2 * k + 1], 0x88),
                             _mm512_shuffle_f32x4(b[2 * k], b[2 * k + 1], 0xDD));
    for (int k = 0; k < 2; k++) /* pairs of lanes within each quarter */
        e[k] = _mm512_add_ps(_mm512_shuffle_ps(c[2 * k], c[2 * k + 1], 0x44),
                             _mm512_shuffle_ps(c[2 * k], c[2 * k + 1], 0xEE));
    return _mm512_add_ps(_mm512_shuffle_ps(e[0], e[1], 0x88), _mm512_shuffle_ps(e[0], e[1], 0xDD));
}
#endif

ALWAYS void attend_group(const int kvt, const float *q, const void *K, const void *V,
                         const float *ks, const float *vs, int64_t n, int64_t D, int64_t G,
                         float scale, float *p, float *o) {
    const int q8 = kvt == KV_I8; /* rows with a scale each */
#define KROW(j) ((const void *)((const char *)K + (j) * D * KV_BYTES(kvt)))
#define VROW(j) ((const void *)((const char *)V + (j) * D * KV_BYTES(kvt)))
    const int64_t Dv = D / FW * FW;
    int64_t j = 0;
    const int64_t krow = D * KV_BYTES(kvt);
    /* A block of keys from a float16 or int8 cache converted to float32 once for all G heads
       (exact: the same scores); converted head by head, with a horizontal sum a position and
       head, they took ~2/3 of a step's attention at 2k positions. */
    float kf[16 * 256] __attribute__((aligned(64)));
    const int convert = kvt != KV_F32 && D <= 256;
#define CONVERT_KEYS(rows, width)                                                              \
    for (int t = 0; t < (rows); t++)                                                           \
        for (int64_t i = 0; i < (width); i += FW) fv_store(kf + t * D + i, kv_load(kvt, KROW(j + t), i))
#if FW == 16
    /* Scores of 16 positions a head at once, their sums landing in one vector's lanes
       (reduce16). */
    if (D % FW == 0 && D <= 256) {
        for (; j + 16 <= n; j += 16) {
            for (int64_t t = j + 32; t < MIN(n, j + 48); t++) /* two blocks ahead */
                for (int64_t b = 0; b < krow; b += 64)
                    __builtin_prefetch((const char *)KROW(t) + b, 0, 3);
            const float *kb = (const float *)KROW(j);
            if (convert) {
                CONVERT_KEYS(16, D);
                kb = kf;
            }
            for (int64_t g = 0; g < G; g++) {
                const float *qg = q + g * D;
                fv acc[16];
                for (int t = 0; t < 16; t++) acc[t] = fv_zero();
                for (int64_t i = 0; i < D; i += FW) {
                    const fv qv = fv_load(qg + i);
                    for (int t = 0; t < 16; t++) acc[t] = fv_fma(qv, fv_load(kb + t * D + i), acc[t]);
                }
                fv sc = reduce16(acc);
                if (q8) sc = fv_mul(sc, fv_load(ks + j));
                fv_store(p + g * n + j, fv_mul(sc, fv_set1(scale)));
            }
        }
    }
#endif
    for (; j + PB <= n; j += PB) { /* scores of 8 positions, head by head */
        for (int64_t t = j + 4 * PB; t < MIN(n, j + 5 * PB); t++) /* a few blocks ahead */
            for (int64_t b = 0; b < krow; b += 64)
                __builtin_prefetch((const char *)KROW(t) + b, 0, 3);
        if (convert) CONVERT_KEYS(PB, Dv);
        for (int64_t g = 0; g < G; g++) {
            const float *qg = q + g * D;
            fv acc[PB];
            for (int t = 0; t < PB; t++) acc[t] = fv_zero();
            for (int64_t i = 0; i < Dv; i += FW) {
                const fv qv = fv_load(qg + i);
                for (int t = 0; t < PB; t++)
                    acc[t] = fv_fma(qv, convert ? fv_load(kf + t * D + i) : kv_load(kvt, KROW(j + t), i), acc[t]);
            }
            float sc[PB];
            reduce8(acc, sc);
            for (int t = 0; t < PB; t++) {
                for (int64_t i = Dv; i < D; i++) sc[t] += qg[i] * kv_at(kvt, KROW(j + t), i);
                p[g * n + j + t] = q8 ? sc[t] * ks[j + t] * scale : sc[t] * scale;
            }
        }
    }
    for (; j < n; j++) /* the last n % 8 positions, summed as in a block */
        for (int64_t g = 0; g < G; g++) {
            const float *qg = q + g * D;
            fv acc = fv_zero();
            for (int64_t i = 0; i < Dv; i += FW)
                acc = fv_fma(fv_load(qg + i), kv_load(kvt, KROW(j), i), acc);
            float sc = hsum8(acc);
            for (int64_t i = Dv; i < D; i++) sc += qg[i] * kv_at(kvt, KROW(j), i);
            p[g * n + j] = q8 ? sc * ks[j] * scale : sc * scale;
        }
    float inv[G];
    for (int64_t g = 0; g < G; g++) { /* softmax numerators and 1 / their sum */
        float *pg = p + g * n, mx = -INFINITY;
        int64_t t = 0;
#if FW > 1
        /* the max in 4 chains (a scalar chain was half the softmax at 2k positions); max is
           exact in any order, and a NaN is skipped as below */
        fv m4[4] = {fv_set1(-INFINITY), fv_set1(-INFINITY), fv_set1(-INFINITY), fv_set1(-INFINITY)};
        for (; t + 4 * FW <= n; t += 4 * FW)
            for (int c = 0; c < 4; c++) m4[c] = fv_max(fv_load(pg + t + c * FW), m4[c]);
        float lanes[4 * FW];
        for (int c = 0; c < 4; c++) fv_store(lanes + c * FW, m4[c]);
        for (int c = 0; c < 4 * FW; c++) mx = lanes[c] > mx ? lanes[c] : mx;
#endif
        for (; t < n; t++) mx = pg[t] > mx ? pg[t] : mx;
        fv vsum = fv_zero(), vm = fv_set1(mx);
        t = 0;
        for (; t + FW <= n; t += FW) {
            fv e = fv_exp(fv_sub(fv_load(pg + t), vm));
            fv_store(pg + t, e);
            vsum = fv_add(vsum, e);
        }
        float sum = fv_hsum(vsum);
        for (; t < n; t++) {
            pg[t] = exp1(pg[t] - mx);
            sum += pg[t];
        }
        if (q8)
            for (t = 0; t < n; t++) pg[t] *= vs[t];
        inv[g] = 1.0f / sum;
    }
    /* Values in blocks of VB positions (16 KB of float32 rows at D = 64), each block read from
       memory once and then from L1 by every column slice and head. */
    const int64_t Dw = D / (2 * FW) * (2 * FW), row = D * KV_BYTES(kvt);
    for (int64_t j0 = 0; j0 < n; j0 += VB) {
        const int64_t j1 = MIN(n, j0 + VB);
        for (int64_t t = j1; t < MIN(n, j1 + VB); t++)
            for (int64_t b = 0; b < row; b += 64)
                __builtin_prefetch((const char *)VROW(t) + b, 0, 3);
        for (int64_t i = 0; i < Dw; i += 2 * FW)
            for (int64_t g = 0; g < G; g += AG) {
                const float *pg = p + g * n;
                float *og = o + g * D;
                switch (G - g >= AG ? AG : G - g) {
                case 4: values_pass(kvt, 4, pg, n, V, j0, j1, D, i, inv + g, og); break;
                case 3: values_pass(kvt, 3, pg, n, V, j0, j1, D, i, inv + g, og); break;
                case 2: values_pass(kvt, 2, pg, n, V, j0, j1, D, i, inv + g, og); break;
                default: values_pass(kvt, 1, pg, n, V, j0, j1, D, i, inv + g, og);
                }
            }
    }
    int64_t i = Dw;
    for (; i < D; i++) /* head sizes that are not a multiple of 2 FW */
        for (int64_t g = 0; g < G; g++) {
            float acc = 0.0f;
            for (int64_t t = 0; t < n; t++) acc += p[g * n + t] * kv_at(kvt, VROW(t), i);
            o[g * D + i] = acc * inv[g];
        }
#undef CONVERT_KEYS
#undef KROW
#undef VROW
}

/* ---- a whole decoder layer in one call ------------------------------------------------
 * For decode-sized batches the ~10 calls of a layer each cost a Python round trip, together
 * as much as reading the layer's weights. Here one job of up to 11 phases runs the layer;
 * every step is the same row-wise code the separate kernels run, so results are identical. */

typedef struct {
    const qlm_layer_t *L;
    float *h;
    int64_t M;
    const float *cos, *sin;
    const qlm_segment_t *seg;
    int64_t nseg;
    int kv_type; /* KV_F32, KV_I8 (rows with a scale each) or KV_F16 */
    float *y, *qkv, *att, *o, *gu, *act, *dn, *scratch;
    int8_t *xq;
    float *xd;
    int64_t S, d, HD, F, QN;
    int64_t hc; /* query heads per attention task */
    const float *prev_dn; /* the previous layer's down projection, still to be added to h */
    int fused;            /* attention tasks do their rows' rotary, cache writes and int8 */
} layer_ctx;

static const qlm_segment_t *segment_of(const layer_ctx *c, int64_t m) {
    const qlm_segment_t *s = c->seg;
    while (m >= s->start + s->T) s++;
    return s;
}

static void norm1_task(const void *ctx, int64_t m, int tid) {
    (void)tid;
    const layer_ctx *c = ctx;
    add_rmsnorm_row(c->h + m * c->d, c->prev_dn ? c->prev_dn + m * c->d : 0, c->L->ln1,
                    c->y + m * c->d, c->d, c->L->eps);
    quantize_act_row(c->y, c->xq, c->xd, c->M, c->d, m, needs_act(&c->L->qkv));
}

/* Row m's rotary embedding on query heads h0 .. h0+nh-1 and on KV heads k0 .. k1-1, whose
   keys and values then go to the cache. */
static void rope_kv_heads(const layer_ctx *c, int64_t m, int64_t h0, int64_t nh, int64_t k0,
                          int64_t k1) {
    const qlm_layer_t *L = c->L;
    const int64_t D = L->D, H = L->H, Hkv = L->Hkv;
    float *row = c->qkv + m * c->QN;
    const float *cs = c->cos + m * D, *sn = c->sin + m * D;
    rope_row(row + h0 * D, nh, D, cs, sn);
    rope_row(row + (H + k0) * D, k1 - k0, D, cs, sn);
    const qlm_segment_t *s = segment_of(c, m);
    const int64_t t = m - s->start;
    for (int64_t h = k0; h < k1; h++) {
        const int64_t pos = h * s->cap + s->past + t;
        const float *k = row + (H + h) * D, *v = row + (H + Hkv + h) * D;
        if (c->kv_type == KV_I8) {
            q8_row(k, D, (int8_t *)s->K + pos * D, s->Ks + pos);
            q8_row(v, D, (int8_t *)s->V + pos * D, s->Vs + pos);
        } else if (c->kv_type == KV_F16) {
            f16_row(k, D, (uint16_t *)s->K + pos * D);
            f16_row(v, D, (uint16_t *)s->V + pos * D);
        } else {
            memcpy((float *)s->K + pos * D, k, D * sizeof(float));
            memcpy((float *)s->V + pos * D, v, D * sizeof(float));
        }
    }
}

static void rope_kv_task(const void *ctx, int64_t m, int tid) {
    (void)tid;
    const layer_ctx *c = ctx;
    rope_kv_heads(c, m, 0, c->L->H, 0, c->L->Hkv);
}

/* Task i: row m, KV head kvh, query heads of that KV head hc * part .. (a chunk of hc), over
   the row's sequence positions 0 .. past + t. */
static void attention_task(const void *ctx, int64_t i, int tid) {
    const layer_ctx *c = ctx;
    const qlm_layer_t *L = c->L;
    const int64_t D = L->D, G = L->H / L->Hkv, parts = (G + c->hc - 1) / c->hc;
    const int64_t m = i / (L->Hkv * parts), kvh = i / parts % L->Hkv, part = i % parts;
    const int64_t h0 = kvh * G + part * c->hc, nh = MIN(c->hc, G - part * c->hc);
    const qlm_segment_t *s = segment_of(c, m);
    const int64_t n = s->past + (m - s->start) + 1, off = kvh * s->cap;
    if (c->fused) /* this task alone reads what these heads write (see qlm_layer_forward) */
        rope_kv_heads(c, m, h0, nh, kvh, kvh + 1);
    const float *q = c->qkv + m * c->QN + h0 * D;
    float *p = c->scratch + tid * c->hc * c->S, *o = c->att + m * c->HD + h0 * D;
    const int kvt = c->kv_type, es = KV_BYTES(kvt);
    attend_group(kvt, q, (const char *)s->K + off * D * es, (const char *)s->V + off * D * es,
                 kvt == KV_I8 ? s->Ks + off : 0, kvt == KV_I8 ? s->Vs + off : 0, n, D, nh,
                 L->scale, p, o);
    if (c->fused) { /* the o projection's int8 input: these heads' blocks */
        const int need = needs_act(&L->o);
        if (need & ACT_32)
            quantize_act_blocks(c->att, c->xq, c->xd, c->M, c->HD, m, h0 * D / 32, (h0 + nh) * D / 32);
        if (need & ACT_256)
            quantize_act_super(c->att, c->xq, c->xd, c->M, c->HD, m, h0 * D / 256, (h0 + nh) * D / 256);
    }
}

static void quant_att_task(const void *ctx, int64_t m, int tid) {
    (void)tid;
    const layer_ctx *c = ctx;
    quantize_act_row(c->att, c->xq, c->xd, c->M, c->HD, m, needs_act(&c->L->o));
}

static void norm2_task(const void *ctx, int64_t m, int tid) {
    (void)tid;
    const layer_ctx *c = ctx;
    add_rmsnorm_row(c->h + m * c->d, c->o + m * c->d, c->L->ln2, c->y + m * c->d, c->d, c->L->eps);
    quantize_act_row(c->y, c->xq, c->xd, c->M, c->d, m, needs_act(&c->L->gate_up));
}

static void silu_task(const void *ctx, int64_t m, int tid) {
    (void)tid;
    const layer_ctx *c = ctx;
    silu_mul_row(c->gu + m * 2 * c->F, c->gu + m * 2 * c->F + c->F, c->act + m * c->F, c->F);
    quantize_act_row(c->act, c->xq, c->xd, c->M, c->F, m, needs_act(&c->L->down));
}

/* The model's end, run as the last layer's final phases: the final norm of the rows whose
   logits are wanted (with the last down projection still to add), and the output head. */
typedef struct {
    const float *norm;
    float eps;
    const qlm_linear_t *out;
    const int64_t *rows; /* batch rows, in the order of the logits */
    int64_t nrows;
    float *logits; /* nrows x the head's width */
    int64_t *argmax; /* (or null) each row's first largest logit, as numpy's argmax */
} qlm_head_t;

typedef struct {
    const layer_ctx *c;
    const qlm_head_t *head;
} head_ctx;

/* A row's largest logit so far, in one thread's slot. Greedy decoding wants the index of the
   largest of ~150k logits; scanning them in Python after the step reads them back from
   memory (the head's weights have streamed through the caches since they were written), a
   tenth of a millisecond: each head task folds its own 32 columns in while they are in L1. */
typedef struct {
    float v;
    int64_t i;
} best_t;

#define BEST_PAD 4 /* slots per thread rounded up to a cache line: no sharing between threads */
#define MAX_BEST 1024

/* Whether logit v at column i comes before the best so far (bv at bi): numpy's argmax order,
   a larger value first, a NaN before any number, the lower column among equals. Tasks run
   in any order across threads, so the column decides ties, never the order of the scan. */
static inline int beats(float v, int64_t i, float bv, int64_t bi) {
    if (v != v) return bv == bv || i < bi;
    if (bv != bv) return 0;
    return v > bv || (v == bv && i < bi);
}

static void argmax_fold(const float *y, int64_t n, int64_t col, best_t *b) {
#if defined(__AVX2__)
    if (n > 0 && n % 8 == 0) { /* most chunks lose to the best so far: one vector max tells */
        __m256 mx = _mm256_loadu_ps(y), nan = _mm256_cmp_ps(mx, mx, _CMP_UNORD_Q);
        for (int64_t k = 8; k < n; k += 8) {
            const __m256 v = _mm256_loadu_ps(y + k);
            mx = _mm256_max_ps(mx, v);
            nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
        }
        if (!_mm256_movemask_ps(nan)) {
            __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
            m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
            m4 = _mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1));
            if (_mm_cvtss_f32(m4) < b->v) return;
        }
    }
#endif
    for (int64_t r = 0; r < n; r++)
        if (beats(y[r], col + r, b->v, b->i)) b->v = y[r], b->i = col + r;
}

typedef struct {
    const linear_ctx *lc;
    best_t *best; /* (or null) nthreads x BEST_PAD-rounded rows of slots */
    int64_t stride;
} head_out_ctx;

static void head_out_task(const void *ctx, int64_t i, int tid) {
    const head_out_ctx *h = ctx;
    linear_task(h->lc, i, tid);
    if (!h->best) return;
    int64_t col;
    const qlm_linear_t *P = task_part(h->lc->L, &i, &col);
    const int64_t n0 = col + i * ROWS_PER_TASK, n = MIN(P->N - i * ROWS_PER_TASK, ROWS_PER_TASK);
    for (int64_t m = 0; m < h->lc->M; m++)
        argmax_fold(h->lc->y + m * h->lc->ldy + n0, n, n0, h->best + tid * h->stride + m);
}

static void head_norm_task(const void *ctx, int64_t i, int tid) {
    (void)tid;
    const head_ctx *hc = ctx;
    const layer_ctx *c = hc->c;
    const qlm_head_t *H = hc->head;
    const int64_t r = H->rows[i];
    add_rmsnorm_row(c->h + r * c->d, c->dn + r * c->d, H->norm, c->y + i * c->d, c->d, H->eps);
    quantize_act_row(c->y, c->xq, c->xd, H->nrows, c->d, i, needs_act(H->out));
}

static void residual_task(const void *ctx, int64_t m, int tid) {
    (void)tid;
    const layer_ctx *c = ctx;
    float *h = c->h + m * c->d;
    const float *dn = c->dn + m * c->d;
    for (int64_t i = 0; i < c->d; i++) h[i] += dn[i];
}

/* h: M rows of the residual stream, updated in place. cos, sin: M rows of D. seg: nseg
   segments covering rows 0 .. M-1 in order. work: floats for M * (3 d + QN + 2 H D + 3 F)
   + ACT_FLOATS(M, Kmax) + nthreads * (H / Hkv) * Smax (see fastpath.py); xq: M * Kmax bytes. */
/* add_prev: h still lacks the previous layer's down projection (left in work's dn by the
   same layout), added by this layer's first norm; residual: add this layer's own at the end;
   head (the last layer's, or none): the final norm and output head of some rows instead. */
static void layer_forward(const qlm_layer_t *L, float *h, int64_t M, const float *cos,
                          const float *sin, const qlm_segment_t *seg, int64_t nseg, int kv_type,
                          float *work, int8_t *xq, int nthreads, int add_prev, int residual,
                          const qlm_head_t *head) {
    const int64_t d = L->o.N, HD = L->H * L->D, F = L->down.K, QN = linear_width(&L->qkv);
    int64_t kmax = d > F ? d : F;
    kmax = kmax > HD ? kmax : HD;
    int64_t S = 0;
    for (int64_t i = 0; i < nseg; i++) S = S > seg[i].past + seg[i].T ? S : seg[i].past + seg[i].T;
    layer_ctx c = {.L = L, .h = h, .M = M, .cos = cos, .sin = sin, .seg = seg, .nseg = nseg};
    c.kv_type = kv_type;
    c.y = work;
    c.qkv = c.y + M * d;
    c.att = c.qkv + M * QN;
    c.o = c.att + M * HD;
    c.gu = c.o + M * d;
    c.act = c.gu + M * 2 * F;
    c.dn = c.act + M * F;
    c.xd = c.dn + M * d;
    c.scratch = c.xd + ACT_FLOATS(M, kmax);
    c.xq = xq;
    c.S = S, c.d = d, c.HD = HD, c.F = F, c.QN = QN;
    /* A KV head's query heads in one task (they share its reads), unless that leaves threads
       idle: then split them, so a 1-row step still keeps every thread busy. */
    const int64_t G = L->H / L->Hkv, tasks = M * L->Hkv;
    const int64_t split = tasks >= nthreads ? 1 : MIN(G, (nthreads + tasks - 1) / tasks);
    c.hc = (G + split - 1) / split;
    c.prev_dn = add_prev ? c.dn : 0;
    /* Fewer phases, fewer waits (each costs ~20 us on 2 threads, ~1 ms a 0.5B step for three
       of them): a task that holds all of a KV head's query heads can do their rotary, write
       that head's keys and values and quantize its output blocks itself, provided no other
       task reads what it writes, i.e. one row per sequence (decode, not verification). */
    int one_row = 1;
    for (int64_t i = 0; i < nseg; i++) one_row &= seg[i].T == 1;
    /* (the o projection's int8 input is quantized by heads, in blocks that must not straddle
       two tasks: D a multiple of 32, G D of 256 for the K-quants' blocks) */
    const int need_o = needs_act(&L->o);
    c.fused = one_row && c.hc == G && (!(need_o & ACT_32) || L->D % 32 == 0) &&
              (!(need_o & ACT_256) || G * L->D % 256 == 0);
    const linear_ctx lqkv = {&L->qkv, c.y, act_view(xq, c.xd, M, d), c.qkv, M, QN};
    const linear_ctx lo = {&L->o, c.att, act_view(xq, c.xd, M, HD), c.o, M, d};
    const linear_ctx lgu = {&L->gate_up, c.y, act_view(xq, c.xd, M, d), c.gu, M, 2 * F};
    const linear_ctx ldn = {&L->down, c.act, act_view(xq, c.xd, M, F), c.dn, M, d};
    const head_ctx hn = {&c, head};
    linear_ctx lhead = {0};
    head_out_ctx hout = {&lhead, 0, 0};
    if (head)
        lhead = (linear_ctx){head->out, c.y, act_view(xq, c.xd, head->nrows, d), head->logits,
                             head->nrows, linear_width(head->out)};
    /* The rows' largest logits, a slot per thread and row (numpy's argmax after the call). */
    const int64_t stride = head ? pieces(head->nrows, BEST_PAD) * BEST_PAD : 0;
    const int nt = nthreads < 1 ? 1 : nthreads;
    best_t best[MAX_BEST];
    if (head && head->argmax && nt * stride <= MAX_BEST) {
        for (int64_t k = 0; k < nt * stride; k++) best[k] = (best_t){-INFINITY, INT64_MAX};
        hout.best = best, hout.stride = stride;
    }
    const qlm_phase_t ph[] = {
        {norm1_task, &c, M},
        {linear_task, &lqkv, linear_tasks(&L->qkv)},
        {rope_kv_task, &c, c.fused ? 0 : M},
        {attention_task, &c, M * L->Hkv * ((G + c.hc - 1) / c.hc)},
        {quant_att_task, &c, needs_act(&L->o) && !c.fused ? M : 0},
        {linear_task, &lo, linear_tasks(&L->o)},
        {norm2_task, &c, M},
        {linear_task, &lgu, linear_tasks(&L->gate_up)},
        {silu_task, &c, M},
        {linear_task, &ldn, linear_tasks(&L->down)},
        {residual_task, &c, residual ? M : 0},
        {head_norm_task, &hn, head ? head->nrows : 0},
        {head_out_task, &hout, head ? linear_tasks(head->out) : 0},
    };
    run_phases(ph, sizeof ph / sizeof ph[0], nthreads);
    for (int64_t m = 0; head && head->argmax && m < head->nrows; m++) {
        best_t b = {-INFINITY, INT64_MAX};
        for (int t = 0; hout.best && t < nt; t++) {
            const best_t *o = hout.best + t * stride + m;
            if (beats(o->v, o->i, b.v, b.i)) b = *o;
        }
        head->argmax[m] = b.i == INT64_MAX ? -1 : b.i; /* -1: not computed */
    }
}

void qlm_layer_forward(const qlm_layer_t *L, float *h, int64_t M, const float *cos,
                       const float *sin, const qlm_segment_t *seg, int64_t nseg, int kv_type,
                       float *work, int8_t *xq, int nthreads) {
    layer_forward(L, h, M, cos, sin, seg, nseg, kv_type, work, xq, nthreads, 0, 1, 0);
}

#define MAX_SEGMENTS 64

/* Every decoder layer of a step in one call: segment j's rows and cache state are seg[j], its
   caches of layer l those of kv[j][l] (only K, V, Ks, Vs are read). Saves the caller a round
   trip per layer. With an output head (out not null), the call ends with the final norm
   (weights norm) and the head's logits of batch rows rows[0 .. nrows-1]; h is then left
   unfinished. argmax (or null): each of those rows' greedy token, -1 where not computed. */
void qlm_stack_forward(const qlm_layer_t *const *layers, int64_t nlayers, float *h, int64_t M,
                       const float *cos, const float *sin, const qlm_segment_t *seg,
                       const qlm_segment_t *const *kv, int64_t nseg, int kv_type, float *work,
                       int8_t *xq, int nthreads, const float *norm, float eps,
                       const qlm_linear_t *out, const int64_t *rows, int64_t nrows,
                       float *logits, int64_t *argmax) {
    if (nseg > MAX_SEGMENTS) return; /* the caller holds batches to SMALL_BATCH rows */
    const qlm_head_t head = {norm, eps, out, rows, nrows, logits, argmax};
    qlm_segment_t local[MAX_SEGMENTS];
    memcpy(local, seg, (size_t)nseg * sizeof *seg);
    /* Each layer's residual add is left to the next layer's first norm (one phase less). */
    for (int64_t l = 0; l < nlayers; l++) {
        for (int64_t j = 0; j < nseg; j++) {
            const qlm_segment_t *p = kv[j] + l;
            local[j].K = p->K, local[j].V = p->V, local[j].Ks = p->Ks, local[j].Vs = p->Vs;
        }
        const int last = l == nlayers - 1;
        layer_forward(layers[l], h, M, cos, sin, local, nseg, kv_type, work, xq, nthreads, l > 0,
                      last && !out, last && out ? &head : 0);
    }
}
