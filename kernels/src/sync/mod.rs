//! Typed cross-GPU synchronisation: deadline-bounded waits and the cross-rank barrier.
//!
//! Every spin-wait here has a deadline from `%globaltimer`. On timeout the waiting thread
//! reports what it waited for (rank, phase, peer, expected and seen values) into the rank's
//! [`ErrorRecord`](crate::abi::ErrorRecord) and returns `false`; later waits of the same
//! rank see the record and give up at once, so the kernel ends and the host turns the record
//! into an error. Nothing traps: a trap would poison the CUDA context.
//!
//! | flag | written by | with | read by | with |
//! | --- | --- | --- | --- | --- |
//! | barrier slot `s` | rank `s` | `fence.acq_rel.sys` + `st.release.sys` | owner | `ld.acquire.sys` |
//! | arrival counter | every block of every sender | `fence.acq_rel.sys` once + `red.relaxed.sys.add` per rank | receiver | `ld.acquire.sys` |
//! | error record | first failing thread | `atom.cas.sys` claim, `st.release.sys` status | host, other waiters | memcpy after sync, `ld.relaxed.sys` |
//! | host flags' record copy, then `REPORTED` | first failing thread | `st.relaxed.sys` fields, then `st.release.sys` | host watchdog | volatile read of `REPORTED`, acquire fence, then the fields |

mod barrier;
mod wait;

pub use barrier::*;
pub use wait::*;
