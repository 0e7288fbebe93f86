/* patchbench: GELU -> BatchNorm fused, forward and backward (see patchbench/kernels.py).
   Written in GCC's portable vector types; where the CPU has AVX-512 three steps use its intrinsics
   instead (max, scalef, the bf16 conversion): the same values in fewer instructions, but bf16
   subnormals, which the conversion flushes to zero. -DPB_GENERIC leaves those three out (the vector
   types still compile to the CPU's widest vectors): the tests and benchmarks/epoch_time.py compare. */
#include <omp.h>
#include <stdint.h>
#include <string.h>
#if defined(__AVX512F__) && !defined(PB_GENERIC)
#include <immintrin.h>
#endif

typedef float v16 __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));

static inline v16 splat(float a) { return (v16){a, a, a, a, a, a, a, a, a, a, a, a, a, a, a, a}; }

/* exp(x) for x <= 0 (Cephes expf: range reduction by ln 2, degree-6 polynomial, 2^n via the exponent) */
static inline v16 vexp_neg(v16 x) {
#if defined(__AVX512F__) && !defined(PB_GENERIC)  /* the same values in fewer instructions: max for the clamp, scalef for the 2^n below */
    x = (v16)_mm512_max_ps((__m512)splat(-87.0f), (__m512)x);  /* x second: a NaN stays NaN, as below */
#else
    v16i low = x < splat(-87.0f);                    /* lanes of -1 where true */
    x = (v16)(((v16i)splat(-87.0f) & low) | ((v16i)x & ~low));
#endif
    v16 n = (x * splat(1.44269504f) + splat(12582912.0f)) - splat(12582912.0f);  /* round to nearest */
    v16 r = x - n * splat(0.693359375f) - n * splat(-2.12194440e-4f);
    v16 p = splat(1.9875691500e-4f);
    p = p * r + splat(1.3981999507e-3f);
    p = p * r + splat(8.3334519073e-3f);
    p = p * r + splat(4.1665795894e-2f);
    p = p * r + splat(1.6666665459e-1f);
    p = p * r + splat(5.0000001201e-1f);
    p = p * r * r + r + splat(1.0f);
#if defined(__AVX512F__) && !defined(PB_GENERIC)
    return (v16)_mm512_scalef_ps((__m512)p, (__m512)n);  /* p * 2^n, n in [-126, 0]: exact, as below */
#else
    v16i e = (__builtin_convertvector(n, v16i) + 127) << 23;
    return p * (v16)e;
#endif
}

/* cdf = Phi(z) = (1 + erf(z / sqrt 2)) / 2 and pdf = phi(z), with erf by Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7),
   the formula PyTorch's vectorised CPU erf uses. */
static inline void phi(v16 z, v16 *cdf, v16 *pdf) {
    v16 x = z * splat(0.70710678f);
    v16i sign = (v16i)x & (int32_t)0x80000000;
    v16 ax = (v16)((v16i)x ^ sign);                  /* |x| */
    v16 t = splat(1.0f) / (splat(0.3275911f) * ax + splat(1.0f));
    v16 r = splat(1.061405429f);
    r = r * t + splat(-1.453152027f);
    r = r * t + splat(1.421413741f);
    r = r * t + splat(-0.284496736f);
    r = r * t + splat(0.254829592f);
    v16 e = vexp_neg(-ax * ax);                       /* exp(-z^2 / 2) */
    v16 erf_abs = splat(1.0f) - r * t * e;
    v16 erf = (v16)((v16i)erf_abs | sign);          /* erf is odd */
    *cdf = splat(0.5f) * (splat(1.0f) + erf);
    *pdf = e * splat(0.39894228f);
}

static inline v16 load_f32(const float *p) { v16 v; memcpy(&v, p, 64); return v; }
static inline void store_f32(float *p, v16 v) { memcpy(p, &v, 64); }
typedef uint16_t v16h __attribute__((vector_size(32)));
typedef uint32_t v16u __attribute__((vector_size(64)));
static inline v16 load_bf16(const uint16_t *p) { v16h h; memcpy(&h, p, 32); return (v16)(__builtin_convertvector(h, v16u) << 16); }
static inline void store_bf16(uint16_t *p, v16 v) {  /* round to nearest even */
#if defined(__AVX512BF16__) && !defined(PB_GENERIC)  /* the instruction (Cooper Lake, Sapphire Rapids, Zen 4): the
   same rounding, but it flushes subnormal results (below 2^-126) to zero */
    __m256bh h = _mm512_cvtneps_pbh((__m512)v);
    memcpy(p, &h, 32);
#else
    v16u u = (v16u)v;
    u += 0x7FFF + ((u >> 16) & 1);
    v16h h = __builtin_convertvector(u >> 16, v16h);
    memcpy(p, &h, 32);
#endif
}

/* Each thread takes a contiguous range of 16-channel blocks and walks every pixel (N = B*H*W rows of C)
   in memory order: its part of one row, then of the next. (Walking one block down 64 rows instead, a
   stride of C elements, made fp32 at C = 256 thrash L1 sets: 3x slower.) The per-block partial sums of
   64 rows live in a small array; each is summed over the same rows in the same order as before. */
#define THREAD_BLOCKS long nb = C / 16, t = omp_get_thread_num(), T = omp_get_num_threads(); \
    long cb0 = nb * t / T, cb1 = nb * (t + 1) / T

#define DEFINE(SUFFIX, TYPE, LOAD, STORE)                                                            \
/* y = gelu(z), stored; s[c] = sum y, q[c] = sum y^2 of the stored values (fp32 partials per 64 rows, \
   summed in double) */                                                                             \
void gelu_stats_##SUFFIX(const TYPE *z, TYPE *y, long N, long C, double *s, double *q) {             \
    _Pragma("omp parallel") {                                                                        \
        THREAD_BLOCKS;                                                                               \
        v16 ps[cb1 - cb0 + 1], pq[cb1 - cb0 + 1], cdf, pdf;                                          \
        for (long c = cb0 * 16; c < cb1 * 16; c++) s[c] = q[c] = 0;                                  \
        for (long n0 = 0; n0 < N; n0 += 64) {                                                        \
            long n1 = n0 + 64 < N ? n0 + 64 : N;                                                     \
            for (long cb = cb0; cb < cb1; cb++) ps[cb - cb0] = pq[cb - cb0] = splat(0);              \
            for (long n = n0; n < n1; n++)                                                           \
                for (long cb = cb0; cb < cb1; cb++) {                                                \
                    v16 zv = LOAD(z + n * C + cb * 16);                                              \
                    phi(zv, &cdf, &pdf);                                                             \
                    STORE(y + n * C + cb * 16, zv * cdf);                                            \
                    v16 yv = LOAD(y + n * C + cb * 16);  /* as stored (rounded for bf16) */          \
                    ps[cb - cb0] += yv; pq[cb - cb0] += yv * yv;                                     \
                }                                                                                    \
            for (long cb = cb0; cb < cb1; cb++)                                                      \
                for (int l = 0; l < 16; l++) { s[cb * 16 + l] += ps[cb - cb0][l]; q[cb * 16 + l] += pq[cb - cb0][l]; } \
        }                                                                                            \
    }                                                                                                \
}                                                                                                    \
/* out = y * scale[c] + shift[c] */                                                                  \
void affine_##SUFFIX(const TYPE *y, TYPE *out, long N, long C, const float *scale, const float *shift) { \
    _Pragma("omp parallel") {                                                                        \
        THREAD_BLOCKS;                                                                               \
        for (long n = 0; n < N; n++)                                                                 \
            for (long cb = cb0; cb < cb1; cb++)                                                      \
                STORE(out + n * C + cb * 16,                                                         \
                      LOAD(y + n * C + cb * 16) * load_f32(scale + cb * 16) + load_f32(shift + cb * 16)); \
    }                                                                                                \
}                                                                                                    \
/* out = y * scale[c] + shift[c] + res: the affine pass with a residual sum folded in (ConvMixer's         \
   x + gain * BN(GELU(z)), the gain folded into scale and shift) */                                  \
void affine_res_##SUFFIX(const TYPE *y, const TYPE *res, TYPE *out, long N, long C, const float *scale, \
                         const float *shift) {                                                       \
    _Pragma("omp parallel") {                                                                        \
        THREAD_BLOCKS;                                                                               \
        for (long n = 0; n < N; n++)                                                                 \
            for (long cb = cb0; cb < cb1; cb++) {                                                    \
                long o = n * C + cb * 16;                                                            \
                STORE(out + o, LOAD(y + o) * load_f32(scale + cb * 16) + load_f32(shift + cb * 16) + LOAD(res + o)); \
            }                                                                                        \
    }                                                                                                \
}                                                                                                    \
/* sd[c] = sum dout, sdy[c] = sum dout * y (fp32 partials per 64 rows, summed in double) */          \
void grad_stats_##SUFFIX(const TYPE *y, const TYPE *dout, long N, long C, double *sd, double *sdy) { \
    _Pragma("omp parallel") {                                                                        \
        THREAD_BLOCKS;                                                                               \
        v16 a[cb1 - cb0 + 1], b[cb1 - cb0 + 1];                                                      \
        for (long c = cb0 * 16; c < cb1 * 16; c++) sd[c] = sdy[c] = 0;                               \
        for (long n0 = 0; n0 < N; n0 += 64) {                                                        \
            long n1 = n0 + 64 < N ? n0 + 64 : N;                                                     \
            for (long cb = cb0; cb < cb1; cb++) a[cb - cb0] = b[cb - cb0] = splat(0);                \
            for (long n = n0; n < n1; n++)                                                           \
                for (long cb = cb0; cb < cb1; cb++) {                                                \
                    v16 g = LOAD(dout + n * C + cb * 16);                                            \
                    a[cb - cb0] += g; b[cb - cb0] += g * LOAD(y + n * C + cb * 16);                  \
                }                                                                                    \
            for (long cb = cb0; cb < cb1; cb++)                                                      \
                for (int l = 0; l < 16; l++) { sd[cb * 16 + l] += a[cb - cb0][l]; sdy[cb * 16 + l] += b[cb - cb0][l]; } \
        }                                                                                            \
    }                                                                                                \
}                                                                                                    \
/* dz = (ka[c] * dout + kb[c] * y + kc[c]) * gelu'(z), gelu'(z) = Phi(z) + z phi(z) */               \
void gelu_bn_grad_##SUFFIX(const TYPE *z, const TYPE *y, const TYPE *dout, TYPE *dz, long N, long C, \
                           const float *ka, const float *kb, const float *kc) {                      \
    _Pragma("omp parallel") {                                                                        \
        THREAD_BLOCKS;                                                                               \
        for (long n = 0; n < N; n++)                                                                 \
            for (long cb = cb0; cb < cb1; cb++) {                                                    \
                long o = n * C + cb * 16;                                                            \
                v16 zv = LOAD(z + o), cdf, pdf;                                                      \
                phi(zv, &cdf, &pdf);                                                                 \
                v16 dy = load_f32(ka + cb * 16) * LOAD(dout + o) + load_f32(kb + cb * 16) * LOAD(y + o) \
                         + load_f32(kc + cb * 16);                                                   \
                STORE(dz + o, dy * (cdf + zv * pdf));                                                \
            }                                                                                        \
    }                                                                                                \
}

DEFINE(f32, float, load_f32, store_f32)
DEFINE(bf16, uint16_t, load_bf16, store_bf16)
