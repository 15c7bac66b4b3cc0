/* Prints the size and field offsets of every struct in lumos_connector.h, one "name value" per
 * line, so tests can prove the Rust mirror (connector-abi/src/ffi.rs) has the same layout. */
#include "lumos_connector.h"

#include <stddef.h>
#include <stdio.h>

#define SIZE(t) printf(#t " %zu\n", sizeof(t))
#define OFF(t, f) printf(#t "." #f " %zu\n", offsetof(t, f))

int main(void) {
    SIZE(lumos_bytes); OFF(lumos_bytes, ptr); OFF(lumos_bytes, len);
    SIZE(lumos_host_api); OFF(lumos_host_api, size); OFF(lumos_host_api, host_ctx);
    OFF(lumos_host_api, log); OFF(lumos_host_api, complete);
    SIZE(lumos_call); OFF(lumos_call, size); OFF(lumos_call, call_id); OFF(lumos_call, capability);
    OFF(lumos_call, input); OFF(lumos_call, deadline_unix_ms);
    SIZE(lumos_plugin_api); OFF(lumos_plugin_api, size); OFF(lumos_plugin_api, init);
    OFF(lumos_plugin_api, info); OFF(lumos_plugin_api, start_call); OFF(lumos_plugin_api, cancel_call);
    OFF(lumos_plugin_api, shutdown);
    SIZE(lumos_plugin_header); OFF(lumos_plugin_header, magic); OFF(lumos_plugin_header, abi_major);
    OFF(lumos_plugin_header, abi_minor); OFF(lumos_plugin_header, header_size);
    OFF(lumos_plugin_header, plugin_api_size); OFF(lumos_plugin_header, plugin_id);
    OFF(lumos_plugin_header, plugin_version); OFF(lumos_plugin_header, build_info);
    OFF(lumos_plugin_header, api);
    printf("LUMOS_ABI_MAGIC %llu\nLUMOS_ABI_MAJOR %d\nLUMOS_ABI_MINOR %d\n",
           (unsigned long long)LUMOS_ABI_MAGIC, LUMOS_ABI_MAJOR, LUMOS_ABI_MINOR);
    return 0;
}
