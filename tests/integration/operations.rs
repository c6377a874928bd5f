//! Operating FlagShip day to day (#17, DESIGN.md section 6): an
//! organization started without a superuser, patching one flag, flags as
//! code with plan and apply. Sessions are non-superuser login roles.

use postgres::Client;
use serde_json::{json, Value};

use crate::harness::{connect, login_as, organization, sqlstate, text};

fn document(client: &mut Client, sql: &str) -> Value {
    serde_json::from_str(&text(client, sql)).unwrap()
}

/// A flagship_admin login with no superuser step: it creates the
/// organization, becomes its owner, and builds a project, a flag, a metric,
/// a plan and a customer that evaluate.
#[test]
fn an_admin_starts_an_organization_without_a_superuser() {
    let mut su = connect();
    let (login, mut admin) = login_as(&mut su, "ops-founder", &["flagship_admin"]);
    let slug = crate::harness::unique("ops-founded");
    let org = text(
        &mut admin,
        &format!("SELECT flagship.create_organization('{slug}', 'Founded')::text"),
    );
    admin
        .batch_execute(&format!(
            r#"SET flagship.organization_id = '{org}';
               SELECT flagship.create_project('{org}', 'shop', 'Shop');
               SELECT flagship.put_flag('shop', '{{"key": "f", "kind": "plan",
                   "environments": {{"production": {{"enabled": true}}}}}}');
               SELECT flagship.put_metric('shop', '{{"key": "api_calls"}}');
               SELECT flagship.put_plan('shop', '{{"key": "pro", "features": {{"f": true}},
                   "limits": {{"api_calls": {{"limit": 10, "period": "month"}}}}}}');
               SELECT flagship.put_customer('shop/production', '{{"key": "acme", "plan": "pro"}}');"#
        ))
        .unwrap();
    let owners = text(
        &mut admin,
        "SELECT string_agg(m.user_key || ':' || r.key, ',')
           FROM flagship.members m
           JOIN flagship.member_roles mr ON mr.organization_id = m.organization_id AND mr.member_id = m.id
           JOIN flagship.roles r ON r.organization_id = mr.organization_id AND r.id = mr.role_id",
    );
    assert_eq!(owners, format!("{login}:owner"));
    assert_eq!(
        text(
            &mut admin,
            "SELECT flagship.flagship_evaluate('f', '{\"customer\": \"acme\"}', 'shop/production')
                    ->> 'value'"
        ),
        "true",
        "the plan grants the customer its flag"
    );
    // A superuser's organization gets no member: superusers bypass the
    // policies, and nobody is made owner behind their back.
    let (by_su, _) = organization(&mut su, "ops-by-su");
    assert_eq!(
        text(
            &mut su,
            &format!(
                "SELECT count(*)::text FROM flagship.members WHERE organization_id = '{by_su}'"
            )
        ),
        "0"
    );
}

/// Sets up an organization with project `shop` (and its three
/// environments), a segment, two flags and a customer, and returns its id
/// and an admin session working in it.
fn shop(su: &mut Client, prefix: &str) -> (String, Client) {
    let (org, _) = organization(su, prefix);
    crate::harness::add_member(su, &org, "ops-admin", "admin");
    let (_, mut admin) = login_as(su, prefix, &["flagship_admin"]);
    admin
        .batch_execute(&format!(
            r#"SET flagship.organization_id = '{org}'; SET flagship.actor = 'ops-admin';
               SELECT flagship.put_segment('shop', '{{"key": "staff",
                   "conditions": [{{"attribute": "email", "op": "ends_with", "values": ["@acme.test"]}}]}}');
               SELECT flagship.put_flag('shop', '{{"key": "checkout", "description": "new checkout",
                   "environments": {{
                     "production": {{"enabled": true, "rules": [{{"segment": "staff", "serve": {{"variant": "on"}}}}],
                                     "default": {{"variant": "off"}}}},
                     "staging": {{"enabled": true}}}}}}');
               SELECT flagship.put_flag('shop', '{{"key": "banner",
                   "environments": {{"production": {{"enabled": true}}}}}}');
               SELECT flagship.put_metric('shop', '{{"key": "api_calls"}}');
               SELECT flagship.put_plan('shop', '{{"key": "pro", "limits": {{"api_calls": {{"limit": 5, "period": "month"}}}}}}');
               SELECT flagship.put_customer('shop/production', '{{"key": "acme", "plan": "pro",
                   "billing_anchor": "2026-03-31T10:11:12.345678+00:00"}}');"#
        ))
        .unwrap();
    (org, admin)
}

fn flag(client: &mut Client, key: &str) -> Value {
    document(
        client,
        &format!(
            "SELECT flagship.flag_document(f)::text FROM flagship.features f WHERE f.key = '{key}'"
        ),
    )
}

#[test]
fn patch_flag_changes_one_field_and_keeps_the_rest() {
    let mut su = connect();
    let (_, mut admin) = shop(&mut su, "ops-patch");
    let mut expected = flag(&mut admin, "checkout");
    let before_patching = checkout_events(&mut admin);
    admin
        .batch_execute(
            r#"SELECT flagship.patch_flag('shop', '{"key": "checkout",
                   "environments": {"production": {"enabled": false}}}')"#,
        )
        .unwrap();
    expected["environments"]["production"]["enabled"] = json!(false);
    assert_eq!(flag(&mut admin, "checkout"), expected);
    let after_first_patch = checkout_events(&mut admin);
    assert!(after_first_patch > before_patching);

    // null removes a member: staging loses its configuration (and so is off),
    // the description goes.
    admin
        .batch_execute(
            r#"SELECT flagship.patch_flag('shop', '{"key": "checkout", "description": null,
                   "environments": {"staging": null}}')"#,
        )
        .unwrap();
    expected.as_object_mut().unwrap().remove("description");
    expected["environments"]
        .as_object_mut()
        .unwrap()
        .remove("staging");
    assert_eq!(flag(&mut admin, "checkout"), expected);
    assert!(
        checkout_events(&mut admin) > after_first_patch,
        "each patch is audited like put_flag"
    );

    assert_eq!(
        sqlstate(
            &mut admin,
            r#"SELECT flagship.patch_flag('shop', '{"key": "nope", "archived": true}')"#
        ),
        "42704"
    );
    assert_eq!(
        sqlstate(
            &mut admin,
            r#"SELECT flagship.patch_flag('shop', '{"environments": {}}')"#
        ),
        "22023"
    );
    // What put_flag refuses, patch_flag refuses, naming the field.
    let refused = admin
        .batch_execute(
            r#"SELECT flagship.patch_flag('shop', '{"key": "checkout",
                   "environments": {"production": {"default": {"variant": "purple"}}}}')"#,
        )
        .unwrap_err();
    let message = refused.as_db_error().unwrap().message().to_string();
    assert!(
        message.contains("checkout") && message.contains("environments.production"),
        "{message}"
    );
}

/// Audit events naming flag "checkout" (the change feed's key).
fn checkout_events(client: &mut Client) -> i64 {
    text(
        client,
        "SELECT count(*)::text FROM flagship.audit_events WHERE change_key = 'checkout'",
    )
    .parse()
    .unwrap()
}

fn plan(client: &mut Client, org: &str, document: &Value) -> Value {
    let answer: Value = client
        .query_one(
            "SELECT flagship.plan_project($1::text::uuid, $2::text::jsonb)::text",
            &[&org, &document.to_string()],
        )
        .map(|row| serde_json::from_str(row.get::<_, &str>(0)).unwrap())
        .unwrap();
    answer
}

fn apply(client: &mut Client, org: &str, document: &Value, prune: bool) -> Value {
    client
        .query_one(
            "SELECT flagship.apply_project($1::text::uuid, $2::text::jsonb, $3)::text",
            &[&org, &document.to_string(), &prune],
        )
        .map(|row| serde_json::from_str(row.get::<_, &str>(0)).unwrap())
        .unwrap()
}

fn no_changes(unchanged: u64) -> Value {
    json!({"create": [], "update": [], "delete": [], "unchanged": unchanged})
}

fn audit_events(client: &mut Client) -> String {
    text(client, "SELECT count(*)::text FROM flagship.audit_events")
}

#[test]
fn plan_and_apply_change_exactly_what_the_document_edits() {
    let mut su = connect();
    let (org, mut admin) = shop(&mut su, "ops-plan");
    let exported = document(
        &mut admin,
        "SELECT flagship.export_project('shop', customers => false)::text",
    );
    assert!(exported.get("customers").is_none(), "{exported}");
    // project, 3 environments, 1 segment, 2 flags, 1 metric, 1 plan
    assert_eq!(plan(&mut admin, &org, &exported), no_changes(9));

    let mut edited = exported.clone();
    edited["flags"][1]["environments"]["production"]["enabled"] = json!(false);
    edited["flags"]
        .as_array_mut()
        .unwrap()
        .push(json!({"key": "dark-mode", "environments": {"staging": {"enabled": true}}}));
    let planned = plan(&mut admin, &org, &edited);
    let expected = json!({
        "create": [{"kind": "flag", "key": "dark-mode", "changes": {
            "key": {"old": null, "new": "dark-mode"},
            "kind": {"old": null, "new": "boolean"},
            "archived": {"old": null, "new": false},
            "variants": {"old": null, "new": {"on": true, "off": false}},
            "off_variant": {"old": null, "new": "off"},
            "prerequisites": {"old": null, "new": []},
            "environments.staging": {"old": null, "new": {"enabled": true, "rules": [], "targets": {}}}}}],
        "update": [{"kind": "flag", "key": "checkout", "changes": {
            "environments.production": {
                "old": exported["flags"][1]["environments"]["production"],
                "new": edited["flags"][1]["environments"]["production"]}}}],
        "delete": [],
        "unchanged": 8});
    assert_eq!(planned, expected);
    assert_eq!(
        flag(&mut admin, "checkout")["environments"]["production"]["enabled"],
        json!(true),
        "plan_project changed something"
    );
    assert_eq!(
        text(
            &mut admin,
            "SELECT count(*)::text FROM flagship.features WHERE key = 'dark-mode'"
        ),
        "0"
    );

    let before = audit_events(&mut admin);
    assert_eq!(apply(&mut admin, &org, &edited, false), expected);
    assert_eq!(
        document(
            &mut admin,
            "SELECT flagship.export_project('shop', customers => false)::text"
        ),
        edited_with_defaults(&edited, &expected)
    );
    let after_first = audit_events(&mut admin);
    assert_ne!(before, after_first);
    // The same document again changes nothing, and writes no audit event.
    assert_eq!(apply(&mut admin, &org, &edited, false), no_changes(10));
    assert_eq!(audit_events(&mut admin), after_first);
}

/// The export as apply_project leaves it: the created flag in its stored
/// form (defaults filled in), in key order.
fn edited_with_defaults(edited: &Value, plan: &Value) -> Value {
    let mut expected = edited.clone();
    let created: serde_json::Map<String, Value> = plan["create"][0]["changes"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(field, _)| !field.starts_with("environments."))
        .map(|(field, change)| (field.clone(), change["new"].clone()))
        .collect();
    let mut created = Value::Object(created);
    created["environments"] = json!({"staging": {"enabled": true, "rules": [], "targets": {}}});
    let flags = expected["flags"].as_array_mut().unwrap();
    flags.pop();
    flags.push(created);
    flags.sort_by(|a, b| a["key"].as_str().cmp(&b["key"].as_str()));
    expected
}

#[test]
fn apply_creates_a_project_elsewhere_and_prune_deletes_only_what_is_missing() {
    let mut su = connect();
    let (_, mut admin) = shop(&mut su, "ops-source");
    let exported = document(&mut admin, "SELECT flagship.export_project('shop')::text");
    assert_eq!(
        exported["customers"][0]["billing_anchor"],
        json!("2026-03-31T10:11:12.345678+00:00")
    );
    // An exported customer can be put back as it is (its "environment"
    // names the one it is written to).
    admin
        .query_one(
            "SELECT flagship.put_customer('shop/production', $1::text::jsonb)",
            &[&exported["customers"][0].to_string()],
        )
        .unwrap();

    // Into an organization without the project: everything is created,
    // customers included, and the export comes back identical.
    let (target, mut other) = shop(&mut su, "ops-target");
    other
        .batch_execute("DELETE FROM flagship.customers; DELETE FROM flagship.plans; DELETE FROM flagship.metrics;
                        DELETE FROM flagship.features; DELETE FROM flagship.segments;
                        UPDATE flagship.projects SET key = 'old-shop'")
        .unwrap();
    let created = apply(&mut other, &target, &exported, false);
    assert_eq!(created["create"].as_array().unwrap().len(), 10, "{created}");
    assert_eq!(
        document(&mut other, "SELECT flagship.export_project('shop')::text"),
        exported
    );

    // Into the organization that has it, with one flag and the customer
    // gone from the document: without prune nothing is deleted (the plan
    // lists what prune would delete); with prune exactly those two go.
    let mut trimmed = exported.clone();
    trimmed["flags"]
        .as_array_mut()
        .unwrap()
        .retain(|flag| flag["key"] != "banner");
    trimmed["customers"] = json!([]);
    let planned = plan(&mut other, &target, &trimmed);
    let deleted: Vec<(String, String)> = planned["delete"]
        .as_array()
        .unwrap()
        .iter()
        .map(|item| {
            (
                item["kind"].as_str().unwrap().to_string(),
                item["key"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        deleted,
        [
            ("customer".to_string(), "production/acme".to_string()),
            ("flag".to_string(), "banner".to_string())
        ]
    );
    assert_eq!(
        apply(&mut other, &target, &trimmed, false)["delete"],
        json!([])
    );
    assert_eq!(
        text(
            &mut other,
            "SELECT string_agg(key, ',' ORDER BY key) FROM flagship.features"
        ),
        "banner,checkout"
    );
    let pruned = apply(&mut other, &target, &trimmed, true);
    assert_eq!(pruned["delete"], planned["delete"]);
    assert_eq!(
        text(
            &mut other,
            "SELECT string_agg(key, ',' ORDER BY key) FROM flagship.features"
        ),
        "checkout"
    );
    assert_eq!(
        text(&mut other, "SELECT count(*)::text FROM flagship.customers"),
        "0"
    );
    assert_eq!(
        text(&mut other, "SELECT count(*)::text FROM flagship.segments"),
        "1",
        "prune deleted what the document keeps"
    );
}

#[test]
fn plan_and_apply_refuse_what_they_cannot_read_or_may_not_change() {
    let mut su = connect();
    let (org, mut admin) = shop(&mut su, "ops-refuse");
    let (elsewhere, _) = organization(&mut su, "ops-elsewhere");
    let mut exported = document(&mut admin, "SELECT flagship.export_project('shop')::text");
    let run = |client: &mut Client, org: &str, document: &Value| {
        let error = client
            .query_one(
                "SELECT flagship.apply_project($1::text::uuid, $2::text::jsonb)",
                &[&org, &document.to_string()],
            )
            .unwrap_err();
        let error = error.as_db_error().unwrap();
        (error.code().code().to_string(), error.message().to_string())
    };
    assert_eq!(
        run(&mut admin, &elsewhere, &exported),
        (
            "42501".to_string(),
            format!("apply_project: this session works in organization {org}, not {elsewhere}")
        )
    );
    exported["format"] = json!("flagship.project/9");
    assert_eq!(
        run(&mut admin, &org, &exported),
        (
            "22023".to_string(),
            "apply_project: format: unsupported \"flagship.project/9\"".to_string()
        )
    );
    exported["format"] = json!("flagship.project/1");
    exported["flags"][0]["environments"]["production"] = json!({"enabled": "yes"});
    let (code, message) = run(&mut admin, &org, &exported);
    assert_eq!(code, "22023");
    assert!(
        message.contains("environments.production.enabled"),
        "{message}"
    );
    // Nothing of a refused document is written.
    let current = document(&mut admin, "SELECT flagship.export_project('shop')::text");
    assert_eq!(plan(&mut admin, &org, &current), no_changes(10));
    // import_project into an organization that has the project says so.
    let exported = text(&mut admin, "SELECT flagship.export_project('shop')::text");
    let error = admin
        .query_one(
            "SELECT flagship.import_project($1::text::uuid, $2::text::jsonb)",
            &[&org, &exported],
        )
        .unwrap_err();
    let error = error.as_db_error().unwrap();
    assert_eq!(error.code().code(), "23505");
    assert_eq!(
        error.message(),
        format!("import_project: organization {org} already has project \"shop\"")
    );
}

/// Bug of #17: a session with no organization was told that the
/// environment it named did not exist.
#[test]
fn an_evaluation_without_an_organization_says_so() {
    let mut su = connect();
    let (org, _) = organization(&mut su, "ops-noorg");
    crate::harness::put_flag(
        &mut su,
        &org,
        r#"{"key": "f", "environments": {"production": {"enabled": true}}}"#,
    );
    let (_, mut app) = login_as(&mut su, "ops-noorg-app", &["flagship_app"]);
    let answer = document(
        &mut app,
        "SELECT flagship.flagship_evaluate('f', '{}', 'shop/production')::text",
    );
    assert_eq!(
        answer,
        json!({"key": "f", "value": null, "variant": null, "reason": "ERROR",
               "error_code": "GENERAL",
               "error_message": "no organization in this session: set flagship.organization_id \
                   (SET LOCAL behind a transaction pooler), send JWT claims with org_id, or call \
                   flagship.authenticate with an API key in this transaction"})
    );
    // With an organization, a wrong name is still a missing environment.
    app.batch_execute(&format!("SET flagship.organization_id = '{org}'"))
        .unwrap();
    assert_eq!(
        text(
            &mut app,
            "SELECT flagship.flagship_evaluate('f', '{}', 'shop/nowhere') ->> 'error_code'"
        ),
        "ENVIRONMENT_NOT_FOUND"
    );
}

/// Bug of #17: after authenticate() with a key bound to an environment,
/// evaluating without naming one said "no environment given".
#[test]
fn an_environment_bound_key_is_the_default_environment() {
    let mut su = connect();
    let (org, _) = organization(&mut su, "ops-keyenv");
    crate::harness::put_flag(
        &mut su,
        &org,
        r#"{"key": "f", "environments": {"staging": {"enabled": true}}}"#,
    );
    su.batch_execute(&format!("SET flagship.organization_id = '{org}'"))
        .unwrap();
    let key = text(
        &mut su,
        &format!(
            "SELECT flagship.issue_api_key('{org}', 'ops', '{{features:read}}', 'shop/staging')"
        ),
    );
    su.batch_execute("RESET flagship.organization_id").unwrap();
    let (_, mut app) = login_as(&mut su, "ops-keyenv-app", &["flagship_app"]);
    app.batch_execute("BEGIN").unwrap();
    assert_eq!(
        text(
            &mut app,
            &format!("SELECT flagship.authenticate('{key}') ->> 'code'")
        ),
        "VALID"
    );
    assert_eq!(
        document(&mut app, "SELECT flagship.flagship_evaluate('f')::text"),
        json!({"key": "f", "value": true, "variant": "on", "reason": "STATIC"})
    );
    app.batch_execute("COMMIT").unwrap();
}

/// Bug of #17: NOT_ENTITLED was one answer for six different causes.
#[test]
fn not_entitled_says_why() {
    let mut su = connect();
    let (org, _) = organization(&mut su, "ops-entitled");
    su.batch_execute(&format!(
        r#"SET flagship.organization_id = '{org}';
           SELECT flagship.put_flag('shop', '{{"key": "reports", "kind": "plan",
               "environments": {{"production": {{"enabled": true}}}}}}');
           SELECT flagship.put_flag('shop', '{{"key": "exports", "kind": "plan",
               "environments": {{"production": {{"enabled": true}}}}}}');
           SELECT flagship.put_plan('shop', '{{"key": "pro", "features": {{"reports": true}}}}');
           SELECT flagship.put_customer('shop/production', '{{"key": "planless"}}');
           SELECT flagship.put_customer('shop/production', '{{"key": "gone", "plan": "pro", "status": "canceled"}}');
           SELECT flagship.put_customer('shop/production', '{{"key": "expired", "plan": "pro", "status": "trialing",
               "trial_ends_at": "2020-01-01T00:00:00Z"}}');
           SELECT flagship.put_customer('shop/production', '{{"key": "acme", "plan": "pro"}}');"#
    ))
    .unwrap();
    let answer = |su: &mut Client, flag: &str, context: &str| {
        document(
            su,
            &format!(
                "SELECT flagship.flagship_evaluate('{flag}', '{context}', 'shop/production')::text"
            ),
        )
    };
    assert_eq!(
        answer(&mut su, "reports", "{}"),
        json!({"key": "reports", "value": false, "variant": "off", "reason": "NOT_ENTITLED",
               "detail": "the context names no customer (attribute \"customer\")"})
    );
    for (flag, customer, detail) in [
        ("reports", "nobody", "no such customer in this environment"),
        ("reports", "planless", "the customer has no plan"),
        ("reports", "gone", "the customer's subscription is canceled"),
        ("reports", "expired", "the customer's trial has ended"),
        (
            "exports",
            "acme",
            "neither the customer's plan nor its overrides grant this flag",
        ),
    ] {
        let context = format!(r#"{{"customer": "{customer}"}}"#);
        assert_eq!(
            answer(&mut su, flag, &context),
            json!({"key": flag, "value": false, "variant": "off", "reason": "NOT_ENTITLED",
                   "detail": detail}),
            "{customer}"
        );
        // flagship_evaluate_all gives each flag the same answer.
        assert_eq!(
            document(
                &mut su,
                &format!(
                    "SELECT (flagship.flagship_evaluate_all('{context}', 'shop/production') -> '{flag}')::text"
                )
            )["detail"],
            json!(detail)
        );
    }
    assert_eq!(
        answer(&mut su, "reports", r#"{"customer": "acme"}"#),
        json!({"key": "reports", "value": true, "variant": "on", "reason": "STATIC"})
    );
}

/// Bug of #17: an idempotency key used again with another amount (or
/// customer, or metric) replayed the first answer silently.
#[test]
fn an_idempotency_key_reused_for_another_call_is_refused() {
    let mut su = connect();
    let (org, _) = organization(&mut su, "ops-idem");
    su.batch_execute(&format!(
        r#"SET flagship.organization_id = '{org}';
           SELECT flagship.put_metric('shop', '{{"key": "api_calls"}}');
           SELECT flagship.put_metric('shop', '{{"key": "exports"}}');
           SELECT flagship.put_plan('shop', '{{"key": "pro", "limits": {{
               "api_calls": {{"limit": 100, "period": "month"}}, "exports": {{"limit": 100, "period": "month"}}}}}}');
           SELECT flagship.put_customer('shop/production', '{{"key": "acme", "plan": "pro"}}');
           SELECT flagship.put_customer('shop/production', '{{"key": "globex", "plan": "pro"}}');
           SET flagship.environment = 'shop/production';"#
    ))
    .unwrap();
    let first = text(
        &mut su,
        "SELECT flagship.record_usage('acme', 'api_calls', 1, 'k') ->> 'used'",
    );
    assert_eq!(first, "1");
    assert_eq!(
        text(
            &mut su,
            "SELECT flagship.record_usage('acme', 'api_calls', 1, 'k') ->> 'replayed'"
        ),
        "true"
    );
    for (customer, metric, amount) in [
        ("acme", "api_calls", 50_i64),
        ("globex", "api_calls", 1),
        ("acme", "exports", 1),
    ] {
        let error = su
            .query_one(
                "SELECT flagship.record_usage($1, $2, $3, 'k')",
                &[&customer, &metric, &amount],
            )
            .unwrap_err();
        let error = error.as_db_error().unwrap();
        assert_eq!(error.code().code(), "22023");
        assert_eq!(
            error.message(),
            format!(
                "idempotency key \"k\" was first used to record 1 of \"api_calls\" for customer \
                 \"acme\", not {amount} of \"{metric}\" for \"{customer}\""
            )
        );
    }
    assert_eq!(
        text(
            &mut su,
            "SELECT string_agg(c.external_key || ':' || u.used, ',' ORDER BY c.external_key)
               FROM flagship.usage_counters u JOIN flagship.customers c ON c.id = u.customer_id
              WHERE u.organization_id = flagship.current_organization_id()"
        ),
        "acme:1"
    );
}

/// explain_evaluation: the flagship_evaluate answer plus the steps that
/// reached it, for each way a flag can decide.
#[test]
fn explain_evaluation_shows_each_step() {
    let mut su = connect();
    let (org, _) = organization(&mut su, "ops-explain");
    su.batch_execute(&format!(
        r#"SET flagship.organization_id = '{org}'; SET flagship.environment = 'shop/production';
           SELECT flagship.put_flag('shop', '{{"key": "gate", "environments": {{"production": {{"enabled": true,
               "rules": [{{"id": "closed", "conditions": [{{"attribute": "country", "op": "eq", "value": "xx"}}],
                          "serve": {{"variant": "off"}}}}]}}}}}}');
           SELECT flagship.put_flag('shop', '{{"key": "checkout", "prerequisites": [{{"flag": "gate"}}],
               "environments": {{"production": {{"enabled": true, "targets": {{"on": ["vip"]}},
                 "rules": [
                   {{"id": "french", "conditions": [{{"attribute": "country", "op": "eq", "value": "fr"}}],
                     "serve": {{"variant": "on"}}}},
                   {{"id": "adults", "conditions": [{{"attribute": "age", "op": "gte", "value": 18}}],
                     "serve": {{"rollout": [{{"variant": "on", "weight": 30}}, {{"variant": "off", "weight": 70}}]}}}}],
                 "default": {{"variant": "off"}}}}}}}}');
           SELECT flagship.put_flag('shop', '{{"key": "reports", "kind": "plan",
               "environments": {{"production": {{"enabled": true}}}}}}');
           SELECT flagship.put_plan('shop', '{{"key": "basic", "features": {{}}}}');
           SELECT flagship.put_customer('shop/production', '{{"key": "trial", "plan": "basic", "status": "trialing",
               "trial_ends_at": "2020-01-01T00:00:00+00:00"}}');"#
    ))
    .unwrap();
    let explain = |su: &mut Client, flag: &str, context: Value| {
        let answer: Value = su
            .query_one(
                "SELECT flagship.explain_evaluation($1, $2::text::jsonb)::text",
                &[&flag, &context.to_string()],
            )
            .map(|row| serde_json::from_str(row.get::<_, &str>(0)).unwrap())
            .unwrap();
        // The answer part is exactly what flagship_evaluate says.
        let evaluated = document(
            su,
            &format!(
                "SELECT flagship.flagship_evaluate('{flag}', '{}')::text",
                context.to_string().replace('\'', "''")
            ),
        );
        let mut without_trace = answer.clone();
        without_trace.as_object_mut().unwrap().remove("trace");
        assert_eq!(without_trace, evaluated, "{flag} {context}");
        answer
    };

    // A targeted user.
    let targeted = explain(&mut su, "checkout", json!({"targeting_key": "vip"}));
    assert_eq!(targeted["reason"], "TARGETING_MATCH");
    assert_eq!(
        targeted["trace"]["targets"],
        json!({"targeting_key": "vip", "matched": true})
    );
    assert_eq!(
        targeted["trace"]["decided_by"],
        "the targeting key is targeted"
    );

    // A rule match after a rule whose condition failed, with the rollout's
    // bucket and band.
    let adult = explain(
        &mut su,
        "checkout",
        json!({"targeting_key": "user-7", "country": "de", "age": 40}),
    );
    let rules = &adult["trace"]["rules"];
    assert_eq!(
        rules[0],
        json!({"id": "french", "matched": false, "conditions": [
            {"attribute": "country", "op": "eq", "value": "de", "matched": false}]})
    );
    assert_eq!(
        rules[1]["conditions"],
        json!([{"attribute": "age", "op": "gte", "value": 40, "matched": true}])
    );
    let rollout = &rules[1]["rollout"];
    assert_eq!(
        rollout["bands"],
        json!([{"variant": "on", "from": 0, "to": 30000}, {"variant": "off", "from": 30000, "to": 100000}])
    );
    let position = rollout["position"].as_u64().unwrap();
    let expected_variant = if position < 30000 { "on" } else { "off" };
    assert_eq!(rollout["variant"], expected_variant);
    assert_eq!(adult["variant"], expected_variant);
    assert_eq!(adult["rule"], "adults");
    assert_eq!(adult["trace"]["decided_by"], "rule \"adults\"");
    assert_eq!(
        adult["trace"]["prerequisites"][0]["met"],
        json!(true),
        "{adult}"
    );

    // A failed prerequisite.
    let blocked = explain(&mut su, "checkout", json!({"country": "xx"}));
    assert_eq!(blocked["reason"], "PREREQUISITE_FAILED");
    assert_eq!(
        blocked["trace"]["prerequisites"][0]["variant"],
        json!("off")
    );
    assert_eq!(
        blocked["trace"]["decided_by"],
        "prerequisite \"gate\" is not met"
    );

    // A plan flag: the customer, plan, status and trial end, and the cause.
    let trial = explain(&mut su, "reports", json!({"customer": "trial"}));
    assert_eq!(
        trial["trace"]["entitlement"],
        json!({"customer": "trial", "granted": false, "detail": "the customer's trial has ended",
               "plan": "basic", "status": "trialing", "trial_ends_at": "2020-01-01T00:00:00+00:00"})
    );
    let nobody = explain(&mut su, "reports", json!({}));
    assert_eq!(
        nobody["trace"]["entitlement"],
        json!({"customer": null, "granted": false,
               "detail": "the context names no customer (attribute \"customer\")"})
    );
}

/// Bug of #17: a refusal on a configuration table named neither the
/// permission nor the membership that was missing.
#[test]
fn a_refused_change_names_the_missing_permission() {
    let mut su = connect();
    let (org, _) = organization(&mut su, "ops-perm");
    crate::harness::add_member(&mut su, &org, "vera@acme.example", "viewer");
    let (_, mut viewer) = login_as(&mut su, "ops-perm-viewer", &["flagship_admin"]);
    viewer
        .batch_execute(&format!(
            "SET flagship.organization_id = '{org}'; SET flagship.actor = 'vera@acme.example'"
        ))
        .unwrap();
    for (sql, message, hint_roles) in [
        (
            r#"SELECT flagship.put_flag('shop', '{"key": "f"}')"#,
            format!("put_flag: actor \"vera@acme.example\" lacks the permission features:write in organization {org}"),
            "admin, developer, owner",
        ),
        (
            r#"SELECT flagship.put_plan('shop', '{"key": "pro"}')"#,
            format!("put_plan: actor \"vera@acme.example\" lacks the permission plans:write in organization {org}"),
            "admin, owner",
        ),
        (
            &format!("SELECT flagship.create_project('{org}', 'other', 'Other')"),
            format!("create_project: actor \"vera@acme.example\" lacks the permission projects:write in organization {org}"),
            "admin, owner",
        ),
    ] {
        let error = viewer.batch_execute(sql).unwrap_err();
        let error = error.as_db_error().unwrap();
        assert_eq!(error.code().code(), "42501", "{sql}");
        assert_eq!(error.message(), message);
        assert_eq!(
            error.hint(),
            Some(
                format!(
                    "a member with one of these roles has it: {hint_roles}; an owner or admin adds \
                     the member in flagship.members and the role in flagship.member_roles"
                )
                .as_str()
            )
        );
    }
}

/// Bug of #17: `limits.api_calls.period: unknown period "fortnight"` did
/// not say which plan; every refusal of a plan, customer or metric now
/// names it.
#[test]
fn validation_messages_name_their_object() {
    let mut su = connect();
    let (org, _) = organization(&mut su, "ops-names");
    su.batch_execute(&format!(
        r#"SET flagship.organization_id = '{org}';
           SELECT flagship.put_metric('shop', '{{"key": "api_calls"}}');"#
    ))
    .unwrap();
    for (sql, expected) in [
        (
            r#"SELECT flagship.put_plan('shop', '{"key": "team", "limits": {"api_calls": {"period": "fortnight"}}}')"#,
            r#"plan "team": limits.api_calls.period: unknown period "fortnight" (none, hour, day, week, month, billing_month)"#,
        ),
        (
            r#"SELECT flagship.put_customer('shop/production', '{"key": "acme", "plan": "platinum"}')"#,
            r#"customer "acme": plan: unknown plan "platinum""#,
        ),
        (
            r#"SELECT flagship.put_metric('shop', '{"key": "seats", "aggregation": "avg"}')"#,
            r#"metric "seats": aggregation: must be sum, gauge or credits"#,
        ),
        (
            r#"SELECT flagship.put_metric('shop', '{"key": "seats", "colour": "red"}')"#,
            r#"metric "seats": unknown field "colour""#,
        ),
        (
            r#"SELECT flagship.put_customer('shop/production', '{"key": "acme", "environment": "staging"}')"#,
            r#"customer "acme": environment: names "staging", but the customer is written to environment "production""#,
        ),
    ] {
        let error = su.batch_execute(sql).unwrap_err();
        let error = error.as_db_error().unwrap();
        assert_eq!(error.code().code(), "22023", "{sql}");
        assert_eq!(error.message(), expected);
    }
}

/// Review of #17: a member who may change flags but not projects could not
/// apply a document at all (the trial wrote everything with the caller's
/// rights). Now planning needs no write permission, and applying needs
/// only the permissions of what really changes.
#[test]
fn a_flags_developer_plans_and_applies_flag_changes_only() {
    let mut su = connect();
    let (org, mut admin) = shop(&mut su, "ops-developer");
    crate::harness::add_member(&mut su, &org, "dev@acme.example", "developer");
    let (_, mut developer) = login_as(&mut su, "ops-developer-dev", &["flagship_admin"]);
    developer
        .batch_execute(&format!(
            "SET flagship.organization_id = '{org}'; SET flagship.actor = 'dev@acme.example'"
        ))
        .unwrap();
    let exported = document(
        &mut admin,
        "SELECT flagship.export_project('shop', customers => false)::text",
    );
    assert_eq!(plan(&mut developer, &org, &exported), no_changes(9));
    let mut edited = exported.clone();
    edited["flags"][0]["environments"]["production"]["enabled"] = json!(false);
    let applied = apply(&mut developer, &org, &edited, false);
    assert_eq!(applied["update"][0]["key"], json!("banner"), "{applied}");
    // Renaming the project is a projects:write change: refused, naming it.
    edited["project"]["name"] = json!("Renamed");
    let error = developer
        .query_one(
            "SELECT flagship.apply_project($1::text::uuid, $2::text::jsonb)",
            &[&org, &edited.to_string()],
        )
        .unwrap_err();
    let error = error.as_db_error().unwrap();
    assert_eq!(error.code().code(), "42501");
    assert!(
        error.message().contains("projects:write"),
        "{}",
        error.message()
    );
    // Planning it is fine: it changes nothing.
    assert_eq!(
        plan(&mut developer, &org, &edited)["update"][0]["kind"],
        json!("project")
    );
    // The trial itself can never leave a write behind, whoever calls it.
    text(
        &mut admin,
        &format!(
            "SELECT flagship.project_trial('{org}', '{}', false)::text",
            edited.to_string().replace('\'', "''")
        ),
    );
    assert_eq!(
        text(
            &mut admin,
            "SELECT name FROM flagship.projects WHERE key = 'shop'"
        ),
        "Shop"
    );
}

/// Plain SQL is held to put_flag's references, at commit (deferred
/// constraint triggers): the transaction that leaves a prerequisite or a
/// segment dangling fails at COMMIT with nothing written, while one that
/// removes a flag together with the flag that needs it commits. Before,
/// both dangling writes committed, and the flags answered
/// PREREQUISITE_FAILED or never matched their rule.
#[test]
fn plain_sql_writes_are_held_to_the_references_at_commit() {
    let mut su = connect();
    let (_, mut admin) = shop(&mut su, "ops-references");
    admin
        .batch_execute(
            r#"SELECT flagship.put_flag('shop', '{"key": "gate", "prerequisites": [{"flag": "banner", "variant": "on"}],
                   "environments": {"production": {"enabled": true}}}')"#,
        )
        .unwrap();
    for (sql, code) in [
        (
            "DELETE FROM flagship.features WHERE key = 'banner'",
            "23503",
        ),
        (
            r#"UPDATE flagship.features SET prerequisites = '[{"flag": "ghost"}]' WHERE key = 'gate'"#,
            "22023",
        ),
        (
            r#"UPDATE flagship.features SET variants = '{"yes": true, "off": false}' WHERE key = 'banner'"#,
            "23503",
        ),
        ("DELETE FROM flagship.segments WHERE key = 'staff'", "23503"),
        (
            r#"UPDATE flagship.feature_rules SET rules = '[{"segment": "ghosts", "serve": {"variant": "on"}}]'
                WHERE feature_id = (SELECT id FROM flagship.features WHERE key = 'checkout')
                  AND environment_id = (SELECT id FROM flagship.environments WHERE key = 'production')"#,
            "22023",
        ),
    ] {
        // Refused at its COMMIT (a segment in use: at the DELETE already).
        assert_eq!(
            sqlstate(&mut admin, &format!("BEGIN; {sql}; COMMIT")),
            code,
            "{sql}"
        );
        let _ = admin.batch_execute("ROLLBACK");
    }
    assert_eq!(
        text(
            &mut admin,
            "SELECT string_agg(key || ':' || prerequisites::text, ',' ORDER BY key) FROM flagship.features"
        ),
        r#"banner:[],checkout:[],gate:[{"flag": "banner", "variant": "on"}]"#
    );
    assert_eq!(
        sqlstate(
            &mut admin,
            "BEGIN; DELETE FROM flagship.features WHERE key = 'banner'; \
             DELETE FROM flagship.features WHERE key = 'gate'; COMMIT"
        ),
        "none"
    );
}
