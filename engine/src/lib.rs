//! FlagShip's pure core: everything that decides, with no PostgreSQL in
//! it. The extension (the workspace's root package) reads rows and
//! arguments, calls in here, and writes the answers back.
//!
//! - `rules`: flag and segment documents (parsing, validation), conditions,
//!   and the compiled snapshot that evaluates them;
//! - `bucketing`, `profiles`: where a subject falls in a rollout, and the
//!   hash profiles other systems use;
//! - `periods`, `limits`: usage periods and limit decisions;
//! - `migration`: the Unleash and GrowthBook translators;
//! - `merge_patch`: RFC 7396, for patching stored documents.
//!
//! `cargo test -p flagship-engine` runs all of it without a database.

#![forbid(unsafe_code)]

pub mod bucketing;
pub mod limits;
pub mod merge_patch;
pub mod migration;
pub mod periods;
pub mod profiles;
pub mod rate_window;
pub mod rules;

#[cfg(test)]
mod conformance_cases;
