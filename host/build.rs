//! Builds the kernels crate into one PTX module with rustc's `nvptx64-nvidia-cuda` target and
//! hands it to the library (`include_str!` of `$OUT_DIR/moe_ep_kernels.ptx`), so the host
//! always runs the kernels of the same commit. A copy lands at `target/ptx/moe_ep_kernels.ptx`
//! for `cargo xtask build-ptx` (ptxas validation) and the GPU bundle.
//!
//! How: `cargo rustc` on the kernels crate with `-Zbuild-std=core` (no prebuilt core exists for
//! nvptx64), profile `ptx` (fat LTO, one codegen unit), `--crate-type cdylib --emit=asm` and
//! `-C linker=/bin/true` (the `.s` file is the PTX; nothing is linked), PTX ISA 8.0 for sm_90.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest.parent().unwrap().to_path_buf();
    let kernels = root.join("kernels");
    println!("cargo:rerun-if-changed={}", kernels.join("src").display());
    println!("cargo:rerun-if-changed={}", kernels.join("Cargo.toml").display());
    println!("cargo:rerun-if-env-changed=MOE_EP_PTX");
    let out = PathBuf::from(env::var("OUT_DIR").unwrap()).join("moe_ep_kernels.ptx");

    // A prebuilt PTX (e.g. from a toolchain without rust-src) may be supplied explicitly.
    if let Ok(p) = env::var("MOE_EP_PTX") {
        std::fs::copy(&p, &out).unwrap_or_else(|e| panic!("MOE_EP_PTX={p}: {e}"));
        return;
    }

    let target_root = env::var("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|_| root.join("target"));
    let target_dir = target_root.join("ptx-build");
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&root)
        .args(["rustc", "-p", "moe-ep-kernels", "--profile", "ptx", "--target", "nvptx64-nvidia-cuda", "-Zbuild-std=core"])
        .arg("--target-dir")
        .arg(&target_dir)
        .args(["--crate-type", "cdylib", "--", "--emit=asm", "-Clinker=/bin/true"])
        // The outer build's flags, wrappers and jobserver must not leak into the nvptx build.
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("RUSTFLAGS")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET")
        .env("CARGO_TARGET_NVPTX64_NVIDIA_CUDA_RUSTFLAGS", "-Zunstable-options -Cpanic=immediate-abort -Ctarget-cpu=sm_90 -Ctarget-feature=+ptx80");
    let status = cmd.status().expect("could not run cargo for the nvptx64 kernel build");
    if !status.success() {
        panic!(
            "building the kernels for nvptx64-nvidia-cuda failed ({status}); the pinned nightly with \
             rust-src is required (`rustup toolchain install` in the repository root)"
        );
    }
    let asm = target_dir.join("nvptx64-nvidia-cuda/ptx/deps/moe_ep_kernels.s");
    let ptx = std::fs::read_to_string(&asm).unwrap_or_else(|e| panic!("{}: {e}", asm.display()));
    std::fs::write(&out, &ptx).unwrap();
    let stable = target_root.join("ptx");
    std::fs::create_dir_all(&stable).unwrap();
    write_if_changed(&stable.join("moe_ep_kernels.ptx"), &ptx);
}

fn write_if_changed(path: &Path, text: &str) {
    if std::fs::read_to_string(path).ok().as_deref() != Some(text) {
        std::fs::write(path, text).unwrap();
    }
}
