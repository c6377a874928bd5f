    use pgrx::prelude::*;

    use crate::test_support::{failure, organization_with_shop, text};

    /// An organization with plans `pro` (reports, 3 api calls a month, 2
    /// seats), `free` (nothing) and `soft` (1 call, soft), and customers on them.
    fn setup() {
        organization_with_shop("acme-co", "Acme");
        Spi::run(
            r#"SELECT flagship.put_flag('shop', '{"key": "reports", "kind": "plan",
                   "environments": {"production": {"enabled": true}}}');
               SELECT flagship.put_flag('shop', '{"key": "gold-banner", "environments": {"production": {"enabled": true,
                   "rules": [{"id": "gold", "conditions": [{"attribute": "customer.tier", "op": "eq", "values": ["gold"]}],
                              "serve": {"variant": "on"}}], "default": {"variant": "off"}}}}');
               SELECT flagship.put_metric('shop', '{"key": "api_calls", "unit": "calls"}');
               SELECT flagship.put_metric('shop', '{"key": "seats", "aggregation": "gauge"}');
               SELECT flagship.put_plan('shop', '{"key": "pro", "features": {"reports": true},
                   "limits": {"api_calls": {"limit": 3, "period": "month"}, "seats": {"limit": 2}}}');
               SELECT flagship.put_plan('shop', '{"key": "free"}');
               SELECT flagship.put_plan('shop', '{"key": "soft", "limits": {"api_calls": {"limit": 1, "enforcement": "soft"}}}');
               SELECT flagship.put_customer('shop/production', '{"key": "acme", "plan": "pro", "attributes": {"tier": "gold"}}');
               SELECT flagship.put_customer('shop/production', '{"key": "globex", "plan": "free"}');
               SELECT flagship.put_customer('shop/production', '{"key": "initech", "plan": "pro", "status": "canceled"}');
               SELECT flagship.put_customer('shop/production', '{"key": "hooli", "plan": "pro", "status": "trialing",
                   "trial_ends_at": "2000-01-01T00:00:00Z"}');
               SELECT flagship.put_customer('shop/production', '{"key": "umbrella", "plan": "soft"}');
               SELECT flagship.put_customer('shop/production', '{"key": "stark", "plan": "free",
                   "overrides": {"features": {"reports": true}, "limits": {"api_calls": {"limit": null}}}}');"#,
        )
        .unwrap();
    }

    fn field(sql: &str, name: &str) -> String {
        text(&format!("SELECT ({sql}) ->> '{name}'"))
    }

    #[pg_test]
    fn limits_are_consumed_exactly_and_every_reason_is_answered() {
        setup();
        let check = "flagship.check_usage_limit('acme', 'api_calls')";
        assert_eq!(field(check, "reason"), "WITHIN_LIMIT");
        assert_eq!(field(check, "remaining"), "3");
        for expected_used in 1..=3 {
            let result = text("SELECT flagship.record_usage('acme', 'api_calls')::text");
            assert!(
                result.contains(&format!("\"used\": {expected_used}")),
                "{result}"
            );
            assert!(result.contains("\"allowed\": true"), "{result}");
        }
        let denied = "flagship.record_usage('acme', 'api_calls')";
        assert_eq!(field(denied, "allowed"), "false");
        assert_eq!(field(denied, "reason"), "LIMIT_EXCEEDED");
        assert_eq!(field(check, "used"), "3");
        assert_eq!(
            text("SELECT count(*)::text FROM flagship.usage_ledger"),
            "3",
            "denials record nothing"
        );
        // The month's window, in UTC.
        assert_eq!(
            text(&format!(
                "SELECT ((({check}) ->> 'period_start')::timestamptz \
                      = date_trunc('month', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' \
                    AND (({check}) ->> 'resets_at')::timestamptz \
                      = (date_trunc('month', now() AT TIME ZONE 'UTC') + interval '1 month') AT TIME ZONE 'UTC')::text"
            )),
            "true"
        );

        let reasons = [
            ("nobody", "api_calls", "CUSTOMER_NOT_FOUND"),
            ("acme", "nope", "METRIC_NOT_FOUND"),
            ("globex", "api_calls", "NOT_ENTITLED"),
            ("initech", "api_calls", "SUBSCRIPTION_INACTIVE"),
            ("hooli", "api_calls", "SUBSCRIPTION_INACTIVE"),
            ("stark", "api_calls", "UNLIMITED"),
        ];
        for (customer, metric, reason) in reasons {
            for function in ["check_usage_limit", "record_usage"] {
                assert_eq!(
                    field(
                        &format!("flagship.{function}('{customer}', '{metric}')"),
                        "reason"
                    ),
                    reason,
                    "{function} {customer} {metric}"
                );
            }
        }
        // Soft limits record and say so.
        let first = "flagship.record_usage('umbrella', 'api_calls')";
        assert_eq!(field(first, "over_limit"), "false");
        let over = text("SELECT flagship.record_usage('umbrella', 'api_calls')::text");
        assert!(
            over.contains("\"allowed\": true") && over.contains("\"over_limit\": true"),
            "{over}"
        );
        assert_eq!(
            field(
                "flagship.check_usage_limit('umbrella', 'api_calls')",
                "used"
            ),
            "2"
        );
    }

    #[pg_test]
    fn idempotency_rollback_and_gauges() {
        setup();
        let first = text("SELECT flagship.record_usage('acme', 'api_calls', 2, 'req-1')::text");
        let again = text("SELECT flagship.record_usage('acme', 'api_calls', 2, 'req-1')::text");
        assert!(again.contains("\"replayed\": true"), "{again}");
        assert_eq!(again.replace(", \"replayed\": true", ""), first);
        assert_eq!(
            field("flagship.check_usage_limit('acme', 'api_calls')", "used"),
            "2"
        );

        // A rolled-back transaction never consumed anything.
        let (code, _) =
            failure("PERFORM flagship.record_usage('acme', 'api_calls'); RAISE EXCEPTION 'abort'");
        assert_eq!(code, "P0001");
        assert_eq!(
            field("flagship.check_usage_limit('acme', 'api_calls')", "used"),
            "2"
        );

        // Seats are a gauge: set, bounded by the hard limit.
        assert_eq!(
            field("flagship.set_usage('acme', 'seats', 2)", "allowed"),
            "true"
        );
        assert_eq!(
            field("flagship.set_usage('acme', 'seats', 3)", "reason"),
            "LIMIT_EXCEEDED"
        );
        assert_eq!(field("flagship.set_usage('acme', 'seats', 1)", "used"), "1");
        assert_eq!(
            field(
                "flagship.check_usage_limit('acme', 'seats', 1)",
                "remaining"
            ),
            "1"
        );
        assert_eq!(
            field("flagship.check_usage_limit('acme', 'seats')", "resets_at"),
            "",
            "gauges never reset"
        );

        for (sql, expected) in [
            (
                "PERFORM flagship.record_usage('acme', 'api_calls', -1)",
                "amount",
            ),
            (
                "PERFORM flagship.record_usage('acme', 'api_calls', 10000000000000)",
                "amount",
            ),
            (
                "PERFORM flagship.check_usage_limit('acme', 'api_calls', NULL)",
                "amount",
            ),
            (
                "PERFORM flagship.record_usage('acme', 'api_calls', 1, '')",
                "idempotency_key",
            ),
            ("PERFORM flagship.set_usage('acme', 'seats', -5)", "value"),
            (
                "PERFORM flagship.set_usage('acme', 'api_calls', 5)",
                "is a sum",
            ),
            (
                "PERFORM flagship.record_usage('acme', 'api_calls', 1, NULL, 'shop/moon')",
                "moon",
            ),
            // A NULL where a name is needed names the argument (it was an
            // internal error, XX000, from pgrx).
            ("PERFORM flagship.record_usage('acme', NULL)", "metric: must not be NULL"),
            ("PERFORM flagship.check_usage_limit('acme', NULL)", "metric: must not be NULL"),
            ("PERFORM flagship.set_usage('acme', NULL, 1)", "metric: must not be NULL"),
            ("PERFORM flagship.grant_credits('acme', NULL, 1)", "metric: must not be NULL"),
            ("PERFORM flagship.reserve_usage('acme', NULL, 1)", "metric: must not be NULL"),
            ("PERFORM flagship.finalize_usage(NULL, 1)", "reservation_id: must not be NULL"),
            ("PERFORM flagship.rate_limit(NULL, 'requests')", "subject: must not be NULL"),
            ("PERFORM flagship.rate_limit('acme', NULL)", "name: must not be NULL"),
            ("PERFORM flagship.rate_limit('acme', 'requests', NULL)", "cost: must not be NULL"),
            ("PERFORM flagship.explain_evaluation(NULL)", "flag_key: must not be NULL"),
            ("PERFORM flagship.usage_period_start(NULL, now())", "period: must not be NULL"),
            ("PERFORM flagship.usage_period_end('month', NULL)", "at: must not be NULL"),
        ] {
            let (code, message) = failure(sql);
            assert_eq!(code, "22023", "{sql}: {message}");
            assert!(message.contains(expected), "{sql}: {message}");
        }
    }

    #[pg_test]
    fn plan_flags_follow_subscriptions_and_customer_attributes() {
        setup();
        let reason = |customer: &str| {
            text(&format!(
                "SELECT flagship.flagship_evaluate('reports', '{{\"customer\": \"{customer}\"}}') ->> 'reason'"
            ))
        };
        assert_eq!(reason("acme"), "STATIC");
        assert_eq!(reason("globex"), "NOT_ENTITLED");
        assert_eq!(reason("initech"), "NOT_ENTITLED", "canceled");
        assert_eq!(reason("hooli"), "NOT_ENTITLED", "trial over");
        assert_eq!(reason("stark"), "STATIC", "override add-on");
        assert_eq!(reason("nobody"), "NOT_ENTITLED");
        // A change of plan is seen at once, in the same transaction.
        Spi::run(r#"SELECT flagship.put_customer('shop/production', '{"key": "globex", "plan": "pro"}')"#)
            .unwrap();
        assert_eq!(reason("globex"), "STATIC");
        Spi::run(
            r#"SELECT flagship.put_customer('shop/production', '{"key": "hooli", "plan": "pro", "status": "trialing",
                   "trial_ends_at": "2999-01-01T00:00:00Z"}')"#,
        )
        .unwrap();
        assert_eq!(reason("hooli"), "STATIC", "trial running");
        // customer.* reads the stored attributes.
        let banner = |customer: &str| {
            text(&format!(
                "SELECT flagship.flagship_evaluate('gold-banner', '{{\"customer\": \"{customer}\"}}') ->> 'rule'"
            ))
        };
        assert_eq!(banner("acme"), "gold");
        assert_eq!(banner("globex"), "");
    }

    #[pg_test]
    fn bad_plans_and_customers_are_refused_and_nothing_is_written() {
        setup();
        for (sql, expected) in [
            (
                r#"PERFORM flagship.put_plan('shop', '{"key": "x", "limits": {"ghost": {"limit": 1}}}')"#,
                "limits.ghost: unknown metric",
            ),
            (
                r#"PERFORM flagship.put_plan('shop', '{"key": "x", "limits": {"api_calls": {"limit": -1}}}')"#,
                "limits.api_calls.limit",
            ),
            (
                r#"PERFORM flagship.put_plan('shop', '{"key": "x", "limits": {"api_calls": {"period": "fortnight"}}}')"#,
                "limits.api_calls.period",
            ),
            (
                r#"PERFORM flagship.put_plan('shop', '{"key": "x", "features": {"ghost": true}}')"#,
                "features.ghost: unknown flag",
            ),
            (
                r#"PERFORM flagship.put_plan('shop', '{"key": "x", "price": 5}')"#,
                "unknown field \"price\"",
            ),
            (
                r#"PERFORM flagship.put_customer('shop/production', '{"key": "x", "plan": "platinum"}')"#,
                "plan: unknown plan",
            ),
            (
                r#"PERFORM flagship.put_customer('shop/production', '{"key": "x", "plan": "pro", "status": "trialing"}')"#,
                "trial_ends_at",
            ),
            (
                r#"PERFORM flagship.put_customer('shop/production', '{"key": "x", "attributes": [1]}')"#,
                "attributes",
            ),
            (
                r#"PERFORM flagship.put_metric('shop', '{"key": "x", "aggregation": "avg"}')"#,
                "aggregation",
            ),
        ] {
            let (code, message) = failure(sql);
            assert_eq!(code, "22023", "{sql}: {message}");
            assert!(message.contains(expected), "{sql}: {message}");
        }
        assert_eq!(
            text("SELECT string_agg(key, ',' ORDER BY key) FROM flagship.plans"),
            "free,pro,soft"
        );
        assert_eq!(
            text("SELECT count(*)::text FROM flagship.customers WHERE external_key = 'x'"),
            "0"
        );
        // Plain SQL meets the table constraints.
        let (code, _) = failure("UPDATE flagship.usage_limits SET period = 'fortnight'");
        assert_eq!(code, "23514");
        let (code, _) = failure("UPDATE flagship.subscriptions SET status = 'paused'");
        assert_eq!(code, "23514");
        Spi::run("SELECT flagship.record_usage('acme', 'api_calls')").unwrap();
        let (code, _) = failure("DELETE FROM flagship.usage_ledger");
        assert_eq!(code, "42501");
        let (code, _) = failure("UPDATE flagship.usage_ledger SET amount = 0");
        assert_eq!(code, "42501");
        // An application may not write the ledger itself, whatever the kind
        // (restrictive policies: see sql/usage.sql); record_usage may.
        Spi::run("CREATE ROLE flagship_test_app NOLOGIN IN ROLE flagship_app").unwrap();
        Spi::run("SET LOCAL ROLE flagship_test_app").unwrap();
        let append = |kind: &str| {
            format!(
                "INSERT INTO flagship.usage_ledger (organization_id, customer_id, metric_id, \
                 period_start, kind, amount, used_after, usage_limit, enforcement, resets_at) \
                 SELECT organization_id, customer_id, metric_id, period_start, '{kind}', amount, \
                 used_after, usage_limit, enforcement, resets_at FROM flagship.usage_ledger LIMIT 1"
            )
        };
        let (code, message) = failure(&append("bogus"));
        assert_eq!(code, "42501", "{message}");
        assert!(message.contains("usage_ledger"), "{message}");
        assert_eq!(failure(&append("record")).0, "42501");
        Spi::run("RESET ROLE").unwrap();
    }

    #[pg_test]
    fn export_then_import_carries_plans_and_customers() {
        setup();
        let exported = text("SELECT flagship.export_project('shop')::text");
        Spi::run(&format!(
            "SELECT set_config('flagship.organization_id', flagship.create_organization('other-co', 'Other')::text, true); \
             SELECT flagship.import_project(flagship.current_organization_id(), $doc${exported}$doc$)"
        ))
        .unwrap();
        assert_eq!(
            text("SELECT flagship.export_project('shop')::text"),
            exported
        );
        assert_eq!(
            field("flagship.record_usage('acme', 'api_calls')", "reason"),
            "WITHIN_LIMIT"
        );
        assert_eq!(
            text("SELECT flagship.flagship_evaluate('reports', '{\"customer\": \"stark\"}') ->> 'reason'"),
            "STATIC"
        );
    }
