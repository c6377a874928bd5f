//! The one module that calls PostgreSQL's C functions and touches its
//! pointers. Everything above it is safe Rust: the crate root denies
//! `unsafe_code` and only this module allows it, so the compiler holds the
//! boundary. What the types here promise:
//!
//! - `jsonb`: arguments read in place (`JsonbArg<'fcx>` borrows the call's
//!   memory) and results built in place (`Builder<'a>` borrows what it is
//!   given until it copies it);
//! - `args`: the argument ABI for those borrowed types;
//! - `statement_reads`: read-only SPI queries under the statement's
//!   snapshot, whose rows cannot outlive the connection (`Rows<'c>`);
//! - `backend`: transaction, snapshot, user and invalidation state;
//! - `callbacks`: PostgreSQL's callbacks as plain Rust functions;
//! - `settings`: settings read without copying;
//! - `shared_windows`: rate-limit windows in shared memory, each slot
//!   touched only under its partition's lock;
//! - `subtransaction`: an internal subtransaction rolled back unless
//!   released;
//! - `unguarded`: the few C functions called without pgrx's error guard.
#![allow(unsafe_code)]

pub mod args;
pub mod backend;
pub mod callbacks;
pub mod jsonb;
pub mod settings;
pub mod shared_windows;
pub mod statement_reads;
pub mod subtransaction;
pub mod unguarded;
