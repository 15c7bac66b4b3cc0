//! The tunnel protocol between lumos-agent and the Lumos cloud: package `lumos.agent.v1`,
//! service `AgentTunnel`, generated from `lumos/agent/v1/tunnel.proto` (the documented
//! contract) by protox and tonic at build time.
//!
//! Only the agent's tunnel module and test fakes use these types; the rest of the agent does not
//! know them.
#![forbid(unsafe_code)]

/// The generated messages, client and server.
#[allow(
    missing_docs,
    missing_debug_implementations,
    clippy::all,
    clippy::pedantic,
    reason = "generated code"
)]
pub mod v1 {
    tonic::include_proto!("lumos.agent.v1");
}

/// The `.proto` source, for tools and peers that generate their own stubs.
pub const PROTO: &str = include_str!("../lumos/agent/v1/tunnel.proto");

/// The protocol revision this crate describes (`Hello.protocol_version`).
pub const PROTOCOL_VERSION: u32 = 1;
