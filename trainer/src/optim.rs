//! AdamW with decoupled weight decay, a warmup + cosine learning-rate schedule, and
//! global-norm gradient clipping. Written here rather than taken from libtorch so that
//! its state (moments, step) is ours to save and restore: a resumed run continues with
//! exactly the losses it would have had.

use std::collections::BTreeMap;
use std::path::Path;

use tch::{Kind, Tensor};

/// AdamW hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 }
    }
}

/// Linear warmup to `base` over `warmup` steps, then cosine decay to `base * min_ratio`
/// at `total`.
pub fn learning_rate(step: usize, base: f64, warmup: usize, total: usize, min_ratio: f64) -> f64 {
    if step < warmup {
        return base * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1);
    let progress = ((step - warmup) as f64 / span as f64).min(1.0);
    let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
    base * (min_ratio + (1.0 - min_ratio) * cosine)
}

/// Scales all gradients so their global L2 norm is at most `max_norm`; returns the norm
/// before clipping.
pub fn clip_grad_norm(params: &[(String, Tensor)], max_norm: f64) -> f64 {
    let grads: Vec<Tensor> = params.iter().map(|(_, p)| p.grad()).filter(Tensor::defined).collect();
    let norm = grads
        .iter()
        .map(|g| g.to_kind(Kind::Float).pow_tensor_scalar(2).sum(Kind::Float).double_value(&[]))
        .sum::<f64>()
        .sqrt();
    if norm > max_norm {
        let scale = max_norm / (norm + 1e-6);
        tch::no_grad(|| {
            grads.iter().for_each(|g| {
                let _ = g.shallow_clone().g_mul_scalar_(scale);
            })
        });
    }
    norm
}

/// AdamW over named parameters (those with `requires_grad`). Parameters kept in bf16 or
/// fp16 get an f32 master copy that takes the updates (small updates would otherwise
/// round away); the parameter is refreshed from it after each step.
pub struct AdamW {
    config: AdamWConfig,
    params: Vec<(String, Tensor)>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    master: Vec<Option<Tensor>>,
    step: i64,
}

impl AdamW {
    pub fn new(params: Vec<(String, Tensor)>, config: AdamWConfig) -> Self {
        let zeros = |p: &Tensor| p.zeros_like().to_kind(Kind::Float);
        let m = params.iter().map(|(_, p)| zeros(p)).collect();
        let v = params.iter().map(|(_, p)| zeros(p)).collect();
        let master = params
            .iter()
            .map(|(_, p)| (p.kind() != Kind::Float).then(|| p.detach().to_kind(Kind::Float)))
            .collect();
        Self { config, params, m, v, master, step: 0 }
    }

    pub fn params(&self) -> &[(String, Tensor)] {
        &self.params
    }

    pub fn zero_grad(&mut self) {
        for (_, p) in &self.params {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
    }

    /// One update with learning rate `lr`.
    pub fn step(&mut self, lr: f64) {
        self.step += 1;
        let c = self.config;
        let bias1 = 1.0 - c.beta1.powi(self.step as i32);
        let bias2 = 1.0 - c.beta2.powi(self.step as i32);
        tch::no_grad(|| {
            for (i, (_, p)) in self.params.iter().enumerate() {
                let g = p.grad();
                if !g.defined() {
                    continue;
                }
                let g = g.to_kind(Kind::Float);
                let (m, v) = (&mut self.m[i], &mut self.v[i]);
                *m = &*m * c.beta1 + &g * (1.0 - c.beta1);
                *v = &*v * c.beta2 + g.pow_tensor_scalar(2) * (1.0 - c.beta2);
                let update = (&*m / bias1) / ((&*v / bias2).sqrt() + c.eps);
                let mut w = self.master[i].as_ref().unwrap_or(p).shallow_clone();
                if c.weight_decay > 0.0 {
                    let _ = w.g_mul_scalar_(1.0 - lr * c.weight_decay);
                }
                let _ = w.g_sub_(&(update * lr));
                if self.master[i].is_some() {
                    p.shallow_clone().copy_(&w);
                }
            }
        });
    }

    /// Saves moments and step next to a checkpoint.
    pub fn save(&self, path: &Path) -> Result<(), tch::TchError> {
        let mut named: Vec<(String, Tensor)> = Vec::with_capacity(2 * self.params.len() + 1);
        for (i, (name, _)) in self.params.iter().enumerate() {
            named.push((format!("m.{name}"), self.m[i].shallow_clone()));
            named.push((format!("v.{name}"), self.v[i].shallow_clone()));
            if let Some(w) = &self.master[i] {
                named.push((format!("w.{name}"), w.shallow_clone()));
            }
        }
        named.push(("step".into(), Tensor::from_slice(&[self.step])));
        Tensor::write_safetensors(&named, path)
    }

    /// Restores what [`AdamW::save`] wrote, for the same parameters.
    pub fn load(&mut self, path: &Path) -> Result<(), String> {
        let saved: BTreeMap<String, Tensor> =
            Tensor::read_safetensors(path).map_err(|e| e.to_string())?.into_iter().collect();
        let get = |k: &str| saved.get(k).ok_or_else(|| format!("{}: no `{k}`", path.display()));
        for (i, (name, _)) in self.params.iter().enumerate() {
            self.m[i] = get(&format!("m.{name}"))?.shallow_clone();
            self.v[i] = get(&format!("v.{name}"))?.shallow_clone();
            if self.master[i].is_some() {
                let w = get(&format!("w.{name}"))?.shallow_clone();
                tch::no_grad(|| self.params[i].1.shallow_clone().copy_(&w));
                self.master[i] = Some(w);
            }
        }
        self.step = get("step")?.int64_value(&[0]);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_then_decays() {
        let lr = |s| learning_rate(s, 1.0, 10, 110, 0.1);
        assert!((lr(0) - 0.1).abs() < 1e-12);
        assert!((lr(9) - 1.0).abs() < 1e-12);
        assert!((lr(10) - 1.0).abs() < 1e-12);
        assert!((lr(60) - 0.55).abs() < 1e-12);
        assert!((lr(110) - 0.1).abs() < 1e-12);
    }

    #[test]
    fn adamw_minimises_a_quadratic() {
        let x = Tensor::from_slice(&[3.0f32, -2.0]).set_requires_grad(true);
        let mut opt = AdamW::new(vec![("x".into(), x.shallow_clone())], AdamWConfig::default());
        for _ in 0..300 {
            opt.zero_grad();
            (&x * &x).sum(Kind::Float).backward();
            opt.step(0.05);
        }
        let v: Vec<f32> = Vec::try_from(x.detach()).unwrap();
        assert!(v.iter().all(|a| a.abs() < 0.05), "{v:?}");
    }
}
