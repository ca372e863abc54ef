//! Compiles workspace crates to WebAssembly components from a build script:
//! the host's (the bundled Klaviyo plugin) and the test fixtures' (hostile
//! plugins, other versions of the Klaviyo plugin). One place for the three
//! things both need:
//!
//! - **The target is there.** rustup adds a toolchain file's targets only
//!   when it installs the toolchain itself, so a machine that already had
//!   the pinned toolchain lacks `wasm32-wasip2`. We add it through rustup,
//!   or stop at once with one sentence that names it, instead of failing
//!   minutes later with rustc's "can't find crate for `core`".
//! - **One target directory and one set of flags** for every component, so
//!   that serde, the phone-number rules and the rest compile once for all
//!   of them. It sits beside the outer build's (sharing the outer one would
//!   deadlock on cargo's build lock) and is locked while a build copies its
//!   output out, as several build scripts run at once.
//! - **The flags of the shipped plugin**: size and speed (LTO, one codegen
//!   unit, abort on panic, wasm SIMD), no debug info but the name section,
//!   and none of the outer build's flags leaking in.

use std::env;
use std::fs::{self, File};
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The target every component is built for.
pub const TARGET: &str = "wasm32-wasip2";

/// One cargo build of some workspace packages for `wasm32-wasip2`.
pub struct Component<'a> {
    /// The packages to build (`--package`).
    pub packages: &'a [&'a str],
    /// Cargo features to turn on (`--features`).
    pub features: &'a [&'a str],
    /// Environment variables the crates read at compile time.
    pub vars: &'a [(&'a str, &'a str)],
    /// The folder under `OUT_DIR` that the `.wasm` files are copied to, so
    /// that a later build of the same crate with other variables cannot
    /// overwrite them.
    pub name: &'a str,
}

impl Component<'_> {
    /// Builds the packages and returns the folder their `.wasm` files were
    /// copied to. Stops the build script with a clear error on failure.
    pub fn build(&self) -> PathBuf {
        let root = workspace_root();
        let target_dir = shared_target_dir();
        fs::create_dir_all(&target_dir).unwrap_or_else(|e| fail(&format!("creating {}: {e}", target_dir.display())));
        // Held from the target check until the copy: another build
        // script's build of the same crate would overwrite the file in
        // between.
        let lock = File::create(target_dir.join(".component-build.lock"))
            .unwrap_or_else(|e| fail(&format!("creating the lock in {}: {e}", target_dir.display())));
        lock.lock()
            .unwrap_or_else(|e| fail(&format!("locking {}: {e}", target_dir.display())));
        // Under the lock: two build scripts finding the target missing at
        // once would run rustup at once, and one of them would fail.
        ensure_target();

        let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
        let mut command = Command::new(cargo);
        command
            .current_dir(&root)
            .args(["build", "--locked", "--release", "--target", TARGET])
            .arg("--target-dir")
            .arg(&target_dir)
            .env("CARGO_PROFILE_RELEASE_DEBUG", "false")
            .env("CARGO_PROFILE_RELEASE_STRIP", "debuginfo")
            .env("CARGO_PROFILE_RELEASE_LTO", "true")
            .env("CARGO_PROFILE_RELEASE_CODEGEN_UNITS", "1")
            .env("CARGO_PROFILE_RELEASE_PANIC", "abort")
            // wasm SIMD, which wasmtime compiles to the host's vector
            // instructions; memchr (under serde_json's and regex's
            // searches) uses it.
            .env("CARGO_ENCODED_RUSTFLAGS", "-Ctarget-feature=+simd128")
            .env_remove("RUSTFLAGS")
            .env_remove("CARGO_BUILD_RUSTFLAGS")
            .env_remove("CARGO_TARGET_DIR")
            .env_remove("CARGO_BUILD_TARGET")
            .env_remove("CARGO_BUILD_BUILD_DIR")
            .env_remove("CARGO_MAKEFLAGS");
        for package in self.packages {
            command.args(["--package", package]);
        }
        if !self.features.is_empty() {
            command.args(["--features", &self.features.join(",")]);
        }
        for (name, value) in self.vars {
            command.env(name, value);
        }
        let status = command
            .status()
            .unwrap_or_else(|e| fail(&format!("running cargo to build {:?}: {e}", self.packages)));
        if !status.success() {
            fail(&format!(
                "building {:?} for {TARGET} failed (cargo's errors are above)",
                self.packages
            ));
        }

        let built = target_dir.join(TARGET).join("release");
        let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join(self.name);
        fs::create_dir_all(&out).unwrap_or_else(|e| fail(&format!("creating {}: {e}", out.display())));
        for package in self.packages {
            let file = format!("{}.wasm", package.replace('-', "_"));
            fs::copy(built.join(&file), out.join(&file))
                .unwrap_or_else(|e| fail(&format!("copying {file} out of {}: {e}", built.display())));
        }
        out
    }
}

/// Tells cargo to run the build script again when these workspace paths
/// change.
pub fn rerun_if_changed(paths: &[&str]) {
    let root = workspace_root();
    for path in paths {
        println!("cargo:rerun-if-changed={}", root.join(path).display());
    }
}

/// The workspace root: the nearest folder above the build script's crate
/// holding a `Cargo.lock`.
fn workspace_root() -> PathBuf {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    manifest
        .ancestors()
        .find(|dir| dir.join("Cargo.lock").is_file())
        .unwrap_or(&manifest)
        .to_path_buf()
}

/// `<target>/wasm-components`, beside the outer build's profiles. The
/// outer target folder is the nearest one above `OUT_DIR` that cargo
/// tagged with `CACHEDIR.TAG`; failing that, a folder under `OUT_DIR`.
fn shared_target_dir() -> PathBuf {
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    match out.ancestors().skip(1).find(|dir| dir.join("CACHEDIR.TAG").is_file()) {
        Some(target) => target.join("wasm-components"),
        None => out.join("wasm-components"),
    }
}

/// Makes sure the toolchain building us has the `wasm32-wasip2` standard
/// library, adding it through rustup when it is missing.
fn ensure_target() {
    let rustc = env::var("RUSTC").unwrap_or_else(|_| "rustc".to_string());
    let sysroot = Command::new(&rustc)
        .args(["--print", "sysroot"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    let Some(sysroot) = sysroot else {
        fail(&format!("could not ask {rustc} for its sysroot"));
    };
    if has_target(&sysroot) {
        return;
    }
    // The toolchain as rustup names it: the one rustup chose for this
    // build, else the sysroot's folder name (rustup's layout).
    let toolchain = env::var("RUSTUP_TOOLCHAIN").ok().unwrap_or_else(|| {
        sysroot
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    });
    // Another checkout building at the same moment may be adding it too,
    // and one of two concurrent rustups fails: try again a few times, and
    // take the target however it came.
    let mut added = Command::new("rustup")
        .args(["target", "add", TARGET, "--toolchain", &toolchain])
        .status();
    for _ in 0..3 {
        if has_target(&sysroot) || matches!(&added, Err(e) if e.kind() == ErrorKind::NotFound) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_secs(2));
        added = Command::new("rustup")
            .args(["target", "add", TARGET, "--toolchain", &toolchain])
            .status();
    }
    match added {
        _ if has_target(&sysroot) => {
            println!("cargo:warning=added the {TARGET} target to the {toolchain} toolchain (rustup target add)");
        }
        Ok(_) => fail(&format!(
            "the plugin compiles to {TARGET}, which the Rust toolchain at {} lacks, and `rustup target add {TARGET} --toolchain {toolchain}` did not add it: run it by hand to see why",
            sysroot.display()
        )),
        Err(e) if e.kind() == ErrorKind::NotFound => fail(&format!(
            "the plugin compiles to {TARGET}, which the Rust toolchain at {} lacks; add it with `rustup target add {TARGET}` (or your distribution's rust-std package for {TARGET}), then build again",
            sysroot.display()
        )),
        Err(e) => fail(&format!("running rustup to add the {TARGET} target: {e}")),
    }
}

fn has_target(sysroot: &Path) -> bool {
    sysroot.join("lib/rustlib").join(TARGET).join("lib").is_dir()
}

/// Fails the build with one message, shown by cargo as the build's error.
fn fail(message: &str) -> ! {
    println!("cargo::error={message}");
    std::process::exit(1);
}
