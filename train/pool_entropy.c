/* Fused max-pool over regions and assignment entropy of DP-Net's training step (float32, CPU).

   Glossary: N images, R regions, P parts. s (N, R, P) are one batch's part scores, row-major.
   The torch composition this replaces is the torch path of train/model.py's _TrainOp (the reference the
   tests compare against); here each (N, R, P) score is read once forward and once backward.

   Forward, per image n:   best[n, p] = max_r s[n, r, p], where[n, p] its first argmax r
            per region:    z_p = s_p inv_p,  lse = logsumexp_p z,
                           h = -sum_p q_p log q_p with q = softmax(z) (the assignment entropy).
   Backward, with k = -dL/d mean(h) / (N R) and g = dL/d best, writes ds = dL/ds over s:
                           ds_p = k inv_p q_p (log q_p + h) + g_p at the first argmax region,
                           g_inv_p = k sum q_p (log q_p + h) s_p,  g_c_p = -sum ds_p.
   A non-finite score makes its image's best row and entropies NaN, so the caller's NaN check
   fires as it does with torch's max (which propagates NaN).

   Images are split over OpenMP threads (torch's own runtime when torch is loaded first);
   per-thread sums are reduced in thread order, so results do not depend on timing. */

#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* e^x for x <= ~88, Cephes' single-precision polynomial (about 1 ulp); inlined and vectorised. */
static inline float exp_f32(float x) {
    x = x < -87.0f ? -87.0f : x;
    float k = floorf(x * 1.44269504088896341f + 0.5f);
    float r = x - k * 0.693359375f + k * 2.12194440e-4f;
    float y = 1.9875691500e-4f;
    y = y * r + 1.3981999507e-3f;
    y = y * r + 8.3334519073e-3f;
    y = y * r + 4.1665795894e-2f;
    y = y * r + 1.6666665459e-1f;
    y = y * r + 5.0000001201e-1f;
    y = y * r * r + r + 1.0f;
    union { int32_t i; float f; } two_k = { .i = ((int32_t)k + 127) << 23 };
    return y * two_k.f;
}

/* Rows are walked in blocks of W lanes; a row's last, partial block is copied into a
   zero-padded buffer, so every loop has W iterations and vectorises whole (a scalar tail
   with its own exp cost as much as the vector body at P = 200). Per-part vectors live in
   thread-local "lanes" padded to PW = ceil(P / W) W, with values that make padded lanes
   inert: inv 0, keep 0, neg -inf (never the max), best NaN (never equal), g 0. */
#define W 16

typedef struct {
    int64_t P, PW, full, tail; /* parts, padded parts, whole blocks, lanes in the partial block */
    float *inv, *keep, *neg, *best, *g, *taken, *acc_inv, *acc_c, *pad, *arg;
} Lanes;

static Lanes lanes_new(const float *inv, int64_t P) {
    Lanes L = {P, (P + W - 1) / W * W, P / W, P % W};
    float *buf = calloc((size_t)L.PW * 9 + W, sizeof(float));
    L.inv = buf, L.keep = buf + L.PW, L.neg = buf + 2 * L.PW, L.best = buf + 3 * L.PW, L.g = buf + 4 * L.PW;
    L.taken = buf + 5 * L.PW, L.acc_inv = buf + 6 * L.PW, L.acc_c = buf + 7 * L.PW, L.arg = buf + 8 * L.PW;
    L.pad = buf + 9 * L.PW;
    for (int64_t p = 0; p < L.PW; ++p) {
        L.inv[p] = p < P ? inv[p] : 0.0f;
        L.keep[p] = p < P ? 1.0f : 0.0f;
        L.neg[p] = p < P ? 0.0f : -INFINITY;
    }
    return L;
}

/* Block b of a row: in place, or the padded copy of its tail (filled by the caller). */
static inline float *block(float *row, const Lanes *L, int64_t b) { return b < L->full ? row + b * W : L->pad; }

static void load_tail(const float *row, const Lanes *L) {
    for (int q = 0; q < W; ++q) L->pad[q] = q < L->tail ? row[L->full * W + q] : 0.0f;
}

/* One image: best and its region (P,); lse, h (R,) when entropy is on. Region indices ride in a
   float lane (exact below 2^24), so the max loop stays one vectorised select. */
static void forward_image(const float *s, const Lanes *L, int64_t R, int entropy, float *best, int64_t *where,
                          float *lse, float *h) {
    const int64_t P = L->P, nb = L->PW / W;
    float bad = 0.0f;
    for (int64_t p = 0; p < L->PW; ++p) L->best[p] = -INFINITY, L->arg[p] = 0.0f;
    for (int64_t r = 0; r < R; ++r) {
        float *row = (float *)(s + r * P); /* only read */
        if (L->tail) load_tail(row, L);
        float mv[W], nf[W];
        for (int q = 0; q < W; ++q) mv[q] = -INFINITY, nf[q] = 0.0f;
        const float fr = (float)r;
        for (int64_t b = 0; b < nb; ++b) {
            const float *restrict v = block(row, L, b), *restrict iv = L->inv + b * W, *restrict ng = L->neg + b * W;
            float *restrict bs = L->best + b * W, *restrict ar = L->arg + b * W;
#pragma omp simd
            for (int q = 0; q < W; ++q) {
                float x = v[q], z = x * iv[q] + ng[q];
                nf[q] += x * 0.0f; /* NaN for inf or NaN, 0 otherwise */
                ar[q] = x > bs[q] ? fr : ar[q];
                bs[q] = x > bs[q] ? x : bs[q];
                mv[q] = z > mv[q] ? z : mv[q];
            }
        }
        float m = -INFINITY, nonfinite = 0.0f;
        for (int q = 0; q < W; ++q) m = mv[q] > m ? mv[q] : m, nonfinite += nf[q];
        bad += nonfinite;
        if (!entropy) continue;
        float se[W], sey[W];
        for (int q = 0; q < W; ++q) se[q] = sey[q] = 0.0f;
        for (int64_t b = 0; b < nb; ++b) {
            const float *restrict v = block(row, L, b), *restrict iv = L->inv + b * W, *restrict kp = L->keep + b * W;
#pragma omp simd
            for (int q = 0; q < W; ++q) {
                float y = (v[q] * iv[q] - m) * kp[q], e = exp_f32(y) * kp[q]; /* padded lanes: 0 */
                se[q] += e;
                sey[q] += e * y;
            }
        }
        float se_sum = 0.0f, sey_sum = 0.0f;
        for (int q = 0; q < W; ++q) se_sum += se[q], sey_sum += sey[q];
        float log_se = logf(se_sum);
        lse[r] = m + log_se;
        h[r] = nonfinite == 0.0f ? log_se - sey_sum / se_sum : NAN;
    }
    for (int64_t p = 0; p < P; ++p) {
        best[p] = bad != 0.0f ? NAN : L->best[p];
        where[p] = (int64_t)L->arg[p];
    }
}

/* One image: overwrites s with ds and adds into L->acc_inv, L->acc_c. */
static void backward_image(float *s, const Lanes *L, const float *lse, const float *h, const float *best,
                           const float *g, float k, int64_t R, int entropy) {
    const int64_t P = L->P, nb = L->PW / W;
    for (int64_t p = 0; p < L->PW; ++p) {
        L->best[p] = p < P ? best[p] : NAN;
        L->g[p] = p < P ? g[p] : 0.0f;
        L->taken[p] = 0.0f;
    }
    for (int64_t r = 0; r < R; ++r) {
        float *row = s + r * P;
        if (L->tail) load_tail(row, L);
        const float l = entropy ? lse[r] : 0.0f, hr = entropy ? h[r] : 0.0f, ke = entropy ? k : 0.0f;
        for (int64_t b = 0; b < nb; ++b) {
            float *restrict v = block(row, L, b);
            const float *restrict iv = L->inv + b * W, *restrict kp = L->keep + b * W, *restrict bs = L->best + b * W,
                                  *restrict gg = L->g + b * W;
            float *restrict tk = L->taken + b * W, *restrict ai = L->acc_inv + b * W, *restrict ac = L->acc_c + b * W;
            if (entropy) {
#pragma omp simd
                for (int q = 0; q < W; ++q) {
                    float x = v[q], logq = x * iv[q] - l * kp[q], dz = exp_f32(logq) * (logq + hr);
                    float hit = (x == bs[q]) && tk[q] == 0.0f ? 1.0f : 0.0f;
                    float d = dz * iv[q] * ke + hit * gg[q];
                    ai[q] += dz * x;
                    tk[q] += hit;
                    v[q] = d;
                    ac[q] += d;
                }
            } else {
#pragma omp simd
                for (int q = 0; q < W; ++q) {
                    float hit = (v[q] == bs[q]) && tk[q] == 0.0f ? 1.0f : 0.0f;
                    float d = hit * gg[q];
                    tk[q] += hit;
                    v[q] = d;
                    ac[q] += d;
                }
            }
        }
        if (L->tail)
            for (int64_t q = 0; q < L->tail; ++q) row[L->full * W + q] = L->pad[q];
    }
}

/* s (N, R, P), inv (P,) -> best, where (N, P); lse, h (N, R) when entropy is on. */
void dpnet_pool_entropy_forward(const float *s, const float *inv, int64_t N, int64_t R, int64_t P, int entropy,
                                float *best, int64_t *where, float *lse, float *h) {
#pragma omp parallel
    {
        Lanes L = lanes_new(inv, P);
#pragma omp for schedule(static)
        for (int64_t n = 0; n < N; ++n)
            forward_image(s + n * R * P, &L, R, entropy, best + n * P, where + n * P, lse + n * R, h + n * R);
        free(L.inv);
    }
}

/* Overwrites s (N, R, P) with ds; writes g_inv = k sum dz s and g_c = -sum ds, both (P,). */
void dpnet_pool_entropy_backward(float *s, const float *inv, const float *lse, const float *h, const float *best,
                                 const float *g, float k, int64_t N, int64_t R, int64_t P, int entropy,
                                 float *g_inv, float *g_c) {
    int T = omp_get_max_threads();
    double *sums = calloc((size_t)T * 2 * P, sizeof(double)); /* per thread: inv (P), c (P) */
#pragma omp parallel num_threads(T)
    {
        Lanes L = lanes_new(inv, P);
        double *sum_inv = sums + (size_t)omp_get_thread_num() * 2 * P, *sum_c = sum_inv + P;
#pragma omp for schedule(static)
        for (int64_t n = 0; n < N; ++n) {
            for (int64_t p = 0; p < L.PW; ++p) L.acc_inv[p] = L.acc_c[p] = 0.0f;
            backward_image(s + n * R * P, &L, lse + n * R, h + n * R, best + n * P, g + n * P, k, R, entropy);
            for (int64_t p = 0; p < P; ++p) {
                sum_inv[p] += L.acc_inv[p];
                sum_c[p] += L.acc_c[p];
            }
        }
        free(L.inv);
    }
    for (int64_t p = 0; p < P; ++p) {
        double a = 0.0, c = 0.0;
        for (int t = 0; t < T; ++t) {
            a += sums[(size_t)t * 2 * P + p];
            c += sums[(size_t)t * 2 * P + P + p];
        }
        g_inv[p] = (float)(k * a);
        g_c[p] = (float)(-c);
    }
    free(sums);
}
