/* patchbench: the depthwise convolution's weight and bias gradients (see patchbench/kernels.py). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* KS (kernel size, odd) is fixed at compile time so the KS running sums live in registers. */
#define P (KS / 2)
typedef float v16 __attribute__((vector_size(64)));  /* 16 channels of fp32 */

static inline float from_f32(float v) { return v; }
static inline float from_bf16(uint16_t v) { uint32_t u = (uint32_t)v << 16; float f; memcpy(&f, &u, 4); return f; }

/* dw[k][c] = sum_{b,h,w} x[b][h+i-P][w+j-P][c] * g[b][h][w][c] for k = i*KS + j, and the bias gradient
   db[c] = sum_{b,h,w} g[b][h][w][c]; x and g are (B, H, W, C) contiguous (channels_last), dw is
   (KS*KS, C) and db (C,), both fp32. Blocks of 16 channels are shared out among the
   OpenMP threads (torch's own pool: the library links the libgomp that torch has loaded). */
#define DEFINE_WGRAD(NAME, T, LOAD)                                                                  \
int NAME(const T *x, const T *g, float *dw, float *db, long B, long H, long W, long C) {                        \
    long WP = W + 2 * P, failed = 0;                                                                 \
    _Pragma("omp parallel for schedule(static) reduction(|: failed)")                                \
    for (long cb = 0; cb < C / 16; cb++) {                                                           \
        long c0 = cb * 16;                                                                           \
        v16 *xb = aligned_alloc(64, sizeof(v16) * (H + 2 * P) * WP);  /* zero-padded input plane */  \
        v16 *gb = aligned_alloc(64, sizeof(v16) * H * W);             /* output-gradient plane */    \
        if (!xb || !gb) { free(xb); free(gb); failed = 1; continue; }                                \
        v16 total[KS * KS], bias = {0};                                                              \
        memset(total, 0, sizeof total);                                                              \
        for (long b = 0; b < B; b++) {                                                               \
            memset(xb, 0, sizeof(v16) * (H + 2 * P) * WP);                                           \
            for (long h = 0; h < H; h++)                                                             \
                for (long w = 0; w < W; w++) {                                                       \
                    const T *xp = x + ((b * H + h) * W + w) * C + c0;                                \
                    const T *gp = g + ((b * H + h) * W + w) * C + c0;                                \
                    v16 xv, gv;                                                                      \
                    for (int l = 0; l < 16; l++) { xv[l] = LOAD(xp[l]); gv[l] = LOAD(gp[l]); }      \
                    xb[(h + P) * WP + w + P] = xv;                                                   \
                    gb[h * W + w] = gv;                                                              \
                    bias += gv;                                                                      \
                }                                                                                    \
            for (long h = 0; h < H; h++)                                                             \
                for (int i = 0; i < KS; i++) {  /* KS running sums of one output row, in registers */\
                    const v16 *xrow = xb + (h + i) * WP, *grow = gb + h * W;                         \
                    v16 acc[KS];                                                                     \
                    memset(acc, 0, sizeof acc);                                                      \
                    for (long w = 0; w < W; w++) {                                                   \
                        v16 gv = grow[w];                                                            \
                        for (int j = 0; j < KS; j++) acc[j] += xrow[w + j] * gv;                     \
                    }                                                                                \
                    for (int j = 0; j < KS; j++) total[i * KS + j] += acc[j];                        \
                }                                                                                    \
        }                                                                                            \
        for (int k = 0; k < KS * KS; k++) memcpy(dw + k * C + c0, &total[k], sizeof(v16));          \
        memcpy(db + c0, &bias, sizeof(v16));                                                         \
        free(xb); free(gb);                                                                          \
    }                                                                                                \
    return (int)failed;                                                                              \
}

DEFINE_WGRAD(dw_wgrad_f32, float, from_f32)
DEFINE_WGRAD(dw_wgrad_bf16, uint16_t, from_bf16)
