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

pub fn raise(code: PgSqlErrorCode, message: impl Into<String>, hint: Option<&str>) -> ! {
    let mut report = ErrorReport::new(code, message.into(), "flagship");
    if let Some(hint) = hint {
        report = report.set_hint(hint);
    }
    report.report(PgLogLevel::ERROR);
    unreachable!("ereport(ERROR) returned")
}
