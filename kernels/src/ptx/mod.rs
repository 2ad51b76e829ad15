//! One-to-one wrappers over PTX instructions.
//!
//! Each wrapper is named after the instruction it emits, qualifiers spelled out with `.` and
//! `::` turned into `_` (`ld.acquire.sys.global.u32` -> [`ld_acquire_sys_global_u32`]). Each
//! doc line gives the PTX form, the minimum PTX ISA and sm, and when the wrapper is the right
//! choice. Global-memory wrappers take generic addresses and convert them with
//! `cvta.to.global` inside the asm, as the PTX ISA asks for `.global` operands.
//!
//! Ordering instructions (acquire/release loads and stores, fences, atomics, barriers) are
//! never marked `nomem` or `readonly`: the compiler must not move memory accesses across them.
//! Only pure register reads (`%tid`, `%laneid`) are `pure, nomem`.
//!
//! | scope | who observes | use for |
//! | --- | --- | --- |
//! | `.cta` | threads of one block | shared-memory handoffs |
//! | `.gpu` | every thread of this GPU | counters among blocks of one kernel |
//! | `.sys` | every GPU and the host | flags and data that cross NVLink or PCIe |

pub mod atom;
pub mod barrier;
pub mod bulk;
pub mod cvt;
pub mod fence;
pub mod ld;
pub mod shared;
pub mod special;
pub mod st;
pub mod warp;

pub use atom::*;
pub use barrier::*;
pub use bulk::*;
pub use cvt::*;
pub use fence::*;
pub use ld::*;
pub use shared::*;
pub use special::*;
pub use st::*;
pub use warp::*;
