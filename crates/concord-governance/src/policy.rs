//! One policy engine for tool calls, resource reads, prompt gets and state writes. Rules are CEL
//! expressions over the request; any matching `deny` wins, then any matching `allow`; nothing
//! matching means deny (auth on). Evaluation fails closed: an `allow` rule whose expression fails
//! on a request (a field it reads is absent, a value of the wrong type) does not match it, and a
//! `deny` rule that fails (or yields something other than a boolean) denies, naming the rule and
//! the error. Write `has(arguments.path) && …` to be explicit.
//!
//! Variables a rule can read: `principal` (`id`, `kind`, `roles`, `chain`, `method`), `method`
//! (`tools/call`, `resources/read`, `prompts/get`, `state/write`), `server`, `name` (the tool or
//! prompt name as exposed, the resource URI, or the state key), `tool` (= `name` for tool
//! calls, else empty), `arguments` (a map; empty when listing), `namespace` and `operations`
//! (state writes).
//!
//! The rule set is swapped whole on reload; a file that does not parse or compile leaves the
//! old set in force.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use cel_interpreter::{Context, Program};
use concord_config::{Effect, PolicyRule};
use parking_lot::RwLock;
use serde_json::{Map, Value, json};

use crate::identity::Principal;

/// What a request asks to do.
#[derive(Debug, Clone)]
pub struct Action<'a> {
    pub method: &'a str,
    pub server: &'a str,
    pub name: &'a str,
    pub arguments: Option<&'a Map<String, Value>>,
    pub namespace: Option<&'a str>,
    pub operations: &'a [String],
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow {
        rule: String,
    },
    /// `rule`: the deny rule that matched, or none when no rule allowed the request.
    Deny {
        rule: Option<String>,
    },
    /// A deny rule could not be evaluated on the request: it denies (fail closed).
    DenyOnError {
        rule: String,
        error: String,
    },
}

impl Decision {
    pub fn allowed(&self) -> bool {
        matches!(self, Decision::Allow { .. })
    }

    /// The rule that decided, for the audit trail.
    pub fn rule(&self) -> &str {
        match self {
            Decision::Allow { rule } => rule,
            Decision::Deny { rule: Some(rule) } => rule,
            Decision::Deny { rule: None } => "(no rule allows it)",
            Decision::DenyOnError { rule, .. } => rule,
        }
    }

    /// Why the deciding rule could not be evaluated, when it could not (for the audit trail).
    pub fn error(&self) -> Option<&str> {
        match self {
            Decision::DenyOnError { error, .. } => Some(error),
            _ => None,
        }
    }
}

/// Why a rule set or a policy file was refused.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// A rule's `when` is not a CEL expression.
    #[error("rule {rule:?}: `when` does not parse: {reason}")]
    Parse { rule: String, reason: String },
    /// The policy file could not be read or is not a valid policy file.
    #[error(transparent)]
    File(#[from] concord_config::ConfigError),
}

struct CompiledRule {
    name: String,
    effect: Effect,
    program: Program,
}

/// A compiled rule set.
pub struct RuleSet {
    rules: Vec<CompiledRule>,
}

/// The deepest nesting of brackets a rule may have.
pub const MAX_RULE_DEPTH: usize = 12;
/// The longest rule expression, in bytes.
pub const MAX_RULE_LEN: usize = 4096;

fn within_limits(expression: &str) -> Result<(), String> {
    if expression.len() > MAX_RULE_LEN {
        return Err(format!(
            "the expression is {} bytes long; at most {MAX_RULE_LEN} are allowed",
            expression.len()
        ));
    }
    let mut depth = 0usize;
    let mut deepest = 0usize;
    for c in expression.chars() {
        match c {
            '(' | '[' | '{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            ')' | ']' | '}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    if deepest > MAX_RULE_DEPTH {
        return Err(format!(
            "the expression nests {deepest} brackets deep; at most {MAX_RULE_DEPTH} are allowed"
        ));
    }
    Ok(())
}

impl RuleSet {
    pub fn compile(rules: &[PolicyRule]) -> Result<RuleSet, PolicyError> {
        let mut compiled = Vec::with_capacity(rules.len());
        for rule in rules {
            // The CEL parser and interpreter recurse once per nesting level: a deep rule would
            // overflow the stack (an abort no `catch_unwind` stops), so depth and length are
            // bounded before parsing.
            if let Err(reason) = within_limits(&rule.when) {
                return Err(PolicyError::Parse {
                    rule: rule.name.clone(),
                    reason,
                });
            }
            // The CEL parser can panic on some malformed input instead of returning an error;
            // a bad rule must be refused, never take the node down.
            let parsed = std::panic::catch_unwind(|| Program::compile(&rule.when));
            let program = match parsed {
                Ok(Ok(program)) => program,
                Ok(Err(e)) => {
                    return Err(PolicyError::Parse {
                        rule: rule.name.clone(),
                        reason: e.to_string(),
                    });
                }
                Err(_) => {
                    return Err(PolicyError::Parse {
                        rule: rule.name.clone(),
                        reason: format!("{:?}", rule.when),
                    });
                }
            };
            compiled.push(CompiledRule {
                name: rule.name.clone(),
                effect: rule.effect,
                program,
            });
        }
        Ok(RuleSet { rules: compiled })
    }

    pub fn len(&self) -> usize {
        self.rules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Decides a request (fail closed: see the module documentation).
    pub fn decide(&self, principal: &Principal, action: &Action<'_>) -> Decision {
        self.decide_with(principal, action, true)
    }

    /// Decides whether a list shows an item to `principal` (the request has no arguments yet).
    /// Here a deny rule that fails to evaluate does not hide the item — typically it reads an
    /// argument a list has not got — because every use of the item is decided again, by
    /// [`RuleSet::decide`], with its arguments; there the same rule fails closed.
    pub fn decide_listing(&self, principal: &Principal, action: &Action<'_>) -> Decision {
        self.decide_with(principal, action, false)
    }

    fn decide_with(
        &self,
        principal: &Principal,
        action: &Action<'_>,
        deny_on_error: bool,
    ) -> Decision {
        let context = match context_for(principal, action) {
            Ok(context) => context,
            Err(e) => {
                tracing::warn!(error = %e, "policy context could not be built; denying");
                return Decision::Deny { rule: None };
            }
        };
        let mut allowed_by = None;
        for rule in &self.rules {
            // As with parsing: an interpreter panic is a failed evaluation, never a crashed
            // request.
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                rule.program.execute(&context)
            }));
            let evaluated = match outcome {
                Ok(Ok(cel_interpreter::Value::Bool(matched))) => Ok(matched),
                Ok(Ok(other)) => Err(format!(
                    "the expression yields {}, not a boolean",
                    clip(&format!("{other:?}"))
                )),
                Ok(Err(e)) => Err(clip(&e.to_string())),
                Err(_) => Err("the evaluator panicked".to_string()),
            };
            match (rule.effect, evaluated) {
                (Effect::Deny, Ok(true)) => {
                    return Decision::Deny {
                        rule: Some(rule.name.clone()),
                    };
                }
                // A deny rule that cannot be evaluated denies: failing open would let a request
                // through that the rule was written to stop.
                (Effect::Deny, Err(error)) if deny_on_error => {
                    tracing::debug!(rule = %rule.name, %error, "a deny rule failed to evaluate; denying");
                    return Decision::DenyOnError {
                        rule: rule.name.clone(),
                        error,
                    };
                }
                (Effect::Allow, Ok(true)) if allowed_by.is_none() => {
                    allowed_by = Some(rule.name.clone());
                }
                // An allow rule that cannot be evaluated allows nothing.
                (Effect::Allow, _) | (Effect::Deny, _) => {}
            }
        }
        match allowed_by {
            Some(rule) => Decision::Allow { rule },
            None => Decision::Deny { rule: None },
        }
    }
}

/// At most 200 bytes of `text` (an evaluation error may quote request data).
fn clip(text: &str) -> String {
    if text.len() <= 200 {
        return text.to_string();
    }
    let mut end = 200;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

fn context_for(principal: &Principal, action: &Action<'_>) -> Result<Context<'static>, String> {
    let mut context = Context::default();
    let mut add = |name: &str, value: Value| {
        context
            .add_variable(name, value)
            .map_err(|e| format!("{name}: {e}"))
    };
    add(
        "principal",
        json!({
            "id": principal.id,
            "kind": principal.kind,
            "roles": principal.roles,
            "chain": principal.chain,
            "method": principal.method,
        }),
    )?;
    add("method", json!(action.method))?;
    add("server", json!(action.server))?;
    add("name", json!(action.name))?;
    let tool = if action.method == "tools/call" {
        action.name
    } else {
        ""
    };
    add("tool", json!(tool))?;
    add(
        "arguments",
        Value::Object(action.arguments.cloned().unwrap_or_default()),
    )?;
    add("namespace", json!(action.namespace.unwrap_or_default()))?;
    add("operations", json!(action.operations))?;
    Ok(context)
}

/// The rules in force, with reload from a file.
pub struct PolicyEngine {
    inline: Vec<PolicyRule>,
    file: Option<PathBuf>,
    current: RwLock<Arc<RuleSet>>,
    loaded_at: RwLock<Option<SystemTime>>,
}

/// What a reload did, for the log and the audit trail.
#[derive(Debug, Clone, PartialEq)]
pub enum Reload {
    Unchanged,
    Loaded {
        rules: usize,
    },
    /// The new file was refused; the old rules stay in force.
    Refused {
        error: String,
    },
}

impl PolicyEngine {
    /// Compiles the inline rules and the file's; an error here stops the node from starting.
    pub fn new(inline: Vec<PolicyRule>, file: Option<PathBuf>) -> Result<Self, PolicyError> {
        let mut rules = inline.clone();
        let mut loaded_at = None;
        if let Some(path) = &file {
            rules.extend(load(path)?);
            loaded_at = modified(path);
        }
        let set = RuleSet::compile(&rules)?;
        Ok(Self {
            inline,
            file,
            current: RwLock::new(Arc::new(set)),
            loaded_at: RwLock::new(loaded_at),
        })
    }

    pub fn rules(&self) -> Arc<RuleSet> {
        self.current.read().clone()
    }

    pub fn decide(&self, principal: &Principal, action: &Action<'_>) -> Decision {
        self.rules().decide(principal, action)
    }

    /// See [`RuleSet::decide_listing`].
    pub fn decide_listing(&self, principal: &Principal, action: &Action<'_>) -> Decision {
        self.rules().decide_listing(principal, action)
    }

    /// Reloads the file if it changed since the last load.
    pub fn reload_if_changed(&self) -> Reload {
        let Some(path) = &self.file else {
            return Reload::Unchanged;
        };
        let stamp = modified(path);
        if stamp == *self.loaded_at.read() {
            return Reload::Unchanged;
        }
        *self.loaded_at.write() = stamp;
        let mut rules = self.inline.clone();
        let outcome = load(path).and_then(|file_rules| {
            rules.extend(file_rules);
            RuleSet::compile(&rules)
        });
        match outcome {
            Ok(set) => {
                let count = set.len();
                *self.current.write() = Arc::new(set);
                Reload::Loaded { rules: count }
            }
            Err(error) => Reload::Refused {
                error: error.to_string(),
            },
        }
    }
}

fn load(path: &Path) -> Result<Vec<PolicyRule>, PolicyError> {
    Ok(concord_config::load_policy_file(path)?)
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

#[cfg(test)]
mod limits_tests {
    use super::*;

    fn rule(when: String) -> PolicyRule {
        PolicyRule {
            name: "deep".into(),
            effect: Effect::Allow,
            when,
        }
    }

    /// A rule nested far beyond what the parser's recursion survives is refused with a reason,
    /// not a stack overflow that would abort the node.
    #[test]
    fn deep_or_long_rules_are_refused_before_parsing() {
        let deep = format!("{}true{}", "(".repeat(400), ")".repeat(400));
        let Err(error) = RuleSet::compile(&[rule(deep)]) else {
            panic!("a 400-deep rule compiled");
        };
        assert!(error.to_string().contains("400 brackets deep"), "{error}");
        let long = format!("true{}", " || true".repeat(1000));
        let Err(error) = RuleSet::compile(&[rule(long)]) else {
            panic!("an 8 KB rule compiled");
        };
        assert!(error.to_string().contains("at most 4096"), "{error}");
        let fine = format!(
            "{}true{}",
            "(".repeat(MAX_RULE_DEPTH),
            ")".repeat(MAX_RULE_DEPTH)
        );
        assert_eq!(RuleSet::compile(&[rule(fine)]).unwrap().len(), 1);
    }
}
