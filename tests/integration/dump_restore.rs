//! pg_dump and pg_restore keep every row: a restored database exports the
//! same project, answers the same evaluations, and holds the same rows in
//! every tenant table.

use std::process::Command;

use crate::harness::{add_member, connect, organization, put_flag, text, unique};

fn evaluations(client: &mut postgres::Client, slug: &str) -> String {
    text(
        client,
        &format!(
            "SELECT string_agg(flagship.flagship_evaluate(f, jsonb_build_object('targeting_key', 'u-' || i), \
                 '{slug}/shop/production')::text, ';' ORDER BY f, i) \
             FROM generate_series(1, 100) i, unnest(ARRAY['base', 'exp']) f"
        ),
    )
}

/// Every row the organization owns, table by table, as text.
fn organization_rows(client: &mut postgres::Client, organization: &str) -> String {
    let tables = crate::harness::tenant_tables(client);
    tables
        .iter()
        .map(|table| {
            let rows = text(
                client,
                &format!(
                    "SELECT string_agg(t::text, E'\\n' ORDER BY t::text) FROM flagship.{table} t \
                     WHERE organization_id = '{organization}'"
                ),
            );
            format!("{table}:\n{rows}\n")
        })
        .collect()
}

#[test]
fn dump_and_restore_keep_rows_and_evaluations() {
    let mut su = connect();
    let (org, slug) = organization(&mut su, "dump");
    su.batch_execute(&format!(
        "SET flagship.organization_id = '{org}';
         SELECT flagship.put_segment('shop', '{{\"key\": \"beta\", \"included\": [\"u-1\"]}}');"
    ))
    .unwrap();
    put_flag(
        &mut su,
        &org,
        r#"{"key": "base", "environments": {"production": {"enabled": true}}}"#,
    );
    put_flag(
        &mut su,
        &org,
        r#"{"key": "exp", "kind": "multivariate", "variants": {"a": 1, "b": 2, "c": 3}, "off_variant": "a",
            "prerequisites": [{"flag": "base"}],
            "environments": {"production": {"enabled": true,
               "rules": [{"id": "beta", "segment": "beta", "serve": {"variant": "c"}}],
               "default": {"rollout": {"a": 20, "b": 30, "c": 50}}}}}"#,
    );
    // Update the prerequisite after its dependant, so its row moves behind.
    put_flag(
        &mut su,
        &org,
        r#"{"key": "base", "name": "Base", "environments": {"production": {"enabled": true}}}"#,
    );
    // Plans, customers and usage: the ledger and counters must survive too.
    su.batch_execute(&format!(
        r#"SELECT flagship.put_metric('shop', '{{"key": "calls"}}');
           SELECT flagship.put_plan('shop', '{{"key": "pro", "limits": {{"calls": {{"limit": 10}}}}}}');
           SELECT flagship.put_customer('{slug}/shop/production', '{{"key": "acme", "plan": "pro"}}');
           SELECT flagship.record_usage('acme', 'calls', 3, 'first', '{slug}/shop/production');
           SELECT flagship.record_usage('acme', 'calls', 2, NULL, '{slug}/shop/production');"#
    ))
    .unwrap();
    // A second organization with rows in every tenant table: events, credit
    // grants, reservations, API keys and exposures survive the restore too.
    let (full, _) = organization(&mut su, "dump-full");
    su.batch_execute(&format!(
        "SET flagship.organization_id = '{full}';
         SELECT flagship.put_segment('shop', '{{\"key\": \"beta\", \"included\": [\"u\"]}}');"
    ))
    .unwrap();
    add_member(&mut su, &full, "alice", "owner");
    put_flag(
        &mut su,
        &full,
        r#"{"key": "f", "environments": {"production": {"enabled": true}}}"#,
    );
    su.batch_execute(include_str!("../fixtures/every_tenant_table.sql"))
        .unwrap();
    for table in crate::harness::tenant_tables(&mut su) {
        let rows = text(
            &mut su,
            &format!(
                "SELECT count(*)::text FROM flagship.{table} WHERE organization_id = '{full}'"
            ),
        );
        assert_ne!(rows, "0", "{table} has no row to restore");
    }
    let full_rows_before = organization_rows(&mut su, &full);
    su.batch_execute(&format!("SET flagship.organization_id = '{org}'"))
        .unwrap();
    let exported = text(&mut su, "SELECT flagship.export_project('shop')::text");
    let rows_before = organization_rows(&mut su, &org);
    assert!(rows_before.contains("audit_events"), "{rows_before}");
    let before = evaluations(&mut su, &slug);
    let usage = |client: &mut postgres::Client| {
        text(
            client,
            &format!(
                "SELECT flagship.check_usage_limit('acme', 'calls', 1, '{slug}/shop/production')::text \
                     || (SELECT string_agg(concat_ws('/', kind, amount, used_after, idempotency_key), ',' ORDER BY id) \
                           FROM flagship.usage_ledger WHERE organization_id = '{org}')"
            ),
        )
    };
    let usage_before = usage(&mut su);
    assert!(usage_before.contains("\"used\": 5"), "{usage_before}");

    let host = text(&mut su, "SELECT current_setting('unix_socket_directories')");
    let port = text(&mut su, "SELECT current_setting('port')");
    let user = text(&mut su, "SELECT current_user::text");
    let source = text(&mut su, "SELECT current_database()::text");
    // The server's own binaries, whatever is first on PATH.
    let bindir = text(
        &mut su,
        "SELECT setting FROM pg_config WHERE name = 'BINDIR'",
    );
    let target = unique("restored").replace('-', "_");
    let dump = std::env::temp_dir().join(format!("{target}.dump"));

    let status = Command::new(format!("{bindir}/pg_dump"))
        .args(["-h", &host, "-p", &port, "-U", &user, "-Fc", "-f"])
        .arg(&dump)
        .arg(&source)
        .status()
        .unwrap();
    assert!(status.success(), "pg_dump failed");
    su.batch_execute(&format!("CREATE DATABASE {target}"))
        .unwrap();
    // Rows are restored as they were: with triggers off, loading them
    // neither appends audit events nor re-validates (README, Backup).
    let output = Command::new(format!("{bindir}/pg_restore"))
        .env("PGOPTIONS", "-c session_replication_role=replica")
        .args([
            "-h",
            &host,
            "-p",
            &port,
            "-U",
            &user,
            "--exit-on-error",
            "-d",
            &target,
        ])
        .arg(&dump)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "pg_restore failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let _ = std::fs::remove_file(&dump);

    let mut restored = postgres::Config::new()
        .host(&host)
        .port(port.parse().unwrap())
        .user(&user)
        .dbname(&target)
        .connect(postgres::NoTls)
        .unwrap();
    restored
        .batch_execute(&format!("SET flagship.organization_id = '{org}'"))
        .unwrap();
    assert_eq!(
        text(
            &mut restored,
            "SELECT flagship.export_project('shop')::text"
        ),
        exported
    );
    assert_eq!(evaluations(&mut restored, &slug), before);
    assert_eq!(organization_rows(&mut restored, &org), rows_before);
    assert_eq!(organization_rows(&mut restored, &full), full_rows_before);
    let chain = text(
        &mut restored,
        &format!("SELECT flagship.verify_audit_chain('{org}') ->> 'valid'"),
    );
    assert_eq!(chain, "true");
    assert_eq!(usage(&mut restored), usage_before);
    // The ledger's sequence was restored too: new rows do not collide.
    let replayed = text(
        &mut restored,
        &format!(
            "SELECT flagship.record_usage('acme', 'calls', 3, 'first', '{slug}/shop/production') ->> 'replayed'"
        ),
    );
    assert_eq!(replayed, "true");
    restored
        .batch_execute(&format!(
            "SELECT flagship.record_usage('acme', 'calls', 1, NULL, '{slug}/shop/production')"
        ))
        .unwrap();
    drop(restored);
    su.batch_execute(&format!("DROP DATABASE {target}"))
        .unwrap();
}
