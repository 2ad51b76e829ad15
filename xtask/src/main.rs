//! `cargo xtask <command>`: the project's build tasks (see `cargo xtask help`).
//!
//! - `build-ptx`: compile the kernels to PTX (through `host/build.rs`), validate it with
//!   `ptxas -arch=sm_90 -v` and print every kernel's registers, stack, shared memory and
//!   spills; fail on a ptxas error, an unresolved external or a spill.
//! - `test`: `cargo fmt --check`, `build-ptx`, then every test of the workspace (GPU tests
//!   SKIP without GPUs).
//! - `bench`: the benchmark on the local GPUs (`moe-ep-bench`, release build).
//! - `gpu-bundle`: release test and bench binaries plus the PTX and a `run.sh` under
//!   `target/gpu-bundle/`, for a GPU machine with no Rust and no network.

mod bundle;
mod ptx;

use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    if let Err(e) = run() {
        eprintln!("xtask: error: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let cmd = args.next().unwrap_or_else(|| "help".into());
    let rest: Vec<String> = args.collect();
    let root = root();
    match cmd.as_str() {
        "build-ptx" => ptx::build_and_check(&root).map(|_| ()),
        "test" => test(&root, &rest),
        "bench" => cargo(&root, &[&["run", "--release", "-p", "moe-ep-bench", "--"][..], &refs(&rest)].concat()),
        "gpu-bundle" => bundle::build(&root),
        "help" | "-h" | "--help" => {
            println!("cargo xtask build-ptx | test [cargo test args] | bench [bench args] | gpu-bundle");
            Ok(())
        }
        other => bail!("unknown command {other:?}; try `cargo xtask help`"),
    }
}

fn refs(v: &[String]) -> Vec<&str> {
    v.iter().map(|s| s.as_str()).collect()
}

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// Runs cargo (the toolchain running xtask) in `root`.
pub fn cargo(root: &Path, args: &[&str]) -> Result<()> {
    cargo_env(root, args, &[])
}

pub fn cargo_env(root: &Path, args: &[&str], env: &[(&str, String)]) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut c = Command::new(cargo);
    c.current_dir(root).args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    let st = c.status().with_context(|| format!("running cargo {}", args.join(" ")))?;
    if !st.success() {
        bail!("cargo {} failed ({st})", args.join(" "));
    }
    Ok(())
}

fn test(root: &Path, rest: &[String]) -> Result<()> {
    // Tidy first: formatting is part of the gate.
    cargo(root, &["fmt", "--all", "--", "--check"]).context("code is not formatted; run `cargo fmt --all`")?;
    let ptxas = ptx::build_and_check(root)?;
    let mut args = vec!["test", "--workspace"];
    args.extend(refs(rest));
    cargo_env(root, &args, &[("MOE_EP_PTXAS", ptxas.display().to_string())])
}
