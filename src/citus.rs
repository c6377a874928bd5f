//! FlagShip next to Citus: which node this backend runs on.
//!
//! `CREATE EXTENSION flagship` on a Citus coordinator reaches every worker,
//! but FlagShip's tables are not distributed (issue #21): the workers'
//! copies stay empty and the configuration lives on the coordinator. Citus
//! runs the functions of a query on a distributed table inside the shard
//! queries it sends to the workers, so `WHERE flagship_enabled(...)` there
//! would find no environment and answer false for every row. An evaluation
//! that finds nothing on a worker raises instead.

use std::cell::Cell;

use pgrx::prelude::*;

use crate::postgres::statement_reads::{self, Query};

thread_local! {
    /// This node's Citus group (0: the coordinator, or no Citus at all) and
    /// the transaction it was looked up in (its start time). Kept for one
    /// transaction only: a node becomes a worker when a coordinator adds
    /// it, and stops being one when it is removed.
    static GROUP: Cell<Option<(pg_sys::TimestampTz, i32)>> = const { Cell::new(None) };
}

/// `verify_api_key` calls this before it answers `NOT_FOUND`, and
/// `has_permission` before it answers false: on a Citus worker every key
/// and every member is unknown, and a pushed-down call would refuse every
/// row in silence. Executable by everyone (`has_permission` runs with its
/// caller's rights); it tells nothing but whether this node is a worker.
#[pg_extern(volatile, parallel_restricted)]
pub fn refuse_on_a_citus_worker() {
    refuse_on_a_worker();
}

/// The Citus group of this node: 0 on the coordinator and without Citus,
/// the worker's group otherwise.
fn group() -> i32 {
    let transaction = crate::postgres::backend::transaction_start();
    if let Some((looked_up_in, group)) = GROUP.with(Cell::get) {
        if looked_up_in == transaction {
            return group;
        }
    }
    let group = Spi::connect(|client| {
        let one =
            |sql: &str| statement_reads::select(client, Query::Text(sql), &[], 1).get::<i32>(0, 1);
        // The catalog exists only where the citus extension is created.
        match one(
            "SELECT 1 WHERE pg_catalog.to_regclass('pg_catalog.pg_dist_local_group') IS NOT NULL",
        ) {
            Some(_) => one("SELECT groupid FROM pg_catalog.pg_dist_local_group").unwrap_or(0),
            None => 0,
        }
    });
    GROUP.with(|cell| cell.set(Some((transaction, group))));
    group
}

/// Raises feature_not_supported when this backend runs on a Citus worker,
/// where FlagShip has no configuration: called before answering that an
/// environment was not found (evaluation, usage limits and metering look
/// one up), which there would be a silent wrong answer.
pub fn refuse_on_a_worker() {
    let group = group();
    if group != 0 {
        crate::errors::raise(
            PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
            format!(
                "FlagShip was called on a Citus worker (node group {group}), where it has no \
                 configuration: that lives on the coordinator, and FlagShip's tables are not \
                 distributed"
            ),
            Some(
                "Citus runs the functions of a query on a distributed table on the workers. \
                 Call FlagShip on the coordinator: over the rows a subquery brings back (add \
                 OFFSET 0 to it), or for the distinct values first, then join.",
            ),
        );
    }
}
