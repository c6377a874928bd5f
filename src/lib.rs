//! FlagShip: feature flags, plan entitlements, usage limits, API keys and an
//! audit trail inside PostgreSQL.
//!
//! The pure core is the `flagship-engine` crate (`engine/`), which knows
//! nothing of PostgreSQL; the modules here are the pgrx shell around it.
//! Tables, policies and grants live in `sql/`.

// Only `postgres` (the FFI boundary) may write `unsafe`: the compiler
// holds that, not a convention.
#![deny(unsafe_code)]

use pgrx::prelude::*;

mod audit;
mod cache;
mod citus;
mod context;
mod encoded;
mod entitlements;
mod errors;
mod evaluation;
mod exposures;
mod flags;
mod imports;
mod postgres;
mod rate_limits;
mod tenancy;
#[cfg(any(test, feature = "pg_test"))]
mod test_support;
mod usage;

::pgrx::pg_module_magic!(name, version);

extension_sql_file!("../sql/bootstrap.sql", name = "bootstrap", bootstrap);
extension_sql_file!(
    "../sql/tenancy.sql",
    name = "tenancy",
    requires = [
        "bootstrap",
        context::current_organization_id,
        context::current_actor,
        citus::refuse_away_from_the_organization,
        context::acting_role,
        context::current_key_id,
        context::key_grants
    ]
);
extension_sql_file!(
    "../sql/flags.sql",
    name = "flags",
    requires = [
        "tenancy",
        flags::validate_flag,
        flags::validate_flag_environment,
        flags::validate_flag_config,
        flags::validate_segment,
        cache::invalidate_cache,
        cache::cache_usage
    ]
);
extension_sql_file!(
    "../sql/usage.sql",
    name = "usage",
    requires = [
        "flags",
        usage::usage_period_start,
        usage::usage_period_end,
        evaluation::environment_id,
        flags::check_stored_value,
        context::usage_writes_open,
        rate_limits::rate_window_us
    ]
);
extension_sql_file!("../sql/export.sql", name = "export", requires = ["usage"]);
extension_sql_file!(
    "../sql/reservations.sql",
    name = "reservations",
    requires = ["usage"]
);
extension_sql_file!(
    "../sql/keys.sql",
    name = "keys",
    requires = [
        "usage",
        rate_limits::rate_limit_hit,
        citus::refuse_away_from_the_organization
    ]
);
extension_sql_file!("../sql/events.sql", name = "events", requires = ["keys"]);
extension_sql_file!(
    "../sql/operations.sql",
    name = "operations",
    requires = ["export", flags::json_merge_patch]
);
extension_sql_file!(
    "../sql/exposures.sql",
    name = "exposures",
    requires = ["usage"]
);
extension_sql_file!(
    "../sql/migration.sql",
    name = "migration",
    requires = ["export", imports::unleash_flag_documents]
);
extension_sql_file!(
    "../sql/audit.sql",
    name = "audit",
    requires = [
        "keys",
        "export",
        "migration",
        "exposures",
        "operations",
        "events",
        "reservations"
    ]
);

extension_sql_file!("../sql/erasure.sql", name = "erasure", requires = ["audit"]);
extension_sql_file!(
    "../sql/distribution.sql",
    name = "distribution",
    requires = ["erasure"]
);

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    context::register_settings();
    exposures::register_settings();
    cache::register_settings();
    cache::register_callbacks();
    rate_limits::register();
}

/// Required by `cargo pgrx test`.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    #[must_use]
    pub fn postgresql_conf_options() -> Vec<&'static str> {
        // Rate limits count in shared memory, reserved only at server start;
        // a small table, so a test can fill it.
        vec![
            "shared_preload_libraries = 'flagship'",
            "flagship.rate_limit_windows = 1024",
        ]
    }
}
