//! A circuit breaker per replica. Closed: calls flow, outcomes are counted. Open (after
//! `failures` consecutive failures, or a failure share of at least `ratio` among the last
//! `window` calls): the replica gets no calls for `cooldown`. Half-open: one probe call at a
//! time is let through; its success closes the breaker, its failure opens it again.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use concord_config::RoutingSettings;
use parking_lot::Mutex;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

impl BreakerState {
    pub fn label(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct BreakerPolicy {
    pub failures: u32,
    pub ratio: f64,
    pub window: usize,
    pub cooldown: Duration,
}

impl From<&RoutingSettings> for BreakerPolicy {
    fn from(settings: &RoutingSettings) -> Self {
        Self {
            failures: settings.breaker_failures,
            ratio: settings.breaker_failure_ratio,
            window: settings.breaker_window as usize,
            cooldown: settings.breaker_cooldown,
        }
    }
}

impl Default for BreakerPolicy {
    fn default() -> Self {
        (&RoutingSettings::default()).into()
    }
}

struct Inner {
    state: BreakerState,
    consecutive_failures: u32,
    /// Outcomes of the latest calls while closed (true: failed), at most `window`.
    recent: VecDeque<bool>,
    opened_at: Instant,
    probe_in_flight: bool,
}

pub(crate) struct Breaker {
    policy: BreakerPolicy,
    inner: Mutex<Inner>,
}

/// Permission to send one call to the replica. A probe must report its outcome (or be
/// dropped, which lets the next probe through).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pass {
    Normal,
    Probe,
}

impl Breaker {
    pub fn new(policy: BreakerPolicy) -> Self {
        Self {
            policy,
            inner: Mutex::new(Inner {
                state: BreakerState::Closed,
                consecutive_failures: 0,
                recent: VecDeque::with_capacity(policy.window),
                opened_at: Instant::now(),
                probe_in_flight: false,
            }),
        }
    }

    /// The state as a caller would see it now (an open breaker whose cooldown has passed
    /// counts as half-open).
    pub fn state(&self) -> BreakerState {
        let inner = self.inner.lock();
        self.effective(&inner, Instant::now())
    }

    fn effective(&self, inner: &Inner, now: Instant) -> BreakerState {
        match inner.state {
            BreakerState::Open if now.duration_since(inner.opened_at) >= self.policy.cooldown => {
                BreakerState::HalfOpen
            }
            state => state,
        }
    }

    /// Whether a call could be admitted now, without taking the probe slot.
    pub fn admits(&self) -> bool {
        let inner = self.inner.lock();
        match self.effective(&inner, Instant::now()) {
            BreakerState::Closed => true,
            BreakerState::Open => false,
            BreakerState::HalfOpen => !inner.probe_in_flight,
        }
    }

    /// Takes a pass for one call, or `None` when the breaker refuses it. Returns the state
    /// change it caused, if any (open → half-open).
    pub fn acquire(&self) -> Option<(Pass, Option<BreakerState>)> {
        let mut inner = self.inner.lock();
        match self.effective(&inner, Instant::now()) {
            BreakerState::Closed => Some((Pass::Normal, None)),
            BreakerState::Open => None,
            BreakerState::HalfOpen if inner.probe_in_flight => None,
            BreakerState::HalfOpen => {
                let changed =
                    (inner.state != BreakerState::HalfOpen).then_some(BreakerState::HalfOpen);
                inner.state = BreakerState::HalfOpen;
                inner.probe_in_flight = true;
                Some((Pass::Probe, changed))
            }
        }
    }

    /// Records the outcome of a call made with `pass`; returns the new state if it changed.
    pub fn record(&self, pass: Pass, failed: bool) -> Option<BreakerState> {
        let mut inner = self.inner.lock();
        if pass == Pass::Probe {
            inner.probe_in_flight = false;
            if inner.state != BreakerState::HalfOpen {
                return None;
            }
            return if failed {
                self.open(&mut inner);
                Some(BreakerState::Open)
            } else {
                inner.state = BreakerState::Closed;
                inner.consecutive_failures = 0;
                inner.recent.clear();
                Some(BreakerState::Closed)
            };
        }
        if inner.state != BreakerState::Closed {
            // A call admitted before the breaker opened: its outcome is old news.
            return None;
        }
        if inner.recent.len() == self.policy.window {
            inner.recent.pop_front();
        }
        inner.recent.push_back(failed);
        if !failed {
            inner.consecutive_failures = 0;
            return None;
        }
        inner.consecutive_failures += 1;
        let failed_calls = inner.recent.iter().filter(|f| **f).count();
        let ratio_tripped = inner.recent.len() == self.policy.window
            && failed_calls as f64 / self.policy.window as f64 >= self.policy.ratio;
        if inner.consecutive_failures >= self.policy.failures || ratio_tripped {
            self.open(&mut inner);
            return Some(BreakerState::Open);
        }
        None
    }

    /// A probe that ended without an outcome (its call was cancelled) frees the slot.
    pub fn abandon(&self, pass: Pass) {
        if pass == Pass::Probe {
            self.inner.lock().probe_in_flight = false;
        }
    }

    fn open(&self, inner: &mut Inner) {
        inner.state = BreakerState::Open;
        inner.opened_at = Instant::now();
        inner.consecutive_failures = 0;
        inner.recent.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker(failures: u32, ratio: f64, window: usize, cooldown_ms: u64) -> Breaker {
        Breaker::new(BreakerPolicy {
            failures,
            ratio,
            window,
            cooldown: Duration::from_millis(cooldown_ms),
        })
    }

    #[test]
    fn consecutive_failures_open_and_a_success_resets_the_count() {
        let b = breaker(3, 1.0, 100, 60_000);
        for _ in 0..2 {
            assert_eq!(b.record(Pass::Normal, true), None);
        }
        assert_eq!(b.record(Pass::Normal, false), None);
        for _ in 0..2 {
            assert_eq!(b.record(Pass::Normal, true), None);
        }
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(b.record(Pass::Normal, true), Some(BreakerState::Open));
        assert_eq!(b.state(), BreakerState::Open);
        assert!(!b.admits());
        assert_eq!(b.acquire(), None);
    }

    #[test]
    fn a_failure_ratio_over_a_full_window_opens() {
        let b = breaker(100, 0.5, 4, 60_000);
        // Alternating outcomes never make 100 consecutive failures, but half of 4 fail.
        assert_eq!(b.record(Pass::Normal, true), None);
        assert_eq!(b.record(Pass::Normal, false), None);
        assert_eq!(b.record(Pass::Normal, true), None);
        assert_eq!(b.record(Pass::Normal, false), None);
        assert_eq!(
            b.state(),
            BreakerState::Closed,
            "a success does not trip it"
        );
        assert_eq!(b.record(Pass::Normal, true), Some(BreakerState::Open));
    }

    #[test]
    fn after_the_cooldown_one_probe_at_a_time_decides() {
        let b = breaker(1, 1.0, 10, 30);
        assert_eq!(b.record(Pass::Normal, true), Some(BreakerState::Open));
        assert_eq!(b.acquire(), None);
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert_eq!(
            b.acquire(),
            Some((Pass::Probe, Some(BreakerState::HalfOpen)))
        );
        assert_eq!(b.acquire(), None, "one probe at a time");
        assert!(!b.admits());
        // The probe fails: open again, for another cooldown.
        assert_eq!(b.record(Pass::Probe, true), Some(BreakerState::Open));
        assert_eq!(b.acquire(), None);
        std::thread::sleep(Duration::from_millis(40));
        let (pass, _) = b.acquire().expect("a new probe after the cooldown");
        assert_eq!(b.record(pass, false), Some(BreakerState::Closed));
        assert_eq!(b.acquire(), Some((Pass::Normal, None)));
    }

    #[test]
    fn an_abandoned_probe_frees_the_slot() {
        let b = breaker(1, 1.0, 10, 0);
        b.record(Pass::Normal, true);
        let (pass, _) = b.acquire().unwrap();
        assert_eq!(b.acquire(), None);
        b.abandon(pass);
        assert!(b.acquire().is_some());
    }

    #[test]
    fn outcomes_of_calls_admitted_before_opening_are_ignored() {
        let b = breaker(1, 1.0, 10, 60_000);
        assert_eq!(b.record(Pass::Normal, true), Some(BreakerState::Open));
        assert_eq!(b.record(Pass::Normal, false), None);
        assert_eq!(b.state(), BreakerState::Open);
    }
}
