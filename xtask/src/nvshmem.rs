//! `build-ptx --nvshmem`: the NVSHMEM spike's build path. Rust kernels that call NVSHMEM's
//! device API (`kernels/src/nvshmem.rs`, feature `nvshmem`) are compiled to LLVM bitcode by
//! the pinned nightly, linked with NVSHMEM's own device bitcode from its PyPI wheel (only what
//! the kernels reach), internalised to the kernels, optimised, and emitted as one sm_90 PTX
//! module (PTX ISA 8.5: NVSHMEM's `.mmio` stores need 8.2 or later) by the nightly's
//! `llvm-tools`; ptxas then validates it and writes the sm_90 cubin beside it (loaded in
//! preference to the PTX, so a driver need not JIT PTX 8.5). No CUDA C++ is involved. The module
//! is written to `target/ptx/moe_ep_nvshmem.{ptx,cubin}`; the library's default PTX is unchanged.

use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The NVSHMEM wheel the device bitcode comes from: the oldest 3.x the library supports, the
/// one torch's CUDA 13 wheels bring (NVSHMEM's host library accepts a module of its own major
/// version and an older or equal minor, so newer 3.x host libraries load it too).
const WHEEL: &str = "nvidia-nvshmem-cu13==3.4.5";
/// The device library inside the wheel (3.4 ships one bitcode for every architecture).
const BITCODE: &str = "nvidia/nvshmem/lib/libnvshmem_device.bc";
/// Its name in the cache (`target/tools/nvshmem`), versioned so that a change of the pin
/// fetches it again.
const CACHED: &str = "libnvshmem_device-3.4.5.bc";
/// The kernels the module keeps.
const KERNELS: &[&str] = &["nvshmem_ping_pong", "nvshmem_put_bw", "ll_dispatch", "ll_combine"];
/// NVSHMEM's device globals that `nvshmemx_cumodule_init` finds by name in a module and fills
/// (or, for the version, checks against the host library): kept visible.
const STATE_GLOBALS: &[&str] =
    &["nvshmemi_device_state_d", "nvshmemi_device_lib_version_d", "nvshmemi_ibgda_device_state_d", "nvshmemi_gpunetio_device_state_d"];
/// External functions NVSHMEM's device code calls that the CUDA driver supplies at load time.
const DRIVER_EXTERNS: &[&str] = &["vprintf", "__assertfail"];
/// PTX ISA of the module.
const ISA: &str = "+ptx85";

/// Builds and validates the NVSHMEM module; returns its path.
pub fn build(root: &Path) -> Result<PathBuf> {
    let nvshmem_bc = fetch_bitcode(root)?;
    let ours = crate::ptx::compile_kernels(root, "target/nvshmem-build", &["nvshmem"], "llvm-bc", ISA)?;
    let bin = llvm_tools()?;
    let dir = root.join("target/nvshmem-build");
    let (linked, kept, optimised) = (dir.join("linked.bc"), dir.join("kept.bc"), dir.join("optimised.bc"));
    let ptx_path = dir.join("moe_ep_nvshmem.ptx");
    // The whole device library is linked (`--only-needed` would drop the version global no
    // kernel references); internalising everything but the kernels and NVSHMEM's state globals
    // lets global DCE remove what the kernels do not reach.
    tool(&bin, "llvm-link", |c| c.arg(&ours).arg(&nvshmem_bc).arg("-o").arg(&linked))?;
    let public: Vec<&str> = KERNELS.iter().chain(STATE_GLOBALS).copied().collect();
    tool(&bin, "opt", |c| {
        c.arg("-passes=internalize,globaldce").arg(format!("-internalize-public-api-list={}", public.join(","))).arg(&linked).arg("-o").arg(&kept)
    })?;
    tool(&bin, "opt", |c| c.arg("-O3").arg(&kept).arg("-o").arg(&optimised))?;
    tool(&bin, "llc", |c| c.args(["-mcpu=sm_90", &format!("-mattr={ISA}")]).arg(&optimised).arg("-o").arg(&ptx_path))?;
    let ptx = std::fs::read_to_string(&ptx_path).with_context(|| format!("reading {}", ptx_path.display()))?;
    crate::ptx::check_text_allowing(&ptx, DRIVER_EXTERNS)?;
    for k in KERNELS {
        if !ptx.contains(&format!(".entry {k}(")) {
            bail!("the NVSHMEM module lacks the kernel {k}");
        }
    }
    for g in ["nvshmemi_device_state_d", "nvshmemi_device_lib_version_d"] {
        if !ptx.lines().any(|l| l.starts_with(".visible") && l.contains(g)) {
            bail!("the NVSHMEM module does not export {g} (nvshmemx_cumodule_init needs it)");
        }
    }
    let (ptxas, n) = crate::ptx::assemble(root, "moe_ep_nvshmem", &ptx)?;
    let out = root.join("target/ptx/moe_ep_nvshmem.ptx");
    println!(
        "NVSHMEM module ok: {} ({} KB of PTX, ISA 8.5, {n} kernels, externs only {DRIVER_EXTERNS:?}; NVSHMEM {} device bitcode; sm_90 cubin of {} KB beside it; validated by {})",
        out.display(),
        ptx.len() / 1024,
        WHEEL.split("==").nth(1).unwrap_or(WHEEL),
        std::fs::metadata(out.with_extension("cubin")).map(|m| m.len() / 1024).unwrap_or(0),
        ptxas.display()
    );
    Ok(out)
}

/// NVSHMEM's device bitcode, extracted from the pinned wheel into `target/tools/nvshmem`
/// (downloaded with pip once).
fn fetch_bitcode(root: &Path) -> Result<PathBuf> {
    let dir = root.join("target/tools/nvshmem");
    let bc = dir.join(CACHED);
    if bc.exists() {
        return Ok(bc);
    }
    std::fs::create_dir_all(&dir)?;
    println!("fetching {WHEEL} from PyPI (NVSHMEM's device bitcode) into {}", dir.display());
    let st = Command::new("python3")
        .args(["-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-deps", "--dest"])
        .arg(&dir)
        .arg(WHEEL)
        .status()
        .context("running python3 -m pip download")?;
    if !st.success() {
        bail!("could not download {WHEEL} from PyPI");
    }
    // Only the bitcode is kept (the wheel is about 180 MB).
    let script = format!(
        "import glob, sys, zipfile\nw = glob.glob(sys.argv[1] + '/nvidia_nvshmem_cu13-*.whl')[0]\nopen(sys.argv[2], 'wb').write(zipfile.ZipFile(w).read('{BITCODE}'))\n"
    );
    let st = Command::new("python3").args(["-c", &script]).arg(&dir).arg(&bc).status().context("extracting the bitcode")?;
    if !st.success() || !bc.exists() {
        bail!("{BITCODE} not found in the {WHEEL} wheel");
    }
    for whl in std::fs::read_dir(&dir)?.flatten().filter(|e| e.path().extension().is_some_and(|x| x == "whl")) {
        let _ = std::fs::remove_file(whl.path());
    }
    Ok(bc)
}

/// The pinned nightly's `llvm-tools` (llvm-link, opt, llc): `<sysroot>/lib/rustlib/<host>/bin`.
fn llvm_tools() -> Result<PathBuf> {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let out = Command::new(&rustc).args(["--print", "sysroot"]).output().context("running rustc --print sysroot")?;
    let sysroot = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    let vv = Command::new(&rustc).arg("-vV").output().context("running rustc -vV")?;
    let host =
        String::from_utf8_lossy(&vv.stdout).lines().find_map(|l| l.strip_prefix("host: ").map(str::to_string)).context("no host in rustc -vV")?;
    let bin = sysroot.join("lib/rustlib").join(host).join("bin");
    if !bin.join("llvm-link").exists() {
        bail!("llvm-link not found in {} (the llvm-tools component of the pinned nightly; `rustup toolchain install` adds it)", bin.display());
    }
    Ok(bin)
}

/// Runs one of the LLVM tools, failing with its output.
fn tool(bin: &Path, name: &str, args: impl FnOnce(&mut Command) -> &mut Command) -> Result<()> {
    let mut c = Command::new(bin.join(name));
    let out = args(&mut c).output().with_context(|| format!("running {name}"))?;
    if !out.status.success() {
        bail!("{name} failed ({}):\n{}{}", out.status, String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}
