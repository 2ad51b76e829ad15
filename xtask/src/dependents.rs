//! What a crate depending on `moe-ep` sees, checked by `cargo xtask test`: the library and its
//! kernels crate package (`cargo package`, verified by building the packaged sources), the docs
//! build with warnings as errors, and a scratch crate outside the workspace that depends on the
//! library by path builds with the stable toolchain (no nightly, no CUDA toolkit).

use anyhow::{Context, Result, bail};
use std::path::Path;
use std::process::Command;

/// The scratch dependent: it owns a group and both buffer kinds with no lifetimes, as a
/// serving engine's model layer would, and uses the embedded PTX.
const SCRATCH_MAIN: &str = r#"use moe_ep::ht::{HtBuffer, HtConfig};
use moe_ep::ll::{LlBuffer, LlConfig};
use moe_ep::{Group, GroupConfig};

/// A model layer that owns its communicator and buffers.
#[allow(dead_code)]
struct MoeLayer {
    group: Group,
    ht: HtBuffer,
    ll: LlBuffer,
}

#[allow(dead_code)]
fn build_layer(group: Group) -> moe_ep::Result<MoeLayer> {
    let ht = HtBuffer::new(&group, HtConfig::new(256, 7168, 8, 4096, group.world()))?;
    let ll = LlBuffer::new(&group, LlConfig::new(256, 7168, 8, 128))?;
    Ok(MoeLayer { group, ht, ll })
}

fn main() {
    fn owned<T: Send + 'static>() {}
    owned::<MoeLayer>();
    let _ = GroupConfig::default();
    println!("moe-ep dependent: {} bytes of PTX", moe_ep::PTX.len());
}
"#;

pub fn check(root: &Path) -> Result<()> {
    forget_packaged_kernels();
    // Registry sources are assumed immutable, so their build outputs are reused by version:
    // the verification builds the kernels crate afresh.
    let _ = std::fs::remove_dir_all(root.join("target/package"));
    for e in std::fs::read_dir(root.join("target/debug/.fingerprint")).into_iter().flatten().flatten() {
        if e.file_name().to_string_lossy().starts_with("moe-ep-kernels-") {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
    crate::cargo(root, &["package", "--quiet", "--allow-dirty", "-p", "moe-ep-kernels", "-p", "moe-ep"]).context("packaging moe-ep")?;
    crate::cargo_env(root, &["doc", "--quiet", "-p", "moe-ep", "-p", "moe-ep-kernels", "--no-deps"], &[("RUSTDOCFLAGS", "-D warnings".into())])
        .context("building moe-ep's docs")?;
    stable_dependent(root)
}

/// `cargo package` verifies the library against the kernels crate through a temporary local
/// registry, and cargo keeps what it extracted from such a registry by name and version: a
/// later run would build the library against the kernels of an earlier one. Removes those
/// copies (only `moe-ep-kernels-*` of registries other than crates.io) from the cargo home.
fn forget_packaged_kernels() {
    let home =
        std::env::var_os("CARGO_HOME").map(std::path::PathBuf::from).or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")));
    let Some(home) = home else { return };
    for kind in ["src", "cache"] {
        let Ok(registries) = std::fs::read_dir(home.join("registry").join(kind)) else { continue };
        for reg in registries.flatten().filter(|r| !r.file_name().to_string_lossy().starts_with("index.crates.io")) {
            for e in std::fs::read_dir(reg.path()).into_iter().flatten().flatten() {
                if e.file_name().to_string_lossy().starts_with("moe-ep-kernels-") {
                    let p = e.path();
                    let _ = if p.is_dir() { std::fs::remove_dir_all(&p) } else { std::fs::remove_file(&p) };
                }
            }
        }
    }
}

/// `cargo +stable` with the outer (nightly) cargo's environment removed.
fn stable_cargo(dir: &Path) -> Command {
    let mut c = Command::new("cargo");
    c.arg("+stable").current_dir(dir);
    for v in ["CARGO", "RUSTC", "RUSTDOC", "RUSTUP_TOOLCHAIN", "RUSTFLAGS", "CARGO_ENCODED_RUSTFLAGS", "CARGO_TARGET_DIR", "CARGO_BUILD_TARGET"] {
        c.env_remove(v);
    }
    c
}

fn stable_dependent(root: &Path) -> Result<()> {
    if !stable_cargo(root).arg("--version").output().map(|o| o.status.success()).unwrap_or(false) {
        println!("installing the stable toolchain for the dependent-crate check");
        let st = Command::new("rustup").args(["toolchain", "install", "stable", "--profile", "minimal"]).status().context("running rustup")?;
        if !st.success() {
            bail!("could not install the stable toolchain (rustup toolchain install stable)");
        }
    }
    let dir = root.join("target/stable-dependent");
    std::fs::create_dir_all(dir.join("src"))?;
    let manifest = format!(
        "[package]\nname = \"moe-ep-stable-dependent\"\nversion = \"0.0.0\"\nedition = \"2024\"\npublish = false\n\n[dependencies]\nmoe-ep = {{ path = {:?} }}\n\n[workspace]\n",
        root.join("host").display().to_string()
    );
    std::fs::write(dir.join("Cargo.toml"), manifest)?;
    std::fs::write(dir.join("src/main.rs"), SCRATCH_MAIN)?;
    let st = stable_cargo(&dir).args(["run", "--quiet"]).status().context("running cargo +stable")?;
    if !st.success() {
        bail!("a crate depending on moe-ep does not build on stable Rust (see above; {})", dir.display());
    }
    Ok(())
}
