//! CPU: configuration validation gives typed errors naming the argument and the value.

use moe_ep::Error;
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
