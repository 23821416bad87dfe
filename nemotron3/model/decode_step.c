/* Batch-1 decode step in C: the whole backbone for one new token in one call (see decode.py).
 *
 * The Python plan (`DecodePlan._step_torch`) spends about two thirds of a pico-sized step in framework
 * overhead: ~600 ATen calls of 2-6 us each around ~1 ms of GEMVs. This file runs the same math, on the
 * same prepared weights ([in, out]-contiguous fp32 copies with the pre-norm weights folded in), as plain
 * loops, so what remains is the weight reads. It mirrors `_step_torch` line for line; tests compare both
 * with the full forward at 1e-4.
 *
 * Built on first use by decode.py with the system C compiler (no ATen headers: a ~1 s compile), loaded
 * with ctypes; without a compiler the Python plan runs instead. Single-threaded, like the rest of batch-1
 * decode on CPU. No -ffast-math: it would link crtfastmath.o and turn on flush-to-zero for the whole
 * process; the flags decode.py passes allow reassociation (vectorised dot products) only.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { MAMBA = 0, ATTENTION = 1, MOE = 2, MLP = 3 };

/* One backbone layer. `n` (sizes, flags), `f` (constants) and `w` (weight pointers, NULL = absent) are
 * laid out per kind as named in the step functions below; decode.py fills them (`_native_layer`). */
typedef struct {
    int64_t kind;
    int64_t n[12];
    double f[6];
    const float *w[10];
} Layer;

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

/* y = (acc ? y : 0) + b + alpha * x @ W, W [n_in, n_out] row-major. Eight input rows per pass over a
 * tile of outputs that stays in L1; the inner loop is a vectorised multiply-add over contiguous weight
 * rows (eight streams: ~15% faster than four when the weights come from L3). */
#define TILE 512
#define ROWS 8
static void gemv(const float *restrict x, int64_t n_in, const float *restrict W, int64_t n_out,
                 float *restrict y, float alpha, const float *restrict b, int acc) {
    if (!acc) {
        if (b) memcpy(y, b, (size_t)n_out * sizeof(float));
        else memset(y, 0, (size_t)n_out * sizeof(float));
    } else if (b) {
        for (int64_t o = 0; o < n_out; o++) y[o] += b[o];
    }
    for (int64_t o0 = 0; o0 < n_out; o0 += TILE) {
        const int64_t m = n_out - o0 < TILE ? n_out - o0 : TILE;
        float *restrict yt = y + o0;
        int64_t i = 0;
        for (; i + ROWS <= n_in; i += ROWS) {
            float a[ROWS];
            const float *restrict w[ROWS];
            for (int r = 0; r < ROWS; r++) {
                a[r] = alpha * x[i + r];
                w[r] = W + (i + r) * n_out + o0;
            }
            for (int64_t o = 0; o < m; o++)
                yt[o] += (a[0] * w[0][o] + a[1] * w[1][o] + a[2] * w[2][o] + a[3] * w[3][o])
                       + (a[4] * w[4][o] + a[5] * w[5][o] + a[6] * w[6][o] + a[7] * w[7][o]);
        }
        for (; i < n_in; i++) {
            const float ai = alpha * x[i];
            const float *restrict w0 = W + i * n_out + o0;
            for (int64_t o = 0; o < m; o++) yt[o] += ai * w0[o];
        }
    }
}

/* y [n_out] = x [n_in] @ W [n_in, n_out]: the engine's lm_head GEMV for one row (faster than MKL's). */
void n3_gemv(const float *x, int64_t n_in, const float *W, int64_t n_out, float *y) {
    gemv(x, n_in, W, n_out, y, 1.0f, NULL, 0);
}

/* n: d_inner, conv_dim, heads, head_dim, groups, state, kernel, norm group size, conv bias?, dt_min?, limit?
 * f: dt_min, limit lo, limit hi, gated-norm eps
 * w: in_proj^T (block norm folded), in bias, conv taps [K (+1 bias row), C], dt_bias, A = -exp(A_log), D,
 *    out_proj^T (gated-norm weight folded), out bias
 * conv [C, K-1] and ssm [H, P, N] are this slot's state, updated in place. */
static void mamba_step(const Layer *L, float *restrict h, int64_t d, float s, float *restrict conv,
                       float *restrict ssm, float *restrict buf) {
    const int64_t di = L->n[0], C = L->n[1], H = L->n[2], P = L->n[3], G = L->n[4], N = L->n[5], K = L->n[6];
    const int64_t gs = L->n[7];
    float *zx = buf, *xc = buf + di + C + H, *y = xc + C;
    gemv(h, d, L->w[0], di + C + H, zx, s, L->w[1], 0);
    const float *z = zx, *xbc = zx + di;
    float *dt = zx + di + C;
    const float *cw = L->w[2];
    for (int64_t c = 0; c < C; c++) xc[c] = L->n[8] ? cw[K * C + c] : 0.0f;
    for (int64_t k = 0; k < K - 1; k++)
        for (int64_t c = 0; c < C; c++) xc[c] += cw[k * C + c] * conv[c * (K - 1) + k];
    for (int64_t c = 0; c < C; c++) {
        xc[c] = silu(xc[c] + cw[(K - 1) * C + c] * xbc[c]);
        float *win = conv + c * (K - 1);
        for (int64_t k = 0; k + 1 < K - 1; k++) win[k] = win[k + 1];
        if (K > 1) win[K - 2] = xbc[c];
    }
    const float *dt_bias = L->w[3], *A = L->w[4], *D = L->w[5];
    for (int64_t i = 0; i < H; i++) {
        float v = dt[i] + dt_bias[i];
        v = v > 20.0f ? v : log1pf(expf(v));                     /* F.softplus (threshold 20) */
        if (L->n[9] && v < (float)L->f[0]) v = (float)L->f[0];
        if (L->n[10]) v = fminf(fmaxf(v, (float)L->f[1]), (float)L->f[2]);
        dt[i] = v;
    }
    const float *x = xc, *B = xc + di, *Cm = xc + di + G * N;
    const int64_t r = H / G;
    for (int64_t hh = 0; hh < H; hh++) {
        const float dA = expf(dt[hh] * A[hh]);
        const float *Bg = B + (hh / r) * N, *Cg = Cm + (hh / r) * N;
        for (int64_t p = 0; p < P; p++) {
            const float xv = x[hh * P + p], dx = dt[hh] * xv;
            float *restrict st = ssm + (hh * P + p) * N;
            float acc = 0.0f;
            for (int64_t n = 0; n < N; n++) {
                st[n] = st[n] * dA + dx * Bg[n];
                acc += st[n] * Cg[n];
            }
            y[hh * P + p] = acc + D[hh] * xv;
        }
    }
    for (int64_t i = 0; i < di; i++) y[i] *= silu(z[i]);
    for (int64_t g0 = 0; g0 < di; g0 += gs) {
        const float rs = 1.0f / sqrtf(sumsq(y + g0, gs) / (float)gs + (float)L->f[3]);
        for (int64_t i = g0; i < g0 + gs; i++) y[i] *= rs;
    }
    gemv(y, di, L->w[6], d, h, 1.0f, L->w[7], 1);
}

/* n: query heads, kv heads, head_dim.  w: [q|k|v]^T (block norm folded), o_proj^T.
 * kb / vb: this slot's K/V [kv heads, cap, head_dim]; the new key/value are written at `pos`. */
static void attention_step(const Layer *L, float *restrict h, int64_t d, float s, float *restrict kb,
                           float *restrict vb, int64_t cap, int64_t pos, float *restrict buf) {
    const int64_t nq = L->n[0], nkv = L->n[1], hd = L->n[2], rep = nq / nkv, T = pos + 1;
    float *qkv = buf, *o = buf + (nq + 2 * nkv) * hd, *sc = o + nq * hd;
    gemv(h, d, L->w[0], (nq + 2 * nkv) * hd, qkv, s, NULL, 0);
    for (int64_t g = 0; g < nkv; g++) {
        memcpy(kb + (g * cap + pos) * hd, qkv + (nq + g) * hd, (size_t)hd * sizeof(float));
        memcpy(vb + (g * cap + pos) * hd, qkv + (nq + nkv + g) * hd, (size_t)hd * sizeof(float));
    }
    const float scale = 1.0f / sqrtf((float)hd);
    memset(o, 0, (size_t)(nq * hd) * sizeof(float));
    for (int64_t g = 0; g < nkv; g++) {          /* the group's query heads share one pass over its K/V */
        const float *kg = kb + g * cap * hd, *vg = vb + g * cap * hd;
        for (int64_t t = 0; t < T; t++)
            for (int64_t j = 0; j < rep; j++) sc[j * T + t] = scale * dot(qkv + (g * rep + j) * hd, kg + t * hd, hd);
        for (int64_t j = 0; j < rep; j++) {
            float *sj = sc + j * T, mx = -INFINITY, tot = 0.0f;
            for (int64_t t = 0; t < T; t++) mx = fmaxf(mx, sj[t]);
            for (int64_t t = 0; t < T; t++) tot += (sj[t] = expf(sj[t] - mx));
            for (int64_t t = 0; t < T; t++) sj[t] /= tot;
        }
        for (int64_t t = 0; t < T; t++)
            for (int64_t j = 0; j < rep; j++) {
                float *restrict oj = o + (g * rep + j) * hd;
                const float p = sc[j * T + t], *restrict vt = vg + t * hd;
                for (int64_t e = 0; e < hd; e++) oj[e] += p * vt[e];
            }
    }
    gemv(o, nq * hd, L->w[1], d, h, 1.0f, NULL, 1);
}

/* Indices of the k largest of v[0..n) (descending; ties to the lower index), n <= 4096. */
static void topk(const float *v, int64_t n, int64_t k, int64_t *idx) {
    unsigned char taken[4096];
    memset(taken, 0, (size_t)n);
    for (int64_t j = 0; j < k; j++) {
        int64_t best = -1;
        for (int64_t e = 0; e < n; e++)
            if (!taken[e] && (best < 0 || v[e] > v[best])) best = e;
        taken[best] = 1;
        idx[j] = best;
    }
}

/* n: experts E, latent L (0: none), expert intermediate I, expert input size, shared intermediate S,
 *    top_k, n_group, topk_group, norm_topk_prob
 * f: routed_scaling_factor
 * w: [router | fc1_latent | shared up]^T (block norm folded), its bias, [fc2_latent ; shared down]^T,
 *    its bias, up [E, in, I], down [E, I, in], e_score_correction_bias, block norm weight (no latent) */
static void moe_step(const Layer *L, float *restrict h, int64_t d, float s, float *restrict buf) {
    const int64_t E = L->n[0], Lt = L->n[1], I = L->n[2], lin = L->n[3], S = L->n[4], k = L->n[5];
    const int64_t ng = L->n[6], tg = L->n[7];
    float *f = buf, *choice = f + E + Lt + S, *a = choice + E, *acc = a + I, *xin = acc + lin;
    gemv(h, d, L->w[0], E + Lt + S, f, s, L->w[1], 0);
    const float *corr = L->w[6];
    for (int64_t e = 0; e < E; e++) {
        f[e] = 1.0f / (1.0f + expf(-f[e]));                       /* sigmoid scores, in place */
        choice[e] = f[e] + corr[e];
    }
    if (ng > 1) {                                                /* group-limited routing */
        const int64_t per = E / ng;
        float gsc[4096];
        int64_t keep[4096];
        for (int64_t g = 0; g < ng; g++) {
            int64_t two[2];
            topk(choice + g * per, per, 2, two);
            gsc[g] = choice[g * per + two[0]] + choice[g * per + two[1]];
        }
        topk(gsc, ng, tg, keep);
        for (int64_t g = 0; g < ng; g++) {
            int kept = 0;
            for (int64_t j = 0; j < tg; j++) kept |= keep[j] == g;
            if (!kept)
                for (int64_t e = g * per; e < (g + 1) * per; e++) choice[e] = -INFINITY;
        }
    }
    int64_t idx[256];
    float wt[256], tot = 0.0f;
    topk(choice, E, k, idx);
    for (int64_t j = 0; j < k; j++) tot += (wt[j] = f[idx[j]]);
    for (int64_t j = 0; j < k; j++) wt[j] = (L->n[8] ? wt[j] / (tot + 1e-20f) : wt[j]) * (float)L->f[0];
    const float *x = f + E;                                      /* the experts' input: the latent ... */
    if (!Lt) {                                                   /* ... or the normed hidden state */
        for (int64_t i = 0; i < d; i++) xin[i] = h[i] * L->w[7][i] * s;
        x = xin;
    }
    memset(acc, 0, (size_t)lin * sizeof(float));
    for (int64_t j = 0; j < k; j++) {
        gemv(x, lin, L->w[4] + idx[j] * lin * I, I, a, 1.0f, NULL, 0);
        for (int64_t i = 0; i < I; i++) a[i] = relu2(a[i]);
        gemv(a, I, L->w[5] + idx[j] * I * lin, lin, acc, wt[j], NULL, 1);
    }
    float *sh = f + E + Lt;
    for (int64_t i = 0; i < S; i++) sh[i] = relu2(sh[i]);
    if (Lt) {                       /* [expert mix | shared hidden] @ [fc2_latent ; shared down] in one pass */
        memcpy(f + E, acc, (size_t)Lt * sizeof(float));
        gemv(f + E, Lt + S, L->w[2], d, h, 1.0f, L->w[3], 1);
    } else {
        for (int64_t i = 0; i < d; i++) h[i] += acc[i];
        gemv(sh, S, L->w[2], d, h, 1.0f, L->w[3], 1);
    }
}

/* n: intermediate I.  w: up^T (block norm folded), up bias, down^T, down bias. */
static void mlp_step(const Layer *L, float *restrict h, int64_t d, float s, float *restrict buf) {
    const int64_t I = L->n[0];
    gemv(h, d, L->w[0], I, buf, s, L->w[1], 0);
    for (int64_t i = 0; i < I; i++) buf[i] = relu2(buf[i]);
    gemv(buf, I, L->w[2], d, h, 1.0f, L->w[3], 1);
}

static int64_t scratch_floats(const Layer *L, int64_t d, int64_t T) {
    const int64_t *n = L->n;
    switch (L->kind) {
    case MAMBA: return (n[0] + n[1] + n[2]) + n[1] + n[0];
    case ATTENTION: return (n[0] + 2 * n[1]) * n[2] + n[0] * n[2] + (n[0] / n[1]) * T;
    case MOE: return (n[0] + n[1] + n[4]) + n[0] + n[2] + n[3] + d;
    default: return n[0];
    }
}

/* The backbone on one token. x: the token's embedding [d] (read only); eps[i]: layer i's pre-norm eps;
 * state[2i], state[2i+1]: layer i's (conv, ssm) or (K, V) for the slot, cap[i] its K/V capacity; pos: the
 * slot's length before this token. out [d] = norm_f(h) (norm_f's weight and eps given). Returns 0, or -1
 * when scratch memory cannot be allocated or a layer is malformed (nothing is written then). */
int n3_decode_step(const Layer *layers, int64_t n_layers, int64_t d, const float *x, const double *eps,
                   float **state, const int64_t *cap, int64_t pos, const float *norm_f, double eps_f,
                   float *out) {
    int64_t need = 0;
    for (int64_t i = 0; i < n_layers; i++) {
        const Layer *L = &layers[i];
        if (L->kind == MOE && (L->n[0] > 4096 || L->n[5] > 256)) return -1;
        int64_t m = scratch_floats(L, d, pos + 1);
        need = m > need ? m : need;
    }
    float *buf = malloc((size_t)(need + d) * sizeof(float));
    if (!buf) return -1;
    float *h = buf + need;
    memcpy(h, x, (size_t)d * sizeof(float));
    for (int64_t i = 0; i < n_layers; i++) {
        const Layer *L = &layers[i];
        const float s = 1.0f / sqrtf(sumsq(h, d) / (float)d + (float)eps[i]);
        switch (L->kind) {
        case MAMBA: mamba_step(L, h, d, s, state[2 * i], state[2 * i + 1], buf); break;
        case ATTENTION: attention_step(L, h, d, s, state[2 * i], state[2 * i + 1], cap[i], pos, buf); break;
        case MOE: moe_step(L, h, d, s, buf); break;
        default: mlp_step(L, h, d, s, buf);
        }
    }
    const float s = 1.0f / sqrtf(sumsq(h, d) / (float)d + (float)eps_f);
    for (int64_t i = 0; i < d; i++) out[i] = h[i] * norm_f[i] * s;
    free(buf);
    return 0;
}
