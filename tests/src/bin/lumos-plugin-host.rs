//! The agent's helpers as a binary of this package, so that tests and benchmarks that run the
//! agent in-process can start them from what cargo builds (in-process, the agent's own
//! executable is the test binary): `<program> plugin-host <LIBRARY>` is a plugin worker and
//! `<program> group-reaper` the group reaper, as with `lumos-agent`. Same code as the agent's.
#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    let mut args = std::env::args_os().skip(1);
    let code = match args.next() {
        Some(command) if command == "group-reaper" => lumos_agent::reaper::main(),
        _ => {
            let library = args
                .next()
                .map(std::path::PathBuf::from)
                .unwrap_or_default();
            lumos_agent::native::worker::main(&library)
        }
    };
    std::process::ExitCode::from(code)
}
