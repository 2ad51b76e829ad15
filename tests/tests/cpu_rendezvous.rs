//! CPU: the rendezvous over TCP (threads and real processes on loopback) and in memory, and
//! its failure modes: a rank that never arrives, a wrong world size, a duplicate rank, garbage
//! on the socket. Every failure must be an error naming what went wrong, within the deadline.
//! And the attacks it must survive: strangers without the job's secret (claiming a rank,
//! sending garbage or oversized frames, or staying silent) are refused without aborting the
//! job or delaying it, and a fake rank 0 is detected by the joining ranks.

use moe_ep::Error;
use moe_ep::rendezvous::{Exchange, FailureKind, LocalExchange, PeerFailure, ProcessConfig, Secret, TcpExchange};
use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

fn port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn cfg(rank: usize, world: usize, port: u16) -> ProcessConfig {
    ProcessConfig { rank, world, device: rank, master_addr: "127.0.0.1".into(), master_port: port, secret: Secret("the job's secret".into()) }
}

/// A stranger: the same job shape, another secret.
fn stranger(rank: usize, world: usize, port: u16) -> ProcessConfig {
    ProcessConfig { secret: Secret("a guess".into()), ..cfg(rank, world, port) }
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
    // Garbage at rank 0: refused and named, and the job still forms when the real rank comes.
    let p = port();
    std::thread::scope(|s| {
        s.spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            if let Ok(mut c) = TcpStream::connect(("127.0.0.1", p)) {
                let _ = c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
            }
            if let Ok(mut c) = TcpStream::connect(("127.0.0.1", p)) {
                // Valid magic and version, absurd length.
                let mut f = 0x4d4f_4550u32.to_le_bytes().to_vec();
                f.extend([2, 0, 1, 0, 0xff, 0xff, 0xff, 0x7f]);
                let _ = c.write_all(&f);
                std::thread::sleep(Duration::from_millis(300));
            }
        });
        let real = s.spawn(move || {
            std::thread::sleep(Duration::from_millis(400));
            TcpExchange::connect(&cfg(1, 2, p), Duration::from_secs(10)).map(|ex| check_gather(&ex, 2))
        });
        let ex = TcpExchange::connect(&cfg(0, 2, p), Duration::from_secs(10)).expect("garbage must not abort the rendezvous");
        check_gather(&ex, 2);
        real.join().unwrap().unwrap();
    });
    // Only garbage, no real rank: the error names what was refused.
    let p = port();
    std::thread::scope(|s| {
        s.spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            if let Ok(mut c) = TcpStream::connect(("127.0.0.1", p)) {
                let _ = c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
                std::thread::sleep(Duration::from_millis(300));
            }
        });
        expect_rdv_error(TcpExchange::connect(&cfg(0, 2, p), Duration::from_millis(1500)), "refused connections");
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
fn cpu_rendezvous_strangers_are_refused_and_the_job_goes_on() {
    let p = port();
    let t0 = Instant::now();
    std::thread::scope(|s| {
        // A stranger claims rank 1 before the real rank 1 arrives, and silent connections
        // arrive too: none of them delays the job or takes a rank.
        let impostor = s.spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            TcpExchange::connect(&stranger(1, 3, p), Duration::from_secs(5))
        });
        let silent: Vec<_> = (0..4)
            .map(|_| {
                s.spawn(move || {
                    std::thread::sleep(Duration::from_millis(60));
                    let c = TcpStream::connect(("127.0.0.1", p));
                    std::thread::sleep(Duration::from_millis(1500));
                    drop(c);
                })
            })
            .collect();
        let reals: Vec<_> = (1..3)
            .map(|r| {
                s.spawn(move || {
                    std::thread::sleep(Duration::from_millis(200));
                    TcpExchange::connect(&cfg(r, 3, p), Duration::from_secs(10)).map(|ex| check_gather(&ex, 3))
                })
            })
            .collect();
        let ex = TcpExchange::connect(&cfg(0, 3, p), Duration::from_secs(10)).expect("strangers must not abort the job");
        check_gather(&ex, 3);
        for r in reals {
            r.join().unwrap().unwrap();
        }
        assert!(t0.elapsed() < Duration::from_secs(3), "silent connections delayed the job: {:?}", t0.elapsed());
        expect_rdv_error(impostor.join().unwrap(), "wrong job secret");
        for h in silent {
            h.join().unwrap();
        }
    });
}

#[test]
fn cpu_rendezvous_fake_rank0_is_detected() {
    // A process on rank 0's port that speaks the protocol but does not know the secret: the
    // joining rank refuses it (it would otherwise receive every rank's IPC handles).
    let p = port();
    std::thread::scope(|s| {
        let fake = s.spawn(move || TcpExchange::connect(&stranger(0, 2, p), Duration::from_secs(3)));
        std::thread::sleep(Duration::from_millis(100));
        let r = TcpExchange::connect(&cfg(1, 2, p), Duration::from_secs(3));
        // The fake rank 0 refuses the real rank's hello (its MAC does not match the fake's
        // secret), and the real rank would refuse the fake's welcome in any case.
        expect_rdv_error(r, "wrong job secret");
        assert!(fake.join().unwrap().is_err());
    });
    // A fake rank 0 that takes any hello and welcomes it without the proof.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let p = listener.local_addr().unwrap().port();
    let frame = |kind: u8, payload: &[u8]| {
        let mut f = 0x4d4f_4550u32.to_le_bytes().to_vec();
        f.extend([3, 0, kind, 0]);
        f.extend((payload.len() as u32).to_le_bytes());
        f.extend(payload);
        f
    };
    std::thread::scope(|s| {
        s.spawn(move || {
            let (mut c, _) = listener.accept().unwrap();
            let _ = c.write_all(&frame(6, &[7u8; 32]));
            let mut hello = [0u8; 12 + 40];
            let _ = std::io::Read::read_exact(&mut c, &mut hello);
            let _ = c.write_all(&frame(2, &[0u8; 32]));
            std::thread::sleep(Duration::from_millis(300));
        });
        expect_rdv_error(TcpExchange::connect(&cfg(1, 2, p), Duration::from_secs(3)), "could not prove it knows the job's secret");
    });
}

#[test]
fn cpu_rendezvous_oversized_and_truncated_hellos() {
    let p = port();
    std::thread::scope(|s| {
        s.spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            for payload in [vec![0u8; 4000], vec![1, 0, 0, 0]] {
                if let Ok(mut c) = TcpStream::connect(("127.0.0.1", p)) {
                    let mut f = 0x4d4f_4550u32.to_le_bytes().to_vec();
                    f.extend([2, 0, 1, 0]);
                    f.extend((payload.len() as u32).to_le_bytes());
                    f.extend(&payload);
                    let _ = c.write_all(&f);
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        });
        let real = s.spawn(move || {
            std::thread::sleep(Duration::from_millis(400));
            TcpExchange::connect(&cfg(1, 2, p), Duration::from_secs(10)).map(|ex| check_gather(&ex, 1))
        });
        let ex = TcpExchange::connect(&cfg(0, 2, p), Duration::from_secs(10)).unwrap();
        check_gather(&ex, 1);
        real.join().unwrap().unwrap();
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
    // The port is torchrun's plus one (its own store holds MASTER_PORT); the secret is derived.
    assert_eq!((c.rank, c.world, c.device, c.master_addr.as_str(), c.master_port), (2, 4, 1, "10.0.0.1", 29501));
    assert!(c.secret.0.contains("10.0.0.1:29500"), "{:?}", c.secret.0);
    assert!(!format!("{c:?}").contains("10.0.0.1:29500/"), "Debug must not show the secret");
    let with_secret = ProcessConfig::from_lookup(env(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_PORT", "7"), ("MOE_EP_SECRET", "s3")])).unwrap();
    assert_eq!(with_secret.secret, Secret("s3".into()));
    assert!(!format!("{with_secret:?}").contains("s3"));
    // A derived secret comes with a warning that says why and what to do; a given one does not.
    let w = ProcessConfig::derived_secret_warning(env(&[("RANK", "2"), ("MASTER_PORT", "29500")])).unwrap();
    assert!(w.contains("MOE_EP_SECRET is not set") && w.contains("TORCHELASTIC_RUN_ID") && w.contains("openssl rand -hex 16"), "{w}");
    assert!(ProcessConfig::derived_secret_warning(env(&[("MOE_EP_SECRET", "s3")])).is_none());
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
    assert!(err(&[("RANK", "0"), ("WORLD_SIZE", "257"), ("MASTER_PORT", "1")]).contains("outside 1..=256"));
    assert!(err(&[("RANK", "0"), ("WORLD_SIZE", "2")]).starts_with("MASTER_PORT"));
    assert!(err(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_PORT", "65535")]).contains("set MOE_EP_MASTER_PORT"));
    assert!(err(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_PORT", "1"), ("MOE_EP_SECRET", "")]).starts_with("MOE_EP_SECRET"));
}

/// A sink that collects the failures an exchange reports.
fn collector() -> (moe_ep::rendezvous::FailureSink, std::sync::Arc<std::sync::Mutex<Vec<PeerFailure>>>) {
    let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let g2 = got.clone();
    (std::sync::Arc::new(move |f: PeerFailure| g2.lock().unwrap().push(f)), got)
}

/// Waits up to `within` for `got` to hold a failure of `rank` of `kind`; returns how long.
fn wait_for(got: &std::sync::Mutex<Vec<PeerFailure>>, rank: usize, kind: FailureKind, within: Duration) -> Duration {
    let t0 = Instant::now();
    while t0.elapsed() < within {
        if got.lock().unwrap().iter().any(|f| f.rank == rank && f.kind == kind) {
            return t0.elapsed();
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    panic!("no {kind:?} failure of rank {rank} within {within:?}; got {:?}", got.lock().unwrap());
}

/// Fast failure over TCP: a failure one rank announces reaches every other rank (rank 0
/// relays it) within a second, with its text; a rank that drops its exchange is reported as
/// having left. (Each rank keeps the first failure it hears of: one per scenario.)
#[test]
fn cpu_watch_announcements_reach_every_rank() {
    let world = 4;
    let p = port();
    let ready = std::sync::Barrier::new(world);
    let announced = std::sync::Barrier::new(world);
    std::thread::scope(|s| {
        for r in 0..world {
            let (ready, announced) = (&ready, &announced);
            s.spawn(move || {
                let ex = TcpExchange::connect(&cfg(r, world, p), Duration::from_secs(20)).unwrap();
                let (sink, got) = collector();
                ex.watch(sink);
                ex.barrier(Duration::from_secs(20)).unwrap();
                ready.wait();
                if r == 2 {
                    ex.announce(&PeerFailure { rank: 2, kind: FailureKind::Error, detail: "boom".into() });
                } else {
                    wait_for(&got, 2, FailureKind::Error, Duration::from_secs(1));
                    let f = got.lock().unwrap().iter().find(|f| f.rank == 2).cloned().unwrap();
                    assert_eq!(f.detail, "boom");
                    assert!(f.to_string().starts_with("rank 2 failed: boom"), "{f}");
                }
                announced.wait();
            });
        }
    });
    // A rank that drops its exchange (here rank 1, not the relay) is reported as having left.
    let world = 3;
    let p = port();
    std::thread::scope(|s| {
        for r in 0..world {
            s.spawn(move || {
                let ex = TcpExchange::connect(&cfg(r, world, p), Duration::from_secs(20)).unwrap();
                let (sink, got) = collector();
                ex.watch(sink);
                ex.barrier(Duration::from_secs(20)).unwrap();
                if r != 1 {
                    wait_for(&got, 1, FailureKind::Left, Duration::from_secs(1));
                }
            });
        }
    });
}

/// Fast failure over TCP with a real crash: a rank process killed with SIGKILL (no goodbye)
/// is reported as gone to every other rank within a second, whether it was rank 0 (the
/// others see their connection close) or another rank (rank 0 sees it and relays).
#[test]
fn cpu_watch_killed_process_is_noticed() {
    if let Ok(r) = std::env::var("MOE_EP_WATCH_CHILD") {
        let p: u16 = std::env::var("MOE_EP_WATCH_PORT").unwrap().parse().unwrap();
        let ex = TcpExchange::connect(&cfg(r.parse().unwrap(), 3, p), Duration::from_secs(30)).unwrap();
        ex.barrier(Duration::from_secs(30)).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        let _ = std::process::Command::new("kill").args(["-9", &std::process::id().to_string()]).status();
        std::thread::sleep(Duration::from_secs(30));
        unreachable!("SIGKILL did not end the process");
    }
    for victim in [2, 0] {
        let p = port();
        let exe = std::env::current_exe().unwrap();
        let mut child = std::process::Command::new(&exe)
            .args(["cpu_watch_killed_process_is_noticed", "--exact", "--nocapture"])
            .env("MOE_EP_WATCH_CHILD", victim.to_string())
            .env("MOE_EP_WATCH_PORT", p.to_string())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::scope(|s| {
            for r in (0..3).filter(|&r| r != victim) {
                s.spawn(move || {
                    let ex = TcpExchange::connect(&cfg(r, 3, p), Duration::from_secs(30)).unwrap();
                    let (sink, got) = collector();
                    ex.watch(sink);
                    ex.barrier(Duration::from_secs(30)).unwrap();
                    // The victim dies about 200 ms after the barrier.
                    let took = wait_for(&got, victim, FailureKind::Gone, Duration::from_secs(3));
                    assert!(took < Duration::from_millis(1200), "rank {r}: rank {victim}'s death took {took:?} to be noticed");
                });
            }
        });
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(child.wait().unwrap().signal(), Some(9));
    }
}

/// Fast failure in one process: an announcement reaches every other rank at once, and a
/// dropped exchange is reported as having left.
#[test]
fn cpu_watch_local_announcements() {
    let mut exs = LocalExchange::group(3);
    let sinks: Vec<_> = exs
        .iter()
        .map(|ex| {
            let (sink, got) = collector();
            ex.watch(sink);
            got
        })
        .collect();
    exs[1].announce(&PeerFailure { rank: 1, kind: FailureKind::Aborted, detail: "stop".into() });
    for r in [0, 2] {
        wait_for(&sinks[r], 1, FailureKind::Aborted, Duration::from_millis(10));
    }
    assert!(sinks[1].lock().unwrap().is_empty(), "a rank is not told its own news");
    drop(exs.pop());
    for r in [0, 1] {
        wait_for(&sinks[r], 2, FailureKind::Left, Duration::from_millis(10));
    }
}

/// The watch never gets in the way of normal traffic: 4 ranks run 2,000 all-gathers of varied
/// sizes with their connections watched; every result is exact and no rank hears of a failure.
/// Then one rank announces a failure mid-traffic: every other rank's sink gets it, and their
/// all-gathers end with an error (never a hang, never wrong data).
#[test]
fn cpu_watch_coexists_with_all_gathers() {
    let world = 4;
    let p = port();
    let phase1 = std::sync::Barrier::new(world);
    std::thread::scope(|s| {
        for r in 0..world {
            let phase1 = &phase1;
            s.spawn(move || {
                let ex = TcpExchange::connect(&cfg(r, world, p), Duration::from_secs(20)).unwrap();
                let (sink, got) = collector();
                ex.watch(sink);
                for round in 0..2000 {
                    let mine: Vec<u8> = (0..(round * 37 + r * 11) % 5000).map(|i| (i + r + round) as u8).collect();
                    let all = ex.all_gather(&mine, Duration::from_secs(20)).unwrap();
                    for (q, v) in all.iter().enumerate() {
                        let want: Vec<u8> = (0..(round * 37 + q * 11) % 5000).map(|i| (i + q + round) as u8).collect();
                        assert_eq!(v, &want, "rank {r} round {round} entry {q}");
                    }
                }
                assert!(got.lock().unwrap().is_empty(), "rank {r} heard of a failure during healthy traffic: {:?}", got.lock().unwrap());
                phase1.wait();
                if r == 2 {
                    ex.announce(&PeerFailure { rank: 2, kind: FailureKind::Error, detail: "mid-traffic".into() });
                    return;
                }
                wait_for(&got, 2, FailureKind::Error, Duration::from_secs(1));
                // Rank 2 no longer takes part: the all-gather ends in an error, not a hang.
                let t0 = Instant::now();
                let r2 = ex.all_gather(b"after", Duration::from_secs(5));
                assert!(r2.is_err(), "rank {r}: an all-gather after rank 2's failure succeeded");
                assert!(t0.elapsed() < Duration::from_secs(6));
            });
        }
    });
}

/// A failure notice that arrives behind data nobody reads yet (here the reply of an all-gather
/// rank 1 gave up on) still reaches rank 1 at once, and rank 1's next all-gather skips the
/// stale reply and fails with the notice instead of taking it for its own.
#[test]
fn cpu_watch_sees_a_notice_behind_unread_data() {
    let p = port();
    std::thread::scope(|s| {
        let h0 = s.spawn(move || TcpExchange::connect(&cfg(0, 2, p), Duration::from_secs(20)).unwrap());
        let r1 = TcpExchange::connect(&cfg(1, 2, p), Duration::from_secs(20)).unwrap();
        let r0 = h0.join().unwrap();
        let (sink1, got1) = collector();
        r1.watch(sink1);
        r0.watch(collector().0);
        let e = r1.all_gather_as("early", b"one", Duration::from_millis(50)).unwrap_err().to_string();
        assert!(e.contains("no reply to all-gather #1 (early) from rank 0"), "{e}");
        // Rank 0 arrives late: rank 1's contribution is there, so it completes, and its reply
        // sits unread on rank 1's connection.
        let all = r0.all_gather_as("early", b"zero", Duration::from_secs(5)).unwrap();
        assert_eq!(all, vec![b"zero".to_vec(), b"one".to_vec()]);
        r0.announce(&PeerFailure { rank: 0, kind: FailureKind::Aborted, detail: "stop".into() });
        let took = wait_for(&got1, 0, FailureKind::Aborted, Duration::from_secs(2));
        assert!(took < Duration::from_millis(500), "the notice took {took:?}");
        let e = r1.all_gather_as("next", b"", Duration::from_secs(2)).unwrap_err().to_string();
        assert!(e.contains("rank 0 called Group::abort: stop"), "{e}");
    });
}

/// Two ranks in different collectives are told so, on both sides, naming both collectives,
/// over TCP and in memory; the same names pair up as before.
#[test]
fn cpu_rendezvous_mismatched_collectives_are_named() {
    let p = port();
    std::thread::scope(|s| {
        let h1 = s.spawn(move || {
            let ex = TcpExchange::connect(&cfg(1, 2, p), Duration::from_secs(20)).unwrap();
            assert_eq!(ex.all_gather_as("heap sizes", b"a", Duration::from_secs(5)).unwrap().len(), 2);
            ex.all_gather_as("peer rows", b"b", Duration::from_secs(5)).unwrap_err().to_string()
        });
        let ex = TcpExchange::connect(&cfg(0, 2, p), Duration::from_secs(20)).unwrap();
        assert_eq!(ex.all_gather_as("heap sizes", b"c", Duration::from_secs(5)).unwrap()[1], b"a".to_vec());
        let e0 = ex.all_gather_as("device ids", b"d", Duration::from_secs(5)).unwrap_err().to_string();
        let e1 = h1.join().unwrap();
        assert!(e0.contains("rank 1 is in all-gather #2 (peer rows) while rank 0 is in #2 (device ids)"), "{e0}");
        assert!(e1.contains("rank 1 is in all-gather #2 (peer rows) while rank 0 is in #2 (device ids)"), "{e1}");
    });
    let exs = LocalExchange::group(2);
    std::thread::scope(|s| {
        let mut it = exs.iter();
        let (a, b) = (it.next().unwrap(), it.next().unwrap());
        let h = s.spawn(move || b.all_gather_as("peer rows", b"x", Duration::from_secs(5)).map_err(|e| e.to_string()));
        let e0 = a.all_gather_as("device ids", b"y", Duration::from_secs(5)).unwrap_err().to_string();
        let e1 = h.join().unwrap().unwrap_err();
        for e in [&e0, &e1] {
            assert!(e.contains("rank 0 is in device ids, rank 1 in peer rows"), "{e}");
        }
        let h = s.spawn(move || b.all_gather_as("same", b"x", Duration::from_secs(5)).map(|v| v.len()).map_err(|e| e.to_string()));
        assert_eq!(a.all_gather_as("same", b"y", Duration::from_secs(5)).unwrap().len(), 2);
        assert_eq!(h.join().unwrap(), Ok(2));
    });
}

/// A flood of connections during the rendezvous: rank 0 runs at most `MAX_HANDSHAKES`
/// handshakes at once and closes every connection beyond them at once (no thread, no memory
/// for it); the job's rank retries and joins once the strangers' handshakes have timed out.
#[test]
fn cpu_rendezvous_connection_flood_is_capped() {
    use moe_ep::rendezvous::{HELLO_TIMEOUT, MAX_HANDSHAKES};
    let p = port();
    std::thread::scope(|s| {
        let root = s.spawn(move || TcpExchange::connect(&cfg(0, 2, p), Duration::from_secs(30)));
        std::thread::sleep(Duration::from_millis(200));
        let extra = 8;
        let mut strangers: Vec<TcpStream> = (0..MAX_HANDSHAKES + extra).map(|_| TcpStream::connect(("127.0.0.1", p)).unwrap()).collect();
        // The first MAX_HANDSHAKES get a challenge; the rest are closed without one.
        let mut challenged = 0;
        let mut closed = 0;
        for c in strangers.iter_mut() {
            c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let mut b = [0u8; 12];
            match std::io::Read::read(c, &mut b) {
                Ok(0) | Err(_) => closed += 1,
                Ok(_) => challenged += 1,
            }
        }
        assert_eq!((challenged, closed), (MAX_HANDSHAKES, extra));
        // The real rank joins, after the strangers' handshakes have run out of time.
        let t0 = Instant::now();
        let r1 = TcpExchange::connect(&cfg(1, 2, p), Duration::from_secs(30)).unwrap();
        let r0 = root.join().unwrap().unwrap();
        assert!(t0.elapsed() < HELLO_TIMEOUT + Duration::from_secs(5), "joining took {:?}", t0.elapsed());
        std::thread::scope(|s2| {
            let h = s2.spawn(|| r1.all_gather(b"b", Duration::from_secs(5)).unwrap());
            assert_eq!(r0.all_gather(b"a", Duration::from_secs(5)).unwrap(), vec![b"a".to_vec(), b"b".to_vec()]);
            h.join().unwrap();
        });
        drop(strangers);
    });
}

/// A rank that announces its failure instead of joining an all-gather: the others hear of it
/// once per connection (not again when rank 0's all-gather fails on it, nor when connections
/// close), and the failed rank is not told its own news as if rank 0 had failed.
#[test]
fn cpu_watch_one_notice_per_failure_and_none_back_to_the_culprit() {
    let world = 3;
    let p = port();
    let joined = std::sync::Barrier::new(world);
    let outcomes: Vec<Result<(), String>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..world)
            .map(|r| {
                let joined = &joined;
                s.spawn(move || {
                    let ex = TcpExchange::connect(&cfg(r, world, p), Duration::from_secs(20)).unwrap();
                    let (sink, got) = collector();
                    ex.watch(sink);
                    joined.wait();
                    // Checked without panicking, so every rank reaches the last barrier.
                    let outcome = if r == 2 {
                        ex.announce(&PeerFailure { rank: 2, kind: FailureKind::Error, detail: "boom".into() });
                        std::thread::sleep(Duration::from_millis(500));
                        let heard = got.lock().unwrap().clone();
                        if heard.is_empty() { Ok(()) } else { Err(format!("rank 2 was told of failures after its own: {heard:?}")) }
                    } else {
                        let e = ex.all_gather_as("step", b"x", Duration::from_secs(5)).map(|_| ()).unwrap_err().to_string();
                        std::thread::sleep(Duration::from_millis(300));
                        let heard = got.lock().unwrap().clone();
                        if !e.contains("rank 2 failed: boom") {
                            Err(format!("rank {r}: {e}"))
                        } else if heard.len() != 1 || (heard[0].rank, heard[0].kind) != (2, FailureKind::Error) {
                            Err(format!("rank {r} heard {heard:?}"))
                        } else {
                            Ok(())
                        }
                    };
                    joined.wait();
                    outcome
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for o in outcomes {
        o.unwrap();
    }
}
