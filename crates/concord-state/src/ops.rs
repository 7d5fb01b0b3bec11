//! The write operations and their algebra: applying them, telling which commute, which paths
//! they touch, and whether they can be rebased over what others changed.

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// One operation on a key's JSON value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    /// Replace the whole value.
    Set { value: Value },
    /// RFC 7396 JSON Merge Patch.
    MergePatch { patch: Value },
    /// RFC 6902 JSON Patch.
    JsonPatch { patch: Value },
    /// Add `by` to the number at `path` (a JSON Pointer; "" is the whole value; absent counts as 0).
    Increment {
        #[serde(default)]
        path: String,
        by: serde_json::Number,
    },
    /// Append `value` to the array at `path` (created when absent).
    Append {
        #[serde(default)]
        path: String,
        value: Value,
    },
}

/// Applies `ops` in order to `current` (None: the key is absent).
pub(crate) fn apply_all(ops: &[Op], current: Option<Value>) -> Result<Value, String> {
    let mut value = current.unwrap_or(Value::Null);
    for op in ops {
        value = apply(op, value)?;
    }
    Ok(value)
}

fn apply(op: &Op, mut value: Value) -> Result<Value, String> {
    match op {
        Op::Set { value: new } => Ok(new.clone()),
        Op::MergePatch { patch } => {
            json_patch::merge(&mut value, patch);
            Ok(value)
        }
        Op::JsonPatch { patch } => {
            let patch: json_patch::Patch = serde_json::from_value(patch.clone())
                .map_err(|e| format!("not an RFC 6902 JSON Patch: {e}"))?;
            json_patch::patch(&mut value, &patch).map_err(|e| format!("JSON Patch failed: {e}"))?;
            Ok(value)
        }
        Op::Increment { path, by } => {
            let slot = slot_at(&mut value, path)?;
            let base = match slot {
                Value::Null => json!(0),
                Value::Number(n) => Value::Number(n.clone()),
                other => {
                    return Err(format!(
                        "increment at {path:?}: expected a number, found {other}"
                    ));
                }
            };
            *slot = add(&base, by)?;
            Ok(value)
        }
        Op::Append { path, value: item } => {
            let slot = slot_at(&mut value, path)?;
            match slot {
                Value::Null => *slot = json!([item]),
                Value::Array(items) => items.push(item.clone()),
                other => {
                    return Err(format!(
                        "append at {path:?}: expected an array, found {other}"
                    ));
                }
            }
            Ok(value)
        }
    }
}

fn add(base: &Value, by: &serde_json::Number) -> Result<Value, String> {
    if let (Some(a), Some(b)) = (base.as_i64(), by.as_i64()) {
        return a
            .checked_add(b)
            .map(Value::from)
            .ok_or_else(|| "increment overflows a 64-bit integer".to_string());
    }
    let sum = base.as_f64().unwrap_or(0.0) + by.as_f64().unwrap_or(0.0);
    serde_json::Number::from_f64(sum)
        .map(Value::Number)
        .ok_or_else(|| "increment gives a number JSON cannot hold".to_string())
}

/// The value at a JSON Pointer, creating objects along the way (so increments and appends
/// work on absent paths).
fn slot_at<'v>(value: &'v mut Value, pointer: &str) -> Result<&'v mut Value, String> {
    if pointer.is_empty() {
        return Ok(value);
    }
    if !pointer.starts_with('/') {
        return Err(format!(
            "{pointer:?} is not a JSON Pointer (it must start with '/')"
        ));
    }
    let mut slot = value;
    for raw in pointer[1..].split('/') {
        let segment = raw.replace("~1", "/").replace("~0", "~");
        if slot.is_null() {
            *slot = json!({});
        }
        slot = match slot {
            Value::Object(map) => map.entry(segment).or_insert(Value::Null),
            Value::Array(items) => {
                let index: usize = segment
                    .parse()
                    .map_err(|_| format!("{pointer:?}: {segment:?} is not an array index"))?;
                items
                    .get_mut(index)
                    .ok_or_else(|| format!("{pointer:?}: index {index} is out of range"))?
            }
            other => return Err(format!("{pointer:?}: cannot descend into {other}")),
        };
    }
    Ok(slot)
}

/// Increments and appends commute: applied to whatever is current, they lose nothing.
pub(crate) fn all_commutative(ops: &[Op]) -> bool {
    ops.iter()
        .all(|op| matches!(op, Op::Increment { .. } | Op::Append { .. }))
}

/// The JSON Pointers an operation writes.
fn touched_paths(op: &Op) -> Vec<String> {
    match op {
        Op::Set { .. } => vec![String::new()],
        Op::MergePatch { patch } => leaf_paths(patch, String::new()),
        Op::JsonPatch { patch } => patch
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|step| {
                ["path", "from"]
                    .iter()
                    .filter_map(|field| step[*field].as_str().map(str::to_string))
                    .collect::<Vec<_>>()
            })
            .collect(),
        Op::Increment { path, .. } | Op::Append { path, .. } => vec![path.clone()],
    }
}

fn leaf_paths(patch: &Value, prefix: String) -> Vec<String> {
    match patch {
        Value::Object(map) if !map.is_empty() => map
            .iter()
            .flat_map(|(key, value)| {
                let escaped = key.replace('~', "~0").replace('/', "~1");
                leaf_paths(value, format!("{prefix}/{escaped}"))
            })
            .collect(),
        _ => vec![prefix],
    }
}

fn overlaps(a: &str, b: &str) -> bool {
    let within =
        |outer: &str, inner: &str| inner == outer || inner.starts_with(&format!("{outer}/"));
    within(a, b) || within(b, a)
}

/// True when nothing `ops` writes was changed by others between `base` and `current`.
pub(crate) fn disjoint_from_changes(
    ops: &[Op],
    base: Option<&Value>,
    current: Option<&Value>,
) -> bool {
    let changed: Vec<String> = diff(base, current)
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|step| step["path"].as_str().map(str::to_string))
        .collect();
    ops.iter()
        .flat_map(touched_paths)
        .all(|written| changed.iter().all(|c| !overlaps(&written, c)))
}

/// RFC 6902 patch turning `from` into `to` (absent counts as null).
pub(crate) fn diff(from: Option<&Value>, to: Option<&Value>) -> Value {
    let null = Value::Null;
    let patch = json_patch::diff(from.unwrap_or(&null), to.unwrap_or(&null));
    serde_json::to_value(patch).unwrap_or(Value::Null)
}

#[cfg(test)]
#[path = "ops_proptests.rs"]
mod proptests;

#[cfg(test)]
mod tests {
    use super::*;

    fn op(value: Value) -> Op {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn operations_apply() {
        let doc = Some(json!({"a": 1, "list": [1]}));
        assert_eq!(
            apply_all(&[op(json!({"op": "set", "value": 5}))], doc.clone()).unwrap(),
            json!(5)
        );
        assert_eq!(
            apply_all(
                &[op(
                    json!({"op": "merge_patch", "patch": {"a": null, "b": 2}})
                )],
                doc.clone()
            )
            .unwrap(),
            json!({"b": 2, "list": [1]})
        );
        assert_eq!(
            apply_all(&[op(json!({"op": "json_patch", "patch": [{"op": "replace", "path": "/a", "value": 9}]}))], doc.clone())
                .unwrap()["a"],
            json!(9)
        );
        assert_eq!(
            apply_all(
                &[op(json!({"op": "increment", "path": "/a", "by": 2}))],
                doc.clone()
            )
            .unwrap()["a"],
            json!(3)
        );
        assert_eq!(
            apply_all(&[op(json!({"op": "increment", "by": 1}))], None).unwrap(),
            json!(1)
        );
        assert_eq!(
            apply_all(
                &[op(json!({"op": "append", "path": "/list", "value": 2}))],
                doc
            )
            .unwrap()["list"],
            json!([1, 2])
        );
    }

    #[test]
    fn bad_operations_are_reported() {
        let doc = Some(json!({"a": "text"}));
        assert!(
            apply_all(
                &[op(json!({"op": "increment", "path": "/a", "by": 1}))],
                doc.clone()
            )
            .unwrap_err()
            .contains("expected a number")
        );
        assert!(
            apply_all(
                &[op(
                    json!({"op": "json_patch", "patch": [{"op": "remove", "path": "/zz"}]})
                )],
                doc.clone()
            )
            .unwrap_err()
            .contains("JSON Patch failed")
        );
        assert!(
            apply_all(
                &[op(json!({"op": "json_patch", "patch": {"not": "a list"}}))],
                doc
            )
            .unwrap_err()
            .contains("not an RFC 6902")
        );
    }

    #[test]
    fn disjoint_paths_rebase_overlapping_do_not() {
        let base = json!({"title": "x", "body": "y"});
        let current = json!({"title": "X!", "body": "y"});
        let touches_body = [op(json!({"op": "merge_patch", "patch": {"body": "z"}}))];
        let touches_title = [op(json!({"op": "merge_patch", "patch": {"title": "mine"}}))];
        assert!(disjoint_from_changes(
            &touches_body,
            Some(&base),
            Some(&current)
        ));
        assert!(!disjoint_from_changes(
            &touches_title,
            Some(&base),
            Some(&current)
        ));
        assert!(!disjoint_from_changes(
            &[op(json!({"op": "set", "value": 1}))],
            Some(&base),
            Some(&current)
        ));
        assert!(all_commutative(&[op(json!({"op": "increment", "by": 1}))]));
        assert!(!all_commutative(&touches_body));
    }
}
