/* Small-batch decode step in C: the whole backbone for one new token of each of B sequences in one call
 * (see decode_plan.py), on N threads, reading every weight where and as the model stores it.
 *
 * The Python plan (`DecodePlan._step_torch`) spends about two thirds of a pico-sized step in framework
 * overhead (~600 ATen calls of 2-6 us each). This file runs the same math as plain loops on the model's
 * own tensors: linears and routed experts as `Mat`s (fp32, bf16, FP8 E4M3 per-tensor or NVFP4, decoded in
 * registers: decode_mat.c), the small vectors (norm weights, biases, conv taps, dt_bias, A, D) as fp32, the
 * K/V cache as it stores them (fp32, bf16 or FP8 E4M3 with per-layer scales: decode_layers.c).
 * Each weight is read once per call for all B rows (a row is one sequence, at its own position in its own
 * cache slot); routed experts run once per expert on the rows that chose it.
 *
 * Threads (decode_pool.c): every phase of a layer is split over the nt threads of the call and phases
 * are separated by barriers. Matrix products split their output rows; the conv over channels; the SSM
 * and the gated norm over (row, norm group); attention over (row, KV head); routing over rows; each routed
 * expert's products by output rows too (each row then sums its experts' outputs in routing order). The
 * result does not depend on nt: every output element is computed by one thread, in the same order whatever
 * the split.
 *
 * Built on first use by decode_plan.py with the system C compiler (-march=native where it works), loaded
 * with ctypes. No -ffast-math: it would link crtfastmath.o and turn on flush-to-zero for the whole
 * process; decode_plan.py's flags allow reassociation (vectorised dot products) only. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "decode_mat.c"
#include "decode_pool.c"

enum { MAMBA = 0, ATTENTION = 1, MOE = 2, MLP = 3 };

/* One backbone layer: sizes n, constants f, fp32 vectors v (NULL = absent) and matrices m, per kind:
 * Mamba     n: d_inner, conv_dim, heads, head_dim, groups, state, kernel, norm group size, conv bias?,
 *              dt_min?, limit?          f: dt_min, limit lo, limit hi, gated-norm eps
 *           v: block norm, in bias, conv taps [K (+1 bias row), C], dt_bias, A = -exp(A_log), D,
 *              gated-norm weight, out bias          m: in_proj, out_proj
 * Attention n: query heads, kv heads, head_dim, K/V element bytes (4 fp32, 2 bf16, 1 FP8 E4M3)
 *           f: k_scale, v_scale (E4M3)   v: block norm   m: q, k, v, o
 * MoE       n: experts E, latent Lt (0: none), expert intermediate I, expert input lin, shared S, top_k,
 *              n_group, topk_group, norm_topk_prob          f: routed_scaling_factor
 *           v: block norm, e_score_correction_bias, fc1_latent bias, shared up bias, fc2_latent bias,
 *              shared down bias
 *           m: router, fc1_latent, shared up, fc2_latent, shared down, up[E], down[E]
 * MLP       n: intermediate I   v: block norm, up bias, down bias   m: up, down */
typedef struct {
    int64_t kind;
    int64_t n[12];
    double f[6];
    const float *v[10];
    const Mat *m;
} Layer;

/* One call: B rows; row b's layer-i state is state[2 (b L + i)] and the next pointer ((conv, ssm) fp32 or
 * (K, V) in the layer's K/V format, of its cache slot), K/V capacity cap[i], position pos[b]. Scratch: shared
 * buffers, then one block of `per_thread` floats per thread. */
typedef struct {
    const Layer *layers;
    int64_t n_layers, d, B, T, per_thread;
    const double *eps;
    void *const *state;
    const int64_t *cap, *pos;
    const float *norm_f;
    double eps_f;
    float *out;
    const Mat *head;
    float *logits;
    float *h, *xn, *buf, *priv;
    int64_t *ints;
} Step;

static inline float silu(float x) { return x / (1.0f + expf(-x)); }
static inline float relu2(float x) { return x > 0.0f ? x * x : 0.0f; }

static float sumsq(const float *restrict x, int64_t n) {
    float s = 0.0f;
    for (int64_t i = 0; i < n; i++) s += x[i] * x[i];
    return s;
}

static float dot(const float *restrict a, const float *restrict b, int64_t n) {
    float s = 0.0f;
    for (int64_t i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

/* Thread t's share of M's output rows, written to Y (stride ldy) for the B rows of X (stride ldx). */
static void mm_share(const Mat *M, int t, int nt, const float *X, int64_t ldx, int64_t B, float *Y, int64_t ldy,
                     const float *bias, int acc, float *scratch) {
    int64_t a, b;
    share(M->rows, t, nt, 4, &a, &b);
    mm_rows(M, a, b, X, ldx, B, Y, ldy, NULL, bias, acc, scratch);
}

/* rows [a, b) of Y [B, ld]: relu(y)^2 on columns [c0, c1) */
static void relu2_cols(float *Y, int64_t ld, int64_t B, int64_t c0, int64_t c1) {
    for (int64_t b = 0; b < B; b++)
        for (int64_t i = c0; i < c1; i++) Y[b * ld + i] = relu2(Y[b * ld + i]);
}

#include "decode_layers.c"

static void step_thread(void *arg, int t, int nt) {
    Step *S = arg;
    const int64_t d = S->d, B = S->B;
    float *priv = S->priv + t * S->per_thread;
    int64_t a, e;
    for (int64_t i = 0; i < S->n_layers; i++) {
        const Layer *L = &S->layers[i];
        share(B, t, nt, 1, &a, &e);                              /* the pre-norm, rows split over threads */
        for (int64_t b = a; b < e; b++) {
            const float *h = S->h + b * d, *w = L->v[0];
            float *xn = S->xn + b * d;
            const float s = 1.0f / sqrtf(sumsq(h, d) / (float)d + (float)S->eps[i]);
            for (int64_t k = 0; k < d; k++) xn[k] = w[k] * (h[k] * s);
        }
        barrier(nt);
        switch (L->kind) {
        case MAMBA: mamba_layer(S, L, i, t, nt, priv); break;
        case ATTENTION: attention_layer(S, L, i, t, nt, priv); break;
        case MOE: moe_layer(S, L, t, nt, priv); break;
        default: mlp_layer(S, L, t, nt, priv);
        }
    }
    share(B, t, nt, 1, &a, &e);
    for (int64_t b = a; b < e; b++) {
        const float *h = S->h + b * d;
        const float s = 1.0f / sqrtf(sumsq(h, d) / (float)d + (float)S->eps_f);
        for (int64_t k = 0; k < d; k++) S->out[b * d + k] = S->norm_f[k] * (h[k] * s);
    }
    if (S->head) {                                               /* logits [B, V] = out @ lm_head^T */
        barrier(nt);
        mm_share(S->head, t, nt, S->out, d, B, S->logits, S->head->rows, NULL, 0, priv);
    }
}

/* Row `tok` of the embedding table as fp32 (the table in any stored format). */
static void embed_row(const Mat *E, int64_t tok, float *x) {
    if (E->fmt == F32) memcpy(x, (const float *)E->w + tok * E->cols, (size_t)E->cols * sizeof(float));
    else if (E->fmt == BF16)
        for (int64_t k = 0; k < E->cols; k++) x[k] = bf16f(((const uint16_t *)E->w)[tok * E->cols + k]);
    else
        for (int64_t k = 0; k < E->cols; k++) x[k] = wget(E, tok, k);
}

/* The backbone on one new token for each of B rows, on nt threads. emb: the embedding table [V, d], tokens[b]
 * row b's token; eps[i]: layer i's pre-norm eps; state / cap / pos: see Step; out [B, d] = norm_f(h); head
 * (NULL: none): lm_head [V', d], then logits [B, V'] = out @ head^T in the same call. Returns 0, or -1 when
 * scratch memory cannot be allocated or a layer exceeds the routing buffers (nothing is written then). */
int n3_decode_rows(const Layer *layers, int64_t n_layers, int64_t d, int64_t B, const Mat *emb,
                   const int64_t *tokens, const double *eps, void *const *state, const int64_t *cap,
                   const int64_t *pos, const float *norm_f, double eps_f, float *out, const Mat *head,
                   float *logits, int64_t threads) {
    int64_t shared = 0, per = head ? mm_scratch(B, d) : 0, ints = 0, T = 0;
    const int nt = threads < 1 ? 1 : threads > MAX_THREADS ? MAX_THREADS : (int)threads;
    for (int64_t b = 0; b < B; b++) T = pos[b] + 1 > T ? pos[b] + 1 : T;
    for (int64_t i = 0; i < n_layers; i++) {
        const Layer *L = &layers[i];
        if (L->kind == MOE && (L->n[0] > 4096 || L->n[5] > L->n[0])) return -1;
        int64_t sh, pt, in;
        layer_scratch(L, d, B, T, &sh, &pt, &in);
        shared = sh > shared ? sh : shared;
        per = pt > per ? pt : per;
        ints = in > ints ? in : ints;
    }
    per = (per + 15) & ~(int64_t)15;                             /* threads' blocks on separate cache lines */
    float *mem = malloc((size_t)(2 * B * d + shared + nt * per) * sizeof(float));
    int64_t *im = malloc((size_t)(ints + 1) * sizeof(int64_t));
    if (!mem || !im) {
        free(mem), free(im);
        return -1;
    }
    Step S = {layers, n_layers, d, B, T, per, eps, state, cap, pos, norm_f, eps_f, out, head, logits,
              mem, mem + B * d, mem + 2 * B * d, mem + 2 * B * d + shared, im};
    for (int64_t b = 0; b < B; b++) embed_row(emb, tokens[b], S.h + b * d);
    parallel(step_thread, &S, nt);
    free(mem), free(im);
    return 0;
}

/* out[b] = the index of row b's largest value in x [B, V], the first one on ties; a NaN counts as the largest
 * (torch.argmax's rule). */
void n3_argmax(const float *x, int64_t B, int64_t V, int64_t *out) {
    for (int64_t b = 0; b < B; b++) {
        const float *r = x + b * V;
        int64_t best = 0;
        for (int64_t i = 0; i < V; i++) {
            if (r[i] != r[i]) { best = i; break; }
            if (r[i] > r[best]) best = i;
        }
        out[b] = best;
    }
}

/* Y [B, M.rows] = X [B, M.cols] @ M^T on nt threads (the engine's lm_head for a few rows). */
typedef struct {
    const Mat *M;
    const float *X;
    int64_t B;
    float *Y, *tiles;
} MatJob;

static void matmul_thread(void *arg, int t, int nt) {
    const MatJob *J = arg;
    mm_share(J->M, t, nt, J->X, J->M->cols, J->B, J->Y, J->M->rows, NULL, 0, J->tiles + t * mm_scratch(J->B, J->M->cols));
}

/* The attention layer's own K/V encoding and decoding, for tests against torch's: n values of x [n] fp32 as a
 * cache of `bytes`-wide elements stores them (4 fp32, 2 bf16, 1 E4M3 of x / scale), and n stored values as
 * fp32 (E4M3 times scale). */
void n3_kv_store(void *dst, const float *x, int64_t n, int64_t bytes, float scale) {
    kv_store(dst, x, n, bytes, scale);
}

void n3_kv_load(float *dst, const void *src, int64_t n, int64_t bytes, float scale) {
    const float *x = kv_load(src, n, bytes, scale, dst);
    if (x != dst) memcpy(dst, x, (size_t)n * sizeof(float));
}

int n3_matmul(const Mat *M, const float *X, int64_t B, float *Y, int64_t threads) {
    const int nt = threads < 1 ? 1 : threads > MAX_THREADS ? MAX_THREADS : (int)threads;
    MatJob J = {M, X, B, Y, malloc((size_t)(nt * mm_scratch(B, M->cols)) * sizeof(float))};
    if (!J.tiles) return -1;
    parallel(matmul_thread, &J, nt);
    free(J.tiles);
    return 0;
}

__attribute__((constructor)) static void n3_init(void) { init_tables(); }
