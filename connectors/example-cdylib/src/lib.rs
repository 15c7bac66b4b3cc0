//! The example connector as a native plugin: the same logic as the executable
//! (`lumos_example_connector::handle`), exported through the C ABI with the Rust SDK.
// deny, not forbid: the entry symbol that `export_connector!` generates is the one allowed
// exception, and it says so itself.
#![deny(unsafe_code)]

use lumos_connector_abi::sdk::{CallRequest, Completion, Connector, Host};

/// Its own app_id, so it can be installed beside the executable example.
pub const APP_ID: &str = "lumos_example_cdylib";

/// Answers synchronously: the work is microseconds, so there is nothing to gain from a thread.
#[derive(Debug)]
pub struct ExampleConnector;

impl Connector for ExampleConnector {
    fn new(_host: Host) -> Self {
        ExampleConnector
    }

    fn info(&self) -> String {
        let mut info = lumos_example_connector::info()["response"].clone();
        info["app_id"] = APP_ID.into();
        info["user_friendly_name"] = "Lumos example connector (Rust cdylib)".into();
        info.to_string()
    }

    fn call(&self, call: CallRequest, done: Completion) {
        let answer = lumos_example_connector::parse_input(&call.input)
            .and_then(|input| lumos_example_connector::handle(&call.capability, &input));
        match answer {
            Ok(answer) => done.ok(&lumos_example_connector::to_bytes(&answer)),
            Err(err) => done.error(&lumos_example_connector::to_bytes(&err.into_json(APP_ID))),
        }
    }
}

lumos_connector_abi::export_connector!(
    ExampleConnector,
    id = APP_ID,
    version = lumos_example_connector::VERSION
);
