/*
 * lumos_connector.h: the stable C ABI between lumos-agent and native connectors (cdylibs).
 *
 * Any language that can export a C function can implement a connector. The rules:
 *
 *  1. ONE ENTRY SYMBOL, versioned by name: `lumos_connector_entry_v1` (the ABI major is in the
 *     name). It returns a pointer to a static, immutable lumos_plugin_header. Calling it must
 *     have NO side effects: no threads, no I/O, no allocation that matters. The host may call it
 *     in a throw-away process just to read the header.
 *  2. HOST SERVICES COME IN A FUNCTION TABLE (lumos_host_api) passed to init(). The plugin links
 *     no symbol of the host.
 *  3. ONLY BORROWED (ptr, len) DATA CROSSES the boundary (lumos_bytes). The receiver copies what
 *     it keeps. Nothing is ever freed on the other side. Borrowed data is valid only for the
 *     duration of the function call that passes it.
 *  4. CALLS ARE COMPLETION-BASED: start_call() returns at once; the plugin later calls
 *     host->complete() EXACTLY ONCE for that call id, from any thread. cancel_call() asks for an
 *     early completion (status LUMOS_STATUS_CANCELLED). The deadline is advisory for the plugin;
 *     the host enforces it regardless. So any language and any async runtime works inside.
 *  5. STRUCTS ARE APPEND-ONLY and start with their own `size`. A newer side reads only the
 *     fields that fit the size the other side declared. ABI minor versions only append.
 *  6. NO UNWINDING CROSSES THE BOUNDARY: C++ exceptions, Rust panics and longjmp must be caught
 *     inside every exported function. (The Rust SDK does this and reports LUMOS_STATUS_PANIC.)
 *  7. A LIBRARY IS NEVER UNLOADED (no dlclose: unsound with thread-local destructors). The host
 *     isolates and hot-replaces plugins with worker processes instead.
 *
 * Compiles with: cc -std=c11 -Wall -Wextra -Werror
 */
#ifndef LUMOS_CONNECTOR_H
#define LUMOS_CONNECTOR_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* "LUMOSCAB" */
#define LUMOS_ABI_MAGIC UINT64_C(0x4C554D4F53434142)
#define LUMOS_ABI_MAJOR 1
#define LUMOS_ABI_MINOR 0
#define LUMOS_ENTRY_SYMBOL "lumos_connector_entry_v1"

/* Borrowed bytes: valid for the duration of the call that passes them. Text is UTF-8. */
typedef struct lumos_bytes {
    const uint8_t *ptr;
    size_t len;
} lumos_bytes;

/* How a call completed. With OK and ERROR the output is a Lumos connector JSON document
 * ({"response": ...} or {"is_error": true, "error": {...}}). */
enum lumos_status {
    LUMOS_STATUS_OK = 0,        /* output: the answer */
    LUMOS_STATUS_ERROR = 1,     /* output: an error document in the Lumos shape */
    LUMOS_STATUS_CANCELLED = 2, /* after cancel_call; output ignored */
    LUMOS_STATUS_PANIC = 3      /* the plugin caught a panic/exception; its state may be corrupt */
};

enum lumos_log_level {
    LUMOS_LOG_ERROR = 1,
    LUMOS_LOG_WARN = 2,
    LUMOS_LOG_INFO = 3,
    LUMOS_LOG_DEBUG = 4
};

/* Services the host gives the plugin at init. Valid until shutdown() returns. */
typedef struct lumos_host_api {
    uint32_t size; /* sizeof(lumos_host_api) as the host built it */
    uint32_t reserved;
    void *host_ctx; /* pass back as the first argument of every function below */
    /* A log line. Never include secrets. */
    void (*log)(void *host_ctx, uint32_t level, lumos_bytes message);
    /* Completes a started call, exactly once, from any thread. `output` is borrowed. */
    void (*complete)(void *host_ctx, uint64_t call_id, uint32_t status, lumos_bytes output);
} lumos_host_api;

/* One capability call. Borrowed for the duration of start_call(). */
typedef struct lumos_call {
    uint32_t size; /* sizeof(lumos_call) as the host built it */
    uint32_t reserved;
    uint64_t call_id;
    lumos_bytes capability; /* e.g. "list_accounts" */
    lumos_bytes input;      /* the Lumos envelope: {"request", "settings", "auth" | "credentials", "page", ...} */
    uint64_t deadline_unix_ms; /* 0: none */
} lumos_call;

/* The plugin's functions. All may be called from any host thread. */
typedef struct lumos_plugin_api {
    uint32_t size; /* sizeof(lumos_plugin_api) as the plugin built it */
    uint32_t reserved;
    /* Called once before anything else. Returns 0 on success and sets *plugin_ctx. */
    int32_t (*init)(const lumos_host_api *host, void **plugin_ctx);
    /* The connector's `info` response object as JSON ({"app_id", "version", "capabilities", ...}).
     * Borrowed; valid until shutdown(). */
    lumos_bytes (*info)(void *plugin_ctx);
    /* Starts a call. Returns 0 if accepted (complete() will follow exactly once), non-zero if
     * refused (no complete() follows). Must not block on the call's work. */
    int32_t (*start_call)(void *plugin_ctx, const lumos_call *call);
    /* Asks a started call to finish early. Unknown or finished call ids are ignored. */
    void (*cancel_call)(void *plugin_ctx, uint64_t call_id);
    /* Called once, last; no call is in flight. The library stays loaded. */
    void (*shutdown)(void *plugin_ctx);
} lumos_plugin_api;

/* The static header returned by the entry symbol. */
typedef struct lumos_plugin_header {
    uint64_t magic;     /* LUMOS_ABI_MAGIC */
    uint32_t abi_major; /* LUMOS_ABI_MAJOR the plugin was built against */
    uint32_t abi_minor;
    uint32_t header_size;     /* sizeof(lumos_plugin_header) as the plugin built it */
    uint32_t plugin_api_size; /* sizeof(lumos_plugin_api) as the plugin built it */
    lumos_bytes plugin_id;      /* the connector's app_id */
    lumos_bytes plugin_version; /* its version */
    lumos_bytes build_info;     /* free text: compiler, commit, date */
    const lumos_plugin_api *api;
} lumos_plugin_header;

/* The one exported symbol. Must be side-effect free. */
typedef const lumos_plugin_header *(*lumos_connector_entry_fn)(void);
const lumos_plugin_header *lumos_connector_entry_v1(void);

#ifdef __cplusplus
}
#endif

#endif /* LUMOS_CONNECTOR_H */
