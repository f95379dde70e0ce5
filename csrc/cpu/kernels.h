/* The C kernels of fusednorm._philox_cpu (philox.c), called by its Python functions (module.c). */
#ifndef FUSEDNORM_CPU_KERNELS_H
#define FUSEDNORM_CPU_KERNELS_H

#include <stdint.h>

/* dtype codes of the buffers (fusednorm/cpu_path.py's _DTYPE_CODES) */
enum { DTYPE_FLOAT32 = 0, DTYPE_BFLOAT16 = 1 };

/* keep[i] = (r0(seed, start + i) >> 8) >= threshold: the mask of fusednorm/dropout.py, 1 keep, 0 drop. */
void fusednorm_cpu_fill_keep(uint64_t seed, uint64_t start, uint64_t count, uint32_t threshold, uint8_t *out);
/* out[i] = r0(seed, start + i), the first word of Philox4x32-10. */
void fusednorm_cpu_fill_r0(uint64_t seed, uint64_t start, uint64_t count, uint32_t *out);

/* h = residual * s + dropout(x) over contiguous (rows, cols) buffers, in float32, rounded once. */
typedef struct {
    const void *x, *residual;
    const float *scale; /* NULL: a constant scale_value; else one float32 per column (or one, scale_len 1) */
    int x_code, residual_code, out_code, has_residual, has_dropout;
    uint64_t scale_len;
    float scale_value, keep_scale;
    uint64_t seed;
    uint32_t threshold;
    uint64_t rows, cols;
    void *out;
} PreNormSum;

int fusednorm_cpu_pre_norm_sum_rows(const PreNormSum *a);

/* dx = keep ? dh * keep_scale : 0; dresidual = dh * scale_value (when not NULL). -1: out of memory. */
int fusednorm_cpu_dropout_backward_rows(const void *dh, int dh_code, uint64_t seed, uint32_t threshold,
                                        float keep_scale, uint64_t rows, uint64_t cols, void *dx, int dx_code,
                                        void *dresidual, int dresidual_code, float scale_value);

/* dresidual = dh * s (when not NULL); ds[j] += sum over rows of dh * residual (float32). -1: out of memory. */
int fusednorm_cpu_scale_backward_rows(const void *dh, int dh_code, const void *residual, int residual_code,
                                      const float *scale, uint64_t scale_len, uint64_t rows, uint64_t cols,
                                      void *dresidual, int dresidual_code, float *ds);

/* Tables of the AVX2 path; called once, at import. */
void fusednorm_cpu_init(void);

#endif
