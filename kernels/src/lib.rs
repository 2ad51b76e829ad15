//! moe-ep kernels: the GPU side of expert-parallel dispatch and combine, in Rust.
//!
//! This crate compiles twice. For the host it is a plain `no_std` library holding the ABI
//! both sides agree on ([`abi`]: parameter blocks, heap layouts, error records) and the
//! reference math the host checks against. For `nvptx64-nvidia-cuda` it also holds the
//! kernels, built by `cargo xtask build-ptx` into one PTX module (`host/kernels.ptx`):
//!
//! - `ptx`: one-to-one wrappers over PTX instructions, named after what they emit;
//! - `sync`: deadline-bounded waits, the cross-rank barrier, arrival counters;
//! - `dev`: helpers composed from the wrappers (warp scans, peer addressing);
//! - `foundation`, `selftest`, `ht`, `ll`: the kernels (`extern "ptx-kernel"`);
//! - `nvshmem` (feature `nvshmem`): probe kernels calling NVSHMEM's device library, built into
//!   a second PTX module by `cargo xtask build-ptx --nvshmem`.
#![no_std]
#![cfg_attr(target_arch = "nvptx64", feature(abi_ptx, asm_experimental_arch))]

pub mod abi;
pub mod fp;

#[cfg(target_arch = "nvptx64")]
pub mod dev;
#[cfg(target_arch = "nvptx64")]
pub mod foundation;
#[cfg(target_arch = "nvptx64")]
pub mod ht;
#[cfg(target_arch = "nvptx64")]
pub mod ll;
#[cfg(all(target_arch = "nvptx64", feature = "nvshmem"))]
pub mod nvshmem;
#[cfg(target_arch = "nvptx64")]
pub mod ptx;
#[cfg(target_arch = "nvptx64")]
pub mod remote;
#[cfg(target_arch = "nvptx64")]
pub mod selftest;
#[cfg(target_arch = "nvptx64")]
pub mod sync;

#[cfg(target_arch = "nvptx64")]
#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    // Unreachable with `-Cpanic=immediate-abort` (panics become `trap`); required by no_std.
    loop {}
}
