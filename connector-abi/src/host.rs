//! The host side: load a native connector, check its header, start it, call it. A safe API over
//! the only `unsafe` FFI in the agent.
//!
//! Loading runs the library's initialisers, so the agent does it in a worker process by
//! default; only vetted plugins are loaded into the agent itself.

use std::ffi::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::Arc;

use crate::ffi::{self, Bytes, HostApi, PluginApi, PluginHeader};

/// Why a library cannot be used. Messages say what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoadError {
    /// dlopen failed: not a shared library, another architecture, truncated, missing deps.
    Open(String),
    /// No `lumos_connector_entry_v1` symbol.
    MissingEntry,
    /// The entry returned null or a header without the magic.
    BadHeader(String),
    /// Built for another ABI major.
    WrongMajor {
        /// What the plugin declares.
        found: u32,
    },
    /// The plugin refused to initialise.
    InitFailed(i32),
}

impl std::fmt::Display for LoadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Open(e) => write!(f, "cannot load the library ({e}); is it a shared library built for this machine?"),
            Self::MissingEntry => write!(
                f,
                "no `lumos_connector_entry_v1` symbol: not a Lumos connector, or built for another ABI major (this agent supports {})",
                ffi::ABI_MAJOR
            ),
            Self::BadHeader(why) => write!(f, "bad connector header: {why}"),
            Self::WrongMajor { found } => {
                write!(f, "ABI major {found}, this agent supports {}; rebuild the connector against this agent's connector-abi", ffi::ABI_MAJOR)
            }
            Self::InitFailed(code) => write!(f, "the connector's init failed with code {code}"),
        }
    }
}

impl std::error::Error for LoadError {}

/// Receives what a plugin sends back. Called from the plugin's threads.
pub trait HostCallbacks: Send + Sync + 'static {
    /// A call completed (for the plugin's first completion of `call_id`; later ones too: the
    /// host must ignore repeats).
    fn complete(&self, call_id: u64, status: u32, output: &[u8]);
    /// A log line from the plugin.
    fn log(&self, level: u32, message: &[u8]);
}

/// A loaded library with a checked header. Never unloaded.
#[derive(Debug)]
pub struct Library {
    header: &'static PluginHeader,
    api: &'static PluginApi,
}

impl Library {
    /// Loads `path` and checks its header: magic, ABI major, struct sizes, function table.
    pub fn load(path: &Path) -> Result<Self, LoadError> {
        // SAFETY: loading runs the library's initialisers; that is why the agent does this in a
        // worker process unless the admin vetted the plugin for in-process loading.
        let library = unsafe { libloading::Library::new(path) }
            .map_err(|e| LoadError::Open(e.to_string()))?;
        // Never dlclose: unloading is unsound with thread-local destructors (ABI rule 7).
        let library: &'static libloading::Library = Box::leak(Box::new(library));
        // SAFETY: the symbol's type is the ABI's entry function type.
        let entry: libloading::Symbol<'static, ffi::EntryFn> =
            unsafe { library.get(ffi::ENTRY_SYMBOL) }.map_err(|_| LoadError::MissingEntry)?;
        // SAFETY: the ABI requires the entry to be side-effect free and return a static header.
        let header = unsafe { entry() };
        if header.is_null() {
            return Err(LoadError::BadHeader("the entry returned null".into()));
        }
        // The first fields are stable across every ABI version: read them before trusting sizes.
        // SAFETY: non-null, and pointing to a static header per the ABI.
        let header: &'static PluginHeader = unsafe { &*header };
        if header.magic != ffi::MAGIC {
            return Err(LoadError::BadHeader(format!(
                "magic {:#x}, expected {:#x}",
                header.magic,
                ffi::MAGIC
            )));
        }
        if header.abi_major != ffi::ABI_MAJOR {
            return Err(LoadError::WrongMajor {
                found: header.abi_major,
            });
        }
        if (header.header_size as usize) < std::mem::size_of::<PluginHeader>() {
            return Err(LoadError::BadHeader(format!(
                "header size {} is smaller than ABI 1.0's",
                header.header_size
            )));
        }
        if (header.plugin_api_size as usize) < std::mem::size_of::<PluginApi>()
            || header.api.is_null()
        {
            return Err(LoadError::BadHeader(
                "function table missing or smaller than ABI 1.0's".into(),
            ));
        }
        // SAFETY: non-null, static, and at least as large as the table we read.
        let api: &'static PluginApi = unsafe { &*header.api };
        if api.init.is_none() || api.info.is_none() || api.start_call.is_none() {
            return Err(LoadError::BadHeader(
                "init, info and start_call are required".into(),
            ));
        }
        let lib = Self { header, api };
        if lib.id().is_empty() {
            return Err(LoadError::BadHeader("empty plugin id".into()));
        }
        Ok(lib)
    }

    /// The plugin id (its app_id).
    pub fn id(&self) -> String {
        // SAFETY: header strings are static (ABI rule 1).
        String::from_utf8_lossy(&unsafe { self.header.plugin_id.to_vec() }).into_owned()
    }

    /// The plugin version.
    pub fn version(&self) -> String {
        // SAFETY: as in `id`.
        String::from_utf8_lossy(&unsafe { self.header.plugin_version.to_vec() }).into_owned()
    }

    /// The build description.
    pub fn build_info(&self) -> String {
        // SAFETY: as in `id`.
        String::from_utf8_lossy(&unsafe { self.header.build_info.to_vec() }).into_owned()
    }

    /// The ABI minor the plugin was built against.
    pub fn abi_minor(&self) -> u32 {
        self.header.abi_minor
    }

    /// Initialises one instance that reports to `callbacks`.
    pub fn start(&self, callbacks: Arc<dyn HostCallbacks>) -> Result<Instance, LoadError> {
        // The context outlives the instance: a plugin may complete late from its own threads,
        // and the library is never unloaded anyway. One small leak per instance, by design.
        let ctx: &'static Arc<dyn HostCallbacks> = Box::leak(Box::new(callbacks));
        let host: &'static HostApi = Box::leak(Box::new(HostApi {
            size: ffi::size_of_u32::<HostApi>(),
            reserved: 0,
            host_ctx: std::ptr::from_ref(ctx).cast_mut().cast(),
            log: Some(host_log),
            complete: Some(host_complete),
        }));
        let mut plugin_ctx: *mut c_void = std::ptr::null_mut();
        let init = self
            .api
            .init
            .ok_or(LoadError::BadHeader("no init".into()))?;
        // SAFETY: `host` is a valid static table; `plugin_ctx` a valid out-pointer.
        let code = unsafe { init(host, &mut plugin_ctx) };
        if code != 0 {
            return Err(LoadError::InitFailed(code));
        }
        Ok(Instance {
            api: self.api,
            ctx: plugin_ctx,
        })
    }
}

/// An initialised plugin. Its functions may be called from any thread (ABI rule).
#[derive(Debug)]
pub struct Instance {
    api: &'static PluginApi,
    ctx: *mut c_void,
}

// SAFETY: the ABI requires every plugin function to be callable from any thread.
unsafe impl Send for Instance {}
// SAFETY: as above.
unsafe impl Sync for Instance {}

impl Instance {
    /// The connector's `info` response object (JSON).
    pub fn info(&self) -> Vec<u8> {
        match self.api.info {
            // SAFETY: `ctx` is what init produced; the returned bytes are valid until shutdown,
            // and we copy them now.
            Some(info) => unsafe { info(self.ctx).to_vec() },
            None => Vec::new(),
        }
    }

    /// Starts a call; `false` if the plugin refused it (then no completion follows).
    pub fn start_call(
        &self,
        call_id: u64,
        capability: &str,
        input: &[u8],
        deadline_unix_ms: u64,
    ) -> bool {
        let Some(start) = self.api.start_call else {
            return false;
        };
        let call = ffi::Call {
            size: ffi::size_of_u32::<ffi::Call>(),
            reserved: 0,
            call_id,
            capability: Bytes::borrow(capability.as_bytes()),
            input: Bytes::borrow(input),
            deadline_unix_ms,
        };
        // SAFETY: `ctx` is what init produced; `call` and the bytes it borrows live until
        // start_call returns, and the plugin copies what it keeps.
        unsafe { start(self.ctx, &call) == 0 }
    }

    /// Asks a call to finish early.
    pub fn cancel(&self, call_id: u64) {
        if let Some(cancel) = self.api.cancel_call {
            // SAFETY: `ctx` is what init produced.
            unsafe { cancel(self.ctx, call_id) }
        }
    }
}

/// # Safety
/// `ctx` is the `&'static Arc<dyn HostCallbacks>` made in [`Library::start`].
unsafe fn callbacks<'a>(ctx: *mut c_void) -> &'a Arc<dyn HostCallbacks> {
    // SAFETY: per this function's contract.
    unsafe { &*ctx.cast_const().cast::<Arc<dyn HostCallbacks>>() }
}

unsafe extern "C" fn host_log(ctx: *mut c_void, level: u32, message: Bytes) {
    if ctx.is_null() {
        return;
    }
    // SAFETY: the plugin passes back the context we gave it; the message is borrowed for this
    // call, and the callback copies what it keeps before we return.
    let (cb, message) = unsafe { (callbacks(ctx), message.as_slice()) };
    // No unwinding may cross back into the plugin (ABI rule 6).
    let _ = catch_unwind(AssertUnwindSafe(|| cb.log(level, message)));
}

unsafe extern "C" fn host_complete(ctx: *mut c_void, call_id: u64, status: u32, output: Bytes) {
    if ctx.is_null() {
        return;
    }
    // SAFETY: as in `host_log`.
    let (cb, output) = unsafe { (callbacks(ctx), output.as_slice()) };
    let _ = catch_unwind(AssertUnwindSafe(|| cb.complete(call_id, status, output)));
}
