//! Testing: a group's ranks as local processes (the benchmark, the soak and the test harness
//! start their ranks with it), each on its own GPU or all sharing one GPU under CUDA MPS.
//!
//! Each child gets torchrun's variables (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`),
//! a free `MOE_EP_MASTER_PORT` and a fresh `MOE_EP_SECRET`, so [`crate::Group::from_env`]
//! joins it to the others.

use crate::error::{Error, Result};
use crate::group::SHARE_GPU_ENV;
use std::path::Path;
use std::process::Command;

/// Where a local job's ranks run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Placement {
    /// Rank `r` on GPU `r` of the GPUs this process sees.
    GpuPerRank,
    /// Rank `r` sees only the GPU `visible[r]` names (`CUDA_VISIBLE_DEVICES` per child, as
    /// Slurm and Kubernetes give).
    OneVisibleGpuEach(Vec<String>),
    /// Every rank on the one GPU this names (as `CUDA_VISIBLE_DEVICES` would), sharing it under
    /// CUDA MPS: each child sees only that GPU and opts in (`MOE_EP_SHARE_GPU=1`); the group
    /// gives each an equal share of the SMs. No MPS active-thread percentage is set: clients
    /// with one may all be confined to the same SMs (see `Group::sm_count`).
    SharedGpu(String),
}

/// The commands that start ranks `0..world` of `exe args` on this machine, placed by
/// `placement`; the caller adds its own environment and spawns them.
pub fn rank_commands(exe: &Path, args: &[String], world: usize, placement: &Placement) -> Result<Vec<Command>> {
    let bad = |reason: String| Error::Rendezvous { rank: 0, world, reason };
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| bad(format!("no free local port for the rendezvous: {e}")))?
        .port();
    let secret = crate::rendezvous::random_secret()?;
    (0..world)
        .map(|r| {
            let mut c = Command::new(exe);
            c.args(args)
                .env("RANK", r.to_string())
                .env("WORLD_SIZE", world.to_string())
                .env("LOCAL_RANK", r.to_string())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MOE_EP_MASTER_PORT", port.to_string())
                .env("MOE_EP_SECRET", &secret);
            match placement {
                Placement::GpuPerRank => {}
                Placement::OneVisibleGpuEach(visible) => {
                    c.env("CUDA_VISIBLE_DEVICES", visible.get(r).ok_or_else(|| bad(format!("no visible GPU for rank {r}")))?);
                }
                Placement::SharedGpu(device) => {
                    c.env("CUDA_VISIBLE_DEVICES", device).env("LOCAL_RANK", "0").env(SHARE_GPU_ENV, "1");
                }
            }
            Ok(c)
        })
        .collect()
}

/// Starts ranks `0..world` of `exe args` ([`rank_commands`]) and waits for all of them; the
/// ranks that did not succeed, with how they ended.
pub fn run_ranks(exe: &Path, args: &[String], world: usize, placement: &Placement) -> Result<Vec<(usize, std::process::ExitStatus)>> {
    let mut children = Vec::new();
    for (r, mut c) in rank_commands(exe, args, world, placement)?.into_iter().enumerate() {
        let child = c.spawn().map_err(|e| Error::Rendezvous { rank: r, world, reason: format!("starting rank {r}: {e}") })?;
        children.push(child);
    }
    let mut failed = Vec::new();
    for (r, mut c) in children.into_iter().enumerate() {
        let st = c.wait().map_err(|e| Error::Rendezvous { rank: r, world, reason: format!("waiting for rank {r}: {e}") })?;
        if !st.success() {
            failed.push((r, st));
        }
    }
    Ok(failed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(c: &Command, key: &str) -> Option<String> {
        c.get_envs().find(|(k, _)| *k == key).and_then(|(_, v)| v.map(|v| v.to_string_lossy().into_owned()))
    }

    #[test]
    fn shared_gpu_children_see_one_gpu_opt_in_and_get_an_mps_share() {
        let cmds = rank_commands(Path::new("/bin/true"), &["x".into()], 3, &Placement::SharedGpu("0".into())).unwrap();
        assert_eq!(cmds.len(), 3);
        for (r, c) in cmds.iter().enumerate() {
            assert_eq!(env_of(c, "RANK").as_deref(), Some(r.to_string().as_str()));
            assert_eq!(env_of(c, "CUDA_VISIBLE_DEVICES").as_deref(), Some("0"));
            assert_eq!(env_of(c, "LOCAL_RANK").as_deref(), Some("0"));
            assert_eq!(env_of(c, "MOE_EP_SHARE_GPU").as_deref(), Some("1"));
        }
        assert_eq!(env_of(&cmds[0], "MOE_EP_SECRET"), env_of(&cmds[2], "MOE_EP_SECRET"));
        let cmds = rank_commands(Path::new("/bin/true"), &[], 2, &Placement::OneVisibleGpuEach(vec!["3".into(), "1".into()])).unwrap();
        assert_eq!(env_of(&cmds[1], "CUDA_VISIBLE_DEVICES").as_deref(), Some("1"));
        assert!(env_of(&cmds[1], "MOE_EP_SHARE_GPU").is_none());
        assert!(rank_commands(Path::new("/bin/true"), &[], 3, &Placement::OneVisibleGpuEach(vec!["0".into()])).is_err());
    }
}
