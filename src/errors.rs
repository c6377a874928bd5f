//! Raising errors with a precise SQLSTATE. pgrx keeps an error's SQLSTATE
//! only when it travels as an `ErrorReport`; anything else becomes XX000.

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;

/// Raises `invalid_parameter_value` (22023) naming what was wrong and where.
pub fn invalid_parameter(message: impl Into<String>, hint: Option<&str>) -> ! {
    raise(
        PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
        message,
        hint,
    )
}

/// An argument a call cannot do without: NULL raises 22023 naming it.
/// (These functions are not STRICT, because other arguments may be NULL;
/// pgrx would otherwise turn the NULL into an internal error, XX000.)
pub fn required<T>(value: Option<T>, field: &str) -> T {
    value.unwrap_or_else(|| invalid_parameter(format!("{field}: must not be NULL"), None))
}

pub fn raise(code: PgSqlErrorCode, message: impl Into<String>, hint: Option<&str>) -> ! {
    let mut report = ErrorReport::new(code, message.into(), "flagship");
    if let Some(hint) = hint {
        report = report.set_hint(hint);
    }
    report.report(PgLogLevel::ERROR);
    unreachable!("ereport(ERROR) returned")
}
