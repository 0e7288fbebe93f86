/* patchbench: crop, antialiased bilinear resize, flip and normalise (see patchbench/data/crop_kernel.py). */
#include <stdint.h>
#include <stdlib.h>

/* Weights to resize `in` pixels to `out`: output i reads inputs first[i] .. first[i] + k - 1 with
   weights w[i * k .. i * k + k - 1]; those past its support have weight 0. Its support, all inputs
   within max(1, in / out) of its centre, spans floor(c + s + 0.5) - floor(c - s + 0.5) <= ceil(2 s)
   of them: k = max(2, ceil(2 in / out)) holds it (a third tap of a plain bilinear output, at
   distance 1 up to rounding, has weight ~1e-16 and is dropped). */
static void aa_weights(long in, long out, long k, long *first, float *w) {
    double scale = (double)in / (double)out;
    double support = scale > 1.0 ? scale : 1.0, inv = 1.0 / support;
    for (long i = 0; i < out; i++) {
        double center = scale * (i + 0.5), tot = 0.0;
        long lo = (long)(center - support + 0.5), hi = (long)(center + support + 0.5);
        if (lo < 0) lo = 0;
        if (hi > in) hi = in;
        if (hi - lo > k) hi = lo + k;
        for (long j = 0; j < k; j++) {
            double x = (j + lo - center + 0.5) * inv, t = 1.0 - (x < 0 ? -x : x);
            w[i * k + j] = (float)(j < hi - lo && t > 0 ? t : 0.0);
            tot += w[i * k + j];
        }
        for (long j = 0; j < k; j++) w[i * k + j] = tot > 0 ? (float)(w[i * k + j] / tot) : 0.0f;
        first[i] = lo;
    }
}

/* One row of the horizontal pass: t[o] (3 floats, mirrored when fl) = sum_j wx[o][j] * row[first[o] + j] */
#define HPASS(K)                                                                                   \
    for (long o = 0; o < O; o++) {                                                                 \
        const float *q = row + xf[o] * 3, *ww = wx + o * (K);                                      \
        float a = 0, b = 0, c = 0;                                                                 \
        for (long j = 0; j < (K); j++) { a += ww[j] * q[3 * j]; b += ww[j] * q[3 * j + 1]; c += ww[j] * q[3 * j + 2]; } \
        long d = (fl ? O - 1 - o : o) * 3;                                                         \
        t[d] = a; t[d + 1] = b; t[d + 2] = c;                                                      \
    }

/* Samples lo .. hi - 1: sample s is the crop boxes[s] = (x0, y0, x1, y1) (checked by the caller:
   0 <= x0 < x1 <= S, same for y) of image rows[s] of src, (N, S, S, 3) uint8 contiguous; mirrored
   when flips[s] (flips may be NULL); resized to O x O; written as x * scale[c] + shift[c] into out,
   float (B, 3, O, O) contiguous, or (B, O, O, 3) when channels_last. Returns 0, or 1 when out of memory. */
int crop_resize_f32(const uint8_t *src, long S, const int64_t *rows, const int64_t *boxes, const uint8_t *flips,
                    long lo, long hi, long O, const float *scale, const float *shift, int channels_last, float *out) {
    long kmax = (2 * S + O - 1) / O;          /* taps per output of the widest crop (w = S) */
    kmax = kmax < 2 ? 2 : kmax;
    long *xf = malloc(sizeof(long) * 2 * O), *yf = xf ? xf + O : NULL;
    float *wx = malloc(sizeof(float) * O * kmax), *wy = malloc(sizeof(float) * O * kmax);
    float *tmp = malloc(sizeof(float) * S * O * 3);                /* horizontal pass: (h, O, 3) */
    float *row = calloc((S + kmax) * 3, sizeof(float));            /* one crop row as float, zero-padded */
    float *line = malloc(sizeof(float) * O * 3 * 3), *sc = line ? line + O * 3 : NULL, *sh = line ? line + O * 6 : NULL;
    int failed = !xf || !wx || !wy || !tmp || !row || !line;
    for (long j = 0; !failed && j < O * 3; j++) { sc[j] = scale[j % 3]; sh[j] = shift[j % 3]; }
    for (long s = lo; s < hi && !failed; s++) {
        long x0 = boxes[4 * s], y0 = boxes[4 * s + 1], w = boxes[4 * s + 2] - x0, h = boxes[4 * s + 3] - y0;
        long kx = (2 * w + O - 1) / O, ky = (2 * h + O - 1) / O;  /* ceil(2 * support): taps per output */
        kx = kx < 2 ? 2 : kx;
        ky = ky < 2 ? 2 : ky;
        const uint8_t *img = src + rows[s] * S * S * 3;
        int fl = flips && flips[s];
        aa_weights(w, O, kx, xf, wx);
        aa_weights(h, O, ky, yf, wy);
        for (long r = 0; r < h; r++) {
            const uint8_t *p = img + ((y0 + r) * S + x0) * 3;
            float *t = tmp + r * O * 3;
            for (long j = 0; j < w * 3; j++) row[j] = p[j];  /* past w * 3: zeros or an earlier row's pixels, read with weight 0 */
            if (kx == 2) { HPASS(2) } else { HPASS(kx) }       /* 2: any enlarging crop, unrolled */
        }
        for (long oy = 0; oy < O; oy++) {
            const float *ww = wy + oy * ky, *t0 = tmp + yf[oy] * O * 3;
            long taps = h - yf[oy] < ky ? h - yf[oy] : ky;  /* rows past the crop have weight 0: not read */
            float *dst = channels_last ? out + (s * O + oy) * O * 3 : line;
            for (long j = 0; j < O * 3; j++) dst[j] = ww[0] * t0[j];
            for (long k = 1; k < taps; k++) {
                const float *tk = t0 + k * O * 3;
                float wk = ww[k];
                for (long j = 0; j < O * 3; j++) dst[j] += wk * tk[j];
            }
            for (long j = 0; j < O * 3; j++) dst[j] = dst[j] * sc[j] + sh[j];
            if (!channels_last) {
                float *plane = out + s * 3 * O * O + oy * O;
                for (long x = 0; x < O; x++) {
                    plane[x] = line[3 * x]; plane[O * O + x] = line[3 * x + 1]; plane[2 * O * O + x] = line[3 * x + 2];
                }
            }
        }
    }
    free(xf); free(wx); free(wy); free(tmp); free(row); free(line);
    return failed;
}
