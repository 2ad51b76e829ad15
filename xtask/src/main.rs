//! `cargo xtask <command>`: the project's build tasks (see `cargo xtask help`).
//!
//! - `build-ptx`: compile the kernels to PTX with the pinned nightly and write the checked-in
//!   `host/kernels.ptx` the library embeds; validate it with `ptxas -arch=sm_90 -v` and print
//!   every kernel's registers, stack, shared memory and spills; fail on a ptxas error, an
//!   unresolved external or a spill. `--check` fails instead of writing when the file is stale.
//!   `--nvshmem` builds the NVSHMEM spike's second module instead ([`nvshmem`]).
//! - `test`: `cargo fmt --check`, `build-ptx --check`, every test of the workspace (GPU tests
//!   are reported as ignored without GPUs, and a last line counts GPU tests run and skipped).
//!   Then what a dependent sees: `cargo package` of the library, its docs with warnings as
//!   errors, and a scratch crate outside the workspace that depends on it, built on stable.
//! - `bench`: the benchmark on the local GPUs (`moe-ep-bench`, release build).
//! - `soak`: mixed random high-throughput and low-latency operations on the local GPUs, each
//!   checked against the CPU reference (`moe-ep-soak`, release build; `--iters N`).
//! - `wheel`: the Python package's release wheel (`python/`, maturin, abi3) in `target/wheels`;
//!   `test` builds a debug one and runs its CPU checks in a scratch virtual environment.
//! - `gpu-bundle`: release test and bench binaries plus the PTX and a `run.sh` under
//!   `target/gpu-bundle/`, for a GPU machine with no Rust and no network.

mod bundle;
mod dependents;
mod nvshmem;
mod ptx;
mod python;

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
        "build-ptx" if rest.iter().any(|a| a == "--nvshmem") => nvshmem::build(&root).map(|_| ()),
        "build-ptx" => ptx::build_and_check(&root, rest.iter().any(|a| a == "--check")).map(|_| ()),
        "test" => test(&root, &rest),
        "bench" => cargo(&root, &[&["run", "--release", "-p", "moe-ep-bench", "--"][..], &refs(&rest)].concat()),
        "soak" => cargo(&root, &[&["run", "--release", "-p", "moe-ep-tests", "--bin", "moe-ep-soak", "--"][..], &refs(&rest)].concat()),
        "gpu-bundle" => bundle::build(&root),
        "wheel" => python::build_wheel(&root, true).map(|_| ()),
        "help" | "-h" | "--help" => {
            println!(
                "cargo xtask build-ptx [--check | --nvshmem] | test [cargo test args] | bench [bench args] | soak [--iters N] | wheel | gpu-bundle"
            );
            Ok(())
        }
        other => bail!("unknown command {other:?}; try `cargo xtask help`"),
    }
}

fn refs(v: &[String]) -> Vec<&str> {
    v.iter().map(|s| s.as_str()).collect()
}

/// `python3 -m pip install --target dir package` (tools fetched from PyPI into target/tools).
pub fn pip_install_target(dir: &Path, package: &str) -> Result<()> {
    let st = Command::new("python3")
        .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--target"])
        .arg(dir)
        .arg(package)
        .status()
        .with_context(|| format!("running python3 -m pip to fetch {package}"))?;
    if !st.success() {
        bail!("could not install {package} from PyPI");
    }
    Ok(())
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
    cargo(root, &["fmt", "--manifest-path", "python/Cargo.toml", "--", "--check"])
        .context("the Python extension is not formatted; run `cargo fmt --manifest-path python/Cargo.toml`")?;
    // The committed PTX must be what the kernels compile to (the library embeds that file).
    let ptxas = ptx::build_and_check(root, true)?;
    let report = root.join("target/gpu-test-report.tsv");
    let _ = std::fs::remove_file(&report);
    let mut args = vec!["test", "--workspace"];
    args.extend(refs(rest));
    let result = cargo_env(root, &args, &[("MOE_EP_PTXAS", ptxas.display().to_string()), ("MOE_EP_TEST_REPORT", report.display().to_string())]);
    let summary = gpu_summary(&std::fs::read_to_string(&report).unwrap_or_default());
    result?;
    // What a crate that depends on moe-ep sees: it packages, its docs build, and it builds on
    // stable Rust.
    dependents::check(root)?;
    python::check(root)?;
    println!("{summary}");
    Ok(())
}

/// The last line of `cargo xtask test`: GPU tests run and skipped, with the reasons, from the
/// lines the GPU test harness appends to `MOE_EP_TEST_REPORT` (`kind<TAB>test<TAB>detail`).
fn gpu_summary(report: &str) -> String {
    let mut skipped: Vec<(&str, &str)> = Vec::new();
    let (mut passed, mut failed) = (Vec::new(), Vec::new());
    for line in report.lines() {
        let mut f = line.splitn(3, '\t');
        match (f.next(), f.next(), f.next()) {
            (Some("skip"), Some(t), Some(why)) => skipped.push((t, why)),
            (Some("pass"), Some(t), _) => passed.push(t),
            (Some("fail"), Some(t), _) => failed.push(t),
            _ => {}
        }
    }
    let mut reasons: Vec<&str> = skipped.iter().map(|s| s.1).collect();
    reasons.sort_unstable();
    reasons.dedup();
    let mut s =
        format!("GPU tests: {} run ({} passed, {} failed), {} skipped", passed.len() + failed.len(), passed.len(), failed.len(), skipped.len());
    if !reasons.is_empty() {
        s += &format!(" ({})", reasons.join("; "));
    }
    if !failed.is_empty() {
        s += &format!("; failed: {}", failed.join(", "));
    }
    s
}
