//! Erasing a person (#19, DESIGN.md section 8): erase_subject replaces
//! their personal data in the session's organization, and the audit chain
//! still verifies, with anchors taken before the erasure too.

use postgres::Client;
use serde_json::json;

use crate::harness::{add_member, answer, connect, login_as, organization, sqlstate, text};

const BEA: &str = "bea@acme.example";

/// An organization where bea is a member who changed things, a customer
/// with personal attributes, and the subject of events; carl likewise,
/// and must stay. Returns the organization and an owner's session (olga).
fn setup(su: &mut Client, prefix: &str) -> (String, Client) {
    let (org, _) = organization(su, prefix);
    add_member(su, &org, "olga@acme.example", "owner");
    add_member(su, &org, BEA, "admin");
    add_member(su, &org, "carl@acme.example", "admin");
    let (_, mut admin) = login_as(su, prefix, &["flagship_admin"]);
    for person in [BEA, "carl@acme.example"] {
        let short = person.split('@').next().unwrap();
        admin
            .batch_execute(&format!(
                r#"SET flagship.organization_id = '{org}'; SET flagship.actor = '{person}';
                   SELECT flagship.put_flag('shop', '{{"key": "by-{short}"}}');
                   SELECT flagship.put_customer('shop/production',
                       '{{"key": "{person}", "name": "Person {person}",
                          "attributes": {{"email": "{person}", "city": "Oslo"}}}}');
                   SELECT flagship.put_customer('shop/production',
                       '{{"key": "{person}", "name": "Person {person}",
                          "attributes": {{"email": "{person}", "city": "Bergen"}}}}');
                   SELECT flagship.append_events(
                       '[{{"type": "Signed", "tags": ["subject:{person}", "plan:pro"],
                          "data": {{"email": "{person}"}}, "metadata": {{"ip": "203.0.113.9"}}}}]');"#
            ))
            .unwrap();
    }
    admin
        .batch_execute("SET flagship.actor = 'olga@acme.example'")
        .unwrap();
    (org, admin)
}

/// The tables of the organization whose rows still mention `person`, in
/// any column: every table of the schema with an organization_id.
fn mentions(su: &mut Client, org: &str, person: &str) -> String {
    let tables = crate::harness::tenant_tables(su);
    assert!(tables.len() > 25, "{tables:?}");
    tables
        .iter()
        .filter_map(|table| {
            let count = text(
                su,
                &format!(
                    "SELECT count(*)::text FROM flagship.{table} t
                      WHERE t.organization_id = '{org}' AND strpos(t::text, '{person}') > 0"
                ),
            );
            (count != "0").then(|| format!("{table}:{count}"))
        })
        .collect::<Vec<_>>()
        .join(",")
}

#[test]
fn erasing_a_person_leaves_no_trace_and_the_chain_verifies() {
    let mut su = connect();
    let (org, mut owner) = setup(&mut su, "erase");
    // The same person in another organization stays.
    let (other, _) = setup(&mut su, "erase-other");
    su.batch_execute("SET flagship.audit_maintenance = off")
        .unwrap();
    su.batch_execute(&format!(
        "UPDATE flagship.members SET name = 'Bea Example' WHERE organization_id = '{org}' AND user_key = '{BEA}'"
    ))
    .unwrap();
    let anchor = text(
        &mut su,
        &format!("SELECT flagship.audit_head('{org}')::text"),
    );
    assert!(mentions(&mut su, &org, BEA).contains("audit_events:"));

    let erased = answer(&mut owner, &format!("flagship.erase_subject('{BEA}')"));
    let pseudonym = erased["pseudonym"].as_str().unwrap().to_string();
    assert!(pseudonym.starts_with("erased:"), "{erased}");
    let digest = text(
        &mut su,
        &format!("SELECT encode(sha256(convert_to('{org}:{BEA}', 'UTF8')), 'hex')"),
    );
    let audit_events = erased["audit_events"].as_i64().unwrap();
    assert!(audit_events >= 5, "{erased}");
    let erasure_event = erased["erasure_event"].clone();
    assert_eq!(
        erased,
        json!({"subject_digest": digest, "pseudonym": pseudonym, "members": 1, "customers": 1,
               "events": 1, "audit_events": audit_events, "erasure_event": erasure_event})
    );

    let left = text(
        &mut su,
        &format!(
            "SELECT string_agg(concat_ws(' ', chain_seq, resource_type, change_key, actor, erased_by, diff::text), E'\\n')
               FROM flagship.audit_events WHERE organization_id = '{org}'
                AND strpos(diff::text || actor || coalesce(change_key, ''), '{BEA}') > 0"
        ),
    );
    assert_eq!(
        mentions(&mut su, &org, BEA),
        "",
        "nothing names bea any more: {left}"
    );
    assert_eq!(mentions(&mut su, &org, "Bea Example"), "", "nor her name");
    assert_ne!(
        mentions(&mut su, &org, "carl@acme.example"),
        "",
        "carl stays"
    );
    assert_ne!(
        mentions(&mut su, &other, BEA),
        "",
        "another organization's bea stays"
    );
    // The member keeps her roles under the pseudonym; her events and
    // changes are still hers, under it.
    assert_eq!(
        text(
            &mut su,
            &format!(
                "SELECT count(*)::text FROM flagship.audit_events WHERE organization_id = '{org}' AND actor = '{pseudonym}'"
            )
        ),
        text(
            &mut su,
            &format!(
                "SELECT count(*)::text FROM flagship.audit_events WHERE organization_id = '{other}' AND actor = '{BEA}'"
            )
        )
    );
    assert_eq!(
        text(
            &mut su,
            &format!(
                "SELECT tags::text || data::text FROM flagship.events WHERE organization_id = '{org}' \
                   AND tags @> ARRAY['subject:{pseudonym}']"
            )
        ),
        format!("{{subject:{pseudonym},plan:pro}}{{}}")
    );

    // The chain verifies, against the anchor from before too; the erasure
    // is an event of its own, by olga, naming no one.
    assert_eq!(
        answer(
            &mut su,
            &format!("flagship.verify_audit_chain('{org}', '{anchor}')")
        )["valid"],
        json!(true)
    );
    assert_eq!(
        answer(&mut su, &format!("flagship.verify_audit_chain('{org}')"))["valid"],
        json!(true)
    );
    let event = answer(
        &mut su,
        &format!(
            "(SELECT jsonb_build_object('actor', actor, 'action', action, 'resource_type', resource_type,
                                        'subject_digest', diff -> 'subject_digest')
                FROM flagship.audit_events WHERE organization_id = '{org}' AND chain_seq = {erasure_event})"
        ),
    );
    assert_eq!(
        event,
        json!({"actor": "olga@acme.example", "action": "erase", "resource_type": "subject",
               "subject_digest": digest})
    );

    // An erased event's content changed afterwards is caught: the erasure
    // event recorded what it left.
    su.batch_execute(&format!(
        "SET flagship.audit_maintenance = on;
         UPDATE flagship.audit_events SET diff = diff || '{{\"restored\": \"{BEA}\"}}'
          WHERE organization_id = '{org}'
            AND chain_seq = (SELECT min(chain_seq) FROM flagship.audit_events
                              WHERE organization_id = '{org}' AND erased_by IS NOT NULL);
         SET flagship.audit_maintenance = off;"
    ))
    .unwrap();
    assert_eq!(
        answer(&mut su, &format!("flagship.verify_audit_chain('{org}')"))["reason"],
        json!("erased content does not match its erasure event")
    );
    su.batch_execute(&format!(
        "SET flagship.audit_maintenance = on;
         UPDATE flagship.audit_events SET diff = diff - 'restored'
          WHERE organization_id = '{org}' AND diff ? 'restored';
         SET flagship.audit_maintenance = off;"
    ))
    .unwrap();
    assert_eq!(
        answer(&mut su, &format!("flagship.verify_audit_chain('{org}')"))["valid"],
        json!(true)
    );
    // Content changed behind the erasure's back is still caught.
    su.batch_execute(&format!(
        "SET flagship.audit_maintenance = on;
         UPDATE flagship.audit_events SET diff = '{{}}'
          WHERE organization_id = '{org}' AND erased_by IS NULL AND action <> 'erase'
            AND chain_seq = (SELECT min(chain_seq) FROM flagship.audit_events
                              WHERE organization_id = '{org}' AND erased_by IS NULL);
         SET flagship.audit_maintenance = off;"
    ))
    .unwrap();
    assert_eq!(
        answer(&mut su, &format!("flagship.verify_audit_chain('{org}')"))["reason"],
        json!("content does not match its digest")
    );
}

#[test]
fn only_an_owner_erases_and_nobody_else_can_edit_the_trail() {
    let mut su = connect();
    let (org, mut owner) = setup(&mut su, "erase-who");
    owner
        .batch_execute(&format!("SET flagship.actor = '{BEA}'"))
        .unwrap();
    // bea is an admin, not an owner.
    assert_eq!(
        sqlstate(
            &mut owner,
            "SELECT flagship.erase_subject('carl@acme.example')"
        ),
        "42501"
    );
    let (_, mut app) = login_as(&mut su, "erase-app", &["flagship_app"]);
    app.batch_execute(&format!("SET flagship.organization_id = '{org}'"))
        .unwrap();
    assert_eq!(
        sqlstate(
            &mut app,
            "SELECT flagship.erase_subject('carl@acme.example')"
        ),
        "42501"
    );
    // Setting the erasure's marker does not open the trail to anyone else.
    owner
        .batch_execute("SET flagship.actor = 'olga@acme.example'")
        .unwrap();
    assert_eq!(
        sqlstate(
            &mut owner,
            "SET LOCAL flagship.erasing = '1'; UPDATE flagship.audit_events SET diff = '{}', erased_by = 1"
        ),
        "42501"
    );
    assert_eq!(
        sqlstate(&mut owner, "SELECT flagship.erase_subject('  ')"),
        "22023"
    );
    assert_eq!(
        answer(&mut su, &format!("flagship.verify_audit_chain('{org}')"))["valid"],
        json!(true)
    );
}

/// Red-team findings: the replacement touches string values only, never
/// keys; erasure events are never rewritten (erasing a digest they hold
/// leaves the chain valid); a subject that is not a person's key still
/// leaves valid JSON.
#[test]
fn erasure_replaces_values_only_and_never_its_own_records() {
    let mut su = connect();
    assert_eq!(
        answer(
            &mut su,
            r#"flagship.erase_values('{"old": "old", "a": ["old", {"old": "x"}], "n": 1}', 'old', 'P')"#
        ),
        json!({"old": "P", "a": ["P", {"old": "x"}], "n": 1})
    );
    let (org, mut owner) = setup(&mut su, "erase-values");
    let first = answer(&mut owner, &format!("flagship.erase_subject('{BEA}')"));
    let erasure = first["erasure_event"].as_i64().unwrap();
    let recorded_digest = text(
        &mut su,
        &format!(
            "SELECT value FROM flagship.audit_events, jsonb_each_text(diff -> 'audit_events') \
              WHERE organization_id = '{org}' AND chain_seq = {erasure} LIMIT 1"
        ),
    );
    for subject in [recorded_digest.as_str(), "\": \"", "old"] {
        owner
            .batch_execute(&format!(
                "SELECT flagship.erase_subject({})",
                postgres_literal(subject)
            ))
            .unwrap();
        assert_eq!(
            answer(&mut su, &format!("flagship.verify_audit_chain('{org}')"))["valid"],
            json!(true),
            "after erasing {subject:?}"
        );
    }
}

/// Red-team finding: two erasures at once must not write back what the
/// other erased. Both people are values of one audit event (a segment's
/// list); one erasure waits for the other.
#[test]
fn concurrent_erasures_both_stick() {
    let mut su = connect();
    let (org, mut first) = setup(&mut su, "erase-race");
    first
        .batch_execute(&format!(
            r#"SELECT flagship.put_segment('shop', '{{"key": "vip", "included": ["{BEA}", "carl@acme.example"]}}')"#
        ))
        .unwrap();
    let (_, mut second) = login_as(&mut su, "erase-race-2", &["flagship_admin"]);
    second
        .batch_execute(&format!(
            "SET flagship.organization_id = '{org}'; SET flagship.actor = 'olga@acme.example'"
        ))
        .unwrap();
    first.batch_execute("BEGIN").unwrap();
    first
        .batch_execute(&format!("SELECT flagship.erase_subject('{BEA}')"))
        .unwrap();
    let waiting = std::thread::spawn(move || {
        second
            .batch_execute("SELECT flagship.erase_subject('carl@acme.example')")
            .unwrap();
    });
    std::thread::sleep(std::time::Duration::from_millis(500));
    first.batch_execute("COMMIT").unwrap();
    waiting.join().unwrap();
    let left = text(
        &mut su,
        &format!(
            "SELECT count(*)::text FROM flagship.audit_events WHERE organization_id = '{org}' \
               AND (strpos(diff::text, '{BEA}') > 0 OR strpos(diff::text, 'carl@acme.example') > 0)"
        ),
    );
    assert_eq!(left, "0");
    assert_eq!(
        answer(&mut su, &format!("flagship.verify_audit_chain('{org}')"))["valid"],
        json!(true)
    );
}

fn postgres_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}
