//! API keys of customers, rotation and address allow-lists (#18,
//! DESIGN.md section 7), with non-superuser sessions.

use std::time::Duration;

use postgres::Client;
use serde_json::{json, Value};

use crate::harness::{add_member, connect, login_as, organization, sqlstate, text};

/// An organization with project `shop`, metric `api_calls`, plan `pro` and
/// customers acme and globex in production, and an admin session in it.
fn setup(su: &mut Client, prefix: &str) -> (String, Client) {
    let (org, _) = organization(su, prefix);
    add_member(su, &org, "kim@acme.example", "admin");
    let (_, mut admin) = login_as(su, prefix, &["flagship_admin"]);
    admin
        .batch_execute(&format!(
            r#"SET flagship.organization_id = '{org}'; SET flagship.actor = 'kim@acme.example';
               SELECT flagship.put_metric('shop', '{{"key": "api_calls"}}');
               SELECT flagship.put_plan('shop', '{{"key": "pro", "limits": {{"api_calls": {{"limit": 100, "period": "month"}}}}}}');
               SELECT flagship.put_customer('shop/production', '{{"key": "acme", "plan": "pro"}}');
               SELECT flagship.put_customer('shop/production', '{{"key": "globex", "plan": "pro"}}');"#
        ))
        .unwrap();
    (org, admin)
}

fn verify(client: &mut Client, key: &str, address: Option<&str>) -> Value {
    let answer: String = client
        .query_one(
            "SELECT flagship.verify_api_key($1, $2::text::inet)::text",
            &[&key, &address],
        )
        .unwrap()
        .get(0);
    serde_json::from_str(&answer).unwrap()
}

fn code(client: &mut Client, key: &str, address: Option<&str>) -> String {
    verify(client, key, address)["code"]
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn a_customers_key_names_its_customer_and_acts_for_it_alone() {
    let mut su = connect();
    let (org, mut admin) = setup(&mut su, "ckey-owner");
    let key = text(
        &mut admin,
        &format!(
            "SELECT flagship.issue_api_key('{org}', 'acme backend', ARRAY['usage:write', 'usage:read'],
                                           'shop/production', customer => 'acme')"
        ),
    );
    let verified = verify(&mut admin, &key, None);
    assert_eq!(verified["customer"], json!("acme"));
    assert_eq!(verified["code"], json!("VALID"));

    let (_, mut app) = login_as(&mut su, "ckey-app", &["flagship_app"]);
    app.batch_execute("BEGIN").unwrap();
    assert_eq!(
        text(
            &mut app,
            &format!("SELECT flagship.authenticate('{key}') ->> 'customer'")
        ),
        "acme"
    );
    // NULL customer: the key's.
    assert_eq!(
        text(
            &mut app,
            "SELECT flagship.record_usage(NULL, 'api_calls', 3) ->> 'used'"
        ),
        "3"
    );
    assert_eq!(
        text(
            &mut app,
            "SELECT flagship.check_usage_limit(NULL, 'api_calls') ->> 'remaining'"
        ),
        "97"
    );
    // Another customer: refused, naming both.
    let error = app
        .batch_execute("SELECT flagship.record_usage('globex', 'api_calls', 1)")
        .unwrap_err();
    let error = error.as_db_error().unwrap();
    assert_eq!(error.code().code(), "42501");
    assert_eq!(
        error.message(),
        "this transaction's API key belongs to customer \"acme\", not \"globex\""
    );
    app.batch_execute("ROLLBACK").unwrap();

    // Without a key, NULL names nobody.
    app.batch_execute(&format!(
        "SET flagship.organization_id = '{org}'; SET flagship.environment = 'shop/production'"
    ))
    .unwrap();
    assert_eq!(
        sqlstate(&mut app, "SELECT flagship.record_usage(NULL, 'api_calls')"),
        "22023"
    );

    // Refused at issue: an unknown customer, a customer without environment.
    for sql in [
        format!("SELECT flagship.issue_api_key('{org}', 'x', '{{}}', 'shop/production', customer => 'nobody')"),
        format!("SELECT flagship.issue_api_key('{org}', 'x', customer => 'acme')"),
    ] {
        assert_eq!(sqlstate(&mut admin, &sql), "22023", "{sql}");
    }
}

#[test]
fn a_rolled_key_verifies_through_its_grace_period_only() {
    let mut su = connect();
    let (org, mut admin) = setup(&mut su, "ckey-roll");
    let old = text(
        &mut admin,
        &format!(
            "SELECT flagship.issue_api_key('{org}', 'ci', ARRAY['features:read'], 'shop/staging',
                                           usage_limit => 50, customer => NULL,
                                           allowed_ips => ARRAY['10.0.0.0/8'])"
        ),
    );
    let old_id = verify(&mut admin, &old, Some("10.1.2.3"))["key_id"]
        .as_str()
        .unwrap()
        .to_string();
    let new = text(
        &mut admin,
        &format!("SELECT flagship.roll_api_key('{old_id}', interval '400 milliseconds')"),
    );
    assert!(new.starts_with("fs_test_"), "{new}");
    let (old_answer, new_answer) = (
        verify(&mut admin, &old, Some("10.1.2.3")),
        verify(&mut admin, &new, Some("10.1.2.3")),
    );
    assert_eq!(old_answer["code"], json!("VALID"));
    assert_eq!(new_answer["code"], json!("VALID"));
    // Same settings, another key.
    let without_id = |answer: &Value| {
        let mut answer = answer.clone();
        answer.as_object_mut().unwrap().remove("key_id");
        answer
    };
    assert_eq!(without_id(&old_answer), without_id(&new_answer));
    assert_ne!(old_answer["key_id"], new_answer["key_id"]);
    assert_eq!(
        text(
            &mut admin,
            &format!(
                "SELECT concat_ws(' ', usage_limit, allowed_ips::text, rolled_from = '{old_id}')
                   FROM flagship.api_keys WHERE id = '{}'",
                new_answer["key_id"].as_str().unwrap()
            )
        ),
        "50 {10.0.0.0/8} t"
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(code(&mut admin, &old, Some("10.1.2.3")), "EXPIRED");
    assert_eq!(code(&mut admin, &new, Some("10.1.2.3")), "VALID");

    // No grace: the old key stops at once; a rolled (expired) key cannot be
    // rolled again.
    let new_id = verify(&mut admin, &new, Some("10.1.2.3"))["key_id"]
        .as_str()
        .unwrap()
        .to_string();
    let newest = text(
        &mut admin,
        &format!("SELECT flagship.roll_api_key('{new_id}')"),
    );
    assert_eq!(code(&mut admin, &new, Some("10.1.2.3")), "EXPIRED");
    assert_eq!(code(&mut admin, &newest, Some("10.1.2.3")), "VALID");
    assert_eq!(
        sqlstate(
            &mut admin,
            &format!("SELECT flagship.roll_api_key('{new_id}')")
        ),
        "22023"
    );
}

/// Review of #18: during the grace period old and new key each counted
/// their uses on a sequence of their own, so together they could be used
/// up to twice the limit. They share one now.
#[test]
fn a_rolled_limited_key_shares_its_limit_with_its_predecessor() {
    let mut su = connect();
    let (org, mut admin) = setup(&mut su, "ckey-shared");
    let old = text(
        &mut admin,
        &format!("SELECT flagship.issue_api_key('{org}', 'metered', ARRAY['features:read'], usage_limit => 3)"),
    );
    assert_eq!(code(&mut admin, &old, None), "VALID");
    let old_id = verify(&mut admin, &old, None)["key_id"]
        .as_str()
        .unwrap()
        .to_string();
    let new = text(
        &mut admin,
        &format!("SELECT flagship.roll_api_key('{old_id}', interval '1 hour')"),
    );
    // Two uses so far (both on the old key): one is left, for either key.
    assert_eq!(code(&mut admin, &new, None), "VALID");
    assert_eq!(code(&mut admin, &old, None), "USAGE_EXCEEDED");
    assert_eq!(code(&mut admin, &new, None), "USAGE_EXCEEDED");
    // Deleting the old key keeps the count the new one relies on.
    admin
        .batch_execute(&format!(
            "DELETE FROM flagship.api_keys WHERE id = '{old_id}'"
        ))
        .unwrap();
    assert_eq!(code(&mut admin, &new, None), "USAGE_EXCEEDED");
}

/// Review of #18: a narrow key holding api_keys:write could roll a wider
/// key of its organization and receive the new key's plaintext.
#[test]
fn a_key_rolls_no_key_wider_than_itself() {
    let mut su = connect();
    let (org, mut admin) = setup(&mut su, "ckey-wider");
    let wide = text(
        &mut admin,
        &format!("SELECT flagship.issue_api_key('{org}', 'wide', ARRAY['plans:*', 'features:*'])"),
    );
    let wide_id = verify(&mut admin, &wide, None)["key_id"]
        .as_str()
        .unwrap()
        .to_string();
    let narrow = text(
        &mut admin,
        &format!("SELECT flagship.issue_api_key('{org}', 'narrow', ARRAY['api_keys:write', 'api_keys:read'])"),
    );
    let (_, mut app) = login_as(&mut su, "ckey-wider-app", &["flagship_admin"]);
    app.batch_execute("BEGIN").unwrap();
    assert_eq!(
        text(
            &mut app,
            &format!("SELECT flagship.authenticate('{narrow}') ->> 'code'")
        ),
        "VALID"
    );
    assert_eq!(
        sqlstate(
            &mut app,
            &format!("SELECT flagship.roll_api_key('{wide_id}')")
        ),
        "42501"
    );
    // Nor lift its own limits with a plain UPDATE.
    app.batch_execute("ROLLBACK; BEGIN").unwrap();
    let limited = text(
        &mut admin,
        &format!(
            "SELECT flagship.issue_api_key('{org}', 'limited', ARRAY['api_keys:write', 'api_keys:read'],
                                           usage_limit => 10, allowed_ips => ARRAY['10.0.0.0/8'])"
        ),
    );
    assert_eq!(
        text(
            &mut app,
            &format!("SELECT flagship.authenticate('{limited}', '10.0.0.1') ->> 'code'")
        ),
        "VALID"
    );
    for sql in [
        "UPDATE flagship.api_keys SET allowed_ips = NULL WHERE id = flagship.current_key_id()",
        "UPDATE flagship.api_keys SET usage_limit = NULL WHERE id = flagship.current_key_id()",
        "UPDATE flagship.api_keys SET usage_limit = 1000 WHERE id = flagship.current_key_id()",
    ] {
        assert_eq!(sqlstate(&mut app, sql), "42501", "{sql}");
        app.batch_execute("ROLLBACK; BEGIN").unwrap();
        text(
            &mut app,
            &format!("SELECT flagship.authenticate('{limited}', '10.0.0.1') ->> 'code'"),
        );
    }
    app.batch_execute("ROLLBACK").unwrap();
    assert_eq!(code(&mut admin, &wide, None), "VALID");
    // A customer's key lists its scopes.
    assert_eq!(
        sqlstate(
            &mut admin,
            &format!("SELECT flagship.issue_api_key('{org}', 'x', '{{}}', 'shop/production', customer => 'acme')")
        ),
        "22023"
    );
}

#[test]
fn an_allow_list_admits_only_its_addresses() {
    let mut su = connect();
    let (org, mut admin) = setup(&mut su, "ckey-ips");
    let key = text(
        &mut admin,
        &format!(
            "SELECT flagship.issue_api_key('{org}', 'edge', ARRAY['features:read'],
                                           allowed_ips => ARRAY['203.0.113.0/24', '198.51.100.7', '2001:db8::/32'])"
        ),
    );
    for (address, expected) in [
        (Some("203.0.113.9"), "VALID"),
        (Some("198.51.100.7"), "VALID"),
        (Some("198.51.100.8"), "FORBIDDEN"),
        (Some("2001:db8::1"), "VALID"),
        (Some("2001:db9::1"), "FORBIDDEN"),
        (Some("::ffff:203.0.113.9"), "FORBIDDEN"),
        (None, "FORBIDDEN"),
    ] {
        assert_eq!(code(&mut admin, &key, address), expected, "{address:?}");
    }
    // authenticate passes the address on.
    let (_, mut app) = login_as(&mut su, "ckey-ips-app", &["flagship_app"]);
    app.batch_execute("BEGIN").unwrap();
    assert_eq!(
        text(
            &mut app,
            &format!("SELECT flagship.authenticate('{key}', '2001:db8::42') ->> 'code'")
        ),
        "VALID"
    );
    app.batch_execute("ROLLBACK; BEGIN").unwrap();
    assert_eq!(
        text(
            &mut app,
            &format!("SELECT flagship.authenticate('{key}', '192.0.2.1') ->> 'code'")
        ),
        "FORBIDDEN"
    );
    assert_eq!(
        text(&mut app, "SELECT (flagship.current_key_id() IS NULL)::text"),
        "true"
    );
    app.batch_execute("ROLLBACK").unwrap();

    // Malformed lists are refused naming the entry.
    for (list, message) in [
        (
            "ARRAY['10.0.0.0/8', 'not-an-address']",
            "allowed_ips[2]: \"not-an-address\" is not an IPv4 or IPv6 address or network",
        ),
        (
            "ARRAY['10.0.0.1/8']",
            "allowed_ips[1]: \"10.0.0.1/8\" is not an IPv4 or IPv6 address or network",
        ),
        (
            "ARRAY[]::text[]",
            "allowed_ips: must list at least one address or network (NULL: any address)",
        ),
    ] {
        let error = admin
            .batch_execute(&format!(
                "SELECT flagship.issue_api_key('{org}', 'x', allowed_ips => {list})"
            ))
            .unwrap_err();
        let error = error.as_db_error().unwrap();
        assert_eq!(error.code().code(), "22023", "{list}");
        assert_eq!(error.message(), message);
    }
}
