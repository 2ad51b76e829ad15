//! Fast failure: how a rank learns within milliseconds, not at the wait deadline, that a peer
//! died, failed or aborted.
//!
//! Each rank has a few words of host-mapped memory ([`host_flag`]). Every GPU spin-wait
//! polls its `ABORT` word along with its deadline; when it is raised, the wait reports
//! [`Error::PeerFailed`] naming the culprit and its kernel ends. Three things raise it:
//!
//! - the exchange's watch on its peers ([`crate::rendezvous::Exchange::watch`]): over TCP, a
//!   peer's connection closing (its process died) or a failure it announced; in one process,
//!   another rank's announcement;
//! - [`Group::abort`](crate::Group::abort) on any rank (announced to every peer);
//! - a failure of this rank that the host learned (announced to every peer), or one its
//!   kernels reported without the host looking yet: the watchdog thread reads the `REPORTED`
//!   word and the copy of the error record the device mirrors its first error into, and
//!   announces it with its details.
//!
//! From then on the group is failed ([`Error::GroupFailed`]), on this rank too: every launch
//! first looks at the failure and at the `REPORTED` word (a read of host memory), so a rank
//! whose kernels reported an error launches nothing more, whether or not anyone read the
//! record.

use crate::driver::MappedHost;
use crate::error::{Error, Result};
use crate::rendezvous::Exchange;
use cudarc::driver::CudaContext;
use moe_ep_kernels::abi::{ErrorRecord, abort_reason, host_flag, status};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// How often the watchdog thread looks at the device's `REPORTED` word.
const POLL: Duration = Duration::from_millis(5);

/// What happened to a rank, as the exchange passes it between ranks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerFailure {
    /// The rank that failed.
    pub rank: usize,
    /// How.
    pub kind: FailureKind,
    /// Its own words (an error message), or what the observer saw.
    pub detail: String,
}

/// How a rank failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureKind {
    /// Its process ended without leaving the group (its connection closed).
    Gone,
    /// Its kernels or its host reported an error.
    Error,
    /// It called [`Group::abort`](crate::Group::abort).
    Aborted,
    /// It dropped its group.
    Left,
}

impl FailureKind {
    /// Wire and device code ([`abort_reason`]).
    pub(crate) fn code(self) -> u32 {
        match self {
            FailureKind::Gone => abort_reason::PEER_GONE,
            FailureKind::Error => abort_reason::PEER_ERROR,
            FailureKind::Aborted => abort_reason::USER,
            FailureKind::Left => abort_reason::PEER_LEFT,
        }
    }

    pub(crate) fn from_code(c: u32) -> Option<Self> {
        match c {
            abort_reason::PEER_GONE => Some(FailureKind::Gone),
            abort_reason::PEER_ERROR => Some(FailureKind::Error),
            abort_reason::USER => Some(FailureKind::Aborted),
            abort_reason::PEER_LEFT => Some(FailureKind::Left),
            _ => None,
        }
    }
}

impl std::fmt::Display for PeerFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let r = self.rank;
        match self.kind {
            FailureKind::Gone => write!(f, "rank {r}'s process ended without leaving the group ({})", self.detail),
            FailureKind::Error => write!(f, "rank {r} failed: {}", self.detail),
            FailureKind::Aborted => write!(f, "rank {r} called Group::abort: {}", self.detail),
            FailureKind::Left => write!(f, "rank {r} dropped its group"),
        }
    }
}

/// Where an exchange delivers the failures it observes (called from its own threads).
pub type FailureSink = Arc<dyn Fn(PeerFailure) + Send + Sync>;

/// A rank's failure state, shared by its group, its watchdog thread and its exchange's sink.
pub(crate) struct Health {
    rank: usize,
    /// The host-mapped flags every wait polls ([`host_flag`]).
    flags: MappedHost,
    /// The first failure: every later launch is refused with it.
    failure: Mutex<Option<String>>,
    /// What raised the abort flag, for the `PeerFailed` errors the waits then report.
    abort_cause: Mutex<Option<String>>,
    /// This rank's own failure was announced to the peers.
    announced: AtomicBool,
    /// `failure` was taken from the `REPORTED` word and its record copy, before the host read
    /// the device's own record.
    from_report: AtomicBool,
}

impl Health {
    pub(crate) fn new(ctx: &Arc<CudaContext>, rank: usize) -> Result<Arc<Self>> {
        Ok(Arc::new(Health {
            rank,
            flags: MappedHost::new(ctx, host_flag::WORDS)?,
            failure: Mutex::new(None),
            abort_cause: Mutex::new(None),
            announced: AtomicBool::new(false),
            from_report: AtomicBool::new(false),
        }))
    }

    /// Device address of the flags (for `WaitCtx::host`).
    pub(crate) fn device_ptr(&self) -> u64 {
        self.flags.device_ptr()
    }

    /// Records the first failure; true when this was it. A cause taken from the `REPORTED`
    /// word's record copy gives way to this rank's own error once the host has read it (`own`,
    /// the same error as the host reports it, peer names explained), never to a peer's news.
    pub(crate) fn fail(&self, cause: String, own: bool) -> bool {
        let mut f = self.failure.lock().unwrap_or_else(|p| p.into_inner());
        if f.is_none() || (own && self.from_report.swap(false, Ordering::SeqCst)) {
            *f = Some(cause);
            true
        } else {
            false
        }
    }

    /// The first failure, counting an error this rank's kernels reported that the host has not
    /// read yet: the device mirrors its first error's status into the host-mapped `REPORTED`
    /// word, so this is a plain memory read (no copy, no synchronisation) and the group fails
    /// as soon as a kernel has reported, before anyone looked at the record.
    pub(crate) fn failure(&self) -> Option<String> {
        let mut f = self.failure.lock().unwrap_or_else(|p| p.into_inner());
        if f.is_none() {
            let code = self.flags.read(host_flag::REPORTED);
            if code != status::OK {
                self.from_report.store(true, Ordering::SeqCst);
                *f = Some(match code {
                    status::ABORTED => self.abort_cause().unwrap_or_else(|| format!("rank {}'s kernels stopped on an abort", self.rank)),
                    c => self.reported_error(c),
                });
            }
        }
        f.clone()
    }

    /// This rank's first device error (status `code`, read from `REPORTED`), from the copy of
    /// its record the device wrote to the host-mapped flags before publishing `code`.
    fn reported_error(&self, code: u32) -> String {
        let mut words = [0u32; host_flag::WORDS - host_flag::RECORD];
        for (i, w) in words.iter_mut().enumerate() {
            *w = self.flags.read(host_flag::RECORD + i);
        }
        let mut rec: ErrorRecord = bytemuck::cast(words);
        rec.status = code;
        match Error::from_record(&rec) {
            Some(e) => e.to_string(),
            None => format!("rank {} failed: its kernels reported {}", self.rank, status_name(code)),
        }
    }

    /// Stops every wait of this rank, now and later, naming `f` (the first cause is kept).
    pub(crate) fn raise(&self, f: &PeerFailure) {
        let text = f.to_string();
        {
            let mut c = self.abort_cause.lock().unwrap_or_else(|p| p.into_inner());
            if c.is_some() {
                return;
            }
            *c = Some(text.clone());
        }
        self.fail(text, false);
        self.flags.write(host_flag::CULPRIT, f.rank as u32);
        // The culprit is visible before the flag that makes the device read it.
        std::sync::atomic::fence(Ordering::SeqCst);
        self.flags.write(host_flag::ABORT, f.kind.code());
    }

    /// What raised the abort flag, if anything did.
    pub(crate) fn abort_cause(&self) -> Option<String> {
        self.abort_cause.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Tells the peers (once) of an error this rank's kernels reported, if they did (an abort
    /// the host raised is the peers' news, not this rank's). This rank's own group is failed
    /// too: its later launches are refused.
    pub(crate) fn announce_reported(&self, exchange: &dyn Exchange) {
        let code = self.flags.read(host_flag::REPORTED);
        if code != status::OK && code != status::ABORTED && !self.announced.load(Ordering::SeqCst) {
            let _ = self.failure();
            self.announce(exchange, FailureKind::Error, self.reported_error(code));
        }
    }

    /// Tells the peers (once) that this rank failed.
    pub(crate) fn announce(&self, exchange: &dyn Exchange, kind: FailureKind, detail: String) {
        if !self.announced.swap(true, Ordering::SeqCst) {
            exchange.announce(&PeerFailure { rank: self.rank, kind, detail });
        }
    }
}

/// The sink a group gives its exchange: raises the abort flag.
pub(crate) fn sink(health: &Arc<Health>) -> FailureSink {
    let h = health.clone();
    Arc::new(move |f: PeerFailure| h.raise(&f))
}

/// The watchdog thread of one group: passes on an error this rank's kernels reported before
/// the host looked. Stops (and is joined) on drop, after a last look: an error reported just
/// before the group is dropped still reaches the peers, ahead of the exchange's goodbye.
pub(crate) struct Watchdog {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    health: Arc<Health>,
    exchange: Arc<dyn Exchange>,
}

impl Watchdog {
    pub(crate) fn start(health: Arc<Health>, exchange: Arc<dyn Exchange>) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let (s, h, x) = (stop.clone(), health.clone(), exchange.clone());
        let thread = std::thread::Builder::new()
            .name(format!("moe-ep watchdog {}", health.rank))
            .spawn(move || {
                while !s.load(Ordering::Relaxed) {
                    h.announce_reported(&*x);
                    std::thread::sleep(POLL);
                }
            })
            .map_err(|e| Error::Internal { reason: format!("cannot start the watchdog thread: {e}") })?;
        Ok(Watchdog { stop, thread: Some(thread), health, exchange })
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.health.announce_reported(&*self.exchange);
    }
}

/// A device status code in words.
pub(crate) fn status_name(code: u32) -> &'static str {
    match code {
        status::TIMEOUT => "a timeout",
        status::CAPACITY => "a receive buffer overflow",
        status::BAD_EXPERT => "an expert id outside the model",
        status::SHORT_INPUT => "an input shorter than the rows received",
        status::ABORTED => "an abort",
        status::BAD_INDEX => "an index out of range in received data",
        _ => "an unknown error code",
    }
}

/// Text for an [`status::ABORTED`] record when the host has no better one.
pub(crate) fn reason_text(culprit: usize, code: u64) -> String {
    match FailureKind::from_code(code as u32) {
        Some(kind) => PeerFailure { rank: culprit, kind, detail: "no details".into() }.to_string(),
        None => format!("rank {culprit} failed (abort reason {code})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_texts_name_the_rank() {
        for k in [FailureKind::Gone, FailureKind::Error, FailureKind::Aborted, FailureKind::Left] {
            assert_eq!(FailureKind::from_code(k.code()), Some(k));
            let t = PeerFailure { rank: 3, kind: k, detail: "why".into() }.to_string();
            assert!(t.starts_with("rank 3"), "{t}");
        }
        assert_eq!(FailureKind::from_code(0), None);
        assert!(reason_text(2, 99).contains("rank 2"));
    }
}
