//! Compiles the Klaviyo destination crate to a WebAssembly component, so
//! that a plain `cargo build` of the host produces the plugin it embeds as
//! its default. The nested cargo gets its own target directory under
//! OUT_DIR: sharing ours would deadlock on cargo's build lock.

use std::env;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest_dir.parent().expect("host/ sits in the workspace");
    let out_dir = PathBuf::from(env::var("OUT_DIR").unwrap());
    let target_dir = out_dir.join("wasm-target");

    for path in ["destination/src", "destination/Cargo.toml", "wit", "Cargo.lock"] {
        println!("cargo:rerun-if-changed={}", root.join(path).display());
    }

    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let status = Command::new(cargo)
        .current_dir(root)
        .args(["build", "--locked", "--release", "--target", "wasm32-wasip2"])
        .args(["--package", "klaviyo-destination"])
        .arg("--target-dir")
        .arg(&target_dir)
        // A small plugin: no debug info, but keep the name section so a
        // trap's backtrace names the plugin's functions.
        .env("CARGO_PROFILE_RELEASE_DEBUG", "false")
        .env("CARGO_PROFILE_RELEASE_STRIP", "debuginfo")
        .env("CARGO_PROFILE_RELEASE_LTO", "true")
        .env("CARGO_PROFILE_RELEASE_CODEGEN_UNITS", "1")
        .env("CARGO_PROFILE_RELEASE_PANIC", "abort")
        // Flags meant for the host build must not leak into the wasm build.
        // Its own: wasm SIMD, which wasmtime compiles to the host's vector
        // instructions; memchr (under serde_json's and regex's searches)
        // uses it.
        .env("CARGO_ENCODED_RUSTFLAGS", "-Ctarget-feature=+simd128")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_BUILD_RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET")
        .env_remove("CARGO_MAKEFLAGS")
        .status()
        .expect("running cargo to build the destination component");
    assert!(
        status.success(),
        "building the destination component for wasm32-wasip2 failed"
    );

    let wasm = target_dir.join("wasm32-wasip2/release/klaviyo_destination.wasm");
    assert!(wasm.exists(), "{} was not produced", wasm.display());
    println!("cargo:rustc-env=KLAVIYO_COMPONENT={}", wasm.display());
    // The same file, for tests that hand the component to the binary.
    println!("cargo:rustc-env=KLAVIYO_COMPONENT_FOR_TESTS={}", wasm.display());
}
