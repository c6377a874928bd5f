//! Integration tests against a real PostgreSQL server with the extension
//! installed, using several connections at once: cache invalidation across
//! sessions, rollback, isolation between organizations, dump and restore.
//!
//! Run them with the README's test command, or one of them with
//! `cargo pgrx test pg15 --runas postgres --pgdata /tmp/fs-pg <name>`.

mod audit;
mod credits;
mod customer_keys;
mod dump_restore;
mod erasure;
mod escrow;
mod events;
mod exposures;
mod harness;
mod invalidation;
mod isolation;
mod keys;
mod migration;
mod operations;
mod rate_limits;
mod reservations;
mod security;
mod tenants;
mod upgrade;
mod usage;
