//! The Rust connector SDK: implement [`Connector`], then one line:
//!
//! ```ignore
//! lumos_connector_abi::export_connector!(MyConnector, id = "my_app", version = "1.0.0");
//! ```
//!
//! The macro exports the entry symbol and a static header; the functions behind it catch every
//! panic (reported as [`status::PANIC`]) and guarantee each call completes exactly once.

use std::ffi::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::ffi::{self, status, Bytes, HostApi, PluginApi};

/// A native connector.
pub trait Connector: Send + Sync + 'static {
    /// Builds the connector once, at init. Keep it cheap: no network.
    fn new(host: Host) -> Self
    where
        Self: Sized;

    /// The `info` response object as JSON: `{"app_id", "version", "capabilities", ...}`.
    fn info(&self) -> String;

    /// Starts a call. Complete it through `done` (now, or later from any thread). Dropping
    /// `done` without completing answers an error, so a call is never left hanging.
    fn call(&self, call: CallRequest, done: Completion);

    /// Asks a call to finish early; complete it with [`Completion::cancelled`]. Optional.
    fn cancel(&self, _call_id: u64) {}
}

/// A capability call, copied out of the host's borrowed data.
#[derive(Debug, Clone)]
pub struct CallRequest {
    /// The host's id for this call.
    pub call_id: u64,
    /// The capability name.
    pub capability: String,
    /// The Lumos envelope (JSON).
    pub input: Vec<u8>,
    /// When the host stops waiting.
    pub deadline: Option<SystemTime>,
}

/// The host's services.
#[derive(Debug, Clone, Copy)]
pub struct Host {
    api: HostApi,
}

// SAFETY: the ABI requires the host's functions to be callable from any thread, with the
// context it handed over.
unsafe impl Send for Host {}
// SAFETY: as above.
unsafe impl Sync for Host {}

impl Host {
    /// Logs a line through the host. Never log secrets.
    pub fn log(&self, level: u32, message: &str) {
        if let Some(log) = self.api.log {
            // SAFETY: `log` and `host_ctx` come from the host's table, valid until shutdown;
            // the message is borrowed for the duration of the call, as the ABI says.
            unsafe { log(self.api.host_ctx, level, Bytes::borrow(message.as_bytes())) }
        }
    }

    fn complete(&self, call_id: u64, status: u32, output: &[u8]) {
        if let Some(complete) = self.api.complete {
            // SAFETY: as in `log`; `output` is borrowed for the duration of the call.
            unsafe { complete(self.api.host_ctx, call_id, status, Bytes::borrow(output)) }
        }
    }
}

/// Completes one call, exactly once: it is consumed by completing, and dropping it uncompleted
/// answers an error (or a panic, while unwinding).
#[derive(Debug)]
pub struct Completion {
    host: Host,
    call_id: u64,
    completed: Arc<AtomicBool>,
}

impl Completion {
    /// Answers with a JSON document (`{"response": ...}`).
    pub fn ok(self, json: &[u8]) {
        self.finish(status::OK, json);
    }

    /// Answers with an error document in the Lumos shape.
    pub fn error(self, json: &[u8]) {
        self.finish(status::ERROR, json);
    }

    /// Answers that the call was cancelled.
    pub fn cancelled(self) {
        self.finish(status::CANCELLED, b"");
    }

    /// The call this completes.
    pub fn call_id(&self) -> u64 {
        self.call_id
    }

    fn finish(&self, status: u32, output: &[u8]) {
        if !self.completed.swap(true, Ordering::AcqRel) {
            self.host.complete(self.call_id, status, output);
        }
    }
}

impl Drop for Completion {
    fn drop(&mut self) {
        // The usual case: completed, so nothing to say. Checked first, because building the
        // error document below costs more than the whole completion did (this runs on every
        // call).
        if self.completed.load(Ordering::Acquire) {
            return;
        }
        let (status, message) = if std::thread::panicking() {
            (status::PANIC, "the connector panicked during the call")
        } else {
            (
                status::ERROR,
                "the connector dropped the call without answering",
            )
        };
        self.finish(status, &error_json(message));
    }
}

/// A Lumos error document for SDK-level failures.
pub fn error_json(message: &str) -> Vec<u8> {
    let mut escaped = String::with_capacity(message.len());
    for c in message.chars() {
        match c {
            '"' => escaped.push_str("\\\""),
            '\\' => escaped.push_str("\\\\"),
            c if (c as u32) < 0x20 => escaped.push(' '),
            c => escaped.push(c),
        }
    }
    format!(
        r#"{{"is_error":true,"error":{{"message":"{escaped}","error_code":"connector.sdk","raised_by":"lumos-connector-abi","error_metadata":{{"retryable":false,"refreshable":false}}}},"response":null}}"#
    )
    .into_bytes()
}

/// The header's `build_info` for SDK-built connectors.
pub const BUILD_INFO: &str = concat!("rust; lumos-connector-abi ", env!("CARGO_PKG_VERSION"));

/// What the plugin context points to.
struct PluginState<T> {
    connector: T,
    info: Vec<u8>,
    host: Host,
}

/// The function table for `T`, built at compile time by [`crate::export_connector!`].
pub const fn plugin_api<T: Connector>() -> PluginApi {
    PluginApi {
        size: ffi::size_of_u32::<PluginApi>(),
        reserved: 0,
        init: Some(init::<T>),
        info: Some(info::<T>),
        start_call: Some(start_call::<T>),
        cancel_call: Some(cancel_call::<T>),
        shutdown: Some(shutdown::<T>),
    }
}

unsafe extern "C" fn init<T: Connector>(host: *const HostApi, plugin_ctx: *mut *mut c_void) -> i32 {
    catch_unwind(AssertUnwindSafe(|| {
        if host.is_null() || plugin_ctx.is_null() {
            return 1;
        }
        // SAFETY: the host passes a valid table; we read only what fits the size it declared.
        let declared = unsafe { (*host).size } as usize;
        if declared < std::mem::size_of::<HostApi>() {
            return 2;
        }
        // SAFETY: checked non-null and large enough above.
        let api = unsafe { *host };
        let host = Host { api };
        let connector = T::new(host);
        let info = connector.info().into_bytes();
        let state = Box::new(PluginState {
            connector,
            info,
            host,
        });
        // SAFETY: `plugin_ctx` is a valid out-pointer (checked non-null).
        unsafe { *plugin_ctx = Box::into_raw(state).cast() };
        0
    }))
    .unwrap_or(3)
}

/// # Safety
/// `ctx` must be the pointer `init` produced, and `shutdown` must not have run.
unsafe fn state<'a, T>(ctx: *mut c_void) -> &'a PluginState<T> {
    // SAFETY: per this function's contract.
    unsafe { &*ctx.cast::<PluginState<T>>() }
}

unsafe extern "C" fn info<T: Connector>(ctx: *mut c_void) -> Bytes {
    if ctx.is_null() {
        return Bytes::EMPTY;
    }
    // SAFETY: the host passes back the context `init` made.
    let state = unsafe { state::<T>(ctx) };
    Bytes::borrow(&state.info)
}

unsafe extern "C" fn start_call<T: Connector>(ctx: *mut c_void, call: *const ffi::Call) -> i32 {
    if ctx.is_null() || call.is_null() {
        return 1;
    }
    // SAFETY: the host passes back the context `init` made.
    let state = unsafe { state::<T>(ctx) };
    // SAFETY: the host passes a valid call, borrowed for this function's duration; we copy
    // everything out before returning.
    let request = unsafe {
        let call = &*call;
        CallRequest {
            call_id: call.call_id,
            capability: String::from_utf8_lossy(call.capability.as_slice()).into_owned(),
            input: call.input.to_vec(),
            deadline: (call.deadline_unix_ms != 0)
                .then(|| UNIX_EPOCH + Duration::from_millis(call.deadline_unix_ms)),
        }
    };
    let completed = Arc::new(AtomicBool::new(false));
    let done = Completion {
        host: state.host,
        call_id: request.call_id,
        completed: completed.clone(),
    };
    let call_id = request.call_id;
    let outcome = catch_unwind(AssertUnwindSafe(|| state.connector.call(request, done)));
    if outcome.is_err() && !completed.swap(true, Ordering::AcqRel) {
        state.host.complete(
            call_id,
            status::PANIC,
            &error_json("the connector panicked"),
        );
    }
    0
}

unsafe extern "C" fn cancel_call<T: Connector>(ctx: *mut c_void, call_id: u64) {
    if ctx.is_null() {
        return;
    }
    // SAFETY: the host passes back the context `init` made.
    let state = unsafe { state::<T>(ctx) };
    let _ = catch_unwind(AssertUnwindSafe(|| state.connector.cancel(call_id)));
}

unsafe extern "C" fn shutdown<T: Connector>(ctx: *mut c_void) {
    if ctx.is_null() {
        return;
    }
    let _ = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: `shutdown` is called once, last, with the context `init` made.
        drop(unsafe { Box::from_raw(ctx.cast::<PluginState<T>>()) });
    }));
}

/// Exports a [`Connector`] through the C ABI: the static header and the entry symbol
/// `lumos_connector_entry_v1`.
///
/// ```ignore
/// lumos_connector_abi::export_connector!(MyConnector, id = "my_app", version = env!("CARGO_PKG_VERSION"));
/// ```
#[macro_export]
macro_rules! export_connector {
    ($ty:ty, id = $id:expr, version = $version:expr) => {
        static LUMOS_PLUGIN_API: $crate::ffi::PluginApi = $crate::sdk::plugin_api::<$ty>();
        static LUMOS_PLUGIN_HEADER: $crate::ffi::PluginHeader = $crate::ffi::PluginHeader {
            magic: $crate::ffi::MAGIC,
            abi_major: $crate::ffi::ABI_MAJOR,
            abi_minor: $crate::ffi::ABI_MINOR,
            header_size: $crate::ffi::size_of_u32::<$crate::ffi::PluginHeader>(),
            plugin_api_size: $crate::ffi::size_of_u32::<$crate::ffi::PluginApi>(),
            plugin_id: $crate::ffi::Bytes::from_static($id.as_bytes()),
            plugin_version: $crate::ffi::Bytes::from_static($version.as_bytes()),
            build_info: $crate::ffi::Bytes::from_static($crate::sdk::BUILD_INFO.as_bytes()),
            api: &LUMOS_PLUGIN_API,
        };

        /// The connector's entry symbol: returns the static header, with no side effects.
        #[allow(unsafe_code, reason = "the exported entry symbol of the C ABI")]
        #[no_mangle]
        pub extern "C" fn lumos_connector_entry_v1() -> *const $crate::ffi::PluginHeader {
            &LUMOS_PLUGIN_HEADER
        }
    };
}

/// Milliseconds since the Unix epoch of a deadline, for hosts (0: none).
pub fn deadline_unix_ms(deadline: Option<SystemTime>) -> u64 {
    deadline
        .and_then(|d| d.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    type Completions = Mutex<Vec<(u64, u32, Vec<u8>)>>;

    unsafe extern "C" fn record(host_ctx: *mut c_void, call_id: u64, status: u32, output: Bytes) {
        // SAFETY: the tests below pass a `Completions` that outlives every call, and `output`
        // is borrowed for this call's duration.
        let (completions, output) = unsafe { (&*host_ctx.cast::<Completions>(), output.to_vec()) };
        completions.lock().unwrap().push((call_id, status, output));
    }

    fn completion(completions: &Completions, call_id: u64) -> Completion {
        let api = HostApi {
            size: ffi::size_of_u32::<HostApi>(),
            reserved: 0,
            host_ctx: std::ptr::from_ref(completions).cast_mut().cast(),
            log: None,
            complete: Some(record),
        };
        Completion {
            host: Host { api },
            call_id,
            completed: Arc::new(AtomicBool::new(false)),
        }
    }

    #[test]
    fn a_completed_call_is_completed_once_and_its_drop_adds_nothing() {
        let completions = Completions::default();
        completion(&completions, 7).ok(br#"{"response":{}}"#);
        let seen = completions.lock().unwrap();
        assert_eq!(*seen, vec![(7, status::OK, br#"{"response":{}}"#.to_vec())]);
    }

    #[test]
    fn a_call_dropped_without_an_answer_completes_with_an_error_document() {
        let completions = Completions::default();
        drop(completion(&completions, 9));
        let seen = completions.lock().unwrap();
        assert_eq!(seen.len(), 1);
        let (call_id, status, output) = &seen[0];
        assert_eq!((*call_id, *status), (9, status::ERROR));
        let text = String::from_utf8(output.clone()).unwrap();
        assert!(
            text.contains(r#""message":"the connector dropped the call without answering""#),
            "{text}"
        );
        assert!(text.contains(r#""error_code":"connector.sdk""#), "{text}");
    }

    #[test]
    fn error_documents_escape_quotes_backslashes_and_control_characters() {
        let text = String::from_utf8(error_json("a \"b\" c\\d\ne\u{1}f é")).unwrap();
        assert!(text.contains(r#""message":"a \"b\" c\\d e f é""#), "{text}");
    }
}
