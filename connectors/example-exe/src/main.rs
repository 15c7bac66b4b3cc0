//! Example Lumos connector executable: the Lumos connector CLI protocol (as `connector-py`
//! connectors speak it) over the shared logic in `lib.rs`.
//!
//! ```text
//! lumos-example-connector info
//! lumos-example-connector <capability> (--json '<JSON>' | --json-file <PATH>)
//! ```
//!
//! Errors use the Lumos error shape on stdout with exit code 0, as `connector-py` does.
#![forbid(unsafe_code)]

use std::io::Write;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let output = match lumos_example_connector::run(&args) {
        Ok(value) => value,
        Err(err) => err.into_json(lumos_example_connector::APP_ID),
    };
    let mut stdout = std::io::stdout().lock();
    // A closed stdout leaves nobody to tell; the exit code says it.
    if serde_json::to_writer(&mut stdout, &output).is_err() || writeln!(stdout).is_err() {
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
