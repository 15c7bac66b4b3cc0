//! The stable C ABI for native Lumos connectors.
//!
//! - `include/lumos_connector.h`: the contract, in C, with its rules written in it.
//! - [`ffi`]: the `#[repr(C)]` mirror of that header.
//! - [`sdk`]: write a connector in Rust: implement [`sdk::Connector`], add one
//!   [`export_connector!`] line.
//! - `host` (feature `host`): load a connector, check its header, call it.
//!
//! This crate and the plugin loader are the only places `unsafe` is allowed in the workspace;
//! every block says why it is sound (`// SAFETY:`).

pub mod ffi;
#[cfg(feature = "host")]
pub mod host;
pub mod sdk;

/// The C header, for tools that want to ship it.
pub const C_HEADER: &str = include_str!("../include/lumos_connector.h");
