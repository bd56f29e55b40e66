//! Data-parallel training: one process per rank, ranks meeting through libtorch's c10d
//! (`torch_ext`: a TCPStore and a Gloo group for CPU ranks, an NCCL group for CUDA ranks). What a rank needs from the others: agreement
//! on the inputs at start, the whole batch's embeddings (gathered, gradients kept on the
//! rank's own rows), the gradients summed, rank 0's parameters and buffers, and rank 0's word
//! on what to do (train, up to date, refused). Launch follows torchrun's contract (`RANK`,
//! `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`); `simile-train --nproc N` sets it
//! for N local processes (`launch`).
use crate::error::{Error, Result};
use crate::torch_ext::{ProcessGroup, Store};
use std::time::Duration;
use tch::{Device, Kind, Tensor};

/// The c10d backend the ranks' collectives run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// CPU tensors over TCP (CUDA ranks' tensors are copied to the CPU and back).
    Gloo,
    /// CUDA tensors, GPU to GPU (NVLink, InfiniBand or sockets, as NCCL finds).
    Nccl,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Gloo => "gloo",
            Backend::Nccl => "nccl",
        }
    }

    /// `chosen` (`SIMILE_DIST_BACKEND`), else by device as torch does: Gloo for CPU ranks, NCCL
    /// for CUDA ranks. NCCL for a CPU rank is refused.
    pub fn for_device(chosen: Option<Backend>, dev: Device) -> Result<Backend> {
        match (chosen, dev) {
            (Some(Backend::Nccl), Device::Cpu) => Err(Error::input(
                "SIMILE_DIST_BACKEND=nccl: NCCL runs collectives on CUDA tensors, and this rank trains on the CPU; use --device cuda, or gloo",
            )),
            (Some(b), _) => Ok(b),
            (None, Device::Cuda(_)) => Ok(Backend::Nccl),
            (None, _) => Ok(Backend::Gloo),
        }
    }
}

impl std::str::FromStr for Backend {
    type Err = Error;
    fn from_str(s: &str) -> Result<Backend> {
        match s.trim() {
            "gloo" => Ok(Backend::Gloo),
            "nccl" => Ok(Backend::Nccl),
            other => Err(Error::input(format!(
                "SIMILE_DIST_BACKEND={other:?}: expected gloo or nccl (unset: gloo for CPU ranks, nccl for CUDA ranks)"
            ))),
        }
    }
}

/// Where this process is in a job: torchrun's environment, read once.
#[derive(Clone, Debug, PartialEq)]
pub struct Launch {
    pub rank: usize,
    pub world_size: usize,
    pub local_rank: usize,
    pub master_addr: String,
    pub master_port: u16,
    /// This machine's address on the network the ranks talk over (`SIMILE_DIST_ADDRESS`;
    /// default: the local address that reaches `MASTER_ADDR`).
    pub address: String,
    /// Bounds joining, every collective and a dead peer's detection (`SIMILE_DIST_TIMEOUT`,
    /// seconds; default [`DEFAULT_TIMEOUT`]).
    pub timeout: Duration,
    /// `SIMILE_DIST_BACKEND`; `None`: by device ([`Backend::for_device`]).
    pub backend: Option<Backend>,
}

/// How long a rank waits for another before it gives up (and names the one it waited for).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a rank waits for rank 0's slow once-per-run work (the image cache, fingerprints).
const SLOW_WAIT: Duration = Duration::from_secs(3 * 3600);

impl Launch {
    /// The job this process belongs to, from torchrun's variables; `None` outside a job
    /// (`WORLD_SIZE` unset). Malformed or inconsistent values are the user's error.
    pub fn from_env() -> Result<Option<Launch>> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Option<Launch>> {
        let Some(world) = get("WORLD_SIZE") else {
            return Ok(None);
        };
        let num = |k: &str, v: &str| -> Result<usize> {
            v.trim().parse().map_err(|_| {
                Error::input(format!(
                    "{k}={v:?}: expected a whole number (torchrun's {k})"
                ))
            })
        };
        let world_size = num("WORLD_SIZE", &world)?;
        if world_size == 0 {
            return Err(Error::input("WORLD_SIZE=0: a job has at least one rank"));
        }
        let need = |k: &str| {
            get(k).ok_or_else(|| {
                Error::input(format!(
                    "WORLD_SIZE={world_size} is set but {k} is not: a rank needs RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT (torchrun's variables)"
                ))
            })
        };
        let rank = num("RANK", &need("RANK")?)?;
        if rank >= world_size {
            return Err(Error::input(format!(
                "RANK={rank} is not below WORLD_SIZE={world_size}"
            )));
        }
        let local_rank = match get("LOCAL_RANK") {
            Some(v) => num("LOCAL_RANK", &v)?,
            None => rank,
        };
        let master_addr = need("MASTER_ADDR")?;
        let port = need("MASTER_PORT")?;
        let master_port: u16 = port.trim().parse().ok().filter(|&p| p > 0).ok_or_else(|| {
            Error::input(format!("MASTER_PORT={port:?}: expected a port, 1 to 65535"))
        })?;
        let timeout = timeout_from(get("SIMILE_DIST_TIMEOUT"))?;
        let backend = get("SIMILE_DIST_BACKEND")
            .map(|b| b.parse::<Backend>())
            .transpose()?;
        let address = match get("SIMILE_DIST_ADDRESS") {
            Some(a) => a,
            None => local_address_towards(&master_addr, master_port),
        };
        Ok(Some(Launch {
            rank,
            world_size,
            local_rank,
            master_addr,
            master_port,
            address,
            timeout,
            backend,
        }))
    }
}

impl Launch {
    /// Whether this process runs as a rank (rendezvous, process group, collectives): a job of
    /// several ranks, or a one-rank job whose backend was named (`SIMILE_DIST_BACKEND`: a check
    /// of that backend, as torchrun with one process and `init_process_group`). A plain
    /// `WORLD_SIZE=1` trains as one process.
    pub fn joins_job(&self) -> bool {
        self.world_size > 1 || self.backend.is_some()
    }

    /// `SIMILE_DIST_TIMEOUT` (seconds), or [`DEFAULT_TIMEOUT`].
    pub fn timeout_from_env() -> Result<Duration> {
        timeout_from(std::env::var("SIMILE_DIST_TIMEOUT").ok())
    }
}

fn timeout_from(v: Option<String>) -> Result<Duration> {
    let Some(v) = v else {
        return Ok(DEFAULT_TIMEOUT);
    };
    v.trim()
        .parse::<f64>()
        .ok()
        .filter(|s| *s > 0.0 && s.is_finite() && *s < 1e7)
        .map(Duration::from_secs_f64)
        .ok_or_else(|| {
            Error::input(format!(
                "SIMILE_DIST_TIMEOUT={v:?}: expected seconds, a positive number"
            ))
        })
}

/// The local address the OS would use to reach `host` (a UDP socket "connected" there sends
/// nothing); loopback when it cannot tell.
fn local_address_towards(host: &str, port: u16) -> String {
    use std::net::{ToSocketAddrs, UdpSocket};
    let Some(target) = (host, port)
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
    else {
        return "127.0.0.1".into();
    };
    let bind = if target.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    };
    UdpSocket::bind(bind)
        .and_then(|s| s.connect(target).and_then(|_| s.local_addr()))
        .map(|a| a.ip().to_string())
        .unwrap_or_else(|_| "127.0.0.1".into())
}

/// A rank of a running job.
pub struct Dist {
    pub rank: usize,
    pub world_size: usize,
    pub backend: Backend,
    /// Where the collectives' tensors live: the CPU for Gloo, the rank's GPU for NCCL.
    comm: Device,
    timeout: Duration,
    store: Store,
    pg: ProcessGroup,
    /// Keeps this rank's heartbeat going (see [`Dist::who_is_gone`]).
    _beat: Heartbeat,
}

impl Dist {
    /// Joins the job: rank 0 serves the store at `MASTER_ADDR:MASTER_PORT` and waits for the
    /// others, every rank then forms the group (Gloo, or NCCL on `dev`'s GPU: see
    /// [`Backend::for_device`]). Bounded by the launch's timeout.
    pub fn connect(l: &Launch, dev: Device) -> Result<Dist> {
        let backend = Backend::for_device(l.backend, dev)?;
        let store = Store::new(
            &l.master_addr,
            l.master_port,
            l.world_size,
            l.rank == 0,
            l.timeout,
            // Forming the Gloo group below waits for every rank (bounded the same way).
            false,
        )
        .map_err(|e| name_master(e, l))?;
        let (pg, comm) = match (backend, dev) {
            (Backend::Nccl, Device::Cuda(i)) => (
                ProcessGroup::nccl(&store, "simile", l.rank, l.world_size, i, l.timeout)?,
                dev,
            ),
            _ => (
                ProcessGroup::gloo(
                    &store,
                    "simile",
                    l.rank,
                    l.world_size,
                    &l.address,
                    l.timeout,
                )?,
                Device::Cpu,
            ),
        };
        let beat = Heartbeat::start(l)?;
        Ok(Dist {
            rank: l.rank,
            world_size: l.world_size,
            backend,
            comm,
            timeout: l.timeout,
            store,
            pg,
            _beat: beat,
        })
    }

    pub fn is_main(&self) -> bool {
        self.rank == 0
    }

    /// Refuses (exit 2 on every rank) a job whose ranks were given different inputs: each
    /// rank publishes `facts` and compares every other rank's with its own.
    pub fn agree(&self, facts: &[(&str, String)]) -> Result<()> {
        let mine = serde_json::to_vec(&facts.iter().map(|(k, v)| (*k, v)).collect::<Vec<_>>())
            .map_err(|e| Error::internal(e.to_string()))?;
        self.store.set(&format!("agree/{}", self.rank), &mine)?;
        for r in 0..self.world_size {
            if r == self.rank {
                continue;
            }
            let theirs = self.store_get(&format!("agree/{r}"), self.timeout, r)?;
            let theirs: Vec<(String, String)> = serde_json::from_slice(&theirs)
                .map_err(|e| Error::internal(format!("rank {r}'s facts: {e}")))?;
            for (k, v) in facts {
                let t = theirs
                    .iter()
                    .find(|(tk, _)| tk == k)
                    .map(|(_, tv)| tv.as_str());
                if t != Some(v.as_str()) {
                    return Err(Error::input(format!(
                        "rank {r} and rank {} were started with different {k}: {} on rank {r}, {} on rank {}; every rank must get the same inputs",
                        self.rank,
                        short(t.unwrap_or("nothing")),
                        short(v),
                        self.rank
                    )));
                }
            }
        }
        Ok(())
    }

    /// Rank 0's `value` on every rank (rank 0 passes `Some`). `slow`: rank 0 may take long to
    /// get there (the image cache), so the others wait longer than a collective's timeout.
    pub fn from_main(
        &self,
        key: &str,
        value: Option<&serde_json::Value>,
        slow: bool,
    ) -> Result<serde_json::Value> {
        let key = format!("main/{key}");
        if self.is_main() {
            let v = value.ok_or_else(|| Error::internal("rank 0 must give the value"))?;
            let bytes = serde_json::to_vec(v).map_err(|e| Error::internal(e.to_string()))?;
            self.store.set(&key, &bytes)?;
            return Ok(v.clone());
        }
        let wait = if slow { SLOW_WAIT } else { self.timeout };
        let bytes = self.store_get(&key, wait, 0)?;
        serde_json::from_slice(&bytes).map_err(|e| Error::internal(format!("{key}: {e}")))
    }

    /// A store read from rank `from`'s key; a failure names the rank that did not come.
    fn store_get(&self, key: &str, wait: Duration, from: usize) -> Result<Vec<u8>> {
        self.store
            .get(key, wait)
            .map_err(|e| self.named(e, Some(from)))
    }

    /// Rank 0's tensors on every rank, in place (parameters and buffers at start; BatchNorm's
    /// running statistics before each forward, as DDP does).
    pub fn broadcast(&self, tensors: &[Tensor]) -> Result<()> {
        if tensors.is_empty() {
            return Ok(());
        }
        tch::no_grad(|| {
            let moved = self.to_comm(tensors)?;
            self.pg
                .broadcast(moved.as_deref().unwrap_or(tensors), 0)
                .map_err(|e| self.named(e, None))?;
            Self::copy_back(moved, tensors)
        })
    }

    /// `tensors` on the group's device, when any is elsewhere (a CUDA rank over Gloo): copies
    /// to reduce in place of the originals ([`Dist::copy_back`]). `None`: already there.
    fn to_comm(&self, tensors: &[Tensor]) -> Result<Option<Vec<Tensor>>> {
        if tensors.iter().all(|t| t.device() == self.comm) {
            return Ok(None);
        }
        Ok(Some(
            tensors
                .iter()
                .map(|t| t.f_to_device(self.comm))
                .collect::<std::result::Result<_, _>>()?,
        ))
    }

    fn copy_back(moved: Option<Vec<Tensor>>, into: &[Tensor]) -> Result<()> {
        for (m, t) in moved.iter().flatten().zip(into) {
            let mut t = t.shallow_clone();
            t.f_copy_(m)?;
        }
        Ok(())
    }

    /// One tensor on the group's device (a copy only where it is elsewhere).
    fn on_comm(&self, t: &Tensor) -> Result<Tensor> {
        Ok(t.f_to_device(self.comm)?)
    }

    /// Sums the gradients over the ranks, in place. `average[i]`: grads[i] is the same on
    /// every rank (a parameter used on the gathered batch, like a loss's): averaged instead.
    /// Flat float32 buckets of 25 MiB (DDP's size), one collective each. Returns the bytes
    /// reduced.
    pub fn all_reduce_grads(&self, grads: &mut [Option<Tensor>], average: &[bool]) -> Result<u64> {
        const BUCKET: i64 = 25 << 20;
        let idx: Vec<usize> = (0..grads.len()).filter(|&i| grads[i].is_some()).collect();
        let mut total = 0u64;
        let mut start = 0;
        while start < idx.len() {
            let mut end = start;
            let mut bytes = 0i64;
            while end < idx.len() && (end == start || bytes < BUCKET) {
                let g = grads[idx[end]].as_ref().expect("filtered");
                bytes += g.numel() as i64 * 4;
                end += 1;
            }
            let part: Vec<Tensor> = idx[start..end]
                .iter()
                .map(|&i| {
                    grads[i]
                        .as_ref()
                        .expect("filtered")
                        .f_to_kind(Kind::Float)
                        .and_then(|t| t.f_flatten(0, -1))
                })
                .collect::<std::result::Result<_, _>>()?;
            let flat = self.on_comm(&Tensor::f_cat(&part, 0)?)?;
            total += flat.numel() as u64 * 4;
            self.pg
                .all_reduce_sum(std::slice::from_ref(&flat))
                .map_err(|e| self.named(e, None))?;
            let mut at = 0i64;
            for &i in &idx[start..end] {
                let g = grads[i].as_mut().expect("filtered");
                let n = g.numel() as i64;
                let mut v = flat.f_narrow(0, at, n)?.f_view_as(g)?;
                if average[i] {
                    v = v.f_div_scalar(self.world_size as f64)?;
                }
                *g = v.f_to_device(g.device())?.f_to_kind(g.kind())?;
                at += n;
            }
            start = end;
        }
        Ok(total)
    }

    /// Sums `t` over the ranks, in place (a loss value for the log).
    pub fn sum(&self, t: &Tensor) -> Result<()> {
        let ts = std::slice::from_ref(t);
        let moved = self.to_comm(ts)?;
        self.pg
            .all_reduce_sum(moved.as_deref().unwrap_or(ts))
            .map_err(|e| self.named(e, None))?;
        Self::copy_back(moved, ts)
    }

    /// The rows of every rank's `local` (same shape on every rank), in rank order, with this
    /// rank's own rows as given (their gradient flows back; the others' are constants).
    pub fn gather_rows(&self, local: &Tensor) -> Result<Tensor> {
        let parts = self
            .pg
            .all_gather(&self.on_comm(&local.f_detach()?.f_contiguous()?)?)
            .map_err(|e| self.named(e, None))?;
        let parts: Vec<Tensor> = parts
            .into_iter()
            .enumerate()
            .map(|(r, t)| {
                if r == self.rank {
                    Ok(local.shallow_clone())
                } else {
                    t.f_to_device(local.device())
                }
            })
            .collect::<std::result::Result<_, _>>()?;
        Ok(Tensor::f_cat(&parts, 0)?)
    }

    /// Rows `[n*r/W, n*(r+1)/W)` of `n`: this rank's share of a list (validation rows).
    pub fn share(&self, n: usize) -> std::ops::Range<usize> {
        let at = |r: usize| (n as u128 * r as u128 / self.world_size as u128) as usize;
        at(self.rank)..at(self.rank + 1)
    }

    /// Every rank's share of a `[n, d]` float matrix (`local`: this rank's [`share`] rows),
    /// joined in order: shares differ by a row at most, so they are padded to one size.
    pub fn gather_shares(&self, local: &[f32], n: usize, d: usize) -> Result<Vec<f32>> {
        let sizes: Vec<usize> = (0..self.world_size)
            .map(|r| {
                let at = |r: usize| (n as u128 * r as u128 / self.world_size as u128) as usize;
                at(r + 1) - at(r)
            })
            .collect();
        let most = sizes.iter().copied().max().unwrap_or(0);
        let mut padded = local.to_vec();
        padded.resize(most * d, 0.0);
        let t = self.on_comm(&Tensor::f_from_slice(&padded)?)?;
        let parts = self.pg.all_gather(&t).map_err(|e| self.named(e, None))?;
        let mut out = Vec::with_capacity(n * d);
        for (r, p) in parts.into_iter().enumerate() {
            let v: Vec<f32> = Vec::try_from(p.f_to_device(Device::Cpu)?)?;
            out.extend_from_slice(&v[..sizes[r] * d]);
        }
        Ok(out)
    }

    /// A failed collective or store call, with the rank that is gone when the heartbeats
    /// tell (`from`: the rank waited for, when known).
    fn named(&self, e: Error, from: Option<usize>) -> Error {
        let gone = self.who_is_gone();
        let who = match (gone.as_slice(), from) {
            ([], Some(r)) => format!(
                "rank {r} did not answer within {:.0} s",
                self.timeout.as_secs_f64()
            ),
            ([], None) => "another rank failed or stopped answering".to_string(),
            (g, _) => format!(
                "rank {} stopped (died, was killed, or failed)",
                g.iter()
                    .map(|r| r.to_string())
                    .collect::<Vec<_>>()
                    .join(", rank ")
            ),
        };
        Error::Distributed(format!("rank {}: {who}: {e}", self.rank))
    }

    /// The ranks whose heartbeat stopped: each rank bumps `beat/<rank>` every
    /// [`Heartbeat::PERIOD`]; one that does not move over two periods is gone. Rank 0 serves
    /// the store, so when the store itself is gone, rank 0 is.
    fn who_is_gone(&self) -> Vec<usize> {
        let read = |r: usize| -> Option<i64> { self.store.add(&format!("beat/{r}"), 0).ok() };
        let Some(first): Option<Vec<Option<i64>>> = Some((0..self.world_size).map(read).collect())
        else {
            return Vec::new();
        };
        if first.iter().all(Option::is_none) {
            return if self.rank == 0 { Vec::new() } else { vec![0] };
        }
        std::thread::sleep(Heartbeat::PERIOD * 3);
        (0..self.world_size)
            .filter(|&r| r != self.rank && read(r) == first[r])
            .collect()
    }
}

fn short(s: &str) -> String {
    if s.len() > 200 {
        format!(
            "{}... ({} characters)",
            &s[..s.char_indices().nth(200).map_or(s.len(), |(i, _)| i)],
            s.len()
        )
    } else {
        s.to_string()
    }
}

fn name_master(e: Error, l: &Launch) -> Error {
    match e {
        Error::Distributed(m) if l.rank != 0 => Error::Distributed(format!(
            "rank {}: the rendezvous at {}:{} (rank 0) did not answer within {:.0} s: {m}",
            l.rank,
            l.master_addr,
            l.master_port,
            l.timeout.as_secs_f64()
        )),
        Error::Distributed(m) => Error::Distributed(format!(
            "rank 0: not every rank joined within {:.0} s: {m}",
            l.timeout.as_secs_f64()
        )),
        other => other,
    }
}

/// A thread that bumps this rank's counter in the store, so a survivor can tell who died.
struct Heartbeat {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Heartbeat {
    const PERIOD: Duration = Duration::from_millis(500);

    fn start(l: &Launch) -> Result<Heartbeat> {
        use std::sync::atomic::{AtomicBool, Ordering};
        // Its own client, so a beat never waits behind a long store read.
        let store = Store::client(&l.master_addr, l.master_port, l.world_size, l.timeout)?;
        let key = format!("beat/{}", l.rank);
        store.add(&key, 1)?;
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                if store.add(&key, 1).is_err() {
                    break;
                }
                std::thread::sleep(Self::PERIOD);
            }
        });
        Ok(Heartbeat {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars<'a>(v: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| v.iter().find(|(n, _)| *n == k).map(|(_, x)| x.to_string())
    }

    #[test]
    fn torchruns_variables_are_read_and_checked() {
        assert_eq!(Launch::from_vars(vars(&[])).unwrap(), None);
        let l = Launch::from_vars(vars(&[
            ("WORLD_SIZE", "4"),
            ("RANK", "2"),
            ("LOCAL_RANK", "0"),
            ("MASTER_ADDR", "127.0.0.1"),
            ("MASTER_PORT", "29500"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(
            (l.rank, l.world_size, l.local_rank, l.master_port),
            (2, 4, 0, 29500)
        );
        assert_eq!(l.address, "127.0.0.1");
        assert_eq!(l.timeout, DEFAULT_TIMEOUT);
        for (bad, want) in [
            (vec![("WORLD_SIZE", "2")], "RANK"),
            (
                vec![
                    ("WORLD_SIZE", "2"),
                    ("RANK", "2"),
                    ("MASTER_ADDR", "h"),
                    ("MASTER_PORT", "1"),
                ],
                "not below",
            ),
            (vec![("WORLD_SIZE", "two")], "whole number"),
            (
                vec![
                    ("WORLD_SIZE", "2"),
                    ("RANK", "0"),
                    ("MASTER_ADDR", "h"),
                    ("MASTER_PORT", "0"),
                ],
                "MASTER_PORT",
            ),
            (
                vec![
                    ("WORLD_SIZE", "2"),
                    ("RANK", "0"),
                    ("MASTER_ADDR", "h"),
                    ("MASTER_PORT", "9"),
                    ("SIMILE_DIST_TIMEOUT", "-1"),
                ],
                "SIMILE_DIST_TIMEOUT",
            ),
        ] {
            let e = Launch::from_vars(vars(&bad)).unwrap_err();
            assert_eq!(e.exit_code(), 2);
            assert!(e.to_string().contains(want), "{bad:?}: {e}");
        }
    }

    #[test]
    fn the_backend_follows_the_device_unless_named() {
        let job = |extra: &[(&'static str, &'static str)]| {
            let mut v = vec![
                ("WORLD_SIZE", "1"),
                ("RANK", "0"),
                ("MASTER_ADDR", "127.0.0.1"),
                ("MASTER_PORT", "29500"),
            ];
            v.extend_from_slice(extra);
            Launch::from_vars(vars(&v)).unwrap().unwrap()
        };
        let plain = job(&[]);
        assert_eq!(plain.backend, None);
        assert!(
            !plain.joins_job(),
            "WORLD_SIZE=1 alone trains as one process"
        );
        let named = job(&[("SIMILE_DIST_BACKEND", "nccl")]);
        assert_eq!(named.backend, Some(Backend::Nccl));
        assert!(named.joins_job());
        let bad = Launch::from_vars(vars(&[
            ("WORLD_SIZE", "2"),
            ("RANK", "0"),
            ("MASTER_ADDR", "h"),
            ("MASTER_PORT", "9"),
            ("SIMILE_DIST_BACKEND", "mpi"),
        ]))
        .unwrap_err();
        assert_eq!(bad.exit_code(), 2);
        use Backend::*;
        assert_eq!(Backend::for_device(None, Device::Cpu).unwrap(), Gloo);
        assert_eq!(Backend::for_device(None, Device::Cuda(1)).unwrap(), Nccl);
        assert_eq!(
            Backend::for_device(Some(Gloo), Device::Cuda(0)).unwrap(),
            Gloo
        );
        let e = Backend::for_device(Some(Nccl), Device::Cpu).unwrap_err();
        assert_eq!(e.exit_code(), 2);
    }
}
