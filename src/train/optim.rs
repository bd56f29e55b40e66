//! Optimisers (Adam, AdamW, SGD with momentum) and learning-rate schedules, written here so
//! that their whole state can be checkpointed (tch's optimisers cannot save theirs).
//!
//! The update rules are PyTorch's (`torch.optim.Adam`, `AdamW`, `SGD`, default options:
//! no amsgrad, not maximising); parameters are grouped (backbone, head, loss) with a base
//! learning rate each, times the schedule's multiplier.
use super::config::{Interval, Mode, OptimizerConfig, ScheduleConfig};
use crate::error::{Error, Result};
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
                    m: None,
                    v: None,
                })
                .collect(),
        }
    }

    /// One update of every parameter with a gradient. `lrs[g]` is group g's learning rate
    /// now; `grads[i]` is parameter i's gradient (None: not updated this step).
    pub fn step(
        &mut self,
        params: &[Param],
        grads: &[Option<Tensor>],
        lrs: &[f64; 3],
    ) -> Result<()> {
        tch::no_grad(|| -> Result<()> {
            for ((p, g), slot) in params.iter().zip(grads).zip(self.slots.iter_mut()) {
                let Some(g) = g else { continue };
                let lr = lrs[p.group];
                let mut w = p.tensor.shallow_clone();
                slot.step += 1;
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
                        let decoupled = matches!(self.cfg, OptimizerConfig::Adamw { .. });
                        let g = if !decoupled && *weight_decay != 0.0 {
                            g.f_add(&w.f_mul_scalar(*weight_decay)?)?
                        } else {
                            g.shallow_clone()
                        };
                        if decoupled && *weight_decay != 0.0 {
                            let _ = w.f_mul_scalar_(1.0 - lr * weight_decay)?;
                        }
                        let m = slot.m.get_or_insert_with(|| w.zeros_like());
                        let v = slot.v.get_or_insert_with(|| w.zeros_like());
                        let _ = m.f_lerp_(&g, 1.0 - betas[0])?;
                        let _ = v.f_mul_scalar_(betas[1])?;
                        let _ = v.f_add_(&g.f_mul(&g)?.f_mul_scalar(1.0 - betas[1])?)?;
                        // In f64: the step count (from a checkpoint) may pass i32.
                        let t = slot.step as f64;
                        let bc1 = 1.0 - betas[0].powf(t);
                        let bc2 = 1.0 - betas[1].powf(t);
                        let denom = v.f_sqrt()?.f_div_scalar(bc2.sqrt())?.f_add_scalar(*eps)?;
                        let _ = w.f_sub_(&m.f_div(&denom)?.f_mul_scalar(lr / bc1)?)?;
                    }
                    OptimizerConfig::Sgd {
                        momentum,
                        dampening,
                        nesterov,
                        weight_decay,
                        ..
                    } => {
                        let mut d = if *weight_decay != 0.0 {
                            g.f_add(&w.f_mul_scalar(*weight_decay)?)?
                        } else {
                            g.shallow_clone()
                        };
                        if *momentum != 0.0 {
                            let buf = match &mut slot.m {
                                None => slot.m.insert(d.detach().copy()),
                                Some(b) => {
                                    let _ = b.f_mul_scalar_(*momentum)?;
                                    let _ = b.f_add_(&d.f_mul_scalar(1.0 - dampening)?)?;
                                    b
                                }
                            };
                            d = if *nesterov {
                                d.f_add(&buf.f_mul_scalar(*momentum)?)?
                            } else {
                                buf.shallow_clone()
                            };
                        }
                        let _ = w.f_sub_(&d.f_mul_scalar(lr)?)?;
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
            s.m = find(&format!("m.{}", p.name)).map(|t| t.to_device(dev).to_kind(Kind::Float));
            s.v = find(&format!("v.{}", p.name)).map(|t| t.to_device(dev).to_kind(Kind::Float));
        }
        Ok(())
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
    fn clipping() {
        let mut g = vec![Some(Tensor::from_slice(&[3.0f32, 4.0])), None];
        let n = clip(&mut g, 1.0, 0.0).unwrap();
        assert!((n - 5.0).abs() < 1e-6);
        let after = g[0].as_ref().unwrap().norm().double_value(&[]);
        assert!((after - 1.0).abs() < 1e-4);
    }
}
