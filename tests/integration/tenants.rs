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
    cache_count(client, "loads")
}

fn cache_count(client: &mut Client, field: &str) -> i64 {
    text(
        client,
        &format!("SELECT flagship.cache_usage() ->> '{field}'"),
    )
    .parse()
    .unwrap()
}

/// Bug of #14 ("noisy neighbour", still at 0.33x in the first fix): every
/// signal made each cached environment re-read its versions with a query
/// of its own. Now a backend reads once per signal which organizations
/// changed; the environments of the others are not queried again.
#[test]
fn another_organizations_change_costs_one_read_not_a_query_per_environment() {
    let mut writer = connect();
    let mut reader = connect();
    let quiet: Vec<String> = (0..5)
        .map(|_| organization(&mut writer, "quiet-many").1)
        .collect();
    let (noisy, _) = organization(&mut writer, "noisy-many");
    for slug in &quiet {
        let id = text(
            &mut writer,
            &format!("SELECT id::text FROM flagship.organizations WHERE slug = '{slug}'"),
        );
        put_flag(&mut writer, &id, ON);
    }
    put_flag(&mut writer, &noisy, ON);
    // The reader serves the five organizations by full name, as a pooled
    // backend of a multi-tenant service would (no organization set: the
    // test connects as a superuser, whom row-level security lets see all).
    let evaluate_all = |reader: &mut Client| {
        for slug in &quiet {
            assert_eq!(
                text(
                    reader,
                    &format!("SELECT flagship.flagship_evaluate('f', '{{}}', '{slug}/shop/production') ->> 'reason'")
                ),
                "STATIC"
            );
        }
    };
    evaluate_all(&mut reader);
    // The first change after warming up starts tracking the organizations.
    put_flag(&mut writer, &noisy, OFF);
    writer.batch_execute("SELECT pg_current_xact_id()").unwrap();
    evaluate_all(&mut reader);
    // Other tests of this run create organizations and environments, and a
    // new name may make a located one ambiguous: the reader rightly locates
    // again then. The rounds are measured again (up to eight times) when
    // that happened meanwhile; the assertions hold for rounds without it,
    // and the last attempt must be one.
    let names =
        "SELECT count(*) || '/' || coalesce(max(created_at)::text, '') FROM flagship.environments";
    const ATTEMPTS: u32 = 8;
    for attempt in 1..=ATTEMPTS {
        let names_before = text(&mut writer, names);
        let (loads_before, locates_before, reads_before) = (
            loads(&mut reader),
            cache_count(&mut reader, "locates"),
            cache_count(&mut reader, "change_reads"),
        );
        for round in 0..5 {
            put_flag(&mut writer, &noisy, if round % 2 == 0 { ON } else { OFF });
            evaluate_all(&mut reader);
        }
        // Other tests' configuration commits signal too, and each costs the
        // reader a read of its own: measured again when there were more
        // reads than changes; at the last attempt they may be a few more.
        let reads = cache_count(&mut reader, "change_reads") - reads_before;
        let names_changed = text(&mut writer, names) != names_before;
        let located_again = cache_count(&mut reader, "locates") - locates_before;
        if (names_changed || reads != 5 || located_again != 0) && attempt < ATTEMPTS {
            continue;
        }
        assert!(
            !names_changed,
            "other tests created environments during each of {ATTEMPTS} attempts"
        );
        assert_eq!(loads(&mut reader), loads_before, "reloaded");
        // The bug located all five quiet environments again on each of the
        // five changes (25). Another test's commit arriving while the
        // reader's statement runs makes that statement's check
        // inconclusive, and its environment is rightly located again: a
        // few such under load, in the last attempt only.
        assert!(
            located_again <= 2,
            "queried a quiet organization's versions again: {located_again} locates for 5 changes"
        );
        assert!(
            (5..=15).contains(&reads),
            "{reads} change reads for 5 changes of another organization (one each, and a few for other tests' commits)"
        );
        break;
    }
    let (loads_before, locates_before) = (loads(&mut reader), cache_count(&mut reader, "locates"));
    // A change of one of them is seen by the next statement, and costs
    // that organization alone a query and a reload.
    let changed = text(
        &mut writer,
        &format!(
            "SELECT id::text FROM flagship.organizations WHERE slug = '{}'",
            quiet[2]
        ),
    );
    put_flag(&mut writer, &changed, OFF);
    assert_eq!(
        text(
            &mut reader,
            &format!(
                "SELECT flagship.flagship_evaluate('f', '{{}}', '{}/shop/production') ->> 'reason'",
                quiet[2]
            )
        ),
        "DISABLED"
    );
    assert_eq!(loads(&mut reader), loads_before + 1);
    assert_eq!(cache_count(&mut reader, "locates"), locates_before + 1);
}

/// The reader of the two tests below: one organization's environment,
/// evaluated by full name, and the counters of the queries it costs.
struct QuietReader {
    client: Client,
    slug: String,
}

impl QuietReader {
    fn evaluate(&mut self) {
        let sql = format!(
            "SELECT flagship.flagship_evaluate('f', '{{}}', '{}/shop/production') ->> 'reason'",
            self.slug
        );
        assert_eq!(text(&mut self.client, &sql), "STATIC");
    }

    /// Cached environments loaded again, and names located again.
    fn queries(&mut self) -> (i64, i64) {
        (
            loads(&mut self.client),
            cache_count(&mut self.client, "locates"),
        )
    }
}

/// A quiet organization served by `QuietReader`, and a noisy one whose id
/// is returned; the reader is warm and tracks the quiet organization (the
/// first change after warming up starts that).
fn quiet_and_noisy(writer: &mut Client, prefix: &str) -> (QuietReader, String) {
    let (quiet, slug) = organization(writer, &format!("quiet-{prefix}"));
    let (noisy, _) = organization(writer, &format!("noisy-{prefix}"));
    put_flag(writer, &quiet, ON);
    put_flag(writer, &noisy, ON);
    let mut reader = QuietReader {
        client: connect(),
        slug,
    };
    reader.evaluate();
    put_flag(writer, &noisy, OFF);
    reader.evaluate();
    (reader, noisy)
}

/// Bug of #14 (100 changes/s held 0.82x): a signal counted as seen only by
/// a snapshot whose xmin had passed the next transaction id of the moment
/// it arrived, so while any transaction that had taken an id before then
/// stayed open (an idle session's, or the writer's next one), each cached
/// name of every other organization was located again with a query. Now
/// the bound is the age of a snapshot taken after the signal arrived.
#[test]
fn an_open_transaction_elsewhere_keeps_another_organizations_change_cheap() {
    let mut writer = connect();
    let (mut reader, noisy) = quiet_and_noisy(&mut writer, "open");
    let mut idle = connect();
    idle.batch_execute("BEGIN; SELECT pg_current_xact_id()")
        .unwrap();
    let before = reader.queries();
    for round in 0..5 {
        put_flag(&mut writer, &noisy, if round % 2 == 0 { ON } else { OFF });
        reader.evaluate();
    }
    assert_eq!(reader.queries(), before, "(loads, locates) grew");
    idle.batch_execute("COMMIT").unwrap();
}

/// Bug of #14 (100 changes/s held 0.82x): PostgreSQL sends a commit's
/// invalidations a moment after making it visible, so a reader that saw an
/// announced commit end read which organizations changed, and took in the
/// commit's own invalidations while reading (its locks accept them): the
/// read answered for the signal before them only, and every cached name
/// was located again right after. Now a read also answers for signals its
/// snapshot sees everything of. The reader evaluates in a loop of
/// transactions while another organization commits 40 changes.
#[test]
fn a_commit_heard_during_the_change_read_costs_no_queries() {
    let mut writer = connect();
    let (mut reader, noisy) = quiet_and_noisy(&mut writer, "race");
    reader
        .client
        .batch_execute(&format!(
            "CREATE PROCEDURE pg_temp.evaluate_for(length interval) LANGUAGE plpgsql AS $$
             DECLARE
                 ends timestamptz := clock_timestamp() + length;
             BEGIN
                 WHILE clock_timestamp() < ends LOOP
                     PERFORM flagship.flagship_evaluate('f', '{{}}', '{}/shop/production');
                     COMMIT;
                 END LOOP;
             END $$",
            reader.slug
        ))
        .unwrap();
    let before = reader.queries();
    let changes = std::thread::spawn(move || {
        for round in 0..40 {
            std::thread::sleep(Duration::from_millis(15));
            put_flag(&mut writer, &noisy, if round % 2 == 0 { ON } else { OFF });
        }
    });
    reader
        .client
        .batch_execute("CALL pg_temp.evaluate_for('2 seconds')")
        .unwrap();
    changes.join().unwrap();
    let (loads_after, locates_after) = reader.queries();
    assert_eq!(loads_after, before.0, "reloaded");
    // A commit of another test landing during a read leaves that read to
    // the signals it started with, and the statement locates again (it
    // must: its snapshot may not see that commit). Alone, the loop costs
    // no query; before the fix it cost 286 for the 40 changes.
    assert!(
        locates_after - before.1 <= 20,
        "40 changes of another organization cost {} locates",
        locates_after - before.1
    );
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

/// Bug of #14 (review): PostgreSQL makes a commit visible a few
/// microseconds before it sends the commit's invalidations, and a statement
/// whose snapshot fell in between answered from the configuration before
/// the commit while a table read in it saw the change. Here the window is
/// held open (a test-build setting keeps the writer's commit invalidations
/// back): the reader's next statement must see the change, through the
/// writer's announcement alone, in a table read and an evaluation alike.
#[test]
fn a_commit_is_seen_before_its_invalidation_arrives() {
    let mut writer = connect();
    let mut reader = connect();
    let (org, _) = organization(&mut writer, "window");
    put_flag(&mut writer, &org, ON);
    reader
        .batch_execute(&format!("SET flagship.organization_id = '{org}'"))
        .unwrap();
    assert_eq!(reason(&mut reader), "STATIC");
    assert_eq!(reason(&mut reader), "STATIC");
    writer
        .batch_execute("SET flagship.test_hold_commit_signals = on")
        .unwrap();
    put_flag(&mut writer, &org, OFF);
    let seen = text(
        &mut reader,
        "SELECT (SELECT bool_and(r.enabled) FROM flagship.feature_rules r
                  WHERE r.organization_id = flagship.current_organization_id())::text
                || ':' || (flagship.flagship_evaluate('f', '{}', 'shop/production') ->> 'reason')",
    );
    assert_eq!(seen, "false:DISABLED");
    // The writer's announcement was settled by that statement. Other tests'
    // commits may be in flight (announced, not yet ended) for a moment:
    // the count reaches 0 once an evaluation's snapshot sees them ended.
    let settled = (0..60).any(|_| {
        let pending = text(
            &mut reader,
            "SELECT (flagship.flagship_evaluate('f', '{}', 'shop/production') ->> 'reason')
                    || ':' || (flagship.cache_usage() ->> 'announcements_pending')",
        );
        pending == "DISABLED:0" || {
            std::thread::sleep(Duration::from_millis(50));
            false
        }
    });
    assert!(settled, "announcements stayed pending");

    // The same for entitlements: a customer's plan changes under a warm
    // plan-kind flag.
    writer
        .batch_execute(&format!(
            r#"RESET flagship.test_hold_commit_signals;
               SET flagship.organization_id = '{org}';
               SELECT flagship.put_flag('shop', '{{"key": "reports", "kind": "plan",
                   "environments": {{"production": {{"enabled": true}}}}}}');
               SELECT flagship.put_plan('shop', '{{"key": "pro", "features": {{"reports": true}}}}');
               SELECT flagship.put_customer('shop/production', '{{"key": "acme", "plan": "pro"}}');"#
        ))
        .unwrap();
    let entitled = |reader: &mut Client| {
        text(
            reader,
            r#"SELECT flagship.flagship_evaluate('reports', '{"customer": "acme"}', 'shop/production') ->> 'reason'"#,
        )
    };
    assert_eq!(entitled(&mut reader), "STATIC");
    assert_eq!(entitled(&mut reader), "STATIC");
    writer
        .batch_execute(
            r#"SET flagship.test_hold_commit_signals = on;
               SELECT flagship.put_customer('shop/production', '{"key": "acme", "plan": "pro", "status": "canceled"}');
               RESET flagship.test_hold_commit_signals;"#,
        )
        .unwrap();
    assert_eq!(entitled(&mut reader), "NOT_ENTITLED");
}

/// Review of the announcements: a statement settled an announced commit,
/// then a FETCH on a cursor opened before it made a check under its older
/// snapshot, and the next statement was answered from that check (the
/// configuration before the commit) while the commit's own invalidation
/// was still on its way.
#[test]
fn a_cursor_after_an_announcement_does_not_vouch_for_later_statements() {
    let mut writer = connect();
    let mut reader = connect();
    let (org, _) = organization(&mut writer, "settled");
    put_flag(&mut writer, &org, ON);
    reader
        .batch_execute(&format!(
            "SET flagship.organization_id = '{org}'; BEGIN; \
             DECLARE c CURSOR FOR SELECT flagship.flagship_evaluate('f', '{{}}', 'shop/production') ->> 'reason' \
               FROM generate_series(1, 3)"
        ))
        .unwrap();
    assert_eq!(text(&mut reader, "FETCH 1 FROM c"), "STATIC");
    writer
        .batch_execute("SET flagship.test_hold_commit_signals = on")
        .unwrap();
    put_flag(&mut writer, &org, OFF);
    assert_eq!(reason(&mut reader), "DISABLED");
    assert_eq!(text(&mut reader, "FETCH 1 FROM c"), "STATIC");
    assert_eq!(
        reason(&mut reader),
        "DISABLED",
        "served the cursor's configuration"
    );
    reader.batch_execute("COMMIT").unwrap();
    writer
        .batch_execute("RESET flagship.test_hold_commit_signals")
        .unwrap();
}

/// Bug of #14 (review): a cursor opened before another session's commit
/// answered with the newer configuration once a later statement of the
/// same transaction had confirmed it, while a table read in the cursor
/// sees the older one. Each fetched row holds the table's view and the
/// evaluation's, side by side.
#[test]
fn a_cursor_keeps_the_configuration_of_its_snapshot() {
    let mut writer = connect();
    let mut reader = connect();
    let (org, _) = organization(&mut writer, "cursor");
    put_flag(&mut writer, &org, ON);
    reader
        .batch_execute(&format!(
            "SET flagship.organization_id = '{org}'; BEGIN; \
             DECLARE c CURSOR FOR \
               SELECT (SELECT bool_and(r.enabled) FROM flagship.feature_rules r \
                        WHERE r.organization_id = flagship.current_organization_id())::text \
                      || ':' || (flagship.flagship_evaluate('f', '{{}}', 'shop/production') ->> 'reason') \
                 FROM generate_series(1, 3)"
        ))
        .unwrap();
    assert_eq!(text(&mut reader, "FETCH 1 FROM c"), "true:STATIC");
    put_flag(&mut writer, &org, OFF);
    assert_eq!(
        reason(&mut reader),
        "DISABLED",
        "the next statement missed the commit"
    );
    let rest: Vec<String> = reader
        .query("FETCH 2 FROM c", &[])
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(rest, ["true:STATIC", "true:STATIC"]);
    reader.batch_execute("COMMIT").unwrap();
}

/// Review of the signal thresholds (#14): this transaction's own change
/// signals before it commits, and its snapshots differ by command, not by
/// age. A cursor opened before the change keeps the older configuration;
/// a statement after a function that changed it sees the change.
#[test]
fn own_changes_are_seen_by_later_commands_only() {
    let mut session = connect();
    let (org, _) = organization(&mut session, "own");
    put_flag(&mut session, &org, ON);
    session
        .batch_execute(&format!(
            "SET flagship.organization_id = '{org}'; BEGIN; \
             DECLARE c CURSOR FOR \
               SELECT flagship.flagship_evaluate('f', '{{}}', 'shop/production') ->> 'reason' \
                 FROM generate_series(1, 2)"
        ))
        .unwrap();
    assert_eq!(text(&mut session, "FETCH 1 FROM c"), "STATIC");
    session
        .batch_execute(&format!(
            "SELECT flagship.put_flag('shop', $doc${OFF}$doc$)"
        ))
        .unwrap();
    assert_eq!(reason(&mut session), "DISABLED");
    assert_eq!(
        text(&mut session, "FETCH 1 FROM c"),
        "STATIC",
        "the cursor saw a later command's change"
    );
    session.batch_execute("COMMIT").unwrap();

    // A function that changes the configuration inside a statement: that
    // statement keeps its snapshot's answer, the next one sees the change.
    session
        .batch_execute(&format!(
            "BEGIN;
             CREATE FUNCTION pg_temp.flip() RETURNS text LANGUAGE plpgsql AS $$
             BEGIN
                 PERFORM flagship.put_flag('shop', $doc${ON}$doc$);
                 RETURN 'flipped';
             END $$;"
        ))
        .unwrap();
    assert_eq!(reason(&mut session), "DISABLED");
    assert_eq!(
        text(
            &mut session,
            "SELECT pg_temp.flip() || ':' || (flagship.flagship_evaluate('f', '{}', 'shop/production') ->> 'reason')"
        ),
        "flipped:DISABLED"
    );
    assert_eq!(
        reason(&mut session),
        "STATIC",
        "a later statement missed its own transaction's change"
    );
    session.batch_execute("COMMIT").unwrap();

    // The same in a session that had located nothing before it wrote (a
    // backend that has not located does not signal itself).
    let mut fresh = connect();
    fresh
        .batch_execute(&format!(
            "SET flagship.organization_id = '{org}'; BEGIN; \
             DECLARE c CURSOR FOR \
               SELECT flagship.flagship_evaluate('f', '{{}}', 'shop/production') ->> 'reason' \
                 FROM generate_series(1, 2); \
             SELECT flagship.put_flag('shop', $doc${OFF}$doc$);"
        ))
        .unwrap();
    assert_eq!(text(&mut fresh, "FETCH 1 FROM c"), "STATIC");
    assert_eq!(
        reason(&mut fresh),
        "DISABLED",
        "a fresh session missed its own change"
    );
    fresh.batch_execute("COMMIT").unwrap();
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

/// Bug found while building the change reads: a cache check ran its query
/// with `Spi::get_one`, which pgrx runs as a write. That gave read-only
/// transactions a transaction id, and every later query of the transaction
/// a snapshot of its own (a statement saw changes committed after it
/// began). Evaluating and checking limits never assigns one.
#[test]
fn evaluations_and_limit_checks_never_take_a_transaction_id() {
    let mut writer = connect();
    let mut reader = connect();
    let (org, _) = organization(&mut writer, "readonly");
    put_flag(&mut writer, &org, ON);
    writer
        .batch_execute(&format!(
            "SET flagship.organization_id = '{org}';
             SELECT flagship.put_metric('shop', '{{\"key\": \"calls\"}}');
             SELECT flagship.put_plan('shop', '{{\"key\": \"pro\", \"limits\": {{\"calls\": {{\"limit\": 10}}}}}}');
             SELECT flagship.put_customer('shop/production', '{{\"key\": \"acme\", \"plan\": \"pro\"}}')"
        ))
        .unwrap();
    reader
        .batch_execute(&format!("SET flagship.organization_id = '{org}'"))
        .unwrap();
    let read_everything = "SELECT flagship.flagship_evaluate('f', '{}', 'shop/production') ->> 'reason', \
                                  flagship.check_usage_limit('acme', 'calls', 1, 'shop/production') ->> 'allowed'";
    for round in 0..3 {
        // Changes of both kinds arrive before each round.
        writer
            .batch_execute(&format!(
                "SELECT flagship.put_customer('shop/production', '{{\"key\": \"acme\", \"plan\": \"pro\", \"attributes\": {{\"round\": {round}}}}}');
                 SELECT flagship.put_flag('shop', '{ON}')"
            ))
            .unwrap();
        reader.batch_execute("BEGIN").unwrap();
        let row = reader.query_one(read_everything, &[]).unwrap();
        assert_eq!(
            (row.get::<_, String>(0), row.get::<_, String>(1)),
            ("STATIC".to_string(), "true".to_string())
        );
        assert_eq!(
            text(
                &mut reader,
                "SELECT coalesce(pg_current_xact_id_if_assigned()::text, 'none')"
            ),
            "none",
            "round {round}"
        );
        reader.batch_execute("COMMIT").unwrap();
    }
}
