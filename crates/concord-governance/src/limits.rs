//! Rate limits: a token bucket per principal, and per principal and tool, refilled
//! continuously. A refusal says how long until the next call would be admitted.

use std::collections::HashMap;
use std::time::Instant;

use concord_config::{LimitSettings, Rate};
use parking_lot::Mutex;

struct Bucket {
    tokens: f64,
    refilled: Instant,
}

impl Bucket {
    fn full(rate: Rate, now: Instant) -> Self {
        Self {
            tokens: f64::from(rate.burst),
            refilled: now,
        }
    }

    fn refill(&mut self, rate: Rate, now: Instant) {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate.per_second).min(f64::from(rate.burst));
        self.refilled = now;
    }

    /// Milliseconds until one token is available (0: now).
    fn wait_ms(&self, rate: Rate) -> u64 {
        if self.tokens >= 1.0 {
            0
        } else {
            (((1.0 - self.tokens) / rate.per_second) * 1000.0).ceil() as u64
        }
    }
}

/// Which limit refused a call, and when to retry.
#[derive(Debug, Clone, PartialEq)]
pub struct Limited {
    pub scope: String,
    pub retry_after_ms: u64,
}

pub struct RateLimiter {
    settings: LimitSettings,
    buckets: Mutex<HashMap<(String, Option<String>), Bucket>>,
}

impl RateLimiter {
    pub fn new(settings: LimitSettings) -> Self {
        Self {
            settings,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.settings.per_principal.is_none() && self.settings.per_tool.is_empty()
    }

    /// Takes one token from every bucket that applies, or none if any is empty.
    pub fn admit(&self, principal: &str, tool: &str) -> Result<(), Limited> {
        let now = Instant::now();
        let mut applicable: Vec<((String, Option<String>), Rate, String)> = Vec::new();
        if let Some(rate) = self.settings.per_principal {
            applicable.push((
                (principal.to_string(), None),
                rate,
                format!("principal {principal}"),
            ));
        }
        if let Some(rate) = self.settings.per_tool.get(tool) {
            applicable.push((
                (principal.to_string(), Some(tool.to_string())),
                *rate,
                format!("tool {tool} for principal {principal}"),
            ));
        }
        if applicable.is_empty() {
            return Ok(());
        }
        let mut buckets = self.buckets.lock();
        if buckets.len() > 100_000 {
            // Long-idle buckets are full anyway: forgetting them changes nothing.
            buckets.retain(|_, b| now.saturating_duration_since(b.refilled).as_secs() < 600);
        }
        let mut refused: Option<Limited> = None;
        for (key, rate, scope) in &applicable {
            let bucket = buckets
                .entry(key.clone())
                .or_insert_with(|| Bucket::full(*rate, now));
            bucket.refill(*rate, now);
            let wait = bucket.wait_ms(*rate);
            if wait > 0 && refused.as_ref().is_none_or(|r| r.retry_after_ms < wait) {
                refused = Some(Limited {
                    scope: scope.clone(),
                    retry_after_ms: wait,
                });
            }
        }
        if let Some(limited) = refused {
            return Err(limited);
        }
        for (key, _, _) in &applicable {
            if let Some(bucket) = buckets.get_mut(key) {
                bucket.tokens -= 1.0;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn limiter(per_principal: Option<Rate>, tools: &[(&str, Rate)]) -> RateLimiter {
        RateLimiter::new(LimitSettings {
            per_principal,
            per_tool: tools
                .iter()
                .map(|(t, r)| (t.to_string(), *r))
                .collect::<BTreeMap<_, _>>(),
        })
    }

    #[test]
    fn a_burst_is_admitted_then_refused_with_a_retry_time() {
        let limits = limiter(
            Some(Rate {
                per_second: 1.0,
                burst: 3,
            }),
            &[],
        );
        for _ in 0..3 {
            limits.admit("alice", "fx__echo").unwrap();
        }
        let refused = limits.admit("alice", "fx__echo").unwrap_err();
        assert_eq!(refused.scope, "principal alice");
        assert!(
            refused.retry_after_ms > 0 && refused.retry_after_ms <= 1000,
            "{refused:?}"
        );
        // Another principal has its own bucket.
        limits.admit("bob", "fx__echo").unwrap();
    }

    #[test]
    fn a_tool_limit_applies_per_principal_and_a_refusal_takes_nothing() {
        let limits = limiter(
            Some(Rate {
                per_second: 100.0,
                burst: 2,
            }),
            &[(
                "fx__slow",
                Rate {
                    per_second: 0.1,
                    burst: 1,
                },
            )],
        );
        limits.admit("alice", "fx__slow").unwrap();
        let refused = limits.admit("alice", "fx__slow").unwrap_err();
        assert_eq!(refused.scope, "tool fx__slow for principal alice");
        assert!(refused.retry_after_ms > 9000);
        // The refused call took no token from the principal's bucket.
        limits.admit("alice", "fx__echo").unwrap();
    }
}
