    use pgrx::prelude::*;

    use crate::test_support::{failure, organization_with_shop, text};

    fn setup() {
        organization_with_shop("acme", "Acme");
    }

    fn put_flag(document: &str) {
        Spi::run(&format!(
            "SELECT flagship.put_flag('shop', $doc${document}$doc$)"
        ))
        .unwrap();
    }

    fn reason(flag: &str, context: &str) -> String {
        text(&format!(
            "SELECT flagship.flagship_evaluate('{flag}', '{context}') ->> 'reason'"
        ))
    }

    #[pg_test]
    fn evaluates_with_targets_rules_and_default() {
        setup();
        put_flag(
            r#"{"key": "new-checkout", "environments": {"production": {"enabled": true,
                "targets": {"on": ["user-1"]},
                "rules": [{"id": "nordic", "conditions": [{"attribute": "country", "op": "in", "values": ["NO", "SE"]}],
                           "serve": {"variant": "on"}}],
                "default": {"variant": "off"}}}}"#,
        );
        assert_eq!(
            text("SELECT flagship.flagship_evaluate('new-checkout', '{\"targeting_key\": \"user-1\"}')::text"),
            r#"{"key": "new-checkout", "rule": "targets", "value": true, "reason": "TARGETING_MATCH", "variant": "on"}"#
        );
        assert_eq!(
            text("SELECT flagship.flagship_evaluate('new-checkout', '{\"country\": \"SE\"}') ->> 'rule'"),
            "nordic"
        );
        assert_eq!(reason("new-checkout", "{\"country\": \"DK\"}"), "DEFAULT");
        // Usable in WHERE clauses.
        let count = Spi::get_one::<i64>(
            "SELECT count(*) FROM (VALUES ('NO'), ('SE'), ('DK')) AS c (country) \
             WHERE flagship.flagship_enabled('new-checkout', jsonb_build_object('country', country))",
        )
        .unwrap();
        assert_eq!(count, Some(2));
        // An explicit environment wins over the session's.
        assert_eq!(
            text("SELECT flagship.flagship_evaluate('new-checkout', '{}', 'acme/shop/staging') ->> 'reason'"),
            "DISABLED"
        );
    }

    /// Contexts are read straight from jsonb's binary layout: keys sorted by
    /// length then bytes, offsets stored on every 32nd entry, numbers padded.
    /// Each rule below matches only when its attribute reads wrongly (or not
    /// at all), so DEFAULT proves every read right.
    #[pg_test]
    fn reads_every_kind_of_context_attribute() {
        setup();
        let expected = |i: u32| match i % 3 {
            0 => i.to_string(),
            1 => format!("\"v{i}\""),
            _ => i.is_multiple_of(2).to_string(),
        };
        let mut rules: Vec<String> = [1, 2, 3, 31, 32, 33, 34, 63, 64, 65, 79, 80]
            .into_iter()
            .map(|i| {
                format!(
                    r#"{{"id": "k{i}", "conditions": [{{"attribute": "k{i}", "op": "neq",
                        "values": [{}], "if_missing": true}}], "serve": {{"variant": "on"}}}}"#,
                    expected(i)
                )
            })
            .collect();
        for (id, attribute, value) in [
            ("unicode", "ключ", "\"значение\""),
            ("nested", "nested.inner", "\"x\""),
        ] {
            rules.push(format!(
                r#"{{"id": "{id}", "conditions": [{{"attribute": "{attribute}", "op": "neq",
                    "values": [{value}], "if_missing": true}}], "serve": {{"variant": "on"}}}}"#
            ));
        }
        put_flag(&format!(
            r#"{{"key": "wide", "environments": {{"production": {{"enabled": true,
                "rules": [{}], "default": {{"variant": "off"}}}}}}}}"#,
            rules.join(", ")
        ));
        let context = "(SELECT jsonb_object_agg('k' || i, CASE i % 3 WHEN 0 THEN to_jsonb(i) \
                        WHEN 1 THEN to_jsonb('v' || i) ELSE to_jsonb(i % 2 = 0) END) \
                        || '{\"ключ\": \"значение\", \"nested\": {\"inner\": \"x\"}}' \
                        FROM generate_series(1, 80) AS i)";
        let answer = |context: &str| {
            text(&format!(
                "SELECT flagship.flagship_evaluate('wide', {context})::text"
            ))
        };
        let all_read = answer(context);
        assert!(all_read.contains("\"reason\": \"DEFAULT\""), "{all_read}");
        // A wrong value, a null and a missing key are each noticed.
        for (change, rule) in [
            ("|| '{\"k64\": \"v0\"}'", "k64"),
            ("|| '{\"k65\": null}'", "k65"),
            ("- 'k80'", "k80"),
            ("- 'ключ'", "unicode"),
            ("|| '{\"nested\": {\"inner\": 1}}'", "nested"),
        ] {
            let changed = answer(&format!("({context} {change})"));
            assert!(
                changed.contains(&format!("\"rule\": \"{rule}\"")),
                "{change}: {changed}"
            );
        }
    }

    #[pg_test]
    fn errors_are_answered_not_raised() {
        setup();
        put_flag(r#"{"key": "f", "environments": {"production": {"enabled": true}}}"#);
        let missing = text("SELECT flagship.flagship_evaluate('nope')::text");
        assert!(
            missing.contains("\"error_code\": \"FLAG_NOT_FOUND\""),
            "{missing}"
        );
        let no_env =
            text("SELECT flagship.flagship_evaluate('f', '{}', 'shop/nowhere') ->> 'error_code'");
        assert_eq!(no_env, "ENVIRONMENT_NOT_FOUND");
        Spi::run("SET LOCAL flagship.environment = ''").unwrap();
        assert_eq!(
            text("SELECT flagship.flagship_evaluate('f') ->> 'error_code'"),
            "ENVIRONMENT_NOT_FOUND"
        );
        assert_eq!(
            text(
                "SELECT flagship.flagship_evaluate('f', '[1]', 'shop/production') ->> 'error_code'"
            ),
            "INVALID_CONTEXT"
        );
        assert_eq!(
            Spi::get_one::<bool>("SELECT flagship.flagship_enabled(NULL, NULL, 'shop/production')")
                .unwrap(),
            Some(false)
        );
        let all = text("SELECT flagship.flagship_evaluate_all('{}', 'nope/nope') ->> 'error_code'");
        assert_eq!(all, "ENVIRONMENT_NOT_FOUND");
    }

    #[pg_test]
    fn kill_switch_and_archiving() {
        setup();
        put_flag(r#"{"key": "f", "environments": {"production": {"enabled": true}}}"#);
        assert_eq!(reason("f", "{}"), "STATIC");
        Spi::run(
            "UPDATE flagship.feature_rules SET enabled = false \
             WHERE feature_id = (SELECT id FROM flagship.features WHERE key = 'f')",
        )
        .unwrap();
        assert_eq!(reason("f", "{}"), "DISABLED");
        Spi::run("UPDATE flagship.features SET archived = true WHERE key = 'f'").unwrap();
        assert_eq!(reason("f", "{}"), "ERROR");
        assert_eq!(text("SELECT flagship.flagship_evaluate_all()::text"), "{}");
    }

    #[pg_test]
    fn own_changes_are_seen_and_rollback_restores() {
        setup();
        put_flag(r#"{"key": "f", "environments": {"production": {"enabled": true}}}"#);
        assert_eq!(reason("f", "{}"), "STATIC");
        // A subtransaction that changes the flag, reads it, then rolls back.
        let inside = text(
            r#"DO $do$ BEGIN
                 PERFORM flagship.put_flag('shop', '{"key": "f", "environments": {"production": {"enabled": false}}}');
                 RAISE EXCEPTION '%', flagship.flagship_evaluate('f') ->> 'reason';
               EXCEPTION WHEN raise_exception THEN
                 PERFORM set_config('flagship_test.inside', SQLERRM, true);
               END $do$;
               SELECT current_setting('flagship_test.inside')"#,
        );
        assert_eq!(inside, "DISABLED", "own uncommitted change");
        assert_eq!(reason("f", "{}"), "STATIC", "rolled back");
    }

    #[pg_test]
    fn prerequisites_and_plan_flags() {
        setup();
        put_flag(
            r#"{"key": "payments", "environments": {"production": {"enabled": true,
                "rules": [{"conditions": [{"attribute": "country", "op": "eq", "values": ["NO"]}], "serve": {"variant": "on"}}],
                "default": {"variant": "off"}}}}"#,
        );
        put_flag(
            r#"{"key": "checkout", "prerequisites": [{"flag": "payments"}],
                "environments": {"production": {"enabled": true}}}"#,
        );
        assert_eq!(reason("checkout", "{\"country\": \"NO\"}"), "STATIC");
        assert_eq!(
            reason("checkout", "{\"country\": \"SE\"}"),
            "PREREQUISITE_FAILED"
        );
        put_flag(
            r#"{"key": "reports", "kind": "plan", "environments": {"production": {"enabled": true}}}"#,
        );
        assert_eq!(
            reason("reports", "{\"customer\": \"acme\"}"),
            "NOT_ENTITLED"
        );
    }

    #[pg_test]
    fn bad_documents_are_refused_and_nothing_is_written() {
        setup();
        put_flag(
            r#"{"key": "base", "environments": {"production": {"enabled": true, "default": {"variant": "on"}}}}"#,
        );
        let cases = [
            (
                r#"{"key": "f", "environments": {"production": {"rules": [{"conditions": [{"attribute": "a", "op": "lolwut", "values": [1]}], "serve": {"variant": "on"}}]}}}"#,
                "environments.production.rules[0].conditions[0].op: unknown operator \"lolwut\"",
            ),
            (
                r#"{"key": "f", "environments": {"production": {"default": {"rollout": {"on": 60, "off": 60}}}}}"#,
                "environments.production.default.rollout: weights sum to 120%, not 100%",
            ),
            (
                r#"{"key": "f", "environments": {"production": {"default": {"variant": "blue"}}}}"#,
                "environments.production.default.variant: unknown variant \"blue\"",
            ),
            (
                r#"{"key": "f", "environments": {"moon": {"enabled": true}}}"#,
                "environments.moon: project \"shop\" has no such environment",
            ),
            (
                r#"{"key": "f", "prerequisites": [{"flag": "ghost"}]}"#,
                "prerequisites: unknown flag \"ghost\"",
            ),
            (
                r#"{"key": "f", "environments": {"production": {"rules": [{"segment": "ghosts", "serve": {"variant": "on"}}]}}}"#,
                "unknown segment \"ghosts\"",
            ),
        ];
        for (document, expected) in cases {
            let (code, message) = failure(&format!(
                "PERFORM flagship.put_flag('shop', $doc${document}$doc$)"
            ));
            assert_eq!(code, "22023", "{document}: {message}");
            assert!(
                message.contains(expected),
                "{message} should contain {expected}"
            );
        }
        // A cycle through prerequisites.
        put_flag(r#"{"key": "a", "prerequisites": [{"flag": "base"}]}"#);
        let (code, message) = failure(
            r#"PERFORM flagship.put_flag('shop', '{"key": "base", "prerequisites": [{"flag": "a"}]}')"#,
        );
        assert_eq!(code, "22023");
        assert!(message.contains("cycle base -> a -> base"), "{message}");
        // Plain SQL writes meet the same validator.
        let (code, message) = failure(
            "UPDATE flagship.feature_rules SET rules = '[{\"conditions\": [{\"attribute\": \"a\", \"op\": \"nope\"}], \"serve\": {\"variant\": \"on\"}}]'",
        );
        assert_eq!(code, "22023");
        assert!(message.contains("unknown operator \"nope\""), "{message}");
        let (code, _) = failure(
            "INSERT INTO flagship.features (organization_id, project_id, key, kind) \
             SELECT organization_id, id, 'bad', 'ternary' FROM flagship.projects",
        );
        assert_eq!(code, "22023");
        let (code, message) = failure("UPDATE flagship.features SET variants = '{\"yes\": true, \"no\": false}', off_variant = 'no' WHERE key = 'base'");
        assert_eq!(code, "22023", "{message}");
        // ... and the same references as put_flag, checked at commit. Made
        // immediate here (this test is one transaction that never commits),
        // which first checks everything written so far: a prerequisite or a
        // segment that does not exist, a flag that another one needs.
        Spi::run("SET CONSTRAINTS ALL IMMEDIATE").unwrap();
        for (sql, code, expected) in [
            (
                "UPDATE flagship.features SET prerequisites = '[{\"flag\": \"ghost\"}]' WHERE key = 'a'",
                "22023",
                "flag \"a\": prerequisites: unknown flag \"ghost\"",
            ),
            (
                "UPDATE flagship.features SET prerequisites = '[{\"flag\": \"base\", \"variant\": \"blue\"}]' WHERE key = 'a'",
                "22023",
                "flag \"a\": prerequisites: flag \"base\" has no variant \"blue\"",
            ),
            (
                "UPDATE flagship.feature_rules SET rules = '[{\"segment\": \"ghosts\", \"serve\": {\"variant\": \"on\"}}]'",
                "22023",
                "environments.production.rules: unknown segment \"ghosts\"",
            ),
            (
                "DELETE FROM flagship.features WHERE key = 'base'",
                "23503",
                "flag \"base\" is a prerequisite of flag \"a\"",
            ),
            (
                "UPDATE flagship.features SET key = 'base2' WHERE key = 'base'",
                "23503",
                "flag \"base\" is a prerequisite of flag \"a\"",
            ),
        ] {
            let (raised, message) = failure(sql);
            assert_eq!(raised, code, "{sql}: {message}");
            assert!(message.contains(expected), "{sql}: {message}");
        }
        // At commit, a flag and the one that needs it may go together, in
        // any order (rolled back after the check).
        let (raised, message) = failure(
            "SET CONSTRAINTS ALL DEFERRED; \
             DELETE FROM flagship.features WHERE key = 'base'; DELETE FROM flagship.features WHERE key = 'a'; \
             SET CONSTRAINTS ALL IMMEDIATE; RAISE EXCEPTION 'checked' USING ERRCODE = 'P0001'",
        );
        assert_eq!((raised.as_str(), message.as_str()), ("P0001", "checked"));
        // Nothing of the refused documents was written.
        assert_eq!(
            text("SELECT string_agg(key, ',' ORDER BY key) FROM flagship.features"),
            "a,base"
        );
        assert_eq!(reason("base", "{}"), "STATIC");
    }

    #[pg_test]
    fn a_flag_bucketing_profile_is_stored_validated_and_exported() {
        setup();
        put_flag(
            r#"{"key": "u", "bucketing": "unleash", "environments": {"production": {"enabled": true,
                "default": {"rollout": [{"variant": "on", "weight": 1}, {"variant": "off", "weight": 2}],
                            "bucket_by": "userId"}}}}"#,
        );
        assert_eq!(
            text("SELECT bucketing FROM flagship.features WHERE key = 'u'"),
            "unleash"
        );
        assert_eq!(
            text("SELECT flagship.export_project('shop') -> 'flags' -> 0 ->> 'bucketing'"),
            "unleash"
        );
        // Unleash weights 1 and 2 are no percentages: a plain SQL switch back
        // to xxh3 is refused, and nothing changes.
        let (code, message) =
            failure("UPDATE flagship.features SET bucketing = NULL WHERE key = 'u'");
        assert_eq!(code, "22023", "{message}");
        assert!(message.contains("weights sum to 3%, not 100%"), "{message}");
        let (code, message) =
            failure("UPDATE flagship.features SET bucketing = 'md5' WHERE key = 'u'");
        assert_eq!(code, "22023", "{message}");
        assert!(
            message.contains("unknown bucketing profile \"md5\""),
            "{message}"
        );
        assert_eq!(
            text("SELECT bucketing FROM flagship.features WHERE key = 'u'"),
            "unleash"
        );
        // The stored profile places subjects as Unleash does.
        let expected = if flagship_engine::profiles::unleash_variant_target("42", "u", 3) <= 1 {
            "on"
        } else {
            "off"
        };
        assert_eq!(
            text(r#"SELECT flagship.flagship_evaluate('u', '{"userId": "42"}') ->> 'variant'"#),
            expected
        );
    }

    #[pg_test]
    fn export_then_import_reproduces_evaluations() {
        setup();
        Spi::run(r#"SELECT flagship.put_segment('shop', '{"key": "beta", "included": ["u-1"]}')"#)
            .unwrap();
        put_flag(r#"{"key": "base", "environments": {"production": {"enabled": true}}}"#);
        put_flag(
            r#"{"key": "exp", "kind": "multivariate", "variants": {"a": 1, "b": {"x": [2]}}, "off_variant": "a",
                "prerequisites": [{"flag": "base"}],
                "environments": {"production": {"enabled": true,
                   "rules": [{"id": "beta", "segment": "beta", "serve": {"variant": "b"}}],
                   "default": {"rollout": {"a": 37.5, "b": 62.5}, "salt": "s"}}}}"#,
        );
        let exported = text("SELECT flagship.export_project('shop')::text");
        let before = text(
            "SELECT string_agg(flagship.flagship_evaluate('exp', jsonb_build_object('targeting_key', 'u-' || i))::text, ';' ORDER BY i) \
             FROM generate_series(1, 200) i",
        );
        Spi::run(&format!(
            "SELECT set_config('flagship.organization_id', flagship.create_organization('other', 'Other')::text, true); \
             SELECT flagship.import_project(flagship.current_organization_id(), $doc${exported}$doc$)"
        ))
        .unwrap();
        let after = text(
            "SELECT string_agg(flagship.flagship_evaluate('exp', jsonb_build_object('targeting_key', 'u-' || i))::text, ';' ORDER BY i) \
             FROM generate_series(1, 200) i",
        );
        assert_eq!(before, after);
        assert!(before.contains("\"rule\": \"beta\""));
        assert_eq!(
            text("SELECT flagship.export_project('shop')::text"),
            exported
        );
    }

    #[pg_test]
    fn results_and_contexts_keep_every_json_type() {
        setup();
        put_flag(
            r#"{"key": "cfg", "kind": "multivariate", "off_variant": "small",
                "variants": {"small": {"limit": 10, "ratio": 0.25, "tags": ["a", null, true]}, "big": 1000},
                "environments": {"production": {"enabled": true,
                   "rules": [{"id": "adults", "conditions": [{"attribute": "user.age", "op": "gte", "values": [18]}],
                              "serve": {"variant": "big"}},
                             {"id": "named", "conditions": [{"attribute": "name", "op": "eq", "values": ["Åse ✓"]}],
                              "serve": {"variant": "big"}}],
                   "default": {"variant": "small"}}}}"#,
        );
        assert_eq!(
            text("SELECT (flagship.flagship_evaluate('cfg') -> 'value')::text"),
            r#"{"tags": ["a", null, true], "limit": 10, "ratio": 0.25}"#
        );
        // Nested objects, numbers and non-ASCII text in the context, read
        // from a stored row (short varlena header) and from a literal.
        Spi::run(
            r#"CREATE TEMP TABLE contexts (c jsonb);
               INSERT INTO contexts VALUES ('{"user": {"age": 30}}'), ('{"user": {"age": 12.5}}'),
                                           ('{"name": "Åse ✓"}'), ('{"user": "flat"}')"#,
        )
        .unwrap();
        assert_eq!(
            text("SELECT string_agg(coalesce(flagship.flagship_evaluate('cfg', c) ->> 'rule', '-'), ',') FROM contexts"),
            "adults,-,named,-"
        );
        assert_eq!(
            text(
                r#"SELECT flagship.flagship_evaluate('cfg', '{"user": {"age": 18}}') ->> 'value'"#
            ),
            "1000"
        );
        // Raw scalars and arrays are not objects.
        for context in ["'3'", "'\"x\"'", "'[]'", "'null'"] {
            assert_eq!(
                text(&format!(
                    "SELECT flagship.flagship_evaluate('cfg', {context}) ->> 'error_code'"
                )),
                "INVALID_CONTEXT",
                "{context}"
            );
        }
    }

    /// Flags of every kind, for comparing evaluate_all with evaluate.
    fn every_kind_of_flag() {
        Spi::run(
            r#"SELECT flagship.put_segment('shop', '{"key": "beta", "included": ["u-3"]}');
               SELECT flagship.put_metric('shop', '{"key": "calls"}')"#,
        )
        .unwrap();
        for document in [
            r#"{"key": "new-checkout", "environments": {"production": {"enabled": true,
                "targets": {"on": ["user-1"]},
                "rules": [{"id": "nordic", "conditions": [{"attribute": "country", "op": "in", "values": ["NO", "SE"]}],
                           "serve": {"variant": "on"}}],
                "default": {"variant": "off"}}}}"#,
            r##"{"key": "theme", "kind": "multivariate", "off_variant": "none",
                "variants": {"dark": {"bg": "#000", "名前": "暗い", "n": [1, 2.5, null, {"deep": [true]}]},
                             "light": "light ✓ \"quoted\"", "none": null},
                "environments": {"production": {"enabled": true,
                   "rules": [{"id": "adults", "conditions": [{"attribute": "age", "op": "gte", "values": [18]}],
                              "serve": {"variant": "dark"}},
                             {"id": "beta", "segment": "beta", "serve": {"variant": "light"}},
                             {"id": "gold", "conditions": [{"attribute": "customer.tier", "op": "eq", "values": ["gold"]}],
                              "serve": {"variant": "light"}},
                             {"id": "pro-users", "conditions": [{"attribute": "user.plan", "op": "eq", "values": ["pro"]}],
                              "serve": {"variant": "dark"}}],
                   "default": {"rollout": {"dark": 50, "light": 50}}}}}"##,
            r#"{"key": "plan-reports", "kind": "plan", "environments": {"production": {"enabled": true}}}"#,
            r#"{"key": "dependent", "prerequisites": [{"flag": "new-checkout"}],
                "environments": {"production": {"enabled": true}}}"#,
            r#"{"key": "switched-off", "environments": {"production": {"enabled": false}}}"#,
            r#"{"key": "unconfigured"}"#,
            r#"{"key": "retired", "archived": true, "environments": {"production": {"enabled": true}}}"#,
        ] {
            put_flag(document);
        }
        Spi::run(
            r#"SELECT flagship.put_plan('shop', '{"key": "pro", "features": {"plan-reports": true}}');
               SELECT flagship.put_customer('shop/production',
                   '{"key": "acme", "plan": "pro", "attributes": {"tier": "gold", "name": "Åse ✓"}}')"#,
        )
        .unwrap();
    }

    /// The bug of issue #13: every inner key and string of evaluate_all's
    /// answers was freed memory. Each answer must be exactly what
    /// flagship_evaluate gives for that flag, for generated contexts.
    #[pg_test]
    fn evaluate_all_equals_evaluate_flag_by_flag() {
        use crate::test_support::generated;
        use proptest::prelude::*;
        setup();
        every_kind_of_flag();
        // Another organization's flags evaluated first in this backend, so
        // freed memory would hold its data.
        Spi::run(
            "SELECT set_config('flagship.organization_id', \
                 flagship.create_organization('globex', 'Globex')::text, true); \
             SELECT flagship.create_project(flagship.current_organization_id(), 'shop', 'Shop')",
        )
        .unwrap();
        put_flag(
            r#"{"key": "globex-secret", "kind": "multivariate", "variants": {"s": "globex-only-value"},
                     "off_variant": "s", "environments": {"production": {"enabled": true}}}"#,
        );
        assert!(text("SELECT flagship.flagship_evaluate_all()::text").contains("globex-only-value"));
        Spi::run("SELECT set_config('flagship.organization_id', id::text, true) FROM flagship.organizations WHERE slug = 'acme'")
            .unwrap();

        let member = prop_oneof![
            prop_oneof![Just("user-1"), Just("u-2"), Just("u-3")]
                .prop_map(|key| ("targeting_key".to_string(), serde_json::json!(key))),
            prop_oneof![Just("NO"), Just("SE"), Just("DK")]
                .prop_map(|country| ("country".to_string(), serde_json::json!(country))),
            generated::number().prop_map(|age| ("age".to_string(), age)),
            prop_oneof![Just("acme"), Just("nobody")]
                .prop_map(|customer| ("customer".to_string(), serde_json::json!(customer))),
            prop_oneof![Just("pro"), Just("free")]
                .prop_map(|plan| ("user".to_string(), serde_json::json!({"plan": plan}))),
            (generated::key(), generated::value()),
        ];
        let contexts = prop_oneof![
            8 => prop::collection::vec(member, 0..8).prop_map(|members| generated::object_text(&members)),
            1 => generated::value().prop_map(|value| value.to_string()),
            1 => Just("NULL".to_string()),
        ];
        let compare = "SELECT flagship.flagship_evaluate_all(NULLIF($1, 'NULL')::jsonb)::text, \
                              (SELECT jsonb_object_agg(key, flagship.flagship_evaluate(key, NULLIF($1, 'NULL')::jsonb)) \
                                 FROM flagship.features WHERE NOT archived AND organization_id = flagship.current_organization_id())::text";
        generated::runner(1_000, "evaluate_all against evaluate")
            .run(&contexts, |context| {
                let (all, one_by_one) =
                    Spi::get_two_with_args::<String, String>(compare, &[context.clone().into()])
                        .unwrap();
                prop_assert_eq!(&all, &one_by_one, "context {}", context);
                prop_assert!(!all.unwrap_or_default().contains("globex"));
                Ok(())
            })
            .unwrap();
        // One answer in full, inner fields included.
        assert_eq!(
            text(
                r#"SELECT (flagship.flagship_evaluate_all('{"targeting_key": "u-3", "age": 30}') -> 'theme')::text"#
            ),
            r##"{"key": "theme", "rule": "adults", "value": {"n": [1, 2.5, null, {"deep": [true]}], "bg": "#000", "名前": "暗い"}, "reason": "TARGETING_MATCH", "variant": "dark"}"##
        );
        // The error object carries the real message.
        assert_eq!(
            text("SELECT flagship.flagship_evaluate_all('{}', 'nope/nope')::text"),
            r#"{"error_code": "ENVIRONMENT_NOT_FOUND", "error_message": "environment \"nope/nope\" not found"}"#
        );
    }

    fn nested(depth: usize) -> String {
        format!("{}1{}", "[".repeat(depth), "]".repeat(depth))
    }

    /// Documents too deep or too large to load back are refused on every
    /// write path, naming the field and the limit; what is accepted
    /// evaluates.
    #[pg_test]
    fn pathological_documents_are_refused_at_write_or_evaluated() {
        setup();
        let variant = |value: &str| {
            format!(
                r#"PERFORM flagship.put_flag('shop', '{{"key": "deep", "kind": "multivariate", "off_variant": "x",
                     "variants": {{"x": {value}}}, "environments": {{"production": {{"enabled": true}}}}}}')"#
            )
        };
        for (value, expected) in [
            (
                nested(65),
                "variants.x: nests 65 levels of JSON, more than the limit of 64",
            ),
            (
                nested(124),
                "variants.x: nests 124 levels of JSON, more than the limit of 64",
            ),
            (nested(200), "nests deeper than 128 levels of JSON"),
            ("1e400".to_string(), "numbers must fit a double"),
        ] {
            let (code, message) = failure(&variant(&value));
            assert_eq!(code, "22023", "{message}");
            assert!(
                message.contains(expected),
                "{message} should contain {expected}"
            );
        }
        // At the limit, accepted, and evaluated.
        Spi::run(&format!("DO $do$ BEGIN {}; END $do$", variant(&nested(64)))).unwrap();
        assert_eq!(reason("deep", "{}"), "STATIC");
        // Plain SQL meets the same limits.
        let (code, message) = failure(&format!(
            "UPDATE flagship.features SET variants = '{{\"x\": {}}}' WHERE key = 'deep'",
            nested(100)
        ));
        assert_eq!(code, "22023", "{message}");
        assert!(message.contains("more than the limit of 64"), "{message}");
        // Customer attributes, through put_customer and plain SQL.
        let (code, message) = failure(&format!(
            r#"PERFORM flagship.put_customer('shop/production', '{{"key": "c1", "attributes": {{"a": {}}}}}')"#,
            nested(100)
        ));
        assert_eq!(code, "22023", "{message}");
        assert!(
            message.contains("customer \"c1\": attributes: nests 101 levels"),
            "{message}"
        );
        let (code, message) = failure(&format!(
            "INSERT INTO flagship.customers (organization_id, project_id, environment_id, external_key, attributes) \
             SELECT organization_id, project_id, id, 'c2', '{{\"a\": {}}}' FROM flagship.environments WHERE key = 'production'",
            nested(300)
        ));
        assert_eq!(code, "22023", "{message}");
        assert!(
            message.contains("customer \"c2\": attributes: nests deeper than 128"),
            "{message}"
        );
        // A million-element variant is accepted and served whole.
        Spi::run(
            r#"SELECT flagship.put_flag('shop', jsonb_build_object('key', 'big', 'kind', 'multivariate',
                   'off_variant', 'x', 'variants', jsonb_build_object('x', (SELECT jsonb_agg(i) FROM generate_series(1, 1000000) i)),
                   'environments', '{"production": {"enabled": true}}'::jsonb))"#,
        )
        .unwrap();
        assert_eq!(
            text("SELECT jsonb_array_length(flagship.flagship_evaluate('big') -> 'value')::text"),
            "1000000"
        );
    }

    /// Rows written around the validators (a superuser with triggers off)
    /// fail only their own flag: it answers ERROR naming itself, the rest of
    /// the environment evaluates as before, and nothing raises.
    #[pg_test]
    fn a_flag_that_cannot_be_loaded_fails_alone() {
        setup();
        put_flag(r#"{"key": "healthy", "environments": {"production": {"enabled": true}}}"#);
        put_flag(r#"{"key": "broken", "environments": {"production": {"enabled": true}}}"#);
        Spi::run(r#"SELECT flagship.put_segment('shop', '{"key": "beta", "included": ["u-1"]}')"#)
            .unwrap();
        put_flag(
            r#"{"key": "segmented", "environments": {"production": {"enabled": true,
                "rules": [{"segment": "beta", "serve": {"variant": "off"}}]}}}"#,
        );
        Spi::run(&format!(
            r#"SET LOCAL session_replication_role = replica;
               UPDATE flagship.features SET variants = '{{"on": {}, "off": false}}' WHERE key = 'broken';
               UPDATE flagship.segments SET conditions = '[{{"attribute": "a", "op": "lolwut"}}]' WHERE key = 'beta';
               SET LOCAL session_replication_role = origin"#,
            nested(200)
        ))
        .unwrap();
        let broken = text("SELECT flagship.flagship_evaluate('broken')::text");
        assert_eq!(
            broken,
            r#"{"key": "broken", "value": null, "reason": "ERROR", "variant": null, "error_code": "GENERAL", "error_message": "flag \"broken\" cannot be evaluated: its stored \"variants\" nests deeper than 128 levels of JSON"}"#
        );
        assert_eq!(reason("healthy", "{}"), "STATIC");
        assert_eq!(
            text("SELECT flagship.flagship_evaluate('segmented') ->> 'error_message'"),
            "flag \"segmented\" cannot be evaluated: its segment \"beta\" cannot be read"
        );
        assert_eq!(
            Spi::get_one::<bool>("SELECT flagship.flagship_enabled('broken')").unwrap(),
            Some(false)
        );
        assert_eq!(
            text("SELECT string_agg(key || '=' || (value ->> 'reason'), ',' ORDER BY key) FROM jsonb_each(flagship.flagship_evaluate_all())"),
            "broken=ERROR,healthy=STATIC,segmented=ERROR"
        );
    }

    #[pg_test]
    fn bucket_function_matches_the_published_vectors() {
        assert_eq!(
            Spi::get_one::<i32>("SELECT flagship.bucket('new-checkout', 'user-1')").unwrap(),
            Some(31_778)
        );
    }
