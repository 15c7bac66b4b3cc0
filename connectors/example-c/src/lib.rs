//! The C example connector (`example.c`), compiled by this crate's build script.
#![forbid(unsafe_code)]

/// Path of the compiled shared library.
pub const LIBRARY: &str = env!("LUMOS_EXAMPLE_C_LIBRARY");
