//! Where this rank's own GPU work stands: one event per stream the rank launched on,
//! re-recorded after every launch. Waiting for them, with a deadline, is how the library waits
//! for its kernels ([`crate::Group::check`], a buffer's `destroy`) without synchronising the
//! whole context, which would also wait for torch's and NCCL's streams, possibly forever.

use crate::error::{DriverContext, Error, Result};
use cudarc::driver::{CudaContext, CudaEvent, CudaStream, sys};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Streams tracked before completed marks are dropped from the table.
const PRUNE_AT: usize = 32;

/// The last launch of this rank on each stream it used.
pub(crate) struct OwnWork {
    ctx: Arc<CudaContext>,
    /// (raw stream handle, event recorded after the stream's latest launch of this rank).
    marks: Mutex<Vec<(usize, CudaEvent)>>,
}

impl OwnWork {
    pub(crate) fn new(ctx: &Arc<CudaContext>) -> Self {
        OwnWork { ctx: ctx.clone(), marks: Mutex::new(Vec::new()) }
    }

    /// Records the end of the work just queued on `stream`. Nothing is recorded while `stream`
    /// is being captured into a CUDA graph (the graph's replays are the caller's to wait for).
    pub(crate) fn mark(&self, stream: &CudaStream) -> Result<()> {
        let capturing = stream.capture_status().during("cuStreamIsCapturing", || "marking a launch".into())?;
        if capturing != sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE {
            return Ok(());
        }
        let key = stream.cu_stream() as usize;
        let mut marks = self.marks.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, ev)) = marks.iter().find(|(k, _)| *k == key) {
            return ev.record(stream).during("cuEventRecord", || "marking a launch".into());
        }
        if marks.len() >= PRUNE_AT {
            // A stream whose latest work is done needs no mark; a stream that is gone (its
            // handle may be reused) left only finished work behind.
            marks.retain(|(_, ev)| !ev.is_complete());
        }
        let ev = self.ctx.new_event(None).during("cuEventCreate", || "marking a launch".into())?;
        ev.record(stream).during("cuEventRecord", || "marking a launch".into())?;
        marks.push((key, ev));
        Ok(())
    }

    /// True when every kernel this rank launched so far has finished (no waiting; a failed
    /// query counts as not finished).
    pub(crate) fn is_idle(&self) -> bool {
        self.marks.lock().unwrap_or_else(|e| e.into_inner()).iter().all(|(_, ev)| ev.try_is_complete().unwrap_or(false))
    }

    /// Waits until every kernel this rank launched so far has finished, or `deadline`: the
    /// events are polled (no blocking driver call), so other streams of the context (torch's,
    /// NCCL's) are never waited for. `what` names the wait in the error.
    pub(crate) fn wait(&self, rank: usize, what: &str, timeout: Duration) -> Result<()> {
        let t0 = Instant::now();
        let mut spins = 0u32;
        loop {
            let pending = {
                let marks = self.marks.lock().unwrap_or_else(|e| e.into_inner());
                let mut pending = 0;
                for (_, ev) in marks.iter() {
                    if !ev.try_is_complete().during("cuEventQuery", || format!("rank {rank} {what}"))? {
                        pending += 1;
                    }
                }
                pending
            };
            if pending == 0 {
                return Ok(());
            }
            if t0.elapsed() > timeout {
                return Err(Error::HostWaitTimeout {
                    rank,
                    what: what.to_string(),
                    waited: t0.elapsed(),
                    reason: format!(
                        "{pending} of its streams still had its work queued or running (work queued ahead of it on those streams, e.g. a peer's hung collective, keeps it from starting)"
                    ),
                });
            }
            spins += 1;
            if spins < 64 {
                std::hint::spin_loop();
            } else {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
    }
}

/// The stream of a buffer's latest launch. The kernels' flags and counters assume that a
/// buffer's launches run in the order they were made; a launch on another stream than the
/// previous one therefore first waits for the previous stream's mark (the event [`OwnWork`]
/// re-records after every launch there: one wait, only when the stream changes). Only the raw
/// handle is kept, never the stream: a caller's stream may be gone by the next call, and then
/// its mark is either complete (pruned or not, nothing to wait for) or still owned by `OwnWork`.
/// A stream being captured into a CUDA graph is neither joined nor remembered: a graph's
/// launches are ordered by the stream it replays on, and the next eager launch still follows
/// the last eager one. Once a launch on a new stream has waited, that stream's mark is recorded
/// at once, so the chain holds even when the launch itself is then refused.
#[derive(Default)]
pub(crate) struct StreamChain {
    /// The raw handle of the stream of the buffer's latest eager launch (`None` before the
    /// first; 0 is a real stream, the legacy default one).
    last: Mutex<Option<usize>>,
}

impl StreamChain {
    /// Orders the next launch on `stream` after every earlier eager launch of the buffer.
    pub(crate) fn follow(&self, work: &OwnWork, stream: &CudaStream) -> Result<()> {
        let key = stream.cu_stream() as usize;
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if *last == Some(key) {
            return Ok(());
        }
        let capturing = stream.capture_status().during("cuStreamIsCapturing", || "ordering a buffer's launches".into())?;
        if capturing != sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE {
            return Ok(());
        }
        if let Some(prev) = *last {
            let marks = work.marks.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((_, ev)) = marks.iter().find(|(k, _)| *k == prev) {
                stream.wait(ev).during("cuStreamWaitEvent", || "ordering a launch after the buffer's previous stream".into())?;
            }
        }
        // (The marks' lock is released: `mark` takes it.)
        work.mark(stream)?;
        *last = Some(key);
        Ok(())
    }
}
