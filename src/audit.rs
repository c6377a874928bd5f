//! The audit trail and change feed are SQL (`sql/audit.sql`): one trigger
//! per configuration table, a per-organization hash chain and its
//! verifier. This module holds their tests that need only one session;
//! concurrency, NOTIFY and roles are in `tests/integration/audit.rs`.

#[cfg(any(test, feature = "pg_test"))]
#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    use crate::test_support::{failure, text};

    fn organization_with_flag() -> String {
        let org = text("SELECT flagship.create_organization('acme', 'Acme')::text");
        Spi::run(&format!(
            "SET flagship.organization_id = '{org}';
             SELECT flagship.create_project('{org}', 'shop', 'Shop', '{{production}}');
             SET flagship.actor = 'alice@example.com';
             SELECT flagship.put_flag('shop', '{{\"key\": \"checkout\", \"environments\": {{\"production\": {{\"enabled\": true}}}}}}');"
        ))
        .unwrap();
        org
    }

    fn events(filter: &str) -> String {
        text(&format!(
            "SELECT string_agg(concat_ws(' ', action, resource_type, actor, diff::text), E'\\n' ORDER BY chain_seq) \
             FROM flagship.audit_events WHERE {filter}"
        ))
    }

    #[pg_test]
    fn each_change_is_one_event_with_actor_and_diff() {
        let org = organization_with_flag();
        let flag = events("resource_type IN ('features', 'feature_rules')");
        assert_eq!(flag.lines().count(), 2, "{flag}");
        assert!(flag.contains("insert features alice@example.com"), "{flag}");
        assert!(flag.contains(r#""key": {"new": "checkout"}"#), "{flag}");
        assert!(flag.contains(r#""enabled": {"new": true}"#), "{flag}");
        // Creating the organization was audited too, under the database user.
        let first = events("chain_seq = 1");
        assert!(
            first.starts_with("insert organizations postgres"),
            "{first}"
        );
        assert_eq!(
            text(&format!(
                "SELECT bool_and(transaction_id = pg_current_xact_id()::text::bigint)::text \
                 FROM flagship.audit_events WHERE organization_id = '{org}'"
            )),
            "true"
        );

        // Only what changed, old and new; updated_at is bookkeeping.
        Spi::run(
            "SELECT flagship.put_flag('shop', '{\"key\": \"checkout\", \"name\": \"Checkout\", \
             \"environments\": {\"production\": {\"enabled\": false}}}')",
        )
        .unwrap();
        let updates = events("action = 'update'");
        assert_eq!(
            updates,
            "update features alice@example.com {\"name\": {\"new\": \"Checkout\", \"old\": null}}\n\
             update feature_rules alice@example.com {\"enabled\": {\"new\": false, \"old\": true}}"
        );
        // The same document again changes nothing and records nothing.
        let before = text("SELECT count(*)::text FROM flagship.audit_events");
        Spi::run(
            "SELECT flagship.put_flag('shop', '{\"key\": \"checkout\", \"name\": \"Checkout\", \
             \"environments\": {\"production\": {\"enabled\": false}}}')",
        )
        .unwrap();
        assert_eq!(
            text("SELECT count(*)::text FROM flagship.audit_events"),
            before
        );

        Spi::run("DELETE FROM flagship.features WHERE key = 'checkout'").unwrap();
        let deleted = events("action = 'delete'");
        assert!(
            deleted.contains("delete features alice@example.com")
                && deleted.contains(r#""key": {"old": "checkout"}"#)
                && deleted.contains("delete feature_rules"),
            "{deleted}"
        );
    }

    #[pg_test]
    fn a_statement_that_fails_leaves_no_event() {
        organization_with_flag();
        let before = text("SELECT count(*)::text FROM flagship.audit_events");
        let (code, _) = failure(
            "PERFORM flagship.put_flag('shop', '{\"key\": \"broken\", \"variants\": {\"on\": true}, \
             \"environments\": {\"production\": {\"default\": {\"variant\": \"missing\"}}}}')",
        );
        assert_eq!(code, "22023");
        assert_eq!(
            text("SELECT count(*)::text FROM flagship.audit_events"),
            before
        );
    }

    #[pg_test]
    fn key_hashes_never_enter_the_trail() {
        let org = organization_with_flag();
        let key = text(&format!(
            "SELECT flagship.issue_api_key('{org}', 'ci', '{{features:read}}')"
        ));
        let hash = text(&format!("SELECT encode(sha256('{key}'::bytea), 'hex')"));
        Spi::run(&format!("SELECT flagship.verify_api_key('{key}')")).unwrap();
        let trail = text("SELECT string_agg(diff::text, ' ') FROM flagship.audit_events");
        assert!(trail.contains("\"name\": {\"new\": \"ci\"}"), "{trail}");
        assert!(!trail.contains("key_hash") && !trail.contains(&hash) && !trail.contains(&key));
        // Verifying a key is usage, not a configuration change.
        assert_eq!(
            text(
                "SELECT count(*)::text FROM flagship.audit_events WHERE resource_type = 'api_keys'"
            ),
            "1"
        );
    }

    #[pg_test]
    fn the_chain_verifies_and_shows_a_silent_edit() {
        let org = organization_with_flag();
        let verdict = text(&format!(
            "SELECT flagship.verify_audit_chain('{org}')::text"
        ));
        let checked = text(&format!(
            "SELECT count(*)::text FROM flagship.audit_events WHERE organization_id = '{org}'"
        ));
        assert_eq!(
            verdict,
            format!(r#"{{"valid": true, "checked": {checked}, "first_broken_id": null}}"#)
        );

        // Even a superuser is refused unless it says it means it.
        let (code, message) = failure("UPDATE flagship.audit_events SET actor = 'mallory'");
        assert_eq!(code, "42501", "{message}");
        assert_eq!(failure("DELETE FROM flagship.audit_events").0, "42501");
        assert_eq!(failure("TRUNCATE flagship.audit_events").0, "42501");

        let edited = text(&format!(
            "SELECT id::text FROM flagship.audit_events WHERE organization_id = '{org}' \
             AND resource_type = 'features'"
        ));
        Spi::run(&format!(
            "SET LOCAL flagship.audit_maintenance = on;
             UPDATE flagship.audit_events SET actor = 'mallory' WHERE id = {edited};"
        ))
        .unwrap();
        let verdict = text(&format!(
            "SELECT flagship.verify_audit_chain('{org}')::text"
        ));
        assert_eq!(
            verdict,
            format!(
                r#"{{"valid": false, "reason": "content does not match its digest", "checked": {checked}, "first_broken_id": {edited}}}"#
            )
        );

        // Deleting the newest events is seen against the chain head.
        Spi::run(&format!(
            "UPDATE flagship.audit_events SET actor = 'alice@example.com' WHERE id = {edited};
             DELETE FROM flagship.audit_events WHERE organization_id = '{org}'
                AND chain_seq = (SELECT max(chain_seq) FROM flagship.audit_events WHERE organization_id = '{org}');"
        ))
        .unwrap();
        let verdict = text(&format!(
            "SELECT flagship.verify_audit_chain('{org}') ->> 'reason'"
        ));
        assert_eq!(verdict, "truncated");
    }
}
