//! The Python package (`python/`): `cargo xtask test` builds its abi3 wheel with maturin,
//! installs it into a scratch virtual environment and runs its CPU checks
//! (`python/tests/test_cpu.py`: it imports, errors carry their fields, bad tensors are refused).
//! `cargo xtask wheel` builds the release wheel (what the GPU machine gets), which carries the
//! NVSHMEM module's cubin.

use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::Command;

const MATURIN: &str = "maturin==1.9.6";

/// maturin: on PATH, else installed from PyPI under target/tools/maturin.
fn maturin(root: &Path) -> Result<(PathBuf, Option<PathBuf>)> {
    if Command::new("maturin").arg("--version").output().map(|o| o.status.success()).unwrap_or(false) {
        return Ok(("maturin".into(), None));
    }
    let dir = root.join("target/tools/maturin");
    let exe = dir.join("bin/maturin");
    if !exe.exists() {
        println!("maturin not found; installing {MATURIN} from PyPI into {}", dir.display());
        crate::pip_install_target(&dir, MATURIN)?;
        if !exe.exists() {
            bail!("{MATURIN} installed no maturin executable");
        }
    }
    Ok((exe, Some(dir)))
}

/// Where the package carries the NVSHMEM module (`python/src/nvshmem.rs` looks for it there).
const PACKAGED_NVSHMEM_MODULE: &str = "python/moe_ep/moe_ep_nvshmem.cubin";

/// Builds the wheel into `target/wheels` (`release`: optimised) and returns its path. The
/// release wheel carries the NVSHMEM module's sm_90 cubin (`cargo xtask build-ptx --nvshmem`,
/// built here if it is not yet); the test wheel does not.
pub fn build_wheel(root: &Path, release: bool) -> Result<PathBuf> {
    let packaged = root.join(PACKAGED_NVSHMEM_MODULE);
    let _ = std::fs::remove_file(&packaged);
    if release {
        let cubin = root.join("target/ptx/moe_ep_nvshmem.cubin");
        if !cubin.exists() {
            crate::nvshmem::build(root)?;
        }
        std::fs::copy(&cubin, &packaged).with_context(|| format!("copying {} into the package", cubin.display()))?;
    }
    let (exe, pythonpath) = maturin(root)?;
    let out = root.join("target/wheels");
    let _ = std::fs::remove_dir_all(&out);
    let mut c = Command::new(exe);
    c.current_dir(root.join("python")).args(["build", "--quiet", "--out"]).arg(&out);
    if release {
        c.arg("--release");
    }
    if let Some(p) = pythonpath {
        c.env("PYTHONPATH", p);
    }
    // The outer cargo's environment belongs to xtask's own build.
    for v in ["CARGO_TARGET_DIR", "RUSTFLAGS", "CARGO_ENCODED_RUSTFLAGS"] {
        c.env_remove(v);
    }
    let st = c.status().context("running maturin")?;
    if !st.success() {
        bail!("maturin could not build the moe_ep wheel");
    }
    let wheel =
        std::fs::read_dir(&out)?.flatten().map(|e| e.path()).find(|p| p.extension().is_some_and(|x| x == "whl")).context("maturin wrote no wheel")?;
    let mib = std::fs::metadata(&wheel)?.len() as f64 / (1 << 20) as f64;
    println!("wheel: {} ({mib:.1} MiB)", wheel.display());
    Ok(wheel)
}

/// Builds the wheel, installs it into a fresh virtual environment and runs the CPU checks.
pub fn check(root: &Path) -> Result<()> {
    let wheel = build_wheel(root, false)?;
    let venv = root.join("target/py-venv");
    let _ = std::fs::remove_dir_all(&venv);
    let st = Command::new("python3").args(["-m", "venv"]).arg(&venv).status().context("creating a virtual environment")?;
    if !st.success() {
        bail!("python3 -m venv failed (install python3-venv)");
    }
    let py = venv.join("bin/python");
    let st = Command::new(&py)
        .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-index", "--no-deps"])
        .arg(&wheel)
        .status()
        .context("installing the wheel")?;
    if !st.success() {
        bail!("the moe_ep wheel does not install");
    }
    // Run from outside the source tree, so the installed package is what gets imported.
    let st = Command::new(&py).arg(root.join("python/tests/test_cpu.py")).current_dir(&venv).status().context("running the CPU checks")?;
    if !st.success() {
        bail!("the moe_ep package's CPU checks failed");
    }
    Ok(())
}
