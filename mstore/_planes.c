/*
 * Byte-plane kernels for mstore.codecs: split elements into byte planes and interleave them
 * back, with FLOATPLANE's one-bit rotation fused into the same pass, and optionally XORed in
 * that pass as well: a split with a second buffer (a delta's base), a join with a second set
 * of planes (the last level of a delta chain).
 *
 * Why by hand: the libraries that shuffle bytes (c-blosc2's shuffle, numcodecs.Shuffle) do a
 * plain byte transposition only; the rotation and the XOR would then each cost more full passes
 * over the data in numpy, which is where the time went (numpy interleave ran at ~3.8 GB/s, this
 * loop at ~12 GB/s on one core). The loops are written plainly so the compiler vectorises them.
 *
 * This module is optional: mstore.codecs has numpy versions of every function here that give
 * byte-identical results, used when this extension was not built. The tests compare the two.
 * The GIL is released while a kernel runs, so checkout and commit workers run them in parallel.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define MAX_ITEM 8

/* Elements are loaded with memcpy into native integers, so byte j of the value is byte j in
 * memory only on a little-endian machine, as the format (and numpy's "<u4" views) require.
 * Elsewhere the build fails, and being optional, the install falls back to numpy. */
#if PY_BIG_ENDIAN
#error "mstore._planes assumes a little-endian machine"
#endif

/* rotl1 / rotr1 on an element of the given width */
#define ROTL1(T, v) ((T)(((v) << 1) | ((v) >> (8 * sizeof(T) - 1))))
#define ROTR1(T, v) ((T)(((v) >> 1) | ((v) << (8 * sizeof(T) - 1))))

#define SPLIT(T, ITEM)                                                             \
    static void split_##ITEM(const uint8_t *src, uint8_t **p, Py_ssize_t n, int rot) { \
        for (Py_ssize_t i = 0; i < n; i++) {                                       \
            T v;                                                                   \
            memcpy(&v, src + (size_t)i * ITEM, ITEM);                              \
            if (rot) v = ROTL1(T, v);                                              \
            for (int j = 0; j < ITEM; j++) p[j][i] = (uint8_t)(v >> (8 * j));      \
        }                                                                          \
    }                                                                              \
    static void splitx_##ITEM(const uint8_t *src, const uint8_t *x, uint8_t **p,   \
                              Py_ssize_t n, int rot) {                             \
        for (Py_ssize_t i = 0; i < n; i++) {                                       \
            T v, w;                                                                \
            memcpy(&v, src + (size_t)i * ITEM, ITEM);                              \
            memcpy(&w, x + (size_t)i * ITEM, ITEM);                                \
            v ^= w;                                                                \
            if (rot) v = ROTL1(T, v);                                              \
            for (int j = 0; j < ITEM; j++) p[j][i] = (uint8_t)(v >> (8 * j));      \
        }                                                                          \
    }

#define JOIN(T, ITEM)                                                                      \
    static void join_##ITEM(uint8_t *dst, const uint8_t **p, Py_ssize_t n, int rot) {          \
        for (Py_ssize_t i = 0; i < n; i++) {                                               \
            T v = 0;                                                                       \
            for (int j = 0; j < ITEM; j++) v |= (T)p[j][i] << (8 * j);                     \
            if (rot) v = ROTR1(T, v);                                                      \
            memcpy(dst + (size_t)i * ITEM, &v, ITEM);                                      \
        }                                                                                  \
    }                                                                                      \
    static void joinx_##ITEM(uint8_t *dst, const uint8_t **p, const uint8_t **x, Py_ssize_t n, \
                             int rot) {                                                    \
        for (Py_ssize_t i = 0; i < n; i++) {                                               \
            T v = 0;                                                                       \
            for (int j = 0; j < ITEM; j++) v |= (T)(uint8_t)(p[j][i] ^ x[j][i]) << (8 * j); \
            if (rot) v = ROTR1(T, v);                                                      \
            memcpy(dst + (size_t)i * ITEM, &v, ITEM);                                      \
        }                                                                                  \
    }

SPLIT(uint16_t, 2)
SPLIT(uint32_t, 4)
SPLIT(uint64_t, 8)
JOIN(uint16_t, 2)
JOIN(uint32_t, 4)
JOIN(uint64_t, 8)

/* Called with constant flags, so the compiler specialises each loop (no branch inside). */
static void split_any(int item, const uint8_t *src, const uint8_t *x, uint8_t **p, Py_ssize_t n, int rot) {
    if (x) {
        if (item == 2) {
            if (rot) splitx_2(src, x, p, n, 1); else splitx_2(src, x, p, n, 0);
        } else if (item == 4) {
            if (rot) splitx_4(src, x, p, n, 1); else splitx_4(src, x, p, n, 0);
        } else {
            if (rot) splitx_8(src, x, p, n, 1); else splitx_8(src, x, p, n, 0);
        }
    } else if (item == 2) {
        if (rot) split_2(src, p, n, 1); else split_2(src, p, n, 0);
    } else if (item == 4) {
        if (rot) split_4(src, p, n, 1); else split_4(src, p, n, 0);
    } else {
        if (rot) split_8(src, p, n, 1); else split_8(src, p, n, 0);
    }
}

#define DISPATCH_JOIN(F, ...)                                   \
    do {                                                        \
        if (item == 2) {                                        \
            if (rot) F##_2(__VA_ARGS__, 1); else F##_2(__VA_ARGS__, 0); \
        } else if (item == 4) {                                 \
            if (rot) F##_4(__VA_ARGS__, 1); else F##_4(__VA_ARGS__, 0); \
        } else {                                                \
            if (rot) F##_8(__VA_ARGS__, 1); else F##_8(__VA_ARGS__, 0); \
        }                                                       \
    } while (0)

static void join_any(int item, uint8_t *dst, const uint8_t **p, const uint8_t **x, Py_ssize_t n, int rot) {
    if (x)
        DISPATCH_JOIN(joinx, dst, p, x, n);
    else
        DISPATCH_JOIN(join, dst, p, n);
}

/* Acquire `count` buffers from a sequence, each at least `need` bytes (writable if asked). */
static int get_buffers(PyObject *seq, int count, Py_ssize_t need, int writable, Py_buffer *views,
                       const char *what) {
    PyObject *fast = PySequence_Fast(seq, what);
    if (!fast) return -1;
    if (PySequence_Fast_GET_SIZE(fast) != count) {
        PyErr_Format(PyExc_ValueError, "%s: expected %d buffers, got %zd", what, count,
                     PySequence_Fast_GET_SIZE(fast));
        Py_DECREF(fast);
        return -1;
    }
    int i;
    for (i = 0; i < count; i++) {
        PyObject *o = PySequence_Fast_GET_ITEM(fast, i);
        if (PyObject_GetBuffer(o, &views[i], writable ? PyBUF_WRITABLE : PyBUF_SIMPLE) < 0) goto fail;
        if (views[i].len < need) {
            PyErr_Format(PyExc_ValueError, "%s: buffer %d has %zd bytes, needs %zd", what, i,
                         views[i].len, need);
            PyBuffer_Release(&views[i]);
            goto fail;
        }
    }
    Py_DECREF(fast);
    return 0;
fail:
    while (--i >= 0) PyBuffer_Release(&views[i]);
    Py_DECREF(fast);
    return -1;
}

static void release(Py_buffer *views, int count) {
    for (int i = 0; i < count; i++) PyBuffer_Release(&views[i]);
}

static int check_item(int item) {
    if (item != 2 && item != 4 && item != 8) {
        PyErr_Format(PyExc_ValueError, "element size must be 2, 4 or 8, not %d", item);
        return -1;
    }
    return 0;
}

PyDoc_STRVAR(split_doc,
             "split(raw, planes, item, rotate[, xor])\n\n"
             "(All arguments are positional.) "
             "Write byte j of every item-byte little-endian element of raw into planes[j] (XORed\n"
             "with the same element of xor first when given, then rotated left by one bit when\n"
             "rotate is true). len(raw) must be a multiple of item, xor at least as long.");

static PyObject *py_split(PyObject *self, PyObject *args) {
    PyObject *raw_obj, *planes_obj, *xor_obj = Py_None;
    int item, rot;
    if (!PyArg_ParseTuple(args, "OOip|O", &raw_obj, &planes_obj, &item, &rot, &xor_obj)) return NULL;
    if (check_item(item) < 0) return NULL;
    Py_buffer raw, x;
    if (PyObject_GetBuffer(raw_obj, &raw, PyBUF_SIMPLE) < 0) return NULL;
    if (raw.len % item) {
        PyErr_Format(PyExc_ValueError, "%zd bytes are not whole %d-byte elements", raw.len, item);
        PyBuffer_Release(&raw);
        return NULL;
    }
    int have_x = xor_obj != Py_None;
    if (have_x) {
        if (PyObject_GetBuffer(xor_obj, &x, PyBUF_SIMPLE) < 0) {
            PyBuffer_Release(&raw);
            return NULL;
        }
        if (x.len < raw.len) {
            PyErr_Format(PyExc_ValueError, "xor has %zd bytes, needs %zd", x.len, raw.len);
            PyBuffer_Release(&x);
            PyBuffer_Release(&raw);
            return NULL;
        }
    }
    Py_ssize_t n = raw.len / item;
    Py_buffer views[MAX_ITEM];
    if (get_buffers(planes_obj, item, n, 1, views, "planes") < 0) {
        if (have_x) PyBuffer_Release(&x);
        PyBuffer_Release(&raw);
        return NULL;
    }
    uint8_t *p[MAX_ITEM];
    for (int j = 0; j < item; j++) p[j] = (uint8_t *)views[j].buf;
    Py_BEGIN_ALLOW_THREADS
    split_any(item, (const uint8_t *)raw.buf, have_x ? (const uint8_t *)x.buf : NULL, p, n, rot);
    Py_END_ALLOW_THREADS
    release(views, item);
    if (have_x) PyBuffer_Release(&x);
    PyBuffer_Release(&raw);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(join_doc,
             "join(planes, out, n, rotate[, xor])\n\n"
             "(All arguments are positional.) "
             "Write n elements into out, element i composed of byte i of every plane (each XORed\n"
             "with byte i of the same plane of xor when given), rotated right by one bit when\n"
             "rotate is true: the inverse of split.");

static PyObject *py_join(PyObject *self, PyObject *args) {
    PyObject *planes_obj, *out_obj, *xor_obj = Py_None;
    Py_ssize_t n;
    int rot;
    if (!PyArg_ParseTuple(args, "OOnp|O", &planes_obj, &out_obj, &n, &rot, &xor_obj)) return NULL;
    if (n < 0) {
        PyErr_SetString(PyExc_ValueError, "negative element count");
        return NULL;
    }
    Py_ssize_t item = PySequence_Size(planes_obj);
    if (item < 0) return NULL;
    if (check_item((int)item) < 0) return NULL;
    Py_buffer out;
    if (PyObject_GetBuffer(out_obj, &out, PyBUF_WRITABLE) < 0) return NULL;
    if (out.len / item < n) {
        PyErr_Format(PyExc_ValueError, "out has %zd bytes, needs %zd elements of %zd bytes", out.len, n, item);
        PyBuffer_Release(&out);
        return NULL;
    }
    Py_buffer views[MAX_ITEM], xviews[MAX_ITEM];
    if (get_buffers(planes_obj, (int)item, n, 0, views, "planes") < 0) {
        PyBuffer_Release(&out);
        return NULL;
    }
    int have_x = xor_obj != Py_None;
    if (have_x && get_buffers(xor_obj, (int)item, n, 0, xviews, "xor") < 0) {
        release(views, (int)item);
        PyBuffer_Release(&out);
        return NULL;
    }
    const uint8_t *p[MAX_ITEM], *x[MAX_ITEM];
    for (int j = 0; j < item; j++) {
        p[j] = (const uint8_t *)views[j].buf;
        x[j] = have_x ? (const uint8_t *)xviews[j].buf : NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    join_any((int)item, (uint8_t *)out.buf, p, have_x ? x : NULL, n, rot);
    Py_END_ALLOW_THREADS
    if (have_x) release(xviews, (int)item);
    release(views, (int)item);
    PyBuffer_Release(&out);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(xor_doc,
             "xor(a, b, out)\n\n"
             "Write a[i] ^ b[i] into out[i] for every byte of a (b and out at least as long).");

static PyObject *py_xor(PyObject *self, PyObject *args) {
    PyObject *a_obj, *b_obj, *out_obj;
    if (!PyArg_ParseTuple(args, "OOO", &a_obj, &b_obj, &out_obj)) return NULL;
    Py_buffer a, b, out;
    if (PyObject_GetBuffer(a_obj, &a, PyBUF_SIMPLE) < 0) return NULL;
    if (PyObject_GetBuffer(b_obj, &b, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&a);
        return NULL;
    }
    if (PyObject_GetBuffer(out_obj, &out, PyBUF_WRITABLE) < 0) {
        PyBuffer_Release(&b);
        PyBuffer_Release(&a);
        return NULL;
    }
    PyObject *ret = NULL;
    if (b.len < a.len || out.len < a.len) {
        PyErr_Format(PyExc_ValueError, "xor of %zd bytes needs b and out that long (b %zd, out %zd)", a.len,
                     b.len, out.len);
    } else {
        const uint8_t *pa = (const uint8_t *)a.buf, *pb = (const uint8_t *)b.buf;
        uint8_t *po = (uint8_t *)out.buf;
        Py_ssize_t n = a.len;
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t i = 0; i < n; i++) po[i] = pa[i] ^ pb[i];
        Py_END_ALLOW_THREADS
        ret = Py_None;
        Py_INCREF(ret);
    }
    PyBuffer_Release(&out);
    PyBuffer_Release(&b);
    PyBuffer_Release(&a);
    return ret;
}

static PyMethodDef methods[] = {
    {"xor", py_xor, METH_VARARGS, xor_doc},
    {"split", py_split, METH_VARARGS, split_doc},
    {"join", py_join, METH_VARARGS, join_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "mstore._planes", "Byte-plane kernels (optional; numpy fallbacks in mstore.codecs).",
    -1, methods,
};

/* What the kernels can do; mstore.codecs uses an extension built from an older source (no
 * fused XOR in split) as if none were built, rather than fail every delta. */
#define KERNELS_VERSION 2

PyMODINIT_FUNC PyInit__planes(void) {
    PyObject *m = PyModule_Create(&module);
    if (m && PyModule_AddIntConstant(m, "VERSION", KERNELS_VERSION) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
