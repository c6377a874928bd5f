//! PostgreSQL functions called without pgrx's error guard.
//!
//! pgrx wraps every `pg_sys` call in `sigsetjmp` so that an ERROR raised in C
//! unwinds Rust frames properly. On the evaluation hot path that guard costs
//! more than the calls themselves. The functions declared here cannot raise
//! an error or allocate (they read backend state or a container and fill a
//! struct the caller owns), so there is nothing to guard against; anything
//! that can raise stays on the guarded `pg_sys` bindings.

use std::ffi::{c_char, c_int};

use pgrx::pg_sys::{JsonbContainer, JsonbValue, Oid, Snapshot, TimestampTz};

extern "C" {
    /// Binary search of an object container's keys (jsonb_util.c); given
    /// `res` it neither allocates nor raises.
    pub fn getKeyJsonValueFromContainer(
        container: *mut JsonbContainer,
        key: *const c_char,
        key_len: c_int,
        res: *mut JsonbValue,
    ) -> *mut JsonbValue;

    /// The current user id (miscinit.c): returns a backend global.
    pub fn GetUserId() -> Oid;

    /// When the current top-level statement started (xact.c): returns a
    /// backend global.
    pub fn GetCurrentStatementStartTimestamp() -> TimestampTz;

    /// Whether a snapshot is active (snapmgr.c): reads a backend global.
    pub fn ActiveSnapshotSet() -> bool;

    /// The active snapshot (snapmgr.c): returns a backend global; only
    /// call it when `ActiveSnapshotSet` says there is one.
    pub fn GetActiveSnapshot() -> Snapshot;
}
