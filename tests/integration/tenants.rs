//! Many organizations in one database (#14): one organization's changes do
//! not cost another a reload, reads are as fresh as a table read in the
//! same statement, and backend state belongs to the identity that made it.

use std::time::Duration;

use postgres::Client;

use crate::harness::{connect, organization, put_flag, role_in, sqlstate, text};

const ON: &str = r#"{"key": "f", "environments": {"production": {"enabled": true}}}"#;
const OFF: &str = r#"{"key": "f", "environments": {"production": {"enabled": false}}}"#;

fn reason(client: &mut Client) -> String {
    text(
        client,
        "SELECT flagship.flagship_evaluate('f', '{}', 'shop/production') ->> 'reason'",
    )
}

fn loads(client: &mut Client) -> i64 {
    text(client, "SELECT flagship.cache_usage() ->> 'loads'")
        .parse()
        .unwrap()
}

/// Bug of #14 ("noisy neighbour"): any commit anywhere discarded every
/// compiled environment of every backend. Now another organization's change
/// costs a version check; this organization's change a reload, and is seen.
#[test]
fn another_organizations_change_does_not_reload_this_ones_flags() {
    let mut writer = connect();
    let mut reader = connect();
    let (a, _) = organization(&mut writer, "quiet");
    let (b, _) = organization(&mut writer, "noisy");
    put_flag(&mut writer, &a, ON);
    put_flag(&mut writer, &b, ON);
    reader
        .batch_execute(&format!("SET flagship.organization_id = '{a}'"))
        .unwrap();
    assert_eq!(reason(&mut reader), "STATIC");
    let before = loads(&mut reader);
    for _ in 0..5 {
        put_flag(&mut writer, &b, OFF);
        put_flag(&mut writer, &b, ON);
        assert_eq!(reason(&mut reader), "STATIC");
    }
    assert_eq!(loads(&mut reader), before, "B's changes reloaded A's flags");
    put_flag(&mut writer, &a, OFF);
    assert_eq!(reason(&mut reader), "DISABLED");
    assert_eq!(loads(&mut reader), before + 1);
}

/// Bug of #14: inside one DO block under READ COMMITTED a plain SELECT saw
/// another session's committed kill switch at its next statement while
/// flagship_evaluate kept the old answer until the block ended. Each round
/// of the loop reads the table first, then evaluates: whenever the read
/// shows the switch off, the evaluation (a later statement) must too.
#[test]
fn a_kill_switch_is_seen_inside_a_do_block_as_a_table_read_sees_it() {
    let mut writer = connect();
    let mut worker = connect();
    let (org, _) = organization(&mut writer, "loop");
    put_flag(&mut writer, &org, ON);
    worker
        .batch_execute(&format!(
            "SET flagship.organization_id = '{org}'; SET flagship.environment = 'shop/production'"
        ))
        .unwrap();
    assert_eq!(reason(&mut worker), "STATIC");
    let flip = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(400));
        put_flag(&mut writer, &org, OFF);
    });
    worker
        .batch_execute(
            r#"DO $do$
               DECLARE
                 rounds text := '';
                 enabled boolean;
                 answer text;
               BEGIN
                 FOR i IN 1..30 LOOP
                   SELECT bool_and(r.enabled) INTO enabled FROM flagship.feature_rules r
                    WHERE r.organization_id = flagship.current_organization_id();
                   answer := flagship.flagship_evaluate('f') ->> 'reason';
                   rounds := rounds || CASE WHEN enabled THEN 'on:' ELSE 'off:' END || answer || ' ';
                   PERFORM pg_sleep(0.05);
                 END LOOP;
                 PERFORM set_config('flagship_test.rounds', rounds, false);
               END $do$"#,
        )
        .unwrap();
    flip.join().unwrap();
    let rounds = text(
        &mut worker,
        "SELECT current_setting('flagship_test.rounds')",
    );
    assert!(
        rounds.contains("off:"),
        "the switch never flipped: {rounds}"
    );
    assert!(
        !rounds.contains("off:STATIC") && !rounds.contains("on:DISABLED"),
        "evaluation and the table disagreed: {rounds}"
    );
}

/// REPEATABLE READ sees its transaction's snapshot, as a table read does.
#[test]
fn repeatable_read_keeps_its_snapshot() {
    let mut writer = connect();
    let mut reader = connect();
    let (org, _) = organization(&mut writer, "rr");
    put_flag(&mut writer, &org, ON);
    reader
        .batch_execute(&format!(
            "SET flagship.organization_id = '{org}'; BEGIN ISOLATION LEVEL REPEATABLE READ"
        ))
        .unwrap();
    assert_eq!(reason(&mut reader), "STATIC");
    put_flag(&mut writer, &org, OFF);
    assert_eq!(
        reason(&mut reader),
        "STATIC",
        "a later commit leaked into the snapshot"
    );
    reader.batch_execute("COMMIT").unwrap();
    assert_eq!(reason(&mut reader), "DISABLED");
}

/// Bug of #14: with a blank flagship.organization_id the cache kept
/// answering with the JWT's previous organization after the claims changed.
#[test]
fn a_blank_organization_setting_follows_the_jwt() {
    let mut su = connect();
    let (a, _) = organization(&mut su, "jwt-a");
    let (b, _) = organization(&mut su, "jwt-b");
    put_flag(&mut su, &a, ON);
    put_flag(&mut su, &b, OFF);
    let app = role_in(&mut su, "jwt_app", Some("flagship_app"));
    su.batch_execute(&format!(
        "SET ROLE {app}; SET flagship.organization_id = ' ';
         SET request.jwt.claims = '{{\"org_id\": \"{b}\"}}'"
    ))
    .unwrap();
    assert_eq!(reason(&mut su), "DISABLED");
    su.batch_execute(&format!(
        "SET request.jwt.claims = '{{\"org_id\": \"{a}\"}}'"
    ))
    .unwrap();
    assert_eq!(reason(&mut su), "STATIC", "answered from B's configuration");
}

/// Bug of #14: invalidate_cache was executable by PUBLIC, so any session
/// could make every backend start over.
#[test]
fn application_roles_cannot_signal_other_backends() {
    let mut su = connect();
    for group in ["flagship_app", "flagship_admin"] {
        let role = role_in(&mut su, "signal", Some(group));
        su.batch_execute(&format!("BEGIN; SET LOCAL ROLE {role}"))
            .unwrap();
        assert_eq!(
            sqlstate(
                &mut su,
                "SELECT flagship.invalidate_cache('flagship.features'::regclass)"
            ),
            "42501",
            "{group}"
        );
        assert_eq!(sqlstate(&mut su, "SELECT flagship.cache_usage()"), "42501");
        su.batch_execute("ROLLBACK").unwrap();
    }
}
