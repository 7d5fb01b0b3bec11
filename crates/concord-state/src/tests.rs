use super::*;

#[test]
fn keys_are_checked() {
    assert!(parse_key("project/plan").is_ok());
    assert!(parse_key("project/a/b.c").is_ok());
    for bad in [
        "noslash",
        "Project/x",
        "p/",
        "p/a//b",
        "p/../x",
        "p/a b",
        "p/<script>",
    ] {
        assert!(
            matches!(parse_key(bad), Err(StateError::InvalidKey { .. })),
            "{bad}"
        );
    }
}
