//! The shim on real values: two ranks as two threads of this process (rank 0 serves the store
//! on a loopback port bound before either starts), failures bounded in time, autocast.
use std::net::TcpListener;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use tch::{Device, Kind, Tensor};

use super::{AutocastGuard, ProcessGroup, Store};
use crate::Error;

const LOOPBACK: &str = "127.0.0.1";
/// For what must succeed: generous, as the machine may be busy; success takes milliseconds.
const OK_TIMEOUT: Duration = Duration::from_secs(20);
/// For what must fail: the failure must come within it (plus slack), never hang.
const FAIL_TIMEOUT: Duration = Duration::from_millis(1500);
const SLACK: Duration = Duration::from_secs(3);

/// Runs `f(rank, store)` on two threads, one per rank, each with its own store client (rank
/// 0's serves it), and returns their results in rank order.
fn two_ranks<R: Send>(timeout: Duration, f: impl Fn(usize, Store) -> R + Sync) -> Vec<R> {
    let listener = TcpListener::bind((LOOPBACK, 0)).expect("bind a loopback port");
    let port = listener.local_addr().expect("local address").port();
    let mut listener = Some(listener);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..2)
            .map(|rank| {
                let f = &f;
                let listener = if rank == 0 { listener.take() } else { None };
                s.spawn(move || {
                    let store = match listener {
                        Some(l) => Store::server_on(l, 2, timeout, false),
                        None => Store::client(LOOPBACK, port, 2, timeout),
                    }
                    .expect("store");
                    f(rank, store)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("rank thread panicked"))
            .collect()
    })
}

fn values_f32(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(t.flatten(0, -1)).expect("f32 values")
}

fn values_i64(t: &Tensor) -> Vec<i64> {
    Vec::<i64>::try_from(t.flatten(0, -1)).expect("i64 values")
}

fn group(store: &Store, rank: usize, timeout: Duration) -> ProcessGroup {
    ProcessGroup::gloo(store, "test", rank, 2, LOOPBACK, timeout).expect("process group")
}

#[test]
fn collectives_on_two_ranks() {
    let results = two_ranks(OK_TIMEOUT, |rank, store| {
        let pg = group(&store, rank, OK_TIMEOUT);
        assert_eq!((pg.rank(), pg.world_size()), (rank, 2));
        let r = rank as f32;

        // all_reduce_sum: each tensor on its own, whatever its dtype, shape and strides.
        let a = Tensor::from_slice(&[1.0f32 + r, 2.0, 3.0 * (r + 1.0)]);
        let b = Tensor::from_slice(&[10i64 * (rank as i64 + 1); 4]).view([2, 2]);
        let c = (Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0]) * f64::from(r + 1.0))
            .view([2, 3])
            .tr();
        assert!(!c.is_contiguous());
        pg.all_reduce_sum(&[a.shallow_clone(), b.shallow_clone(), c.shallow_clone()])
            .expect("all_reduce_sum");
        assert_eq!(values_f32(&a), [3.0, 4.0, 9.0]);
        assert_eq!(values_i64(&b), [30, 30, 30, 30]);
        assert_eq!(c.size(), [3, 2]);
        assert_eq!(values_f32(&c), [3.0, 12.0, 6.0, 15.0, 9.0, 18.0]);

        // all_gather: rank order.
        let mine = Tensor::from_slice(&[10.0f32 * r, 10.0 * r + 1.0]).view([1, 2]);
        let all = pg.all_gather(&mine).expect("all_gather");
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].size(), [1, 2]);
        assert_eq!(values_f32(&all[0]), [0.0, 1.0]);
        assert_eq!(values_f32(&all[1]), [10.0, 11.0]);

        // broadcast from rank 1, a parameter (a leaf that requires grad) among the tensors.
        let p = Tensor::from_slice(&[100.0f32 * (r + 1.0); 3]).set_requires_grad(true);
        let q = Tensor::from_slice(&[rank as i64 + 7; 2]);
        let p2 = Tensor::from_slice(&[r, -r]);
        pg.broadcast(
            &[p.shallow_clone(), q.shallow_clone(), p2.shallow_clone()],
            1,
        )
        .expect("broadcast");
        assert_eq!(values_f32(&p.detach()), [200.0; 3]);
        assert_eq!(values_i64(&q), [8, 8]);
        assert_eq!(values_f32(&p2), [1.0, -1.0]);
        assert!(p.requires_grad());

        pg.barrier().expect("barrier");

        // The store: one rank's value seen by the other; a counter both add to.
        if rank == 0 {
            store.set("from-0", b"hello").expect("set");
        }
        let got = store.get("from-0", OK_TIMEOUT).expect("get");
        let n = store.add("count", 5).expect("add");
        pg.barrier().expect("barrier");
        let total = store.add("count", 0).expect("add 0");
        (got, n, total)
    });
    for (got, _, total) in &results {
        assert_eq!(got, b"hello");
        assert_eq!(*total, 10);
    }
    let mut firsts: Vec<i64> = results.iter().map(|r| r.1).collect();
    firsts.sort();
    assert_eq!(firsts, [5, 10]);
}

#[test]
fn world_of_one() {
    let listener = TcpListener::bind((LOOPBACK, 0)).expect("bind");
    let store = Store::server_on(listener, 1, OK_TIMEOUT, true).expect("store");
    let pg = ProcessGroup::gloo(&store, "solo", 0, 1, LOOPBACK, OK_TIMEOUT).expect("group");
    let t = Tensor::from_slice(&[1.5f32, -2.0]);
    pg.all_reduce_sum(&[t.shallow_clone()])
        .expect("all_reduce_sum");
    assert_eq!(values_f32(&t), [1.5, -2.0]);
    let all = pg.all_gather(&t).expect("all_gather");
    assert_eq!(all.len(), 1);
    assert_eq!(values_f32(&all[0]), [1.5, -2.0]);
}

fn assert_distributed_within(res: crate::Result<()>, started: Instant, bound: Duration) {
    let elapsed = started.elapsed();
    match res {
        Err(e @ Error::Distributed(_)) => assert_eq!(e.exit_code(), 1, "{e}"),
        other => panic!("expected a Distributed error, got {other:?}"),
    }
    assert!(elapsed < bound, "took {elapsed:?}, more than {bound:?}");
}

#[test]
fn a_rank_that_never_joins_fails_the_other_in_time() {
    let done = Barrier::new(2);
    two_ranks(FAIL_TIMEOUT, |rank, _store| {
        if rank == 1 {
            // Connected to the store, never forms the group; waits until rank 0 is done.
            done.wait();
            return;
        }
        let started = Instant::now();
        let res = ProcessGroup::gloo(&_store, "test", 0, 2, LOOPBACK, FAIL_TIMEOUT).map(drop);
        let elapsed = started.elapsed();
        done.wait();
        assert_distributed_within(res, started, FAIL_TIMEOUT + SLACK);
        assert!(elapsed >= FAIL_TIMEOUT / 2, "failed early: {elapsed:?}");
    });
}

#[test]
fn a_dropped_peer_fails_the_next_collective_at_once() {
    let dropped = Barrier::new(2);
    two_ranks(OK_TIMEOUT, |rank, store| {
        let pg = group(&store, rank, FAIL_TIMEOUT);
        let t = Tensor::from_slice(&[1.0f32]);
        pg.all_reduce_sum(&[t.shallow_clone()])
            .expect("first all_reduce_sum");
        assert_eq!(values_f32(&t), [2.0]);
        if rank == 1 {
            drop(pg);
            dropped.wait();
            return;
        }
        dropped.wait();
        let started = Instant::now();
        let res = pg.all_reduce_sum(&[t.shallow_clone()]);
        // A closed connection is noticed at once, well before the timeout.
        assert_distributed_within(res, started, FAIL_TIMEOUT);
        let started = Instant::now();
        assert_distributed_within(pg.barrier(), started, FAIL_TIMEOUT + SLACK);
    });
}

#[test]
fn a_peer_that_never_calls_fails_the_collective_at_the_timeout() {
    let done = Barrier::new(2);
    two_ranks(OK_TIMEOUT, |rank, store| {
        let pg = group(&store, rank, FAIL_TIMEOUT);
        if rank == 0 {
            let started = Instant::now();
            let t = Tensor::from_slice(&[1.0f32]);
            let res = pg.all_reduce_sum(&[t]);
            let elapsed = started.elapsed();
            // Our wait's message or Gloo's own, whichever timer fires first.
            assert!(
                matches!(&res, Err(Error::Distributed(m))
                    if m.contains("within") || m.contains("Timed out")),
                "{res:?}"
            );
            assert_distributed_within(res, started, FAIL_TIMEOUT + SLACK);
            assert!(elapsed >= FAIL_TIMEOUT / 2, "failed early: {elapsed:?}");
        }
        // Rank 1 stays alive (and silent) until rank 0 has given up.
        done.wait();
    });
}

#[test]
fn store_get_of_a_missing_key_times_out() {
    let listener = TcpListener::bind((LOOPBACK, 0)).expect("bind");
    let store = Store::server_on(listener, 1, OK_TIMEOUT, false).expect("store");
    let started = Instant::now();
    let res = store.get("never-set", Duration::from_millis(300)).map(drop);
    assert_distributed_within(res, started, Duration::from_millis(300) + SLACK);
}

#[test]
fn a_port_in_use_and_a_foreign_address_are_the_users_errors() {
    let first = Store::new(LOOPBACK, 0, 1, true, OK_TIMEOUT, false).expect("first store");
    let port = first.port();
    assert_ne!(port, 0);
    match Store::new(LOOPBACK, port, 1, true, OK_TIMEOUT, false) {
        Err(e @ Error::Input(_)) => {
            assert_eq!(e.exit_code(), 2);
            assert!(e.to_string().contains("in use"), "{e}");
        }
        other => panic!("expected an Input error, got {:?}", other.map(|s| s.port())),
    }
    match Store::client("no-such-host.invalid", port, 2, FAIL_TIMEOUT) {
        Err(e @ Error::Input(_)) => assert_eq!(e.exit_code(), 2),
        other => panic!("expected an Input error, got {:?}", other.map(|s| s.port())),
    }
    // 192.0.2.1 (TEST-NET-1) is no interface of this machine.
    match ProcessGroup::gloo(&first, "foreign", 0, 1, "192.0.2.1", FAIL_TIMEOUT) {
        Err(e @ Error::Input(_)) => assert!(e.to_string().contains("192.0.2.1"), "{e}"),
        other => panic!("expected an Input error, got {:?}", other.map(|g| g.rank())),
    }
    assert!(matches!(
        ProcessGroup::gloo(&first, "bad-rank", 1, 1, LOOPBACK, FAIL_TIMEOUT),
        Err(Error::Input(_))
    ));
}

#[test]
fn autocast_runs_matmul_in_bf16_inside_and_f32_outside() {
    let x = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0]).view([2, 2]);
    let w = Tensor::from_slice(&[0.5f32, -1.0, 2.0, 0.25]).view([2, 2]);
    let expected = [4.5f32, -0.5, 9.5, -2.0];
    assert_eq!(x.matmul(&w).kind(), Kind::Float);
    {
        let _outer = AutocastGuard::new(Device::Cpu, Kind::BFloat16).expect("autocast");
        let y = x.matmul(&w);
        assert_eq!(y.kind(), Kind::BFloat16);
        // These values are exact in bf16.
        assert_eq!(values_f32(&y.to_kind(Kind::Float)), expected);
        {
            let _inner = AutocastGuard::new(Device::Cpu, Kind::Half).expect("nested autocast");
            assert_eq!(x.matmul(&w).kind(), Kind::Half);
        }
        assert_eq!(x.matmul(&w).kind(), Kind::BFloat16);
        // Ops autocast keeps in f32 are unaffected.
        assert_eq!((x.shallow_clone() + 1.0).kind(), Kind::Float);
    }
    let y = x.matmul(&w);
    assert_eq!(y.kind(), Kind::Float);
    assert_eq!(values_f32(&y), expected);
}

#[test]
fn autocast_sees_weights_changed_between_regions() {
    // Autocast caches the bf16 copy of a leaf weight that requires grad (and is no view);
    // leaving the outermost region must drop it, or the next region multiplies with the weight
    // from before the step.
    let x = Tensor::from_slice(&[1.0f32, 1.0]).view([1, 2]);
    let mut w = Tensor::from_slice(&[1.0f32, 2.0])
        .view([2, 1])
        .copy()
        .set_requires_grad(true);
    assert!(w.is_leaf());
    {
        let _g = AutocastGuard::new(Device::Cpu, Kind::BFloat16).expect("autocast");
        assert_eq!(
            values_f32(&x.matmul(&w).detach().to_kind(Kind::Float)),
            [3.0]
        );
    }
    tch::no_grad(|| {
        let _ = w.fill_(4.0);
    });
    {
        let _g = AutocastGuard::new(Device::Cpu, Kind::BFloat16).expect("autocast");
        assert_eq!(
            values_f32(&x.matmul(&w).detach().to_kind(Kind::Float)),
            [8.0]
        );
    }
}

#[test]
fn autocast_refuses_what_it_cannot_do() {
    assert!(matches!(
        AutocastGuard::new(Device::Cpu, Kind::Int64),
        Err(Error::Internal(_))
    ));
    assert!(matches!(
        AutocastGuard::new(Device::Mps, Kind::BFloat16),
        Err(Error::Device(_))
    ));
    // Nothing was left enabled by the refusals.
    let x = Tensor::ones([2, 2], (Kind::Float, Device::Cpu));
    assert_eq!(x.matmul(&x).kind(), Kind::Float);
}

/// The NCCL backend is linked where libtorch has CUDA; without a GPU it refuses clearly (exit
/// 2, naming the device) instead of failing inside NCCL. Where a GPU is lent, world size 1
/// forms a group and sums on the GPU (scripts/gpu-check runs this test there).
#[test]
fn nccl_group_on_the_machines_gpus() {
    let listener = TcpListener::bind((LOOPBACK, 0)).expect("bind a loopback port");
    let store = Store::server_on(listener, 1, OK_TIMEOUT, false).expect("store");
    let built = super::nccl_built();
    let gpus = tch::Cuda::device_count();
    let made = ProcessGroup::nccl(&store, "nccl", 0, 1, 0, OK_TIMEOUT);
    match (built, gpus) {
        (false, _) => {
            let e = made.err().expect("no NCCL in this build: refused");
            assert_eq!(e.exit_code(), 2, "{e}");
            assert!(e.to_string().contains("without CUDA"), "{e}");
        }
        (true, 0) => {
            let e = made.err().expect("no GPU: refused");
            assert_eq!(e.exit_code(), 2, "{e}");
            assert!(e.to_string().contains("cuda:0 does not exist"), "{e}");
        }
        (true, _) => {
            let pg = made.expect("an NCCL group of one rank on cuda:0");
            let t = Tensor::from_slice(&[1.0f32, 2.0, 3.0]).to_device(Device::Cuda(0));
            pg.all_reduce_sum(std::slice::from_ref(&t)).expect("sum");
            assert_eq!(values_f32(&t.to_device(Device::Cpu)), [1.0, 2.0, 3.0]);
            let got = pg.all_gather(&t).expect("gather");
            assert_eq!(got.len(), 1);
            assert_eq!(got[0].device(), Device::Cuda(0));
            pg.barrier().expect("barrier");
            // A CPU tensor given to an NCCL group is simile's bug, reported, not a crash.
            let cpu = Tensor::from_slice(&[1.0f32]);
            let e = pg.all_reduce_sum(&[cpu]).unwrap_err();
            assert!(
                e.to_string().to_lowercase().contains("works on cuda"),
                "{e}"
            );
        }
    }
}

/// A dynamic int8 linear layer against its float32 layer on the same weights: the error is
/// what 8-bit weights and 7-bit activations leave (each term off by at most half a step of
/// each), not zero, and a bias-less layer works too.
#[test]
fn int8_linear_is_the_float_layer_within_its_quantization_error() {
    use super::QLinear;
    tch::manual_seed(0);
    let vs = tch::nn::VarStore::new(Device::Cpu);
    for bias in [true, false] {
        let cfg = tch::nn::LinearConfig {
            bias,
            ..Default::default()
        };
        let lin = tch::nn::linear(vs.root() / format!("l{bias}"), 96, 48, cfg);
        let x = Tensor::randn([2, 7, 96], (Kind::Float, Device::Cpu));
        let q = QLinear::new(&lin).unwrap();
        let (got, want) = tch::no_grad(|| (q.forward(&x).unwrap(), x.apply(&lin)));
        assert_eq!(got.size(), [2, 7, 48]);
        assert_eq!(got.kind(), Kind::Float);
        // Per output: |sum_k x_k w_k - sum_k qx_k qw_k| <= sum_k (|x_k| dw + |w_k| dx + dx dw),
        // with half a step of each: dw = max|w| / 127.5 / 2, dx = range(x) / 127 / 2.
        let dw = lin.ws.abs().max().double_value(&[]) / 127.5 / 2.0;
        let dx = (x.max() - x.min()).double_value(&[]) / 127.0 / 2.0;
        let bound = x.abs().sum_dim_intlist(-1, true, Kind::Float) * dw
            + lin.ws.abs().sum_dim_intlist(-1, false, Kind::Float) * dx
            + 96.0 * dx * dw;
        let err = (&got - &want).abs();
        let over = (&err - &bound).max().double_value(&[]);
        assert!(over <= 1e-5, "error above the bound by {over}");
        let rel = (err.max() / want.abs().max()).double_value(&[]);
        assert!(
            rel > 1e-4,
            "int8 gave float32's result (relative error {rel})"
        );
        assert!(rel < 0.05, "relative error {rel}");
    }
}
