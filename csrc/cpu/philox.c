/* fusednorm._philox_cpu: the dropout keep mask of fusednorm/dropout.py on the CPU, in compiled code.

   keep[i] = (r0(seed, start_index + i) >> 8) >= threshold, where r0 is the first word of
   Philox4x32-10 with counter (index_lo, index_hi, 0, 0) and key (seed_lo, seed_hi): bit for bit the
   mask of the torch definition (fusednorm.dropout.philox_r0), the Triton kernels and the CUDA kernels.

   Plain C and the CPython limited API (no torch headers): it compiles in about a second, and a machine
   without a C compiler still installs fusednorm (setup.py builds it as an optional extension; dropout.py
   then falls back to the torch definition, slower, same bits). The loop body has no branch, so gcc -O3
   vectorizes it (32x32 -> 64-bit products). The GIL is released while the mask is written. */

#ifndef Py_LIMITED_API
#define Py_LIMITED_API 0x030A0000
#endif
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

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

__attribute__((target_clones("avx2", "default")))
static void fill_keep(uint64_t seed, uint64_t start, uint64_t count, uint32_t threshold, uint8_t *out) {
    FOR_EACH_RUN(
        uint8_t *dst = out + done;
        for (uint32_t i = 0; i < (uint32_t)run; ++i) {
            dst[i] = (uint8_t)((philox_r0(k0, k1, lo + i, hi) >> KEEP_SHIFT) >= threshold);
        })
}

static void fill_r0(uint64_t seed, uint64_t start, uint64_t count, uint32_t *out) {
    FOR_EACH_RUN(
        uint32_t *dst = out + done;
        for (uint32_t i = 0; i < (uint32_t)run; ++i) {
            dst[i] = philox_r0(k0, k1, lo + i, hi);
        })
}

/* Parses (seed, start_index, count, [threshold,] out_address). seed is taken modulo 2^64 (its two's
   complement bits, as the torch definition's int64 masks take them); start_index, count >= 0. */
static int parse_common(PyObject *const *args, Py_ssize_t nargs, Py_ssize_t expected, const char *name,
                        uint64_t *seed, uint64_t *start, uint64_t *count, void **out) {
    if (nargs != expected) {
        PyErr_Format(PyExc_TypeError, "%s takes %zd arguments, got %zd", name, expected, nargs);
        return -1;
    }
    *seed = (uint64_t)PyLong_AsUnsignedLongLongMask(args[0]);
    if (PyErr_Occurred()) return -1;
    *start = (uint64_t)PyLong_AsUnsignedLongLong(args[1]);
    if (PyErr_Occurred()) return -1;
    *count = (uint64_t)PyLong_AsUnsignedLongLong(args[2]);
    if (PyErr_Occurred()) return -1;
    *out = PyLong_AsVoidPtr(args[expected - 1]);
    if (PyErr_Occurred()) return -1;
    if (*out == NULL && *count > 0) {
        PyErr_Format(PyExc_ValueError, "%s: out_address is 0 (a null pointer)", name);
        return -1;
    }
    return 0;
}

static PyObject *keep_mask(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    uint64_t seed, start, count;
    void *out;
    (void)self;
    if (parse_common(args, nargs, 5, "keep_mask", &seed, &start, &count, &out) < 0) return NULL;
    const unsigned long threshold = PyLong_AsUnsignedLong(args[3]);
    if (PyErr_Occurred()) return NULL;
    if (threshold > (1ul << 24)) {
        PyErr_Format(PyExc_ValueError, "keep_mask: threshold must be in [0, 2^24], got %lu", threshold);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    fill_keep(seed, start, count, (uint32_t)threshold, (uint8_t *)out);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *philox_words(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    uint64_t seed, start, count;
    void *out;
    (void)self;
    if (parse_common(args, nargs, 4, "philox_words", &seed, &start, &count, &out) < 0) return NULL;
    Py_BEGIN_ALLOW_THREADS
    fill_r0(seed, start, count, (uint32_t *)out);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"keep_mask", (PyCFunction)(void (*)(void))keep_mask, METH_FASTCALL,
     "keep_mask(seed, start_index, count, threshold, out_address): write count bytes (1 keep, 0 drop) of the "
     "mask of indices start_index .. start_index + count - 1 to the buffer at out_address."},
    {"philox_words", (PyCFunction)(void (*)(void))philox_words, METH_FASTCALL,
     "philox_words(seed, start_index, count, out_address): write count uint32 first words of Philox4x32-10."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_philox_cpu", "Philox4x32-10 dropout masks on the CPU (fusednorm/dropout.py).", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__philox_cpu(void) { return PyModule_Create(&module); }
