//! PTX checks (no GPU needed): the embedded module's header, no external symbols, every
//! kernel present with a parameter block of the size the host passes, the instructions the
//! device layer promises, and (where ptxas is available) a clean sm_90 assembly with no
//! spills.

use moe_ep::{Kernel, PTX};

#[test]
fn ptx_header_and_no_externals() {
    assert!(PTX.lines().any(|l| l.trim() == ".target sm_90"), "not sm_90");
    let v: f64 = PTX.lines().find_map(|l| l.trim().strip_prefix(".version ")).unwrap().trim().parse().unwrap();
    assert!((8.0..=9.0).contains(&v), "PTX ISA {v}");
    assert!(!PTX.contains(".extern .func"), "external function in the PTX");
    assert!(!PTX.lines().any(|l| l.trim_start().starts_with("call")), "a call survived inlining");
    // Kernels never trap (a trap poisons the whole CUDA context): every impossible condition is
    // an error record instead, so no panic path (bounds check, division by zero) may survive.
    let traps = PTX.matches("trap;").count();
    assert_eq!(traps, 0, "{traps} `trap` instructions in the PTX (a panic path survived: index with a checked helper, divide with dev::div_rem_*)");
    // IEEE division only (bit-exact scales), never the approximations.
    assert!(!PTX.contains("div.approx.f32") && !PTX.contains("div.full.f32"));
}

#[test]
fn ptx_kernel_parameter_blocks_match_the_host() {
    for k in Kernel::ALL {
        let head = format!(".entry {}(", k.name());
        let at = PTX.find(&head).unwrap_or_else(|| panic!("kernel {} missing from the PTX", k.name()));
        let decl = &PTX[at..at + 200];
        let size: usize = decl
            .split('[')
            .nth(1)
            .and_then(|r| r.split(']').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{}: no by-value parameter block in {decl:?}", k.name()));
        assert_eq!(size, k.param_bytes(), "{}: the PTX takes {size} bytes, the host passes {}", k.name(), k.param_bytes());
        // Exactly one parameter.
        let params = &decl[..decl.find(')').unwrap()];
        assert_eq!(params.matches(".param").count(), 1, "{}: {params}", k.name());
    }
}

#[test]
fn ptx_device_layer_instructions_present() {
    for insn in [
        "mov.u32 %r",
        "%globaltimer",
        "nanosleep.u32",
        "bar.sync 0",
        "bar.red.and.pred",
        "bar.warp.sync",
        "shfl.sync.idx.b32",
        "shfl.sync.bfly.b32",
        "shfl.sync.up.b32",
        "vote.sync.ballot.b32",
        "vote.sync.any.pred",
        "elect.sync",
        "ld.acquire.sys.global.u32",
        "ld.acquire.gpu.global.u32",
        "ld.relaxed.sys.global.u32",
        "ld.volatile.global.u32",
        "ld.global.nc.v4.u32",
        "ld.global.nc.L1::no_allocate.v4.u32",
        "ld.global.v4.u32",
        "ld.global.nc.u8",
        "st.release.sys.global.u32",
        "st.release.gpu.global.u32",
        "st.relaxed.sys.global.u32",
        "st.relaxed.sys.global.u64",
        "st.volatile.global.u32",
        "st.global.v4.u32",
        "st.global.L1::no_allocate.v4.u32",
        "st.global.v2.u32",
        "st.global.u8",
        "fence.acq_rel.sys",
        "fence.acq_rel.gpu",
        "fence.proxy.async.shared::cta",
        "fence.proxy.async.global",
        "atom.relaxed.sys.global.add.u32",
        "atom.acq_rel.gpu.global.add.u32",
        "atom.relaxed.sys.global.cas.b32",
        "red.release.sys.global.add.u32",
        "red.relaxed.gpu.global.add.s32",
        "atom.shared::cta.add.u32",
        "mbarrier.init.shared::cta.b64",
        "mbarrier.arrive.expect_tx.shared::cta.b64",
        "mbarrier.try_wait.parity.shared::cta.b64",
        "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes",
        "cp.async.bulk.global.shared::cta.bulk_group",
        "cp.async.bulk.commit_group",
        "cp.async.bulk.wait_group.read 0",
        "cp.async.bulk.wait_group 0",
        "cvt.rn.satfinite.e4m3x2.f32",
        "cvt.rn.bf16x2.f32",
        "cvt.f32.bf16",
        "add.rn.f32",
        "mul.rn.f32",
        "fma.rn.f32",
        "div.rn.f32",
        "max.f32",
        "abs.f32",
        "cvta.to.global.u64",
        "fence.sc.sys",
        "ld.acquire.sys.global.u64",
        "ld.global.nc.u16",
        "st.global.u64",
        "st.shared::cta.v4.u32",
        "st.shared::cta.v2.u32",
        "ld.shared::cta.v4.u32",
        "ld.shared::cta.u32",
        "%smid",
        "%dynamic_smem_size",
        "ld.relaxed.sys.global.s32",
        "ld.global.u32",
        "atom.relaxed.gpu.global.add.u32",
        "red.relaxed.sys.global.add.u32",
    ] {
        assert!(PTX.contains(insn), "`{insn}` missing from the PTX (a wrapper was dropped or renamed)");
    }
}

#[test]
fn ptx_assembles_without_spills() {
    let Some(ptxas) = std::env::var("MOE_EP_PTXAS")
        .ok()
        .or_else(|| std::process::Command::new("ptxas").arg("--version").output().ok().filter(|o| o.status.success()).map(|_| "ptxas".to_string()))
    else {
        println!("SKIP ptx_assembles_without_spills: no ptxas (cargo xtask test provides one through MOE_EP_PTXAS)");
        return;
    };
    let dir = std::env::temp_dir().join(format!("moe-ep-ptx-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let src = dir.join("k.ptx");
    std::fs::write(&src, PTX).unwrap();
    let out = std::process::Command::new(&ptxas).args(["-arch=sm_90", "-v"]).arg(&src).arg("-o").arg(dir.join("k.cubin")).output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "ptxas failed:\n{log}");
    for line in log.lines().filter(|l| l.contains("spill")) {
        assert!(line.contains("0 bytes spill stores, 0 bytes spill loads"), "spill: {line}");
    }
    assert_eq!(log.matches("Compiling entry function").count(), Kernel::ALL.len());
    let _ = std::fs::remove_dir_all(&dir);
}
