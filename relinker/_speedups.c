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
 * fields. Here a path costs the system call and a dict lookup, or on a
 * re-check, once its directory has been read, no system call at all (see
 * "directory listings" below: the one thing here without a Python twin, as it
 * changes the cost of an outcome, never the outcome).
 *
 * The GIL is held throughout: relinker's workers are single-threaded
 * processes, and releasing it around every system call would cost more than
 * the call on a warm dentry cache.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <fcntl.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/syscall.h>
#include <unistd.h>

/* --- directory listings ----------------------------------------------------
 *
 * A re-check of a complete archive is one fstatat per path, and in blob order
 * (random over the archive's directories) each costs 3-4 us here, against
 * about 0.7 us per entry to read a whole directory with getdents64 and 0.15 us
 * to look a name up in what was read. So in checking mode, the first check
 * below a cached directory reads the directory once, keeping each entry's
 * inode number (d_ino) under a 64-bit hash of its name; a later check of a
 * name found there with the blob's inode costs no system call at all.
 *
 * What a listing may say: only "this name was a hardlink of this inode when
 * the directory was read". Anything else (absent, another inode) goes on to
 * the fstatat, and an entry found with another inode is forgotten (its inode
 * set to 0), so whatever this process then does to that name (replace it,
 * say) can never be answered from the listing. Because each path of a run is
 * checked once, a listing is consulted for names this process has not
 * touched since it read them; a change made by someone else afterwards is
 * seen as a check by fstatat at that moment would have seen the name then.
 *
 * d_ino is the inode st_ino reports only on filesystems that say so; on
 * others (overlayfs, network filesystems) directories are never listed. The
 * directory's st_dev is kept with its listing and must be the blob's: a
 * mount point inside the archive is another filesystem with its own inode
 * numbers. Memory is bounded by a budget of entries over all listings
 * (16 bytes each); once it is spent, further directories are not listed.
 */

typedef struct {
    uint64_t name_hash;
    uint64_t ino; /* 0: forgotten */
} listed_entry;

enum { NOT_READ = 0, LISTED = 1, NOT_LISTABLE = 2 };

typedef struct {
    listed_entry *entries; /* sorted by name_hash */
    size_t count;
    unsigned long long dev;
    unsigned char state;
} listing;

typedef struct {
    PyObject_HEAD
    listing *by_fd; /* indexed by the cached directory's descriptor */
    Py_ssize_t slots;
    Py_ssize_t limit; /* entries that may be kept in all */
    Py_ssize_t held;
    Py_ssize_t directories;
} Listings;

static uint64_t
name_hash(const char *name, size_t length)
{
    /* FNV-1a, then a murmur3 finaliser to spread it over all 64 bits. A
     * collision can only ever make a check take the fstatat (see lookup). */
    uint64_t hash = 0xcbf29ce484222325ULL;
    for (size_t i = 0; i < length; i++) {
        hash ^= (unsigned char)name[i];
        hash *= 0x100000001b3ULL;
    }
    hash ^= hash >> 33;
    hash *= 0xff51afd7ed558ccdULL;
    hash ^= hash >> 33;
    hash *= 0xc4ceb9fe1a85ec53ULL;
    hash ^= hash >> 33;
    return hash;
}

static int
by_name_hash(const void *a, const void *b)
{
    uint64_t x = ((const listed_entry *)a)->name_hash, y = ((const listed_entry *)b)->name_hash;
    return x < y ? -1 : x > y;
}

/* Filesystems whose getdents64 d_ino is the st_ino of the entry. */
static int
d_ino_is_st_ino(long type)
{
    switch ((unsigned long)type) {
    case 0xEF53:     /* ext2, ext3, ext4 */
    case 0x58465342: /* xfs */
    case 0x9123683E: /* btrfs */
    case 0x2FC12FC1: /* zfs */
    case 0x01021994: /* tmpfs */
        return 1;
    default:
        return 0;
    }
}

struct linux_dirent64 {
    uint64_t d_ino;
    int64_t d_off;
    unsigned short d_reclen;
    unsigned char d_type;
    char d_name[];
};

/* Read the directory behind dir_fd (an O_PATH descriptor) into l, within the budget. */
static void
read_listing(Listings *self, listing *l, int dir_fd)
{
    struct stat st;
    struct statfs fs;
    Py_ssize_t room = self->limit - self->held;
    l->state = NOT_LISTABLE;
    if (room <= 0 || fstat(dir_fd, &st) != 0 || fstatfs(dir_fd, &fs) != 0 || !d_ino_is_st_ino(fs.f_type))
        return;
    int fd = openat(dir_fd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0)
        return;
    listed_entry *entries = NULL;
    size_t count = 0, allocated = 0;
    char buffer[32768];
    int complete = 1;
    for (;;) {
        long got = syscall(SYS_getdents64, fd, buffer, sizeof buffer);
        if (got < 0)
            complete = 0;
        if (got <= 0)
            break;
        for (long offset = 0; offset < got;) {
            struct linux_dirent64 *entry = (struct linux_dirent64 *)(buffer + offset);
            offset += entry->d_reclen;
            const char *name = entry->d_name;
            if (name[0] == '.' && (name[1] == '\0' || (name[1] == '.' && name[2] == '\0')))
                continue;
            if ((Py_ssize_t)count >= room)
                break; /* what was read is true; the rest takes the fstatat */
            if (count == allocated) {
                size_t more = allocated ? allocated * 2 : 64;
                listed_entry *grown = realloc(entries, more * sizeof *entries);
                if (grown == NULL) {
                    complete = 0;
                    break;
                }
                entries = grown;
                allocated = more;
            }
            entries[count].name_hash = name_hash(name, strlen(name));
            entries[count].ino = entry->d_ino;
            count++;
        }
        if (!complete || (Py_ssize_t)count >= room)
            break;
    }
    close(fd);
    if (!complete) {
        free(entries);
        return;
    }
    qsort(entries, count, sizeof *entries, by_name_hash);
    /* Two names with one hash: neither can be told apart, both are forgotten. */
    for (size_t i = 1; i < count; i++)
        if (entries[i].name_hash == entries[i - 1].name_hash)
            entries[i].ino = entries[i - 1].ino = 0;
    if (count < allocated && count > 0) {
        listed_entry *fitted = realloc(entries, count * sizeof *entries);
        if (fitted != NULL)
            entries = fitted;
    }
    l->entries = entries;
    l->count = count;
    l->dev = (unsigned long long)st.st_dev;
    l->state = LISTED;
    self->held += (Py_ssize_t)count;
    self->directories++;
}

/* The listing of a cached directory (read now if it never was), or NULL. */
static listing *
directory_listing(Listings *self, int dir_fd)
{
    if (dir_fd >= self->slots) {
        Py_ssize_t slots = self->slots ? self->slots : 1024;
        while (slots <= dir_fd)
            slots *= 2;
        listing *grown = realloc(self->by_fd, (size_t)slots * sizeof *grown);
        if (grown == NULL)
            return NULL;
        memset(grown + self->slots, 0, (size_t)(slots - self->slots) * sizeof *grown);
        self->by_fd = grown;
        self->slots = slots;
    }
    listing *l = &self->by_fd[dir_fd];
    if (l->state == NOT_READ)
        read_listing(self, l, dir_fd);
    return l->state == LISTED ? l : NULL;
}

/* 1 if the listing holds name as a hardlink of (dev, ino); else 0, and a
 * name found with another inode is forgotten. */
static int
listed_as(listing *l, const char *name, unsigned long long dev, unsigned long long ino)
{
    if (l->dev != dev || l->count == 0)
        return 0;
    uint64_t hash = name_hash(name, strlen(name));
    /* The hashes are uniform: start where this one would sit and walk, a
     * cache line or two, where a binary search would miss the cache at
     * every step. */
    listed_entry *entries = l->entries;
    size_t count = l->count;
    size_t i = (size_t)(((unsigned __int128)hash * count) >> 64);
    if (entries[i].name_hash < hash) {
        while (++i < count && entries[i].name_hash < hash)
            ;
    } else {
        while (i > 0 && entries[i - 1].name_hash >= hash)
            i--;
    }
    if (i == count || entries[i].name_hash != hash)
        return 0;
    if (entries[i].ino != 0 && entries[i].ino == ino)
        return 1;
    entries[i].ino = 0;
    return 0;
}

static void
listings_clear(Listings *self)
{
    for (Py_ssize_t fd = 0; fd < self->slots; fd++)
        free(self->by_fd[fd].entries);
    free(self->by_fd);
    self->by_fd = NULL;
    self->slots = 0;
    self->held = 0;
    self->directories = 0;
}

static int
Listings_init(Listings *self, PyObject *args, PyObject *kwds)
{
    static char *keywords[] = {"budget", NULL};
    Py_ssize_t budget;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "n:DirectoryListings", keywords, &budget))
        return -1;
    if (budget < 0) {
        PyErr_SetString(PyExc_ValueError, "budget must not be negative");
        return -1;
    }
    listings_clear(self);
    self->limit = budget;
    return 0;
}

static void
Listings_dealloc(Listings *self)
{
    listings_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
Listings_clear(Listings *self, PyObject *unused)
{
    (void)unused;
    listings_clear(self);
    Py_RETURN_NONE;
}

static PyObject *
Listings_get_entries(Listings *self, void *closure)
{
    (void)closure;
    return PyLong_FromSsize_t(self->held);
}

static PyObject *
Listings_get_directories(Listings *self, void *closure)
{
    (void)closure;
    return PyLong_FromSsize_t(self->directories);
}

static PyMethodDef Listings_methods[] = {
    {"clear", (PyCFunction)Listings_clear, METH_NOARGS,
     "Forget every listing (before the descriptors they belong to are closed)."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Listings_getset[] = {
    {"entries", (getter)Listings_get_entries, NULL, "Directory entries held.", NULL},
    {"directories", (getter)Listings_get_directories, NULL, "Directories listed.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

PyDoc_STRVAR(Listings_doc,
"DirectoryListings(budget)\n"
"--\n\n"
"What fast_route read of cached directories in checking mode, at most budget\n"
"entries in all (16 bytes each). Listings are keyed by the directory's\n"
"descriptor: clear() them before any cached descriptor is closed.");

static PyTypeObject ListingsType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "relinker._speedups.DirectoryListings",
    .tp_doc = Listings_doc,
    .tp_basicsize = sizeof(Listings),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Listings_init,
    .tp_dealloc = (destructor)Listings_dealloc,
    .tp_methods = Listings_methods,
    .tp_getset = Listings_getset,
};

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
 * *name_out points into the path's own buffer, which is NUL-terminated.
 * When the parent is not cached and ``verified`` (a set of bytes, or NULL)
 * holds its key, *verified_out is set: a directory walked safely before. */
static int
cached_directory(PyObject *directories, PyObject *path, const char **name_out, int *error,
                 PyObject *verified, int *verified_out)
{
    const char *data = PyBytes_AS_STRING(path);
    Py_ssize_t length = PyBytes_GET_SIZE(path);
    const char *slash = memrchr(data, '/', (size_t)length);
    Py_ssize_t parent_length = slash == NULL ? 0 : slash - data;
    const char *name = slash == NULL ? data : slash + 1;

    *verified_out = 0;
    if (!plain_name(name, length - (name - data)))
        return -1;
    PyObject *key = PyBytes_FromStringAndSize(data, parent_length);
    if (key == NULL) {
        *error = 1;
        return -1;
    }
    PyObject *value = PyDict_GetItemWithError(directories, key); /* borrowed */
    if (value == NULL) {
        if (PyErr_Occurred())
            *error = 1;
        else if (verified != NULL && parent_length > 0 && data[0] == '/') {
            int found = PySet_Contains(verified, key);
            if (found < 0)
                *error = 1;
            else if (found) {
                *verified_out = 1;
                *name_out = name;
            }
        }
        Py_DECREF(key);
        return -1;
    }
    Py_DECREF(key);
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
"fast_route(paths, start, directories, source_fd, source, dev, ino, expect_present,\n"
"           listings=None, verified=None, root_fd=None)\n"
"--\n\n"
"Link (or, with expect_present, check) paths[start:] until one needs the general route.\n\n"
"Returns (created, present, stop): stop is the index of the first path not\n"
"handled (len(paths) when all were). See relinker.linker._fast_route_python.\n"
"With expect_present and a DirectoryListings, a name its directory listing\n"
"holds as a hardlink of (dev, ino) is settled without a system call.");

static PyObject *
fast_route(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs < 8 || nargs > 11) {
        PyErr_SetString(PyExc_TypeError, "fast_route() takes from 8 to 11 arguments");
        return NULL;
    }
    Listings *listings = NULL;
    if (nargs > 8 && args[8] != Py_None) {
        if (!PyObject_TypeCheck(args[8], &ListingsType)) {
            PyErr_SetString(PyExc_TypeError, "listings must be a DirectoryListings or None");
            return NULL;
        }
        listings = (Listings *)args[8];
    }
    /* An exact set of bytes: its lookups run no Python code. */
    PyObject *verified = NULL;
    if (nargs > 9 && args[9] != Py_None) {
        if (!PyAnySet_CheckExact(args[9])) {
            PyErr_SetString(PyExc_TypeError, "verified must be a set or None");
            return NULL;
        }
        verified = args[9];
    }
    int root_fd = AT_FDCWD;
    if (nargs > 10 && optional_fd(args[10], &root_fd) < 0)
        return NULL;
    if (verified != NULL && root_fd == AT_FDCWD) {
        PyErr_SetString(PyExc_ValueError, "verified needs root_fd");
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
        int below_verified = 0;
        int dir_fd = cached_directory(directories, path, &name, &error, expect_present ? verified : NULL,
                                      &below_verified);
        if (error)
            return NULL;
        if (dir_fd < 0) {
            if (!below_verified)
                break;
            /* A check below a directory walked safely before but not cached:
             * by its path from the root, as ArchiveLinker._stat_verified
             * does (the key starts with '/', which a path relative to the
             * root must not), and never from a listing: none is keyed by it. */
            dir_fd = root_fd;
            name = PyBytes_AS_STRING(path) + 1;
        }
        if (expect_present) {
            if (listings != NULL && !below_verified) {
                listing *l = directory_listing(listings, dir_fd);
                if (l != NULL && listed_as(l, name, dev, ino)) {
                    present++;
                    continue;
                }
            }
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

static int
speedups_exec(PyObject *module)
{
    if (PyType_Ready(&ListingsType) < 0)
        return -1;
    Py_INCREF(&ListingsType);
    if (PyModule_AddObject(module, "DirectoryListings", (PyObject *)&ListingsType) < 0) {
        Py_DECREF(&ListingsType);
        return -1;
    }
    return 0;
}

static PyModuleDef_Slot speedups_slots[] = {
    {Py_mod_exec, speedups_exec},
    {0, NULL},
};

static struct PyModuleDef speedups_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "relinker._speedups",
    .m_doc = "The linker's per-path and per-blob system calls in C (optional; see relinker.linker).",
    .m_size = 0,
    .m_methods = speedups_methods,
    .m_slots = speedups_slots,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    return PyModuleDef_Init(&speedups_module);
}
