//! The channels around row-level security (#15), tried as non-superuser
//! login roles of two organizations and as a role with no FlagShip role:
//! the change feed, key mode, key usage limits and the audit anchors.

use std::time::Duration;

use postgres::fallible_iterator::FallibleIterator;
use postgres::Client;

use crate::harness::{add_member, connect, login_as, organization, sqlstate, text};

/// Every payload that reaches `listener` within `wait`.
fn payloads(listener: &mut Client, wait: Duration) -> Vec<String> {
    listener
        .notifications()
        .timeout_iter(wait)
        .map(|notification| Ok(notification.payload().to_string()))
        .collect()
        .unwrap()
}

#[test]
fn the_change_feed_names_nothing_row_level_security_hides() {
    let mut su = connect();
    let (globex, _) = organization(&mut su, "feed-globex");
    let (initech, _) = organization(&mut su, "feed-initech");
    add_member(&mut su, &globex, "alice", "owner");
    let (_, mut stranger) = login_as(&mut su, "feed-stranger", &[]);
    let (_, mut rival) = login_as(&mut su, "feed-rival", &["flagship_app"]);
    rival
        .batch_execute(&format!("SET flagship.organization_id = '{initech}'"))
        .unwrap();
    for listener in [&mut stranger, &mut rival] {
        listener.batch_execute("LISTEN flagship_changes").unwrap();
    }
    let (_, mut admin) = login_as(&mut su, "feed-admin", &["flagship_admin"]);
    admin
        .batch_execute(&format!(
            "SET flagship.organization_id = '{globex}'; SET flagship.actor = 'alice';
             INSERT INTO flagship.members (organization_id, user_key)
             VALUES ('{globex}', 'secret-hire@globex.example');
             SELECT flagship.put_flag('shop', '{{\"key\": \"acquisition-banner\",
                 \"environments\": {{\"production\": {{\"enabled\": true}}}}}}')"
        ))
        .unwrap();

    for listener in [&mut stranger, &mut rival] {
        let received = payloads(listener, Duration::from_secs(1));
        assert!(received.len() >= 3, "{received:?}");
        for payload in &received {
            let value: serde_json::Value = serde_json::from_str(payload).unwrap();
            // Nothing but an opaque, database-wide event id.
            assert_eq!(value.as_object().unwrap().len(), 1, "{payload}");
            assert!(value["id"].is_i64(), "{payload}");
            for secret in [
                globex.as_str(),
                "secret-hire",
                "acquisition-banner",
                "alice",
            ] {
                assert!(!payload.contains(secret), "{payload} reveals {secret}");
            }
        }
    }

    // Another organization's session learns nothing from changes_since.
    assert_eq!(
        text(
            &mut rival,
            "SELECT count(*)::text FROM flagship.changes_since(0) WHERE key ~ 'secret|acquisition'"
        ),
        "0"
    );
    // A role with no FlagShip role may not ask.
    assert_eq!(
        sqlstate(&mut stranger, "SELECT * FROM flagship.changes_since(0)"),
        "42501"
    );
    // The organization's own application session reads what changed, in
    // chain order, with the environment of environment-level changes.
    let (_, mut app) = login_as(&mut su, "feed-app", &["flagship_app"]);
    app.batch_execute(&format!("SET flagship.organization_id = '{globex}'"))
        .unwrap();
    let production = text(
        &mut su,
        &format!("SELECT id::text FROM flagship.environments WHERE organization_id = '{globex}' AND key = 'production'"),
    );
    let changes = text(
        &mut app,
        "SELECT string_agg(format('%s %s %s %s', kind, key, action, coalesce(environment_id::text, '-')), '; ' ORDER BY seq)
           FROM flagship.changes_since((SELECT max(seq) FROM flagship.changes_since(0)) - 3)",
    );
    assert_eq!(
        changes,
        format!(
            "member secret-hire@globex.example insert -; flag acquisition-banner insert -; \
             flag acquisition-banner insert {production}"
        )
    );
}

/// A key of `org` issued by the superuser with `scopes` (and `extra`
/// arguments such as the environment).
fn issue(su: &mut Client, org: &str, scopes: &str, extra: &str) -> String {
    text(
        su,
        &format!("SELECT flagship.issue_api_key('{org}', 'svc', '{{{scopes}}}'{extra})"),
    )
}

#[test]
fn key_mode_binds_the_actor_and_the_scopes_of_every_write() {
    let mut su = connect();
    let (org, _) = organization(&mut su, "keymode");
    add_member(&mut su, &org, "alice", "owner");
    su.batch_execute(&format!(
        "SET flagship.organization_id = '{org}';
         SELECT flagship.put_metric('shop', '{{\"key\": \"calls\"}}');
         SELECT flagship.put_plan('shop', '{{\"key\": \"pro\", \"limits\": {{\"calls\": {{\"limit\": 100}}}}}}');
         SELECT flagship.put_customer('shop/production', '{{\"key\": \"acme\", \"plan\": \"pro\"}}');
         SELECT flagship.record_usage('acme', 'calls', 5, 'first', 'shop/production')"
    ))
    .unwrap();
    let reader = issue(&mut su, &org, "features:read", ", 'shop/production'");
    let writer = issue(&mut su, &org, "features:write,usage:write", "");

    for group in ["flagship_admin", "flagship_app"] {
        let (_, mut session) = login_as(&mut su, "keymode", &[group]);
        session.batch_execute("BEGIN").unwrap();
        session
            .batch_execute(&format!(
                "SELECT flagship.authenticate('{reader}');
                 SET LOCAL flagship.actor = 'alice';
                 SET LOCAL request.jwt.claims = '{{\"sub\": \"alice\", \"org_id\": \"{org}\"}}'"
            ))
            .unwrap();
        assert_eq!(
            text(&mut session, "SELECT flagship.current_actor()"),
            text(
                &mut su,
                &format!("SELECT 'api_key:' || id FROM flagship.api_keys WHERE organization_id = '{org}' AND scopes = '{{features:read}}'")
            )
        );
        for statement in [
            r#"SELECT flagship.put_flag('shop', '{"key": "sneaky"}')"#.to_string(),
            format!("INSERT INTO flagship.members (organization_id, user_key) VALUES ('{org}', 'mallory')"),
            format!("SELECT flagship.issue_api_key('{org}', 'escalate')"),
            "INSERT INTO flagship.usage_ledger (organization_id, customer_id, metric_id, kind, amount, used_after, idempotency_key, enforcement)
                     SELECT organization_id, customer_id, metric_id, 'record', 1, 0, 'forged', 'hard' FROM flagship.usage_ledger LIMIT 1".to_string(),
            "SELECT flagship.record_usage('acme', 'calls', 1, NULL, 'shop/production')".to_string(),
        ] {
            assert_eq!(
                sqlstate(&mut session, &statement),
                "42501",
                "{group}: {statement}"
            );
        }
        // Rows the key may not change are not there to change.
        for statement in [
            "UPDATE flagship.usage_counters SET used = 0",
            "UPDATE flagship.features SET name = 'renamed'",
            "DELETE FROM flagship.api_keys",
        ] {
            let outcome = sqlstate(&mut session, statement);
            if outcome == "none" {
                let changed = session.execute(statement, &[]).unwrap();
                assert_eq!(changed, 0, "{group}: {statement}");
            } else {
                assert_eq!(outcome, "42501", "{group}: {statement}");
            }
        }
        // The trail is alice's to read, not the key's.
        let read = "SELECT count(*)::text FROM flagship.audit_events";
        if sqlstate(&mut session, read) == "none" {
            assert_eq!(text(&mut session, read), "0", "{group}");
        } else {
            assert_eq!(group, "flagship_app", "only the application has no grant");
        }
        session.batch_execute("ROLLBACK").unwrap();
    }
    // The counter was not reset and no forged ledger row is replayed.
    assert_eq!(
        text(
            &mut su,
            &format!("SELECT string_agg(used::text, ',') FROM flagship.usage_counters WHERE organization_id = '{org}'")
        ),
        "5"
    );

    // A key that may write flags writes them as itself; the trail names
    // the key and the login role, and keeps the claim out.
    let (login, mut session) = login_as(&mut su, "keymode-writer", &["flagship_admin"]);
    session
        .batch_execute(&format!(
            "BEGIN; SELECT flagship.authenticate('{writer}'); SET LOCAL flagship.actor = 'alice';
             SELECT flagship.put_flag('shop', '{{\"key\": \"by-key\"}}'); COMMIT"
        ))
        .unwrap();
    let recorded = text(
        &mut su,
        &format!(
            "SELECT string_agg(DISTINCT format('%s|%s|%s|%s', a.actor = 'api_key:' || k.id, a.session_role,
                                               a.acting_role, a.key_id = k.id), ',')
               FROM flagship.audit_events a JOIN flagship.api_keys k
                 ON k.organization_id = a.organization_id AND k.scopes = '{{features:write,usage:write}}'
              WHERE a.organization_id = '{org}' AND a.resource_type = 'features'"
        ),
    );
    assert_eq!(recorded, format!("t|{login}|{login}|t"));
    assert!(text(
        &mut su,
        &format!("SELECT flagship.verify_audit_chain('{org}')::text")
    )
    .starts_with(r#"{"valid": true"#));
}

#[test]
fn a_usage_limited_key_counts_rolled_back_authentications() {
    let mut su = connect();
    let (org, _) = organization(&mut su, "keylimit");
    let key = text(
        &mut su,
        &format!("SELECT flagship.issue_api_key('{org}', 'twice', '{{}}', NULL, NULL, 2)"),
    );
    let (_, mut app) = login_as(&mut su, "keylimit", &["flagship_app"]);

    // Authenticated inside a savepoint, rolled back to it: the session is
    // gone with the savepoint, and the use is spent.
    app.batch_execute("BEGIN; SAVEPOINT s").unwrap();
    assert_eq!(
        text(
            &mut app,
            &format!("SELECT flagship.authenticate('{key}') ->> 'code'")
        ),
        "VALID"
    );
    assert_eq!(
        text(&mut app, "SELECT flagship.current_organization_id()::text"),
        org
    );
    app.batch_execute("ROLLBACK TO SAVEPOINT s").unwrap();
    assert_eq!(
        text(
            &mut app,
            "SELECT coalesce(flagship.current_organization_id()::text, 'none')"
        ),
        "none"
    );
    app.batch_execute("COMMIT").unwrap();

    // A whole transaction rolled back spends its use too.
    app.batch_execute("BEGIN").unwrap();
    assert_eq!(
        text(
            &mut app,
            &format!("SELECT flagship.authenticate('{key}') ->> 'code'")
        ),
        "VALID"
    );
    app.batch_execute("ROLLBACK").unwrap();

    assert_eq!(
        text(
            &mut app,
            &format!("SELECT flagship.authenticate('{key}') ->> 'code'")
        ),
        "USAGE_EXCEEDED"
    );

    // A savepoint released keeps the session; an outer rollback of an
    // inner authentication restores the session that was there before.
    let other = text(
        &mut su,
        &format!("SELECT flagship.issue_api_key('{org}', 'free')"),
    );
    app.batch_execute(&format!(
        "BEGIN; SELECT flagship.authenticate('{other}'); SAVEPOINT a; SAVEPOINT b;
         SELECT flagship.authenticate('not-a-key'); RELEASE SAVEPOINT b"
    ))
    .unwrap();
    assert_eq!(
        text(
            &mut app,
            "SELECT coalesce(flagship.current_organization_id()::text, 'none')"
        ),
        "none"
    );
    app.batch_execute("ROLLBACK TO SAVEPOINT a").unwrap();
    assert_eq!(
        text(&mut app, "SELECT flagship.current_organization_id()::text"),
        org
    );
    app.batch_execute("COMMIT").unwrap();
}

#[test]
fn scopes_are_checked_when_a_key_is_issued() {
    let mut su = connect();
    let (org, _) = organization(&mut su, "scopes");
    let mut failure = None;
    su.batch_execute("BEGIN").unwrap();
    if let Err(error) = su.batch_execute(&format!(
        "SELECT flagship.issue_api_key('{org}', 'typo', ARRAY['feature:read'])"
    )) {
        failure = error.as_db_error().cloned();
    }
    su.batch_execute("ROLLBACK").unwrap();
    let failure = failure.expect("a typo in a scope is refused");
    assert_eq!(failure.code().code(), "22023");
    assert_eq!(
        failure.message(),
        r#"scopes: "feature:read" is not a scope"#
    );
    assert!(
        failure
            .hint()
            .unwrap()
            .contains("features:read, features:write"),
        "{:?}",
        failure.hint()
    );
    for good in ["features:read", "features:*", "audit:read"] {
        assert_eq!(
            sqlstate(
                &mut su,
                &format!("SELECT flagship.issue_api_key('{org}', 'ok', ARRAY['{good}'])")
            ),
            "none"
        );
    }
}

/// Re-hashes `org`'s whole chain and moves its head to the last event, as
/// a superuser covering a rewrite would.
fn rehash(su: &mut Client, org: &str) {
    su.batch_execute(&format!(
        "DO $$
         DECLARE e record; previous bytea := '\\x';
         BEGIN
             FOR e IN SELECT * FROM flagship.audit_events WHERE organization_id = '{org}' ORDER BY chain_seq LOOP
                 previous := flagship.audit_link_digest(previous, e.chain_seq, e.id, e.organization_id,
                     e.occurred_at, e.action, e.resource_type, e.resource_id,
                     flagship.audit_content_digest(e.actor, e.diff), e.transaction_id,
                     e.session_role, e.acting_role, e.key_id);
                 UPDATE flagship.audit_events
                    SET hash = previous, content_digest = flagship.audit_content_digest(e.actor, e.diff)
                  WHERE organization_id = e.organization_id AND chain_seq = e.chain_seq;
             END LOOP;
             UPDATE flagship.audit_chain_heads
                SET last_seq = coalesce((SELECT max(chain_seq) FROM flagship.audit_events WHERE organization_id = '{org}'), 0),
                    last_hash = previous
              WHERE organization_id = '{org}';
         END $$"
    ))
    .unwrap();
}

#[test]
fn an_anchor_detects_rewrites_deletions_and_wipes() {
    let mut su = connect();
    let verify = |su: &mut Client, org: &str, anchor: &str| {
        text(
            su,
            &format!("SELECT format('%s %s', v ->> 'valid', coalesce(v ->> 'reason', '-')) FROM flagship.verify_audit_chain('{org}', {anchor}) v"),
        )
    };
    for tampering in ["rewrite", "delete newest", "wipe"] {
        let (org, _) = organization(&mut su, "anchor");
        su.batch_execute(&format!(
            "SET flagship.organization_id = '{org}';
             SELECT flagship.put_flag('shop', '{{\"key\": \"a\"}}');
             SELECT flagship.put_flag('shop', '{{\"key\": \"b\"}}')"
        ))
        .unwrap();
        let anchor = text(
            &mut su,
            &format!("SELECT flagship.audit_head('{org}')::text"),
        );
        let anchor_sql = format!("'{anchor}'::jsonb");
        assert_eq!(verify(&mut su, &org, &anchor_sql), "true -", "{tampering}");

        // Without maintenance the guards refuse, in replica mode too.
        su.batch_execute("SET session_replication_role = replica")
            .unwrap();
        for statement in [
            format!("DELETE FROM flagship.audit_events WHERE organization_id = '{org}'"),
            format!("UPDATE flagship.audit_chain_heads SET last_seq = 1 WHERE organization_id = '{org}'"),
            format!("DELETE FROM flagship.audit_chain_heads WHERE organization_id = '{org}'"),
        ] {
            assert_eq!(sqlstate(&mut su, &statement), "42501", "{statement}");
        }
        su.batch_execute("RESET session_replication_role; SET flagship.audit_maintenance = on")
            .unwrap();
        match tampering {
            "rewrite" => {
                su.batch_execute(&format!(
                    "UPDATE flagship.audit_events SET actor = 'nobody' WHERE organization_id = '{org}' AND chain_seq = 1"
                ))
                .unwrap();
                // No anchor is handed out for a chain that does not verify,
                // and a malformed anchor is refused, naming the field.
                assert_eq!(
                    sqlstate(&mut su, &format!("SELECT flagship.audit_head('{org}')")),
                    "XX001"
                );
                assert_eq!(
                    sqlstate(
                        &mut su,
                        &format!(
                            "SELECT flagship.verify_audit_chain('{org}', '{{\"seq\": \"one\"}}')"
                        )
                    ),
                    "22023"
                );
                rehash(&mut su, &org);
            }
            "delete newest" => {
                su.batch_execute(&format!(
                    "DELETE FROM flagship.audit_events WHERE organization_id = '{org}'
                        AND chain_seq > (SELECT max(chain_seq) - 2 FROM flagship.audit_events WHERE organization_id = '{org}')"
                ))
                .unwrap();
                rehash(&mut su, &org);
            }
            _ => {
                su.batch_execute(&format!(
                    "DELETE FROM flagship.audit_events WHERE organization_id = '{org}';
                     DELETE FROM flagship.audit_chain_heads WHERE organization_id = '{org}'"
                ))
                .unwrap();
            }
        }
        su.batch_execute("RESET flagship.audit_maintenance")
            .unwrap();
        // The chain alone looks fine; the anchor does not.
        assert_eq!(verify(&mut su, &org, "NULL"), "true -", "{tampering}");
        assert_eq!(
            verify(&mut su, &org, &anchor_sql),
            "false anchor not found",
            "{tampering}"
        );
        su.batch_execute("RESET flagship.organization_id").unwrap();
    }
}

#[test]
fn a_key_issues_no_key_wider_than_itself() {
    let mut su = connect();
    let (org, _) = organization(&mut su, "widen");
    let issuer = issue(&mut su, &org, "api_keys:write", "");
    let (_, mut admin) = login_as(&mut su, "widen", &["flagship_admin"]);
    admin
        .batch_execute(&format!("BEGIN; SELECT flagship.authenticate('{issuer}')"))
        .unwrap();
    for wider in [
        format!("SELECT flagship.issue_api_key('{org}', 'all')"),
        format!("SELECT flagship.issue_api_key('{org}', 'more', ARRAY['features:write'])"),
        format!("SELECT flagship.issue_api_key('{org}', 'star', ARRAY['api_keys:*'])"),
    ] {
        assert_eq!(sqlstate(&mut admin, &wider), "42501", "{wider}");
    }
    assert_eq!(
        sqlstate(
            &mut admin,
            &format!("SELECT flagship.issue_api_key('{org}', 'same', ARRAY['api_keys:write'])")
        ),
        "none"
    );
    admin.batch_execute("ROLLBACK").unwrap();
}

#[test]
fn usage_writers_run_with_a_pinned_search_path() {
    let mut su = connect();
    // A caller's search path would otherwise choose the functions and
    // operators their statements call while usage writes are open.
    assert_eq!(
        text(
            &mut su,
            "SELECT string_agg(p.proname || '=' || array_to_string(p.proconfig, ';'), ',' ORDER BY p.proname)
               FROM pg_proc p WHERE p.pronamespace = 'flagship'::regnamespace
                AND p.proname IN ('record_usage', 'set_usage')"
        ),
        "record_usage=search_path=pg_catalog, pg_temp,set_usage=search_path=pg_catalog, pg_temp"
    );
}

/// Found by review (#15): evaluation was marked parallel safe, but a
/// parallel worker has none of the leader's backend state (the key
/// session, caches): forced into a worker, a key-mode evaluation answered
/// as if no key had been presented. It now runs in the leader.
#[test]
fn key_mode_evaluation_is_never_handed_to_a_parallel_worker() {
    let mut su = connect();
    let (org, _) = organization(&mut su, "parallel");
    su.batch_execute(&format!(
        "SET flagship.organization_id = '{org}';
         SELECT flagship.put_flag('shop', '{{\"key\": \"f\", \"environments\": {{\"production\": {{\"enabled\": true}}}}}}');
         RESET flagship.organization_id"
    ))
    .unwrap();
    let key = text(
        &mut su,
        &format!("SELECT flagship.issue_api_key('{org}', 'reader', ARRAY['features:read'])"),
    );
    let mut session = connect();
    session
        .batch_execute(&format!(
            "SET flagship.require_key = on; SET force_parallel_mode = on;
             BEGIN; SELECT flagship.authenticate('{key}')"
        ))
        .unwrap();
    let answer = text(
        &mut session,
        "SELECT flagship.flagship_evaluate('f', '{}', 'shop/production') ->> 'reason'",
    );
    let organization = text(
        &mut session,
        "SELECT flagship.current_organization_id()::text",
    );
    session.batch_execute("COMMIT").unwrap();
    assert_eq!(
        (answer.as_str(), organization.as_str()),
        ("STATIC", org.as_str())
    );
}

/// `flagship.distribute()` on a server without Citus raises 0A000 naming
/// what is missing and changes nothing (policies, the unique slug); a role
/// that is not a superuser may not call it; `organization_node` answers no
/// row there.
#[test]
fn distribute_refuses_without_citus_and_for_other_roles() {
    let mut su = connect();
    let schema = "SELECT (SELECT count(*) FROM pg_policies WHERE schemaname = 'flagship')::text || ' ' \
                  || (SELECT count(*) FROM pg_constraint WHERE conname = 'organizations_slug_key')::text";
    let before = text(&mut su, schema);
    let error = su
        .batch_execute("SELECT flagship.distribute()")
        .expect_err("distribute() without Citus");
    let db = error.as_db_error().expect("a server error");
    assert_eq!(db.code().code(), "0A000");
    assert_eq!(
        db.message(),
        "distribute: Citus is not installed in this database"
    );
    assert_eq!(text(&mut su, schema), before);
    let (_, mut admin) = login_as(&mut su, "distributor", &["flagship_admin"]);
    assert_eq!(
        sqlstate(&mut admin, "SELECT flagship.distribute()"),
        "42501"
    );
    assert_eq!(
        text(
            &mut su,
            "SELECT count(*)::text FROM flagship.organization_node(gen_random_uuid())"
        ),
        "0"
    );
}
