/*
 * bpnp's native CPU forward: the global PnP solve of bpnp/solvers (init.py, lm.py, pnp.py)
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
    double K[9];
    double m00, m01, m11, c0, c1; /* entries of K / K[2][2] */
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

static void mat3_mul(const double *A, const double *B, double *C) {
    double T[9];
    for (int i = 0; i < 3; i++)
        for (int j = 0; j < 3; j++)
            T[3 * i + j] = A[3 * i] * B[j] + A[3 * i + 1] * B[3 + j] + A[3 * i + 2] * B[6 + j];
    memcpy(C, T, sizeof T);
}

/* Rodrigues' formula, with the Taylor series of its coefficients below |v| = 1e-4. */
static void rodrigues(const double *v, double *R) {
    double th2 = v[0] * v[0] + v[1] * v[1] + v[2] * v[2];
    double a, b;
    if (th2 < 1e-8) {
        a = 1.0 - th2 / 6.0 + th2 * th2 / 120.0;
        b = 0.5 - th2 / 24.0 + th2 * th2 / 720.0;
    } else {
        double th = sqrt(th2), s = sin(0.5 * th) / th;
        a = sin(th) / th;
        b = 2.0 * s * s;
    }
    double x = v[0], y = v[1], z = v[2];
    R[0] = 1.0 - b * (y * y + z * z); R[1] = -a * z + b * x * y;        R[2] = a * y + b * x * z;
    R[3] = a * z + b * x * y;        R[4] = 1.0 - b * (x * x + z * z); R[5] = -a * x + b * y * z;
    R[6] = -a * y + b * x * z;       R[7] = a * x + b * y * z;        R[8] = 1.0 - b * (x * x + y * y);
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

/* sqrt(a^2 + b^2): the direct formula unless it could over- or underflow (libm's hypot is
 * several times slower and was 2% of the solve). */
static double hypot_fast(double a, double b) {
    double r2 = a * a + b * b;
    return (r2 > 1e-290 && r2 < 1e290) ? sqrt(r2) : hypot(a, b);
}

/* Eigen-decomposition of a symmetric N x N matrix (N <= 9), eigenvalues ascending: Householder
 * reduction to tridiagonal form, then the implicit QL algorithm (as in EISPACK tred2/tql2).
 * A is read only; column j of V (row-major, V[i*N+j]) is the eigenvector of ev[j]. Non-finite
 * input gives NaN output. */
static void symmetric_eig(int N, const double *A, double *V, double *ev) {
    double d[9], e[9];
    for (int k = 0; k < N * N; k++) {
        if (!isfinite(A[k])) {
            for (int j = 0; j < N * N; j++) V[j] = NAN;
            for (int j = 0; j < N; j++) ev[j] = NAN;
            return;
        }
        V[k] = A[k];
    }
#define VV(i, j) V[(i) * N + (j)]
    for (int j = 0; j < N; j++) d[j] = VV(N - 1, j);
    for (int i = N - 1; i > 0; i--) {
        double scale = 0.0, h = 0.0;
        for (int k = 0; k < i; k++) scale += fabs(d[k]);
        if (scale == 0.0) {
            e[i] = d[i - 1];
            for (int j = 0; j < i; j++) {
                d[j] = VV(i - 1, j);
                VV(i, j) = 0.0;
                VV(j, i) = 0.0;
            }
        } else {
            for (int k = 0; k < i; k++) {
                d[k] /= scale;
                h += d[k] * d[k];
            }
            double f = d[i - 1], g = sqrt(h);
            if (f > 0) g = -g;
            e[i] = scale * g;
            h -= f * g;
            d[i - 1] = f - g;
            for (int j = 0; j < i; j++) e[j] = 0.0;
            for (int j = 0; j < i; j++) {
                f = d[j];
                VV(j, i) = f;
                g = e[j] + VV(j, j) * f;
                for (int k = j + 1; k <= i - 1; k++) {
                    g += VV(k, j) * d[k];
                    e[k] += VV(k, j) * f;
                }
                e[j] = g;
            }
            f = 0.0;
            for (int j = 0; j < i; j++) {
                e[j] /= h;
                f += e[j] * d[j];
            }
            double hh = f / (h + h);
            for (int j = 0; j < i; j++) e[j] -= hh * d[j];
            for (int j = 0; j < i; j++) {
                f = d[j];
                g = e[j];
                for (int k = j; k <= i - 1; k++) VV(k, j) -= (f * e[k] + g * d[k]);
                d[j] = VV(i - 1, j);
                VV(i, j) = 0.0;
            }
        }
        d[i] = h;
    }
    for (int i = 0; i < N - 1; i++) {
        VV(N - 1, i) = VV(i, i);
        VV(i, i) = 1.0;
        double h = d[i + 1];
        if (h != 0.0) {
            for (int k = 0; k <= i; k++) d[k] = VV(k, i + 1) / h;
            for (int j = 0; j <= i; j++) {
                double g = 0.0;
                for (int k = 0; k <= i; k++) g += VV(k, i + 1) * VV(k, j);
                for (int k = 0; k <= i; k++) VV(k, j) -= g * d[k];
            }
        }
        for (int k = 0; k <= i; k++) VV(k, i + 1) = 0.0;
    }
    for (int j = 0; j < N; j++) {
        d[j] = VV(N - 1, j);
        VV(N - 1, j) = 0.0;
    }
    VV(N - 1, N - 1) = 1.0;
    e[0] = 0.0;
    /* implicit QL on the tridiagonal matrix (d, e) */
    for (int i = 1; i < N; i++) e[i - 1] = e[i];
    e[N - 1] = 0.0;
    double f = 0.0, tst1 = 0.0;
    const double eps = 2.220446049250313e-16;
    for (int l = 0; l < N; l++) {
        double t = fabs(d[l]) + fabs(e[l]);
        if (t > tst1) tst1 = t;
        int m = l;
        while (m < N - 1 && fabs(e[m]) > eps * tst1) m++;
        if (m > l) {
            for (int guard = 0; guard < 60; guard++) {
                double g = d[l];
                double p = (d[l + 1] - g) / (2.0 * e[l]);
                double r = hypot_fast(p, 1.0);
                if (p < 0) r = -r;
                d[l] = e[l] / (p + r);
                d[l + 1] = e[l] * (p + r);
                double dl1 = d[l + 1];
                double h = g - d[l];
                for (int i = l + 2; i < N; i++) d[i] -= h;
                f += h;
                p = d[m];
                double c = 1.0, c2 = 1.0, c3 = 1.0, el1 = e[l + 1], s = 0.0, s2 = 0.0;
                for (int i = m - 1; i >= l; i--) {
                    c3 = c2;
                    c2 = c;
                    s2 = s;
                    g = c * e[i];
                    h = c * p;
                    r = hypot_fast(p, e[i]);
                    e[i + 1] = s * r;
                    s = e[i] / r;
                    c = p / r;
                    p = c * d[i] - s * g;
                    d[i + 1] = h + s * (c * g + s * d[i]);
                    for (int k = 0; k < N; k++) {
                        h = VV(k, i + 1);
                        VV(k, i + 1) = s * VV(k, i) + c * h;
                        VV(k, i) = c * VV(k, i) - s * h;
                    }
                }
                p = -s * s2 * c3 * el1 * e[l] / dl1;
                e[l] = s * p;
                d[l] = c * p;
                if (!(fabs(e[l]) > eps * tst1)) break;
            }
        }
        d[l] += f;
        e[l] = 0.0;
    }
    for (int i = 0; i < N; i++) ev[i] = d[i];
    for (int i = 0; i < N; i++) { /* selection sort of the eigenpairs */
        int m = i;
        for (int j = i + 1; j < N; j++)
            if (ev[j] < ev[m]) m = j;
        if (m != i) {
            double tmp = ev[i]; ev[i] = ev[m]; ev[m] = tmp;
            for (int k = 0; k < N; k++) {
                tmp = VV(k, i); VV(k, i) = VV(k, m); VV(k, m) = tmp;
            }
        }
    }
#undef VV
}

/* Exported for the tests: the eigen-decomposition above. */
void bpnp_symmetric_eig(int N, const double *A, double *V, double *ev) { symmetric_eig(N, A, V, ev); }

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

/* Cholesky solve of A x = b for symmetric 6x6 A; 0 (and x = 0) unless A is positive definite. */
static int solve6_chol(const double *A, const double *b, double *x) {
    double L[36] = {0};
    for (int j = 0; j < 6; j++) {
        double s = A[j * 6 + j];
        for (int k = 0; k < j; k++) s -= L[j * 6 + k] * L[j * 6 + k];
        if (!(s > 0)) { memset(x, 0, 6 * sizeof(double)); return 0; }
        double d = sqrt(s);
        L[j * 6 + j] = d;
        for (int i = j + 1; i < 6; i++) {
            double v = A[i * 6 + j];
            for (int k = 0; k < j; k++) v -= L[i * 6 + k] * L[j * 6 + k];
            L[i * 6 + j] = v / d;
        }
    }
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
    return 1;
}

/* ---------------------------------------------------------------- reprojection cost */

/* Cost, chart gradient and exact chart Hessian (as bpnp.cost.cost_terms with hessian=True):
 * the pose is perturbed as R <- exp([w]_x) R, t <- t + tau. Depths are clamped to min_depth;
 * *seen_depth gets the smallest unclamped depth among points with positive weight. */
static double cost_terms(const Problem *p, const double *R, const double *t, double min_depth,
                         double *g, double *H, double *seen_depth) {
    /* With D = dX/dxi = [-[P]_x, I] (P = R X_obj), every per-point term is a pull-back through D:
     * gradient D^T s with s = w (d pixel/dX)^T r, and Hessian D^T Q D with Q = w J^T J (Gauss-
     * Newton) + the residual-weighted curvature of the projection, whose only non-zero entries
     * are Q02, Q12, Q22. D^T Q D costs ~40 products per point, in three blocks. The rotation
     * curvature (D depends on the chart) needs s P^T only. */
    const double m00 = p->m00, m01 = p->m01, m11 = p->m11, c0 = p->c0, c1 = p->c1;
    double cost = 0, seen = INFINITY;
    double Gr[3] = {0}, Gt[3] = {0}, Hrr[6] = {0}, Hrt[9] = {0}, Htt[6] = {0}, sP[9] = {0};
    /* Branch-free body, so that the compiler may run several points per SIMD instruction. */
#pragma omp simd reduction(+ : cost, Gr[:3], Gt[:3], Hrr[:6], Hrt[:9], Htt[:6], sP[:9]) reduction(min : seen)
    for (int i = 0; i < p->n; i++) {
        const double *X = p->x3d + 3 * i;
        double w = p->w[i];
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
        double ru = ma + c0 - p->x2d[2 * i], rv = m11 * b + c1 - p->x2d[2 * i + 1];
        double wru = w * ru, wrv = w * rv;
        cost += wru * ru + wrv * rv;
        double gu0 = m00 * iz, gu1 = m01 * iz, gu2 = -ma * iz;
        double gv1 = m11 * iz, gv2 = -(m11 * b) * iz;
        double s0 = wru * gu0, s1 = wru * gu1 + wrv * gv1, s2 = wru * gu2 + wrv * gv2;
        Gr[0] += P1 * s2 - P2 * s1;
        Gr[1] += P2 * s0 - P0 * s2;
        Gr[2] += P0 * s1 - P1 * s0;
        Gt[0] += s0; Gt[1] += s1; Gt[2] += s2;
        sP[0] += s0 * P0; sP[1] += s0 * P1; sP[2] += s0 * P2;
        sP[3] += s1 * P0; sP[4] += s1 * P1; sP[5] += s1 * P2;
        sP[6] += s2 * P0; sP[7] += s2 * P1; sP[8] += s2 * P2;
        double q0 = m00 * wru, q1 = m01 * wru + m11 * wrv, iz2 = iz * iz;
        double wgu0 = w * gu0, wgu1 = w * gu1, wgu2 = w * gu2, wgv1 = w * gv1, wgv2 = w * gv2;
        double Q00 = wgu0 * gu0, Q01 = wgu0 * gu1, Q11 = wgu1 * gu1 + wgv1 * gv1;
        double Q02 = wgu0 * gu2 - q0 * iz2;
        double Q12 = wgu1 * gu2 + wgv1 * gv2 - q1 * iz2;
        double Q22 = wgu2 * gu2 + wgv2 * gv2 + 2.0 * (q0 * a + q1 * b) * iz2;
        Htt[0] += Q00; Htt[1] += Q01; Htt[2] += Q02; Htt[3] += Q11; Htt[4] += Q12; Htt[5] += Q22;
        /* C = [P]_x Q (the rotation-translation block), then C [P]_x^T (rotation-rotation) */
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
    if (seen_depth) *seen_depth = seen;
    for (int k = 0; k < 3; k++) {
        g[k] = 2.0 * Gr[k];
        g[3 + k] = 2.0 * Gt[k];
    }
    {
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
    return cost;
}

/* ---------------------------------------------------------------- Levenberg-Marquardt */

static double evaluate(const Problem *p, const double *R, const double *t, double depth_floor,
                       double *g, double *H) {
    double seen;
    double c = cost_terms(p, R, t, depth_floor, g, H, &seen);
    /* A pose that puts weighted points behind the camera is not a valid trial point. */
    return seen <= depth_floor ? INFINITY : c;
}

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
 * number of sign flips (the order of bpnp.solvers.init._rotation_group). */
static void tetra_rotation(int k, double *R) {
    static const int perms[3][3] = {{0, 1, 2}, {1, 2, 0}, {2, 0, 1}};
    static const double signs[4][3] = {{1, 1, 1}, {1, -1, -1}, {-1, 1, -1}, {-1, -1, 1}};
    memset(R, 0, 9 * sizeof(double));
    for (int r = 0; r < 3; r++) R[3 * r + perms[k / 4][r]] = signs[k % 4][r];
}

static double quad9(const double *Om, const double *r, double *o_r) {
    double h = 0;
    for (int i = 0; i < 9; i++) {
        double v = 0;
        for (int j = 0; j < 9; j++) v += Om[i * 9 + j] * r[j];
        o_r[i] = v;
        h += r[i] * v;
    }
    return h;
}

/* Local minimum of vec(R)^T Om vec(R) on SO(3) by damped Newton from R, on the chart
 * R <- exp([d]_x) R (as bpnp.solvers.init.minimise_on_so3). The torch version runs a fixed
 * number of iterations for the whole batch; here a start stops once its Newton step is below
 * 1e-12 rad, which changes the answer by rounding only. */
static double minimise_on_so3(const double *Om, double *R, int iters, double lam0) {
    /* d vec(R) / d d_a = vec([e_a]_x R): row a has two non-zero 3-blocks, sign * (row src of R)
     * in block blk. */
    static const int blk[3][2] = {{1, 2}, {0, 2}, {0, 1}};
    static const int src[3][2] = {{2, 1}, {2, 0}, {1, 0}};
    static const double sgn[3][2] = {{-1, 1}, {1, -1}, {-1, 1}};
    double scale = 0;
    for (int k = 0; k < 9; k++) scale += Om[k * 10];
    if (!(scale > 1e-300)) scale = 1e-300;
    double o_r[9];
    double h = quad9(Om, R, o_r);
    double lam = lam0;
    double grad[3], JO[3][9], Hgn[9], N[9], H[9], A[9], ng[3], step[3];
    int fresh = 1; /* after a rejected step R is unchanged: only the damping changes */
    for (int it = 0; it < iters; it++) {
        if (fresh) { /* gradient, Gauss-Newton and exact Hessian at R */
            for (int a = 0; a < 3; a++) {
                const double *u = R + 3 * src[a][0], *v = R + 3 * src[a][1];
                const double *Ou = Om + 27 * blk[a][0], *Ov = Om + 27 * blk[a][1];
                double su = sgn[a][0], sv = sgn[a][1];
                const double *gu = o_r + 3 * blk[a][0], *gv = o_r + 3 * blk[a][1];
                grad[a] = 2.0 * (su * (u[0] * gu[0] + u[1] * gu[1] + u[2] * gu[2]) +
                                 sv * (v[0] * gv[0] + v[1] * gv[1] + v[2] * gv[2]));
                ng[a] = -grad[a];
                for (int j = 0; j < 9; j++)
                    JO[a][j] = su * (u[0] * Ou[j] + u[1] * Ou[9 + j] + u[2] * Ou[18 + j]) +
                               sv * (v[0] * Ov[j] + v[1] * Ov[9 + j] + v[2] * Ov[18 + j]);
            }
            for (int a = 0; a < 3; a++)
                for (int b = a; b < 3; b++) {
                    const double *u = R + 3 * src[b][0], *v = R + 3 * src[b][1];
                    const double *ju = JO[a] + 3 * blk[b][0], *jv = JO[a] + 3 * blk[b][1];
                    double val = sgn[b][0] * (ju[0] * u[0] + ju[1] * u[1] + ju[2] * u[2]) +
                                 sgn[b][1] * (jv[0] * v[0] + jv[1] * v[1] + jv[2] * v[2]);
                    Hgn[a * 3 + b] = Hgn[b * 3 + a] = 2.0 * val;
                }
            /* N = R reshape(o_r)^T */
            for (int a = 0; a < 3; a++)
                for (int b = 0; b < 3; b++)
                    N[a * 3 + b] = R[a * 3] * o_r[b * 3] + R[a * 3 + 1] * o_r[b * 3 + 1] + R[a * 3 + 2] * o_r[b * 3 + 2];
            double trN = N[0] + N[4] + N[8];
            for (int a = 0; a < 3; a++)
                for (int b = 0; b < 3; b++)
                    H[a * 3 + b] = Hgn[a * 3 + b] + N[a * 3 + b] + N[b * 3 + a] - (a == b ? 2.0 * trN : 0.0);
        }
        double damp[3];
        for (int a = 0; a < 3; a++) {
            double d = Hgn[a * 4];
            damp[a] = lam * (d > 1e-12 * scale ? d : 1e-12 * scale);
        }
        memcpy(A, H, sizeof A);
        for (int a = 0; a < 3; a++) A[a * 4] += damp[a];
        int pd = solve3_spd(A, ng, step);
        if (!pd) {
            /* Far from a minimum the exact Hessian can be indefinite: Gauss-Newton step. */
            memcpy(A, Hgn, sizeof A);
            for (int a = 0; a < 3; a++) A[a * 4] += damp[a];
            pd = solve3_spd(A, ng, step);
        }
        int ok = 0;
        if (pd) {
            double dR[9], Rn[9], on[9];
            rodrigues(step, dR);
            mat3_mul(dR, R, Rn);
            double hn = quad9(Om, Rn, on);
            if (hn <= h) {
                ok = 1;
                memcpy(R, Rn, sizeof Rn);
                memcpy(o_r, on, sizeof on);
                h = hn;
            }
        }
        if (ok && step[0] * step[0] + step[1] * step[1] + step[2] * step[2] < 1e-24) break;
        fresh = ok;
        lam = ok ? lam * 0.1 : lam * 10.0;
        lam = lam < 1e-12 ? 1e-12 : (lam > 1e12 ? 1e12 : lam);
    }
    double Ro[9];
    orthonormalise(R, Ro);
    memcpy(R, Ro, sizeof Ro);
    return h;
}

/* The object-space quadratic form Omega divided by its trace (On, 9x9; the trace is returned),
 * T (3x9, t = T vec(R) for the centred points), the weighted centre and covariance of the points,
 * and per point v X^T, v, w for the cheirality test (buf, 13 per point; skipped when NULL). */
static double build_omega(const Problem *p, double *On, double *T, double *centre, double *covs, double *buf) {
    const int n = p->n;
    double wsum = 0;
    centre[0] = centre[1] = centre[2] = 0;
    for (int i = 0; i < n; i++) {
        wsum += p->w[i];
        for (int k = 0; k < 3; k++) centre[k] += p->w[i] * p->x3d[3 * i + k];
    }
    for (int k = 0; k < 3; k++) centre[k] /= wsum;
    double A[6] = {0}, Bs[18] = {0}, M[36] = {0}, cov[6] = {0};
    for (int i = 0; i < n; i++) {
        double w = p->w[i];
        double va, vb;
        point_ray(p, i, &va, &vb);
        double v[3] = {va, vb, 1.0};
        double inv = 1.0 / (va * va + vb * vb + 1.0);
        double X[3] = {p->x3d[3 * i] - centre[0], p->x3d[3 * i + 1] - centre[1], p->x3d[3 * i + 2] - centre[2]};
        double P[9];
        for (int a = 0; a < 3; a++)
            for (int c = 0; c < 3; c++) P[a * 3 + c] = w * ((a == c) - v[a] * v[c] * inv);
        if (buf) {
            double *q = buf + 13 * i;
            for (int a = 0; a < 3; a++)
                for (int k = 0; k < 3; k++) q[3 * a + k] = v[a] * X[k];
            q[9] = v[0]; q[10] = v[1]; q[11] = v[2]; q[12] = w;
        }
        /* P and X X^T are symmetric: their 6 distinct entries each, 36 products per point. */
        double Ps[6] = {P[0], P[1], P[2], P[4], P[5], P[8]};
        double XXs[6] = {X[0] * X[0], X[0] * X[1], X[0] * X[2], X[1] * X[1], X[1] * X[2], X[2] * X[2]};
        for (int u = 0; u < 6; u++) {
            A[u] += Ps[u];
            cov[u] += w * XXs[u];
            for (int k = 0; k < 3; k++) Bs[u * 3 + k] += Ps[u] * X[k];
            for (int v2 = 0; v2 < 6; v2++) M[u * 6 + v2] += Ps[u] * XXs[v2];
        }
    }
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
        for (int c = 0; c < 3; c++) {
            Asym[a * 3 + c] = A[sym[a][c]];
            covs[a * 3 + c] = cov[sym[a][c]];
        }

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

/* Candidate poses, best first (as bpnp.solvers.init.initial_poses); returns their number. */
static int initial_poses(const Problem *p, const Options *o, double (*Rc)[9], double (*tc)[3], double *keyc) {
    const int n = p->n;
    double centre[3], covs[9], T[27], On[81];
    /* per point: v X^T (9), v (3), w; NULL (recompute on the fly) if out of memory */
    double *buf = (double *)malloc(sizeof(double) * 13 * (size_t)n);
    double norm = build_omega(p, On, T, centre, covs, buf);
    double V[81], ev[9];
    symmetric_eig(9, On, V, ev);
    double cV[9], spread[3];
    symmetric_eig(3, covs, cV, spread);
    /* Flat or thin point sets leave Omega with a near null space in which eigenvectors are poor
     * starts: only then are the fixed starts needed (measured in the torch version). */
    int thin = spread[0] < o->thin_ratio * o->thin_ratio * spread[2];
    int m = thin ? o->num_eigvecs : o->solid_eigvecs;
    if (m > 9) m = 9;
    double Rs[MAX_STARTS][9], hs[MAX_STARTS], ts[MAX_STARTS][3], key[MAX_STARTS];
    int S = 0;
    for (int e = 0; e < m; e++)
        for (int sg = 0; sg < 2; sg++) {
            double E[9]; /* the eigenvector as a 3x3 matrix, scaled to the norm of a rotation */
            for (int k = 0; k < 9; k++) E[k] = (sg ? -1.0 : 1.0) * V[k * 9 + e] * 1.7320508075688772;
            orthonormalise(E, Rs[S++]);
        }
    if (thin)
        for (int k = 0; k < 12; k++) tetra_rotation(k, Rs[S++]);
    double hmax = 0;
    for (int s = 0; s < S; s++) {
        hs[s] = minimise_on_so3(On, Rs[s], o->so3_iters, o->so3_damping) * norm;
        if (fabs(hs[s]) > hmax) hmax = fabs(hs[s]);
    }
    for (int s = 0; s < S; s++) {
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
                const double *q = buf + 13 * i;
                double d = tcen[0] * q[9] + tcen[1] * q[10] + tcen[2] * q[11];
                for (int k = 0; k < 9; k++) d += R[k] * q[k];
                behind += (q[12] > 0) & !(d > 0);
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
        key[s] = hs[s] / (hmax + 1e-300) + o->behind_penalty * behind / (double)n;
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
    free(buf);
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
 * bpnp.solvers.init.warm_start_trusted): its error is at most warm_start_ratio times the best
 * minimum of the eigenvector starts (solid_eigvecs of them, both signs). */
static int object_space_trusted(const Problem *p, const Options *o, const double *R) {
    double centre[3], covs[9], T[27], On[81], V[81], ev[9];
    build_omega(p, On, T, centre, covs, NULL);
    int finite = 1;
    for (int k = 0; k < 81; k++) finite &= isfinite(On[k]);
    if (!finite) return 0;
    symmetric_eig(9, On, V, ev);
    int m = o->solid_eigvecs > 9 ? 9 : o->solid_eigvecs;
    double best = INFINITY;
    for (int e = 0; e < m; e++)
        for (int sg = 0; sg < 2; sg++) {
            double E[9], Rs[9];
            for (int k = 0; k < 9; k++) E[k] = (sg ? -1.0 : 1.0) * V[k * 9 + e] * 1.7320508075688772;
            orthonormalise(E, Rs);
            double h = minimise_on_so3(On, Rs, o->so3_iters, o->so3_damping);
            if (h < best) best = h;
        }
    double o_r[9];
    double h_answer = quad9(On, R, o_r);
    return h_answer <= o->warm_start_ratio * best + 1e-12;
}

/* ---------------------------------------------------------------- one problem */

/* Weighted RMS distance of the object points from their weighted centre: the object's size. */
static double object_size(const Problem *p) {
    double wsum = 0, c[3] = {0}, ss = 0;
    for (int i = 0; i < p->n; i++) {
        wsum += p->w[i];
        for (int k = 0; k < 3; k++) c[k] += p->w[i] * p->x3d[3 * i + k];
    }
    for (int k = 0; k < 3; k++) c[k] /= wsum;
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

/* One global search with the options o (candidates, screening, refinement, selection); returns
 * whether a candidate needed the depth repair. */
static int solve_pass(const Problem *p, const Options *o, const double *init, LMState *best) {
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
        int m = initial_poses(p, o, Rc, tcand, kc);
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
    int sel = -1, iters = 0;
    for (int c = 0; c < k; c++) {
        if (!alive[c]) continue;
        levenberg_marquardt(p, o, &cand[c], o->max_iter, o->polish_steps);
        if (cand[c].iters > iters) iters = cand[c].iters;
        if (isnan(cand[c].cost)) cand[c].cost = INFINITY;
        if (sel < 0 || cand[c].cost < cand[sel].cost) sel = c;
    }
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

/* Quickselect: the k-th smallest of v[0..m-1] (v is reordered). */
static double kth_smallest(double *v, int m, int k) {
    int lo = 0, hi = m - 1;
    while (lo < hi) {
        double pivot = v[(lo + hi) / 2];
        int i = lo, j = hi;
        while (i <= j) {
            while (v[i] < pivot) i++;
            while (v[j] > pivot) j--;
            if (i <= j) {
                double tmp = v[i]; v[i] = v[j]; v[j] = tmp;
                i++; j--;
            }
        }
        if (k <= j) hi = j;
        else if (k >= i) lo = i;
        else return v[k];
    }
    return v[k];
}

/* Heavy-tailed residuals at (R, t): the largest squared residual exceeds ratio times the median
 * one (points of positive weight; median: the ((m-1)/2)-th smallest), beyond 1e-16. */
static int heavy_tailed(const Problem *p, const double *R, const double *t, double ratio) {
    double *v = (double *)malloc(sizeof(double) * (size_t)p->n);
    if (!v) return 0;
    int m = 0;
    double top = 0;
    for (int i = 0; i < p->n; i++) {
        double w = p->w[i];
        if (!(w > 0)) continue;
        const double *X = p->x3d + 3 * i;
        double P0 = R[0] * X[0] + R[1] * X[1] + R[2] * X[2] + t[0];
        double P1 = R[3] * X[0] + R[4] * X[1] + R[5] * X[2] + t[1];
        double P2 = R[6] * X[0] + R[7] * X[1] + R[8] * X[2] + t[2];
        double a = P0 / P2, b = P1 / P2;
        double ru = p->m00 * a + p->m01 * b + p->c0 - p->x2d[2 * i], rv = p->m11 * b + p->c1 - p->x2d[2 * i + 1];
        double r2 = ru * ru + rv * rv; /* unweighted: weights need not be inverse variances */
        v[m++] = r2;
        if (r2 > top) top = r2;
    }
    double med = m ? kth_smallest(v, m, (m - 1) / 2) : 0;
    free(v);
    return m > 0 && top > ratio * med + 1e-16;
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
 * the order of bpnp.solvers.init._rotation_group: permutations in lexicographic order, signs
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

/* The third pass of an escalated problem (bpnp.solvers.pnp._cube_pass): LM from the 24 cube
 * rotations with the object on the mean ray of its pixels at the depth that matches their
 * spread (moved in front of the camera where needed), screened as the candidates are; the
 * first lowest of the refined starts. */
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
    int sel = -1, iters = 0;
    for (int k = 0; k < 24; k++) {
        if (!alive[k]) continue;
        levenberg_marquardt(p, o, &cand[k], o->max_iter, o->polish_steps);
        if (cand[k].iters > iters) iters = cand[k].iters;
        if (isnan(cand[k].cost)) cand[k].cost = INFINITY;
        if (sel < 0 || cand[k].cost < cand[sel].cost) sel = k;
    }
    *out = cand[sel];
    out->iters = iters;
    out->second = INFINITY;
}

/* A needle: the weighted point set is thin in two directions (its two smaller spreads below
 * thin_ratio^2 of the largest, as variances): the rotation about its axis is barely seen, the
 * object-space minima crowd, and the search missed the best one in 0.3-0.8% of such problems
 * (bpnp.solvers.pnp.needle_like): they are escalated (exhaustive pass and cube starts). */
static int needle_like(const Problem *p, double ratio) {
    double c[3] = {0, 0, 0}, ws = 0, cov[9] = {0}, V[9], ev[3];
    for (int i = 0; i < p->n; i++) {
        if (!(p->w[i] > 0)) continue;
        ws += p->w[i];
        for (int k = 0; k < 3; k++) c[k] += p->w[i] * p->x3d[3 * i + k];
    }
    if (!(ws > 0)) return 0;
    for (int k = 0; k < 3; k++) c[k] /= ws;
    for (int i = 0; i < p->n; i++) {
        if (!(p->w[i] > 0)) continue;
        double d[3];
        for (int k = 0; k < 3; k++) d[k] = p->x3d[3 * i + k] - c[k];
        for (int a = 0; a < 3; a++)
            for (int b = 0; b < 3; b++) cov[3 * a + b] += p->w[i] * d[a] * d[b];
    }
    symmetric_eig(3, cov, V, ev);
    return ev[1] < ratio * ratio * ev[2];
}

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
    if (npos <= o->small_problem && global) {
        solve_pass(p, &full, init, best);
    } else if (solve_pass(p, o, init, best) ? global && o->escalate
                                            : global && o->escalate &&
                                                  (heavy_tailed(p, best->R, best->t, o->escalate_ratio) ||
                                                   misfit(p, best->cost, o->escalate_misfit) ||
                                                   needle_like(p, o->thin_ratio))) {
        LMState again;
        solve_pass(p, &full, init, &again);
        if (again.cost < best->cost || (isinf(best->cost) && !isinf(again.cost))) {
            if (best->iters > again.iters) again.iters = best->iters;
            *best = again;
        }
        if (o->cube_starts) {
            LMState third;
            cube_pass(p, o, &third);
            if (third.cost < best->cost) {
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
    /* A finite cost from the LM means every weighted point is in front of the camera; a (near)
     * singular Hessian means the pose is not determined by the data. */
    double Hs[36], V[36], ev[6];
    for (int a = 0; a < 6; a++)
        for (int b = 0; b < 6; b++) Hs[a * 6 + b] = 0.5 * (best->H[a * 6 + b] + best->H[b * 6 + a]);
    symmetric_eig(6, Hs, V, ev);
    double top = fabs(ev[5]) > 1e-300 ? fabs(ev[5]) : 1e-300;
    int well_posed = ev[0] > o->well_posed_ratio * top;
    best->conv = best->conv && well_posed && isfinite(best->cost);
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
    int next; /* next unclaimed item (shared by the workers) */
} Batch;

#define CHUNK 8

static volatile int in_forked_child = 0;

#if defined(_OPENMP) && defined(BPNP_THREADS)
static void mark_forked_child(void) { in_forked_child = 1; }

__attribute__((constructor)) static void register_fork_handler(void) {
    pthread_atfork(NULL, NULL, mark_forked_child);
}
#endif

static void *solve_items(void *arg) {
    Batch *j = (Batch *)arg;
    for (;;) {
        /* Dynamic scheduling: problems differ in work (candidates, iterations). */
        int b0 = __atomic_fetch_add(&j->next, CHUNK, __ATOMIC_RELAXED);
        if (b0 >= j->B) break;
        int b1 = b0 + CHUNK < j->B ? b0 + CHUNK : j->B;
        for (int b = b0; b < b1; b++) {
            Problem p;
            int n = j->n;
            p.n = n;
            p.x2d = j->x2d + (size_t)b * n * 2;
            p.x3d = j->x3d + (j->x3d_batched ? (size_t)b * n * 3 : 0);
            p.w = j->w + (j->w_batched ? (size_t)b * n : 0);
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
    }
    return NULL;
}

/* Solves B problems. Inputs are C-contiguous float64; a *_batched flag of 0 means one array
 * shared by the batch. init (B x 12: R row-major, t) may be NULL. o: the options (validated by
 * bpnp.options.SolverOptions). Outputs: R (B x 9), its rotation vector (B x 3), t (B x 3), cost
 * (B), H (B x 36), converged (B), iterations (B), the cost of the best other distinct minimum (B). Work is shared by up to num_threads threads, in
 * chunks of CHUNK problems; forked != 0 (a fork()ed child, as Python saw it) avoids OpenMP. Returns 0, or -1 for options out of the solver's range. */
int bpnp_solve(int B, int n, const double *x2d, const double *x3d, int x3d_batched, const double *K,
               int K_batched, const double *w, int w_batched, const double *init, const Options *o,
               int num_threads, int forked, double *R_out, double *rvec_out, double *t_out, double *cost_out,
               double *H_out, uint8_t *conv_out, int32_t *iter_out, double *second_out, uint8_t *trusted_out) {
    /* The fixed-size buffers bound these; SolverOptions refuses larger values before we get here. */
    if (o->num_candidates < 1 || o->num_candidates > MAX_CAND || o->num_eigvecs < 1 || o->num_eigvecs > 9 ||
        o->solid_eigvecs < 1 || o->solid_eigvecs > 9)
        return -1;
    Batch job = {B, n, x3d_batched, K_batched, w_batched, x2d, x3d, K, w, init, o,
                 R_out, t_out, cost_out, H_out, rvec_out, conv_out, iter_out, second_out, trusted_out, 0};
    int want = num_threads < 1 ? 1 : num_threads;
    if (want > (B + CHUNK - 1) / CHUNK) want = (B + CHUNK - 1) / CHUNK;
    if (want < 1) want = 1;
#if defined(_OPENMP)
    /* Loaded after PyTorch, this library resolves libgomp to the runtime PyTorch already
     * loaded: the workers are PyTorch's own (warm, often still spinning after the caller's
     * last tensor op), so nothing competes for the cores. libgomp's pool does not survive
     * fork(): in a forked child the plain threads below take over. */
    if (!in_forked_child && !forked) {
#pragma omp parallel num_threads(want) if (want > 1)
        solve_items(&job);
        return 0;
    }
#endif
#if defined(BPNP_THREADS)
    /* Plain threads, started and joined here. */
    pthread_t threads[64];
    int extra = 0;
    if (want > 64) want = 64;
    for (int k = 1; k < want; k++)
        if (pthread_create(&threads[extra], NULL, solve_items, &job) == 0) extra++;
    solve_items(&job);
    for (int k = 0; k < extra; k++) pthread_join(threads[k], NULL);
#else
    solve_items(&job);
#endif
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
