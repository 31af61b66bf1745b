/* The ABI between metaopt's native driver (driver.c) and a family's C rule.
 *
 * A family's rule sees one contiguous piece of a param group at a time: the parameter and its
 * gradient, the family's state buffers (in the order the family names them) and the tangent
 * buffers (one per learned coefficient, in the optimizer's learned order), all offset to the
 * piece's first element. It must define, for both element types,
 *
 *     static void metaopt_rule_f32(const metaopt_piece_f32 *pc);
 *     static void metaopt_rule_f64(const metaopt_piece_f64 *pc);
 *
 * coef: every coefficient's current value (the family space's order); step: t, equal for the
 * whole group; hp: the group's hyperparameters (the family's pydantic field order) as doubles;
 * opt: the family's own integer options (e.g. which tangent slot holds which coefficient).
 */
#ifndef METAOPT_NATIVE_H
#define METAOPT_NATIVE_H
#include <math.h>
#include <stdint.h>

#define METAOPT_MAX_BUFFERS 16

#define METAOPT_DECLARE_PIECE(T, SUF)                                                          \
    typedef struct {                                                                           \
        int64_t n;                                                                             \
        T *param;                                                                              \
        const T *grad;                                                                         \
        T *state[METAOPT_MAX_BUFFERS];                                                         \
        T *tangent[METAOPT_MAX_BUFFERS];                                                       \
        const T *coef;                                                                         \
        T step;                                                                                \
        const double *hp;                                                                      \
        const int64_t *opt;                                                                    \
    } metaopt_piece_##SUF;

METAOPT_DECLARE_PIECE(float, f32)
METAOPT_DECLARE_PIECE(double, f64)

#define METAOPT_INLINE static inline __attribute__((always_inline))

/* dst[0:n] = src[0:n] with non-temporal stores where the CPU has them: for buffers a kernel
 * writes without reading (tangents), so that their cache lines are not first read from memory.
 * Call metaopt_store_fence() before the kernel returns. */
#if defined(__AVX__) && !defined(METAOPT_NO_STREAM)
#include <immintrin.h>
METAOPT_INLINE void metaopt_stream_f32(float *dst, const float *src, int64_t n)
{
    int64_t i = 0;
    for (; i < n && ((uintptr_t)(dst + i) & 31); ++i) dst[i] = src[i];
    for (; i + 8 <= n; i += 8) _mm256_stream_ps(dst + i, _mm256_loadu_ps(src + i));
    for (; i < n; ++i) dst[i] = src[i];
}
METAOPT_INLINE void metaopt_stream_f64(double *dst, const double *src, int64_t n)
{
    int64_t i = 0;
    for (; i < n && ((uintptr_t)(dst + i) & 31); ++i) dst[i] = src[i];
    for (; i + 4 <= n; i += 4) _mm256_stream_pd(dst + i, _mm256_loadu_pd(src + i));
    for (; i < n; ++i) dst[i] = src[i];
}
METAOPT_INLINE void metaopt_store_fence(void) { _mm_sfence(); }
#else
#include <string.h>
METAOPT_INLINE void metaopt_stream_f32(float *dst, const float *src, int64_t n) { memcpy(dst, src, n * sizeof(float)); }
METAOPT_INLINE void metaopt_stream_f64(double *dst, const double *src, int64_t n) { memcpy(dst, src, n * sizeof(double)); }
METAOPT_INLINE void metaopt_store_fence(void) {}
#endif
#endif
