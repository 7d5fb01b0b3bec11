/// Expands `${VAR}` and `${VAR:-default}` in `text` with `lookup`; `$${` stays a literal `${`.
/// The error is the message to attach to the key being expanded.
pub fn expand_vars(text: &str, lookup: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find('$') {
        out.push_str(&rest[..start]);
        let after = &rest[start..];
        if let Some(stripped) = after.strip_prefix("$${") {
            out.push_str("${");
            rest = stripped;
            continue;
        }
        let Some(body_and_rest) = after.strip_prefix("${") else {
            out.push('$');
            rest = &after[1..];
            continue;
        };
        let Some(end) = body_and_rest.find('}') else {
            return Err(format!("unterminated \"${{\" in {text:?}"));
        };
        let body = &body_and_rest[..end];
        let (name, default) = match body.split_once(":-") {
            Some((name, default)) => (name, Some(default)),
            None => (body, None),
        };
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!(
                "\"${{{body}}}\" is not a valid variable reference; expected ${{NAME}} or ${{NAME:-default}}"
            ));
        }
        match (lookup(name), default) {
            (Some(value), _) => out.push_str(&value),
            (None, Some(default)) => out.push_str(default),
            (None, None) => {
                return Err(format!(
                    "environment variable {name} is not set (write ${{{name}:-default}} to give a default)"
                ));
            }
        }
        rest = &body_and_rest[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lookup(name: &str) -> Option<String> {
        (name == "TOKEN").then(|| "s3cret".to_string())
    }

    #[test]
    fn expands_set_default_and_escape() {
        assert_eq!(
            expand_vars("Bearer ${TOKEN}", &lookup).unwrap(),
            "Bearer s3cret"
        );
        assert_eq!(expand_vars("${MISSING:-x}", &lookup).unwrap(), "x");
        assert_eq!(expand_vars("$${TOKEN} $5", &lookup).unwrap(), "${TOKEN} $5");
    }

    #[test]
    fn missing_and_malformed_are_errors() {
        assert!(
            expand_vars("${MISSING}", &lookup)
                .unwrap_err()
                .contains("MISSING is not set")
        );
        assert!(
            expand_vars("${TOKEN", &lookup)
                .unwrap_err()
                .contains("unterminated")
        );
        assert!(
            expand_vars("${A B}", &lookup)
                .unwrap_err()
                .contains("not a valid variable")
        );
    }
}
