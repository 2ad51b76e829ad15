//! How device arrays cross the public API: cudarc slices and views in, heap views out.

use crate::driver;
use crate::error::{DriverContext, Result};
use bytemuck::Pod;
use cudarc::driver::{CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr, DeviceSlice};
use std::marker::PhantomData;
use std::sync::Arc;

/// A device array of `T` that an operation may read or write: a cudarc [`CudaSlice`],
/// [`CudaView`] or [`CudaViewMut`], or a [`HeapView`]. Operations check its length against
/// the shape they expect before launching anything.
///
/// # Safety
///
/// Kernels read and write through [`DeviceArg::device_addr`] without any further check, so an
/// implementation must guarantee that:
/// - the address is the start of `elems()` properly aligned `T` of device memory of the group's
///   GPU (or mapped to it), and stays so while the object lives;
/// - the memory is not freed or reused while an operation that got it may still run on the
///   GPU. [`DeviceArg::owning_stream`] is how the library helps: when an argument names the
///   stream its memory is ordered on (a cudarc slice's own stream, where dropping it frees it)
///   and that is not the operation's stream, the operation's launch first waits for that
///   stream's earlier work (the argument's producers), and that stream then waits for the
///   launch (so a free issued on it after the call, e.g. by dropping the slice, cannot run
///   before the kernel ends). An implementation that returns `None` must order its memory's
///   reuse after the operation itself. Inside a CUDA graph capture no such ordering is added:
///   the graph's arguments must outlive the graph.
pub unsafe trait DeviceArg<T> {
    /// Device address of element 0.
    fn device_addr(&self) -> u64;
    /// Number of elements.
    fn elems(&self) -> usize;
    /// The stream the memory's producers and its free are ordered on, if any (see the trait's
    /// safety section).
    fn owning_stream(&self) -> Option<&Arc<CudaStream>> {
        None
    }
}

// SAFETY: a live CudaSlice owns `len()` elements of device memory of its context; the ordering
// of its free is the caller's (see the trait's safety section).
unsafe impl<T> DeviceArg<T> for CudaSlice<T> {
    fn device_addr(&self) -> u64 {
        self.device_ptr(self.stream()).0
    }
    fn elems(&self) -> usize {
        self.len()
    }
    fn owning_stream(&self) -> Option<&Arc<CudaStream>> {
        Some(self.stream())
    }
}

// SAFETY: a view borrows a live slice's elements for its lifetime.
unsafe impl<T> DeviceArg<T> for CudaView<'_, T> {
    fn device_addr(&self) -> u64 {
        self.device_ptr(self.stream()).0
    }
    fn elems(&self) -> usize {
        self.len()
    }
    fn owning_stream(&self) -> Option<&Arc<CudaStream>> {
        Some(self.stream())
    }
}

// SAFETY: as for CudaView.
unsafe impl<T> DeviceArg<T> for CudaViewMut<'_, T> {
    fn device_addr(&self) -> u64 {
        self.device_ptr(self.stream()).0
    }
    fn elems(&self) -> usize {
        self.len()
    }
    fn owning_stream(&self) -> Option<&Arc<CudaStream>> {
        Some(self.stream())
    }
}

/// A view of `len` elements of a buffer's heap (received rows, counts, a zero-copy input). It
/// borrows the buffer, so it cannot outlive the next operation that would overwrite it. Like
/// any [`DeviceArg`] it can be passed where an operation reads or writes device memory.
#[derive(Clone, Copy, Debug)]
pub struct HeapView<'a, T> {
    ptr: u64,
    len: usize,
    _m: PhantomData<&'a [T]>,
}

impl<T> HeapView<'_, T> {
    pub(crate) fn new(ptr: u64, len: usize) -> Self {
        HeapView { ptr, len, _m: PhantomData }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when the view holds no element.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Device address of element 0 (for handing to a GEMM; using it is the caller's unsafe).
    pub fn device_addr(&self) -> u64 {
        self.ptr
    }
}

impl<T: Pod> HeapView<'_, T> {
    /// Copies the view to the host after the stream's earlier work.
    pub fn to_vec(&self, stream: &CudaStream) -> Result<Vec<T>> {
        let mut v = vec![T::zeroed(); self.len];
        // SAFETY: the view covers `len` elements of a live heap.
        unsafe { driver::copy_to_host(self.ptr, &mut v, stream) }.during("cuMemcpyDtoH", || format!("copying a {}-element heap view", self.len))?;
        Ok(v)
    }
}

// SAFETY: a heap view covers `len` elements of a buffer's heap, which lives as long as the view
// borrows the buffer; the buffer's own operations order its reuse.
unsafe impl<T> DeviceArg<T> for HeapView<'_, T> {
    fn device_addr(&self) -> u64 {
        self.ptr
    }
    fn elems(&self) -> usize {
        self.len
    }
}

/// Router output `topk_idx[N, K]`, as i64 (PyTorch's default) or i32; `-1` means no expert.
///
/// An id outside `-1..num_experts` is refused on the GPU (`Error::InvalidExpert`). A router
/// names each expert at most once per token, and the kernels do not check it: a repeated id
/// counts as one more selection of that expert. High-throughput: the token still goes to the
/// rank once, and its received top-k ids (and the per-expert counts) name the expert twice.
/// Low-latency: the expert receives the token twice, which counts twice against its
/// `world * max_tokens_per_rank` rows and can end in `Error::CapacityExceeded`. Tests never
/// repeat an id (`reference::gen_routing`).
#[derive(Clone, Copy)]
pub enum TopkIdx<'a> {
    /// 64-bit expert ids.
    I64(&'a dyn DeviceArg<i64>),
    /// 32-bit expert ids.
    I32(&'a dyn DeviceArg<i32>),
}

impl<'a> TopkIdx<'a> {
    pub(crate) fn owning_stream(&self) -> Option<&'a Arc<CudaStream>> {
        match *self {
            TopkIdx::I64(a) => a.owning_stream(),
            TopkIdx::I32(a) => a.owning_stream(),
        }
    }
}

impl TopkIdx<'_> {
    pub(crate) fn addr(&self) -> u64 {
        match self {
            TopkIdx::I64(a) => a.device_addr(),
            TopkIdx::I32(a) => a.device_addr(),
        }
    }

    pub(crate) fn elems(&self) -> usize {
        match self {
            TopkIdx::I64(a) => a.elems(),
            TopkIdx::I32(a) => a.elems(),
        }
    }

    pub(crate) fn is_i64(&self) -> u32 {
        matches!(self, TopkIdx::I64(_)) as u32
    }
}

/// Limits both kernel families share: rank count (at most `max_ranks`), hidden size, top-k
/// (`family` names the kernels in the message).
pub(crate) fn check_model_shape(family: &str, world: usize, max_ranks: usize, hidden: usize, max_topk: usize) -> Result<()> {
    use moe_ep_kernels::abi::{FP8_GROUP, MAX_HIDDEN, MAX_TOPK};
    if !(2..=max_ranks).contains(&world) {
        return Err(crate::Error::invalid("world", format!("{world} ranks; {family} kernels need 2..={max_ranks}")));
    }
    if hidden == 0 || !hidden.is_multiple_of(FP8_GROUP) || hidden > MAX_HIDDEN {
        return Err(crate::Error::invalid("hidden", format!("{hidden} is not a multiple of {FP8_GROUP} in {FP8_GROUP}..={MAX_HIDDEN}")));
    }
    if !(1..=MAX_TOPK).contains(&max_topk) {
        return Err(crate::Error::invalid("max_topk", format!("{max_topk} is outside 1..={MAX_TOPK}")));
    }
    Ok(())
}

/// Checks that `arg` holds exactly `want` elements.
pub(crate) fn check_len(name: &'static str, got: usize, want: usize, shape: impl FnOnce() -> String) -> Result<()> {
    if got != want {
        return Err(crate::Error::invalid(name, format!("has {got} elements, expected {want} ({})", shape())));
    }
    Ok(())
}
