//! CPU: the shared ABI (sizes, offsets, layout math) that host and device must agree on.

use moe_ep::Kernel;
use moe_ep::abi::*;
use std::mem::{offset_of, size_of};

#[test]
fn cpu_abi_sizes_and_offsets() {
    assert_eq!(size_of::<ErrorRecord>(), 64);
    assert_eq!(offset_of!(ErrorRecord, expected), 32);
    assert_eq!(size_of::<WaitCtx>(), 24);
    assert_eq!(size_of::<Peers>(), 8 * MAX_RANKS);
    // Control block: peers write arrays indexed by their rank; every field 4-byte aligned
    // and the whole block fits in the reserved bytes.
    assert!(size_of::<Control>() as u64 <= CONTROL_BYTES);
    for off in
        [offset_of!(Control, notify_flags), offset_of!(Control, ht_dispatch_arrive), offset_of!(Control, test_flags), offset_of!(Control, ping_flags)]
    {
        assert_eq!(off % 4, 0);
        assert!(off < size_of::<Control>());
    }
    // Every parameter block fits the classic 4 KiB kernel-parameter limit and is 8-aligned.
    for k in Kernel::ALL {
        assert!(k.param_bytes() <= 4096, "{} params are {} bytes", k.name(), k.param_bytes());
        assert_eq!(k.param_bytes() % 8, 0, "{}", k.name());
    }
}

fn regions_ht(l: &HtHeapLayout) -> Vec<u64> {
    vec![l.notify, l.recv_x, l.recv_scales, l.recv_idx, l.recv_w, l.recv_src, l.comb_x, l.comb_w, l.comb_flags, l.total]
}

#[test]
fn cpu_ht_heap_layout_is_ordered_aligned_and_sized() {
    for world in 2..=8u64 {
        for (hidden, k, epr, tokens) in [(128u64, 1u64, 1u64, 1u64), (7168, 8, 32, 4096), (16384, 16, 128, 8192)] {
            let cap = world * tokens;
            let l = HtHeapLayout::new(world, hidden, k, epr, tokens, cap);
            let r = regions_ht(&l);
            assert_eq!(l.notify, CONTROL_BYTES);
            for w in r.windows(2) {
                assert!(w[0] < w[1], "{l:?}");
                assert_eq!(w[1] % REGION_ALIGN, 0);
            }
            // Each region holds what it must.
            assert!(l.recv_scales - l.recv_x >= cap * hidden * 2);
            assert!(l.recv_idx - l.recv_scales >= cap * hidden / 128 * 4);
            assert!(l.recv_w - l.recv_idx >= cap * k * 4);
            assert!(l.recv_src - l.recv_w >= cap * k * 4);
            assert!(l.comb_x - l.recv_src >= cap * 4);
            assert!(l.comb_w - l.comb_x >= world * tokens * hidden * 2);
            assert!(l.comb_flags - l.comb_w >= world * tokens * k * 4);
            assert!(l.total - l.comb_flags >= world * tokens * 4);
            assert!(l.recv_x - l.notify >= 2 * world * (world + epr) * 4);
        }
    }
}

#[test]
fn cpu_ll_heap_layout_is_ordered_aligned_and_sized() {
    for world in 2..=8u64 {
        for (epr, t, hidden, k) in [(1u64, 1u64, 128u64, 1u64), (64, 128, 7168, 8), (128, 1024, 16384, 16)] {
            let l = LlHalfLayout::new(world, epr, t, hidden, k);
            let rows = epr * world * t;
            let r = [l.recv_x, l.recv_scales, l.recv_meta, l.slot_counter, l.recv_count, l.comb_x, l.comb_in, l.bytes];
            for w in r.windows(2) {
                assert!(w[0] < w[1] || (w[0] == 0 && w[1] > 0), "{l:?}");
                assert_eq!(w[1] % REGION_ALIGN, 0);
            }
            assert!(l.recv_scales >= rows * hidden * 2);
            assert!(l.recv_meta - l.recv_scales >= rows * hidden / 128 * 4);
            assert!(l.slot_counter - l.recv_meta >= rows * 4);
            assert!(l.comb_in - l.comb_x >= t * k * hidden * 2);
            assert!(l.bytes - l.comb_in >= rows * hidden * 2);
            // The per-rank tables lie between the control block and half 0.
            let tb = l.tables;
            let ends = [tb.dispatch_arrive, tb.combine_arrive, tb.free, tb.combine_free, tb.end];
            assert_eq!(tb.dispatch_arrive, CONTROL_BYTES);
            for w in ends.windows(2) {
                assert!(w[0] < w[1] && w[1] % REGION_ALIGN == 0, "{tb:?}");
            }
            for (a, b) in
                [(tb.dispatch_arrive, tb.combine_arrive), (tb.combine_arrive, tb.free), (tb.free, tb.combine_free), (tb.combine_free, tb.end)]
            {
                assert!(b - a >= 2 * world * 4, "{tb:?}");
            }
            assert_eq!(l.half_offset(0), tb.end);
            assert_eq!(l.half_offset(1), tb.end + l.bytes);
            assert_eq!(l.heap_bytes(), tb.end + 2 * l.bytes);
        }
    }
}

/// Every heap's tables (rank table, barrier slots) lie after the bytes its user asked for,
/// aligned, each with an entry per rank, for every group size up to `GROUP_MAX_RANKS`; the
/// barrier kernel's parameters name them (no `Peers` by value).
#[test]
fn cpu_heap_tables_follow_the_body_for_every_group_size() {
    for world in 1..=GROUP_MAX_RANKS as u64 {
        for body in [0u64, 1, CONTROL_BYTES, CONTROL_BYTES + 1, 3 << 30] {
            let t = HeapTables::new(body, world);
            assert!(t.ranks >= body && t.ranks.is_multiple_of(REGION_ALIGN), "{world} ranks, body {body}: {t:?}");
            assert!(t.barrier >= t.ranks + 8 * world && t.barrier.is_multiple_of(REGION_ALIGN), "{t:?}");
            assert!(t.end >= t.barrier + 4 * world && t.end.is_multiple_of(REGION_ALIGN), "{t:?}");
            // Little beyond what the tables need (alignment only).
            assert!(t.end - body < 12 * world + 3 * REGION_ALIGN, "{t:?}");
        }
    }
    assert_eq!(HeapTables::new(CONTROL_BYTES, 16), HeapTables { ranks: CONTROL_BYTES, barrier: CONTROL_BYTES + 256, end: CONTROL_BYTES + 512 });
    assert_eq!(size_of::<BarrierParams>(), size_of::<WaitCtx>() + 8 + 8 + 4 + 4);
    const { assert!(GROUP_MAX_RANKS >= LL_MAX_RANKS && MAX_RANKS == 8) };
}

/// A per-half, per-rank word of the low-latency tables stays inside its table for every rank
/// count up to the kernels' limit, whatever half and rank the kernel passes (both are taken
/// modulo), and distinct (half, rank) pairs get distinct words.
#[test]
fn cpu_ll_rank_table_slots_stay_inside() {
    for world in [1u32, 2, 3, 8, 9, 64, 128, 255, LL_MAX_RANKS as u32] {
        let t = LlRankTables::new(world as u64);
        let mut seen = std::collections::HashSet::new();
        for h in 0..4u32 {
            for r in 0..2 * world + 3 {
                let a = LlRankTables::slot(t.free, world, h, r);
                assert!(a >= t.free && a + 4 <= t.free + 2 * world as u64 * 4, "{world} ranks: [{h}][{r}] at {a}");
                if h < 2 && r < world {
                    assert!(seen.insert(a), "{world} ranks: [{h}][{r}] shares word {a}");
                }
            }
        }
    }
    // A zero rank count (never launched) still gives an address inside the table's first word.
    assert_eq!(LlRankTables::slot(1024, 0, 1, 7), 1024 + 4);
}

#[test]
fn cpu_pattern_word_distinguishes_sources_and_indices() {
    let mut seen = std::collections::HashSet::new();
    for src in 0..8 {
        for i in 0..1000 {
            seen.insert(pattern_word(42, src, i));
        }
    }
    assert!(seen.len() > 7990, "pattern words collide too often: {}", seen.len());
    assert!(!seen.contains(&0xABAB_ABAB) || seen.len() > 7990);
}
