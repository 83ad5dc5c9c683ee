/* Batch-1 matrix-vector products for decoding, float32 or bfloat16 weights, float32 math.
 *
 * Decoding one token reads every weight it uses once and does two flops per weight: the time
 * is the bytes read divided by the memory bandwidth. These kernels read the weights as one
 * sequential stream per thread (the hardware prefetchers' best case) and accumulate in
 * float32. Compiled on first use by moekit/matvec.py with the machine's own vector width.
 *
 * Each output element is summed by one thread in an order fixed by the shapes alone, so a
 * result does not depend on the number of threads.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef float v8f __attribute__((vector_size(32)));
typedef uint32_t v8u __attribute__((vector_size(32)));
typedef uint16_t v8h __attribute__((vector_size(16)));

static inline v8f load_f(const float *p) { v8f v; memcpy(&v, p, sizeof v); return v; }
static inline v8u load_u(const void *p) { v8u v; memcpy(&v, p, sizeof v); return v; }
static inline void store_f(float *p, v8f v) { memcpy(p, &v, sizeof v); }
static inline float sum8(v8f v) {
    return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
}
/* Eight 32-bit words hold sixteen bfloat16 values. A bfloat16 is the top half of a float32:
 * the even elements (low halves) shifted up, the odd elements (high halves) masked, are their
 * float32 values exactly. The caller pairs them with x split the same way. */
static inline v8f even_bf16(v8u u) { return (v8f)(u << 16); }
static inline v8f odd_bf16(v8u u) { return (v8f)(u & 0xffff0000u); }
static inline float bf16_to_f(uint16_t b) { uint32_t w = (uint32_t)b << 16; float f; memcpy(&f, &w, 4); return f; }
/* eight consecutive bfloat16 values widened to float32 (exact: a bfloat16 is a float32's top half) */
static inline v8f load_bf16x8(const uint16_t *p) {
    v8h h;
    memcpy(&h, p, sizeof h);
    return (v8f)(__builtin_convertvector(h, v8u) << 16);
}

/* y[O] = W[O, I] x[I]: the nn.Linear layout, one row at a time (each row one stream). A row's
 * sum is fixed by I alone: four 8-lane accumulators over 32-element steps, then the tail. */
static inline float dot_f32(const float *w, const float *x, int64_t I) {
    const int64_t I32 = I & ~(int64_t)31;
    v8f a = {0}, b = {0}, c = {0}, d = {0};
    for (int64_t i = 0; i < I32; i += 32) {
        a += load_f(w + i) * load_f(x + i);
        b += load_f(w + i + 8) * load_f(x + i + 8);
        c += load_f(w + i + 16) * load_f(x + i + 16);
        d += load_f(w + i + 24) * load_f(x + i + 24);
    }
    float s = sum8((a + b) + (c + d));
    for (int64_t i = I32; i < I; i++) s += w[i] * x[i];
    return s;
}

/* x's even and odd elements of each 16-element group (of the first I & ~31), in the order a
 * bfloat16 row's 32-bit words hold them: [I32 / 2] floats each. */
static void split_even_odd(const float *x, int64_t I, float *x_even, float *x_odd) {
    const int64_t I32 = I & ~(int64_t)31;
    for (int64_t i = 0; i < I32; i += 16)
        for (int j = 0; j < 8; j++) { x_even[i / 2 + j] = x[i + 2 * j]; x_odd[i / 2 + j] = x[i + 2 * j + 1]; }
}

static inline float dot_bf16(const uint16_t *w, const float *x, const float *x_even, const float *x_odd,
                             int64_t I) {
    const int64_t I32 = I & ~(int64_t)31;
    v8f a = {0}, b = {0}, c = {0}, d = {0};
    for (int64_t i = 0; i < I32; i += 32) {
        v8u u = load_u(w + i), v = load_u(w + i + 16);
        a += even_bf16(u) * load_f(x_even + i / 2);
        b += odd_bf16(u) * load_f(x_odd + i / 2);
        c += even_bf16(v) * load_f(x_even + i / 2 + 8);
        d += odd_bf16(v) * load_f(x_odd + i / 2 + 8);
    }
    float s = sum8((a + b) + (c + d));
    for (int64_t i = I32; i < I; i++) s += bf16_to_f(w[i]) * x[i];
    return s;
}

int moekit_rows_f32(const float *W, const float *x, float *y, int64_t O, int64_t I, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t o = 0; o < O; o++) y[o] = dot_f32(W + o * I, x, I);
    return 0;
}

int moekit_rows_bf16(const uint16_t *W, const float *x, float *y, int64_t O, int64_t I, int threads) {
    const int64_t half = (I & ~(int64_t)31) / 2 + 1;
    float *x_even = malloc(sizeof(float) * (size_t)(2 * half));
    if (!x_even) return -1;
    float *x_odd = x_even + half;
    split_even_odd(x, I, x_even, x_odd);
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t o = 0; o < O; o++) y[o] = dot_bf16(W + o * I, x, x_even, x_odd, I);
    free(x_even);
    return 0;
}

/* Y[k, O] = W_e[O, I] X[k, I] for k matrices in the nn.Linear layout (a token's k experts
 * stored [O, I] each, as transformers holds them): one parallel region over all k·O rows in
 * equal contiguous ranges, so each thread reads one or two sequential streams. Each row's sum
 * is moekit_rows_*'s. */
static int rows_batch(const void *const *Ws, int bf16, const float *X, float *Y, int64_t k, int64_t I, int64_t O,
                      int threads) {
    const int64_t half = (I & ~(int64_t)31) / 2 + 1;
    float *split = NULL;
    if (bf16) {
        split = malloc(sizeof(float) * (size_t)(2 * k * half));
        if (!split) return -1;
        for (int64_t e = 0; e < k; e++) split_even_odd(X + e * I, I, split + 2 * e * half, split + (2 * e + 1) * half);
    }
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t task = 0; task < k * O; task++) {
        const int64_t e = task / O, o = task - e * O;
        Y[task] = bf16 ? dot_bf16((const uint16_t *)Ws[e] + o * I, X + e * I, split + 2 * e * half,
                                  split + (2 * e + 1) * half, I)
                       : dot_f32((const float *)Ws[e] + o * I, X + e * I, I);
    }
    free(split);
    return 0;
}

int moekit_rows_batch_f32(const float *const *Ws, const float *X, float *Y, int64_t k, int64_t I, int64_t O,
                          int threads) {
    return rows_batch((const void *const *)Ws, 0, X, Y, k, I, O, threads);
}

int moekit_rows_batch_bf16(const uint16_t *const *Ws, const float *X, float *Y, int64_t k, int64_t I, int64_t O,
                           int threads) {
    return rows_batch((const void *const *)Ws, 1, X, Y, k, I, O, threads);
}

/* y[O] = x[I] W[I, O]: moekit's expert layout. The rows are cut into at most MAX_BLOCKS
 * contiguous blocks (fixed by I alone); each block streams its rows into its own partial
 * sums, which are then added in block order. */
#define MAX_BLOCKS 8
#define MIN_BLOCK_ROWS 128

static int64_t row_blocks(int64_t I, int64_t *rows_per_block) {
    int64_t blocks = (I + MIN_BLOCK_ROWS - 1) / MIN_BLOCK_ROWS;
    if (blocks > MAX_BLOCKS) blocks = MAX_BLOCKS;
    if (blocks < 1) blocks = 1;
    int64_t per = (I + blocks - 1) / blocks;
    per = (per + 7) & ~(int64_t)7;
    *rows_per_block = per;
    return (I + per - 1) / per;
}

static __thread float *partials = NULL;
static __thread size_t partials_size = 0;

static float *partial_buffer(size_t floats) {
    if (floats > partials_size) {
        free(partials);
        partials = malloc(floats * sizeof(float));
        partials_size = partials ? floats : 0;
    }
    return partials;
}

/* One row block [start, end) of x[I] W[I, O] into the partial sums acc[O]. */
static void block_f32(const void *weights, const float *x, float *acc, int64_t start, int64_t end, int64_t O) {
    const float *W = weights;
    const int64_t O8 = O & ~(int64_t)7;
    memset(acc, 0, sizeof(float) * (size_t)O);
    int64_t i = start;
    /* Eight rows per pass over the partial sums: fewer loads and stores of them per weight read. */
    for (; i + 8 <= end; i += 8) {
        const float *w = W + i * O;
        const float *x8 = x + i;
        for (int64_t c = 0; c < O8; c += 8) {
            v8f s = load_f(acc + c);
            s += ((load_f(w + c) * x8[0] + load_f(w + O + c) * x8[1])
                  + (load_f(w + 2 * O + c) * x8[2] + load_f(w + 3 * O + c) * x8[3]))
                 + ((load_f(w + 4 * O + c) * x8[4] + load_f(w + 5 * O + c) * x8[5])
                    + (load_f(w + 6 * O + c) * x8[6] + load_f(w + 7 * O + c) * x8[7]));
            store_f(acc + c, s);
        }
        for (int64_t c = O8; c < O; c++) {
            float s = 0;
            for (int r = 0; r < 8; r++) s += w[r * O + c] * x8[r];
            acc[c] += s;
        }
    }
    for (; i < end; i++)
        for (int64_t c = 0; c < O; c++) acc[c] += W[i * O + c] * x[i];
}

/* The same for bfloat16 weights; within each 16-column group acc is kept as [8 even columns,
 * 8 odd] (put back in column order by the caller). */
static void block_bf16(const void *weights, const float *x, float *acc, int64_t start, int64_t end, int64_t O) {
    const uint16_t *W = weights;
    const int64_t O16 = O & ~(int64_t)15;
    memset(acc, 0, sizeof(float) * (size_t)O);
    int64_t i = start;
    for (; i + 8 <= end; i += 8) {
        const uint16_t *w = W + i * O;
        const float *x8 = x + i;
        for (int64_t c = 0; c < O16; c += 16) {
            v8u u[8];
            for (int r = 0; r < 8; r++) u[r] = load_u(w + r * O + c);
            v8f even = ((even_bf16(u[0]) * x8[0] + even_bf16(u[1]) * x8[1])
                        + (even_bf16(u[2]) * x8[2] + even_bf16(u[3]) * x8[3]))
                       + ((even_bf16(u[4]) * x8[4] + even_bf16(u[5]) * x8[5])
                          + (even_bf16(u[6]) * x8[6] + even_bf16(u[7]) * x8[7]));
            v8f odd = ((odd_bf16(u[0]) * x8[0] + odd_bf16(u[1]) * x8[1])
                       + (odd_bf16(u[2]) * x8[2] + odd_bf16(u[3]) * x8[3]))
                      + ((odd_bf16(u[4]) * x8[4] + odd_bf16(u[5]) * x8[5])
                         + (odd_bf16(u[6]) * x8[6] + odd_bf16(u[7]) * x8[7]));
            store_f(acc + c, load_f(acc + c) + even);
            store_f(acc + c + 8, load_f(acc + c + 8) + odd);
        }
        for (int64_t c = O16; c < O; c++) {
            float t = 0;
            for (int r = 0; r < 8; r++) t += bf16_to_f(w[r * O + c]) * x8[r];
            acc[c] += t;
        }
    }
    for (; i < end; i++) {
        const uint16_t *w = W + i * O;
        for (int64_t c = 0; c < O16; c += 16) {
            v8u u = load_u(w + c);
            store_f(acc + c, load_f(acc + c) + even_bf16(u) * x[i]);
            store_f(acc + c + 8, load_f(acc + c + 8) + odd_bf16(u) * x[i]);
        }
        for (int64_t c = O16; c < O; c++) acc[c] += bf16_to_f(w[c]) * x[i];
    }
}

typedef void (*block_fn)(const void *, const float *, float *, int64_t, int64_t, int64_t);

/* Y[k, O] = X[k, I] W_e[I, O] for k weight matrices at once (a token's k experts): one parallel
 * region over every (matrix, row block), so one thread wake-up for all of them. Each matrix's
 * sums are those of a call with k = 1. */
static int cols_batch(const void *const *Ws, block_fn block, int even_odd, const float *X, float *Y, int64_t k,
                      int64_t I, int64_t O, int threads) {
    int64_t per;
    const int64_t blocks = row_blocks(I, &per);
    float *part = partial_buffer((size_t)(k * blocks * O));
    if (!part) return -1;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t task = 0; task < k * blocks; task++) {
        const int64_t e = task / blocks, start = (task % blocks) * per;
        block(Ws[e], X + e * I, part + task * O, start, start + per < I ? start + per : I, O);
    }
    const int64_t O16 = O & ~(int64_t)15;
    for (int64_t e = 0; e < k; e++)
        for (int64_t c = 0; c < O; c++) {
            const float *p = part + e * blocks * O;
            float s = p[c];
            for (int64_t blk = 1; blk < blocks; blk++) s += p[blk * O + c];
            /* even/odd groups back to column order: position j < 8 is column 2j, j >= 8 is 2(j-8)+1 */
            int64_t column = c;
            if (even_odd && c < O16) {
                const int64_t group = c & ~(int64_t)15, j = c - group;
                column = group + (j < 8 ? 2 * j : 2 * (j - 8) + 1);
            }
            Y[e * O + column] = s;
        }
    return 0;
}

int moekit_cols_batch_f32(const float *const *Ws, const float *X, float *Y, int64_t k, int64_t I, int64_t O,
                          int threads) {
    return cols_batch((const void *const *)Ws, block_f32, 0, X, Y, k, I, O, threads);
}

int moekit_cols_batch_bf16(const uint16_t *const *Ws, const float *X, float *Y, int64_t k, int64_t I, int64_t O,
                           int threads) {
    return cols_batch((const void *const *)Ws, block_bf16, 1, X, Y, k, I, O, threads);
}

int moekit_cols_f32(const float *W, const float *x, float *y, int64_t I, int64_t O, int threads) {
    return moekit_cols_batch_f32(&W, x, y, 1, I, O, threads);
}

int moekit_cols_bf16(const uint16_t *W, const float *x, float *y, int64_t I, int64_t O, int threads) {
    return moekit_cols_batch_bf16(&W, x, y, 1, I, O, threads);
}

/* y[O] = scale[O] · (Q[O, I] x[I]): int8 weights, one float32 scale per output row (symmetric
 * per-channel quantization, moekit.inference.quant's int8). With AVX2 each 8 int8 are
 * sign-extended to int32 and converted to float32 in two instructions (vpmovsxbd, vcvtdq2ps);
 * without it, 32 int8 are read as eight 32-bit words, byte j of every word sign-extended by two
 * shifts, with x permuted once so that its elements pair with those bytes. Both are exact
 * products summed in float32: four accumulators of eight, then pairwise. */
typedef int32_t v8i __attribute__((vector_size(32)));
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

int moekit_rows_i8(const int8_t *Q, const float *scale, const float *x, float *y, int64_t O, int64_t I, int threads) {
    const int64_t I32 = I & ~(int64_t)31;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t o = 0; o < O; o++) {
        const int8_t *q = Q + o * I;
        __m256 a = _mm256_setzero_ps(), b = _mm256_setzero_ps(), c = _mm256_setzero_ps(), d = _mm256_setzero_ps();
        for (int64_t i = 0; i < I32; i += 32) {
            const __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(q + i))));
            const __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(q + i + 8))));
            const __m256 w2 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(q + i + 16))));
            const __m256 w3 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(q + i + 24))));
            a = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + i), a);
            b = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + i + 8), b);
            c = _mm256_fmadd_ps(w2, _mm256_loadu_ps(x + i + 16), c);
            d = _mm256_fmadd_ps(w3, _mm256_loadu_ps(x + i + 24), d);
        }
        const __m256 total = _mm256_add_ps(_mm256_add_ps(a, b), _mm256_add_ps(c, d));
        v8f t;
        memcpy(&t, &total, sizeof t);
        float s = sum8(t);
        for (int64_t i = I32; i < I; i++) s += (float)q[i] * x[i];
        y[o] = s * scale[o];
    }
    return 0;
}
#else
int moekit_rows_i8(const int8_t *Q, const float *scale, const float *x, float *y, int64_t O, int64_t I, int threads) {
    const int64_t I32 = I & ~(int64_t)31;
    float *x_perm = malloc(sizeof(float) * (size_t)(I32 + 1));
    if (!x_perm) return -1;
    for (int64_t i = 0; i < I32; i += 32)
        for (int j = 0; j < 4; j++)
            for (int m = 0; m < 8; m++) x_perm[i + 8 * j + m] = x[i + 4 * m + j];
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t o = 0; o < O; o++) {
        const int8_t *q = Q + o * I;
        v8f a = {0}, b = {0}, c = {0}, d = {0};
        for (int64_t i = 0; i < I32; i += 32) {
            v8i w;
            memcpy(&w, q + i, sizeof w);
            a += __builtin_convertvector((w << 24) >> 24, v8f) * load_f(x_perm + i);
            b += __builtin_convertvector((w << 16) >> 24, v8f) * load_f(x_perm + i + 8);
            c += __builtin_convertvector((w << 8) >> 24, v8f) * load_f(x_perm + i + 16);
            d += __builtin_convertvector(w >> 24, v8f) * load_f(x_perm + i + 24);
        }
        float s = sum8((a + b) + (c + d));
        for (int64_t i = I32; i < I; i++) s += (float)q[i] * x[i];
        y[o] = s * scale[o];
    }
    free(x_perm);
    return 0;
}
#endif

/* ---------------------------------------------------------------------------------------------
 * The attention half of a pre-norm decoder block, for one token (batch 1, decoding):
 *
 *   h = RMSNorm(x) g_attn                       (Zhang & Sennrich 2019)
 *   [q | k | v] = W_qkv h                       (nn.Linear layout, rows kernel)
 *   q, k rotated by the position's angles        (RoPE, Su et al. 2021 eq. 34, "rotate half" pairs)
 *   k, v written at position pos of the caches   ([n_kv, capacity, hd] each, the model's dtype)
 *   a_h = softmax(q_h K_g^T / sqrt(hd)) V_g      over positions 0..pos; g = h / (n_head / n_kv) (GQA)
 *   x' = x + W_proj a                            (rows kernel)
 *   h2 = RMSNorm(x') g_ffn                       (the FFN's input)
 *
 * x, x' and h2 are float32 arrays holding the model dtype's values. With bf16 = 1 every value
 * the PyTorch block rounds to bfloat16 (each op's output, and the rotation's products) is rounded
 * here too (round to nearest even), so the two differ only in summation order.
 * ------------------------------------------------------------------------------------------- */
static inline float round_bf16(float v) {
    uint32_t u;
    memcpy(&u, &v, 4);
    if ((u & 0x7f800000u) != 0x7f800000u) u += 0x7fffu + ((u >> 16) & 1u);  /* NaN/inf stay as they are */
    u &= 0xffff0000u;
    memcpy(&v, &u, 4);
    return v;
}

static inline void store_value(void *base, int64_t index, float v, int bf16) {
    if (bf16) {
        float r = round_bf16(v);
        uint32_t u;
        memcpy(&u, &r, 4);
        ((uint16_t *)base)[index] = (uint16_t)(u >> 16);
    } else {
        ((float *)base)[index] = v;
    }
}

static inline float as_value(const void *base, int64_t index, int bf16) {
    return bf16 ? bf16_to_f(((const uint16_t *)base)[index]) : ((const float *)base)[index];
}

/* One cached key or value row as float32. */
static inline void cache_row(const void *cache, int64_t offset, float *row, int64_t hd, int bf16) {
    if (bf16) {
        const uint16_t *src = (const uint16_t *)cache + offset;
        int64_t j = 0;
        for (; j + 8 <= hd; j += 8) store_f(row + j, load_bf16x8(src + j));
        for (; j < hd; j++) row[j] = bf16_to_f(src[j]);
    } else {
        memcpy(row, (const float *)cache + offset, sizeof(float) * (size_t)hd);
    }
}

/* exp of eight floats at once (softmax's exponentials were most of the attention's time with
 * the C library's scalar expf): exp(x) = 2^n exp(r), n = round(x / ln 2), r = x - n ln 2 in two
 * parts (Cody & Waite), exp(r) by Cephes' degree-7 polynomial (expf.c; about 1 ulp). x <= 0 here
 * (scores less their maximum); below -87.3 the result is clamped to exp(-87.3) ~ 1e-38. */
typedef int32_t v8s __attribute__((vector_size(32)));
static inline v8f exp8(v8f x) {
    const v8f low = {-87.3f, -87.3f, -87.3f, -87.3f, -87.3f, -87.3f, -87.3f, -87.3f};
    const v8s below = x < low; /* lanes of all ones where x < low */
    x = (v8f)(((v8s)x & ~below) | ((v8s)low & below));
    const v8f magic = x * 0 + 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer */
    const v8f n = (x * 1.44269504088896341f + magic) - magic;
    const v8f r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
    v8f p = r * 1.9875691500e-4f + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + r + 1.0f;
    const v8s bits = (__builtin_convertvector(n, v8s) + 127) << 23;
    return p * (v8f)bits;
}

static void rms_norm(const float *x, const float *g, float eps, float *out, int64_t D, int bf16) {
    double squares = 0;
    for (int64_t i = 0; i < D; i++) squares += (double)x[i] * x[i];
    const float inv = 1.0f / sqrtf((float)(squares / (double)D) + eps);
    for (int64_t i = 0; i < D; i++) {
        const float v = (bf16 ? round_bf16(x[i] * inv) : x[i] * inv) * g[i];
        out[i] = bf16 ? round_bf16(v) : v;
    }
}

static void rotate(float *v, const float *cos_k, const float *sin_k, int64_t half, int bf16) {
    for (int64_t j = 0; j < half; j++) {
        const float a = v[j], b = v[j + half], c = cos_k[j], s = sin_k[j];
        if (bf16) {
            v[j] = round_bf16(round_bf16(a * c) - round_bf16(b * s));
            v[j + half] = round_bf16(round_bf16(a * s) + round_bf16(b * c));
        } else {
            v[j] = a * c - b * s;
            v[j + half] = a * s + b * c;
        }
    }
}

int moekit_attn_block(const void *w_qkv, const void *w_proj, const float *g_attn, const float *g_ffn, float eps,
                      const float *cos_k, const float *sin_k, void *k_cache, void *v_cache, int64_t cache_stride,
                      int64_t pos, const float *x, float *x_out, float *h2_out, int64_t D, int64_t n_head,
                      int64_t n_kv, int64_t hd, int bf16, int threads) {
    const int64_t q_dim = n_head * hd, kv_dim = n_kv * hd, width = q_dim + 2 * kv_dim, half = hd / 2;
    const int64_t n_rep = n_head / n_kv, length = pos + 1;
    float *h = malloc(sizeof(float) * (size_t)(D + width + q_dim + D));
    float *scores = malloc(sizeof(float) * (size_t)(n_head * length));
    if (!h || !scores) { free(h); free(scores); return -1; }
    float *qkv = h + D, *attn = qkv + width, *y = attn + q_dim;
    rms_norm(x, g_attn, eps, h, D, bf16);
    int code = bf16 ? moekit_rows_bf16(w_qkv, h, qkv, width, D, threads) : moekit_rows_f32(w_qkv, h, qkv, width, D, threads);
    if (code != 0) { free(h); free(scores); return code; }
    if (bf16)
        for (int64_t i = 0; i < width; i++) qkv[i] = round_bf16(qkv[i]);
    /* rotate-half angles in the model dtype, as the PyTorch block casts its tables */
    float cos_r[half > 0 ? half : 1], sin_r[half > 0 ? half : 1];
    for (int64_t j = 0; j < half; j++) {
        cos_r[j] = bf16 ? round_bf16(cos_k[j]) : cos_k[j];
        sin_r[j] = bf16 ? round_bf16(sin_k[j]) : sin_k[j];
    }
    for (int64_t head = 0; head < n_head; head++) rotate(qkv + head * hd, cos_r, sin_r, half, bf16);
    for (int64_t g = 0; g < n_kv; g++) {
        float *k = qkv + q_dim + g * hd, *v = qkv + q_dim + kv_dim + g * hd;
        rotate(k, cos_r, sin_r, half, bf16);
        for (int64_t j = 0; j < hd; j++) {
            store_value(k_cache, g * cache_stride + pos * hd + j, k[j], bf16);
            store_value(v_cache, g * cache_stride + pos * hd + j, v[j], bf16);
        }
    }
    const float scale = 1.0f / sqrtf((float)hd);
    /* One kv head per task: it serves its n_rep query heads (grouped-query attention reads the
     * cache once per kv head), four heads at a time so that four independent sums are in
     * flight (one dot product of 64 is a chain of dependent adds otherwise). */
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t g = 0; g < n_kv; g++) {
        float row[hd > 0 ? hd : 1];
        for (int64_t r0 = 0; r0 < n_rep; r0 += 4) {
            const int64_t heads = n_rep - r0 < 4 ? n_rep - r0 : 4, first = g * n_rep + r0;
            /* scores of the group's heads first..first+heads-1 against every position */
            for (int64_t t = 0; t < length; t++) {
                cache_row(k_cache, g * cache_stride + t * hd, row, hd, bf16);
                v8f acc[4] = {{0}, {0}, {0}, {0}};
                int64_t j = 0;
                for (; j + 8 <= hd; j += 8) {
                    const v8f k8 = load_f(row + j);
                    for (int64_t r = 0; r < heads; r++) acc[r] += load_f(qkv + (first + r) * hd + j) * k8;
                }
                for (int64_t r = 0; r < heads; r++) {
                    float dot_r = sum8(acc[r]);
                    for (int64_t i = j; i < hd; i++) dot_r += qkv[(first + r) * hd + i] * row[i];
                    scores[(first + r) * length + t] = dot_r * scale;
                }
            }
            /* softmax over the positions */
            for (int64_t r = 0; r < heads; r++) {
                float *sc = scores + (first + r) * length;
                float top = -INFINITY, total = 0;
                for (int64_t t = 0; t < length; t++) top = sc[t] > top ? sc[t] : top;
                int64_t t = 0;
                for (; t + 8 <= length; t += 8) store_f(sc + t, exp8(load_f(sc + t) - top));
                for (; t < length; t++) sc[t] = expf(sc[t] - top);
                for (t = 0; t < length; t++) total += sc[t];
                for (t = 0; t < length; t++) sc[t] /= total;
            }
            /* the heads' outputs, eight features at a time, summed over the positions in registers */
            int64_t j = 0;
            for (; j + 8 <= hd; j += 8) {
                v8f acc[4] = {{0}, {0}, {0}, {0}};
                for (int64_t t = 0; t < length; t++) {
                    v8f v8;
                    if (bf16) {
                        v8 = load_bf16x8((const uint16_t *)v_cache + g * cache_stride + t * hd + j);
                    } else {
                        v8 = load_f((const float *)v_cache + g * cache_stride + t * hd + j);
                    }
                    for (int64_t r = 0; r < heads; r++) acc[r] += scores[(first + r) * length + t] * v8;
                }
                for (int64_t r = 0; r < heads; r++) store_f(attn + (first + r) * hd + j, acc[r]);
            }
            for (; j < hd; j++)
                for (int64_t r = 0; r < heads; r++) {
                    float a = 0;
                    for (int64_t t = 0; t < length; t++) {
                        cache_row(v_cache, g * cache_stride + t * hd + j, row, 1, bf16);
                        a += scores[(first + r) * length + t] * row[0];
                    }
                    attn[(first + r) * hd + j] = a;
                }
        }
        if (bf16)
            for (int64_t j = 0; j < n_rep * hd; j++) attn[g * n_rep * hd + j] = round_bf16(attn[g * n_rep * hd + j]);
    }
    code = bf16 ? moekit_rows_bf16(w_proj, attn, y, D, q_dim, threads) : moekit_rows_f32(w_proj, attn, y, D, q_dim, threads);
    if (code != 0) { free(h); free(scores); return code; }
    for (int64_t i = 0; i < D; i++) {
        const float sum = x[i] + (bf16 ? round_bf16(y[i]) : y[i]);
        x_out[i] = bf16 ? round_bf16(sum) : sum;
    }
    rms_norm(x_out, g_ffn, eps, h2_out, D, bf16);
    free(h);
    free(scores);
    return 0;
}

/* ---------------------------------------------------------------------------------------------
 * A decoded token's routed experts, combined, in one call:
 *
 *   h_j = x W_in[e_j] (+ b_in[e_j])     [H]   (the k experts at once: cols kernel, or rows
 *                                               kernel when rows_layout = 1, each expert's
 *                                               matrices then stored [H, D] and [D, F])
 *   a_j = act(h_j)                       [F]   (SwiGLU: silu(gate) * up on h = [gate | up],
 *                                               Shazeer 2020 eq. 6; GPT-OSS's clamped SwiGLU;
 *                                               GELU (erf form); ReLU)
 *   o_j = a_j W_out[e_j] (+ b_out[e_j])  [D]
 *   y   = sum_j w_j o_j                  [D]   (float32, in the order j = 0..k-1)
 *
 * With bf16 = 1 every value the PyTorch path rounds to bfloat16 (each op's output) is rounded
 * here too. Biases (b_in, b_out: k pointers each, or NULL) are in the weights' dtype.
 * ------------------------------------------------------------------------------------------- */
enum { ACT_SWIGLU = 0, ACT_CLAMPED_SWIGLU = 1, ACT_GELU = 2, ACT_RELU = 3 };

static inline float rnd_if(float v, int bf16) { return bf16 ? round_bf16(v) : v; }
static inline float sigmoid_f(float v) { return 1.0f / (1.0f + expf(-v)); }

/* a[F] = act(h) for one expert's hidden row h (h = [gate | up], 2F values, for the gated ones). */
static void activate_row(const float *h, float *a, int64_t F, int activation, float alpha, float limit, int bf16) {
    for (int64_t i = 0; i < F; i++) {
        float v;
        if (activation == ACT_SWIGLU) {
            const float gate = h[i], up = h[F + i];
            v = rnd_if(rnd_if(gate * sigmoid_f(gate), bf16) * up, bf16);
        } else if (activation == ACT_CLAMPED_SWIGLU) {
            const float gate = h[i] > limit ? limit : h[i];
            const float up = h[F + i] > limit ? limit : (h[F + i] < -limit ? -limit : h[F + i]);
            const float sig = rnd_if(sigmoid_f(rnd_if(gate * alpha, bf16)), bf16);
            v = rnd_if(rnd_if(up + 1.0f, bf16) * rnd_if(gate * sig, bf16), bf16);
        } else if (activation == ACT_GELU) {
            v = rnd_if(0.5f * h[i] * (1.0f + erff(h[i] * 0.70710678118654752f)), bf16);
        } else {
            v = h[i] > 0 ? h[i] : 0.0f;
        }
        a[i] = v;
    }
}

static int experts_decode(const void *const *w_in, const void *const *w_out, const void *const *b_in,
                          const void *const *b_out, const float *weights, const float *x, float *y, int64_t k,
                          int64_t D, int64_t H, int64_t F, int activation, float alpha, float limit, int bf16,
                          int rows_layout, int threads) {
    float *buf = malloc(sizeof(float) * (size_t)(k * D + k * H + k * F + k * D));
    if (!buf) return -1;
    float *xs = buf, *h = xs + k * D, *a = h + k * H, *o = a + k * F;
    for (int64_t j = 0; j < k; j++) memcpy(xs + j * D, x, sizeof(float) * (size_t)D);
    int code = rows_layout ? rows_batch(w_in, bf16, xs, h, k, D, H, threads)
                           : cols_batch(w_in, bf16 ? block_bf16 : block_f32, bf16, xs, h, k, D, H, threads);
    if (code != 0) { free(buf); return code; }
    for (int64_t j = 0; j < k; j++) {
        float *hj = h + j * H;
        for (int64_t i = 0; i < H; i++) {
            hj[i] = rnd_if(hj[i], bf16);
            if (b_in) hj[i] = rnd_if(hj[i] + as_value(b_in[j], i, bf16), bf16);
        }
        activate_row(hj, a + j * F, F, activation, alpha, limit, bf16);
    }
    code = rows_layout ? rows_batch(w_out, bf16, a, o, k, F, D, threads)
                       : cols_batch(w_out, bf16 ? block_bf16 : block_f32, bf16, a, o, k, F, D, threads);
    if (code != 0) { free(buf); return code; }
    for (int64_t i = 0; i < D; i++) y[i] = 0.0f;
    for (int64_t j = 0; j < k; j++)
        for (int64_t i = 0; i < D; i++) {
            float v = rnd_if(o[j * D + i], bf16);
            if (b_out) v = rnd_if(v + as_value(b_out[j], i, bf16), bf16);
            y[i] += weights[j] * v;
        }
    free(buf);
    return 0;
}

int moekit_experts_decode(const void *const *w_in, const void *const *w_out, const void *const *b_in,
                          const void *const *b_out, const float *weights, const float *x, float *y, int64_t k,
                          int64_t D, int64_t H, int64_t F, int activation, float alpha, float limit, int bf16,
                          int rows_layout, int threads) {
    return experts_decode(w_in, w_out, b_in, b_out, weights, x, y, k, D, H, F, activation, alpha, limit, bf16,
                          rows_layout, threads);
}

/* ---------------------------------------------------------------------------------------------
 * A decoded token's whole MoE layer (top-k softmax router, then its experts) in one call:
 *
 *   l = W_gate x (+ b_gate)       [E]  float32 (gate_round_bf16: rounded to bfloat16, as a gate
 *                                      run in bfloat16 rounds its output)
 *   p = softmax(l)                [E]  (Shazeer et al. 2017 eq. 3, without noise)
 *   S = the k largest p, in descending order (ties: the lower expert index first)
 *   w_j = p_{S_j} (/ sum_{S} p if normalize) * scale     (Mixtral; DeepSeek's routed scaling)
 *   y = sum_j w_j FFN_{S_j}(x)    as moekit_experts_decode
 *
 * The experts are stacked: expert e's matrices start at w_in + e * in_stride (bytes), likewise
 * w_out, b_in (H values per expert) and b_out (D). Writes y [D], ids [k], w [k], l [E], p [E] and
 * counts [E] (how many of the k chose each expert); with w_in NULL only the routing (ids, w, l, p,
 * counts) is computed. Returns 1 when a logit is NaN or inf
 * (check_finite; nothing else is computed), -1 when out of memory.
 * ------------------------------------------------------------------------------------------- */
int moekit_route_experts_decode(const void *gate, const void *gate_bias, int gate_bf16, int gate_round_bf16,
                                int check_finite, int64_t E, int64_t k, int normalize, float scale,
                                const char *w_in, const char *w_out, const char *b_in, const char *b_out,
                                int64_t in_stride, int64_t out_stride, const float *x, float *y, int64_t *ids,
                                float *weights, float *logits, float *scores, int64_t *counts, int64_t D, int64_t H,
                                int64_t F, int activation, float alpha, float limit, int bf16, int rows_layout,
                                int threads) {
    if (k < 1 || k > E || k > 64) return -1;
    const int64_t half = (D & ~(int64_t)31) / 2 + 1;
    float *split = NULL;
    if (gate_bf16) {
        split = malloc(sizeof(float) * (size_t)(2 * half));
        if (!split) return -1;
        split_even_odd(x, D, split, split + half);
    }
    for (int64_t e = 0; e < E; e++) {
        float v = gate_bf16 ? dot_bf16((const uint16_t *)gate + e * D, x, split, split + half, D)
                            : dot_f32((const float *)gate + e * D, x, D);
        if (gate_bias) v += as_value(gate_bias, e, gate_bf16);
        logits[e] = gate_round_bf16 ? round_bf16(v) : v;
    }
    free(split);
    float top = logits[0];
    for (int64_t e = 0; e < E; e++) {
        if (check_finite && !isfinite(logits[e])) return 1;
        if (logits[e] > top) top = logits[e];
    }
    float total = 0.0f;
    for (int64_t e = 0; e < E; e++) total += (scores[e] = expf(logits[e] - top));
    for (int64_t e = 0; e < E; e++) { scores[e] /= total; counts[e] = 0; }
    float chosen_sum = 0.0f;
    for (int64_t j = 0; j < k; j++) {
        int64_t best = -1;
        for (int64_t e = 0; e < E; e++)
            if (!counts[e] && (best < 0 || scores[e] > scores[best])) best = e;
        ids[j] = best;
        counts[best] = 1;
        weights[j] = scores[best];
        chosen_sum += scores[best];
    }
    for (int64_t j = 0; j < k; j++) {
        if (normalize) weights[j] /= chosen_sum;
        if (scale != 1.0f) weights[j] *= scale;
    }
    if (!w_in) return 0; /* the routing alone (experts held elsewhere, e.g. offloaded) */
    const void *wi[64], *wo[64], *bi[64], *bo[64];
    const int64_t element = bf16 ? 2 : 4;
    for (int64_t j = 0; j < k; j++) {
        wi[j] = w_in + ids[j] * in_stride;
        wo[j] = w_out + ids[j] * out_stride;
        if (b_in) bi[j] = b_in + ids[j] * H * element;
        if (b_out) bo[j] = b_out + ids[j] * D * element;
    }
    return experts_decode(wi, wo, b_in ? bi : NULL, b_out ? bo : NULL, weights, x, y, k, D, H, F, activation, alpha,
                          limit, bf16, rows_layout, threads);
}

/* The same for int8 experts (moekit.inference.quant's int8: qweight [out, in], one float32 scale
 * per output, float32 biases): each projection through moekit_rows_i8, rounded to the
 * activations' dtype as QuantizedExpert rounds its products, biases rounded to it before the
 * add, the nonlinearity and the weighted sum as above. */
int moekit_experts_decode_i8(const int8_t *const *q_in, const float *const *s_in, const int8_t *const *q_out,
                             const float *const *s_out, const float *const *b_in, const float *const *b_out,
                             const float *weights, const float *x, float *y, int64_t k, int64_t D, int64_t H,
                             int64_t F, int activation, float alpha, float limit, int bf16, int threads) {
    float *buf = malloc(sizeof(float) * (size_t)(H + F + D));
    if (!buf) return -1;
    float *h = buf, *a = h + H, *o = a + F;
    for (int64_t i = 0; i < D; i++) y[i] = 0.0f;
    for (int64_t j = 0; j < k; j++) {
        int code = moekit_rows_i8(q_in[j], s_in[j], x, h, H, D, threads);
        if (code != 0) { free(buf); return code; }
        for (int64_t i = 0; i < H; i++) {
            h[i] = rnd_if(h[i], bf16);
            if (b_in) h[i] = rnd_if(h[i] + rnd_if(b_in[j][i], bf16), bf16);
        }
        activate_row(h, a, F, activation, alpha, limit, bf16);
        code = moekit_rows_i8(q_out[j], s_out[j], a, o, D, F, threads);
        if (code != 0) { free(buf); return code; }
        for (int64_t i = 0; i < D; i++) {
            float v = rnd_if(o[i], bf16);
            if (b_out) v = rnd_if(v + rnd_if(b_out[j][i], bf16), bf16);
            y[i] += weights[j] * v;
        }
    }
    free(buf);
    return 0;
}

/* ---------------------------------------------------------------------------------------------
 * A decoded token through every block of moekit's LM in one call: for each layer l,
 *
 *   (x', h) = moekit_attn_block(x)                 the attention half and the FFN's RMSNorm
 *   y       = moekit_route_experts_decode(h)       the top-k router and the experts
 *   x       = x' + y                               (bf16: y rounded to bfloat16, then the sum,
 *                                                   as the PyTorch block adds in bfloat16)
 *
 * with layer l's weights at index l of each pointer array (every layer the same shapes and
 * MoE config; a layer's cache stride in cache_strides[l]). x [D] is read and overwritten with
 * the last block's output; layer l's routing goes to ids + l k, weights + l k, logits + l E,
 * scores + l E, counts + l E. The same calls and roundings as the per-layer path, so the same
 * bits: only the Python between them is gone. Returns 0, -1 when out of memory, or 2 + l when
 * layer l's router logits hold a NaN or inf (check_finite).
 * ------------------------------------------------------------------------------------------- */
int moekit_lm_decode(int64_t L, const void *const *w_qkv, const void *const *w_proj, const float *const *g_attn,
                     const float *const *g_ffn, float eps, const float *cos_k, const float *sin_k,
                     void *const *k_cache, void *const *v_cache, const int64_t *cache_strides, int64_t pos,
                     int64_t n_head, int64_t n_kv, int64_t hd, const void *const *gate, const void *const *gate_bias,
                     int gate_bf16, int gate_round_bf16, int check_finite, int64_t E, int64_t k, int normalize,
                     float scale, const char *const *w_in, const char *const *w_out, const char *const *b_in,
                     const char *const *b_out, int64_t in_stride, int64_t out_stride, float *x, int64_t *ids,
                     float *weights, float *logits, float *scores, int64_t *counts, int64_t D, int64_t H, int64_t F,
                     int activation, float alpha, float limit, int bf16, int rows_layout, int threads) {
    float *buf = malloc(sizeof(float) * (size_t)(3 * D));
    if (!buf) return -1;
    float *x_mid = buf, *h = buf + D, *y = buf + 2 * D;
    for (int64_t l = 0; l < L; l++) {
        int code = moekit_attn_block(w_qkv[l], w_proj[l], g_attn[l], g_ffn[l], eps, cos_k, sin_k, k_cache[l],
                                     v_cache[l], cache_strides[l], pos, x, x_mid, h, D, n_head, n_kv, hd, bf16,
                                     threads);
        if (code == 0)
            code = moekit_route_experts_decode(gate[l], gate_bias ? gate_bias[l] : NULL, gate_bf16, gate_round_bf16,
                                               check_finite, E, k, normalize, scale, w_in[l], w_out[l],
                                               b_in ? b_in[l] : NULL, b_out ? b_out[l] : NULL, in_stride, out_stride,
                                               h, y, ids + l * k, weights + l * k, logits + l * E, scores + l * E,
                                               counts + l * E, D, H, F, activation, alpha, limit, bf16, rows_layout,
                                               threads);
        if (code != 0) { free(buf); return code == 1 ? (int)(2 + l) : code; }
        for (int64_t i = 0; i < D; i++) x[i] = bf16 ? round_bf16(x_mid[i] + round_bf16(y[i])) : x_mid[i] + y[i];
    }
    free(buf);
    return 0;
}
