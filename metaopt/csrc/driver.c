/* metaopt's native driver: walks the pieces of a param group that fall in [lo, hi) of its flat
 * index space, for the family rule included below (METAOPT_FAMILY_SOURCE) and for the
 * hyper-gradient dot products. Python splits [0, N) between threads; each call is one thread's
 * share and touches only its own elements (and its own row of the dot-product output). */
#include "native.h"
#include METAOPT_FAMILY_SOURCE

#define METAOPT_DOTS_LOOP(BODY)                                                                \
    _Pragma("omp simd reduction(+ : s0, s1, s2, s3)") for (int64_t i = a; i < b; ++i)          \
    {                                                                                          \
        const double gi = (double)g[i];                                                        \
        BODY;                                                                                  \
    }

#define METAOPT_DRIVER(T, SUF)                                                                 \
    void metaopt_step_##SUF(int64_t lo, int64_t hi, int64_t nseg, const int64_t *off,          \
                            const int64_t *params, const int64_t *grads, int64_t nstate,       \
                            const int64_t *state, int64_t ntan, const int64_t *tangents,       \
                            const T *coef, const T *step, const double *hp, const int64_t *opt) \
    {                                                                                          \
        metaopt_piece_##SUF pc;                                                                \
        pc.coef = coef;                                                                        \
        pc.step = *step;                                                                       \
        pc.hp = hp;                                                                            \
        pc.opt = opt;                                                                          \
        for (int64_t s = 0; s < nseg; ++s) {                                                   \
            int64_t a = off[s] > lo ? off[s] : lo, b = off[s + 1] < hi ? off[s + 1] : hi;      \
            if (a >= b) continue;                                                              \
            pc.n = b - a;                                                                      \
            pc.param = (T *)(intptr_t)params[s] + (a - off[s]);                                \
            pc.grad = (const T *)(intptr_t)grads[s] + (a - off[s]);                            \
            for (int64_t k = 0; k < nstate; ++k) pc.state[k] = (T *)(intptr_t)state[k] + a;    \
            for (int64_t k = 0; k < ntan; ++k) pc.tangent[k] = (T *)(intptr_t)tangents[k] + a; \
            metaopt_rule_##SUF(&pc);                                                           \
        }                                                                                      \
    }                                                                                          \
                                                                                               \
    /* out[k] = sum over [lo, hi) of grad * tangent_k, accumulated in double. One loop reads   \
     * the gradient and every tangent side by side (one stream each, as the prefetcher likes   \
     * it); K above 4 goes four tangents at a time. */                                        \
    void metaopt_dots_##SUF(int64_t lo, int64_t hi, int64_t nseg, const int64_t *off,          \
                            const int64_t *grads, int64_t ntan, const int64_t *tangents,       \
                            double *out)                                                       \
    {                                                                                          \
        for (int64_t k = 0; k < ntan; ++k) out[k] = 0.0;                                       \
        for (int64_t k0 = 0; k0 < ntan; k0 += 4) {                                             \
            const int64_t kk = ntan - k0 < 4 ? ntan - k0 : 4;                                  \
            const T *t0 = (const T *)(intptr_t)tangents[k0];                                   \
            const T *t1 = (const T *)(intptr_t)tangents[k0 + (kk > 1 ? 1 : 0)];                \
            const T *t2 = (const T *)(intptr_t)tangents[k0 + (kk > 2 ? 2 : 0)];                \
            const T *t3 = (const T *)(intptr_t)tangents[k0 + (kk > 3 ? 3 : 0)];                \
            double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;                                     \
            for (int64_t s = 0; s < nseg; ++s) {                                               \
                const int64_t a = off[s] > lo ? off[s] : lo;                                   \
                const int64_t b = off[s + 1] < hi ? off[s + 1] : hi;                           \
                const T *g = (const T *)(intptr_t)grads[s] - off[s];                           \
                switch (kk) {                                                                  \
                case 1:                                                                        \
                    METAOPT_DOTS_LOOP(s0 += gi * (double)t0[i])                                \
                    break;                                                                     \
                case 2:                                                                        \
                    METAOPT_DOTS_LOOP(s0 += gi * (double)t0[i]; s1 += gi * (double)t1[i])      \
                    break;                                                                     \
                case 3:                                                                        \
                    METAOPT_DOTS_LOOP(s0 += gi * (double)t0[i]; s1 += gi * (double)t1[i];      \
                                      s2 += gi * (double)t2[i])                                \
                    break;                                                                     \
                default:                                                                       \
                    METAOPT_DOTS_LOOP(s0 += gi * (double)t0[i]; s1 += gi * (double)t1[i];      \
                                      s2 += gi * (double)t2[i]; s3 += gi * (double)t3[i])      \
                }                                                                              \
            }                                                                                  \
            const double sums[4] = {s0, s1, s2, s3};                                           \
            for (int64_t k = 0; k < kk; ++k) out[k0 + k] = sums[k];                            \
        }                                                                                      \
    }

METAOPT_DRIVER(float, f32)
METAOPT_DRIVER(double, f64)
