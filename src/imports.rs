//! The SQL face of the importers: translation in Rust (`crate::migration`),
//! storage through `put_flag` in `sql/migration.sql`, so imported flags pass
//! the same validation, policies and audit as any other write.

use pgrx::prelude::*;
use pgrx::JsonB;
use serde_json::Value;

use crate::errors::{invalid_parameter, raise};
use crate::migration::{unleash, ImportError};

fn refuse(error: ImportError) -> ! {
    match error {
        ImportError::Unsupported(what) => raise(
            PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
            format!("unleash import: not supported: {what}"),
            Some("nothing was imported; change or remove it in Unleash and export again"),
        ),
        ImportError::Invalid(what) => invalid_parameter(format!("unleash import: {what}"), None),
    }
}

/// The flag documents an Unleash client state (or delta events) becomes,
/// configured for `environment`, parents before their dependants. Raises
/// 0A000 naming the first construct FlagShip cannot reproduce exactly.
#[pg_extern(immutable, parallel_safe)]
pub fn unleash_flag_documents(state: JsonB, environment: &str) -> JsonB {
    let documents = unleash::translate(&state.0, environment).unwrap_or_else(|error| refuse(error));
    JsonB(Value::Array(documents))
}
