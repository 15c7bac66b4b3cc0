/*
 * A native connector in C that misbehaves on request, for the agent's tests. app_id misbehave_c.
 *   echo      answers {"response":{}}
 *   segfault  writes through a null pointer
 *   double    completes the same call twice (the host must keep the first, ignore the second)
 * Built three ways by tests/build.rs: as is; with -DTEST_ABI_MAJOR=2 (a header claiming another
 * ABI major); with -DTEST_NO_ENTRY (no lumos_connector_entry_v1 symbol).
 */
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

static int32_t init(const lumos_host_api *host, void **ctx) {
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
