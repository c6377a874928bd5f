//! Rate limits (#18, DESIGN.md section 7): windows in shared memory that
//! count every attempt, committed or not, exact under racing sessions.

use postgres::Client;
use serde_json::{json, Value};

use crate::harness::{admin_session, answer, app_session, connect, login_as, sqlstate, text};

/// An organization whose plan `pro` allows 100 requests a minute and plan
/// `enterprise` none at all, customers acme (pro) and bigco (enterprise),
/// and an admin session.
fn setup(su: &mut Client, prefix: &str) -> (String, Client) {
    let (org, mut admin) = admin_session(su, prefix);
    admin
        .batch_execute(
            r#"SELECT flagship.put_plan('shop', '{"key": "pro",
                   "rate_limits": {"requests": {"limit": 100, "window": "1m"}}}');
               SELECT flagship.put_plan('shop', '{"key": "enterprise"}');
               SELECT flagship.put_customer('shop/production', '{"key": "acme", "plan": "pro"}');
               SELECT flagship.put_customer('shop/production', '{"key": "bigco", "plan": "enterprise"}');"#,
        )
        .unwrap();
    (org, admin)
}

#[test]
fn racing_sessions_get_exactly_the_limit_rolled_back_attempts_included() {
    let mut su = connect();
    let (org, _admin) = setup(&mut su, "rate-race");
    let racers: Vec<_> = (0..8)
        .map(|i| app_session(&mut su, &org, &format!("rate-racer-{i}")))
        .map(|mut app| {
            std::thread::spawn(move || {
                let mut allowed = 0;
                for attempt in 0..40 {
                    // Every other attempt is rolled back: it still counts.
                    let roll_back = attempt % 2 == 1;
                    app.batch_execute("BEGIN").unwrap();
                    let result = answer(&mut app, "flagship.rate_limit('acme', 'requests')");
                    app.batch_execute(if roll_back { "ROLLBACK" } else { "COMMIT" })
                        .unwrap();
                    if result["allowed"] == json!(true) {
                        allowed += 1;
                    }
                }
                allowed
            })
        })
        .collect();
    let allowed: i32 = racers.into_iter().map(|racer| racer.join().unwrap()).sum();
    assert_eq!(allowed, 100, "320 attempts in one window of 100");

    let mut app = app_session(&mut su, &org, "rate-after");
    let refused = answer(&mut app, "flagship.rate_limit('acme', 'requests')");
    let retry = refused["retry_after_ms"].as_i64().unwrap();
    assert!((1..=61_000).contains(&retry), "{refused}");
    let reset_at = refused["reset_at"].as_str().unwrap().to_string();
    assert_eq!(
        refused,
        json!({"allowed": false, "limit": 100, "remaining": 0, "reset_at": reset_at,
               "retry_after_ms": retry, "reason": "RATE_LIMITED"})
    );
    // The window resets about a minute (and at most one bucket more) from now.
    let seconds: f64 = text(
        &mut app,
        &format!("SELECT extract(epoch FROM '{reset_at}'::timestamptz - clock_timestamp())::text"),
    )
    .parse()
    .unwrap();
    assert!((55.0..=62.0).contains(&seconds), "reset in {seconds} s");
}

#[test]
fn costs_plans_without_the_limit_and_typos() {
    let mut su = connect();
    let (org, mut admin) = setup(&mut su, "rate-terms");
    let first = answer(&mut admin, "flagship.rate_limit('acme', 'requests', 60)");
    assert_eq!(first["remaining"], json!(40));
    let too_much = answer(&mut admin, "flagship.rate_limit('acme', 'requests', 41)");
    assert_eq!(too_much["allowed"], json!(false));
    // The refused 41 counted: the window now holds 101.
    assert_eq!(
        answer(&mut admin, "flagship.rate_limit('acme', 'requests')")["allowed"],
        json!(false)
    );
    assert_eq!(
        answer(&mut admin, "flagship.rate_limit('acme', 'requests', 101)")["retry_after_ms"],
        Value::Null,
        "a cost above the limit never fits"
    );
    // A plan that does not declare the limit: unlimited.
    assert_eq!(
        answer(&mut admin, "flagship.rate_limit('bigco', 'requests')"),
        json!({"allowed": true, "limit": null, "remaining": null, "reset_at": null,
               "retry_after_ms": 0, "reason": "WITHIN_LIMIT"})
    );
    for bad in [
        "SELECT flagship.rate_limit('acme', 'reqests')",
        "SELECT flagship.rate_limit('nobody', 'requests')",
        "SELECT flagship.rate_limit('acme', 'requests', 0)",
        "SELECT flagship.rate_limit('key:not-a-uuid', 'requests')",
        "SELECT flagship.rate_limit('key:00000000-0000-0000-0000-000000000000', 'requests')",
    ] {
        assert_eq!(sqlstate(&mut admin, bad), "22023", "{bad}");
    }
    let refused = admin
        .batch_execute(
            r#"SELECT flagship.put_plan('shop', '{"key": "pro", "rate_limits": {"requests": {"limit": 10, "window": "2d"}}}')"#,
        )
        .unwrap_err();
    let error = refused.as_db_error().unwrap();
    assert_eq!(error.code().code(), "22023");
    assert!(
        error
            .message()
            .starts_with("plan \"pro\": rate_limits.requests.window: \"2d\""),
        "{}",
        error.message()
    );
    // A plan change is seen by the next call (terms are kept per backend
    // only until plans or customers change); the window's counts stay.
    admin
        .batch_execute(
            r#"SELECT flagship.put_plan('shop', '{"key": "pro", "rate_limits": {"requests": {"limit": 1000, "window": "1m"}}}')"#,
        )
        .unwrap();
    let raised = answer(&mut admin, "flagship.rate_limit('acme', 'requests')");
    assert_eq!(
        (&raised["allowed"], &raised["limit"]),
        (&json!(true), &json!(1000))
    );
    admin
        .batch_execute(
            r#"SELECT flagship.put_plan('shop', '{"key": "pro", "rate_limits": {"requests": {"limit": 100, "window": "1m"}}}')"#,
        )
        .unwrap();
    // Plain SQL is held to the same terms.
    assert_eq!(
        sqlstate(
            &mut admin,
            r#"UPDATE flagship.plans SET rate_limits = '{"requests": {"limit": 0, "window": "1m"}}' WHERE key = 'pro'"#
        ),
        "23514"
    );
    // Exported with the plan, as written.
    assert_eq!(
        answer(
            &mut admin,
            "(SELECT p -> 'rate_limits' FROM jsonb_array_elements(flagship.export_project('shop') -> 'plans') p \
               WHERE p ->> 'key' = 'pro')"
        ),
        json!({"requests": {"limit": 100, "window": "1m"}})
    );
    // The counting step is verification's alone.
    let mut app = app_session(&mut su, &org, "rate-hit");
    assert_eq!(
        sqlstate(
            &mut app,
            &format!(
                "SELECT flagship.rate_limit_hit('{org}', 'customer:x', 'requests', 1, '1m', 1)"
            )
        ),
        "42501"
    );
}

#[test]
fn organizations_do_not_share_windows() {
    let mut su = connect();
    let (_, mut first) = setup(&mut su, "rate-first");
    let (_, mut second) = setup(&mut su, "rate-second");
    assert_eq!(
        answer(&mut first, "flagship.rate_limit('acme', 'requests', 100)")["remaining"],
        json!(0)
    );
    // The same customer key and limit name in another organization.
    assert_eq!(
        answer(&mut second, "flagship.rate_limit('acme', 'requests')")["remaining"],
        json!(99)
    );
}

#[test]
fn verification_checks_a_keys_rate_limit_before_its_usage_limit() {
    let mut su = connect();
    let (org, mut admin) = setup(&mut su, "rate-keys");
    let key = text(
        &mut admin,
        &format!(
            r#"SELECT flagship.issue_api_key('{org}', 'limited', ARRAY['usage:write'], usage_limit => 10,
                   rate_limits => '{{"verify": {{"limit": 3, "window": "1h"}}}}')"#
        ),
    );
    let code = |client: &mut Client, key: &str| {
        text(
            client,
            &format!("SELECT flagship.verify_api_key('{key}') ->> 'code'"),
        )
    };
    for _ in 0..3 {
        assert_eq!(code(&mut admin, &key), "VALID");
    }
    assert_eq!(code(&mut admin, &key), "RATE_LIMITED");
    assert_eq!(code(&mut admin, &key), "RATE_LIMITED");
    assert_eq!(
        text(
            &mut admin,
            "SELECT usage_count::text FROM flagship.api_keys WHERE name = 'limited'"
        ),
        "3",
        "refused attempts spend no use"
    );
    // A rolled key keeps the limit and counts in the same window.
    let key_id = text(
        &mut admin,
        "SELECT id::text FROM flagship.api_keys WHERE name = 'limited' AND rolled_from IS NULL",
    );
    let rolled = text(
        &mut admin,
        &format!("SELECT flagship.roll_api_key('{key_id}', '1 hour')"),
    );
    assert_eq!(code(&mut admin, &rolled), "RATE_LIMITED");
    assert_eq!(
        answer(
            &mut admin,
            &format!("flagship.rate_limit('key:{key_id}', 'verify')")
        )["allowed"],
        json!(false)
    );
    // Counting is outside the transaction: it takes no transaction id
    // (whose commit record would cost a WAL flush per call).
    admin
        .batch_execute(&format!(
            "BEGIN; SELECT flagship.rate_limit('key:{key_id}', 'verify'); \
             SELECT flagship.rate_limit('acme', 'requests')"
        ))
        .unwrap();
    assert_eq!(
        text(
            &mut admin,
            "SELECT coalesce(pg_current_xact_id_if_assigned()::text, 'none')"
        ),
        "none"
    );
    admin.batch_execute("ROLLBACK").unwrap();
    // A key limited to 3 an hour issues no key without that limit.
    let (_, mut keyed) = login_as(&mut su, "rate-keyed", &["flagship_admin"]);
    let wide = text(
        &mut admin,
        &format!(
            r#"SELECT flagship.issue_api_key('{org}', 'issuer', ARRAY['api_keys:write'],
                   rate_limits => '{{"verify": {{"limit": 1000, "window": "1h"}}}}')"#
        ),
    );
    keyed
        .batch_execute(&format!(
            "BEGIN; SELECT flagship.authenticate('{wide}'); SET LOCAL flagship.actor = 'bea@acme.example'"
        ))
        .unwrap();
    assert_eq!(
        sqlstate(
            &mut keyed,
            &format!("SELECT flagship.issue_api_key('{org}', 'free', ARRAY['api_keys:write'])")
        ),
        "42501"
    );
    // Nor by a plain INSERT.
    assert_eq!(
        sqlstate(
            &mut keyed,
            &format!(
                "INSERT INTO flagship.api_keys (organization_id, name, display_prefix, key_hash, scopes)
                 VALUES ('{org}', 'raw', 'fs_live_00000000', sha256('raw'), ARRAY['api_keys:write'])"
            )
        ),
        "42501"
    );
    assert_eq!(
        sqlstate(
            &mut keyed,
            &format!(
                r#"SELECT flagship.issue_api_key('{org}', 'tighter', ARRAY['api_keys:write'],
                       rate_limits => '{{"verify": {{"limit": 10, "window": "1d"}}}}')"#
            )
        ),
        "none"
    );
    keyed.batch_execute("ROLLBACK").unwrap();
}

/// A server started without `shared_preload_libraries = 'flagship'` has no
/// windows: rate limits refuse with 55000 and say what to add; everything
/// else works. Runs a second, throwaway server of the same installation.
#[test]
fn without_preloading_rate_limits_refuse_and_say_what_to_add() {
    let server = crate::harness::ThrowawayServer::start("no-preload", "");
    let mut plain = server.connect("postgres");
    plain
        .batch_execute(
            r#"CREATE EXTENSION flagship;
               SELECT set_config('flagship.organization_id',
                                 flagship.create_organization('plain', 'Plain')::text, false);
               SELECT flagship.create_project(flagship.current_organization_id(), 'shop', 'Shop');
               SET flagship.environment = 'shop/production';
               SELECT flagship.put_metric('shop', '{"key": "calls"}');
               SELECT flagship.put_plan('shop', '{"key": "pro", "limits": {"calls": {"limit": 5}},
                   "rate_limits": {"requests": {"limit": 100, "window": "1m"}}}');
               SELECT flagship.put_customer('shop/production', '{"key": "acme", "plan": "pro"}');"#,
        )
        .unwrap();
    let refused = plain
        .batch_execute("SELECT flagship.rate_limit('acme', 'requests')")
        .unwrap_err();
    let error = refused.as_db_error().unwrap();
    assert_eq!(error.code().code(), "55000");
    assert!(
        error
            .hint()
            .unwrap()
            .contains("shared_preload_libraries = 'flagship'"),
        "{error:?}"
    );
    // Nothing else needs the shared table.
    assert_eq!(
        text(
            &mut plain,
            "SELECT flagship.record_usage('acme', 'calls') ->> 'allowed'"
        ),
        "true"
    );
}

/// The test server keeps 1 024 windows. An organization that wants more
/// than its share is refused (53400); another organization still gets
/// every window it asks for.
#[test]
fn one_organization_filling_the_windows_does_not_lock_out_another() {
    let mut su = connect();
    let (_, mut noisy) = setup(&mut su, "rate-noisy");
    let (_, mut quiet) = setup(&mut su, "rate-quiet");
    for (client, customers) in [(&mut noisy, 1500), (&mut quiet, 50)] {
        client
            .batch_execute(&format!(
                "SELECT count(flagship.put_customer('shop/production', jsonb_build_object('key', 'c' || i, 'plan', 'pro')))
                   FROM generate_series(1, {customers}) i;
                 CREATE FUNCTION pg_temp.refused(customers int) RETURNS int LANGUAGE plpgsql AS $$
                 DECLARE refused int := 0;
                 BEGIN
                     FOR i IN 1..customers LOOP
                         BEGIN
                             PERFORM flagship.rate_limit('c' || i, 'requests');
                         EXCEPTION WHEN configuration_limit_exceeded THEN
                             refused := refused + 1;
                         END;
                     END LOOP;
                     RETURN refused;
                 END $$;"
            ))
            .unwrap();
    }
    let refused: i64 = text(&mut noisy, "SELECT pg_temp.refused(1500)::text")
        .parse()
        .unwrap();
    assert!(
        refused > 1000,
        "a quarter of 1 024 is 256: refused {refused}"
    );
    assert_eq!(
        text(&mut quiet, "SELECT pg_temp.refused(50)::text"),
        "0",
        "every window the quiet organization asked for"
    );
    // The quiet organization's windows count exactly.
    assert_eq!(
        answer(&mut quiet, "flagship.rate_limit('c1', 'requests')")["remaining"],
        json!(98)
    );
}
