//! API keys and permission checks with real, non-superuser roles: keys are
//! never stored in plaintext, every verification code is answered, and no
//! function reaches another organization's environment, key or members.

use postgres::Client;

use crate::harness::{add_member, connect, organization, put_flag, role_in, sqlstate, text};

struct Fixture {
    org: String,
    other: String,
    admin: Client,
    app: Client,
    app_role: String,
}

/// Two organizations; an admin session and an app session of the first.
fn fixture() -> Fixture {
    let mut su = connect();
    let (org, _) = organization(&mut su, "keys-a");
    let (other, _) = organization(&mut su, "keys-b");
    let admin_role = role_in(&mut su, "keys_admin", Some("flagship_admin"));
    let app_role = role_in(&mut su, "keys_app", Some("flagship_app"));
    // The admin session acts for `keys-admin`, an owner of the organization:
    // configuration writes need the actor's permission.
    add_member(&mut su, &org, "keys-admin", "owner");
    let session = |role: &str| {
        let mut client = connect();
        client
            .batch_execute(&format!(
                "SET ROLE {role}; SET flagship.organization_id = '{org}'; \
                 SET flagship.actor = 'keys-admin'"
            ))
            .unwrap();
        client
    };
    Fixture {
        admin: session(&admin_role),
        app: session(&app_role),
        org,
        other,
        app_role,
    }
}

/// The SQLSTATE a statement fails with, tried in a transaction rolled back after.
fn refused(client: &mut Client, sql: &str) -> String {
    client.batch_execute("BEGIN").unwrap();
    let code = sqlstate(client, sql);
    client.batch_execute("ROLLBACK").unwrap();
    code
}

fn issue(client: &mut Client, org: &str, extra: &str) -> String {
    text(
        client,
        &format!("SELECT flagship.issue_api_key('{org}', 'ci'{extra})"),
    )
}

fn code(client: &mut Client, key: &str) -> String {
    text(
        client,
        &format!("SELECT flagship.verify_api_key({key}) ->> 'code'"),
    )
}

#[test]
fn keys_are_hashed_and_every_code_is_answered() {
    let mut f = fixture();
    let key = issue(
        &mut f.admin,
        &f.org,
        ", ARRAY['features:read', 'usage:*'], 'shop/production'",
    );
    assert!(
        key.starts_with("fs_live_") && key.len() == 8 + 64,
        "format: {key}"
    );

    // No table holds the plaintext or its secret part, in any column.
    let mut su = connect();
    let secret = &key[8..];
    let tables: Vec<String> = su
        .query(
            "SELECT c.oid::regclass::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname = 'flagship' AND c.relkind = 'r'",
            &[],
        )
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert!(tables.len() > 20);
    for table in &tables {
        let hits: i64 = su
            .query_one(
                &format!(
                    "SELECT count(*) FROM {table} t WHERE strpos(t::text, $1) > 0 OR strpos(t::text, $2) > 0"
                ),
                &[&key, &secret.to_string()],
            )
            .unwrap()
            .get(0);
        assert_eq!(hits, 0, "{table} holds the key");
    }
    // Nor can an administrator read the hash back.
    assert_eq!(
        refused(&mut f.admin, "SELECT key_hash FROM flagship.api_keys"),
        "42501"
    );

    // The app role verifies; the answer names the key's organization,
    // environment and scopes.
    let verified = text(
        &mut f.app,
        &format!("SELECT flagship.verify_api_key('{key}')::text"),
    );
    assert!(verified.contains("\"code\": \"VALID\""), "{verified}");
    assert!(verified.contains(&f.org), "{verified}");
    assert!(
        verified.contains("[\"features:read\", \"usage:*\"]"),
        "{verified}"
    );

    let wrong = format!("'fs_live_{}'", "0".repeat(64));
    for (key, expected) in [
        (wrong.as_str(), "NOT_FOUND"),
        ("''", "NOT_FOUND"),
        ("NULL", "NOT_FOUND"),
        ("'not a key at all'", "NOT_FOUND"),
    ] {
        assert_eq!(code(&mut f.app, key), expected, "{key}");
    }

    let limited = issue(&mut f.admin, &f.org, ", '{}', NULL, NULL, 2");
    let quoted = format!("'{limited}'");
    assert_eq!(code(&mut f.app, &quoted), "VALID");
    assert_eq!(code(&mut f.app, &quoted), "VALID");
    assert_eq!(code(&mut f.app, &quoted), "USAGE_EXCEEDED");

    let expiring = format!(
        "'{}'",
        issue(
            &mut f.admin,
            &f.org,
            ", '{}', NULL, now() + interval '1 hour'"
        )
    );
    su.batch_execute(&format!(
        "UPDATE flagship.api_keys SET expires_at = now() - interval '1 second' \
          WHERE key_hash = sha256(convert_to({expiring}, 'UTF8'))"
    ))
    .unwrap();
    assert_eq!(code(&mut f.app, &expiring), "EXPIRED");

    let key_id = text(
        &mut f.app,
        &format!("SELECT flagship.verify_api_key('{key}') ->> 'key_id'"),
    );
    f.admin
        .batch_execute(&format!("SELECT flagship.revoke_api_key('{key_id}')"))
        .unwrap();
    assert_eq!(code(&mut f.app, &format!("'{key}'")), "REVOKED");

    let other_key = format!("'{}'", issue(&mut su, &f.org, ""));
    su.batch_execute(&format!(
        "UPDATE flagship.organizations SET status = 'suspended' WHERE id = '{}'",
        f.org
    ))
    .unwrap();
    assert_eq!(code(&mut f.app, &other_key), "FORBIDDEN");
}

#[test]
fn no_function_reaches_another_organization() {
    let mut f = fixture();
    let mut su = connect();
    let foreign_key = issue(&mut su, &f.other, "");
    let foreign_id = text(
        &mut su,
        &format!("SELECT flagship.verify_api_key('{foreign_key}') ->> 'key_id'"),
    );
    let foreign_environment = text(
        &mut su,
        &format!(
            "SELECT id::text FROM flagship.environments WHERE organization_id = '{}' AND key = 'production'",
            f.other
        ),
    );
    for (sql, expected) in [
        // Issuing for another organization: row-level security refuses.
        (
            format!("SELECT flagship.issue_api_key('{}', 'x')", f.other),
            "22023",
        ),
        // Binding to another organization's environment, by uuid.
        (
            format!(
                "SELECT flagship.issue_api_key('{}', 'x', '{{}}', '{foreign_environment}')",
                f.org
            ),
            "22023",
        ),
        // Revoking another organization's key.
        (
            format!("SELECT flagship.revoke_api_key('{foreign_id}')"),
            "22023",
        ),
        (
            "SELECT flagship.issue_api_key(NULL, 'x')".to_string(),
            "22023",
        ),
    ] {
        assert_eq!(refused(&mut f.admin, &sql), expected, "{sql}");
    }
    assert_eq!(
        code(&mut f.app, &format!("'{foreign_key}'")),
        "VALID",
        "the foreign key itself still works"
    );
    // The app role issues and revokes nothing.
    assert_eq!(
        refused(
            &mut f.app,
            &format!("SELECT flagship.issue_api_key('{}', 'x')", f.org)
        ),
        "42501"
    );
}

#[test]
fn permissions_follow_members_and_roles() {
    let mut f = fixture();
    let mut su = connect();
    for (org, user, role) in [
        (&f.org, "alice", "owner"),
        (&f.org, "bob", "viewer"),
        (&f.other, "mallory", "owner"),
    ] {
        add_member(&mut su, org, user, role);
    }
    let has = |client: &mut Client, user: &str, permission: &str, org: &str| {
        text(
            client,
            &format!("SELECT flagship.has_permission('{user}', '{permission}', {org})::text"),
        )
    };
    assert_eq!(has(&mut f.app, "alice", "features:write", "NULL"), "true");
    assert_eq!(has(&mut f.app, "bob", "features:write", "NULL"), "false");
    assert_eq!(has(&mut f.app, "bob", "features:read", "NULL"), "true");
    assert_eq!(has(&mut f.app, "nobody", "features:read", "NULL"), "false");
    // Configuration writes by an admin role follow the actor's permissions.
    add_member(&mut su, &f.org, "dev", "developer");
    let put_flag = r#"SELECT flagship.put_flag('shop', '{"key": "by-actor"}')"#;
    let issue_key = format!("SELECT flagship.issue_api_key('{}', 'by-actor')", f.org);
    for (actor, flag, key) in [
        ("bob", "42501", "42501"),
        ("nobody", "42501", "42501"),
        ("dev", "none", "42501"),
        ("alice", "none", "none"),
    ] {
        f.admin
            .batch_execute(&format!("SET flagship.actor = '{actor}'"))
            .unwrap();
        assert_eq!(refused(&mut f.admin, put_flag), flag, "{actor} put_flag");
        assert_eq!(
            refused(&mut f.admin, &issue_key),
            key,
            "{actor} issue_api_key"
        );
    }

    // Another organization's members are invisible, even named by uuid.
    let other = format!("'{}'", f.other);
    assert_eq!(
        has(&mut f.app, "mallory", "features:write", &other),
        "false"
    );
    assert_eq!(
        has(&mut f.app, "mallory", "features:write", "NULL"),
        "false"
    );
}

#[test]
fn a_key_session_cannot_choose_another_organization() {
    let f = fixture();
    let mut su = connect();
    for org in [&f.org, &f.other] {
        put_flag(
            &mut su,
            org,
            r#"{"key": "f", "environments": {"production": {"enabled": true}}}"#,
        );
    }
    su.batch_execute(&format!("SET flagship.organization_id = '{}'", f.org))
        .unwrap();
    let key = issue(
        &mut su,
        &f.org,
        ", ARRAY['features:read'], 'shop/production'",
    );

    // The DBA requires keys for the application's sessions (ALTER ROLE ...
    // SET in production; here the superuser sets it before dropping to the
    // role), and the application cannot switch that off.
    let mut app = connect();
    // The library is loaded first, as session_preload_libraries would, so
    // that the setting is a real, superuser-only one and not a placeholder.
    app.batch_execute(&format!(
        "SELECT flagship.version(); SET flagship.require_key = on; SET ROLE {}",
        f.app_role
    ))
    .unwrap();
    assert_eq!(refused(&mut app, "SET flagship.require_key = off"), "42501");

    let features =
        |client: &mut Client| text(client, "SELECT count(*)::text FROM flagship.features");
    let reason = |client: &mut Client, environment: &str| {
        text(
            client,
            &format!(
                "SELECT coalesce(flagship.flagship_evaluate('f', '{{}}', '{environment}') ->> 'error_code', 'none')"
            ),
        )
    };
    // Choosing an organization by setting or by JWT claims gets nothing.
    app.batch_execute(&format!(
        "SET flagship.organization_id = '{}'; \
         SET request.jwt.claims = '{{\"org_id\": \"{}\"}}'",
        f.other, f.other
    ))
    .unwrap();
    assert_eq!(features(&mut app), "0");
    // Without a key the session has no organization, and is told so (#17).
    assert_eq!(reason(&mut app, "shop/production"), "GENERAL");
    assert_eq!(
        text(
            &mut app,
            "SELECT flagship.flagship_evaluate('f', '{}', 'shop/production') ->> 'error_message'"
        ),
        "no organization in this session: it requires an API key (flagship.require_key), \
         and none was authenticated in this transaction"
    );

    // A key opens its own organization, for this transaction only, and only
    // in the environment it is bound to.
    app.batch_execute("BEGIN").unwrap();
    let verified = text(
        &mut app,
        &format!("SELECT flagship.authenticate('{key}') ->> 'code'"),
    );
    assert_eq!(verified, "VALID");
    assert_eq!(features(&mut app), "1");
    assert_eq!(
        text(
            &mut app,
            "SELECT organization_id::text FROM flagship.features"
        ),
        f.org
    );
    assert_eq!(reason(&mut app, "shop/production"), "none");
    assert_eq!(reason(&mut app, "shop/staging"), "ENVIRONMENT_NOT_FOUND");
    assert_eq!(
        text(&mut app, "SELECT flagship.current_scopes()::text"),
        "{features:read}"
    );
    app.batch_execute("COMMIT").unwrap();
    assert_eq!(
        features(&mut app),
        "0",
        "the key context ended with the transaction"
    );

    // Scopes are enforced: this key reads flags but may not record usage.
    app.batch_execute("BEGIN").unwrap();
    text(
        &mut app,
        &format!("SELECT flagship.authenticate('{key}')::text"),
    );
    assert_eq!(
        refused(
            &mut app,
            "SELECT flagship.record_usage('acme', 'calls', 1, NULL, 'shop/production')"
        ),
        "42501"
    );
    app.batch_execute("COMMIT").unwrap();
    su.batch_execute(&format!("SET flagship.organization_id = '{}'", f.org))
        .unwrap();
    let usage_key = issue(&mut su, &f.org, ", ARRAY['usage:*']");
    app.batch_execute("BEGIN").unwrap();
    text(
        &mut app,
        &format!("SELECT flagship.authenticate('{usage_key}')::text"),
    );
    assert_eq!(
        text(
            &mut app,
            "SELECT flagship.flagship_evaluate('f', '{}', 'shop/production') ->> 'error_code'"
        ),
        "GENERAL",
        "a usage-only key reads no flags"
    );
    app.batch_execute("COMMIT").unwrap();

    // A wrong key opens nothing.
    app.batch_execute("BEGIN").unwrap();
    let wrong = format!("fs_live_{}", "1".repeat(64));
    assert_eq!(
        text(
            &mut app,
            &format!("SELECT flagship.authenticate('{wrong}') ->> 'code'")
        ),
        "NOT_FOUND"
    );
    assert_eq!(features(&mut app), "0");
    app.batch_execute("ROLLBACK").unwrap();
}

#[test]
fn every_security_definer_function_pins_its_search_path() {
    let mut su = connect();
    let definers: Vec<(String, Option<Vec<String>>)> = su
        .query(
            "SELECT p.oid::regprocedure::text, p.proconfig FROM pg_proc p
               JOIN pg_namespace n ON n.oid = p.pronamespace
              WHERE n.nspname = 'flagship' AND p.prosecdef",
            &[],
        )
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    assert!(
        definers.len() >= 2,
        "create_organization and verify_api_key at least: {definers:?}"
    );
    for (function, config) in definers {
        let config = config.unwrap_or_default();
        assert!(
            config
                .iter()
                .any(|setting| setting == "search_path=pg_catalog, pg_temp"),
            "{function} does not pin search_path: {config:?}"
        );
    }
}

#[test]
fn every_api_function_refuses_another_organizations_names() {
    let mut f = fixture();
    let mut su = connect();
    let ids = |su: &mut Client, org: &str| {
        let row = su
            .query_one(
                "SELECT p.id::text, e.id::text, o.slug FROM flagship.projects p
                   JOIN flagship.environments e ON e.organization_id = p.organization_id
                    AND e.project_id = p.id AND e.key = 'production'
                   JOIN flagship.organizations o ON o.id = p.organization_id
                  WHERE p.organization_id = $1::text::uuid",
                &[&org],
            )
            .unwrap();
        (
            row.get::<_, String>(0),
            row.get::<_, String>(1),
            row.get::<_, String>(2),
        )
    };
    let (project, environment, slug) = ids(&mut su, &f.other);
    su.batch_execute(&format!(
        r#"SET flagship.organization_id = '{other}';
           SELECT flagship.put_flag('shop', '{{"key": "f", "environments": {{"production": {{"enabled": true}}}}}}');
           SELECT flagship.put_metric('shop', '{{"key": "calls"}}');
           SELECT flagship.put_plan('shop', '{{"key": "pro", "limits": {{"calls": {{"limit": 5}}}}}}');
           SELECT flagship.put_customer('shop/production', '{{"key": "acme", "plan": "pro"}}');"#,
        other = f.other
    ))
    .unwrap();
    // Every function, called from organization A with B's project or
    // environment by uuid or full name, refuses as if it did not exist.
    let by_name = format!("{slug}/shop/production");
    for target in [&environment, &by_name] {
        for sql in [
            format!("SELECT flagship.record_usage('acme', 'calls', 1, NULL, '{target}')"),
            format!("SELECT flagship.check_usage_limit('acme', 'calls', 1, '{target}')"),
            format!("SELECT flagship.set_usage('acme', 'calls', 1, '{target}')"),
            format!(r#"SELECT flagship.put_customer('{target}', '{{"key": "x"}}')"#),
            format!(
                "SELECT flagship.issue_api_key('{}', 'x', '{{}}', '{target}')",
                f.org
            ),
        ] {
            assert_eq!(refused(&mut f.admin, &sql), "22023", "{sql}");
        }
        let answer = text(
            &mut f.admin,
            &format!("SELECT flagship.flagship_evaluate('f', '{{}}', '{target}') ->> 'error_code'"),
        );
        assert_eq!(answer, "ENVIRONMENT_NOT_FOUND", "{target}");
    }
    for sql in [
        format!(r#"SELECT flagship.put_flag('{project}', '{{"key": "g"}}')"#),
        format!(r#"SELECT flagship.put_segment('{project}', '{{"key": "s"}}')"#),
        format!(r#"SELECT flagship.put_metric('{project}', '{{"key": "m"}}')"#),
        format!(r#"SELECT flagship.put_plan('{project}', '{{"key": "p"}}')"#),
        format!("SELECT flagship.export_project('{project}')"),
    ] {
        assert_eq!(refused(&mut f.admin, &sql), "22023", "{sql}");
    }
    // Importing into, or creating projects in, another organization.
    for sql in [
        format!(
            r#"SELECT flagship.import_project('{}', '{{"project": {{"key": "stolen", "name": "x"}}}}')"#,
            f.other
        ),
        format!(
            "SELECT flagship.create_project('{}', 'stolen', 'x')",
            f.other
        ),
    ] {
        assert_ne!(refused(&mut f.admin, &sql), "none", "{sql}");
    }
    // Nothing of B changed.
    assert_eq!(
        text(
            &mut su,
            &format!(
                "SELECT (SELECT count(*) FROM flagship.features WHERE organization_id = '{o}') || '/' || \
                        (SELECT count(*) FROM flagship.usage_ledger WHERE organization_id = '{o}') || '/' || \
                        (SELECT count(*) FROM flagship.projects WHERE organization_id = '{o}')",
                o = f.other
            )
        ),
        "1/0/1"
    );
}

#[test]
fn a_role_without_flagship_roles_reaches_nothing() {
    let mut su = connect();
    let (org, _) = organization(&mut su, "keys-public");
    let outsider = role_in(&mut su, "outsider", None);
    let mut client = connect();
    client
        .batch_execute(&format!(
            "SET ROLE {outsider}; SET flagship.organization_id = '{org}'"
        ))
        .unwrap();
    for sql in [
        "SELECT flagship.flagship_evaluate('f', '{}', 'shop/production')",
        "SELECT flagship.record_usage('acme', 'calls')",
        "SELECT flagship.verify_api_key('fs_live_x')",
        "SELECT flagship.authenticate('fs_live_x')",
        "SELECT flagship.has_permission('alice', 'features:read')",
        "SELECT count(*) FROM flagship.features",
        "SELECT count(*) FROM flagship.organizations",
    ] {
        assert_eq!(refused(&mut client, sql), "42501", "{sql}");
    }
}
