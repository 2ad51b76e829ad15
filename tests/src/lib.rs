//! Test harness: GPU discovery with honest skips, the two process modes, comparisons.
//!
//! GPU tests are named `gpu1_*` (one GPU) and `gpuN_*` (several), so `cargo test gpu` or
//! `cargo test cpu` filter them. GPU test binaries use [`gpu_main`] as their harness: a test
//! the machine cannot run is reported as ignored, with the reason, never as passed. A multi-process test spawns one child per rank: the child is
//! this same test binary, run with `--exact <test name>` and the rank in torchrun's variables
//! (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`), a free `MOE_EP_MASTER_PORT`, a fresh
//! `MOE_EP_SECRET` and `MOE_EP_TEST_WORLD`;
//! in the child the test body runs as that rank of that world only. With
//! `MOE_EP_TEST_ONE_GPU_PER_PROCESS=1` each child sees only its own GPU (`CUDA_VISIBLE_DEVICES`
//! set to one device, as Slurm and Kubernetes give), so the same tests cover that setup.
//! With `MOE_EP_TEST_MPS=1` every multi-rank test runs its ranks as processes that all share
//! one GPU under CUDA MPS (the first this process sees; each child opts in with
//! `MOE_EP_SHARE_GPU=1` and the group gives it an equal share of the SMs, see `moe_ep::launch`), at 2 to 8
//! ranks (or `MOE_EP_TEST_RANKS`, up to 16 and more for the tests of the barrier and the
//! low-latency kernels, [`max_ranks`]): the whole multi-process stack, the kill tests included, on a
//! machine with one GPU. It checks correctness only; the MPS control daemon must be running
//! (`run.sh mps` starts one).

pub mod ht_case;
pub mod ll_case;

use anyhow::{Context, Result, bail};
use moe_ep::launch::Placement;
use moe_ep::{Group, GroupConfig};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How long a multi-process test may run before its children are killed.
pub const PROCESS_TEST_TIMEOUT: Duration = Duration::from_secs(300);

/// True in a child process of a multi-process test.
pub fn in_child() -> bool {
    std::env::var("MOE_EP_TEST_WORLD").is_ok()
}

/// Number of GPUs, or the reason there are none.
pub fn gpu_count() -> std::result::Result<usize, String> {
    moe_ep::device_count().map_err(|e| e.to_string())
}

/// GPUs a test needs, from its name: `gpu1_*` one, every other `gpu*` test two.
pub fn gpus_needed(test: &str) -> usize {
    if test.starts_with("gpu1_") { 1 } else { 2 }
}

/// True for tests that need two GPUs seen by one process (`gpu2x_*`: a second GPU's context),
/// which processes sharing one GPU under MPS cannot stand in for.
pub fn needs_two_physical_gpus(test: &str) -> bool {
    test.starts_with("gpu2x_")
}

/// True when multi-rank tests run as processes sharing one GPU under CUDA MPS
/// (`MOE_EP_TEST_MPS=1`).
pub fn mps() -> bool {
    std::env::var("MOE_EP_TEST_MPS").is_ok_and(|v| v == "1")
}

/// Why `test` cannot run on this machine (no driver, too few GPUs), or `None` when it can.
pub fn skip_reason(test: &str) -> Option<String> {
    if mps() && !test.starts_with("gpu1_") && moe_ep::mps_control_pipe().is_none() {
        return Some("MOE_EP_TEST_MPS=1 but no CUDA MPS control daemon is running (CUDA_MPS_PIPE_DIRECTORY; run.sh mps starts one)".into());
    }
    let need = if mps() && !needs_two_physical_gpus(test) { 1 } else { gpus_needed(test) };
    match gpu_count() {
        Err(e) => return Some(e),
        Ok(n) if n < need => return Some(format!("needs {need} GPU(s), this machine has {n}")),
        Ok(_) => {}
    }
    match std::env::var("MOE_EP_TEST_RANKS") {
        Ok(list)
            if !test.starts_with("gpu1_")
                && parse_rank_list(&list, moe_ep::abi::GROUP_MAX_RANKS).is_ok_and(|all| all.iter().all(|&w| w > max_ranks(test))) =>
        {
            Some(format!("MOE_EP_TEST_RANKS={list}: this test runs at most {} ranks ({})", max_ranks(test), MAX_RANKS_WHY))
        }
        _ => None,
    }
}

/// Why most tests stop at `MAX_RANKS` ranks.
const MAX_RANKS_WHY: &str = "the high-throughput kernels and the test kernels that take every rank's heap base by value stop at 8";

/// Most ranks `test` runs at: tests of the group barrier and of the low-latency kernels alone
/// (`gpu2_barrier_10k`, and `gpu2_ll_*` but those with `_ht` in their name) go to the group's
/// limit, `GROUP_MAX_RANKS`; every other test to `MAX_RANKS` (8).
pub fn max_ranks(test: &str) -> usize {
    let group_only = test == "gpu2_barrier_10k" || (test.starts_with("gpu2_ll_") && !test.contains("_ht"));
    if group_only { moe_ep::abi::GROUP_MAX_RANKS } else { moe_ep::abi::MAX_RANKS }
}

/// The rank counts a multi-GPU test runs at: 2..=GPUs (at most 8), or `MOE_EP_TEST_RANKS`
/// (comma separated; under MPS up to the group's limit, one GPU running them all). A listed
/// count above the test's own limit ([`max_ranks`]) is left out, and said so (a test none of
/// whose listed counts it can run is reported as ignored by [`gpu_main`]). A rank count the
/// machine cannot run, or no GPUs at all, is an error: the harness never lets a test pass
/// without running it.
pub fn rank_counts(test: &str) -> Result<Vec<usize>> {
    if in_child() {
        // The child runs the world its parent asked for.
        let w = std::env::var("MOE_EP_TEST_WORLD").unwrap_or_default();
        return Ok(vec![w.parse().with_context(|| format!("MOE_EP_TEST_WORLD={w:?}"))?]);
    }
    let n = gpu_count().map_err(|e| anyhow::anyhow!("{test} cannot run: {e}"))?;
    // Under MPS every rank count runs on one GPU.
    let max = if mps() { moe_ep::abi::GROUP_MAX_RANKS } else { n.min(moe_ep::abi::GROUP_MAX_RANKS) };
    if max < 2 {
        bail!("{test} needs at least 2 GPUs; this machine has {n}");
    }
    let own = max_ranks(test);
    match std::env::var("MOE_EP_TEST_RANKS") {
        Ok(list) => {
            let (run, beyond): (Vec<usize>, Vec<usize>) = parse_rank_list(&list, max)?.into_iter().partition(|&w| w <= own);
            if !beyond.is_empty() {
                println!("{test}: not run at {beyond:?} ranks: it runs at most {own} ({MAX_RANKS_WHY})");
            }
            if run.is_empty() {
                bail!("MOE_EP_TEST_RANKS={list:?}: {test} runs at most {own} ranks");
            }
            Ok(run)
        }
        Err(_) => Ok((2..=max.min(own).min(moe_ep::abi::MAX_RANKS)).collect()),
    }
}

/// Parses `MOE_EP_TEST_RANKS` for a machine that runs `2..=max` ranks: every entry must be a
/// rank count in that range, and at least one must be given.
pub fn parse_rank_list(list: &str, max: usize) -> Result<Vec<usize>> {
    let mut v = Vec::new();
    for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let w: usize = part.parse().with_context(|| format!("MOE_EP_TEST_RANKS={list:?}: {part:?} is not a rank count"))?;
        if !(2..=max).contains(&w) {
            bail!("MOE_EP_TEST_RANKS={list:?}: {w} ranks cannot run here (this machine runs 2..={max})");
        }
        v.push(w);
    }
    if v.is_empty() {
        bail!("MOE_EP_TEST_RANKS={list:?} names no rank count");
    }
    Ok(v)
}

/// Appends one line to the file `MOE_EP_TEST_REPORT` names (`cargo xtask test` sets it and
/// counts GPU tests run and skipped from it); nothing when it is unset.
pub fn report_line(kind: &str, test: &str, detail: &str) {
    use std::io::Write;
    if let Ok(path) = std::env::var("MOE_EP_TEST_REPORT")
        && let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(path)
    {
        let _ = writeln!(f, "{kind}\t{test}\t{}", detail.replace(['\n', '\t'], " "));
    }
}

/// A GPU test's body.
pub type GpuTest = fn() -> Result<()>;

/// `main` of a GPU test binary (`harness = false`): tests run one at a time; a test this
/// machine cannot run is reported as **ignored** with its reason (printed, and recorded for
/// `cargo xtask test`'s summary), never as passed. `--include-ignored` runs it anyway, and it
/// then fails with the reason.
pub fn gpu_main(tests: &[(&'static str, GpuTest)]) -> std::process::ExitCode {
    let mut args = libtest_mimic::Arguments::from_args();
    args.test_threads = Some(1);
    let mut trials = Vec::new();
    for &(name, body) in tests {
        let skip = if in_child() { None } else { skip_reason(name) };
        let selected = args.filter.as_deref().is_none_or(|f| if args.exact { name == f } else { name.contains(f) });
        if let Some(reason) = &skip
            && selected
            && !args.list
        {
            println!("SKIP {name}: {reason}");
            report_line("skip", name, reason);
        }
        trials.push(
            libtest_mimic::Trial::test(name, move || {
                let r = body().map_err(|e| libtest_mimic::Failed::from(format!("{e:#}")));
                if !in_child() {
                    report_line(if r.is_ok() { "pass" } else { "fail" }, name, "");
                }
                r
            })
            .with_ignored_flag(skip.is_some()),
        );
    }
    libtest_mimic::run(&args, trials).exit_code()
}

/// A case's expert count at `world` ranks: `experts` rounded up to a multiple of the rank
/// count (256 experts at 3 ranks become 258, 86 per rank), so every case runs at every rank
/// count from 2 to 8 instead of being refused where the experts do not divide.
pub fn experts_for(world: usize, experts: usize) -> usize {
    experts.div_ceil(world) * world
}

/// A grid size that differs across ranks (for the tests of mismatched configurations), at
/// least 1 and within every rank's SMs: 16 + rank, less where the ranks share a GPU; where the
/// SMs are too few for a grid per rank (16 ranks on one GPU, 6 SMs each), the ranks take turns
/// between two sizes, so ranks 0 and 1 still differ.
pub fn skewed_grid(g: &Group) -> u32 {
    let (sms, world, rank) = (g.sm_count().max(2), g.world() as u32, g.rank() as u32);
    if sms >= world + 2 { 16.min(sms - world).max(2) + rank } else { sms - 1 + rank % 2 }
}

/// Group settings for tests: a 20-second deadline so a hang fails fast, and the environment's
/// `MOE_EP_SHARE_GPU` / `MOE_EP_SM_BUDGET` (the MPS mode's children have the first).
pub fn test_config() -> GroupConfig {
    // A test may ask its child processes for a shorter GPU wait deadline.
    let ms = std::env::var("MOE_EP_TEST_TIMEOUT_MS").ok().and_then(|v| v.parse().ok()).unwrap_or(20_000);
    GroupConfig { timeout: Duration::from_millis(ms), rendezvous_timeout: Duration::from_secs(120), ..GroupConfig::default() }
        .with_env()
        .expect("MOE_EP_SHARE_GPU and MOE_EP_SM_BUDGET must be well formed")
}

/// Runs `body` on `world` ranks, one thread per GPU; fails with every failing rank's error.
pub fn run_threads(world: usize, body: impl Fn(&Group) -> Result<()> + Sync) -> Result<()> {
    let results = Group::run_threads(world, test_config(), |g| Ok(body(g)));
    let mut errors = Vec::new();
    for (r, res) in results.into_iter().enumerate() {
        match res {
            Ok(Ok(())) => {}
            Ok(Err(e)) => errors.push(format!("rank {r}: {e:#}")),
            Err(e) => errors.push(format!("rank {r}: {e}")),
        }
    }
    if !errors.is_empty() {
        bail!("{world} threads: {}", errors.join("\n"));
    }
    Ok(())
}

/// True when process tests give each child only its own GPU (`MOE_EP_TEST_ONE_GPU_PER_PROCESS=1`).
pub fn one_gpu_per_process() -> bool {
    std::env::var("MOE_EP_TEST_ONE_GPU_PER_PROCESS").is_ok_and(|v| v == "1")
}

/// Runs `body` on `world` ranks, one process per GPU. In the parent, spawns the children and
/// waits for them; in a child, joins the group as its rank and runs `body`.
pub fn run_processes(test_name: &str, world: usize, seed: u64, body: impl Fn(&Group) -> Result<()>) -> Result<()> {
    run_processes_with_env(test_name, world, seed, &[], body)
}

/// [`run_processes`] with extra environment variables for the children (e.g.
/// `MOE_EP_TEST_TIMEOUT_MS`, which [`test_config`] reads).
pub fn run_processes_with_env(test_name: &str, world: usize, seed: u64, env: &[(&str, &str)], body: impl Fn(&Group) -> Result<()>) -> Result<()> {
    if in_child() {
        let g = Group::from_env(test_config()).context("joining the group")?;
        return body(&g);
    }
    spawn_ranks(test_name, world, seed, None, env)
}

/// The parent's side of a process test: spawns `world` ranks and waits for them. Each must
/// succeed, except `victim`, which must end by SIGKILL.
fn spawn_ranks(test_name: &str, world: usize, seed: u64, victim: Option<usize>, env: &[(&str, &str)]) -> Result<()> {
    let rejoin_port = free_port()?;
    let exe = std::env::current_exe()?;
    // The devices this process sees, by its ordinals (what each child keeps when isolated).
    let visible: Vec<String> = match std::env::var("CUDA_VISIBLE_DEVICES") {
        Ok(v) if !v.trim().is_empty() => v.split(',').map(|d| d.trim().to_string()).collect(),
        _ => (0..world).map(|r| r.to_string()).collect(),
    };
    let placement = if mps() {
        Placement::SharedGpu(visible[0].clone())
    } else if one_gpu_per_process() {
        Placement::OneVisibleGpuEach(visible)
    } else {
        Placement::GpuPerRank
    };
    let args: Vec<String> = [test_name, "--exact", "--nocapture", "--test-threads=1"].map(String::from).to_vec();
    let children: Vec<_> = moe_ep::launch::rank_commands(&exe, &args, world, &placement)?
        .into_iter()
        .enumerate()
        .map(|(r, mut c)| {
            // `MOE_EP_TEST_NODE_SIZE=N`: every N ranks stand for one node (`MOE_EP_NODE`).
            if let Some((_, n)) = env.iter().find(|(k, _)| *k == "MOE_EP_TEST_NODE_SIZE") {
                let n: usize = n.parse().context("MOE_EP_TEST_NODE_SIZE")?;
                c.env(moe_ep::NODE_ENV, format!("test-node-{}", r / n.max(1)));
            }
            c.envs(env.iter().copied())
                .env("MOE_EP_TEST_WORLD", world.to_string())
                .env("MOE_EP_TEST_SEED", seed.to_string())
                .env("MOE_EP_TEST_REJOIN_PORT", rejoin_port.to_string())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .with_context(|| format!("spawning rank {r}"))
        })
        .collect::<Result<_>>()?;
    let outputs = wait_all(children, PROCESS_TEST_TIMEOUT);
    let mut failed = Vec::new();
    for (r, (status, out)) in outputs.into_iter().enumerate() {
        use std::os::unix::process::ExitStatusExt;
        let killed = status.as_ref().is_some_and(|s| s.signal() == Some(9));
        let ok = status.as_ref().is_some_and(|s| s.success());
        if Some(r) == victim {
            if !killed {
                failed.push(format!("---- rank {r} of {world} was to die by SIGKILL, but ended with {status:?} ----\n{out}"));
            }
        } else if !ok {
            failed.push(format!("---- rank {r} of {world} failed ----\n{out}"));
        } else {
            // What the children measured (their lines that start with "rank").
            // (A child's first line follows libtest's "test NAME ... " on the same line.)
            let lines = out.lines().map(|l| l.rsplit(" ... ").next().unwrap_or(l)).filter(|l| l.starts_with("rank "));
            print!("{}", lines.map(|l| format!("{l}\n")).collect::<String>());
        }
    }
    if !failed.is_empty() {
        bail!("{}", failed.join("\n"));
    }
    Ok(())
}

/// A fast-failure test at every rank count, one process per GPU: every rank runs `body(g,
/// victim, seed)`; rank `victim_of(world)` must kill itself there ([`kill_self`]) and every
/// other rank must succeed (typically: see the victim named in an error within 2 s, then
/// [`rejoin_without`] the victim).
pub fn run_kill_test(test_name: &str, victim_of: fn(usize) -> usize, body: impl Fn(Group, usize, u64) -> Result<()>) -> Result<()> {
    let worlds = rank_counts(test_name)?;
    if in_child() {
        let world = worlds[0];
        let seed: u64 = std::env::var("MOE_EP_TEST_SEED").unwrap_or_default().parse().context("MOE_EP_TEST_SEED")?;
        let g = Group::from_env(test_config()).context("joining the group")?;
        return body(g, victim_of(world), seed);
    }
    report_line("ranks", test_name, &format!("{worlds:?}"));
    for world in worlds {
        let seed = fresh_seed(test_name);
        let victim = victim_of(world);
        println!("{test_name}: {world} ranks, processes, rank {victim} is killed, seed {seed}");
        spawn_ranks(test_name, world, seed, Some(victim), &[]).with_context(|| format!("{world} ranks, rank {victim} killed, seed {seed}"))?;
    }
    Ok(())
}

/// Ends this process with SIGKILL (no destructor, no goodbye to the peers: what a crash or
/// the OOM killer does).
pub fn kill_self() -> ! {
    let _ = Command::new("kill").args(["-9", &std::process::id().to_string()]).status();
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// After `victim` died: drops this rank's failed group `g` and joins a new one of the
/// survivors (ranks renumbered in order, same GPUs) at the port the test parent reserved.
pub fn rejoin_without(g: Group, victim: usize) -> Result<Group> {
    let (rank, world) = (g.rank(), g.world());
    let device = g.device();
    let t0 = Instant::now();
    drop(g);
    let dropped = t0.elapsed();
    let mut pc = moe_ep::rendezvous::ProcessConfig::from_env()?;
    pc.rank = if rank > victim { rank - 1 } else { rank };
    pc.world = world - 1;
    pc.device = device;
    pc.master_port = std::env::var("MOE_EP_TEST_REJOIN_PORT").context("MOE_EP_TEST_REJOIN_PORT")?.parse()?;
    let g2 = Group::connect(&pc, test_config()).context("building a new group of the survivors")?;
    println!("rank {rank}: dropping the failed group took {dropped:?}; rejoined as rank {} of {}", g2.rank(), g2.world());
    Ok(g2)
}

/// Checks that `r` is the error a survivor of `victim`'s death must see: `PeerFailed` naming
/// the victim, or (when the watchdog was first) `GroupFailed` whose cause names it.
pub fn expect_peer_failure<T>(r: moe_ep::Result<T>, me: usize, victim: usize) -> Result<()> {
    match r {
        Err(moe_ep::Error::PeerFailed { rank, peer, .. }) if rank == me && peer == victim => Ok(()),
        Err(moe_ep::Error::GroupFailed { cause }) if cause.starts_with(&format!("rank {victim}")) => Ok(()),
        Err(e) => bail!("rank {me}: expected an error naming rank {victim}, got {e}"),
        Ok(_) => bail!("rank {me}: the operation succeeded although rank {victim} was dead"),
    }
}

/// `r` must be the report of a corrupt index ([`moe_ep::Error::BadIndex`]) on this rank, or a
/// peer's report of one reaching it (its waits stopped, or the group failed, naming it).
pub fn expect_bad_index<T>(r: moe_ep::Result<T>, what: &str) -> Result<()> {
    match r {
        Err(moe_ep::Error::BadIndex { .. }) => Ok(()),
        Err(e)
            if matches!(e, moe_ep::Error::PeerFailed { .. } | moe_ep::Error::GroupFailed { .. }) && {
                let m = e.to_string();
                m.contains("outside 0..") || m.contains("index out of range")
            } =>
        {
            Ok(())
        }
        Err(e) => bail!("{what}: expected BadIndex (or a peer's, passed on), got {e}"),
        Ok(_) => bail!("{what}: expected BadIndex, but it succeeded"),
    }
}

/// Runs a test body at every rank count in both modes, with fresh random inputs (`seed`,
/// printed; every rank of one run gets the same seed so each can rebuild every rank's inputs).
pub fn run_both_modes(test_name: &str, body: impl Fn(&Group, u64) -> Result<()> + Sync) -> Result<()> {
    let worlds = rank_counts(test_name)?;
    if !in_child() {
        report_line("ranks", test_name, &format!("{worlds:?}"));
    }
    for world in worlds {
        let seed = fresh_seed(test_name);
        // One GPU per process, and one GPU shared by processes, are process-mode setups only.
        if !in_child() && !one_gpu_per_process() && !mps() {
            println!("{test_name}: {world} ranks, threads, seed {seed}");
            run_threads(world, |g| body(g, seed)).with_context(|| format!("{world} ranks, one thread per GPU, seed {seed}"))?;
        }
        let seed = if in_child() { seed } else { fresh_seed(test_name) ^ 0x5eed };
        if !in_child() {
            let how = if mps() {
                "processes sharing one GPU under CUDA MPS (a correctness check)"
            } else if one_gpu_per_process() {
                "processes (one visible GPU each)"
            } else {
                "processes"
            };
            println!("{test_name}: {world} ranks, {how}, seed {seed}");
        }
        let how = if mps() { "processes sharing one GPU" } else { "one process per GPU" };
        run_processes(test_name, world, seed, |g| body(g, seed)).with_context(|| format!("{world} ranks, {how}, seed {seed}"))?;
    }
    Ok(())
}

/// Runs every case of `list` (fresh seed per case) at every rank count in both modes.
pub fn run_cases<C: Copy + std::fmt::Debug + Sync>(name: &str, list: &[C], run_case: fn(&Group, u64, C) -> Result<()>) -> Result<()> {
    run_both_modes(name, |g, seed| {
        for (i, c) in list.iter().enumerate() {
            run_case(g, seed.wrapping_add(i as u64), *c).with_context(|| format!("rank {} case {c:?}", g.rank()))?;
        }
        Ok(())
    })
}

fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// Waits for every child (reading their output on threads), killing all at the deadline.
fn wait_all(children: Vec<std::process::Child>, timeout: Duration) -> Vec<(Option<std::process::ExitStatus>, String)> {
    let deadline = Instant::now() + timeout;
    let pids: Vec<u32> = children.iter().map(|c| c.id()).collect();
    let handles: Vec<_> = children.into_iter().map(|c| std::thread::spawn(move || c.wait_with_output())).collect();
    // A watchdog kills the children if they outlive the deadline.
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let d2 = done.clone();
    let watchdog = std::thread::spawn(move || {
        while Instant::now() < deadline {
            if d2.load(std::sync::atomic::Ordering::Relaxed) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        for pid in pids {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        }
    });
    let out = handles
        .into_iter()
        .map(|h| match h.join() {
            Ok(Ok(o)) => (Some(o.status), format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))),
            Ok(Err(e)) => (None, format!("waiting failed: {e}")),
            Err(_) => (None, "waiter panicked".into()),
        })
        .collect();
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = watchdog.join();
    out
}

/// Checks that `r` failed with the error variant `want` (e.g. `"StaleHandle"`), naming `what`
/// was tried in the failure message.
pub fn expect_refused<T>(r: moe_ep::Result<T>, want: &str, what: &str) -> Result<()> {
    match r {
        Err(e) => {
            let got = format!("{e:?}");
            let variant = got.split([' ', '{', '(']).next().unwrap_or("");
            if variant == want { Ok(()) } else { bail!("{what}: expected {want}, got {e}") }
        }
        Ok(_) => bail!("{what}: accepted, expected {want}"),
    }
}

/// Compares two whole arrays; the error shows the mismatch count and the first few.
pub fn compare<T: PartialEq + std::fmt::Debug>(what: &str, got: &[T], want: &[T]) -> Result<()> {
    if got.len() != want.len() {
        bail!("{what}: {} elements, expected {}", got.len(), want.len());
    }
    let bad: Vec<usize> = (0..got.len()).filter(|&i| got[i] != want[i]).collect();
    if !bad.is_empty() {
        let first: Vec<String> = bad.iter().take(8).map(|&i| format!("[{i}] got {:?} want {:?}", got[i], want[i])).collect();
        bail!("{what}: {} of {} elements differ; first: {}", bad.len(), got.len(), first.join(", "));
    }
    Ok(())
}

/// Copies a cudarc slice to the host.
pub fn to_host<T: cudarc::driver::DeviceRepr + Default + Clone>(
    stream: &std::sync::Arc<cudarc::driver::CudaStream>,
    s: &cudarc::driver::CudaSlice<T>,
) -> Result<Vec<T>> {
    Ok(stream.clone_dtoh(s)?)
}

/// A test name seed mixed with the wall clock, so every run draws fresh inputs (printed, so a
/// failure can be replayed with `MOE_EP_TEST_SEED`).
pub fn fresh_seed(test: &str) -> u64 {
    if let Ok(s) = std::env::var("MOE_EP_TEST_SEED") {
        return s.parse().expect("MOE_EP_TEST_SEED must be an integer");
    }
    // Multi-process children get the parent's seed through MOE_EP_TEST_SEED (above).
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
    let mut h = t;
    for b in test.bytes() {
        h = h.rotate_left(5) ^ b as u64;
    }
    h
}

/// A device array whose length may be zero (cudarc allocates at least one element; the
/// length seen by moe-ep is `len`).
pub struct DevBuf<T> {
    pub buf: cudarc::driver::CudaSlice<T>,
    pub len: usize,
}

// SAFETY: `buf` is a live slice of at least `len` elements (one when `len` is 0); the tests keep
// every DevBuf alive until the operations that use it have been synchronised.
unsafe impl<T> moe_ep::DeviceArg<T> for DevBuf<T> {
    fn device_addr(&self) -> u64 {
        self.buf.device_addr()
    }
    fn elems(&self) -> usize {
        self.len
    }
}

impl<T: cudarc::driver::DeviceRepr + Clone + Default> DevBuf<T> {
    /// Copies the array back.
    pub fn to_vec(&self, stream: &std::sync::Arc<cudarc::driver::CudaStream>) -> Result<Vec<T>> {
        let mut v = stream.clone_dtoh(&self.buf)?;
        v.truncate(self.len);
        Ok(v)
    }

    /// Overwrites the array with `v` (same length).
    pub fn write(&mut self, stream: &std::sync::Arc<cudarc::driver::CudaStream>, v: &[T]) -> Result<()> {
        anyhow::ensure!(v.len() == self.len, "write of {} elements into {}", v.len(), self.len);
        if !v.is_empty() {
            stream.memcpy_htod(v, &mut self.buf)?;
        }
        Ok(())
    }
}

/// Uploads `v`.
pub fn upload<T: cudarc::driver::DeviceRepr + Clone + Default>(stream: &std::sync::Arc<cudarc::driver::CudaStream>, v: &[T]) -> Result<DevBuf<T>> {
    let buf = if v.is_empty() { stream.clone_htod(&[T::default()])? } else { stream.clone_htod(v)? };
    Ok(DevBuf { buf, len: v.len() })
}

/// A device array of `len` copies of `poison` (so unwritten outputs show).
pub fn poisoned<T: cudarc::driver::DeviceRepr + Clone + Default>(
    stream: &std::sync::Arc<cudarc::driver::CudaStream>,
    len: usize,
    poison: T,
) -> Result<DevBuf<T>> {
    upload(stream, &vec![poison; len])
}

/// Little-endian bytes to bf16 values (no alignment needed).
pub fn bytes_to_bf16(b: &[u8]) -> Vec<half::bf16> {
    b.chunks_exact(2).map(|c| half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]]))).collect()
}
