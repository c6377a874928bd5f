//! Helpers shared by the `#[pg_test]`s.

use pgrx::prelude::*;

/// The text a query returns, or "" for NULL.
pub fn text(sql: &str) -> String {
    Spi::get_one::<String>(sql).unwrap().unwrap_or_default()
}

/// A new organization with a project `shop`, made this transaction's
/// session organization, and `shop/production` its default environment.
pub fn organization_with_shop(slug: &str, name: &str) {
    Spi::run(&format!(
        "SELECT set_config('flagship.organization_id', \
             flagship.create_organization('{slug}', '{name}')::text, true); \
         SELECT flagship.create_project(flagship.current_organization_id(), 'shop', 'Shop'); \
         SET LOCAL flagship.environment = 'shop/production'"
    ))
    .unwrap();
}

/// The SQLSTATE and message a statement fails with ("none" if it does
/// not), run inside a DO block so the failure is caught in a savepoint.
pub fn failure(sql: &str) -> (String, String) {
    let outcome = text(&format!(
        "DO $do$ BEGIN {sql}; PERFORM set_config('flagship_test.failure', 'none|', true); \
         EXCEPTION WHEN OTHERS THEN \
           PERFORM set_config('flagship_test.failure', SQLSTATE || '|' || SQLERRM, true); END $do$; \
         SELECT current_setting('flagship_test.failure')"
    ));
    let (code, message) = outcome.split_once('|').unwrap();
    (code.to_string(), message.to_string())
}
