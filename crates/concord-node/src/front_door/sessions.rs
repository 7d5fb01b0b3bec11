//! MCP sessions belong to the principal that opened them. rmcp knows a session only by its
//! id; with auth on, the door records who opened each one (from the `Mcp-Session-Id` the
//! `initialize` answer carries) and answers another principal's request on it as it answers an
//! unknown session (404), so a leaked id gives nobody else that session's stream (its log lines,
//! its resource updates) or the power to end it. Bounded: past [`MAX_SESSIONS`] the session used
//! least recently is forgotten (its next request gets 404 and the client opens a new one), and a
//! principal holds at most [`MAX_PER_PRINCIPAL`] (its own least recently used gives way).

use std::collections::HashMap;

use parking_lot::Mutex;

pub(crate) const MAX_SESSIONS: usize = 100_000;
pub(crate) const MAX_PER_PRINCIPAL: usize = 256;

struct Owner {
    principal: String,
    last_used: u64,
}

pub(crate) struct SessionOwners {
    sessions: Mutex<(HashMap<String, Owner>, u64)>,
    in_all: usize,
    per_principal: usize,
}

impl Default for SessionOwners {
    fn default() -> Self {
        Self::with_limits(MAX_SESSIONS, MAX_PER_PRINCIPAL)
    }
}

/// Whether a request on a session may go on.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum SessionCheck {
    /// The principal's own session.
    Owned,
    /// Another principal's, or one the door does not know: answer as an unknown session.
    NotYours,
}

impl SessionOwners {
    pub(crate) fn with_limits(in_all: usize, per_principal: usize) -> Self {
        Self {
            sessions: Mutex::default(),
            in_all,
            per_principal,
        }
    }

    /// Records that `principal` opened `session`.
    pub(crate) fn bind(&self, session: &str, principal: &str) {
        let mut guard = self.sessions.lock();
        let (sessions, clock) = &mut *guard;
        *clock += 1;
        let now = *clock;
        let owned: Vec<(&String, u64)> = sessions
            .iter()
            .filter(|(_, o)| o.principal == principal)
            .map(|(id, o)| (id, o.last_used))
            .collect();
        if owned.len() >= self.per_principal
            && let Some(oldest) = owned
                .iter()
                .min_by_key(|(_, at)| *at)
                .map(|(id, _)| (*id).clone())
        {
            sessions.remove(&oldest);
        }
        if sessions.len() >= self.in_all
            && let Some(oldest) = sessions
                .iter()
                .min_by_key(|(_, o)| o.last_used)
                .map(|(id, _)| id.clone())
        {
            sessions.remove(&oldest);
        }
        sessions.insert(
            session.to_string(),
            Owner {
                principal: principal.to_string(),
                last_used: now,
            },
        );
    }

    pub(crate) fn check(&self, session: &str, principal: &str) -> SessionCheck {
        let mut guard = self.sessions.lock();
        let (sessions, clock) = &mut *guard;
        *clock += 1;
        match sessions.get_mut(session) {
            Some(owner) if owner.principal == principal => {
                owner.last_used = *clock;
                SessionCheck::Owned
            }
            _ => SessionCheck::NotYours,
        }
    }

    pub(crate) fn forget(&self, session: &str) {
        self.sessions.lock().0.remove(session);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.sessions.lock().0.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_answers_only_its_opener() {
        let owners = SessionOwners::default();
        owners.bind("s1", "alice");
        assert_eq!(owners.check("s1", "alice"), SessionCheck::Owned);
        assert_eq!(owners.check("s1", "mallory"), SessionCheck::NotYours);
        assert_eq!(owners.check("s2", "alice"), SessionCheck::NotYours);
        owners.forget("s1");
        assert_eq!(owners.check("s1", "alice"), SessionCheck::NotYours);
    }

    #[test]
    fn a_principal_past_its_limit_loses_its_least_recently_used() {
        let owners = SessionOwners::with_limits(100, 2);
        owners.bind("a1", "alice");
        owners.bind("a2", "alice");
        owners.bind("b1", "bob");
        assert_eq!(owners.check("a1", "alice"), SessionCheck::Owned);
        owners.bind("a3", "alice");
        assert_eq!(
            owners.check("a2", "alice"),
            SessionCheck::NotYours,
            "a2 was idle longest"
        );
        assert_eq!(owners.check("a1", "alice"), SessionCheck::Owned);
        assert_eq!(owners.check("b1", "bob"), SessionCheck::Owned);
        assert_eq!(owners.len(), 3);
    }

    #[test]
    fn the_table_is_bounded_in_all() {
        let owners = SessionOwners::with_limits(3, 10);
        for i in 0..10 {
            owners.bind(&format!("s{i}"), &format!("p{i}"));
        }
        assert_eq!(owners.len(), 3);
        assert_eq!(owners.check("s9", "p9"), SessionCheck::Owned);
        assert_eq!(owners.check("s0", "p0"), SessionCheck::NotYours);
    }
}
