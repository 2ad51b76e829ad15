//! Shared by the examples: random inputs, and the CPU arithmetic each example's check repeats.

#![allow(dead_code)] // each example uses part of it

use half::bf16;

/// SplitMix64: every rank draws every rank's inputs from one seed, so each can check what it
/// receives.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
}

/// One rank's tokens: `x[n, hidden]` in [-1, 1), the router's top-k of `experts` (distinct
/// experts) and their weights.
pub struct Tokens {
    pub x: Vec<bf16>,
    pub idx: Vec<i64>,
    pub w: Vec<f32>,
}

pub fn tokens(seed: u64, n: usize, hidden: usize, k: usize, experts: usize) -> Tokens {
    let mut rng = Rng::new(seed);
    let x = (0..n * hidden).map(|_| bf16::from_f32(2.0 * rng.uniform() - 1.0)).collect();
    let mut idx = Vec::with_capacity(n * k);
    let mut w = Vec::with_capacity(n * k);
    for _ in 0..n {
        let mut picked: Vec<i64> = Vec::with_capacity(k);
        while picked.len() < k.min(experts) {
            let e = (rng.next_u64() % experts as u64) as i64;
            if !picked.contains(&e) {
                picked.push(e);
            }
        }
        picked.resize(k, -1);
        idx.extend(picked);
        w.extend((0..k).map(|_| 0.05 + rng.uniform()));
    }
    Tokens { x, idx, w }
}

/// The ranks that hold one of token `t`'s experts, as a bit mask.
pub fn ranks_of(idx: &[i64], t: usize, k: usize, experts_per_rank: usize) -> u32 {
    idx[t * k..(t + 1) * k].iter().filter(|&&e| e >= 0).fold(0, |m, &e| m | 1 << (e as usize / experts_per_rank))
}

/// Compares two bf16 arrays bit for bit; the error names the first mismatch.
pub fn same(what: &str, got: &[bf16], want: &[bf16]) -> Result<(), String> {
    if got.len() != want.len() {
        return Err(format!("{what}: {} values, expected {}", got.len(), want.len()));
    }
    match got.iter().zip(want).position(|(a, b)| a.to_bits() != b.to_bits()) {
        None => Ok(()),
        Some(i) => Err(format!("{what}: value {i} is {} but should be {}", got[i], want[i])),
    }
}

/// The GPUs to use (2 to 8), or exits with the reason when the machine has fewer than 2.
pub fn gpus_or_exit() -> usize {
    match moe_ep::device_count() {
        Ok(n) if n >= 2 => n.min(8),
        Ok(n) => {
            eprintln!("this example needs 2 or more GPUs; this machine has {n}");
            std::process::exit(2);
        }
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    }
}

/// Prints every rank's outcome (a message, a mismatch or an error) and exits non-zero if any
/// rank did not succeed.
pub fn report(results: Vec<moe_ep::Result<Result<String, String>>>) -> ! {
    let mut failed = false;
    for (r, res) in results.into_iter().enumerate() {
        match res {
            Ok(Ok(msg)) => println!("{msg}"),
            Ok(Err(mismatch)) => {
                failed = true;
                println!("rank {r}: MISMATCH {mismatch}");
            }
            Err(e) => {
                failed = true;
                println!("rank {r}: error: {e}");
            }
        }
    }
    std::process::exit(failed as i32)
}
