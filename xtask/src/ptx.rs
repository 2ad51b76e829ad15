//! `build-ptx`: build, validate with ptxas, report.

use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Kernels allowed to spill, each with the reason. None today.
const SPILL_EXEMPT: &[(&str, &str)] = &[];

/// The PyPI package ptxas comes from when it is not on PATH.
const NVCC_PACKAGE: &str = "nvidia-cuda-nvcc==13.0.*";

/// Builds the PTX, validates it, prints the resource table; returns the ptxas used.
pub fn build_and_check(root: &Path) -> Result<PathBuf> {
    crate::cargo(root, &["build", "--quiet", "-p", "moe-ep"])?;
    let ptx_path = root.join("target/ptx/moe_ep_kernels.ptx");
    let ptx = std::fs::read_to_string(&ptx_path).with_context(|| format!("reading {}", ptx_path.display()))?;
    check_text(&ptx)?;
    let ptxas = find_ptxas(root)?;
    let cubin = root.join("target/ptx/moe_ep_kernels.cubin");
    let out = Command::new(&ptxas)
        .args(["-arch=sm_90", "-v"])
        .arg(&ptx_path)
        .arg("-o")
        .arg(&cubin)
        .output()
        .with_context(|| format!("running {}", ptxas.display()))?;
    let log = String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("ptxas rejected the PTX:\n{log}");
    }
    let kernels = parse_ptxas(&log);
    println!("{:<22} {:>5} {:>7} {:>8} {:>12} {:>11}", "kernel", "regs", "stack", "smem", "spill-store", "spill-load");
    let mut spills = Vec::new();
    for k in &kernels {
        println!("{:<22} {:>5} {:>7} {:>8} {:>12} {:>11}", k.name, k.regs, k.stack, k.smem, k.spill_st, k.spill_ld);
        if (k.spill_st > 0 || k.spill_ld > 0) && !SPILL_EXEMPT.iter().any(|(n, _)| *n == k.name) {
            spills.push(k.name.clone());
        }
    }
    if kernels.is_empty() {
        bail!("ptxas reported no kernels:\n{log}");
    }
    if !spills.is_empty() {
        bail!("register spills in {spills:?} (exempt a kernel only by name, with a reason, in xtask/src/ptx.rs)");
    }
    println!("PTX ok: {} ({} kernels, validated by {})", ptx_path.display(), kernels.len(), ptxas.display());
    Ok(ptxas)
}

/// Header, target and "no external symbols".
fn check_text(ptx: &str) -> Result<()> {
    let version = ptx.lines().find_map(|l| l.trim().strip_prefix(".version ")).context("no .version line")?;
    let v: f64 = version.trim().parse().context("unparsable .version")?;
    if !(8.0..=9.0).contains(&v) {
        bail!("PTX ISA {v} is outside 8.0..=9.0 (the GPU machines' driver JIT accepts up to 9.0)");
    }
    if !ptx.lines().any(|l| l.trim() == ".target sm_90") {
        bail!("the PTX does not target sm_90");
    }
    if let Some(l) = ptx.lines().find(|l| l.contains(".extern .func") || l.trim_start().starts_with("call")) {
        bail!("unresolved external function in the PTX: {l:?}");
    }
    Ok(())
}

/// ptxas: `MOE_EP_PTXAS`, PATH, the cache under target/tools, else installed there from PyPI.
pub fn find_ptxas(root: &Path) -> Result<PathBuf> {
    if let Ok(p) = std::env::var("MOE_EP_PTXAS") {
        return Ok(p.into());
    }
    if Command::new("ptxas").arg("--version").output().map(|o| o.status.success()).unwrap_or(false) {
        return Ok("ptxas".into());
    }
    let dir = root.join("target/tools/nvcc");
    let cached = dir.join("nvidia/cu13/bin/ptxas");
    if cached.exists() {
        return Ok(cached);
    }
    println!("ptxas not found; installing {NVCC_PACKAGE} from PyPI into {}", dir.display());
    let st = Command::new("python3")
        .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--target"])
        .arg(&dir)
        .arg(NVCC_PACKAGE)
        .status()
        .context("running python3 -m pip (needed once to fetch ptxas)")?;
    if !st.success() || !cached.exists() {
        bail!("could not install ptxas ({NVCC_PACKAGE}); install it and put ptxas on PATH or set MOE_EP_PTXAS");
    }
    Ok(cached)
}

struct KernelInfo {
    name: String,
    regs: u32,
    stack: u32,
    smem: u32,
    spill_st: u32,
    spill_ld: u32,
}

fn number_before(line: &str, unit: &str) -> u32 {
    line.split(',').find(|p| p.contains(unit)).and_then(|p| p.split_whitespace().find_map(|w| w.parse().ok())).unwrap_or(0)
}

fn parse_ptxas(log: &str) -> Vec<KernelInfo> {
    let mut v: Vec<KernelInfo> = Vec::new();
    for line in log.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let name = rest.split('\'').next().unwrap_or("").to_string();
            v.push(KernelInfo { name, regs: 0, stack: 0, smem: 0, spill_st: 0, spill_ld: 0 });
        } else if let Some(k) = v.last_mut() {
            if line.contains("bytes stack frame") {
                k.stack = number_before(line, "stack frame");
                k.spill_st = number_before(line, "spill stores");
                k.spill_ld = number_before(line, "spill loads");
            } else if line.contains("Used") && line.contains("registers") {
                let after = line.split("Used").nth(1).unwrap_or("");
                k.regs = number_before(after, "registers");
                k.smem = number_before(after, "smem");
            }
        }
    }
    v
}
