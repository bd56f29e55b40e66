//! Optimisers (Adam, AdamW, SGD with momentum) and learning-rate schedules, written here so
//! that their whole state can be checkpointed (tch's optimisers cannot save theirs).
//!
//! The update rules are PyTorch's (`torch.optim.Adam`, `AdamW`, `SGD`, default options:
//! no amsgrad, not maximising), run by PyTorch's own fused kernels (`fused=True`); parameters are grouped (backbone, head, loss) with a base
//! learning rate each, times the schedule's multiplier.
use super::config::{Interval, Mode, OptimizerConfig, ScheduleConfig};
use crate::error::{Error, Result};
use crate::torch_ext;
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

/// Parameter groups.
pub const GROUPS: [&str; 3] = ["backbone", "head", "loss"];

/// One optimised parameter: its name (unique across groups), group and tensor.
pub struct Param {
    pub name: String,
    pub group: usize,
    pub tensor: Tensor,
}

/// Tensors by name (a safetensors file's content).
pub type NamedTensors = Vec<(String, Tensor)>;

/// Per-parameter state.
struct Slot {
    step: u64,
    /// The step count as the fused kernels read it (a float32 scalar on the parameter's
    /// device, as torch.optim keeps it); made from `step` when first needed.
    step_t: Option<Tensor>,
    /// Adam: first moment; SGD: momentum buffer.
    m: Option<Tensor>,
    /// Adam: second moment.
    v: Option<Tensor>,
}

pub struct Optimizer {
    cfg: OptimizerConfig,
    slots: Vec<Slot>,
}

impl Optimizer {
    pub fn new(cfg: &OptimizerConfig, n_params: usize) -> Optimizer {
        Optimizer {
            cfg: cfg.clone(),
            slots: (0..n_params)
                .map(|_| Slot {
                    step: 0,
                    step_t: None,
                    m: None,
                    v: None,
                })
                .collect(),
        }
    }

    /// One update of every parameter with a gradient. `lrs[g]` is group g's learning rate
    /// now; `grads[i]` is parameter i's gradient (None: not updated this step).
    ///
    /// PyTorch's fused kernels (`torch.optim.AdamW(fused=True)` and so on): one pass over
    /// each parameter and its state, one call per group of parameters that share a
    /// learning rate (and, for SGD, whether their momentum buffers exist yet).
    pub fn step(
        &mut self,
        params: &[Param],
        grads: &[Option<Tensor>],
        lrs: &[f64; 3],
    ) -> Result<()> {
        tch::no_grad(|| -> Result<()> {
            for (group, &lr) in lrs.iter().enumerate() {
                match &self.cfg {
                    OptimizerConfig::Adam {
                        betas,
                        eps,
                        weight_decay,
                        ..
                    }
                    | OptimizerConfig::Adamw {
                        betas,
                        eps,
                        weight_decay,
                        ..
                    } => {
                        let h = torch_ext::AdamStep {
                            lr,
                            betas: *betas,
                            weight_decay: *weight_decay,
                            eps: *eps,
                            decoupled: matches!(self.cfg, OptimizerConfig::Adamw { .. }),
                        };
                        let mut lists: [Vec<Tensor>; 5] = Default::default();
                        for ((p, g), slot) in params.iter().zip(grads).zip(self.slots.iter_mut()) {
                            let Some(g) = g.as_ref().filter(|_| p.group == group) else {
                                continue;
                            };
                            let w = &p.tensor;
                            let st = step_tensor(slot, w)?;
                            let m = slot.m.get_or_insert_with(|| w.zeros_like());
                            let v = slot.v.get_or_insert_with(|| w.zeros_like());
                            slot.step += 1;
                            for (l, t) in lists.iter_mut().zip([w, g, &*m, &*v, &st]) {
                                l.push(t.shallow_clone());
                            }
                        }
                        if !lists[0].is_empty() {
                            let [p, g, m, v, s] = &lists;
                            torch_ext::fused_adam(p, g, m, v, s, h)?;
                        }
                    }
                    OptimizerConfig::Sgd {
                        momentum,
                        dampening,
                        nesterov,
                        weight_decay,
                        ..
                    } => {
                        let h = torch_ext::SgdStep {
                            lr,
                            momentum: *momentum,
                            dampening: *dampening,
                            nesterov: *nesterov,
                            weight_decay: *weight_decay,
                        };
                        // [params, grads, buffers] of parameters whose buffers exist, then of
                        // those stepped for the first time (their buffers take the gradient).
                        let mut lists: [[Vec<Tensor>; 3]; 2] = Default::default();
                        for ((p, g), slot) in params.iter().zip(grads).zip(self.slots.iter_mut()) {
                            let Some(g) = g.as_ref().filter(|_| p.group == group) else {
                                continue;
                            };
                            let w = &p.tensor;
                            let first = slot.m.is_none();
                            slot.step += 1;
                            let l = &mut lists[usize::from(first)];
                            if *momentum != 0.0 {
                                let b = slot.m.get_or_insert_with(|| w.zeros_like());
                                l[2].push(b.shallow_clone());
                            }
                            l[0].push(w.shallow_clone());
                            l[1].push(g.shallow_clone());
                        }
                        for (first, [p, g, b]) in [false, true].into_iter().zip(&lists) {
                            if !p.is_empty() {
                                torch_ext::fused_sgd(p, g, b, h, first)?;
                            }
                        }
                    }
                }
            }
            Ok(())
        })
    }

    /// The state as named tensors (`m.<param>`, `v.<param>`) and per-parameter step counts.
    pub fn state(&self, params: &[Param]) -> (NamedTensors, Vec<(String, u64)>) {
        let mut tensors = Vec::new();
        let mut steps = Vec::new();
        for (p, s) in params.iter().zip(&self.slots) {
            steps.push((p.name.clone(), s.step));
            if let Some(m) = &s.m {
                tensors.push((format!("m.{}", p.name), m.to_device(tch::Device::Cpu)));
            }
            if let Some(v) = &s.v {
                tensors.push((format!("v.{}", p.name), v.to_device(tch::Device::Cpu)));
            }
        }
        (tensors, steps)
    }

    pub fn load_state(
        &mut self,
        params: &[Param],
        tensors: &[(String, Tensor)],
        steps: &[(String, u64)],
    ) -> Result<()> {
        let find = |k: &str| tensors.iter().find(|(n, _)| n == k).map(|(_, t)| t);
        for (p, s) in params.iter().zip(self.slots.iter_mut()) {
            s.step = steps
                .iter()
                .find(|(n, _)| *n == p.name)
                .map(|(_, v)| *v)
                .ok_or_else(|| {
                    Error::input(format!(
                        "the checkpoint's optimizer state has no parameter '{}'",
                        p.name
                    ))
                })?;
            let dev = p.tensor.device();
            s.step_t = None;
            s.m = find(&format!("m.{}", p.name)).map(|t| t.to_device(dev).to_kind(Kind::Float));
            s.v = find(&format!("v.{}", p.name)).map(|t| t.to_device(dev).to_kind(Kind::Float));
        }
        Ok(())
    }
}

/// The slot's step count as a float32 scalar on `w`'s device (exact to 2^24 steps, as
/// torch.optim's own).
fn step_tensor(slot: &mut Slot, w: &Tensor) -> Result<Tensor> {
    if let Some(t) = &slot.step_t {
        return Ok(t.shallow_clone());
    }
    let t = Tensor::f_from_slice(&[slot.step as f32])?
        .f_reshape([] as [i64; 0])?
        .f_to_device(w.device())?;
    slot.step_t = Some(t.shallow_clone());
    Ok(t)
}

/// `torch.amp.GradScaler` for fp16 training (default options): the loss is multiplied by
/// `scale` before backward, so small gradients do not underflow fp16; the gradients are divided
/// back before clipping and the step. A step whose gradients hold an inf or NaN is skipped and
/// the scale halved; after 2000 good steps in a row it doubles.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LossScaler {
    pub scale: f64,
    /// Good steps since the scale last changed.
    pub growth_tracker: u64,
    /// Steps skipped for non-finite gradients, in the whole run.
    pub skipped: u64,
}

impl Default for LossScaler {
    fn default() -> Self {
        LossScaler {
            scale: 65536.0,
            growth_tracker: 0,
            skipped: 0,
        }
    }
}

impl LossScaler {
    const GROWTH: f64 = 2.0;
    const BACKOFF: f64 = 0.5;
    const INTERVAL: u64 = 2000;

    /// Divides the gradients by the scale, in place, and updates the scale; false when they
    /// hold an inf or NaN (skip this step).
    pub fn unscale(&mut self, grads: &[Option<Tensor>]) -> Result<bool> {
        let gs: Vec<Tensor> = grads.iter().flatten().map(|g| g.shallow_clone()).collect();
        let Some(dev) = gs.first().map(|g| g.device()) else {
            return Ok(true);
        };
        let scalar = |v: f32| -> Result<Tensor> {
            Ok(Tensor::f_from_slice(&[v])?
                .f_reshape([] as [i64; 0])?
                .f_to_device(dev)?)
        };
        let found = scalar(0.0)?;
        // As GradScaler: the reciprocal in f64, then rounded to f32.
        torch_ext::amp_unscale(&gs, &found, &scalar((1.0 / self.scale) as f32)?)?;
        let finite = found.f_double_value(&[])? == 0.0;
        self.update(finite);
        Ok(finite)
    }

    fn update(&mut self, finite: bool) {
        if finite {
            self.growth_tracker += 1;
            if self.growth_tracker == Self::INTERVAL {
                self.scale *= Self::GROWTH;
                self.growth_tracker = 0;
            }
        } else {
            self.scale *= Self::BACKOFF;
            self.growth_tracker = 0;
            self.skipped += 1;
        }
    }
}

/// Clips gradients in place: every element to +-`value` (if > 0), then the global L2 norm to
/// `norm` (if > 0), as `torch.nn.utils.clip_grad_value_` / `clip_grad_norm_`. Returns the
/// norm before clipping.
pub fn clip(grads: &mut [Option<Tensor>], norm: f64, value: f64) -> Result<f64> {
    tch::no_grad(|| -> Result<f64> {
        if value > 0.0 {
            for g in grads.iter_mut().flatten() {
                *g = g.f_clamp(-value, value)?;
            }
        }
        let mut total = 0f64;
        for g in grads.iter().flatten() {
            let n = g.f_norm()?.f_double_value(&[])?;
            total += n * n;
        }
        let total = total.sqrt();
        if norm > 0.0 && total > norm {
            let s = norm / (total + 1e-6);
            for g in grads.iter_mut().flatten() {
                *g = g.f_mul_scalar(s)?;
            }
        }
        Ok(total)
    })
}

/// The learning-rate schedule: a multiplier, with the plateau state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    cfg: ScheduleConfig,
    steps_per_epoch: usize,
    epochs: usize,
    /// reduce_on_plateau: the multiplier now, the best monitored value, validations without
    /// improvement.
    pub plateau_factor: f64,
    pub plateau_best: Option<f64>,
    pub plateau_bad: usize,
}

impl Schedule {
    pub fn new(cfg: &ScheduleConfig, steps_per_epoch: usize, epochs: usize) -> Schedule {
        Schedule {
            cfg: cfg.clone(),
            steps_per_epoch: steps_per_epoch.max(1),
            epochs,
            plateau_factor: 1.0,
            plateau_best: None,
            plateau_bad: 0,
        }
    }

    /// The multiplier for the step about to run: `step` steps done so far in total, `epoch`
    /// (0-based) the epoch it belongs to.
    pub fn factor(&self, step: usize, epoch: usize) -> f64 {
        let warm = (self.cfg.warmup_epochs() * self.steps_per_epoch as f64).round() as usize;
        let w = if warm > 0 && step < warm {
            (step + 1) as f64 / warm as f64
        } else {
            1.0
        };
        let unit = |interval: Interval| match interval {
            Interval::Epoch => epoch,
            Interval::Step => step,
        };
        let f = match &self.cfg {
            ScheduleConfig::Constant { .. } => 1.0,
            ScheduleConfig::Step {
                step_size,
                gamma,
                interval,
                ..
            } => gamma.powi((unit(*interval) / step_size) as i32),
            ScheduleConfig::MultiStep {
                milestones,
                gamma,
                interval,
                ..
            } => {
                let u = unit(*interval);
                gamma.powi(milestones.iter().filter(|&&m| u >= m).count() as i32)
            }
            ScheduleConfig::Cosine { min_factor, .. } => {
                let total = self.epochs * self.steps_per_epoch;
                if step < warm || total <= warm {
                    1.0
                } else {
                    let t = (step - warm) as f64 / (total - warm) as f64;
                    min_factor + (1.0 - min_factor) * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
                }
            }
            ScheduleConfig::ReduceOnPlateau { .. } => self.plateau_factor,
        };
        w * f
    }

    /// Feeds a validation result to reduce_on_plateau (`value` of its monitored key).
    pub fn observe(&mut self, value: Option<f64>, mode: Mode) {
        let ScheduleConfig::ReduceOnPlateau {
            factor,
            patience,
            threshold,
            min_factor,
            ..
        } = &self.cfg
        else {
            return;
        };
        let Some(v) = value.filter(|v| v.is_finite()) else {
            return;
        };
        let improved = match self.plateau_best {
            None => true,
            Some(b) => match mode {
                Mode::Max => v > b * (1.0 + threshold.copysign(b)),
                Mode::Min => v < b * (1.0 - threshold.copysign(b)),
            },
        };
        if improved {
            self.plateau_best = Some(v);
            self.plateau_bad = 0;
        } else {
            self.plateau_bad += 1;
            if self.plateau_bad > *patience {
                self.plateau_factor = (self.plateau_factor * factor).max(*min_factor);
                self.plateau_bad = 0;
            }
        }
    }

    /// The key reduce_on_plateau watches (None for the other schedules).
    pub fn monitor<'a>(&'a self, default: &'a str) -> Option<&'a str> {
        match &self.cfg {
            ScheduleConfig::ReduceOnPlateau { monitor, .. } => {
                Some(monitor.as_deref().unwrap_or(default))
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn adam_reference(lr: f64, steps: usize, grads: &[f64]) -> f64 {
        // torch.optim.Adam on a scalar, written out.
        let (b1, b2, eps) = (0.9f64, 0.999f64, 1e-8);
        let (mut w, mut m, mut v) = (1.0f64, 0.0, 0.0);
        for t in 1..=steps {
            let g = grads[t - 1];
            m = b1 * m + (1.0 - b1) * g;
            v = b2 * v + (1.0 - b2) * g * g;
            let mh = m / (1.0 - b1.powi(t as i32));
            let vh = (v / (1.0 - b2.powi(t as i32))).sqrt();
            w -= lr * mh / (vh + eps);
        }
        w
    }

    #[test]
    fn adam_matches_the_formula() {
        let p = Tensor::from_slice(&[1.0f32]).set_requires_grad(false);
        let params = vec![Param {
            name: "w".into(),
            group: 0,
            tensor: p.shallow_clone(),
        }];
        let mut opt = Optimizer::new(&OptimizerConfig::default(), 1);
        let grads = [0.5, -0.25, 1.0];
        for g in grads {
            opt.step(&params, &[Some(Tensor::from_slice(&[g as f32]))], &[0.1; 3])
                .unwrap();
        }
        let want = adam_reference(0.1, 3, &grads);
        assert!((p.double_value(&[0]) - want).abs() < 1e-6);
        // The state round-trips.
        let (t, s) = opt.state(&params);
        let mut o2 = Optimizer::new(&OptimizerConfig::default(), 1);
        o2.load_state(&params, &t, &s).unwrap();
        assert_eq!(o2.slots[0].step, 3);
    }

    #[test]
    fn sgd_momentum() {
        let p = Tensor::from_slice(&[0.0f32]);
        let params = vec![Param {
            name: "w".into(),
            group: 1,
            tensor: p.shallow_clone(),
        }];
        let cfg = OptimizerConfig::Sgd {
            lr: 1.0,
            momentum: 0.5,
            dampening: 0.0,
            nesterov: false,
            weight_decay: 0.0,
            lr_backbone: None,
            lr_head: None,
            lr_loss: None,
        };
        let mut opt = Optimizer::new(&cfg, 1);
        for _ in 0..2 {
            opt.step(
                &params,
                &[Some(Tensor::from_slice(&[1.0f32]))],
                &[0.0, 1.0, 0.0],
            )
            .unwrap();
        }
        // buf: 1, then 1.5; w = -1 - 1.5.
        assert!((p.double_value(&[0]) + 2.5).abs() < 1e-6);
    }

    #[test]
    fn sgd_steps_parameters_whose_momentum_starts_later() {
        // Two parameters in one group: b gets its first gradient at step 2 (a frozen backbone
        // thawing), so one fused call has buffers and another starts them.
        let (a, b) = (Tensor::from_slice(&[1.0f32]), Tensor::from_slice(&[1.0f32]));
        let params = vec![
            Param {
                name: "a".into(),
                group: 0,
                tensor: a.shallow_clone(),
            },
            Param {
                name: "b".into(),
                group: 0,
                tensor: b.shallow_clone(),
            },
        ];
        let cfg = OptimizerConfig::Sgd {
            lr: 0.1,
            momentum: 0.9,
            dampening: 0.0,
            nesterov: true,
            weight_decay: 0.5,
            lr_backbone: None,
            lr_head: None,
            lr_loss: None,
        };
        let mut opt = Optimizer::new(&cfg, 2);
        let g = |v: f32| Some(Tensor::from_slice(&[v]));
        opt.step(&params, &[g(1.0), None], &[0.1; 3]).unwrap();
        opt.step(&params, &[g(2.0), g(2.0)], &[0.1; 3]).unwrap();
        // torch.optim.SGD written out: d = g + wd w; buf = d (first) or 0.9 buf + d;
        // w -= lr (d + 0.9 buf).
        let sgd = |w: &mut f64, buf: &mut Option<f64>, g: f64| {
            let d = g + 0.5 * *w;
            let nb = match *buf {
                None => d,
                Some(b) => 0.9 * b + d,
            };
            *buf = Some(nb);
            *w -= 0.1 * (d + 0.9 * nb);
        };
        let (mut wa, mut ba, mut wb, mut bb) = (1.0, None, 1.0, None);
        sgd(&mut wa, &mut ba, 1.0);
        sgd(&mut wa, &mut ba, 2.0);
        sgd(&mut wb, &mut bb, 2.0);
        assert!((a.double_value(&[0]) - wa).abs() < 1e-6, "{a} vs {wa}");
        assert!((b.double_value(&[0]) - wb).abs() < 1e-6, "{b} vs {wb}");
        let (_, steps) = opt.state(&params);
        assert_eq!(steps, [("a".to_string(), 2), ("b".to_string(), 1)]);
    }

    #[test]
    fn adamw_groups_take_their_own_rates_and_resume() {
        // AdamW with decoupled decay, two groups at different rates, 3 steps, then the state
        // saved and loaded into a new optimizer for a 4th: equal to 4 uninterrupted steps.
        let cfg = OptimizerConfig::Adamw {
            lr: 1e-2,
            betas: [0.9, 0.999],
            eps: 1e-8,
            weight_decay: 0.1,
            lr_backbone: None,
            lr_head: None,
            lr_loss: None,
        };
        let run = |split: bool| -> Vec<f64> {
            let ts = [
                Tensor::from_slice(&[1.0f32, -2.0]),
                Tensor::from_slice(&[0.5f32]),
            ];
            let params: Vec<Param> = ts
                .iter()
                .enumerate()
                .map(|(i, t)| Param {
                    name: format!("p{i}"),
                    group: i,
                    tensor: t.shallow_clone(),
                })
                .collect();
            let mut opt = Optimizer::new(&cfg, 2);
            let lrs = [1e-2, 1e-1, 0.0];
            for k in 0..4 {
                if split && k == 3 {
                    let (t, s) = opt.state(&params);
                    opt = Optimizer::new(&cfg, 2);
                    opt.load_state(&params, &t, &s).unwrap();
                }
                let g0 = Tensor::from_slice(&[0.3f32 * (k as f32 + 1.0), -0.1]);
                let g1 = Tensor::from_slice(&[-0.7f32]);
                opt.step(&params, &[Some(g0), Some(g1)], &lrs).unwrap();
            }
            ts.iter()
                .flat_map(|t| Vec::<f32>::try_from(t).unwrap())
                .map(f64::from)
                .collect()
        };
        // torch.optim.AdamW written out, per element.
        let adamw = |w0: f64, gs: &[f64], lr: f64| {
            let (b1, b2, eps, wd) = (0.9f64, 0.999f64, 1e-8, 0.1);
            let (mut w, mut m, mut v) = (w0, 0.0, 0.0);
            for (t, g) in gs.iter().enumerate() {
                let t = (t + 1) as i32;
                w *= 1.0 - lr * wd;
                m = b1 * m + (1.0 - b1) * g;
                v = b2 * v + (1.0 - b2) * g * g;
                let mh = m / (1.0 - b1.powi(t));
                w -= lr * mh / ((v / (1.0 - b2.powi(t))).sqrt() + eps);
            }
            w
        };
        let want = [
            adamw(1.0, &[0.3, 0.6, 0.9, 1.2], 1e-2),
            adamw(-2.0, &[-0.1; 4], 1e-2),
            adamw(0.5, &[-0.7; 4], 1e-1),
        ];
        for got in [run(false), run(true)] {
            for (g, w) in got.iter().zip(want) {
                assert!((g - w).abs() < 1e-6, "{got:?} vs {want:?}");
            }
        }
    }

    #[test]
    fn schedules() {
        let c = ScheduleConfig::Cosine {
            warmup_epochs: 1.0,
            min_factor: 0.0,
        };
        let s = Schedule::new(&c, 10, 3);
        assert!((s.factor(0, 0) - 0.1).abs() < 1e-12);
        assert!((s.factor(9, 0) - 1.0).abs() < 1e-12);
        assert!((s.factor(10, 1) - 1.0).abs() < 1e-12);
        assert!((s.factor(20, 2) - 0.5).abs() < 1e-12);
        let m = ScheduleConfig::MultiStep {
            milestones: vec![1, 2],
            gamma: 0.5,
            interval: Interval::Epoch,
            warmup_epochs: 0.0,
        };
        let s = Schedule::new(&m, 10, 3);
        assert_eq!(
            [s.factor(0, 0), s.factor(10, 1), s.factor(25, 2)],
            [1.0, 0.5, 0.25]
        );
        let p = ScheduleConfig::ReduceOnPlateau {
            factor: 0.5,
            patience: 1,
            threshold: 0.0,
            min_factor: 0.0,
            monitor: None,
            warmup_epochs: 0.0,
        };
        let mut s = Schedule::new(&p, 10, 3);
        for v in [0.5, 0.4, 0.4] {
            s.observe(Some(v), Mode::Max);
        }
        assert_eq!(s.factor(0, 0), 0.5);
    }

    #[test]
    fn the_loss_scaler_unscales_skips_and_grows() {
        let mut sc = LossScaler {
            scale: 8.0,
            ..LossScaler::default()
        };
        let g = Tensor::from_slice(&[8.0f32, -16.0]);
        assert!(sc.unscale(&[Some(g.shallow_clone()), None]).unwrap());
        assert_eq!(Vec::<f32>::try_from(&g).unwrap(), [1.0, -2.0]);
        assert_eq!((sc.scale, sc.growth_tracker), (8.0, 1));
        // An inf (or NaN) anywhere: skipped, the scale halved, the tracker reset.
        let bad = Tensor::from_slice(&[1.0f32, f32::INFINITY]);
        assert!(!sc.unscale(&[Some(g), Some(bad)]).unwrap());
        assert_eq!((sc.scale, sc.growth_tracker, sc.skipped), (4.0, 0, 1));
        let nan = Tensor::from_slice(&[f32::NAN]);
        assert!(!sc.unscale(&[Some(nan)]).unwrap());
        assert_eq!(sc.scale, 2.0);
        // 2000 good steps in a row double it.
        for _ in 0..LossScaler::INTERVAL {
            sc.update(true);
        }
        assert_eq!((sc.scale, sc.growth_tracker), (4.0, 0));
    }

    #[test]
    fn clipping() {
        let mut g = vec![Some(Tensor::from_slice(&[3.0f32, 4.0])), None];
        let n = clip(&mut g, 1.0, 0.0).unwrap();
        assert!((n - 5.0).abs() < 1e-6);
        let after = g[0].as_ref().unwrap().norm().double_value(&[]);
        assert!((after - 1.0).abs() < 1e-4);
    }
}
