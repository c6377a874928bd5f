//! Helpers shared by the `#[pg_test]`s.

use pgrx::prelude::*;

/// The text a query returns, or "" for NULL.
pub fn text(sql: &str) -> String {
    Spi::get_one::<String>(sql).unwrap().unwrap_or_default()
}

/// A new organization with a project `shop`, made this transaction's
/// session organization, and `shop/production` its default environment.
pub fn organization_with_shop(slug: &str, name: &str) {
    Spi::run(&format!(
        "SELECT set_config('flagship.organization_id', \
             flagship.create_organization('{slug}', '{name}')::text, true); \
         SELECT flagship.create_project(flagship.current_organization_id(), 'shop', 'Shop'); \
         SET LOCAL flagship.environment = 'shop/production'"
    ))
    .unwrap();
}

/// The SQLSTATE and message a statement fails with ("none" if it does
/// not), run inside a DO block so the failure is caught in a savepoint.
pub fn failure(sql: &str) -> (String, String) {
    let outcome = text(&format!(
        "DO $do$ BEGIN {sql}; PERFORM set_config('flagship_test.failure', 'none|', true); \
         EXCEPTION WHEN OTHERS THEN \
           PERFORM set_config('flagship_test.failure', SQLSTATE || '|' || SQLERRM, true); END $do$; \
         SELECT current_setting('flagship_test.failure')"
    ));
    let (code, message) = outcome.split_once('|').unwrap();
    (code.to_string(), message.to_string())
}

/// Generated JSON for the differential tests of the fast paths, with a
/// fixed seed (printed, and overridable with `FLAGSHIP_TEST_SEED`) so that
/// a failure in CI reproduces.
pub mod generated {
    use proptest::prelude::*;
    use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
    use serde_json::{Map, Number, Value};

    /// A runner for `cases` generated inputs from the run's seed.
    pub fn runner(cases: u32, name: &str) -> TestRunner {
        let seed: u64 = std::env::var("FLAGSHIP_TEST_SEED")
            .ok()
            .and_then(|text| text.parse().ok())
            .unwrap_or(0x5eed_f1a6);
        pgrx::log!("{name}: {cases} generated cases, FLAGSHIP_TEST_SEED={seed}");
        let mut bytes = [0u8; 32];
        bytes[..8].copy_from_slice(&seed.to_le_bytes());
        let config = Config {
            cases,
            failure_persistence: None,
            ..Config::default()
        };
        TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &bytes))
    }

    /// Text jsonb accepts: any Unicode but NUL (which jsonb refuses).
    pub fn text() -> impl Strategy<Value = String> {
        prop_oneof![
            Just(String::new()),
            "[a-z]{1,6}",
            "\\PC{0,12}",
            any::<String>().prop_map(|text| text.replace('\0', "")),
            Just("Åse ✓ \"quoted\" \\ back\nline\ttab".to_string()),
        ]
    }

    /// Keys that collide often (duplicates, the 32-entry offset stride)
    /// and keys of every shape.
    pub fn key() -> impl Strategy<Value = String> {
        prop_oneof![
            4 => (0u32..300).prop_map(|i| format!("k{i}")),
            1 => text(),
        ]
    }

    /// Numbers of every jsonb form: small and large integers, beyond i64,
    /// fractions, exponents, negative zero.
    pub fn number() -> impl Strategy<Value = Value> {
        prop_oneof![
            (-1000i64..1000).prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            (-1e300f64..1e300).prop_map(float),
            (-1e-300f64..1e-300).prop_map(float),
            (any::<i32>(), -30i32..30).prop_map(|(m, e)| float(f64::from(m) * 10f64.powi(e))),
            Just(float(-0.0)),
            Just(float(0.5)),
        ]
    }

    fn float(value: f64) -> Value {
        Number::from_f64(value).map_or(Value::Null, Value::Number)
    }

    pub fn scalar() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            number(),
            text().prop_map(Value::String),
        ]
    }

    /// Any JSON value, nested a few levels.
    pub fn value() -> impl Strategy<Value = Value> {
        scalar().prop_recursive(4, 24, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
                prop::collection::vec((key(), inner), 0..8)
                    .prop_map(|pairs| Value::Object(pairs.into_iter().collect::<Map<_, _>>())),
            ]
        })
    }

    /// An object's members as written, duplicates included: 0 to 200 of
    /// them (mostly fewer than 40, past the 32-entry stride), mostly scalars.
    pub fn members() -> impl Strategy<Value = Vec<(String, Value)>> {
        let member = || (key(), prop_oneof![9 => scalar(), 1 => value()]);
        prop_oneof![
            3 => prop::collection::vec(member(), 0..40),
            1 => prop::collection::vec(member(), 0..200),
        ]
    }

    /// JSON text of an object with these members, in this order.
    pub fn object_text(members: &[(String, Value)]) -> String {
        let pairs: Vec<String> = members
            .iter()
            .map(|(key, value)| format!("{}: {value}", Value::String(key.clone())))
            .collect();
        format!("{{{}}}", pairs.join(", "))
    }

    /// Equal as JSON documents: numbers by value, since jsonb keeps one
    /// numeric type where serde_json tells integers from floats.
    pub fn same_json(a: &Value, b: &Value) -> bool {
        match (a, b) {
            (Value::Number(x), Value::Number(y)) => x == y || x.as_f64() == y.as_f64(),
            (Value::Array(x), Value::Array(y)) => {
                x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same_json(x, y))
            }
            (Value::Object(x), Value::Object(y)) => {
                x.len() == y.len()
                    && x.iter()
                        .all(|(key, x)| y.get(key).is_some_and(|y| same_json(x, y)))
            }
            _ => a == b,
        }
    }
}
