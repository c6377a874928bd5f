//! FlagShip distributed over the cluster (`flagship.distribute()`), in a
//! database of its own on every node (Citus keeps its metadata per
//! database): every tenant table hash-distributed by organization, each
//! organization's rows in one shard group on one node, where FlagShip
//! answers as on one server; any other node refuses, naming that node.

use std::sync::OnceLock;

use postgres::Client;

use super::{count, failure, login_role, ports, text, unique, NORDIC};

const DATABASE: &str = "flagship_distributed";

fn connect(port: u16, user: &str) -> Client {
    super::connect_to_database(port, user, DATABASE)
}

/// The database, distributed once per run; and an organization made
/// before `distribute()`, as an installation that grew out of one server
/// has: (id, usage it recorded).
fn distributed() -> &'static (String, String) {
    static READY: OnceLock<(String, String)> = OnceLock::new();
    READY.get_or_init(|| {
        for port in ports() {
            let mut server = super::connect_to_database(port, "postgres", "postgres");
            server
                .batch_execute(&format!("DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)"))
                .unwrap();
            server
                .batch_execute(&format!("CREATE DATABASE {DATABASE}"))
                .unwrap();
            connect(port, "postgres")
                .batch_execute("CREATE EXTENSION citus")
                .unwrap();
        }
        let mut coordinator = connect(ports()[0], "postgres");
        coordinator
            .batch_execute(&format!(
                "SELECT citus_set_coordinator_host('127.0.0.1', {})",
                ports()[0]
            ))
            .unwrap();
        for port in &ports()[1..] {
            coordinator
                .batch_execute(&format!("SELECT citus_add_node('127.0.0.1', {port})"))
                .unwrap();
        }
        coordinator
            .batch_execute("CREATE EXTENSION flagship")
            .unwrap();
        let (before, _) = super::organization(&mut coordinator);
        acme_on_pro(&mut coordinator);
        coordinator
            .batch_execute(
                "SELECT flagship.record_usage('acme', 'calls', 7, 'before', 'shop/production');",
            )
            .unwrap();
        let answer = text(&mut coordinator, "SELECT flagship.distribute()::text");
        assert_eq!(
            answer,
            r#"{"workers": 2, "reference": 2, "distributed": 30}"#
        );
        (before, "7".to_string())
    })
}

/// The metric `calls`, the plan `pro` (100 calls a month) and its customer
/// `acme`, in the session's organization.
fn acme_on_pro(client: &mut Client) {
    client
        .batch_execute(
            r#"SELECT flagship.put_metric('shop', '{"key": "calls"}');
               SELECT flagship.put_plan('shop', '{"key": "pro", "limits": {"calls": {"limit": 100, "period": "month"}}}');
               SELECT flagship.put_customer('shop/production', '{"key": "acme", "plan": "pro"}');"#,
        )
        .unwrap();
}

/// The port of the node holding `organization`'s shards.
fn node_of(organization: &str) -> u16 {
    let mut coordinator = connect(ports()[0], "postgres");
    let port: i32 = coordinator
        .query_one(
            &format!("SELECT port FROM flagship.organization_node('{organization}')"),
            &[],
        )
        .unwrap()
        .get(0);
    u16::try_from(port).unwrap()
}

/// A session on `port` as `user`, acting for `organization`.
fn session(port: u16, user: &str, organization: &str) -> Client {
    let mut client = connect(port, user);
    client
        .batch_execute(&format!("SET flagship.organization_id = '{organization}'"))
        .unwrap();
    client
}

/// A new organization, made through the coordinator after distributing,
/// with the project `shop` and the flag `nordic` (set up on its own node):
/// its id and that node's port.
fn new_organization() -> (String, u16) {
    distributed();
    let slug = unique("dist").replace('_', "-");
    let mut coordinator = connect(ports()[0], "postgres");
    let id = text(
        &mut coordinator,
        &format!("SELECT flagship.create_organization('{slug}', '{slug}')::text"),
    );
    let port = node_of(&id);
    session(port, "postgres", &id)
        .batch_execute(&format!(
            "SELECT flagship.create_project('{id}', 'shop', 'Shop');
             SELECT flagship.put_flag('shop', $doc${NORDIC}$doc$);"
        ))
        .unwrap();
    (id, port)
}

/// A node that does not hold `port`'s shard group.
fn elsewhere(port: u16) -> u16 {
    *ports().iter().find(|other| **other != port).unwrap()
}

fn nordic(client: &mut Client, country: &str) -> String {
    text(
        client,
        &format!(
            "SELECT flagship.flagship_evaluate('nordic', '{{\"country\": \"{country}\"}}', \
             'shop/production')::text"
        ),
    )
}

fn variant(client: &mut Client, country: &str) -> String {
    let answer: serde_json::Value = serde_json::from_str(&nordic(client, country)).unwrap();
    answer["variant"].as_str().unwrap_or("").to_string()
}

/// Runs each statement on its own: Citus mishandles a transaction block
/// sent as one multi-statement query.
fn run_each(client: &mut Client, statements: &[&str]) {
    for statement in statements {
        client.batch_execute(statement).unwrap();
    }
}

/// `sql` fails with FlagShip's refusal away from the organization's node,
/// which names that node.
fn assert_refused_away(client: &mut Client, sql: &str, holder: u16) {
    let (code, message) = failure(client, sql);
    assert_eq!(code, "0A000", "{sql}: {message}");
    assert!(
        message.contains(&format!(
            "is on the node 127.0.0.1:{holder}, not on this one"
        )),
        "{sql}: {message}"
    );
}

#[test]
#[ignore = "needs the Citus cluster (scripts/test starts it)"]
fn an_organization_made_before_distributing_answers_the_same_on_its_node() {
    let (id, used) = distributed();
    let mut app = session(node_of(id), "postgres", id);
    assert_eq!(variant(&mut app, "NO"), "on");
    assert_eq!(variant(&mut app, "DK"), "off");
    let limit: serde_json::Value = serde_json::from_str(&text(
        &mut app,
        "SELECT flagship.check_usage_limit('acme', 'calls', 1, 'shop/production')::text",
    ))
    .unwrap();
    assert_eq!(limit["used"].to_string(), *used);
    assert_eq!(limit["limit"], 100);
    assert_eq!(limit["allowed"], true);
    // The idempotency key came along: the retry replays.
    assert_eq!(
        text(
            &mut app,
            "SELECT flagship.record_usage('acme', 'calls', 7, 'before', 'shop/production') ->> 'replayed'"
        ),
        "true"
    );
    assert_eq!(
        text(
            &mut app,
            &format!("SELECT flagship.verify_audit_chain('{id}')::text")
        ),
        format!(
            r#"{{"valid": true, "checked": {}, "first_broken_id": null}}"#,
            count(
                &mut app,
                &format!(
                    "SELECT count(*) FROM flagship.audit_events WHERE organization_id = '{id}'"
                )
            )
        )
    );
}

/// Two sessions on the organization's node: the writer's change is seen by
/// the reader's next statement, a rolled-back one never. A session on
/// another node is refused, naming the node, even with the organization
/// sent along (its compiled copy would never hear of a change); a
/// configuration change sent from there lands on the organization's node.
#[test]
#[ignore = "needs the Citus cluster (scripts/test starts it)"]
fn a_change_is_seen_by_the_next_statement_and_other_nodes_are_refused() {
    let (id, port) = new_organization();
    let mut reader = session(port, "postgres", &id);
    let mut writer = session(port, "postgres", &id);
    assert_eq!(variant(&mut reader, "NO"), "on");
    writer
        .batch_execute(
            r#"SELECT flagship.put_flag('shop', '{"key": "nordic", "environments": {"production": {"enabled": false}}}')"#,
        )
        .unwrap();
    assert_eq!(variant(&mut reader, "NO"), "off");
    writer
        .batch_execute(&format!(
            "BEGIN; SELECT flagship.put_flag('shop', $doc${NORDIC}$doc$); ROLLBACK;"
        ))
        .unwrap();
    assert_eq!(variant(&mut reader, "NO"), "off");

    let mut away = session(elsewhere(port), "postgres", &id);
    for call in [
        "SELECT flagship.flagship_evaluate('nordic', '{}', 'shop/production')",
        "SELECT flagship.record_usage('acme', 'calls', 1, NULL, 'shop/production')",
        "SELECT flagship.has_permission('nobody', 'features:write')",
        "SELECT flagship.rate_limit('acme', 'requests', 1, 'shop/production')",
    ] {
        assert_refused_away(&mut away, call, port);
    }
    run_each(
        &mut away,
        &[
            "SET citus.propagate_set_commands = 'local'",
            "BEGIN",
            &format!("SET LOCAL flagship.organization_id = '{id}'"),
        ],
    );
    assert_refused_away(
        &mut away,
        "SELECT flagship.flagship_evaluate('nordic', '{}', 'shop/production')",
        port,
    );
    away.batch_execute("ROLLBACK").unwrap();
    run_each(
        &mut away,
        &[
            "BEGIN",
            &format!("SET LOCAL flagship.organization_id = '{id}'"),
            &format!("SELECT flagship.put_flag('shop', $doc${NORDIC}$doc$)"),
            "COMMIT",
        ],
    );
    assert_eq!(variant(&mut reader, "NO"), "on");
}

#[test]
#[ignore = "needs the Citus cluster (scripts/test starts it)"]
fn eight_sessions_on_the_organizations_node_are_granted_exactly_the_limit() {
    let (id, port) = new_organization();
    let mut metering = session(port, "postgres", &id);
    acme_on_pro(&mut metering);
    let sessions: Vec<_> = (0..8)
        .map(|_| {
            let id = id.clone();
            std::thread::spawn(move || {
                let mut client = session(port, "postgres", &id);
                (0..30)
                    .filter(|_| {
                        text(
                            &mut client,
                            "SELECT flagship.record_usage('acme', 'calls', 1, NULL, 'shop/production') ->> 'allowed'",
                        ) == "true"
                    })
                    .count()
            })
        })
        .collect();
    let granted: usize = sessions.into_iter().map(|s| s.join().unwrap()).sum();
    assert_eq!(granted, 100);
    let mut check = session(port, "postgres", &id);
    assert_eq!(
        text(
            &mut check,
            "SELECT flagship.check_usage_limit('acme', 'calls', 1, 'shop/production') ->> 'used'"
        ),
        "100"
    );
    assert_eq!(
        count(
            &mut check,
            &format!(
                "SELECT count(*) FROM flagship.usage_ledger WHERE organization_id = '{id}' AND kind = 'record'"
            )
        ),
        100
    );
}

/// Two organizations whose shards are on different workers, with rows in
/// every tenant table: each one's admin login, on its own node, reads all
/// of its rows and none of the other's; a read that does not carry the
/// organization reads nothing (the sessions Citus opens on the nodes have
/// no organization); a role with no FlagShip role reads nothing at all.
#[test]
#[ignore = "needs the Citus cluster (scripts/test starts it)"]
fn organizations_on_different_workers_see_only_their_own_rows() {
    distributed();
    // Made until two land on different workers (hash placement).
    let mut placed: Vec<(String, u16)> = Vec::new();
    for _ in 0..40 {
        let (id, port) = new_organization();
        if port != ports()[0] && placed.iter().all(|(_, other)| *other != port) {
            placed.push((id, port));
        }
        if placed.len() == 2 {
            break;
        }
    }
    assert_eq!(placed.len(), 2, "two organizations on different workers");
    for (id, port) in &placed {
        super::populate(&mut session(*port, "postgres", id), id);
    }
    let mut coordinator = connect(ports()[0], "postgres");
    let tables: Vec<String> = coordinator
        .query(include_str!("../fixtures/tenant_tables.sql"), &[])
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(tables.len(), 30);
    let admin = login_role(&mut coordinator, "dist_admin", Some("flagship_admin"));
    let outsider = login_role(&mut coordinator, "dist_outsider", None);
    for (own, port) in &placed {
        let other = &placed.iter().find(|(id, _)| id != own).unwrap().0;
        let mut superuser = connect(*port, "postgres");
        let mut reader = session(*port, &admin, own);
        reader
            .batch_execute("SET flagship.actor = 'alice'")
            .unwrap();
        for table in &tables {
            let column = if table == "organizations" {
                "id"
            } else {
                "organization_id"
            };
            let stored = |client: &mut Client, organization: &str| {
                count(
                    client,
                    &format!(
                        "SELECT count(*) FROM flagship.{table} WHERE {column} = '{organization}'"
                    ),
                )
            };
            let own_rows = stored(&mut superuser, own);
            assert!(own_rows > 0, "{table}: the fixture left no row");
            assert_eq!(stored(&mut reader, own), own_rows, "{table}");
            assert_eq!(
                stored(&mut reader, other),
                0,
                "{table}: another organization's rows"
            );
            // Citus reads the shards over connections of its own, whose
            // sessions have no organization: nothing (or, run locally in
            // this session, its own rows), never another's.
            let unnamed = count(
                &mut reader,
                &format!("SELECT count(*) FROM flagship.{table}"),
            );
            assert!(
                unnamed == 0 || unnamed == own_rows,
                "{table}: a read without the organization gave {unnamed} rows"
            );
            let mut nobody = connect(*port, &outsider);
            assert_eq!(
                failure(
                    &mut nobody,
                    &format!("SELECT count(*) FROM flagship.{table}")
                )
                .0,
                "42501",
                "{table}"
            );
        }
        // With the organization sent along (SET LOCAL), every node reads
        // its rows, and only its rows.
        for node in ports() {
            let mut anywhere = connect(node, &admin);
            run_each(
                &mut anywhere,
                &[
                    "SET citus.propagate_set_commands = 'local'",
                    "BEGIN",
                    &format!("SET LOCAL flagship.organization_id = '{own}'"),
                ],
            );
            assert_eq!(
                count(&mut anywhere, "SELECT count(*) FROM flagship.features"),
                count(
                    &mut superuser,
                    &format!(
                        "SELECT count(*) FROM flagship.features WHERE organization_id = '{own}'"
                    )
                ),
                "features read on {node}"
            );
            anywhere.batch_execute("COMMIT").unwrap();
        }
    }
}

#[test]
#[ignore = "needs the Citus cluster (scripts/test starts it)"]
fn api_keys_are_issued_verified_and_revoked_on_the_organizations_node() {
    let (id, port) = new_organization();
    let mut client = session(port, "postgres", &id);
    // Issued by an owner's login, which row-level security binds (the
    // folded policies and the tenant guard of api_keys let it write).
    client
        .batch_execute(&format!(
            "INSERT INTO flagship.members (organization_id, user_key) VALUES ('{id}', 'alice');
             INSERT INTO flagship.member_roles (organization_id, member_id, role_id)
             SELECT m.organization_id, m.id, r.id FROM flagship.members m
               JOIN flagship.roles r ON r.organization_id = m.organization_id AND r.key = 'owner'
              WHERE m.organization_id = '{id}' AND m.user_key = 'alice';"
        ))
        .unwrap();
    let mut coordinator = connect(ports()[0], "postgres");
    let admin = login_role(&mut coordinator, "dist_keys", Some("flagship_admin"));
    let mut owner = session(port, &admin, &id);
    owner.batch_execute("SET flagship.actor = 'alice'").unwrap();
    let key = text(
        &mut owner,
        &format!("SELECT flagship.issue_api_key('{id}', 'ci', '{{features:read}}')"),
    );
    let verified = |client: &mut Client| -> serde_json::Value {
        serde_json::from_str(&text(
            client,
            &format!("SELECT flagship.verify_api_key('{key}')::text"),
        ))
        .unwrap()
    };
    let valid = verified(&mut client);
    assert_eq!(valid["valid"], true);
    assert_eq!(valid["code"], "VALID");
    assert_eq!(valid["organization_id"], id.as_str());
    assert_eq!(valid["scopes"], serde_json::json!(["features:read"]));
    // Verified on any node (the key's hash is looked up on every shard),
    // so that an application learns where the key's organization is.
    assert_eq!(verified(&mut connect(elsewhere(port), "postgres")), valid);
    // Key mode on the organization's node.
    run_each(
        &mut client,
        &[
            "RESET flagship.organization_id",
            "BEGIN",
            &format!("SELECT flagship.authenticate('{key}')"),
        ],
    );
    assert_eq!(variant(&mut client, "SE"), "on");
    client.batch_execute("COMMIT").unwrap();
    client
        .batch_execute(&format!("SET flagship.organization_id = '{id}'"))
        .unwrap();
    client
        .batch_execute(&format!(
            "SELECT flagship.revoke_api_key('{}')",
            valid["key_id"].as_str().unwrap()
        ))
        .unwrap();
    let revoked = verified(&mut client);
    assert_eq!(revoked["valid"], false);
    assert_eq!(revoked["code"], "REVOKED");
}

#[test]
#[ignore = "needs the Citus cluster (scripts/test starts it)"]
fn the_audit_chain_stays_valid_after_concurrent_writes_on_the_organizations_node() {
    let (id, port) = new_organization();
    let writers: Vec<_> = (0..4)
        .map(|writer| {
            let id = id.clone();
            std::thread::spawn(move || {
                let mut client = session(port, "postgres", &id);
                for round in 0..10 {
                    client
                        .batch_execute(&format!(
                            r#"SELECT flagship.put_flag('shop', '{{"key": "w{writer}", "environments": {{"production": {{"enabled": {}}}}}}}')"#,
                            round % 2 == 0
                        ))
                        .unwrap();
                }
            })
        })
        .collect();
    for writer in writers {
        writer.join().unwrap();
    }
    let mut client = session(port, "postgres", &id);
    let events = count(
        &mut client,
        &format!("SELECT count(*) FROM flagship.audit_events WHERE organization_id = '{id}'"),
    );
    assert_eq!(
        text(
            &mut client,
            &format!("SELECT flagship.verify_audit_chain('{id}')::text")
        ),
        format!(r#"{{"valid": true, "checked": {events}, "first_broken_id": null}}"#)
    );
    // And the change feed reads the organization's changes in order.
    assert_eq!(
        count(
            &mut client,
            "SELECT count(*) FROM flagship.changes_since(0) WHERE kind = 'flag'"
        ),
        count(
            &mut client,
            &format!(
                "SELECT count(*) FROM flagship.audit_events WHERE organization_id = '{id}' AND change_kind = 'flag'"
            )
        )
    );
}

#[test]
#[ignore = "needs the Citus cluster (scripts/test starts it)"]
fn a_project_exported_and_imported_on_the_organizations_node_evaluates_the_same() {
    let (id, port) = new_organization();
    let mut client = session(port, "postgres", &id);
    acme_on_pro(&mut client);
    let exported = text(&mut client, "SELECT flagship.export_project('shop')::text");
    client
        .batch_execute(&format!(
            "SELECT flagship.import_project('{id}', jsonb_set($doc${exported}$doc$::jsonb, '{{project,key}}', '\"copy\"'))"
        ))
        .unwrap();
    let copy = text(&mut client, "SELECT flagship.export_project('copy')::text");
    let mut original: serde_json::Value = serde_json::from_str(&exported).unwrap();
    original["project"]["key"] = "copy".into();
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&copy).unwrap(),
        original
    );
    assert_eq!(
        text(
            &mut client,
            "SELECT flagship.flagship_evaluate('nordic', '{\"country\": \"NO\"}', 'copy/production') ->> 'variant'"
        ),
        "on"
    );
}

/// `pg_dump` of the coordinator reads the distributed tables through it:
/// restored into a new database (one server: no Citus metadata comes
/// along), every organization answers as before, wherever its shards were.
#[test]
#[ignore = "needs the Citus cluster (scripts/test starts it)"]
fn pg_dump_of_the_coordinator_restores_a_distributed_flagship_on_one_server() {
    let (before, used) = distributed();
    let (id, port) = new_organization();
    let mut metering = session(port, "postgres", &id);
    acme_on_pro(&mut metering);
    metering
        .batch_execute(
            "SELECT flagship.record_usage('acme', 'calls', 3, 'dump-1', 'shop/production');",
        )
        .unwrap();
    let mut coordinator = connect(ports()[0], "postgres");
    let target = super::dump_and_restore(&mut coordinator, DATABASE, &[]);
    let mut restored = super::connect_to_database(ports()[0], "postgres", &target);
    for (organization, recorded) in [(before.as_str(), used.as_str()), (id.as_str(), "3")] {
        restored
            .batch_execute(&format!("SET flagship.organization_id = '{organization}'"))
            .unwrap();
        assert_eq!(variant(&mut restored, "NO"), "on");
        assert_eq!(variant(&mut restored, "DK"), "off");
        assert_eq!(
            text(
                &mut restored,
                "SELECT flagship.check_usage_limit('acme', 'calls', 1, 'shop/production') ->> 'used'"
            ),
            recorded
        );
        assert_eq!(
            text(
                &mut restored,
                &format!("SELECT flagship.verify_audit_chain('{organization}') ->> 'valid'")
            ),
            "true"
        );
    }
    assert_eq!(
        count(
            &mut restored,
            "SELECT count(*) FROM pg_dist_partition WHERE logicalrelid::text LIKE 'flagship.%'"
        ),
        0
    );
    drop(restored);
    coordinator
        .batch_execute(&format!("DROP DATABASE {target} WITH (FORCE)"))
        .unwrap();
}

/// Found by the probe: Citus 13.2.2 copies a restrictive policy to the
/// shards as a permissive one, so flagship_app could UPDATE
/// usage_counters directly (2 rows changed) once distributed. With the
/// restrictions folded into one permissive policy per command, only
/// FlagShip's functions write usage, and the trail's guards still fire
/// under session_replication_role = replica.
#[test]
#[ignore = "needs the Citus cluster (scripts/test starts it)"]
fn only_flagships_functions_write_usage_on_the_shards() {
    let (id, port) = new_organization();
    let mut metering = session(port, "postgres", &id);
    acme_on_pro(&mut metering);
    let mut coordinator = connect(ports()[0], "postgres");
    let app = login_role(&mut coordinator, "dist_app", Some("flagship_app"));
    let mut client = session(port, &app, &id);
    assert_eq!(
        text(
            &mut client,
            "SELECT flagship.record_usage('acme', 'calls', 2, NULL, 'shop/production') ->> 'used'"
        ),
        "2"
    );
    // Granted for record_usage, which runs as its caller; the policy lets
    // no other UPDATE change a row.
    assert_eq!(
        count(
            &mut client,
            &format!(
                "WITH w AS (UPDATE flagship.usage_counters SET used = 0 \
                             WHERE organization_id = '{id}' RETURNING 1) SELECT count(*) FROM w"
            )
        ),
        0
    );
    // Pushed down to the shard, and pulled through the coordinator (LIMIT),
    // whose rows Citus copies in without row-level security.
    for limit in ["", " LIMIT 1"] {
        let (code, message) = failure(
            &mut client,
            &format!(
                "INSERT INTO flagship.usage_ledger (organization_id, customer_id, metric_id, kind, amount, used_after, enforcement)
                 SELECT organization_id, customer_id, metric_id, 'record', -2, 0, 'hard'
                   FROM flagship.usage_counters WHERE organization_id = '{id}'{limit}"
            ),
        );
        assert_eq!(code, "42501", "{limit}: {message}");
    }
    assert_eq!(
        text(
            &mut client,
            "SELECT flagship.check_usage_limit('acme', 'calls', 1, 'shop/production') ->> 'used'"
        ),
        "2"
    );
    let mut superuser = session(port, "postgres", &id);
    superuser
        .batch_execute("SET session_replication_role = replica")
        .unwrap();
    let (code, message) = failure(
        &mut superuser,
        &format!("UPDATE flagship.audit_events SET actor = 'x' WHERE organization_id = '{id}'"),
    );
    assert_eq!(code, "42501", "{message}");
}

/// Found by the probe: Citus writes the rows of an INSERT ... SELECT it
/// pulls through the coordinator (and of a COPY) into a shard on the same
/// node without checking row-level security, so an admin of one
/// organization wrote a segment into another whose shards share the node
/// (`INSERT 0 1`). The tenant guard distribute() adds refuses it; into a
/// shard on another node Citus's COPY refuses the table itself.
#[test]
#[ignore = "needs the Citus cluster (scripts/test starts it)"]
fn an_insert_select_into_another_organization_on_the_same_node_is_refused() {
    let (own, port) = new_organization();
    let mut other = None;
    for _ in 0..40 {
        let (id, other_port) = new_organization();
        if other_port == port {
            other = Some(id);
            break;
        }
    }
    let other = other.expect("two organizations on one node");
    let mut coordinator = connect(ports()[0], "postgres");
    let admin = login_role(&mut coordinator, "dist_intruder", Some("flagship_admin"));
    // An owner of its own organization (alice), intruding on the other.
    session(port, "postgres", &own)
        .batch_execute(&format!(
            "INSERT INTO flagship.members (organization_id, user_key) VALUES ('{own}', 'alice');
             INSERT INTO flagship.member_roles (organization_id, member_id, role_id)
             SELECT m.organization_id, m.id, r.id FROM flagship.members m
               JOIN flagship.roles r ON r.organization_id = m.organization_id AND r.key = 'owner'
              WHERE m.organization_id = '{own}' AND m.user_key = 'alice';"
        ))
        .unwrap();
    let mut intruder = session(port, &admin, &own);
    intruder
        .batch_execute("SET flagship.actor = 'alice'")
        .unwrap();
    let project = text(
        &mut connect(port, "postgres"),
        &format!("SELECT id::text FROM flagship.projects WHERE organization_id = '{other}'"),
    );
    let (code, message) = failure(
        &mut intruder,
        &format!(
            "INSERT INTO flagship.segments (organization_id, project_id, key)
             SELECT '{other}', '{project}', 'intruder' FROM (VALUES (1)) v"
        ),
    );
    assert_eq!(code, "42501", "{message}");
    // Selected from the other's rows, it finds none to copy.
    intruder
        .batch_execute(&format!(
            "INSERT INTO flagship.segments (organization_id, project_id, key)
             SELECT p.organization_id, p.id, 'intruder' FROM flagship.projects p
              WHERE p.organization_id = '{other}'"
        ))
        .unwrap();
    assert_eq!(
        count(
            &mut connect(port, "postgres"),
            &format!("SELECT count(*) FROM flagship.segments WHERE organization_id = '{other}' AND key = 'intruder'")
        ),
        0
    );
    // Its own rows it still writes that way.
    intruder
        .batch_execute(&format!(
            "INSERT INTO flagship.segments (organization_id, project_id, key)
             SELECT organization_id, id, 'copied' FROM flagship.projects WHERE organization_id = '{own}'"
        ))
        .unwrap();
}

/// Found by a review of the guard above: it checked only the row's
/// organization, so a member could write, through the same copy path,
/// what its organization's policies refuse it (a viewer giving itself the
/// owner role). The guard now evaluates the table's policy write checks on
/// the new row; through a statement Citus pushes down, row-level security
/// refuses it as on one server.
#[test]
#[ignore = "needs the Citus cluster (scripts/test starts it)"]
fn a_viewer_cannot_give_itself_a_role_through_either_path() {
    let (id, port) = new_organization();
    let mut owner = session(port, "postgres", &id);
    owner
        .batch_execute(&format!(
            "INSERT INTO flagship.members (organization_id, user_key) VALUES ('{id}', 'vic');
             INSERT INTO flagship.member_roles (organization_id, member_id, role_id)
             SELECT m.organization_id, m.id, r.id FROM flagship.members m
               JOIN flagship.roles r ON r.organization_id = m.organization_id AND r.key = 'viewer'
              WHERE m.organization_id = '{id}' AND m.user_key = 'vic';"
        ))
        .unwrap();
    let mut coordinator = connect(ports()[0], "postgres");
    let admin = login_role(&mut coordinator, "dist_viewer", Some("flagship_admin"));
    let mut viewer = session(port, &admin, &id);
    viewer.batch_execute("SET flagship.actor = 'vic'").unwrap();
    let escalate = |from: &str| {
        format!(
            "INSERT INTO flagship.member_roles (organization_id, member_id, role_id)
             SELECT '{id}', m.id, r.id FROM {from}
               JOIN flagship.members m ON m.organization_id = '{id}' AND m.user_key = 'vic'
               JOIN flagship.roles r ON r.organization_id = '{id}' AND r.key = 'owner'"
        )
    };
    // Pulled through intermediate results (VALUES): Citus's copy path.
    let (code, message) = failure(&mut viewer, &escalate("(VALUES (1)) v"));
    assert_eq!(code, "42501", "{message}");
    assert!(message.contains("member_roles"), "{message}");
    assert_eq!(
        count(
            &mut owner,
            &format!(
                "SELECT count(*) FROM flagship.member_roles mr JOIN flagship.roles r
                   ON r.organization_id = mr.organization_id AND r.id = mr.role_id
                  JOIN flagship.members m ON m.organization_id = mr.organization_id AND m.id = mr.member_id
                 WHERE mr.organization_id = '{id}' AND m.user_key = 'vic' AND r.key = 'owner'"
            )
        ),
        0
    );
}

/// Two organizations whose shards share a node: there row-level security
/// decides in the session's own backend (across nodes, Citus's connections
/// carry no organization and answer nothing anyway).
#[test]
#[ignore = "needs the Citus cluster (scripts/test starts it)"]
fn organizations_on_one_node_read_only_their_own_rows() {
    let (own, port) = new_organization();
    let mut other = None;
    for _ in 0..40 {
        let (id, other_port) = new_organization();
        if other_port == port {
            other = Some(id);
            break;
        }
    }
    let other = other.expect("two organizations on one node");
    let mut coordinator = connect(ports()[0], "postgres");
    let admin = login_role(&mut coordinator, "dist_neighbour", Some("flagship_admin"));
    let mut reader = session(port, &admin, &own);
    for table in [
        "organizations",
        "projects",
        "environments",
        "features",
        "feature_rules",
    ] {
        let column = if table == "organizations" {
            "id"
        } else {
            "organization_id"
        };
        let rows = |client: &mut Client, organization: &str| {
            count(
                client,
                &format!("SELECT count(*) FROM flagship.{table} WHERE {column} = '{organization}'"),
            )
        };
        let stored = rows(&mut connect(port, "postgres"), &own);
        assert!(stored > 0, "{table}");
        assert_eq!(rows(&mut reader, &own), stored, "{table}");
        assert_eq!(
            rows(&mut reader, &other),
            0,
            "{table}: the neighbour's rows"
        );
    }
}
