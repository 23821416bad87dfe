/* The four layer kinds of the decode step, each as the phases one thread t of nt runs (included by
 * decode_step.c; Layer / Step there). On entry S->xn holds the block-normed rows. */

/* Floats of shared scratch, of each thread's scratch, and int64s a layer needs for B rows, T positions. */
static int64_t max_cols(const Layer *L) {
    const int64_t nm = L->kind == MOE ? 5 + 2 * L->n[0] : L->kind == ATTENTION ? 4 : 2;
    int64_t cols = 0;
    for (int64_t j = 0; j < nm; j++) cols = L->m[j].cols > cols ? L->m[j].cols : cols;
    return cols;
}

static void layer_scratch(const Layer *L, int64_t d, int64_t B, int64_t T, int64_t *shared, int64_t *per,
                          int64_t *ints) {
    const int64_t *n = L->n;
    (void)d;
    *per = mm_scratch(B, max_cols(L));                           /* decode_mat's tile and X^T */
    *ints = 0;
    switch (L->kind) {
    case MAMBA: *shared = B * (n[0] + n[1] + n[2] + n[1] + n[0]); break;
    case ATTENTION: *shared = B * ((n[0] + 2 * n[1]) * n[2] + n[0] * n[2]); *per += n[2] + (n[0] / n[1]) * T; break;
    case MOE:
        *shared = B * (n[0] + n[1] + n[4]) + B * n[5] * (2 * n[3] + n[2] + 2);
        *per += n[0];
        *ints = 3 * B * n[5] + n[0] + 1;
        break;
    default: *shared = B * n[0];
    }
}

/* ---------------------------------------------------------------------------------------------- Mamba-2 */
static void mamba_layer(const Step *S, const Layer *L, int64_t li, int t, int nt, float *priv) {
    const int64_t di = L->n[0], C = L->n[1], H = L->n[2], P = L->n[3], G = L->n[4], N = L->n[5], K = L->n[6];
    const int64_t gs = L->n[7], W = di + C + H, d = S->d, B = S->B;
    float *zx = S->buf, *xc = zx + B * W, *y = xc + B * C;           /* [B, W], [B, C], [B, di] */
    int64_t a, e;
    mm_share(&L->m[0], t, nt, S->xn, d, B, zx, W, L->v[1], 0, priv);  /* in_proj: [z | xBC | dt] */
    barrier(nt);
    const float *cw = L->v[2];                                       /* causal conv over the channels */
    share(C, t, nt, 8, &a, &e);
    for (int64_t b = 0; b < B; b++) {
        float *conv = S->state[2 * (b * S->n_layers + li)];
        const float *xbc = zx + b * W + di;
        for (int64_t c = a; c < e; c++) {
            float *win = conv + c * (K - 1), v = L->n[8] ? cw[K * C + c] : 0.0f;
            for (int64_t k = 0; k < K - 1; k++) v += cw[k * C + c] * win[k];
            xc[b * C + c] = silu(v + cw[(K - 1) * C + c] * xbc[c]);
            for (int64_t k = 0; k + 1 < K - 1; k++) win[k] = win[k + 1];
            if (K > 1) win[K - 2] = xbc[c];
        }
    }
    barrier(nt);
    /* SSM, gate and grouped RMSNorm per (row, span): a span is one norm group, or the whole row when the
     * norm groups do not hold whole heads; its heads, then its norm groups */
    const float *dt_bias = L->v[3], *A = L->v[4], *D = L->v[5], *gw = L->v[6];
    const int64_t span = gs % P ? di : gs, ns = di / span, r = H / G;
    share(B * ns, t, nt, 1, &a, &e);
    for (int64_t it = a; it < e; it++) {
        const int64_t b = it / ns, c0 = (it % ns) * span;
        float *ssm = S->state[2 * (b * S->n_layers + li) + 1], *yb = y + b * di;
        const float *x = xc + b * C, *Bm = x + di, *Cm = x + di + G * N, *z = zx + b * W, *dtr = z + di + C;
        for (int64_t hh = c0 / P; hh < (c0 + span) / P; hh++) {
            float dt = dtr[hh] + dt_bias[hh];
            dt = dt > 20.0f ? dt : log1pf(expf(dt));                 /* F.softplus (threshold 20) */
            if (L->n[9] && dt < (float)L->f[0]) dt = (float)L->f[0];
            if (L->n[10]) dt = fminf(fmaxf(dt, (float)L->f[1]), (float)L->f[2]);
            const float dA = expf(dt * A[hh]);
            const float *Bg = Bm + (hh / r) * N, *Cg = Cm + (hh / r) * N;
            for (int64_t p = 0; p < P; p++) {
                const float xv = x[hh * P + p], dx = dt * xv;
                float *restrict st = ssm + (hh * P + p) * N, acc = 0.0f;
                for (int64_t n = 0; n < N; n++) {
                    st[n] = st[n] * dA + dx * Bg[n];
                    acc += st[n] * Cg[n];
                }
                yb[hh * P + p] = acc + D[hh] * xv;
            }
        }
        for (int64_t i = c0; i < c0 + span; i++) yb[i] *= silu(z[i]);
        for (int64_t g0 = c0; g0 < c0 + span; g0 += gs) {
            const float rs = 1.0f / sqrtf(sumsq(yb + g0, gs) / (float)gs + (float)L->f[3]);
            for (int64_t i = g0; i < g0 + gs; i++) yb[i] = gw[i] * (yb[i] * rs);
        }
    }
    barrier(nt);
    mm_share(&L->m[1], t, nt, y, di, B, S->h, d, L->v[7], 1, priv);    /* out_proj onto the residual */
    barrier(nt);
}

/* ---------------------------------------------------------------------------------------------- attention
 * K/V elements as the cache stores them (Layer n[3] bytes): 4 fp32; 2 bf16 (round to nearest even, NaN 0xffff,
 * as torch's CPU .to(bfloat16)); 1 FP8 E4M3 of x / scale (HybridCache.kv_store: saturated to +-448, round to
 * nearest even, NaN -> 0x7f with its sign, as torch's .to(float8_e4m3fn)), read back as E4M3[code] * scale. */
static inline uint32_t f2u(float x) {
    union { float f; uint32_t u; } c = {x};
    return c.u;
}

static inline uint16_t bf16_encode(float x) {
    const uint32_t u = f2u(x);
    if ((u & 0x7fffffff) > 0x7f800000) return 0xffff;                 /* NaN: as torch's CPU cast */
    return (uint16_t)((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}

/* In integer arithmetic after the division: the compiler's reassociation flags cannot change a rounding. */
static inline uint8_t e4m3_encode(float x) {
    const uint32_t u = f2u(x), sign = (u >> 24) & 0x80;
    uint32_t a = u & 0x7fffffff;
    if (a > 0x7f800000) return (uint8_t)(sign | 0x7f);
    if (a > 0x43e00000) a = 0x43e00000;                          /* |x| > 448: 448 */
    if (a < (121u << 23)) {                                      /* below 2^-6: subnormal steps of 2^-9 */
        const uint32_t e = a >> 23, shift = 141 - e;             /* value / 2^-9 = mant >> shift */
        if (e == 0 || shift > 24) return (uint8_t)sign;          /* below 2^-10 (or fp32 subnormal): +-0 */
        const uint32_t mant = (a & 0x7fffff) | 0x800000, q = mant >> shift, rem = mant & ((1u << shift) - 1);
        const uint32_t half = 1u << (shift - 1);
        return (uint8_t)(sign | (q + (rem > half || (rem == half && (q & 1)))));
    }
    a += ((uint32_t)(7 - 127) << 23) + 0x7ffff + ((a >> 20) & 1);  /* rebias, round the 20 dropped bits */
    return (uint8_t)(sign | (a >> 20));
}

/* n values of x stored at dst in the `bytes`-wide format (scale: E4M3's). */
static void kv_store(void *dst, const float *x, int64_t n, int64_t bytes, float scale) {
    if (bytes == 4) memcpy(dst, x, (size_t)n * sizeof(float));
    else if (bytes == 2)
        for (int64_t i = 0; i < n; i++) ((uint16_t *)dst)[i] = bf16_encode(x[i]);
    else
        for (int64_t i = 0; i < n; i++) ((uint8_t *)dst)[i] = e4m3_encode(x[i] / scale);
}

/* n stored values at src as floats: src itself (fp32) or decoded into buf. E4M3 with AVX2 + F16C: 8 codes at a
 * time as fp16 (value * 2^-8, as decode_mat's load16) times 256 scale, NaN codes blended in: the table's values
 * times the scale bit for bit (one rounding of the same product), without a lookup per element. */
static const float *kv_load(const void *src, int64_t n, int64_t bytes, float scale, float *buf) {
    const uint8_t *c = src;
    int64_t i = 0;
    if (bytes == 4) return src;
    if (bytes == 2) {
        for (; i < n; i++) buf[i] = bf16f(((const uint16_t *)src)[i]);
        return buf;
    }
#if N3_AVX2
    const __m256 s = _mm256_set1_ps(scale * 256.0f), nan = _mm256_set1_ps(NAN);
    const __m128i low7 = _mm_set1_epi16(0x7f);
    for (; i + 8 <= n; i += 8) {
        const __m128i h = _mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i *)(c + i)));
        const __m128i mag = _mm_and_si128(h, low7);
        const __m128i f = _mm_or_si128(_mm_slli_epi16(mag, 7), _mm_slli_epi16(_mm_xor_si128(h, mag), 8));
        const __m256 isnan = _mm256_castsi256_ps(_mm256_cvtepi16_epi32(_mm_cmpeq_epi16(mag, low7)));
        _mm256_storeu_ps(buf + i, _mm256_blendv_ps(_mm256_mul_ps(_mm256_cvtph_ps(f), s), nan, isnan));
    }
#endif
    for (; i < n; i++) buf[i] = E4M3[c[i]] * scale;
    return buf;
}

/* A row's K/V are its slot's [kv heads, cap, head_dim] of n[3]-byte elements; the new key/value go to its
 * position. */
static void attention_layer(const Step *S, const Layer *L, int64_t li, int t, int nt, float *priv) {
    const int64_t nq = L->n[0], nkv = L->n[1], hd = L->n[2], el = L->n[3], rep = nq / nkv;
    const int64_t QW = (nq + 2 * nkv) * hd, d = S->d, B = S->B;
    const float ks = (float)L->f[0], vs = (float)L->f[1];
    float *qkv = S->buf, *o = qkv + B * QW, *row = priv + mm_scratch(B, max_cols(L)), *sc = row + hd;
    int64_t a, e;
    mm_share(&L->m[0], t, nt, S->xn, d, B, qkv, QW, NULL, 0, priv);
    mm_share(&L->m[1], t, nt, S->xn, d, B, qkv + nq * hd, QW, NULL, 0, priv);
    mm_share(&L->m[2], t, nt, S->xn, d, B, qkv + (nq + nkv) * hd, QW, NULL, 0, priv);
    barrier(nt);
    share(B * nkv, t, nt, 1, &a, &e);
    for (int64_t it = a; it < e; it++) {                 /* the group's query heads share one pass over K/V */
        const int64_t b = it / nkv, g = it % nkv, cap = S->cap[li], pos = S->pos[b], T = pos + 1;
        char *kg = (char *)S->state[2 * (b * S->n_layers + li)] + g * cap * hd * el;
        char *vg = (char *)S->state[2 * (b * S->n_layers + li) + 1] + g * cap * hd * el;
        const float *q = qkv + b * QW;
        kv_store(kg + pos * hd * el, q + (nq + g) * hd, hd, el, ks);
        kv_store(vg + pos * hd * el, q + (nq + nkv + g) * hd, hd, el, vs);
        const float scale = 1.0f / sqrtf((float)hd);
        for (int64_t tt = 0; tt < T; tt++) {
            const float *kt = kv_load(kg + tt * hd * el, hd, el, ks, row);
            for (int64_t j = 0; j < rep; j++) sc[j * T + tt] = scale * dot(q + (g * rep + j) * hd, kt, hd);
        }
        float *ob = o + b * nq * hd + g * rep * hd;
        memset(ob, 0, (size_t)(rep * hd) * sizeof(float));
        for (int64_t j = 0; j < rep; j++) {
            float *sj = sc + j * T, mx = -INFINITY, tot = 0.0f;
            for (int64_t tt = 0; tt < T; tt++) mx = fmaxf(mx, sj[tt]);
            for (int64_t tt = 0; tt < T; tt++) tot += (sj[tt] = expf(sj[tt] - mx));
            for (int64_t tt = 0; tt < T; tt++) sj[tt] /= tot;
        }
        for (int64_t tt = 0; tt < T; tt++) {
            const float *restrict vt = kv_load(vg + tt * hd * el, hd, el, vs, row);
            for (int64_t j = 0; j < rep; j++) {
                float *restrict oj = ob + j * hd;
                const float p = sc[j * T + tt];
                for (int64_t k = 0; k < hd; k++) oj[k] += p * vt[k];
            }
        }
    }
    barrier(nt);
    mm_share(&L->m[3], t, nt, o, nq * hd, B, S->h, d, NULL, 1, priv);
    barrier(nt);
}

/* ---------------------------------------------------------------------------------------------- LatentMoE */

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
    const float *corr = L->v[1];
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

/* f [B, E + Lt + S] = [router logits | latent | shared hidden]. The routed (row, expert) pairs p = b k + j,
 * sorted by expert (pair p at s = where[p]): xs [s] their inputs, hs [s] their hidden, ys [s] their weighted
 * outputs. Each expert's two products are split over the threads by output rows, as every other matrix; then
 * each row sums its k pairs in routing order: the same sums whatever the number of threads. */
static void moe_layer(const Step *S, const Layer *L, int t, int nt, float *priv) {
    const int64_t E = L->n[0], Lt = L->n[1], I = L->n[2], lin = L->n[3], Sh = L->n[4], k = L->n[5];
    const int64_t F = E + Lt + Sh, d = S->d, B = S->B, P = B * k;
    float *f = S->buf, *xs = f + B * F, *hs = xs + P * lin, *ys = hs + P * I, *ws = ys + P * lin, *wt = ws + P;
    const Mat *up = L->m + 5, *down = L->m + 5 + E;
    float *tile = priv, *choice = tile + mm_scratch(B, max_cols(L));
    int64_t *idx = S->ints, *order = idx + P, *where = order + P, *start = where + P;
    int64_t a, e;
    mm_share(&L->m[0], t, nt, S->xn, d, B, f, F, NULL, 0, tile);
    if (Lt) mm_share(&L->m[1], t, nt, S->xn, d, B, f + E, F, L->v[2], 0, tile);
    mm_share(&L->m[2], t, nt, S->xn, d, B, f + E + Lt, F, L->v[3], 0, tile);
    share(L->m[2].rows, t, nt, 4, &a, &e);
    relu2_cols(f + E + Lt, F, B, a, e);                          /* this thread's shared-expert rows */
    barrier(nt);
    share(B, t, nt, 1, &a, &e);
    for (int64_t b = a; b < e; b++) route(L, f + b * F, choice, idx + b * k, wt + b * k);
    barrier(nt);
    const float *X = Lt ? f + E : S->xn;                         /* the experts' input: latent or normed h */
    const int64_t ldx = Lt ? F : d;
    if (t == 0) {                                                /* pairs sorted by expert (counting sort) */
        memset(start, 0, (size_t)(E + 1) * sizeof(int64_t));
        for (int64_t p = 0; p < P; p++) start[idx[p] + 1]++;
        for (int64_t x = 0; x < E; x++) start[x + 1] += start[x];
        for (int64_t p = 0; p < P; p++) order[start[idx[p]]++] = p;
        for (int64_t x = E; x > 0; x--) start[x] = start[x - 1];
        start[0] = 0;
        for (int64_t s = 0; s < P; s++) {
            where[order[s]] = s;
            ws[s] = wt[order[s]];
            memcpy(xs + s * lin, X + (order[s] / k) * ldx, (size_t)lin * sizeof(float));
        }
    }
    barrier(nt);
    share(I, t, nt, 4, &a, &e);                                  /* up, relu^2 on this thread's rows */
    for (int64_t x = 0; x < E; x++)
        if (start[x + 1] > start[x]) {
            const int64_t s = start[x], n = start[x + 1] - s;
            mm_rows(&up[x], a, e, xs + s * lin, lin, n, hs + s * I, I, NULL, NULL, 0, tile);
            relu2_cols(hs + s * I, I, n, a, e);
        }
    barrier(nt);
    share(lin, t, nt, 4, &a, &e);                                /* down, times the routing weight */
    for (int64_t x = 0; x < E; x++)
        if (start[x + 1] > start[x]) {
            const int64_t s = start[x], n = start[x + 1] - s;
            mm_rows(&down[x], a, e, hs + s * I, I, n, ys + s * lin, lin, ws + s, NULL, 0, tile);
        }
    barrier(nt);
    share(lin, t, nt, 8, &a, &e);                                /* each row's k expert outputs, summed */
    for (int64_t b = 0; b < B; b++) {
        float *dst = Lt ? f + b * F + E : S->h + b * d;
        for (int64_t i = a; i < e; i++) {
            float s = 0.0f;
            for (int64_t j = 0; j < k; j++) s += ys[where[b * k + j] * lin + i];
            dst[i] = Lt ? s : dst[i] + s;
        }
    }
    barrier(nt);
    /* [expert mix | shared hidden] @ [fc2_latent ; shared down] onto the residual (one row split for both) */
    if (Lt) mm_share(&L->m[3], t, nt, f + E, F, B, S->h, d, L->v[4], 1, tile);
    mm_share(&L->m[4], t, nt, f + E + Lt, F, B, S->h, d, L->v[5], 1, tile);
    barrier(nt);
}

/* ---------------------------------------------------------------------------------------------- MLP */
static void mlp_layer(const Step *S, const Layer *L, int t, int nt, float *priv) {
    const int64_t I = L->n[0], d = S->d, B = S->B;
    int64_t a, e;
    mm_share(&L->m[0], t, nt, S->xn, d, B, S->buf, I, L->v[1], 0, priv);
    share(I, t, nt, 4, &a, &e);
    relu2_cols(S->buf, I, B, a, e);
    barrier(nt);
    mm_share(&L->m[1], t, nt, S->buf, I, B, S->h, d, L->v[2], 1, priv);
    barrier(nt);
}
