//! The pure rule engine: flag and segment documents, condition operators,
//! compiled environments and evaluation. No PostgreSQL here, so all of it is
//! tested with plain `cargo test`.

pub mod condition_documents;
pub mod conditions;
pub mod criteria;
pub mod document;
pub mod engine;
pub mod environment_config;
pub mod fields;
pub mod operators;
pub mod placement;
pub mod resolution;

#[cfg(test)]
mod tests;

pub use document::{parse_flag_definition, parse_flag_document, parse_segment};
pub use engine::Snapshot;
pub use fields::{Path, ValidationError, ROOT};
pub use resolution::{Denial, Entitlements, NoEntitlements, Reason, Resolution};
