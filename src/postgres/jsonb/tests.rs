    use std::ffi::CString;

    use pgrx::prelude::*;
    use proptest::prelude::*;
    use serde_json::Value;

    use super::{BuiltJsonb, JsonbArg};
    use crate::test_support::generated::{self, same_json};

    /// A jsonb datum parsed by PostgreSQL from JSON text.
    fn jsonb_from_text(text: &str) -> pg_sys::Datum {
        let text = CString::new(text).expect("generated text has no NUL");
        // SAFETY: jsonb_in takes a NUL-terminated string and returns a new
        // jsonb in the current memory context (or raises, guarded).
        unsafe {
            pgrx::direct_function_call_as_datum(
                pg_sys::jsonb_in,
                &[Some(pg_sys::Datum::from(text.as_ptr()))],
            )
        }
        .expect("jsonb_in returns a value")
    }

    fn arg<'a>(datum: pg_sys::Datum) -> JsonbArg<'a> {
        // SAFETY: a jsonb datum that lives in the test's memory context.
        unsafe { JsonbArg::from_polymorphic_datum(datum, false, pg_sys::InvalidOid) }
            .expect("not null")
    }

    /// Runs each case in a memory context of its own, freed after it.
    fn in_own_context<R>(case: impl FnOnce() -> R) -> R {
        // SAFETY: the case's allocations are used only inside it.
        unsafe { pgrx::PgMemoryContexts::new("flagship test case").switch_to(|_| case()) }
    }

    #[pg_test]
    fn the_binary_reader_agrees_with_serde_json() {
        let slot = std::cell::RefCell::new(Value::String("a previous call's buffer".into()));
        let cases = (
            generated::members(),
            prop::collection::vec(generated::key(), 0..4),
        );
        generated::runner(10_000, "jsonb reader")
            .run(&cases, |(members, probes)| {
                let text = generated::object_text(&members);
                let reference: Value = serde_json::from_str(&text).expect("generated JSON");
                let reference = reference.as_object().expect("an object");
                in_own_context(|| {
                    let slot = &mut *slot.borrow_mut();
                    let context = arg(jsonb_from_text(&text));
                    prop_assert!(context.is_object());
                    for key in members.iter().map(|(key, _)| key).chain(&probes) {
                        let found = context.read_into(key, slot);
                        match reference.get(key) {
                            Some(expected) => prop_assert!(
                                found && same_json(slot, expected),
                                "key {key:?}: read {slot} (found: {found}), expected {expected} in {text}"
                            ),
                            None => prop_assert!(!found, "absent key {key:?} found in {text}"),
                        }
                    }
                    Ok(())
                })
            })
            .unwrap();
    }

    #[pg_test]
    fn the_reader_refuses_what_is_not_an_object() {
        generated::runner(2_000, "jsonb reader, non-objects")
            .run(&generated::value(), |value| {
                in_own_context(|| {
                    let context = arg(jsonb_from_text(&value.to_string()));
                    prop_assert_eq!(context.is_object(), value.is_object());
                    if !value.is_object() {
                        let mut slot = Value::Null;
                        prop_assert!(!context.read_into("k1", &mut slot));
                    }
                    Ok(())
                })
            })
            .unwrap();
    }

    /// The loader's and put_flag's reader (the binary iterator) against
    /// the text round trip it replaced, on generated documents, number
    /// spellings jsonb keeps as written, and nesting at serde_json's limit.
    #[pg_test]
    fn the_document_reader_agrees_with_the_text_path() {
        let number_text = prop_oneof![
            Just("1.0".to_string()),
            Just("1.50".to_string()),
            Just("-0".to_string()),
            Just("1e400".to_string()),
            Just("-1e-400".to_string()),
            Just("18446744073709551616".to_string()),
            Just("-9223372036854775809".to_string()),
            (any::<i64>(), 0u32..40).prop_map(|(m, e)| format!("{m}e{e}")),
            (any::<i32>(), 1usize..30).prop_map(|(m, zeros)| format!("{m}.{}", "0".repeat(zeros))),
            // Whole numbers are read from numeric's digits (base 10 000):
            // around each digit boundary and the ends of u64 and i64.
            (0u32..6, -2i128..3, any::<bool>()).prop_map(|(power, offset, negative)| {
                let magnitude = 10_000i128.pow(power) + offset;
                format!("{}", if negative { -magnitude } else { magnitude })
            }),
            (-2i128..3).prop_map(|offset| (i128::from(u64::MAX) + offset).to_string()),
            (-2i128..3).prop_map(|offset| (i128::from(i64::MIN) + offset).to_string()),
        ];
        let documents = prop_oneof![
            generated::value().prop_map(|value| value.to_string()),
            generated::scalar().prop_map(|value| value.to_string()),
            generated::members().prop_map(|members| generated::object_text(&members)),
            // Arrays past the 32-entry stride of stored offsets.
            prop::collection::vec(generated::value(), 0..100)
                .prop_map(|items| Value::Array(items).to_string()),
            // ... and nested after other members.
            (
                generated::members(),
                prop::collection::vec(generated::value(), 33..80)
            )
                .prop_map(|(mut members, items)| {
                    members.push(("nested".to_string(), Value::Array(items)));
                    generated::object_text(&members)
                }),
            number_text.clone(),
            prop::collection::vec(number_text, 1..5)
                .prop_map(|numbers| format!("{{\"n\": [{}]}}", numbers.join(", "))),
            (120usize..135).prop_map(|depth| format!("{}1{}", "[".repeat(depth), "]".repeat(depth))),
            (120usize..135).prop_map(|depth| {
                format!("{}{{}}{}", "{\"a\": ".repeat(depth), "}".repeat(depth))
            }),
        ];
        generated::runner(10_000, "jsonb document reader")
            .run(&documents, |text| {
                in_own_context(|| {
                    let document = arg(jsonb_from_text(&text));
                    let through_text = super::parse_document(&document.to_text());
                    match (document.to_document(), through_text) {
                        (Ok(read), Ok(expected)) => {
                            prop_assert!(read == expected, "read {read}, expected {expected} from {text}")
                        }
                        (Err(_), Err(_)) => {}
                        (read, expected) => prop_assert!(
                            false,
                            "read {read:?}, expected {expected:?} from {text}"
                        ),
                    }
                    Ok(())
                })
            })
            .unwrap();
    }

    #[pg_test]
    fn the_builders_agree_with_serde_json() {
        let documents = prop_oneof![
            generated::value(),
            generated::scalar(),
            // Objects of scalars take the one-call flat_object path.
            prop::collection::vec((generated::key(), generated::scalar()), 0..200)
                .prop_map(|pairs| Value::Object(pairs.into_iter().collect())),
            generated::members().prop_map(|pairs| Value::Object(pairs.into_iter().collect())),
        ];
        generated::runner(10_000, "jsonb builders")
            .run(&documents, |value| {
                in_own_context(|| {
                    let expected = arg(jsonb_from_text(&value.to_string())).to_text();
                    let built = BuiltJsonb::from_value(&value);
                    prop_assert_eq!(
                        arg(built.0).to_text(),
                        expected.clone(),
                        "built from {}",
                        value
                    );
                    let copied = BuiltJsonb::from_bytes(&built.to_bytes());
                    prop_assert_eq!(arg(copied.0).to_text(), expected);
                    Ok(())
                })
            })
            .unwrap();
    }
