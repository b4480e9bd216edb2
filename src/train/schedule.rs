//! Learning-rate schedule: linear warm-up, then cosine decay (open_clip `scheduler.py`
//! `cosine_lr`, with an optional floor).

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Schedule {
    pub base_lr: f64,
    pub min_lr: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
}

impl Schedule {
    /// The rate for (0-based) `step`: base·(step+1)/warmup during warm-up, then
    /// min + ½(1 + cos(π·e/E))·(base − min) with e steps past warm-up out of E.
    pub fn lr(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.base_lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let e = (step - self.warmup_steps) as f64;
        let es = self.total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
        let cos = 0.5 * (1.0 + (std::f64::consts::PI * e / es).cos());
        self.min_lr + cos * (self.base_lr - self.min_lr)
    }
}

#[cfg(test)]
mod tests {
    use super::Schedule;

    #[test]
    fn warmup_then_cosine() {
        let s = Schedule {
            base_lr: 1.0,
            min_lr: 0.0,
            warmup_steps: 4,
            total_steps: 12,
        };
        // Hand-derived: warm-up 1/4, 2/4, 3/4, 4/4; then 0.5(1+cos(π e/8)).
        let want = [
            0.25,
            0.5,
            0.75,
            1.0,
            1.0,
            0.961_939_766,
            0.853_553_390,
            0.691_341_716,
            0.5,
        ];
        for (k, w) in want.iter().enumerate() {
            assert!(
                (s.lr(k as u64) - w).abs() < 1e-8,
                "step {k}: {} vs {w}",
                s.lr(k as u64)
            );
        }
        assert!(s.lr(12).abs() < 1e-12);
        let floor = Schedule { min_lr: 0.1, ..s };
        assert!((floor.lr(8) - (0.1 + 0.5 * 0.9)).abs() < 1e-12);
    }
}
