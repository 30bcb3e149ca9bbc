//! Learning-rate schedule: linear warmup, then cosine decay to zero, exactly as
//! transformers' `get_cosine_schedule_with_warmup` (so runs compare with TRL's).

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CosineSchedule {
    pub peak_lr: f64,
    pub warmup_steps: usize,
    pub total_steps: usize,
}

impl CosineSchedule {
    /// `warmup_ratio` of `total_steps`, rounded up (as transformers does).
    pub fn new(peak_lr: f64, warmup_ratio: f64, total_steps: usize) -> Self {
        let warmup_steps = (warmup_ratio * total_steps as f64).ceil() as usize;
        Self {
            peak_lr,
            warmup_steps,
            total_steps,
        }
    }

    /// The rate of the optimizer step with 0-based index `step`.
    pub fn lr(&self, step: usize) -> f64 {
        if step < self.warmup_steps {
            return self.peak_lr * step as f64 / self.warmup_steps.max(1) as f64;
        }
        let progress = (step - self.warmup_steps) as f64
            / (self.total_steps.saturating_sub(self.warmup_steps)).max(1) as f64;
        self.peak_lr * 0.5 * (1.0 + (std::f64::consts::PI * progress.min(1.0)).cos()).max(0.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine_to_zero() {
        let s = CosineSchedule::new(1e-3, 0.1, 100);
        assert_eq!(s.warmup_steps, 10);
        assert_eq!(s.lr(0), 0.0);
        assert!((s.lr(5) - 5e-4).abs() < 1e-12);
        assert!((s.lr(10) - 1e-3).abs() < 1e-12);
        assert!((s.lr(55) - 5e-4).abs() < 1e-12, "{}", s.lr(55));
        assert!(s.lr(99) < 1e-6 && s.lr(99) > 0.0);
        let decreasing = (10..100).map(|i| s.lr(i)).collect::<Vec<_>>();
        assert!(decreasing.windows(2).all(|w| w[1] <= w[0]));
    }
}
