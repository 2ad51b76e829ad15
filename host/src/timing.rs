//! CUDA-event timing.

use crate::error::{DriverContext, Result};
use cudarc::driver::{CudaStream, sys};

/// Runs `f` (which enqueues work on `stream`) between two timing events and returns the
/// elapsed milliseconds once the stream reaches the second one.
pub fn time_ms(stream: &CudaStream, f: impl FnOnce() -> Result<()>) -> Result<f64> {
    let ctx = stream.context();
    let flags = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
    let a = ctx.new_event(flags).during("cuEventCreate", || "timing".into())?;
    let b = ctx.new_event(flags).during("cuEventCreate", || "timing".into())?;
    a.record(stream).during("cuEventRecord", || "timing".into())?;
    f()?;
    b.record(stream).during("cuEventRecord", || "timing".into())?;
    b.synchronize().during("cuEventSynchronize", || "timing".into())?;
    Ok(a.elapsed_ms(&b).during("cuEventElapsedTime", || "timing".into())? as f64)
}
