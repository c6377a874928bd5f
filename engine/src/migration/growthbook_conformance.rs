//! GrowthBook's `evalCondition` cases (sdk-js `cases.json`), each condition
//! translated to FlagShip conditions and evaluated by the rule engine.

use serde_json::{Map, Value};

use super::growthbook::translate_condition;
use crate::rules::condition_documents::parse_conditions;
use crate::rules::criteria::all_hold;
use crate::rules::Path;

/// Translates and evaluates one case; Err says why it could not run.
pub fn evaluate_case(
    condition: &Value,
    attributes: &Value,
    groups: &Value,
) -> Result<bool, String> {
    let groups = groups.as_object().cloned().unwrap_or_else(Map::new);
    let translated = translate_condition(condition, &groups).map_err(|e| e.to_string())?;
    let criteria = parse_conditions(Some(&Value::Array(translated)), Path::Text("condition"))
        .map_err(|error| error.to_string())?;
    let attributes = attributes
        .as_object()
        .ok_or_else(|| "attributes are not an object".to_string())?;
    Ok(all_hold(&criteria, attributes))
}

#[test]
fn growthbook_eval_condition_cases() {
    let Some(cases) = crate::conformance_cases::growthbook("evalCondition") else {
        eprintln!("conformance suites not found; skipping");
        return;
    };
    let mut passed = 0;
    let mut failed = Vec::new();
    for case in &cases {
        let name = case[0].as_str().unwrap_or("");
        let expected = case[3].as_bool();
        match evaluate_case(&case[1], &case[2], &case[4]) {
            Ok(answer) if Some(answer) == expected => passed += 1,
            Ok(answer) => failed.push(format!("{name}: expected {expected:?}, got {answer}")),
            Err(reason) => failed.push(format!("{name}: {reason}")),
        }
    }
    eprintln!(
        "GrowthBook evalCondition: {passed}/{} cases pass",
        cases.len()
    );
    for failure in &failed {
        eprintln!("  not passed: {failure}");
    }
    assert_eq!(cases.len(), 248);
    assert!(passed * 100 >= cases.len() * 90, "{passed} pass, below 90%");
}
