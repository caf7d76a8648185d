/* The two memory-bound loops of the torch backend's matrix path, fused so each weight is read once.
 *
 * A weight is a dense matrix of O rows and J columns in memory order (out-rows outermost), cut into
 * conv groups of Rg rows; its column channels are indexed by (row / Rg) * J + j.
 *
 *   sq_sums: rows[r] = sum_j w[r,j]^2 and cols[g*J + j] = sum_{r in group g} w[r,j]^2, in one read of w;
 *   update:  t[r,j] += (rowc[r] + colc[g*J + j]) * w[r,j], in one read of w and t (t may be w).
 *
 * torch would need three ops for the sums (square, row sum, column sum) and two passes over the
 * target for the update; on a CPU all of them are bound by memory traffic. Work is split over
 * `nthreads` POSIX threads by element count, cut at row boundaries; each thread sums its columns into
 * its own partial buffer and the partials are added in a fixed order (deterministic for a thread count).
 * Compiled at first use by tritonprune/kernels/cpu_native.py; no Python or torch headers needed.
 */
#include <pthread.h>
#include <stdint.h>
#include <string.h>

#define MAX_THREADS 256

typedef struct {
    void *w;          /* weight */
    void *t;          /* update target (grad, or w itself); NULL: not updated by this call */
    const float *rowc, *colc; /* update coefficients per row / per group column, or NULL */
    void *rows, *cols;        /* sums out, or NULL: not wanted */
    int64_t O, J, Rg;
} tp_mat;

typedef struct {
    const tp_mat *m;
    int64_t n, begin, end;
    void *colpart;
    int op;
} tp_job;

static int64_t active(const tp_mat *m, int op) {
    return op == 0 ? (m->rows != NULL || m->cols != NULL) : (m->t != NULL && (m->rowc || m->colc));
}

/* Rows [r0, r1) of matrix m (its elements start at `base` in the job's element range) this job owns;
 * cuts fall on row starts of the matrix they lie in, so both ends are whole rows. */
static void row_span(const tp_job *jb, const tp_mat *m, int64_t base, int64_t *r0, int64_t *r1) {
    int64_t sz = m->O * m->J;
    int64_t lo = jb->begin > base ? jb->begin - base : 0;
    int64_t hi = jb->end - base < sz ? jb->end - base : sz;
    *r0 = lo / m->J;
    *r1 = lo < hi ? hi / m->J : *r0;
}

/* Half types are loaded as float and stored back rounded to nearest even: compute in float32, store in the
 * weight's dtype. bfloat16 is the top half of a float32. float16 is converted with integer and float bit
 * tricks rather than the compiler's _Float16 or F16C's scalar instructions, neither of which gcc 12
 * vectorises; exact (the tests check all 65536 values and the rounding of random float32 results). */
typedef union { uint32_t u; float f; } tp_bits;

static inline float tp_bf16_load(uint16_t h) {
    tp_bits v = {(uint32_t)h << 16};
    return v.f;
}
static inline uint16_t tp_bf16_store(float f) {
    tp_bits v = {.f = f};
    if ((v.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((v.u >> 16) | 0x40u); /* NaN stays quiet NaN */
    return (uint16_t)((v.u + 0x7fffu + ((v.u >> 16) & 1u)) >> 16);
}
static inline float tp_as_f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint32_t tp_as_u(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
/* every case is computed and one is selected, so the compiler vectorises the loops that use these */
static inline float tp_f16_load(uint16_t h) {
    uint32_t o = ((uint32_t)h & 0x7fffu) << 13, exp = o & (0x7c00u << 13);
    uint32_t normal = o + ((127u - 15u) << 23);
    uint32_t infnan = normal + ((128u - 16u) << 23);
    uint32_t sub = tp_as_u(tp_as_f(normal + (1u << 23)) - tp_as_f(113u << 23)); /* renormalised by the FPU */
    uint32_t r = exp == (0x7c00u << 13) ? infnan : (exp == 0 ? sub : normal);
    return tp_as_f(r | (((uint32_t)h & 0x8000u) << 16));
}
static inline uint16_t tp_f16_store(float f) {
    uint32_t u = tp_as_u(f), sign = u & 0x80000000u;
    u ^= sign;
    uint32_t big = u > (255u << 23) ? 0x7e00u : 0x7c00u; /* NaN -> quiet NaN, overflow -> inf */
    uint32_t dm = ((127u - 15u) + (23u - 10u) + 1u) << 23;
    uint32_t sub = tp_as_u(tp_as_f(u) + tp_as_f(dm)) - dm; /* subnormal results: the FPU rounds */
    uint32_t nrm = (u + ((uint32_t)(15 - 127) << 23) + 0xfffu + ((u >> 13) & 1u)) >> 13;
    uint32_t o = u >= ((127u + 16u) << 23) ? big : (u < (113u << 23) ? sub : nrm);
    return (uint16_t)(o | (sign >> 16));
}
#define TP_SAME(x) (x)

/* One weight dtype's loops: T is the storage type, A the accumulation type (the type of rows, cols and
 * the column partials), LD/ST convert between them; coefficients are float32. */
#define TP_DEFINE(suffix, T, A, LD, ST)                                                                               \
    static void sums_##suffix(const tp_job *jb) {                                                          \
        int64_t base = 0, cbase = 0;                                                                       \
        A *cp = (A *)jb->colpart;                                                                          \
        for (int64_t i = 0; i < jb->n; i++) {                                                              \
            const tp_mat *m = &jb->m[i];                                                                   \
            if (!active(m, 0)) continue;                                                                   \
            int64_t r, r_end;                                                                              \
            row_span(jb, m, base, &r, &r_end);                                                             \
            if (m->cols && m->Rg == m->O) { /* four rows per pass over their columns (one conv group) */    \
                for (; r + 4 <= r_end; r += 4) {                                                           \
                    const T *restrict x0 = (const T *)m->w + r * m->J;                                     \
                    const T *restrict x1 = x0 + m->J, *restrict x2 = x1 + m->J, *restrict x3 = x2 + m->J;  \
                    A *restrict c = cp + cbase + (r / m->Rg) * m->J;                                       \
                    A a0 = 0, a1 = 0, a2 = 0, a3 = 0;                                                      \
                    for (int64_t j = 0; j < m->J; j++) {                                                   \
                        A y0 = LD(x0[j]), y1 = LD(x1[j]), y2 = LD(x2[j]), y3 = LD(x3[j]);                   \
                        A v0 = y0 * y0, v1 = y1 * y1, v2 = y2 * y2, v3 = y3 * y3;  \
                        a0 += v0; a1 += v1; a2 += v2; a3 += v3;                                            \
                        c[j] += (v0 + v1) + (v2 + v3);                                                     \
                    }                                                                                      \
                    if (m->rows) {                                                                         \
                        A *rs = (A *)m->rows + r;                                                          \
                        rs[0] = a0; rs[1] = a1; rs[2] = a2; rs[3] = a3;                                    \
                    }                                                                                      \
                }                                                                                          \
            }                                                                                              \
            for (; r < r_end; r++) {                                                                       \
                const T *restrict x = (const T *)m->w + r * m->J;                                          \
                A *restrict c = cp + cbase + (r / m->Rg) * m->J;                                           \
                A acc = 0;                                                                                 \
                if (m->cols) {                                                                             \
                    for (int64_t j = 0; j < m->J; j++) { A y = LD(x[j]), v = y * y; acc += v; c[j] += v; }         \
                } else {                                                                                   \
                    for (int64_t j = 0; j < m->J; j++) { A y = LD(x[j]); acc += y * y; }                                 \
                }                                                                                          \
                if (m->rows) ((A *)m->rows)[r] = acc;                                                      \
            }                                                                                              \
            base += m->O * m->J;                                                                           \
            cbase += (m->O / m->Rg) * m->J;                                                                \
        }                                                                                                  \
    }                                                                                                      \
    static void update_##suffix(const tp_job *jb) {                                                        \
        int64_t base = 0;                                                                                  \
        for (int64_t i = 0; i < jb->n; i++) {                                                              \
            const tp_mat *m = &jb->m[i];                                                                   \
            if (!active(m, 1)) continue;                                                                   \
            int64_t r0, r1;                                                                                \
            row_span(jb, m, base, &r0, &r1);                                                               \
            for (int64_t r = r0; r < r1; r++) {                                                            \
                const T *x = (const T *)m->w + r * m->J;                                                   \
                T *t = (T *)m->t + r * m->J;                                                               \
                A a = m->rowc ? (A)m->rowc[r] : (A)0;                                                      \
                if (m->colc) {                                                                             \
                    const float *c = m->colc + (r / m->Rg) * m->J;                                         \
                    for (int64_t j = 0; j < m->J; j++) t[j] = ST(LD(t[j]) + (a + (A)c[j]) * LD(x[j]));                       \
                } else {                                                                                   \
                    for (int64_t j = 0; j < m->J; j++) t[j] = ST(LD(t[j]) + a * LD(x[j]));                                   \
                }                                                                                          \
            }                                                                                              \
            base += m->O * m->J;                                                                           \
        }                                                                                                  \
    }                                                                                                      \
    static void *run_##suffix(void *arg) {                                                                 \
        tp_job *jb = (tp_job *)arg;                                                                        \
        if (jb->op == 0) sums_##suffix(jb); else update_##suffix(jb);                                      \
        return NULL;                                                                                       \
    }                                                                                                      \
    static void reduce_cols_##suffix(const tp_mat *ms, int64_t n, int nt, const A *cp, int64_t tc) {      \
        int64_t cbase = 0;                                                                                 \
        for (int64_t i = 0; i < n; i++) {                                                                  \
            if (!active(&ms[i], 0)) continue;                                                              \
            int64_t ncol = (ms[i].O / ms[i].Rg) * ms[i].J;                                                 \
            if (ms[i].cols) {                                                                              \
                A *out = (A *)ms[i].cols;                                                                  \
                for (int64_t k = 0; k < ncol; k++) {                                                       \
                    A s = 0;                                                                               \
                    for (int t = 0; t < nt; t++) s += cp[t * tc + cbase + k];                              \
                    out[k] = s;                                                                            \
                }                                                                                          \
            }                                                                                              \
            cbase += ncol;                                                                                 \
        }                                                                                                  \
    }                                                                                                      \
    /* op 0: sums (colpart: nthreads * total_cols scratch), op 1: update */                             \
    int tp_run_##suffix(int op, const tp_mat *ms, int64_t n, int nthreads, A *colpart) {                   \
        if (nthreads < 1) nthreads = 1;                                                                    \
        if (nthreads > MAX_THREADS) nthreads = MAX_THREADS;                                                \
        int64_t tc = total_cols(ms, n);                                                                    \
        tp_dispatch(op, ms, n, nthreads, colpart, tc, sizeof(A), run_##suffix);                            \
        if (op == 0) reduce_cols_##suffix(ms, n, nthreads, colpart, tc);                                   \
        return 0;                                                                                          \
    }

#ifdef _OPENMP
/* Built with -fopenmp this links libgomp.so.1, which the dynamic linker resolves to the copy torch has
 * already loaded: the parts run on torch's own intra-op threads, which are awake (spinning) right after
 * torch's previous op. Separate threads would compete with those spinning threads for the cores. */
static void run_parts(tp_job *jobs, int nthreads, void *(*fn)(void *)) {
#pragma omp parallel for num_threads(nthreads) schedule(static, 1)
    for (int t = 0; t < nthreads; t++) fn(&jobs[t]);
}
#else
static void run_parts(tp_job *jobs, int nthreads, void *(*fn)(void *)) {
    pthread_t th[MAX_THREADS];
    int started[MAX_THREADS];
    for (int t = 1; t < nthreads; t++)
        started[t] = jobs[t].begin < jobs[t].end && pthread_create(&th[t], NULL, fn, &jobs[t]) == 0;
    fn(&jobs[0]);
    for (int t = 1; t < nthreads; t++) {
        if (started[t]) pthread_join(th[t], NULL);
        else if (jobs[t].begin < jobs[t].end) fn(&jobs[t]); /* no thread to be had: do it here */
    }
}
#endif

/* columns of all active matrices: the length of one thread's partial buffer */
static int64_t total_cols(const tp_mat *ms, int64_t n) {
    int64_t tc = 0;
    for (int64_t i = 0; i < n; i++)
        if (active(&ms[i], 0)) tc += (ms[i].O / ms[i].Rg) * ms[i].J;
    return tc;
}

/* Split the active elements over nthreads at row boundaries and run `fn` on each part. */
static void tp_dispatch(int op, const tp_mat *ms, int64_t n, int nthreads, void *colpart, int64_t tc,
                        size_t esize, void *(*fn)(void *)) {
    int64_t total = 0;
    for (int64_t i = 0; i < n; i++)
        if (active(&ms[i], op)) total += ms[i].O * ms[i].J;
    if (op == 0) memset(colpart, 0, esize * (size_t)nthreads * (size_t)tc);
    tp_job jobs[MAX_THREADS];
    int64_t prev = 0;
    for (int t = 0; t < nthreads; t++) {
        int64_t cut = total;
        if (t + 1 < nthreads) { /* round the even share down to a row start of the matrix it falls in */
            int64_t c = total * (t + 1) / nthreads, base = 0;
            for (int64_t i = 0; i < n; i++) {
                if (!active(&ms[i], op)) continue;
                int64_t sz = ms[i].O * ms[i].J;
                if (c < base + sz) { c = base + ((c - base) / ms[i].J) * ms[i].J; break; }
                base += sz;
            }
            cut = c < prev ? prev : c;
        }
        jobs[t] = (tp_job){ms, n, prev, cut, (char *)colpart + esize * (size_t)t * (size_t)tc, op};
        prev = cut;
    }
    run_parts(jobs, nthreads, fn);
}

TP_DEFINE(f32, float, float, TP_SAME, TP_SAME)
TP_DEFINE(f64, double, double, TP_SAME, TP_SAME)
TP_DEFINE(bf16, uint16_t, float, tp_bf16_load, tp_bf16_store)
TP_DEFINE(f16, uint16_t, float, tp_f16_load, tp_f16_store)
