//! What an idempotency key is bound to: the SHA-256 of a request's canonical JSON (object keys
//! sorted at every level, no whitespace), so the same request hashes alike however its client
//! ordered the fields, and any other keys, operations or base versions hash differently.

use serde_json::Value;

/// Hex SHA-256 of `request`'s canonical JSON.
pub(crate) fn request_hash(request: &Value) -> String {
    let mut text = String::new();
    canonical(request, &mut text);
    hex(&sha256(text.as_bytes()))
}

/// `value` as JSON with every object's keys in byte order.
fn canonical(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            out.push('{');
            for (index, (key, value)) in entries.into_iter().enumerate() {
                if index > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(key.clone()).to_string());
                out.push(':');
                canonical(value, out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (index, item) in items.iter().enumerate() {
                if index > 0 {
                    out.push(',');
                }
                canonical(item, out);
            }
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn sha256(data: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(data).into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_hash_ignores_field_order_but_not_content() {
        let one = json!({"key": "a/b", "base_version": 1, "ops": [{"op": "set", "value": {"x": 1, "y": [2, 3]}}]});
        let reordered = json!({"ops": [{"value": {"y": [2, 3], "x": 1}, "op": "set"}], "base_version": 1, "key": "a/b"});
        assert_eq!(request_hash(&one), request_hash(&reordered));
        let other_base = json!({"key": "a/b", "base_version": 2, "ops": [{"op": "set", "value": {"x": 1, "y": [2, 3]}}]});
        let other_value = json!({"key": "a/b", "base_version": 1, "ops": [{"op": "set", "value": {"x": 1, "y": [3, 2]}}]});
        assert_ne!(request_hash(&one), request_hash(&other_base));
        assert_ne!(request_hash(&one), request_hash(&other_value));
        // Keys are quoted, so one with a quote in it cannot pass for another structure.
        assert_ne!(
            request_hash(&json!({"a\":1,\"b": 2})),
            request_hash(&json!({"a": 1, "b": 2}))
        );
    }
}
