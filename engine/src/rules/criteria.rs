//! What a rule or segment tests: conditions, and conditions combined —
//! `all`, `any` and `not` groups, and `some`/`length` groups that test the
//! elements or the length of an array attribute. A plain list of conditions
//! (DESIGN.md's form) is an implicit `all`.

use serde_json::Value;

use super::conditions::{lookup_path, Attributes, Condition};

/// The attribute that names the array element (or the length) itself
/// inside a `some` or `length` group.
pub const ELEMENT: &str = ".";

#[derive(Debug, Clone, PartialEq)]
pub enum Criterion {
    Condition(Condition),
    /// Every member holds (true when empty).
    All(Vec<Criterion>),
    /// At least one member holds (false when empty).
    Any(Vec<Criterion>),
    Not(Box<Criterion>),
    /// Some element of the array attribute satisfies every member, the
    /// element's own fields addressed by name and the element as `.`.
    Some(ArrayTest),
    /// The array attribute's length, as `.`, satisfies every member.
    Length(ArrayTest),
}

#[derive(Debug, Clone, PartialEq)]
pub struct ArrayTest {
    pub attribute: String,
    path: Vec<String>,
    pub criteria: Vec<Criterion>,
}

impl ArrayTest {
    pub fn new(attribute: String, criteria: Vec<Criterion>) -> ArrayTest {
        ArrayTest {
            path: attribute.split('.').map(str::to_string).collect(),
            attribute,
            criteria,
        }
    }

    fn items<'a>(&self, context: &'a dyn Attributes) -> Option<&'a Vec<Value>> {
        lookup_path(context, &self.attribute, &self.path)?.as_array()
    }
}

/// An array element (or a length) seen as a context: `.` is the value,
/// other names its fields when it is an object.
struct Element<'a>(&'a Value);

impl Attributes for Element<'_> {
    fn get(&self, key: &str) -> Option<&Value> {
        if key == ELEMENT {
            Some(self.0)
        } else {
            self.0.as_object()?.get(key)
        }
    }
}

pub fn all_hold(criteria: &[Criterion], context: &dyn Attributes) -> bool {
    // Plain conditions, by far the common case, skip the recursive dispatch.
    criteria.iter().all(|criterion| match criterion {
        Criterion::Condition(condition) => condition.matches(context),
        group => group.matches(context),
    })
}

impl Criterion {
    pub fn matches(&self, context: &dyn Attributes) -> bool {
        match self {
            Criterion::Condition(condition) => condition.matches(context),
            Criterion::All(members) => all_hold(members, context),
            Criterion::Any(members) => members.iter().any(|member| member.matches(context)),
            Criterion::Not(member) => !member.matches(context),
            Criterion::Some(test) => test.items(context).is_some_and(|items| {
                items
                    .iter()
                    .any(|item| all_hold(&test.criteria, &Element(item)))
            }),
            Criterion::Length(test) => test.items(context).is_some_and(|items| {
                let length = Value::from(items.len());
                all_hold(&test.criteria, &Element(&length))
            }),
        }
    }

    /// The top-level context keys this criterion may read.
    pub fn context_keys<'a>(&'a self, keys: &mut Vec<&'a str>) {
        match self {
            Criterion::Condition(condition) => keys.extend(condition.context_keys()),
            Criterion::All(members) | Criterion::Any(members) => {
                members.iter().for_each(|member| member.context_keys(keys))
            }
            Criterion::Not(member) => member.context_keys(keys),
            Criterion::Some(test) | Criterion::Length(test) => {
                keys.push(&test.attribute);
                keys.push(&test.path[0]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::operators::Operator;
    use serde_json::json;

    fn leaf(attribute: &str, op: Operator, values: Value) -> Criterion {
        let values = values.as_array().cloned().unwrap();
        Criterion::Condition(
            Condition::compile(attribute.into(), op, &values, false, false).unwrap(),
        )
    }

    #[test]
    fn groups_combine_conditions() {
        let adult = leaf("age", Operator::Gte, json!([18]));
        let nordic = leaf("country", Operator::In, json!(["NO", "SE"]));
        let context = json!({"age": 20, "country": "DK"});
        let context = context.as_object().unwrap();
        assert!(Criterion::Any(vec![adult.clone(), nordic.clone()]).matches(context));
        assert!(!Criterion::All(vec![adult.clone(), nordic.clone()]).matches(context));
        assert!(Criterion::Not(Box::new(nordic)).matches(context));
        assert!(Criterion::All(vec![]).matches(context));
        assert!(!Criterion::Any(vec![]).matches(context));
    }

    #[test]
    fn some_and_length_look_inside_arrays() {
        let context = json!({"orders": [{"total": 5, "paid": true}, {"total": 50, "paid": false}],
                             "tags": ["a", "b"]});
        let context = context.as_object().unwrap();
        // One element must satisfy both: none does.
        let big_and_paid = Criterion::Some(ArrayTest::new(
            "orders".into(),
            vec![
                leaf("total", Operator::Gt, json!([10])),
                leaf("paid", Operator::Eq, json!([true])),
            ],
        ));
        assert!(!big_and_paid.matches(context));
        let big = Criterion::Some(ArrayTest::new(
            "orders".into(),
            vec![leaf("total", Operator::Gt, json!([10]))],
        ));
        assert!(big.matches(context));
        let has_b = Criterion::Some(ArrayTest::new(
            "tags".into(),
            vec![leaf(ELEMENT, Operator::Eq, json!(["b"]))],
        ));
        assert!(has_b.matches(context));
        let two = Criterion::Length(ArrayTest::new(
            "tags".into(),
            vec![leaf(ELEMENT, Operator::Eq, json!([2]))],
        ));
        assert!(two.matches(context));
        let not_array = Criterion::Length(ArrayTest::new("missing".into(), vec![]));
        assert!(!not_array.matches(context));
    }
}
