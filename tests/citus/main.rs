//! FlagShip on a real Citus 13.2.2 cluster: a coordinator and two workers
//! on 127.0.0.1 (`scripts/citus-cluster start`), FlagShip created on every
//! node. Here its tables stay local to the coordinator, and these tests
//! hold that FlagShip there behaves as on one server, with several sessions
//! at once and for login roles of two organizations, and that an
//! evaluation Citus pushes down into a shard query on a worker raises
//! instead of answering false; `distributed` holds the same for a database
//! distributed with `flagship.distribute()`.
//!
//! Ignored by a plain `cargo test` (they need the cluster); `scripts/test`
//! starts the cluster and runs them with `--ignored`. The ports come from
//! `FLAGSHIP_CITUS_PORTS` (coordinator first), as for the script.

use std::sync::atomic::{AtomicU32, Ordering};

use std::process::Command;

use postgres::{Client, NoTls};

mod distributed;

fn ports() -> Vec<u16> {
    std::env::var("FLAGSHIP_CITUS_PORTS")
        .unwrap_or_else(|_| "9700 9701 9702".into())
        .split_whitespace()
        .map(|port| port.parse().expect("FLAGSHIP_CITUS_PORTS: port numbers"))
        .collect()
}

fn database() -> String {
    std::env::var("FLAGSHIP_CITUS_DB").unwrap_or_else(|_| "flagship".into())
}

fn connect_as(port: u16, user: &str) -> Client {
    connect_to_database(port, user, &database())
}

fn connect_to_database(port: u16, user: &str, database: &str) -> Client {
    Client::connect(
        &format!("host=127.0.0.1 port={port} user={user} dbname={database}"),
        NoTls,
    )
    .unwrap_or_else(|error| panic!("connecting to the Citus node on {port} as {user}: {error}"))
}

fn connect_to(port: u16) -> Client {
    connect_as(port, "postgres")
}

fn coordinator() -> Client {
    connect_to(ports()[0])
}

fn unique(prefix: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}_{}_{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

fn text(client: &mut Client, sql: &str) -> String {
    client.query_one(sql, &[]).unwrap().get(0)
}

/// The SQLSTATE `sql` fails with ("none" when it succeeds), and its message.
fn failure(client: &mut Client, sql: &str) -> (String, String) {
    match client.batch_execute(sql) {
        Ok(()) => ("none".into(), String::new()),
        Err(error) => match error.as_db_error() {
            Some(db) => (db.code().code().to_string(), db.message().to_string()),
            None => (format!("no sqlstate: {error}"), String::new()),
        },
    }
}

/// Runs `work` in `count` coordinator sessions at once, each acting for
/// `organization` and told its number; their results in that order.
fn in_sessions<R: Send + 'static>(
    count: usize,
    organization: &str,
    work: impl Fn(&mut Client, usize) -> R + Send + Sync + Copy + 'static,
) -> Vec<R> {
    let sessions: Vec<_> = (0..count)
        .map(|number| {
            let organization = organization.to_string();
            std::thread::spawn(move || {
                let mut client = coordinator();
                client
                    .batch_execute(&format!("SET flagship.organization_id = '{organization}'"))
                    .unwrap();
                work(&mut client, number)
            })
        })
        .collect();
    sessions
        .into_iter()
        .map(|session| session.join().unwrap())
        .collect()
}

const NORDIC: &str = r#"{"key": "nordic", "environments": {"production": {"enabled": true,
    "rules": [{"conditions": [{"attribute": "country", "op": "in", "values": ["NO", "SE"]}],
               "serve": {"variant": "on"}}],
    "default": {"variant": "off"}}}}"#;

/// A new organization with a project `shop` and the flag `nordic`; the
/// session acts for it. Returns the organization's id and slug.
fn organization(client: &mut Client) -> (String, String) {
    let slug = unique("citus").replace('_', "-");
    let id = text(
        client,
        &format!("SELECT flagship.create_organization('{slug}', '{slug}')::text"),
    );
    client
        .batch_execute(&format!(
            "SET flagship.organization_id = '{id}';
             SELECT flagship.create_project('{id}', 'shop', 'Shop');
             SELECT flagship.put_flag('shop', $doc${NORDIC}$doc$);"
        ))
        .unwrap();
    (id, slug)
}

fn nordic(client: &mut Client, country: &str) -> String {
    text(
        client,
        &format!(
            "SELECT flagship.flagship_evaluate('nordic', '{{\"country\": \"{country}\"}}', \
             'shop/production') ->> 'variant'"
        ),
    )
}

#[test]
#[ignore = "needs the Citus cluster (scripts/test starts it)"]
fn a_change_on_the_coordinator_is_seen_by_the_next_statement_of_another_session() {
    let mut writer = coordinator();
    let (id, _) = organization(&mut writer);
    let mut reader = coordinator();
    reader
        .batch_execute(&format!("SET flagship.organization_id = '{id}'"))
        .unwrap();
    assert_eq!(nordic(&mut reader, "NO"), "on");
    assert_eq!(nordic(&mut reader, "DK"), "off");
    writer
        .batch_execute(
            r#"SELECT flagship.put_flag('shop', '{"key": "nordic", "environments": {"production": {"enabled": false}}}')"#,
        )
        .unwrap();
    assert_eq!(nordic(&mut reader, "NO"), "off");
    // A rolled-back change is never served.
    writer
        .batch_execute(&format!(
            "BEGIN; SELECT flagship.put_flag('shop', $doc${NORDIC}$doc$); ROLLBACK;"
        ))
        .unwrap();
    assert_eq!(nordic(&mut reader, "NO"), "off");
}

/// Before: `WHERE flagship_enabled(...)` on a distributed table ran on the
/// workers, whose FlagShip tables are empty, and answered false for every
/// row (0 of 500 nordic orders, no error); `has_permission` answered false
/// there until this session.
#[test]
#[ignore = "needs the Citus cluster (scripts/test starts it)"]
fn an_evaluation_pushed_down_to_a_worker_raises_instead_of_answering_false() {
    let mut client = coordinator();
    let (_, slug) = organization(&mut client);
    let orders = distributed_orders(&mut client, "orders", 1000);
    let environment = format!("{slug}/shop/production");
    let gated = |from: &str| {
        format!(
            "SELECT count(*) FROM {from} WHERE flagship.flagship_enabled('nordic', \
             jsonb_build_object('country', o.country), '{environment}')"
        )
    };
    assert_refused_on_a_worker(&mut client, &gated(&format!("{orders} o")));
    // Metering, rate limits, key verification and permission checks alike:
    // on a worker every customer, key and member would be unknown.
    for condition in [
        format!("(flagship.check_usage_limit('c' || o.id, 'calls', 1, '{environment}') ->> 'allowed')::boolean"),
        format!("(flagship.record_usage('c' || o.id, 'calls', 1, NULL, '{environment}') ->> 'allowed')::boolean"),
        format!("(flagship.rate_limit('c' || o.id, 'requests', 1, '{environment}') ->> 'allowed')::boolean"),
        "(flagship.verify_api_key('fs_live_' || o.id) ->> 'valid')::boolean".to_string(),
        "flagship.has_permission('user-' || o.id, 'features:write')".to_string(),
    ] {
        assert_refused_on_a_worker(
            &mut client,
            &format!("SELECT count(*) FROM {orders} o WHERE {condition}"),
        );
    }
    // The documented ways: the rows come back to the coordinator first, or
    // only their distinct contexts do, and the answers join back.
    assert_eq!(
        count(
            &mut client,
            &gated(&format!("(SELECT * FROM {orders} OFFSET 0) o"))
        ),
        500
    );
    assert_eq!(
        count(
            &mut client,
            &format!(
                "WITH decided AS (
                   SELECT country, flagship.flagship_enabled('nordic', jsonb_build_object('country', country),
                                                             '{environment}') AS enabled
                     FROM (SELECT DISTINCT country FROM {orders}) contexts OFFSET 0)
                 SELECT count(*) FROM {orders} o JOIN decided d USING (country) WHERE d.enabled"
            )
        ),
        500
    );
    // A session on a worker is refused alike, and may not create an
    // organization there, which the coordinator would never see (before:
    // created, and served from the worker's own tables).
    let mut worker = connect_to(ports()[1]);
    assert_refused_on_a_worker(
        &mut worker,
        &format!("SELECT flagship.flagship_enabled('nordic', '{{}}', '{environment}')"),
    );
    let on_a_worker = unique("on-a-worker").replace('_', "-");
    assert_refused_on_a_worker(
        &mut worker,
        &format!("SELECT flagship.create_organization('{on_a_worker}', 'On a worker')"),
    );
    client
        .batch_execute(&format!("DROP TABLE {orders}"))
        .unwrap();
}

/// A new application table (named from `prefix`) distributed by `id`,
/// with `rows` rows whose `country` cycles through NO, SE, DK and US (half
/// of them nordic).
fn distributed_orders(client: &mut Client, prefix: &str, rows: u32) -> String {
    let orders = unique(prefix);
    client
        .batch_execute(&format!(
            "CREATE TABLE {orders} (id bigint, country text);
             SELECT create_distributed_table('{orders}', 'id');
             INSERT INTO {orders} SELECT i, (ARRAY['NO', 'SE', 'DK', 'US'])[1 + i % 4]
               FROM generate_series(1, {rows}) i;"
        ))
        .unwrap();
    orders
}

/// `sql` fails with FlagShip's refusal on a Citus worker (0A000 is also
/// Citus's own code for what it cannot plan: the message tells them apart).
fn assert_refused_on_a_worker(client: &mut Client, sql: &str) {
    let (code, message) = failure(client, sql);
    assert_eq!(code, "0A000", "{sql}: {message}");
    assert!(message.contains("Citus worker"), "{sql}: {message}");
}

#[test]
#[ignore = "needs the Citus cluster (scripts/test starts it)"]
fn eight_sessions_racing_on_one_limit_are_granted_exactly_the_limit() {
    let mut setup = coordinator();
    let (id, _) = organization(&mut setup);
    setup
        .batch_execute(
            r#"SELECT flagship.put_metric('shop', '{"key": "calls"}');
               SELECT flagship.put_plan('shop', '{"key": "pro", "limits": {"calls": {"limit": 100, "period": "month"}}}');
               SELECT flagship.put_customer('shop/production', '{"key": "acme", "plan": "pro"}');"#,
        )
        .unwrap();
    let granted: usize = in_sessions(8, &id, |client, _| {
        (0..30)
            .filter(|_| {
                text(
                    client,
                    "SELECT flagship.record_usage('acme', 'calls', 1, NULL, 'shop/production') ->> 'allowed'",
                ) == "true"
            })
            .count()
    })
    .into_iter()
    .sum();
    assert_eq!(granted, 100);
    assert_eq!(
        text(
            &mut setup,
            "SELECT flagship.check_usage_limit('acme', 'calls', 1, 'shop/production') ->> 'used'"
        ),
        "100"
    );
}

#[test]
#[ignore = "needs the Citus cluster (scripts/test starts it)"]
fn api_keys_are_issued_verified_and_revoked_on_the_coordinator() {
    let mut client = coordinator();
    let (id, _) = organization(&mut client);
    let key = text(
        &mut client,
        &format!("SELECT flagship.issue_api_key('{id}', 'ci', '{{features:read}}')"),
    );
    let verified = |client: &mut Client| {
        text(
            client,
            &format!("SELECT flagship.verify_api_key('{key}') ->> 'valid'"),
        )
    };
    assert_eq!(verified(&mut client), "true");
    let key_id = text(
        &mut client,
        &format!("SELECT flagship.verify_api_key('{key}') ->> 'key_id'"),
    );
    client
        .batch_execute(&format!("SELECT flagship.revoke_api_key('{key_id}')"))
        .unwrap();
    assert_eq!(verified(&mut client), "false");
}

#[test]
#[ignore = "needs the Citus cluster (scripts/test starts it)"]
fn the_audit_chain_stays_valid_after_concurrent_writes() {
    let mut setup = coordinator();
    let (id, _) = organization(&mut setup);
    in_sessions(4, &id, |client, writer| {
        for round in 0..10 {
            client
                .batch_execute(&format!(
                    r#"SELECT flagship.put_flag('shop', '{{"key": "w{writer}", "environments": {{"production": {{"enabled": {}}}}}}}')"#,
                    round % 2 == 0
                ))
                .unwrap();
        }
    });
    assert_eq!(
        text(
            &mut setup,
            &format!("SELECT flagship.verify_audit_chain('{id}') ->> 'valid'")
        ),
        "true"
    );
}

/// A login role in `group` (none: no FlagShip role at all), on every node
/// (Citus creates roles on the workers too).
fn login_role(client: &mut Client, prefix: &str, group: Option<&str>) -> String {
    let role = unique(prefix);
    let membership = group.map_or(String::new(), |group| format!(" IN ROLE {group}"));
    client
        .batch_execute(&format!("CREATE ROLE {role} LOGIN{membership}"))
        .unwrap();
    role
}

fn count(client: &mut Client, sql: &str) -> i64 {
    client.query_one(sql, &[]).unwrap().get(0)
}

/// An organization (`organization`) with rows in every tenant table and a
/// member `alice` who owns it (so that the audit tables show rows too).
fn populated_organization(client: &mut Client) -> (String, String) {
    let (id, slug) = organization(client);
    populate(client, &id);
    (id, slug)
}

/// Gives organization `id` (made by `organization`; the session acts for
/// it) rows in every tenant table and an owner `alice`.
fn populate(client: &mut Client, id: &str) {
    client
        .batch_execute(&format!(
            r#"SELECT flagship.put_segment('shop', '{{"key": "beta", "included": ["u"]}}');
               SELECT flagship.put_flag('shop', '{{"key": "f", "environments": {{"production": {{"enabled": true}}}}}}');
               INSERT INTO flagship.members (organization_id, user_key) VALUES ('{id}', 'alice');
               INSERT INTO flagship.member_roles (organization_id, member_id, role_id)
               SELECT m.organization_id, m.id, r.id FROM flagship.members m
                 JOIN flagship.roles r ON r.organization_id = m.organization_id AND r.key = 'owner'
                WHERE m.organization_id = '{id}' AND m.user_key = 'alice';"#
        ))
        .unwrap();
    client
        .batch_execute(include_str!("../fixtures/every_tenant_table.sql"))
        .unwrap();
}

/// Row-level security on the coordinator, for login roles that are not
/// superusers: each organization's admin sees all of its own rows and none
/// of the other's in every tenant table; the app role evaluates its own
/// flags and cannot name the other's environment; a role with no FlagShip
/// role reads nothing and calls nothing.
#[test]
#[ignore = "needs the Citus cluster (scripts/test starts it)"]
fn login_roles_of_two_organizations_see_only_their_own_rows_on_the_coordinator() {
    let mut su = coordinator();
    let (a, _) = populated_organization(&mut su);
    let (b, b_slug) = populated_organization(&mut su);
    let tables: Vec<String> = su
        .query(include_str!("../fixtures/tenant_tables.sql"), &[])
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert!(tables.len() >= 20, "tenant tables: {tables:?}");
    let admin = login_role(&mut su, "citus_admin", Some("flagship_admin"));
    for (own, other) in [(&a, &b), (&b, &a)] {
        let mut session = connect_as(ports()[0], &admin);
        session
            .batch_execute(&format!(
                "SET flagship.organization_id = '{own}'; SET flagship.actor = 'alice'"
            ))
            .unwrap();
        for table in &tables {
            let column = if table == "organizations" {
                "id"
            } else {
                "organization_id"
            };
            let all = count(
                &mut session,
                &format!("SELECT count(*) FROM flagship.{table}"),
            );
            let mine = count(
                &mut session,
                &format!("SELECT count(*) FROM flagship.{table} WHERE {column} = '{own}'"),
            );
            assert!(mine > 0, "{table} hides the session's own rows");
            assert_eq!(all, mine, "{table} shows rows of another organization");
            assert_eq!(
                count(
                    &mut session,
                    &format!("SELECT count(*) FROM flagship.{table} WHERE {column} = '{other}'")
                ),
                0,
                "{table} shows the other organization"
            );
        }
    }

    let app = login_role(&mut su, "citus_app", Some("flagship_app"));
    let mut session = connect_as(ports()[0], &app);
    session
        .batch_execute(&format!("SET flagship.organization_id = '{a}'"))
        .unwrap();
    assert_eq!(nordic(&mut session, "NO"), "on");
    assert_eq!(
        text(
            &mut session,
            &format!(
                "SELECT flagship.flagship_evaluate('nordic', '{{}}', '{b_slug}/shop/production') ->> 'error_code'"
            )
        ),
        "ENVIRONMENT_NOT_FOUND"
    );
    assert_eq!(
        text(
            &mut session,
            "SELECT flagship.record_usage('acme', 'calls', 1, NULL, 'shop/production') ->> 'allowed'"
        ),
        "true"
    );
    assert_eq!(
        failure(&mut session, "UPDATE flagship.features SET archived = true").0,
        "42501"
    );
    // On the coordinator a permission check answers, with the caller's
    // rights (it reads pg_dist_local_group as this role).
    assert_eq!(
        text(
            &mut session,
            "SELECT flagship.has_permission('nobody', 'features:write')::text"
        ),
        "false"
    );
    assert_eq!(
        text(
            &mut session,
            "SELECT flagship.has_permission('alice', 'features:write')::text"
        ),
        "true"
    );
    drop(session);

    let nobody = login_role(&mut su, "citus_nobody", None);
    let mut session = connect_as(ports()[0], &nobody);
    session
        .batch_execute(&format!("SET flagship.organization_id = '{a}'"))
        .unwrap();
    for statement in [
        "SELECT count(*) FROM flagship.features",
        "SELECT count(*) FROM flagship.api_keys",
        "SELECT flagship.flagship_enabled('nordic', '{}', 'shop/production')",
        "SELECT flagship.record_usage('acme', 'calls', 1, NULL, 'shop/production')",
        "SELECT flagship.export_project('shop')",
    ] {
        assert_eq!(failure(&mut session, statement).0, "42501", "{statement}");
    }
    drop(session);
    for role in [&admin, &app, &nobody] {
        su.batch_execute(&format!("DROP ROLE {role}")).unwrap();
    }
}

/// A project exported from one organization and imported into another on
/// the coordinator serves the same answers there.
#[test]
#[ignore = "needs the Citus cluster (scripts/test starts it)"]
fn a_project_exported_and_imported_on_the_coordinator_evaluates_the_same() {
    let mut client = coordinator();
    organization(&mut client);
    let document = text(&mut client, "SELECT flagship.export_project('shop')::text");
    let slug = unique("citus-import").replace('_', "-");
    let target = text(
        &mut client,
        &format!("SELECT flagship.create_organization('{slug}', '{slug}')::text"),
    );
    client
        .batch_execute(&format!(
            "SET flagship.organization_id = '{target}';
             SELECT flagship.import_project('{target}', $doc${document}$doc$::jsonb);"
        ))
        .unwrap();
    assert_eq!(nordic(&mut client, "SE"), "on");
    assert_eq!(nordic(&mut client, "DK"), "off");
}

/// `pg_dump` of the coordinator's database, restored as README *Backup and
/// restore* says into a new database on the coordinator: FlagShip's rows
/// come back whole (the same answers, usage and a valid audit chain), and
/// a distributed application table comes back as a plain table holding
/// every row (Citus's own metadata is not in a dump: distribute it again).
#[test]
#[ignore = "needs the Citus cluster (scripts/test starts it)"]
fn pg_dump_of_the_coordinator_restores_flagship_into_a_new_database() {
    let mut client = coordinator();
    let (id, _) = organization(&mut client);
    client
        .batch_execute(
            r#"SELECT flagship.put_metric('shop', '{"key": "calls"}');
               SELECT flagship.put_plan('shop', '{"key": "pro", "limits": {"calls": {"limit": 10}}}');
               SELECT flagship.put_customer('shop/production', '{"key": "acme", "plan": "pro"}');
               SELECT flagship.record_usage('acme', 'calls', 3, 'dump-1', 'shop/production');"#,
        )
        .unwrap();
    let orders = distributed_orders(&mut client, "dumped_orders", 40);
    let target = dump_and_restore(
        &mut client,
        &database(),
        // Not the tables another test creates and drops meanwhile: pg_dump
        // fails on a table dropped between its listing and its lock.
        &["--exclude-table=public.orders_*"],
    );
    let mut restored = connect_to_database(ports()[0], "postgres", &target);
    restored
        .batch_execute(&format!("SET flagship.organization_id = '{id}'"))
        .unwrap();
    assert_eq!(nordic(&mut restored, "NO"), "on");
    assert_eq!(nordic(&mut restored, "DK"), "off");
    assert_eq!(
        text(
            &mut restored,
            "SELECT flagship.check_usage_limit('acme', 'calls', 1, 'shop/production') ->> 'used'"
        ),
        "3"
    );
    // The idempotency key is kept: a retry replays instead of counting.
    assert_eq!(
        text(
            &mut restored,
            "SELECT flagship.record_usage('acme', 'calls', 3, 'dump-1', 'shop/production') ->> 'replayed'"
        ),
        "true"
    );
    assert_eq!(
        text(
            &mut restored,
            &format!("SELECT flagship.verify_audit_chain('{id}') ->> 'valid'")
        ),
        "true"
    );
    assert_eq!(
        count(&mut restored, &format!("SELECT count(*) FROM {orders}")),
        40
    );
    assert_eq!(
        count(
            &mut restored,
            &format!(
                "SELECT count(*) FROM pg_dist_partition WHERE logicalrelid = '{orders}'::regclass"
            )
        ),
        0
    );
    drop(restored);
    // One statement per call: DROP DATABASE refuses a transaction block.
    client
        .batch_execute(&format!("DROP DATABASE {target} WITH (FORCE)"))
        .unwrap();
    client
        .batch_execute(&format!("DROP TABLE {orders}"))
        .unwrap();
}

/// `pg_dump -Fc` of `database` on the coordinator, restored as the README
/// says (triggers off) into a new database there; its name.
fn dump_and_restore(client: &mut Client, database: &str, options: &[&str]) -> String {
    let bindir = text(
        client,
        "SELECT setting FROM pg_config WHERE name = 'BINDIR'",
    );
    let port = ports()[0].to_string();
    let target = unique("citus_restored");
    let dump = std::env::temp_dir().join(format!("{target}.dump"));
    let status = Command::new(format!("{bindir}/pg_dump"))
        .args(["-h", "127.0.0.1", "-p", &port, "-U", "postgres"])
        .args(options)
        .args(["-Fc", "-f"])
        .arg(&dump)
        .arg(database)
        .status()
        .unwrap();
    assert!(status.success(), "pg_dump failed");
    client
        .batch_execute(&format!("CREATE DATABASE {target}"))
        .unwrap();
    let output = Command::new(format!("{bindir}/pg_restore"))
        .env("PGOPTIONS", "-c session_replication_role=replica")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-U",
            "postgres",
            "--exit-on-error",
            "-d",
            &target,
        ])
        .arg(&dump)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&dump);
    assert!(
        output.status.success(),
        "pg_restore failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    target
}
