//! The per-backend cache of compiled flags must follow the database exactly:
//! another session's commit is seen by the next statement, its uncommitted or
//! rolled-back changes never are.

use crate::harness::{connect, organization, put_flag, text};

const ON: &str = r#"{"key": "f", "environments": {"production": {"enabled": true}}}"#;
const OFF: &str = r#"{"key": "f", "environments": {"production": {"enabled": false}}}"#;

/// Points a session at the organization's `shop/production`.
fn use_production(client: &mut postgres::Client, org: &str) {
    client
        .batch_execute(&format!(
            "SET flagship.organization_id = '{org}'; SET flagship.environment = 'shop/production'"
        ))
        .unwrap();
}

fn reason(client: &mut postgres::Client) -> String {
    text(
        client,
        "SELECT flagship.flagship_evaluate('f') ->> 'reason'",
    )
}

/// A new organization whose flag `f` is on, a session that writes it and
/// one that has evaluated it.
fn writer_and_reader(slug: &str) -> (postgres::Client, postgres::Client, String) {
    let mut writer = connect();
    let mut reader = connect();
    let (org, _) = organization(&mut writer, slug);
    put_flag(&mut writer, &org, ON);
    use_production(&mut reader, &org);
    assert_eq!(reason(&mut reader), "STATIC");
    (writer, reader, org)
}

#[test]
fn another_sessions_commit_is_seen_by_the_next_statement() {
    let (mut writer, mut reader, org) = writer_and_reader("inval");

    writer.batch_execute("BEGIN").unwrap();
    put_flag(&mut writer, &org, OFF);
    assert_eq!(reason(&mut reader), "STATIC", "uncommitted change leaked");
    writer.batch_execute("COMMIT").unwrap();
    assert_eq!(reason(&mut reader), "DISABLED", "committed change not seen");

    // Inside an open READ COMMITTED transaction the next statement sees it too.
    reader.batch_execute("BEGIN").unwrap();
    assert_eq!(reason(&mut reader), "DISABLED");
    put_flag(&mut writer, &org, ON);
    assert_eq!(reason(&mut reader), "STATIC");
    reader.batch_execute("COMMIT").unwrap();
}

/// Evaluates the flag twice in one statement of `reader`'s (inside the
/// transaction `begin` opens, if any), while another session turns the flag off
/// in between; then checks the statement saw one configuration and the
/// next statement the new one.
fn one_statement_one_configuration(slug: &str, begin: Option<&'static str>) {
    let (mut writer, mut reader, org) = writer_and_reader(slug);

    let statement = std::thread::spawn(move || {
        if let Some(begin) = begin {
            reader.batch_execute(begin).unwrap();
        }
        let answers = text(
            &mut reader,
            "SELECT (flagship.flagship_evaluate('f') ->> 'reason') || ' ' || \
                    (SELECT pg_sleep(1.5))::text || ' ' || \
                    (flagship.flagship_evaluate('f') ->> 'reason')",
        );
        (answers, reader)
    });
    std::thread::sleep(std::time::Duration::from_millis(500));
    put_flag(&mut writer, &org, OFF);
    let (answers, mut reader) = statement.join().unwrap();
    assert_eq!(
        answers, "STATIC  STATIC",
        "the configuration changed mid-statement"
    );
    assert_eq!(
        reason(&mut reader),
        "DISABLED",
        "the next statement missed it"
    );
    if begin.is_some() {
        reader.batch_execute("COMMIT").unwrap();
    }
}

/// A statement does not go looking for other sessions' changes once it has
/// evaluated: a query over many rows sees one configuration.
#[test]
fn one_statement_sees_one_configuration() {
    one_statement_one_configuration("steady", None);
}

#[test]
fn a_rollback_restores_the_old_configuration_everywhere() {
    let mut writer = connect();
    let mut reader = connect();
    let (org, _) = organization(&mut writer, "rollback");
    put_flag(&mut writer, &org, ON);
    for client in [&mut writer, &mut reader] {
        use_production(client, &org);
    }
    assert_eq!(reason(&mut reader), "STATIC");

    writer.batch_execute("BEGIN").unwrap();
    put_flag(&mut writer, &org, OFF);
    assert_eq!(reason(&mut writer), "DISABLED", "own change not seen");
    writer.batch_execute("ROLLBACK").unwrap();
    assert_eq!(
        reason(&mut writer),
        "STATIC",
        "writer kept a rolled-back config"
    );
    assert_eq!(reason(&mut reader), "STATIC");
}

#[test]
fn many_sessions_converge_after_a_change() {
    let mut writer = connect();
    let (org, _) = organization(&mut writer, "converge");
    put_flag(&mut writer, &org, ON);
    let mut readers: Vec<_> = (0..4).map(|_| connect()).collect();
    for reader in &mut readers {
        use_production(reader, &org);
        assert_eq!(reason(reader), "STATIC");
    }
    put_flag(&mut writer, &org, OFF);
    for reader in &mut readers {
        assert_eq!(reason(reader), "DISABLED");
    }
}

/// Found by review (#14): versions are counters, so a configuration this
/// backend compiled inside a savepoint that rolled back (version V+1) was
/// served again when a different change brought the version to V+1.
#[test]
fn a_rolled_back_version_is_not_served_when_the_number_comes_back() {
    let (mut writer, mut fresh, org) = writer_and_reader("reused-version");
    use_production(&mut writer, &org);
    let evaluate = "SELECT flagship.flagship_evaluate('f', '{\"targeting_key\": \"u-1\"}')::text";
    writer.batch_execute("BEGIN; SAVEPOINT s").unwrap();
    put_flag(&mut writer, &org, OFF);
    assert_eq!(reason(&mut writer), "DISABLED");
    writer.batch_execute("ROLLBACK TO SAVEPOINT s").unwrap();
    // Another change of the same row: the same version number, other content.
    put_flag(
        &mut writer,
        &org,
        r#"{"key": "f", "environments": {"production": {"enabled": true, "default": {"rollout": {"on": 0, "off": 100}}}}}"#,
    );
    let inside = text(&mut writer, evaluate);
    writer.batch_execute("COMMIT").unwrap();
    assert_eq!(inside, text(&mut fresh, evaluate));
    assert!(!inside.contains("DISABLED"), "{inside}");
}

/// Found by review (#14): once a READ COMMITTED transaction has written,
/// pgrx runs every query as a write, with a snapshot of its own, so a cache
/// check in the middle of a statement saw a change committed after the
/// statement began. The caches' reads now always run read-only, under the
/// statement's snapshot.
#[test]
fn one_statement_of_a_writing_transaction_sees_one_configuration() {
    one_statement_one_configuration("steady-writing", Some("BEGIN; SELECT pg_current_xact_id()"));
}
