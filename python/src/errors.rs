//! The exception hierarchy and how the library's errors become exceptions.

use moe_ep::Error;
use pyo3::create_exception;
use pyo3::prelude::*;

create_exception!(
    _moe_ep,
    MoeEpError,
    pyo3::exceptions::PyRuntimeError,
    "Every moe-ep error: `kind`, and where known `argument`, `rank`, `phase`, `peer`."
);
create_exception!(
    _moe_ep,
    InvalidArgument,
    MoeEpError,
    "An argument is out of range or a tensor has the wrong dtype, device, shape or layout; nothing was launched."
);
create_exception!(_moe_ep, NoDevice, MoeEpError, "No usable CUDA driver or GPU.");
create_exception!(_moe_ep, Timeout, MoeEpError, "A GPU wait passed its deadline (`rank` waited for `peer` in `phase`).");
create_exception!(_moe_ep, PeerFailed, MoeEpError, "A GPU wait stopped because rank `peer` failed; the group is failed.");
create_exception!(_moe_ep, GroupFailed, MoeEpError, "An earlier error failed the group; build a new one.");

/// The library's error as a Python exception with its fields as attributes.
pub(crate) fn py_err(e: Error) -> PyErr {
    let msg = e.to_string();
    let kind = format!("{e:?}").split([' ', '{', '(']).next().unwrap_or("").to_string();
    let (err, argument, rank, phase, peer): (PyErr, Option<&str>, Option<usize>, Option<&str>, Option<usize>) = match &e {
        Error::InvalidArgument { name, .. } => (InvalidArgument::new_err(msg), Some(name), None, None, None),
        Error::NoDevice { .. } => (NoDevice::new_err(msg), None, None, None, None),
        Error::Timeout { rank, phase, peer, .. } => (Timeout::new_err(msg), None, Some(*rank), Some(phase), Some(*peer)),
        Error::PeerFailed { rank, phase, peer, .. } => (PeerFailed::new_err(msg), None, Some(*rank), Some(phase), Some(*peer)),
        Error::GroupFailed { .. } => (GroupFailed::new_err(msg), None, None, None, None),
        Error::HostWaitTimeout { rank, .. } => (Timeout::new_err(msg), None, Some(*rank), None, None),
        Error::BadIndex { rank, phase, source_rank, .. } => (MoeEpError::new_err(msg), None, Some(*rank), Some(phase), Some(*source_rank)),
        _ => (MoeEpError::new_err(msg), None, None, None, None),
    };
    with_fields(err, &kind, argument, rank, phase, peer)
}

/// A call on a buffer after its `destroy`.
pub(crate) fn destroyed() -> PyErr {
    with_fields(MoeEpError::new_err("the buffer was destroyed"), "Destroyed", None, None, None, None)
}

pub(crate) fn invalid(argument: &str, msg: String) -> PyErr {
    with_fields(InvalidArgument::new_err(format!("invalid argument `{argument}`: {msg}")), "InvalidArgument", Some(argument), None, None, None)
}

/// Sets the fields every moe-ep exception carries (None where the error has no such field).
pub(crate) fn with_fields(err: PyErr, kind: &str, argument: Option<&str>, rank: Option<usize>, phase: Option<&str>, peer: Option<usize>) -> PyErr {
    Python::with_gil(|py| {
        let v = err.value(py);
        let _ = v.setattr("kind", kind);
        let _ = v.setattr("argument", argument);
        let _ = v.setattr("rank", rank);
        let _ = v.setattr("phase", phase);
        let _ = v.setattr("peer", peer);
    });
    err
}
