/* metaopt's native driver: runs the family rule included below (METAOPT_FAMILY_SOURCE) and the
 * hyper-gradient dot products over a param group's flat index space [0, n), split into equal
 * shares (whole 64-byte lines) between OpenMP threads. Built with -fopenmp where the compiler
 * has it; the library then shares torch's OpenMP runtime (libgomp.so.1, already loaded), so its
 * threads are the ones torch's own kernels just used. Without OpenMP it runs on one thread. */
#include "native.h"
#include METAOPT_FAMILY_SOURCE
#ifdef _OPENMP
#include <omp.h>
#endif

/* this thread's share [lo, hi) of [0, n) */
#define METAOPT_SHARE(n)                                                                       \
    int64_t tid = 0, nth = 1;                                                                  \
    METAOPT_THREAD_IDS                                                                         \
    const int64_t chunk = (((n) + nth - 1) / nth + 15) / 16 * 16;                              \
    const int64_t lo = tid * chunk < (n) ? tid * chunk : (n);                                  \
    const int64_t hi = lo + chunk < (n) ? lo + chunk : (n);
#ifdef _OPENMP
#define METAOPT_PARALLEL _Pragma("omp parallel num_threads(nthreads) if (nthreads > 1)")
#define METAOPT_THREAD_IDS tid = omp_get_thread_num(); nth = omp_get_num_threads();
#else
#define METAOPT_PARALLEL
#define METAOPT_THREAD_IDS (void)nthreads;
#endif

#define METAOPT_DOTS_LOOP(BODY)                                                                \
    _Pragma("omp simd reduction(+ : s0, s1, s2, s3)") for (int64_t i = a; i < b; ++i)          \
    {                                                                                          \
        const double gi = (double)g[i];                                                        \
        BODY;                                                                                  \
    }

#define METAOPT_DRIVER(T, SUF)                                                                 \
    /* the rule on every piece (a parameter's part) of [lo, hi) */                             \
    static void metaopt_rule_range_##SUF(int64_t lo, int64_t hi, int64_t nseg,                 \
                                         const int64_t *off, const int64_t *params,            \
                                         const int64_t *grads, int64_t nstate,                 \
                                         const int64_t *state, int64_t ntan,                   \
                                         const int64_t *tangents, const T *coef, T step,       \
                                         const double *hp, const int64_t *opt)                 \
    {                                                                                          \
        metaopt_piece_##SUF pc;                                                                \
        pc.coef = coef;                                                                        \
        pc.step = step;                                                                        \
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
    void metaopt_step_##SUF(int64_t nthreads, int64_t n, int64_t nseg, const int64_t *off,     \
                            const int64_t *params, const int64_t *grads, int64_t nstate,       \
                            const int64_t *state, int64_t ntan, const int64_t *tangents,       \
                            const T *coef, const T *step, const double *hp, const int64_t *opt) \
    {                                                                                          \
        const T t = *step;                                                                     \
        METAOPT_PARALLEL                                                                       \
        {                                                                                      \
            METAOPT_SHARE(n)                                                                   \
            if (lo < hi)                                                                       \
                metaopt_rule_range_##SUF(lo, hi, nseg, off, params, grads, nstate, state,      \
                                         ntan, tangents, coef, t, hp, opt);                    \
        }                                                                                      \
    }                                                                                          \
                                                                                               \
    /* out[tid * ntan + k] = this thread's share of sum(grad * tangent_k), in double. One      \
     * loop reads the gradient and up to four tangents side by side (a stream each). */        \
    static void metaopt_dots_range_##SUF(int64_t lo, int64_t hi, int64_t nseg,                \
                                         const int64_t *off, const int64_t *grads,             \
                                         int64_t ntan, const int64_t *tangents, double *out)   \
    {                                                                                          \
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
    }                                                                                          \
                                                                                               \
    /* out: nthreads rows of ntan partial sums (rows of absent threads are left alone) */      \
    void metaopt_dots_##SUF(int64_t nthreads, int64_t n, int64_t nseg, const int64_t *off,     \
                            const int64_t *grads, int64_t ntan, const int64_t *tangents,       \
                            double *out)                                                       \
    {                                                                                          \
        METAOPT_PARALLEL                                                                       \
        {                                                                                      \
            METAOPT_SHARE(n)                                                                   \
            if (lo < hi)                                                                       \
                metaopt_dots_range_##SUF(lo, hi, nseg, off, grads, ntan, tangents,             \
                                         out + tid * ntan);                                    \
        }                                                                                      \
    }

METAOPT_DRIVER(float, f32)
METAOPT_DRIVER(double, f64)

/* 1 when built with OpenMP */
int metaopt_openmp(void)
{
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}
