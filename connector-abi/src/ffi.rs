//! `#[repr(C)]` mirror of `include/lumos_connector.h`. Keep the two in the same order; the
//! header is the contract.

use std::ffi::c_void;

/// `LUMOS_ABI_MAGIC`: "LUMOSCAB".
pub const MAGIC: u64 = 0x4C55_4D4F_5343_4142;
/// `LUMOS_ABI_MAJOR`: the major version this crate speaks (also in the entry symbol's name).
pub const ABI_MAJOR: u32 = 1;
/// `LUMOS_ABI_MINOR`.
pub const ABI_MINOR: u32 = 0;
/// `LUMOS_ENTRY_SYMBOL`, NUL-terminated for dlsym.
pub const ENTRY_SYMBOL: &[u8] = b"lumos_connector_entry_v1\0";

/// `lumos_status`.
pub mod status {
    /// The output is the answer.
    pub const OK: u32 = 0;
    /// The output is an error document in the Lumos shape.
    pub const ERROR: u32 = 1;
    /// Completed after `cancel_call`.
    pub const CANCELLED: u32 = 2;
    /// The plugin caught a panic; its state may be corrupt.
    pub const PANIC: u32 = 3;
}

/// `lumos_log_level`.
pub mod log_level {
    /// Errors.
    pub const ERROR: u32 = 1;
    /// Warnings.
    pub const WARN: u32 = 2;
    /// Information.
    pub const INFO: u32 = 3;
    /// Debugging detail.
    pub const DEBUG: u32 = 4;
}

/// `lumos_bytes`: borrowed bytes, valid for the duration of the call that passes them.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct Bytes {
    /// First byte; may be null when `len` is 0.
    pub ptr: *const u8,
    /// Length in bytes.
    pub len: usize,
}

impl Bytes {
    /// Empty bytes.
    pub const EMPTY: Self = Self {
        ptr: std::ptr::null(),
        len: 0,
    };

    /// Borrows a static slice (for headers built at compile time).
    pub const fn from_static(bytes: &'static [u8]) -> Self {
        Self {
            ptr: bytes.as_ptr(),
            len: bytes.len(),
        }
    }

    /// Borrows a slice for the duration of one call across the boundary.
    pub fn borrow(bytes: &[u8]) -> Self {
        Self {
            ptr: bytes.as_ptr(),
            len: bytes.len(),
        }
    }

    /// Copies the bytes out.
    ///
    /// # Safety
    /// `ptr` must point to `len` readable bytes for the duration of this call (the ABI's
    /// borrowing rule), or `len` must be 0.
    pub unsafe fn to_vec(&self) -> Vec<u8> {
        // SAFETY: the caller's guarantee, for as long as this call.
        unsafe { self.as_slice() }.to_vec()
    }

    /// The bytes, borrowed: for reading them inside the call they were handed over in, where a
    /// copy would be thrown away before it returns.
    ///
    /// # Safety
    /// `ptr` must point to `len` readable bytes, unchanged, for as long as the slice lives
    /// (under the ABI's borrowing rule: no longer than the call they came with), or `len`
    /// must be 0.
    pub unsafe fn as_slice<'a>(&self) -> &'a [u8] {
        if self.ptr.is_null() || self.len == 0 {
            return &[];
        }
        // SAFETY: the caller guarantees `ptr` is valid for `len` bytes while the slice lives.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

/// `lumos_host_api`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct HostApi {
    /// `sizeof(lumos_host_api)` as the host built it.
    pub size: u32,
    /// Zero.
    pub reserved: u32,
    /// Passed back to every function below.
    pub host_ctx: *mut c_void,
    /// A log line.
    pub log: Option<unsafe extern "C" fn(host_ctx: *mut c_void, level: u32, message: Bytes)>,
    /// Completes a started call, exactly once.
    pub complete: Option<
        unsafe extern "C" fn(host_ctx: *mut c_void, call_id: u64, status: u32, output: Bytes),
    >,
}

/// `lumos_call`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct Call {
    /// `sizeof(lumos_call)` as the host built it.
    pub size: u32,
    /// Zero.
    pub reserved: u32,
    /// Unique per host process; completions name it.
    pub call_id: u64,
    /// The capability name.
    pub capability: Bytes,
    /// The Lumos envelope (JSON).
    pub input: Bytes,
    /// Milliseconds since the Unix epoch; 0 for none.
    pub deadline_unix_ms: u64,
}

/// `lumos_plugin_api`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct PluginApi {
    /// `sizeof(lumos_plugin_api)` as the plugin built it.
    pub size: u32,
    /// Zero.
    pub reserved: u32,
    /// Called once first; sets the plugin context.
    pub init:
        Option<unsafe extern "C" fn(host: *const HostApi, plugin_ctx: *mut *mut c_void) -> i32>,
    /// The `info` response object as JSON.
    pub info: Option<unsafe extern "C" fn(plugin_ctx: *mut c_void) -> Bytes>,
    /// Starts a call; 0 if accepted.
    pub start_call: Option<unsafe extern "C" fn(plugin_ctx: *mut c_void, call: *const Call) -> i32>,
    /// Asks a call to finish early.
    pub cancel_call: Option<unsafe extern "C" fn(plugin_ctx: *mut c_void, call_id: u64)>,
    /// Called once, last.
    pub shutdown: Option<unsafe extern "C" fn(plugin_ctx: *mut c_void)>,
}

/// `lumos_plugin_header`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct PluginHeader {
    /// [`MAGIC`].
    pub magic: u64,
    /// The major the plugin was built against.
    pub abi_major: u32,
    /// The minor the plugin was built against.
    pub abi_minor: u32,
    /// `sizeof(lumos_plugin_header)` as the plugin built it.
    pub header_size: u32,
    /// `sizeof(lumos_plugin_api)` as the plugin built it.
    pub plugin_api_size: u32,
    /// The app_id.
    pub plugin_id: Bytes,
    /// The version.
    pub plugin_version: Bytes,
    /// Free text about the build.
    pub build_info: Bytes,
    /// The plugin's functions.
    pub api: *const PluginApi,
}

// SAFETY: headers and function tables are immutable statics; the pointers they hold point to
// immutable statics too. Sharing them between threads is what the ABI promises.
unsafe impl Sync for PluginHeader {}
// SAFETY: as above: an immutable table of function pointers.
unsafe impl Sync for PluginApi {}

/// `lumos_connector_entry_fn`.
pub type EntryFn = unsafe extern "C" fn() -> *const PluginHeader;

/// Size of a struct as a `u32` size field.
pub const fn size_of_u32<T>() -> u32 {
    std::mem::size_of::<T>() as u32
}
