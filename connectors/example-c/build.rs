//! Compiles `example.c` into `liblumos_example_c.so` with the platform C compiler, warnings as
//! errors, and says where it is (`LIBRARY` in lib.rs). A copy goes next to the workspace's
//! binaries so `lumos-agent --dev` finds it like the other examples.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let manifest =
        PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let include = manifest.join("../../connector-abi/include");
    let source = manifest.join("example.c");
    let target_os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let file_name = match target_os.as_str() {
        "windows" => "lumos_example_c.dll",
        "macos" => "liblumos_example_c.dylib",
        _ => "liblumos_example_c.so",
    };
    let library = out.join(file_name);
    println!("cargo:rerun-if-changed={}", source.display());
    println!(
        "cargo:rerun-if-changed={}",
        include.join("lumos_connector.h").display()
    );
    println!(
        "cargo:rustc-env=LUMOS_EXAMPLE_C_LIBRARY={}",
        library.display()
    );
    if target_os == "windows" {
        // The example is built and tested on Unix; the Windows check only type-checks Rust.
        return;
    }
    let compiler = cc::Build::new().get_compiler();
    let mut cmd: Command = compiler.to_command();
    cmd.args([
        "-std=c11", "-Wall", "-Wextra", "-Werror", "-O2", "-fPIC", "-shared",
    ])
    .arg("-I")
    .arg(&include)
    .arg(&source)
    .arg("-o")
    .arg(&library);
    let status = cmd.status().expect("cannot run the C compiler");
    assert!(status.success(), "compiling {} failed", source.display());
    // OUT_DIR is target/<profile>/build/<pkg>-<hash>/out: the profile folder is three up.
    if let Some(profile_dir) = out.ancestors().nth(3) {
        let _ = std::fs::copy(&library, profile_dir.join(file_name));
    }
}
