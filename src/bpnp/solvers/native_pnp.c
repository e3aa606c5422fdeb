/*
 * bpnp's native CPU forward: the global PnP solve of bpnp/solvers (candidates.py, lm.py, pnp.py)
 * written per problem in C and run over the batch by a few threads.
 *
 * Why: in eager PyTorch a batched solve of small problems costs thousands of tensor
 * operations per call, each a Python dispatch and a pass over memory. Here every problem's
 * data stays in registers and L1 cache: the same algorithm, no dispatch, no temporaries.
 * The algorithm is the torch one step for step (the tests compare both), so the global
 * optimum guarantee carries over:
 *   1. object-space quadratic form Omega (9x9) and T (3x9) with t = T vec(R);
 *   2. damped Newton on SO(3) from the eigenvectors of Omega (both signs) and, for flat or thin
 *      point sets, from the 12 rotations of the tetrahedral group;
 *   3. ranking by object-space error + cheirality, de-duplication, the best few candidates;
 *   4. a few screening LM iterations, then exact-Hessian LM to convergence and Newton polish;
 *   5. the best valid candidate, its exact Hessian and a well-posedness test.
 * Everything is float64. Compiled when the package is built (setup.py; C99; OpenMP, else
 * pthreads, over the batch) and called through ctypes by bpnp.solvers.native.
 */
#include <math.h>
#include <complex.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(BPNP_THREADS)
#include <pthread.h>
#endif

#define MAX_STARTS 30 /* 2 x 9 eigenvector starts + 12 tetrahedral ones */
#define MAX_CAND 9

typedef struct {
    int n;
    const double *x2d; /* n x 2 */
    const double *x3d; /* n x 3 */
    const double *w;   /* n */
    const double *dist; /* 5: k1, k2, p1, p2, k3 (NULL: a pinhole camera) */
    double K[9];
    double m00, m01, m11, c0, c1; /* entries of K / K[2][2] */
    const struct OmegaForm *omega; /* its object-space form, computed beforehand (NULL: when needed) */
} Problem;

static void set_camera(Problem *p, const double *K) {
    memcpy(p->K, K, sizeof p->K);
    p->m00 = K[0] / K[8]; p->m01 = K[1] / K[8]; p->m11 = K[4] / K[8];
    p->c0 = K[2] / K[8]; p->c1 = K[5] / K[8];
}

/* The ray K^-1 [x_i, 1] = (va, vb, 1) of point i (K upper triangular). */
static inline void point_ray(const Problem *p, int i, double *va, double *vb) {
    const double *K = p->K;
    *vb = (p->x2d[2 * i + 1] * K[8] - K[5]) / K[4];
    *va = (p->x2d[2 * i] * K[8] - K[2] - K[1] * *vb) / K[0];
}

/* SolverOptions (bpnp/options.py), field for field in the order of NATIVE_FIELDS: the Python
 * side builds this struct with ctypes and checks its layout (bpnp_options_layout) on load. */
typedef struct {
    int num_candidates, max_iter, global_search, screen_iter;
    double screen_ratio, object_ratio;
    int num_eigvecs, solid_eigvecs;
    double thin_ratio;
    int so3_iters;
    double so3_damping, dedupe, behind_penalty, duplicate_penalty, candidate_cutoff, lm_damping,
        lm_rtol, lm_atol, depth_floor;
    int polish_steps;
    double well_posed_ratio, depth_margin;
    int small_problem;
    double ambiguity_threshold;
    int escalate;
    double escalate_ratio;
    int check_warm_start;
    double warm_start_ratio;
    int cube_starts;
    double escalate_misfit;
} Options;

#define OPTION_FIELDS 30

#ifndef BPNP_SOURCE_DIGEST
#define BPNP_SOURCE_DIGEST "unknown"
#endif
/* The digest of this file the build was made from (setup.py passes it): bpnp.solvers.native
 * refuses a library built from another version of the source. */
const char *bpnp_source_digest(void) { return BPNP_SOURCE_DIGEST; }

/* Byte offsets of the Options fields, in order, and the struct's size (for the layout check). */
int bpnp_options_layout(int64_t *offsets) {
    const size_t o[OPTION_FIELDS] = {
        offsetof(Options, num_candidates), offsetof(Options, max_iter), offsetof(Options, global_search),
        offsetof(Options, screen_iter), offsetof(Options, screen_ratio), offsetof(Options, object_ratio),
        offsetof(Options, num_eigvecs), offsetof(Options, solid_eigvecs), offsetof(Options, thin_ratio),
        offsetof(Options, so3_iters), offsetof(Options, so3_damping), offsetof(Options, dedupe),
        offsetof(Options, behind_penalty), offsetof(Options, duplicate_penalty),
        offsetof(Options, candidate_cutoff), offsetof(Options, lm_damping), offsetof(Options, lm_rtol),
        offsetof(Options, lm_atol), offsetof(Options, depth_floor), offsetof(Options, polish_steps),
        offsetof(Options, well_posed_ratio), offsetof(Options, depth_margin), offsetof(Options, small_problem),
        offsetof(Options, ambiguity_threshold), offsetof(Options, escalate), offsetof(Options, escalate_ratio),
        offsetof(Options, check_warm_start), offsetof(Options, warm_start_ratio), offsetof(Options, cube_starts),
        offsetof(Options, escalate_misfit)};
    for (int k = 0; k < OPTION_FIELDS; k++) offsets[k] = (int64_t)o[k];
    return (int)sizeof(Options);
}

typedef struct {
    double R[9], t[3];
    double cost, g[6], H[36];
    double depth_floor; /* set by the first LM run on this state */
    int evaluated;      /* cost, g, H, depth_floor hold for R, t */
    int conv, iters;
    double second;      /* cost of the best other distinct valid minimum found (INFINITY: none) */
    int trusted;        /* converged and, for a warm-started local refinement, the object-space check */
} LMState;

/* ---------------------------------------------------------------- small linear algebra */

/* Whether all m values are finite. */
static int all_finite(const double *v, size_t m) {
    for (size_t k = 0; k < m; k++)
        if (!isfinite(v[k])) return 0;
    return 1;
}

static void mat3_mul(const double *A, const double *B, double *C) {
    double T[9];
    for (int i = 0; i < 3; i++)
        for (int j = 0; j < 3; j++)
            T[3 * i + j] = A[3 * i] * B[j] + A[3 * i + 1] * B[3 + j] + A[3 * i + 2] * B[6 + j];
    memcpy(C, T, sizeof T);
}

/* The coefficients of Rodrigues' formula R = I + a [v]_x + b [v]_x^2 from th2 = |v|^2, th = |v|
 * and the sine and cosine of th / 2 (sin th = 2 sin(th/2) cos(th/2)), with their Taylor series
 * below |v| = 1e-4, where th, sh and ch are not read. */
static inline void rodrigues_coefficients(double th2, double th, double sh, double ch, double *a, double *b) {
    if (th2 < 1e-8) {
        *a = 1.0 - th2 / 6.0 + th2 * th2 / 120.0;
        *b = 0.5 - th2 / 24.0 + th2 * th2 / 720.0;
    } else {
        double s = sh / th;
        *a = 2.0 * s * ch;
        *b = 2.0 * s * s;
    }
}

/* R = I + a [v]_x + b [v]_x^2 for v = (x, y, z); entry k at R[k * stride] (stride LANES: one lane
 * of a lane array). */
static inline void rodrigues_matrix(double x, double y, double z, double a, double b, double *R, int stride) {
    R[0] = 1.0 - b * (y * y + z * z); R[stride] = -a * z + b * x * y; R[2 * stride] = a * y + b * x * z;
    R[3 * stride] = a * z + b * x * y; R[4 * stride] = 1.0 - b * (x * x + z * z); R[5 * stride] = -a * x + b * y * z;
    R[6 * stride] = -a * y + b * x * z; R[7 * stride] = a * x + b * y * z; R[8 * stride] = 1.0 - b * (x * x + y * y);
}

/* Rodrigues' formula. */
static void rodrigues(const double *v, double *R) {
    double th2 = v[0] * v[0] + v[1] * v[1] + v[2] * v[2], th = 0, sh = 0, ch = 1, a, b;
    if (!(th2 < 1e-8)) { /* one sincos call: GCC fuses a sin and a cos of one argument */
        th = sqrt(th2);
        sh = sin(0.5 * th);
        ch = cos(0.5 * th);
    }
    rodrigues_coefficients(th2, th, sh, ch, &a, &b);
    rodrigues_matrix(v[0], v[1], v[2], a, b, R, 1);
}

/* Any 3x3 matrix read as a unit quaternion (w, x, y, z), w >= 0, by Shepperd's pivoting (as
 * bpnp.geometry.rotmat_to_quaternion). */
static void matrix_to_quaternion(const double *M, double *q) {
    double tr = M[0] + M[4] + M[8];
    double piv[4] = {tr, M[0], M[4], M[8]};
    int k = 0;
    for (int i = 1; i < 4; i++)
        if (piv[i] > piv[k]) k = i;
    switch (k) {
    case 0: q[0] = 1 + tr; q[1] = M[7] - M[5]; q[2] = M[2] - M[6]; q[3] = M[3] - M[1]; break;
    case 1: q[0] = M[7] - M[5]; q[1] = 1 + M[0] - M[4] - M[8]; q[2] = M[1] + M[3]; q[3] = M[2] + M[6]; break;
    case 2: q[0] = M[2] - M[6]; q[1] = M[1] + M[3]; q[2] = 1 - M[0] + M[4] - M[8]; q[3] = M[5] + M[7]; break;
    default: q[0] = M[3] - M[1]; q[1] = M[2] + M[6]; q[2] = M[5] + M[7]; q[3] = 1 - M[0] - M[4] + M[8]; break;
    }
    double nq = sqrt(q[0] * q[0] + q[1] * q[1] + q[2] * q[2] + q[3] * q[3]);
    if (!(nq > 0)) { nq = 1; q[0] = 1; q[1] = q[2] = q[3] = 0; }
    double sgn = q[0] < 0 ? -1.0 / nq : 1.0 / nq;
    for (int i = 0; i < 4; i++) q[i] *= sgn;
}

/* Any 3x3 matrix read as a quaternion, normalised, back to a rotation. */
static void orthonormalise(const double *M, double *R) {
    double q[4];
    matrix_to_quaternion(M, q);
    double w = q[0], x = q[1], y = q[2], z = q[3];
    R[0] = 1 - 2 * (y * y + z * z); R[1] = 2 * (x * y - w * z); R[2] = 2 * (x * z + w * y);
    R[3] = 2 * (x * y + w * z); R[4] = 1 - 2 * (x * x + z * z); R[5] = 2 * (y * z - w * x);
    R[6] = 2 * (x * z - w * y); R[7] = 2 * (y * z + w * x); R[8] = 1 - 2 * (x * x + y * y);
}

/* Rotation vector of R, angle in [0, pi] (as bpnp.geometry.rotmat_to_rvec). */
static void rotation_to_rvec(const double *R, double *rvec) {
    double q[4];
    matrix_to_quaternion(R, q);
    double n = sqrt(q[1] * q[1] + q[2] * q[2] + q[3] * q[3]), w = q[0];
    double scale = n < 1e-6 ? (2.0 / w) * (1.0 - n * n / (3.0 * w * w)) : 2.0 * atan2(n, w) / n;
    for (int i = 0; i < 3; i++) rvec[i] = scale * q[1 + i];
}

/* Eigen-decomposition of symmetric N x N matrices (N <= 9), eigenvalues ascending: Householder
 * reduction to tridiagonal form, then the implicit QL algorithm (as in EISPACK tred2/tql2). The
 * one routine runs one matrix (symmetric_eig) or several side by side in SIMD lanes
 * (symmetric_eig9_lanes, Omega for a chunk of problems): one matrix's QL sweeps are a chain of
 * dependent square roots and divisions, and the lanes run several such chains in each
 * instruction (Omega, AVX2's 8 lanes: 2.9 -> 1.3 us a matrix).
 *
 * Every quantity is an array over the W lanes; lanes that a step does not concern keep their
 * values by selects, so a lane's result does not depend on the others: the same bits whether a
 * matrix runs alone or beside any others. That needs the compiler to leave each multiply and add
 * as written: no FMA contraction (which it applies differently to one-lane and vector code), and
 * with GCC no SLP vectoriser and no function clones either (GCC 12 made vfmaddsub of the QL
 * rotation's two updates under -ffp-contract=off, and its clones did not keep the options). A zero
 * row of the Householder reduction (tred2's skip) runs the same steps with its scale and h taken as
 * 1, which leave everything as the skip does. */
#ifdef __AVX2__
#define EIG_LANES 8
#define EIG_MIN_LANES 4 /* fewer matrices than this: one at a time is faster */
#else
#define EIG_LANES 4
#define EIG_MIN_LANES 3
#endif
#if defined(__clang__)
#define NO_CONTRACT _Pragma("clang fp contract(off)")
#define NO_CONTRACT_FN
#define ALWAYS_INLINE inline __attribute__((always_inline))
#define NOINLINE __attribute__((noinline))
#elif defined(__GNUC__)
#define NO_CONTRACT
#define NO_CONTRACT_FN __attribute__((optimize("fp-contract=off", "no-tree-slp-vectorize")))
#define ALWAYS_INLINE inline __attribute__((always_inline))
#define NOINLINE __attribute__((noipa))
#else
#define NO_CONTRACT
#define NO_CONTRACT_FN
#define ALWAYS_INLINE inline
#define NOINLINE
#endif
#define FOR_W _Pragma("omp simd") for (int L = 0; L < W; L++)

/* sqrt(a^2 + b^2) in each of the W lanes: the direct formula unless it could over- or underflow
 * (libm's hypot is several times slower and was 2% of the solve). */
NO_CONTRACT_FN static ALWAYS_INLINE void hypot_lanes(const int W, const double *a, const double *b, double *r) {
    NO_CONTRACT
    double r2[EIG_LANES];
    int slow = 0;
    FOR_W {
        r2[L] = a[L] * a[L] + b[L] * b[L];
        r[L] = sqrt(r2[L]);
        slow |= !(r2[L] > 1e-290 && r2[L] < 1e290);
    }
    if (slow)
        for (int L = 0; L < W; L++)
            if (!(r2[L] > 1e-290 && r2[L] < 1e290)) r[L] = hypot(a[L], b[L]);
}

/* The decomposition of A[0 .. nl - 1] in W lanes (a constant where this is inlined; lanes nl ..
 * W - 1 hold the identity). V_out[l] (row-major, column j the eigenvector of ev_out[l][j]) only
 * when vectors != 0 (the eigenvalues are the same, bit for bit: the vectors never feed them).
 * Non-finite input gives NaN output. */
NO_CONTRACT_FN static ALWAYS_INLINE void eig_lanes(const int W, int N, int nl, const double *const *A,
                                                   double *const *V_out, double *const *ev_out, int vectors) {
    NO_CONTRACT
    double dw[9 * EIG_LANES], ew[9 * EIG_LANES], Vw[81 * EIG_LANES];
    int bad[EIG_LANES];
#define D(i) (dw + (i) * W)
#define E(i) (ew + (i) * W)
#define LV(i, j) (Vw + ((i) * N + (j)) * W)
    for (int L = 0; L < W; L++) {
        bad[L] = L < nl && !all_finite(A[L], (size_t)N * N);
        for (int k = 0; k < N * N; k++) Vw[k * W + L] = L < nl && !bad[L] ? A[L][k] : (k % (N + 1) == 0);
    }
    for (int j = 0; j < N; j++) FOR_W D(j)[L] = LV(N - 1, j)[L];
    for (int i = N - 1; i > 0; i--) {
        double scale[EIG_LANES], h[EIG_LANES], f[EIG_LANES], g[EIG_LANES], hd[EIG_LANES], hh[EIG_LANES];
        FOR_W {
            scale[L] = 0.0;
            h[L] = 0.0;
        }
        for (int k = 0; k < i; k++) FOR_W scale[L] += fabs(D(k)[L]);
        FOR_W scale[L] = scale[L] == 0.0 ? 1.0 : scale[L];
        for (int k = 0; k < i; k++) FOR_W {
            D(k)[L] /= scale[L];
            h[L] += D(k)[L] * D(k)[L];
        }
        FOR_W {
            f[L] = D(i - 1)[L];
            g[L] = sqrt(h[L]);
            g[L] = f[L] > 0 ? -g[L] : g[L];
            E(i)[L] = scale[L] * g[L];
            h[L] -= f[L] * g[L];
            D(i - 1)[L] = f[L] - g[L];
        }
        for (int j = 0; j < i; j++) FOR_W E(j)[L] = 0.0;
        for (int j = 0; j < i; j++) {
            FOR_W {
                f[L] = D(j)[L];
                LV(j, i)[L] = f[L];
                g[L] = E(j)[L] + LV(j, j)[L] * f[L];
            }
            for (int k = j + 1; k <= i - 1; k++) FOR_W {
                g[L] += LV(k, j)[L] * D(k)[L];
                E(k)[L] += LV(k, j)[L] * f[L];
            }
            FOR_W E(j)[L] = g[L];
        }
        FOR_W {
            f[L] = 0.0;
            hd[L] = h[L] == 0.0 ? 1.0 : h[L];
        }
        for (int j = 0; j < i; j++) FOR_W {
            E(j)[L] /= hd[L];
            f[L] += E(j)[L] * D(j)[L];
        }
        FOR_W hh[L] = f[L] / (hd[L] + hd[L]);
        for (int j = 0; j < i; j++) FOR_W E(j)[L] -= hh[L] * D(j)[L];
        for (int j = 0; j < i; j++) {
            FOR_W {
                f[L] = D(j)[L];
                g[L] = E(j)[L];
            }
            for (int k = j; k <= i - 1; k++) FOR_W LV(k, j)[L] -= (f[L] * E(k)[L] + g[L] * D(k)[L]);
            FOR_W {
                D(j)[L] = LV(i - 1, j)[L];
                LV(i, j)[L] = 0.0;
            }
        }
        FOR_W D(i)[L] = h[L];
    }
    if (!vectors) /* the diagonal of the tridiagonal form, where the accumulation below finds it */
        for (int j = 0; j < N; j++) FOR_W D(j)[L] = LV(j, j)[L];
    for (int i = 0; i < N - 1 && vectors; i++) {
        double hd[EIG_LANES], g[EIG_LANES];
        FOR_W {
            LV(N - 1, i)[L] = LV(i, i)[L];
            LV(i, i)[L] = 1.0;
            hd[L] = D(i + 1)[L] == 0.0 ? 1.0 : D(i + 1)[L];
        }
        for (int k = 0; k <= i; k++) FOR_W D(k)[L] = LV(k, i + 1)[L] / hd[L];
        for (int j = 0; j <= i; j++) {
            FOR_W g[L] = 0.0;
            for (int k = 0; k <= i; k++) FOR_W g[L] += LV(k, i + 1)[L] * LV(k, j)[L];
            for (int k = 0; k <= i; k++) FOR_W LV(k, j)[L] -= g[L] * D(k)[L];
        }
        for (int k = 0; k <= i; k++) FOR_W LV(k, i + 1)[L] = 0.0;
    }
    for (int j = 0; j < N && vectors; j++) FOR_W {
        D(j)[L] = LV(N - 1, j)[L];
        LV(N - 1, j)[L] = 0.0;
    }
    if (vectors) FOR_W LV(N - 1, N - 1)[L] = 1.0;
    /* implicit QL on the tridiagonal matrix (d, e) */
    for (int i = 1; i < N; i++) FOR_W E(i - 1)[L] = E(i)[L];
    FOR_W E(N - 1)[L] = 0.0;
    double f[EIG_LANES], tst1[EIG_LANES];
    FOR_W {
        f[L] = 0.0;
        tst1[L] = 0.0;
    }
    const double eps = 2.220446049250313e-16;
    for (int l = 0; l < N; l++) {
        int m[EIG_LANES], mmax = l;
        int64_t act[EIG_LANES]; /* lanes whose eigenvalue l is not yet split off */
        FOR_W {
            double t = fabs(D(l)[L]) + fabs(E(l)[L]);
            tst1[L] = t > tst1[L] ? t : tst1[L];
        }
        for (int L = 0; L < W; L++) {
            int mm = l;
            while (mm < N - 1 && fabs(E(mm)[L]) > eps * tst1[L]) mm++;
            m[L] = mm;
            mmax = mm > mmax ? mm : mmax;
            act[L] = mm > l;
        }
        for (int guard = 0; guard < 60 && mmax > l; guard++) {
            double g[EIG_LANES], p[EIG_LANES], r[EIG_LANES], one[EIG_LANES], dl1[EIG_LANES], h[EIG_LANES];
            double c[EIG_LANES], c2[EIG_LANES], c3[EIG_LANES], el1[EIG_LANES], s[EIG_LANES], s2[EIG_LANES];
            FOR_W {
                g[L] = D(l)[L];
                p[L] = act[L] ? (D(l + 1)[L] - g[L]) / (2.0 * E(l)[L]) : 0.0;
                one[L] = 1.0;
            }
            hypot_lanes(W, p, one, r);
            FOR_W {
                double rr = p[L] < 0 ? -r[L] : r[L];
                double dl = E(l)[L] / (p[L] + rr), dn = E(l)[L] * (p[L] + rr);
                D(l)[L] = act[L] ? dl : D(l)[L];
                D(l + 1)[L] = act[L] ? dn : D(l + 1)[L];
                dl1[L] = D(l + 1)[L];
                h[L] = g[L] - D(l)[L];
            }
            for (int i = l + 2; i < N; i++) FOR_W D(i)[L] = act[L] ? D(i)[L] - h[L] : D(i)[L];
            FOR_W f[L] = act[L] ? f[L] + h[L] : f[L];
            for (int L = 0; L < W; L++) p[L] = D(m[L])[L];
            FOR_W {
                c[L] = c2[L] = c3[L] = 1.0;
                el1[L] = E(l + 1)[L];
                s[L] = s2[L] = 0.0;
            }
            for (int i = mmax - 1; i >= l; i--) {
                double ei[EIG_LANES], rr[EIG_LANES], cn[EIG_LANES], sn[EIG_LANES];
                int64_t on[EIG_LANES]; /* lanes whose sweep reaches row i */
                FOR_W {
                    on[L] = act[L] & (i < m[L]);
                    ei[L] = E(i)[L];
                }
                hypot_lanes(W, p, ei, rr);
                FOR_W {
                    double gg = c[L] * ei[L], hq = c[L] * p[L];
                    sn[L] = ei[L] / rr[L];
                    cn[L] = p[L] / rr[L];
                    double pn = cn[L] * D(i)[L] - sn[L] * gg;
                    double dn = hq + sn[L] * (cn[L] * gg + sn[L] * D(i)[L]);
                    E(i + 1)[L] = on[L] ? s[L] * rr[L] : E(i + 1)[L];
                    c3[L] = on[L] ? c2[L] : c3[L];
                    c2[L] = on[L] ? c[L] : c2[L];
                    s2[L] = on[L] ? s[L] : s2[L];
                    s[L] = on[L] ? sn[L] : s[L];
                    c[L] = on[L] ? cn[L] : c[L];
                    p[L] = on[L] ? pn : p[L];
                    D(i + 1)[L] = on[L] ? dn : D(i + 1)[L];
                }
                for (int k = 0; k < N && vectors; k++) FOR_W {
                    double hv = LV(k, i + 1)[L], vi = LV(k, i)[L];
                    LV(k, i + 1)[L] = on[L] ? sn[L] * vi + cn[L] * hv : hv;
                    LV(k, i)[L] = on[L] ? cn[L] * vi - sn[L] * hv : vi;
                }
            }
            int any = 0;
            FOR_W {
                double pp = -s[L] * s2[L] * c3[L] * el1[L] * E(l)[L] / dl1[L];
                E(l)[L] = act[L] ? s[L] * pp : E(l)[L];
                D(l)[L] = act[L] ? c[L] * pp : D(l)[L];
                act[L] = act[L] & (fabs(E(l)[L]) > eps * tst1[L]);
                any |= (int)act[L];
            }
            if (!any) break;
        }
        FOR_W {
            D(l)[L] += f[L];
            E(l)[L] = 0.0;
        }
    }
    for (int L = 0; L < nl; L++) {
        double *ev = ev_out[L], *V = vectors ? V_out[L] : NULL;
        for (int i = 0; i < N; i++) ev[i] = bad[L] ? NAN : D(i)[L];
        for (int k = 0; k < N * N && vectors; k++) V[k] = bad[L] ? NAN : Vw[k * W + L];
        for (int i = 0; i < N; i++) { /* selection sort of the eigenpairs */
            int mm = i;
            for (int j = i + 1; j < N; j++)
                if (ev[j] < ev[mm]) mm = j;
            if (mm != i) {
                double tmp = ev[i]; ev[i] = ev[mm]; ev[mm] = tmp;
                for (int k = 0; k < N && vectors; k++) {
                    tmp = V[k * N + i]; V[k * N + i] = V[k * N + mm]; V[k * N + mm] = tmp;
                }
            }
        }
    }
#undef D
#undef E
#undef LV
}

/* One symmetric N x N matrix (N <= 9): A read only; column j of V (row-major, V[i*N+j]) is the
 * eigenvector of ev[j]; V = NULL: eigenvalues only (a 6x6 takes a third of the time). */
NO_CONTRACT_FN NOINLINE static void symmetric_eig(int N, const double *A, double *V, double *ev) {
    NO_CONTRACT
    eig_lanes(1, N, 1, &A, &V, &ev, V != NULL);
}

/* nl <= EIG_LANES 9 x 9 matrices side by side: symmetric_eig's results, bit for bit. */
NO_CONTRACT_FN NOINLINE static void symmetric_eig9_lanes(int nl, const double *const *A, double *const *V, double *const *ev) {
    NO_CONTRACT
    eig_lanes(EIG_LANES, 9, nl, A, V, ev, 1);
}

/* Exported for the tests: symmetric_eig. */
void bpnp_symmetric_eig(int N, const double *A, double *V, double *ev) { symmetric_eig(N, A, V, ev); }

/* Exported for the tests: symmetric_eig9_lanes over m matrices (A, 9 x 9 each, row-major; V and
 * ev as symmetric_eig's, one after another), EIG_LANES at a time; returns EIG_LANES. */
int bpnp_symmetric_eig9_lanes(int m, const double *A, double *V, double *ev) {
    for (int k = 0; k < m; k += EIG_LANES) {
        int nl = m - k < EIG_LANES ? m - k : EIG_LANES;
        const double *As[EIG_LANES];
        double *Vs[EIG_LANES], *evs[EIG_LANES];
        for (int l = 0; l < nl; l++) {
            As[l] = A + 81 * (size_t)(k + l);
            Vs[l] = V + 81 * (size_t)(k + l);
            evs[l] = ev + 9 * (size_t)(k + l);
        }
        symmetric_eig9_lanes(nl, As, Vs, evs);
    }
    return EIG_LANES;
}

/* Symmetric 3x3 solve by cofactors; 0 (and x = 0) unless A is positive definite. */
static int solve3_spd(const double *A, const double *g, double *x) {
    double a = A[0], b = A[1], c = A[2], d = A[4], e = A[5], f = A[8];
    double c00 = d * f - e * e, c01 = c * e - b * f, c02 = b * e - c * d;
    double c11 = a * f - c * c, c12 = b * c - a * e, c22 = a * d - b * b;
    double det = a * c00 + b * c01 + c * c02;
    if (!(a > 0 && c22 > 0 && det > 0)) { x[0] = x[1] = x[2] = 0; return 0; }
    x[0] = (c00 * g[0] + c01 * g[1] + c02 * g[2]) / det;
    x[1] = (c01 * g[0] + c11 * g[1] + c12 * g[2]) / det;
    x[2] = (c02 * g[0] + c12 * g[1] + c22 * g[2]) / det;
    return 1;
}

/* Cholesky factor L (lower, row-major) of symmetric 6x6 A; 0 unless A is positive definite. */
static int cholesky6(const double *A, double *L) {
    memset(L, 0, 36 * sizeof(double));
    for (int j = 0; j < 6; j++) {
        double s = A[j * 6 + j];
        for (int k = 0; k < j; k++) s -= L[j * 6 + k] * L[j * 6 + k];
        if (!(s > 0)) return 0;
        double d = sqrt(s);
        L[j * 6 + j] = d;
        for (int i = j + 1; i < 6; i++) {
            double v = A[i * 6 + j];
            for (int k = 0; k < j; k++) v -= L[i * 6 + k] * L[j * 6 + k];
            L[i * 6 + j] = v / d;
        }
    }
    return 1;
}

/* x = (L L^T)^-1 b by forward and back substitution. */
static void cholesky6_solve(const double *L, const double *b, double *x) {
    double y[6];
    for (int i = 0; i < 6; i++) {
        double v = b[i];
        for (int k = 0; k < i; k++) v -= L[i * 6 + k] * y[k];
        y[i] = v / L[i * 6 + i];
    }
    for (int i = 5; i >= 0; i--) {
        double v = y[i];
        for (int k = i + 1; k < 6; k++) v -= L[k * 6 + i] * x[k];
        x[i] = v / L[i * 6 + i];
    }
}

/* Cholesky solve of A x = b for symmetric 6x6 A; 0 (and x = 0) unless A is positive definite. */
static int solve6_chol(const double *A, const double *b, double *x) {
    double L[36];
    if (!cholesky6(A, L)) {
        memset(x, 0, 6 * sizeof(double));
        return 0;
    }
    cholesky6_solve(L, b, x);
    return 1;
}

/* ---------------------------------------------------------------- reprojection cost */

/* The chart gradient g (6) and Hessian H (36) from the sums of chunk_sums; the rotation
 * curvature (D depends on the chart) needs s P^T only. */
static void assemble_chart(const double *Gr, const double *Gt, const double *sP, const double *Htt,
                           const double *Hrt, const double *Hrr, double *g, double *H) {
    for (int k = 0; k < 3; k++) {
        g[k] = 2.0 * Gr[k];
        g[3 + k] = 2.0 * Gt[k];
    }
    static const int sym[3][3] = {{0, 1, 2}, {1, 3, 4}, {2, 4, 5}};
    double tr = sP[0] + sP[4] + sP[8];
    for (int k = 0; k < 3; k++)
        for (int l = 0; l < 3; l++) {
            double rot = 0.5 * (sP[k * 3 + l] + sP[l * 3 + k]) - (k == l ? tr : 0.0);
            H[k * 6 + l] = 2.0 * (Hrr[sym[k][l]] + rot);
            H[k * 6 + 3 + l] = H[(3 + l) * 6 + k] = 2.0 * Hrt[k * 3 + l];
            H[(3 + k) * 6 + 3 + l] = 2.0 * Htt[sym[k][l]];
        }
}

/* The per-point terms of cost_terms for up to COST_CHUNK points, one array per quantity (so that
 * the sums over the points run several points per SIMD instruction): P = R X, s = dcost_i/dX and
 * Q = d2cost_i/dX2 (both halved; Q00 Q01 Q02 Q11 Q12 Q22). */
#define COST_CHUNK 64
typedef struct {
    double P0[COST_CHUNK], P1[COST_CHUNK], P2[COST_CHUNK], s0[COST_CHUNK], s1[COST_CHUNK], s2[COST_CHUNK];
    double Q00[COST_CHUNK], Q01[COST_CHUNK], Q02[COST_CHUNK], Q11[COST_CHUNK], Q12[COST_CHUNK], Q22[COST_CHUNK];
} PointTerms;

/* Points base .. base + m - 1 (m <= COST_CHUNK) into q; adds their cost to *cost_sum and lowers
 * *seen_min to their smallest unclamped depth among points of positive weight. */
static inline void chunk_terms(const Problem *p, int base, int m, const double *R, const double *t,
                               double min_depth, PointTerms *q, double *cost_sum, double *seen_min) {
    /* Every per-point term is a pull-back through D: gradient D^T s with s = w (d pixel/dX)^T r,
     * and Hessian D^T Q D with Q = w J^T J (Gauss-Newton) + the residual-weighted curvature of
     * the projection, whose only non-zero entries are Q02, Q12, Q22. */
    const double m00 = p->m00, m01 = p->m01, m11 = p->m11, c0 = p->c0, c1 = p->c1;
    const double *x3 = p->x3d + 3 * (size_t)base, *x2 = p->x2d + 2 * (size_t)base, *wp = p->w + base;
    double cost = 0, seen = INFINITY;
    /* Branch-free body, so that the compiler may run several points per SIMD instruction. */
#pragma omp simd reduction(+ : cost) reduction(min : seen)
    for (int i = 0; i < m; i++) {
        const double *X = x3 + 3 * i;
        double w = wp[i];
        double P0 = R[0] * X[0] + R[1] * X[1] + R[2] * X[2];
        double P1 = R[3] * X[0] + R[4] * X[1] + R[5] * X[2];
        double P2 = R[6] * X[0] + R[7] * X[1] + R[8] * X[2];
        double depth = P2 + t[2];
        double seen_i = w > 0 ? depth : INFINITY;
        seen = seen_i < seen ? seen_i : seen;
        double X2 = depth < min_depth ? min_depth : depth;
        double iz = 1.0 / X2;
        double a = (P0 + t[0]) * iz, b = (P1 + t[1]) * iz;
        double ma = m00 * a + m01 * b;
        double ru = ma + c0 - x2[2 * i], rv = m11 * b + c1 - x2[2 * i + 1];
        double wru = w * ru, wrv = w * rv;
        cost += wru * ru + wrv * rv;
        double gu0 = m00 * iz, gu1 = m01 * iz, gu2 = -ma * iz;
        double gv1 = m11 * iz, gv2 = -(m11 * b) * iz;
        double q0 = m00 * wru, q1 = m01 * wru + m11 * wrv, iz2 = iz * iz;
        double wgu0 = w * gu0, wgu1 = w * gu1, wgu2 = w * gu2, wgv1 = w * gv1, wgv2 = w * gv2;
        q->P0[i] = P0; q->P1[i] = P1; q->P2[i] = P2;
        q->s0[i] = wru * gu0; q->s1[i] = wru * gu1 + wrv * gv1; q->s2[i] = wru * gu2 + wrv * gv2;
        q->Q00[i] = wgu0 * gu0; q->Q01[i] = wgu0 * gu1; q->Q11[i] = wgu1 * gu1 + wgv1 * gv1;
        q->Q02[i] = wgu0 * gu2 - q0 * iz2;
        q->Q12[i] = wgu1 * gu2 + wgv1 * gv2 - q1 * iz2;
        q->Q22[i] = wgu2 * gu2 + wgv2 * gv2 + 2.0 * (q0 * a + q1 * b) * iz2;
    }
    *cost_sum += cost;
    if (seen < *seen_min) *seen_min = seen;
}

/* Adds the pull-backs through D = dX/dxi = [-[P]_x, I] of m points' terms to the sums of the
 * chart gradient and Hessian (Gr 3, Gt 3, sP 9, Htt 6, Hrt 9, Hrr 6, in that order). The sums
 * run in passes of a few accumulators each: one pass over all 36 spilled the SIMD registers and
 * took twice the time. */
static inline void chunk_sums(const PointTerms *q, int m, double *sums) {
    double G[6] = {0}, sP[9] = {0}, Htt[6] = {0}, Hrt[9] = {0}, Hrr[6] = {0};
#pragma omp simd reduction(+ : G[:6])
    for (int i = 0; i < m; i++) {
        G[0] += q->P1[i] * q->s2[i] - q->P2[i] * q->s1[i];
        G[1] += q->P2[i] * q->s0[i] - q->P0[i] * q->s2[i];
        G[2] += q->P0[i] * q->s1[i] - q->P1[i] * q->s0[i];
        G[3] += q->s0[i]; G[4] += q->s1[i]; G[5] += q->s2[i];
    }
#pragma omp simd reduction(+ : sP[:9])
    for (int i = 0; i < m; i++) {
        sP[0] += q->s0[i] * q->P0[i]; sP[1] += q->s0[i] * q->P1[i]; sP[2] += q->s0[i] * q->P2[i];
        sP[3] += q->s1[i] * q->P0[i]; sP[4] += q->s1[i] * q->P1[i]; sP[5] += q->s1[i] * q->P2[i];
        sP[6] += q->s2[i] * q->P0[i]; sP[7] += q->s2[i] * q->P1[i]; sP[8] += q->s2[i] * q->P2[i];
    }
#pragma omp simd reduction(+ : Htt[:6])
    for (int i = 0; i < m; i++) {
        Htt[0] += q->Q00[i]; Htt[1] += q->Q01[i]; Htt[2] += q->Q02[i];
        Htt[3] += q->Q11[i]; Htt[4] += q->Q12[i]; Htt[5] += q->Q22[i];
    }
    /* C = [P]_x Q (the rotation-translation block), then C [P]_x^T (rotation-rotation) */
#pragma omp simd reduction(+ : Hrt[:9], Hrr[:6])
    for (int i = 0; i < m; i++) {
        double P0 = q->P0[i], P1 = q->P1[i], P2 = q->P2[i];
        double Q00 = q->Q00[i], Q01 = q->Q01[i], Q02 = q->Q02[i], Q11 = q->Q11[i], Q12 = q->Q12[i], Q22 = q->Q22[i];
        double C00 = -P2 * Q01 + P1 * Q02, C01 = -P2 * Q11 + P1 * Q12, C02 = -P2 * Q12 + P1 * Q22;
        double C10 = P2 * Q00 - P0 * Q02, C11 = P2 * Q01 - P0 * Q12, C12 = P2 * Q02 - P0 * Q22;
        double C20 = -P1 * Q00 + P0 * Q01, C21 = -P1 * Q01 + P0 * Q11, C22 = -P1 * Q02 + P0 * Q12;
        Hrt[0] += C00; Hrt[1] += C01; Hrt[2] += C02;
        Hrt[3] += C10; Hrt[4] += C11; Hrt[5] += C12;
        Hrt[6] += C20; Hrt[7] += C21; Hrt[8] += C22;
        Hrr[0] += -P2 * C01 + P1 * C02;
        Hrr[1] += P2 * C00 - P0 * C02;
        Hrr[2] += -P1 * C00 + P0 * C01;
        Hrr[3] += P2 * C10 - P0 * C12;
        Hrr[4] += -P1 * C10 + P0 * C11;
        Hrr[5] += -P1 * C20 + P0 * C21;
    }
    const double *parts[5] = {G, sP, Htt, Hrt, Hrr};
    static const int sizes[5] = {6, 9, 6, 9, 6};
    for (int k = 0, at = 0; k < 5; at += sizes[k++])
        for (int j = 0; j < sizes[k]; j++) sums[at + j] += parts[k][j];
}

/* OpenCV's radial-tangential lens model at (a, b) (bpnp.geometry.distort): the distorted point
 * (xd, yd), its Jacobian J (J00 J01 J10 J11; symmetric) and the second derivatives: dd[0..2] of
 * xd (aa, ab, bb), dd[3..5] of yd. dist = (k1, k2, p1, p2, k3). */
static inline void distort_point(const double *dist, double a, double b, double *xd, double *yd, double *J,
                                 double *dd) {
    const double k1 = dist[0], k2 = dist[1], p1 = dist[2], p2 = dist[3], k3 = dist[4];
    double r2 = a * a + b * b;
    double radial = 1.0 + r2 * (k1 + r2 * (k2 + r2 * k3));
    double dr = k1 + r2 * (2.0 * k2 + 3.0 * k3 * r2); /* d radial / d r2 */
    double ddr = 2.0 * k2 + 6.0 * k3 * r2;
    *xd = a * radial + 2.0 * p1 * a * b + p2 * (r2 + 2.0 * a * a);
    *yd = b * radial + p1 * (r2 + 2.0 * b * b) + 2.0 * p2 * a * b;
    double cross = 2.0 * a * b * dr + 2.0 * p1 * a + 2.0 * p2 * b;
    J[0] = radial + 2.0 * a * a * dr + 2.0 * p1 * b + 6.0 * p2 * a;
    J[1] = J[2] = cross;
    J[3] = radial + 2.0 * b * b * dr + 6.0 * p1 * b + 2.0 * p2 * a;
    if (dd) {
        double t1 = 2.0 * b * dr + 4.0 * a * a * b * ddr + 2.0 * p1; /* xd_ab = yd_aa */
        double t2 = 2.0 * a * dr + 4.0 * a * b * b * ddr + 2.0 * p2; /* xd_bb = yd_ab */
        dd[0] = 6.0 * a * dr + 4.0 * a * a * a * ddr + 6.0 * p2;
        dd[1] = t1;
        dd[2] = t2;
        dd[3] = t1;
        dd[4] = t2;
        dd[5] = 6.0 * b * dr + 4.0 * b * b * b * ddr + 6.0 * p1;
    }
}

/* chunk_terms for a camera with lens distortion (p->dist): the pixel is K [distort(x/z, y/z), 1]
 * (bpnp.cost.distorted_cost_terms, in closed form). The per-point s and Q take the distortion's
 * Jacobian and curvature; the pull-back through the chart is the same. */
static void chunk_terms_distorted(const Problem *p, int base, int m, const double *R, const double *t,
                                  double min_depth, PointTerms *q, double *cost_sum, double *seen_min) {
    const double m00 = p->m00, m01 = p->m01, m11 = p->m11, c0 = p->c0, c1 = p->c1;
    double cost = 0, seen = *seen_min;
    for (int i = base; i < base + m; i++) {
        const double *X = p->x3d + 3 * i;
        double w = p->w[i];
        double P0 = R[0] * X[0] + R[1] * X[1] + R[2] * X[2];
        double P1 = R[3] * X[0] + R[4] * X[1] + R[5] * X[2];
        double P2 = R[6] * X[0] + R[7] * X[1] + R[8] * X[2];
        double depth = P2 + t[2];
        if (w > 0 && depth < seen) seen = depth;
        double iz = 1.0 / (depth < min_depth ? min_depth : depth), iz2 = iz * iz;
        double a = (P0 + t[0]) * iz, b = (P1 + t[1]) * iz;
        double xd, yd, J[4], dd[6];
        distort_point(p->dist, a, b, &xd, &yd, J, dd);
        double ru = m00 * xd + m01 * yd + c0 - p->x2d[2 * i], rv = m11 * yd + c1 - p->x2d[2 * i + 1];
        cost += w * (ru * ru + rv * rv);
        /* pixel Jacobian in (a, b): A = M J; in X: A J_q with J_q = iz [[1, 0, -a], [0, 1, -b]] */
        double A00 = m00 * J[0] + m01 * J[2], A01 = m00 * J[1] + m01 * J[3], A10 = m11 * J[2], A11 = m11 * J[3];
        double gu0 = A00 * iz, gu1 = A01 * iz, gu2 = -(A00 * a + A01 * b) * iz;
        double gv0 = A10 * iz, gv1 = A11 * iz, gv2 = -(A10 * a + A11 * b) * iz;
        double wru = w * ru, wrv = w * rv;
        double s0 = wru * gu0 + wrv * gv0, s1 = wru * gu1 + wrv * gv1, s2 = wru * gu2 + wrv * gv2;
        /* residual pulled back to the distorted coordinates, then to (a, b) */
        double rx = m00 * wru, ry = m01 * wru + m11 * wrv;
        double sa = rx * J[0] + ry * J[2], sb = rx * J[1] + ry * J[3];
        double Saa = rx * dd[0] + ry * dd[3], Sab = rx * dd[1] + ry * dd[4], Sbb = rx * dd[2] + ry * dd[5];
        double Q00 = w * (gu0 * gu0 + gv0 * gv0) + Saa * iz2;
        double Q01 = w * (gu0 * gu1 + gv0 * gv1) + Sab * iz2;
        double Q11 = w * (gu1 * gu1 + gv1 * gv1) + Sbb * iz2;
        double Q02 = w * (gu0 * gu2 + gv0 * gv2) - sa * iz2 - (a * Saa + b * Sab) * iz2;
        double Q12 = w * (gu1 * gu2 + gv1 * gv2) - sb * iz2 - (a * Sab + b * Sbb) * iz2;
        double Q22 = w * (gu2 * gu2 + gv2 * gv2) + 2.0 * (sa * a + sb * b) * iz2 +
                     (a * a * Saa + 2.0 * a * b * Sab + b * b * Sbb) * iz2;
        int k = i - base;
        q->P0[k] = P0; q->P1[k] = P1; q->P2[k] = P2; q->s0[k] = s0; q->s1[k] = s1; q->s2[k] = s2;
        q->Q00[k] = Q00; q->Q01[k] = Q01; q->Q02[k] = Q02; q->Q11[k] = Q11; q->Q12[k] = Q12; q->Q22[k] = Q22;
    }
    *cost_sum += cost;
    *seen_min = seen;
}

/* Cost, chart gradient and exact chart Hessian (as bpnp.cost.cost_terms with hessian=True; with
 * p->dist, bpnp.cost.distorted_cost_terms): the pose is perturbed as R <- exp([w]_x) R,
 * t <- t + tau. Depths are clamped to min_depth; *seen_depth gets the smallest unclamped depth
 * among points with positive weight. The points are taken COST_CHUNK at a time: their terms,
 * then their sums. */
static double cost_terms(const Problem *p, const double *R, const double *t, double min_depth,
                         double *g, double *H, double *seen_depth) {
    double cost = 0, seen = INFINITY, sums[36] = {0};
    PointTerms q;
    for (int base = 0; base < p->n; base += COST_CHUNK) {
        int m = p->n - base < COST_CHUNK ? p->n - base : COST_CHUNK;
        if (p->dist)
            chunk_terms_distorted(p, base, m, R, t, min_depth, &q, &cost, &seen);
        else
            chunk_terms(p, base, m, R, t, min_depth, &q, &cost, &seen);
        chunk_sums(&q, m, sums);
    }
    if (seen_depth) *seen_depth = seen;
    assemble_chart(sums, sums + 3, sums + 6, sums + 15, sums + 21, sums + 30, g, H);
    return cost;
}

static double evaluate(const Problem *p, const double *R, const double *t, double depth_floor,
                       double *g, double *H) {
    double seen;
    double c = cost_terms(p, R, t, depth_floor, g, H, &seen);
    /* A pose that puts weighted points behind the camera is not a valid trial point. */
    return seen <= depth_floor ? INFINITY : c;
}

/* ---------------------------------------------------------------- Levenberg-Marquardt */


/* As bpnp.solvers.lm.levenberg_marquardt for one problem (Nielsen damping, decrement test,
 * undamped Newton polish of converged answers). */
static void levenberg_marquardt(const Problem *p, const Options *o, LMState *s, int max_iter, int polish_steps) {
    double wsum = 0, pix = 0;
    for (int i = 0; i < p->n; i++) {
        wsum += p->w[i];
        pix += p->x2d[2 * i] * p->x2d[2 * i] + p->x2d[2 * i + 1] * p->x2d[2 * i + 1];
    }
    const double atol = o->lm_atol * wsum * (pix / p->n + 1.0);
    const double rtol = o->lm_rtol;
    /* A continued run (after screening) keeps its state; the damping starts afresh. */
    if (!s->evaluated) {
        s->depth_floor = o->depth_floor * (sqrt(s->t[0] * s->t[0] + s->t[1] * s->t[1] + s->t[2] * s->t[2]) + 1e-300);
        s->cost = evaluate(p, s->R, s->t, s->depth_floor, s->g, s->H);
        s->evaluated = 1;
    }
    const double floor_depth = s->depth_floor;
    s->conv = 0;
    s->iters = 0;
    int done = !isfinite(s->cost);
    double lam = o->lm_damping, nu = 2.0;
    double tR[9], tt[3], tg[6], tH[36], A[36], step[6], ng[6], dR[9];
    for (int it = 1; it <= max_iter && !done; it++) {
        s->iters = it;
        double dmax = 0, diag[6];
        for (int k = 0; k < 6; k++) {
            diag[k] = fabs(s->H[k * 7]);
            if (diag[k] > dmax) dmax = diag[k];
        }
        double floor = 1e-12 * dmax + 2.2250738585072014e-308;
        memcpy(A, s->H, sizeof A);
        for (int k = 0; k < 6; k++) A[k * 7] += lam * (diag[k] > floor ? diag[k] : floor);
        for (int k = 0; k < 6; k++) ng[k] = -s->g[k];
        int pd = solve6_chol(A, ng, step);
        rodrigues(step, dR);
        mat3_mul(dR, s->R, tR);
        for (int k = 0; k < 3; k++) tt[k] = s->t[k] + step[3 + k];
        double tc = evaluate(p, tR, tt, floor_depth, tg, tH);
        double g_step = 0, sHs = 0;
        for (int k = 0; k < 6; k++) {
            g_step += s->g[k] * step[k];
            double hs = 0;
            for (int l = 0; l < 6; l++) hs += s->H[k * 6 + l] * step[l];
            sHs += step[k] * hs;
        }
        double predicted = -(g_step + 0.5 * sHs);
        int ok = pd && isfinite(tc) && tc <= s->cost;
        double rho = (s->cost - tc) / (fabs(predicted) > 0 ? predicted : 1.0);
        double shrink = 1.0 - pow(2.0 * rho - 1.0, 3);
        if (!(shrink >= 0.1)) shrink = 0.1;
        lam = ok ? lam * shrink : lam * nu;
        lam = lam < 1e-15 ? 1e-15 : (lam > 1e30 ? 1e30 : lam);
        nu = ok ? 2.0 : nu * 2.0;
        double tol = rtol * s->cost + atol;
        int newly = ok && (-g_step <= tol);
        int at_floor = !ok && pd && (-g_step <= 1e3 * tol);
        int blown = lam >= 1e20;
        if (ok) {
            memcpy(s->R, tR, sizeof tR);
            memcpy(s->t, tt, sizeof tt);
            memcpy(s->g, tg, sizeof tg);
            memcpy(s->H, tH, sizeof tH);
            s->cost = tc;
        }
        if (newly || (at_floor && !blown)) s->conv = 1;
        if (newly || at_floor || blown) done = 1;
    }
    /* Newton polish: near the optimum the cost change is rounding noise, so a step is taken
     * unless the cost rises beyond that noise. */
    const double tnorm = fabs(s->t[0]) + fabs(s->t[1]) + fabs(s->t[2]);
    for (int k = 0; k < polish_steps && s->conv; k++) {
        for (int l = 0; l < 6; l++) ng[l] = -s->g[l];
        if (!solve6_chol(s->H, ng, step)) break;
        /* A step below float64 resolution cannot move the pose: the answer is final. */
        double rot = fabs(step[0]) + fabs(step[1]) + fabs(step[2]);
        double tra = fabs(step[3]) + fabs(step[4]) + fabs(step[5]);
        if (rot <= 1e-15 && tra <= 1e-15 * tnorm) break;
        rodrigues(step, dR);
        mat3_mul(dR, s->R, tR);
        for (int l = 0; l < 3; l++) tt[l] = s->t[l] + step[3 + l];
        double tc = evaluate(p, tR, tt, floor_depth, tg, tH);
        if (isfinite(tc) && tc <= s->cost + 1e-12 * fabs(s->cost) + 1e3 * atol) {
            memcpy(s->R, tR, sizeof tR);
            memcpy(s->t, tt, sizeof tt);
            memcpy(s->g, tg, sizeof tg);
            memcpy(s->H, tH, sizeof tH);
            s->cost = tc;
        }
    }
}

/* ---------------------------------------------------------------- global initialisation */

/* Rotation k (0..11) of the tetrahedral group: the even permutation matrices with an even
 * number of sign flips (the order of bpnp.solvers.candidates._rotation_group). */
static void tetra_rotation(int k, double *R) {
    static const int perms[3][3] = {{0, 1, 2}, {1, 2, 0}, {2, 0, 1}};
    static const double signs[4][3] = {{1, 1, 1}, {1, -1, -1}, {-1, 1, -1}, {-1, -1, 1}};
    memset(R, 0, 9 * sizeof(double));
    for (int r = 0; r < 3; r++) R[3 * r + perms[k / 4][r]] = signs[k % 4][r];
}

/* The SO(3) search runs LANES starts side by side: every quantity of a start is an array over
 * the lanes, and each step is a loop over them that the compiler turns into SIMD instructions
 * (one start's 3x3 algebra is too narrow for them). Lanes that are done are masked, not branched
 * on. With AVX2, 8 lanes (two registers per quantity: independent chains that hide latency, and
 * the 8 starts of a solid point set in one pass) were 2.5% faster than 4; with SSE2, 4. */
#ifdef __AVX2__
#define LANES 8
#else
#define LANES 4
#endif
#define FOR_LANES _Pragma("omp simd") for (int l = 0; l < LANES; l++)

/* sin and cos of x >= 0 in each lane: reduction by pi/2 in two parts (Cody and Waite), then the
 * polynomials of fdlibm's __kernel_sin and __kernel_cos on [-pi/4, pi/4] (within 2 ulp of libm
 * on the angles of the search). Lanes at or above 1e5 (or NaN) take libm's. */
static inline void sincos_lanes(const double *x, double *s, double *c) {
    FOR_LANES {
        double v = x[l] < 1e5 ? x[l] : 0.0;
        int quadrant = (int)(v * 0.63661977236758134308 + 0.5); /* v >= 0: truncation rounds */
        double q = quadrant;
        double r = (v - q * 1.57079632673412561417e+00) - q * 6.07710050650619224932e-11;
        double z = r * r;
        double sp = r + r * z * (-1.66666666666666324348e-01 + z * (8.33333333332248946124e-03 +
                    z * (-1.98412698298579493134e-04 + z * (2.75573137070700676789e-06 +
                    z * (-2.50507602534068634195e-08 + z * 1.58969099521155010221e-10)))));
        double cp = 1.0 - 0.5 * z + z * z * (4.16666666666666019037e-02 + z * (-1.38888888888741095749e-03 +
                    z * (2.48015872894767294178e-05 + z * (-2.75573143513906633035e-07 +
                    z * (2.08757232129817482790e-09 + z * -1.13596475577881948265e-11)))));
        int k = quadrant & 3;
        double ss = (k & 1) ? cp : sp, cc = (k & 1) ? sp : cp;
        s[l] = k >= 2 ? -ss : ss;
        c[l] = (k == 1 || k == 2) ? -cc : cc;
    }
    for (int l = 0; l < LANES; l++)
        if (!(x[l] < 1e5)) {
            s[l] = sin(x[l]);
            c[l] = cos(x[l]);
        }
}

/* rodrigues in each lane. */
static inline void rodrigues_lanes(const double (*v)[LANES], double (*R)[LANES]) {
    double sh[LANES], ch[LANES], half[LANES], th[LANES];
    FOR_LANES {
        th[l] = sqrt(v[0][l] * v[0][l] + v[1][l] * v[1][l] + v[2][l] * v[2][l]);
        half[l] = 0.5 * th[l];
    }
    sincos_lanes(half, sh, ch);
    FOR_LANES {
        double x = v[0][l], y = v[1][l], z = v[2][l], a, b;
        rodrigues_coefficients(x * x + y * y + z * z, th[l], sh[l], ch[l], &a, &b);
        rodrigues_matrix(x, y, z, a, b, &R[0][l], LANES);
    }
}

/* r^T Om r for a symmetric Om and o_r = Om r, in each lane (the sums in the order of quad9). */
static inline void quad9_lanes(const double *Om, const double (*r)[LANES], double (*o_r)[LANES], double *h) {
    double acc[9][LANES];
    for (int i = 0; i < 9; i++) FOR_LANES acc[i][l] = Om[i] * r[0][l];
    for (int j = 1; j < 9; j++)
        for (int i = 0; i < 9; i++) FOR_LANES acc[i][l] += Om[j * 9 + i] * r[j][l];
    FOR_LANES h[l] = 0;
    for (int i = 0; i < 9; i++) FOR_LANES {
        o_r[i][l] = acc[i][l];
        h[l] += r[i][l] * acc[i][l];
    }
}

/* solve3_spd in each lane: pd[l] = 0 (and x = 0) where A is not positive definite. */
static inline void solve3_lanes(const double (*A)[LANES], const double (*g)[LANES], double (*x)[LANES], int64_t *pd) {
    FOR_LANES {
        double a = A[0][l], b = A[1][l], c = A[2][l], d = A[4][l], e = A[5][l], f = A[8][l];
        double c00 = d * f - e * e, c01 = c * e - b * f, c02 = b * e - c * d;
        double c11 = a * f - c * c, c12 = b * c - a * e, c22 = a * d - b * b;
        double det = a * c00 + b * c01 + c * c02;
        int64_t ok = a > 0 && c22 > 0 && det > 0;
        double inv = ok ? 1.0 / det : 0.0;
        x[0][l] = (c00 * g[0][l] + c01 * g[1][l] + c02 * g[2][l]) * inv;
        x[1][l] = (c01 * g[0][l] + c11 * g[1][l] + c12 * g[2][l]) * inv;
        x[2][l] = (c02 * g[0][l] + c12 * g[1][l] + c22 * g[2][l]) * inv;
        pd[l] = ok;
    }
}

/* r^T Om r for a symmetric Om (one rotation, as quad9_lanes). */
static double quad9(const double *Om, const double *r) {
    double acc[9];
    for (int i = 0; i < 9; i++) acc[i] = Om[i] * r[0];
    for (int j = 1; j < 9; j++)
        for (int i = 0; i < 9; i++) acc[i] += Om[j * 9 + i] * r[j];
    double h = 0;
    for (int i = 0; i < 9; i++) h += r[i] * acc[i];
    return h;
}

/* The converged minima of one Omega's starts so far (rotations, costs and the starts that found
 * them). */
typedef struct {
    int m;
    double R[MAX_STARTS][9], h[MAX_STARTS];
    int start[MAX_STARTS];
} SO3Minima;

/* Gradient g, Gauss-Newton Hgn and exact Hessian H (3x3, row-major) of vec(R)^T Om vec(R) on the
 * chart R <- exp([d]_x) R at R, given o_r = Om vec(R), in each lane. */
static inline void so3_derivatives_lanes(const double *Om, const double (*R)[LANES], const double (*o_r)[LANES],
                                         double (*g)[LANES], double (*Hgn)[LANES], double (*H)[LANES]) {
    /* d vec(R) / d d_a = vec([e_a]_x R): row a has two non-zero 3-blocks, sign * (row src of R)
     * in block blk. */
    static const int blk[3][2] = {{1, 2}, {0, 2}, {0, 1}};
    static const int src[3][2] = {{2, 1}, {2, 0}, {1, 0}};
    static const double sgn[3][2] = {{-1, 1}, {1, -1}, {-1, 1}};
    double JO[3][9][LANES], N[9][LANES];
    for (int a = 0; a < 3; a++) {
        const double (*u)[LANES] = R + 3 * src[a][0], (*v)[LANES] = R + 3 * src[a][1];
        const double *Ou = Om + 27 * blk[a][0], *Ov = Om + 27 * blk[a][1];
        const double (*gu)[LANES] = o_r + 3 * blk[a][0], (*gv)[LANES] = o_r + 3 * blk[a][1];
        double su = sgn[a][0], sv = sgn[a][1];
        FOR_LANES g[a][l] = 2.0 * (su * (u[0][l] * gu[0][l] + u[1][l] * gu[1][l] + u[2][l] * gu[2][l]) +
                                   sv * (v[0][l] * gv[0][l] + v[1][l] * gv[1][l] + v[2][l] * gv[2][l]));
        for (int j = 0; j < 9; j++) FOR_LANES
            JO[a][j][l] = su * (u[0][l] * Ou[j] + u[1][l] * Ou[9 + j] + u[2][l] * Ou[18 + j]) +
                          sv * (v[0][l] * Ov[j] + v[1][l] * Ov[9 + j] + v[2][l] * Ov[18 + j]);
    }
    for (int a = 0; a < 3; a++)
        for (int b = a; b < 3; b++) {
            const double (*u)[LANES] = R + 3 * src[b][0], (*v)[LANES] = R + 3 * src[b][1];
            const double (*ju)[LANES] = JO[a] + 3 * blk[b][0], (*jv)[LANES] = JO[a] + 3 * blk[b][1];
            FOR_LANES {
                double val = sgn[b][0] * (ju[0][l] * u[0][l] + ju[1][l] * u[1][l] + ju[2][l] * u[2][l]) +
                             sgn[b][1] * (jv[0][l] * v[0][l] + jv[1][l] * v[1][l] + jv[2][l] * v[2][l]);
                Hgn[a * 3 + b][l] = Hgn[b * 3 + a][l] = 2.0 * val;
            }
        }
    /* N = R reshape(o_r)^T */
    for (int a = 0; a < 3; a++)
        for (int b = 0; b < 3; b++) FOR_LANES
            N[a * 3 + b][l] = R[a * 3][l] * o_r[b * 3][l] + R[a * 3 + 1][l] * o_r[b * 3 + 1][l] +
                              R[a * 3 + 2][l] * o_r[b * 3 + 2][l];
    for (int a = 0; a < 3; a++)
        for (int b = 0; b < 3; b++) FOR_LANES
            H[a * 3 + b][l] = Hgn[a * 3 + b][l] + N[a * 3 + b][l] + N[b * 3 + a][l] -
                              (a == b ? 2.0 * (N[0][l] + N[4][l] + N[8][l]) : 0.0);
}

/* The state of LANES starts of the SO(3) search. 64-bit flags: as wide as the doubles they
 * select, for the SIMD selects. */
typedef struct {
    double R[9][LANES], o_r[9][LANES], h[LANES], lam[LANES]; /* o_r = Om vec(R), h = vec(R)^T o_r */
    int64_t active[LANES]; /* still iterating */
    int64_t fresh[LANES];  /* R moved in the last step (else only the damping changed) */
    int64_t final[LANES];  /* R is a minimum of found (already orthonormal) */
} SO3Lanes;

/* An active lane that moved and now lies within 1e-4 (Frobenius) of a minimum of found takes the
 * first such minimum and stops; same_as[l] names the start that found it. */
static void so3_join_found(SO3Lanes *L, const SO3Minima *found, int nl, int *same_as) {
    int64_t join[LANES];
    FOR_LANES join[l] = -1;
    for (int q = 0; q < found->m; q++) {
        const double *Rq = found->R[q];
        double d2[LANES];
        FOR_LANES d2[l] = 0;
        for (int k = 0; k < 9; k++) FOR_LANES d2[l] += (L->R[k][l] - Rq[k]) * (L->R[k][l] - Rq[k]);
        FOR_LANES join[l] = (join[l] < 0 && L->active[l] && L->fresh[l] && d2[l] < 1e-8) ? q : join[l];
    }
    for (int l = 0; l < nl; l++)
        if (join[l] >= 0) {
            for (int k = 0; k < 9; k++) L->R[k][l] = found->R[join[l]][k];
            L->h[l] = found->h[join[l]];
            same_as[l] = found->start[join[l]];
            L->active[l] = 0;
            L->final[l] = 1;
        }
}

/* The damped Newton step of every lane (pd[l] = 0, step 0, where no damped Hessian is positive
 * definite). After a rejected step R is unchanged, and so are its derivatives: recomputing them
 * for every lane gives the same values. */
static void so3_newton_step(const double *Om, const SO3Lanes *L, double scale, int nl, double (*step)[LANES],
                            int64_t *pd) {
    double grad[3][LANES], Hgn[9][LANES], H[9][LANES], A[9][LANES], ng[3][LANES], damp[3][LANES];
    so3_derivatives_lanes(Om, L->R, L->o_r, grad, Hgn, H);
    for (int a = 0; a < 3; a++) FOR_LANES {
        double d = Hgn[a * 4][l];
        damp[a][l] = L->lam[l] * (d > 1e-12 * scale ? d : 1e-12 * scale);
        ng[a][l] = -grad[a][l];
    }
    for (int k = 0; k < 9; k++) FOR_LANES A[k][l] = H[k][l] + (k % 4 == 0 ? damp[k / 4][l] : 0.0);
    solve3_lanes(A, ng, step, pd);
    int64_t indefinite = 0;
    for (int l = 0; l < nl; l++) indefinite |= L->active[l] && !pd[l];
    if (indefinite) {
        /* Far from a minimum the exact Hessian can be indefinite: Gauss-Newton step. */
        double step2[3][LANES];
        int64_t pd2[LANES];
        for (int k = 0; k < 9; k++) FOR_LANES A[k][l] = Hgn[k][l] + (k % 4 == 0 ? damp[k / 4][l] : 0.0);
        solve3_lanes(A, ng, step2, pd2);
        for (int a = 0; a < 3; a++) FOR_LANES step[a][l] = pd[l] ? step[a][l] : step2[a][l];
        FOR_LANES pd[l] = pd[l] || pd2[l];
    }
}

/* Takes each active lane's step where it does not raise the cost, adapts the damping, and stops
 * (converged[l] = 1) the lanes whose step was below 1e-8 rad. */
static void so3_take_step(const double *Om, SO3Lanes *L, const double (*step)[LANES], const int64_t *pd,
                          int64_t *converged) {
    double dR[9][LANES], Rn[9][LANES], on[9][LANES], hn[LANES];
    rodrigues_lanes(step, dR);
    for (int a = 0; a < 3; a++)
        for (int b = 0; b < 3; b++) FOR_LANES
            Rn[3 * a + b][l] = dR[3 * a][l] * L->R[b][l] + dR[3 * a + 1][l] * L->R[3 + b][l] +
                               dR[3 * a + 2][l] * L->R[6 + b][l];
    quad9_lanes(Om, Rn, on, hn);
    FOR_LANES {
        int64_t ok = L->active[l] && pd[l] && hn[l] <= L->h[l];
        for (int k = 0; k < 9; k++) {
            L->R[k][l] = ok ? Rn[k][l] : L->R[k][l];
            L->o_r[k][l] = ok ? on[k][l] : L->o_r[k][l];
        }
        L->h[l] = ok ? hn[l] : L->h[l];
        double m = ok ? L->lam[l] * 0.1 : L->lam[l] * 10.0;
        L->lam[l] = m < 1e-12 ? 1e-12 : (m > 1e12 ? 1e12 : m);
        L->fresh[l] = ok;
        converged[l] = L->active[l] && pd[l] &&
                       step[0][l] * step[0][l] + step[1][l] * step[1][l] + step[2][l] * step[2][l] < 1e-16;
        L->active[l] = L->active[l] && !converged[l];
    }
}

/* Local minima of vec(R)^T Om vec(R) on SO(3) by damped Newton from each of the S rotations Rs,
 * on the chart R <- exp([d]_x) R (as bpnp.solvers.candidates.minimise_on_so3), LANES starts at a
 * time: at most iters iterations; a start stops once its Newton step is below 1e-8 rad (the
 * minimum to float64's resolution of the cost; the pixel-space LM refines the answer anyway).
 * Writes the minima to Rs and their costs to hs. With found (else NULL): a start that comes within
 * 1e-4 (Frobenius) of a minimum another start converged to takes that minimum instead of
 * converging to it (the torch version runs on; the answers differ by rounding, and 8% of a solve
 * is saved) and same_as[s] names that start (-1: none); converged starts are added to found. */
static void minimise_on_so3(const double *Om, double (*Rs)[9], int S, int iters, double lam0, SO3Minima *found,
                            double *hs, int *same_as) {
    double scale = 0;
    for (int k = 0; k < 9; k++) scale += Om[k * 10];
    if (!(scale > 1e-300)) scale = 1e-300;
    for (int g0 = 0; g0 < S; g0 += LANES) {
        int nl = S - g0 < LANES ? S - g0 : LANES;
        SO3Lanes L;
        for (int l = 0; l < LANES; l++) { /* spare lanes copy the first start and stay inactive */
            for (int k = 0; k < 9; k++) L.R[k][l] = Rs[g0 + (l < nl ? l : 0)][k];
            L.active[l] = l < nl;
            L.lam[l] = lam0;
            L.fresh[l] = 1;
            L.final[l] = 0;
            if (l < nl && same_as) same_as[g0 + l] = -1;
        }
        quad9_lanes(Om, L.R, L.o_r, L.h);
        for (int it = 0; it < iters; it++) {
            if (found) so3_join_found(&L, found, nl, same_as + g0);
            int64_t any = 0;
            for (int l = 0; l < nl; l++) any |= L.active[l];
            if (!any) break;
            double step[3][LANES];
            int64_t pd[LANES], converged[LANES];
            so3_newton_step(Om, &L, scale, nl, step, pd);
            so3_take_step(Om, &L, step, pd, converged);
            for (int l = 0; l < nl && found; l++) /* a converged start can be joined from the next step on */
                if (converged[l]) {
                    double Rl[9];
                    for (int k = 0; k < 9; k++) Rl[k] = L.R[k][l];
                    orthonormalise(Rl, found->R[found->m]);
                    for (int k = 0; k < 9; k++) L.R[k][l] = found->R[found->m][k];
                    found->h[found->m] = L.h[l];
                    found->start[found->m++] = g0 + l;
                    L.final[l] = 1;
                }
        }
        for (int l = 0; l < nl; l++) {
            double Rl[9];
            for (int k = 0; k < 9; k++) Rl[k] = L.R[k][l];
            if (L.final[l]) memcpy(Rs[g0 + l], Rl, sizeof Rl);
            else orthonormalise(Rl, Rs[g0 + l]);
            hs[g0 + l] = L.h[l];
        }
    }
}

/* Adds points base .. base + m - 1 (m <= COST_CHUNK) to the sums of build_omega: A = sum P,
 * Bs = sum P X^T and M = sum P (x) X X^T over the 6 distinct entries of the symmetric P = w (I -
 * v v^T / v^T v) and X X^T (X centred), and writes their cheirality terms to buf (when not
 * NULL). The per-point terms first, then the sums in passes of at most 12 accumulators (as
 * chunk_sums). */
static inline void omega_sums(const Problem *p, int base, int m, const double *centre, double *buf, double *A,
                              double *Bs, double *M) {
    double Ps[6][COST_CHUNK], X[3][COST_CHUNK];
    for (int i = 0; i < m; i++) {
        int pt = base + i;
        double w = p->w[pt];
        double va, vb;
        point_ray(p, pt, &va, &vb);
        double v[3] = {va, vb, 1.0};
        double inv = 1.0 / (va * va + vb * vb + 1.0);
        for (int k = 0; k < 3; k++) X[k][i] = p->x3d[3 * pt + k] - centre[k];
        static const int rows[6] = {0, 0, 0, 1, 1, 2}, cols[6] = {0, 1, 2, 1, 2, 2};
        for (int u = 0; u < 6; u++) Ps[u][i] = w * ((rows[u] == cols[u]) - v[rows[u]] * v[cols[u]] * inv);
        if (buf) {
            double *q = buf + pt;
            size_t n = (size_t)p->n;
            for (int a = 0; a < 3; a++)
                for (int k = 0; k < 3; k++) q[(3 * a + k) * n] = v[a] * X[k][i];
            q[9 * n] = v[0]; q[10 * n] = v[1]; q[11 * n] = v[2]; q[12 * n] = w;
        }
    }
    for (int u0 = 0; u0 < 6; u0 += 3) {
        double a3[3] = {0}, b9[9] = {0};
#pragma omp simd reduction(+ : a3[:3], b9[:9])
        for (int i = 0; i < m; i++)
            for (int u = 0; u < 3; u++) {
                double P = Ps[u0 + u][i];
                a3[u] += P;
                for (int k = 0; k < 3; k++) b9[3 * u + k] += P * X[k][i];
            }
        for (int u = 0; u < 3; u++) {
            A[u0 + u] += a3[u];
            for (int k = 0; k < 3; k++) Bs[3 * (u0 + u) + k] += b9[3 * u + k];
        }
    }
    for (int u0 = 0; u0 < 6; u0 += 2) {
        double m12[12] = {0};
#pragma omp simd reduction(+ : m12[:12])
        for (int i = 0; i < m; i++) {
            double x0 = X[0][i], x1 = X[1][i], x2 = X[2][i];
            double XX[6] = {x0 * x0, x0 * x1, x0 * x2, x1 * x1, x1 * x2, x2 * x2};
            for (int u = 0; u < 2; u++)
                for (int v2 = 0; v2 < 6; v2++) m12[6 * u + v2] += Ps[u0 + u][i] * XX[v2];
        }
        for (int k = 0; k < 12; k++) M[6 * u0 + k] += m12[k];
    }
}

/* The weighted centre of the object points (c, 3); returns the sum of the weights. */
static double weighted_centre(const Problem *p, double *c) {
    double wsum = 0;
    c[0] = c[1] = c[2] = 0;
    for (int i = 0; i < p->n; i++) {
        wsum += p->w[i];
        for (int k = 0; k < 3; k++) c[k] += p->w[i] * p->x3d[3 * i + k];
    }
    for (int k = 0; k < 3; k++) c[k] /= wsum;
    return wsum;
}

/* The object-space quadratic form Omega divided by its trace (On, 9x9; the trace is returned),
 * T (3x9, t = T vec(R) for the centred points), the weighted centre of the points, and per point
 * v X^T, v, w for the cheirality test (buf, 13 x n: term k of point i at k n + i, so that the
 * test runs over points in SIMD lanes; skipped when NULL). */
static double build_omega(const Problem *p, double *On, double *T, double *centre, double *buf) {
    const int n = p->n;
    weighted_centre(p, centre);
    double A[6] = {0}, Bs[18] = {0}, M[36] = {0};
    for (int base = 0; base < n; base += COST_CHUNK)
        omega_sums(p, base, n - base < COST_CHUNK ? n - base : COST_CHUNK, centre, buf, A, Bs, M);
    /* unpack: sym index of (a, c) into the 6 distinct entries */
    static const int sym[3][3] = {{0, 1, 2}, {1, 3, 4}, {2, 4, 5}};
    double full[81], Bm[27];
    for (int a = 0; a < 3; a++)
        for (int c = 0; c < 3; c++) {
            for (int k = 0; k < 3; k++) Bm[a * 9 + c * 3 + k] = Bs[sym[a][c] * 3 + k];
            for (int j = 0; j < 3; j++)
                for (int k = 0; k < 3; k++) full[(a * 3 + j) * 9 + c * 3 + k] = M[sym[a][c] * 6 + sym[j][k]];
        }
    double Asym[9];
    for (int a = 0; a < 3; a++)
        for (int c = 0; c < 3; c++) Asym[a * 3 + c] = A[sym[a][c]];

    /* T = -A^-1 Bm, Omega = full + Bm^T T */
    double Om[81];
    for (int col = 0; col < 9; col++) {
        double b[3] = {-Bm[col], -Bm[9 + col], -Bm[18 + col]}, x[3];
        if (!solve3_spd(Asym, b, x)) x[0] = x[1] = x[2] = NAN;
        for (int a = 0; a < 3; a++) T[a * 9 + col] = x[a];
    }
    for (int r = 0; r < 9; r++)
        for (int c = 0; c < 9; c++)
            Om[r * 9 + c] = full[r * 9 + c] + Bm[r] * T[c] + Bm[9 + r] * T[9 + c] + Bm[18 + r] * T[18 + c];
    double trace = 0;
    for (int r = 0; r < 9; r++) {
        for (int c = 0; c < r; c++) Om[r * 9 + c] = Om[c * 9 + r] = 0.5 * (Om[r * 9 + c] + Om[c * 9 + r]);
        trace += Om[r * 10];
    }
    double norm = trace > 1e-300 ? trace : 1e-300;
    for (int k = 0; k < 81; k++) On[k] = Om[k] / norm;
    return norm;
}

/* A problem's object-space form: build_omega's Omega / trace (On), trace (norm), T, centre and
 * cheirality terms (13 x n, malloc'd; NULL if out of memory or not asked for), and On's
 * eigen-decomposition (V, ev as symmetric_eig's). */
typedef struct OmegaForm {
    double On[81], T[27], centre[3], norm, V[81], ev[9];
    double *terms;
} OmegaForm;

/* The form of p without its eigen-decomposition (its terms when asked for: free them). */
static void omega_form(const Problem *p, OmegaForm *f, int with_terms) {
    f->terms = with_terms ? (double *)malloc(sizeof(double) * 13 * (size_t)p->n) : NULL;
    f->norm = build_omega(p, f->On, f->T, f->centre, f->terms);
}

/* The form of p: the one computed beforehand (p->omega), or here into own (free own->terms when
 * the result is own). */
static const OmegaForm *problem_form(const Problem *p, OmegaForm *own, int with_terms) {
    if (p->omega) return p->omega;
    omega_form(p, own, with_terms);
    symmetric_eig(9, own->On, own->V, own->ev);
    return own;
}

/* The starts of the SO(3) search from the first m eigenvectors of Omega (columns of V, 9 x 9
 * row-major), each with both signs: the eigenvector read as a 3x3 matrix, scaled to the norm of a
 * rotation and made one. Returns their number, 2 m. */
static int eigenvector_starts(const double *V, int m, double (*Rs)[9]) {
    int S = 0;
    for (int e = 0; e < m; e++)
        for (int sg = 0; sg < 2; sg++) {
            double E[9];
            for (int k = 0; k < 9; k++) E[k] = (sg ? -1.0 : 1.0) * V[k * 9 + e] * 1.7320508075688772;
            orthonormalise(E, Rs[S++]);
        }
    return S;
}

/* Candidate poses, best first (as bpnp.solvers.candidates.initial_poses); returns their number.
 * spread: the object's principal variances (object_spread). */
static int initial_poses(const Problem *p, const Options *o, const double *spread, double (*Rc)[9], double (*tc)[3],
                         double *keyc) {
    const int n = p->n;
    OmegaForm own;
    const OmegaForm *form = problem_form(p, &own, 1);
    const double *On = form->On, *T = form->T, *centre = form->centre, norm = form->norm;
    /* v X^T (9), v (3), w of every point (13 x n); NULL (recompute on the fly) if out of memory */
    const double *buf = form->terms;
    /* Flat or thin point sets leave Omega with a near null space in which eigenvectors are poor
     * starts: only then are the fixed starts needed (measured in the torch version). */
    int thin = spread[0] < o->thin_ratio * o->thin_ratio * spread[2];
    int m = thin ? o->num_eigvecs : o->solid_eigvecs;
    if (m > 9) m = 9;
    double Rs[MAX_STARTS][9], hs[MAX_STARTS], ts[MAX_STARTS][3], key[MAX_STARTS];
    int S = eigenvector_starts(form->V, m, Rs);
    if (thin)
        for (int k = 0; k < 12; k++) tetra_rotation(k, Rs[S++]);
    double hmax = 0;
    SO3Minima found;
    found.m = 0;
    int same_as[MAX_STARTS], behinds[MAX_STARTS]; /* the start whose minimum a start took (-1: none) */
    minimise_on_so3(On, Rs, S, o->so3_iters, o->so3_damping, &found, hs, same_as);
    for (int s = 0; s < S; s++) {
        hs[s] *= norm;
        if (fabs(hs[s]) > hmax) hmax = fabs(hs[s]);
    }
    for (int s = 0; s < S; s++) {
        if (same_as[s] >= 0) continue; /* below, once the start it joined has its translation */
        double *R = Rs[s], tcen[3];
        for (int a = 0; a < 3; a++) {
            double v = 0;
            for (int k = 0; k < 9; k++) v += T[a * 9 + k] * R[k];
            tcen[a] = v;
            ts[s][a] = v - (R[a * 3] * centre[0] + R[a * 3 + 1] * centre[1] + R[a * 3 + 2] * centre[2]);
        }
        /* Cheirality: points (with weight) in front of the camera along their rays, i.e.
         * (R X + t_c) . v > 0, evaluated as vec(R) . (v X^T) + t_c . v. */
        int behind = 0;
        if (buf) {
#pragma omp simd reduction(+ : behind)
            for (int i = 0; i < n; i++) {
                double d = tcen[0] * buf[9 * n + i] + tcen[1] * buf[10 * n + i] + tcen[2] * buf[11 * n + i];
                for (int k = 0; k < 9; k++) d += R[k] * buf[k * n + i];
                behind += (buf[12 * n + i] > 0) & !(d > 0);
            }
        } else {
            for (int i = 0; i < n; i++) {
                if (!(p->w[i] > 0)) continue;
                double va, vb;
                point_ray(p, i, &va, &vb);
                double X[3] = {p->x3d[3 * i] - centre[0], p->x3d[3 * i + 1] - centre[1], p->x3d[3 * i + 2] - centre[2]};
                double xc0 = R[0] * X[0] + R[1] * X[1] + R[2] * X[2] + tcen[0];
                double xc1 = R[3] * X[0] + R[4] * X[1] + R[5] * X[2] + tcen[1];
                double xc2 = R[6] * X[0] + R[7] * X[1] + R[8] * X[2] + tcen[2];
                if (!(xc0 * va + xc1 * vb + xc2 > 0)) behind++;
            }
        }
        behinds[s] = behind;
    }
    for (int s = 0; s < S; s++) {
        if (same_as[s] >= 0) { /* the same rotation: the same translation and cheirality */
            memcpy(ts[s], ts[same_as[s]], sizeof ts[s]);
            behinds[s] = behinds[same_as[s]];
        }
        key[s] = hs[s] / (hmax + 1e-300) + o->behind_penalty * behinds[s] / (double)n;
    }
    /* Sort by key; a candidate equal to a better one is pushed to the back. */
    int order[MAX_STARTS];
    for (int s = 0; s < S; s++) order[s] = s;
    for (int s = 1; s < S; s++)
        for (int j = s; j > 0 && key[order[j]] < key[order[j - 1]]; j--) {
            int tmp = order[j]; order[j] = order[j - 1]; order[j - 1] = tmp;
        }
    double key2[MAX_STARTS];
    for (int a = 0; a < S; a++) {
        int sa = order[a], dup = 0;
        for (int b = 0; b < a && !dup; b++) {
            double d = 0;
            for (int k = 0; k < 9; k++) {
                double e = Rs[sa][k] - Rs[order[b]][k];
                d += e * e;
            }
            dup = sqrt(d) < o->dedupe;
        }
        key2[a] = key[sa] + o->duplicate_penalty * dup;
    }
    int order2[MAX_STARTS];
    for (int a = 0; a < S; a++) order2[a] = a;
    for (int s = 1; s < S; s++)
        for (int j = s; j > 0 && key2[order2[j]] < key2[order2[j - 1]]; j--) {
            int tmp = order2[j]; order2[j] = order2[j - 1]; order2[j - 1] = tmp;
        }
    if (form == &own) free(own.terms);
    int k = S < o->num_candidates ? S : o->num_candidates;
    for (int c = 0; c < k; c++) {
        int s = order[order2[c]];
        memcpy(Rc[c], Rs[s], sizeof Rs[s]);
        memcpy(tc[c], ts[s], sizeof ts[s]);
        keyc[c] = key2[order2[c]];
    }
    return k;
}

/* Whether a warm-started answer R sits in the global basin by the object-space error (as
 * bpnp.solvers.candidates.warm_start_trusted): its error is at most warm_start_ratio times the best
 * minimum of the eigenvector starts (solid_eigvecs of them, both signs). */
static int object_space_trusted(const Problem *p, const Options *o, const double *R) {
    OmegaForm own;
    const OmegaForm *form = problem_form(p, &own, 0);
    const double *On = form->On;
    if (!all_finite(On, 81)) return 0;
    int m = o->solid_eigvecs > 9 ? 9 : o->solid_eigvecs;
    double Rs[18][9], hs[18], best = INFINITY;
    int S = eigenvector_starts(form->V, m, Rs);
    minimise_on_so3(On, Rs, S, o->so3_iters, o->so3_damping, NULL, hs, NULL);
    for (int s = 0; s < S; s++)
        if (hs[s] < best) best = hs[s];
    return quad9(On, R) <= o->warm_start_ratio * best + 1e-12;
}

/* ---------------------------------------------------------------- one problem */

/* Weighted RMS distance of the object points from their weighted centre: the object's size. */
static double object_size(const Problem *p) {
    double c[3], ss = 0, wsum = weighted_centre(p, c);
    for (int i = 0; i < p->n; i++)
        for (int k = 0; k < 3; k++) {
            double d = p->x3d[3 * i + k] - c[k];
            ss += p->w[i] * d * d;
        }
    return sqrt(ss / wsum);
}

/* A candidate with a weighted point at depth <= 0 is moved along the optical axis until its
 * nearest weighted point is depth_margin object sizes in front of the camera: the LM then starts
 * inside the valid region instead of being discarded (outliers drag object-space minima there). */
static int repair_depth(const Problem *p, double margin, const double *R, double *t) {
    double mind = INFINITY;
    for (int i = 0; i < p->n; i++) {
        if (!(p->w[i] > 0)) continue;
        const double *X = p->x3d + 3 * i;
        double d = R[6] * X[0] + R[7] * X[1] + R[8] * X[2] + t[2];
        if (d < mind) mind = d;
    }
    if (mind <= 0) t[2] += margin - mind;
    return mind <= 0;
}

/* The winner among k answers (alive[c] = 0: skipped; alive NULL: all): the lowest cost, except
 * that the costs within rounding of it (1e-12 relative) tie, and the first converged one of those
 * wins (else the first lowest). A run cut off at max_iter can end an ulp below the converged runs
 * at the same minimum; its flag must not become the answer's. As bpnp.solvers.pnp._winner.
 * Returns -1 when no answer is alive. */
static int winner(const LMState *const *cand, const int *alive, int k) {
    int first = -1;
    for (int c = 0; c < k; c++)
        if ((!alive || alive[c]) && (first < 0 || cand[c]->cost < cand[first]->cost)) first = c;
    if (first < 0 || !isfinite(cand[first]->cost)) return first;
    const double low = cand[first]->cost, band = 1e-12 * fabs(low);
    for (int c = 0; c < k; c++)
        if ((!alive || alive[c]) && cand[c]->conv && fabs(cand[c]->cost - low) <= band) return c;
    return first;
}

/* Whether answer b replaces answer a (winner() of the two; a first). */
static int replaces(const LMState *a, const LMState *b) {
    const LMState *pair[2] = {a, b};
    return winner(pair, NULL, 2) == 1;
}

/* One global search with the options o (candidates, screening, refinement, selection); returns
 * whether a candidate needed the depth repair. */
static int solve_pass(const Problem *p, const Options *o, const double *spread, const double *init, LMState *best) {
    int repaired = 0;
    LMState cand[MAX_CAND + 1];
    int k = 0;
    if (init) {
        memcpy(cand[0].R, init, 9 * sizeof(double));
        memcpy(cand[0].t, init + 9, 3 * sizeof(double));
        cand[0].evaluated = 0;
        k = 1;
    }
    if (!init || o->global_search) {
        double Rc[MAX_CAND][9], tcand[MAX_CAND][3], kc[MAX_CAND];
        int m = initial_poses(p, o, spread, Rc, tcand, kc);
        double margin = o->depth_margin * object_size(p);
        /* Only candidates worth it: distinct basins with (nearly) all points in front of the
         * camera, within object_ratio of the best object-space error; the best always. */
        for (int c = 0; c < m; c++) {
            int worth = kc[c] < o->candidate_cutoff;
            if (o->object_ratio > 0)
                worth = worth && (kc[0] >= 1.0 || kc[c] <= o->object_ratio * kc[0] + 1e-12);
            if (c == 0) worth = 1;
            if (!worth) continue;
            memcpy(cand[k].R, Rc[c], sizeof Rc[c]);
            memcpy(cand[k].t, tcand[c], sizeof tcand[c]);
            repaired |= repair_depth(p, margin, cand[k].R, cand[k].t);
            cand[k].evaluated = 0;
            k++;
        }
    }
    int alive[MAX_CAND + 1];
    for (int c = 0; c < k; c++) alive[c] = 1;
    if (k > 1 && o->screen_iter > 0) {
        /* Screening: a few iterations each, then only those within screen_ratio of the best go
         * on (the others sit in basins that cannot win). */
        double bestc = INFINITY;
        for (int c = 0; c < k; c++) {
            levenberg_marquardt(p, o, &cand[c], o->screen_iter, 0);
            if (isnan(cand[c].cost)) cand[c].cost = INFINITY;
            if (cand[c].cost < bestc) bestc = cand[c].cost;
        }
        for (int c = 0; c < k; c++) alive[c] = cand[c].cost <= o->screen_ratio * bestc + 1e-12;
    }
    int iters = 0;
    const LMState *ptr[MAX_CAND + 1];
    for (int c = 0; c < k; c++) {
        ptr[c] = &cand[c];
        if (!alive[c]) continue;
        levenberg_marquardt(p, o, &cand[c], o->max_iter, o->polish_steps);
        if (cand[c].iters > iters) iters = cand[c].iters;
        if (isnan(cand[c].cost)) cand[c].cost = INFINITY;
    }
    int sel = winner(ptr, alive, k);
    /* The best other minimum: a refined valid candidate whose pose differs from the winner's. */
    double second = INFINITY;
    const LMState *w = &cand[sel];
    double tn = sqrt(w->t[0] * w->t[0] + w->t[1] * w->t[1] + w->t[2] * w->t[2]);
    for (int c = 0; c < k; c++) {
        if (!alive[c] || c == sel || !isfinite(cand[c].cost)) continue;
        double dR = 0, dt = 0;
        for (int j = 0; j < 9; j++) dR += (cand[c].R[j] - w->R[j]) * (cand[c].R[j] - w->R[j]);
        for (int j = 0; j < 3; j++) dt += (cand[c].t[j] - w->t[j]) * (cand[c].t[j] - w->t[j]);
        int distinct = sqrt(dR) > o->dedupe || sqrt(dt) > o->dedupe * tn;
        if (distinct && cand[c].cost < second) second = cand[c].cost;
    }
    *best = cand[sel];
    best->iters = iters;
    best->second = second;
    return repaired;
}

/* A finite cost from the LM means every weighted point is in front of the camera; a (near)
 * singular Hessian means the pose is not determined by the data: well posed when the smallest
 * eigenvalue of H exceeds ratio times the largest (not for a non-finite H). The largest lies
 * between the largest diagonal entry and the trace (H positive definite), so two Cholesky
 * tests of H - ratio * bound * I decide all but a band of width 6x at the threshold, where the
 * eigenvalues do (a sixth of their time). */
static int well_posed(const double *H, double ratio) {
    double Hs[36], L[36], ev[6], trace = 0, diag = 0;
    for (int a = 0; a < 6; a++)
        for (int b = 0; b < 6; b++) Hs[a * 6 + b] = 0.5 * (H[a * 6 + b] + H[b * 6 + a]);
    if (!all_finite(Hs, 36)) return 0;
    for (int a = 0; a < 6; a++) {
        trace += Hs[a * 7];
        if (Hs[a * 7] > diag) diag = Hs[a * 7];
    }
    double bounds[2] = {trace, diag}, A[36];
    for (int k = 0; k < 2; k++) {
        memcpy(A, Hs, sizeof A);
        for (int a = 0; a < 6; a++) A[a * 7] -= ratio * bounds[k];
        int positive = cholesky6(A, L);
        if (k == 0 && positive) return 1; /* smallest > ratio * trace >= ratio * largest */
        if (k == 1 && !positive) return 0; /* smallest <= ratio * diag <= ratio * largest */
    }
    symmetric_eig(6, Hs, NULL, ev);
    double top = fabs(ev[5]) > 1e-300 ? fabs(ev[5]) : 1e-300;
    return ev[0] > ratio * top;
}

/* The squared pixel residual of point i at (R, t), unweighted (weights need not be inverse
 * variances). */
static inline double squared_residual(const Problem *p, int i, const double *R, const double *t) {
    const double *X = p->x3d + 3 * i;
    double P0 = R[0] * X[0] + R[1] * X[1] + R[2] * X[2] + t[0];
    double P1 = R[3] * X[0] + R[4] * X[1] + R[5] * X[2] + t[1];
    double P2 = R[6] * X[0] + R[7] * X[1] + R[8] * X[2] + t[2];
    double a = P0 / P2, b = P1 / P2;
    double ru = p->m00 * a + p->m01 * b + p->c0 - p->x2d[2 * i], rv = p->m11 * b + p->c1 - p->x2d[2 * i + 1];
    return ru * ru + rv * rv;
}

/* Heavy-tailed residuals at (R, t): the largest squared residual exceeds ratio times the median
 * one (points of positive weight; median: the ((m-1)/2)-th smallest), beyond 1e-16. The test
 * top > ratio * v + 1e-16 holds for the median iff it holds for at least (m-1)/2 + 1 of the
 * values (it holds for every value below one it holds for): a count instead of a selection,
 * the same answer. The count reads the residuals the first pass computed (up to KEPT points). */
static int heavy_tailed(const Problem *p, const double *R, const double *t, double ratio) {
    enum { KEPT = 256 }; /* residuals kept for the count (the rest are computed again) */
    double kept[KEPT];
    int m = 0;
    double top = 0;
    for (int i = 0; i < p->n; i++) {
        if (!(p->w[i] > 0)) continue;
        double r2 = squared_residual(p, i, R, t);
        if (i < KEPT) kept[i] = r2;
        m++;
        if (r2 > top) top = r2;
    }
    int below = 0;
    for (int i = 0; i < p->n; i++)
        below += p->w[i] > 0 && top > ratio * (i < KEPT ? kept[i] : squared_residual(p, i, R, t)) + 1e-16;
    return m > 0 && below >= (m - 1) / 2 + 1;
}

/* The fit explains little of the image: the RMS residual at (R, t) exceeds ratio times the RMS
 * spread of the pixels about their weighted mean (points of positive weight). */
static int misfit(const Problem *p, double cost, double ratio) {
    double wsum = 0, m0 = 0, m1 = 0, spread = 0;
    for (int i = 0; i < p->n; i++) {
        wsum += p->w[i];
        m0 += p->w[i] * p->x2d[2 * i];
        m1 += p->w[i] * p->x2d[2 * i + 1];
    }
    m0 /= wsum;
    m1 /= wsum;
    for (int i = 0; i < p->n; i++) {
        double d0 = p->x2d[2 * i] - m0, d1 = p->x2d[2 * i + 1] - m1;
        spread += p->w[i] * (d0 * d0 + d1 * d1);
    }
    return isfinite(cost) && cost > ratio * ratio * spread;
}

static void exhaustive(Options *o) {
    o->num_candidates = MAX_CAND;
    o->object_ratio = 0;
    o->screen_iter = 0;
    o->num_eigvecs = 9;
    o->solid_eigvecs = 9;
    o->thin_ratio = 2.0; /* every point set gets the fixed starts too */
}

/* The k-th of the 24 rotations of the cube (signed permutation matrices of determinant +1), in
 * the order of bpnp.solvers.candidates._rotation_group: permutations in lexicographic order, signs
 * (+,+,+), (+,+,-), ... per row. */
static void cube_rotation(int k, double *R) {
    static const int perms[6][3] = {{0, 1, 2}, {0, 2, 1}, {1, 0, 2}, {1, 2, 0}, {2, 0, 1}, {2, 1, 0}};
    int found = 0;
    for (int a = 0; a < 6; a++)
        for (int sgn = 0; sgn < 8; sgn++) {
            double M[9] = {0};
            for (int r = 0; r < 3; r++) M[3 * r + perms[a][r]] = (sgn >> (2 - r)) & 1 ? -1.0 : 1.0;
            double det = M[0] * (M[4] * M[8] - M[5] * M[7]) - M[1] * (M[3] * M[8] - M[5] * M[6]) +
                         M[2] * (M[3] * M[7] - M[4] * M[6]);
            if (det > 0 && found++ == k) {
                memcpy(R, M, sizeof M);
                return;
            }
        }
}

/* The third pass of an escalated problem (bpnp.solvers.pnp._cube_starts and _cube_select): LM
 * from the 24 cube rotations with the object on the mean ray of its pixels at the depth that
 * matches their spread (moved in front of the camera where needed), screened as the candidates
 * are; the first lowest of the refined starts. */
static void cube_pass(const Problem *p, const Options *o, LMState *out) {
    double wsum = 0, mean[3] = {0, 0, 0};
    for (int i = 0; i < p->n; i++) {
        double va, vb;
        point_ray(p, i, &va, &vb);
        wsum += p->w[i];
        mean[0] += p->w[i] * va; mean[1] += p->w[i] * vb; mean[2] += p->w[i];
    }
    for (int c = 0; c < 3; c++) mean[c] /= wsum;
    double spread = 0;
    for (int i = 0; i < p->n; i++) {
        double va, vb;
        point_ray(p, i, &va, &vb);
        spread += p->w[i] * ((va - mean[0]) * (va - mean[0]) + (vb - mean[1]) * (vb - mean[1]) +
                             (1.0 - mean[2]) * (1.0 - mean[2]));
    }
    spread = sqrt(spread / wsum);
    if (spread < 1e-12) spread = 1e-12;
    double margin = o->depth_margin * object_size(p);
    LMState cand[24];
    for (int k = 0; k < 24; k++) {
        cube_rotation(k, cand[k].R);
        for (int c = 0; c < 3; c++) cand[k].t[c] = mean[c] / spread;
        repair_depth(p, margin, cand[k].R, cand[k].t);
        cand[k].evaluated = 0;
    }
    int alive[24];
    for (int k = 0; k < 24; k++) alive[k] = 1;
    if (o->screen_iter > 0) {
        double bestc = INFINITY;
        for (int k = 0; k < 24; k++) {
            levenberg_marquardt(p, o, &cand[k], o->screen_iter, 0);
            if (isnan(cand[k].cost)) cand[k].cost = INFINITY;
            if (cand[k].cost < bestc) bestc = cand[k].cost;
        }
        for (int k = 0; k < 24; k++) alive[k] = cand[k].cost <= o->screen_ratio * bestc + 1e-12;
    }
    int iters = 0;
    const LMState *ptr[24];
    for (int k = 0; k < 24; k++) {
        ptr[k] = &cand[k];
        if (!alive[k]) continue;
        levenberg_marquardt(p, o, &cand[k], o->max_iter, o->polish_steps);
        if (cand[k].iters > iters) iters = cand[k].iters;
        if (isnan(cand[k].cost)) cand[k].cost = INFINITY;
    }
    int sel = winner(ptr, alive, 24);
    *out = cand[sel];
    out->iters = iters;
    out->second = INFINITY;
}

/* The principal variances of the weighted object points, ascending (ev, 3: the eigenvalues of
 * their weighted covariance; zeros without a positive weight). The thin test of the starts and
 * the needle test read them. */
static void object_spread(const Problem *p, double *ev) {
    /* (weights are finite and >= 0: the zero ones add nothing to the centre) */
    double c[3], cov[9] = {0};
    ev[0] = ev[1] = ev[2] = 0;
    if (!(weighted_centre(p, c) > 0)) return;
    for (int i = 0; i < p->n; i++) {
        if (!(p->w[i] > 0)) continue;
        double d[3];
        for (int k = 0; k < 3; k++) d[k] = p->x3d[3 * i + k] - c[k];
        for (int a = 0; a < 3; a++)
            for (int b = 0; b < 3; b++) cov[3 * a + b] += p->w[i] * d[a] * d[b];
    }
    symmetric_eig(3, cov, NULL, ev);
}

/* A needle: the weighted point set is thin in two directions (its two smaller spreads below
 * thin_ratio^2 of the largest, as variances): the rotation about its axis is barely seen, the
 * object-space minima crowd, and the search missed the best one in 0.3-0.8% of such problems
 * (bpnp.solvers.pnp.needle_like): they are escalated (exhaustive pass and cube starts). */
static int needle_like(const double *spread, double ratio) { return spread[1] < ratio * ratio * spread[2]; }

/* The global solve of one problem. Problems with few points (where the shortcuts of the search
 * cost little and miss most) get the exhaustive search at once; a problem whose candidates had
 * points behind the camera, whose answer has heavy-tailed residuals (outliers, inconsistent
 * data) or whose points form a needle gets it as a second pass, and the better answer wins. */
static void solve_one(const Problem *p, const Options *o, const double *init, LMState *best) {
    int npos = 0;
    for (int i = 0; i < p->n; i++) npos += p->w[i] > 0;
    int global = !init || o->global_search;
    Options full = *o;
    exhaustive(&full);
    double spread[3] = {0, 0, 0};
    if (global) object_spread(p, spread);
    if (npos <= o->small_problem && global) {
        solve_pass(p, &full, spread, init, best);
    } else if (solve_pass(p, o, spread, init, best) ? global && o->escalate
                                            : global && o->escalate &&
                                                  (heavy_tailed(p, best->R, best->t, o->escalate_ratio) ||
                                                   misfit(p, best->cost, o->escalate_misfit) ||
                                                   needle_like(spread, o->thin_ratio))) {
        LMState again;
        solve_pass(p, &full, spread, init, &again);
        if (replaces(best, &again) || (isinf(best->cost) && !isinf(again.cost))) {
            if (best->iters > again.iters) again.iters = best->iters;
            *best = again;
        }
        if (o->cube_starts) {
            LMState third;
            cube_pass(p, o, &third);
            if (replaces(best, &third)) {
                /* the answer it replaces is another minimum, when its pose differs */
                double dR = 0, dt = 0, tn = 0;
                for (int j = 0; j < 9; j++) dR += (third.R[j] - best->R[j]) * (third.R[j] - best->R[j]);
                for (int j = 0; j < 3; j++) {
                    dt += (third.t[j] - best->t[j]) * (third.t[j] - best->t[j]);
                    tn += third.t[j] * third.t[j];
                }
                int distinct = sqrt(dR) > o->dedupe || sqrt(dt) > o->dedupe * sqrt(tn);
                third.second = distinct && best->cost < best->second ? best->cost : best->second;
                if (best->iters > third.iters) third.iters = best->iters;
                *best = third;
            }
        }
    }
    best->conv = best->conv && well_posed(best->H, o->well_posed_ratio) && isfinite(best->cost);
    best->trusted = best->conv && (global || !o->check_warm_start || object_space_trusted(p, o, best->R));
}

/* ---------------------------------------------------------------- entry point */

typedef struct {
    int B, n, x3d_batched, K_batched, w_batched;
    const double *x2d, *x3d, *K, *w, *init;
    const Options *o;
    double *R_out, *t_out, *cost_out, *H_out, *rvec_out;
    uint8_t *conv_out;
    int32_t *iter_out;
    double *second_out;
    uint8_t *trusted_out;
} Batch;

#define CHUNK 8

static volatile int in_forked_child = 0;

#if defined(_OPENMP) && defined(BPNP_THREADS)
static void mark_forked_child(void) { in_forked_child = 1; }

__attribute__((constructor)) static void register_fork_handler(void) {
    pthread_atfork(NULL, NULL, mark_forked_child);
}
#endif

/* Work over a batch: item(job, b) for b in [0, B), or chunk(job, b0, b1) for its chunks of CHUNK
 * items (the same chunks at any thread count), shared by a few threads. */
typedef struct {
    int B;
    void (*item)(void *, int);
    void (*chunk)(void *, int, int);
    void *job;
    int next; /* next unclaimed item (shared by the workers) */
} Work;

static void *work_items(void *arg) {
    Work *wk = (Work *)arg;
    for (;;) {
        /* Dynamic scheduling: problems differ in work (candidates, iterations). */
        int b0 = __atomic_fetch_add(&wk->next, CHUNK, __ATOMIC_RELAXED);
        if (b0 >= wk->B) break;
        int b1 = b0 + CHUNK < wk->B ? b0 + CHUNK : wk->B;
        if (wk->chunk) wk->chunk(wk->job, b0, b1);
        else
            for (int b = b0; b < b1; b++) wk->item(wk->job, b);
    }
    return NULL;
}

/* Runs the work over the batch on up to num_threads threads, in chunks of CHUNK items;
 * forked != 0 (a fork()ed child, as Python saw it) avoids OpenMP. */
static void run_work(Work wk, int num_threads, int forked) {
    int B = wk.B;
    int want = num_threads < 1 ? 1 : num_threads;
    if (want > (B + CHUNK - 1) / CHUNK) want = (B + CHUNK - 1) / CHUNK;
    if (want < 1) want = 1;
    if (want == 1) {
        work_items(&wk);
        return;
    }
#if defined(_OPENMP)
    /* Loaded after PyTorch, this library resolves libgomp to the runtime PyTorch already
     * loaded: the workers are PyTorch's own (warm, often still spinning after the caller's
     * last tensor op), so nothing competes for the cores. libgomp's pool does not survive
     * fork(): in a forked child the plain threads below take over. */
    if (!in_forked_child && !forked) {
#pragma omp parallel num_threads(want)
        work_items(&wk);
        return;
    }
#endif
#if defined(BPNP_THREADS)
    /* Plain threads, started and joined here. */
    pthread_t threads[64];
    int extra = 0;
    if (want > 64) want = 64;
    for (int k = 1; k < want; k++)
        if (pthread_create(&threads[extra], NULL, work_items, &wk) == 0) extra++;
    work_items(&wk);
    for (int k = 0; k < extra; k++) pthread_join(threads[k], NULL);
#else
    (void)forked;
    work_items(&wk);
#endif
}

static void run_items(int B, void (*item)(void *, int), void *job, int num_threads, int forked) {
    Work wk = {B, item, NULL, job, 0};
    run_work(wk, num_threads, forked);
}

static void run_chunks(int B, void (*chunk)(void *, int, int), void *job, int num_threads, int forked) {
    Work wk = {B, NULL, chunk, job, 0};
    run_work(wk, num_threads, forked);
}

static void solve_item(void *arg, int b) {
    Batch *j = (Batch *)arg;
    Problem p;
    int n = j->n;
    p.n = n;
    p.x2d = j->x2d + (size_t)b * n * 2;
    p.x3d = j->x3d + (j->x3d_batched ? (size_t)b * n * 3 : 0);
    p.w = j->w + (j->w_batched ? (size_t)b * n : 0);
    p.dist = NULL;
    p.omega = NULL;
    set_camera(&p, j->K + (j->K_batched ? (size_t)b * 9 : 0));
    LMState s;
    solve_one(&p, j->o, j->init ? j->init + (size_t)b * 12 : NULL, &s);
    memcpy(j->R_out + (size_t)b * 9, s.R, sizeof s.R);
    memcpy(j->t_out + (size_t)b * 3, s.t, sizeof s.t);
    rotation_to_rvec(s.R, j->rvec_out + (size_t)b * 3);
    j->cost_out[b] = s.cost;
    memcpy(j->H_out + (size_t)b * 36, s.H, sizeof s.H);
    j->conv_out[b] = (uint8_t)s.conv;
    j->iter_out[b] = s.iters;
    j->second_out[b] = s.second;
    j->trusted_out[b] = (uint8_t)s.trusted;
}

static int options_in_range(const Options *o) {
    /* The fixed-size buffers bound these; SolverOptions refuses larger values before we get here. */
    return !(o->num_candidates < 1 || o->num_candidates > MAX_CAND || o->num_eigvecs < 1 || o->num_eigvecs > 9 ||
             o->solid_eigvecs < 1 || o->solid_eigvecs > 9);
}

/* Solves B problems. Inputs are C-contiguous float64; a *_batched flag of 0 means one array
 * shared by the batch. init (B x 12: R row-major, t) may be NULL. o: the options (validated by
 * bpnp.options.SolverOptions). Outputs: R (B x 9), its rotation vector (B x 3), t (B x 3), cost
 * (B), H (B x 36), converged (B), iterations (B), the cost of the best other distinct minimum
 * (B), the warm-start check (B). Returns 0, or -1 for options out of the solver's range. */
int bpnp_solve(int B, int n, const double *x2d, const double *x3d, int x3d_batched, const double *K,
               int K_batched, const double *w, int w_batched, const double *init, const Options *o,
               int num_threads, int forked, double *R_out, double *rvec_out, double *t_out, double *cost_out,
               double *H_out, uint8_t *conv_out, int32_t *iter_out, double *second_out, uint8_t *trusted_out) {
    if (!options_in_range(o)) return -1;
    Batch job = {B, n, x3d_batched, K_batched, w_batched, x2d, x3d, K, w, init, o,
                 R_out, t_out, cost_out, H_out, rvec_out, conv_out, iter_out, second_out, trusted_out};
    run_items(B, solve_item, &job, num_threads, forked);
    return 0;
}

/* MSAC score sum_i w_i min(e_i, tau2) of one pose (e_i the squared reprojection error; tau2 for
 * points behind the camera or non-finite errors) and the count of points of positive weight with
 * e_i < tau2. Stops early (score only a lower bound, count partial) once the score exceeds stop. */
static void msac_one(const double *r, const double *tt, const double *xy, const double *X, const double *k,
                     const double *ww, int n, double tau, double stop, double *score_out, int *count_out) {
    double m00 = k[0] / k[8], m01 = k[1] / k[8], m11 = k[4] / k[8], c0 = k[2] / k[8], c1 = k[5] / k[8];
    double score = 0.0;
    int count = 0;
    for (int i = 0; i < n; i++) {
        const double *p = X + 3 * i;
        double z = r[6] * p[0] + r[7] * p[1] + r[8] * p[2] + tt[2];
        double x = r[0] * p[0] + r[1] * p[1] + r[2] * p[2] + tt[0];
        double y = r[3] * p[0] + r[4] * p[1] + r[5] * p[2] + tt[1];
        double iz = 1.0 / z, a = x * iz, bb = y * iz;
        double du = m00 * a + m01 * bb + c0 - xy[2 * i], dv = m11 * bb + c1 - xy[2 * i + 1];
        double e = du * du + dv * dv;
        int in = z > 0 && e < tau; /* false for NaN */
        score += ww[i] * (in ? e : tau);
        count += in && ww[i] > 0;
        if ((i & 7) == 7 && score > stop) break;
    }
    *score_out = score;
    *count_out = count;
}

/* Complex roots of a4 x^4 + ... + a0 (Ferrari; bpnp.solvers.ransac.solve_quartic step for step). */
static void solve_quartic(const double *a, double complex *roots) {
    double complex b3 = a[3] / a[4], b2 = a[2] / a[4], b1 = a[1] / a[4], b0 = a[0] / a[4];
    double complex p = b2 - 3.0 * b3 * b3 / 8.0;
    double complex q = b1 - b3 * b2 / 2.0 + b3 * b3 * b3 / 8.0;
    double complex r = b0 - b3 * b1 / 4.0 + b3 * b3 * b2 / 16.0 - 3.0 * b3 * b3 * b3 * b3 / 256.0;
    double complex c2 = p, c1 = p * p / 4.0 - r, c0 = -q * q / 8.0;
    double complex P = c1 - c2 * c2 / 3.0, Q = 2.0 * c2 * c2 * c2 / 27.0 - c2 * c1 / 3.0 + c0;
    double complex disc = csqrt(Q * Q / 4.0 + P * P * P / 27.0);
    double complex u3 = cabs(-Q / 2.0 + disc) >= cabs(-Q / 2.0 - disc) ? -Q / 2.0 + disc : -Q / 2.0 - disc;
    double complex u = cpow(u3, 1.0 / 3.0);
    const double complex omega = -0.5 + 0.8660254037844386 * I;
    double complex best = 0.0, wk = 1.0;
    for (int k = 0; k < 3; k++, wk *= omega) {
        double complex uk = u * wk;
        double complex m = (cabs(uk) > 0 ? uk - P / (3.0 * uk) : 0.0) - c2 / 3.0;
        if (k == 0 || cabs(m) > cabs(best)) best = m;
    }
    double complex sq = csqrt(2.0 * best);
    double complex h = cabs(sq) > 0 ? q / (2.0 * sq) : 0.0;
    for (int k = 0; k < 2; k++) {
        double sign = k == 0 ? 1.0 : -1.0;
        double complex bq = -sign * sq, cq = p / 2.0 + best + sign * h;
        double complex d = csqrt(bq * bq - 4.0 * cq);
        roots[2 * k] = (-bq + d) / 2.0 - b3 / 4.0;
        roots[2 * k + 1] = (-bq - d) / 2.0 - b3 / 4.0;
    }
}

static void triple_frame(const double *p0, const double *p1, const double *p2, double *F) {
    double e0[3] = {p1[0] - p0[0], p1[1] - p0[1], p1[2] - p0[2]};
    double d[3] = {p2[0] - p0[0], p2[1] - p0[1], p2[2] - p0[2]};
    double l = sqrt(e0[0] * e0[0] + e0[1] * e0[1] + e0[2] * e0[2]);
    for (int k = 0; k < 3; k++) e0[k] /= l;
    double nv[3] = {e0[1] * d[2] - e0[2] * d[1], e0[2] * d[0] - e0[0] * d[2], e0[0] * d[1] - e0[1] * d[0]};
    l = sqrt(nv[0] * nv[0] + nv[1] * nv[1] + nv[2] * nv[2]);
    for (int k = 0; k < 3; k++) nv[k] /= l;
    double e1[3] = {nv[1] * e0[2] - nv[2] * e0[1], nv[2] * e0[0] - nv[0] * e0[2], nv[0] * e0[1] - nv[1] * e0[0]};
    for (int k = 0; k < 3; k++) { F[3 * k] = e0[k]; F[3 * k + 1] = e1[k]; F[3 * k + 2] = nv[k]; }
}

/* P3P (bpnp.solvers.ransac.p3p step for step): up to 4 poses (R row-major, t) mapping the
 * object points X (3 x 3, rows) onto the unit bearings f (3 x 3, rows); returns how many. */
static int p3p_solve(const double *f, const double *X, double (*Rs)[9], double (*ts)[3]) {
    const double *f1 = f, *f2 = f + 3, *f3 = f + 6, *X1 = X, *X2 = X + 3, *X3 = X + 6;
    double c12 = f1[0] * f2[0] + f1[1] * f2[1] + f1[2] * f2[2];
    double c13 = f1[0] * f3[0] + f1[1] * f3[1] + f1[2] * f3[2];
    double c23 = f2[0] * f3[0] + f2[1] * f3[1] + f2[2] * f3[2];
    double D12 = 0, D13 = 0, D23 = 0;
    for (int k = 0; k < 3; k++) {
        D12 += (X1[k] - X2[k]) * (X1[k] - X2[k]);
        D13 += (X1[k] - X3[k]) * (X1[k] - X3[k]);
        D23 += (X2[k] - X3[k]) * (X2[k] - X3[k]);
    }
    double a[5];
    a[0] = D12 * D12 - 2 * D12 * D13 - 2 * D12 * D23 + D13 * D13 - 4 * D13 * D23 * c12 * c12 + 2 * D13 * D23 + D23 * D23;
    a[1] = 4 * (-(D12 * D12) * c13 + D12 * D13 * c12 * c23 + D12 * D13 * c13 + 2 * D12 * D23 * c13 -
                D13 * D13 * c12 * c23 + 2 * D13 * D23 * c12 * c12 * c13 + D13 * D23 * c12 * c23 - D13 * D23 * c13 -
                D23 * D23 * c13);
    a[2] = 2 * (2 * D12 * D12 * c13 * c13 + D12 * D12 - 4 * D12 * D13 * c12 * c13 * c23 - 2 * D12 * D13 * c23 * c23 -
                4 * D12 * D23 * c13 * c13 - 2 * D12 * D23 + 2 * D13 * D13 * c12 * c12 + 2 * D13 * D13 * c23 * c23 -
                D13 * D13 - 2 * D13 * D23 * c12 * c12 - 4 * D13 * D23 * c12 * c13 * c23 + 2 * D23 * D23 * c13 * c13 +
                D23 * D23);
    a[3] = 4 * (-(D12 * D12) * c13 + D12 * D13 * c12 * c23 + 2 * D12 * D13 * c13 * c23 * c23 - D12 * D13 * c13 +
                2 * D12 * D23 * c13 - D13 * D13 * c12 * c23 + D13 * D23 * c12 * c23 + D13 * D23 * c13 -
                D23 * D23 * c13);
    a[4] = D12 * D12 - 4 * D12 * D13 * c23 * c23 + 2 * D12 * D13 - 2 * D12 * D23 + D13 * D13 - 2 * D13 * D23 + D23 * D23;
    double complex z[4];
    solve_quartic(a, z);
    double Fw[9];
    triple_frame(X1, X2, X3, Fw);
    int count = 0;
    for (int k = 0; k < 4; k++) {
        double v = creal(z[k]);
        if (!(fabs(cimag(z[k])) <= 1e-4 * (1.0 + fabs(v)))) continue;
        for (int it = 0; it < 3; it++) {
            double fv = (((a[4] * v + a[3]) * v + a[2]) * v + a[1]) * v + a[0];
            double df = ((4.0 * a[4] * v + 3.0 * a[3]) * v + 2.0 * a[2]) * v + a[1];
            if (fabs(df) > 0) v -= fv / df;
        }
        double num = (D12 + D13 - D23) * v * v + 2.0 * (D23 - D12) * c13 * v + D12 - D13 - D23;
        double u = num / (2.0 * D13 * (c23 * v - c12));
        double den = 1.0 + u * u - 2.0 * u * c12;
        double l1 = sqrt(D12 / den);
        if (!(v > 0 && u > 0 && den > 0 && isfinite(u) && isfinite(l1) && isfinite(v))) continue;
        double P1[3], P2[3], P3[3], Fc[9];
        for (int c = 0; c < 3; c++) { P1[c] = l1 * f1[c]; P2[c] = u * l1 * f2[c]; P3[c] = v * l1 * f3[c]; }
        triple_frame(P1, P2, P3, Fc);
        double *R = Rs[count], *t = ts[count];
        for (int i = 0; i < 3; i++)
            for (int j = 0; j < 3; j++)
                R[3 * i + j] = Fc[3 * i] * Fw[3 * j] + Fc[3 * i + 1] * Fw[3 * j + 1] + Fc[3 * i + 2] * Fw[3 * j + 2];
        int ok = 1;
        for (int i = 0; i < 3; i++) {
            t[i] = P1[i] - (R[3 * i] * X1[0] + R[3 * i + 1] * X1[1] + R[3 * i + 2] * X1[2]);
            ok &= isfinite(t[i]) && isfinite(R[3 * i]) && isfinite(R[3 * i + 1]) && isfinite(R[3 * i + 2]);
        }
        if (ok) count++;
    }
    return count;
}

/* One RANSAC round for A problems (ids: their rows in the batch): S minimal samples each
 * (samples: A x S x 3 point indices; a sample whose first index is negative is skipped), P3P for
 * every sample, every pose scored by msac_one (bpnp.solvers.ransac.msac_score). Per sample the
 * best of its poses (first of the lowest score) in R_out (A x S x 9), t_out (A x S x 3), its score
 * and count; the score is inf where no pose scored below the problem's bound (bound: A, the
 * worst score the caller still keeps). rays: B x n x 3 unit bearings of the image points. */
void bpnp_ransac_round(int A, int S, int n, const int64_t *ids, const int64_t *samples, const double *rays,
                       const double *x2d, const double *x3d, int x3d_batched, const double *K, int K_batched,
                       const double *w, int w_batched, const double *tau2, const double *bound, int num_threads,
                       int forked, double *R_out, double *t_out, double *score_out, int32_t *count_out) {
    int want = num_threads < 1 ? 1 : num_threads;
    (void)forked;
    (void)want; /* read by the OpenMP pragma only */
#if defined(_OPENMP)
#pragma omp parallel for schedule(dynamic, 4) num_threads(want) if (want > 1 && !forked && !in_forked_child && A > 8)
#endif
    for (int i = 0; i < A; i++) {
        long b = ids[i];
        const double *xy = x2d + b * n * 2, *ry = rays + b * n * 3;
        const double *X = x3d + (x3d_batched ? b * n * 3 : 0);
        const double *k = K + (K_batched ? b * 9 : 0);
        const double *ww = w + (w_batched ? b * n : 0);
        for (int s = 0; s < S; s++) {
            long o = (long)i * S + s;
            const int64_t *idx = samples + o * 3;
            double best = INFINITY;
            int best_count = 0;
            double bestR[9] = {1, 0, 0, 0, 1, 0, 0, 0, 1}, bestt[3] = {0, 0, 1};
            if (idx[0] >= 0) {
                double f[9], Xs[9], Rs[4][9], ts[4][3];
                for (int c = 0; c < 3; c++) {
                    memcpy(f + 3 * c, ry + 3 * idx[c], 3 * sizeof(double));
                    memcpy(Xs + 3 * c, X + 3 * idx[c], 3 * sizeof(double));
                }
                int m = p3p_solve(f, Xs, Rs, ts);
                double stop = bound[i];
                for (int h = 0; h < m; h++) {
                    double sc;
                    int cnt;
                    msac_one(Rs[h], ts[h], xy, X, k, ww, n, tau2[b], stop < best ? stop : best, &sc, &cnt);
                    if (sc < best && sc < stop) {
                        best = sc;
                        best_count = cnt;
                        memcpy(bestR, Rs[h], sizeof bestR);
                        memcpy(bestt, ts[h], sizeof bestt);
                    }
                }
            }
            memcpy(R_out + o * 9, bestR, sizeof bestR);
            memcpy(t_out + o * 3, bestt, sizeof bestt);
            score_out[o] = best;
            count_out[o] = best_count;
        }
    }
}

/* ---------------------------------------------------------------- the layer in one call each way */

/* bpnp_layer_forward and bpnp_layer_backward are the whole least-squares layer for CPU tensors
 * (bpnp/stages.py and bpnp/implicit.py for one problem): the input checks, the unit-free problem
 * (bpnp/normalise.py), stand-ins for degenerate items, the solve, the flags, the fallback pose,
 * the user's units; and the backward's vector-Jacobian product by the implicit function theorem.
 * One call each way removes the hundreds of small tensor operations around the solve, which
 * dominate a single solve. */

/* Constants of the change of units, per item: centre (3), scale, principal point (2), focal,
 * largest weight, then the normalised translation of the answer (3). */
#define UNIT_FIELDS 11

static const double IDENTITY3[9] = {1, 0, 0, 0, 1, 0, 0, 0, 1};

/* Input check codes (bpnp.fused raises the matching PnPInputError). */
enum {
    CHECK_OK = 0, CHECK_X2D_FINITE, CHECK_X3D_FINITE, CHECK_K_FINITE, CHECK_W_FINITE, CHECK_INIT_FINITE,
    CHECK_K_LOWER, CHECK_K_FOCAL, CHECK_K_SCALE, CHECK_W_NEGATIVE, CHECK_W_FEW
};

/* The checks of bpnp.checks.canonical_pnp_inputs on the values, in its order. */
static int check_inputs(int B, int n, const double *x2d, const double *x3d, int nx3d, const double *K, int nK,
                        const double *w, int nw, const double *init) {
    if (!all_finite(x2d, (size_t)B * n * 2)) return CHECK_X2D_FINITE;
    if (!all_finite(x3d, (size_t)nx3d * n * 3)) return CHECK_X3D_FINITE;
    if (!all_finite(K, (size_t)nK * 9)) return CHECK_K_FINITE;
    if (w && !all_finite(w, (size_t)nw * n)) return CHECK_W_FINITE;
    if (init && !all_finite(init, (size_t)B * 6)) return CHECK_INIT_FINITE;
    for (int b = 0; b < nK; b++)
        if (K[9 * b + 3] != 0 || K[9 * b + 6] != 0 || K[9 * b + 7] != 0) return CHECK_K_LOWER;
    for (int b = 0; b < nK; b++)
        if (!(K[9 * b] > 0) || !(K[9 * b + 4] > 0)) return CHECK_K_FOCAL;
    for (int b = 0; b < nK; b++)
        if (!(K[9 * b + 8] > 0)) return CHECK_K_SCALE;
    if (w) {
        for (size_t k = 0; k < (size_t)nw * n; k++)
            if (w[k] < 0) return CHECK_W_NEGATIVE;
        for (int b = 0; b < nw; b++) {
            int pos = 0;
            for (int i = 0; i < n; i++) pos += w[(size_t)b * n + i] > 0;
            if (pos < 4) return CHECK_W_FEW;
        }
    }
    return CHECK_OK;
}

/* Sum over coordinates of the (population) variance of n points of dimension d (<= 3), and their
 * mean (may be NULL). Sums are taken relative to the first point: points all in one place give
 * exactly that point and a variance of exactly 0 (a plain sum of n equal values can round). */
static double spread(int n, int d, const double *x, double *mean_out) {
    /* The coordinates' sums side by side: independent chains of adds, each in point order. */
    double shift[3] = {0, 0, 0}, vk[3] = {0, 0, 0}, v = 0;
    for (int i = 0; i < n; i++)
        for (int k = 0; k < d; k++) shift[k] += x[d * i + k] - x[k];
    for (int k = 0; k < d; k++) shift[k] /= n;
    for (int i = 0; i < n; i++)
        for (int k = 0; k < d; k++) {
            double dev = (x[d * i + k] - x[k]) - shift[k];
            vk[k] += dev * dev;
        }
    for (int k = 0; k < d; k++) {
        v += vk[k] / n;
        if (mean_out) mean_out[k] = x[k] + shift[k];
    }
    return v;
}

/* The constants of bpnp.normalise.normalise_problem for one item (w may be NULL: all ones). */
static void find_units(int n, const double *x3d, const double *K, const double *w, double *u) {
    double c[3], v = spread(n, 3, x3d, c), s = sqrt(v);
    double wmax = 1.0;
    if (w) {
        wmax = w[0];
        for (int i = 1; i < n; i++)
            if (w[i] > wmax) wmax = w[i];
        if (!(wmax > 0)) wmax = 1.0;
    }
    memcpy(u, c, sizeof c);
    u[3] = s > 0 ? s : 1.0;
    u[4] = K[2] / K[8];
    u[5] = K[5] / K[8];
    u[6] = sqrt(K[0] * K[4]) / K[8];
    u[7] = wmax;
}

/* The unit-free copy of one item: x2n (n x 2), x3n (n x 3), wn (n), Kn (9). */
static void normalise_item(int n, const double *x2d, const double *x3d, const double *K, const double *w,
                           const double *u, double *x2n, double *x3n, double *Kn, double *wn) {
    const double *c = u, s = u[3], m0 = u[4], m1 = u[5], f = u[6], wmax = u[7];
    /* Reciprocals: the per-point divisions were a third of the C backward. */
    const double inv_f = 1.0 / f, inv_s = 1.0 / s, inv_w = 1.0 / wmax;
    for (int i = 0; i < n; i++) {
        x2n[2 * i] = (x2d[2 * i] - m0) * inv_f;
        x2n[2 * i + 1] = (x2d[2 * i + 1] - m1) * inv_f;
        for (int k = 0; k < 3; k++) x3n[3 * i + k] = (x3d[3 * i + k] - c[k]) * inv_s;
        wn[i] = w ? w[i] * inv_w : 1.0;
    }
    for (int k = 0; k < 3; k++) {
        Kn[k] = (K[k] - m0 * K[6 + k]) / f;
        Kn[3 + k] = (K[3 + k] - m1 * K[6 + k]) / f;
        Kn[6 + k] = K[6 + k];
    }
}


/* bpnp.stages._fallback_pose: identity rotation, the (unit-size, centred) object on the weighted
 * mean ray of the pixels at the depth that matches their spread. */
static void fallback_pose(const Problem *p, double *R, double *t) {
    double mean[3] = {0, 0, 0}, wsum = 0, sp = 0;
    for (int i = 0; i < p->n; i++) {
        double va, vb;
        point_ray(p, i, &va, &vb);
        mean[0] += p->w[i] * va; mean[1] += p->w[i] * vb; mean[2] += p->w[i];
        wsum += p->w[i];
    }
    if (!(wsum > 1e-300)) wsum = 1e-300;
    for (int k = 0; k < 3; k++) mean[k] /= wsum;
    for (int i = 0; i < p->n; i++) {
        double va, vb;
        point_ray(p, i, &va, &vb);
        double da = va - mean[0], db = vb - mean[1], dc = 1.0 - mean[2];
        sp += p->w[i] * (da * da + db * db + dc * dc);
    }
    sp = sqrt(sp / wsum);
    double depth = 1.0 / (sp > 1e-300 ? sp : 1e-300);
    depth = depth < 1.0 ? 1.0 : (depth > 1e6 ? 1e6 : depth);
    for (int k = 0; k < 3; k++) {
        double v = mean[k] * depth;
        t[k] = isfinite(v) ? v : 0.0;
    }
    if (!(t[2] > 0)) t[2] = 1.0;
    memcpy(R, IDENTITY3, sizeof IDENTITY3);
}

/* bpnp.stages._plain_cost: the weighted squared reprojection error at (R, t), points behind the
 * camera projected as they are; the largest double where it is not finite. */
static double plain_cost(int n, const double *x2d, const double *x3d, const double *K, const double *w,
                         const double *R, const double *t) {
    double m00 = K[0] / K[8], m01 = K[1] / K[8], m11 = K[4] / K[8], c0 = K[2] / K[8], c1 = K[5] / K[8];
    double cost = 0;
    for (int i = 0; i < n; i++) {
        const double *X = x3d + 3 * i;
        double x = R[0] * X[0] + R[1] * X[1] + R[2] * X[2] + t[0];
        double y = R[3] * X[0] + R[4] * X[1] + R[5] * X[2] + t[1];
        double z = R[6] * X[0] + R[7] * X[1] + R[8] * X[2] + t[2];
        double a = x / z, bb = y / z;
        double ru = m00 * a + m01 * bb + c0 - x2d[2 * i], rv = m11 * bb + c1 - x2d[2 * i + 1];
        cost += (w ? w[i] : 1.0) * (ru * ru + rv * rv);
    }
    return isfinite(cost) ? cost : 1.79769313486231570815e308;
}

typedef struct {
    int B, n, x3d_batched, K_batched, w_batched, dist_batched;
    const double *x2d, *x3d, *K, *w, *init; /* the user's units; w, init (B x 6: rvec, t) may be NULL */
    const double *dist;                     /* lens distortion (B|1 x 5), may be NULL */
    const Options *o;
    double *pose_out, *R_out, *cost_out, *second_out, *H_out, *units_out;
    uint8_t *flags_out; /* B x 4: converged, ambiguous, trusted, no answer (fallback) */
    int32_t *summary;   /* 2: the most LM iterations of any item, the count of items not converged */
} LayerJob;

/* bpnp.geometry.undistort_points for one point: the lens model inverted at the distorted
 * normalised point (xa, xb) by Newton's method from it, at most 20 steps, done at a residual
 * <= 1e-13 (a non-finite step is not taken); 1 and (a, b) where that worked, else 0. */
static int undistort_point(const double *dist, double xa, double xb, double *a_out, double *b_out) {
    double a = xa, b = xb, xd, yd, J[4];
    for (int it = 0; it < 20; it++) {
        distort_point(dist, a, b, &xd, &yd, J, NULL);
        double r0 = xd - xa, r1 = yd - xb;
        if (fabs(r0) <= 1e-13 && fabs(r1) <= 1e-13) break;
        double det = J[0] * J[3] - J[1] * J[2];
        double na = a - (J[3] * r0 - J[1] * r1) / det, nb = b - (J[0] * r1 - J[2] * r0) / det;
        if (isfinite(na) && isfinite(nb)) { a = na; b = nb; }
    }
    distort_point(dist, a, b, &xd, &yd, J, NULL);
    double r0 = xd - xa, r1 = yd - xb;
    *a_out = a;
    *b_out = b;
    return isfinite(r0) && isfinite(r1) && fabs(r0) <= 1e-13 && fabs(r1) <= 1e-13;
}

/* bpnp.geometry.undistort_points for m points (xd: m x 2 distorted normalised coordinates),
 * each group of `per` points with its own row of dist (dist_batched) or all with one: xu (m x 2;
 * the distorted point where no inverse was found) and ok (m). */
void bpnp_undistort_points(int m, int per, const double *xd, const double *dist, int dist_batched, double *xu,
                           uint8_t *ok) {
    for (int i = 0; i < m; i++) {
        const double *d = dist + (dist_batched ? (size_t)(i / per) * 5 : 0);
        double a, b;
        ok[i] = (uint8_t)undistort_point(d, xd[2 * i], xd[2 * i + 1], &a, &b);
        xu[2 * i] = ok[i] ? a : xd[2 * i];
        xu[2 * i + 1] = ok[i] ? b : xd[2 * i + 1];
    }
}

/* bpnp.stages._undistorted for one item: the normalised pixels of p (distorted) with the lens
 * model inverted point by point; a point without an inverse keeps its distorted pixel; written
 * to out (n x 2). */
static void undistorted_pixels(const Problem *p, const double *dist, double *out) {
    const double *K = p->K;
    for (int i = 0; i < p->n; i++) {
        double xa, xb, a, b;
        point_ray(p, i, &xa, &xb);
        if (undistort_point(dist, xa, xb, &a, &b)) {
            out[2 * i] = (K[0] * a + K[1] * b) / K[8] + K[2] / K[8];
            out[2 * i + 1] = K[4] * b / K[8] + K[5] / K[8];
        } else {
            out[2 * i] = p->x2d[2 * i];
            out[2 * i + 1] = p->x2d[2 * i + 1];
        }
    }
}

/* The solve with lens distortion (bpnp.stages.forward_solve): the global least-squares search on
 * the undistorted pixels (undist, n x 2), then exact-Hessian LM on the distorted cost from its
 * answer (bpnp.solvers.pnp.refine_robust). */
static void solve_distorted(const Problem *p, const double *dist, const double *undist, const Options *o,
                            const double *init, LMState *best) {
    Problem start = *p;
    start.x2d = undist;
    LMState ls;
    solve_one(&start, o, init, &ls);
    Problem pd = *p;
    pd.dist = dist;
    memset(best, 0, sizeof *best);
    memcpy(best->R, ls.R, sizeof ls.R);
    memcpy(best->t, ls.t, sizeof ls.t);
    best->evaluated = 0;
    levenberg_marquardt(&pd, o, best, o->max_iter, o->polish_steps);
    best->conv = best->conv && well_posed(best->H, o->well_posed_ratio) && isfinite(best->cost);
    best->trusted = best->conv;
    best->second = INFINITY;
}

/* One item of the layer's forward between its two halves: its inputs and units (u), the
 * unit-free problem (p, over buf) and its object-space form. */
typedef struct {
    const double *x2d, *x3d, *K, *w;
    double *u, *buf;
    int degenerate;
    Problem p;
    OmegaForm form;
} LayerItem;

/* The first half of an item: the units, the unit-free problem and the degeneracy test. */
static void layer_item_begin(LayerJob *j, int b, LayerItem *it) {
    int n = j->n;
    const double *x2d = it->x2d = j->x2d + (size_t)b * n * 2;
    const double *x3d = it->x3d = j->x3d + (j->x3d_batched ? (size_t)b * n * 3 : 0);
    const double *K = it->K = j->K + (j->K_batched ? (size_t)b * 9 : 0);
    const double *w = it->w = j->w ? j->w + (j->w_batched ? (size_t)b * n : 0) : NULL;
    double *u = it->u = j->units_out + (size_t)b * UNIT_FIELDS;
    find_units(n, x3d, K, w, u);
    it->buf = (double *)malloc((size_t)n * (j->dist ? 8 : 6) * sizeof(double));
    it->degenerate = 1;
    it->form.terms = NULL;
    Problem *p = &it->p;
    p->omega = NULL;
    if (it->buf) {
        double Kn[9], *buf = it->buf;
        normalise_item(n, x2d, x3d, K, w, u, buf, buf + 2 * n, Kn, buf + 5 * n);
        p->n = n; p->x2d = buf; p->x3d = buf + 2 * n; p->w = buf + 5 * n; p->dist = NULL;
        set_camera(p, Kn);
        it->degenerate = spread(n, 3, p->x3d, NULL) <= 1e-24 || spread(n, 2, p->x2d, NULL) <= 1e-24;
    }
}

/* The second half: the solve, the flags, the fallback and the outputs in the user's units. */
static void layer_item_end(LayerJob *j, int b, LayerItem *it) {
    const Options *o = j->o;
    int n = j->n;
    const double *x2d = it->x2d, *x3d = it->x3d, *K = it->K, *w = it->w;
    const double *dist = j->dist ? j->dist + (j->dist_batched ? (size_t)b * 5 : 0) : NULL;
    double *u = it->u, *buf = it->buf;
    const Problem p = it->p;
    int degenerate = it->degenerate;
    LMState s;
    memset(&s, 0, sizeof s);
    s.cost = s.second = INFINITY;
    if (!degenerate) {
        double init[12], *start = NULL;
        if (j->init) {
            const double *y = j->init + (size_t)b * 6;
            rodrigues(y, init);
            for (int k = 0; k < 3; k++)
                init[9 + k] = (y[3 + k] + init[3 * k] * u[0] + init[3 * k + 1] * u[1] + init[3 * k + 2] * u[2]) / u[3];
            start = init;
        }
        if (dist) {
            undistorted_pixels(&p, dist, buf + 6 * n);
            solve_distorted(&p, dist, buf + 6 * n, o, start, &s);
        } else {
            solve_one(&p, o, start, &s);
        }
    }
    double rvec[3];
    rotation_to_rvec(s.R, rvec);
    int bad = degenerate || !all_finite(s.R, 9) || !all_finite(s.t, 3) || !all_finite(rvec, 3);
    int conv = s.conv && !bad, trusted = s.trusted && !bad, ambiguous = 0;
    if (!bad) {
        /* Ambiguity in the normalised units: the residual variance, floored at float64's
         * resolution of a fit (residuals of 1e-8 focal lengths). */
        int npos = 0;
        double wsum = 0;
        for (int i = 0; i < n; i++) {
            npos += p.w[i] > 0;
            wsum += p.w[i];
        }
        double dof = 2.0 * npos - 6 < 1 ? 1.0 : 2.0 * npos - 6;
        double var = s.cost / dof, floor_ = 1e-16 * wsum;
        if (!isnan(var) && var < floor_) var = floor_;
        ambiguous = isfinite(s.second) && s.second - s.cost <= o->ambiguity_threshold * var;
    } else {
        if (buf) fallback_pose(&p, s.R, s.t);
        else {
            memcpy(s.R, IDENTITY3, sizeof IDENTITY3);
            s.t[0] = s.t[1] = 0; s.t[2] = 1;
        }
        rvec[0] = rvec[1] = rvec[2] = 0;
        s.second = INFINITY;
        memset(s.H, 0, sizeof s.H);
        for (int k = 0; k < 6; k++) s.H[7 * k] = 1.0;
    }
    double *pose = j->pose_out + (size_t)b * 6, *R = j->R_out + (size_t)b * 9;
    memcpy(R, s.R, sizeof s.R);
    for (int k = 0; k < 3; k++) {
        pose[k] = rvec[k];
        pose[3 + k] = u[3] * s.t[k] - (R[3 * k] * u[0] + R[3 * k + 1] * u[1] + R[3 * k + 2] * u[2]);
        u[8 + k] = s.t[k];
    }
    double unit = u[7] * u[6] * u[6];
    double cost = s.cost * unit;
    if (bad || !isfinite(cost)) {
        cost = plain_cost(n, x2d, x3d, K, w, R, pose + 3);
        conv = trusted = 0;
    }
    j->cost_out[b] = cost;
    j->second_out[b] = s.second * unit;
    memcpy(j->H_out + (size_t)b * 36, s.H, sizeof s.H);
    uint8_t *fl = j->flags_out + (size_t)b * 4;
    fl[0] = (uint8_t)conv; fl[1] = (uint8_t)ambiguous; fl[2] = (uint8_t)trusted; fl[3] = (uint8_t)bad;
    int32_t most = __atomic_load_n(&j->summary[0], __ATOMIC_RELAXED);
    while (s.iters > most &&
           !__atomic_compare_exchange_n(&j->summary[0], &most, s.iters, 0, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
    }
    if (!conv) __atomic_fetch_add(&j->summary[1], 1, __ATOMIC_RELAXED);
    free(it->form.terms);
    free(buf);
}

/* The layer's forward for items b0 .. b1 - 1 (a chunk): their unit-free problems and Omegas
 * first, Omega's eigen-decompositions side by side in lanes when there are enough of them (the
 * same bits as one at a time), then each item's solve. Items with lens distortion (which search on
 * their undistorted pixels) and problems of more than CHUNK_POINTS points (whose chunk would not
 * stay in the L2 cache, and whose eigen-decomposition is a small part of the solve) run one at a
 * time. */
#define CHUNK_POINTS 256
static void layer_forward_chunk(void *arg, int b0, int b1) {
    LayerJob *j = (LayerJob *)arg;
    LayerItem items[CHUNK];
    const double *A[CHUNK];
    double *V[CHUNK], *ev[CHUNK];
    int m = 0;
    if (j->n > CHUNK_POINTS || j->dist) { /* one item at a time */
        for (int b = b0; b < b1; b++) {
            layer_item_begin(j, b, &items[0]);
            layer_item_end(j, b, &items[0]);
        }
        return;
    }
    for (int b = b0; b < b1; b++) {
        LayerItem *it = &items[b - b0];
        layer_item_begin(j, b, it);
        if (it->degenerate) continue;
        omega_form(&it->p, &it->form, 1);
        it->p.omega = &it->form;
        A[m] = it->form.On;
        V[m] = it->form.V;
        ev[m++] = it->form.ev;
    }
    for (int k = 0; k < m; k += EIG_LANES) {
        int nl = m - k < EIG_LANES ? m - k : EIG_LANES;
        if (nl >= EIG_MIN_LANES) symmetric_eig9_lanes(nl, A + k, V + k, ev + k);
        else
            for (int l = 0; l < nl; l++) symmetric_eig(9, A[k + l], V[k + l], ev[k + l]);
    }
    for (int b = b0; b < b1; b++) layer_item_end(j, b, &items[b - b0]);
}

/* The least-squares layer's forward for B problems in the user's units (C-contiguous float64; a
 * *_batched flag of 0: one array shared by the batch; w, init and dist may be NULL; with dist
 * the cost is the error in distorted pixels). Outputs: pose (B x 6,
 * rvec and t), R (B x 9), cost (B), the best other minimum's cost (B), the normalised problem's
 * Hessian (B x 36), the units (B x UNIT_FIELDS), flags (B x 4) and a summary (2: the most LM
 * iterations of any item, the number of items not converged; the caller's warning). Returns a
 * CHECK_* code (nothing solved unless CHECK_OK), or -1 for options out of range. */
int bpnp_layer_forward(int B, int n, const double *x2d, const double *x3d, int x3d_batched, const double *K,
                       int K_batched, const double *w, int w_batched, const double *init, const double *dist,
                       int dist_batched, const Options *o, int num_threads, int forked, double *pose_out,
                       double *R_out, double *cost_out, double *second_out, double *H_out, double *units_out,
                       uint8_t *flags_out, int32_t *summary) {
    if (!options_in_range(o)) return -1;
    int code = check_inputs(B, n, x2d, x3d, x3d_batched ? B : 1, K, K_batched ? B : 1, w, w_batched ? B : 1, init);
    if (code != CHECK_OK) return code;
    LayerJob job = {B, n, x3d_batched, K_batched, w_batched, dist_batched, x2d, x3d, K, w, init, dist, o,
                    pose_out, R_out, cost_out, second_out, H_out, units_out, flags_out, summary};
    summary[0] = summary[1] = 0;
    run_chunks(B, layer_forward_chunk, &job, num_threads, forked);
    return CHECK_OK;
}

/* bpnp.implicit.solve_hessian for one item: u = H^-1 rhs by Cholesky when H is positive definite
 * with (min/max diagonal of L)^2 > rel_floor, else with the eigenvalues' magnitudes floored at
 * rel_floor times the largest (a regularised inverse). */
static void solve_hessian_item(const double *Hin, const double *rhs, double *x) {
    const double rel_floor = 1e-10;
    double H[36], L[36];
    int finite = 1;
    for (int a = 0; a < 6; a++)
        for (int c = 0; c < 6; c++) {
            H[a * 6 + c] = 0.5 * (Hin[a * 6 + c] + Hin[c * 6 + a]);
            finite = finite && isfinite(H[a * 6 + c]);
        }
    int good = finite && cholesky6(H, L);
    if (good) {
        double lo = L[0], hi = L[0];
        for (int c = 1; c < 6; c++) {
            if (L[c * 6 + c] < lo) lo = L[c * 6 + c];
            if (L[c * 6 + c] > hi) hi = L[c * 6 + c];
        }
        double ratio = lo / (hi > 1e-300 ? hi : 1e-300);
        good = ratio * ratio > rel_floor;
    }
    if (good) {
        cholesky6_solve(L, rhs, x);
        return;
    }
    if (!finite) {
        memset(H, 0, sizeof H);
        for (int k = 0; k < 6; k++) H[7 * k] = 1.0;
    }
    double V[36], ev[6], top = 0;
    symmetric_eig(6, H, V, ev);
    for (int k = 0; k < 6; k++)
        if (fabs(ev[k]) > top) top = fabs(ev[k]);
    double fl = rel_floor * (top > 1e-300 ? top : 1e-300), c[6];
    for (int k = 0; k < 6; k++) {
        double v = 0;
        for (int i = 0; i < 6; i++) v += V[i * 6 + k] * rhs[i];
        c[k] = v / (fabs(ev[k]) > fl ? fabs(ev[k]) : fl);
    }
    for (int i = 0; i < 6; i++) {
        double v = 0;
        for (int k = 0; k < 6; k++) v += V[i * 6 + k] * c[k];
        x[i] = v;
    }
}

/* J_l^-T v (bpnp.implicit.inverse_left_jacobian_transpose_apply). */
static void inverse_left_jacobian_transpose_apply(const double *r, const double *v, double *out) {
    double th2 = r[0] * r[0] + r[1] * r[1] + r[2] * r[2], coef;
    if (th2 < 1e-6) {
        coef = 1.0 / 12.0 + th2 / 720.0 + th2 * th2 / 30240.0;
    } else {
        double th = sqrt(th2);
        coef = 1.0 / (th * th) - (1.0 + cos(th)) / (2.0 * th * sin(th));
    }
    double rv[3] = {r[1] * v[2] - r[2] * v[1], r[2] * v[0] - r[0] * v[2], r[0] * v[1] - r[1] * v[0]};
    double rrv[3] = {r[1] * rv[2] - r[2] * rv[1], r[2] * rv[0] - r[0] * rv[2], r[0] * rv[1] - r[1] * rv[0]};
    for (int k = 0; k < 3; k++) out[k] = v[k] + 0.5 * rv[k] + coef * rrv[k];
}

typedef struct {
    int B, n, x3d_batched, K_batched, w_batched, dist_batched;
    const double *x2d, *x3d, *K, *w, *dist; /* the user's units, as given to the forward */
    const double *pose, *R, *H, *units;
    const uint8_t *flags;
    const double *grad_pose, *grad_R;           /* grad_R may be NULL */
    int64_t gp_item, gp_entry;                  /* grad_pose's strides, in doubles */
    double *g_x2d, *g_x3d, *g_K, *g_w, *g_dist; /* per item (B x ...); NULL: not needed */
} LayerBackJob;

/* Forward-mode dual numbers over the inputs of one point's term of the backward with lens
 * distortion: the point (3), the entries K00 K01 K02 K11 K12 K22 (6) and the coefficients (5). */
#define NV 14
typedef struct {
    double v, d[NV];
} Dual;

static inline Dual dual_const(double v) {
    Dual r;
    r.v = v;
    memset(r.d, 0, sizeof r.d);
    return r;
}
static inline Dual dual_var(double v, int k) {
    Dual r = dual_const(v);
    r.d[k] = 1.0;
    return r;
}
static inline Dual dual_add(Dual a, Dual b) {
    a.v += b.v;
    for (int k = 0; k < NV; k++) a.d[k] += b.d[k];
    return a;
}
static inline Dual dual_sub(Dual a, Dual b) {
    a.v -= b.v;
    for (int k = 0; k < NV; k++) a.d[k] -= b.d[k];
    return a;
}
static inline Dual dual_mul(Dual a, Dual b) {
    Dual r;
    r.v = a.v * b.v;
    for (int k = 0; k < NV; k++) r.d[k] = a.d[k] * b.v + a.v * b.d[k];
    return r;
}
static inline Dual dual_scale(Dual a, double c) {
    a.v *= c;
    for (int k = 0; k < NV; k++) a.d[k] *= c;
    return a;
}
static inline Dual dual_shift(Dual a, double c) {
    a.v += c;
    return a;
}
static inline Dual dual_inv(Dual a) {
    Dual r;
    r.v = 1.0 / a.v;
    double d = -r.v * r.v;
    for (int k = 0; k < NV; k++) r.d[k] = a.d[k] * d;
    return r;
}

/* One point's -d(u . g_i)/d(point, K, dist) with lens distortion, g_i its term of the chart
 * gradient: u . g_i = 2 w r . dp, dp = d pixel/dX (u_t + u_rot x P) its motion along u. Adds the
 * point's part to gK (6: K00 K01 K02 K11 K12 K22) and gd (5); writes gX (3), the x2d (2) and w
 * parts. */
static void distorted_point_vjp(const double *R, const double *t, const double *u, const double *X,
                                const double *x, double w, const Dual *cam, const Dual *kd, double *gX,
                                double *gx, double *gw, double *gK, double *gd) {
    Dual Xv[3] = {dual_var(X[0], 0), dual_var(X[1], 1), dual_var(X[2], 2)}, P[3];
    for (int r = 0; r < 3; r++)
        P[r] = dual_add(dual_add(dual_scale(Xv[0], R[3 * r]), dual_scale(Xv[1], R[3 * r + 1])),
                        dual_scale(Xv[2], R[3 * r + 2]));
    Dual iz = dual_inv(dual_shift(P[2], t[2]));
    Dual a = dual_mul(dual_shift(P[0], t[0]), iz), b = dual_mul(dual_shift(P[1], t[1]), iz);
    const Dual k1 = kd[0], k2 = kd[1], p1 = kd[2], p2 = kd[3], k3 = kd[4];
    Dual r2 = dual_add(dual_mul(a, a), dual_mul(b, b));
    Dual radial = dual_shift(dual_mul(r2, dual_add(k1, dual_mul(r2, dual_add(k2, dual_mul(r2, k3))))), 1.0);
    Dual dr = dual_add(k1, dual_mul(r2, dual_add(dual_scale(k2, 2.0), dual_scale(dual_mul(k3, r2), 3.0))));
    Dual ab = dual_mul(a, b), aa = dual_mul(a, a), bb = dual_mul(b, b);
    Dual xd = dual_add(dual_add(dual_mul(a, radial), dual_scale(dual_mul(p1, ab), 2.0)),
                       dual_mul(p2, dual_add(r2, dual_scale(aa, 2.0))));
    Dual yd = dual_add(dual_add(dual_mul(b, radial), dual_mul(p1, dual_add(r2, dual_scale(bb, 2.0)))),
                       dual_scale(dual_mul(p2, ab), 2.0));
    Dual J00 = dual_add(dual_add(radial, dual_scale(dual_mul(aa, dr), 2.0)),
                        dual_add(dual_scale(dual_mul(p1, b), 2.0), dual_scale(dual_mul(p2, a), 6.0)));
    Dual J01 = dual_add(dual_scale(dual_mul(ab, dr), 2.0),
                        dual_add(dual_scale(dual_mul(p1, a), 2.0), dual_scale(dual_mul(p2, b), 2.0)));
    Dual J11 = dual_add(dual_add(radial, dual_scale(dual_mul(bb, dr), 2.0)),
                        dual_add(dual_scale(dual_mul(p1, b), 6.0), dual_scale(dual_mul(p2, a), 2.0)));
    const Dual m00 = cam[0], m01 = cam[1], c0 = cam[2], m11 = cam[3], c1 = cam[4];
    Dual ru = dual_shift(dual_add(dual_add(dual_mul(m00, xd), dual_mul(m01, yd)), c0), -x[0]);
    Dual rv = dual_shift(dual_add(dual_mul(m11, yd), c1), -x[1]);
    /* q = u_t + u_rot x P, then its image motion J_q q and pixel motion */
    Dual q0 = dual_shift(dual_sub(dual_scale(P[2], u[1]), dual_scale(P[1], u[2])), u[3]);
    Dual q1 = dual_shift(dual_sub(dual_scale(P[0], u[2]), dual_scale(P[2], u[0])), u[4]);
    Dual q2 = dual_shift(dual_sub(dual_scale(P[1], u[0]), dual_scale(P[0], u[1])), u[5]);
    Dual da = dual_mul(dual_sub(q0, dual_mul(a, q2)), iz), db = dual_mul(dual_sub(q1, dual_mul(b, q2)), iz);
    Dual dxd = dual_add(dual_mul(J00, da), dual_mul(J01, db)), dyd = dual_add(dual_mul(J01, da), dual_mul(J11, db));
    Dual du = dual_add(dual_mul(m00, dxd), dual_mul(m01, dyd)), dv = dual_mul(m11, dyd);
    Dual phi = dual_scale(dual_add(dual_mul(ru, du), dual_mul(rv, dv)), 2.0 * w);
    for (int k = 0; k < 3; k++) gX[k] = -phi.d[k];
    for (int k = 0; k < 6; k++) gK[k] -= phi.d[3 + k];
    for (int k = 0; k < 5; k++) gd[k] -= phi.d[9 + k];
    gx[0] = 2.0 * w * du.v;
    gx[1] = 2.0 * w * dv.v;
    *gw = -2.0 * (ru.v * du.v + rv.v * dv.v);
}

static void zero_if_not_finite(double *g, size_t m) {
    if (!all_finite(g, m)) memset(g, 0, m * sizeof(double));
}

/* The implicit backward of one item (bpnp.implicit.implicit_vjp and input_gradients), in the
 * normalised problem, then through the change of units (its constants held fixed). */
static void layer_backward_item(void *arg, int b) {
    LayerBackJob *j = (LayerBackJob *)arg;
    int n = j->n;
    double *gx2 = j->g_x2d ? j->g_x2d + (size_t)b * n * 2 : NULL;
    double *gx3 = j->g_x3d ? j->g_x3d + (size_t)b * n * 3 : NULL;
    double *gK = j->g_K ? j->g_K + (size_t)b * 9 : NULL;
    double *gw = j->g_w ? j->g_w + (size_t)b * n : NULL;
    double *gdist = j->g_dist ? j->g_dist + (size_t)b * 5 : NULL;
    const double *dist = j->dist ? j->dist + (j->dist_batched ? (size_t)b * 5 : 0) : NULL;
    if (gdist) memset(gdist, 0, 5 * sizeof(double));
    if (gx2) memset(gx2, 0, (size_t)n * 2 * sizeof(double));
    if (gx3) memset(gx3, 0, (size_t)n * 3 * sizeof(double));
    if (gK) memset(gK, 0, 9 * sizeof(double));
    if (gw) memset(gw, 0, (size_t)n * sizeof(double));
    const double *u = j->units + (size_t)b * UNIT_FIELDS, *pose = j->pose + (size_t)b * 6;
    const double *R = j->R + (size_t)b * 9, *H = j->H + (size_t)b * 36;
    double gp[6];
    for (int k = 0; k < 6; k++) gp[k] = j->grad_pose[(int64_t)b * j->gp_item + k * j->gp_entry];
    /* No answer, or not a finite one: zero gradients, never mixed into the other items' */
    if (j->flags[(size_t)b * 4 + 3] || !all_finite(pose, 6) || !all_finite(R, 9) || !all_finite(H, 36)) return;
    const double *x2d = j->x2d + (size_t)b * n * 2;
    const double *x3d = j->x3d + (j->x3d_batched ? (size_t)b * n * 3 : 0);
    const double *Kin = j->K + (j->K_batched ? (size_t)b * 9 : 0);
    const double *win = j->w ? j->w + (j->w_batched ? (size_t)b * n : 0) : NULL;
    double *buf = (double *)malloc((size_t)n * 6 * sizeof(double));
    if (!buf) return;
    double Kn[9];
    normalise_item(n, x2d, x3d, Kin, win, u, buf, buf + 2 * n, Kn, buf + 5 * n);
    const double *x2n = buf, *x3n = buf + 2 * n, *wn = buf + 5 * n, *t = u + 8;
    const double *c = u, s = u[3], m0 = u[4], m1 = u[5], f = u[6], wmax = u[7];

    /* The pose's gradient in the normalised chart: t = s t_n - R c, so dL/dt_n = s dL/dt and R
     * takes -dL/dt c^T besides its own gradient. */
    double G[9] = {0};
    if (j->grad_R) memcpy(G, j->grad_R + (size_t)b * 9, sizeof G);
    for (int a = 0; a < 3; a++)
        for (int k = 0; k < 3; k++) G[3 * a + k] -= gp[3 + a] * c[k];
    double rhs[6], M[9];
    inverse_left_jacobian_transpose_apply(pose, gp, rhs);
    for (int a = 0; a < 3; a++)
        for (int k = 0; k < 3; k++) M[3 * a + k] = G[3 * a] * R[3 * k] + G[3 * a + 1] * R[3 * k + 1] + G[3 * a + 2] * R[3 * k + 2];
    rhs[0] += M[7] - M[5];
    rhs[1] += M[2] - M[6];
    rhs[2] += M[3] - M[1];
    for (int k = 0; k < 3; k++) rhs[3 + k] = s * gp[3 + k];
    double uu[6];
    solve_hessian_item(H, rhs, uu);
    if (!all_finite(uu, 6)) { free(buf); return; }

    double gn[9] = {0}; /* gradient of the normalised K */
    if (dist) {
        /* camera entries of K / K22 as duals of K00 K01 K02 K11 K12 K22, the coefficients too */
        Dual Kd[6] = {dual_var(Kn[0], 3), dual_var(Kn[1], 4), dual_var(Kn[2], 5),
                      dual_var(Kn[4], 6), dual_var(Kn[5], 7), dual_var(Kn[8], 8)};
        Dual ik = dual_inv(Kd[5]);
        Dual cam[5] = {dual_mul(Kd[0], ik), dual_mul(Kd[1], ik), dual_mul(Kd[2], ik), dual_mul(Kd[3], ik),
                       dual_mul(Kd[4], ik)};
        Dual kd[5];
        for (int k = 0; k < 5; k++) kd[k] = dual_var(dist[k], 9 + k);
        double gK6[6] = {0}, gd[5] = {0}, gX[3], gx[2], gwi;
        for (int i = 0; i < n; i++) {
            distorted_point_vjp(R, t, uu, x3n + 3 * i, x2n + 2 * i, wn[i], cam, kd, gX, gx, &gwi, gK6, gd);
            if (gx2) { gx2[2 * i] = gx[0]; gx2[2 * i + 1] = gx[1]; }
            if (gx3) memcpy(gx3 + 3 * i, gX, sizeof gX);
            if (gw) gw[i] = gwi;
        }
        gn[0] = gK6[0]; gn[1] = gK6[1]; gn[2] = gK6[2]; gn[4] = gK6[3]; gn[5] = gK6[4]; gn[8] = gK6[5];
        if (gdist) {
            memcpy(gdist, gd, sizeof gd);
            zero_if_not_finite(gdist, 5);
        }
    } else {
        const double m00 = Kn[0] / Kn[8], m01 = Kn[1] / Kn[8], m11 = Kn[4] / Kn[8];
        double gm00 = 0, gm01 = 0, gm11 = 0, gc0 = 0, gc1 = 0;
        const double w0 = uu[0], w1 = uu[1], w2 = uu[2];
        for (int i = 0; i < n; i++) {
            const double *X = x3n + 3 * i;
            double P0 = R[0] * X[0] + R[1] * X[1] + R[2] * X[2];
            double P1 = R[3] * X[0] + R[4] * X[1] + R[5] * X[2];
            double P2 = R[6] * X[0] + R[7] * X[1] + R[8] * X[2];
            double iz = 1.0 / (P2 + t[2]);
            double a = (P0 + t[0]) * iz, bb = (P1 + t[1]) * iz;
            double ma = m00 * a + m01 * bb;
            double ru = ma + Kn[2] / Kn[8] - x2n[2 * i], rv = m11 * bb + Kn[5] / Kn[8] - x2n[2 * i + 1];
            double q0 = uu[3] + w1 * P2 - w2 * P1, q1 = uu[4] + w2 * P0 - w0 * P2, q2 = uu[5] + w0 * P1 - w1 * P0;
            double da = (q0 - a * q2) * iz, db = (q1 - bb * q2) * iz;
            double du = m00 * da + m01 * db, dv = m11 * db;
            double wi = wn[i], wdu = wi * du, wdv = wi * dv;
            if (gx2) {
                gx2[2 * i] = 2.0 * wdu;
                gx2[2 * i + 1] = 2.0 * wdv;
            }
            if (gw) gw[i] = -2.0 * (ru * du + rv * dv);
            if (gK) {
                gm00 += -2.0 * (a * wdu + wi * ru * da);
                gm01 += -2.0 * (bb * wdu + wi * ru * db);
                gm11 += -2.0 * (bb * wdv + wi * rv * db);
                gc0 += -2.0 * wdu;
                gc1 += -2.0 * wdv;
            }
            if (gx3) {
                double wru = wi * ru, wrv = wi * rv;
                double gu0 = m00 * iz, gu1 = m01 * iz, gu2 = -ma * iz, gv1 = m11 * iz, gv2 = -(m11 * bb) * iz;
                double s0 = wru * gu0, s1 = wru * gu1 + wrv * gv1, s2 = wru * gu2 + wrv * gv2;
                double p0 = m00 * wru, p1 = m01 * wru + m11 * wrv, iz2 = iz * iz;
                double c02 = -p0 * iz2, c12 = -p1 * iz2, c22 = 2.0 * (p0 * a + p1 * bb) * iz2;
                double v0 = gu0 * wdu + c02 * q2 + (s1 * w2 - s2 * w1);
                double v1 = gu1 * wdu + gv1 * wdv + c12 * q2 + (s2 * w0 - s0 * w2);
                double v2 = gu2 * wdu + gv2 * wdv + c02 * q0 + c12 * q1 + c22 * q2 + (s0 * w1 - s1 * w0);
                for (int k = 0; k < 3; k++) gx3[3 * i + k] = -2.0 * (v0 * R[k] + v1 * R[3 + k] + v2 * R[6 + k]);
            }
        }
        if (gK) {
            double k22 = Kn[8];
            double dk22 = -(m00 * gm00 + m01 * gm01 + m11 * gm11 + Kn[2] / k22 * gc0 + Kn[5] / k22 * gc1);
            double g9[9] = {gm00 / k22, gm01 / k22, gc0 / k22, 0, gm11 / k22, gc1 / k22, 0, 0, dk22 / k22};
            memcpy(gn, g9, sizeof g9);
        }
    }
    /* Back through the change of units (x2d_n = (x2d - m) / f, x3d_n = (x3d - c) / s, w_n = w / w_max,
     * K_n = A K): each gradient is zero for the item where it is not finite. */
    if (gx2) {
        const double inv_f = 1.0 / f;
        for (int k = 0; k < 2 * n; k++) gx2[k] *= inv_f;
        zero_if_not_finite(gx2, (size_t)2 * n);
    }
    if (gx3) {
        const double inv_s = 1.0 / s;
        for (int k = 0; k < 3 * n; k++) gx3[k] *= inv_s;
        zero_if_not_finite(gx3, (size_t)3 * n);
    }
    if (gw) {
        const double inv_w = 1.0 / wmax;
        for (int k = 0; k < n; k++) gw[k] *= inv_w;
        zero_if_not_finite(gw, (size_t)n);
    }
    if (gK) {
        for (int k = 0; k < 3; k++) {
            gK[k] = gn[k] / f;
            gK[3 + k] = gn[3 + k] / f;
            gK[6 + k] = gn[6 + k] - (m0 * gn[k] + m1 * gn[3 + k]) / f;
        }
        zero_if_not_finite(gK, 9);
    }
    free(buf);
}

/* The least-squares layer's backward for B items: the inputs as given to bpnp_layer_forward, its
 * pose, R, H, units and flags, the gradient of the loss with respect to pose (B x 6, entry (b, k)
 * at grad_pose[b * gp_item + k * gp_entry]: a sum's gradient arrives expanded, with strides 0)
 * and R (B x 9, may be NULL). Writes the per-item gradients of x2d (B x n x 2), x3d (B x n x 3),
 * K (B x 9), w (B x n) and dist (B x 5) for the non-NULL outputs (a shared input's gradient is
 * the sum over its items). */
void bpnp_layer_backward(int B, int n, const double *x2d, const double *x3d, int x3d_batched, const double *K,
                         int K_batched, const double *w, int w_batched, const double *dist, int dist_batched,
                         const double *pose, const double *R, const double *H, const double *units,
                         const uint8_t *flags, const double *grad_pose, int64_t gp_item, int64_t gp_entry,
                         const double *grad_R, int num_threads, int forked, double *g_x2d, double *g_x3d,
                         double *g_K, double *g_w, double *g_dist) {
    LayerBackJob job = {B, n, x3d_batched, K_batched, w_batched, dist_batched, x2d, x3d, K, w, dist, pose, R, H,
                        units, flags, grad_pose, grad_R, gp_item, gp_entry, g_x2d, g_x3d, g_K, g_w, g_dist};
    run_items(B, layer_backward_item, &job, num_threads, forked);
}
