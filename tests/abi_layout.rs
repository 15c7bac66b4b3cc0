//! The Rust mirror of the C header has the C layout: every struct's size and every field's
//! offset, as a C compiler computes them from `lumos_connector.h`, and the constants.
#![allow(clippy::unwrap_used, reason = "tests")]

use std::collections::HashMap;
use std::mem::{offset_of, size_of};

use lumos_connector_abi::ffi::{self, Bytes, Call, HostApi, PluginApi, PluginHeader};

fn c_layout() -> HashMap<String, u64> {
    let exe = std::path::Path::new(env!("LUMOS_TEST_C_PLUGINS")).join("abi_layout");
    let out = std::process::Command::new(&exe).output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let (k, v) = l.rsplit_once(' ').unwrap();
            (k.to_string(), v.parse().unwrap())
        })
        .collect()
}

#[test]
fn rust_mirror_matches_the_c_header() {
    let c = c_layout();
    let rust: Vec<(&str, usize)> = vec![
        ("lumos_bytes", size_of::<Bytes>()),
        ("lumos_bytes.ptr", offset_of!(Bytes, ptr)),
        ("lumos_bytes.len", offset_of!(Bytes, len)),
        ("lumos_host_api", size_of::<HostApi>()),
        ("lumos_host_api.size", offset_of!(HostApi, size)),
        ("lumos_host_api.host_ctx", offset_of!(HostApi, host_ctx)),
        ("lumos_host_api.log", offset_of!(HostApi, log)),
        ("lumos_host_api.complete", offset_of!(HostApi, complete)),
        ("lumos_call", size_of::<Call>()),
        ("lumos_call.size", offset_of!(Call, size)),
        ("lumos_call.call_id", offset_of!(Call, call_id)),
        ("lumos_call.capability", offset_of!(Call, capability)),
        ("lumos_call.input", offset_of!(Call, input)),
        (
            "lumos_call.deadline_unix_ms",
            offset_of!(Call, deadline_unix_ms),
        ),
        ("lumos_plugin_api", size_of::<PluginApi>()),
        ("lumos_plugin_api.size", offset_of!(PluginApi, size)),
        ("lumos_plugin_api.init", offset_of!(PluginApi, init)),
        ("lumos_plugin_api.info", offset_of!(PluginApi, info)),
        (
            "lumos_plugin_api.start_call",
            offset_of!(PluginApi, start_call),
        ),
        (
            "lumos_plugin_api.cancel_call",
            offset_of!(PluginApi, cancel_call),
        ),
        ("lumos_plugin_api.shutdown", offset_of!(PluginApi, shutdown)),
        ("lumos_plugin_header", size_of::<PluginHeader>()),
        ("lumos_plugin_header.magic", offset_of!(PluginHeader, magic)),
        (
            "lumos_plugin_header.abi_major",
            offset_of!(PluginHeader, abi_major),
        ),
        (
            "lumos_plugin_header.abi_minor",
            offset_of!(PluginHeader, abi_minor),
        ),
        (
            "lumos_plugin_header.header_size",
            offset_of!(PluginHeader, header_size),
        ),
        (
            "lumos_plugin_header.plugin_api_size",
            offset_of!(PluginHeader, plugin_api_size),
        ),
        (
            "lumos_plugin_header.plugin_id",
            offset_of!(PluginHeader, plugin_id),
        ),
        (
            "lumos_plugin_header.plugin_version",
            offset_of!(PluginHeader, plugin_version),
        ),
        (
            "lumos_plugin_header.build_info",
            offset_of!(PluginHeader, build_info),
        ),
        ("lumos_plugin_header.api", offset_of!(PluginHeader, api)),
    ];
    for (name, value) in &rust {
        assert_eq!(
            c.get(*name).copied(),
            Some(*value as u64),
            "{name}: C and Rust disagree"
        );
    }
    assert_eq!(c.len(), rust.len() + 3, "every C line is checked");
    assert_eq!(c["LUMOS_ABI_MAGIC"], ffi::MAGIC);
    assert_eq!(c["LUMOS_ABI_MAJOR"], u64::from(ffi::ABI_MAJOR));
    assert_eq!(c["LUMOS_ABI_MINOR"], u64::from(ffi::ABI_MINOR));
    assert_eq!(ffi::ENTRY_SYMBOL, b"lumos_connector_entry_v1\0");
    assert!(lumos_connector_abi::C_HEADER
        .contains("#define LUMOS_ENTRY_SYMBOL \"lumos_connector_entry_v1\""));
}
