/* MADA's rule and its one-step tangents for metaopt's native path: the arithmetic of
 * MADA.fused_update in plugins/mada.py (default preset, no Lion term), one pass per element.
 * Tested equal to the generic path (the rule differentiated by autograd).
 *
 * state: m̄, n, ṽ, v̄, previous gradient.  coef: β1, β2, β3, c, ρ.  hp: lr, eps, weight decay.
 * opt: [second moment is the running mean, per-moment bias correction,
 *       tangent slot of β1, β2, β3, c, ρ (-1: not learned)]. */

#define MADA_BLOCK 512

/* torch.lerp(a, b, w) = a + w(b - a) for |w| < 0.5, else b - (1 - w)(b - a), as one select and one
 * multiply-add for a weight w that is the same for every element: lo = |w| < 0.5, cw = lo ? w : w - 1
 * (exact for w in [0.5, 1]). The second form keeps float32 exact where the first would cancel
 * (an EMA with β2 = 0.999 from a zero state lost three digits). */
#define MADA_LERP(a, b, lo, cw) (((lo) ? (a) : (b)) + (cw) * ((b) - (a)))

#define MADA_RULE(T, SUF, POW, SQRT)                                                           \
    METAOPT_INLINE void mada_body_##SUF(const metaopt_piece_##SUF *pc, const int MEAN,         \
                                        const int PERM, const int LB1, const int LB2,          \
                                        const int LB3, const int LC, const int LRHO,           \
                                        const int WD)                                          \
    {                                                                                          \
        const T b1 = pc->coef[0], b2 = pc->coef[1], b3 = pc->coef[2], c = pc->coef[3],         \
                rho = pc->coef[4], step = pc->step;                                            \
        const T bc1 = (T)1 - POW(b1, step), bc2 = (T)1 - POW(b2, step);                        \
        const T inv_bc1 = (T)1 / bc1, inv_bc2 = (T)1 / bc2, inv_step = (T)1 / step;            \
        T n_weight = b3, dn_weight = (T)1;                                                     \
        if (PERM) {                                                                            \
            const T bc3 = (T)1 - POW(b3, step);                                                \
            n_weight = b3 / bc3;                                                               \
            dn_weight = (T)1 / bc3 + b3 * step * POW(b3, step - (T)1) / (bc3 * bc3);           \
        }                                                                                      \
        const T dinv_bc1 = step * POW(b1, step - (T)1) / (bc1 * bc1);                          \
        const T dinv_bc2 = step * POW(b2, step - (T)1) / (bc2 * bc2);                          \
        const T neg_lr = -(T)pc->hp[0], eps = (T)pc->hp[1], wd = (T)pc->hp[2];                 \
        /* lerp weights: b1, b2, b3, c, rho, 1/t (MADA_LERP) */                                \
        const int lo1 = fabs((double)b1) < 0.5, lo2 = fabs((double)b2) < 0.5,                  \
                  lo3 = fabs((double)b3) < 0.5, loc = fabs((double)c) < 0.5,                  \
                  lor = fabs((double)rho) < 0.5, lot = fabs((double)inv_step) < 0.5;          \
        const T cw1 = lo1 ? b1 : b1 - (T)1, cw2 = lo2 ? b2 : b2 - (T)1,                        \
                cw3 = lo3 ? b3 : b3 - (T)1, cwc = loc ? c : c - (T)1,                          \
                cwr = lor ? rho : rho - (T)1, cwt = lot ? inv_step : inv_step - (T)1;          \
        /* tangent constants: ∂v/∂ṽ at a tie and for the running mean; sgn + c(1 - sgn) at sgn = -1 */\
        const T w_tie = (T)0.5 + (T)0.5 * rho, w_mean = inv_step + rho * ((T)1 - inv_step);    \
        const T c_neg = (T)2 * c - (T)1, one_b2 = (T)1 - b2, k_rho = one_b2 * ((T)1 - c);      \
        const int64_t *slot = pc->opt + 2;                                                     \
        /* tangents go through a block in L1 and out with streaming stores */                 \
        T tb1[MADA_BLOCK], tb2[MADA_BLOCK], tb3[MADA_BLOCK], tc[MADA_BLOCK], tr[MADA_BLOCK];   \
        for (int64_t i0 = 0; i0 < pc->n; i0 += MADA_BLOCK) {                                   \
        const int64_t n = pc->n - i0 < MADA_BLOCK ? pc->n - i0 : MADA_BLOCK;                   \
        T *restrict P = pc->param + i0;                                                        \
        const T *restrict G = pc->grad + i0;                                                   \
        T *restrict M = pc->state[0] + i0, *restrict N = pc->state[1] + i0;                    \
        T *restrict V = pc->state[2] + i0, *restrict VB = pc->state[3] + i0;                   \
        T *restrict PG = pc->state[4] + i0;                                                    \
        _Pragma("omp simd")                                                                    \
        for (int64_t i = 0; i < n; ++i) {                                                      \
            const T g = G[i], d = g - PG[i];                                                   \
            const T m0 = M[i], n0 = N[i], v0 = V[i], vb0 = VB[i];                              \
            const T m = MADA_LERP(g, m0, lo1, cw1);                                            \
            const T nn = MADA_LERP(d, n0, lo3, cw3);                                           \
            const T gh = g + b3 * d, gh2 = gh * gh;                                            \
            const T vp = MADA_LERP(vb0, v0, lor, cwr);                                         \
            const T diff = gh2 - vp;                                                           \
            /* sign as arithmetic on two comparisons: with sign(±0) = ±0 and sign(NaN) = NaN as  \
               selects, gcc sinks gh2 * sgn into the branches, and a multiply under a condition \
               is not speculated under -ftrapping-math, which kept AVX2 builds scalar. Same      \
               values: where diff is NaN, gh2 or vp is NaN or both are +inf, and yogi is NaN     \
               either way; where diff is ±0 the zero's sign cannot reach the parameters. */      \
            const int pos = diff > 0, neg = diff < 0;                                          \
            const T sgn = (T)pos - (T)neg;                                                     \
            const T yogi = vp + gh2 * sgn;                                                     \
            const T gts = MADA_LERP(yogi, gh2, loc, cwc);                                      \
            const T ve = MADA_LERP(gts, v0, lo2, cw2);                                         \
            const T vbar = MEAN ? MADA_LERP(vb0, ve, lot, cwt)                                 \
                                : (((vb0 > ve) | (vb0 != vb0)) ? vb0 : ve);                    \
            const T v = MADA_LERP(vbar, ve, lor, cwr);                                         \
            const T mh = m * inv_bc1 + nn * n_weight;                                          \
            const T root = SQRT(v * inv_bc2);                                                  \
            const T inv_denom = (T)1 / (root + eps);                                           \
            const T u = mh * inv_denom;                                                        \
            M[i] = m;                                                                          \
            N[i] = nn;                                                                         \
            V[i] = ve;                                                                         \
            VB[i] = vbar;                                                                      \
            PG[i] = g;                                                                         \
            /* tangents: ∂ṽ/∂k, through v̄ (max: 1 where ṽ wins, 1/2 at a tie; mean: 1/t),   \
               mixed by ρ, bias-corrected, then through sqrt and the division */               \
            const int wins = ve > vb0, tie = ve == vb0;                                        \
            /* ∂v/∂ṽ = lerp(w, 1, ρ) = w + ρ(1 - w): w is 1/t (mean) or 1, 1/2, 0 (max), so it \
               is a select among constants; tangents are a·∂m̂ - b·∂v̂ with a = -lr/(√v̂ + ε), \
               b = a·u/(2√v̂), 0 where v̂ = 0 (the generic rule's safe sqrt has slope 0 there) */       \
            const T W = MEAN ? w_mean : (wins ? (T)1 : (tie ? w_tie : rho));                   \
            /* the division computed for every element, then selected (see sgn) */             \
            const T half_inv_any = (T)0.5 / root;                                              \
            const T half_inv_root = root > 0 ? half_inv_any : (T)0;                            \
            const T a = neg_lr * inv_denom, b = a * u * half_inv_root;                         \
            const T bi = b * inv_bc2, bw = bi * W;                                             \
            if (LB3) {                                                                         \
                const T tmh = nn * dn_weight + n_weight * (n0 - d);                            \
                const T sel = pos ? (T)1 : (neg ? c_neg : c);  /* sgn + c(1 - sgn) */          \
                tb3[i] = a * tmh - bw * (one_b2 * ((T)2 * gh * d * sel));                      \
            }                                                                                  \
            if (LC) tc[i] = -(bw * (one_b2 * (gh2 - yogi)));                                   \
            if (LRHO) tr[i] = -(bw * (k_rho * (v0 - vb0)) + bi * (ve - vbar));                 \
            if (LB2) tb2[i] = -(bw * (v0 - gts) + b * (v * dinv_bc2));                         \
            if (LB1) tb1[i] = a * ((m0 - g) * inv_bc1 + m * dinv_bc1);                         \
            P[i] = P[i] + neg_lr * (WD ? u + wd * P[i] : u);                                   \
        }                                                                                      \
        if (LB1) metaopt_stream_##SUF(pc->tangent[slot[0]] + i0, tb1, n);                      \
        if (LB2) metaopt_stream_##SUF(pc->tangent[slot[1]] + i0, tb2, n);                      \
        if (LB3) metaopt_stream_##SUF(pc->tangent[slot[2]] + i0, tb3, n);                      \
        if (LC) metaopt_stream_##SUF(pc->tangent[slot[3]] + i0, tc, n);                        \
        if (LRHO) metaopt_stream_##SUF(pc->tangent[slot[4]] + i0, tr, n);                      \
        }                                                                                      \
        metaopt_store_fence();                                                                 \
    }                                                                                          \
                                                                                               \
    static void metaopt_rule_##SUF(const metaopt_piece_##SUF *pc)                              \
    {                                                                                          \
        const int64_t *o = pc->opt;                                                            \
        const int mean = o[0] != 0, perm = o[1] != 0, wd = pc->hp[2] != 0.0;                   \
        const int lb1 = o[2] >= 0, lb2 = o[3] >= 0, lb3 = o[4] >= 0, lc = o[5] >= 0,           \
                  lrho = o[6] >= 0;                                                            \
        /* the defaults (β3, c, ρ learned; AMSGrad max; Adam bias correction) and the fixed    \
           rule get constant flags, so that the compiler drops the branches; anything else     \
           runs the same body with flags read at run time */                                   \
        if (!mean && !perm && !lb1 && !lb2 && lb3 && lc && lrho) {                             \
            if (wd) mada_body_##SUF(pc, 0, 0, 0, 0, 1, 1, 1, 1);                               \
            else mada_body_##SUF(pc, 0, 0, 0, 0, 1, 1, 1, 0);                                  \
        } else if (!mean && !perm && !lb1 && !lb2 && !lb3 && !lc && !lrho && !wd) {            \
            mada_body_##SUF(pc, 0, 0, 0, 0, 0, 0, 0, 0);                                       \
        } else {                                                                               \
            mada_body_##SUF(pc, mean, perm, lb1, lb2, lb3, lc, lrho, wd);                      \
        }                                                                                      \
    }

MADA_RULE(float, f32, powf, sqrtf)
MADA_RULE(double, f64, pow, sqrt)
