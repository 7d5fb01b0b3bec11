//! Property tests of the JSON-RPC edge of `/mcp`: any body is one well-formed JSON-RPC 2.0
//! message or an error with the code the specification names (-32700 parse error, -32600
//! invalid request), never a panic; and the edge accepts exactly the well-formed messages.

use proptest::prelude::*;
use serde_json::{Map, Value, json};

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

/// Any JSON value, a few levels deep.
fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        ".{0,10}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(".{0,6}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn id() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        (-1e6f64..1e6).prop_map(Value::from),
        ".{0,12}".prop_map(Value::from),
    ]
}

fn params() -> impl Strategy<Value = Option<Value>> {
    prop::option::of(prop_oneof![
        prop::collection::btree_map("[a-z_]{1,6}", arb_json(), 0..4)
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        prop::collection::vec(arb_json(), 0..4).prop_map(Value::Array),
    ])
}

/// A well-formed JSON-RPC 2.0 message: request, notification or response.
fn valid_message() -> impl Strategy<Value = Value> {
    prop_oneof![
        (id(), ".{0,16}", params()).prop_map(|(id, method, params)| {
            let mut message = json!({"jsonrpc": "2.0", "id": id, "method": method});
            if let Some(params) = params {
                message["params"] = params;
            }
            message
        }),
        (".{0,16}", params()).prop_map(|(method, params)| {
            let mut message = json!({"jsonrpc": "2.0", "method": method});
            if let Some(params) = params {
                message["params"] = params;
            }
            message
        }),
        (id(), arb_json(), any::<bool>()).prop_map(|(id, outcome, failed)| {
            let field = if failed { "error" } else { "result" };
            json!({"jsonrpc": "2.0", "id": id, field: outcome})
        }),
    ]
}

/// A message-shaped object whose fields are each right, wrong or missing.
fn message_like() -> impl Strategy<Value = Value> {
    let field = |right: BoxedStrategy<Value>| prop_oneof![4 => right.prop_map(Some), 1 => Just(None), 1 => arb_json().prop_map(Some)];
    (
        field(prop_oneof![Just(json!("2.0")), Just(json!("1.0")), Just(json!(2.0))].boxed()),
        field(id().boxed()),
        field(".{0,8}".prop_map(Value::from).boxed()),
        field(params().prop_map(|p| p.unwrap_or(json!({}))).boxed()),
        prop::option::weighted(0.2, arb_json()),
        prop::option::weighted(0.2, arb_json()),
    )
        .prop_map(|(jsonrpc, id, method, params, result, error)| {
            let mut object = Map::new();
            for (name, value) in [
                ("jsonrpc", jsonrpc),
                ("id", id),
                ("method", method),
                ("params", params),
                ("result", result),
                ("error", error),
            ] {
                if let Some(value) = value {
                    object.insert(name.into(), value);
                }
            }
            Value::Object(object)
        })
}

/// What the edge must decide: whether `value` is one JSON-RPC 2.0 message.
fn well_formed(value: &Value) -> bool {
    let Value::Object(object) = value else {
        return false;
    };
    let id_ok = object
        .get("id")
        .is_none_or(|id| matches!(id, Value::String(_) | Value::Number(_)));
    let kind_ok = match object.get("method") {
        Some(method) => method.is_string(),
        None => {
            object.contains_key("id")
                && (object.contains_key("result") || object.contains_key("error"))
        }
    };
    object.get("jsonrpc") == Some(&json!("2.0"))
        && id_ok
        && kind_ok
        && object
            .get("params")
            .is_none_or(|p| matches!(p, Value::Object(_) | Value::Array(_)))
}

/// The edge's answer to `bytes`, checked for what every answer must be.
fn check_bytes(bytes: &[u8]) -> Result<Result<(), i64>, TestCaseError> {
    match check_message(&Bytes::copy_from_slice(bytes)) {
        Ok(request) => {
            // A request or notification comes back with its method and the id to answer (none
            // for a notification); a response with nothing.
            let value: Value = serde_json::from_slice(bytes).unwrap();
            match request {
                Some((method, id)) => {
                    prop_assert_eq!(Some(method.as_str()), value["method"].as_str());
                    prop_assert_eq!(&id, value.get("id").unwrap_or(&Value::Null));
                }
                None => prop_assert!(value.get("method").is_none()),
            }
            Ok(Ok(()))
        }
        Err((code, id, message)) => {
            prop_assert!(
                code == PARSE_ERROR || code == INVALID_REQUEST,
                "code {code}"
            );
            prop_assert!(matches!(
                id,
                Value::Null | Value::String(_) | Value::Number(_)
            ));
            prop_assert!(!message.is_empty());
            if code == PARSE_ERROR {
                prop_assert!(serde_json::from_slice::<Value>(bytes).is_err());
                prop_assert_eq!(id, Value::Null);
            } else if !id.is_null() {
                // The answer carries the id the message gave.
                let value: Value = serde_json::from_slice(bytes).unwrap();
                prop_assert_eq!(Some(&id), value.get("id"));
            }
            Ok(Err(code))
        }
    }
}

proptest! {
    #![proptest_config(config())]

    /// Any bytes: accepted, a parse error, or an invalid request.
    #[test]
    fn arbitrary_bytes_get_a_jsonrpc_code(bytes in prop_oneof![
        prop::collection::vec(any::<u8>(), 0..128),
        ".{0,64}".prop_map(String::into_bytes),
        arb_json().prop_map(|v| {
            let mut text = v.to_string().into_bytes();
            text.truncate(text.len() / 2);
            text
        }),
    ]) {
        let _ = check_bytes(&bytes)?;
    }

    /// Any JSON: never a parse error, and accepted exactly when it is one message.
    #[test]
    fn arbitrary_json_is_judged_as_a_message(value in prop_oneof![arb_json(), message_like()]) {
        let outcome = check_bytes(value.to_string().as_bytes())?;
        prop_assert_ne!(outcome, Err(PARSE_ERROR));
        prop_assert_eq!(outcome.is_ok(), well_formed(&value), "{}", value);
    }

    /// Well-formed messages pass, however they are spaced.
    #[test]
    fn valid_messages_pass(message in valid_message(), pretty in any::<bool>()) {
        let text = if pretty {
            serde_json::to_string_pretty(&message).unwrap()
        } else {
            message.to_string()
        };
        prop_assert_eq!(check_bytes(text.as_bytes())?, Ok(()));
    }
}
