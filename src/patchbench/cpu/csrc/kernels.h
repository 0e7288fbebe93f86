// patchbench's CPU kernels, the arithmetic only (ops.cpp registers, checks and dispatches them).
// Included once per instruction set, inside a namespace compiled for it (ops.cpp); PB_AVX2, PB_AVX512
// and PB_AVX512BF16 say whether that set has AVX2, AVX-512 and AVX-512's bf16 conversion. Written in GCC's portable
// vector types (16 fp32 lanes), which compile to the widest vectors of the target; where it has
// AVX-512, three steps use its intrinsics instead (max, scalef, the bf16 conversion): the same values
// in fewer instructions, except bf16 subnormals, which the conversion flushes to zero.
// Every function works on a range of 16-channel blocks [cb0, cb1): the caller shares the range out
// over torch's threads.

typedef float v16 __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));
typedef uint16_t v16h __attribute__((vector_size(32)));
typedef uint32_t v16u __attribute__((vector_size(64)));

static inline v16 splat(float a) { return v16{} + a; }

// n vectors of type V, zeroed, 64-byte aligned (aligned_alloc: std::vector does not promise that
// alignment here)
template <typename V>
struct Buffer {
    V *p;
    explicit Buffer(int64_t n) : p(static_cast<V *>(aligned_alloc(64, (sizeof(V) * (n > 0 ? n : 1) + 63) / 64 * 64))) {
        if (!p) throw std::bad_alloc();
        memset((void *)p, 0, sizeof(V) * (n > 0 ? n : 1));
    }
    ~Buffer() { free(p); }
    Buffer(const Buffer &) = delete;
    Buffer &operator=(const Buffer &) = delete;
    V &operator[](int64_t i) { return p[i]; }
};
using Vectors = Buffer<v16>;

static inline v16 load(const float *p) { v16 v; memcpy(&v, p, 64); return v; }
static inline v16 load(const uint16_t *p) {
    v16h h;
    memcpy(&h, p, 32);
    return (v16)(__builtin_convertvector(h, v16u) << 16);
}
static inline void store(float *p, v16 v) { memcpy(p, &v, 64); }
static inline void store(uint16_t *p, v16 v) {  // round to nearest even
#if PB_AVX512BF16
    __m256bh h = _mm512_cvtneps_pbh((__m512)v);  // the same rounding; flushes subnormals (below 2^-126) to 0
    memcpy(p, &h, 32);
#else
    v16u u = (v16u)v, nan = (v16u)(v != v);
    u += 0x7FFF + ((u >> 16) & 1);
    u = (u & ~nan) | ((v16u{} + 0x7FC00000u) & nan);  // NaN stays NaN (the quiet NaN c10::BFloat16 makes)
    v16h h = __builtin_convertvector(u >> 16, v16h);
    memcpy(p, &h, 32);
#endif
}
static inline float scalar(float v) { return v; }
static inline float scalar(uint16_t v) { uint32_t u = (uint32_t)v << 16; float f; memcpy(&f, &u, 4); return f; }

// ------------------------------------------------------------------------------------------------
// GELU -> BatchNorm (training mode), fused

// exp(x) for x <= 0 (Cephes expf: range reduction by ln 2, degree-6 polynomial, 2^n via the exponent)
static inline v16 vexp_neg(v16 x) {
#if PB_AVX512
    x = (v16)_mm512_max_ps((__m512)splat(-87.0f), (__m512)x);  // x second: a NaN stays NaN, as below
#else
    v16i low = x < splat(-87.0f);  // lanes of -1 where true
    x = (v16)(((v16i)splat(-87.0f) & low) | ((v16i)x & ~low));
#endif
    v16 n = (x * splat(1.44269504f) + splat(12582912.0f)) - splat(12582912.0f);  // round to nearest
    v16 r = x - n * splat(0.693359375f) - n * splat(-2.12194440e-4f);
    v16 p = splat(1.9875691500e-4f);
    p = p * r + splat(1.3981999507e-3f);
    p = p * r + splat(8.3334519073e-3f);
    p = p * r + splat(4.1665795894e-2f);
    p = p * r + splat(1.6666665459e-1f);
    p = p * r + splat(5.0000001201e-1f);
    p = p * r * r + r + splat(1.0f);
#if PB_AVX512
    return (v16)_mm512_scalef_ps((__m512)p, (__m512)n);  // p * 2^n, n in [-126, 0]: exact, as below
#else
    v16i e = (__builtin_convertvector(n, v16i) + 127) << 23;
    return p * (v16)e;
#endif
}

// cdf = Phi(z) = (1 + erf(z / sqrt 2)) / 2 and pdf = phi(z), with erf by Abramowitz & Stegun 7.1.26
// (|error| < 1.5e-7), the formula PyTorch's vectorised CPU erf uses.
static inline void phi(v16 z, v16 *cdf, v16 *pdf) {
    v16 x = z * splat(0.70710678f);
    v16i sign = (v16i)x & (int32_t)0x80000000;
    v16 ax = (v16)((v16i)x ^ sign);  // |x|
    v16 t = splat(1.0f) / (splat(0.3275911f) * ax + splat(1.0f));
    v16 r = splat(1.061405429f);
    r = r * t + splat(-1.453152027f);
    r = r * t + splat(1.421413741f);
    r = r * t + splat(-0.284496736f);
    r = r * t + splat(0.254829592f);
    v16 e = vexp_neg(-ax * ax);  // exp(-z^2 / 2)
    v16 erf_abs = splat(1.0f) - r * t * e;
    v16 erf = (v16)((v16i)erf_abs | sign);  // erf is odd
    *cdf = splat(0.5f) * (splat(1.0f) + erf);
    *pdf = e * splat(0.39894228f);
}

// The GELU -> BatchNorm functions walk every pixel (N = B*H*W rows of C) in memory order, the blocks
// [cb0, cb1) of each row: walking one block down 64 rows instead, a stride of C elements, thrashed L1
// sets (3x slower in fp32 at C = 256). Sums are fp32 partials per 64 rows, added up in double in a
// fixed order, so the result does not depend on how the blocks are shared out.

// Two per-channel sums over the N rows, s[c] and q[c]: `add(o, a, b)` adds row element o's terms to the
// fp32 partials a and b of its block (o = n * C + cb * 16).
template <typename F>
void channel_sums(int64_t N, int64_t C, double *s, double *q, int64_t cb0, int64_t cb1, const F &add) {
    Vectors pa(cb1 - cb0), pb(cb1 - cb0);
    for (int64_t c = cb0 * 16; c < cb1 * 16; c++) s[c] = q[c] = 0;
    for (int64_t n0 = 0; n0 < N; n0 += 64) {
        int64_t n1 = n0 + 64 < N ? n0 + 64 : N;
        for (int64_t cb = cb0; cb < cb1; cb++) pa[cb - cb0] = pb[cb - cb0] = splat(0);
        for (int64_t n = n0; n < n1; n++)
            for (int64_t cb = cb0; cb < cb1; cb++) add(n * C + cb * 16, pa[cb - cb0], pb[cb - cb0]);
        for (int64_t cb = cb0; cb < cb1; cb++)
            for (int l = 0; l < 16; l++) {
                s[cb * 16 + l] += pa[cb - cb0][l];
                q[cb * 16 + l] += pb[cb - cb0][l];
            }
    }
}

// y = gelu(z), stored; s[c] = sum y, q[c] = sum y^2 of the stored values
template <typename T>
void gelu_stats(const T *z, T *y, int64_t N, int64_t C, double *s, double *q, int64_t cb0, int64_t cb1) {
    channel_sums(N, C, s, q, cb0, cb1, [&](int64_t o, v16 &a, v16 &b) {
        v16 zv = load(z + o), cdf, pdf;
        phi(zv, &cdf, &pdf);
        store(y + o, zv * cdf);
        v16 yv = load(y + o);  // as stored (rounded for bf16)
        a += yv;
        b += yv * yv;
    });
}

// out = y * scale[c] + shift[c] (+ res: ConvMixer's x + gain * BN(GELU(z)), the gain folded into
// scale and shift, the sum into this pass)
template <typename T>
void affine(const T *y, const T *res, T *out, int64_t N, int64_t C, const float *scale, const float *shift,
            int64_t cb0, int64_t cb1) {
    for (int64_t n = 0; n < N; n++)
        for (int64_t cb = cb0; cb < cb1; cb++) {
            int64_t o = n * C + cb * 16;
            v16 v = load(y + o) * load(scale + cb * 16) + load(shift + cb * 16);
            store(out + o, res ? v + load(res + o) : v);
        }
}

// sd[c] = sum dout, sdy[c] = sum dout * y
template <typename T>
void grad_stats(const T *y, const T *dout, int64_t N, int64_t C, double *sd, double *sdy, int64_t cb0,
                int64_t cb1) {
    channel_sums(N, C, sd, sdy, cb0, cb1, [&](int64_t o, v16 &a, v16 &b) {
        v16 g = load(dout + o);
        a += g;
        b += g * load(y + o);
    });
}

// dz = (ka[c] * dout + kb[c] * y + kc[c]) * gelu'(z), gelu'(z) = Phi(z) + z phi(z)
template <typename T>
void gelu_bn_grad(const T *z, const T *y, const T *dout, T *dz, int64_t N, int64_t C, const float *ka,
                  const float *kb, const float *kc, int64_t cb0, int64_t cb1) {
    for (int64_t n = 0; n < N; n++)
        for (int64_t cb = cb0; cb < cb1; cb++) {
            int64_t o = n * C + cb * 16;
            v16 zv = load(z + o), cdf, pdf;
            phi(zv, &cdf, &pdf);
            v16 dy = load(ka + cb * 16) * load(dout + o) + load(kb + cb * 16) * load(y + o) + load(kc + cb * 16);
            store(dz + o, dy * (cdf + zv * pdf));
        }
}

// ------------------------------------------------------------------------------------------------
// The depthwise convolution's weight and bias gradients

// dw[k][c] = sum_{b,h,w} x[b][h+i-P][w+j-P][c] * g[b][h][w][c] for k = i*KS + j (P = KS / 2), and
// db[c] = sum_{b,h,w} g[b][h][w][c]; x and g (B, H, W, C) contiguous, dw (KS*KS, C), db (C,), fp32.
// KS is a template argument so that the KS running sums of one output row stay in registers while a
// zero-padded input row streams past: DW_LANES channels at a time, the widest vector of which KS + 2
// fit the target's registers (16 on AVX-512's 32, 8 on AVX2's 16, 4 on SSE's 16).
#if PB_AVX512
constexpr int DW_LANES = 16;
#elif PB_AVX2
constexpr int DW_LANES = 8;
#else
constexpr int DW_LANES = 4;
#endif
typedef float vdw __attribute__((vector_size(DW_LANES * 4)));

template <int KS, typename T>
void dw_wgrad(const T *x, const T *g, float *dw, float *db, int64_t B, int64_t H, int64_t W, int64_t C,
              int64_t cb0, int64_t cb1) {
    constexpr int P = KS / 2;
    int64_t WP = W + 2 * P;
    Buffer<vdw> xpad((H + 2 * P) * WP), gplane(H * W);  // a zero-padded input plane, an output-gradient one
    vdw *xb = xpad.p, *gb = gplane.p;
    for (int64_t c0 = cb0 * 16; c0 < cb1 * 16; c0 += DW_LANES) {
        vdw total[KS * KS] = {}, bias = {};
        for (int64_t b = 0; b < B; b++) {
            memset((void *)xb, 0, sizeof(vdw) * (H + 2 * P) * WP);
            for (int64_t h = 0; h < H; h++)
                for (int64_t w = 0; w < W; w++) {
                    const T *xp = x + ((b * H + h) * W + w) * C + c0, *gp = g + ((b * H + h) * W + w) * C + c0;
                    vdw xv, gv;
                    for (int l = 0; l < DW_LANES; l++) xv[l] = scalar(xp[l]), gv[l] = scalar(gp[l]);
                    xb[(h + P) * WP + w + P] = xv;
                    gb[h * W + w] = gv;
                    bias += gv;
                }
            for (int64_t h = 0; h < H; h++)
                for (int i = 0; i < KS; i++) {
                    const vdw *xrow = xb + (h + i) * WP, *grow = gb + h * W;
                    vdw acc[KS] = {};
                    for (int64_t w = 0; w < W; w++) {
                        vdw gv = grow[w];
                        for (int j = 0; j < KS; j++) acc[j] += xrow[w + j] * gv;
                    }
                    for (int j = 0; j < KS; j++) total[i * KS + j] += acc[j];
                }
        }
        for (int k = 0; k < KS * KS; k++) memcpy(dw + k * C + c0, &total[k], sizeof(vdw));
        memcpy(db + c0, &bias, sizeof(vdw));
    }
}
