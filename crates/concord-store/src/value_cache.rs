//! The newest committed version and value of recently used keys, for SQLite, where this process's
//! group committer is the only writer of current values: it records every commit here after the
//! commit is durable, so a cached entry is never older than what a database read would return
//! at the moment it was cached, and never newer than what is durable.
//!
//! A reader that missed fills the entry from the database, but only if no commit was recorded
//! while it read (the commit epoch, checked under the same lock the committer records under), so
//! a slow reader cannot put back a value that a commit has replaced. Entries only ever move to a
//! newer version. Eviction is arbitrary and always safe: a miss reads the database.

use std::collections::HashMap;
use std::sync::Mutex;

use serde_json::Value;

use crate::KeyRef;

/// Entries kept before some are evicted.
const CAPACITY: usize = 16 * 1024;

#[derive(Default)]
pub(crate) struct ValueCache {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    epoch: u64,
    entries: HashMap<KeyRef, Entry>,
}

struct Entry {
    version: u64,
    value: Value,
    /// The version this one replaced, while cached: a writer that lost a race on this key
    /// asks for it (to say what changed since its base). History never changes, so it stays
    /// true forever.
    previous: Option<(u64, Value)>,
}

impl Entry {
    fn new(version: u64, value: Value) -> Self {
        Self {
            version,
            value,
            previous: None,
        }
    }

    fn advance(&mut self, version: u64, value: &Value) {
        if self.version < version {
            let replaced = std::mem::replace(&mut self.value, value.clone());
            self.previous = Some((self.version, replaced));
            self.version = version;
        }
    }
}

impl ValueCache {
    pub fn get(&self, key: &KeyRef) -> Option<(u64, Value)> {
        self.lock()
            .entries
            .get(key)
            .map(|entry| (entry.version, entry.value.clone()))
    }

    /// The value of `key` at `version`, if that is the cached version or the one before it.
    pub fn value_at(&self, key: &KeyRef, version: u64) -> Option<Value> {
        let inner = self.lock();
        let entry = inner.entries.get(key)?;
        if entry.version == version {
            return Some(entry.value.clone());
        }
        match &entry.previous {
            Some((previous, value)) if *previous == version => Some(value.clone()),
            _ => None,
        }
    }

    /// Read before a database read; pass it to [`ValueCache::fill`] afterwards.
    pub fn epoch(&self) -> u64 {
        self.lock().epoch
    }

    /// Caches what a reader found (version 0: absent), unless a commit was recorded since
    /// `epoch`.
    pub fn fill(&self, epoch: u64, key: &KeyRef, version: u64, value: Option<&Value>) {
        let mut inner = self.lock();
        if inner.epoch != epoch {
            return;
        }
        let Some(value) = value else {
            return;
        };
        inner.make_room();
        inner
            .entries
            .entry(key.clone())
            .and_modify(|entry| entry.advance(version, value))
            .or_insert_with(|| Entry::new(version, value.clone()));
    }

    /// Called by the committer once a commit is durable, with every key it wrote.
    pub fn record<'a>(&self, written: impl IntoIterator<Item = (&'a KeyRef, u64, &'a Value)>) {
        let mut inner = self.lock();
        inner.epoch += 1;
        for (key, version, value) in written {
            inner.make_room();
            match inner.entries.get_mut(key) {
                Some(entry) => entry.advance(version, value),
                None => {
                    inner
                        .entries
                        .insert(key.clone(), Entry::new(version, value.clone()));
                }
            }
        }
    }

    /// Forgets everything (after a failed commit, whose effects are unknown).
    pub fn clear(&self) {
        let mut inner = self.lock();
        inner.epoch += 1;
        inner.entries.clear();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Inner {
    fn make_room(&mut self) {
        if self.entries.len() >= CAPACITY {
            // An eighth, in the map's own (arbitrary) order.
            let victims: Vec<KeyRef> = self.entries.keys().take(CAPACITY / 8).cloned().collect();
            for key in victims {
                self.entries.remove(&key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn key(name: &str) -> KeyRef {
        KeyRef {
            namespace: "t".into(),
            key: name.into(),
        }
    }

    #[test]
    fn a_reader_that_raced_a_commit_does_not_put_back_the_old_value() {
        let cache = ValueCache::default();
        let k = key("a");
        let epoch = cache.epoch();
        // The reader read version 1 from the database; meanwhile version 2 was committed.
        cache.record([(&k, 2, &json!("new"))]);
        cache.fill(epoch, &k, 1, Some(&json!("old")));
        assert_eq!(cache.get(&k), Some((2, json!("new"))));
        // Even after eviction, the stale fill stays refused.
        cache.clear();
        cache.fill(epoch, &k, 1, Some(&json!("old")));
        assert_eq!(cache.get(&k), None);
    }

    #[test]
    fn entries_only_move_forward() {
        let cache = ValueCache::default();
        let k = key("b");
        cache.record([(&k, 3, &json!(3))]);
        cache.record([(&k, 2, &json!(2))]);
        assert_eq!(cache.get(&k), Some((3, json!(3))));
        cache.record([(&k, 4, &json!(4))]);
        assert_eq!(
            cache.value_at(&k, 3),
            Some(json!(3)),
            "the replaced version"
        );
        assert_eq!(cache.value_at(&k, 4), Some(json!(4)));
        assert_eq!(
            cache.value_at(&k, 2),
            None,
            "older ones come from the history"
        );
        let epoch = cache.epoch();
        cache.fill(epoch, &k, 1, Some(&json!(1)));
        assert_eq!(cache.get(&k), Some((4, json!(4))));
    }

    #[test]
    fn the_cache_stays_bounded() {
        let cache = ValueCache::default();
        for i in 0..(CAPACITY * 2) {
            let k = key(&format!("k{i}"));
            cache.record([(&k, 1, &json!(i))]);
        }
        assert!(cache.lock().entries.len() <= CAPACITY);
    }
}
