/* One GGUF group kernel alone, one thread, no thread pool or activation quantization around it:
 * the instruction-level cost of the multi-row passes (benchmarks/kernel_ab.py times the whole
 * library call on two threads, where the pool, the quantization and a noisy host blur a 20%
 * change). Weights are random bytes in a matrix small enough for L2; the minimum of 200 calls.
 *
 *   V512="-mavx2 -mfma -mf16c -mbmi2 -mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx512vnni"
 *   gcc -O3 -std=gnu11 $V512 -Iqwenlm/kernels benchmarks/group_kernel.c -o /tmp/gk -lm -pthread
 *   /tmp/gk Q5_0 1 4 8          # kind, then row counts
 *
 * Compare two versions by building each (-I pointing at a folder holding its cpu_kernels.c,
 * e.g. one written by `git show REV:qwenlm/kernels/cpu_kernels.c`) and running both in turn.
 * The flags choose the level: those of qwenlm.kernels' _ISA table (the line above is
 * avx512vnni), which the library is built with (no -march=native: its tuning moves the times).
 */
#include "cpu_kernels.c"
#include <stdlib.h>

static double seconds(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

int main(int argc, char **argv) {
    int kind = -1;
    for (int k = 0; argc > 1 && k < QLM_KINDS; k++)
        if (!strcmp(argv[1], KIND_NAMES[k]) && GROUP_KERNELS[k]) kind = k;
    if (kind < 0) {
        fprintf(stderr, "usage: %s KIND ROWS...  (KIND: I8_TILED Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 Q4_K Q5_K Q6_K)\n",
                argv[0]);
        return 2;
    }
    const int64_t N = 512, K = 4096, nb = K / BLOCK_ELEMS(kind), stride = nb * GROUP_REC[kind];
    uint8_t *w = aligned_alloc(64, (N / GG) * stride);
    for (int64_t i = 0; i < (N / GG) * stride; i++) w[i] = (uint8_t)rand();
    qlm_linear_t L = {0};
    L.kind = kind, L.w = w, L.N = N, L.K = K;
#ifdef QLM_VNNI
    const char *vnni = " + VNNI";
#else
    const char *vnni = "";
#endif
    printf("%s, %s%s, %ld x %ld, one thread\n", KIND_NAMES[kind], QLM_ISA, vnni, (long)N, (long)K);
    for (int i = 2; i < argc; i++) {
        const int64_t M = atoi(argv[i]);
        if (M < 1) continue;
        float *x = malloc(M * K * sizeof(float)), *y = malloc(M * N * sizeof(float));
        for (int64_t j = 0; j < M * K; j++) x[j] = (float)(rand() % 200 - 100) / 50.0f;
        int8_t *xq = aligned_alloc(64, M * K + 64);
        float *xd = aligned_alloc(64, ACT_FLOATS(M, K) * sizeof(float) + 64);
        for (int64_t m = 0; m < M; m++) quantize_act_row(x, xq, xd, M, K, m, ACT_32 | ACT_256);
        const qlm_act_t a = act_view(xq, xd, M, K);
        double best = 1e9;
        for (int r = 0; r < 200; r++) {
            const double t = seconds();
            GROUP_KERNELS[kind](&L, &a, y, N, M, 0, N / GG);
            const double dt = seconds() - t;
            best = dt < best ? dt : best;
        }
        printf("  %2ld rows: %7.3f ms  %6.1f GMAC/s  %5.2f ns per row and block of 16 x 32 weights\n",
               (long)M, best * 1e3, N * K * M / best / 1e9, best * 1e9 / (M * (N / 16) * (K / 32)));
        free(x), free(y), free(xq), free(xd);
    }
    free(w);
    return 0;
}
