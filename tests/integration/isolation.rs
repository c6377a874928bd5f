//! Row-level security between organizations, for real non-superuser roles:
//! a session of organization A sees and changes nothing of organization B,
//! whether the organization comes from `flagship.organization_id` or from
//! JWT claims; no context means no rows; the app role writes no configuration.

use postgres::Client;

use crate::harness::{
    add_member, all_tenant_tables, connect, organization, put_flag, role_in, sqlstate, text,
};

fn tenant_column(table: &str) -> &'static str {
    if table == "organizations" {
        "id"
    } else {
        "organization_id"
    }
}

fn count(client: &mut Client, sql: &str) -> i64 {
    client.query_one(sql, &[]).unwrap().get(0)
}

struct Fixture {
    a: String,
    b: String,
    b_slug: String,
    admin_role: String,
    app_role: String,
}

fn fixture() -> Fixture {
    let mut su = connect();
    let (a, _) = organization(&mut su, "iso-a");
    let (b, b_slug) = organization(&mut su, "iso-b");
    for org in [&a, &b] {
        su.batch_execute(&format!(
            "SET flagship.organization_id = '{org}';
             SELECT flagship.put_segment('shop', '{{\"key\": \"beta\", \"included\": [\"u\"]}}');"
        ))
        .unwrap();
        add_member(&mut su, org, "alice", "owner");
        put_flag(
            &mut su,
            org,
            r#"{"key": "f", "environments": {"production": {"enabled": true}}}"#,
        );
        // Plans, customers and usage, so that every tenant table has rows.
        su.batch_execute(include_str!("../fixtures/every_tenant_table.sql"))
            .unwrap();
    }
    let admin_role = role_in(&mut su, "iso_admin", Some("flagship_admin"));
    let app_role = role_in(&mut su, "iso_app", Some("flagship_app"));
    Fixture {
        a,
        b,
        b_slug,
        admin_role,
        app_role,
    }
}

fn assert_sees_only_own(client: &mut Client, own: &str, other: &str, how: &str) {
    for table in &all_tenant_tables(&mut connect()) {
        let column = tenant_column(table);
        let foreign = count(
            client,
            &format!("SELECT count(*) FROM flagship.{table} WHERE {column} = '{other}'"),
        );
        assert_eq!(foreign, 0, "{how}: {table} shows the other organization");
        let mine = count(
            client,
            &format!("SELECT count(*) FROM flagship.{table} WHERE {column} = '{own}'"),
        );
        assert!(mine > 0, "{how}: {table} hides the session's own rows");
        let all = count(client, &format!("SELECT count(*) FROM flagship.{table}"));
        assert_eq!(
            all, mine,
            "{how}: {table} shows rows of some other organization"
        );
    }
}

/// Rows a statement changed; a permission error (42501) changed none.
fn changed(client: &mut Client, sql: &str) -> u64 {
    client.batch_execute("SAVEPOINT change").unwrap();
    let rows = match client.execute(sql, &[]) {
        Ok(rows) => rows,
        Err(error) => {
            let code = error.code().map(|code| code.code().to_string());
            assert_eq!(code.as_deref(), Some("42501"), "{sql}: {error}");
            0
        }
    };
    client
        .batch_execute("ROLLBACK TO SAVEPOINT change")
        .unwrap();
    rows
}

fn assert_changes_nothing_of(client: &mut Client, other: &str, how: &str) {
    for table in &all_tenant_tables(&mut connect()) {
        let column = tenant_column(table);
        let updated = changed(
            client,
            &format!("UPDATE flagship.{table} SET {column} = {column} WHERE {column} = '{other}'"),
        );
        assert_eq!(
            updated, 0,
            "{how}: updated {table} of the other organization"
        );
        let deleted = changed(
            client,
            &format!("DELETE FROM flagship.{table} WHERE {column} = '{other}'"),
        );
        assert_eq!(
            deleted, 0,
            "{how}: deleted from {table} of the other organization"
        );
    }
    for insert in [
        format!("INSERT INTO flagship.projects (organization_id, key, name) VALUES ('{other}', 'x', 'x')"),
        format!("INSERT INTO flagship.members (organization_id, user_key) VALUES ('{other}', 'mallory')"),
        format!(
            "INSERT INTO flagship.segments (organization_id, project_id, key) \
             SELECT '{other}', id, 'x' FROM flagship.projects LIMIT 1"
        ),
    ] {
        let code = sqlstate(client, &insert);
        assert!(code == "42501" || code == "none", "{how}: {insert}: {code}");
        if code == "none" {
            // The policy hid every source row, so nothing was inserted; make
            // sure nothing landed in the other organization either.
            assert_eq!(
                count(client, &format!("SELECT count(*) FROM flagship.segments WHERE organization_id = '{other}'")),
                0
            );
        }
    }
    let direct = sqlstate(
        client,
        &format!(
            "INSERT INTO flagship.members (organization_id, user_key) VALUES ('{other}', 'eve')"
        ),
    );
    assert_eq!(direct, "42501", "{how}: insert into the other organization");
}

#[test]
fn organizations_are_isolated_by_setting_and_by_jwt() {
    let f = fixture();
    let tables = all_tenant_tables(&mut connect());
    assert!(tables.len() >= 20, "tenant tables: {tables:?}");
    let mut session = connect();
    session.batch_execute("BEGIN").unwrap();
    session
        .batch_execute(&format!("SET LOCAL ROLE {}", f.admin_role))
        .unwrap();

    for table in &tables {
        assert_eq!(
            count(
                &mut session,
                &format!("SELECT count(*) FROM flagship.{table}")
            ),
            0,
            "no context must mean no rows in {table}"
        );
    }

    session
        .batch_execute(&format!(
            // The actor holds audit:read, so the audit tables show rows too.
            "SET LOCAL flagship.organization_id = '{}'; SET LOCAL flagship.actor = 'alice'",
            f.a
        ))
        .unwrap();
    assert_sees_only_own(&mut session, &f.a, &f.b, "setting");
    assert_changes_nothing_of(&mut session, &f.b, "setting");

    session
        .batch_execute(&format!(
            "SET LOCAL flagship.organization_id = ''; SET LOCAL flagship.actor = ''; \
             SET LOCAL request.jwt.claims = '{{\"org_id\": \"{}\", \"sub\": \"alice\"}}'",
            f.b
        ))
        .unwrap();
    assert_sees_only_own(&mut session, &f.b, &f.a, "jwt");
    assert_changes_nothing_of(&mut session, &f.a, "jwt");
    session.batch_execute("ROLLBACK").unwrap();
}

#[test]
fn evaluation_cannot_reach_another_organization() {
    let f = fixture();
    let mut su = connect();
    let b_environment = text(
        &mut su,
        &format!(
            "SELECT id::text FROM flagship.environments WHERE organization_id = '{}' AND key = 'production'",
            f.b
        ),
    );
    let mut app = connect();
    app.batch_execute(&format!(
        "SET ROLE {}; SET flagship.organization_id = '{}'",
        f.app_role, f.a
    ))
    .unwrap();
    assert_eq!(
        text(
            &mut app,
            "SELECT flagship.flagship_evaluate('f', '{}', 'shop/production') ->> 'reason'"
        ),
        "STATIC"
    );
    for name in [format!("{}/shop/production", f.b_slug), b_environment] {
        assert_eq!(
            text(
                &mut app,
                &format!(
                    "SELECT flagship.flagship_evaluate('f', '{{}}', '{name}') ->> 'error_code'"
                )
            ),
            "ENVIRONMENT_NOT_FOUND",
            "{name}"
        );
    }
}

#[test]
fn the_app_role_cannot_write_configuration() {
    let f = fixture();
    let mut app = connect();
    app.batch_execute(&format!(
        "BEGIN; SET LOCAL ROLE {}; SET LOCAL flagship.organization_id = '{}'",
        f.app_role, f.a
    ))
    .unwrap();
    for statement in [
        "UPDATE flagship.features SET archived = true",
        "DELETE FROM flagship.feature_rules",
        "UPDATE flagship.projects SET name = 'x'",
        "INSERT INTO flagship.members (organization_id, user_key) SELECT id, 'x' FROM flagship.organizations",
        r#"SELECT flagship.put_flag('shop', '{"key": "g"}')"#,
        r#"SELECT flagship.put_segment('shop', '{"key": "s"}')"#,
        "SELECT flagship.create_organization('sneaky', 'Sneaky')",
        "UPDATE flagship.usage_limits SET usage_limit = NULL",
        "DELETE FROM flagship.subscriptions",
        "UPDATE flagship.usage_ledger SET amount = 0",
        r#"SELECT flagship.put_plan('shop', '{"key": "free-for-all"}')"#,
        r#"SELECT flagship.put_customer('shop/production', '{"key": "acme", "plan": "pro", "overrides": {"limits": {"calls": {"limit": null}}}}')"#,
    ] {
        assert_eq!(sqlstate(&mut app, statement), "42501", "{statement}");
    }
    // What the app role is for: consuming usage and evaluating plan flags.
    let recorded = text(
        &mut app,
        "SELECT flagship.record_usage('acme', 'calls', 1, NULL, 'shop/production') ->> 'reason'",
    );
    assert_eq!(recorded, "WITHIN_LIMIT");
    app.batch_execute("ROLLBACK").unwrap();
}
