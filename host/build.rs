//! Compiles the Klaviyo destination crate to a WebAssembly component, so
//! that a plain `cargo build` of the host produces the plugin it embeds as
//! its default (`component-build` says how, and adds the target when a
//! fresh machine lacks it).

use component_build::Component;

fn main() {
    // The plugin's own crates: the destination and json-scan, which it
    // scans events with.
    component_build::rerun_if_changed(&[
        "destination/src",
        "destination/Cargo.toml",
        "json-scan/src",
        "json-scan/Cargo.toml",
        "wit",
        "Cargo.lock",
    ]);
    let out = Component {
        packages: &["klaviyo-destination"],
        features: &[],
        vars: &[],
        name: "klaviyo",
    }
    .build();
    let wasm = out.join("klaviyo_destination.wasm");
    println!("cargo:rustc-env=KLAVIYO_COMPONENT={}", wasm.display());
    // The same file, for tests that hand the component to the binary.
    println!("cargo:rustc-env=KLAVIYO_COMPONENT_FOR_TESTS={}", wasm.display());
}
