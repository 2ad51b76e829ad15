//! Rendezvous: how ranks find each other and exchange small blobs (IPC handles, device ids,
//! NCCL ids) before any GPU memory is shared.
//!
//! Two transports behind one trait: [`TcpExchange`] for one process per GPU (rank 0 listens,
//! the others connect; torchrun's environment variables configure it, see [`ProcessConfig`]),
//! and [`LocalExchange`] for one process driving several GPUs from threads. Every call has a
//! deadline and fails with an error naming the ranks that did not show up; malformed input on
//! the socket is an error, never a panic.

use crate::error::{Error, Result};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// All-gather of byte blobs among the ranks of a group (also a host barrier).
pub trait Exchange: Send + Sync {
    /// This rank.
    fn rank(&self) -> usize;
    /// Ranks in the group.
    fn world(&self) -> usize;
    /// Every rank contributes `data`; every rank gets all contributions, by rank.
    fn all_gather(&self, data: &[u8], timeout: Duration) -> Result<Vec<Vec<u8>>>;
    /// Waits until every rank has called it.
    fn barrier(&self, timeout: Duration) -> Result<()> {
        self.all_gather(&[], timeout).map(|_| ())
    }
}

// ---------------------------------------------------------------------------------------
// Configuration from the environment
// ---------------------------------------------------------------------------------------

/// How a process joins a group: its rank, the group size, its GPU and rank 0's address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcessConfig {
    pub rank: usize,
    pub world: usize,
    /// CUDA device ordinal of this rank.
    pub device: usize,
    /// Where rank 0 listens.
    pub master_addr: String,
    pub master_port: u16,
}

impl ProcessConfig {
    /// Reads torchrun's variables (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`,
    /// `MASTER_PORT`); `MOE_EP_RANK`, `MOE_EP_WORLD_SIZE`, `MOE_EP_LOCAL_RANK`,
    /// `MOE_EP_MASTER_ADDR` and `MOE_EP_MASTER_PORT` take precedence. `LOCAL_RANK` (the device)
    /// defaults to `RANK`, `MASTER_ADDR` to 127.0.0.1.
    pub fn from_env() -> Result<Self> {
        Self::from_lookup(|k| std::env::var(k).ok())
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
        let (n, v) = var("MOE_EP_MASTER_PORT", "MASTER_PORT")
            .ok_or_else(|| Error::invalid("MASTER_PORT", "neither MOE_EP_MASTER_PORT nor MASTER_PORT is set"))?;
        let master_port: u16 = parse(n, &v)?;
        let c = ProcessConfig { rank, world, device, master_addr, master_port };
        c.validate()?;
        Ok(c)
    }

    /// Checks rank < world and world in 1..=MAX_RANKS.
    pub fn validate(&self) -> Result<()> {
        let max = moe_ep_kernels::abi::MAX_RANKS;
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
const VERSION: u16 = 1;
/// Largest blob a frame may carry (guards allocations against garbage lengths).
const MAX_FRAME: usize = 16 << 20;

mod kind {
    pub const HELLO: u8 = 1;
    pub const WELCOME: u8 = 2;
    pub const DATA: u8 = 3;
    pub const ALL: u8 = 4;
    pub const FAIL: u8 = 5;
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
    if len > MAX_FRAME {
        return Err(bad(format!("frame of {len} bytes exceeds the {MAX_FRAME}-byte limit")));
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
    if count > moe_ep_kernels::abi::MAX_RANKS {
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
pub struct TcpExchange {
    rank: usize,
    world: usize,
    /// Rank 0: connections to ranks 1.. (index r - 1). Others: the connection to rank 0.
    conns: Mutex<Vec<TcpStream>>,
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
            Self::accept_all(cfg, listener, deadline, timeout)
        } else {
            let mut last;
            let mut stream = loop {
                match TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
                    Ok(s) => break s,
                    Err(e) => last = e.to_string(),
                }
                if Instant::now() >= deadline {
                    return Err(err(format!("could not reach rank 0 at {addr} within {timeout:?}: {last}")));
                }
                std::thread::sleep(Duration::from_millis(20));
            };
            let _ = stream.set_nodelay(true);
            let mut hello = Vec::new();
            hello.extend_from_slice(&(cfg.rank as u32).to_le_bytes());
            hello.extend_from_slice(&(cfg.world as u32).to_le_bytes());
            write_frame(&mut stream, kind::HELLO, &hello).map_err(|e| err(format!("sending hello to rank 0 at {addr}: {e}")))?;
            stream.set_read_timeout(Some(remaining(deadline))).ok();
            match read_frame(&mut stream) {
                Ok((kind::WELCOME, _)) => {}
                Ok((kind::FAIL, msg)) => return Err(err(String::from_utf8_lossy(&msg).into_owned())),
                Ok((k, _)) => return Err(err(format!("rank 0 answered the hello with frame kind {k}"))),
                Err(e) if is_timeout(&e) => {
                    return Err(err(format!("rank 0 at {addr} did not complete the rendezvous within {timeout:?} (some rank is missing)")));
                }
                Err(e) => return Err(err(format!("waiting for rank 0 at {addr}: {e}"))),
            }
            Ok(TcpExchange { rank: cfg.rank, world: cfg.world, conns: Mutex::new(vec![stream]) })
        }
    }

    fn accept_all(cfg: &ProcessConfig, listener: TcpListener, deadline: Instant, timeout: Duration) -> Result<Self> {
        let err = |reason: String| Error::Rendezvous { rank: 0, world: cfg.world, reason };
        listener.set_nonblocking(true).map_err(|e| err(e.to_string()))?;
        let mut slots: Vec<Option<(TcpStream, SocketAddr)>> = (1..cfg.world).map(|_| None).collect();
        let mut rejected: Vec<String> = Vec::new();
        let fail_all = |slots: &mut Vec<Option<(TcpStream, SocketAddr)>>, msg: &str| {
            for (s, _) in slots.iter_mut().flatten() {
                let _ = write_frame(s, kind::FAIL, msg.as_bytes());
            }
        };
        while slots.iter().any(|s| s.is_none()) {
            if Instant::now() >= deadline {
                let missing: Vec<usize> = slots.iter().enumerate().filter(|(_, s)| s.is_none()).map(|(i, _)| i + 1).collect();
                let mut msg = format!("rank(s) {missing:?} of {} did not join within {timeout:?}", cfg.world);
                if !rejected.is_empty() {
                    msg += &format!("; rejected connections: {}", rejected.join("; "));
                }
                fail_all(&mut slots, &msg);
                return Err(err(msg));
            }
            let (mut s, peer) = match listener.accept() {
                Ok(x) => x,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                }
                Err(e) => return Err(err(format!("accept: {e}"))),
            };
            s.set_nonblocking(false).ok();
            s.set_nodelay(true).ok();
            s.set_read_timeout(Some(remaining(deadline).min(Duration::from_secs(2)))).ok();
            let hello = match read_frame(&mut s) {
                Ok((kind::HELLO, p)) if p.len() == 8 => p,
                Ok((k, p)) => {
                    rejected.push(format!("{peer}: frame kind {k} of {} bytes instead of a hello", p.len()));
                    continue;
                }
                Err(e) => {
                    rejected.push(format!("{peer}: {e}"));
                    continue;
                }
            };
            let r = u32::from_le_bytes(hello[0..4].try_into().unwrap()) as usize;
            let w = u32::from_le_bytes(hello[4..8].try_into().unwrap()) as usize;
            let fatal = if w != cfg.world {
                Some(format!("rank {r} (from {peer}) says the world size is {w}, rank 0 says {}", cfg.world))
            } else if r == 0 || r >= cfg.world {
                Some(format!("a process at {peer} claims rank {r}, outside 1..{}", cfg.world))
            } else if let Some((_, first)) = &slots[r - 1] {
                Some(format!("rank {r} joined twice (from {first} and from {peer})"))
            } else {
                None
            };
            if let Some(msg) = fatal {
                let _ = write_frame(&mut s, kind::FAIL, msg.as_bytes());
                fail_all(&mut slots, &msg);
                return Err(err(msg));
            }
            slots[r - 1] = Some((s, peer));
        }
        let mut conns = Vec::new();
        for (mut s, peer) in slots.into_iter().flatten() {
            write_frame(&mut s, kind::WELCOME, &[]).map_err(|e| err(format!("welcoming {peer}: {e}")))?;
            conns.push(s);
        }
        Ok(TcpExchange { rank: 0, world: cfg.world, conns: Mutex::new(conns) })
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
        let err = |reason: String| Error::Rendezvous { rank: self.rank, world: self.world, reason };
        let deadline = Instant::now() + timeout;
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        if self.rank == 0 {
            let mut items = vec![data.to_vec()];
            for (i, s) in conns.iter_mut().enumerate() {
                let r = i + 1;
                s.set_read_timeout(Some(remaining(deadline))).ok();
                match read_frame(s) {
                    Ok((kind::DATA, p)) => items.push(p),
                    Ok((k, _)) => return Err(err(format!("rank {r} sent frame kind {k} during an all-gather"))),
                    Err(e) if is_timeout(&e) => return Err(err(format!("rank {r} did not reach the all-gather within {timeout:?}"))),
                    Err(e) => return Err(err(format!("reading from rank {r}: {e}"))),
                }
            }
            let all = encode_list(&items);
            for (i, s) in conns.iter_mut().enumerate() {
                write_frame(s, kind::ALL, &all).map_err(|e| err(format!("sending to rank {}: {e}", i + 1)))?;
            }
            Ok(items)
        } else {
            let s = &mut conns[0];
            write_frame(s, kind::DATA, data).map_err(|e| err(format!("sending to rank 0: {e}")))?;
            s.set_read_timeout(Some(remaining(deadline))).ok();
            match read_frame(s) {
                Ok((kind::ALL, p)) => {
                    let items = decode_list(&p).ok_or_else(|| err("rank 0 sent a malformed all-gather reply".into()))?;
                    if items.len() != self.world {
                        return Err(err(format!("all-gather reply has {} entries for {} ranks", items.len(), self.world)));
                    }
                    Ok(items)
                }
                Ok((kind::FAIL, m)) => Err(err(String::from_utf8_lossy(&m).into_owned())),
                Ok((k, _)) => Err(err(format!("rank 0 sent frame kind {k} during an all-gather"))),
                Err(e) if is_timeout(&e) => Err(err(format!("no all-gather reply from rank 0 within {timeout:?} (some rank did not arrive)"))),
                Err(e) => Err(err(format!("reading from rank 0: {e}"))),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// In-process
// ---------------------------------------------------------------------------------------

struct LocalState {
    generation: u64,
    data: Vec<Option<Vec<u8>>>,
    result: Arc<Vec<Vec<u8>>>,
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
        let shared = Arc::new((Mutex::new(LocalState { generation: 0, data: vec![None; world], result: Arc::new(Vec::new()) }), Condvar::new()));
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
        let (lock, cv) = &*self.shared;
        let mut st = lock.lock().unwrap_or_else(|p| p.into_inner());
        let generation = st.generation;
        st.data[self.rank] = Some(data.to_vec());
        if st.data.iter().all(|d| d.is_some()) {
            let items: Vec<Vec<u8>> = st.data.iter_mut().map(|d| d.take().unwrap()).collect();
            st.result = Arc::new(items);
            st.generation += 1;
            cv.notify_all();
            return Ok((*st.result).clone());
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
        Ok((*st.result).clone())
    }
}
