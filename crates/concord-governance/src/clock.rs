//! Time as governance reads it: a monotonic clock for schedules (when to refresh a JWKS) and a
//! wall clock for token claims (`exp`, `nbf`). Production uses [`SystemClock`]; tests drive a
//! [`ManualClock`] forward instead of sleeping.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use parking_lot::Mutex;

pub trait Clock: Send + Sync + 'static {
    /// Monotonic time, for intervals.
    fn now(&self) -> Instant;
    /// Wall-clock time, for the time claims of tokens.
    fn wall(&self) -> SystemTime;
}

/// The machine's clocks.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }

    fn wall(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// A clock that moves only when told to (both readings move together).
#[derive(Debug, Clone)]
pub struct ManualClock {
    inner: Arc<Mutex<(Instant, SystemTime)>>,
}

impl ManualClock {
    /// Starts at the machine's current time.
    pub fn new() -> Self {
        Self::at(SystemTime::now())
    }

    /// Starts with the wall clock at `wall`.
    pub fn at(wall: SystemTime) -> Self {
        Self {
            inner: Arc::new(Mutex::new((Instant::now(), wall))),
        }
    }

    pub fn advance(&self, by: Duration) {
        let mut inner = self.inner.lock();
        inner.0 += by;
        inner.1 += by;
    }
}

impl Default for ManualClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Instant {
        self.inner.lock().0
    }

    fn wall(&self) -> SystemTime {
        self.inner.lock().1
    }
}
