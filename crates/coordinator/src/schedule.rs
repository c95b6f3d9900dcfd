//! kiln's learning-rate schedule as burn-optim's `LrScheduler`, so that the native
//! loop steps every run's rate the same way: a user's scheduler, or this one.

use burn::optim::lr_scheduler::LrScheduler;
use burn::prelude::Backend;
use kiln_core::LrSchedule;

/// kiln's schedule (`LrSchedule`: constant, or linear warm-up then cosine decay to
/// a fraction of the base rate) as burn-optim's `LrScheduler`: the rate of each
/// optimizer step of a run of `total_steps` steps. The simple path's runs use it;
/// a run through `fit` may pass it like any burn-optim scheduler. Its record is the
/// number of steps taken, so it resumes exactly.
///
/// ```
/// use burn::optim::lr_scheduler::LrScheduler;
/// use kiln_coordinator::KilnSchedule;
/// use kiln_core::LrSchedule;
///
/// let schedule = LrSchedule::WarmupCosine { warmup_steps: 2, min_lr_ratio: 0.1 };
/// let mut scheduler = KilnSchedule::new(1e-3, schedule, 10);
/// let rates: Vec<f64> = (0..10).map(|_| scheduler.step()).collect();
/// assert!(rates[0] < rates[1] && rates[1] <= 1e-3 && rates[9] < rates[2]);
/// ```
#[derive(Debug, Clone)]
pub struct KilnSchedule {
    base_lr: f64,
    schedule: LrSchedule,
    total: u64,
    steps: u64,
}

impl KilnSchedule {
    /// `schedule` from `base_lr` over a run of `total_steps` optimizer steps.
    pub fn new(base_lr: f64, schedule: LrSchedule, total_steps: u64) -> Self {
        Self {
            base_lr,
            schedule,
            total: total_steps,
            steps: 0,
        }
    }

    /// The same schedule with `steps` of its steps taken already (a resumed run
    /// whose checkpoint holds no scheduler record).
    pub(crate) fn starting_at(self, steps: u64) -> Self {
        Self { steps, ..self }
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
        let mut whole = KilnSchedule::new(1.0, schedule, 10);
        let rates: Vec<f64> = (0..10).map(|_| whole.step()).collect();
        let want: Vec<f64> = (0..10).map(|s| schedule.lr_at(1.0, s, 10)).collect();
        assert_eq!(rates, want);

        let mut first = KilnSchedule::new(1.0, schedule, 10);
        (0..4).for_each(|_| {
            first.step();
        });
        let record = first.to_record::<NdArray>();
        let mut resumed = KilnSchedule::new(1.0, schedule, 10).load_record::<NdArray>(record);
        let rest: Vec<f64> = (4..10).map(|_| resumed.step()).collect();
        assert_eq!(rest, want[4..]);
        let mut started = KilnSchedule::new(1.0, schedule, 10).starting_at(4);
        let again: Vec<f64> = (4..10).map(|_| started.step()).collect();
        assert_eq!(again, want[4..]);
    }
}
