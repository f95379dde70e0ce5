/* fusednorm._philox_cpu: the Python functions over the kernels of philox.c (CPython limited API, no torch
   headers). Tensors cross as raw addresses (tensor.data_ptr()) of contiguous buffers, dtypes as codes
   (kernels.h); the GIL is released while a kernel runs. fusednorm/dropout.py and fusednorm/cpu_path.py call
   them. */

#ifndef Py_LIMITED_API
#define Py_LIMITED_API 0x030A0000
#endif
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

#include "kernels.h"

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
    fusednorm_cpu_fill_keep(seed, start, count, (uint32_t)threshold, (uint8_t *)out);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *philox_words(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    uint64_t seed, start, count;
    void *out;
    (void)self;
    if (parse_common(args, nargs, 4, "philox_words", &seed, &start, &count, &out) < 0) return NULL;
    Py_BEGIN_ALLOW_THREADS
    fusednorm_cpu_fill_r0(seed, start, count, (uint32_t *)out);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static int as_code(PyObject *obj, const char *what, int *code) {
    const long value = PyLong_AsLong(obj);
    if (PyErr_Occurred()) return -1;
    if (value != DTYPE_FLOAT32 && value != DTYPE_BFLOAT16) {
        PyErr_Format(PyExc_ValueError, "pre_norm_sum: %s dtype code must be 0 (float32) or 1 (bfloat16), got %ld",
                     what, value);
        return -1;
    }
    *code = (int)value;
    return 0;
}

/* pre_norm_sum(x_address, x_code, residual_address (0: none), residual_code, scale_address (0: none),
   scale_len, scale_value, seed, threshold, keep_scale (0.0: no dropout), rows, cols, out_address, out_code):
   out = residual * s + dropout(x) over contiguous (rows, cols) buffers, computed in float32. */
static PyObject *pre_norm_sum(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    PreNormSum a;
    (void)self;
    if (nargs != 14) {
        PyErr_Format(PyExc_TypeError, "pre_norm_sum takes 14 arguments, got %zd", nargs);
        return NULL;
    }
    a.x = PyLong_AsVoidPtr(args[0]);
    if (PyErr_Occurred() || as_code(args[1], "x", &a.x_code) < 0) return NULL;
    a.residual = PyLong_AsVoidPtr(args[2]);
    if (PyErr_Occurred() || as_code(args[3], "residual", &a.residual_code) < 0) return NULL;
    a.scale = (const float *)PyLong_AsVoidPtr(args[4]);
    if (PyErr_Occurred()) return NULL;
    a.scale_len = (uint64_t)PyLong_AsUnsignedLongLong(args[5]);
    a.scale_value = (float)PyFloat_AsDouble(args[6]);
    a.seed = (uint64_t)PyLong_AsUnsignedLongLongMask(args[7]);
    a.threshold = (uint32_t)PyLong_AsUnsignedLong(args[8]);
    const double keep_scale = PyFloat_AsDouble(args[9]);
    a.rows = (uint64_t)PyLong_AsUnsignedLongLong(args[10]);
    a.cols = (uint64_t)PyLong_AsUnsignedLongLong(args[11]);
    a.out = PyLong_AsVoidPtr(args[12]);
    if (PyErr_Occurred() || as_code(args[13], "out", &a.out_code) < 0) return NULL;
    if (a.x == NULL || a.out == NULL) {
        PyErr_SetString(PyExc_ValueError, "pre_norm_sum: x_address and out_address must not be 0");
        return NULL;
    }
    a.has_residual = a.residual != NULL;
    a.has_dropout = keep_scale != 0.0;
    a.keep_scale = (float)keep_scale;
    int status;
    Py_BEGIN_ALLOW_THREADS
    status = fusednorm_cpu_pre_norm_sum_rows(&a);
    Py_END_ALLOW_THREADS
    if (status < 0) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* scale_backward(dh_address, dh_code, residual_address, residual_code, scale_address, scale_len, rows, cols,
   dresidual_address (0: none), dresidual_code, ds_address): see scale_backward_rows. */
static PyObject *scale_backward(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    int dh_code, residual_code, dresidual_code;
    (void)self;
    if (nargs != 11) {
        PyErr_Format(PyExc_TypeError, "scale_backward takes 11 arguments, got %zd", nargs);
        return NULL;
    }
    const void *dh = PyLong_AsVoidPtr(args[0]);
    if (PyErr_Occurred() || as_code(args[1], "dh", &dh_code) < 0) return NULL;
    const void *residual = PyLong_AsVoidPtr(args[2]);
    if (PyErr_Occurred() || as_code(args[3], "residual", &residual_code) < 0) return NULL;
    const float *scale = (const float *)PyLong_AsVoidPtr(args[4]);
    const uint64_t scale_len = (uint64_t)PyLong_AsUnsignedLongLong(args[5]);
    const uint64_t rows = (uint64_t)PyLong_AsUnsignedLongLong(args[6]);
    const uint64_t cols = (uint64_t)PyLong_AsUnsignedLongLong(args[7]);
    void *dresidual = PyLong_AsVoidPtr(args[8]);
    if (PyErr_Occurred() || as_code(args[9], "dresidual", &dresidual_code) < 0) return NULL;
    float *ds = (float *)PyLong_AsVoidPtr(args[10]);
    if (PyErr_Occurred()) return NULL;
    if (dh == NULL || residual == NULL || scale == NULL || ds == NULL || scale_len == 0) {
        PyErr_SetString(PyExc_ValueError, "scale_backward: dh, residual, scale and ds addresses must not be 0");
        return NULL;
    }
    int status;
    Py_BEGIN_ALLOW_THREADS
    status = fusednorm_cpu_scale_backward_rows(dh, dh_code, residual, residual_code, scale, scale_len, rows, cols,
                                               dresidual, dresidual_code, ds);
    Py_END_ALLOW_THREADS
    if (status < 0) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* dropout_backward(dh_address, dh_code, seed, threshold, keep_scale, rows, cols, dx_address, dx_code,
   dresidual_address (0: none), dresidual_code, scale_value): see dropout_backward_rows. */
static PyObject *dropout_backward(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    int dh_code, dx_code, dresidual_code;
    (void)self;
    if (nargs != 12) {
        PyErr_Format(PyExc_TypeError, "dropout_backward takes 12 arguments, got %zd", nargs);
        return NULL;
    }
    const void *dh = PyLong_AsVoidPtr(args[0]);
    if (PyErr_Occurred() || as_code(args[1], "dh", &dh_code) < 0) return NULL;
    const uint64_t seed = (uint64_t)PyLong_AsUnsignedLongLongMask(args[2]);
    const uint32_t threshold = (uint32_t)PyLong_AsUnsignedLong(args[3]);
    const float keep_scale = (float)PyFloat_AsDouble(args[4]);
    const uint64_t rows = (uint64_t)PyLong_AsUnsignedLongLong(args[5]);
    const uint64_t cols = (uint64_t)PyLong_AsUnsignedLongLong(args[6]);
    void *dx = PyLong_AsVoidPtr(args[7]);
    if (PyErr_Occurred() || as_code(args[8], "dx", &dx_code) < 0) return NULL;
    void *dresidual = PyLong_AsVoidPtr(args[9]);
    if (PyErr_Occurred() || as_code(args[10], "dresidual", &dresidual_code) < 0) return NULL;
    const float scale_value = (float)PyFloat_AsDouble(args[11]);
    if (PyErr_Occurred()) return NULL;
    if (dh == NULL || dx == NULL) {
        PyErr_SetString(PyExc_ValueError, "dropout_backward: dh and dx addresses must not be 0");
        return NULL;
    }
    int status;
    Py_BEGIN_ALLOW_THREADS
    status = fusednorm_cpu_dropout_backward_rows(dh, dh_code, seed, threshold, keep_scale, rows, cols, dx, dx_code,
                                                 dresidual, dresidual_code, scale_value);
    Py_END_ALLOW_THREADS
    if (status < 0) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"keep_mask", (PyCFunction)(void (*)(void))keep_mask, METH_FASTCALL,
     "keep_mask(seed, start_index, count, threshold, out_address): write count bytes (1 keep, 0 drop) of the "
     "mask of indices start_index .. start_index + count - 1 to the buffer at out_address."},
    {"philox_words", (PyCFunction)(void (*)(void))philox_words, METH_FASTCALL,
     "philox_words(seed, start_index, count, out_address): write count uint32 first words of Philox4x32-10."},
    {"pre_norm_sum", (PyCFunction)(void (*)(void))pre_norm_sum, METH_FASTCALL,
     "pre_norm_sum(x_address, x_code, residual_address, residual_code, scale_address, scale_len, scale_value, seed, "
     "threshold, keep_scale, rows, cols, out_address, out_code): h = residual * s + dropout(x) in float32, "
     "stored as float32 (code 0) or bfloat16 (code 1)."},
    {"scale_backward", (PyCFunction)(void (*)(void))scale_backward, METH_FASTCALL,
     "scale_backward(dh_address, dh_code, residual_address, residual_code, scale_address, scale_len, rows, cols, "
     "dresidual_address, dresidual_code, ds_address): dresidual = dh * s, ds += column sums of dh * residual."},
    {"dropout_backward", (PyCFunction)(void (*)(void))dropout_backward, METH_FASTCALL,
     "dropout_backward(dh_address, dh_code, seed, threshold, keep_scale, rows, cols, dx_address, dx_code, "
     "dresidual_address, dresidual_code, scale_value): dx = keep ? dh * c : 0, dresidual = dh * scale_value."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_philox_cpu", "Philox4x32-10 dropout masks on the CPU (fusednorm/dropout.py).", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__philox_cpu(void) {
    fusednorm_cpu_init();
    return PyModule_Create(&module);
}
