/* librrto_preload.so: rrto's LD_PRELOAD shim.
 *
 * Two jobs, both opt-in by environment so that the library is inert in any other program:
 *
 * 1. Python activation. In a process with a Python interpreter linked in, a constructor
 *    prepends rrto's bootstrap folder to PYTHONPATH before the interpreter reads it. That
 *    folder holds only a sitecustomize.py, which offloads the process (rrto.enable()) when it
 *    imports torch and then runs the sitecustomize the environment already had. Any other
 *    program (bash, ls, roslaunch's C++ nodes) is left exactly as it was.
 *
 * 2. CUDA driver-call tracing, only with RRTO_TRACE_CUDA=1. PyTorch wheels link the CUDA
 *    runtime statically; it dlopens libcuda and fetches every driver entry point through
 *    dlsym and cuGetProcAddress. We interpose dlsym, and hand back counting wrappers for the
 *    entry points that a CUDA-API remoting system would turn into messages: kernel and graph
 *    launches, copies, memsets, allocations, frees, synchronisations and event calls.
 *    Python reads the counters through cffi (rrto/preload/__init__.py).
 *
 * Build: rrto/preload/__init__.py compiles this with cffi's compiler driver and
 * -DRRTO_BOOTSTRAP_DIR=<absolute path of rrto/preload/bootstrap>.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifndef RRTO_BOOTSTRAP_DIR
#error "compile with -DRRTO_BOOTSTRAP_DIR=\"/abs/path/to/rrto/preload/bootstrap\""
#endif

#define EXPORT __attribute__((visibility("default")))

static int tracing;  /* set once by the constructor; nothing is wrapped while it is 0 */

/* ---------------------------------------------------------------- Python activation */

static void *lookup(void *handle, const char *name);

static void prepend_bootstrap_to_pythonpath(void) {
    const char *dir = RRTO_BOOTSTRAP_DIR;
    const char *old = getenv("PYTHONPATH");
    size_t n = strlen(dir);
    /* A Python child of a Python process inherits the entry: don't stack copies of it. */
    if (old && strncmp(old, dir, n) == 0 && (old[n] == ':' || old[n] == '\0'))
        return;
    if (!old || !*old) {
        setenv("PYTHONPATH", dir, 1);
        return;
    }
    size_t len = n + 1 + strlen(old) + 1;
    char *value = malloc(len);
    if (!value)
        return;
    memcpy(value, dir, n);
    value[n] = ':';
    memcpy(value + n + 1, old, strlen(old) + 1);
    setenv("PYTHONPATH", value, 1);
    free(value);
}

__attribute__((constructor)) static void rrto_preload_init(void) {
    /* Py_BytesMain is exported by every CPython >= 3.8 interpreter (static or shared libpython)
       and by nothing that doesn't carry one; checking the executable's name would miss
       embedders and venv launchers with other names. */
    if (lookup(RTLD_DEFAULT, "Py_BytesMain"))
        prepend_bootstrap_to_pythonpath();
    const char *t = getenv("RRTO_TRACE_CUDA");
    tracing = t && strcmp(t, "1") == 0;
}

/* ---------------------------------------------------------------- CUDA driver tracing */

typedef int CUresult;
typedef uintptr_t U;  /* every argument of the traced entry points is an integer or a pointer */

/* name, kind, number of arguments. Forwarding by arity with integer-register arguments is
   exact on x86-64 and aarch64 Linux, for the _v2/_ptsz variants of a name too: they differ
   only in argument width, and each argument travels in its own 64-bit register or stack slot. */
#define TRACED(X)                                                                          \
    X(cuLaunchKernel, launch, 11) X(cuLaunchKernelEx, launch, 4)                           \
    X(cuLaunchCooperativeKernel, launch, 10) X(cuGraphLaunch, graph, 2)                    \
    X(cuMemcpy, copy, 3) X(cuMemcpyAsync, copy, 4)                                         \
    X(cuMemcpyHtoD, copy, 3) X(cuMemcpyHtoDAsync, copy, 4)                                 \
    X(cuMemcpyDtoH, copy, 3) X(cuMemcpyDtoHAsync, copy, 4)                                 \
    X(cuMemcpyDtoD, copy, 3) X(cuMemcpyDtoDAsync, copy, 4)                                 \
    X(cuMemcpyPeer, copy, 5) X(cuMemcpyPeerAsync, copy, 6)                                 \
    X(cuMemcpy2D, copy, 1) X(cuMemcpy2DAsync, copy, 2) X(cuMemcpy2DUnaligned, copy, 1)     \
    X(cuMemcpy3D, copy, 1) X(cuMemcpy3DAsync, copy, 2)                                     \
    X(cuMemsetD8, memset, 3) X(cuMemsetD8Async, memset, 4)                                 \
    X(cuMemsetD16, memset, 3) X(cuMemsetD16Async, memset, 4)                               \
    X(cuMemsetD32, memset, 3) X(cuMemsetD32Async, memset, 4)                               \
    X(cuMemAlloc, alloc, 2) X(cuMemAllocAsync, alloc, 3)                                   \
    X(cuMemAllocFromPoolAsync, alloc, 4) X(cuMemAllocManaged, alloc, 3)                    \
    X(cuMemAllocPitch, alloc, 5) X(cuMemAllocHost, alloc, 2) X(cuMemHostAlloc, alloc, 3)   \
    X(cuMemFree, free, 1) X(cuMemFreeAsync, free, 2) X(cuMemFreeHost, free, 1)             \
    X(cuStreamSynchronize, sync, 1) X(cuCtxSynchronize, sync, 0)                           \
    X(cuEventSynchronize, sync, 1)                                                         \
    X(cuEventRecord, event, 2) X(cuEventRecordWithFlags, event, 3)                         \
    X(cuEventQuery, event, 1) X(cuStreamQuery, event, 1) X(cuStreamWaitEvent, event, 3)    \
    X(cuGetProcAddress, lookup, 5)

enum {
#define INDEX(name, kind, n) I_##name,
    TRACED(INDEX)
#undef INDEX
    N_TRACED
};

static const char *const names[N_TRACED] = {
#define NAME(name, kind, n) #name,
    TRACED(NAME)
#undef NAME
};
static const char *const kinds[N_TRACED] = {
#define KIND(name, kind, n) #kind,
    TRACED(KIND)
#undef KIND
};

static unsigned long long calls[N_TRACED];
static unsigned long long wrapped;  /* entry points handed out wrapped: 0 means no driver was reached */

/* One name can resolve to several real functions (legacy vs per-thread default stream, v1 vs
   v2 by requested CUDA version), so each name has a few slots, each with its own wrapper. */
#define SLOTS 4
static void *real[N_TRACED][SLOTS];

#define P0 void
#define P1 U a0
#define P2 P1, U a1
#define P3 P2, U a2
#define P4 P3, U a3
#define P5 P4, U a4
#define P6 P5, U a5
#define P7 P6, U a6
#define P8 P7, U a7
#define P9 P8, U a8
#define P10 P9, U a9
#define P11 P10, U a10
#define A0
#define A1 a0
#define A2 A1, a1
#define A3 A2, a2
#define A4 A3, a3
#define A5 A4, a4
#define A6 A5, a5
#define A7 A6, a6
#define A8 A7, a7
#define A9 A8, a8
#define A10 A9, a9
#define A11 A10, a10

#define COUNT(i) __atomic_fetch_add(&calls[i], 1, __ATOMIC_RELAXED)
#define REAL(i, k, n) ((CUresult(*)(P##n))__atomic_load_n(&real[i][k], __ATOMIC_ACQUIRE))

#define WRAPPER(name, n, k)                                 \
    static CUresult name##_w##k(P##n) {                     \
        COUNT(I_##name);                                    \
        return REAL(I_##name, k, n)(A##n);                  \
    }
#define WRAPPERS(name, kind, n) \
    WRAPPER(name, n, 0) WRAPPER(name, n, 1) WRAPPER(name, n, 2) WRAPPER(name, n, 3)

static void *wrap(const char *name, void *fn);

/* cuGetProcAddress is where PyTorch's runtime finds everything else: its results are wrapped
   too. One 5-argument wrapper serves both versions: v1 (4 arguments) ignores the fifth, and a
   slot only ever holds the version its callers asked for. */
#define LOOKUP_WRAPPER(k)                                                               \
    static CUresult cuGetProcAddress_w##k(P5) {                                         \
        COUNT(I_cuGetProcAddress);                                                      \
        CUresult r = REAL(I_cuGetProcAddress, k, 5)(A5);                                \
        void **pfn = (void **)a1;                                                       \
        if (r == 0 && pfn && *pfn)                                                      \
            *pfn = wrap((const char *)a0, *pfn);                                        \
        return r;                                                                       \
    }
LOOKUP_WRAPPER(0) LOOKUP_WRAPPER(1) LOOKUP_WRAPPER(2) LOOKUP_WRAPPER(3)

/* Counting wrappers for every traced name but cuGetProcAddress, which has its own above. */
#define DEFINE_UNLESS_LOOKUP(name, kind, n) DEFINE_##kind(name, kind, n)
#define DEFINE_launch WRAPPERS
#define DEFINE_graph WRAPPERS
#define DEFINE_copy WRAPPERS
#define DEFINE_memset WRAPPERS
#define DEFINE_alloc WRAPPERS
#define DEFINE_free WRAPPERS
#define DEFINE_sync WRAPPERS
#define DEFINE_event WRAPPERS
#define DEFINE_lookup(...)
TRACED(DEFINE_UNLESS_LOOKUP)

static void *const wrappers[N_TRACED][SLOTS] = {
#define ROW(name, kind, n) {(void *)name##_w0, (void *)name##_w1, (void *)name##_w2, (void *)name##_w3},
    TRACED(ROW)
#undef ROW
};

/* "cuMemcpyDtoH_v2_ptds" and "cuMemcpyDtoH" count as one entry point. */
static int traced_index(const char *name) {
    if (name[0] != 'c' || name[1] != 'u')
        return -1;
    size_t n = strlen(name);
    static const char *const suffixes[] = {"_ptsz", "_ptds", "_v2", "_v3"};
    for (int again = 1; again;) {
        again = 0;
        for (size_t s = 0; s < sizeof suffixes / sizeof *suffixes; s++) {
            size_t m = strlen(suffixes[s]);
            if (n > m && strncmp(name + n - m, suffixes[s], m) == 0) {
                n -= m;
                again = 1;
            }
        }
    }
    for (int i = 0; i < N_TRACED; i++)
        if (strlen(names[i]) == n && strncmp(names[i], name, n) == 0)
            return i;
    return -1;
}

static void *wrap(const char *name, void *fn) {
    int i = traced_index(name);
    if (i < 0 || !fn)
        return fn;
    for (int k = 0; k < SLOTS; k++) {
        void *expected = NULL;
        if (__atomic_load_n(&real[i][k], __ATOMIC_ACQUIRE) == fn ||
            __atomic_compare_exchange_n(&real[i][k], &expected, fn, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE) ||
            expected == fn) {
            __atomic_fetch_add(&wrapped, 1, __ATOMIC_RELAXED);
            return wrappers[i][k];
        }
    }
    return fn;  /* more variants than slots: still correct, just not counted */
}

/* ---------------------------------------------------------------- dlsym interposition */

typedef void *(*dlsym_fn)(void *, const char *);
static dlsym_fn real_dlsym;

static void *lookup(void *handle, const char *name) {
    dlsym_fn f = __atomic_load_n(&real_dlsym, __ATOMIC_ACQUIRE);
    if (!f) {
        /* dlsym is versioned: GLIBC_2.34 since it moved into libc, the older ones per arch. */
        static const char *const versions[] = {"GLIBC_2.34", "GLIBC_2.2.5", "GLIBC_2.17", "GLIBC_2.0"};
        for (size_t v = 0; !f && v < sizeof versions / sizeof *versions; v++)
            f = (dlsym_fn)dlvsym(RTLD_NEXT, "dlsym", versions[v]);
        __atomic_store_n(&real_dlsym, f, __ATOMIC_RELEASE);
    }
    return f ? f(handle, name) : NULL;
}

EXPORT void *dlsym(void *handle, const char *name) {
    /* The untraced path must be a tail jump: glibc resolves RTLD_NEXT relative to the code that
       called dlsym (its return address), and a jump leaves the caller's return address in
       place. -O2 and -foptimize-sibling-calls in the build make it one; a test checks that an
       RTLD_NEXT interposer still works under the shim. */
    if (!tracing || handle == RTLD_NEXT || name[0] != 'c' || name[1] != 'u')
        return lookup(handle, name);
    return wrap(name, lookup(handle, name));
}

/* ---------------------------------------------------------------- read from Python (cffi) */

EXPORT int rrto_trace_enabled(void) { return tracing; }
EXPORT int rrto_trace_count(void) { return N_TRACED; }
EXPORT const char *rrto_trace_name(int i) { return i >= 0 && i < N_TRACED ? names[i] : NULL; }
EXPORT const char *rrto_trace_kind(int i) { return i >= 0 && i < N_TRACED ? kinds[i] : NULL; }
EXPORT unsigned long long rrto_trace_wrapped(void) { return __atomic_load_n(&wrapped, __ATOMIC_RELAXED); }

/* Copies up to n counters into out; returns how many it copied. */
EXPORT int rrto_trace_snapshot(unsigned long long *out, int n) {
    int m = n < N_TRACED ? n : N_TRACED;
    for (int i = 0; i < m; i++)
        out[i] = __atomic_load_n(&calls[i], __ATOMIC_RELAXED);
    return m;
}
