//! Helpers shared by the `#[pg_test]`s.

use pgrx::prelude::*;

/// The text a query returns, or "" for NULL.
pub fn text(sql: &str) -> String {
    Spi::get_one::<String>(sql).unwrap().unwrap_or_default()
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
