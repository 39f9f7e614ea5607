/*
 * relinker._speedups: the linker's per-path and per-blob system calls in C.
 *
 * Optional: relinker.fastroute holds the same functions in Python, which
 * relinker.linker uses when this module is not built (no compiler at install
 * time) or when RELINKER_PURE_PYTHON is set; RangeWalker's twin is RelinkWork's own loop
 * over a range's rows (relinker.relink). Both must behave identically; the
 * tests run the same cases through both.
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
#include <time.h>
#include <unistd.h>

/* --- directory listings ----------------------------------------------------
 *
 * A re-check of a complete archive is one fstatat per path, and in blob order
 * (random over the archive's directories) each costs several times what
 * reading a whole directory with getdents64 costs per entry, plus a lookup of
 * the name in what was read (benchmarks/README.md). So in checking mode, the first check
 * below a cached directory reads the directory once, keeping each entry's
 * inode number (d_ino) under a 64-bit hash of its name; a later check of a
 * name found there with the blob's inode costs no system call at all.
 *
 * What a listing may say: only "this name was a hardlink of this inode when
 * the directory was read". Anything else (absent, another inode) goes on to
 * the fstatat, and an entry found with another inode is forgotten (its inode
 * set to 0), and so is every name this process links or replaces in a
 * listed directory (here and, through DirectoryListings.forget, in the
 * linker's general route): what this process did to a name is never answered
 * from a listing read before. A change made by someone else afterwards is
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

/* Random for each process (module import), so that no catalogue can be made
 * of names that collide: see name_hash. */
static uint64_t name_hash_seed;

static uint64_t
name_hash(const char *name, size_t length)
{
    /* FNV-1a from a random start, then a murmur3 finaliser to spread it over
     * all 64 bits. Two names of one directory with one hash are both
     * forgotten when it is read (read_listing). What a collision could still
     * do: a name absent from the directory, whose hash is that of a listed
     * hardlink of the same blob, answered as present. That needs two paths
     * of one blob in one directory and odds of about one in 2^64 per check,
     * with a start no one outside this process knows. */
    uint64_t hash = 0xcbf29ce484222325ULL ^ name_hash_seed;
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
    if (dir_fd < 0)
        return NULL;
    if (dir_fd >= self->slots) {
        /* The table grows to the descriptor's number: only for one that is
         * open (numbered below the kernel's nr_open), never for any int. */
        if (fcntl(dir_fd, F_GETFD) < 0)
            return NULL;
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

/* The entry of name in l, or NULL. */
static listed_entry *
find_entry(listing *l, const char *name, size_t length)
{
    if (l->count == 0)
        return NULL;
    uint64_t hash = name_hash(name, length);
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
    return i == count || entries[i].name_hash != hash ? NULL : &entries[i];
}

/* 1 if the listing holds name as a hardlink of (dev, ino); else 0, and a
 * name found with another inode is forgotten. */
static int
listed_as(listing *l, const char *name, unsigned long long dev, unsigned long long ino)
{
    if (l->dev != dev)
        return 0;
    listed_entry *entry = find_entry(l, name, strlen(name));
    if (entry == NULL)
        return 0;
    if (entry->ino != 0 && entry->ino == ino)
        return 1;
    entry->ino = 0;
    return 0;
}

/* Forget name in the listing of dir_fd, if that directory was read: this
 * process is changing the name. Never reads a directory. */
static void
forget_listed(Listings *self, int dir_fd, const char *name, size_t length)
{
    if (dir_fd < 0 || dir_fd >= self->slots || self->by_fd[dir_fd].state != LISTED)
        return;
    listed_entry *entry = find_entry(&self->by_fd[dir_fd], name, length);
    if (entry != NULL)
        entry->ino = 0;
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

static PyObject *
Listings_forget(Listings *self, PyObject *args)
{
    int dir_fd;
    const char *name;
    Py_ssize_t length;
    if (!PyArg_ParseTuple(args, "iy#:forget", &dir_fd, &name, &length))
        return NULL;
    forget_listed(self, dir_fd, name, (size_t)length);
    Py_RETURN_NONE;
}

static PyMethodDef Listings_methods[] = {
    {"clear", (PyCFunction)Listings_clear, METH_NOARGS,
     "Forget every listing (before the descriptors they belong to are closed)."},
    {"forget", (PyCFunction)Listings_forget, METH_VARARGS,
     "forget(dir_fd, name): the caller changed name in the directory of dir_fd;\n"
     "a listing read before must not answer for it."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Listings_getset[] = {
    {"entries", (getter)Listings_get_entries, NULL, "Directory entries held.", NULL},
    {"directories", (getter)Listings_get_directories, NULL, "Directories listed.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

/* No GC support: a DirectoryListings holds no Python object and cannot be
 * subclassed (no Py_TPFLAGS_BASETYPE), so no reference cycle can pass
 * through it. */
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
    int overflow;
    long fd = PyLong_AsLongAndOverflow(value, &overflow);
    if (fd == -1 && PyErr_Occurred()) {
        *error = 1;
        return -1;
    }
    /* beyond long, or beyond int: no descriptor; the walk stops there, as the twin's */
    if (overflow || fd < 0 || fd > INT_MAX)
        return -1;
    *name_out = name;
    return (int)fd;
}

/* A directory descriptor argument: an int from 0 to INT_MAX, or None for the
 * working directory. Only an int: anything else could run Python code
 * (__index__), and relinker.fastroute's twin refuses the same. */
static int
optional_fd(PyObject *value, const char *what, int *fd_out)
{
    if (value == Py_None) {
        *fd_out = AT_FDCWD;
        return 0;
    }
    if (!PyLong_Check(value)) {
        PyErr_Format(PyExc_TypeError, "%s must be an int or None, not %.100s", what, Py_TYPE(value)->tp_name);
        return -1;
    }
    int overflow;
    long fd = PyLong_AsLongAndOverflow(value, &overflow);
    if (fd == -1 && PyErr_Occurred())
        return -1;
    if (overflow != 0 || fd < 0 || fd > INT_MAX) {
        PyErr_Format(PyExc_ValueError, "%s: not a file descriptor", what);
        return -1;
    }
    *fd_out = (int)fd;
    return 0;
}

/* An st_dev or st_ino argument: an int from 0 to 2**64 - 1. */
static int
unsigned_arg(PyObject *value, const char *what, unsigned long long *out)
{
    if (!PyLong_Check(value)) {
        PyErr_Format(PyExc_TypeError, "%s must be an int, not %.100s", what, Py_TYPE(value)->tp_name);
        return -1;
    }
    *out = PyLong_AsUnsignedLongLong(value);
    if (*out == (unsigned long long)-1 && PyErr_Occurred()) {
        if (!PyErr_ExceptionMatches(PyExc_OverflowError))
            return -1;
        PyErr_Format(PyExc_ValueError, "%s must be from 0 to 2**64 - 1", what);
        return -1;
    }
    return 0;
}

/* A start index: an int, not negative; one beyond the end is the end. */
static int
start_index(PyObject *value, Py_ssize_t *out)
{
    if (!PyLong_Check(value)) {
        PyErr_Format(PyExc_TypeError, "start must be an int, not %.100s", Py_TYPE(value)->tp_name);
        return -1;
    }
    int overflow;
    long long start = PyLong_AsLongLongAndOverflow(value, &overflow);
    if (start == -1 && PyErr_Occurred())
        return -1;
    if (overflow < 0 || (overflow == 0 && start < 0)) {
        PyErr_SetString(PyExc_ValueError, "start must not be negative");
        return -1;
    }
    *out = overflow > 0 || start > PY_SSIZE_T_MAX ? PY_SSIZE_T_MAX : (Py_ssize_t)start;
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

/* The descriptors of `directories` a RangeWalker has looked up, by the parent
 * as a path spells it: a lookup needs no bytes object built and hashed. Only
 * descriptors are kept (never _MISSING), and the linker never rebinds a key
 * that has one, so an entry stays true until the descriptors close (the
 * linker clears the index first). */
typedef struct {
    uint64_t hash;
    char *key; /* NULL: a free slot */
    Py_ssize_t length;
    int fd;
} indexed_directory;

typedef struct {
    indexed_directory *slots;
    size_t mask; /* slots - 1; 0 before the first entry */
    size_t used;
} directory_index;

static void
directory_index_clear(directory_index *index)
{
    if (index->slots != NULL)
        for (size_t i = 0; i <= index->mask; i++)
            free(index->slots[i].key);
    free(index->slots);
    index->slots = NULL;
    index->mask = index->used = 0;
}

/* The descriptor indexed for this parent, or -1. */
static int
directory_index_find(const directory_index *index, uint64_t hash, const char *key, Py_ssize_t length)
{
    if (index->slots == NULL)
        return -1;
    for (size_t i = hash & index->mask; index->slots[i].key != NULL; i = (i + 1) & index->mask) {
        const indexed_directory *slot = &index->slots[i];
        if (slot->hash == hash && slot->length == length && memcmp(slot->key, key, (size_t)length) == 0)
            return slot->fd;
    }
    return -1;
}

/* Index a descriptor; running out of memory only means the next lookup goes to the dict again. */
static void
directory_index_add(directory_index *index, uint64_t hash, const char *key, Py_ssize_t length, int fd)
{
    if (index->slots == NULL || (index->used + 1) * 2 > index->mask + 1) {
        size_t size = index->slots == NULL ? 1024 : (index->mask + 1) * 2;
        indexed_directory *slots = calloc(size, sizeof *slots);
        if (slots == NULL)
            return;
        if (index->slots != NULL) {
            for (size_t i = 0; i <= index->mask; i++) {
                if (index->slots[i].key == NULL)
                    continue;
                size_t j = index->slots[i].hash & (size - 1);
                while (slots[j].key != NULL)
                    j = (j + 1) & (size - 1);
                slots[j] = index->slots[i];
            }
            free(index->slots);
        }
        index->slots = slots;
        index->mask = size - 1;
    }
    char *copy = malloc(length > 0 ? (size_t)length : 1);
    if (copy == NULL)
        return;
    memcpy(copy, key, (size_t)length);
    size_t i = hash & index->mask;
    while (index->slots[i].key != NULL)
        i = (i + 1) & index->mask;
    index->slots[i] = (indexed_directory){hash, copy, length, fd};
    index->used++;
}

/* cached_directory, answered from the index where it can be (and indexing what the dict answers). */
static int
indexed_cached_directory(directory_index *index, PyObject *directories, PyObject *path, const char **name_out,
                         int *error, PyObject *verified, int *verified_out)
{
    const char *data = PyBytes_AS_STRING(path);
    Py_ssize_t length = PyBytes_GET_SIZE(path);
    const char *slash = memrchr(data, '/', (size_t)length);
    Py_ssize_t parent_length = slash == NULL ? 0 : slash - data;
    const char *name = slash == NULL ? data : slash + 1;
    if (plain_name(name, length - (name - data))) {
        uint64_t hash = name_hash(data, (size_t)parent_length);
        int fd = directory_index_find(index, hash, data, parent_length);
        if (fd >= 0) {
            *verified_out = 0;
            *name_out = name;
            return fd;
        }
        fd = cached_directory(directories, path, name_out, error, verified, verified_out);
        if (fd >= 0)
            directory_index_add(index, hash, data, parent_length, fd);
        return fd;
    }
    return cached_directory(directories, path, name_out, error, verified, verified_out);
}

/* What one fast route needs besides the paths: see fast_route's arguments. */
typedef struct {
    directory_index *index; /* or NULL */
    PyObject *directories;  /* dict: cached directory key -> descriptor */
    PyObject *verified;     /* set of keys walked safely before, or NULL */
    Listings *listings;     /* or NULL */
    int root_fd;
    int source_fd;
    const char *source_name;
    unsigned long long dev, ino;
    int expect_present;
} route;

/* Link (or, with expect_present, check) one path: 1 when done, 0 when it
 * needs the general route, -1 with an exception set. The caller holds path:
 * the lookups below may run Python code (see route_paths). */
static int
route_one(const route *r, PyObject *path, Py_ssize_t *created, Py_ssize_t *present)
{
    int error = 0;
    const char *name = NULL;
    int below_verified = 0;
    PyObject *verified = r->expect_present ? r->verified : NULL;
    int dir_fd = r->index != NULL
        ? indexed_cached_directory(r->index, r->directories, path, &name, &error, verified, &below_verified)
        : cached_directory(r->directories, path, &name, &error, verified, &below_verified);
    if (error)
        return -1;
    if (dir_fd < 0) {
        if (!below_verified)
            return 0;
        /* A check below a directory walked safely before but not cached:
         * by its path from the root, as ArchiveLinker._stat_verified
         * does (the key starts with '/', which a path relative to the
         * root must not), and never from a listing: none is keyed by it. */
        dir_fd = r->root_fd;
        name = PyBytes_AS_STRING(path) + 1;
    }
    if (r->expect_present) {
        if (r->listings != NULL && !below_verified) {
            listing *l = directory_listing(r->listings, dir_fd);
            if (l != NULL && listed_as(l, name, r->dev, r->ino)) {
                (*present)++;
                return 1;
            }
        }
        struct stat found;
        if (fstatat(dir_fd, name, &found, AT_SYMLINK_NOFOLLOW) != 0
                || (unsigned long long)found.st_ino != r->ino
                || (unsigned long long)found.st_dev != r->dev)
            return 0;
        (*present)++;
    } else {
        if (linkat(r->source_fd, r->source_name, dir_fd, name, 0) != 0)
            return 0;
        if (r->listings != NULL)
            forget_listed(r->listings, dir_fd, name, strlen(name));
        (*created)++;
    }
    return 1;
}

static inline Py_ssize_t
paths_size(PyObject *paths)
{
    return PyList_Check(paths) ? PyList_GET_SIZE(paths) : PyTuple_GET_SIZE(paths);
}

/* Link (or, with expect_present, check) paths[start:] (a list or a tuple)
 * until one needs the general route; add what was done to *created and
 * *present and return the index of the first path not handled (the list's
 * length when all were), or -1 with an exception set.
 * A lookup may run Python code: a key of directories or an element of
 * verified that is not exactly bytes compares by its own __eq__, and that
 * code may change the list. So its size and items are read afresh at each
 * step and the path being worked on is held, as Python's loop does. */
static Py_ssize_t
route_paths(const route *r, PyObject *paths, Py_ssize_t start, Py_ssize_t *created, Py_ssize_t *present)
{
    Py_ssize_t index;
    for (index = start; index < paths_size(paths); index++) {
        PyObject *path = PySequence_Fast_GET_ITEM(paths, index);
        if (!PyBytes_Check(path)) {
            PyErr_Format(PyExc_TypeError, "paths must be bytes, not %.100s", Py_TYPE(path)->tp_name);
            return -1;
        }
        Py_INCREF(path);
        int done = route_one(r, path, created, present);
        Py_DECREF(path);
        if (done < 0)
            return -1;
        if (done == 0)
            break;
    }
    Py_ssize_t size = paths_size(paths);
    return index < size ? index : size;
}

PyDoc_STRVAR(fast_route_doc,
"fast_route(paths, start, directories, source_fd, source, dev, ino, expect_present,\n"
"           listings=None, verified=None, root_fd=None)\n"
"--\n\n"
"Link (or, with expect_present, check) paths[start:] until one needs the general route.\n\n"
"Returns (created, present, stop): stop is the index of the first path not\n"
"handled (len(paths) when all were). See relinker.fastroute._fast_route_python.\n"
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
    /* In the order of _fast_route_python's checks: the twins refuse the
     * same arguments with the same exception. Exact types only where a
     * subclass could answer differently from what the C code reads (a
     * list's or dict's overridden methods). */
    PyObject *paths = args[0];
    if (!PyList_CheckExact(paths) && !PyTuple_CheckExact(paths)) {
        PyErr_Format(PyExc_TypeError, "paths must be a list or a tuple, not %.100s", Py_TYPE(paths)->tp_name);
        return NULL;
    }
    Py_ssize_t start;
    if (start_index(args[1], &start) < 0)
        return NULL;
    PyObject *directories = args[2];
    if (!PyDict_CheckExact(directories)) {
        PyErr_SetString(PyExc_TypeError, "directories must be a dict");
        return NULL;
    }
    int source_fd;
    if (optional_fd(args[3], "source_fd", &source_fd) < 0)
        return NULL;
    PyObject *source = args[4];
    if (!PyBytes_Check(source)) {
        PyErr_SetString(PyExc_TypeError, "source must be bytes");
        return NULL;
    }
    unsigned long long dev, ino;
    if (unsigned_arg(args[5], "dev", &dev) < 0 || unsigned_arg(args[6], "ino", &ino) < 0)
        return NULL;
    int expect_present = PyObject_IsTrue(args[7]);
    if (expect_present < 0)
        return NULL;
    const char *source_name = path_name(source);
    if (source_name == NULL)
        return NULL;
    Listings *listings = NULL;
    if (nargs > 8 && args[8] != Py_None) {
        if (!PyObject_TypeCheck(args[8], &ListingsType)) {
            PyErr_SetString(PyExc_TypeError, "listings must be a DirectoryListings or None");
            return NULL;
        }
        listings = (Listings *)args[8];
    }
    PyObject *verified = NULL;
    if (nargs > 9 && args[9] != Py_None) {
        if (!PyAnySet_CheckExact(args[9])) {
            PyErr_SetString(PyExc_TypeError, "verified must be a set or None");
            return NULL;
        }
        verified = args[9];
    }
    int root_fd = AT_FDCWD;
    if (nargs > 10 && optional_fd(args[10], "root_fd", &root_fd) < 0)
        return NULL;
    if (verified != NULL && root_fd == AT_FDCWD) {
        PyErr_SetString(PyExc_ValueError, "verified needs root_fd");
        return NULL;
    }

    /* Every object r points to is an argument, held by the caller until we return. */
    route r = {NULL, directories, verified, listings, root_fd, source_fd, source_name, dev, ino, expect_present};
    Py_ssize_t created = 0, present = 0;
    Py_ssize_t index = route_paths(&r, paths, start, &created, &present);
    if (index < 0)
        return NULL;
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
    if (optional_fd(args[1], "dir_fd", &dir_fd) < 0)
        return NULL;
    struct stat found;
    if (fstatat(dir_fd, name, &found, AT_SYMLINK_NOFOLLOW) != 0)
        return PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, path);
    return Py_BuildValue("(KKI)", (unsigned long long)found.st_dev, (unsigned long long)found.st_ino,
                         (unsigned int)found.st_mode);
}

/* --- the range walker ------------------------------------------------------
 *
 * RelinkWork's loop over a range's rows, (blobid, [path, ...]) one per inode
 * in blob order, for relink and count. Python's own loop (relinker.relink,
 * RelinkWork._walk_rows) spends most of a re-check's client time in the
 * interpreter: about 10 us per inode for a few dict updates, a by-hash path
 * built by an f-string, a regular expression and three calls down to
 * fast_route. Here a row costs what its system calls cost, and everything
 * out of the ordinary goes back to Python as an event, handled by the same
 * code as on Python's route:
 *
 *   (EVENT_TICK,)                  every tick_every rows: progress, heartbeat, stop
 *   (EVENT_SOURCE, blobid)         a new blob whose by-hash file this walker could
 *                                  not take as it is (malformed ID, lstat failed,
 *                                  not a regular file): Python's _source decides
 *                                  and records the problem; answer set_source()
 *   (EVENT_PATH, path, source, dev, ino)
 *                                  a path the fast route stopped at: Python's
 *                                  general route; answer resolved()
 *
 * A row of the same blob as the one before (another inode, on another medium)
 * loses the paths already seen for that blob, as in Python's loop.
 */

enum { EVENT_TICK = 1, EVENT_SOURCE = 2, EVENT_PATH = 3 };
/* "ab/cd/" + 64 hex digits + NUL */
#define SOURCE_NAME_SIZE (6 + 64 + 1)

typedef struct {
    PyObject_HEAD
    route route;                 /* source_name points into source_name_buffer */
    int probe;                   /* count: never link, always check */
    Py_ssize_t tick_every;
    Py_ssize_t since_tick;
    /* the blob being walked */
    PyObject *blobid;            /* str, or NULL before the first row */
    int usable;                  /* its by-hash file may be linked to */
    Py_ssize_t linked, expected;
    PyObject *first_paths;       /* its first inode's paths */
    PyObject *seen;              /* set of its paths, once a second inode came */
    /* the row being walked */
    PyObject *paths;             /* list, or NULL between rows */
    Py_ssize_t index;
    int waiting;                 /* the event that is out (its answer comes before the next step), or 0 */
    /* The method running that may run Python code (a rows iterator, a
     * __hash__ or __eq__, a destructor), or NULL: code it runs must not
     * call back into the walker, whose state it is changing. */
    const char *running;
    /* totals */
    Py_ssize_t created, present;
    PyObject *linked_by_blob, *expected_by_blob;
    char source_name_buffer[SOURCE_NAME_SIZE];
    /* kept from range to range, until forget_directories() */
    directory_index directories;
} Walker;

/* Ready for a new range: nothing walked yet. */
static int
walker_start(Walker *self, int expect_present)
{
    PyObject *linked_by_blob = PyDict_New(), *expected_by_blob = PyDict_New();
    if (linked_by_blob == NULL || expected_by_blob == NULL) {
        Py_XDECREF(linked_by_blob);
        Py_XDECREF(expected_by_blob);
        return -1;
    }
    /* What is dropped here may have a destructor that calls the walker. */
    const char *running = self->running;
    self->running = "start";
    Py_CLEAR(self->blobid);
    Py_CLEAR(self->first_paths);
    Py_CLEAR(self->seen);
    Py_CLEAR(self->paths);
    Py_XSETREF(self->linked_by_blob, linked_by_blob);
    Py_XSETREF(self->expected_by_blob, expected_by_blob);
    self->running = running;
    self->route.expect_present = self->probe || expect_present;
    self->usable = 0;
    self->linked = self->expected = self->index = 0;
    self->waiting = 0;
    self->since_tick = 0;
    self->created = self->present = 0;
    return 0;
}

static int
Walker_init(Walker *self, PyObject *args, PyObject *kwds)
{
    static char *keywords[] = {"directories", "source_fd", "root_fd", "expect_present", "listings", "verified",
                               "probe", "tick_every", NULL};
    PyObject *directories, *listings = Py_None, *verified = Py_None;
    int source_fd, root_fd, expect_present, probe = 0;
    Py_ssize_t tick_every = 1000;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!iip|OOpn:RangeWalker", keywords, &PyDict_Type, &directories,
                                     &source_fd, &root_fd, &expect_present, &listings, &verified, &probe,
                                     &tick_every))
        return -1;
    /* As fast_route's: a subclass's own lookups would not be the ones made here. */
    if (!PyDict_CheckExact(directories)) {
        PyErr_SetString(PyExc_TypeError, "directories must be a dict");
        return -1;
    }
    if (listings != Py_None && !PyObject_TypeCheck(listings, &ListingsType)) {
        PyErr_SetString(PyExc_TypeError, "listings must be a DirectoryListings or None");
        return -1;
    }
    if (verified != Py_None && !PyAnySet_CheckExact(verified)) {
        PyErr_SetString(PyExc_TypeError, "verified must be a set or None");
        return -1;
    }
    if (source_fd < 0 || root_fd < 0 || tick_every < 1) {
        PyErr_SetString(PyExc_ValueError, "descriptors must not be negative, tick_every must be positive");
        return -1;
    }
    if (self->route.directories != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "RangeWalker is initialised once");
        return -1;
    }
    Py_INCREF(directories);
    self->route.directories = directories;
    if (verified != Py_None) {
        Py_INCREF(verified);
        self->route.verified = verified;
    }
    if (listings != Py_None) {
        Py_INCREF(listings);
        self->route.listings = (Listings *)listings;
    }
    self->route.root_fd = root_fd;
    self->route.source_fd = source_fd;
    self->route.source_name = self->source_name_buffer;
    self->route.index = &self->directories;
    self->probe = probe;
    self->tick_every = tick_every;
    return walker_start(self, expect_present);
}

/* A walker can be part of a reference cycle (its directories dict may hold
 * anything, the walker too): the collector must see what it holds. */
static int
Walker_traverse(Walker *self, visitproc visit, void *arg)
{
    Py_VISIT(self->route.directories);
    Py_VISIT(self->route.verified);
    Py_VISIT((PyObject *)self->route.listings);
    Py_VISIT(self->blobid);
    Py_VISIT(self->first_paths);
    Py_VISIT(self->seen);
    Py_VISIT(self->paths);
    Py_VISIT(self->linked_by_blob);
    Py_VISIT(self->expected_by_blob);
    return 0;
}

static int
Walker_clear(Walker *self)
{
    Py_CLEAR(self->route.directories);
    Py_CLEAR(self->route.verified);
    Py_CLEAR(self->route.listings);
    Py_CLEAR(self->blobid);
    Py_CLEAR(self->first_paths);
    Py_CLEAR(self->seen);
    Py_CLEAR(self->paths);
    Py_CLEAR(self->linked_by_blob);
    Py_CLEAR(self->expected_by_blob);
    return 0;
}

static void
Walker_dealloc(Walker *self)
{
    PyObject_GC_UnTrack(self);
    Walker_clear(self);
    directory_index_clear(&self->directories);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

PyDoc_STRVAR(Walker_start_doc,
"start(expect_present)\n"
"--\n\n"
"Begin a new range: nothing walked, nothing counted; the directories looked\n"
"up so far stay indexed.");

/* 0, or -1 with RuntimeError while another method runs (see Walker.running). */
static int
walker_idle(Walker *self, const char *method)
{
    if (self->running == NULL)
        return 0;
    PyErr_Format(PyExc_RuntimeError, "RangeWalker.%s() called while %s() runs", method, self->running);
    return -1;
}

/* 0, or -1 with an exception when __init__ never ran (RangeWalker.__new__
 * alone) or another method runs. */
static int
walker_ready(Walker *self, const char *method)
{
    if (walker_idle(self, method) < 0)
        return -1;
    if (self->route.directories != NULL && self->linked_by_blob != NULL)
        return 0;
    PyErr_SetString(PyExc_RuntimeError, "RangeWalker was not initialised");
    return -1;
}

static PyObject *
Walker_start(Walker *self, PyObject *expect_present)
{
    if (walker_ready(self, "start") < 0)
        return NULL;
    int expect = PyObject_IsTrue(expect_present);
    if (expect < 0 || walker_start(self, expect) < 0)
        return NULL;
    Py_RETURN_NONE;
}

PyDoc_STRVAR(Walker_forget_directories_doc,
"forget_directories()\n"
"--\n\n"
"Drop the index of directory descriptors: call it before any descriptor of\n"
"the linker's cache is closed.");

static PyObject *
Walker_forget_directories(Walker *self, PyObject *unused)
{
    (void)unused;
    if (walker_idle(self, "forget_directories") < 0)
        return NULL;
    directory_index_clear(&self->directories);
    Py_RETURN_NONE;
}

/* by_blob[blobid] += n */
static int
add_to(PyObject *by_blob, PyObject *blobid, Py_ssize_t n)
{
    PyObject *before = PyDict_GetItemWithError(by_blob, blobid);
    Py_ssize_t total = n;
    if (before != NULL) {
        Py_INCREF(before); /* the dict is the caller's too (results()) */
        Py_ssize_t so_far = PyLong_AsSsize_t(before);
        Py_DECREF(before);
        if (so_far == -1 && PyErr_Occurred())
            return -1;
        total += so_far;
    } else if (PyErr_Occurred())
        return -1;
    PyObject *value = PyLong_FromSsize_t(total);
    if (value == NULL)
        return -1;
    int failed = PyDict_SetItem(by_blob, blobid, value);
    Py_DECREF(value);
    return failed;
}

/* The walked blob's counts into the totals; no blob is being walked afterwards. */
static int
finish_blob(Walker *self)
{
    if (self->blobid == NULL)
        return 0;
    /* Hashing a blob ID that is not exactly str runs its __hash__: the
     * objects it is looked up with and in are held until it is done. */
    PyObject *blobid = self->blobid, *expected_by_blob = self->expected_by_blob;
    PyObject *linked_by_blob = self->linked_by_blob;
    Py_INCREF(blobid);
    Py_INCREF(expected_by_blob);
    Py_INCREF(linked_by_blob);
    int failed = add_to(expected_by_blob, blobid, self->expected) < 0
        || add_to(linked_by_blob, blobid, self->linked) < 0;
    Py_DECREF(linked_by_blob);
    Py_DECREF(expected_by_blob);
    Py_DECREF(blobid);
    if (failed)
        return -1;
    Py_CLEAR(self->blobid);
    Py_CLEAR(self->first_paths);
    Py_CLEAR(self->seen);
    return 0;
}

/* blobid's by-hash name (relinker.paths.by_hash_relpath), NUL-terminated,
 * into name: 1, or 0 when blobid is not a lowercase hex BLAKE3-256 digest
 * (only such a name, so no blob ID can reach outside the store). */
static int
by_hash_name(PyObject *blobid, char name[SOURCE_NAME_SIZE])
{
    if (!PyUnicode_IS_ASCII(blobid) || PyUnicode_GET_LENGTH(blobid) != 64)
        return 0;
    const char *hex = (const char *)PyUnicode_DATA(blobid);
    for (int i = 0; i < 64; i++)
        if (!((hex[i] >= '0' && hex[i] <= '9') || (hex[i] >= 'a' && hex[i] <= 'f')))
            return 0;
    memcpy(name, hex, 2);
    name[2] = '/';
    memcpy(name + 3, hex + 2, 2);
    name[5] = '/';
    memcpy(name + 6, hex, 64);
    name[70] = '\0';
    return 1;
}

/* The by-hash file of blobid, as RelinkWork._source would take it: 1 when it
 * is a regular file (its name and identity then in the route), 0 when Python
 * must decide. */
static int
take_source(Walker *self, PyObject *blobid)
{
    char *name = self->source_name_buffer;
    if (!by_hash_name(blobid, name))
        return 0;
    struct stat found;
    if (fstatat(self->route.source_fd, name, &found, AT_SYMLINK_NOFOLLOW) != 0 || !S_ISREG(found.st_mode))
        return 0;
    self->route.dev = (unsigned long long)found.st_dev;
    self->route.ino = (unsigned long long)found.st_ino;
    return 1;
}

/* The paths of a further inode of the walked blob that no inode before had. */
static PyObject *
unseen_paths(Walker *self, PyObject *paths)
{
    /* Hashing a path may run Python code (a bytes subclass): the set is
     * held while it is used, the list read afresh at each step and the path
     * held while it is looked up. */
    PyObject *seen = self->seen;
    if (seen == NULL) {
        seen = PySet_New(self->first_paths);
        if (seen == NULL)
            return NULL;
        Py_XSETREF(self->seen, seen);
    }
    Py_INCREF(seen);
    PyObject *fresh = PyList_New(0);
    if (fresh == NULL) {
        Py_DECREF(seen);
        return NULL;
    }
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(paths); i++) {
        PyObject *path = PyList_GET_ITEM(paths, i);
        Py_INCREF(path);
        int known = PySet_Contains(seen, path);
        int failed = known < 0 || (!known && PyList_Append(fresh, path) < 0);
        Py_DECREF(path);
        if (failed)
            goto error;
    }
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(fresh); i++)
        if (PySet_Add(seen, PyList_GET_ITEM(fresh, i)) < 0)
            goto error;
    Py_DECREF(seen);
    return fresh;
error:
    Py_DECREF(fresh);
    Py_DECREF(seen);
    return NULL;
}

/* Take the next row: 1 when there was one, 0 at the end, -1 on error. Sets
 * *needs_source when the row starts a blob whose source Python must decide. */
static int
next_row(Walker *self, PyObject *rows, int *needs_source)
{
    *needs_source = 0;
    PyObject *row = PyIter_Next(rows);
    if (row == NULL)
        return PyErr_Occurred() ? -1 : 0;
    if (!PyTuple_Check(row) || PyTuple_GET_SIZE(row) != 2 || !PyUnicode_Check(PyTuple_GET_ITEM(row, 0))
            || !PyList_Check(PyTuple_GET_ITEM(row, 1))) {
        PyErr_SetString(PyExc_TypeError, "rows must be (str, list) tuples");
        Py_DECREF(row);
        return -1;
    }
    PyObject *blobid = PyTuple_GET_ITEM(row, 0);
    PyObject *paths = PyTuple_GET_ITEM(row, 1);
    int same = 0;
    if (self->blobid != NULL) {
        same = PyUnicode_Compare(blobid, self->blobid) == 0;
        if (!same && PyErr_Occurred()) {
            Py_DECREF(row);
            return -1;
        }
    }
    if (same) {
        paths = unseen_paths(self, paths);
        if (paths == NULL) {
            Py_DECREF(row);
            return -1;
        }
    } else {
        if (finish_blob(self) < 0) {
            Py_DECREF(row);
            return -1;
        }
        Py_INCREF(blobid);
        self->blobid = blobid;
        Py_INCREF(paths);
        self->first_paths = paths;
        self->linked = self->expected = 0;
        self->usable = take_source(self, blobid);
        *needs_source = !self->usable;
        Py_INCREF(paths);
    }
    Py_DECREF(row);
    self->paths = paths; /* a new reference either way */
    self->index = 0;
    self->expected += PyList_GET_SIZE(paths);
    return 1;
}

PyDoc_STRVAR(Walker_step_doc,
"step(rows) -> None or an event\n"
"--\n\n"
"Walk rows (an iterator of (blobid, paths)) until Python is needed: returns\n"
"an event tuple, or None once rows are exhausted (then see results()).\n"
"Code that step() runs (the rows iterator, a __hash__ or __eq__ of what the\n"
"rows hold, a destructor) cannot call start, step, set_source, resolved or\n"
"forget_directories: they raise RuntimeError until step() returns.");

static PyObject *
walker_step(Walker *self, PyObject *rows)
{
    for (;;) {
        if (self->paths != NULL) {
            if (self->usable) {
                Py_ssize_t created = 0, present = 0;
                Py_ssize_t stop = route_paths(&self->route, self->paths, self->index, &created, &present);
                if (stop < 0)
                    return NULL;
                self->created += created;
                self->present += present;
                self->linked += created + present;
                self->index = stop;
                /* The list as it is now: code run by a lookup may have changed it. */
                if (stop < PyList_GET_SIZE(self->paths)) {
                    PyObject *event = Py_BuildValue("(iOy#KK)", EVENT_PATH, PyList_GET_ITEM(self->paths, stop),
                                                    self->source_name_buffer, (Py_ssize_t)(SOURCE_NAME_SIZE - 1),
                                                    self->route.dev, self->route.ino);
                    if (event != NULL)
                        self->waiting = EVENT_PATH;
                    return event;
                }
            }
            Py_CLEAR(self->paths);
        }
        if (self->since_tick >= self->tick_every) {
            self->since_tick = 0;
            return Py_BuildValue("(i)", EVENT_TICK);
        }
        int needs_source;
        int got = next_row(self, rows, &needs_source);
        if (got < 0)
            return NULL;
        if (got == 0) {
            if (finish_blob(self) < 0)
                return NULL;
            Py_RETURN_NONE;
        }
        self->since_tick++;
        if (needs_source) {
            PyObject *event = Py_BuildValue("(iO)", EVENT_SOURCE, self->blobid);
            if (event != NULL)
                self->waiting = EVENT_SOURCE;
            return event;
        }
    }
}

static PyObject *
Walker_step(Walker *self, PyObject *rows)
{
    if (walker_ready(self, "step") < 0)
        return NULL;
    if (!PyIter_Check(rows)) {
        PyErr_Format(PyExc_TypeError, "rows must be an iterator, not %.100s", Py_TYPE(rows)->tp_name);
        return NULL;
    }
    if (self->waiting) {
        PyErr_SetString(PyExc_RuntimeError, "the last event has not been answered");
        return NULL;
    }
    /* The rows iterator, a __hash__ or __eq__ of what they hold, a
     * destructor: none may call back into the walker while it steps. */
    self->running = "step";
    PyObject *event = walker_step(self, rows);
    self->running = NULL;
    return event;
}

PyDoc_STRVAR(Walker_set_source_doc,
"set_source(source)\n"
"--\n\n"
"Answer EVENT_SOURCE: None (the blob cannot be linked to; its paths only\n"
"count as expected) or (relpath, (dev, ino)) with relpath the blob's\n"
"by-hash name below the store (ab/cd/<blobid>). Anything else raises\n"
"TypeError or ValueError, and the event stays unanswered.");

static PyObject *
Walker_set_source(Walker *self, PyObject *source)
{
    if (walker_idle(self, "set_source") < 0)
        return NULL;
    if (self->waiting != EVENT_SOURCE) {
        PyErr_SetString(PyExc_RuntimeError, "no EVENT_SOURCE to answer");
        return NULL;
    }
    if (source != Py_None) {
        /* Exact types only, so that nothing here runs Python code. */
        PyObject *relpath, *identity;
        if (!PyTuple_Check(source) || PyTuple_GET_SIZE(source) != 2
                || !PyBytes_Check(relpath = PyTuple_GET_ITEM(source, 0))
                || !PyTuple_Check(identity = PyTuple_GET_ITEM(source, 1)) || PyTuple_GET_SIZE(identity) != 2) {
            PyErr_SetString(PyExc_TypeError, "source must be None or (relpath: bytes, (dev, ino))");
            return NULL;
        }
        unsigned long long dev, ino;
        if (unsigned_arg(PyTuple_GET_ITEM(identity, 0), "dev", &dev) < 0
                || unsigned_arg(PyTuple_GET_ITEM(identity, 1), "ino", &ino) < 0)
            return NULL;
        /* Only the walked blob's own by-hash name: no answer can make the
         * walker link from anywhere else. */
        char expected[SOURCE_NAME_SIZE];
        if (self->blobid == NULL || !by_hash_name(self->blobid, expected)
                || PyBytes_GET_SIZE(relpath) != SOURCE_NAME_SIZE - 1
                || memcmp(PyBytes_AS_STRING(relpath), expected, SOURCE_NAME_SIZE - 1) != 0) {
            PyErr_SetString(PyExc_ValueError, "relpath is not the walked blob's by-hash name (ab/cd/<blobid>)");
            return NULL;
        }
        memcpy(self->source_name_buffer, expected, SOURCE_NAME_SIZE);
        self->route.dev = dev;
        self->route.ino = ino;
    }
    self->usable = source != Py_None;
    self->waiting = 0;
    Py_RETURN_NONE;
}

PyDoc_STRVAR(Walker_resolved_doc,
"resolved(linked, expect_present)\n"
"--\n\n"
"Answer EVENT_PATH: whether the general route left the path correctly\n"
"linked, and whether the linker now expects links to be present.");

static PyObject *
Walker_resolved(Walker *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "resolved() takes exactly 2 arguments");
        return NULL;
    }
    if (walker_idle(self, "resolved") < 0)
        return NULL;
    /* Before the event is looked at: a __bool__ may call back (and answer it). */
    int linked = PyObject_IsTrue(args[0]);
    if (linked < 0)
        return NULL;
    int expect_present = PyObject_IsTrue(args[1]);
    if (expect_present < 0)
        return NULL;
    if (self->waiting != EVENT_PATH) {
        PyErr_SetString(PyExc_RuntimeError, "no EVENT_PATH to answer");
        return NULL;
    }
    self->linked += linked;
    self->index++;
    self->route.expect_present = self->probe || expect_present;
    self->waiting = 0;
    Py_RETURN_NONE;
}

PyDoc_STRVAR(Walker_results_doc,
"results() -> (linked, expected)\n"
"--\n\n"
"Dicts by blob ID: paths correctly linked (or, for count, found linked)\n"
"and paths catalogued, over every row walked.");

static PyObject *
Walker_results(Walker *self, PyObject *unused)
{
    (void)unused;
    if (self->route.directories == NULL || self->linked_by_blob == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "RangeWalker was not initialised");
        return NULL;
    }
    return PyTuple_Pack(2, self->linked_by_blob, self->expected_by_blob);
}

static PyObject *
Walker_get_created(Walker *self, void *closure)
{
    (void)closure;
    return PyLong_FromSsize_t(self->created);
}

static PyObject *
Walker_get_present(Walker *self, void *closure)
{
    (void)closure;
    return PyLong_FromSsize_t(self->present);
}

static PyObject *
Walker_get_blobid(Walker *self, void *closure)
{
    (void)closure;
    PyObject *blobid = self->blobid != NULL ? self->blobid : Py_None;
    Py_INCREF(blobid);
    return blobid;
}

static PyMethodDef Walker_methods[] = {
    {"start", (PyCFunction)Walker_start, METH_O, Walker_start_doc},
    {"step", (PyCFunction)Walker_step, METH_O, Walker_step_doc},
    {"set_source", (PyCFunction)Walker_set_source, METH_O, Walker_set_source_doc},
    {"resolved", (PyCFunction)(void (*)(void))Walker_resolved, METH_FASTCALL, Walker_resolved_doc},
    {"results", (PyCFunction)Walker_results, METH_NOARGS, Walker_results_doc},
    {"forget_directories", (PyCFunction)Walker_forget_directories, METH_NOARGS, Walker_forget_directories_doc},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Walker_getset[] = {
    {"created", (getter)Walker_get_created, NULL, "Links the fast route created.", NULL},
    {"present", (getter)Walker_get_present, NULL, "Links the fast route found present.", NULL},
    {"blobid", (getter)Walker_get_blobid, NULL, "The blob being walked (None before the first row).", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

PyDoc_STRVAR(Walker_doc,
"RangeWalker(directories, source_fd, root_fd, expect_present, listings=None,\n"
"            verified=None, probe=False, tick_every=1000)\n"
"--\n\n"
"Walks a range's (blobid, paths) rows through fast_route, handing Python an\n"
"event whenever its code is needed (see RelinkWork._walk_rows).\n"
"source_fd is the by-hash store's directory; probe (count) never links.\n"
"One walker serves a linker's ranges one after the other (start() each);\n"
"it indexes the descriptors it finds in directories (forget_directories()\n"
"before they close).");

static PyTypeObject WalkerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "relinker._speedups.RangeWalker",
    .tp_doc = Walker_doc,
    .tp_basicsize = sizeof(Walker),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Walker_init,
    .tp_dealloc = (destructor)Walker_dealloc,
    .tp_traverse = (traverseproc)Walker_traverse,
    .tp_clear = (inquiry)Walker_clear,
    .tp_free = PyObject_GC_Del,
    .tp_methods = Walker_methods,
    .tp_getset = Walker_getset,
};

static PyMethodDef speedups_methods[] = {
    {"fast_route", (PyCFunction)(void (*)(void))fast_route, METH_FASTCALL, fast_route_doc},
    {"lstat_identity", (PyCFunction)(void (*)(void))lstat_identity, METH_FASTCALL, lstat_identity_doc},
    {NULL, NULL, 0, NULL},
};

static int
speedups_exec(PyObject *module)
{
    if (syscall(SYS_getrandom, &name_hash_seed, sizeof name_hash_seed, 1 /* GRND_NONBLOCK */)
            != (long)sizeof name_hash_seed) {
        /* No entropy yet (early boot): unpredictable enough from outside. */
        struct timespec now;
        clock_gettime(CLOCK_REALTIME, &now);
        name_hash_seed = ((uint64_t)now.tv_sec * 1000000007ULL) ^ (uint64_t)now.tv_nsec
            ^ ((uint64_t)getpid() << 32) ^ (uint64_t)(uintptr_t)&now;
    }
    if (PyType_Ready(&ListingsType) < 0)
        return -1;
    Py_INCREF(&ListingsType);
    if (PyModule_AddObject(module, "DirectoryListings", (PyObject *)&ListingsType) < 0) {
        Py_DECREF(&ListingsType);
        return -1;
    }
    if (PyType_Ready(&WalkerType) < 0)
        return -1;
    Py_INCREF(&WalkerType);
    if (PyModule_AddObject(module, "RangeWalker", (PyObject *)&WalkerType) < 0) {
        Py_DECREF(&WalkerType);
        return -1;
    }
    if (PyModule_AddIntConstant(module, "EVENT_TICK", EVENT_TICK) < 0
            || PyModule_AddIntConstant(module, "EVENT_SOURCE", EVENT_SOURCE) < 0
            || PyModule_AddIntConstant(module, "EVENT_PATH", EVENT_PATH) < 0)
        return -1;
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
