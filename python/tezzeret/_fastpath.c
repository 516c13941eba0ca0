/*
 * The kernel-run hot path of the tezzeret package, compiled into the wheel
 * beside libtezzeret: describes CPU torch tensors as DLPack views, calls
 * tezzeret_kernel_run_dlpack with the GIL released, and hands the result
 * to torch as a "dltensor" capsule — what kernel.py does with ctypes, at a
 * fraction of the interpreter's cost per call. It links against neither
 * libtezzeret nor libtorch: the package passes it the C function and
 * torch's from_dlpack at import. Anything it does not take (a CUDA tensor,
 * an unknown dtype, too many inputs or dimensions, a non-tensor) returns
 * None, and kernel.py runs the ctypes path, which handles or names it.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

#define MAX_INPUTS 4
#define MAX_RANK 8

typedef struct {
    int32_t device_type;
    int32_t device_id;
} DLDevice;

typedef struct {
    uint8_t code;
    uint8_t bits;
    uint16_t lanes;
} DLDataType;

typedef struct {
    void *data;
    DLDevice device;
    int32_t ndim;
    DLDataType dtype;
    int64_t *shape;
    int64_t *strides;
    uint64_t byte_offset;
} DLTensor;

typedef struct DLManagedTensor {
    DLTensor dl_tensor;
    void *manager_ctx;
    void (*deleter)(struct DLManagedTensor *self);
} DLManagedTensor;

/* A "dltensor" capsule nobody consumed (torch renames what it takes to
 * "used_dltensor") still owns its tensor: give it back to the library. */
static void free_unconsumed(PyObject *capsule) {
    if (PyCapsule_IsValid(capsule, "dltensor")) {
        DLManagedTensor *managed = PyCapsule_GetPointer(capsule, "dltensor");
        if (managed != NULL && managed->deleter != NULL) managed->deleter(managed);
    }
}

/* tezzeret_kernel_run_dlpack(kernel, inputs, count, &managed) -> status (NULL = ok) */
typedef void *(*run_dlpack_fn)(void *kernel, const DLTensor *inputs, size_t count, void **managed);

static run_dlpack_fn run_dlpack;
static PyObject *from_dlpack;  /* torch.utils.dlpack.from_dlpack */
static PyObject *dtype_codes;  /* {torch.dtype: (DLPack code, bits)} */
static PyTypeObject *tensor_type; /* torch.Tensor: nothing else is described */
static PyObject *s_dtype, *s_is_cpu, *s_shape, *s_stride, *s_data_ptr;

/* setup(run_dlpack_address, from_dlpack, {dtype: (code, bits)}, torch.Tensor) */
static PyObject *setup(PyObject *self, PyObject *args) {
    PyObject *address, *convert, *codes, *type;
    (void)self;
    if (!PyArg_ParseTuple(args, "OOO!O!", &address, &convert, &PyDict_Type, &codes, &PyType_Type, &type)) {
        return NULL;
    }
    void *fn = PyLong_AsVoidPtr(address);
    if (fn == NULL) {
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_ValueError, "tezzeret_kernel_run_dlpack's address is NULL");
        }
        return NULL;
    }
    run_dlpack = (run_dlpack_fn)fn;
    Py_INCREF(convert);
    Py_INCREF(codes);
    Py_INCREF(type);
    Py_XDECREF(from_dlpack);
    Py_XDECREF(dtype_codes);
    Py_XDECREF((PyObject *)tensor_type);
    from_dlpack = convert;
    dtype_codes = codes;
    tensor_type = (PyTypeObject *)type;
    Py_RETURN_NONE;
}

/* Reads a tuple of ints (a torch.Size or a stride tuple) into out; -1 on failure. */
static int read_ints(PyObject *sequence, int64_t *out, Py_ssize_t rank) {
    if (!PyTuple_Check(sequence) || PyTuple_GET_SIZE(sequence) != rank) {
        return -1;
    }
    for (Py_ssize_t d = 0; d < rank; d++) {
        long long value = PyLong_AsLongLong(PyTuple_GET_ITEM(sequence, d));
        if (value == -1 && PyErr_Occurred()) {
            PyErr_Clear();
            return -1;
        }
        out[d] = value;
    }
    return 0;
}

/* Describes one tensor; 0 when described, 1 when it is not taken here. */
static int describe(PyObject *tensor, DLTensor *view, int64_t *shape, int64_t *strides) {
    int taken = 1;
    PyObject *dtype = NULL, *code = NULL, *cpu = NULL, *size = NULL, *stride = NULL, *pointer = NULL;
    /* Only plain torch.Tensor objects (no subclass, which could override
     * what is read): data_ptr() is trusted as memory to read. Sparse and
     * other storage-less layouts fail data_ptr() and fall back. */
    if (Py_TYPE(tensor) != tensor_type) goto done;
    dtype = PyObject_GetAttr(tensor, s_dtype);
    if (dtype == NULL) goto done;
    code = PyDict_GetItemWithError(dtype_codes, dtype); /* borrowed: read at once */
    if (code == NULL || !PyTuple_Check(code) || PyTuple_GET_SIZE(code) != 2) goto done;
    long type_code = PyLong_AsLong(PyTuple_GET_ITEM(code, 0));
    long type_bits = PyLong_AsLong(PyTuple_GET_ITEM(code, 1));
    if (PyErr_Occurred()) goto done;
    cpu = PyObject_GetAttr(tensor, s_is_cpu);
    if (cpu != Py_True) goto done;
    size = PyObject_GetAttr(tensor, s_shape);
    if (size == NULL || !PyTuple_Check(size)) goto done;
    Py_ssize_t rank = PyTuple_GET_SIZE(size);
    if (rank > MAX_RANK) goto done;
    stride = PyObject_CallMethodNoArgs(tensor, s_stride);
    pointer = PyObject_CallMethodNoArgs(tensor, s_data_ptr);
    if (stride == NULL || pointer == NULL) goto done;
    if (read_ints(size, shape, rank) != 0 || read_ints(stride, strides, rank) != 0) goto done;
    void *data = PyLong_AsVoidPtr(pointer);
    if (data == NULL && PyErr_Occurred()) goto done;
    view->data = data;
    view->device.device_type = 1; /* kDLCPU */
    view->device.device_id = 0;
    view->ndim = (int32_t)rank;
    view->dtype.code = (uint8_t)type_code;
    view->dtype.bits = (uint8_t)type_bits;
    view->dtype.lanes = 1;
    view->shape = shape;
    view->strides = strides;
    view->byte_offset = 0;
    taken = 0;
done:
    /* Not taken: the ctypes path decides (and names the problem). */
    PyErr_Clear();
    Py_XDECREF(dtype);
    Py_XDECREF(cpu);
    Py_XDECREF(size);
    Py_XDECREF(stride);
    Py_XDECREF(pointer);
    return taken;
}

/* run(kernel_address, *tensors) -> torch.Tensor | None (not taken) | int (a status to raise) */
static PyObject *run(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (run_dlpack == NULL || from_dlpack == NULL || tensor_type == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "tezzeret._fastpath.setup was not called");
        return NULL;
    }
    if (nargs < 1) {
        PyErr_SetString(PyExc_TypeError, "run(kernel_address, *tensors)");
        return NULL;
    }
    void *kernel = PyLong_AsVoidPtr(args[0]);
    if (kernel == NULL) {
        if (PyErr_Occurred()) return NULL;
        Py_RETURN_NONE;
    }
    Py_ssize_t count = nargs - 1;
    if (count > MAX_INPUTS) Py_RETURN_NONE;
    DLTensor views[MAX_INPUTS];
    int64_t dims[MAX_INPUTS][2][MAX_RANK];
    for (Py_ssize_t i = 0; i < count; i++) {
        if (describe(args[i + 1], &views[i], dims[i][0], dims[i][1]) != 0) Py_RETURN_NONE;
    }
    void *managed = NULL;
    void *status;
    /* The inputs stay referenced by the caller's arguments for the call. */
    Py_BEGIN_ALLOW_THREADS
    status = run_dlpack(kernel, views, (size_t)count, &managed);
    Py_END_ALLOW_THREADS
    if (status != NULL) return PyLong_FromVoidPtr(status);
    PyObject *capsule = PyCapsule_New(managed, "dltensor", free_unconsumed);
    if (capsule == NULL) {
        DLManagedTensor *result = managed;
        if (result->deleter != NULL) result->deleter(result);
        return NULL;
    }
    PyObject *tensor = PyObject_CallOneArg(from_dlpack, capsule);
    Py_DECREF(capsule);
    return tensor;
}

/* adopt(managed_address) -> torch.Tensor: a DLManagedTensor the library
 * handed over, given to torch in a capsule that frees it if unconsumed. */
static PyObject *adopt(PyObject *self, PyObject *address) {
    (void)self;
    if (from_dlpack == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "tezzeret._fastpath.setup was not called");
        return NULL;
    }
    void *managed = PyLong_AsVoidPtr(address);
    if (managed == NULL) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "NULL DLManagedTensor");
        return NULL;
    }
    PyObject *capsule = PyCapsule_New(managed, "dltensor", free_unconsumed);
    if (capsule == NULL) return NULL;
    PyObject *tensor = PyObject_CallOneArg(from_dlpack, capsule);
    Py_DECREF(capsule);
    return tensor;
}

static PyMethodDef methods[] = {
    {"adopt", adopt, METH_O, "adopt(managed_address): the library's DLManagedTensor as a torch.Tensor."},
    {"setup", setup, METH_VARARGS, "setup(run_dlpack_address, from_dlpack, dtype_codes): binds the hot path."},
    {"run", (PyCFunction)(void (*)(void))run, METH_FASTCALL,
     "run(kernel_address, *tensors): the result tensor, None when the inputs are not taken here, or a status address."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_fastpath", "The kernel-run hot path.", -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__fastpath(void) {
    s_dtype = PyUnicode_InternFromString("dtype");
    s_is_cpu = PyUnicode_InternFromString("is_cpu");
    s_shape = PyUnicode_InternFromString("shape");
    s_stride = PyUnicode_InternFromString("stride");
    s_data_ptr = PyUnicode_InternFromString("data_ptr");
    if (!s_dtype || !s_is_cpu || !s_shape || !s_stride || !s_data_ptr) return NULL;
    return PyModule_Create(&module);
}
