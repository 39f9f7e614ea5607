/*
 * relinker._speedups: the linker's per-path and per-blob system calls in C.
 *
 * Optional: relinker.linker holds the same functions in Python and uses them
 * when this module is not built (no compiler at install time) or when
 * RELINKER_PURE_PYTHON is set. Both must behave identically; the tests run
 * the same cases through both.
 *
 * Why C at all: a re-check of a complete archive is one fstatat per path and
 * one per blob (its by-hash file), and CPython's os.stat spends about as long
 * building a stat_result (three timestamps made into floats and nanosecond
 * integers) as the kernel spends on the call; the linker reads two or three
 * fields. Here a path costs the system call and a dict lookup.
 *
 * The GIL is held throughout: relinker's workers are single-threaded
 * processes, and releasing it around every system call would cost more than
 * the call on a warm dentry cache.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <fcntl.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* A plain last component: not empty, not "." or "..", no NUL (the kernel
 * would stop at it and name another file). */
static int
plain_name(const char *name, Py_ssize_t length)
{
    if (length == 0 || memchr(name, '\0', (size_t)length) != NULL)
        return 0;
    if (name[0] == '.' && (length == 1 || (length == 2 && name[1] == '.')))
        return 0;
    return 1;
}

/* The cached descriptor of a path's parent directory, keyed as
 * path.rpartition(b"/")[0] spells it; -1 if not cached (or cached as missing).
 * *name_out points into the path's own buffer, which is NUL-terminated. */
static int
cached_directory(PyObject *directories, PyObject *path, const char **name_out, int *error)
{
    const char *data = PyBytes_AS_STRING(path);
    Py_ssize_t length = PyBytes_GET_SIZE(path);
    const char *slash = memrchr(data, '/', (size_t)length);
    Py_ssize_t parent_length = slash == NULL ? 0 : slash - data;
    const char *name = slash == NULL ? data : slash + 1;

    if (!plain_name(name, length - (name - data)))
        return -1;
    PyObject *key = PyBytes_FromStringAndSize(data, parent_length);
    if (key == NULL) {
        *error = 1;
        return -1;
    }
    PyObject *value = PyDict_GetItemWithError(directories, key); /* borrowed */
    Py_DECREF(key);
    if (value == NULL) {
        if (PyErr_Occurred())
            *error = 1;
        return -1;
    }
    /* Only an exact int: anything else could run Python code (__index__),
     * which might change the list fast_route is walking. */
    if (!PyLong_CheckExact(value))
        return -1;
    long fd = PyLong_AsLong(value);
    if (fd == -1 && PyErr_Occurred()) {
        *error = 1;
        return -1;
    }
    if (fd < 0 || fd > INT_MAX)
        return -1;
    *name_out = name;
    return (int)fd;
}

/* A directory descriptor argument: an int, or None for the working directory. */
static int
optional_fd(PyObject *value, int *fd_out)
{
    if (value == Py_None) {
        *fd_out = AT_FDCWD;
        return 0;
    }
    long fd = PyLong_AsLong(value);
    if (fd == -1 && PyErr_Occurred())
        return -1;
    if (fd < 0 || fd > INT_MAX) {
        PyErr_SetString(PyExc_ValueError, "not a file descriptor");
        return -1;
    }
    *fd_out = (int)fd;
    return 0;
}

/* The NUL-terminated name of a bytes path; NULL (ValueError set) if it has a NUL inside. */
static const char *
path_name(PyObject *path)
{
    const char *name = PyBytes_AS_STRING(path);
    if ((Py_ssize_t)strlen(name) != PyBytes_GET_SIZE(path)) {
        PyErr_SetString(PyExc_ValueError, "embedded null byte");
        return NULL;
    }
    return name;
}

PyDoc_STRVAR(fast_route_doc,
"fast_route(paths, start, directories, source_fd, source, dev, ino, expect_present)\n"
"--\n\n"
"Link (or, with expect_present, check) paths[start:] until one needs the general route.\n\n"
"Returns (created, present, stop): stop is the index of the first path not\n"
"handled (len(paths) when all were). See relinker.linker._fast_route_python.");

static PyObject *
fast_route(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 8) {
        PyErr_SetString(PyExc_TypeError, "fast_route() takes exactly 8 arguments");
        return NULL;
    }
    PyObject *paths = args[0];
    PyObject *directories = args[2];
    PyObject *source = args[4];
    if (!PyList_Check(paths) && !PyTuple_Check(paths)) {
        PyErr_SetString(PyExc_TypeError, "paths must be a list or a tuple");
        return NULL;
    }
    if (!PyDict_Check(directories)) {
        PyErr_SetString(PyExc_TypeError, "directories must be a dict");
        return NULL;
    }
    if (!PyBytes_Check(source)) {
        PyErr_SetString(PyExc_TypeError, "source must be bytes");
        return NULL;
    }
    Py_ssize_t start = PyLong_AsSsize_t(args[1]);
    if (start == -1 && PyErr_Occurred())
        return NULL;
    int source_fd;
    if (optional_fd(args[3], &source_fd) < 0)
        return NULL;
    unsigned long long dev = PyLong_AsUnsignedLongLong(args[5]);
    if (dev == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    unsigned long long ino = PyLong_AsUnsignedLongLong(args[6]);
    if (ino == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    int expect_present = PyObject_IsTrue(args[7]);
    if (expect_present < 0)
        return NULL;
    const char *source_name = path_name(source);
    if (source_name == NULL)
        return NULL;

    /* No Python code runs inside the loop (bytes keys, exact ints), so the
     * list cannot change under it. */
    Py_ssize_t count = PySequence_Fast_GET_SIZE(paths);
    PyObject **items = PySequence_Fast_ITEMS(paths);
    Py_ssize_t created = 0, present = 0, index;
    int error = 0;
    for (index = start < 0 ? 0 : start; index < count; index++) {
        PyObject *path = items[index];
        if (!PyBytes_Check(path)) {
            PyErr_Format(PyExc_TypeError, "paths must be bytes, not %.100s", Py_TYPE(path)->tp_name);
            return NULL;
        }
        const char *name = NULL;
        int dir_fd = cached_directory(directories, path, &name, &error);
        if (error)
            return NULL;
        if (dir_fd < 0)
            break;
        if (expect_present) {
            struct stat found;
            if (fstatat(dir_fd, name, &found, AT_SYMLINK_NOFOLLOW) != 0
                    || (unsigned long long)found.st_ino != ino
                    || (unsigned long long)found.st_dev != dev)
                break;
            present++;
        } else {
            if (linkat(source_fd, source_name, dir_fd, name, 0) != 0)
                break;
            created++;
        }
    }
    if (index > count)
        index = count;
    return Py_BuildValue("(nnn)", created, present, index);
}

PyDoc_STRVAR(lstat_identity_doc,
"lstat_identity(path, dir_fd)\n"
"--\n\n"
"(st_dev, st_ino, st_mode) of path, relative to dir_fd (None: the working\n"
"directory) unless absolute, no symlink followed. Raises OSError as os.stat does.");

static PyObject *
lstat_identity(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "lstat_identity() takes exactly 2 arguments");
        return NULL;
    }
    PyObject *path = args[0];
    if (!PyBytes_Check(path)) {
        PyErr_SetString(PyExc_TypeError, "path must be bytes");
        return NULL;
    }
    const char *name = path_name(path);
    if (name == NULL)
        return NULL;
    int dir_fd;
    if (optional_fd(args[1], &dir_fd) < 0)
        return NULL;
    struct stat found;
    if (fstatat(dir_fd, name, &found, AT_SYMLINK_NOFOLLOW) != 0)
        return PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, path);
    return Py_BuildValue("(KKI)", (unsigned long long)found.st_dev, (unsigned long long)found.st_ino,
                         (unsigned int)found.st_mode);
}

static PyMethodDef speedups_methods[] = {
    {"fast_route", (PyCFunction)(void (*)(void))fast_route, METH_FASTCALL, fast_route_doc},
    {"lstat_identity", (PyCFunction)(void (*)(void))lstat_identity, METH_FASTCALL, lstat_identity_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef speedups_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "relinker._speedups",
    .m_doc = "The linker's per-path and per-blob system calls in C (optional; see relinker.linker).",
    .m_size = 0,
    .m_methods = speedups_methods,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    return PyModuleDef_Init(&speedups_module);
}
