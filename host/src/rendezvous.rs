//! Rendezvous: how ranks find each other and exchange small blobs (IPC handles, device ids,
//! NCCL ids) before any GPU memory is shared.
//!
//! Two transports behind one trait: [`TcpExchange`] for one process per GPU (rank 0 listens,
//! the others connect; torchrun's environment variables configure it, see [`ProcessConfig`]),
//! and [`LocalExchange`] for one process driving several GPUs from threads. Every call has a
//! deadline and fails with an error naming the ranks that did not show up; malformed input on
//! the socket is an error, never a panic.
//!
//! **Authentication.** Every rank of a job holds the same secret ([`ProcessConfig::secret`]).
//! Rank 0 greets each connection with a fresh random challenge; a joining rank answers with
//! HMAC-SHA256(secret, challenge, rank, world), and rank 0 proves itself the same way in its
//! welcome. A connection that fails this (a stranger, a stale process of another job, garbage)
//! is refused and logged on standard error; it never aborts the job and never sees a handle.
//! Handshakes run concurrently, each under its own deadline ([`HELLO_TIMEOUT`]), so silent
//! connections cannot use up the rendezvous' time.

use crate::error::{Error, Result};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

pub use crate::watchdog::{FailureKind, FailureSink, PeerFailure};

/// All-gather of byte blobs among the ranks of a group (also a host barrier).
pub trait Exchange: Send + Sync {
    /// This rank.
    fn rank(&self) -> usize;
    /// Ranks in the group.
    fn world(&self) -> usize;
    /// Every rank contributes `data`; every rank gets all contributions, by rank.
    fn all_gather(&self, data: &[u8], timeout: Duration) -> Result<Vec<Vec<u8>>>;
    /// [`Exchange::all_gather`] named `what`: an exchange that can (moe-ep's own) checks that
    /// every rank is in the same collective (the same name, at the same count of collectives
    /// on this exchange) and fails naming both otherwise, instead of pairing two different
    /// collectives up. The default ignores the name.
    fn all_gather_as(&self, what: &str, data: &[u8], timeout: Duration) -> Result<Vec<Vec<u8>>> {
        let _ = what;
        self.all_gather(data, timeout)
    }
    /// Waits until every rank has called it.
    fn barrier(&self, timeout: Duration) -> Result<()> {
        self.all_gather_as("barrier", &[], timeout).map(|_| ())
    }
    /// Starts watching the peers: from then on, `sink` gets every peer failure the exchange
    /// observes or is told about (a peer's process gone, a failure it announced, a peer
    /// leaving), from the exchange's own threads, so that the group stops waiting for that
    /// peer at once. The default watches nothing: a group over such an exchange learns of a
    /// dead peer only at its wait deadline.
    fn watch(&self, sink: FailureSink) {
        let _ = sink;
    }
    /// Tells every peer (best effort, without blocking on them) that `failure` happened to
    /// this rank. The default tells nobody.
    fn announce(&self, failure: &PeerFailure) {
        let _ = failure;
    }
}

// ---------------------------------------------------------------------------------------
// Configuration from the environment
// ---------------------------------------------------------------------------------------

/// The job's shared secret (its `Debug` form never shows it).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secret(<{} bytes>)", self.0.len())
    }
}

/// A fresh random job secret (32 hex digits) for a launcher to pass to its ranks as
/// `MOE_EP_SECRET`.
pub fn random_secret() -> Result<String> {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).map_err(|e| Error::Rendezvous { rank: 0, world: 0, reason: format!("no randomness for a job secret: {e}") })?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// Offset from torchrun's `MASTER_PORT` to the port moe-ep's rendezvous listens on when
/// `MOE_EP_MASTER_PORT` is not set: torchrun's own store already holds `MASTER_PORT`.
pub const PORT_OFFSET: u16 = 1;

/// Most handshakes rank 0 runs at once; a connection beyond them is closed at once.
pub const MAX_HANDSHAKES: usize = 64;
/// Refused connections logged (and named in a rendezvous error); the rest are only counted.
const MAX_LOGGED_REFUSALS: usize = 16;

/// How long rank 0 waits for one connection's hello before refusing it.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(5);

/// How a process joins a group: its rank, the group size, its GPU, rank 0's address and the
/// job's secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcessConfig {
    /// This process's rank.
    pub rank: usize,
    /// Ranks in the group.
    pub world: usize,
    /// CUDA device ordinal of this rank.
    pub device: usize,
    /// Where rank 0 listens.
    pub master_addr: String,
    /// The port rank 0 listens on.
    pub master_port: u16,
    /// Shared by every rank of the job; a connection that cannot prove it knows it is refused.
    pub secret: Secret,
}

impl ProcessConfig {
    /// Reads torchrun's variables (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`,
    /// `MASTER_PORT`); `MOE_EP_RANK`, `MOE_EP_WORLD_SIZE`, `MOE_EP_LOCAL_RANK` and
    /// `MOE_EP_MASTER_ADDR` take precedence. `LOCAL_RANK` (the device) defaults to `RANK`,
    /// `MASTER_ADDR` to 127.0.0.1.
    ///
    /// The port is `MOE_EP_MASTER_PORT`, or `MASTER_PORT + 1` ([`PORT_OFFSET`]) where only
    /// torchrun's `MASTER_PORT` is set (torchrun's store listens on `MASTER_PORT` itself).
    ///
    /// The secret is `MOE_EP_SECRET` (launchers should set a random one, as the test harness and
    /// the benchmark do). Without it the secret is derived from what every rank of a torchrun
    /// job shares (`TORCHELASTIC_RUN_ID`, the master address and port, the world size): that
    /// keeps strays and other jobs out, but not someone who can read the job's environment.
    /// Prints [`ProcessConfig::derived_secret_warning`] where it applies.
    pub fn from_env() -> Result<Self> {
        let get = |k: &str| std::env::var(k).ok();
        let c = Self::from_lookup(get)?;
        if let Some(w) = Self::derived_secret_warning(get) {
            eprintln!("moe-ep (rank {}): {w}", c.rank);
        }
        Ok(c)
    }

    /// The warning a rank prints when its secret is derived (no `MOE_EP_SECRET`): what it is
    /// derived from can be read or guessed by anyone who sees the job's environment.
    pub fn derived_secret_warning(get: impl Fn(&str) -> Option<String>) -> Option<String> {
        get("MOE_EP_SECRET").is_none().then(|| {
            "MOE_EP_SECRET is not set, so the rendezvous secret is derived from torchrun's variables (TORCHELASTIC_RUN_ID, \
             MASTER_ADDR, MASTER_PORT, WORLD_SIZE), which anyone who can read or guess the job's environment knows; give every \
             rank the same random MOE_EP_SECRET (e.g. `openssl rand -hex 16`)"
                .to_string()
        })
    }

    /// As [`ProcessConfig::from_env`], reading variables through `get` (for tests).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let var = |ours: &'static str, theirs: &'static str| -> Option<(&'static str, String)> {
            get(ours).map(|v| (ours, v)).or_else(|| get(theirs).map(|v| (theirs, v)))
        };
        fn parse<T: std::str::FromStr>(name: &'static str, v: &str) -> Result<T> {
            v.trim().parse().map_err(|_| Error::invalid(name, format!("cannot parse {v:?}")))
        }
        let (n, v) = var("MOE_EP_RANK", "RANK").ok_or_else(|| Error::invalid("RANK", "neither MOE_EP_RANK nor RANK is set"))?;
        let rank: usize = parse(n, &v)?;
        let (n, v) =
            var("MOE_EP_WORLD_SIZE", "WORLD_SIZE").ok_or_else(|| Error::invalid("WORLD_SIZE", "neither MOE_EP_WORLD_SIZE nor WORLD_SIZE is set"))?;
        let world: usize = parse(n, &v)?;
        let device = match var("MOE_EP_LOCAL_RANK", "LOCAL_RANK") {
            Some((n, v)) => parse(n, &v)?,
            None => rank,
        };
        let master_addr = var("MOE_EP_MASTER_ADDR", "MASTER_ADDR").map(|(_, v)| v).unwrap_or_else(|| "127.0.0.1".into());
        let master_port: u16 = match (get("MOE_EP_MASTER_PORT"), get("MASTER_PORT")) {
            (Some(v), _) => parse("MOE_EP_MASTER_PORT", &v)?,
            (None, Some(v)) => {
                let p: u16 = parse("MASTER_PORT", &v)?;
                p.checked_add(PORT_OFFSET)
                    .ok_or_else(|| Error::invalid("MASTER_PORT", format!("{p} + {PORT_OFFSET} is not a port; set MOE_EP_MASTER_PORT")))?
            }
            (None, None) => return Err(Error::invalid("MASTER_PORT", "neither MOE_EP_MASTER_PORT nor MASTER_PORT is set")),
        };
        let secret = match get("MOE_EP_SECRET") {
            Some(s) if !s.is_empty() => s,
            Some(_) => return Err(Error::invalid("MOE_EP_SECRET", "is empty")),
            None => format!(
                "moe-ep derived secret: run {}, master {master_addr}:{}, world {world}",
                get("TORCHELASTIC_RUN_ID").unwrap_or_default(),
                get("MASTER_PORT").unwrap_or_default()
            ),
        };
        let c = ProcessConfig { rank, world, device, master_addr, master_port, secret: Secret(secret) };
        c.validate()?;
        Ok(c)
    }

    /// Checks rank < world and world in 1..=GROUP_MAX_RANKS.
    pub fn validate(&self) -> Result<()> {
        let max = moe_ep_kernels::abi::GROUP_MAX_RANKS;
        if self.world == 0 || self.world > max {
            return Err(Error::invalid("world", format!("world size {} is outside 1..={max}", self.world)));
        }
        if self.rank >= self.world {
            return Err(Error::invalid("rank", format!("rank {} is not below world size {}", self.rank, self.world)));
        }
        Ok(())
    }

    fn socket_addr(&self) -> Result<SocketAddr> {
        (self.master_addr.as_str(), self.master_port)
            .to_socket_addrs()
            .map_err(|e| Error::invalid("MASTER_ADDR", format!("cannot resolve {}:{}: {e}", self.master_addr, self.master_port)))?
            .next()
            .ok_or_else(|| Error::invalid("MASTER_ADDR", format!("{} resolves to no address", self.master_addr)))
    }
}

// ---------------------------------------------------------------------------------------
// TCP
// ---------------------------------------------------------------------------------------

const MAGIC: u32 = 0x4d4f_4550; // "MOEP"
const VERSION: u16 = 3;
/// Largest blob a frame may carry (guards allocations against garbage lengths).
const MAX_FRAME: usize = 16 << 20;
/// Largest frame of the handshake (before a peer has authenticated).
const MAX_HANDSHAKE_FRAME: usize = 1024;
/// Bytes of the challenge and of a MAC.
const NONCE: usize = 32;

mod kind {
    pub const HELLO: u8 = 1;
    pub const WELCOME: u8 = 2;
    pub const DATA: u8 = 3;
    pub const ALL: u8 = 4;
    pub const FAIL: u8 = 5;
    pub const CHALLENGE: u8 = 6;
    /// A rank's failure ([`super::PeerFailure`]): rank u32, kind u8, detail (UTF-8).
    pub const ABORT: u8 = 7;
}

/// Longest failure detail sent to the peers.
const MAX_DETAIL: usize = 2048;

fn encode_failure(f: &PeerFailure) -> Vec<u8> {
    let mut b = (f.rank as u32).to_le_bytes().to_vec();
    b.push(f.kind.code() as u8);
    let mut end = f.detail.len().min(MAX_DETAIL);
    while !f.detail.is_char_boundary(end) {
        end -= 1;
    }
    b.extend_from_slice(&f.detail.as_bytes()[..end]);
    b
}

/// A failure notice from `from` (the connection's peer), checked: the named rank must exist.
fn decode_failure(p: &[u8], from: usize, world: usize) -> PeerFailure {
    let parsed = (p.len() >= 5).then(|| (u32::from_le_bytes(p[0..4].try_into().expect("4 bytes")) as usize, FailureKind::from_code(p[4] as u32)));
    match parsed {
        Some((rank, Some(kind))) if rank < world => PeerFailure { rank, kind, detail: String::from_utf8_lossy(&p[5..]).into_owned() },
        _ => PeerFailure { rank: from, kind: FailureKind::Error, detail: format!("it sent a malformed failure notice ({} bytes)", p.len()) },
    }
}

/// HMAC-SHA256 of the job secret over a label, the challenge, and the claimed rank and world.
fn mac(secret: &Secret, label: &[u8], nonce: &[u8], rank: u32, world: u32) -> [u8; 32] {
    use hmac::Mac;
    let mut m = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.0.as_bytes()).expect("HMAC takes keys of any length");
    m.update(label);
    m.update(nonce);
    m.update(&rank.to_le_bytes());
    m.update(&world.to_le_bytes());
    m.finalize().into_bytes().into()
}

/// Compares two MACs in time independent of where they differ.
fn mac_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

/// Frame: magic u32, version u16, kind u8, pad u8, len u32, payload (little endian).
fn write_frame(s: &mut TcpStream, kind: u8, payload: &[u8]) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(12 + payload.len());
    buf.extend_from_slice(&MAGIC.to_le_bytes());
    buf.extend_from_slice(&VERSION.to_le_bytes());
    buf.push(kind);
    buf.push(0);
    buf.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    buf.extend_from_slice(payload);
    s.write_all(&buf)
}

/// Reads one frame; malformed input is an `InvalidData` error.
fn read_frame(s: &mut TcpStream) -> std::io::Result<(u8, Vec<u8>)> {
    read_frame_max(s, MAX_FRAME)
}

/// Reads one frame of at most `max` payload bytes.
fn read_frame_max(s: &mut TcpStream, max: usize) -> std::io::Result<(u8, Vec<u8>)> {
    let mut h = [0u8; 12];
    s.read_exact(&mut h)?;
    let bad = |m: String| std::io::Error::new(std::io::ErrorKind::InvalidData, m);
    let magic = u32::from_le_bytes(h[0..4].try_into().unwrap());
    if magic != MAGIC {
        return Err(bad(format!("not a moe-ep rendezvous peer (magic {magic:#010x})")));
    }
    let version = u16::from_le_bytes(h[4..6].try_into().unwrap());
    if version != VERSION {
        return Err(bad(format!("protocol version {version}, expected {VERSION}")));
    }
    let len = u32::from_le_bytes(h[8..12].try_into().unwrap()) as usize;
    if len > max {
        return Err(bad(format!("frame of {len} bytes exceeds the {max}-byte limit")));
    }
    let mut payload = vec![0u8; len];
    s.read_exact(&mut payload)?;
    Ok((h[6], payload))
}

fn encode_list(items: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(items.len() as u32).to_le_bytes());
    for it in items {
        out.extend_from_slice(&(it.len() as u32).to_le_bytes());
        out.extend_from_slice(it);
    }
    out
}

fn decode_list(b: &[u8]) -> Option<Vec<Vec<u8>>> {
    let mut at = 0usize;
    let mut take = |n: usize| -> Option<&[u8]> {
        let s = b.get(at..at.checked_add(n)?)?;
        at += n;
        Some(s)
    };
    let count = u32::from_le_bytes(take(4)?.try_into().ok()?) as usize;
    if count > moe_ep_kernels::abi::GROUP_MAX_RANKS {
        return None;
    }
    let mut items = Vec::with_capacity(count);
    for _ in 0..count {
        let len = u32::from_le_bytes(take(4)?.try_into().ok()?) as usize;
        items.push(take(len)?.to_vec());
    }
    Some(items)
}

/// Rendezvous over TCP: rank 0 listens at the master address and relays all-gathers.
///
/// Every connection has a reader thread that takes each frame off the socket as it arrives:
/// a failure notice is acted on at once (it never waits behind unread data), and every frame
/// goes on to the connection's inbox, which the all-gathers read.
pub struct TcpExchange {
    rank: usize,
    world: usize,
    /// The all-gathers' side: each connection's inbox (rank 0: ranks 1.., index r - 1; the
    /// others: rank 0) and the count of all-gathers so far. All-gathers run under this lock.
    inbox: Mutex<Inbox>,
    /// The same connections for writing, one lock each, so all-gathers, failure notices and
    /// rank 0's relays never interleave frames.
    writers: Arc<Vec<Mutex<TcpStream>>>,
    /// Rank 0: held while an all-gather's replies go out, and while a failure notice is
    /// relayed, so a relay never overtakes a reply (a rank that leaves right after an
    /// all-gather must not fail that all-gather on the ranks still reading it).
    broadcast: Arc<Mutex<()>>,
    /// Where failure notices go: kept until the group watches, then to its sink.
    notices: Arc<Mutex<Notices>>,
    /// Set on drop: the reader threads end without reporting.
    stop: Arc<AtomicBool>,
}

/// The all-gathers' view of the connections.
struct Inbox {
    rx: Vec<std::sync::mpsc::Receiver<Inbound>>,
    /// All-gathers this rank has started on this exchange.
    seq: u64,
}

/// The rank at the other end of connection `i` of rank `rank` (rank 0 holds one to each rank
/// `1..`, every other rank one to rank 0).
fn peer_of(rank: usize, i: usize) -> usize {
    if rank == 0 { i + 1 } else { 0 }
}

/// What a reader thread passes on.
enum Inbound {
    Frame(u8, Vec<u8>),
    /// The connection ended (why).
    Closed(String),
}

/// Failure notices before and after the group watches its peers.
enum Notices {
    Early(Vec<PeerFailure>),
    Watching(FailureSink),
}

/// A collective's name as it travels: at most 255 bytes, cut at a character boundary.
fn wire_name(what: &str) -> &str {
    let mut end = what.len().min(255);
    while !what.is_char_boundary(end) {
        end -= 1;
    }
    &what[..end]
}

/// An all-gather frame's head: the all-gather's sequence number on this exchange and its name.
fn collective_head(seq: u64, what: &str) -> Vec<u8> {
    let name = wire_name(what).as_bytes();
    let mut b = seq.to_le_bytes().to_vec();
    b.push(name.len() as u8);
    b.extend_from_slice(name);
    b
}

/// Splits an all-gather frame into its head's sequence number and name, and its body.
fn split_collective(p: &[u8]) -> Option<(u64, String, &[u8])> {
    let seq = u64::from_le_bytes(p.get(0..8)?.try_into().ok()?);
    let n = *p.get(8)? as usize;
    let name = String::from_utf8_lossy(p.get(9..9 + n)?).into_owned();
    Some((seq, name, &p[9 + n..]))
}

/// Labels of the two MACs of the handshake.
const HELLO_LABEL: &[u8] = b"moe-ep rendezvous hello";
const WELCOME_LABEL: &[u8] = b"moe-ep rendezvous welcome";

/// The connections rank 0 refused: the first few logged and kept for an error, the rest
/// counted.
#[derive(Default)]
struct Refusals {
    logged: Vec<String>,
    count: usize,
}

impl Refusals {
    /// One refusal of a connection `from` (an address, or what failed).
    fn add(&mut self, world: usize, from: &dyn std::fmt::Display, why: &str) {
        self.count += 1;
        if self.logged.len() < MAX_LOGGED_REFUSALS {
            eprintln!("moe-ep rendezvous (rank 0 of {world}): refused a connection from {from}: {why}");
            self.logged.push(format!("{from}: {why}"));
        }
    }

    fn summary(&self) -> String {
        let more = self.count - self.logged.len();
        if more > 0 { format!("{} and {more} more", self.logged.join("; ")) } else { self.logged.join("; ") }
    }
}

/// What one connection's handshake at rank 0 came to.
enum Handshake {
    /// The peer proved it knows the secret.
    Joined { rank: usize, world: usize, stream: TcpStream, peer: SocketAddr, nonce: Vec<u8> },
    /// Refused (logged; the connection is dropped).
    Refused { peer: SocketAddr, why: String },
}

/// Rank 0's side of one connection: challenge, then a hello within `timeout` whose MAC proves
/// the secret. Runs on its own thread, so a silent peer delays nobody.
fn handshake(mut s: TcpStream, peer: SocketAddr, secret: &Secret, timeout: Duration) -> Handshake {
    let refuse = |why: String| Handshake::Refused { peer, why };
    let _ = s.set_nonblocking(false);
    let _ = s.set_nodelay(true);
    let _ = s.set_read_timeout(Some(timeout));
    let _ = s.set_write_timeout(Some(timeout));
    let mut nonce = vec![0u8; NONCE];
    if let Err(e) = getrandom::fill(&mut nonce) {
        return refuse(format!("no randomness for the challenge: {e}"));
    }
    if let Err(e) = write_frame(&mut s, kind::CHALLENGE, &nonce) {
        return refuse(format!("sending the challenge: {e}"));
    }
    let hello = match read_frame_max(&mut s, MAX_HANDSHAKE_FRAME) {
        Ok((kind::HELLO, p)) if p.len() == 8 + NONCE => p,
        Ok((k, p)) => return refuse(format!("frame kind {k} of {} bytes instead of a hello", p.len())),
        Err(e) if is_timeout(&e) => return refuse(format!("no hello within {timeout:?}")),
        Err(e) => return refuse(e.to_string()),
    };
    let rank = u32::from_le_bytes(hello[0..4].try_into().expect("4 bytes"));
    let world = u32::from_le_bytes(hello[4..8].try_into().expect("4 bytes"));
    if !mac_eq(&hello[8..], &mac(secret, HELLO_LABEL, &nonce, rank, world)) {
        let _ = write_frame(&mut s, kind::FAIL, b"rendezvous authentication failed (wrong job secret)");
        return refuse(format!("claimed rank {rank} of {world} without the job's secret"));
    }
    Handshake::Joined { rank: rank as usize, world: world as usize, stream: s, peer, nonce }
}

impl TcpExchange {
    /// Joins the group described by `cfg` within `timeout`.
    pub fn connect(cfg: &ProcessConfig, timeout: Duration) -> Result<Self> {
        cfg.validate()?;
        let addr = cfg.socket_addr()?;
        let err = |reason: String| Error::Rendezvous { rank: cfg.rank, world: cfg.world, reason };
        let deadline = Instant::now() + timeout;
        if cfg.rank == 0 {
            let listener = TcpListener::bind(addr).map_err(|e| err(format!("cannot listen on {addr}: {e}")))?;
            return Self::accept_all(cfg, listener, deadline, timeout);
        }
        let read = |stream: &mut TcpStream, what: &str| -> Result<(u8, Vec<u8>)> {
            stream.set_read_timeout(Some(remaining(deadline))).ok();
            match read_frame_max(stream, MAX_HANDSHAKE_FRAME) {
                Ok((kind::FAIL, msg)) => Err(err(String::from_utf8_lossy(&msg).into_owned())),
                Ok(f) => Ok(f),
                Err(e) if is_timeout(&e) => Err(err(format!(
                    "rank 0 at {addr} did not complete the rendezvous within {timeout:?} (waiting for its {what}; some rank is missing)"
                ))),
                Err(e) => Err(err(format!("waiting for rank 0's {what} at {addr}: {e}"))),
            }
        };
        // Connect, until rank 0 listens and takes the connection: it closes connections
        // beyond its handshake limit at once (a flood of strangers), so a connection closed
        // before its challenge is tried again.
        let mut last = String::new();
        let (mut stream, nonce) = loop {
            if Instant::now() >= deadline {
                return Err(err(format!("could not reach rank 0 at {addr} within {timeout:?}: {last}")));
            }
            let mut stream = match TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
                Ok(s) => s,
                Err(e) => {
                    last = e.to_string();
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            stream.set_read_timeout(Some(remaining(deadline))).ok();
            let closed = |e: &std::io::Error| {
                use std::io::ErrorKind::*;
                matches!(e.kind(), UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe)
            };
            match read_frame_max(&mut stream, MAX_HANDSHAKE_FRAME) {
                Ok((kind::CHALLENGE, n)) if n.len() == NONCE => break (stream, n),
                Ok((kind::FAIL, msg)) => return Err(err(String::from_utf8_lossy(&msg).into_owned())),
                Ok((k, p)) => return Err(err(format!("rank 0 at {addr} sent frame kind {k} ({} bytes) instead of a challenge", p.len()))),
                Err(e) if closed(&e) => {
                    last = format!("rank 0 closed the connection before its challenge ({e})");
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) if is_timeout(&e) => {
                    return Err(err(format!(
                        "rank 0 at {addr} did not complete the rendezvous within {timeout:?} (waiting for its challenge; some rank is missing)"
                    )));
                }
                Err(e) => return Err(err(format!("waiting for rank 0's challenge at {addr}: {e}"))),
            }
        };
        let (rank, world) = (cfg.rank as u32, cfg.world as u32);
        let mut hello = Vec::with_capacity(8 + NONCE);
        hello.extend_from_slice(&rank.to_le_bytes());
        hello.extend_from_slice(&world.to_le_bytes());
        hello.extend_from_slice(&mac(&cfg.secret, HELLO_LABEL, &nonce, rank, world));
        write_frame(&mut stream, kind::HELLO, &hello).map_err(|e| err(format!("sending hello to rank 0 at {addr}: {e}")))?;
        match read(&mut stream, "welcome")? {
            (kind::WELCOME, proof) if mac_eq(&proof, &mac(&cfg.secret, WELCOME_LABEL, &nonce, rank, world)) => {}
            (kind::WELCOME, _) => {
                return Err(err(format!("the process at {addr} could not prove it knows the job's secret (not this job's rank 0)")));
            }
            (k, _) => return Err(err(format!("rank 0 answered the hello with frame kind {k}"))),
        }
        TcpExchange::new(cfg.rank, cfg.world, vec![stream]).map_err(|e| err(format!("duplicating the connection to rank 0: {e}")))
    }

    fn accept_all(cfg: &ProcessConfig, listener: TcpListener, deadline: Instant, timeout: Duration) -> Result<Self> {
        let err = |reason: String| Error::Rendezvous { rank: 0, world: cfg.world, reason };
        listener.set_nonblocking(true).map_err(|e| err(e.to_string()))?;
        let mut slots: Vec<Option<(TcpStream, SocketAddr, Vec<u8>)>> = (1..cfg.world).map(|_| None).collect();
        let mut refused = Refusals::default();
        let fail_all = |slots: &mut Vec<Option<(TcpStream, SocketAddr, Vec<u8>)>>, msg: &str| {
            for (s, _, _) in slots.iter_mut().flatten() {
                let _ = write_frame(s, kind::FAIL, msg.as_bytes());
            }
        };
        let (tx, rx) = std::sync::mpsc::channel::<Handshake>();
        // Handshakes in flight (each on its own thread): at most MAX_HANDSHAKES, so a flood of
        // connections costs neither threads nor memory without bound; a connection beyond that
        // is closed at once (a rank of the job retries until its deadline).
        let mut in_flight = 0usize;
        while slots.iter().any(|s| s.is_none()) {
            if Instant::now() >= deadline {
                let missing: Vec<usize> = slots.iter().enumerate().filter(|(_, s)| s.is_none()).map(|(i, _)| i + 1).collect();
                let mut msg = format!("rank(s) {missing:?} of {} did not join within {timeout:?}", cfg.world);
                if refused.count > 0 {
                    msg += &format!("; refused connections: {}", refused.summary());
                }
                fail_all(&mut slots, &msg);
                return Err(err(msg));
            }
            let mut idle = true;
            match listener.accept() {
                Ok((s, peer)) if in_flight >= MAX_HANDSHAKES => {
                    idle = false;
                    drop(s);
                    refused.add(cfg.world, &peer, &format!("{MAX_HANDSHAKES} handshakes were already in progress"));
                }
                Ok((s, peer)) => {
                    idle = false;
                    in_flight += 1;
                    let (tx, secret) = (tx.clone(), cfg.secret.clone());
                    let per_peer = remaining(deadline).min(HELLO_TIMEOUT);
                    std::thread::spawn(move || {
                        let _ = tx.send(handshake(s, peer, &secret, per_peer));
                    });
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                // A connection gone before it was taken, or a full descriptor table (a flood):
                // not the job's failure; try again.
                Err(e) => {
                    refused.add(cfg.world, &"an unknown peer", &format!("accept failed: {e}"));
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            while let Ok(h) = rx.try_recv() {
                idle = false;
                in_flight -= 1;
                let (rank, world, mut stream, peer, nonce) = match h {
                    Handshake::Refused { peer, why } => {
                        refused.add(cfg.world, &peer, &why);
                        continue;
                    }
                    Handshake::Joined { rank, world, stream, peer, nonce } => (rank, world, stream, peer, nonce),
                };
                // The peer knows the secret: it belongs to this job, so a disagreement is the
                // job's configuration error and ends the rendezvous.
                let fatal = if world != cfg.world {
                    Some(format!("rank {rank} (from {peer}) says the world size is {world}, rank 0 says {}", cfg.world))
                } else if rank == 0 || rank >= cfg.world {
                    Some(format!("a process at {peer} claims rank {rank}, outside 1..{}", cfg.world))
                } else if let Some((_, first, _)) = &slots[rank - 1] {
                    Some(format!("rank {rank} joined twice (from {first} and from {peer})"))
                } else {
                    None
                };
                if let Some(msg) = fatal {
                    let _ = write_frame(&mut stream, kind::FAIL, msg.as_bytes());
                    fail_all(&mut slots, &msg);
                    return Err(err(msg));
                }
                slots[rank - 1] = Some((stream, peer, nonce));
            }
            if idle {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        let mut conns = Vec::new();
        for (r, (mut s, peer, nonce)) in slots.into_iter().flatten().enumerate() {
            let proof = mac(&cfg.secret, WELCOME_LABEL, &nonce, (r + 1) as u32, cfg.world as u32);
            write_frame(&mut s, kind::WELCOME, &proof).map_err(|e| err(format!("welcoming {peer}: {e}")))?;
            let _ = s.set_write_timeout(None);
            conns.push(s);
        }
        TcpExchange::new(0, cfg.world, conns).map_err(|e| err(format!("duplicating a connection: {e}")))
    }

    fn new(rank: usize, world: usize, conns: Vec<TcpStream>) -> std::io::Result<Self> {
        let writers = Arc::new(conns.iter().map(|s| s.try_clone().map(Mutex::new)).collect::<std::io::Result<Vec<_>>>()?);
        let broadcast = Arc::new(Mutex::new(()));
        let notices = Arc::new(Mutex::new(Notices::Early(Vec::new())));
        let stop = Arc::new(AtomicBool::new(false));
        let mut rx = Vec::new();
        for (i, s) in conns.into_iter().enumerate() {
            let (tx, r) = std::sync::mpsc::channel();
            rx.push(r);
            s.set_read_timeout(None)?;
            let peer = peer_of(rank, i);
            let reader = Reader {
                i,
                peer,
                rank,
                world,
                tx,
                writers: writers.clone(),
                broadcast: broadcast.clone(),
                notices: notices.clone(),
                stop: stop.clone(),
            };
            std::thread::Builder::new().name(format!("moe-ep rendezvous {rank}<-{peer}")).spawn(move || reader.run(s))?;
        }
        Ok(TcpExchange { rank, world, inbox: Mutex::new(Inbox { rx, seq: 0 }), writers, broadcast, notices, stop })
    }

    /// The rank at the other end of connection `i`.
    fn peer_of(&self, i: usize) -> usize {
        peer_of(self.rank, i)
    }

    /// Writes one frame on connection `i`.
    fn send(writers: &[Mutex<TcpStream>], i: usize, kind: u8, payload: &[u8]) -> std::io::Result<()> {
        write_frame(&mut writers[i].lock().unwrap_or_else(|p| p.into_inner()), kind, payload)
    }

    /// Rank 0, after an all-gather failed on connection `bad`: every other rank stops waiting
    /// for it, and so does `bad`'s rank when `tell_bad` (it is alive and in another collective,
    /// or sent something malformed; a rank that failed, left or died is not told its own news).
    fn fail_all(&self, bad: usize, tell_bad: bool, msg: &str) {
        let _b = self.broadcast.lock().unwrap_or_else(|p| p.into_inner());
        for i in (0..self.writers.len()).filter(|&i| i != bad || tell_bad) {
            let _ = Self::send(&self.writers, i, kind::FAIL, msg.as_bytes());
        }
    }
}

/// One connection's reader thread: connection `i` (to `peer`) of rank `rank`.
struct Reader {
    i: usize,
    peer: usize,
    rank: usize,
    world: usize,
    tx: std::sync::mpsc::Sender<Inbound>,
    writers: Arc<Vec<Mutex<TcpStream>>>,
    broadcast: Arc<Mutex<()>>,
    notices: Arc<Mutex<Notices>>,
    stop: Arc<AtomicBool>,
}

impl Reader {
    /// Takes frames off the connection until it ends: a failure notice (or the connection
    /// closing) is reported at once, and rank 0 relays it to every other rank; every frame then
    /// goes to the inbox.
    fn run(self, mut s: TcpStream) {
        // One report per connection: the close that follows a notice is not news.
        let mut reported = false;
        loop {
            match read_frame(&mut s) {
                Ok((k, p)) => {
                    if (k == kind::ABORT || k == kind::FAIL) && !std::mem::replace(&mut reported, true) {
                        self.report(if k == kind::ABORT {
                            decode_failure(&p, self.peer, self.world)
                        } else {
                            PeerFailure { rank: self.peer, kind: FailureKind::Error, detail: String::from_utf8_lossy(&p).into_owned() }
                        });
                    }
                    if self.tx.send(Inbound::Frame(k, p)).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    let why = if e.kind() == std::io::ErrorKind::UnexpectedEof { "closed".to_string() } else { format!("failed: {e}") };
                    if !reported {
                        self.report(PeerFailure {
                            rank: self.peer,
                            kind: FailureKind::Gone,
                            detail: format!("its connection to rank {} {why}", self.rank),
                        });
                    }
                    let _ = self.tx.send(Inbound::Closed(why));
                    return;
                }
            }
        }
    }

    fn report(&self, f: PeerFailure) {
        if self.stop.load(Ordering::SeqCst) {
            return;
        }
        if self.rank == 0 {
            let frame = encode_failure(&f);
            let _b = self.broadcast.lock().unwrap_or_else(|p| p.into_inner());
            for j in (0..self.writers.len()).filter(|&j| j != self.i) {
                let _ = TcpExchange::send(&self.writers, j, kind::ABORT, &frame);
            }
        }
        let sink = {
            let mut n = self.notices.lock().unwrap_or_else(|p| p.into_inner());
            match &mut *n {
                Notices::Early(v) => {
                    v.push(f);
                    return;
                }
                Notices::Watching(sink) => sink.clone(),
            }
        };
        sink(f);
    }
}

impl Drop for TcpExchange {
    fn drop(&mut self) {
        // Leaving: the peers stop waiting for this rank (a peer still inside a collective with
        // it would otherwise wait until its deadline), then the reader threads wake and end.
        self.stop.store(true, Ordering::SeqCst);
        let bye = encode_failure(&PeerFailure { rank: self.rank, kind: FailureKind::Left, detail: String::new() });
        for i in 0..self.writers.len() {
            let _ = Self::send(&self.writers, i, kind::ABORT, &bye);
        }
        for w in self.writers.iter() {
            let _ = w.lock().unwrap_or_else(|p| p.into_inner()).shutdown(std::net::Shutdown::Both);
        }
    }
}

fn remaining(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1))
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)
}

impl Exchange for TcpExchange {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn all_gather(&self, data: &[u8], timeout: Duration) -> Result<Vec<Vec<u8>>> {
        self.all_gather_as("all-gather", data, timeout)
    }

    fn all_gather_as(&self, what: &str, data: &[u8], timeout: Duration) -> Result<Vec<Vec<u8>>> {
        let err = |reason: String| Error::Rendezvous { rank: self.rank, world: self.world, reason };
        let deadline = Instant::now() + timeout;
        let mut inbox = self.inbox.lock().unwrap_or_else(|p| p.into_inner());
        inbox.seq += 1;
        let seq = inbox.seq;
        let head = collective_head(seq, what);
        // The next frame of this all-gather from connection `i` (`from` names its rank): frames
        // of an earlier all-gather that failed on this rank are skipped.
        // An error says whether the rank at fault is alive and should be told.
        let next = |inbox: &Inbox, i: usize, from: &str, want: u8| -> std::result::Result<Vec<u8>, (String, bool)> {
            loop {
                let frame = match inbox.rx[i].recv_timeout(remaining(deadline)) {
                    Ok(Inbound::Frame(k, p)) if k == want => p,
                    Ok(Inbound::Frame(kind::ABORT, p)) => return Err((decode_failure(&p, self.peer_of(i), self.world).to_string(), false)),
                    Ok(Inbound::Frame(kind::FAIL, m)) => return Err((String::from_utf8_lossy(&m).into_owned(), false)),
                    Ok(Inbound::Frame(k, _)) => return Err((format!("{from} sent frame kind {k} during an all-gather"), true)),
                    Ok(Inbound::Closed(why)) => return Err((format!("the connection to {from} {why}"), false)),
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                        let late = if self.rank == 0 {
                            format!("{from} did not reach all-gather #{seq} ({what}) within {timeout:?}")
                        } else {
                            format!("no reply to all-gather #{seq} ({what}) from rank 0 within {timeout:?} (some rank did not arrive)")
                        };
                        return Err((late, true));
                    }
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return Err((format!("the connection to {from} is gone"), false)),
                };
                match split_collective(&frame) {
                    Some((s, name, body)) if s == seq && name == wire_name(what) => return Ok(body.to_vec()),
                    Some((s, _, _)) if s < seq => continue,
                    Some((s, name, _)) => {
                        let msg = format!(
                            "{from} is in all-gather #{s} ({name}) while rank {} is in #{seq} ({what}): the ranks run different collectives",
                            self.rank
                        );
                        return Err((msg, true));
                    }
                    None => return Err((format!("{from} sent a malformed all-gather frame"), true)),
                }
            }
        };
        if self.rank == 0 {
            let mut items = vec![data.to_vec()];
            for i in 0..inbox.rx.len() {
                match next(&inbox, i, &format!("rank {}", i + 1), kind::DATA) {
                    Ok(p) => items.push(p),
                    Err((failed, alive)) => {
                        // The other ranks would wait for a reply until their deadline.
                        self.fail_all(i, alive, &failed);
                        return Err(err(failed));
                    }
                }
            }
            let mut all = head;
            all.extend_from_slice(&encode_list(&items));
            let _b = self.broadcast.lock().unwrap_or_else(|p| p.into_inner());
            for i in 0..self.writers.len() {
                Self::send(&self.writers, i, kind::ALL, &all).map_err(|e| err(format!("sending to rank {}: {e}", i + 1)))?;
            }
            Ok(items)
        } else {
            let mut frame = head;
            frame.extend_from_slice(data);
            Self::send(&self.writers, 0, kind::DATA, &frame).map_err(|e| err(format!("sending to rank 0: {e}")))?;
            let p = next(&inbox, 0, "rank 0", kind::ALL).map_err(|(m, _)| err(m))?;
            let items = decode_list(&p).ok_or_else(|| err("rank 0 sent a malformed all-gather reply".into()))?;
            if items.len() != self.world {
                return Err(err(format!("all-gather reply has {} entries for {} ranks", items.len(), self.world)));
            }
            Ok(items)
        }
    }

    fn watch(&self, sink: FailureSink) {
        // From now on every notice goes to the sink; those that came earlier go now.
        let early = {
            let mut n = self.notices.lock().unwrap_or_else(|p| p.into_inner());
            match std::mem::replace(&mut *n, Notices::Watching(sink.clone())) {
                Notices::Early(v) => v,
                Notices::Watching(_) => Vec::new(),
            }
        };
        for f in early {
            sink(f);
        }
    }

    fn announce(&self, failure: &PeerFailure) {
        let frame = encode_failure(failure);
        let _b = self.broadcast.lock().unwrap_or_else(|p| p.into_inner());
        for i in 0..self.writers.len() {
            let _ = Self::send(&self.writers, i, kind::ABORT, &frame);
        }
    }
}

// ---------------------------------------------------------------------------------------
// In-process
// ---------------------------------------------------------------------------------------

struct LocalState {
    generation: u64,
    data: Vec<Option<(String, Vec<u8>)>>,
    result: Arc<std::result::Result<Vec<Vec<u8>>, String>>,
    /// Each rank's failure sink, once it watches.
    sinks: Vec<Option<FailureSink>>,
}

/// Rendezvous among threads of one process (one per GPU).
pub struct LocalExchange {
    rank: usize,
    world: usize,
    shared: Arc<(Mutex<LocalState>, Condvar)>,
}

impl LocalExchange {
    /// One exchange per rank, all connected.
    pub fn group(world: usize) -> Vec<LocalExchange> {
        let shared = Arc::new((
            Mutex::new(LocalState { generation: 0, data: vec![None; world], result: Arc::new(Ok(Vec::new())), sinks: vec![None; world] }),
            Condvar::new(),
        ));
        (0..world).map(|rank| LocalExchange { rank, world, shared: shared.clone() }).collect()
    }
}

impl Exchange for LocalExchange {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn all_gather(&self, data: &[u8], timeout: Duration) -> Result<Vec<Vec<u8>>> {
        self.all_gather_as("all-gather", data, timeout)
    }

    fn all_gather_as(&self, what: &str, data: &[u8], timeout: Duration) -> Result<Vec<Vec<u8>>> {
        let (lock, cv) = &*self.shared;
        let mut st = lock.lock().unwrap_or_else(|p| p.into_inner());
        let generation = st.generation;
        st.data[self.rank] = Some((what.to_string(), data.to_vec()));
        let done = |st: &LocalState| match &*st.result {
            Ok(items) => Ok(items.clone()),
            Err(reason) => Err(Error::Rendezvous { rank: self.rank, world: self.world, reason: reason.clone() }),
        };
        if st.data.iter().all(|d| d.is_some()) {
            let entries: Vec<(String, Vec<u8>)> = st.data.iter_mut().map(|d| d.take().unwrap()).collect();
            st.result = Arc::new(match entries.iter().position(|(name, _)| *name != entries[0].0) {
                None => Ok(entries.into_iter().map(|(_, d)| d).collect()),
                Some(r) => Err(format!("rank 0 is in {}, rank {r} in {}: the ranks run different collectives", entries[0].0, entries[r].0)),
            });
            st.generation += 1;
            cv.notify_all();
            return done(&st);
        }
        let deadline = Instant::now() + timeout;
        while st.generation == generation {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                // This rank's contribution stays: the others that did arrive are not named.
                let missing: Vec<usize> = st.data.iter().enumerate().filter(|(_, d)| d.is_none()).map(|(r, _)| r).collect();
                return Err(Error::Rendezvous {
                    rank: self.rank,
                    world: self.world,
                    reason: format!("rank(s) {missing:?} did not arrive within {timeout:?}"),
                });
            }
            st = cv.wait_timeout(st, left).unwrap_or_else(|p| p.into_inner()).0;
        }
        done(&st)
    }

    fn watch(&self, sink: FailureSink) {
        self.shared.0.lock().unwrap_or_else(|p| p.into_inner()).sinks[self.rank] = Some(sink);
    }

    fn announce(&self, failure: &PeerFailure) {
        // Called outside the lock: a sink takes its own.
        let sinks: Vec<FailureSink> = {
            let st = self.shared.0.lock().unwrap_or_else(|p| p.into_inner());
            st.sinks.iter().enumerate().filter(|(r, _)| *r != self.rank).filter_map(|(_, s)| s.clone()).collect()
        };
        for s in sinks {
            s(failure.clone());
        }
    }
}

impl Drop for LocalExchange {
    fn drop(&mut self) {
        // Leaving: the other ranks stop waiting for this one.
        self.announce(&PeerFailure { rank: self.rank, kind: FailureKind::Left, detail: String::new() });
        self.shared.0.lock().unwrap_or_else(|p| p.into_inner()).sinks[self.rank] = None;
    }
}
