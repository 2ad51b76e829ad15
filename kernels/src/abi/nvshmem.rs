//! Parameter blocks of the NVSHMEM probe kernels (`cargo xtask build-ptx --nvshmem`, a second
//! PTX module linked with NVSHMEM's device library; not part of `kernels.ptx`).

use bytemuck::{Pod, Zeroable};

/// `nvshmem_ping_pong`: `iters` round trips of an 8-byte put with signal between this PE and
/// `peer` (one warp). `data` and `signal` are symmetric (`nvshmem_malloc`) addresses.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct NvshmemPingPongParams {
    /// Symmetric `u64 [2]`: the word sent and the word received.
    pub data: u64,
    /// Symmetric `u64`: the signal each put raises to the round's number.
    pub signal: u64,
    pub peer: i32,
    /// Nonzero on the PE that starts each round trip.
    pub initiator: u32,
    pub iters: u32,
    pub _pad: u32,
    /// Device address of a `u64`: elapsed nanoseconds of the whole loop (`%globaltimer`).
    pub elapsed_ns: u64,
}

/// `nvshmem_put_bw`: every block puts its slice of `bytes` from `src` to `dst` on `peer`,
/// `iters` times (`nvshmemx_putmem_nbi_block`), then waits for completion (`nvshmem_quiet`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct NvshmemPutParams {
    /// Symmetric source and destination buffers of `bytes` bytes.
    pub src: u64,
    pub dst: u64,
    pub bytes: u64,
    pub peer: i32,
    pub iters: u32,
}
