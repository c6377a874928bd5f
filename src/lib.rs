//! FlagShip: feature flags, plan entitlements, usage limits, API keys and an
//! audit trail inside PostgreSQL.
//!
//! The pure core (`rules`, `bucketing`) knows nothing of PostgreSQL and is
//! tested with plain `cargo test`; the other modules are the thin pgrx shell
//! around it. Tables, policies and grants live in `sql/`.

use pgrx::prelude::*;

pub mod bucketing;
pub mod rules;

mod context;
mod errors;
mod tenancy;

::pgrx::pg_module_magic!(name, version);

extension_sql_file!("../sql/bootstrap.sql", name = "bootstrap", bootstrap);
extension_sql_file!(
    "../sql/tenancy.sql",
    name = "tenancy",
    requires = ["bootstrap", context::current_organization_id]
);

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    context::register_settings();
}

/// Required by `cargo pgrx test`.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    #[must_use]
    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec![]
    }
}
