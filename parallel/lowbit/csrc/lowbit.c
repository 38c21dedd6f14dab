/* Native CPU kernels of parallel.lowbit: one fused pass per block for AdamW8bit and NF4 dequantize.
 *
 * Plain C99, no torch headers: parallel/lowbit/native.py compiles this file with the system C compiler
 * at first use and calls it through ctypes on the data pointers of contiguous CPU tensors. Every float
 * operation is written in the order, and with the fusions, of the eager torch code it replaces
 * (parallel/lowbit/adamw8bit_kernel.py, parallel/lowbit/nf4.py), and the file is compiled with
 * -ffp-contract=off, so that the results are bit-identical: where ATen's vectorised CPU kernels use a
 * fused multiply-add (lerp, addcmul, add with alpha), fmaf() is written here (a plain multiply and add
 * for ATen's scalar DEFAULT build); the square root is the one torch uses (MKL's vmsSqrt, which is not
 * always correctly rounded, passed in by the loader when torch has it); everything else is one IEEE
 * operation at a time. The AVX-512 paths (when compiled for a CPU that has it) do the same operations
 * 16 values at a time, with the code books gathered.
 *
 * Threads: each function processes work units of `grain` blocks taken from the shared counter `next`
 * (an atomic fetch-and-add), so several threads calling the same function with the same counter share
 * the blocks dynamically (a thread slowed by a busy core simply takes fewer units). The result of a
 * block does not depend on which thread computes it.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

static int64_t take(int64_t *next, int64_t grain) { return __atomic_fetch_add(next, grain, __ATOMIC_RELAXED); }

static inline uint32_t float_bits(float x) {
    uint32_t u;
    memcpy(&u, &x, 4);
    return u;
}

/* ---------------------------------------------------------------------------------------- AdamW8bit */

typedef struct {
    const float *signed_code;           /* 256 values of the signed dynamic map */
    const uint8_t *signed_cell_code;    /* 65,536 cells, rotated by 32,768 */
    const float *signed_cell_threshold; /* 65,536 cells, rotated by 32,768 */
    const float *unsigned_code;
    const uint8_t *unsigned_cell_code;
    const float *unsigned_cell_threshold;
} moment_tables;

typedef struct {
    float lerp_weight;   /* (float)(1 - beta1) */
    float beta2;         /* (float)beta2 */
    float one_minus_beta2;
    float bias_correction2_sqrt;
    float eps;
    float decay;         /* (float)(1 - lr * weight_decay); 1 means no decay pass */
    float neg_step_size; /* (float)(-lr / (1 - beta1^t)) */
    int32_t fused;  /* ATen fuses the multiply-adds of lerp, addcmul and add(alpha) */
} adamw_scalars;

/* sqrt of n floats into out: ATen's own vector sqrt when the loader found it (MKL's vmsSqrt in torch
 * builds with MKL: not always correctly rounded), else sqrtf. */
typedef void (*vector_sqrt_fn)(int32_t n, const float *in, float *out, int64_t mode);

typedef struct {
    vector_sqrt_fn function; /* NULL: sqrtf */
    int64_t mode;
} vector_sqrt;

void sqrt_all(const vector_sqrt *vs, int64_t n, const float *in, float *out) {
    if (vs->function != NULL) {
        vs->function((int32_t)n, in, out, vs->mode);
        return;
    }
    for (int64_t i = 0; i < n; i++)
        out[i] = sqrtf(in[i]);
}

/* Moments of one block of n values: m, v written, block maxima returned through max1, max2.
 * m is torch.lerp(m, g, w1) as ATen's vectorised CPU kernel computes it (scalar weight) and v is
 * addcmul(v beta2, g, g, value=w2): multiply-adds, fused with any SIMD instruction set (FUSED), not in
 * ATen's scalar DEFAULT build. The maxima are taken on the bits: for floats >= +0 (|m| and v) the order
 * of the bits as unsigned integers is the order of the values, and integer maxima vectorise. */
static inline __attribute__((always_inline)) void moments_impl(const float *restrict g, int64_t n,
                                                               const uint8_t *restrict c1, float a1,
                                                               const uint8_t *restrict c2, float a2,
                                                               const moment_tables *t, const adamw_scalars *s,
                                                               float *restrict m, float *restrict v,
                                                               float *max1, float *max2, const int fused) {
    const float w1 = s->lerp_weight, beta2 = s->beta2, w2 = s->one_minus_beta2;
    const int small = fabsf(w1) < 0.5f;
    const float coeff = small ? w1 : w1 - 1.0f;
    const float *restrict signed_code = t->signed_code, *restrict unsigned_code = t->unsigned_code;
    uint32_t top1 = 0, top2 = 0;
    int64_t i = 0;
#if defined(__AVX512F__)
    if (fused) { /* the same operations, 16 values at a time, the code books gathered */
        const __m512 a1v = _mm512_set1_ps(a1), a2v = _mm512_set1_ps(a2), b2v = _mm512_set1_ps(beta2);
        const __m512 coeffv = _mm512_set1_ps(coeff), w2v = _mm512_set1_ps(w2);
        const __mmask16 take_start = small ? 0xFFFF : 0;
        const __m512i magnitude = _mm512_set1_epi32(0x7FFFFFFF);
        __m512i top1v = _mm512_setzero_si512(), top2v = _mm512_setzero_si512();
        for (; i + 16 <= n; i += 16) {
            const __m512i i1 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(c1 + i)));
            const __m512i i2 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(c2 + i)));
            const __m512 start = _mm512_mul_ps(_mm512_i32gather_ps(i1, signed_code, 4), a1v);
            const __m512 gi = _mm512_loadu_ps(g + i);
            const __m512 base = _mm512_mask_blend_ps(take_start, gi, start);
            const __m512 mi = _mm512_fmadd_ps(coeffv, _mm512_sub_ps(gi, start), base);
            const __m512 vb = _mm512_mul_ps(_mm512_mul_ps(_mm512_i32gather_ps(i2, unsigned_code, 4), a2v), b2v);
            const __m512 vi = _mm512_fmadd_ps(_mm512_mul_ps(w2v, gi), gi, vb);
            _mm512_storeu_ps(m + i, mi);
            _mm512_storeu_ps(v + i, vi);
            top1v = _mm512_max_epu32(top1v, _mm512_and_si512(_mm512_castps_si512(mi), magnitude));
            top2v = _mm512_max_epu32(top2v, _mm512_castps_si512(vi));
        }
        top1 = (uint32_t)_mm512_reduce_max_epu32(top1v);
        top2 = (uint32_t)_mm512_reduce_max_epu32(top2v);
    }
#endif
    for (; i < n; i++) {
        const float start = signed_code[c1[i]] * a1, gi = g[i], base = small ? start : gi;
        const float mi = fused ? fmaf(coeff, gi - start, base) : coeff * (gi - start) + base;
        const float vb = unsigned_code[c2[i]] * a2 * beta2;
        const float vi = fused ? fmaf(w2 * gi, gi, vb) : vb + w2 * gi * gi;
        m[i] = mi;
        v[i] = vi;
        const uint32_t b1 = float_bits(mi) & 0x7FFFFFFFu, b2 = float_bits(vi);
        top1 = b1 > top1 ? b1 : top1;
        top2 = b2 > top2 ? b2 : top2;
    }
    memcpy(max1, &top1, 4);
    memcpy(max2, &top2, 4);
}

static void moments(const float *g, int64_t n, const uint8_t *c1, float a1, const uint8_t *c2, float a2,
                    const moment_tables *t, const adamw_scalars *s, float *m, float *v, float *max1,
                    float *max2) {
    if (s->fused)
        moments_impl(g, n, c1, a1, c2, a2, t, s, m, v, max1, max2, 1);
    else
        moments_impl(g, n, c1, a1, c2, a2, t, s, m, v, max1, max2, 0);
}

/* p = p decay - step_size m / (sqrt(v) / bias_correction2_sqrt + eps) on n values (root = sqrt(v)). */
static void update(float *p, int64_t n, const float *m, const float *root, const adamw_scalars *s) {
    const float bc2 = s->bias_correction2_sqrt, eps = s->eps, decay = s->decay, neg = s->neg_step_size;
    const int fused = s->fused, scaled = decay != 1.0f;
    for (int64_t i = 0; i < n; i++) {
        const float u = m[i] / (root[i] / bc2 + eps), w = scaled ? p[i] * decay : p[i];
        p[i] = fused ? fmaf(u, neg, w) : w + u * neg;
    }
}

/* The nearest codes of m / scale1 (signed map) and v / scale2 (unsigned map), n values: the cell is the
 * top 16 bits of the float (an arithmetic shift, plus 32,768 into the rotated signed tables), and the
 * code is the cell's code plus one above the cell's threshold (parallel.lowbit.quant.RoundingTables). */
#if defined(__AVX512F__)
/* 16 codes at once: the threshold gathered as a float, the uint8 cell code as the aligned 32-bit word
 * that holds it (never past the table's end), shifted and masked. */
static inline __m512i encode16(__m512 x, __m512i rotate, const uint8_t *cell_code, const float *threshold) {
    const __m512i cell = _mm512_add_epi32(_mm512_srai_epi32(_mm512_castps_si512(x), 16), rotate);
    const __m512i three = _mm512_set1_epi32(3);
    const __m512 limit = _mm512_i32gather_ps(cell, threshold, 4);
    const __m512i word = _mm512_i32gather_epi32(_mm512_andnot_si512(three, cell), cell_code, 1);
    const __m512i shift = _mm512_slli_epi32(_mm512_and_si512(cell, three), 3);
    const __m512i code = _mm512_and_si512(_mm512_srlv_epi32(word, shift), _mm512_set1_epi32(0xFF));
    return _mm512_mask_add_epi32(code, _mm512_cmp_ps_mask(x, limit, _CMP_GT_OQ), code, _mm512_set1_epi32(1));
}
#endif

static void encode(int64_t n, const float *restrict m, float scale1, const float *restrict v, float scale2,
                   const moment_tables *t, uint8_t *restrict c1, uint8_t *restrict c2) {
    const uint8_t *restrict scc = t->signed_cell_code, *restrict ucc = t->unsigned_cell_code;
    const float *restrict sct = t->signed_cell_threshold, *restrict uct = t->unsigned_cell_threshold;
    int64_t i = 0;
#if defined(__AVX512F__)
    for (; i + 16 <= n; i += 16) {
        const __m512 x = _mm512_div_ps(_mm512_loadu_ps(m + i), _mm512_set1_ps(scale1));
        const __m512 y = _mm512_div_ps(_mm512_loadu_ps(v + i), _mm512_set1_ps(scale2));
        _mm_storeu_si128((__m128i *)(c1 + i), _mm512_cvtepi32_epi8(encode16(x, _mm512_set1_epi32(32768), scc, sct)));
        _mm_storeu_si128((__m128i *)(c2 + i), _mm512_cvtepi32_epi8(encode16(y, _mm512_setzero_si512(), ucc, uct)));
    }
#endif
    for (; i < n; i++) {
        const float x = m[i] / scale1, y = v[i] / scale2;
        const uint32_t cx = (uint32_t)(((int32_t)float_bits(x) >> 16) + 32768), cy = float_bits(y) >> 16;
        c1[i] = (uint8_t)(scc[cx] + (x > sct[cx]));
        c2[i] = (uint8_t)(ucc[cy] + (y > uct[cy]));
    }
}

#define GROUP_VALUES 4096 /* blocks are processed in groups of about this many values (L1/L2 sized) */

/* The AdamW8bit step of one parameter of `numel` values in `n_blocks` blocks of `block_size`. */
int adamw8bit_step(float *p, const float *g, int64_t numel, uint8_t *codes1, float *absmax1, uint8_t *codes2,
                   float *absmax2, int64_t n_blocks, int64_t block_size, const moment_tables *t,
                   const adamw_scalars *s, const vector_sqrt *vs, int64_t *next, int64_t grain) {
    const int64_t per_group = block_size < GROUP_VALUES ? GROUP_VALUES / block_size : 1;
    const int64_t values = per_group * block_size;
    float *buffer = malloc(sizeof(float) * (size_t)(3 * values + block_size));
    if (buffer == NULL)
        return 1;
    float *m = buffer, *v = buffer + values, *root = buffer + 2 * values, *tail = buffer + 3 * values;
    for (int64_t first = take(next, grain); first < n_blocks; first = take(next, grain)) {
        const int64_t end = first + grain < n_blocks ? first + grain : n_blocks;
        for (int64_t group = first; group < end; group += per_group) {
            const int64_t blocks = end - group < per_group ? end - group : per_group;
            const int64_t start = group * block_size, n = blocks * block_size;
            const int64_t real = numel - start < n ? numel - start : n;
            for (int64_t b = 0; b < blocks; b++) {
                const int64_t offset = b * block_size, in_param = real - offset;
                const float *gb = g + start + offset;
                if (in_param < block_size) { /* the last block: the gradient zero-padded, as eager pads it */
                    memcpy(tail, gb, sizeof(float) * (size_t)in_param);
                    memset(tail + in_param, 0, sizeof(float) * (size_t)(block_size - in_param));
                    gb = tail;
                }
                moments(gb, block_size, codes1 + start + offset, absmax1[group + b], codes2 + start + offset,
                        absmax2[group + b], t, s, m + offset, v + offset, absmax1 + group + b,
                        absmax2 + group + b);
            }
            sqrt_all(vs, n, v, root);
            update(p + start, real, m, root, s);
            for (int64_t b = 0; b < blocks; b++) {
                const float a1 = absmax1[group + b], a2 = absmax2[group + b];
                const int64_t offset = b * block_size;
                encode(block_size, m + offset, a1 > 0.0f ? a1 : 1.0f, v + offset, a2 > 0.0f ? a2 : 1.0f, t,
                       codes1 + start + offset, codes2 + start + offset);
            }
        }
    }
    free(buffer);
    return 0;
}

/* ------------------------------------------------------------------------------------ NF4 dequantize */

typedef struct {
    const uint8_t *packed;       /* two codes per byte, the first in the high nibble */
    const float *absmax;         /* fp32 per block, or NULL with double quantization: */
    const uint8_t *absmax_codes; /*   per block, the signed dynamic map's code of absmax - offset */
    const float *dynamic_code;   /*   the signed dynamic map (256 values) */
    const float *absmax_scale;   /*   per group */
    const int64_t *group_index;  /*   per block, its group; NULL: block / 256 (ABSMAX_BLOCK_SIZE) */
    float absmax_offset;
    int32_t out_kind; /* 0 float32, 1 bfloat16, 2 float16 */
    const float *nf4_code; /* 16 values */
    void *out;
    int64_t numel;
    int64_t block_size;
    int64_t n_blocks;
} nf4_args;

/* float32 -> bfloat16, round to nearest even, as c10::BFloat16 (NaN to the canonical quiet NaN). */
static inline uint16_t to_bf16(float x) {
    uint32_t u = float_bits(x);
    if (x != x)
        return 0x7FC0;
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

/* float32 -> float16, round to nearest even, as c10::Half (fp16_ieee_from_fp32_value): the scalings by
 * powers of two are exact and the one addition rounds, which is why contraction must stay off. */
static inline uint16_t to_f16(float x) {
    const uint32_t w = float_bits(x), shl1_w = w + w, sign = w & 0x80000000u;
    uint32_t bias = shl1_w & 0xFF000000u;
    if (bias < 0x71000000u)
        bias = 0x71000000u;
    float base = (fabsf(x) * 0x1.0p+112f) * 0x1.0p-110f, offset;
    const uint32_t offset_bits = (bias >> 1) + 0x07800000u;
    memcpy(&offset, &offset_bits, 4);
    const uint32_t bits = float_bits(offset + base);
    const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
    return (uint16_t)((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

static inline float block_absmax(const nf4_args *a, int64_t b) {
    if (a->absmax != NULL)
        return a->absmax[b];
    int64_t group = a->group_index != NULL ? a->group_index[b] : b / 256;
    return a->dynamic_code[a->absmax_codes[b]] * a->absmax_scale[group] + a->absmax_offset;
}

static inline uint8_t nibble(const uint8_t *packed, int64_t i) {
    return (i & 1) ? packed[i >> 1] & 0x0F : packed[i >> 1] >> 4;
}

static inline void store(void *out, int64_t i, float x, int kind) {
    if (kind == 0)
        ((float *)out)[i] = x;
    else
        ((uint16_t *)out)[i] = kind == 1 ? to_bf16(x) : to_f16(x);
}

#if defined(__AVX512F__)
/* 16 floats to bfloat16, round to nearest even (finite values: the NF4 outputs are finite). */
static inline __m256i to_bf16_16(__m512 x) {
    const __m512i u = _mm512_castps_si512(x);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    const __m512i rounded = _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), odd);
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16));
}

static inline void store16(void *out, int64_t i, __m512 x, int kind) {
    if (kind == 0)
        _mm512_storeu_ps((float *)out + i, x);
    else if (kind == 1)
        _mm256_storeu_si256((__m256i *)((uint16_t *)out + i), to_bf16_16(x));
    else
        _mm256_storeu_si256((__m256i *)((uint16_t *)out + i),
                            _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
#endif

/* Values [start, start + n) of one block, start even: code[nibble] * scale in fp32, then cast. */
static void dequantize_run(const nf4_args *a, int64_t start, int64_t n, float scale) {
    const uint8_t *bytes = a->packed + (start >> 1);
    int64_t j = 0; /* values done */
#if defined(__AVX512F__)
    const __m512 code = _mm512_loadu_ps(a->nf4_code), scalev = _mm512_set1_ps(scale);
    const __m512i first = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i second = _mm512_add_epi32(first, _mm512_set1_epi32(8));
    for (; j + 32 <= n; j += 32) { /* 16 bytes: their high nibbles, their low ones, interleaved */
        const __m512i byte = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(bytes + j / 2)));
        const __m512 high = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(byte, 4), code), scalev);
        const __m512 low = _mm512_mul_ps(
            _mm512_permutexvar_ps(_mm512_and_si512(byte, _mm512_set1_epi32(0x0F)), code), scalev);
        store16(a->out, start + j, _mm512_permutex2var_ps(high, first, low), a->out_kind);
        store16(a->out, start + j + 16, _mm512_permutex2var_ps(high, second, low), a->out_kind);
    }
#endif
    for (; j < n; j++)
        store(a->out, start + j, a->nf4_code[nibble(a->packed, start + j)] * scale, a->out_kind);
}

int nf4_dequantize(const nf4_args *a, int64_t *next, int64_t grain) {
    for (int64_t first = take(next, grain); first < a->n_blocks; first = take(next, grain)) {
        const int64_t end = first + grain < a->n_blocks ? first + grain : a->n_blocks;
        for (int64_t b = first; b < end; b++) {
            const float scale = block_absmax(a, b);
            const int64_t start = b * a->block_size;
            const int64_t n = a->numel - start < a->block_size ? a->numel - start : a->block_size;
            if ((start & 1) == 0) {
                dequantize_run(a, start, n, scale);
            } else { /* odd block sizes: blocks that start in the low nibble of a byte */
                store(a->out, start, a->nf4_code[nibble(a->packed, start)] * scale, a->out_kind);
                dequantize_run(a, start + 1, n - 1, scale);
            }
        }
    }
    return 0;
}
