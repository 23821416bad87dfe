/* Matrix products on weights in their stored format (included by decode_step.c).
 *
 * A `Mat` is a linear's weight as the model holds it, [rows = out, cols = in] row-major, never copied:
 *   F32   float [rows, cols]
 *   BF16  uint16 [rows, cols] (bf16 bits)                     value = bits << 16
 *   FP8   uint8 e4m3 [rows, cols], fp32 per-tensor scale s2    value = e4m3 * s2
 *   NVFP4 uint8 [rows, cols/2] E2M1 codes (element 0 in the low nibble), e4m3 block scales [rows, cols/16],
 *         fp32 tensor scale s2                                  value = e2m1 * scale_b * s2
 * `mm_rows` computes output rows [r0, r1) of Y[b] = (acc ? Y[b] : 0) + bias + alpha[b] * W @ X[b] for B rows;
 * the threads of a step each take a slice of the output rows (in blocks of four). Weights are
 * decoded to fp32 in registers, and read from memory once per call for all B rows:
 *   B = 1     straight into the multiply-adds, one dot product per weight row (dot_rows);
 *   B = 2, 3  the same, each decoded weight vector times every row of X (few_avx2);
 *   B > 3     the four rows decoded into an L1-resident fp32 tile [4, K] (F32: the weight itself); X^T [K, B
 *             padded to 8s] built once per call; a register-blocked micro-kernel (panel_avx2) broadcasts each
 *             weight over vectors of 8 rows of X^T, 4 x (1..3) accumulators of 8 rows along k, no horizontal
 *             sums (one 4 x 8 transpose per block at the end).
 *
 * AVX2+FMA+F16C (-march=native where the CPU has them) decodes 8 weights per instruction sequence:
 * bf16 by a widening shift, e4m3 through F16C (the bits moved into an fp16, times 2^8), E2M1 through a
 * byte shuffle of the doubled values {0, 1, 2, 3, 4, 6, 8, 12} (halved with the tensor scale). Elsewhere
 * (or when cols is not a multiple of 16) the same math runs as scalar loops. */
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define N3_AVX2 1
#else
#define N3_AVX2 0
#endif

enum { F32 = 0, BF16 = 1, FP8 = 2, NVFP4 = 3 };

typedef struct {
    int64_t fmt, rows, cols;
    const void *w;              /* the weight (codes for NVFP4) */
    const uint8_t *bscale;      /* NVFP4 block scales (e4m3) [rows, cols / 16] */
    float s2;                   /* FP8 / NVFP4 tensor scale (1 otherwise) */
} Mat;

static float E4M3[256];         /* e4m3 byte -> float (NaN codes as NaN) */
static const float E2M1[16] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f,
                               -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};

static void init_tables(void) {
    for (int b = 0; b < 256; b++) {
        const int e = (b >> 3) & 15, m = b & 7;
        float v = e ? ldexpf(1.0f + m / 8.0f, e - 7) : ldexpf(m / 8.0f, -6);
        if ((b & 0x7f) == 0x7f) v = NAN;
        E4M3[b] = (b & 0x80) ? -v : v;
    }
}

static inline float bf16f(uint16_t v) {
    union { uint32_t u; float f; } c = {(uint32_t)v << 16};
    return c.f;
}

/* Weight (o, k) as a float, the scalar reference of the vector decoders below. */
static inline float wget(const Mat *M, int64_t o, int64_t k) {
    switch (M->fmt) {
    case F32: return ((const float *)M->w)[o * M->cols + k];
    case BF16: return bf16f(((const uint16_t *)M->w)[o * M->cols + k]);
    case FP8: return E4M3[((const uint8_t *)M->w)[o * M->cols + k]] * M->s2;
    default: {
        const uint8_t byte = ((const uint8_t *)M->w)[(o * M->cols + k) >> 1];
        return E2M1[k & 1 ? byte >> 4 : byte & 15] * E4M3[M->bscale[o * (M->cols / 16) + k / 16]] * M->s2;
    }
    }
}

#if N3_AVX2
static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* Weights (o, k .. k+15) decoded into two vectors of 8, unscaled by s2 (FP8: times 2^-8 too, NVFP4: x2);
 * k a multiple of 16. */
#define INLINE static inline __attribute__((always_inline))
INLINE void load16(const Mat *M, const int fmt, int64_t o, int64_t k, __m256 *lo, __m256 *hi) {
    const int64_t at = o * M->cols + k;
    switch (fmt) {
    case F32:
        *lo = _mm256_loadu_ps((const float *)M->w + at);
        *hi = _mm256_loadu_ps((const float *)M->w + at + 8);
        return;
    case BF16: {
        const __m256i v = _mm256_loadu_si256((const __m256i *)((const uint16_t *)M->w + at));
        *lo = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_castsi256_si128(v)), 16));
        *hi = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_extracti128_si256(v, 1)), 16));
        return;
    }
    case FP8: {   /* e4m3 s.eeee.mmm -> fp16 s.0eeee.mmm0000000 = value * 2^-8 (subnormals included) */
        const __m128i b = _mm_loadu_si128((const __m128i *)((const uint8_t *)M->w + at));
        const __m256i h = _mm256_cvtepu8_epi16(b);
        const __m256i f = _mm256_or_si256(_mm256_slli_epi16(_mm256_and_si256(h, _mm256_set1_epi16(0x7f)), 7),
                                          _mm256_slli_epi16(_mm256_and_si256(h, _mm256_set1_epi16(0x80)), 8));
        *lo = _mm256_cvtph_ps(_mm256_castsi256_si128(f));
        *hi = _mm256_cvtph_ps(_mm256_extracti128_si256(f, 1));
        return;
    }
    default: {    /* 8 bytes = 16 codes; doubled E2M1 values by byte shuffle, times the block scale */
        const __m128i lut = _mm_setr_epi8(0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12);
        const __m128i b = _mm_loadl_epi64((const __m128i *)((const uint8_t *)M->w + (at >> 1)));
        const __m128i nib = _mm_and_si128(_mm_unpacklo_epi8(b, _mm_srli_epi16(b, 4)), _mm_set1_epi8(15));
        const __m128i v = _mm_shuffle_epi8(lut, nib);                 /* element order: lo, hi, lo, hi ... */
        const __m256 s = _mm256_set1_ps(E4M3[M->bscale[o * (M->cols / 16) + k / 16]]);
        *lo = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)), s);
        *hi = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(v, v))), s);
    }
    }
}
#endif

/* The factor load16 leaves out. */
static inline float vec_scale(const Mat *M) {
    return M->fmt == FP8 ? M->s2 * 256.0f : M->fmt == NVFP4 ? M->s2 * 0.5f : 1.0f;
}

/* W[o] . x for one weight row; fmt is a constant where this is inlined (dot_rows below), so the decoder is
 * chosen once. One row at a time reads the weight as one sequential stream (4 interleaved rows read ~1.5x
 * slower at batch 1). */
#if N3_AVX2
INLINE float dot_avx2(const Mat *M, const int fmt, int64_t o, const float *restrict x) {
    const int64_t K = M->cols;
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) {
        __m256 lo, hi;
        load16(M, fmt, o, k, &lo, &hi);
        a0 = _mm256_fmadd_ps(lo, _mm256_loadu_ps(x + k), a0);
        a1 = _mm256_fmadd_ps(hi, _mm256_loadu_ps(x + k + 8), a1);
    }
    return hsum(_mm256_add_ps(a0, a1)) * vec_scale(M);
}

INLINE void decode_avx2(const Mat *M, const int fmt, int64_t o, const int R, float *restrict tile) {
    const int64_t K = M->cols;
    const __m256 sc = _mm256_set1_ps(vec_scale(M));
    for (int r = 0; r < R; r++)
        for (int64_t k = 0; k < K; k += 16) {
            __m256 lo, hi;
            load16(M, fmt, o + r, k, &lo, &hi);
            _mm256_storeu_ps(tile + r * K + k, _mm256_mul_ps(lo, sc));
            _mm256_storeu_ps(tile + r * K + k + 8, _mm256_mul_ps(hi, sc));
        }
}
#define DISPATCH(fn, M, o, R, out)                                                                          \
    switch ((M)->fmt) {                                                                                     \
    case F32: if (R == 4) fn(M, F32, o, 4, out); else fn(M, F32, o, 1, out); break;                        \
    case BF16: if (R == 4) fn(M, BF16, o, 4, out); else fn(M, BF16, o, 1, out); break;                     \
    case FP8: if (R == 4) fn(M, FP8, o, 4, out); else fn(M, FP8, o, 1, out); break;                        \
    default: if (R == 4) fn(M, NVFP4, o, 4, out); else fn(M, NVFP4, o, 1, out);                            \
    }
#endif

static void dot_rows(const Mat *M, int64_t o, int R, const float *restrict x, float *dots) {
    const int64_t K = M->cols;
#if N3_AVX2
    if (K % 16 == 0) {
        for (int r = 0; r < R; r++)
            switch (M->fmt) {
            case F32: dots[r] = dot_avx2(M, F32, o + r, x); break;
            case BF16: dots[r] = dot_avx2(M, BF16, o + r, x); break;
            case FP8: dots[r] = dot_avx2(M, FP8, o + r, x); break;
            default: dots[r] = dot_avx2(M, NVFP4, o + r, x);
            }
        return;
    }
#endif
    for (int r = 0; r < R; r++) {
        float s = 0.0f;
        if (M->fmt == F32) {
            const float *restrict w = (const float *)M->w + (o + r) * K;
            for (int64_t k = 0; k < K; k++) s += w[k] * x[k];
        } else if (M->fmt == BF16) {
            const uint16_t *restrict w = (const uint16_t *)M->w + (o + r) * K;
            for (int64_t k = 0; k < K; k++) s += bf16f(w[k]) * x[k];
        } else {
            for (int64_t k = 0; k < K; k++) s += wget(M, o + r, k) * x[k];
        }
        dots[r] = s;
    }
}

/* R weight rows from o decoded into tile [R, K] fp32. */
static void decode_rows(const Mat *M, int64_t o, int R, float *restrict tile) {
    const int64_t K = M->cols;
#if N3_AVX2
    if (K % 16 == 0) {
        DISPATCH(decode_avx2, M, o, R, tile);
        return;
    }
#endif
    for (int r = 0; r < R; r++)
        for (int64_t k = 0; k < K; k++) tile[r * K + k] = wget(M, o + r, k);
}

/* Floats of mm_rows' scratch for B rows of `cols` inputs: the weight tile [4, cols] and X^T [cols, B to 8s]. */
static inline int64_t mm_scratch(int64_t B, int64_t cols) { return (4 + ((B + 7) & ~(int64_t)7)) * cols; }

#if N3_AVX2
/* v held in a register: the compiler would otherwise fold its load into each multiply-add that uses it. */
#define KEEP(v) __asm__("" : "+x"(v))

/* B = 2, 3 (MR rows of X): Y[i, r] = (acc ? Y[i, r] : 0) + bias[r] + alpha[i] W[o + r] . X[i] for R (1 or 4)
 * weight rows decoded by load16 as they are read (16 k at a time), one accumulator per (i, r) along k, reduced
 * at the end (R = 4: one horizontal-add tree for the four). Y and bias start at output o. */
INLINE void few_avx2(const Mat *M, const int fmt, int64_t o, const int R, const int MR, const float *X, int64_t ldx,
                     float *Y, int64_t ldy, const float *alpha, const float *bias, int acc) {
    const int64_t K = M->cols;
    __m256 a[3][4];
    for (int i = 0; i < MR; i++)
        for (int r = 0; r < R; r++) a[i][r] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) {
        __m256 xl[3], xh[3];
        for (int i = 0; i < MR; i++) {
            xl[i] = _mm256_loadu_ps(X + i * ldx + k), xh[i] = _mm256_loadu_ps(X + i * ldx + k + 8);
            if (MR < 3) {                                        /* 3 rows: not enough registers */
                KEEP(xl[i]);
                KEEP(xh[i]);
            }
        }
        for (int r = 0; r < R; r++) {
            __m256 lo, hi;
            load16(M, fmt, o + r, k, &lo, &hi);
            for (int i = 0; i < MR; i++) {
                a[i][r] = _mm256_fmadd_ps(lo, xl[i], a[i][r]);
                a[i][r] = _mm256_fmadd_ps(hi, xh[i], a[i][r]);
            }
        }
    }
    const float sc = vec_scale(M);
    for (int i = 0; i < MR; i++) {
        float *y = Y + i * ldy;
        const float al = (alpha ? alpha[i] : 1.0f) * sc;
        if (R == 4) {
            const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a[i][0], a[i][1]), _mm256_hadd_ps(a[i][2], a[i][3]));
            __m128 v = _mm_mul_ps(_mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1)), _mm_set1_ps(al));
            if (bias) v = _mm_add_ps(v, _mm_loadu_ps(bias));
            _mm_storeu_ps(y, acc ? _mm_add_ps(_mm_loadu_ps(y), v) : v);
        } else {
            const float v = hsum(a[i][0]) * al + (bias ? bias[0] : 0.0f);
            y[0] = acc ? y[0] + v : v;
        }
    }
}

#define FEW(F, R_) if (MR == 2) few_avx2(M, F, o, R_, 2, X, ldx, Y, ldy, alpha, bias, acc); \
                   else few_avx2(M, F, o, R_, 3, X, ldx, Y, ldy, alpha, bias, acc)
#define FEW_R(F) if (R == 4) FEW(F, 4); else FEW(F, 1)
static void few_rows(const Mat *M, int64_t o, int R, int MR, const float *X, int64_t ldx, float *Y, int64_t ldy,
                     const float *alpha, const float *bias, int acc) {
    switch (M->fmt) {
    case F32: FEW_R(F32); break;
    case BF16: FEW_R(BF16); break;
    case FP8: FEW_R(FP8); break;
    default: FEW_R(NVFP4);
    }
}

/* B > 3: rows b0 .. b0 + 8 NB of the product for R (1 or 4) fp32 weight rows w [R, K]: for each k the R weights
 * broadcast times NB vectors of X^T [K, ldt] (8 rows of X each), into R x NB accumulators along k (NB = 1: two
 * sets, even and odd k, added at the end). Rows b >= B are X^T's zero padding, not stored. */
INLINE void panel_avx2(const float *w, int64_t K, const int R, const int NB, const float *XT, int64_t ldt, int64_t b0,
                       int64_t B, float *Y, int64_t ldy, const float *alpha, const float *bias, int acc) {
    __m256 a[4][3], c[4];
    for (int r = 0; r < R; r++) {
        c[r] = _mm256_setzero_ps();
        for (int j = 0; j < NB; j++) a[r][j] = _mm256_setzero_ps();
    }
    const float *xt = XT + b0;
    if (NB == 1)
        for (int64_t k = 0; k < K; k += 2) {
            __m256 x0 = _mm256_loadu_ps(xt + k * ldt), x1 = _mm256_loadu_ps(xt + (k + 1) * ldt);
            KEEP(x0);
            KEEP(x1);
            for (int r = 0; r < R; r++) {
                a[r][0] = _mm256_fmadd_ps(_mm256_broadcast_ss(w + r * K + k), x0, a[r][0]);
                c[r] = _mm256_fmadd_ps(_mm256_broadcast_ss(w + r * K + k + 1), x1, c[r]);
            }
        }
    else
#pragma GCC unroll 2
        for (int64_t k = 0; k < K; k++) {
            __m256 x[3];
            for (int j = 0; j < NB; j++) {
                x[j] = _mm256_loadu_ps(xt + k * ldt + 8 * j);
                KEEP(x[j]);
            }
            for (int r = 0; r < R; r++) {
                const __m256 v = _mm256_broadcast_ss(w + r * K + k);
                for (int j = 0; j < NB; j++) a[r][j] = _mm256_fmadd_ps(v, x[j], a[r][j]);
            }
        }
    if (NB == 1)
        for (int r = 0; r < R; r++) a[r][0] = _mm256_add_ps(a[r][0], c[r]);
    float q[3][32];       /* R = 4: row b0 + 8 j + i's four outputs at q[j] + 8 (i % 4) + 4 (i / 4); R = 1: q[j][i] */
    for (int j = 0; j < NB; j++)
        if (R == 4) {     /* [4 outputs, 8 rows] -> vectors of (row i, row i + 4)'s four outputs */
            const __m256 t0 = _mm256_unpacklo_ps(a[0][j], a[1][j]), t1 = _mm256_unpackhi_ps(a[0][j], a[1][j]);
            const __m256 t2 = _mm256_unpacklo_ps(a[2][j], a[3][j]), t3 = _mm256_unpackhi_ps(a[2][j], a[3][j]);
            _mm256_storeu_ps(q[j], _mm256_shuffle_ps(t0, t2, 0x44));
            _mm256_storeu_ps(q[j] + 8, _mm256_shuffle_ps(t0, t2, 0xee));
            _mm256_storeu_ps(q[j] + 16, _mm256_shuffle_ps(t1, t3, 0x44));
            _mm256_storeu_ps(q[j] + 24, _mm256_shuffle_ps(t1, t3, 0xee));
        } else
            _mm256_storeu_ps(q[j], a[0][j]);
    for (int64_t b = b0; b < B && b < b0 + 8 * NB; b++) {
        const int64_t j = (b - b0) / 8, i = (b - b0) % 8;
        float *y = Y + b * ldy;
        if (R == 4) {
            __m128 v = _mm_loadu_ps(q[j] + 8 * (i % 4) + 4 * (i / 4));
            if (alpha) v = _mm_mul_ps(v, _mm_set1_ps(alpha[b]));
            if (bias) v = _mm_add_ps(v, _mm_loadu_ps(bias));
            _mm_storeu_ps(y, acc ? _mm_add_ps(_mm_loadu_ps(y), v) : v);
        } else {
            const float v = (alpha ? alpha[b] : 1.0f) * q[j][i] + (bias ? bias[0] : 0.0f);
            y[0] = acc ? y[0] + v : v;
        }
    }
}

#define PANEL(R_, NB_) panel_avx2(w, K, R_, NB_, XT, ldt, b, B, Y, ldy, alpha, bias, acc)
#define PANEL_NB(R_) if (NB == 1) PANEL(R_, 1); else if (NB == 2) PANEL(R_, 2); else PANEL(R_, 3)
static void panel_rows(const float *w, int64_t K, int R, const float *XT, int64_t ldt, int64_t B, float *Y,
                       int64_t ldy, const float *alpha, const float *bias, int acc) {
    for (int64_t b = 0; b < B;) {                   /* vectors of 8 rows in blocks of 3 (4 left: 2 + 2) */
        const int64_t left = (B - b + 7) / 8;
        const int NB = left == 4 ? 2 : left < 3 ? (int)left : 3;
        if (R == 4) PANEL_NB(4); else PANEL_NB(1);
        b += 8 * NB;
    }
}
#endif

/* Output rows [r0, r1) of Y[b] = (acc ? Y[b] : 0) + bias + alpha[b] W @ X[b], b < B; X rows at stride ldx,
 * Y rows at stride ldy, alpha / bias NULL = 1 / 0. scratch: mm_scratch(B, cols) floats (B > 1 only).
 * B = 1: one weight row at a time (dot_rows). B > 1: four weight rows at a time (the last rows one at a time);
 * B = 2, 3: few_avx2; more: X^T
 * built once per call, then four rows at a time decoded into the fp32 tile (F32: the weight itself) for
 * panel_avx2. Without AVX2 (or cols not a multiple of 16): the tile, then dot_rows for each row of X. */
static void mm_rows(const Mat *M, int64_t r0, int64_t r1, const float *X, int64_t ldx, int64_t B, float *Y,
                    int64_t ldy, const float *alpha, const float *bias, int acc, float *scratch) {
    const int64_t K = M->cols;
    const int vec = N3_AVX2 && K % 16 == 0;
    float *tile = scratch, *XT = scratch + 4 * K, d[4];
    const int64_t ldt = (B + 7) & ~(int64_t)7;
    if (vec && B > 3)                                            /* X^T [K, ldt], zero padded */
        for (int64_t k = 0; k < K; k++)
            for (int64_t b = 0; b < ldt; b++) XT[k * ldt + b] = b < B ? X[b * ldx + k] : 0.0f;
    for (int64_t o = r0; o < r1;) {
        const int R = B > 1 && r1 - o >= 4 ? 4 : 1;              /* B = 1: one row at a time (dot_avx2) */
        const float *bo = bias ? bias + o : NULL;
#if N3_AVX2
        if (vec && B > 1 && B <= 3) {
            few_rows(M, o, R, (int)B, X, ldx, Y + o, ldy, alpha, bo, acc);
            o += R;
            continue;
        }
        if (vec && B > 3) {
            if (M->fmt != F32) decode_rows(M, o, R, tile);
            panel_rows(M->fmt == F32 ? (const float *)M->w + o * K : tile, K, R, XT, ldt, B, Y + o, ldy, alpha, bo,
                       acc);
            o += R;
            continue;
        }
#endif
        const Mat T = {F32, R, K, tile, NULL, 1.0f};
        if (B > 1 && M->fmt != F32) decode_rows(M, o, R, tile);
        for (int64_t b = 0; b < B; b++) {
            dot_rows(B > 1 && M->fmt != F32 ? &T : M, B > 1 && M->fmt != F32 ? 0 : o, R, X + b * ldx, d);
            float *y = Y + b * ldy + o;
            for (int r = 0; r < R; r++) {
                const float v = (alpha ? alpha[b] : 1.0f) * d[r] + (bo ? bo[r] : 0.0f);
                y[r] = acc ? y[r] + v : v;
            }
        }
        o += R;
    }
}
