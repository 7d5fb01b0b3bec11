//! The result cache: answers of read-only tools (annotated `readOnlyHint`) of servers configured
//! with a `cache_ttl`, kept for that long, per caller. A key is the server, the tool, the caller's
//! partition (its principal; callers who may see different data never share an entry) and the
//! arguments in canonical form (object keys sorted). Bounded: the least recently used entry
//! leaves first. A caller bypasses it with `_meta["concord/cache"] = "bypass"`.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rmcp::model::{CallToolResult, JsonObject};
use serde_json::Value;

const DEFAULT_CAPACITY: usize = 1024;

struct Entry {
    result: CallToolResult,
    expires: Instant,
    last_used: u64,
}

pub(crate) struct ResultCache {
    entries: Mutex<(HashMap<String, Entry>, u64)>,
    capacity: usize,
}

impl Default for ResultCache {
    fn default() -> Self {
        Self::new(DEFAULT_CAPACITY)
    }
}

/// The same JSON with every object's keys in order, so `{"a":1,"b":2}` and `{"b":2,"a":1}` meet.
fn canonical(value: &Value) -> String {
    fn write(value: &Value, out: &mut String) {
        match value {
            Value::Object(map) => {
                let mut keys: Vec<&String> = map.keys().collect();
                keys.sort();
                out.push('{');
                for (i, key) in keys.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(&Value::String((*key).clone()).to_string());
                    out.push(':');
                    write(&map[*key], out);
                }
                out.push('}');
            }
            Value::Array(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    write(item, out);
                }
                out.push(']');
            }
            other => out.push_str(&other.to_string()),
        }
    }
    let mut out = String::new();
    write(value, &mut out);
    out
}

pub(crate) fn key(
    server: &str,
    tool: &str,
    partition: &str,
    arguments: Option<&JsonObject>,
) -> String {
    let arguments = arguments
        .map(|a| canonical(&Value::Object(a.clone())))
        .unwrap_or_default();
    format!("{server}\u{0}{tool}\u{0}{partition}\u{0}{arguments}")
}

impl ResultCache {
    /// A cache of at most `capacity` entries (0: nothing is kept).
    pub fn new(capacity: usize) -> Self {
        Self {
            entries: Mutex::default(),
            capacity,
        }
    }

    pub fn get(&self, key: &str) -> Option<CallToolResult> {
        let mut guard = self.entries.lock();
        let (entries, clock) = &mut *guard;
        *clock += 1;
        let now = Instant::now();
        match entries.get_mut(key) {
            Some(entry) if entry.expires > now => {
                entry.last_used = *clock;
                Some(entry.result.clone())
            }
            Some(_) => {
                entries.remove(key);
                None
            }
            None => None,
        }
    }

    pub fn put(&self, key: String, result: CallToolResult, ttl: Duration) {
        let mut guard = self.entries.lock();
        let (entries, clock) = &mut *guard;
        *clock += 1;
        if self.capacity == 0 {
            return;
        }
        if entries.len() >= self.capacity && !entries.contains_key(&key) {
            let now = Instant::now();
            entries.retain(|_, e| e.expires > now);
            if entries.len() >= self.capacity
                && let Some(oldest) = entries
                    .iter()
                    .min_by_key(|(_, e)| e.last_used)
                    .map(|(k, _)| k.clone())
            {
                entries.remove(&oldest);
            }
        }
        entries.insert(
            key,
            Entry {
                result,
                expires: Instant::now() + ttl,
                last_used: *clock,
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn argument_order_does_not_matter_and_partitions_never_meet() {
        let a = json!({"b": 2, "a": {"y": 1, "x": [1, {"q": 1, "p": 2}]}});
        let b = json!({"a": {"x": [1, {"p": 2, "q": 1}], "y": 1}, "b": 2});
        assert_eq!(
            key("s", "t", "alice", a.as_object()),
            key("s", "t", "alice", b.as_object())
        );
        assert_ne!(
            key("s", "t", "alice", a.as_object()),
            key("s", "t", "bob", a.as_object())
        );
    }

    #[test]
    fn entries_expire_and_the_least_recently_used_leaves_first() {
        let cache = ResultCache::new(8);
        let result = CallToolResult::success(vec![]);
        cache.put("gone".into(), result.clone(), Duration::from_millis(1));
        std::thread::sleep(Duration::from_millis(5));
        assert!(cache.get("gone").is_none());
        for i in 0..8 {
            cache.put(format!("k{i}"), result.clone(), Duration::from_secs(60));
        }
        assert!(
            cache.get("k0").is_some(),
            "k0 is now the most recently used"
        );
        cache.put("new".into(), result, Duration::from_secs(60));
        assert!(cache.get("k0").is_some());
        assert!(cache.get("k1").is_none(), "k1 was the least recently used");
    }

    #[test]
    fn a_cache_of_size_zero_keeps_nothing() {
        let cache = ResultCache::new(0);
        cache.put(
            "k".into(),
            CallToolResult::success(vec![]),
            Duration::from_secs(60),
        );
        assert!(cache.get("k").is_none());
    }
}
