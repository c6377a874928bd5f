//! Prepaid credits (#18, DESIGN.md section 7): grants, consumption from
//! the grant that expires first, exactness under racing sessions.

use std::time::Duration;

use postgres::Client;
use serde_json::{json, Value};

use crate::harness::{admin_session, answer, app_session, connect, sqlstate, text};

/// An organization with a credits metric `ai_tokens` and customer acme, an
/// admin session (plans:write) and the organization's id.
fn setup(su: &mut Client, prefix: &str) -> (String, Client) {
    let (org, mut admin) = admin_session(su, prefix);
    admin
        .batch_execute(
            r#"SELECT flagship.put_metric('shop', '{"key": "ai_tokens", "aggregation": "credits"}');
               SELECT flagship.put_customer('shop/production', '{"key": "acme"}');"#,
        )
        .unwrap();
    (org, admin)
}

#[test]
fn racing_sessions_spend_exactly_the_granted_credits() {
    let mut su = connect();
    let (org, mut admin) = setup(&mut su, "credits-race");
    // 400 that expire tomorrow (drawn first), 600 that never expire.
    let first = answer(
        &mut admin,
        "flagship.grant_credits('acme', 'ai_tokens', 400, now() + interval '1 day')",
    );
    assert_eq!(first["balance"], json!(400));
    let second = answer(
        &mut admin,
        "flagship.grant_credits('acme', 'ai_tokens', 600)",
    );
    assert_eq!(second["balance"], json!(1000));

    let sessions: Vec<Client> = (0..8)
        .map(|i| app_session(&mut su, &org, &format!("credits-racer-{i}")))
        .collect();
    let racers: Vec<_> = sessions
        .into_iter()
        .enumerate()
        .map(|(i, mut app)| {
            std::thread::spawn(move || {
                let mut spent = 0i64;
                let mut seed = 17 + i as u64 * 7919;
                // Random amounts until one is refused, then single credits
                // until the balance is empty.
                let mut amount = 1 + (seed % 50) as i64;
                loop {
                    let result = answer(
                        &mut app,
                        &format!("flagship.record_usage('acme', 'ai_tokens', {amount})"),
                    );
                    if result["allowed"] == json!(true) {
                        spent += amount;
                        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
                        if amount > 1 {
                            amount = 1 + ((seed >> 33) % 50) as i64;
                        }
                    } else {
                        assert_eq!(result["reason"], json!("CREDITS_EXHAUSTED"), "{result}");
                        if amount == 1 {
                            return spent;
                        }
                        amount = 1;
                    }
                }
            })
        })
        .collect();
    let spent: i64 = racers.into_iter().map(|racer| racer.join().unwrap()).sum();
    assert_eq!(spent, 1000, "the racers spent other than what was granted");
    assert_eq!(
        text(
            &mut admin,
            "SELECT concat_ws(' ', sum(remaining), count(*) FILTER (WHERE remaining = 0))
               FROM flagship.credit_grants"
        ),
        "0 2"
    );
    // The ledger says which grants paid, and adds up to what was spent.
    assert_eq!(
        text(
            &mut admin,
            "SELECT concat_ws(' ', sum(amount), (SELECT sum((p->>'amount')::bigint)
                                                  FROM flagship.usage_ledger l2,
                                                       jsonb_array_elements(l2.paid_by) p
                                                 WHERE l2.kind = 'credits'))
               FROM flagship.usage_ledger WHERE kind = 'credits'"
        ),
        "1000 1000"
    );
}

#[test]
fn credits_expire_refund_on_rollback_and_are_never_not_entitled() {
    let mut su = connect();
    let (org, mut admin) = setup(&mut su, "credits-rules");
    let mut app = app_session(&mut su, &org, "credits-rules-app");
    // No grant yet: an empty balance, not "not entitled".
    assert_eq!(
        answer(
            &mut app,
            "flagship.check_usage_limit('acme', 'ai_tokens', 5)"
        ),
        json!({"allowed": false, "limit": null, "used": null, "remaining": 0, "period_start": null,
               "resets_at": null, "enforcement": "hard", "reason": "CREDITS_EXHAUSTED"})
    );
    answer(
        &mut admin,
        "flagship.grant_credits('acme', 'ai_tokens', 10, now() + interval '1 second', 'topup-1')",
    );
    // The same grant again is replayed; another with the key is refused.
    let replayed = answer(
        &mut admin,
        "flagship.grant_credits('acme', 'ai_tokens', 10, (SELECT expires_at FROM flagship.credit_grants), 'topup-1')",
    );
    assert_eq!(replayed["replayed"], json!(true));
    assert_eq!(replayed["balance"], json!(10));
    assert_eq!(
        sqlstate(
            &mut admin,
            "SELECT flagship.grant_credits('acme', 'ai_tokens', 11, NULL, 'topup-1')"
        ),
        "22023"
    );
    // A rolled-back consumption refunds.
    app.batch_execute("BEGIN").unwrap();
    assert_eq!(
        answer(&mut app, "flagship.record_usage('acme', 'ai_tokens', 7)")["remaining"],
        json!(3)
    );
    app.batch_execute("ROLLBACK").unwrap();
    assert_eq!(
        answer(&mut app, "flagship.check_usage_limit('acme', 'ai_tokens')")["remaining"],
        json!(10)
    );
    // More than the balance: refused, nothing taken.
    let refused = answer(&mut app, "flagship.record_usage('acme', 'ai_tokens', 11)");
    assert_eq!(refused["reason"], json!("CREDITS_EXHAUSTED"));
    assert_eq!(refused["remaining"], json!(10));
    // After the expiry the grant is gone from the balance.
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(
        answer(&mut app, "flagship.check_usage_limit('acme', 'ai_tokens')")["remaining"],
        json!(0)
    );
    assert_eq!(
        answer(&mut app, "flagship.record_usage('acme', 'ai_tokens', 1)")["reason"],
        json!("CREDITS_EXHAUSTED")
    );

    // Refusals: an application may not grant; credits have no limit and
    // cannot be set; grants are positive and expire in the future.
    assert_eq!(
        sqlstate(
            &mut app,
            "SELECT flagship.grant_credits('acme', 'ai_tokens', 5)"
        ),
        "42501"
    );
    for sql in [
        "SELECT flagship.set_usage('acme', 'ai_tokens', 5)",
        r#"SELECT flagship.put_plan('shop', '{"key": "pro", "limits": {"ai_tokens": {"limit": 5}}}')"#,
        "SELECT flagship.grant_credits('acme', 'ai_tokens', 0)",
        "SELECT flagship.grant_credits('acme', 'ai_tokens', 5, now() - interval '1 minute')",
    ] {
        assert_eq!(sqlstate(&mut admin, sql), "22023", "{sql}");
    }
    // Every grant is in the audit trail; consuming one is not.
    assert_eq!(
        text(
            &mut admin,
            "SELECT string_agg(action, ',' ORDER BY chain_seq) FROM flagship.audit_events
              WHERE resource_type = 'credit_grants'"
        ),
        "insert"
    );
}

#[test]
fn plans_grant_credits_each_period_with_rollover() {
    let mut su = connect();
    let (org, mut admin) = setup(&mut su, "credits-plans");
    admin
        .batch_execute(
            r#"SELECT flagship.put_plan('shop', '{"key": "pro",
                   "credits": {"ai_tokens": {"amount": 100, "period": "month", "rollover": {"max": 50}}}}');
               SELECT flagship.put_plan('shop', '{"key": "anchored",
                   "credits": {"ai_tokens": {"amount": 10, "period": "billing_month"}}}');
               SELECT flagship.put_customer('shop/production', '{"key": "acme", "plan": "pro"}');
               SELECT flagship.put_customer('shop/production', '{"key": "globex", "plan": "pro"}');
               SELECT flagship.put_customer('shop/production', '{"key": "initech", "plan": "anchored",
                   "billing_anchor": "2024-01-31T09:30:00Z"}');"#,
        )
        .unwrap();
    let mut app = app_session(&mut su, &org, "credits-plans-app");
    // Before any consumption the period's grant is pending, and counted.
    assert_eq!(
        answer(&mut app, "flagship.check_usage_limit('acme', 'ai_tokens')")["remaining"],
        json!(100)
    );
    assert_eq!(
        answer(&mut app, "flagship.record_usage('acme', 'ai_tokens', 30)")["remaining"],
        json!(70)
    );
    assert_eq!(
        text(
            &mut admin,
            "SELECT concat_ws(' ', g.amount, g.remaining,
                              g.period_start = flagship.usage_period_start('month', now()),
                              g.expires_at = flagship.usage_period_end('month', now()))
               FROM flagship.credit_grants g JOIN flagship.customers c ON c.id = g.customer_id
              WHERE c.external_key = 'acme' AND g.source = 'plan'"
        ),
        "100 70 t t"
    );
    // Later consumptions of the period draw from the same grant (one per
    // period: a unique index, which racing first consumptions meet in).
    assert_eq!(
        answer(&mut app, "flagship.record_usage('acme', 'ai_tokens', 1)")["remaining"],
        json!(69)
    );
    // Last period's plan grant left 80: 50 of it (the cap) rolls over.
    su.batch_execute(&format!(
        "INSERT INTO flagship.credit_grants (organization_id, customer_id, metric_id, amount, remaining,
                                             expires_at, source, period_start, granted_at)
         SELECT c.organization_id, c.id, m.id, 100, 80, flagship.usage_period_start('month', now()), 'plan',
                flagship.usage_period_start('month', now() - interval '1 month'), now() - interval '1 month'
           FROM flagship.customers c, flagship.metrics m
          WHERE c.organization_id = '{org}' AND c.external_key = 'globex' AND m.key = 'ai_tokens'
            AND m.organization_id = c.organization_id"
    ))
    .unwrap();
    assert_eq!(
        answer(
            &mut app,
            "flagship.check_usage_limit('globex', 'ai_tokens')"
        )["remaining"],
        json!(150)
    );
    assert_eq!(
        answer(
            &mut app,
            "flagship.record_usage('globex', 'ai_tokens', 150)"
        )["remaining"],
        json!(0)
    );
    assert_eq!(
        answer(&mut app, "flagship.record_usage('globex', 'ai_tokens', 1)")["reason"],
        json!("CREDITS_EXHAUSTED")
    );
    // A billing month anchored on the 31st: the grant follows the anchor.
    answer(&mut app, "flagship.record_usage('initech', 'ai_tokens', 1)");
    assert_eq!(
        text(
            &mut admin,
            "SELECT concat_ws(' ', g.amount,
                   g.period_start = flagship.usage_period_start('billing_month', now(), '2024-01-31T09:30:00Z'),
                   g.expires_at = flagship.usage_period_end('billing_month', now(), '2024-01-31T09:30:00Z'))
               FROM flagship.credit_grants g JOIN flagship.customers c ON c.id = g.customer_id
              WHERE c.external_key = 'initech'"
        ),
        "10 t t"
    );
    // The plans export with their credits and plan back unchanged.
    let exported = text(
        &mut admin,
        "SELECT flagship.export_project('shop', customers => false)::text",
    );
    let plans: Value = serde_json::from_str(&exported).unwrap();
    assert_eq!(
        plans["plans"][1]["credits"],
        json!({"ai_tokens": {"amount": 100, "period": "month", "rollover": {"max": 50}}})
    );
    assert_eq!(
        text(
            &mut admin,
            &format!(
                "SELECT flagship.plan_project('{org}', '{}') ->> 'unchanged'",
                exported.replace('\'', "''")
            )
        ),
        "7"
    );
    // Credits of a metric that does not count them are refused.
    assert_eq!(
        sqlstate(
            &mut admin,
            r#"SELECT flagship.put_plan('shop', '{"key": "x", "credits": {"ai_tokens": {"amount": 0}}}')"#
        ),
        "22023"
    );
}
