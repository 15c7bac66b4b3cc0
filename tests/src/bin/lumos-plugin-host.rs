//! The agent's plugin worker (`lumos-agent plugin-host <LIBRARY>`) as a binary of this package,
//! so benchmarks can start workers from what `cargo bench` builds. Same code as the agent's.
#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    // Called as `<program> plugin-host <LIBRARY>`, like the agent.
    let library = std::env::args_os()
        .nth(2)
        .map(std::path::PathBuf::from)
        .unwrap_or_default();
    std::process::ExitCode::from(lumos_agent::native::worker::main(&library))
}
