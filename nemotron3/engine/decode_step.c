/* Small-batch decode step in C: the whole backbone for one new token of each of B sequences in one call
 * (see decode.py).
 *
 * The Python plan (`DecodePlan._step_torch`) spends about two thirds of a pico-sized step in framework
 * overhead: ~600 ATen calls of 2-6 us each around ~1 ms of GEMVs. This file runs the same math, on the
 * same prepared weights ([in, out]-contiguous fp32 copies with the pre-norm weights folded in), as plain
 * loops, so what remains is the weight reads. Each weight block is read once for all B rows (a row is one
 * sequence, at its own position in its own cache slot); routed experts run once per expert on the rows
 * that chose it. It mirrors `_step_torch`; tests compare both with the full forward at 1e-4.
 *
 * Built on first use by decode.py with the system C compiler (no ATen headers: a ~1 s compile), loaded
 * with ctypes; without a compiler the Python plan runs instead. Single-threaded, like the rest of decode
 * on CPU. No -ffast-math: it would link crtfastmath.o and turn on flush-to-zero for the whole process; the
 * flags decode.py passes allow reassociation (vectorised dot products) only.
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

/* Where the B rows of a call keep their state: layer i of row b uses state[2 (b L + i)] and the next
 * pointer ((conv, ssm) or (K, V) of the row's cache slot), K/V capacity cap[i], position pos[b]. */
typedef struct {
    int64_t n_layers;
    float *const *state;
    const int64_t *cap;
    const int64_t *pos;
} Rows;

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

/* Y[b] = (acc ? Y[b] : 0) + bias + alpha[b] X[b] @ W for the B rows of X (stride ldx) and Y (stride ldy);
 * W [n_in, n_out] row-major, alpha NULL = 1. Eight weight rows at a time over a 512-column tile of the
 * outputs: the 16 KiB weight block is read from memory once and from L1 by every row, and the inner loop
 * is a vectorised multiply-add over contiguous weight rows (eight streams: ~15% faster than four when the
 * weights come from L3). */
#define TILE 512
#define ROWS 8
static void gemm(const float *restrict X, int64_t ldx, int64_t B, int64_t n_in, const float *restrict W,
                 int64_t n_out, float *restrict Y, int64_t ldy, const float *alpha, const float *restrict bias,
                 int acc) {
    for (int64_t b = 0; b < B; b++) {
        float *restrict y = Y + b * ldy;
        if (!acc) {
            if (bias) memcpy(y, bias, (size_t)n_out * sizeof(float));
            else memset(y, 0, (size_t)n_out * sizeof(float));
        } else if (bias) {
            for (int64_t o = 0; o < n_out; o++) y[o] += bias[o];
        }
    }
    for (int64_t o0 = 0; o0 < n_out; o0 += TILE) {
        const int64_t m = n_out - o0 < TILE ? n_out - o0 : TILE;
        int64_t i = 0;
        for (; i + ROWS <= n_in; i += ROWS) {
            const float *restrict w[ROWS];
            for (int r = 0; r < ROWS; r++) w[r] = W + (i + r) * n_out + o0;
            for (int64_t b = 0; b < B; b++) {
                const float al = alpha ? alpha[b] : 1.0f, *x = X + b * ldx + i;
                float a[ROWS];
                for (int r = 0; r < ROWS; r++) a[r] = al * x[r];
                float *restrict yt = Y + b * ldy + o0;
                for (int64_t o = 0; o < m; o++)
                    yt[o] += (a[0] * w[0][o] + a[1] * w[1][o] + a[2] * w[2][o] + a[3] * w[3][o])
                           + (a[4] * w[4][o] + a[5] * w[5][o] + a[6] * w[6][o] + a[7] * w[7][o]);
            }
        }
        for (; i < n_in; i++) {
            const float *restrict w0 = W + i * n_out + o0;
            for (int64_t b = 0; b < B; b++) {
                const float ai = (alpha ? alpha[b] : 1.0f) * X[b * ldx + i];
                float *restrict yt = Y + b * ldy + o0;
                for (int64_t o = 0; o < m; o++) yt[o] += ai * w0[o];
            }
        }
    }
}

/* Y [B, n_out] = X [B, n_in] @ W [n_in, n_out]: the engine's lm_head for a few rows (faster than MKL's). */
void n3_gemm(const float *X, int64_t B, int64_t n_in, const float *W, int64_t n_out, float *Y) {
    gemm(X, n_in, B, n_in, W, n_out, Y, n_out, NULL, NULL, 0);
}

/* ---------------------------------------------------------------------------------------------- Mamba-2
 * n: d_inner, conv_dim, heads, head_dim, groups, state, kernel, norm group size, conv bias?, dt_min?, limit?
 * f: dt_min, limit lo, limit hi, gated-norm eps
 * w: in_proj^T (block norm folded), in bias, conv taps [K (+1 bias row), C], dt_bias, A = -exp(A_log), D,
 *    out_proj^T (gated-norm weight folded), out bias */

/* One row after in_proj: zx = [z | xBC | dt] -> y [di] (gated and normed), updating the row's conv window
 * [C, K-1] and SSM state [H, P, N] in place. xc [C] is scratch. */
static void mamba_recur(const Layer *L, float *restrict zx, float *restrict xc, float *restrict y,
                        float *restrict conv, float *restrict ssm) {
    const int64_t di = L->n[0], C = L->n[1], H = L->n[2], P = L->n[3], G = L->n[4], N = L->n[5], K = L->n[6];
    const int64_t gs = L->n[7];
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
}

static void mamba_rows(const Layer *L, int64_t li, const Rows *R, int64_t B, float *h, int64_t d,
                       const float *s, float *buf) {
    const int64_t di = L->n[0], C = L->n[1], W = di + C + L->n[2];
    float *zx = buf, *y = zx + B * W, *xc = y + B * di;
    gemm(h, d, B, d, L->w[0], W, zx, W, s, L->w[1], 0);
    for (int64_t b = 0; b < B; b++) {
        float *const *st = R->state + 2 * (b * R->n_layers + li);
        mamba_recur(L, zx + b * W, xc, y + b * di, st[0], st[1]);
    }
    gemm(y, di, B, di, L->w[6], d, h, d, NULL, L->w[7], 1);
}

/* ---------------------------------------------------------------------------------------------- attention
 * n: query heads, kv heads, head_dim.  w: [q|k|v]^T (block norm folded), o_proj^T.
 * A row's K/V are its slot's [kv heads, cap, head_dim]; the new key/value go to its position. */
static void attend(const Layer *L, const float *restrict qkv, float *restrict kb, float *restrict vb,
                   int64_t cap, int64_t pos, float *restrict o, float *restrict sc) {
    const int64_t nq = L->n[0], nkv = L->n[1], hd = L->n[2], rep = nq / nkv, T = pos + 1;
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
}

static void attention_rows(const Layer *L, int64_t li, const Rows *R, int64_t B, float *h, int64_t d,
                           const float *s, float *buf) {
    const int64_t nq = L->n[0], nkv = L->n[1], hd = L->n[2], QW = (nq + 2 * nkv) * hd;
    float *qkv = buf, *o = qkv + B * QW, *sc = o + B * nq * hd;
    gemm(h, d, B, d, L->w[0], QW, qkv, QW, s, NULL, 0);
    for (int64_t b = 0; b < B; b++) {
        float *const *st = R->state + 2 * (b * R->n_layers + li);
        attend(L, qkv + b * QW, st[0], st[1], R->cap[li], R->pos[b], o + b * nq * hd, sc);
    }
    gemm(o, nq * hd, B, nq * hd, L->w[1], d, h, d, NULL, NULL, 1);
}

/* ---------------------------------------------------------------------------------------------- LatentMoE
 * n: experts E, latent L (0: none), expert intermediate I, expert input size, shared intermediate S,
 *    top_k, n_group, topk_group, norm_topk_prob
 * f: routed_scaling_factor
 * w: [router | fc1_latent | shared up]^T (block norm folded), its bias, [fc2_latent ; shared down]^T,
 *    its bias, up [E, in, I], down [E, I, in], e_score_correction_bias, block norm weight (no latent) */

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

/* Router for one row: f[0..E) router logits -> sigmoid scores in place; the row's k experts and weights. */
static void route(const Layer *L, float *restrict f, float *restrict choice, int64_t *idx, float *wt) {
    const int64_t E = L->n[0], k = L->n[5], ng = L->n[6], tg = L->n[7];
    const float *corr = L->w[6];
    for (int64_t e = 0; e < E; e++) {
        f[e] = 1.0f / (1.0f + expf(-f[e]));
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
    float tot = 0.0f;
    topk(choice, E, k, idx);
    for (int64_t j = 0; j < k; j++) tot += (wt[j] = f[idx[j]]);
    for (int64_t j = 0; j < k; j++) wt[j] = (L->n[8] ? wt[j] / (tot + 1e-20f) : wt[j]) * (float)L->f[0];
}

static int moe_rows(const Layer *L, int64_t B, float *h, int64_t d, const float *s, float *buf) {
    const int64_t E = L->n[0], Lt = L->n[1], I = L->n[2], lin = L->n[3], S = L->n[4], k = L->n[5];
    const int64_t F = E + Lt + S;
    float *f = buf, *choice = f + B * F, *acc = choice + E, *xin = acc + B * lin;
    float *xg = xin + B * d, *ag = xg + B * lin, *yg = ag + B * I, *wg = yg + B * lin, *wt = wg + B;
    int64_t *ints = malloc((size_t)(2 * B * k + E + 1 + B) * sizeof(int64_t));
    if (!ints) return -1;
    int64_t *idx = ints, *order = idx + B * k, *start = order + B * k, *rows = start + E + 1;
    gemm(h, d, B, d, L->w[0], F, f, F, s, L->w[1], 0);
    for (int64_t b = 0; b < B; b++) route(L, f + b * F, choice, idx + b * k, wt + b * k);
    const float *X = f + E;                                      /* the experts' input: the latent ... */
    int64_t ldx = F;
    if (!Lt) {                                                   /* ... or the normed hidden state */
        for (int64_t b = 0; b < B; b++)
            for (int64_t i = 0; i < d; i++) xin[b * d + i] = h[b * d + i] * L->w[7][i] * s[b];
        X = xin;
        ldx = d;
    }
    /* (row, expert) pairs grouped by expert (counting sort), each expert run once on its rows */
    memset(start, 0, (size_t)(E + 1) * sizeof(int64_t));
    for (int64_t p = 0; p < B * k; p++) start[idx[p] + 1]++;
    for (int64_t e = 0; e < E; e++) start[e + 1] += start[e];
    for (int64_t p = 0; p < B * k; p++) order[start[idx[p]]++] = p;
    for (int64_t e = E; e > 0; e--) start[e] = start[e - 1];    /* the fill advanced start[e] to the end */
    start[0] = 0;
    memset(acc, 0, (size_t)(B * lin) * sizeof(float));
    for (int64_t e = 0; e < E; e++) {
        const int64_t n = start[e + 1] - start[e];
        if (!n) continue;
        for (int64_t r = 0; r < n; r++) {
            const int64_t p = order[start[e] + r];
            rows[r] = p / k;
            wg[r] = wt[p];
            memcpy(xg + r * lin, X + rows[r] * ldx, (size_t)lin * sizeof(float));
        }
        gemm(xg, lin, n, lin, L->w[4] + e * lin * I, I, ag, I, NULL, NULL, 0);
        for (int64_t i = 0; i < n * I; i++) ag[i] = relu2(ag[i]);
        gemm(ag, I, n, I, L->w[5] + e * I * lin, lin, yg, lin, wg, NULL, 0);
        for (int64_t r = 0; r < n; r++)
            for (int64_t i = 0; i < lin; i++) acc[rows[r] * lin + i] += yg[r * lin + i];
    }
    free(ints);
    for (int64_t b = 0; b < B; b++) {
        float *sh = f + b * F + E + Lt;
        for (int64_t i = 0; i < S; i++) sh[i] = relu2(sh[i]);
        if (Lt) memcpy(f + b * F + E, acc + b * lin, (size_t)Lt * sizeof(float));
        else
            for (int64_t i = 0; i < d; i++) h[b * d + i] += acc[b * lin + i];
    }
    /* [expert mix | shared hidden] @ [fc2_latent ; shared down] (no latent: shared hidden @ shared down) */
    gemm(f + E, F, B, Lt + S, L->w[2], d, h, d, NULL, L->w[3], 1);
    return 0;
}

/* ---------------------------------------------------------------------------------------------- MLP
 * n: intermediate I.  w: up^T (block norm folded), up bias, down^T, down bias. */
static void mlp_rows(const Layer *L, int64_t B, float *h, int64_t d, const float *s, float *buf) {
    const int64_t I = L->n[0];
    gemm(h, d, B, d, L->w[0], I, buf, I, s, L->w[1], 0);
    for (int64_t i = 0; i < B * I; i++) buf[i] = relu2(buf[i]);
    gemm(buf, I, B, I, L->w[2], d, h, d, NULL, L->w[3], 1);
}

static int64_t scratch_floats(const Layer *L, int64_t d, int64_t B, int64_t T) {
    const int64_t *n = L->n;
    switch (L->kind) {
    case MAMBA: return B * ((n[0] + n[1] + n[2]) + n[0]) + n[1];
    case ATTENTION: return B * ((n[0] + 2 * n[1]) * n[2] + n[0] * n[2]) + (n[0] / n[1]) * T;
    case MOE: return B * (n[0] + n[1] + n[4]) + n[0] + B * (3 * n[3] + d + n[2] + 1 + n[5]);
    default: return B * n[0];
    }
}

/* The backbone on one new token for each of B rows. x[b]: row b's token embedding [d] (read only);
 * eps[i]: layer i's pre-norm eps; state / cap / pos: see Rows; out [B, d] = norm_f(h) (norm_f's weight
 * and eps given). Returns 0, or -1 when scratch memory cannot be allocated or a layer exceeds the routing
 * buffers (nothing is written then, unless the allocation fails mid-way in a MoE layer). */
int n3_decode_rows(const Layer *layers, int64_t n_layers, int64_t d, int64_t B, const float *const *x,
                   const double *eps, float *const *state, const int64_t *cap, const int64_t *pos,
                   const float *norm_f, double eps_f, float *out) {
    int64_t need = 0, T = 0;
    for (int64_t b = 0; b < B; b++) T = pos[b] + 1 > T ? pos[b] + 1 : T;
    for (int64_t i = 0; i < n_layers; i++) {
        const Layer *L = &layers[i];
        if (L->kind == MOE && (L->n[0] > 4096 || L->n[5] > L->n[0])) return -1;
        int64_t m = scratch_floats(L, d, B, T);
        need = m > need ? m : need;
    }
    float *buf = malloc((size_t)(need + B * d + B) * sizeof(float));
    if (!buf) return -1;
    float *h = buf + need, *s = h + B * d;
    const Rows R = {n_layers, state, cap, pos};
    for (int64_t b = 0; b < B; b++) memcpy(h + b * d, x[b], (size_t)d * sizeof(float));
    int rc = 0;
    for (int64_t i = 0; i < n_layers && !rc; i++) {
        const Layer *L = &layers[i];
        for (int64_t b = 0; b < B; b++) s[b] = 1.0f / sqrtf(sumsq(h + b * d, d) / (float)d + (float)eps[i]);
        switch (L->kind) {
        case MAMBA: mamba_rows(L, i, &R, B, h, d, s, buf); break;
        case ATTENTION: attention_rows(L, i, &R, B, h, d, s, buf); break;
        case MOE: rc = moe_rows(L, B, h, d, s, buf); break;
        default: mlp_rows(L, B, h, d, s, buf);
        }
    }
    for (int64_t b = 0; b < B && !rc; b++) {
        const float sb = 1.0f / sqrtf(sumsq(h + b * d, d) / (float)d + (float)eps_f);
        for (int64_t i = 0; i < d; i++) out[b * d + i] = h[b * d + i] * norm_f[i] * sb;
    }
    free(buf);
    return rc;
}
