/* The native ring core (SPEC §4): atomic ring counters, record-header validation, record
 * writing and eventfd wake-ups over a session segment, for the daemon and the Python client.
 *
 * Why C: CPython has no memory fence and no acquire/release access, so a Python ring is only
 * correct by x86-64's store order (SPEC §4.6); and the per-record work (header checks, the
 * out-of-order release list, wake-ups) is a large share of a small request when done in
 * Python. Everything here is bounds-checked against the segment: a rogue client can corrupt its
 * own ring, never make this code read or write outside the mapping.
 *
 * Objects:
 *   Shm(buffer)                  one writable mapping; atomics, copies, wake-ups at offsets
 *   Consumer(shm, ctl, ring, cap, kind)   reads and releases records (SPEC §4.3, §4.7)
 *   Producer(shm, ctl, ring, cap)         reserves, fills and publishes records
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <limits.h>
#include <poll.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define HDR 24
#define KIND_PAD 0
#define CTL_TAIL 0
#define CTL_PRODUCER_WAITING 8
#define CTL_HEAD 64
#define CTL_CONSUMER_WAITING 72
#define COPY_WITHOUT_GIL (64 * 1024)

static PyObject *CorruptError; /* the producer broke SPEC §4.2/§4.8 */

/* -- Shm ---------------------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    Py_buffer view;
    char *base; /* NULL once closed */
    Py_ssize_t size;
} Shm;

static int shm_live(Shm *s) {
    if (s->base == NULL) {
        PyErr_SetString(PyExc_ValueError, "the shared-memory view is closed");
        return 0;
    }
    return 1;
}

/* Whether [off, off+n) lies inside the mapping; n may be 0. */
static int shm_range(Shm *s, long long off, long long n) {
    if (!shm_live(s)) return 0;
    if (off < 0 || n < 0 || off > s->size || n > s->size - off) {
        PyErr_Format(PyExc_ValueError, "range [%lld, %lld) lies outside the %zd-byte segment",
                     off, off + n, s->size);
        return 0;
    }
    return 1;
}

static inline _Atomic uint64_t *a64(Shm *s, long long off) { return (_Atomic uint64_t *)(s->base + off); }
static inline _Atomic uint32_t *a32(Shm *s, long long off) { return (_Atomic uint32_t *)(s->base + off); }

static int shm_word(Shm *s, long long off, int width) {
    if (!shm_range(s, off, width)) return 0;
    if (off % width) {
        PyErr_Format(PyExc_ValueError, "offset %lld is not %d-byte aligned", off, width);
        return 0;
    }
    return 1;
}

static int Shm_init(Shm *self, PyObject *args, PyObject *kw) {
    PyObject *obj;
    if (!PyArg_ParseTuple(args, "O", &obj)) return -1;
    if (self->base != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Shm is already initialised");
        return -1;
    }
    if (PyObject_GetBuffer(obj, &self->view, PyBUF_WRITABLE | PyBUF_SIMPLE) < 0) return -1;
    if (((uintptr_t)self->view.buf) % 64) {
        PyBuffer_Release(&self->view);
        PyErr_SetString(PyExc_ValueError, "the mapping must be 64-byte aligned");
        return -1;
    }
    self->base = self->view.buf;
    self->size = self->view.len;
    return 0;
}

static void shm_release(Shm *self) {
    if (self->base != NULL) {
        self->base = NULL;
        PyBuffer_Release(&self->view);
    }
}

static void Shm_dealloc(Shm *self) {
    shm_release(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Shm_close(Shm *self, PyObject *unused) {
    shm_release(self);
    Py_RETURN_NONE;
}

static PyObject *Shm_load64(Shm *self, PyObject *arg) {
    long long off = PyLong_AsLongLong(arg);
    if (off == -1 && PyErr_Occurred()) return NULL;
    if (!shm_word(self, off, 8)) return NULL;
    return PyLong_FromUnsignedLongLong(atomic_load_explicit(a64(self, off), memory_order_acquire));
}

static PyObject *Shm_store64(Shm *self, PyObject *args) {
    long long off;
    unsigned long long v;
    if (!PyArg_ParseTuple(args, "LK", &off, &v)) return NULL;
    if (!shm_word(self, off, 8)) return NULL;
    atomic_store_explicit(a64(self, off), v, memory_order_release);
    Py_RETURN_NONE;
}

static PyObject *Shm_load32(Shm *self, PyObject *arg) {
    long long off = PyLong_AsLongLong(arg);
    if (off == -1 && PyErr_Occurred()) return NULL;
    if (!shm_word(self, off, 4)) return NULL;
    return PyLong_FromUnsignedLong(atomic_load_explicit(a32(self, off), memory_order_acquire));
}

static PyObject *Shm_store32(Shm *self, PyObject *args) {
    long long off;
    unsigned int v;
    if (!PyArg_ParseTuple(args, "LI", &off, &v)) return NULL;
    if (!shm_word(self, off, 4)) return NULL;
    atomic_store_explicit(a32(self, off), v, memory_order_release);
    atomic_thread_fence(memory_order_seq_cst); /* a flag store is always followed by a re-check */
    Py_RETURN_NONE;
}

static void post(int efd) {
    uint64_t one = 1;
    /* EAGAIN: the counter is saturated, the waiter has wake-ups pending already. EBADF after
     * a close races with teardown and is harmless too: a wake-up is only a hint. */
    ssize_t r;
    do {
        r = write(efd, &one, sizeof one);
    } while (r < 0 && errno == EINTR);
}

/* notify(flag_off, efd) -> bool: the poster's side of SPEC §4.5. */
static PyObject *Shm_notify(Shm *self, PyObject *args) {
    long long flag;
    int efd;
    if (!PyArg_ParseTuple(args, "Li", &flag, &efd)) return NULL;
    if (!shm_word(self, flag, 4)) return NULL;
    atomic_thread_fence(memory_order_seq_cst);
    if (atomic_load_explicit(a32(self, flag), memory_order_relaxed)) {
        /* The write wakes a sleeping peer, which can take microseconds: let other threads
         * run meanwhile. */
        Py_BEGIN_ALLOW_THREADS
        post(efd);
        Py_END_ALLOW_THREADS
        Py_RETURN_TRUE;
    }
    Py_RETURN_FALSE;
}

static PyObject *Shm_post(Shm *self, PyObject *arg) {
    /* PyLong_AsLong + a range check: _PyLong_AsInt is private and gone in CPython 3.13. */
    long v = PyLong_AsLong(arg);
    if (v == -1 && PyErr_Occurred()) return NULL;
    if (v < 0 || v > INT_MAX) {
        PyErr_Format(PyExc_ValueError, "%ld is not a file descriptor", v);
        return NULL;
    }
    post((int)v);
    Py_RETURN_NONE;
}

static void drain(int efd) {
    uint64_t v;
    ssize_t r;
    do {
        r = read(efd, &v, sizeof v);
    } while (r < 0 && errno == EINTR);
}

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* wait(counter_off, seen, flag_off, efd, spin_ns, timeout_ns) -> bool
 * The waiter's side of SPEC §4.5, without the GIL: True once the u64 at counter_off differs
 * from `seen`, False when timeout_ns (< 0: none) passes first. */
static PyObject *Shm_wait(Shm *self, PyObject *args) {
    long long counter, flag, spin_ns, timeout_ns;
    unsigned long long seen;
    int efd;
    if (!PyArg_ParseTuple(args, "LKLiLL", &counter, &seen, &flag, &efd, &spin_ns, &timeout_ns))
        return NULL;
    if (!shm_word(self, counter, 8) || !shm_word(self, flag, 4)) return NULL;
    _Atomic uint64_t *c = a64(self, counter);
    _Atomic uint32_t *f = a32(self, flag);
    int moved = 0;
    Py_BEGIN_ALLOW_THREADS
    int64_t start = now_ns();
    int64_t end = timeout_ns < 0 ? INT64_MAX : start + timeout_ns;
    while (!(moved = atomic_load_explicit(c, memory_order_acquire) != seen)) {
        int64_t t = now_ns();
        if (t - start >= spin_ns || t >= end) break;
        sched_yield(); /* the peer may need this very core on a small machine */
    }
    while (!moved) {
        atomic_store_explicit(f, 1, memory_order_relaxed);
        atomic_thread_fence(memory_order_seq_cst);
        if ((moved = atomic_load_explicit(c, memory_order_acquire) != seen)) break;
        int64_t left = end - now_ns();
        if (left <= 0) break;
        struct pollfd p = {.fd = efd, .events = POLLIN};
        int ms = left > 50000000LL ? 50 : (int)((left + 999999) / 1000000);
        if (poll(&p, 1, ms) > 0) drain(efd);
        atomic_store_explicit(f, 0, memory_order_relaxed);
        moved = atomic_load_explicit(c, memory_order_acquire) != seen;
    }
    atomic_store_explicit(f, 0, memory_order_relaxed);
    Py_END_ALLOW_THREADS
    return PyBool_FromLong(moved);
}

/* copy_in(off, src): copy a buffer into the segment; without the GIL when it is large. */
static PyObject *Shm_copy_in(Shm *self, PyObject *args) {
    long long off;
    Py_buffer src;
    if (!PyArg_ParseTuple(args, "Ly*", &off, &src)) return NULL;
    if (!shm_range(self, off, src.len)) {
        PyBuffer_Release(&src);
        return NULL;
    }
    if (src.len >= COPY_WITHOUT_GIL) {
        Py_BEGIN_ALLOW_THREADS
        memcpy(self->base + off, src.buf, src.len);
        Py_END_ALLOW_THREADS
    } else {
        memcpy(self->base + off, src.buf, src.len);
    }
    PyBuffer_Release(&src);
    Py_RETURN_NONE;
}

/* copy_out(off, n) -> bytes */
static PyObject *Shm_copy_out(Shm *self, PyObject *args) {
    long long off, n;
    if (!PyArg_ParseTuple(args, "LL", &off, &n)) return NULL;
    if (!shm_range(self, off, n)) return NULL;
    return PyBytes_FromStringAndSize(self->base + off, n);
}

static void put_header(char *p, uint32_t len, uint32_t kind, uint64_t rid, uint32_t dlen) {
    memcpy(p, &len, 4);
    memcpy(p + 4, &kind, 4);
    memcpy(p + 8, &rid, 8);
    memcpy(p + 16, &dlen, 4);
    memset(p + 20, 0, 4);
}

/* write_record(off, kind, request_id, record_len, descriptor): header + descriptor bytes. */
static PyObject *Shm_write_record(Shm *self, PyObject *args) {
    long long off, len;
    unsigned int kind;
    unsigned long long rid;
    Py_buffer desc;
    if (!PyArg_ParseTuple(args, "LIKLy*", &off, &kind, &rid, &len, &desc)) return NULL;
    if (len < HDR + desc.len || len > UINT32_MAX || !shm_range(self, off, len)) {
        if (!PyErr_Occurred())
            PyErr_Format(PyExc_ValueError, "a %lld-byte record cannot hold a %zd-byte descriptor",
                         len, desc.len);
        PyBuffer_Release(&desc);
        return NULL;
    }
    put_header(self->base + off, (uint32_t)len, kind, rid, (uint32_t)desc.len);
    memcpy(self->base + off + HDR, desc.buf, desc.len);
    PyBuffer_Release(&desc);
    Py_RETURN_NONE;
}

/* read_header(off) -> (record_len, kind, request_id, desc_len); no validation. */
static PyObject *Shm_read_header(Shm *self, PyObject *arg) {
    long long off = PyLong_AsLongLong(arg);
    if (off == -1 && PyErr_Occurred()) return NULL;
    if (!shm_range(self, off, HDR)) return NULL;
    uint32_t len, kind, dlen;
    uint64_t rid;
    const char *p = self->base + off;
    memcpy(&len, p, 4);
    memcpy(&kind, p + 4, 4);
    memcpy(&rid, p + 8, 8);
    memcpy(&dlen, p + 16, 4);
    return Py_BuildValue("(IIKI)", len, kind, (unsigned long long)rid, dlen);
}

static PyObject *Shm_fence(Shm *self, PyObject *unused) {
    atomic_thread_fence(memory_order_seq_cst);
    Py_RETURN_NONE;
}

static PyObject *Shm_get_closed(Shm *self, void *c) { return PyBool_FromLong(self->base == NULL); }
static PyObject *Shm_get_size(Shm *self, void *c) { return PyLong_FromSsize_t(self->size); }

static PyMethodDef Shm_methods[] = {
    {"close", (PyCFunction)Shm_close, METH_NOARGS, "Release the mapping (idempotent)."},
    {"load64", (PyCFunction)Shm_load64, METH_O, "Acquire-load a u64."},
    {"store64", (PyCFunction)Shm_store64, METH_VARARGS, "Release-store a u64."},
    {"load32", (PyCFunction)Shm_load32, METH_O, "Acquire-load a u32."},
    {"store32", (PyCFunction)Shm_store32, METH_VARARGS, "Store a u32, then a full fence."},
    {"notify", (PyCFunction)Shm_notify, METH_VARARGS, "Fence, then post efd if the flag is set."},
    {"post", (PyCFunction)Shm_post, METH_O, "Post an eventfd unconditionally."},
    {"wait", (PyCFunction)Shm_wait, METH_VARARGS, "Spin-then-block until a counter moves."},
    {"copy_in", (PyCFunction)Shm_copy_in, METH_VARARGS, "Copy a buffer into the segment."},
    {"copy_out", (PyCFunction)Shm_copy_out, METH_VARARGS, "Bytes out of the segment."},
    {"write_record", (PyCFunction)Shm_write_record, METH_VARARGS, "Header and descriptor."},
    {"read_header", (PyCFunction)Shm_read_header, METH_O, "A record header's four fields."},
    {"fence", (PyCFunction)Shm_fence, METH_NOARGS, "A full memory barrier."},
    {NULL},
};

static PyGetSetDef Shm_getset[] = {
    {"closed", (getter)Shm_get_closed, NULL, NULL, NULL},
    {"size", (getter)Shm_get_size, NULL, NULL, NULL},
    {NULL},
};

static PyTypeObject ShmType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "tensord.transport._ring.Shm",
    .tp_basicsize = sizeof(Shm),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Shm_init,
    .tp_dealloc = (destructor)Shm_dealloc,
    .tp_methods = Shm_methods,
    .tp_getset = Shm_getset,
    .tp_doc = "A writable shared mapping with atomic accessors at byte offsets.",
};

/* -- ring geometry shared by Consumer and Producer ------------------------------------------ */

typedef struct {
    Shm *shm;
    long long ctl, ring;
    uint64_t cap;
} Geometry;

static int geometry(Geometry *g, PyObject *shm, long long ctl, long long ring,
                    unsigned long long cap) {
    if (!PyObject_TypeCheck(shm, &ShmType)) {
        PyErr_SetString(PyExc_TypeError, "expected a Shm");
        return 0;
    }
    Shm *s = (Shm *)shm;
    if (cap < 64 || (cap & (cap - 1)) || !shm_range(s, ring, (long long)cap) ||
        !shm_word(s, ctl, 8) || !shm_range(s, ctl, 128)) {
        if (!PyErr_Occurred())
            PyErr_Format(PyExc_ValueError, "ring capacity %llu is not a power of two >= 64", cap);
        return 0;
    }
    Py_INCREF(shm);
    g->shm = s;
    g->ctl = ctl;
    g->ring = ring;
    g->cap = cap;
    return 1;
}

/* -- Consumer ------------------------------------------------------------------------------ */

typedef struct {
    uint64_t pos;
    uint32_t len;
    uint32_t released;
} Held;

typedef struct {
    PyObject_HEAD
    Geometry g;
    uint32_t kind;
    uint64_t read, head, tail_seen;
    Held *held; /* a circular deque of records read and not yet past head */
    size_t first, count, space;
} Consumer;

static int Consumer_init(Consumer *self, PyObject *args, PyObject *kw) {
    PyObject *shm;
    long long ctl, ring;
    unsigned long long cap;
    unsigned int kind;
    if (!PyArg_ParseTuple(args, "OLLKI", &shm, &ctl, &ring, &cap, &kind)) return -1;
    if (self->g.shm != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Consumer is already initialised");
        return -1;
    }
    if (!geometry(&self->g, shm, ctl, ring, cap)) return -1;
    self->kind = kind;
    self->read = self->head = self->tail_seen =
        atomic_load_explicit(a64(self->g.shm, ctl + CTL_HEAD), memory_order_acquire);
    return 0;
}

static void Consumer_dealloc(Consumer *self) {
    Py_XDECREF(self->g.shm);
    PyMem_Free(self->held);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int held_push(Consumer *c, uint64_t pos, uint32_t len, uint32_t released) {
    if (c->count == c->space) {
        size_t n = c->space ? c->space * 2 : 64;
        Held *h = PyMem_Malloc(n * sizeof(Held));
        if (h == NULL) {
            PyErr_NoMemory();
            return 0;
        }
        for (size_t i = 0; i < c->count; i++) h[i] = c->held[(c->first + i) % c->space];
        PyMem_Free(c->held);
        c->held = h;
        c->first = 0;
        c->space = n;
    }
    c->held[(c->first + c->count) % c->space] = (Held){pos, len, released};
    c->count++;
    return 1;
}

/* Move head over the longest released prefix; returns whether it moved. */
static int advance(Consumer *c) {
    int moved = 0;
    while (c->count && c->held[c->first].released) {
        Held h = c->held[c->first];
        c->head = h.pos + h.len;
        c->first = (c->first + 1) % c->space;
        c->count--;
        moved = 1;
    }
    if (moved) atomic_store_explicit(a64(c->g.shm, c->g.ctl + CTL_HEAD), c->head, memory_order_release);
    return moved;
}

/* poll(limit) -> list of (position, offset, request_id, desc_len, record_len)
 * At most `limit` records per call, PADs included, so one pass over a session is bounded
 * whatever its records are. Raises CorruptError when the producer broke SPEC §4.2/§4.8. */
static PyObject *Consumer_poll(Consumer *self, PyObject *arg) {
    long limit = PyLong_AsLong(arg);
    if (limit == -1 && PyErr_Occurred()) return NULL;
    Shm *s = self->g.shm;
    if (!shm_live(s)) return NULL;
    uint64_t cap = self->g.cap;
    uint64_t tail = atomic_load_explicit(a64(s, self->g.ctl + CTL_TAIL), memory_order_acquire);
    if (tail < self->tail_seen || tail > self->head + cap || tail % 64) {
        PyErr_Format(CorruptError, "ring tail %llu is impossible (seen up to %llu, head %llu, "
                     "capacity %llu)", (unsigned long long)tail,
                     (unsigned long long)self->tail_seen, (unsigned long long)self->head,
                     (unsigned long long)cap);
        return NULL;
    }
    self->tail_seen = tail;
    PyObject *out = PyList_New(0);
    if (out == NULL) return NULL;
    long taken = 0;
    while (self->read < tail && taken < limit) {
        uint64_t idx = self->read & (cap - 1);
        const char *p = s->base + self->g.ring + idx;
        uint32_t n, kind, dlen;
        uint64_t rid;
        memcpy(&n, p, 4);
        memcpy(&kind, p + 4, 4);
        memcpy(&rid, p + 8, 8);
        memcpy(&dlen, p + 16, 4);
        if (n < 64 || n % 64 || self->read + n > tail || idx + n > cap) {
            PyErr_Format(CorruptError, "record at ring position %llu has length %u (published "
                         "up to %llu, capacity %llu)", (unsigned long long)self->read, n,
                         (unsigned long long)tail, (unsigned long long)cap);
            goto fail;
        }
        if (kind == KIND_PAD) {
            if (!held_push(self, self->read, n, 1)) goto fail;
        } else if (kind == self->kind) {
            if (dlen > n - HDR) {
                PyErr_Format(CorruptError, "record %llu: descriptor length %u exceeds its record "
                             "length %u", (unsigned long long)rid, dlen, n);
                goto fail;
            }
            PyObject *t = Py_BuildValue("(KLKII)", (unsigned long long)self->read,
                                        (long long)(self->g.ring + idx), (unsigned long long)rid,
                                        dlen, n);
            if (t == NULL || PyList_Append(out, t) < 0) {
                Py_XDECREF(t);
                goto fail;
            }
            Py_DECREF(t);
            if (!held_push(self, self->read, n, 0)) goto fail;
        } else {
            PyErr_Format(CorruptError, "record at ring position %llu has kind %u",
                         (unsigned long long)self->read, kind);
            goto fail;
        }
        self->read += n;
        taken++;
    }
    advance(self);
    return out;
fail:
    Py_DECREF(out);
    return NULL;
}

/* release(position) -> bool: mark a record done; True when head moved. */
static PyObject *Consumer_release(Consumer *self, PyObject *arg) {
    unsigned long long pos = PyLong_AsUnsignedLongLong(arg);
    if (pos == (unsigned long long)-1 && PyErr_Occurred()) return NULL;
    if (!shm_live(self->g.shm)) return NULL;
    for (size_t i = 0; i < self->count; i++) {
        Held *h = &self->held[(self->first + i) % self->space];
        if (h->pos == pos) {
            h->released = 1;
            return PyBool_FromLong(advance(self));
        }
    }
    PyErr_Format(PyExc_KeyError, "record at %llu is not held", pos);
    return NULL;
}

static PyObject *Consumer_published(Consumer *self, PyObject *unused) {
    if (!shm_live(self->g.shm)) return NULL;
    uint64_t tail = atomic_load_explicit(a64(self->g.shm, self->g.ctl + CTL_TAIL), memory_order_acquire);
    return PyBool_FromLong(tail != self->read);
}

static PyObject *Consumer_get_read(Consumer *self, void *c) { return PyLong_FromUnsignedLongLong(self->read); }
static PyObject *Consumer_get_head(Consumer *self, void *c) { return PyLong_FromUnsignedLongLong(self->head); }
static PyObject *Consumer_get_held(Consumer *self, void *c) { return PyLong_FromSize_t(self->count); }
static PyObject *Consumer_get_capacity(Consumer *self, void *c) { return PyLong_FromUnsignedLongLong(self->g.cap); }

static PyMethodDef Consumer_methods[] = {
    {"poll", (PyCFunction)Consumer_poll, METH_O, "Validated records published since the last poll."},
    {"release", (PyCFunction)Consumer_release, METH_O, "Mark a record done."},
    {"published", (PyCFunction)Consumer_published, METH_NOARGS, "Whether unread records exist."},
    {NULL},
};

static PyGetSetDef Consumer_getset[] = {
    {"read", (getter)Consumer_get_read, NULL, NULL, NULL},
    {"head", (getter)Consumer_get_head, NULL, NULL, NULL},
    {"held", (getter)Consumer_get_held, NULL, NULL, NULL},
    {"capacity", (getter)Consumer_get_capacity, NULL, NULL, NULL},
    {NULL},
};

static PyTypeObject ConsumerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "tensord.transport._ring.Consumer",
    .tp_basicsize = sizeof(Consumer),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Consumer_init,
    .tp_dealloc = (destructor)Consumer_dealloc,
    .tp_methods = Consumer_methods,
    .tp_getset = Consumer_getset,
    .tp_doc = "The consumer of one ring: validated reads, out-of-order release.",
};

/* -- Producer ------------------------------------------------------------------------------ */

typedef struct {
    PyObject_HEAD
    Geometry g;
    uint64_t tail; /* reserved up to; published by publish() */
} Producer;

static int Producer_init(Producer *self, PyObject *args, PyObject *kw) {
    PyObject *shm;
    long long ctl, ring;
    unsigned long long cap;
    if (!PyArg_ParseTuple(args, "OLLK", &shm, &ctl, &ring, &cap)) return -1;
    if (self->g.shm != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Producer is already initialised");
        return -1;
    }
    if (!geometry(&self->g, shm, ctl, ring, cap)) return -1;
    self->tail = atomic_load_explicit(a64(self->g.shm, ctl + CTL_TAIL), memory_order_acquire);
    return 0;
}

static void Producer_dealloc(Producer *self) {
    Py_XDECREF(self->g.shm);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* Bytes `record_len` needs from the current tail (a PAD first when it would cross the end). */
static uint64_t need(Producer *p, uint64_t record_len) {
    uint64_t rest = p->g.cap - (p->tail & (p->g.cap - 1));
    return record_len <= rest ? record_len : rest + record_len;
}

static int fits(Producer *p, uint64_t record_len) {
    uint64_t head = atomic_load_explicit(a64(p->g.shm, p->g.ctl + CTL_HEAD), memory_order_acquire);
    /* A consumer that moved head past our tail is corrupt; treat it as no space. */
    if (head > p->tail) return 0;
    return p->tail + need(p, record_len) - head <= p->g.cap;
}

static int check_len(Producer *p, unsigned long long n) {
    if (n < 64 || n % 64 || n > p->g.cap) {
        PyErr_Format(PyExc_ValueError, "record length %llu is not a multiple of 64 in 64..%llu",
                     n, (unsigned long long)p->g.cap);
        return 0;
    }
    return 1;
}

/* reserve(record_len) -> segment offset of the record, or -1 while there is no space. */
static PyObject *Producer_reserve(Producer *self, PyObject *arg) {
    unsigned long long n = PyLong_AsUnsignedLongLong(arg);
    if (n == (unsigned long long)-1 && PyErr_Occurred()) return NULL;
    if (!shm_live(self->g.shm) || !check_len(self, n)) return NULL;
    if (!fits(self, n)) return PyLong_FromLong(-1);
    uint64_t cap = self->g.cap;
    uint64_t idx = self->tail & (cap - 1);
    uint64_t rest = cap - idx;
    if (n > rest) {
        put_header(self->g.shm->base + self->g.ring + idx, (uint32_t)rest, KIND_PAD, 0, 0);
        self->tail += rest;
        idx = 0;
    }
    self->tail += n;
    return PyLong_FromLongLong(self->g.ring + (long long)idx);
}

static PyObject *Producer_fits(Producer *self, PyObject *arg) {
    unsigned long long n = PyLong_AsUnsignedLongLong(arg);
    if (n == (unsigned long long)-1 && PyErr_Occurred()) return NULL;
    if (!shm_live(self->g.shm) || !check_len(self, n)) return NULL;
    return PyBool_FromLong(fits(self, n));
}

static PyObject *Producer_publish(Producer *self, PyObject *unused) {
    if (!shm_live(self->g.shm)) return NULL;
    atomic_store_explicit(a64(self->g.shm, self->g.ctl + CTL_TAIL), self->tail, memory_order_release);
    Py_RETURN_NONE;
}

static PyObject *Producer_get_tail(Producer *self, void *c) { return PyLong_FromUnsignedLongLong(self->tail); }
static PyObject *Producer_get_capacity(Producer *self, void *c) { return PyLong_FromUnsignedLongLong(self->g.cap); }

static PyObject *Producer_get_head(Producer *self, void *c) {
    if (!shm_live(self->g.shm)) return NULL;
    return PyLong_FromUnsignedLongLong(
        atomic_load_explicit(a64(self->g.shm, self->g.ctl + CTL_HEAD), memory_order_acquire));
}

static PyMethodDef Producer_methods[] = {
    {"reserve", (PyCFunction)Producer_reserve, METH_O, "Claim space for a record."},
    {"fits", (PyCFunction)Producer_fits, METH_O, "Whether reserve would succeed now."},
    {"publish", (PyCFunction)Producer_publish, METH_NOARGS, "Release-store tail."},
    {NULL},
};

static PyGetSetDef Producer_getset[] = {
    {"tail", (getter)Producer_get_tail, NULL, NULL, NULL},
    {"head", (getter)Producer_get_head, NULL, NULL, NULL},
    {"capacity", (getter)Producer_get_capacity, NULL, NULL, NULL},
    {NULL},
};

static PyTypeObject ProducerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "tensord.transport._ring.Producer",
    .tp_basicsize = sizeof(Producer),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Producer_init,
    .tp_dealloc = (destructor)Producer_dealloc,
    .tp_methods = Producer_methods,
    .tp_getset = Producer_getset,
    .tp_doc = "The producer of one ring: reserve, fill, publish.",
};

/* -- module -------------------------------------------------------------------------------- */

/* spin_any(consumers, spin_ns) -> index of the first consumer with unread records, or -1
 * after spin_ns. Polls without the GIL, so a spinning dispatcher never holds up the threads
 * that run models. The caller keeps every consumer's mapping alive for the call. */
static PyObject *spin_any(PyObject *mod, PyObject *args) {
    PyObject *seq;
    long long spin_ns;
    if (!PyArg_ParseTuple(args, "O!L", &PyTuple_Type, &seq, &spin_ns)) return NULL;
    Py_ssize_t n = PyTuple_GET_SIZE(seq);
    if (n == 0) return PyLong_FromLong(-1);
    _Atomic uint64_t **tails = PyMem_Malloc(n * sizeof *tails);
    uint64_t *reads = PyMem_Malloc(n * sizeof *reads);
    if (tails == NULL || reads == NULL) {
        PyMem_Free(tails);
        PyMem_Free(reads);
        return PyErr_NoMemory();
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *o = PyTuple_GET_ITEM(seq, i);
        if (!PyObject_TypeCheck(o, &ConsumerType) || !shm_live(((Consumer *)o)->g.shm)) {
            if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "expected Consumers");
            PyMem_Free(tails);
            PyMem_Free(reads);
            return NULL;
        }
        Consumer *c = (Consumer *)o;
        tails[i] = a64(c->g.shm, c->g.ctl + CTL_TAIL);
        reads[i] = c->read;
    }
    long found = -1;
    Py_BEGIN_ALLOW_THREADS
    int64_t end = now_ns() + spin_ns;
    for (unsigned k = 0; found < 0; k++) {
        for (Py_ssize_t i = 0; i < n; i++) {
            if (atomic_load_explicit(tails[i], memory_order_acquire) != reads[i]) {
                found = (long)i;
                break;
            }
        }
        if (found >= 0 || ((k & 15) == 15 && now_ns() >= end)) break;
        if ((k & 15) == 15) sched_yield();
    }
    Py_END_ALLOW_THREADS
    PyMem_Free(tails);
    PyMem_Free(reads);
    return PyLong_FromLong(found);
}

static PyMethodDef module_methods[] = {
    {"spin_any", spin_any, METH_VARARGS, "Spin until a consumer has unread records."},
    {NULL},
};

static struct PyModuleDef ringmodule = {
    PyModuleDef_HEAD_INIT, "tensord.transport._ring",
    "Native ring core: atomics, record validation and eventfd wake-ups (SPEC section 4).", -1,
    module_methods,
};

PyMODINIT_FUNC PyInit__ring(void) {
    if (PyType_Ready(&ShmType) < 0 || PyType_Ready(&ConsumerType) < 0 ||
        PyType_Ready(&ProducerType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&ringmodule);
    if (m == NULL) return NULL;
    CorruptError = PyErr_NewException("tensord.transport._ring.CorruptError", PyExc_ValueError, NULL);
    if (PyModule_AddObjectRef(m, "CorruptError", CorruptError) < 0 ||
        PyModule_AddObjectRef(m, "Shm", (PyObject *)&ShmType) < 0 ||
        PyModule_AddObjectRef(m, "Consumer", (PyObject *)&ConsumerType) < 0 ||
        PyModule_AddObjectRef(m, "Producer", (PyObject *)&ProducerType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
