/*
 * A native connector in C that misbehaves on request, for the agent's tests. app_id misbehave_c.
 *   echo      answers {"response":{}}
 *   segfault  writes through a null pointer
 *   double    completes the same call twice (the host must keep the first, ignore the second)
 * Built four ways by tests/build.rs: as is; with -DTEST_ABI_MAJOR=2 (a header claiming another
 * ABI major); with -DTEST_NO_ENTRY (no lumos_connector_entry_v1 symbol); with
 * -DTEST_HANG_IN_PROCESS (its init never returns, except in a worker: `plugin-host` in the
 * process's command line; Linux only).
 */
#ifdef TEST_HANG_IN_PROCESS
#define _POSIX_C_SOURCE 200809L
#include <stdio.h>
#include <unistd.h>
#endif

#include "lumos_connector.h"

#include <stddef.h>
#include <string.h>

#ifndef TEST_ABI_MAJOR
#define TEST_ABI_MAJOR LUMOS_ABI_MAJOR
#endif

static lumos_host_api HOST;
static const char INFO[] = "{\"app_id\":\"misbehave_c\",\"version\":\"1.0.0\",\"capabilities\":[\"echo\",\"segfault\",\"double\"]}";

static lumos_bytes text(const char *s) {
    lumos_bytes b = {(const uint8_t *)s, strlen(s)};
    return b;
}

#ifdef TEST_HANG_IN_PROCESS
/* Whether this process is a worker: its NUL-separated command line has the word plugin-host. */
static int in_worker(void) {
    char line[4096];
    FILE *f = fopen("/proc/self/cmdline", "rb");
    if (f == NULL) {
        return 0;
    }
    size_t n = fread(line, 1, sizeof line, f);
    fclose(f);
    for (size_t i = 0; i + 11 <= n; i++) {
        if (memcmp(line + i, "plugin-host", 11) == 0) {
            return 1;
        }
    }
    return 0;
}
#endif

static int32_t init(const lumos_host_api *host, void **ctx) {
#ifdef TEST_HANG_IN_PROCESS
    while (!in_worker()) {
        sleep(1);
    }
#endif
    HOST = *host;
    *ctx = &HOST;
    return 0;
}

static lumos_bytes info(void *ctx) {
    (void)ctx;
    return text(INFO);
}

static int32_t start_call(void *ctx, const lumos_call *call) {
    (void)ctx;
    const char *cap = (const char *)call->capability.ptr;
    size_t n = call->capability.len;
    if (n == 8 && memcmp(cap, "segfault", 8) == 0) {
        volatile int *nowhere = NULL;
        *nowhere = 1;
    } else if (n == 6 && memcmp(cap, "double", 6) == 0) {
        HOST.complete(HOST.host_ctx, call->call_id, LUMOS_STATUS_OK, text("{\"response\":\"first\"}"));
        HOST.complete(HOST.host_ctx, call->call_id, LUMOS_STATUS_OK, text("{\"response\":\"second\"}"));
        return 0;
    }
    HOST.complete(HOST.host_ctx, call->call_id, LUMOS_STATUS_OK, text("{\"response\":{}}"));
    return 0;
}

static void cancel_call(void *ctx, uint64_t id) {
    (void)ctx;
    (void)id;
}

static void shutdown(void *ctx) { (void)ctx; }

static const lumos_plugin_api API = {sizeof(lumos_plugin_api), 0, init, info, start_call, cancel_call, shutdown};
static const lumos_plugin_header HEADER = {
    LUMOS_ABI_MAGIC, TEST_ABI_MAJOR, LUMOS_ABI_MINOR, sizeof(lumos_plugin_header), sizeof(lumos_plugin_api),
    {(const uint8_t *)"misbehave_c", 11}, {(const uint8_t *)"1.0.0", 5}, {(const uint8_t *)"c11 test", 8}, &API};

#ifdef TEST_NO_ENTRY
const lumos_plugin_header *lumos_connector_entry_v2(void) { return &HEADER; }
#else
const lumos_plugin_header *lumos_connector_entry_v1(void) { return &HEADER; }
#endif
