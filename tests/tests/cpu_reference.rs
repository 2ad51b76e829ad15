//! CPU: the reference itself, against hand-worked examples, and the number formats.

use moe_ep::abi::scale_fmt;
use moe_ep::reference::*;
use moe_ep_kernels::fp::*;

#[test]
fn cpu_e4m3_known_values() {
    // Exact values, rounding ties to even, saturation, subnormals, NaN.
    let cases: &[(f32, u8)] = &[
        (0.0, 0x00),
        (-0.0, 0x80),
        (1.0, 0x38),
        (-1.0, 0xb8),
        (1.0625, 0x38), // halfway between 1.0 (m=0) and 1.125 (m=1): to even (m=0)
        (1.1875, 0x3a), // halfway between 1.125 (m=1) and 1.25 (m=2): to even (m=2)
        (448.0, 0x7e),
        (464.0, 0x7e),  // tie between 448 and 480: even mantissa (448)
        (1000.0, 0x7e), // saturates
        (f32::INFINITY, 0x7e),
        (-1000.0, 0xfe),
        (0.015625, 0x08),     // 2^-6, smallest normal
        (0.001953125, 0x01),  // 2^-9, smallest subnormal
        (0.0009765625, 0x00), // 2^-10: tie between 0 and 2^-9, to even (0)
        (0.0029296875, 0x02), // 1.5 * 2^-9: tie, to even (2)
        (0.013671875, 0x07),  // 7 * 2^-9
        (0.0146484375, 0x08), // 7.5 * 2^-9: tie between 7 and 8, to even (8 = smallest normal)
    ];
    for &(x, want) in cases {
        assert_eq!(f32_to_e4m3(x), want, "e4m3({x})");
    }
    assert_eq!(f32_to_e4m3(f32::NAN) & 0x7f, 0x7f);
    // Every finite code round-trips.
    for b in 0u8..=255 {
        if b & 0x7f == 0x7f {
            continue;
        }
        assert_eq!(f32_to_e4m3(e4m3_to_f32(b)), b, "code {b:#x}");
    }
}

#[test]
fn cpu_bf16_rounding() {
    assert_eq!(f32_to_bf16(1.0), 0x3f80);
    assert_eq!(f32_to_bf16(f32::from_bits(0x3f80_8000)), 0x3f80); // tie to even
    assert_eq!(f32_to_bf16(f32::from_bits(0x3f81_8000)), 0x3f82); // tie to even (up)
    assert_eq!(f32_to_bf16(f32::from_bits(0x3f80_8001)), 0x3f81);
    assert_eq!(bf16_to_f32(0xc000), -2.0);
    for b in [0u16, 0x3f80, 0x7f7f, 0x8001, 0xff7f] {
        assert_eq!(f32_to_bf16(bf16_to_f32(b)), b);
    }
}

#[test]
fn cpu_fp8_scale_formats() {
    let s = fp8_scale(448.0, scale_fmt::F32);
    assert_eq!((s.scale, s.inv), (1.0, 1.0));
    let s = fp8_scale(0.0, scale_fmt::F32); // floor keeps the scale normal
    assert_eq!(s.scale, 1.0e-4 / 448.0);
    let s = fp8_scale(500.0, scale_fmt::F32_POW2); // 500/448 = 1.116 -> 2
    assert_eq!((s.scale, s.inv, s.ue8m0), (2.0, 0.5, 128));
    let s = fp8_scale(224.0, scale_fmt::UE8M0); // exactly 0.5
    assert_eq!((s.scale, s.inv, s.ue8m0), (0.5, 2.0, 126));
}

#[test]
fn cpu_layout_hand_example() {
    // 2 ranks, 4 experts (2 per rank), k = 2, 3 tokens.
    let idx = [0, 1, /**/ 2, -1, /**/ 1, 3];
    let l = layout(&idx, 2, 4, 2);
    assert_eq!(l.is_token_in_rank, vec![1, 0, 0, 1, 1, 1]);
    assert_eq!(l.token_pos, vec![0, -1, -1, 0, 1, 1]);
    assert_eq!(l.tokens_per_rank, vec![2, 2]);
    assert_eq!(l.tokens_per_expert, vec![1, 2, 1, 1]);
}

#[test]
fn cpu_ht_dispatch_and_combine_hand_example() {
    // 2 ranks, hidden 1 "row" of 4 bytes to keep it readable: rows are tagged by rank/token.
    let rank =
        |tag: u8, idx: Vec<i64>| HtRank { x: (0..3).flat_map(|t| [tag, t, 0, 0]).collect(), scales: None, topk_idx: idx, topk_weights: vec![0.5; 6] };
    let w =
        HtWorld { num_experts: 4, hidden: 2, k: 2, row_bytes: 4, ranks: vec![rank(10, vec![0, 1, 2, -1, 1, 3]), rank(20, vec![3, 2, 0, 0, -1, -1])] };
    let r0 = w.dispatch(0, 1);
    // Rank 0 gets rank 0's tokens 0 and 2, then rank 1's token 1.
    assert_eq!(r0.num_recv, 3);
    assert_eq!(r0.src_idx, vec![0, 2, 1]);
    assert_eq!(r0.x, vec![10, 0, 0, 0, 10, 2, 0, 0, 20, 1, 0, 0]);
    assert_eq!(r0.topk_idx, vec![0, 1, 1, -1, 0, 0]);
    assert_eq!(r0.topk_weights, vec![0.5, 0.5, 0.5, 0.0, 0.5, 0.5]);
    assert_eq!(r0.expert_counts, vec![3, 2]);
    let r1 = w.dispatch(1, 4);
    assert_eq!(r1.src_idx, vec![1, 2, 0]);
    assert_eq!(r1.expert_counts, vec![4, 4]); // 2 and 2, aligned to 4
    // Combine on rank 0 with every returned row = 1.0 (bf16 0x3f80) per channel: token 2 went
    // to both ranks, so it sums two rows; token 1 went to rank 1 only.
    let ones: Vec<Vec<u16>> = vec![vec![0x3f80; 3 * 2]; 2];
    let (out, _) = w.combine(0, &|r| &ones[r][..], None, None, None);
    assert_eq!(out, vec![0x3f80, 0x3f80, 0x3f80, 0x3f80, 0x4000, 0x4000]);
}

#[test]
fn cpu_ll_dispatch_and_combine_hand_example() {
    let w = LlWorld {
        num_experts: 4,
        hidden: 128,
        k: 2,
        x: vec![vec![0x3f80; 2 * 128], vec![0x4000; 128]],
        topk_idx: vec![vec![0, 3, 1, -1], vec![3, 3]],
        topk_weights: vec![vec![0.5, 0.25, 1.0, 9.0], vec![1.0, 2.0]],
    };
    let r1 = w.dispatch(1, None);
    // Rank 1 holds experts 2 and 3: expert 3 gets rank 0 token 0 (slot 1) and rank 1 token 0
    // twice (slots 0 and 1).
    assert!(r1[0].is_empty());
    let keys: Vec<(usize, usize, usize)> = r1[1].iter().map(|r| (r.src_rank, r.src_token, r.slot)).collect();
    assert_eq!(keys, vec![(0, 0, 1), (1, 0, 0), (1, 0, 1)]);
    let fp8 = w.dispatch(1, Some(scale_fmt::F32));
    assert_eq!(fp8[1][1].payload[0], f32_to_e4m3(2.0 * (448.0 / 2.0)));
    assert_eq!(fp8[1][1].scales, (2.0f32 / 448.0).to_le_bytes().to_vec());
    // Combine on rank 0 with expert rows = x: token 0 = 0.5 * 1 + 0.25 * 1, token 1 = 1 * 1.
    let out = w.combine(0, &|t, _| w.x[0][t * 128..(t + 1) * 128].to_vec());
    assert_eq!(out[0], f32_to_bf16(0.75));
    assert_eq!(out[128], f32_to_bf16(1.0));
}

#[test]
fn cpu_generators_are_deterministic_and_shaped() {
    let (a, wa) = gen_routing(&mut Rng::new(5), 64, 8, 256, 4, Routing::Scores, 0.0);
    let (b, _) = gen_routing(&mut Rng::new(5), 64, 8, 256, 4, Routing::Scores, 0.0);
    assert_eq!(a, b);
    assert_eq!(wa.len(), 64 * 8);
    for t in 0..64 {
        let mut row: Vec<i64> = a[t * 8..(t + 1) * 8].to_vec();
        row.sort();
        row.dedup();
        assert_eq!(row.len(), 8, "top-k experts of a token are distinct");
        assert!(row.iter().all(|&e| (0..256).contains(&e)));
    }
    let (c, _) = gen_routing(&mut Rng::new(1), 32, 4, 64, 4, Routing::OneRank(2), 0.0);
    assert!(c.iter().all(|&e| (32..48).contains(&e)));
    // A rank holding fewer experts than k (32 experts at 8 ranks, k = 6): its 4 experts, each
    // once, and no expert in the other slots; never a repeat.
    let (d, _) = gen_routing(&mut Rng::new(2), 32, 6, 32, 8, Routing::OneRank(0), 0.0);
    for t in 0..32 {
        let mut row: Vec<i64> = d[t * 6..(t + 1) * 6].iter().copied().filter(|&e| e >= 0).collect();
        assert!(row.iter().all(|&e| (0..4).contains(&e)), "{row:?}");
        row.sort();
        row.dedup();
        assert_eq!(row.len(), 4, "token {t}: {:?}", &d[t * 6..(t + 1) * 6]);
    }
}
