/* The C half of the VDDK stand-in.
 *
 * 1. standin_log() calls a VDDK log callback the way VDDK does: with a printf format and a
 *    started va_list. Stable Rust can call a variadic C function but cannot define one, so
 *    this is the one place that creates a va_list.
 * 2. The struct layouts of vixDiskLib.h (VDDK 7), declared here in C and checked with
 *    _Static_assert against the sizes and offsets the Rust declarations also assert, so gcc
 *    itself confirms the numbers both sides rely on.
 */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

typedef void (*VixDiskLibGenericLogFunc)(const char *fmt, va_list args);

void standin_log(VixDiskLibGenericLogFunc func, const char *fmt, ...)
{
    va_list args;
    if (func == NULL)
        return;
    va_start(args, fmt);
    func(fmt, args);
    va_end(args);
}

typedef struct { char *userName; char *password; } VixDiskLibUidPasswdCreds;
typedef struct { char *cookie; char *userName; char *key; } VixDiskLibSessionIdCreds;
typedef struct { char *id; char *datastoreMoRef; char *ssId; } VixDiskLibVStorageObjectSpec;
typedef enum { VIXDISKLIB_CRED_UID = 1, VIXDISKLIB_CRED_UNKNOWN = 256 } VixDiskLibCredType;
typedef enum { VIXDISKLIB_SPEC_VMX = 0, VIXDISKLIB_SPEC_UNKNOWN = 2 } VixDiskLibSpecType;

typedef struct {
    char *vmxSpec;
    char *serverName;
    char *thumbPrint;
    long reserved1;
    VixDiskLibCredType credType;
    union {
        VixDiskLibUidPasswdCreds uid;
        VixDiskLibSessionIdCreds sessionId;
        void *reserved2;
    } creds;
    uint32_t port;
    uint32_t nfcHostPort;
    char *reserved3;
    char reserved4[8];
    void *reserved5;
    union { VixDiskLibVStorageObjectSpec vStorageObjSpec; } spec;
    VixDiskLibSpecType specType;
} VixDiskLibConnectParams;

typedef struct { uint32_t cylinders; uint32_t heads; uint32_t sectors; } VixDiskLibGeometry;

typedef struct {
    VixDiskLibGeometry biosGeo;
    VixDiskLibGeometry physGeo;
    uint64_t capacity;
    int adapterType;
    int numLinks;
    char *parentFileNameHint;
    char *uuid;
    uint32_t logicalSectorSize;
    uint32_t physicalSectorSize;
} VixDiskLibInfo;

typedef struct { uint64_t offset; uint64_t length; } VixDiskLibBlock;
typedef struct { uint32_t numBlocks; VixDiskLibBlock blocks[1]; } VixDiskLibBlockList;

typedef struct {
    int diskType;
    int adapterType;
    uint16_t hwVersion;
    uint64_t capacity;
    uint32_t logicalSectorSize;
    uint32_t physicalSectorSize;
} VixDiskLibCreateParams;

#if defined(__LP64__)
_Static_assert(sizeof(VixDiskLibConnectParams) == 128, "ConnectParams size");
_Static_assert(offsetof(VixDiskLibConnectParams, credType) == 32, "credType");
_Static_assert(offsetof(VixDiskLibConnectParams, creds) == 40, "creds");
_Static_assert(offsetof(VixDiskLibConnectParams, port) == 64, "port");
_Static_assert(offsetof(VixDiskLibConnectParams, nfcHostPort) == 68, "nfcHostPort");
_Static_assert(offsetof(VixDiskLibConnectParams, reserved3) == 72, "reserved3");
_Static_assert(offsetof(VixDiskLibConnectParams, reserved4) == 80, "reserved4");
_Static_assert(offsetof(VixDiskLibConnectParams, reserved5) == 88, "reserved5");
_Static_assert(offsetof(VixDiskLibConnectParams, spec) == 96, "spec");
_Static_assert(offsetof(VixDiskLibConnectParams, specType) == 120, "specType");
_Static_assert(sizeof(VixDiskLibInfo) == 64, "Info size");
_Static_assert(offsetof(VixDiskLibInfo, capacity) == 24, "capacity");
_Static_assert(offsetof(VixDiskLibInfo, adapterType) == 32, "adapterType");
_Static_assert(offsetof(VixDiskLibInfo, numLinks) == 36, "numLinks");
_Static_assert(offsetof(VixDiskLibInfo, parentFileNameHint) == 40, "parentFileNameHint");
_Static_assert(offsetof(VixDiskLibInfo, uuid) == 48, "uuid");
_Static_assert(offsetof(VixDiskLibInfo, logicalSectorSize) == 56, "logicalSectorSize");
_Static_assert(offsetof(VixDiskLibInfo, physicalSectorSize) == 60, "physicalSectorSize");
_Static_assert(sizeof(VixDiskLibBlock) == 16, "Block size");
_Static_assert(offsetof(VixDiskLibBlockList, blocks) == 8, "blocks");
_Static_assert(sizeof(VixDiskLibCreateParams) == 32, "CreateParams size");
_Static_assert(offsetof(VixDiskLibCreateParams, capacity) == 16, "CreateParams capacity");
#endif

/* Handy for the Rust side to confirm it links against this translation unit's view. */
size_t standin_connect_params_size(void) { return sizeof(VixDiskLibConnectParams); }
