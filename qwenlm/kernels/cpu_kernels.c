/* CPU kernels for qwenlm's decode path: small-batch matrix products over quantized weights.
 *
 * y[m, n] = sum_k x[m, k] * W[n, k] (+ bias[n]) for M rows of activations (M small: one token
 * per sequence while decoding, a few when verifying speculative drafts). Decoding is bound by
 * the bytes of W read per token, so the kernels read W once per call in its stored form
 * (float32, int8 per output channel, or 4-bit groups) and convert in registers.
 *
 * Every output element is computed by the same instruction sequence whatever M, N or the
 * thread count are, so a row's result does not depend on how many rows were batched with it:
 * speculative decoding and batched decoding reproduce plain greedy decoding exactly.
 *
 * Built at first use with the machine's C compiler (-O3 -march=native -fopenmp) and loaded
 * with ctypes; Python falls back to PyTorch ops where it cannot be built.
 */
#include <stdint.h>
#include <string.h>
#include <immintrin.h>
#include <math.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define NR 4 /* output rows computed together: each x load feeds NR FMAs */

static inline float half_to_float(uint16_t h) { return _cvtsh_ss(h); }

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

static void linear_f32_body(const float *x, const float *w, const float *bias, float *y,
                            int64_t M, int64_t N, int64_t K) {
    int64_t blocks = (N + NR - 1) / NR;
#pragma omp for schedule(static)
    for (int64_t b = 0; b < blocks; b++) {
        const float *rows[NR];
        int64_t n0 = b * NR;
        for (int r = 0; r < NR; r++) rows[r] = w + (n0 + r < N ? n0 + r : N - 1) * K;
        for (int64_t m = 0; m < M; m++) {
            float out[NR];
            dot4_f32(x + m * K, rows, K, out);
            for (int r = 0; r < NR && n0 + r < N; r++)
                y[m * N + n0 + r] = out[r] + (bias ? bias[n0 + r] : 0.0f);
        }
    }
}

void qlm_linear_f32(const float *x, const float *w, const float *bias, float *y, int64_t M,
                    int64_t N, int64_t K, int nthreads) {
#pragma omp parallel num_threads(nthreads)
    linear_f32_body(x, w, bias, y, M, N, K);
}

/* ---- activations quantized to int8 in blocks of 32 ---------------------------------------
 * The integer kernels multiply int8 (or 4-bit) weights by int8 activations with integer
 * multiply-adds, four times denser than converting weights to float. Each block of 32
 * activations gets its own scale (as GGUF's Q8_0 does), which keeps the error far below the
 * weights' own quantization error. xsum holds each block's float sum, for 4-bit minimums.   */

static void quantize_row_q8(const float *x, int64_t K, int8_t *q, float *d, float *xsum) {
    for (int64_t b = 0; b < K / 32; b++) {
        const float *xb = x + b * 32;
        float amax = 0.0f, sum = 0.0f;
        for (int j = 0; j < 32; j++) {
            float a = xb[j] < 0 ? -xb[j] : xb[j];
            amax = a > amax ? a : amax;
            sum += xb[j];
        }
        float scale = amax / 127.0f, inv = amax > 0 ? 127.0f / amax : 0.0f;
        for (int j = 0; j < 32; j++) {
            float v = xb[j] * inv;
            q[b * 32 + j] = (int8_t)(v < 0 ? v - 0.5f : v + 0.5f);  /* round half away from 0 */
        }
        d[b] = scale;
        xsum[b] = sum;
    }
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

/* Tiled int8 layout: a tile of NR rows stores their first 64 weights one row after another,
 * then their next 64, and so on, so a tile is one contiguous stream of NR * K bytes. Rows of
 * K = 896 bytes (the 0.5B model) are too short for the hardware prefetcher to pick up as NR
 * separate streams; one stream plus a software prefetch PF bytes ahead reads memory about
 * 1.7x faster here. */
#define PF_BYTES 3072

static void dot4_i8(const int8_t *xq, const float *xd, const int8_t *const w[NR], int64_t K,
                    int tiled, float out[NR]) {
    /* Row r's weights k..k+63 start at W(r, k): w[r] + k, or tiled w[r] + k * NR with
       w[r] = tile + 64 r. */
    const int64_t step = tiled ? NR : 1;
#define W(r, k) (w[r] + (k) * step)
    float s[NR] = {0};
#if defined(__AVX512BW__)
    __m512 a[NR];
    for (int r = 0; r < NR; r++) a[r] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 64) {
        __m512i xv = _mm512_loadu_si512(xq + k);
        __m512i ax = _mm512_abs_epi8(xv);
        __mmask64 neg = _mm512_movepi8_mask(xv);
        __m512 d = halves(xd[k / 32], xd[k / 32 + 1]);
        for (int r = 0; r < NR; r++) {
            if (tiled) _mm_prefetch((const char *)W(r, k) + PF_BYTES, _MM_HINT_T0);
            __m512i wv = _mm512_loadu_si512(W(r, k));
            /* |x| * (w * sign(x)) keeps the unsigned operand unsigned; no 16-bit overflow
               since |w|, |x| <= 127. */
            __m512i sw = _mm512_mask_sub_epi8(wv, neg, _mm512_setzero_si512(), wv);
            a[r] = _mm512_fmadd_ps(sum_i8_pairs(ax, sw), d, a[r]);
        }
    }
    for (int r = 0; r < NR; r++) s[r] = _mm512_reduce_add_ps(a[r]);
#elif defined(__AVX2__) && defined(__FMA__)
    __m256 a[NR];
    for (int r = 0; r < NR; r++) a[r] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k += 32) {
        __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + k));
        __m256i ax = _mm256_sign_epi8(xv, xv);
        __m256 d = _mm256_set1_ps(xd[k / 32]);
        int64_t k64 = k & ~(int64_t)63, off = k & 63;
        for (int r = 0; r < NR; r++) {
            const int8_t *p = W(r, k64) + off;
            if (tiled && !off) _mm_prefetch((const char *)p + PF_BYTES, _MM_HINT_T0);
            __m256i wv = _mm256_loadu_si256((const __m256i *)p);
            a[r] = _mm256_fmadd_ps(sum_i8_pairs(ax, _mm256_sign_epi8(wv, xv)), d, a[r]);
        }
    }
    for (int r = 0; r < NR; r++) s[r] = hsum256(a[r]);
#else
    for (int r = 0; r < NR; r++)
        for (int64_t b = 0; b < K / 32; b++) {
            int32_t t = 0;
            const int8_t *p = W(r, b / 2 * 64) + (b % 2) * 32;
            for (int j = 0; j < 32; j++) t += (int32_t)xq[b * 32 + j] * (int32_t)p[j];
            s[r] += (float)t * xd[b];
        }
#endif
#undef W
    for (int r = 0; r < NR; r++) out[r] = s[r];
}

static void linear_i8_body(const float *x, const int8_t *w, int tiled, const float *scale,
                           const float *bias, float *y, int64_t M, int64_t N, int64_t K,
                           int8_t *xq, float *xd) {
#pragma omp single
    for (int64_t m = 0; m < M; m++)
        quantize_row_q8(x + m * K, K, xq + m * K, xd + m * (K / 32), xd + (M + m) * (K / 32));
    /* tiled needs N % NR == 0: the caller tiles only such matrices */
    int64_t blocks = (N + NR - 1) / NR;
#pragma omp for schedule(static)
    for (int64_t b = 0; b < blocks; b++) {
        const int8_t *rows[NR];
        int64_t n0 = b * NR;
        for (int r = 0; r < NR; r++)
            rows[r] = tiled ? w + n0 * K + r * 64 : w + (n0 + r < N ? n0 + r : N - 1) * K;
        for (int64_t m = 0; m < M; m++) {
            float out[NR];
            dot4_i8(xq + m * K, xd + m * (K / 32), rows, K, tiled, out);
            for (int r = 0; r < NR && n0 + r < N; r++)
                y[m * N + n0 + r] = out[r] * scale[n0 + r] + (bias ? bias[n0 + r] : 0.0f);
        }
    }
}

void qlm_linear_i8(const float *x, const int8_t *w, int tiled, const float *scale,
                   const float *bias, float *y, int64_t M, int64_t N, int64_t K, int8_t *xq,
                   float *xd, int nthreads) {
    /* K must be a multiple of 64. xq (M*K bytes) and xd (2*M*K/32 floats) are caller scratch. */
#pragma omp parallel num_threads(nthreads)
    linear_i8_body(x, w, tiled, scale, bias, y, M, N, K, xq, xd);
}

void qlm_dequant_i8(const int8_t *w, int tiled, const float *scale, float *out, int64_t N,
                    int64_t K, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        float s = scale[n], *o = out + n * K;
        if (tiled) {
            const int8_t *q = w + (n / NR) * NR * K + (n % NR) * 64;
            for (int64_t k = 0; k < K; k += 64)
                for (int j = 0; j < 64; j++) o[k + j] = (float)q[k * NR + j] * s;
        } else {
            const int8_t *q = w + n * K;
            for (int64_t k = 0; k < K; k++) o[k] = (float)q[k] * s;
        }
    }
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

static void linear_i4_body(const float *x, const uint8_t *w, const uint16_t *scale,
                           const uint16_t *minv, const float *bias, float *y, int64_t M,
                           int64_t N, int64_t K, int64_t G, int8_t *xq, float *xd) {
    /* K a multiple of 64 and of G. Scratch: xq (M*K bytes), xd (2*M*K/32 floats). */
    int64_t blocks32 = K / 32, groups = K / G, per = G / 32;
#pragma omp single
    for (int64_t m = 0; m < M; m++) {
        float *xs = xd + (M + m) * blocks32;
        quantize_row_q8(x + m * K, K, xq + m * K, xd + m * blocks32, xs);
        for (int64_t g = 0; g < groups; g++) { /* block sums -> group sums, in place */
            float t = 0.0f;
            for (int64_t j = 0; j < per; j++) t += xs[g * per + j];
            xs[g] = t;
        }
    }
    int64_t blocks = (N + NR - 1) / NR;
#pragma omp for schedule(static)
    for (int64_t b = 0; b < blocks; b++) {
        const uint8_t *rows[NR];
        const uint16_t *sc[NR], *mn[NR];
        int64_t n0 = b * NR;
        for (int r = 0; r < NR; r++) {
            int64_t n = n0 + r < N ? n0 + r : N - 1;
            rows[r] = w + n * (K / 2);
            sc[r] = scale + n * groups;
            mn[r] = minv + n * groups;
        }
        for (int64_t m = 0; m < M; m++) {
            float out[NR];
            dot4_i4(xq + m * K, xd + m * blocks32, xd + (M + m) * blocks32, rows, sc, mn, K, G, out);
            for (int r = 0; r < NR && n0 + r < N; r++)
                y[m * N + n0 + r] = out[r] + (bias ? bias[n0 + r] : 0.0f);
        }
    }
}

void qlm_linear_i4(const float *x, const uint8_t *w, const uint16_t *scale, const uint16_t *minv,
                   const float *bias, float *y, int64_t M, int64_t N, int64_t K, int64_t G,
                   int8_t *xq, float *xd, int nthreads) {
#pragma omp parallel num_threads(nthreads)
    linear_i4_body(x, w, scale, minv, bias, y, M, N, K, G, xq, xd);
}

void qlm_dequant_i4(const uint8_t *w, const uint16_t *scale, const uint16_t *minv, float *out,
                    int64_t N, int64_t K, int64_t G, int nthreads) {
    int64_t groups = K / G;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *q = w + n * (K / 2);
        const uint16_t *sc = scale + n * groups, *mn = minv + n * groups;
        float *o = out + n * K;
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
}

/* ---- the rest of a decode step: norms, rotary embedding, attention, SwiGLU ------------
 * These replace dozens of small PyTorch ops per layer whose dispatch cost, not arithmetic,
 * dominates a one-token step. They work row by row, so a row's result never depends on the
 * batch it came in.                                                                        */

#if defined(__AVX512F__)
static inline __m512 exp512(__m512 x) {
    /* e^x = 2^n * e^r with r = x - n ln2 in [-ln2/2, ln2/2]; degree-6 polynomial, ~1 ulp */
    x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.3762626647949f)), _mm512_set1_ps(-103.972077083992f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500E-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507E-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073E-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894E-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459E-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201E-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}
#endif

static inline float exp1(float x) {
#if defined(__AVX512F__)
    return _mm512_cvtss_f32(exp512(_mm512_set1_ps(x)));
#else
    return expf(x);
#endif
}

/* x += delta (if given), then y = x / rms(x) * w, per row of D. */
void qlm_add_rmsnorm(float *x, const float *delta, const float *w, float *y, int64_t M, int64_t D,
                     float eps) {
    for (int64_t m = 0; m < M; m++) {
        float *xr = x + m * D, *yr = y + m * D;
        const float *dr = delta ? delta + m * D : 0;
        int64_t k = 0;
#if defined(__AVX512F__)
        __m512 acc = _mm512_setzero_ps();
        for (; k + 16 <= D; k += 16) {
            __m512 v = _mm512_loadu_ps(xr + k);
            if (dr) { v = _mm512_add_ps(v, _mm512_loadu_ps(dr + k)); _mm512_storeu_ps(xr + k, v); }
            acc = _mm512_fmadd_ps(v, v, acc);
        }
        float ss = _mm512_reduce_add_ps(acc);
#else
        float ss = 0.0f;
#endif
        for (; k < D; k++) {
            if (dr) xr[k] += dr[k];
            ss += xr[k] * xr[k];
        }
        float inv = 1.0f / sqrtf(ss / (float)D + eps);
        for (k = 0; k < D; k++) yr[k] = w[k] * (xr[k] * inv);
    }
}

/* Rotary embedding in place on the first `heads` heads of each row (half-split layout).
   cos/sin: one row of D values per token (the model's own tables). */
void qlm_rope(float *x, int64_t M, int64_t row_stride, int64_t heads, int64_t D, const float *cos,
              const float *sin) {
    int64_t half = D / 2;
    for (int64_t m = 0; m < M; m++)
        for (int64_t h = 0; h < heads; h++) {
            float *v = x + m * row_stride + h * D;
            const float *c = cos + m * D, *s = sin + m * D;
            for (int64_t i = 0; i < half; i++) {
                float a = v[i], b = v[i + half];
                v[i] = a * c[i] - b * s[i];
                v[i + half] = b * c[i + half] + a * s[i + half];
            }
        }
}

/* Attention for T new rows of one sequence. qkv: T rows of (H + 2 Hkv) * D (q, k, v, rotary
   applied). Row t's k and v are stored at position past + t of K, V ([Hkv][cap][D]); then row
   t attends over positions 0 .. past + t. out: T rows of H * D. scratch: nthreads * (past+T). */
static void attend_rows_body(const float *qkv, int64_t T, int64_t H, int64_t Hkv, int64_t D,
                             float *K, float *V, int64_t cap, int64_t past, float scale,
                             float *out, float *scratch) {
    int64_t stride = (H + 2 * Hkv) * D, group = H / Hkv;
#pragma omp single
    for (int64_t t = 0; t < T; t++)
        for (int64_t h = 0; h < Hkv; h++) {
            memcpy(K + (h * cap + past + t) * D, qkv + t * stride + (H + h) * D, D * sizeof(float));
            memcpy(V + (h * cap + past + t) * D, qkv + t * stride + (H + Hkv + h) * D, D * sizeof(float));
        }
    int64_t S = past + T;
#pragma omp for schedule(static) collapse(2)
    for (int64_t t = 0; t < T; t++)
        for (int64_t h = 0; h < H; h++) {
            int tid = 0;
#ifdef _OPENMP
            tid = omp_get_thread_num();
#endif
            float *p = scratch + tid * S;
            const float *q = qkv + t * stride + h * D;
            const float *Kh = K + (h / group) * cap * D, *Vh = V + (h / group) * cap * D;
            int64_t n = past + t + 1;
            float mx = -INFINITY;
            for (int64_t j = 0; j < n; j++) {
                const float *kj = Kh + j * D;
                float d = 0.0f;
                int64_t i = 0;
#if defined(__AVX512F__)
                __m512 acc = _mm512_setzero_ps();
                for (; i + 16 <= D; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + i), _mm512_loadu_ps(kj + i), acc);
                d = _mm512_reduce_add_ps(acc);
#endif
                for (; i < D; i++) d += q[i] * kj[i];
                p[j] = d * scale;
                mx = p[j] > mx ? p[j] : mx;
            }
            float sum = 0.0f;
            int64_t j = 0;
#if defined(__AVX512F__)
            __m512 vs = _mm512_setzero_ps(), vm = _mm512_set1_ps(mx);
            for (; j + 16 <= n; j += 16) {
                __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(p + j), vm));
                _mm512_storeu_ps(p + j, e);
                vs = _mm512_add_ps(vs, e);
            }
            sum = _mm512_reduce_add_ps(vs);
#endif
            for (; j < n; j++) { p[j] = exp1(p[j] - mx); sum += p[j]; }
            float inv = 1.0f / sum;
            float *o = out + t * H * D + h * D;
            int64_t i = 0;
#if defined(__AVX512F__)
            for (; i + 16 <= D; i += 16) {
                __m512 acc = _mm512_setzero_ps();
                for (int64_t jj = 0; jj < n; jj++) acc = _mm512_fmadd_ps(_mm512_set1_ps(p[jj]), _mm512_loadu_ps(Vh + jj * D + i), acc);
                _mm512_storeu_ps(o + i, _mm512_mul_ps(acc, _mm512_set1_ps(inv)));
            }
#endif
            for (; i < D; i++) {
                float acc = 0.0f;
                for (int64_t jj = 0; jj < n; jj++) acc += p[jj] * Vh[jj * D + i];
                o[i] = acc * inv;
            }
        }
}

void qlm_attend_rows(const float *qkv, int64_t T, int64_t H, int64_t Hkv, int64_t D, float *K,
                     float *V, int64_t cap, int64_t past, float scale, float *out, float *scratch,
                     int nthreads) {
#pragma omp parallel num_threads(nthreads)
    attend_rows_body(qkv, T, H, Hkv, D, K, V, cap, past, scale, out, scratch);
}

/* SwiGLU: out[m, i] = silu(gu[m, i]) * gu[m, F + i] for the fused gate/up projection. */
void qlm_silu_mul(const float *gu, float *out, int64_t M, int64_t F) {
    for (int64_t m = 0; m < M; m++) {
        const float *g = gu + m * 2 * F, *u = g + F;
        float *o = out + m * F;
        int64_t i = 0;
#if defined(__AVX512F__)
        for (; i + 16 <= F; i += 16) {
            __m512 x = _mm512_loadu_ps(g + i);
            __m512 e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), x));
            __m512 s = _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.0f), e));
            _mm512_storeu_ps(o + i, _mm512_mul_ps(s, _mm512_loadu_ps(u + i)));
        }
#endif
        for (; i < F; i++) o[i] = g[i] / (1.0f + exp1(-g[i])) * u[i];
    }
}

/* The same attention over an int8 KV cache: each stored key and value row (one head, one
   position) is D int8 codes and a float scale, a quarter of the memory of float32. New rows
   are quantized as they are written. Ks, Vs: [Hkv][cap] scales.                             */
static void q8_row(const float *x, int64_t D, int8_t *q, float *scale) {
    float amax = 0.0f;
    for (int64_t i = 0; i < D; i++) amax = fabsf(x[i]) > amax ? fabsf(x[i]) : amax;
    float inv = amax > 0 ? 127.0f / amax : 0.0f;
    for (int64_t i = 0; i < D; i++) q[i] = (int8_t)lrintf(x[i] * inv);
    *scale = amax / 127.0f;
}

static void attend_rows_q8_body(const float *qkv, int64_t T, int64_t H, int64_t Hkv, int64_t D,
                                int8_t *K, int8_t *V, float *Ks, float *Vs, int64_t cap,
                                int64_t past, float scale, float *out, float *scratch) {
    int64_t stride = (H + 2 * Hkv) * D, group = H / Hkv;
#pragma omp single
    for (int64_t t = 0; t < T; t++)
        for (int64_t h = 0; h < Hkv; h++) {
            int64_t pos = h * cap + past + t;
            q8_row(qkv + t * stride + (H + h) * D, D, K + pos * D, Ks + pos);
            q8_row(qkv + t * stride + (H + Hkv + h) * D, D, V + pos * D, Vs + pos);
        }
    int64_t S = past + T;
#pragma omp for schedule(static) collapse(2)
    for (int64_t t = 0; t < T; t++)
        for (int64_t h = 0; h < H; h++) {
            int tid = 0;
#ifdef _OPENMP
            tid = omp_get_thread_num();
#endif
            float *p = scratch + tid * S;
            const float *q = qkv + t * stride + h * D;
            int64_t kvh = h / group;
            const int8_t *Kh = K + kvh * cap * D, *Vh = V + kvh * cap * D;
            const float *ksh = Ks + kvh * cap, *vsh = Vs + kvh * cap;
            int64_t n = past + t + 1;
            float mx = -INFINITY;
            for (int64_t j = 0; j < n; j++) {
                const int8_t *kj = Kh + j * D;
                float d = 0.0f;
                int64_t i = 0;
#if defined(__AVX512F__)
                __m512 acc = _mm512_setzero_ps();
                for (; i + 16 <= D; i += 16) {
                    __m512 kv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(kj + i))));
                    acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + i), kv, acc);
                }
                d = _mm512_reduce_add_ps(acc);
#endif
                for (; i < D; i++) d += q[i] * (float)kj[i];
                p[j] = d * ksh[j] * scale;
                mx = p[j] > mx ? p[j] : mx;
            }
            float sum = 0.0f;
            for (int64_t j = 0; j < n; j++) { p[j] = exp1(p[j] - mx); sum += p[j]; }
            float inv = 1.0f / sum;
            float *o = out + t * H * D + h * D;
            int64_t i = 0;
#if defined(__AVX512F__)
            for (; i + 16 <= D; i += 16) {
                __m512 acc = _mm512_setzero_ps();
                for (int64_t jj = 0; jj < n; jj++) {
                    __m512 vv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(Vh + jj * D + i))));
                    acc = _mm512_fmadd_ps(_mm512_set1_ps(p[jj] * vsh[jj]), vv, acc);
                }
                _mm512_storeu_ps(o + i, _mm512_mul_ps(acc, _mm512_set1_ps(inv)));
            }
#endif
            for (; i < D; i++) {
                float acc = 0.0f;
                for (int64_t jj = 0; jj < n; jj++) acc += p[jj] * vsh[jj] * (float)Vh[jj * D + i];
                o[i] = acc * inv;
            }
        }
}

void qlm_attend_rows_q8(const float *qkv, int64_t T, int64_t H, int64_t Hkv, int64_t D, int8_t *K,
                        int8_t *V, float *Ks, float *Vs, int64_t cap, int64_t past, float scale,
                        float *out, float *scratch, int nthreads) {
#pragma omp parallel num_threads(nthreads)
    attend_rows_q8_body(qkv, T, H, Hkv, D, K, V, Ks, Vs, cap, past, scale, out, scratch);
}

/* ---- a whole decoder layer in one call ------------------------------------------------
 * For decode-sized batches the ~10 calls of a layer each cost a Python round trip and an
 * OpenMP fork/join, together as much as reading the layer's weights. Here one parallel
 * region runs the layer: the serial steps (norms, rotary, cache writes) on one thread, the
 * matrix products and attention heads split across threads, with a barrier between steps.
 * Every step is the same code the separate kernels run, so results are identical.          */

typedef struct {
    int64_t kind; /* 0 float32, 1 int8 (row-major), 2 int8 tiled, 3 4-bit groups */
    const void *w;
    const void *scale; /* int8: float per row; 4-bit: half per group */
    const void *mins;  /* 4-bit: half per group */
    const float *bias;
    int64_t N, K, G;
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

static void linear_body(const qlm_linear_t *L, const float *x, float *y, int64_t M, int8_t *xq,
                        float *xd) {
    switch (L->kind) {
    case 0: linear_f32_body(x, L->w, L->bias, y, M, L->N, L->K); break;
    case 1:
    case 2: linear_i8_body(x, L->w, L->kind == 2, L->scale, L->bias, y, M, L->N, L->K, xq, xd); break;
    default: linear_i4_body(x, L->w, L->scale, L->mins, L->bias, y, M, L->N, L->K, L->G, xq, xd);
    }
}

/* h: M rows of the residual stream, updated in place. cos, sin: M rows of D. work: floats for
   M * (3 d + qkv.N + 2 H D + 3 F) + 2 M Kmax / 32 + nthreads * Smax (see fastpath.py);
   xq: M * Kmax bytes. */
void qlm_layer_forward(const qlm_layer_t *L, float *h, int64_t M, const float *cos,
                       const float *sin, const qlm_segment_t *seg, int64_t nseg, int kv_q8,
                       float *work, int8_t *xq, int nthreads) {
    const int64_t d = L->o.N, HD = L->H * L->D, F = L->down.K, QN = L->qkv.N;
    const int64_t stride = (L->H + 2 * L->Hkv) * L->D;
    int64_t kmax = d > F ? d : F;
    kmax = kmax > HD ? kmax : HD;
    float *y = work, *qkv = y + M * d, *att = qkv + M * QN, *o = att + M * HD;
    float *gu = o + M * d, *act = gu + M * 2 * F, *dn = act + M * F, *xd = dn + M * d;
    float *scratch = xd + 2 * M * (kmax / 32);
#pragma omp parallel num_threads(nthreads)
    {
#pragma omp single
        qlm_add_rmsnorm(h, 0, L->ln1, y, M, d, L->eps);
        linear_body(&L->qkv, y, qkv, M, xq, xd);
#pragma omp single
        {
            qlm_rope(qkv, M, stride, L->H, L->D, cos, sin);
            qlm_rope(qkv + HD, M, stride, L->Hkv, L->D, cos, sin);
        }
        for (int64_t i = 0; i < nseg; i++) {
            const qlm_segment_t *s = seg + i;
            if (kv_q8)
                attend_rows_q8_body(qkv + s->start * stride, s->T, L->H, L->Hkv, L->D, s->K, s->V,
                                    s->Ks, s->Vs, s->cap, s->past, L->scale, att + s->start * HD,
                                    scratch);
            else
                attend_rows_body(qkv + s->start * stride, s->T, L->H, L->Hkv, L->D, s->K, s->V,
                                 s->cap, s->past, L->scale, att + s->start * HD, scratch);
        }
        linear_body(&L->o, att, o, M, xq, xd);
#pragma omp single
        qlm_add_rmsnorm(h, o, L->ln2, y, M, d, L->eps);
        linear_body(&L->gate_up, y, gu, M, xq, xd);
#pragma omp single
        qlm_silu_mul(gu, act, M, F);
        linear_body(&L->down, act, dn, M, xq, xd);
#pragma omp single
        for (int64_t i = 0; i < M * d; i++) h[i] += dn[i];
    }
}
