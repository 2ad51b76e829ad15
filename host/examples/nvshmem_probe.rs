//! The NVSHMEM spike on GPUs (feature `nvshmem`, issue 13): NVSHMEM bootstrapped on a moe-ep
//! group by unique id, the probe kernels of `cargo xtask build-ptx --nvshmem` (Rust kernels
//! linked with NVSHMEM's device bitcode) bound to it, then a put-with-signal round trip between
//! ranks 0 and 1 and the put bandwidth with every rank putting to the next at once.
//!
//! ```sh
//! cargo xtask build-ptx --nvshmem
//! cargo build --release --features nvshmem --example nvshmem_probe
//! export MOE_EP_SECRET=$(openssl rand -hex 16) NVSHMEM_HOST_LIB=/path/to/libnvshmem_host.so.3
//! torchrun --nproc-per-node 2 --no-python target/release/examples/nvshmem_probe target/ptx/moe_ep_nvshmem.ptx
//! ```
//! (`NVSHMEM_HOST_LIB`: NVSHMEM 3.8.0's host library, the version of the linked bitcode; its
//! directory must also be on `LD_LIBRARY_PATH` for NVSHMEM's bootstrap plugin.)

use cudarc::driver::sys;
use moe_ep::nvshmem::{Nvshmem, NvshmemPingPongParams, NvshmemPutParams};
use moe_ep::{Group, GroupConfig};

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let ptx_path = std::env::args().nth(1).ok_or("usage: nvshmem_probe <moe_ep_nvshmem.ptx>")?;
    let ptx = std::fs::read_to_string(&ptx_path)?;
    let g = Group::from_env(GroupConfig::default())?;
    let (me, world, name) = (g.rank(), g.world(), g.device_name().to_string());
    let t0 = std::time::Instant::now();
    let nv = Nvshmem::init(&g, &ptx)?;
    let (ma, mi, pa) = nv.version();
    println!(
        "rank {me} of {world} ({name}): NVSHMEM {ma}.{mi}.{pa} initialised by unique id over the group's exchange, module bound, in {:.0} ms",
        t0.elapsed().as_secs_f64() * 1e3
    );
    let s = g.stream().clone();

    // Round trips between ranks 0 and 1.
    let data = nv.malloc(16)?;
    let elapsed = s.alloc_zeros::<u64>(1)?;
    let iters = 20000u32;
    let mut rtts = Vec::new();
    for _ in 0..3 {
        // Each trial counts its signal from zero: a fresh (zeroed) symmetric word.
        let sig_t = nv.malloc(8)?;
        nv.barrier_all()?;
        if me < 2 {
            let p = NvshmemPingPongParams {
                data: data.device_addr(),
                signal: sig_t.device_addr(),
                peer: 1 - me as i32,
                initiator: (me == 0) as u32,
                iters,
                _pad: 0,
                elapsed_ns: moe_ep::DeviceArg::device_addr(&elapsed),
            };
            nv.launch_ping_pong(&s, &p)?;
        }
        nv.barrier_all()?;
        if me == 0 {
            rtts.push(s.clone_dtoh(&elapsed)?[0] as f64 / iters as f64 / 1e3);
        }
    }
    if me == 0 {
        rtts.sort_by(f64::total_cmp);
        println!(
            "rank 0 of {world} ({name}): NVSHMEM put-with-signal round trip rank 0 <-> rank 1: {:.2} us (median of 3 trials of {iters})",
            rtts[1]
        );
    }

    // Put bandwidth, every rank to the next at once.
    let bytes = 256usize << 20;
    let reps = 10u32;
    let (src, dst) = (nv.malloc(bytes)?, nv.malloc(bytes)?);
    let ctx = g.context();
    for blocks in [24u32, 132] {
        nv.barrier_all()?;
        let (a, b) = (ctx.new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))?, ctx.new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))?);
        a.record(&s)?;
        let p =
            NvshmemPutParams { src: src.device_addr(), dst: dst.device_addr(), bytes: bytes as u64, peer: ((me + 1) % world) as i32, iters: reps };
        nv.launch_put(&s, blocks, 256, &p)?;
        b.record(&s)?;
        b.synchronize()?;
        let ms = a.elapsed_ms(&b)? as f64;
        println!(
            "rank {me} of {world} ({name}): NVSHMEM put to rank {}, every rank at once, {blocks} blocks x 256 threads: {:.1} GB/s ({} MiB x {reps})",
            (me + 1) % world,
            bytes as f64 * reps as f64 / ms / 1e6,
            bytes >> 20
        );
    }
    g.check()?;
    drop((src, dst, data));
    drop(nv);
    println!("rank {me}: NVSHMEM finalised");
    Ok(())
}

fn main() {
    if let Err(e) = run() {
        eprintln!("nvshmem_probe: {e}");
        std::process::exit(1);
    }
}
