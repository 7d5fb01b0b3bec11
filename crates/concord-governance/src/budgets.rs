//! Budgets that follow the call chain. Every principal's calls draw on a standing budget (from
//! `[budgets]`: tool calls, tokens, cost per window, a deadline per call chain, a maximum
//! delegation depth). A call may ask for a smaller envelope in `_meta["concord/budget"]`; the
//! gateway then forwards the call with a child envelope of its own (an id the upstream passes
//! back as `parent` when it calls tools on the call's behalf), so a sub-call draws on its
//! parent's remainder and on every budget above it.
//!
//! An envelope belongs to the caller it was issued to: only that principal and delegation
//! chain, or a delegate whose chain extends it (an agent acting for the caller), may name it as
//! `parent`. Envelope ids are random (128 bits); standing budgets have no id a request can name.
//!
//! A call reserves one tool call (and its declared tokens) at every level before it runs, and
//! settles after — what the upstream reports in `_meta["concord/usage"]`, validated (whole,
//! non-negative, bounded numbers; a negative cost is no refund) — so concurrent calls cannot
//! overshoot. All arithmetic saturates. A refusal names the budget that ran out. Past the
//! warning threshold, a result carries a warning in its `_meta`.

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

/// The most tokens one call may reserve or report (10^12): beyond any real call, far from
/// overflowing a sum.
pub const MAX_TOKENS: u64 = 1_000_000_000_000;
/// The most one call may report spending, in USD.
pub const MAX_COST_USD: f64 = 1_000_000.0;
/// The longest any deadline, window or lifetime is taken to be (so `Instant` sums cannot
/// overflow).
const MAX_DEADLINE: Duration = Duration::from_secs(365 * 24 * 3600);
/// The longest envelope id accepted as `parent` (issued ids are much shorter).
const MAX_ID_LEN: usize = 64;

#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Usage {
    tool_calls: u64,
    tokens: u64,
    cost_usd: f64,
}

/// Who an envelope was issued to.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Owner {
    principal: String,
    chain: Vec<String>,
}

impl Owner {
    /// Whether `principal` acting through `chain` may draw on this envelope: the caller it was
    /// issued to, or a delegate acting for it (its chain extends the owner's).
    fn admits(&self, principal: &str, chain: &[String]) -> bool {
        if self.chain.is_empty() {
            return self.principal == principal && chain.is_empty();
        }
        (self.principal == principal && self.chain == chain)
            || (chain.len() > self.chain.len() && chain.starts_with(&self.chain))
    }
}

struct Budget {
    label: String,
    /// `None` for a standing budget, which no request can name.
    owner: Option<Owner>,
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
        let spent = |used: u64, reserved: u64| used.saturating_add(reserved);
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

    /// Adds spend, saturating (`cost_usd` is already finite and non-negative).
    fn spend(&mut self, tokens: u64, cost_usd: f64) {
        self.used.tokens = self.used.tokens.saturating_add(tokens);
        self.used.cost_usd = finite_sum(self.used.cost_usd, cost_usd);
    }
}

fn finite_sum(a: f64, b: f64) -> f64 {
    let sum = a + b;
    if sum.is_finite() { sum } else { f64::MAX }
}

/// Why a call may not start.
#[derive(Debug, Clone, PartialEq)]
pub struct Exhausted {
    pub message: String,
}

impl Exhausted {
    fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
        }
    }
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

/// A settled call: the report for the result's `_meta`, and what was wrong with the usage the
/// upstream reported (each problem says what was charged instead), for the audit trail.
#[derive(Debug, Clone)]
pub struct Settlement {
    pub report: Report,
    pub usage_problems: Vec<String>,
}

/// Who is starting a call: the principal and the delegation chain it acts through.
#[derive(Debug, Clone, Copy)]
pub struct Caller<'a> {
    pub principal: &'a str,
    pub chain: &'a [String],
}

/// A principal's standing budget: key, limits, window, chain deadline.
pub type Standing<'a> = (&'a str, Limits, Option<Duration>, Option<Duration>);

pub struct Ledger {
    warn_at: f64,
    max_depth: u32,
    budgets: Mutex<Books>,
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
/// How long a standing budget is kept without use.
const STANDING_LIFETIME: Duration = MAX_DEADLINE;

/// What a request's envelope asks for, validated.
#[derive(Debug, Default)]
struct Request {
    parent: Option<String>,
    limits: Limits,
    deadline: Option<Duration>,
    reserve_tokens: u64,
}

/// A whole number in `0..=max`, or an error naming the field.
fn whole(envelope: &Value, field: &str, max: u64) -> Result<Option<u64>, Exhausted> {
    match envelope.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(value) => match value.as_u64() {
            Some(n) if n <= max => Ok(Some(n)),
            _ => Err(Exhausted::new(format!(
                "invalid budget envelope: `{field}` must be a whole number from 0 to {max}, got {}",
                shorten(&value.to_string())
            ))),
        },
    }
}

fn shorten(text: &str) -> String {
    if text.len() <= 40 {
        return text.to_string();
    }
    let mut end = 40;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

fn parse_request(envelope: Option<&Value>) -> Result<Request, Exhausted> {
    let Some(envelope) = envelope else {
        return Ok(Request::default());
    };
    if !envelope.is_object() {
        return Err(Exhausted::new(
            "invalid budget envelope: expected an object",
        ));
    }
    let parent = match envelope.get("parent") {
        None | Some(Value::Null) => None,
        Some(Value::String(id))
            if !id.is_empty()
                && id.len() <= MAX_ID_LEN
                && id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | ':' | '.')) =>
        {
            Some(id.clone())
        }
        Some(other) => {
            return Err(Exhausted::new(format!(
                "invalid budget envelope: `parent` must be the id of an envelope the gateway issued, got {}",
                shorten(&other.to_string())
            )));
        }
    };
    let cost_usd = match envelope.get("cost_usd") {
        None | Some(Value::Null) => None,
        Some(value) => match value.as_f64() {
            Some(cost) if cost.is_finite() && cost >= 0.0 => Some(cost),
            _ => {
                return Err(Exhausted::new(format!(
                    "invalid budget envelope: `cost_usd` must be a non-negative number, got {}",
                    shorten(&value.to_string())
                )));
            }
        },
    };
    Ok(Request {
        parent,
        limits: Limits {
            tool_calls: whole(envelope, "tool_calls", u64::MAX)?,
            tokens: whole(envelope, "tokens", u64::MAX)?,
            cost_usd,
        },
        deadline: whole(envelope, "deadline_ms", u64::MAX)?.map(Duration::from_millis),
        reserve_tokens: whole(envelope, "reserve_tokens", MAX_TOKENS)?.unwrap_or(0),
    })
}

/// The tokens and cost an upstream reported, validated: whole non-negative token counts and a
/// finite non-negative cost, each at most the per-call maximum. Anything else is charged as
/// the nearest valid amount (nothing for a negative or malformed value, the maximum for a
/// larger one) and named in the problems.
fn reported_usage(usage: Option<&Value>) -> (u64, f64, Vec<String>) {
    let mut problems = Vec::new();
    let Some(usage) = usage else {
        return (0, 0.0, problems);
    };
    let Some(fields) = usage.as_object() else {
        problems.push(format!(
            "usage {} is not an object; nothing charged",
            shorten(&usage.to_string())
        ));
        return (0, 0.0, problems);
    };
    let mut tokens: u64 = 0;
    for field in ["input_tokens", "output_tokens", "tokens"] {
        let Some(value) = fields.get(field).filter(|v| !v.is_null()) else {
            continue;
        };
        let counted = match (value.as_u64(), value.as_f64()) {
            (Some(n), _) => n,
            (None, Some(f)) if f.is_finite() && f >= 0.0 => f.ceil().min(u64::MAX as f64) as u64,
            _ => {
                problems.push(format!(
                    "{field} {} is not a non-negative number; charged 0",
                    shorten(&value.to_string())
                ));
                continue;
            }
        };
        if counted > MAX_TOKENS {
            problems.push(format!(
                "{field} {counted} exceeds the maximum of {MAX_TOKENS} per call; charged {MAX_TOKENS}"
            ));
        }
        tokens = tokens.saturating_add(counted.min(MAX_TOKENS));
    }
    if tokens > MAX_TOKENS {
        problems.push(format!(
            "{tokens} tokens in all exceed the maximum of {MAX_TOKENS} per call; charged {MAX_TOKENS}"
        ));
        tokens = MAX_TOKENS;
    }
    let cost = match fields.get("cost_usd").filter(|v| !v.is_null()) {
        None => 0.0,
        Some(value) => match value.as_f64() {
            Some(cost) if cost.is_finite() && cost >= 0.0 => {
                if cost > MAX_COST_USD {
                    problems.push(format!(
                        "cost_usd {cost} exceeds the maximum of {MAX_COST_USD} per call; charged {MAX_COST_USD}"
                    ));
                }
                cost.min(MAX_COST_USD)
            }
            Some(cost) if cost < 0.0 => {
                problems.push(format!(
                    "cost_usd {cost} is negative (a cost is never a refund); charged 0"
                ));
                0.0
            }
            _ => {
                problems.push(format!(
                    "cost_usd {} is not a number; charged 0",
                    shorten(&value.to_string())
                ));
                0.0
            }
        },
    };
    (tokens, cost, problems)
}

impl Ledger {
    pub fn new(warn_at: f64, max_depth: u32) -> Self {
        Self {
            warn_at,
            max_depth,
            budgets: Mutex::new(Books::default()),
        }
    }

    /// A fresh envelope id: 128 random bits, so no caller can guess another's.
    fn new_id() -> String {
        format!("env-{:032x}", rand::random::<u128>())
    }

    /// Starts a tool call for `caller`. `standing`: the principal's configured budget (key,
    /// limits, window, chain deadline) — the root of its chains. `envelope`: what the request's
    /// `_meta["concord/budget"]` asked (its own limits, `deadline_ms`, `reserve_tokens`, and
    /// `parent`, an envelope issued to this caller or to one it acts for).
    pub fn begin(
        &self,
        caller: Caller<'_>,
        standing: Option<Standing<'_>>,
        envelope: Option<&Value>,
    ) -> Result<Ticket, Exhausted> {
        let request = parse_request(envelope)?;
        let reserve_tokens = request.reserve_tokens;
        let now = Instant::now();
        let later = |d: Duration| now.checked_add(d.min(MAX_DEADLINE)).unwrap_or(now);
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
        // The parent of this call: an envelope the gateway issued earlier to this caller (or
        // to one it acts for), else the standing budget of the principal.
        let parent = match request.parent {
            Some(id) => {
                let Some(budget) = budgets.get(&id) else {
                    return Err(Exhausted::new(format!(
                        "budget {id} is unknown or has expired"
                    )));
                };
                // A standing budget is no envelope: it cannot be named.
                let Some(owner) = &budget.owner else {
                    return Err(Exhausted::new(format!(
                        "budget {id} is unknown or has expired"
                    )));
                };
                if budget.expires_at <= now {
                    return Err(Exhausted::new(format!(
                        "budget {id} is unknown or has expired"
                    )));
                }
                if !owner.admits(caller.principal, caller.chain) {
                    return Err(Exhausted::new(format!(
                        "budget envelope {id} was not issued to {} (chain {}) nor to a caller it acts for",
                        caller.principal,
                        caller.chain.join(" → ")
                    )));
                }
                Some(id)
            }
            None => match standing {
                Some((key, limits, window, _)) => {
                    let id = format!("principal:{key}");
                    let budget = budgets.entry(id.clone()).or_insert_with(|| Budget {
                        label: format!("the standing budget of {}", caller.principal),
                        owner: None,
                        limits,
                        used: Usage::default(),
                        reserved: Usage::default(),
                        parent: None,
                        deadline: None,
                        depth: 0,
                        renews_at: window.map(later),
                        window,
                        expires_at: later(STANDING_LIFETIME),
                    });
                    budget.limits = limits;
                    if let (Some(renews), Some(window)) = (budget.renews_at, budget.window)
                        && now >= renews
                    {
                        budget.used = Usage::default();
                        budget.renews_at = Some(later(window));
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
        let depth = parent_depth.saturating_add(1);
        if depth > self.max_depth {
            return Err(Exhausted::new(format!(
                "delegation depth {depth} exceeds the maximum of {}",
                self.max_depth
            )));
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
        let own_deadline = request.deadline.map(later);
        let standing_deadline = standing
            .and_then(|(_, _, _, d)| d)
            .filter(|_| {
                parent
                    .as_deref()
                    .and_then(|p| budgets.get(p))
                    .is_some_and(|b| b.owner.is_none())
            })
            .map(later);
        let inherited_deadline = chain
            .iter()
            .filter_map(|id| budgets.get(id).and_then(|b| b.deadline))
            .min();
        let deadline = [own_deadline, standing_deadline, inherited_deadline]
            .into_iter()
            .flatten()
            .min();
        if deadline.is_some_and(|d| d <= now) {
            return Err(Exhausted::new("the call chain's deadline has passed"));
        }
        // Reserve one tool call (and the declared tokens) at every level, or nowhere.
        for id in &chain {
            let budget = &budgets[id];
            if let Some(limit) = budget.limits.tool_calls
                && budget
                    .used
                    .tool_calls
                    .saturating_add(budget.reserved.tool_calls)
                    .saturating_add(1)
                    > limit
            {
                return Err(Exhausted::new(format!(
                    "tool_calls budget exhausted: {} allows {limit} tool calls and all are used or in flight",
                    budget.label
                )));
            }
            if let Some(limit) = budget.limits.tokens
                && budget
                    .used
                    .tokens
                    .saturating_add(budget.reserved.tokens)
                    .saturating_add(reserve_tokens.max(1))
                    > limit
            {
                return Err(Exhausted::new(format!(
                    "tokens budget exhausted: {} allows {limit} tokens",
                    budget.label
                )));
            }
            if let Some(limit) = budget.limits.cost_usd
                && budget.used.cost_usd + budget.reserved.cost_usd >= limit
            {
                return Err(Exhausted::new(format!(
                    "cost budget exhausted: {} allows ${limit:.4}",
                    budget.label
                )));
            }
        }
        for id in &chain {
            if let Some(budget) = budgets.get_mut(id) {
                budget.reserved.tool_calls = budget.reserved.tool_calls.saturating_add(1);
                budget.reserved.tokens = budget.reserved.tokens.saturating_add(reserve_tokens);
            }
        }
        // The child envelope the upstream carries into its own sub-calls; it belongs to this
        // caller.
        let child_id = Self::new_id();
        let child = Budget {
            label: format!("the budget of call {child_id}"),
            owner: Some(Owner {
                principal: caller.principal.to_string(),
                chain: caller.chain.to_vec(),
            }),
            limits: request.limits,
            used: Usage::default(),
            reserved: Usage::default(),
            parent: parent.clone(),
            deadline,
            depth,
            renews_at: None,
            window: None,
            expires_at: deadline.unwrap_or(later(ENVELOPE_LIFETIME)),
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
            upstream_envelope["deadline_in_ms"] = json!(
                u64::try_from(deadline.saturating_duration_since(now).as_millis())
                    .unwrap_or(u64::MAX)
            );
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
    /// closed. Sums saturate; a cost that is negative or not finite charges nothing.
    pub fn charge(&self, id: &str, tokens: u64, cost_usd: f64) -> Option<Map<String, Value>> {
        let cost_usd = if cost_usd.is_finite() && cost_usd > 0.0 {
            cost_usd
        } else {
            0.0
        };
        let mut books = self.budgets.lock();
        let now = Instant::now();
        if books
            .map
            .get(id)
            .is_none_or(|b| b.expires_at <= now || b.owner.is_none())
        {
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
            budget.spend(tokens, cost_usd);
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

    /// Settles a finished call with the usage its upstream reported (validated: see
    /// [`Settlement::usage_problems`]), and reports what is left.
    pub fn finish(&self, ticket: &Ticket, usage: Option<&Value>) -> Settlement {
        let (tokens, cost, usage_problems) = reported_usage(usage);
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
            budget.used.tool_calls = budget.used.tool_calls.saturating_add(1);
            budget.spend(tokens, cost);
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
        Settlement {
            report,
            usage_problems,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn me(principal: &str) -> Vec<String> {
        vec![principal.to_string()]
    }

    fn who<'a>(principal: &'a str, chain: &'a [String]) -> Caller<'a> {
        Caller { principal, chain }
    }

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
        let alice = me("alice");
        let root = ledger
            .begin(who("alice", &alice), None, Some(&json!({"tool_calls": 5})))
            .unwrap();
        let parent = root.upstream_envelope["id"].as_str().unwrap().to_string();
        let handles: Vec<_> = (0..10)
            .map(|_| {
                let (ledger, parent) = (ledger.clone(), parent.clone());
                std::thread::spawn(move || {
                    let alice = me("alice");
                    ledger
                        .begin(who("alice", &alice), None, Some(&json!({"parent": parent})))
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
        let bob = me("bob");
        let first = ledger.begin(who("bob", &bob), standing, None).unwrap();
        let report = ledger
            .finish(
                &first,
                Some(&json!({"input_tokens": 10, "output_tokens": 5})),
            )
            .report;
        assert_eq!(report["remaining"]["tool_calls"], 3);
        assert!(report.get("warning").is_none());
        let second = ledger.begin(who("bob", &bob), standing, None).unwrap();
        let report = ledger.finish(&second, None).report;
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
        let (c, d) = (me("c"), me("d"));
        let (c, d) = (who("c", &c), who("d", &d));
        let one = ledger
            .begin(c, None, Some(&json!({"tokens": 100})))
            .unwrap();
        let id1 = one.upstream_envelope["id"].as_str().unwrap().to_string();
        let two = ledger
            .begin(c, None, Some(&json!({"parent": id1, "reserve_tokens": 60})))
            .unwrap();
        let id2 = two.upstream_envelope["id"].as_str().unwrap().to_string();
        let too_deep = ledger
            .begin(c, None, Some(&json!({"parent": id2})))
            .unwrap_err();
        assert!(
            too_deep
                .message
                .contains("delegation depth 3 exceeds the maximum of 2")
        );
        // 60 of 100 tokens are reserved by the call in flight: another 50 do not fit.
        let tokens = ledger
            .begin(c, None, Some(&json!({"parent": id1, "reserve_tokens": 50})))
            .unwrap_err();
        assert!(
            tokens.message.contains("tokens budget exhausted"),
            "{tokens:?}"
        );
        ledger.finish(&two, Some(&json!({"tokens": 30})));
        assert!(
            ledger
                .begin(c, None, Some(&json!({"parent": id1, "reserve_tokens": 50})))
                .is_ok()
        );

        let hurried = ledger
            .begin(d, None, Some(&json!({"deadline_ms": 1})))
            .unwrap();
        assert!(hurried.time_left.unwrap() <= Duration::from_millis(1));
        let parent = hurried.upstream_envelope["id"]
            .as_str()
            .unwrap()
            .to_string();
        std::thread::sleep(Duration::from_millis(5));
        let late = ledger
            .begin(d, None, Some(&json!({"parent": parent})))
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
        let erin = me("erin");
        let erin = who("erin", &erin);
        let a = ledger.begin(erin, standing, None).unwrap();
        let b = ledger.begin(erin, standing, None).unwrap();
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
        let refused = ledger
            .begin(erin, standing, Some(&json!({"reserve_tokens": 200})))
            .unwrap_err();
        assert!(
            refused.message.contains("tokens budget exhausted"),
            "{refused:?}"
        );
        assert!(ledger.charge("no-such-envelope", 1, 0.0).is_none());
    }
}
