//! `ALTER EXTENSION flagship UPDATE` from every released version: the data
//! survives, evaluations and limits answer the same, and the catalog ends
//! up object for object what a fresh install of this version creates.

use std::collections::BTreeSet;

use postgres::Client;

use crate::harness::{connect, connect_as, text, unique};

/// Versions whose install script is archived in `sql/archive/`; each needs
/// an upgrade path to this one in `sql/`.
const RELEASED: &[&str] = &["0.1.0", "0.2.0"];

/// Everything a DBA would call the extension's catalog, one line per
/// object, for comparison between databases.
const CATALOG: &str = r#"
SELECT line FROM (
    SELECT format('function %s returns %s language=%s volatile=%s parallel=%s definer=%s strict=%s config=%s acl=%s source=%s',
                  p.oid::regprocedure, pg_get_function_result(p.oid), l.lanname, p.provolatile,
                  p.proparallel, p.prosecdef, p.proisstrict, p.proconfig, p.proacl, md5(p.prosrc)) AS line
      FROM pg_proc p JOIN pg_language l ON l.oid = p.prolang
     WHERE p.pronamespace = 'flagship'::regnamespace
    UNION ALL
    SELECT format('relation %s kind=%s rls=%s forced=%s acl=%s', c.oid::regclass, c.relkind,
                  c.relrowsecurity, c.relforcerowsecurity, c.relacl)
      FROM pg_class c WHERE c.relnamespace = 'flagship'::regnamespace
    UNION ALL
    SELECT format('column %s.%s %s not_null=%s default=%s acl=%s', c.oid::regclass, a.attname,
                  format_type(a.atttypid, a.atttypmod), a.attnotnull, pg_get_expr(d.adbin, d.adrelid), a.attacl)
      FROM pg_attribute a
      JOIN pg_class c ON c.oid = a.attrelid
      LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
     WHERE c.relnamespace = 'flagship'::regnamespace AND c.relkind IN ('r', 'v', 'm', 'p')
       AND a.attnum > 0 AND NOT a.attisdropped
    UNION ALL
    SELECT format('constraint %s.%s %s', c.conrelid::regclass, c.conname, pg_get_constraintdef(c.oid))
      FROM pg_constraint c WHERE c.connamespace = 'flagship'::regnamespace
    UNION ALL
    SELECT 'index ' || pg_get_indexdef(i.indexrelid)
      FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid
     WHERE c.relnamespace = 'flagship'::regnamespace
    UNION ALL
    SELECT format('trigger %s enabled=%s', pg_get_triggerdef(t.oid), t.tgenabled)
      FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
     WHERE c.relnamespace = 'flagship'::regnamespace AND NOT t.tgisinternal
    UNION ALL
    SELECT format('policy %s.%s %s %s roles=%s using=%s check=%s', schemaname, tablename, policyname,
                  permissive, cmd, roles, qual, with_check)
      FROM pg_policies WHERE schemaname = 'flagship'
    UNION ALL
    SELECT 'member ' || pg_describe_object(d.classid, d.objid, d.objsubid)
      FROM pg_depend d JOIN pg_extension e ON e.oid = d.refobjid
     WHERE d.refclassid = 'pg_extension'::regclass AND e.extname = 'flagship' AND d.deptype = 'e'
       -- The #[pg_test] functions exist only in the test build's fresh install.
       AND pg_describe_object(d.classid, d.objid, d.objsubid) !~ '^(schema tests$|function tests\.)'
    UNION ALL
    SELECT format('dumped %s %s', c.config::regclass, c.condition)
      FROM pg_extension e, unnest(e.extconfig, e.extcondition) AS c (config, condition)
     WHERE e.extname = 'flagship'
    UNION ALL
    SELECT format('schema acl=%s', n.nspacl) FROM pg_namespace n WHERE n.nspname = 'flagship'
) objects
"#;

fn catalog(client: &mut Client) -> BTreeSet<String> {
    client
        .query(CATALOG, &[])
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect()
}

/// Puts the archived install scripts where CREATE EXTENSION ... VERSION
/// finds them (`cargo pgrx install` copies only this version's script and
/// the upgrade scripts).
fn install_archived_versions(client: &mut Client) {
    let sharedir = text(
        client,
        "SELECT setting FROM pg_config WHERE name = 'SHAREDIR'",
    );
    for version in RELEASED {
        let name = format!("flagship--{version}.sql");
        let archived = format!("{}/sql/archive/{name}", env!("CARGO_MANIFEST_DIR"));
        std::fs::copy(&archived, format!("{sharedir}/extension/{name}"))
            .unwrap_or_else(|error| panic!("copying {archived}: {error}"));
    }
}

/// A new database and a superuser connection to it.
fn database(su: &mut Client, prefix: &str) -> (String, Client) {
    let name = unique(prefix).replace('-', "_");
    su.batch_execute(&format!("CREATE DATABASE {name}"))
        .unwrap();
    let user = text(su, "SELECT current_user::text");
    let client = connect_as(su, &user, &name);
    (name, client)
}

/// Configuration and usage through the oldest API still supported.
fn populate(client: &mut Client) -> String {
    let org = text(
        client,
        "SELECT flagship.create_organization('acme', 'Acme')::text",
    );
    client
        .batch_execute(&format!(
            r#"SET flagship.organization_id = '{org}';
               SELECT flagship.create_project('{org}', 'shop', 'Shop');
               SELECT flagship.put_segment('shop', '{{"key": "beta", "included": ["u-1"]}}');
               SELECT flagship.put_flag('shop', '{{"key": "base", "environments": {{"production": {{"enabled": true}}}}}}');
               SELECT flagship.put_flag('shop', '{{"key": "exp", "kind": "multivariate", "variants": {{"a": 1, "b": 2}},
                   "off_variant": "a", "prerequisites": [{{"flag": "base"}}],
                   "environments": {{"production": {{"enabled": true,
                       "rules": [{{"id": "beta", "segment": "beta", "serve": {{"variant": "b"}}}}],
                       "default": {{"rollout": {{"a": 25, "b": 75}}}}}}}}}}');
               SELECT flagship.put_metric('shop', '{{"key": "calls"}}');
               SELECT flagship.put_plan('shop', '{{"key": "pro", "features": {{"base": true}}, "limits": {{"calls": {{"limit": 10}}}}}}');
               SELECT flagship.put_customer('shop/production', '{{"key": "acme", "plan": "pro"}}');
               SELECT flagship.record_usage('acme', 'calls', 3, 'first', 'shop/production');
               SELECT flagship.issue_api_key('{org}', 'ci', '{{features:read}}');"#
        ))
        .unwrap();
    org
}

fn answers(client: &mut Client) -> String {
    text(
        client,
        "SELECT string_agg(flagship.flagship_evaluate(f, jsonb_build_object('targeting_key', 'u-' || i), \
             'shop/production')::text, ';' ORDER BY f, i) \
           || flagship.check_usage_limit('acme', 'calls', 1, 'shop/production')::text \
           || flagship.export_project('shop')::text \
         FROM generate_series(1, 50) i, unnest(ARRAY['base', 'exp']) f",
    )
}

/// Every row of the given tables, as text.
/// Every row of the given tables, reading only the given columns, so that
/// columns an upgrade adds do not hide whether the old ones kept their data.
fn rows(client: &mut Client, tables: &[(String, String)]) -> String {
    tables
        .iter()
        .map(|(table, columns)| {
            let rows = text(
                client,
                &format!(
                    "SELECT string_agg(r::text, E'\\n' ORDER BY r::text) \
                       FROM (SELECT {columns} FROM flagship.{table}) r"
                ),
            );
            format!("{table}:\n{rows}\n")
        })
        .collect()
}

/// Each table of the schema with its columns, in order.
fn tables(client: &mut Client) -> Vec<(String, String)> {
    client
        .query(
            "SELECT c.relname::text, string_agg(quote_ident(a.attname), ', ' ORDER BY a.attnum)
               FROM pg_class c JOIN pg_attribute a ON a.attrelid = c.oid
              WHERE c.relnamespace = 'flagship'::regnamespace AND c.relkind = 'r'
                AND a.attnum > 0 AND NOT a.attisdropped
              GROUP BY c.relname ORDER BY 1",
            &[],
        )
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect()
}

#[test]
fn upgrades_keep_data_and_match_a_fresh_install() {
    let mut su = connect();
    install_archived_versions(&mut su);
    let (fresh_name, mut fresh) = database(&mut su, "fresh");
    fresh.batch_execute("CREATE EXTENSION flagship").unwrap();
    let expected = catalog(&mut fresh);

    for version in RELEASED {
        let (name, mut old) = database(&mut su, "upgraded");
        old.batch_execute(&format!("CREATE EXTENSION flagship VERSION '{version}'"))
            .unwrap();
        let org = populate(&mut old);
        // 0.3.0 re-hashes audit chains into their content-digest form on
        // purpose: the old hashes are compared with legacy_hash instead.
        let old_tables: Vec<(String, String)> = tables(&mut old)
            .into_iter()
            .map(|(table, columns)| {
                let kept = columns
                    .split(", ")
                    .filter(|column| {
                        !matches!(
                            (table.as_str(), *column),
                            ("audit_events", "hash") | ("audit_chain_heads", "last_hash")
                        )
                    })
                    .collect::<Vec<_>>()
                    .join(", ");
                (table, kept)
            })
            .collect();
        let rows_before = rows(&mut old, &old_tables);
        let answers_before = answers(&mut old);
        let hashes = "SELECT coalesce(string_agg(chain_seq || ':' || encode({column}, 'hex'), ',' \
                        ORDER BY organization_id, chain_seq), '') FROM flagship.audit_events";
        let audited = text(
            &mut old,
            "SELECT (to_regclass('flagship.audit_events') IS NOT NULL)::text",
        ) == "true";
        let hashes_before = if audited {
            text(&mut old, &hashes.replace("{column}", "hash"))
        } else {
            String::new()
        };
        let anchor = if audited {
            text(
                &mut old,
                &format!(
                    "SELECT jsonb_build_object('seq', last_seq, 'hash', encode(last_hash, 'hex'))::text \
                       FROM flagship.audit_chain_heads WHERE organization_id = '{org}'"
                ),
            )
        } else {
            String::new()
        };

        old.batch_execute("ALTER EXTENSION flagship UPDATE")
            .unwrap();
        assert_eq!(
            text(
                &mut old,
                "SELECT extversion FROM pg_extension WHERE extname = 'flagship'"
            ),
            env!("CARGO_PKG_VERSION")
        );
        // The one row change an upgrade makes on purpose: 0.3.0's event
        // store adds the API key scopes events:read and events:write.
        let rows_after: String = rows(&mut old, &old_tables)
            .lines()
            .filter(|line| !line.starts_with("(events:"))
            .map(|line| format!("{line}\n"))
            .collect();
        assert_eq!(rows_after, rows_before, "from {version}");
        assert_eq!(answers(&mut old), answers_before, "from {version}");
        if !hashes_before.is_empty() {
            assert_eq!(
                text(&mut old, &hashes.replace("{column}", "legacy_hash")),
                hashes_before,
                "from {version}"
            );
            // The re-hashed chain verifies, and an anchor from before the
            // upgrade still matches.
            assert_eq!(
                text(
                    &mut old,
                    &format!("SELECT flagship.verify_audit_chain('{org}', '{anchor}')::text")
                ),
                format!(
                    r#"{{"valid": true, "checked": {}, "first_broken_id": null}}"#,
                    hashes_before.split(',').count()
                ),
                "from {version}"
            );
        }

        let upgraded = catalog(&mut old);
        let missing: Vec<_> = expected.difference(&upgraded).collect();
        let extra: Vec<_> = upgraded.difference(&expected).collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "upgrade from {version} differs from a fresh install:\nmissing {missing:#?}\nextra {extra:#?}"
        );

        // What the new version adds works on the old data: changes are audited.
        old.batch_execute(
            r#"SELECT flagship.put_flag('shop', '{"key": "base", "name": "Base", "environments": {"production": {"enabled": true}}}')"#,
        )
        .unwrap();
        let chain = text(
            &mut old,
            &format!("SELECT flagship.verify_audit_chain('{org}') ->> 'valid'"),
        );
        assert_eq!(chain, "true", "from {version}");
        drop(old);
        su.batch_execute(&format!("DROP DATABASE {name}")).unwrap();
    }
    drop(fresh);
    su.batch_execute(&format!("DROP DATABASE {fresh_name}"))
        .unwrap();
}
