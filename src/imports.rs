//! The SQL face of the importers: translation in Rust (`flagship_engine::migration`),
//! storage through `put_flag` in `sql/migration.sql`, so imported flags pass
//! the same validation, policies and audit as any other write.

use pgrx::prelude::*;
use pgrx::JsonB;
use serde_json::Value;

use crate::errors::{invalid_parameter, raise};
use crate::postgres::jsonb::DocumentArg;
use flagship_engine::migration::{growthbook, unleash, ImportError};
use flagship_engine::rules::condition_documents::parse_conditions;
use flagship_engine::rules::Path;

fn refuse(source: &str, error: ImportError) -> ! {
    match error {
        ImportError::Unsupported(what) => raise(
            PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
            format!("{source} import: not supported: {what}"),
            Some("nothing was imported; change or remove it at the source and export again"),
        ),
        ImportError::Invalid(what) => invalid_parameter(format!("{source} import: {what}"), None),
    }
}

/// The flag documents an Unleash client state (or delta events) becomes,
/// configured for `environment`, parents before their dependants. Raises
/// 0A000 naming the first construct FlagShip cannot reproduce exactly.
#[pg_extern(immutable, parallel_safe)]
pub fn unleash_flag_documents(state: DocumentArg, environment: &str) -> JsonB {
    let state = state.value("unleash import: state");
    let documents =
        unleash::translate(&state, environment).unwrap_or_else(|error| refuse("unleash", error));
    JsonB(Value::Array(documents))
}

/// A GrowthBook targeting condition as FlagShip conditions (a JSON array
/// for a rule's or segment's `conditions`) that answer every context the
/// same way. `saved_groups` holds the lists `$inGroup` names. Raises 0A000
/// naming what cannot be reproduced.
#[pg_extern(immutable, parallel_safe)]
pub fn import_growthbook_condition(
    condition: DocumentArg,
    saved_groups: default!(DocumentArg, "'{}'"),
) -> JsonB {
    let condition = condition.value("growthbook import: condition");
    let groups = match saved_groups.value("growthbook import: saved_groups") {
        Value::Object(groups) => groups,
        Value::Null => Default::default(),
        _ => invalid_parameter(
            "growthbook import: saved_groups must be an object of group id: [values]",
            None,
        ),
    };
    let conditions = growthbook::translate_condition(&condition, &groups)
        .unwrap_or_else(|error| refuse("growthbook", error));
    let conditions = Value::Array(conditions);
    // What comes out must be what put_flag accepts.
    if let Err(error) = parse_conditions(Some(&conditions), Path::Text("conditions")) {
        invalid_parameter(format!("growthbook import: {error}"), None)
    }
    JsonB(conditions)
}
