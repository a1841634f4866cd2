//! Counters of the decoding steps the engine thread runs, read by the worker's `/metrics` and by the
//! batching benchmark (the share of a step that constrained decoding takes).
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

#[derive(Debug, Default)]
pub struct DecodeStats {
    steps: AtomicU64,
    tokens: AtomicU64,
    step_nanos: AtomicU64,
    constrained_tokens: AtomicU64,
    constraint_nanos: AtomicU64,
}

/// The counters at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct DecodeStatsSnapshot {
    /// Decoding steps run (one forward for every running answer, then each answer's choice).
    pub steps: u64,
    /// Tokens those steps generated (one per running answer per step).
    pub tokens: u64,
    /// Their time, forward and choices.
    pub step_seconds: f64,
    /// Tokens chosen under a constraint.
    pub constrained_tokens: u64,
    /// The constraints' share of the steps' time: masks and advances.
    pub constraint_seconds: f64,
}

/// What one step did, gathered while its rows choose.
#[derive(Debug, Default)]
pub(super) struct StepTally {
    pub tokens: u64,
    pub constrained_tokens: u64,
    pub constraint_time: Duration,
}

impl DecodeStats {
    pub(super) fn record(&self, tally: &StepTally, step_time: Duration) {
        self.steps.fetch_add(1, Ordering::Relaxed);
        self.tokens.fetch_add(tally.tokens, Ordering::Relaxed);
        self.step_nanos.fetch_add(nanos(step_time), Ordering::Relaxed);
        self.constrained_tokens.fetch_add(tally.constrained_tokens, Ordering::Relaxed);
        self.constraint_nanos.fetch_add(nanos(tally.constraint_time), Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> DecodeStatsSnapshot {
        let seconds = |n: &AtomicU64| n.load(Ordering::Relaxed) as f64 / 1e9;
        DecodeStatsSnapshot {
            steps: self.steps.load(Ordering::Relaxed),
            tokens: self.tokens.load(Ordering::Relaxed),
            step_seconds: seconds(&self.step_nanos),
            constrained_tokens: self.constrained_tokens.load(Ordering::Relaxed),
            constraint_seconds: seconds(&self.constraint_nanos),
        }
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}
