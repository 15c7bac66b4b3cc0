/*
 * The example Lumos connector in plain C, through the C ABI (lumos_connector.h): proof that the
 * ABI is really C. Same capabilities and answers as the Rust examples:
 *   validate_credentials: unique_tenant_id = first 16 hex chars of sha256(OAuth access token)
 *   list_accounts: request.count synthetic accounts (default 10), paged by page.size/page.token
 * It scans the envelope for the few keys it needs instead of parsing JSON in full: enough for an
 * example, not a pattern for production connectors.
 */
#include "lumos_connector.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char APP_ID[] = "lumos_example_c";
static const char VERSION[] = "0.1.0";
static const char INFO[] =
    "{\"app_id\":\"lumos_example_c\",\"version\":\"0.1.0\","
    "\"user_friendly_name\":\"Lumos example connector (C)\","
    "\"description\":\"The example connector written in C against the Lumos connector ABI.\","
    "\"capabilities\":[\"list_accounts\",\"validate_credentials\"],"
    "\"capability_schema\":{},\"credentials_schema\":[],\"request_settings_schema\":{},"
    "\"entitlement_types\":[],\"resource_types\":[]}";

/* ---- SHA-256 (FIPS 180-4), small and self-contained ---------------------------------------- */

static const uint32_t K[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2};

#define ROTR(x, n) (((x) >> (n)) | ((x) << (32 - (n))))

static void sha256_block(uint32_t h[8], const uint8_t block[64]) {
    uint32_t w[64];
    for (int i = 0; i < 16; i++) {
        w[i] = (uint32_t)block[4 * i] << 24 | (uint32_t)block[4 * i + 1] << 16 |
               (uint32_t)block[4 * i + 2] << 8 | (uint32_t)block[4 * i + 3];
    }
    for (int i = 16; i < 64; i++) {
        uint32_t s0 = ROTR(w[i - 15], 7) ^ ROTR(w[i - 15], 18) ^ (w[i - 15] >> 3);
        uint32_t s1 = ROTR(w[i - 2], 17) ^ ROTR(w[i - 2], 19) ^ (w[i - 2] >> 10);
        w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    uint32_t a = h[0], b = h[1], c = h[2], d = h[3], e = h[4], f = h[5], g = h[6], k = h[7];
    for (int i = 0; i < 64; i++) {
        uint32_t t1 = k + (ROTR(e, 6) ^ ROTR(e, 11) ^ ROTR(e, 25)) + ((e & f) ^ (~e & g)) + K[i] + w[i];
        uint32_t t2 = (ROTR(a, 2) ^ ROTR(a, 13) ^ ROTR(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
        k = g; g = f; f = e; e = d + t1; d = c; c = b; b = a; a = t1 + t2;
    }
    h[0] += a; h[1] += b; h[2] += c; h[3] += d; h[4] += e; h[5] += f; h[6] += g; h[7] += k;
}

static void sha256_hex(const uint8_t *data, size_t len, char out[65]) {
    uint32_t h[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                     0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
    uint8_t block[64];
    size_t i = 0;
    for (; i + 64 <= len; i += 64) sha256_block(h, data + i);
    size_t rest = len - i;
    memset(block, 0, sizeof block);
    memcpy(block, data + i, rest);
    block[rest] = 0x80;
    if (rest >= 56) {
        sha256_block(h, block);
        memset(block, 0, sizeof block);
    }
    uint64_t bits = (uint64_t)len * 8;
    for (int j = 0; j < 8; j++) block[63 - j] = (uint8_t)(bits >> (8 * j));
    sha256_block(h, block);
    for (int j = 0; j < 8; j++) snprintf(out + 8 * j, 9, "%08x", (unsigned)h[j]);
}

/* ---- just enough JSON scanning ----------------------------------------------------------------- */

/* Finds `"key"` followed by `:` and returns a pointer to the value, or NULL. */
static const char *find_value(const char *json, size_t len, const char *key) {
    size_t klen = strlen(key);
    for (size_t i = 0; i + klen + 2 <= len; i++) {
        if (json[i] == '"' && memcmp(json + i + 1, key, klen) == 0 && json[i + 1 + klen] == '"') {
            size_t j = i + klen + 2;
            while (j < len && (json[j] == ' ' || json[j] == '\n' || json[j] == '\t' || json[j] == '\r')) j++;
            if (j < len && json[j] == ':') {
                j++;
                while (j < len && (json[j] == ' ' || json[j] == '\n' || json[j] == '\t' || json[j] == '\r')) j++;
                return json + j;
            }
        }
    }
    return NULL;
}

/* Copies a JSON string value (without escapes) into out; returns its length or -1. */
static long string_value(const char *value, const char *end, char *out, size_t cap) {
    if (value == NULL || value >= end || *value != '"') return -1;
    size_t n = 0;
    for (const char *p = value + 1; p < end; p++) {
        if (*p == '"') {
            out[n] = '\0';
            return (long)n;
        }
        if (*p == '\\' || n + 1 >= cap) return -1;
        out[n++] = *p;
    }
    return -1;
}

static long number_value(const char *value, const char *end, long fallback) {
    if (value == NULL || value >= end || *value < '0' || *value > '9') return fallback;
    return strtol(value, NULL, 10);
}

/* ---- the connector ------------------------------------------------------------------------------ */

static lumos_host_api HOST;

static lumos_bytes bytes_of(const char *s, size_t len) {
    lumos_bytes b = {(const uint8_t *)s, len};
    return b;
}

static void complete_error(uint64_t id, const char *code, const char *message) {
    char buf[512];
    int n = snprintf(buf, sizeof buf,
                     "{\"is_error\":true,\"error\":{\"message\":\"%s\",\"error_code\":\"lumos_example_c.%s\","
                     "\"app_id\":\"lumos_example_c\",\"error_metadata\":{\"fault\":\"client\",\"retryable\":false,"
                     "\"refreshable\":false}},\"response\":null,\"raw_data\":null}",
                     message, code);
    HOST.complete(HOST.host_ctx, id, LUMOS_STATUS_ERROR, bytes_of(buf, (size_t)n));
}

static void validate_credentials(uint64_t id, const char *in, size_t len) {
    char token[4096];
    long n = string_value(find_value(in, len, "access_token"), in + len, token, sizeof token);
    if (n < 0) {
        complete_error(id, "missing_credentials", "no OAuth access token in auth.oauth or credentials[].oauth");
        return;
    }
    char hex[65];
    sha256_hex((const uint8_t *)token, (size_t)n, hex);
    hex[16] = '\0';
    char out[160];
    int m = snprintf(out, sizeof out,
                     "{\"response\":{\"valid\":true,\"unique_tenant_id\":\"%s\"},\"page\":null,\"raw_data\":null}", hex);
    HOST.complete(HOST.host_ctx, id, LUMOS_STATUS_OK, bytes_of(out, (size_t)m));
}

static void list_accounts(uint64_t id, const char *in, size_t len) {
    const char *end = in + len;
    long count = number_value(find_value(in, len, "count"), end, 10);
    long size = number_value(find_value(in, len, "size"), end, 100);
    if (size < 1) size = 1;
    long start = 0;
    char token[64];
    if (string_value(find_value(in, len, "token"), end, token, sizeof token) >= 0) {
        if (strncmp(token, "offset:", 7) != 0) {
            complete_error(id, "bad_request", "bad page token");
            return;
        }
        start = strtol(token + 7, NULL, 10);
    }
    long stop = start + size < count ? start + size : count;
    size_t cap = 128 + (size_t)(stop > start ? stop - start : 0) * 220;
    char *out = malloc(cap);
    if (out == NULL) {
        complete_error(id, "internal", "out of memory");
        return;
    }
    size_t n = (size_t)snprintf(out, cap, "{\"response\":[");
    for (long i = start; i < stop; i++) {
        n += (size_t)snprintf(out + n, cap - n,
                              "%s{\"integration_specific_id\":\"user-%ld\",\"email\":\"user%ld@example.invalid\","
                              "\"given_name\":\"User\",\"family_name\":\"%ld\",\"username\":\"user%ld\","
                              "\"user_status\":\"ACTIVE\"}",
                              i == start ? "" : ",", i, i, i, i);
    }
    if (stop < count) {
        n += (size_t)snprintf(out + n, cap - n, "],\"page\":{\"token\":\"offset:%ld\",\"size\":%ld},\"raw_data\":null}", stop, size);
    } else {
        n += (size_t)snprintf(out + n, cap - n, "],\"page\":null,\"raw_data\":null}");
    }
    HOST.complete(HOST.host_ctx, id, LUMOS_STATUS_OK, bytes_of(out, n));
    free(out);
}

static int32_t plugin_init(const lumos_host_api *host, void **plugin_ctx) {
    if (host == NULL || host->size < sizeof(lumos_host_api) || host->complete == NULL) return 1;
    HOST = *host;
    *plugin_ctx = &HOST;
    return 0;
}

static lumos_bytes plugin_info(void *plugin_ctx) {
    (void)plugin_ctx;
    return bytes_of(INFO, sizeof INFO - 1);
}

static int32_t plugin_start_call(void *plugin_ctx, const lumos_call *call) {
    (void)plugin_ctx;
    const char *cap = (const char *)call->capability.ptr;
    size_t cap_len = call->capability.len;
    const char *in = (const char *)call->input.ptr;
    if (cap_len == 20 && memcmp(cap, "validate_credentials", 20) == 0) {
        validate_credentials(call->call_id, in, call->input.len);
    } else if (cap_len == 13 && memcmp(cap, "list_accounts", 13) == 0) {
        list_accounts(call->call_id, in, call->input.len);
    } else {
        complete_error(call->call_id, "unsupported_capability", "capability not implemented");
    }
    return 0;
}

static void plugin_cancel_call(void *plugin_ctx, uint64_t call_id) {
    (void)plugin_ctx;
    (void)call_id; /* every call completes before start_call returns */
}

static void plugin_shutdown(void *plugin_ctx) { (void)plugin_ctx; }

static const lumos_plugin_api API = {
    sizeof(lumos_plugin_api), 0, plugin_init, plugin_info, plugin_start_call, plugin_cancel_call, plugin_shutdown};

static const lumos_plugin_header HEADER = {
    LUMOS_ABI_MAGIC,
    LUMOS_ABI_MAJOR,
    LUMOS_ABI_MINOR,
    sizeof(lumos_plugin_header),
    sizeof(lumos_plugin_api),
    {(const uint8_t *)APP_ID, sizeof APP_ID - 1},
    {(const uint8_t *)VERSION, sizeof VERSION - 1},
    {(const uint8_t *)"c11", 3},
    &API};

const lumos_plugin_header *lumos_connector_entry_v1(void) { return &HEADER; }
