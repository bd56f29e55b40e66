//! `simile-train --nproc N`: N ranks on this machine, as `torchrun --nproc-per-node N` starts
//! them: the same command line in N processes with torchrun's variables (`RANK`,
//! `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`), the CPU threads split between
//! them. The launcher waits for all; when one fails, the others stop on their own within the
//! job's timeout (a collective fails), and the launcher ends any that do not soon after.
use crate::error::{Error, Result};
use std::ffi::OsString;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// How one rank ended.
#[derive(Clone, Debug, PartialEq)]
pub struct Ended {
    pub rank: usize,
    /// The exit code, or 128 + the signal that killed it (as a shell says).
    pub code: i32,
    pub signal: Option<i32>,
}

/// The command line without `--nproc N` and `--threads T` (the launcher sets both per rank).
pub fn rank_args(args: &[OsString]) -> Vec<OsString> {
    let mut out = Vec::new();
    let mut skip = false;
    for a in args {
        if skip {
            skip = false;
            continue;
        }
        let s = a.to_string_lossy();
        if s == "--nproc" || s == "--threads" {
            skip = true;
            continue;
        }
        if s.starts_with("--nproc=") || s.starts_with("--threads=") {
            continue;
        }
        out.push(a.clone());
    }
    out
}

/// A TCP port free on this machine now (the rendezvous binds it a moment later).
fn free_port() -> Result<u16> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| Error::internal(format!("no free port for the rendezvous: {e}")))
}

/// Runs `nproc` ranks of this program with `args` (already without `--nproc`/`--threads`),
/// `threads` CPU threads in all (default: the cores), and returns the first failing rank's
/// ending (`None`: every rank exited 0). `timeout` is the job's (`SIMILE_DIST_TIMEOUT`).
pub fn run_local(
    nproc: usize,
    args: &[OsString],
    threads: Option<u64>,
    timeout: Duration,
) -> Result<Option<Ended>> {
    let exe = std::env::current_exe().map_err(|e| {
        Error::internal(format!("cannot find this program to start its ranks: {e}"))
    })?;
    let total = threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get() as u64));
    let per = (total / nproc as u64).max(1);
    let port = free_port()?;
    eprintln!(
        "simile-train: starting {nproc} ranks on this machine ({per} thread(s) each, rendezvous 127.0.0.1:{port})"
    );
    let mut children: Vec<Option<Child>> = Vec::new();
    for rank in 0..nproc {
        let mut cmd = Command::new(&exe);
        cmd.args(args)
            .arg("--threads")
            .arg(per.to_string())
            .env("RANK", rank.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("WORLD_SIZE", nproc.to_string())
            .env("LOCAL_WORLD_SIZE", nproc.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .env("SIMILE_DIST_ADDRESS", "127.0.0.1");
        #[cfg(target_os = "linux")]
        {
            use std::os::unix::process::CommandExt;
            // SAFETY: prctl only, between fork and exec: a rank ends with its launcher.
            unsafe {
                cmd.pre_exec(|| {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                    Ok(())
                });
            }
        }
        match cmd.spawn() {
            Ok(c) => children.push(Some(c)),
            Err(e) => {
                for c in children.iter_mut().flatten() {
                    let _ = c.kill();
                    let _ = c.wait();
                }
                return Err(Error::internal(format!("cannot start rank {rank}: {e}")));
            }
        }
    }
    let mut first: Option<Ended> = None;
    let mut deadline: Option<Instant> = None;
    loop {
        let mut running = 0;
        for (rank, slot) in children.iter_mut().enumerate() {
            let Some(c) = slot else { continue };
            match c.try_wait() {
                Ok(Some(status)) => {
                    use std::os::unix::process::ExitStatusExt;
                    let ended = Ended {
                        rank,
                        code: status
                            .code()
                            .unwrap_or_else(|| 128 + status.signal().unwrap_or(0)),
                        signal: status.signal(),
                    };
                    if ended.code != 0 && first.is_none() {
                        deadline = Some(Instant::now() + timeout + Duration::from_secs(15));
                        first = Some(ended);
                    }
                    *slot = None;
                }
                Ok(None) => running += 1,
                Err(_) => *slot = None,
            }
        }
        if running == 0 {
            break;
        }
        if deadline.is_some_and(|d| Instant::now() > d) {
            for c in children.iter_mut().flatten() {
                let _ = c.kill();
                let _ = c.wait();
            }
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(first)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_launchers_flags_are_left_out_of_the_ranks() {
        let a: Vec<OsString> = [
            "--dataset",
            "d",
            "--nproc",
            "2",
            "--threads=4",
            "--out",
            "m",
            "--nproc=3",
            "--threads",
            "2",
        ]
        .iter()
        .map(OsString::from)
        .collect();
        let want: Vec<OsString> = ["--dataset", "d", "--out", "m"]
            .iter()
            .map(OsString::from)
            .collect();
        assert_eq!(rank_args(&a), want);
    }
}
