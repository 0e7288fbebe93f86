// patchbench's CPU kernels, the arithmetic only (ops.cpp registers, checks and dispatches them).
// Included once per instruction set, inside a namespace compiled for it (ops.cpp); PB_AVX2, PB_AVX512
// and PB_AVX512BF16 say whether that set has AVX2, AVX-512 and AVX-512's bf16 conversion. Written in GCC's portable
// vector types (16 fp32 lanes), which compile to the widest vectors of the target; where it has
// AVX-512, three steps use its intrinsics instead (max, scalef, the bf16 conversion): the same values
// in fewer instructions, except bf16 subnormals, which the conversion flushes to zero.
// Every function works on a range of 16-channel blocks [cb0, cb1) (or of samples, for the crop): the
// caller shares the range out over torch's threads.

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
    v16u u = (v16u)v;
    u += 0x7FFF + ((u >> 16) & 1);
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

// y = gelu(z), stored; s[c] = sum y, q[c] = sum y^2 of the stored values
template <typename T>
void gelu_stats(const T *z, T *y, int64_t N, int64_t C, double *s, double *q, int64_t cb0, int64_t cb1) {
    Vectors ps(cb1 - cb0), pq(cb1 - cb0);
    v16 cdf, pdf;
    for (int64_t c = cb0 * 16; c < cb1 * 16; c++) s[c] = q[c] = 0;
    for (int64_t n0 = 0; n0 < N; n0 += 64) {
        int64_t n1 = n0 + 64 < N ? n0 + 64 : N;
        for (int64_t cb = cb0; cb < cb1; cb++) ps[cb - cb0] = pq[cb - cb0] = splat(0);
        for (int64_t n = n0; n < n1; n++)
            for (int64_t cb = cb0; cb < cb1; cb++) {
                v16 zv = load(z + n * C + cb * 16);
                phi(zv, &cdf, &pdf);
                store(y + n * C + cb * 16, zv * cdf);
                v16 yv = load(y + n * C + cb * 16);  // as stored (rounded for bf16)
                ps[cb - cb0] += yv;
                pq[cb - cb0] += yv * yv;
            }
        for (int64_t cb = cb0; cb < cb1; cb++)
            for (int l = 0; l < 16; l++) {
                s[cb * 16 + l] += ps[cb - cb0][l];
                q[cb * 16 + l] += pq[cb - cb0][l];
            }
    }
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
    Vectors a(cb1 - cb0), b(cb1 - cb0);
    for (int64_t c = cb0 * 16; c < cb1 * 16; c++) sd[c] = sdy[c] = 0;
    for (int64_t n0 = 0; n0 < N; n0 += 64) {
        int64_t n1 = n0 + 64 < N ? n0 + 64 : N;
        for (int64_t cb = cb0; cb < cb1; cb++) a[cb - cb0] = b[cb - cb0] = splat(0);
        for (int64_t n = n0; n < n1; n++)
            for (int64_t cb = cb0; cb < cb1; cb++) {
                v16 g = load(dout + n * C + cb * 16);
                a[cb - cb0] += g;
                b[cb - cb0] += g * load(y + n * C + cb * 16);
            }
        for (int64_t cb = cb0; cb < cb1; cb++)
            for (int l = 0; l < 16; l++) {
                sd[cb * 16 + l] += a[cb - cb0][l];
                sdy[cb * 16 + l] += b[cb - cb0][l];
            }
    }
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

// ------------------------------------------------------------------------------------------------
// Crop, antialiased bilinear resize, flip and normalise: torch's float F.interpolate(mode="bilinear",
// antialias=True, align_corners=False), PIL's triangle filter, computed in float from uint8 pixels.

// Weights to resize `in` pixels to `out`: output i reads inputs first[i] .. first[i] + k - 1 with
// weights w[i * k .. i * k + k - 1]; those past its support have weight 0. Its support, all inputs
// within max(1, in / out) of its centre, spans at most ceil(2 s) of them: k = max(2, ceil(2 in / out))
// holds it (a third tap of a plain bilinear output, at distance 1 up to rounding, has weight ~1e-16
// and is dropped).
static void aa_weights(int64_t in, int64_t out, int64_t k, int64_t *first, float *w) {
    double scale = (double)in / (double)out;
    double support = scale > 1.0 ? scale : 1.0, inv = 1.0 / support;
    for (int64_t i = 0; i < out; i++) {
        double center = scale * (i + 0.5), tot = 0.0;
        int64_t lo = (int64_t)(center - support + 0.5), hi = (int64_t)(center + support + 0.5);
        if (lo < 0) lo = 0;
        if (hi > in) hi = in;
        if (hi - lo > k) hi = lo + k;
        for (int64_t j = 0; j < k; j++) {
            double d = (j + lo - center + 0.5) * inv, t = 1.0 - (d < 0 ? -d : d);
            w[i * k + j] = (float)(j < hi - lo && t > 0 ? t : 0.0);
            tot += w[i * k + j];
        }
        for (int64_t j = 0; j < k; j++) w[i * k + j] = tot > 0 ? (float)(w[i * k + j] / tot) : 0.0f;
        first[i] = lo;
    }
}

// One row of the horizontal pass: t[o] (3 floats, mirrored when fl) = sum_j wx[o][j] * row[first[o] + j]
template <int K>
static inline void hpass(const float *row, const int64_t *xf, const float *wx, int64_t O, int64_t k, bool fl,
                         float *t) {
    int64_t taps = K ? K : k;
    for (int64_t o = 0; o < O; o++) {
        const float *q = row + xf[o] * 3, *ww = wx + o * taps;
        float a = 0, b = 0, c = 0;
        for (int64_t j = 0; j < taps; j++) a += ww[j] * q[3 * j], b += ww[j] * q[3 * j + 1], c += ww[j] * q[3 * j + 2];
        int64_t d = (fl ? O - 1 - o : o) * 3;
        t[d] = a, t[d + 1] = b, t[d + 2] = c;
    }
}

// Samples lo .. hi - 1: sample s is the crop boxes[s] = (x0, y0, x1, y1) (0 <= x0 < x1 <= S, the same
// for y: checked by the op) of image rows[s] of src, (N, S, S, 3) uint8 contiguous; mirrored when
// flips[s] (flips may be null); resized to O x O; written as x * scale[c] + shift[c] into out, float
// (B, 3, O, O) contiguous, or (B, O, O, 3) when channels_last.
void crop_resize(const uint8_t *src, int64_t S, const int64_t *rows, const int64_t *boxes, const bool *flips,
                 int64_t lo, int64_t hi, int64_t O, const float *scale, const float *shift, bool channels_last,
                 float *out) {
    int64_t kmax = (2 * S + O - 1) / O;  // taps per output of the widest crop (w = S)
    kmax = kmax < 2 ? 2 : kmax;
    std::vector<int64_t> xf(O), yf(O);
    std::vector<float> wx(O * kmax), wy(O * kmax), tmp(S * O * 3), row((S + kmax) * 3, 0.0f), line(O * 3),
        sc(O * 3), sh(O * 3);
    for (int64_t j = 0; j < O * 3; j++) sc[j] = scale[j % 3], sh[j] = shift[j % 3];
    for (int64_t s = lo; s < hi; s++) {
        int64_t x0 = boxes[4 * s], y0 = boxes[4 * s + 1], w = boxes[4 * s + 2] - x0, h = boxes[4 * s + 3] - y0;
        int64_t kx = (2 * w + O - 1) / O, ky = (2 * h + O - 1) / O;  // ceil(2 * support): taps per output
        kx = kx < 2 ? 2 : kx;
        ky = ky < 2 ? 2 : ky;
        const uint8_t *img = src + rows[s] * S * S * 3;
        bool fl = flips && flips[s];
        aa_weights(w, O, kx, xf.data(), wx.data());
        aa_weights(h, O, ky, yf.data(), wy.data());
        for (int64_t r = 0; r < h; r++) {
            const uint8_t *p = img + ((y0 + r) * S + x0) * 3;
            // past w * 3: zeros or an earlier row's pixels, read with weight 0
            for (int64_t j = 0; j < w * 3; j++) row[j] = p[j];
            if (kx == 2)  // any enlarging crop: unrolled
                hpass<2>(row.data(), xf.data(), wx.data(), O, kx, fl, tmp.data() + r * O * 3);
            else
                hpass<0>(row.data(), xf.data(), wx.data(), O, kx, fl, tmp.data() + r * O * 3);
        }
        for (int64_t oy = 0; oy < O; oy++) {
            const float *ww = wy.data() + oy * ky, *t0 = tmp.data() + yf[oy] * O * 3;
            int64_t taps = h - yf[oy] < ky ? h - yf[oy] : ky;  // rows past the crop have weight 0: not read
            float *dst = channels_last ? out + (s * O + oy) * O * 3 : line.data();
            for (int64_t j = 0; j < O * 3; j++) dst[j] = ww[0] * t0[j];
            for (int64_t k = 1; k < taps; k++) {
                const float *tk = t0 + k * O * 3;
                float wk = ww[k];
                for (int64_t j = 0; j < O * 3; j++) dst[j] += wk * tk[j];
            }
            for (int64_t j = 0; j < O * 3; j++) dst[j] = dst[j] * sc[j] + sh[j];
            if (!channels_last) {
                float *plane = out + s * 3 * O * O + oy * O;
                for (int64_t x = 0; x < O; x++)
                    plane[x] = line[3 * x], plane[O * O + x] = line[3 * x + 1], plane[2 * O * O + x] = line[3 * x + 2];
            }
        }
    }
}
