//! CPU: configuration validation gives typed errors naming the argument and the value.

use moe_ep::Error;
use moe_ep::abi::{CONTROL_BYTES, HeapTables, LL_MAX_RANKS, ll_combine_smem_bytes, ll_dispatch_smem_bytes};
use moe_ep::ht::HtConfig;
use moe_ep::ll::LlConfig;

fn name_of(r: Result<(), Error>) -> (&'static str, String) {
    match r {
        Err(Error::InvalidArgument { name, reason }) => (name, reason),
        other => panic!("expected an invalid-argument error, got {other:?}"),
    }
}

#[test]
fn cpu_ht_config_limits() {
    let ok = HtConfig::new(256, 7168, 8, 4096, 4);
    ok.validate(4, 132).unwrap();
    for h in [128, 2048, 8192, 16384] {
        HtConfig { hidden: h, ..ok }.validate(4, 132).unwrap();
    }
    for w in [2, 8] {
        HtConfig::new(256, 7168, 16, 1, w).validate(w, 132).unwrap();
    }
    let cases: Vec<(HtConfig, usize, &str, &str)> = vec![
        (ok, 1, "world", "1 ranks"),
        (ok, 9, "world", "9 ranks"),
        (HtConfig { hidden: 100, ..ok }, 4, "hidden", "100"),
        (HtConfig { hidden: 16512, ..ok }, 4, "hidden", "16512"),
        (HtConfig { max_topk: 0, ..ok }, 4, "max_topk", "0"),
        (HtConfig { max_topk: 17, ..ok }, 4, "max_topk", "17"),
        (HtConfig { num_experts: 6, ..ok }, 4, "num_experts", "6"),
        (HtConfig { num_experts: 2, ..ok }, 4, "num_experts", "2"),
        (HtConfig { max_tokens_per_rank: 0, ..ok }, 4, "max_tokens_per_rank", "0"),
        (HtConfig { recv_capacity: Some(0), ..ok }, 4, "recv_capacity", "0"),
        (HtConfig { num_sms: 200, ..ok }, 4, "num_sms", "200"),
        (HtConfig { threads: 100, ..ok }, 4, "threads", "100"),
        (HtConfig { combine_push_blocks: 24, ..ok }, 4, "combine_push_blocks", "24 of 24"),
        (HtConfig { num_sms: 1, ..ok }, 4, "combine_push_blocks", "of 1"),
    ];
    for (c, world, name, value) in cases {
        let (n, reason) = name_of(c.validate(world, 132));
        assert_eq!(n, name, "{c:?}");
        assert!(reason.contains(value), "{name}: {reason:?} does not show {value}");
    }
}

#[test]
fn cpu_ll_config_limits() {
    let ok = LlConfig::new(256, 7168, 8, 128);
    ok.validate(4, 132).unwrap();
    LlConfig::new(1024, 16384, 16, 1024).validate(8, 132).unwrap();
    let cases: Vec<(LlConfig, &str, &str)> = vec![
        (LlConfig { hidden: 7100, ..ok }, "hidden", "7100"),
        (LlConfig { max_topk: 17, ..ok }, "max_topk", "17"),
        (LlConfig { num_experts: 2048, ..ok }, "num_experts", "2048"),
        (LlConfig { num_experts: 254, ..ok }, "num_experts", "254"),
        (LlConfig { max_tokens_per_rank: 1025, ..ok }, "max_tokens_per_rank", "1025"),
        (LlConfig { num_blocks: 133, ..ok }, "num_blocks", "133"),
        (LlConfig { threads: 48, ..ok }, "threads", "48"),
    ];
    for (c, name, value) in cases {
        let (n, reason) = name_of(c.validate(4, 132));
        assert_eq!(n, name, "{c:?}");
        assert!(reason.contains(value), "{name}: {reason:?} does not show {value}");
    }
    // Heap size hints grow with the shape.
    assert!(LlConfig::new(256, 7168, 8, 256).heap_bytes(4) > ok.heap_bytes(4));
    assert!(HtConfig::new(256, 7168, 8, 8192, 4).heap_bytes(4) > HtConfig::new(256, 7168, 8, 4096, 4).heap_bytes(4));
}

/// The low-latency layout's arithmetic for 1 to `LL_MAX_RANKS` (256) ranks: every region of
/// a half in order, 16-byte aligned and inside the half, the per-rank tables before the halves,
/// at DeepSeek-V3's shapes (hidden 7168, 256 experts, top-8, 128 tokens per rank) and at the
/// largest the configuration allows, with no overflow; the configuration accepts every such
/// rank count (the high-throughput one stops at `MAX_RANKS`), and the kernels' shared memory
/// stays within the 48 KiB a launch gets without opting in. Prints the memory per rank at EP8 to
/// EP256.
#[test]
fn cpu_ll_layout_up_to_256_ranks() {
    for (e, hd, k, t) in [(256, 7168, 8, 128), (1024, 16384, 16, 1024), (256, 128, 1, 1)] {
        let cfg = LlConfig::new(e, hd, k, t);
        for world in (1..=LL_MAX_RANKS).filter(|w| e % w == 0) {
            let l = cfg.half_layout(world);
            let regions = [
                ("recv_x", l.recv_x),
                ("recv_scales", l.recv_scales),
                ("recv_meta", l.recv_meta),
                ("slot_counter", l.slot_counter),
                ("recv_count", l.recv_count),
                ("tok_x", l.tok_x),
                ("tok_scales", l.tok_scales),
                ("tok_route", l.tok_route),
                ("tok_w", l.tok_w),
                ("tok_pos", l.tok_pos),
                ("src_ntok", l.src_ntok),
                ("comb_x", l.comb_x),
                ("comb_in", l.comb_in),
                ("end", l.bytes),
            ];
            for w in regions.windows(2) {
                assert!(w[0].1 <= w[1].1, "{world} ranks, {cfg:?}: {} at {} after {} at {}", w[0].0, w[0].1, w[1].0, w[1].1);
            }
            for (name, off) in regions {
                assert_eq!(off % 16, 0, "{world} ranks, {cfg:?}: {name} at {off} is not 16-byte aligned");
            }
            let (r, el, tt, h, kk) = (world as u64, (e / world) as u64, t as u64, hd as u64, k as u64);
            // The regions' own sizes, from their documentation.
            let need = [
                ("recv_x", l.recv_scales - l.recv_x, el * r * tt * 2 * h),
                ("recv_meta", l.slot_counter - l.recv_meta, el * r * tt * 4),
                ("tok_x", l.tok_scales - l.tok_x, r * tt * 2 * h),
                ("tok_route", l.tok_w - l.tok_route, r * tt * kk * 2),
                ("src_ntok", l.comb_x - l.src_ntok, r * 4),
                ("comb_x", l.comb_in - l.comb_x, tt * kk * h * 2),
                ("comb_in", l.bytes - l.comb_in, el * r * tt * h * 2),
            ];
            for (name, room, want) in need {
                assert!(room >= want, "{world} ranks, {cfg:?}: {name} has {room} bytes, needs {want}");
            }
            let tb = l.tables;
            assert_eq!(tb.dispatch_arrive, CONTROL_BYTES);
            assert!(tb.end >= tb.dispatch_arrive + 4 * 2 * r * 4, "{world} ranks: {tb:?}");
            // The heap holds the tables and both halves, then its own rank table and barrier slots.
            let heap = HeapTables::new(tb.end + 2 * l.bytes, r);
            assert_eq!(cfg.heap_bytes(world), heap.end, "{world} ranks");
            assert!(heap.end - (tb.end + 2 * l.bytes) >= 12 * r, "{world} ranks: {heap:?}");
            // Packed rows (`u32` in `tok_pos`) and the source rank's 8 bits of `recv_meta`.
            assert!(el * r * tt <= u32::MAX as u64 && r <= 256);
            if world >= 2 {
                assert!(cfg.validate(world, 132).is_ok(), "{world} ranks, {cfg:?}: {:?}", cfg.validate(world, 132));
            }
            assert!(ll_dispatch_smem_bytes(1024 / 32, world as u32) <= 48 * 1024);
            assert!(ll_combine_smem_bytes((e / world) as u32, world as u32) <= 48 * 1024);
        }
    }
    assert_eq!(name_of(LlConfig::new(1024, 7168, 8, 128).validate(LL_MAX_RANKS * 2, 132)).0, "world");
    assert_eq!(name_of(HtConfig::new(256, 7168, 8, 4096, 4).validate(16, 132)).0, "world");
    let ds = LlConfig::new(256, 7168, 8, 128);
    for world in [8, 16, 64, 128, 256] {
        println!(
            "low-latency buffer, hidden 7168, 256 experts, top-8, 128 tokens per rank, EP{world}: {:.2} GiB per rank",
            ds.heap_bytes(world) as f64 / (1u64 << 30) as f64
        );
    }
}
