//! CPU: the GPU test harness's own rules (rank lists, expert scaling, the skip report).

use moe_ep_tests::{experts_for, gpus_needed, parse_rank_list};

#[test]
fn cpu_rank_list_refuses_what_the_machine_cannot_run() {
    assert_eq!(parse_rank_list("2,3, 4", 4).unwrap(), vec![2, 3, 4]);
    for (list, needle) in
        [("5", "5 ranks cannot run here"), ("1", "1 ranks cannot run here"), ("two", "not a rank count"), (" , ", "names no rank count")]
    {
        let e = parse_rank_list(list, 4).expect_err(list).to_string();
        assert!(e.contains(needle), "{list:?}: {e}");
    }
}

#[test]
fn cpu_expert_counts_scale_to_every_rank_count() {
    for world in 2..=8 {
        for e in [1, 16, 32, 64, 256] {
            let s = experts_for(world, e);
            assert!(s >= e && s.is_multiple_of(world) && s - e < world, "{e} experts at {world} ranks -> {s}");
        }
    }
    assert_eq!(experts_for(3, 256), 258);
    assert_eq!(experts_for(4, 256), 256);
}

#[test]
fn cpu_gpu_test_names_say_how_many_gpus() {
    assert_eq!(gpus_needed("gpu1_device_layer_selftest"), 1);
    assert_eq!(gpus_needed("gpu2_ht_shapes"), 2);
}

#[test]
fn cpu_expect_refused_names_the_variant() {
    use moe_ep::Error;
    use moe_ep_tests::expect_refused;
    let stale = || -> moe_ep::Result<()> { Err(Error::StaleHandle { reason: "old".into() }) };
    expect_refused(stale(), "StaleHandle", "a stale handle").unwrap();
    let e = expect_refused(stale(), "ForeignHandle", "a stale handle").unwrap_err().to_string();
    assert!(e.contains("expected ForeignHandle") && e.contains("stale handle: old"), "{e}");
    assert!(expect_refused(Ok(()), "StaleHandle", "nothing wrong").unwrap_err().to_string().contains("accepted"));
}
