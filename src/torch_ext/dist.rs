//! libtorch's c10d: the TCPStore rendezvous and Gloo process groups (CPU collectives).
//!
//! Timeouts: every blocking call is bounded. A `Store`'s timeout bounds connecting to the
//! server (libtorch retries once, so a server that never comes fails after about 2.5 times it)
//! and each store call; a `ProcessGroup`'s bounds forming the group (every rank must have
//! called [`ProcessGroup::gloo`]) and each collective. A peer that died closes its connections
//! and fails the next collective at once; one that is alive but never takes part fails it when
//! the timeout ends. After a failed collective the group is unusable: drop it.
use std::net::{IpAddr, TcpListener, ToSocketAddrs};
use std::os::fd::IntoRawFd;
use std::ptr;
use std::time::Duration;

use tch::Tensor;
use torch_sys::C_tensor;

use super::ffi::{self, check, cstring, millis, pointers};
use crate::{Error, Result};

/// A TCPStore client (and on one rank, the server): the key-value store the ranks meet at.
pub struct Store {
    raw: *mut ffi::SimileStore,
}

// SAFETY: c10d's TCPStore serialises its client's operations with a mutex; the handle is only
// freed by Drop.
unsafe impl Send for Store {}
unsafe impl Sync for Store {}

impl Store {
    /// A store at `host:port` for `world_size` ranks. With `is_server` (one rank, usually 0)
    /// this process also serves it, listening on `port` on every interface (0: a free port,
    /// see [`Store::port`]) and, with `wait_workers`, waiting until `world_size` clients have
    /// connected. A port in use or a host that does not resolve is the user's error (exit 2);
    /// a server that does not answer within `timeout` is a `Distributed` one.
    pub fn new(
        host: &str,
        port: u16,
        world_size: usize,
        is_server: bool,
        timeout: Duration,
        wait_workers: bool,
    ) -> Result<Store> {
        if !is_server {
            return Store::client(host, port, world_size, timeout);
        }
        check_host(host, port)?;
        // Bound here rather than by libtorch, so a port in use is told apart from a peer that
        // fails. Every interface, as libtorch's server does: IPv6 (dual-stack), else IPv4.
        let listener = TcpListener::bind(("::", port))
            .or_else(|_| TcpListener::bind(("0.0.0.0", port)))
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::AddrInUse => Error::input(format!(
                    "port {port} is already in use: choose another port for the rendezvous"
                )),
                _ => Error::input(format!("cannot listen on port {port}: {e}")),
            })?;
        Store::open(host, listener, world_size, timeout, wait_workers)
    }

    /// The server on a socket the caller has bound and listens on (port 0 bound before the
    /// other ranks start: no race for a free port). Its own client connects through loopback
    /// when the socket is bound to every interface.
    pub fn server_on(
        listener: TcpListener,
        world_size: usize,
        timeout: Duration,
        wait_workers: bool,
    ) -> Result<Store> {
        let addr = listener
            .local_addr()
            .map_err(|e| Error::internal(format!("the store's socket has no address: {e}")))?;
        let host = match addr.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => "127.0.0.1".to_string(),
            IpAddr::V6(ip) if ip.is_unspecified() => "::1".to_string(),
            ip => ip.to_string(),
        };
        Store::open(&host, listener, world_size, timeout, wait_workers)
    }

    /// A client of the server at `host:port`.
    pub fn client(host: &str, port: u16, world_size: usize, timeout: Duration) -> Result<Store> {
        check_host(host, port)?;
        let c_host = cstring("host", host)?;
        let mut raw = ptr::null_mut();
        // SAFETY: valid C string and out pointer; the shim catches every exception.
        check(unsafe {
            ffi::simile_store_new(
                c_host.as_ptr(),
                port,
                -1,
                world_i64(world_size),
                false,
                false,
                millis(timeout),
                &mut raw,
            )
        })?;
        Ok(Store { raw })
    }

    fn open(
        host: &str,
        listener: TcpListener,
        world_size: usize,
        timeout: Duration,
        wait_workers: bool,
    ) -> Result<Store> {
        let port = listener
            .local_addr()
            .map_err(|e| Error::internal(format!("the store's socket has no address: {e}")))?
            .port();
        check_host(host, port)?;
        let c_host = cstring("host", host)?;
        // The store takes the socket over (and closes it).
        let fd = listener.into_raw_fd();
        let mut raw = ptr::null_mut();
        // SAFETY: as in `client`; fd is an open listening socket whose ownership passes on.
        check(unsafe {
            ffi::simile_store_new(
                c_host.as_ptr(),
                port,
                fd,
                world_i64(world_size),
                true,
                wait_workers,
                millis(timeout),
                &mut raw,
            )
        })?;
        Ok(Store { raw })
    }

    /// The server's port (the one picked when 0 was asked for).
    pub fn port(&self) -> u16 {
        // SAFETY: a live handle.
        unsafe { ffi::simile_store_port(self.raw) }
    }

    pub fn set(&self, key: &str, value: &[u8]) -> Result<()> {
        let c_key = cstring("store key", key)?;
        // SAFETY: valid key, and value's pointer and length.
        check(unsafe {
            ffi::simile_store_set(self.raw, c_key.as_ptr(), value.as_ptr(), value.len())
        })
    }

    /// The key's value, waiting up to `timeout` for another rank to set it.
    pub fn get(&self, key: &str, timeout: Duration) -> Result<Vec<u8>> {
        let c_key = cstring("store key", key)?;
        let mut buf: *mut u8 = ptr::null_mut();
        let mut len = 0usize;
        // SAFETY: valid key and out pointers.
        check(unsafe {
            ffi::simile_store_get(
                self.raw,
                c_key.as_ptr(),
                millis(timeout),
                &mut buf,
                &mut len,
            )
        })?;
        if buf.is_null() {
            return Ok(Vec::new());
        }
        // SAFETY: the shim malloc'd `len` bytes at buf, which we copy and free once.
        let value = unsafe { std::slice::from_raw_parts(buf, len).to_vec() };
        // SAFETY: buf came from the shim's malloc.
        unsafe { ffi::simile_buf_free(buf) };
        Ok(value)
    }

    /// Adds `delta` to the key's counter (0 when absent) and returns the new value.
    pub fn add(&self, key: &str, delta: i64) -> Result<i64> {
        let c_key = cstring("store key", key)?;
        let mut out = 0i64;
        // SAFETY: valid key and out pointer.
        check(unsafe { ffi::simile_store_add(self.raw, c_key.as_ptr(), delta, &mut out) })?;
        Ok(out)
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        // SAFETY: the handle is live and freed once. Process groups keep their own reference
        // to the store, so they outlive this handle safely.
        unsafe { ffi::simile_store_free(self.raw) }
    }
}

/// A host that does not resolve is the user's to fix (libtorch would only time out).
fn check_host(host: &str, port: u16) -> Result<()> {
    match (host, port).to_socket_addrs() {
        Ok(mut addrs) => match addrs.next() {
            Some(_) => Ok(()),
            None => Err(Error::input(format!("host '{host}' has no address"))),
        },
        Err(e) => Err(Error::input(format!("cannot resolve host '{host}': {e}"))),
    }
}

/// Whether this build has the NCCL backend: libtorch with CUDA at build time.
pub fn nccl_built() -> bool {
    // SAFETY: no arguments, no state.
    unsafe { ffi::simile_nccl_built() }
}

fn world_i64(world_size: usize) -> i64 {
    i64::try_from(world_size).unwrap_or(i64::MAX)
}

/// A process group: `world_size` ranks that run collectives together. Every rank must call
/// the same collectives in the same order, with tensors of the same shapes and dtypes.
pub struct ProcessGroup {
    raw: *mut ffi::SimilePg,
    rank: usize,
    world_size: usize,
}

// SAFETY: the backend may be used from any one thread at a time (its work queue is locked).
// Not Sync: collectives issued from two threads at once could reach the ranks in different
// orders.
unsafe impl Send for ProcessGroup {}

impl ProcessGroup {
    /// A Gloo group on `store` (its keys under `prefix`, so several groups can share a store),
    /// this process being `rank` of `world_size`. `address` is this machine's address or name
    /// on the network the ranks talk over (`127.0.0.1` for one machine): one that does not
    /// resolve to a local interface is the user's error. Blocks until every rank has joined,
    /// at most `timeout`, which also bounds each collective.
    pub fn gloo(
        store: &Store,
        prefix: &str,
        rank: usize,
        world_size: usize,
        address: &str,
        timeout: Duration,
    ) -> Result<ProcessGroup> {
        let c_prefix = cstring("group prefix", prefix)?;
        let c_address = cstring("address", address)?;
        Self::create(rank, world_size, |r, n, out| {
            // SAFETY: a live store, valid strings and out pointer.
            unsafe {
                ffi::simile_pg_new_gloo(
                    store.raw,
                    c_prefix.as_ptr(),
                    r,
                    n,
                    c_address.as_ptr(),
                    millis(timeout),
                    out,
                )
            }
        })
    }

    /// An NCCL group (collectives on CUDA tensors of `cuda:device`, which becomes this
    /// thread's current device), otherwise as [`ProcessGroup::gloo`]: NCCL finds its own
    /// transport (NVLink, InfiniBand, sockets), so no address is given. The communicator is
    /// formed before this returns. Refused where libtorch has no CUDA ([`nccl_built`]).
    pub fn nccl(
        store: &Store,
        prefix: &str,
        rank: usize,
        world_size: usize,
        device: usize,
        timeout: Duration,
    ) -> Result<ProcessGroup> {
        let d = i32::try_from(device)
            .map_err(|_| Error::input(format!("cuda:{device}: no such device")))?;
        let c_prefix = cstring("group prefix", prefix)?;
        Self::create(rank, world_size, |r, n, out| {
            // SAFETY: a live store, a valid string and out pointer.
            unsafe {
                ffi::simile_pg_new_nccl(store.raw, c_prefix.as_ptr(), r, n, d, millis(timeout), out)
            }
        })
    }

    /// Checks the rank, then `make(rank, world_size, out)` calls the shim's constructor.
    fn create(
        rank: usize,
        world_size: usize,
        make: impl FnOnce(i32, i32, *mut *mut ffi::SimilePg) -> *mut ffi::SimileError,
    ) -> Result<ProcessGroup> {
        let (r, n) = match (i32::try_from(rank), i32::try_from(world_size)) {
            (Ok(r), Ok(n)) if r < n => (r, n),
            _ => {
                return Err(Error::input(format!(
                    "rank {rank} is not within a world of {world_size} ranks"
                )))
            }
        };
        let mut raw = ptr::null_mut();
        check(make(r, n, &mut raw))?;
        Ok(ProcessGroup {
            raw,
            rank,
            world_size,
        })
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world_size(&self) -> usize {
        self.world_size
    }

    /// Sums each tensor over the ranks, in place (dense tensors on the group's device: the CPU
    /// for Gloo, the group's GPU for NCCL; shapes and dtypes may differ between the tensors of
    /// the list). Runs without autograd, so parameters can be given too.
    pub fn all_reduce_sum(&self, tensors: &[Tensor]) -> Result<()> {
        let ptrs = pointers(tensors);
        // SAFETY: a live group; the tensors outlive the call (which waits for the collective).
        check(unsafe { ffi::simile_pg_allreduce_sum(self.raw, ptrs.as_ptr(), ptrs.len()) })
    }

    /// Every rank's `tensor`, in rank order (the same shape and dtype on every rank).
    pub fn all_gather(&self, tensor: &Tensor) -> Result<Vec<Tensor>> {
        let mut out: Vec<*mut C_tensor> = vec![ptr::null_mut(); self.world_size];
        // SAFETY: a live group, a live tensor, and world_size output slots.
        check(unsafe { ffi::simile_pg_allgather(self.raw, tensor.as_ptr(), out.as_mut_ptr()) })?;
        out.into_iter()
            .map(|p| {
                if p.is_null() {
                    Err(Error::internal("allgather returned no tensor"))
                } else {
                    // SAFETY: a new at::Tensor the shim handed over to us.
                    Ok(unsafe { Tensor::from_ptr(p) })
                }
            })
            .collect()
    }

    /// Copies rank `root`'s tensors over every other rank's, in place (as `all_reduce_sum`).
    pub fn broadcast(&self, tensors: &[Tensor], root: usize) -> Result<()> {
        let root = match i32::try_from(root) {
            Ok(r) if root < self.world_size => r,
            _ => {
                return Err(Error::internal(format!(
                    "broadcast from rank {root} in a world of {}",
                    self.world_size
                )))
            }
        };
        let ptrs = pointers(tensors);
        // SAFETY: as in all_reduce_sum.
        check(unsafe { ffi::simile_pg_broadcast(self.raw, ptrs.as_ptr(), ptrs.len(), root) })
    }

    /// Returns once every rank has reached it.
    pub fn barrier(&self) -> Result<()> {
        // SAFETY: a live group.
        check(unsafe { ffi::simile_pg_barrier(self.raw) })
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        // SAFETY: live and freed once. Waits for collectives in flight (bounded by the timeout).
        unsafe { ffi::simile_pg_free(self.raw) }
    }
}
