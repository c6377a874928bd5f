//! The audit trail and the change feed with real sessions: concurrent
//! writers keep one valid chain, a rolled-back change leaves nothing, no
//! flagship role can rewrite history, and NOTIFY reaches a listener only
//! when the change commits.

use std::thread;
use std::time::Duration;

use postgres::fallible_iterator::FallibleIterator;
use postgres::Client;

use crate::harness::{add_member, connect, organization, role_in, sqlstate, text};

fn admin_session(org: &str) -> Client {
    let mut client = connect();
    client
        .batch_execute(&format!(
            "SET flagship.organization_id = '{org}'; SET flagship.actor = 'alice'"
        ))
        .unwrap();
    client
}

fn put_flag_document(key: &str, enabled: bool) -> String {
    format!(
        r#"SELECT flagship.put_flag('shop', '{{"key": "{key}", "environments": {{"production": {{"enabled": {enabled}}}}}}}')"#
    )
}

fn events(client: &mut Client, org: &str) -> i64 {
    client
        .query_one(
            "SELECT count(*) FROM flagship.audit_events WHERE organization_id = $1::text::uuid",
            &[&org],
        )
        .unwrap()
        .get(0)
}

fn verdict(client: &mut Client, org: &str) -> String {
    text(
        client,
        &format!("SELECT flagship.verify_audit_chain('{org}')::text"),
    )
}

#[test]
fn concurrent_writers_keep_one_valid_chain() {
    let mut su = connect();
    let (org, _) = organization(&mut su, "chain");
    // Four autocommit writers and two in REPEATABLE READ transactions, which
    // must retry when another writer moved the chain head (40001).
    let workers: Vec<_> = (0..6)
        .map(|worker| {
            let org = org.clone();
            thread::spawn(move || {
                let mut client = admin_session(&org);
                let repeatable = worker >= 4;
                for change in 0..20 {
                    let statement =
                        put_flag_document(&format!("w{worker}-{}", change % 5), change % 2 == 0);
                    if !repeatable {
                        client.batch_execute(&statement).unwrap();
                        continue;
                    }
                    loop {
                        let outcome = client.batch_execute(&format!(
                            "BEGIN ISOLATION LEVEL REPEATABLE READ; {statement}; COMMIT"
                        ));
                        match outcome {
                            Ok(()) => break,
                            Err(error) => {
                                let code = error.code().map(|code| code.code().to_string());
                                assert_eq!(code.as_deref(), Some("40001"), "{error}");
                                client.batch_execute("ROLLBACK").unwrap();
                            }
                        }
                    }
                }
            })
        })
        .collect();
    for worker in workers {
        worker.join().unwrap();
    }
    let checked = events(&mut su, &org);
    // 6 writers x 20 changes, each touching the flag row, its production
    // configuration or both, plus the organization's own setup events.
    assert!(checked > 120, "{checked}");
    assert_eq!(
        verdict(&mut su, &org),
        format!(r#"{{"valid": true, "checked": {checked}, "first_broken_id": null}}"#)
    );
    let gaps = text(
        &mut su,
        &format!(
            "SELECT (max(chain_seq) - count(*))::text FROM flagship.audit_events WHERE organization_id = '{org}'"
        ),
    );
    assert_eq!(gaps, "0");
}

#[test]
fn a_rolled_back_change_leaves_no_event() {
    let mut su = connect();
    let (org, _) = organization(&mut su, "rollback");
    let mut session = admin_session(&org);
    let before = events(&mut session, &org);
    session.batch_execute("BEGIN").unwrap();
    session
        .batch_execute(&put_flag_document("temporary", true))
        .unwrap();
    assert_eq!(events(&mut session, &org), before + 2);
    // Another session does not see the uncommitted events.
    assert_eq!(events(&mut su, &org), before);
    session.batch_execute("ROLLBACK").unwrap();
    assert_eq!(events(&mut session, &org), before);
    // The chain head rolled back too: the next event follows without a gap.
    session
        .batch_execute(&put_flag_document("kept", true))
        .unwrap();
    assert_eq!(
        verdict(&mut su, &org),
        format!(
            r#"{{"valid": true, "checked": {}, "first_broken_id": null}}"#,
            before + 2
        )
    );
}

#[test]
fn no_flagship_role_can_rewrite_the_trail() {
    let mut su = connect();
    let (org, _) = organization(&mut su, "append-only");
    add_member(&mut su, &org, "alice", "owner");
    add_member(&mut su, &org, "victor", "viewer");
    for group in ["flagship_admin", "flagship_app", "flagship_auditor"] {
        let role = role_in(&mut su, "audit", Some(group));
        let mut client = connect();
        client
            .batch_execute(&format!(
                "SET ROLE {role}; SET flagship.organization_id = '{org}'; SET flagship.actor = 'alice'"
            ))
            .unwrap();
        client.batch_execute("BEGIN").unwrap();
        for statement in [
            "UPDATE flagship.audit_events SET actor = 'mallory'".to_string(),
            "DELETE FROM flagship.audit_events".to_string(),
            "TRUNCATE flagship.audit_events".to_string(),
            format!(
                "INSERT INTO flagship.audit_events (organization_id, chain_seq, actor, action, resource_type, \
                 resource_id, diff, transaction_id, hash) VALUES ('{org}', 999, 'mallory', 'insert', 'features', \
                 'x', '{{}}', 1, '\\x00')"
            ),
            "UPDATE flagship.audit_chain_heads SET last_seq = 0".to_string(),
            "DELETE FROM flagship.audit_chain_heads".to_string(),
            "SELECT flagship.audit_change()".to_string(),
        ] {
            assert_eq!(sqlstate(&mut client, &statement), "42501", "{group}: {statement}");
        }
        // Reading is what admins and auditors are for, with audit:read.
        if group != "flagship_app" {
            assert!(events(&mut client, &org) > 0, "{group}");
            client
                .batch_execute("SET flagship.actor = 'victor'")
                .unwrap();
            assert_eq!(
                events(&mut client, &org),
                0,
                "{group}: viewer reads the trail"
            );
            assert_eq!(
                sqlstate(
                    &mut client,
                    &format!("SELECT flagship.verify_audit_chain('{org}')")
                ),
                "42501"
            );
        }
        client.batch_execute("COMMIT").unwrap();
    }
    assert!(verdict(&mut su, &org).starts_with(r#"{"valid": true"#));
}

#[test]
fn the_actor_is_the_setting_the_jwt_subject_or_the_role() {
    let mut su = connect();
    let (org, _) = organization(&mut su, "actor");
    add_member(&mut su, &org, "alice", "owner");
    let role = role_in(&mut su, "writer", Some("flagship_admin"));
    let mut client = connect();
    client
        .batch_execute(&format!(
            "SET ROLE {role}; SET request.jwt.claims = '{{\"org_id\": \"{org}\", \"sub\": \"alice\"}}'; {}",
            put_flag_document("by-jwt", true)
        ))
        .unwrap();
    let actors = text(
        &mut su,
        &format!(
            "SELECT string_agg(DISTINCT actor, ',') FROM flagship.audit_events \
             WHERE organization_id = '{org}' AND resource_type = 'features'"
        ),
    );
    assert_eq!(actors, "alice");
    // Without a setting or a claim, the database role that made the change.
    su.batch_execute(&format!(
        "SET flagship.organization_id = '{org}'; UPDATE flagship.projects SET name = 'Renamed' WHERE organization_id = '{org}'"
    ))
    .unwrap();
    let actor = text(
        &mut su,
        &format!(
            "SELECT actor || ' ' || diff::text FROM flagship.audit_events \
             WHERE organization_id = '{org}' AND resource_type = 'projects' AND action = 'update'"
        ),
    );
    let user = text(&mut su, "SELECT current_user::text");
    assert_eq!(
        actor,
        format!(r#"{user} {{"name": {{"new": "Renamed", "old": "Shop"}}}}"#)
    );
}

#[test]
fn every_configuration_table_is_audited() {
    let mut su = connect();
    // Usage counters, reservations and the ledger are usage, recorded by
    // the ledger itself; exposure counts are observation, not configuration; events
    // are the application's own append-only data.
    let unaudited = text(
        &mut su,
        "SELECT string_agg(c.relname, ', ' ORDER BY c.relname) FROM pg_class c
          WHERE c.relnamespace = 'flagship'::regnamespace AND c.relkind = 'r'
            AND (c.relname = 'organizations'
                 OR EXISTS (SELECT FROM pg_attribute a WHERE a.attrelid = c.oid
                               AND a.attname = 'organization_id' AND NOT a.attisdropped))
            AND c.relname NOT IN ('usage_counters', 'usage_ledger', 'usage_reservations', 'flag_exposures',
                                  'audit_events', 'audit_chain_heads', 'cache_versions',
                                  'events', 'event_heads')
            AND NOT EXISTS (SELECT FROM pg_trigger t WHERE t.tgrelid = c.oid
                               AND t.tgfoid = 'flagship.audit_change'::regproc)",
    );
    assert_eq!(unaudited, "");
}

/// The changes of `org` (kind, key, environment) whose notification
/// arrived within `wait`. A payload is only an event id; the superuser
/// looks the event up, as `changes_since` does for the organization.
fn changes_of(
    listener: &mut Client,
    su: &mut Client,
    org: &str,
    wait: Duration,
) -> Vec<serde_json::Value> {
    let ids: Vec<i64> = listener
        .notifications()
        .timeout_iter(wait)
        .map(|notification| {
            let payload: serde_json::Value = serde_json::from_str(notification.payload()).unwrap();
            Ok(payload["id"].as_i64().unwrap())
        })
        .collect()
        .unwrap();
    su.query(
        "SELECT jsonb_build_object('environment', environment_id, 'kind', change_kind, 'key', change_key)::text
           FROM flagship.audit_events WHERE organization_id = $1::text::uuid AND id = ANY($2) ORDER BY id",
        &[&org, &ids],
    )
    .unwrap()
    .iter()
    .map(|row| serde_json::from_str(row.get(0)).unwrap())
    .collect()
}

#[test]
fn notify_reaches_a_listener_when_the_change_commits() {
    let mut su = connect();
    let (org, _) = organization(&mut su, "notify");
    let production = text(
        &mut su,
        &format!(
            "SELECT id::text FROM flagship.environments WHERE organization_id = '{org}' AND key = 'production'"
        ),
    );
    let mut listener = connect();
    listener.batch_execute("LISTEN flagship_changes").unwrap();
    let mut writer = admin_session(&org);

    writer.batch_execute("BEGIN").unwrap();
    writer
        .batch_execute(&put_flag_document("checkout", true))
        .unwrap();
    assert_eq!(
        changes_of(&mut listener, &mut su, &org, Duration::from_millis(300)),
        Vec::<serde_json::Value>::new()
    );
    writer.batch_execute("COMMIT").unwrap();

    let payloads = changes_of(&mut listener, &mut su, &org, Duration::from_secs(2));
    // The flag row and its production configuration, both as the flag.
    let expected = [
        serde_json::json!({"environment": null, "kind": "flag", "key": "checkout"}),
        serde_json::json!({"environment": production, "kind": "flag", "key": "checkout"}),
    ];
    assert_eq!(payloads, expected);

    // A rolled-back change sends nothing.
    writer
        .batch_execute(&format!(
            "BEGIN; {}; ROLLBACK",
            put_flag_document("checkout", false)
        ))
        .unwrap();
    let after_rollback = changes_of(&mut listener, &mut su, &org, Duration::from_millis(500));
    assert!(after_rollback.is_empty(), "{after_rollback:?}");
}
