//! Importers from other flag systems. Pure translation to FlagShip
//! documents (no PostgreSQL here); `crate::imports` stores them.

pub mod growthbook;
pub mod unleash;

#[cfg(test)]
mod growthbook_conformance;
#[cfg(test)]
mod unleash_conformance;

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImportError {
    /// A construct FlagShip cannot reproduce exactly (SQLSTATE 0A000).
    Unsupported(String),
    /// A malformed export (SQLSTATE 22023).
    Invalid(String),
}

impl fmt::Display for ImportError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ImportError::Unsupported(what) => write!(f, "not supported: {what}"),
            ImportError::Invalid(what) => write!(f, "{what}"),
        }
    }
}
