//! Generates the Rust code for `lumos/agent/v1/tunnel.proto` with protox, a protobuf compiler
//! written in Rust: no system `protoc` is needed to build the workspace.
#![forbid(unsafe_code)]

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "lumos/agent/v1/tunnel.proto";
    println!("cargo:rerun-if-changed={proto}");
    let descriptors = protox::compile([proto], ["."])?;
    // No transport helpers: the generated `connect()` constructor would collide with `rpc Connect`;
    // clients are built with `AgentTunnelClient::new(channel)`.
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .build_transport(false)
        // `bytes` fields as `bytes::Bytes`: a result chunk is a slice of the result, not a copy.
        .bytes(".")
        .compile_fds(descriptors)?;
    Ok(())
}
