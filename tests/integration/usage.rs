//! Usage limits under real concurrency: several sessions racing on one
//! counter never grant more than the limit, idempotent replays count once,
//! and a rolled-back transaction never consumed anything.

use std::thread;

use crate::harness::{connect, organization, text};

/// An organization whose customer `acme` may make `limit` API calls (hard),
/// plus a plan-kind flag `reports` it is entitled to. Returns the org id.
fn customer_with_limit(limit: i64) -> String {
    let mut admin = connect();
    let (org, _) = organization(&mut admin, "usage");
    admin
        .batch_execute(&format!(
            r#"SET flagship.organization_id = '{org}';
               SELECT flagship.put_flag('shop', '{{"key": "reports", "kind": "plan",
                   "environments": {{"production": {{"enabled": true}}}}}}');
               SELECT flagship.put_metric('shop', '{{"key": "api_calls"}}');
               SELECT flagship.put_plan('shop', '{{"key": "pro", "features": {{"reports": true}},
                   "limits": {{"api_calls": {{"limit": {limit}}}}}}}');
               SELECT flagship.put_customer('shop/production', '{{"key": "acme", "plan": "pro"}}');"#
        ))
        .unwrap();
    org
}

fn session(org: &str) -> postgres::Client {
    let mut client = connect();
    client
        .batch_execute(&format!(
            "SET flagship.organization_id = '{org}'; SET flagship.environment = 'shop/production'"
        ))
        .unwrap();
    client
}

fn used(client: &mut postgres::Client) -> i64 {
    text(
        client,
        "SELECT flagship.check_usage_limit('acme', 'api_calls') ->> 'used'",
    )
    .parse()
    .unwrap()
}

/// 8 sessions x 200 attempts against a limit of 1000, each attempt its own
/// transaction (`in_transactions`) or autocommitted; returns grants.
fn race(org: &str, in_transactions: bool, idempotency: Option<&str>) -> i64 {
    let workers: Vec<_> = (0..8)
        .map(|_| {
            let org = org.to_string();
            let idempotency = idempotency.map(str::to_string);
            thread::spawn(move || {
                let mut client = session(&org);
                let mut granted = 0;
                for attempt in 0..200 {
                    // With idempotency, every worker sends the same 200 keys.
                    let key = idempotency
                        .as_ref()
                        .map(|prefix| format!("{prefix}-{attempt}"));
                    if in_transactions {
                        client.batch_execute("BEGIN").unwrap();
                    }
                    let row = client
                        .query_one(
                            "SELECT (r ->> 'allowed')::boolean AND r ->> 'replayed' IS NULL \
                               FROM flagship.record_usage('acme', 'api_calls', 1, $1) r",
                            &[&key],
                        )
                        .unwrap();
                    if in_transactions {
                        client.batch_execute("COMMIT").unwrap();
                    }
                    if row.get::<_, bool>(0) {
                        granted += 1;
                    }
                }
                granted
            })
        })
        .collect();
    workers
        .into_iter()
        .map(|worker| worker.join().unwrap())
        .sum()
}

#[test]
fn racing_sessions_never_exceed_a_hard_limit() {
    for in_transactions in [false, true] {
        let org = customer_with_limit(1000);
        let granted = race(&org, in_transactions, None);
        let mut client = session(&org);
        assert_eq!(granted, 1000, "grants (transactions: {in_transactions})");
        assert_eq!(used(&mut client), 1000);
        assert_eq!(
            text(
                &mut client,
                &format!(
                    "SELECT count(*)::text FROM flagship.usage_ledger \
                      WHERE organization_id = '{org}'"
                )
            ),
            "1000",
            "one ledger row per grant"
        );
    }
}

#[test]
fn idempotent_replays_under_races_count_once() {
    let org = customer_with_limit(1_000_000);
    // 8 sessions send the same 200 keys: each key is consumed exactly once.
    let fresh = race(&org, false, Some("req"));
    let mut client = session(&org);
    assert_eq!(fresh, 200);
    assert_eq!(used(&mut client), 200);
}

#[test]
fn rollback_refunds_and_uncommitted_usage_is_invisible() {
    let org = customer_with_limit(10);
    let mut writer = session(&org);
    let mut reader = session(&org);
    writer.batch_execute("BEGIN").unwrap();
    writer
        .batch_execute("SELECT flagship.record_usage('acme', 'api_calls', 7)")
        .unwrap();
    assert_eq!(used(&mut reader), 0, "uncommitted usage leaked");
    writer.batch_execute("ROLLBACK").unwrap();
    assert_eq!(used(&mut writer), 0, "rolled back usage was consumed");

    // A consumption waiting on another session's lock sees its outcome.
    writer.batch_execute("BEGIN").unwrap();
    writer
        .batch_execute("SELECT flagship.record_usage('acme', 'api_calls', 7)")
        .unwrap();
    let org_for_thread = org.clone();
    let waiter = thread::spawn(move || {
        let mut client = session(&org_for_thread);
        text(
            &mut client,
            "SELECT flagship.record_usage('acme', 'api_calls', 5) ->> 'allowed'",
        )
    });
    thread::sleep(std::time::Duration::from_millis(300));
    writer.batch_execute("COMMIT").unwrap();
    assert_eq!(waiter.join().unwrap(), "false", "7 + 5 > 10");
    assert_eq!(used(&mut reader), 7);
}

#[test]
fn entitlement_changes_reach_other_sessions() {
    let org = customer_with_limit(10);
    let mut reader = session(&org);
    let reason = |client: &mut postgres::Client| {
        text(
            client,
            "SELECT flagship.flagship_evaluate('reports', '{\"customer\": \"acme\"}') ->> 'reason'",
        )
    };
    assert_eq!(reason(&mut reader), "STATIC");
    let mut admin = session(&org);
    admin
        .batch_execute(
            r#"SELECT flagship.put_customer('shop/production', '{"key": "acme", "plan": "pro", "status": "canceled"}')"#,
        )
        .unwrap();
    assert_eq!(reason(&mut reader), "NOT_ENTITLED");
}
