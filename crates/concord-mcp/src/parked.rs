//! Calls parked while a 2026-07-28 client answers their upstream's questions, by the random
//! `requestState` token that resumes them. Bounded: a principal holds at most
//! [`MAX_PER_OWNER`] (its own oldest gives way), the gateway at most [`MAX_IN_ALL`] (new ones
//! are refused, so one principal cannot push out another's); entries older than
//! [`SUSPEND_LIMIT`] are dropped; only the principal that parked a call may resume it.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::error::GatewayError;

pub(crate) const SUSPEND_LIMIT: Duration = Duration::from_secs(600);
pub(crate) const MAX_PER_OWNER: usize = 64;
pub(crate) const MAX_IN_ALL: usize = 4096;

/// Marks the `requestState` values this gateway issues for its parked calls.
pub(crate) const PARKED_STATE_PREFIX: &str = "concord-parked-";

struct Entry<T> {
    owner: String,
    parked_at: Instant,
    value: T,
}

pub(crate) struct Parked<T> {
    entries: parking_lot::Mutex<HashMap<String, Entry<T>>>,
    per_owner: usize,
    in_all: usize,
}

impl<T> Default for Parked<T> {
    fn default() -> Self {
        Self::with_limits(MAX_PER_OWNER, MAX_IN_ALL)
    }
}

impl<T> Parked<T> {
    pub(crate) fn with_limits(per_owner: usize, in_all: usize) -> Self {
        Self {
            entries: parking_lot::Mutex::default(),
            per_owner,
            in_all,
        }
    }

    /// Parks `value` for `owner` under a new random token; past the gateway's limit the value
    /// comes back with the error (dropping it fails what waits on it).
    pub(crate) fn park(&self, owner: String, value: T) -> Result<String, (T, GatewayError)> {
        let token = format!("{PARKED_STATE_PREFIX}{}", uuid::Uuid::new_v4().simple());
        let mut entries = self.entries.lock();
        entries.retain(|_, e| e.parked_at.elapsed() < SUSPEND_LIMIT);
        let mut owned = entries.iter().filter(|(_, e)| e.owner == owner);
        let count = owned.clone().count();
        if count >= self.per_owner {
            if let Some(oldest) = owned
                .by_ref()
                .min_by_key(|(_, e)| e.parked_at)
                .map(|(t, _)| t.clone())
            {
                entries.remove(&oldest);
            }
        } else if entries.len() >= self.in_all {
            return Err((value, GatewayError::TooManyParked { limit: self.in_all }));
        }
        entries.insert(
            token.clone(),
            Entry {
                owner,
                parked_at: Instant::now(),
                value,
            },
        );
        Ok(token)
    }

    /// The value parked under `token` for `owner`; another principal's token answers like an
    /// unknown one and leaves the call parked.
    pub(crate) fn take(&self, token: &str, owner: &str) -> Option<T> {
        let mut entries = self.entries.lock();
        if entries.get(token).is_some_and(|e| e.owner != owner) {
            return None;
        }
        entries
            .remove(token)
            .filter(|e| e.parked_at.elapsed() < SUSPEND_LIMIT)
            .map(|e| e.value)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_owner_resumes_and_only_once() {
        let parked = Parked::default();
        let token = parked.park("alice".into(), 7).unwrap();
        assert!(token.starts_with(PARKED_STATE_PREFIX));
        assert_eq!(parked.take(&token, "mallory"), None);
        assert_eq!(
            parked.take(&token, "alice"),
            Some(7),
            "mallory's try left it parked"
        );
        assert_eq!(parked.take(&token, "alice"), None);
        assert_eq!(parked.take("concord-parked-made-up", "alice"), None);
    }

    #[test]
    fn a_principal_past_its_limit_loses_its_own_oldest() {
        let parked = Parked::with_limits(3, 100);
        let bob = parked.park("bob".into(), 0).unwrap();
        let tokens: Vec<_> = (1..=4)
            .map(|i| parked.park("alice".into(), i).unwrap())
            .collect();
        assert_eq!(parked.len(), 4, "alice holds 3, bob 1");
        assert_eq!(
            parked.take(&tokens[0], "alice"),
            None,
            "alice's oldest gave way"
        );
        assert_eq!(parked.take(&tokens[3], "alice"), Some(4));
        assert_eq!(
            parked.take(&bob, "bob"),
            Some(0),
            "bob's call was never touched"
        );
    }

    #[test]
    fn the_gateway_past_its_limit_refuses_new_calls_and_keeps_the_old() {
        let parked = Parked::with_limits(10, 4);
        let kept: Vec<_> = (0..4)
            .map(|i| parked.park(format!("p{i}"), i).unwrap())
            .collect();
        let Err((value, error)) = parked.park("mallory".into(), 99) else {
            panic!("a fifth call was parked past the limit of four");
        };
        assert_eq!(value, 99, "the refused value comes back to be failed");
        assert!(
            error.to_string().contains("4 calls waiting for input"),
            "{error}"
        );
        for (i, token) in kept.iter().enumerate() {
            assert_eq!(parked.take(token, &format!("p{i}")), Some(i));
        }
    }
}
