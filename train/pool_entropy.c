/* Fused max-pool over regions and assignment entropy of DP-Net's training step (float32, CPU).

   Glossary: N images, R regions, P parts. s (N, R, P) are one batch's part scores, row-major.
   The torch composition this replaces is train/model.py's _PoolAndEntropy (the reference the
   tests compare against); here each (N, R, P) score is read once forward and once backward.

   Forward, per image n:   best[n, p] = max_r s[n, r, p]
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

/* One image: best (P,), and lse, h (R,) when entropy is on. */
static void forward_image(const float *restrict s, const float *restrict inv, int64_t R, int64_t P,
                          int entropy, float *restrict best, float *restrict lse, float *restrict h) {
    float bad = 0.0f;
    for (int64_t p = 0; p < P; ++p) best[p] = -INFINITY;
    for (int64_t r = 0; r < R; ++r) {
        const float *restrict row = s + r * P;
        float m = -INFINITY, nonfinite = 0.0f;
#pragma omp simd reduction(max : m) reduction(+ : nonfinite)
        for (int64_t p = 0; p < P; ++p) {
            float v = row[p], z = v * inv[p];
            nonfinite += v * 0.0f; /* NaN for inf or NaN, 0 otherwise */
            best[p] = v > best[p] ? v : best[p];
            m = z > m ? z : m;
        }
        bad += nonfinite;
        if (!entropy) continue;
        float se = 0.0f, sey = 0.0f;
#pragma omp simd reduction(+ : se, sey)
        for (int64_t p = 0; p < P; ++p) {
            float y = row[p] * inv[p] - m, e = exp_f32(y);
            se += e;
            sey += e * y;
        }
        float log_se = logf(se);
        lse[r] = m + log_se;
        h[r] = nonfinite == 0.0f ? log_se - sey / se : NAN;
    }
    if (bad != 0.0f)
        for (int64_t p = 0; p < P; ++p) best[p] = NAN;
}

/* One image: overwrites s with ds and adds into acc_inv, acc_c (P,). */
static void backward_image(float *restrict s, const float *restrict inv, const float *restrict lse,
                           const float *restrict h, const float *restrict best, const float *restrict g,
                           float k, int64_t R, int64_t P, int entropy, float *restrict taken,
                           float *restrict acc_inv, float *restrict acc_c) {
    for (int64_t p = 0; p < P; ++p) taken[p] = 0.0f;
    for (int64_t r = 0; r < R; ++r) {
        float *restrict row = s + r * P;
        if (entropy) {
            float l = lse[r], hr = h[r];
#pragma omp simd
            for (int64_t p = 0; p < P; ++p) {
                float v = row[p], logq = v * inv[p] - l, dz = exp_f32(logq) * (logq + hr);
                float hit = (v == best[p]) && taken[p] == 0.0f ? 1.0f : 0.0f;
                float d = dz * inv[p] * k + hit * g[p];
                acc_inv[p] += dz * v;
                taken[p] += hit;
                row[p] = d;
                acc_c[p] += d;
            }
        } else {
#pragma omp simd
            for (int64_t p = 0; p < P; ++p) {
                float hit = (row[p] == best[p]) && taken[p] == 0.0f ? 1.0f : 0.0f;
                float d = hit * g[p];
                taken[p] += hit;
                row[p] = d;
                acc_c[p] += d;
            }
        }
    }
}

int dpnet_threads(void) { return omp_get_max_threads(); }

/* s (N, R, P), inv (P,) -> best (N, P); lse, h (N, R) when entropy is on. */
void dpnet_pool_entropy_forward(const float *s, const float *inv, int64_t N, int64_t R, int64_t P, int entropy,
                                float *best, float *lse, float *h) {
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; ++n)
        forward_image(s + n * R * P, inv, R, P, entropy, best + n * P, lse + n * R, h + n * R);
}

/* Overwrites s (N, R, P) with ds; writes g_inv = k sum dz s and g_c = -sum ds, both (P,). */
void dpnet_pool_entropy_backward(float *s, const float *inv, const float *lse, const float *h, const float *best,
                                 const float *g, float k, int64_t N, int64_t R, int64_t P, int entropy,
                                 float *g_inv, float *g_c) {
    int T = omp_get_max_threads();
    double *sums = calloc((size_t)T * 2 * P, sizeof(double)); /* per thread: inv (P), c (P) */
    float *scratch = malloc((size_t)T * 3 * P * sizeof(float));
#pragma omp parallel num_threads(T)
    {
        int t = omp_get_thread_num();
        float *taken = scratch + (size_t)t * 3 * P, *acc_inv = taken + P, *acc_c = acc_inv + P;
        double *sum_inv = sums + (size_t)t * 2 * P, *sum_c = sum_inv + P;
#pragma omp for schedule(static)
        for (int64_t n = 0; n < N; ++n) {
            for (int64_t p = 0; p < P; ++p) acc_inv[p] = acc_c[p] = 0.0f;
            backward_image(s + n * R * P, inv, lse + n * R, h + n * R, best + n * P, g + n * P, k, R, P, entropy,
                           taken, acc_inv, acc_c);
            for (int64_t p = 0; p < P; ++p) {
                sum_inv[p] += acc_inv[p];
                sum_c[p] += acc_c[p];
            }
        }
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
    free(scratch);
}
