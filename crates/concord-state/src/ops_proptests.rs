//! Property tests of the write operations callers send (`set`, RFC 7396 merge patch, RFC 6902
//! JSON Patch, `increment`, `append`): any operation on any document gives a value or an
//! error that says why, never a panic; and the laws that are cheap to state hold.

use proptest::prelude::*;
use serde_json::{Value, json};

use super::*;

/// 256 cases a property (`PROPTEST_CASES` overrides, for a longer local run), and no
/// regression files written into the source tree: a failure prints its minimal input.
fn config() -> ProptestConfig {
    ProptestConfig {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(256),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn number() -> impl Strategy<Value = serde_json::Number> {
    prop_oneof![
        any::<i64>().prop_map(serde_json::Number::from),
        (-1000i64..1000).prop_map(serde_json::Number::from),
        any::<u64>().prop_map(serde_json::Number::from),
        prop_oneof![Just(i64::MAX), Just(i64::MIN)].prop_map(serde_json::Number::from),
        any::<f64>().prop_filter_map("finite", serde_json::Number::from_f64),
        Just(serde_json::Number::from_f64(f64::MAX).unwrap()),
    ]
}

/// Object keys that collide often, so patches meet the document.
fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(vec!["a", "b", "list", "0", "1", "-", "~", "/", "a/b", ""])
            .prop_map(str::to_string),
        1 => ".{0,6}",
    ]
}

/// Any JSON value, a few levels deep.
fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        number().prop_map(Value::Number),
        ".{0,8}".prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 32, 5, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::btree_map(key(), inner, 0..5)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// JSON Pointers, well-formed and not.
fn pointer() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::collection::vec(
            prop::sample::select(vec!["a", "b", "list", "0", "1", "3", "-", "~0", "~1", "~2", "", "99999999999999999999"]),
            0..4,
        )
        .prop_map(|segments| segments.iter().map(|s| format!("/{s}")).collect::<String>()),
        1 => ".{0,8}",
    ]
}

/// One RFC 6902 step, valid or not.
fn patch_step() -> impl Strategy<Value = Value> {
    (
        prop::sample::select(vec![
            "add", "remove", "replace", "move", "copy", "test", "bogus",
        ]),
        pointer(),
        prop::option::of(pointer()),
        prop::option::of(arb_json()),
    )
        .prop_map(|(op, path, from, value)| {
            let mut step = json!({"op": op, "path": path});
            if let Some(from) = from {
                step["from"] = json!(from);
            }
            if let Some(value) = value {
                step["value"] = value;
            }
            step
        })
}

fn json_patch() -> impl Strategy<Value = Value> {
    prop_oneof![
        6 => prop::collection::vec(patch_step(), 0..5).prop_map(Value::Array),
        1 => arb_json(),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        arb_json().prop_map(|value| Op::Set { value }),
        arb_json().prop_map(|patch| Op::MergePatch { patch }),
        json_patch().prop_map(|patch| Op::JsonPatch { patch }),
        (pointer(), number()).prop_map(|(path, by)| Op::Increment { path, by }),
        (pointer(), arb_json()).prop_map(|(path, value)| Op::Append { path, value }),
    ]
}

/// An operation as a caller may write it: the right tag with any fields, or any JSON.
fn op_json() -> impl Strategy<Value = Value> {
    prop_oneof![
        (
            prop::sample::select(vec![
                "set",
                "merge_patch",
                "json_patch",
                "increment",
                "append",
                "delete"
            ]),
            prop::collection::btree_map(
                prop::sample::select(vec!["value", "patch", "path", "by", "extra"]),
                arb_json(),
                0..3,
            ),
        )
            .prop_map(|(tag, fields)| {
                let mut object: serde_json::Map<String, Value> = fields
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v))
                    .collect();
                object.insert("op".into(), json!(tag));
                Value::Object(object)
            }),
        arb_json(),
    ]
}

proptest! {
    #![proptest_config(config())]

    /// Any JSON read as an operation: an operation or a serde error, never a panic; an
    /// operation that reads back prints and reads back to itself.
    #[test]
    fn operations_parse_or_refuse(value in op_json()) {
        if let Ok(op) = serde_json::from_value::<Op>(value) {
            let again: Op = serde_json::from_value(serde_json::to_value(&op).unwrap()).unwrap();
            prop_assert_eq!(again, op);
        }
    }

    /// Any operations on any document (or on an absent key): a value or an error saying why.
    #[test]
    fn operations_apply_or_say_why(
        ops in prop::collection::vec(op(), 0..4),
        current in prop::option::of(arb_json()),
        base in prop::option::of(arb_json()),
    ) {
        match apply_all(&ops, current.clone()) {
            Ok(_) => {}
            Err(reason) => prop_assert!(!reason.is_empty()),
        }
        // The rebase checks read the same operations; they answer, whatever they are.
        let _ = all_commutative(&ops);
        let _ = disjoint_from_changes(&ops, base.as_ref(), current.as_ref());
    }

    /// RFC 7396: a merge patch applied twice gives what it gave once.
    #[test]
    fn merge_patch_is_idempotent(doc in arb_json(), patch in arb_json()) {
        let op = Op::MergePatch { patch };
        let once = apply_all(std::slice::from_ref(&op), Some(doc)).unwrap();
        let twice = apply_all(std::slice::from_ref(&op), Some(once.clone())).unwrap();
        prop_assert_eq!(twice, once);
    }

    /// The diff the conflict answers carry is a JSON Patch that turns one side into the other.
    #[test]
    fn diff_patches_from_into_to(from in prop::option::of(arb_json()), to in prop::option::of(arb_json())) {
        let patch = diff(from.as_ref(), to.as_ref());
        let applied = apply_all(&[Op::JsonPatch { patch }], from).unwrap();
        prop_assert_eq!(applied, to.unwrap_or(Value::Null));
    }

    /// Integer increments commute, and add up exactly or refuse to overflow.
    #[test]
    fn increments_commute(a in any::<i64>(), b in any::<i64>(), start in prop::option::of(any::<i64>())) {
        let inc = |by: i64| Op::Increment { path: "/n".into(), by: by.into() };
        let doc = start.map(|n| json!({"n": n}));
        let ab = apply_all(&[inc(a), inc(b)], doc.clone());
        let ba = apply_all(&[inc(b), inc(a)], doc);
        let sum = start
            .unwrap_or(0)
            .checked_add(a)
            .and_then(|s| s.checked_add(b));
        let other = start.unwrap_or(0).checked_add(b).and_then(|s| s.checked_add(a));
        match (sum, other) {
            (Some(sum), Some(_)) => {
                prop_assert_eq!(ab.clone().unwrap(), json!({"n": sum}));
                prop_assert_eq!(ab, ba);
            }
            _ => {
                // One order overflows on the way: that order is refused.
                if sum.is_none() {
                    prop_assert!(ab.unwrap_err().contains("overflows"));
                }
                if other.is_none() {
                    prop_assert!(ba.unwrap_err().contains("overflows"));
                }
            }
        }
    }
}
