//! CPU: the rendezvous over TCP (threads and real processes on loopback) and in memory, and
//! its failure modes: a rank that never arrives, a wrong world size, a duplicate rank, garbage
//! on the socket. Every failure must be an error naming what went wrong, within the deadline.

use moe_ep::Error;
use moe_ep::rendezvous::{Exchange, LocalExchange, ProcessConfig, TcpExchange};
use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

fn port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn cfg(rank: usize, world: usize, port: u16) -> ProcessConfig {
    ProcessConfig { rank, world, device: rank, master_addr: "127.0.0.1".into(), master_port: port }
}

fn gather_payload(rank: usize, round: usize) -> Vec<u8> {
    (0..rank * 3 + round).map(|i| (i * 7 + rank) as u8).collect()
}

fn check_gather(ex: &dyn Exchange, rounds: usize) {
    for round in 0..rounds {
        let all = ex.all_gather(&gather_payload(ex.rank(), round), Duration::from_secs(20)).unwrap();
        assert_eq!(all.len(), ex.world());
        for (r, v) in all.iter().enumerate() {
            assert_eq!(v, &gather_payload(r, round), "rank {} round {round} entry {r}", ex.rank());
        }
    }
}

#[test]
fn cpu_rendezvous_tcp_threads() {
    for world in [1, 2, 3, 8] {
        let p = port();
        std::thread::scope(|s| {
            for r in 0..world {
                s.spawn(move || {
                    let ex = TcpExchange::connect(&cfg(r, world, p), Duration::from_secs(20)).unwrap();
                    check_gather(&ex, 5);
                });
            }
        });
    }
}

#[test]
fn cpu_rendezvous_local_threads() {
    for world in [1, 2, 5, 8] {
        let exs = LocalExchange::group(world);
        std::thread::scope(|s| {
            for ex in exs {
                s.spawn(move || check_gather(&ex, 20));
            }
        });
    }
}

/// Real processes: this test binary re-run as each rank (only the rendezvous, no GPU).
#[test]
fn cpu_rendezvous_tcp_processes() {
    if let Ok(r) = std::env::var("MOE_EP_RDV_CHILD") {
        let world: usize = std::env::var("MOE_EP_RDV_WORLD").unwrap().parse().unwrap();
        let p: u16 = std::env::var("MOE_EP_RDV_PORT").unwrap().parse().unwrap();
        let ex = TcpExchange::connect(&cfg(r.parse().unwrap(), world, p), Duration::from_secs(30)).unwrap();
        check_gather(&ex, 3);
        return;
    }
    let world = 4;
    let p = port();
    let exe = std::env::current_exe().unwrap();
    let kids: Vec<_> = (0..world)
        .map(|r| {
            std::process::Command::new(&exe)
                .args(["cpu_rendezvous_tcp_processes", "--exact", "--nocapture"])
                .env("MOE_EP_RDV_CHILD", r.to_string())
                .env("MOE_EP_RDV_WORLD", world.to_string())
                .env("MOE_EP_RDV_PORT", p.to_string())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for (r, k) in kids.into_iter().enumerate() {
        let o = k.wait_with_output().unwrap();
        assert!(o.status.success(), "rank {r}: {}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    }
}

fn expect_rdv_error(r: Result<TcpExchange, Error>, needle: &str) {
    match r {
        Err(Error::Rendezvous { reason, .. }) => assert!(reason.contains(needle), "error {reason:?} does not mention {needle:?}"),
        Err(e) => panic!("expected a rendezvous error mentioning {needle:?}, got {e}"),
        Ok(_) => panic!("expected a rendezvous error mentioning {needle:?}, got success"),
    }
}

#[test]
fn cpu_rendezvous_missing_rank_is_named() {
    let p = port();
    let t0 = Instant::now();
    std::thread::scope(|s| {
        let h1 = s.spawn(move || TcpExchange::connect(&cfg(1, 3, p), Duration::from_secs(2)));
        let r0 = TcpExchange::connect(&cfg(0, 3, p), Duration::from_millis(800));
        expect_rdv_error(r0, "[2]");
        // Rank 1 learns it from rank 0, or times out itself.
        assert!(h1.join().unwrap().is_err());
    });
    assert!(t0.elapsed() < Duration::from_secs(5), "took {:?}", t0.elapsed());
    // A rank whose rank 0 never shows up.
    let t0 = Instant::now();
    expect_rdv_error(TcpExchange::connect(&cfg(1, 2, port()), Duration::from_millis(500)), "could not reach rank 0");
    assert!(t0.elapsed() < Duration::from_secs(3));
}

#[test]
fn cpu_rendezvous_missing_rank_in_all_gather() {
    let p = port();
    std::thread::scope(|s| {
        let h = s.spawn(move || {
            let ex = TcpExchange::connect(&cfg(1, 2, p), Duration::from_secs(5)).unwrap();
            // Joins, then never takes part in the all-gather; stays alive until rank 0 gives up.
            std::thread::sleep(Duration::from_millis(1500));
            drop(ex);
        });
        let ex = TcpExchange::connect(&cfg(0, 2, p), Duration::from_secs(5)).unwrap();
        let t0 = Instant::now();
        match ex.all_gather(b"x", Duration::from_millis(500)) {
            Err(Error::Rendezvous { reason, .. }) => assert!(reason.contains("rank 1"), "{reason}"),
            other => panic!("expected an error naming rank 1, got {other:?}"),
        }
        assert!(t0.elapsed() < Duration::from_secs(2));
        h.join().unwrap();
    });
    // In memory: one of three ranks never arrives.
    let mut exs = LocalExchange::group(3);
    let _absent = exs.pop();
    std::thread::scope(|s| {
        for ex in exs {
            s.spawn(move || match ex.all_gather(b"y", Duration::from_millis(300)) {
                Err(Error::Rendezvous { reason, .. }) => assert!(reason.contains("[2]"), "{reason}"),
                other => panic!("expected an error naming rank 2, got {other:?}"),
            });
        }
    });
}

#[test]
fn cpu_rendezvous_wrong_world_size() {
    let p = port();
    std::thread::scope(|s| {
        let h = s.spawn(move || TcpExchange::connect(&cfg(1, 3, p), Duration::from_secs(5)));
        expect_rdv_error(TcpExchange::connect(&cfg(0, 2, p), Duration::from_secs(5)), "world size is 3");
        expect_rdv_error(h.join().unwrap(), "world size");
    });
}

#[test]
fn cpu_rendezvous_duplicate_rank() {
    let p = port();
    std::thread::scope(|s| {
        let a = s.spawn(move || TcpExchange::connect(&cfg(1, 3, p), Duration::from_secs(5)));
        std::thread::sleep(Duration::from_millis(200));
        let b = s.spawn(move || TcpExchange::connect(&cfg(1, 3, p), Duration::from_secs(5)));
        let r0 = TcpExchange::connect(&cfg(0, 3, p), Duration::from_secs(5));
        expect_rdv_error(r0, "joined twice");
        assert!(a.join().unwrap().is_err());
        assert!(b.join().unwrap().is_err());
    });
}

#[test]
fn cpu_rendezvous_garbage_on_the_socket() {
    // Garbage at rank 0: rejected, named in the error when the real rank never comes.
    let p = port();
    std::thread::scope(|s| {
        s.spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            if let Ok(mut c) = TcpStream::connect(("127.0.0.1", p)) {
                let _ = c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
            }
            if let Ok(mut c) = TcpStream::connect(("127.0.0.1", p)) {
                // Valid magic, absurd length.
                let mut f = 0x4d4f_4550u32.to_le_bytes().to_vec();
                f.extend([1, 0, 1, 0, 0xff, 0xff, 0xff, 0x7f]);
                let _ = c.write_all(&f);
            }
        });
        let r = TcpExchange::connect(&cfg(0, 2, p), Duration::from_millis(1500));
        expect_rdv_error(r, "rejected connections");
    });
    // Garbage from a fake rank 0: the joining rank gets an error, not a panic.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let p = listener.local_addr().unwrap().port();
    std::thread::scope(|s| {
        s.spawn(move || {
            let (mut c, _) = listener.accept().unwrap();
            let _ = c.write_all(&[0xde, 0xad, 0xbe, 0xef, 1, 2, 3, 4, 5, 6, 7, 8, 9]);
            std::thread::sleep(Duration::from_millis(300));
        });
        expect_rdv_error(TcpExchange::connect(&cfg(1, 2, p), Duration::from_secs(3)), "not a moe-ep rendezvous peer");
    });
}

#[test]
fn cpu_process_config_from_env_conventions() {
    let env = |pairs: &'static [(&'static str, &'static str)]| move |k: &str| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string());
    let c = ProcessConfig::from_lookup(env(&[
        ("RANK", "2"),
        ("WORLD_SIZE", "4"),
        ("LOCAL_RANK", "1"),
        ("MASTER_ADDR", "10.0.0.1"),
        ("MASTER_PORT", "29500"),
    ]))
    .unwrap();
    assert_eq!(c, ProcessConfig { rank: 2, world: 4, device: 1, master_addr: "10.0.0.1".into(), master_port: 29500 });
    // MOE_EP_* names win; LOCAL_RANK defaults to RANK; MASTER_ADDR to loopback.
    let c = ProcessConfig::from_lookup(env(&[
        ("RANK", "2"),
        ("MOE_EP_RANK", "3"),
        ("WORLD_SIZE", "4"),
        ("MASTER_PORT", "1"),
        ("MOE_EP_MASTER_PORT", "2"),
    ]))
    .unwrap();
    assert_eq!((c.rank, c.device, c.master_addr.as_str(), c.master_port), (3, 3, "127.0.0.1", 2));
    let err = |pairs| match ProcessConfig::from_lookup(env(pairs)) {
        Err(Error::InvalidArgument { name, reason }) => format!("{name}: {reason}"),
        other => panic!("expected an invalid-argument error, got {other:?}"),
    };
    assert!(err(&[("WORLD_SIZE", "2"), ("MASTER_PORT", "1")]).starts_with("RANK"));
    assert!(err(&[("RANK", "x"), ("WORLD_SIZE", "2"), ("MASTER_PORT", "1")]).contains("\"x\""));
    assert!(err(&[("RANK", "2"), ("WORLD_SIZE", "2"), ("MASTER_PORT", "1")]).contains("not below world size"));
    assert!(err(&[("RANK", "0"), ("WORLD_SIZE", "9"), ("MASTER_PORT", "1")]).contains("outside 1..=8"));
    assert!(err(&[("RANK", "0"), ("WORLD_SIZE", "2")]).starts_with("MASTER_PORT"));
}
