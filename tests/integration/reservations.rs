//! Reservations (#18, DESIGN.md section 7): reserve before the work,
//! finalize with what it cost, release the rest; exact under races with
//! record_usage; expired reservations come back without any call.

use std::time::Duration;

use postgres::Client;
use serde_json::{json, Value};

use crate::harness::{admin_session, answer, app_session, connect, login_as, sqlstate, text};

/// An organization with a metric `calls` limited to 100 a month on plan
/// pro, a credits metric `tokens`, customer acme on pro, and an admin
/// session.
fn setup(su: &mut Client, prefix: &str) -> (String, Client) {
    let (org, mut admin) = admin_session(su, prefix);
    admin
        .batch_execute(
            r#"SELECT flagship.put_metric('shop', '{"key": "calls"}');
               SELECT flagship.put_metric('shop', '{"key": "tokens", "aggregation": "credits"}');
               SELECT flagship.put_plan('shop', '{"key": "pro", "limits": {"calls": {"limit": 100}}}');
               SELECT flagship.put_customer('shop/production', '{"key": "acme", "plan": "pro"}');"#,
        )
        .unwrap();
    (org, admin)
}

fn remaining(client: &mut Client, metric: &str) -> Value {
    answer(
        client,
        &format!("flagship.check_usage_limit('acme', '{metric}', 0)"),
    )["remaining"]
        .clone()
}

#[test]
fn reservations_racing_record_usage_never_overshoot() {
    let mut su = connect();
    let (org, mut admin) = setup(&mut su, "reserve-race");
    let racers: Vec<_> = (0..8)
        .map(|i| (i, app_session(&mut su, &org, &format!("reserve-racer-{i}"))))
        .map(|(i, mut app)| {
            std::thread::spawn(move || {
                let mut consumed = 0i64;
                let mut seed = 31 + i as u64 * 104_729;
                for _ in 0..30 {
                    seed = seed
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let amount = 1 + ((seed >> 33) % 5) as i64;
                    if i % 2 == 0 {
                        let held = answer(
                            &mut app,
                            &format!("flagship.reserve_usage('acme', 'calls', {amount})"),
                        );
                        if held["allowed"] != json!(true) {
                            continue;
                        }
                        // The work costs at most what was reserved.
                        let used = (seed >> 40) as i64 % (amount + 1);
                        let id = held["reservation_id"].as_str().unwrap().to_string();
                        let settled = answer(
                            &mut app,
                            &format!("flagship.finalize_usage('{id}', {used})"),
                        );
                        assert_eq!(settled["consumed"], json!(used), "{settled}");
                        consumed += used;
                    } else if answer(
                        &mut app,
                        &format!("flagship.record_usage('acme', 'calls', {amount})"),
                    )["allowed"]
                        == json!(true)
                    {
                        consumed += amount;
                    }
                }
                consumed
            })
        })
        .collect();
    let consumed: i64 = racers.into_iter().map(|racer| racer.join().unwrap()).sum();
    let used = answer(&mut admin, "flagship.check_usage_limit('acme', 'calls', 0)")["used"]
        .as_i64()
        .unwrap();
    assert!(used <= 100, "used {used} of 100");
    assert_eq!(
        used, consumed,
        "the counter holds exactly what was consumed"
    );
    // The ledger, releases included, sums to the same.
    let ledger: i64 = text(
        &mut admin,
        "SELECT sum(amount)::text FROM flagship.usage_ledger l
           JOIN flagship.metrics m ON m.organization_id = l.organization_id AND m.id = l.metric_id
          WHERE m.key = 'calls'",
    )
    .parse()
    .unwrap();
    assert_eq!(ledger, used);
}

#[test]
fn finalize_consumes_what_the_work_cost_and_releases_the_rest() {
    let mut su = connect();
    let (_, mut admin) = setup(&mut su, "reserve-finalize");
    let held = answer(&mut admin, "flagship.reserve_usage('acme', 'calls', 60)");
    assert_eq!(held["allowed"], json!(true));
    assert_eq!(held["remaining"], json!(40));
    let id = held["reservation_id"].as_str().unwrap().to_string();
    // The reserved amount counts against the limit at once.
    assert_eq!(
        answer(&mut admin, "flagship.record_usage('acme', 'calls', 41)")["reason"],
        json!("LIMIT_EXCEEDED")
    );
    let settled = answer(&mut admin, &format!("flagship.finalize_usage('{id}', 25)"));
    let expires_at = settled["expires_at"].clone();
    assert_eq!(
        settled,
        json!({"reservation_id": id, "state": "finalized", "reserved": 60, "consumed": 25,
               "released": 35, "expires_at": expires_at})
    );
    assert_eq!(remaining(&mut admin, "calls"), json!(75));
    // Again: the same answer; with another amount, 22023; releasing a
    // finalized reservation answers how it was settled.
    let again = answer(&mut admin, &format!("flagship.finalize_usage('{id}', 25)"));
    assert_eq!(
        (&again["consumed"], &again["replayed"]),
        (&json!(25), &json!(true))
    );
    assert_eq!(
        sqlstate(
            &mut admin,
            &format!("SELECT flagship.finalize_usage('{id}', 24)")
        ),
        "22023"
    );
    assert_eq!(
        answer(&mut admin, &format!("flagship.release_usage('{id}')"))["state"],
        json!("finalized")
    );
    assert_eq!(remaining(&mut admin, "calls"), json!(75));
    // Releasing gives everything back.
    let other = answer(&mut admin, "flagship.reserve_usage('acme', 'calls', 10)");
    let other_id = other["reservation_id"].as_str().unwrap().to_string();
    assert_eq!(remaining(&mut admin, "calls"), json!(65));
    assert_eq!(
        answer(&mut admin, &format!("flagship.release_usage('{other_id}')"))["released"],
        json!(10)
    );
    assert_eq!(remaining(&mut admin, "calls"), json!(75));
    // A gauge is set, not consumed: nothing to reserve (a refund could
    // otherwise take it below what was set).
    admin
        .batch_execute(
            r#"SELECT flagship.put_metric('shop', '{"key": "seats", "aggregation": "gauge"}');
               SELECT flagship.put_plan('shop', '{"key": "pro", "limits": {"calls": {"limit": 100}, "seats": {"limit": 10}}}');"#,
        )
        .unwrap();
    for bad in [
        "SELECT flagship.reserve_usage('acme', 'seats', 1)".to_string(),
        format!("SELECT flagship.finalize_usage('{other_id}', 11)"),
        "SELECT flagship.finalize_usage('00000000-0000-0000-0000-000000000000', 1)".to_string(),
        "SELECT flagship.reserve_usage('acme', 'calls', 0)".to_string(),
        "SELECT flagship.reserve_usage('acme', 'calls', 1, interval '0 seconds')".to_string(),
        "SELECT flagship.reserve_usage('acme', 'calls', 1, interval '8 days')".to_string(),
    ] {
        assert_eq!(sqlstate(&mut admin, &bad), "22023", "{bad}");
    }
    // Idempotent: the same key answers the first reservation; another
    // amount under it is 22023.
    let first = answer(
        &mut admin,
        "flagship.reserve_usage('acme', 'calls', 5, idempotency_key => 'job-1')",
    );
    let retry = answer(
        &mut admin,
        "flagship.reserve_usage('acme', 'calls', 5, idempotency_key => 'job-1')",
    );
    // The whole first answer (limit, use, period, reason), as
    // record_usage replays (it was a cut-down answer with a fixed reason).
    let mut expected = first.clone();
    expected["replayed"] = json!(true);
    expected["state"] = json!("held");
    assert_eq!(retry, expected);
    assert_eq!(remaining(&mut admin, "calls"), json!(70));
    // Still the first answer after more use and after the reservation
    // was finalized.
    answer(&mut admin, "flagship.record_usage('acme', 'calls', 1)");
    let id = first["reservation_id"].as_str().unwrap();
    answer(&mut admin, &format!("flagship.finalize_usage('{id}', 5)"));
    let later = answer(
        &mut admin,
        "flagship.reserve_usage('acme', 'calls', 5, idempotency_key => 'job-1')",
    );
    expected["state"] = json!("finalized");
    assert_eq!(later, expected);
    assert_eq!(
        sqlstate(
            &mut admin,
            "SELECT flagship.reserve_usage('acme', 'calls', 6, idempotency_key => 'job-1')"
        ),
        "22023"
    );
}

#[test]
fn expired_reservations_come_back_without_any_call() {
    let mut su = connect();
    let (org, mut admin) = setup(&mut su, "reserve-expire");
    let held = answer(
        &mut admin,
        "flagship.reserve_usage('acme', 'calls', 100, interval '1 second')",
    );
    let id = held["reservation_id"].as_str().unwrap().to_string();
    assert_eq!(remaining(&mut admin, "calls"), json!(0));
    std::thread::sleep(Duration::from_millis(1200));
    // Nobody released it, and the check already counts it released.
    assert_eq!(remaining(&mut admin, "calls"), json!(100));
    // Another session's consumption finds the room it left.
    let mut app = app_session(&mut su, &org, "reserve-expire-app");
    assert_eq!(
        answer(&mut app, "flagship.record_usage('acme', 'calls', 100)")["allowed"],
        json!(true)
    );
    // Where nothing is ever refused (a soft limit), the next reservation
    // releases expired ones.
    admin
        .batch_execute(
            r#"SELECT flagship.put_metric('shop', '{"key": "events"}');
               SELECT flagship.put_plan('shop', '{"key": "pro", "limits": {"calls": {"limit": 100},
                   "events": {"limit": 1000, "enforcement": "soft"}}}');"#,
        )
        .unwrap();
    let soft = answer(
        &mut admin,
        "flagship.reserve_usage('acme', 'events', 5, interval '1 second')",
    );
    let soft_id = soft["reservation_id"].as_str().unwrap().to_string();
    std::thread::sleep(Duration::from_millis(1200));
    answer(&mut admin, "flagship.reserve_usage('acme', 'events', 1)");
    assert_eq!(
        text(
            &mut admin,
            &format!("SELECT state FROM flagship.usage_reservations WHERE id = '{soft_id}'")
        ),
        "expired"
    );
    // Finalizing it now consumes nothing: it expired.
    let late = answer(&mut admin, &format!("flagship.finalize_usage('{id}', 100)"));
    assert_eq!(
        (&late["state"], &late["consumed"]),
        (&json!("expired"), &json!(0))
    );
    assert_eq!(remaining(&mut admin, "calls"), json!(0));
}

#[test]
fn credit_reservations_draw_from_grants_and_give_back_the_rest() {
    let mut su = connect();
    let (_, mut admin) = setup(&mut su, "reserve-credits");
    admin
        .batch_execute(
            "SELECT flagship.grant_credits('acme', 'tokens', 100, now() + interval '1 day');
             SELECT flagship.grant_credits('acme', 'tokens', 100);",
        )
        .unwrap();
    let held = answer(&mut admin, "flagship.reserve_usage('acme', 'tokens', 150)");
    assert_eq!(
        (&held["allowed"], &held["remaining"]),
        (&json!(true), &json!(50))
    );
    assert_eq!(
        answer(&mut admin, "flagship.record_usage('acme', 'tokens', 51)")["reason"],
        json!("CREDITS_EXHAUSTED")
    );
    let id = held["reservation_id"].as_str().unwrap().to_string();
    answer(&mut admin, &format!("flagship.finalize_usage('{id}', 120)"));
    assert_eq!(remaining(&mut admin, "tokens"), json!(80));
    // The 30 went back to the grant drawn last (the one that never
    // expires); the first-expiring grant stays spent.
    assert_eq!(
        text(
            &mut admin,
            "SELECT string_agg(remaining::text, ',' ORDER BY expires_at NULLS LAST) FROM flagship.credit_grants"
        ),
        "0,80"
    );
}

#[test]
fn a_customer_key_settles_only_its_customers_reservations() {
    let mut su = connect();
    let (org, mut admin) = setup(&mut su, "reserve-keys");
    admin
        .batch_execute(
            r#"SELECT flagship.put_customer('shop/production', '{"key": "bigco", "plan": "pro"}')"#,
        )
        .unwrap();
    let theirs = answer(
        &mut admin,
        "flagship.reserve_usage('bigco', 'calls', 5, idempotency_key => 'bigco-job')",
    );
    // The same customer key in staging: a key bound there settles nothing
    // of production's acme.
    admin
        .batch_execute(
            r#"SELECT flagship.put_customer('shop/staging', '{"key": "acme", "plan": "pro"}')"#,
        )
        .unwrap();
    let production_acme = answer(&mut admin, "flagship.reserve_usage('acme', 'calls', 4)");
    let staging_key = text(
        &mut admin,
        &format!(
            "SELECT flagship.issue_api_key('{org}', 'acme staging', ARRAY['usage:write'], 'shop/staging',
                                           customer => 'acme')"
        ),
    );
    let key = text(
        &mut admin,
        &format!(
            "SELECT flagship.issue_api_key('{org}', 'acme', ARRAY['usage:write', 'usage:read'], 'shop/production',
                                           customer => 'acme')"
        ),
    );
    let (_, mut app) = login_as(&mut su, "reserve-keys-app", &["flagship_app"]);
    app.batch_execute(&format!("BEGIN; SELECT flagship.authenticate('{key}')"))
        .unwrap();
    let own = answer(&mut app, "flagship.reserve_usage(NULL, 'calls', 3)");
    assert_eq!(own["allowed"], json!(true));
    let own_id = own["reservation_id"].as_str().unwrap().to_string();
    assert_eq!(
        answer(&mut app, &format!("flagship.finalize_usage('{own_id}', 2)"))["consumed"],
        json!(2)
    );
    // Another customer's idempotency key tells this customer nothing.
    app.batch_execute("SAVEPOINT before_replay").unwrap();
    let refused = app
        .batch_execute(
            "SELECT flagship.reserve_usage(NULL, 'calls', 3, idempotency_key => 'bigco-job')",
        )
        .unwrap_err();
    app.batch_execute("ROLLBACK TO SAVEPOINT before_replay")
        .unwrap();
    assert_eq!(
        refused.as_db_error().unwrap().message(),
        "idempotency key \"bigco-job\" was first used for another reservation"
    );
    let their_id = theirs["reservation_id"].as_str().unwrap();
    assert_eq!(
        sqlstate(
            &mut app,
            &format!("SELECT flagship.release_usage('{their_id}')")
        ),
        "22023"
    );
    assert_eq!(
        sqlstate(
            &mut app,
            "SELECT flagship.reserve_usage('bigco', 'calls', 1)"
        ),
        "42501"
    );
    app.batch_execute("COMMIT").unwrap();
    let production_id = production_acme["reservation_id"].as_str().unwrap();
    app.batch_execute(&format!(
        "BEGIN; SELECT flagship.authenticate('{staging_key}')"
    ))
    .unwrap();
    assert_eq!(
        sqlstate(
            &mut app,
            &format!("SELECT flagship.release_usage('{production_id}')")
        ),
        "22023"
    );
    app.batch_execute("COMMIT").unwrap();
    // Nobody writes reservations but the functions.
    assert_eq!(
        sqlstate(
            &mut app,
            "UPDATE flagship.usage_reservations SET state = 'released'"
        ),
        "none",
        "an UPDATE outside the functions matches no row"
    );
    assert_eq!(
        text(
            &mut admin,
            "SELECT count(*)::text FROM flagship.usage_reservations WHERE state = 'released'"
        ),
        "0"
    );
}
