//! Budgets that follow the call chain. Every principal's calls draw on a standing budget (from
//! `[budgets]`: tool calls, tokens, cost per window, a deadline per call chain, a maximum
//! delegation depth). A call may ask for a smaller envelope in `_meta["concord/budget"]`; the
//! gateway then forwards the call with a child envelope of its own (an id the upstream passes
//! back as `parent` when it calls tools on the call's behalf), so a sub-call draws on its
//! parent's remainder and on every budget above it.
//!
//! A call reserves one tool call (and its declared tokens) at every level before it runs, and
//! settles after — what the upstream reports in `_meta["concord/usage"]` — so concurrent calls
//! cannot overshoot. A refusal names the budget that ran out. Past the warning threshold, a
//! result carries a warning in its `_meta`.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde_json::{Map, Value, json};

/// Limits of one budget; `None` is unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Limits {
    pub tool_calls: Option<u64>,
    pub tokens: Option<u64>,
    pub cost_usd: Option<f64>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Usage {
    tool_calls: u64,
    tokens: u64,
    cost_usd: f64,
}

struct Budget {
    label: String,
    limits: Limits,
    used: Usage,
    reserved: Usage,
    parent: Option<String>,
    deadline: Option<Instant>,
    depth: u32,
    /// Window budgets restart; envelope budgets are dropped after this.
    renews_at: Option<Instant>,
    window: Option<Duration>,
    expires_at: Instant,
}

impl Budget {
    fn remaining(&self) -> Map<String, Value> {
        let mut out = Map::new();
        let spent = |used: u64, reserved: u64| used + reserved;
        if let Some(limit) = self.limits.tool_calls {
            out.insert(
                "tool_calls".into(),
                json!(limit.saturating_sub(spent(self.used.tool_calls, self.reserved.tool_calls))),
            );
        }
        if let Some(limit) = self.limits.tokens {
            out.insert(
                "tokens".into(),
                json!(limit.saturating_sub(spent(self.used.tokens, self.reserved.tokens))),
            );
        }
        if let Some(limit) = self.limits.cost_usd {
            out.insert(
                "cost_usd".into(),
                json!((limit - self.used.cost_usd - self.reserved.cost_usd).max(0.0)),
            );
        }
        out
    }

    /// The largest share of any limit that is spent.
    fn spent_fraction(&self) -> f64 {
        let mut fraction: f64 = 0.0;
        if let Some(limit) = self.limits.tool_calls.filter(|&l| l > 0) {
            fraction = fraction.max(self.used.tool_calls as f64 / limit as f64);
        }
        if let Some(limit) = self.limits.tokens.filter(|&l| l > 0) {
            fraction = fraction.max(self.used.tokens as f64 / limit as f64);
        }
        if let Some(limit) = self.limits.cost_usd.filter(|&l| l > 0.0) {
            fraction = fraction.max(self.used.cost_usd / limit);
        }
        fraction
    }
}

/// Why a call may not start.
#[derive(Debug, Clone, PartialEq)]
pub struct Exhausted {
    pub message: String,
}

/// A started call: what to tell the upstream, how long it may take, and what to settle.
#[derive(Debug, Clone)]
pub struct Ticket {
    /// Budgets the call reserved on, from its parent up to the root.
    chain: Vec<String>,
    /// The envelope issued for the call's own sub-calls; closed when the call ends.
    child: String,
    reserved_tokens: u64,
    /// The envelope to put in the upstream request's `_meta["concord/budget"]`.
    pub upstream_envelope: Value,
    /// Time left before the chain's deadline.
    pub time_left: Option<Duration>,
}

/// The outcome of a settled call, for the result's `_meta["concord/budget"]`.
pub type Report = Value;

pub struct Ledger {
    warn_at: f64,
    max_depth: u32,
    budgets: Mutex<Books>,
    next: Mutex<u64>,
}

#[derive(Default)]
struct Books {
    map: HashMap<String, Budget>,
    /// Envelopes of finished calls, in the order they close.
    closing: VecDeque<(Instant, String)>,
}

/// How long an envelope stays valid for sub-calls after it was issued, without a deadline.
const ENVELOPE_LIFETIME: Duration = Duration::from_secs(3600);
/// How long an envelope stays usable after its call has finished.
const ENVELOPE_GRACE: Duration = Duration::from_secs(60);

fn number(value: Option<&Value>) -> Option<u64> {
    value.and_then(Value::as_u64)
}

impl Ledger {
    pub fn new(warn_at: f64, max_depth: u32) -> Self {
        Self {
            warn_at,
            max_depth,
            budgets: Mutex::new(Books::default()),
            next: Mutex::new(0),
        }
    }

    fn new_id(&self) -> String {
        let mut next = self.next.lock();
        *next += 1;
        format!("b{}-{:x}", *next, rand::random::<u64>())
    }

    /// Starts a tool call. `standing`: the principal's configured budget (key, limits, window,
    /// chain deadline) — the root of its chains. `envelope`: what the request's `_meta` asked.
    pub fn begin(
        &self,
        principal: &str,
        standing: Option<(&str, Limits, Option<Duration>, Option<Duration>)>,
        envelope: Option<&Value>,
        reserve_tokens: u64,
    ) -> Result<Ticket, Exhausted> {
        let now = Instant::now();
        let mut books = self.budgets.lock();
        while let Some((at, _)) = books.closing.front()
            && *at <= now
        {
            if let Some((_, id)) = books.closing.pop_front() {
                books.map.remove(&id);
            }
        }
        let budgets = &mut books.map;
        if budgets.len() > 100_000 {
            // Envelopes of calls that never finished (their tickets were dropped).
            budgets.retain(|_, b| b.expires_at > now || b.window.is_some());
        }
        // The parent of this call: an envelope the gateway issued earlier, else the standing
        // budget of the principal.
        let parent_id = envelope
            .and_then(|e| e.get("parent"))
            .and_then(Value::as_str)
            .map(str::to_string);
        let parent = match parent_id {
            Some(id) => {
                if budgets.get(&id).is_none_or(|b| b.expires_at <= now) {
                    return Err(Exhausted {
                        message: format!("budget {id} is unknown or has expired"),
                    });
                }
                Some(id)
            }
            None => match standing {
                Some((key, limits, window, _)) => {
                    let id = format!("principal:{key}");
                    let budget = budgets.entry(id.clone()).or_insert_with(|| Budget {
                        label: format!("the standing budget of {principal}"),
                        limits,
                        used: Usage::default(),
                        reserved: Usage::default(),
                        parent: None,
                        deadline: None,
                        depth: 0,
                        renews_at: window.map(|w| now + w),
                        window,
                        expires_at: now + Duration::from_secs(365 * 24 * 3600),
                    });
                    budget.limits = limits;
                    if let (Some(renews), Some(window)) = (budget.renews_at, budget.window)
                        && now >= renews
                    {
                        budget.used = Usage::default();
                        budget.renews_at = Some(now + window);
                    }
                    Some(id)
                }
                None => None,
            },
        };
        let parent_depth = parent
            .as_ref()
            .and_then(|id| budgets.get(id))
            .map_or(0, |b| b.depth);
        let depth = parent_depth + 1;
        if depth > self.max_depth {
            return Err(Exhausted {
                message: format!(
                    "delegation depth {depth} exceeds the maximum of {}",
                    self.max_depth
                ),
            });
        }
        // The chain from the parent to the root; deadlines and limits of all of it apply.
        let mut chain = Vec::new();
        let mut cursor = parent.clone();
        while let Some(id) = cursor {
            let Some(budget) = budgets.get(&id) else {
                break;
            };
            chain.push(id.clone());
            cursor = budget.parent.clone();
            if chain.len() > 64 {
                break;
            }
        }
        // This call's own envelope, if it asked for limits.
        let own_limits = Limits {
            tool_calls: number(envelope.and_then(|e| e.get("tool_calls"))),
            tokens: number(envelope.and_then(|e| e.get("tokens"))),
            cost_usd: envelope
                .and_then(|e| e.get("cost_usd"))
                .and_then(Value::as_f64),
        };
        let own_deadline = number(envelope.and_then(|e| e.get("deadline_ms")))
            .map(|ms| now + Duration::from_millis(ms));
        let standing_deadline = standing
            .and_then(|(_, _, _, d)| d)
            .filter(|_| {
                parent
                    .as_deref()
                    .is_some_and(|p| p.starts_with("principal:"))
            })
            .map(|d| now + d);
        let inherited_deadline = chain
            .iter()
            .filter_map(|id| budgets.get(id).and_then(|b| b.deadline))
            .min();
        let deadline = [own_deadline, standing_deadline, inherited_deadline]
            .into_iter()
            .flatten()
            .min();
        if deadline.is_some_and(|d| d <= now) {
            return Err(Exhausted {
                message: "the call chain's deadline has passed".into(),
            });
        }
        // Reserve one tool call (and the declared tokens) at every level, or nowhere.
        for id in &chain {
            let budget = &budgets[id];
            if let Some(limit) = budget.limits.tool_calls
                && budget.used.tool_calls + budget.reserved.tool_calls + 1 > limit
            {
                return Err(Exhausted {
                    message: format!(
                        "tool_calls budget exhausted: {} allows {limit} tool calls and all are used or in flight",
                        budget.label
                    ),
                });
            }
            if let Some(limit) = budget.limits.tokens
                && budget.used.tokens + budget.reserved.tokens + reserve_tokens.max(1) > limit
            {
                return Err(Exhausted {
                    message: format!(
                        "tokens budget exhausted: {} allows {limit} tokens",
                        budget.label
                    ),
                });
            }
            if let Some(limit) = budget.limits.cost_usd
                && budget.used.cost_usd + budget.reserved.cost_usd >= limit
            {
                return Err(Exhausted {
                    message: format!("cost budget exhausted: {} allows ${limit:.4}", budget.label),
                });
            }
        }
        for id in &chain {
            if let Some(budget) = budgets.get_mut(id) {
                budget.reserved.tool_calls += 1;
                budget.reserved.tokens += reserve_tokens;
            }
        }
        // The child envelope the upstream carries into its own sub-calls.
        let child_id = self.new_id();
        let child = Budget {
            label: format!("the budget of call {child_id}"),
            limits: own_limits,
            used: Usage::default(),
            reserved: Usage::default(),
            parent: parent.clone(),
            deadline,
            depth,
            renews_at: None,
            window: None,
            expires_at: deadline.unwrap_or(now + ENVELOPE_LIFETIME),
        };
        let mut upstream_envelope = json!({"id": child_id, "depth": depth});
        let mut remaining = child.remaining();
        for id in &chain {
            // What the child can really spend: the least remainder along the chain.
            if let Some(budget) = budgets.get(id) {
                for (key, value) in budget.remaining() {
                    let smaller = match (remaining.get(&key), &value) {
                        (Some(current), new) => {
                            if new.as_f64() < current.as_f64() {
                                new.clone()
                            } else {
                                current.clone()
                            }
                        }
                        (None, new) => new.clone(),
                    };
                    remaining.insert(key, smaller);
                }
            }
        }
        upstream_envelope["remaining"] = Value::Object(remaining);
        if let Some(deadline) = deadline {
            upstream_envelope["deadline_in_ms"] =
                json!(deadline.saturating_duration_since(now).as_millis() as u64);
        }
        budgets.insert(child_id.clone(), child);
        Ok(Ticket {
            chain,
            child: child_id,
            reserved_tokens: reserve_tokens,
            upstream_envelope,
            time_left: deadline.map(|d| d.saturating_duration_since(now)),
        })
    }

    /// Charges what a running call spends itself (an agent's model turns) to the envelope `id`
    /// issued for it and to every budget above it, at once rather than when the call settles,
    /// so concurrent calls see it. Returns what is left: for each limit, the least remainder
    /// along the chain (an absent key is unlimited); `None` if the envelope is unknown or
    /// closed.
    pub fn charge(&self, id: &str, tokens: u64, cost_usd: f64) -> Option<Map<String, Value>> {
        let mut books = self.budgets.lock();
        let now = Instant::now();
        if books.map.get(id).is_none_or(|b| b.expires_at <= now) {
            return None;
        }
        let mut left = Map::new();
        let mut cursor = Some(id.to_string());
        let mut hops = 0;
        while let Some(current) = cursor
            && hops < 64
        {
            let Some(budget) = books.map.get_mut(&current) else {
                break;
            };
            budget.used.tokens += tokens;
            budget.used.cost_usd += cost_usd;
            for (key, value) in budget.remaining() {
                let smaller = match left.get(&key) {
                    Some(current) if current.as_f64() <= value.as_f64() => current.clone(),
                    _ => value,
                };
                left.insert(key, smaller);
            }
            cursor = budget.parent.clone();
            hops += 1;
        }
        Some(left)
    }

    /// Settles a finished call with the usage its upstream reported, and reports what is left.
    pub fn finish(&self, ticket: &Ticket, usage: Option<&Value>) -> Report {
        let tokens = usage
            .map(|u| {
                number(u.get("input_tokens")).unwrap_or(0)
                    + number(u.get("output_tokens")).unwrap_or(0)
                    + number(u.get("tokens")).unwrap_or(0)
            })
            .unwrap_or(0);
        let cost = usage
            .and_then(|u| u.get("cost_usd"))
            .and_then(Value::as_f64)
            .unwrap_or(0.0);
        let mut books = self.budgets.lock();
        // The call is over: its envelope stays usable for a short grace (sub-calls that race
        // the end of the call), then it is closed.
        let closes_at = Instant::now() + ENVELOPE_GRACE;
        if let Some(envelope) = books.map.get_mut(&ticket.child) {
            envelope.expires_at = envelope.expires_at.min(closes_at);
            books.closing.push_back((closes_at, ticket.child.clone()));
        }
        let budgets = &mut books.map;
        let mut warnings = Vec::new();
        let mut remaining = Map::new();
        for id in &ticket.chain {
            let Some(budget) = budgets.get_mut(id) else {
                continue;
            };
            budget.reserved.tool_calls = budget.reserved.tool_calls.saturating_sub(1);
            budget.reserved.tokens = budget
                .reserved
                .tokens
                .saturating_sub(ticket.reserved_tokens);
            budget.used.tool_calls += 1;
            budget.used.tokens += tokens;
            budget.used.cost_usd += cost;
            if budget.spent_fraction() >= self.warn_at {
                warnings.push(format!(
                    "{} is {:.0}% spent",
                    budget.label,
                    budget.spent_fraction() * 100.0
                ));
            }
            if remaining.is_empty() {
                remaining = budget.remaining();
            }
        }
        let mut report = json!({"remaining": remaining});
        if !warnings.is_empty() {
            report["warning"] = json!(warnings.join("; "));
        }
        report
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn calls(n: u64) -> Limits {
        Limits {
            tool_calls: Some(n),
            ..Limits::default()
        }
    }

    #[test]
    fn concurrent_reservations_never_overshoot() {
        let ledger = Arc::new(Ledger::new(0.8, 8));
        // An envelope of 5 calls, then 10 threads starting sub-calls under it at once.
        let root = ledger
            .begin("alice", None, Some(&json!({"tool_calls": 5})), 0)
            .unwrap();
        let parent = root.upstream_envelope["id"].as_str().unwrap().to_string();
        let handles: Vec<_> = (0..10)
            .map(|_| {
                let (ledger, parent) = (ledger.clone(), parent.clone());
                std::thread::spawn(move || {
                    ledger
                        .begin("alice", None, Some(&json!({"parent": parent})), 0)
                        .is_ok()
                })
            })
            .collect();
        let admitted = handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .filter(|ok| *ok)
            .count();
        assert_eq!(admitted, 5);
    }

    #[test]
    fn usage_settles_up_the_chain_and_warns_past_the_threshold() {
        let ledger = Ledger::new(0.5, 8);
        let standing = Some(("bob", calls(4), None, None));
        let first = ledger.begin("bob", standing, None, 0).unwrap();
        let report = ledger.finish(
            &first,
            Some(&json!({"input_tokens": 10, "output_tokens": 5})),
        );
        assert_eq!(report["remaining"]["tool_calls"], 3);
        assert!(report.get("warning").is_none());
        let second = ledger.begin("bob", standing, None, 0).unwrap();
        let report = ledger.finish(&second, None);
        assert!(
            report["warning"]
                .as_str()
                .unwrap()
                .contains("standing budget of bob is 50% spent")
        );
    }

    #[test]
    fn depth_tokens_and_deadline_are_enforced() {
        let ledger = Ledger::new(0.8, 2);
        let one = ledger
            .begin("c", None, Some(&json!({"tokens": 100})), 0)
            .unwrap();
        let id1 = one.upstream_envelope["id"].as_str().unwrap().to_string();
        let two = ledger
            .begin("c", None, Some(&json!({"parent": id1})), 60)
            .unwrap();
        let id2 = two.upstream_envelope["id"].as_str().unwrap().to_string();
        let too_deep = ledger
            .begin("c", None, Some(&json!({"parent": id2})), 0)
            .unwrap_err();
        assert!(
            too_deep
                .message
                .contains("delegation depth 3 exceeds the maximum of 2")
        );
        // 60 of 100 tokens are reserved by the call in flight: another 50 do not fit.
        let tokens = ledger
            .begin("c", None, Some(&json!({"parent": id1})), 50)
            .unwrap_err();
        assert!(
            tokens.message.contains("tokens budget exhausted"),
            "{tokens:?}"
        );
        ledger.finish(&two, Some(&json!({"tokens": 30})));
        assert!(
            ledger
                .begin("c", None, Some(&json!({"parent": id1})), 50)
                .is_ok()
        );

        let hurried = ledger
            .begin("d", None, Some(&json!({"deadline_ms": 1})), 0)
            .unwrap();
        assert!(hurried.time_left.unwrap() <= Duration::from_millis(1));
        let parent = hurried.upstream_envelope["id"]
            .as_str()
            .unwrap()
            .to_string();
        std::thread::sleep(Duration::from_millis(5));
        let late = ledger
            .begin("d", None, Some(&json!({"parent": parent})), 0)
            .unwrap_err();
        assert!(
            late.message.contains("deadline has passed") || late.message.contains("expired"),
            "{late:?}"
        );
    }

    #[test]
    fn spend_inside_a_call_is_charged_at_once_up_the_chain() {
        let ledger = Ledger::new(0.8, 8);
        let standing = Some((
            "erin",
            Limits {
                tokens: Some(1000),
                cost_usd: Some(1.0),
                ..Limits::default()
            },
            None,
            None,
        ));
        // Two calls of one principal run at once (two agent runs).
        let a = ledger.begin("erin", standing, None, 0).unwrap();
        let b = ledger.begin("erin", standing, None, 0).unwrap();
        let id = |t: &Ticket| t.upstream_envelope["id"].as_str().unwrap().to_string();
        let left = ledger.charge(&id(&a), 600, 0.25).unwrap();
        assert_eq!(
            (left["tokens"].clone(), left["cost_usd"].clone()),
            (json!(400), json!(0.75))
        );
        // b sees a's spend before a settles, and its own on top.
        let left = ledger.charge(&id(&b), 300, 0.0).unwrap();
        assert_eq!(left["tokens"], 100);
        // Settling without usage adds nothing more; the standing budget keeps both charges.
        ledger.finish(&a, None);
        ledger.finish(&b, None);
        assert_eq!(ledger.charge(&id(&b), 0, 0.0).unwrap()["tokens"], 100);
        let refused = ledger.begin("erin", standing, None, 200).unwrap_err();
        assert!(
            refused.message.contains("tokens budget exhausted"),
            "{refused:?}"
        );
        assert!(ledger.charge("no-such-envelope", 1, 0.0).is_none());
    }
}
