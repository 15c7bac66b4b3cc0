//! Compiles the C test plugins (tests/c/misbehave.c) four ways into OUT_DIR; the tests find
//! them through `LUMOS_TEST_C_PLUGINS`.
#![forbid(unsafe_code)]

use std::path::PathBuf;

fn main() {
    let manifest =
        PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let include = manifest.join("../connector-abi/include");
    let source = manifest.join("c/misbehave.c");
    let layout = manifest.join("c/layout.c");
    println!("cargo:rerun-if-changed={}", source.display());
    println!("cargo:rerun-if-changed={}", layout.display());
    println!(
        "cargo:rerun-if-changed={}",
        include.join("lumos_connector.h").display()
    );
    println!("cargo:rustc-env=LUMOS_TEST_C_PLUGINS={}", out.display());
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("windows") {
        return;
    }
    let compiler = cc::Build::new().get_compiler();
    for (name, defines) in [
        ("libmisbehave_c.so", &[][..]),
        ("libwrong_major.so", &["-DTEST_ABI_MAJOR=2"][..]),
        ("libno_entry.so", &["-DTEST_NO_ENTRY"][..]),
        ("libhang_in_process.so", &["-DTEST_HANG_IN_PROCESS"][..]),
    ] {
        let status = compiler
            .to_command()
            .args([
                "-std=c11", "-Wall", "-Wextra", "-Werror", "-O1", "-fPIC", "-shared",
            ])
            .args(defines)
            .arg("-I")
            .arg(&include)
            .arg(&source)
            .arg("-o")
            .arg(out.join(name))
            .status()
            .expect("cannot run the C compiler");
        assert!(status.success(), "compiling {name} failed");
    }
    let status = compiler
        .to_command()
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror"])
        .arg("-I")
        .arg(&include)
        .arg(&layout)
        .arg("-o")
        .arg(out.join("abi_layout"))
        .status()
        .expect("cannot run the C compiler");
    assert!(status.success(), "compiling layout.c failed");
}
