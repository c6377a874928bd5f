//! JSON Merge Patch (RFC 7396): how `flagship.patch_flag` changes part of a
//! stored document. An object patch merges member by member, `null`
//! removes a member, anything else replaces the target whole (arrays
//! included: RFC 7396 has no way to patch one element).

use serde_json::{Map, Value};

/// `target` with `patch` applied.
pub fn merge_patch(target: Value, patch: &Value) -> Value {
    let Value::Object(patch) = patch else {
        return patch.clone();
    };
    let mut merged = match target {
        Value::Object(target) => target,
        _ => Map::new(),
    };
    for (name, value) in patch {
        if value.is_null() {
            merged.remove(name);
        } else {
            let current = merged.remove(name).unwrap_or(Value::Null);
            merged.insert(name.clone(), merge_patch(current, value));
        }
    }
    Value::Object(merged)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Every example of RFC 7396, appendix A, as (target, patch, result).
    #[test]
    fn the_rfc_examples() {
        let cases = [
            (json!({"a": "b"}), json!({"a": "c"}), json!({"a": "c"})),
            (
                json!({"a": "b"}),
                json!({"b": "c"}),
                json!({"a": "b", "b": "c"}),
            ),
            (json!({"a": "b"}), json!({"a": null}), json!({})),
            (
                json!({"a": "b", "b": "c"}),
                json!({"a": null}),
                json!({"b": "c"}),
            ),
            (json!({"a": ["b"]}), json!({"a": "c"}), json!({"a": "c"})),
            (json!({"a": "c"}), json!({"a": ["b"]}), json!({"a": ["b"]})),
            (
                json!({"a": {"b": "c"}}),
                json!({"a": {"b": "d", "c": null}}),
                json!({"a": {"b": "d"}}),
            ),
            (
                json!({"a": [{"b": "c"}]}),
                json!({"a": [1]}),
                json!({"a": [1]}),
            ),
            (json!(["a", "b"]), json!(["c", "d"]), json!(["c", "d"])),
            (json!({"a": "b"}), json!(["c"]), json!(["c"])),
            (json!({"a": "foo"}), json!(null), json!(null)),
            (json!({"a": "foo"}), json!("bar"), json!("bar")),
            (
                json!({"e": null}),
                json!({"a": 1}),
                json!({"e": null, "a": 1}),
            ),
            (
                json!([1, 2]),
                json!({"a": "b", "c": null}),
                json!({"a": "b"}),
            ),
            (
                json!({}),
                json!({"a": {"bb": {"ccc": null}}}),
                json!({"a": {"bb": {}}}),
            ),
        ];
        for (target, patch, expected) in cases {
            assert_eq!(
                merge_patch(target.clone(), &patch),
                expected,
                "{target} patched with {patch}"
            );
        }
    }

    /// The case patch_flag exists for: one environment turned off, the rest
    /// of the document as it was.
    #[test]
    fn turning_one_environment_off_keeps_everything_else() {
        let flag = json!({"key": "x", "kind": "boolean", "environments": {
            "production": {"enabled": true, "rules": [{"serve": {"variant": "on"}}]},
            "staging": {"enabled": true}}});
        let patched = merge_patch(
            flag,
            &json!({"key": "x", "environments": {"production": {"enabled": false}}}),
        );
        assert_eq!(
            patched,
            json!({"key": "x", "kind": "boolean", "environments": {
                "production": {"enabled": false, "rules": [{"serve": {"variant": "on"}}]},
                "staging": {"enabled": true}}})
        );
    }
}
