/* fusednorm._philox_cpu's kernels: the dropout keep mask of fusednorm/dropout.py on the CPU, in compiled code.

   keep[i] = (r0(seed, start_index + i) >> 8) >= threshold, where r0 is the first word of
   Philox4x32-10 with counter (index_lo, index_hi, 0, 0) and key (seed_lo, seed_hi): bit for bit the
   mask of the torch definition (fusednorm.dropout.philox_r0), the Triton kernels and the CUDA kernels.

   Plain C, no Python and no torch headers (module.c wraps these for Python): it compiles in about a second,
   and a machine without a C compiler still installs fusednorm (setup.py builds it as an optional extension;
   dropout.py and cpu_path.py then fall back to torch ops, slower, same bits). The mask is computed 8 indices
   at a time with AVX2 where the CPU has it (chosen at run time), else by a scalar loop that gcc vectorizes. */
#include <stdlib.h>
#include <string.h>

#include "kernels.h"

#define PHILOX_ROUND_A 0xD2511F53u
#define PHILOX_ROUND_B 0xCD9E8D57u
#define PHILOX_KEY_A 0x9E3779B9u
#define PHILOX_KEY_B 0xBB67AE85u
#define KEEP_SHIFT 8 /* 32 - KEEP_BITS: a 24-bit uniform integer against the threshold */

/* The first output word of Philox4x32-10 for counter (c0, c1, 0, 0), key (k0, k1). */
static inline uint32_t philox_r0(uint32_t k0, uint32_t k1, uint32_t c0, uint32_t c1) {
    uint32_t c2 = 0u, c3 = 0u;
    for (int round = 0; round < 10; ++round) {
        const uint64_t prod_b = (uint64_t)PHILOX_ROUND_B * c2;
        const uint64_t prod_a = (uint64_t)PHILOX_ROUND_A * c0;
        c0 = (uint32_t)(prod_b >> 32) ^ c1 ^ k0;
        c1 = (uint32_t)prod_b;
        c2 = (uint32_t)(prod_a >> 32) ^ c3 ^ k1;
        c3 = (uint32_t)prod_a;
        k0 += PHILOX_KEY_A;
        k1 += PHILOX_KEY_B;
    }
    return c0;
}

/* Indices start .. start + count - 1 in runs of at most 2^31 whose high word is constant, so that the
   vectorized inner loops work on 32-bit lanes (the index's low word, a 32-bit loop counter) only. */
#define RUN_ROOM(first) ((((uint64_t)1 << 32) - (uint32_t)(first)) < ((uint64_t)1 << 31) \
    ? (((uint64_t)1 << 32) - (uint32_t)(first)) : ((uint64_t)1 << 31))
#define FOR_EACH_RUN(BODY)                                                              \
    const uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);                   \
    uint64_t done = 0;                                                                  \
    while (done < count) {                                                              \
        const uint64_t first = start + done;                                            \
        const uint64_t room = RUN_ROOM(first);                                           \
        const uint64_t run = count - done < room ? count - done : room;                 \
        const uint32_t lo = (uint32_t)first, hi = (uint32_t)(first >> 32);             \
        BODY                                                                            \
        done += run;                                                                    \
    }

static void keep_run_scalar(uint32_t k0, uint32_t k1, uint32_t lo, uint32_t hi, uint32_t run, uint32_t threshold,
                            uint8_t *dst) {
    for (uint32_t i = 0; i < run; ++i) {
        dst[i] = (uint8_t)((philox_r0(k0, k1, lo + i, hi) >> KEEP_SHIFT) >= threshold);
    }
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define HAVE_AVX2_PATH 1

/* 8 counters per step in AVX2 registers: each 32x32 -> 64-bit product as vpmuludq on the even and the odd lanes,
   the high and low words blended back into 8 lanes (what gcc's auto-vectorization did 2x slower). */
__attribute__((target("avx2"))) static inline void mulhilo8(__m256i a, __m256i m, __m256i *hi, __m256i *lo) {
    const __m256i even = _mm256_mul_epu32(a, m);
    const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);
    *hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
    *lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
}

static uint64_t keep_bytes[256]; /* bit j of a drop mask -> byte j: 0 (drop) or 1 (keep) */

__attribute__((target("avx2")))
static void keep_run_avx2(uint32_t k0, uint32_t k1, uint32_t lo, uint32_t hi, uint32_t run, uint32_t threshold,
                          uint8_t *dst) {
    const __m256i round_a = _mm256_set1_epi32((int)PHILOX_ROUND_A), round_b = _mm256_set1_epi32((int)PHILOX_ROUND_B);
    const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), limit = _mm256_set1_epi32((int)threshold);
    uint32_t i = 0;
    for (; i + 8 <= run; i += 8) {
        __m256i c0 = _mm256_add_epi32(_mm256_set1_epi32((int)(lo + i)), lanes), c1 = _mm256_set1_epi32((int)hi);
        __m256i c2 = _mm256_setzero_si256(), c3 = _mm256_setzero_si256();
        uint32_t key0 = k0, key1 = k1;
        for (int round = 0; round < 10; ++round) {
            __m256i hi_b, lo_b, hi_a, lo_a;
            mulhilo8(c2, round_b, &hi_b, &lo_b);
            mulhilo8(c0, round_a, &hi_a, &lo_a);
            c0 = _mm256_xor_si256(_mm256_xor_si256(hi_b, c1), _mm256_set1_epi32((int)key0));
            c1 = lo_b;
            c2 = _mm256_xor_si256(_mm256_xor_si256(hi_a, c3), _mm256_set1_epi32((int)key1));
            c3 = lo_a;
            key0 += PHILOX_KEY_A;
            key1 += PHILOX_KEY_B;
        }
        /* (r0 >> 8) < 2^24 and threshold <= 2^24: a signed compare is exact. drop = threshold > (r0 >> 8). */
        const __m256i drop = _mm256_cmpgt_epi32(limit, _mm256_srli_epi32(c0, KEEP_SHIFT));
        const uint64_t bytes = keep_bytes[_mm256_movemask_ps(_mm256_castsi256_ps(drop))];
        memcpy(dst + i, &bytes, 8);
    }
    keep_run_scalar(k0, k1, lo + i, hi, run - i, threshold, dst + i);
}
#endif

void fusednorm_cpu_fill_keep(uint64_t seed, uint64_t start, uint64_t count, uint32_t threshold, uint8_t *out) {
#ifdef HAVE_AVX2_PATH
    const int avx2 = __builtin_cpu_supports("avx2");
#endif
    FOR_EACH_RUN(
#ifdef HAVE_AVX2_PATH
        if (avx2) {
            keep_run_avx2(k0, k1, lo, hi, (uint32_t)run, threshold, out + done);
        } else
#endif
        {
            keep_run_scalar(k0, k1, lo, hi, (uint32_t)run, threshold, out + done);
        })
}

void fusednorm_cpu_fill_r0(uint64_t seed, uint64_t start, uint64_t count, uint32_t *out) {
    FOR_EACH_RUN(
        uint32_t *dst = out + done;
        for (uint32_t i = 0; i < (uint32_t)run; ++i) {
            dst[i] = philox_r0(k0, k1, lo + i, hi);
        })
}

/* ---- the CPU path's h = residual * s + dropout(x), in float32 as the torch backend computes it ---------- */

static void load_row(int code, const void *src, uint64_t n, float *dst) {
    if (code == DTYPE_FLOAT32) {
        const float *s = (const float *)src;
        for (uint64_t j = 0; j < n; ++j) dst[j] = s[j];
    } else {
        const uint16_t *s = (const uint16_t *)src;
        for (uint64_t j = 0; j < n; ++j) {
            union { uint32_t u; float f; } v = {(uint32_t)s[j] << 16};
            dst[j] = v.f;
        }
    }
}

/* float32 -> bfloat16 rounds to nearest even, NaN -> 0x7FC0: as torch (c10::BFloat16) rounds. */
static void store_row(int code, const float *src, uint64_t n, void *dst) {
    if (code == DTYPE_FLOAT32) {
        float *d = (float *)dst;
        for (uint64_t j = 0; j < n; ++j) d[j] = src[j];
    } else {
        uint16_t *d = (uint16_t *)dst;
        for (uint64_t j = 0; j < n; ++j) {
            union { float f; uint32_t u; } v = {src[j]};
            const uint32_t rounded = (v.u + (((v.u >> 16) & 1u) + 0x7FFFu)) >> 16;
            d[j] = src[j] != src[j] ? (uint16_t)0x7FC0u : (uint16_t)rounded;
        }
    }
}

/* Every product and sum rounded to float32 in the torch backend's order (x * (keep ? c : 0), r * s, their sum);
   -ffp-contract=off (setup.py) keeps gcc from fusing them into an fma. The row's mask comes from fill_keep
   (vectorized over 32-bit lanes) into ``keep``; the selects below vectorize too. */
static void dropout_row(float *xf, uint64_t n, uint64_t seed, uint64_t first, uint32_t threshold, float keep_scale,
                        uint8_t *keep) {
    fusednorm_cpu_fill_keep(seed, first, n, threshold, keep);
    for (uint64_t j = 0; j < n; ++j) {
        const float factor = keep[j] ? keep_scale : 0.0f;
        xf[j] = xf[j] * factor;
    }
}

int fusednorm_cpu_pre_norm_sum_rows(const PreNormSum *a) {
    float *xf = (float *)malloc((sizeof(float) * 2 + 1) * (a->cols ? a->cols : 1));
    if (xf == NULL) return -1;
    float *rf = xf + a->cols;
    uint8_t *keep = (uint8_t *)(rf + a->cols);
    const size_t x_size = a->x_code == DTYPE_FLOAT32 ? 4 : 2, r_size = a->residual_code == DTYPE_FLOAT32 ? 4 : 2;
    const size_t out_size = a->out_code == DTYPE_FLOAT32 ? 4 : 2;
    for (uint64_t i = 0; i < a->rows; ++i) {
        const uint64_t n = a->cols;
        load_row(a->x_code, (const char *)a->x + i * n * x_size, n, xf);
        if (a->has_dropout) dropout_row(xf, n, a->seed, i * n, a->threshold, a->keep_scale, keep);
        if (a->has_residual) {
            load_row(a->residual_code, (const char *)a->residual + i * n * r_size, n, rf);
            if (a->scale != NULL && a->scale_len > 1) {
                for (uint64_t j = 0; j < n; ++j) rf[j] = rf[j] * a->scale[j];
            } else if (a->scale != NULL || a->scale_value != 1.0f) {
                const float s = a->scale != NULL ? a->scale[0] : a->scale_value;
                for (uint64_t j = 0; j < n; ++j) rf[j] = rf[j] * s;
            }
            for (uint64_t j = 0; j < n; ++j) xf[j] = rf[j] + xf[j];
        }
        store_row(a->out_code, xf, n, (char *)a->out + i * n * out_size);
    }
    free(xf);
    return 0;
}

/* The dropped sum's backward, one pass: dx = keep ? dh * c : 0 (0 at a dropped position even where dh is NaN, as
   the torch backend's where() gives) and, when dresidual is not NULL, dresidual = dh * scale_value. */
static void dropout_grad_row(const float *dhf, float *dxf, uint64_t n, uint64_t seed, uint64_t first,
                             uint32_t threshold, float keep_scale, uint8_t *keep) {
    fusednorm_cpu_fill_keep(seed, first, n, threshold, keep);
    for (uint64_t j = 0; j < n; ++j) {
        const float scaled = dhf[j] * keep_scale;
        dxf[j] = keep[j] ? scaled : 0.0f;
    }
}

int fusednorm_cpu_dropout_backward_rows(const void *dh, int dh_code, uint64_t seed, uint32_t threshold,
                                        float keep_scale, uint64_t rows, uint64_t cols, void *dx, int dx_code,
                                        void *dresidual, int dresidual_code, float scale_value) {
    float *dhf = (float *)malloc((sizeof(float) * 2 + 1) * (cols ? cols : 1));
    if (dhf == NULL) return -1;
    float *outf = dhf + cols;
    uint8_t *keep = (uint8_t *)(outf + cols);
    const size_t dh_size = dh_code == DTYPE_FLOAT32 ? 4 : 2, dx_size = dx_code == DTYPE_FLOAT32 ? 4 : 2;
    const size_t dr_size = dresidual_code == DTYPE_FLOAT32 ? 4 : 2;
    for (uint64_t i = 0; i < rows; ++i) {
        load_row(dh_code, (const char *)dh + i * cols * dh_size, cols, dhf);
        dropout_grad_row(dhf, outf, cols, seed, i * cols, threshold, keep_scale, keep);
        store_row(dx_code, outf, cols, (char *)dx + i * cols * dx_size);
        if (dresidual != NULL) {
            for (uint64_t j = 0; j < cols; ++j) outf[j] = dhf[j] * scale_value;
            store_row(dresidual_code, outf, cols, (char *)dresidual + i * cols * dr_size);
        }
    }
    free(dhf);
    return 0;
}

/* The learned scale's backward, one pass: dresidual = dh * s (rounded once to its dtype; skipped when out is
   NULL) and ds[j] += dh * residual summed over the rows in float32 (ds: cols float32, zeroed by the caller). */
int fusednorm_cpu_scale_backward_rows(const void *dh, int dh_code, const void *residual, int residual_code,
                                      const float *scale, uint64_t scale_len, uint64_t rows, uint64_t cols,
                                      void *dresidual, int dresidual_code, float *ds) {
    float *dhf = (float *)malloc(sizeof(float) * (cols ? cols : 1) * 2);
    if (dhf == NULL) return -1;
    float *rf = dhf + cols;
    const size_t dh_size = dh_code == DTYPE_FLOAT32 ? 4 : 2, r_size = residual_code == DTYPE_FLOAT32 ? 4 : 2;
    const size_t out_size = dresidual_code == DTYPE_FLOAT32 ? 4 : 2;
    for (uint64_t i = 0; i < rows; ++i) {
        load_row(dh_code, (const char *)dh + i * cols * dh_size, cols, dhf);
        load_row(residual_code, (const char *)residual + i * cols * r_size, cols, rf);
        for (uint64_t j = 0; j < cols; ++j) ds[j] += dhf[j] * rf[j];
        if (dresidual != NULL) {
            if (scale_len > 1) {
                for (uint64_t j = 0; j < cols; ++j) rf[j] = dhf[j] * scale[j];
            } else {
                for (uint64_t j = 0; j < cols; ++j) rf[j] = dhf[j] * scale[0];
            }
            store_row(dresidual_code, rf, cols, (char *)dresidual + i * cols * out_size);
        }
    }
    free(dhf);
    return 0;
}

void fusednorm_cpu_init(void) {
#ifdef HAVE_AVX2_PATH
    for (int bits = 0; bits < 256; ++bits) {
        uint64_t bytes = 0;
        for (int j = 0; j < 8; ++j) bytes |= (uint64_t)(((bits >> j) & 1) == 0) << (8 * j);
        keep_bytes[bits] = bytes;
    }
#endif
}
