//! kiln's learning-rate schedule as burn-optim's `LrScheduler`, so that the native
//! loop steps every run's rate the same way: a user's scheduler, or this one.

use burn::optim::lr_scheduler::LrScheduler;
use burn::prelude::Backend;
use kiln_core::LrSchedule;

/// The rate of each optimizer step under `schedule` (`OptimizerConfig::lr` and
/// `schedule`), for a run of `total` steps. Its record is the number of steps
/// taken.
#[derive(Debug, Clone)]
pub(crate) struct KilnSchedule {
    base_lr: f64,
    schedule: LrSchedule,
    total: u64,
    steps: u64,
}

impl KilnSchedule {
    /// The schedule of a run of `total` steps, `steps` of which are taken already
    /// (a resumed run).
    pub fn new(base_lr: f64, schedule: LrSchedule, total: u64, steps: u64) -> Self {
        Self {
            base_lr,
            schedule,
            total,
            steps,
        }
    }
}

impl LrScheduler for KilnSchedule {
    type Record<B: Backend> = u64;

    fn step(&mut self) -> f64 {
        let lr = self.schedule.lr_at(self.base_lr, self.steps, self.total);
        self.steps += 1;
        lr
    }

    fn to_record<B: Backend>(&self) -> u64 {
        self.steps
    }

    fn load_record<B: Backend>(mut self, steps: u64) -> Self {
        self.steps = steps;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_backend_cpu::NdArray;

    #[test]
    fn steps_follow_the_schedule_and_resume_from_the_record() {
        let schedule = LrSchedule::WarmupCosine {
            warmup_steps: 3,
            min_lr_ratio: 0.1,
        };
        let mut whole = KilnSchedule::new(1.0, schedule, 10, 0);
        let rates: Vec<f64> = (0..10).map(|_| whole.step()).collect();
        let want: Vec<f64> = (0..10).map(|s| schedule.lr_at(1.0, s, 10)).collect();
        assert_eq!(rates, want);

        let mut first = KilnSchedule::new(1.0, schedule, 10, 0);
        (0..4).for_each(|_| {
            first.step();
        });
        let record = first.to_record::<NdArray>();
        let mut resumed = KilnSchedule::new(1.0, schedule, 10, 0).load_record::<NdArray>(record);
        let rest: Vec<f64> = (4..10).map(|_| resumed.step()).collect();
        assert_eq!(rest, want[4..]);
    }
}
