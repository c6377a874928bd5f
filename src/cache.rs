//! Per-backend caches of compiled environments and of entitlements.
//!
//! Exactness comes from versions, cheapness from signals:
//! - Every changed configuration row bumps, in its own transaction, the
//!   version of its scope in `flagship.cache_versions` (its organization,
//!   project or environment; entitlements per organization). A compiled
//!   environment remembers the sum of the versions of its three scopes as
//!   read in the same statement that loaded its rows, so it is valid for a
//!   snapshot exactly when that snapshot sees the same sum: committed
//!   changes are seen, rolled-back ones never, own uncommitted ones at once.
//! - A statement trigger also sends a relcache invalidation of
//!   `flagship.features` (or `flagship.customers`). It reaches this backend
//!   at its next command and the others at commit, and only bumps a signal
//!   counter here: the next use of each cached entry compares versions (one
//!   query per identity and environment) instead of discarding anything, so
//!   one organization's changes cost another organization a version check,
//!   not a reload. Aborts bump the signals too.
//! - Invalidations are accepted when a statement starts and whenever the
//!   active snapshot has seen new commits, so statements inside a DO block or
//!   a loop see what a table read in them would.
//!
//! Compiled environments are keyed by the role, the organization as
//! row-level security sees it and the environment's id (however it was
//! named), and held within `flagship.cache_size`, least recently used
//! first out. With 0.2.0's SQL still installed (no version table yet, until
//! `ALTER EXTENSION flagship UPDATE`), every signal means a reload, as then.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::hash::Hash;
use std::rc::Rc;
use std::thread::LocalKey;

use rustc_hash::FxBuildHasher;

use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting};
use pgrx::prelude::*;

use crate::context::{IdentityKey, RawIdentity};
use crate::postgres::backend::{self, SnapshotAge};
use crate::postgres::{callbacks, statement_reads};

mod announcements;
mod checks;
mod entitlement_stamps;
use checks::read_one;
pub use checks::{read_changes, Checked};
pub use entitlement_stamps::{entitlement_signal, load_entitlement_document, stamped, Stamped};
use flagship_engine::rules::Snapshot;

/// Per organization (its uuid's bytes): when its entitlement version was last
/// confirmed, and the version seen then (`None`: the organization has none).
type EntitlementVersions = HashMap<[u8; 16], (Checked, Option<i64>), FxBuildHasher>;

static CACHE_SIZE_KB: GucSetting<i32> = GucSetting::<i32>::new(64 * 1024);

thread_local! {
    static CONFIGURATION_SIGNAL: Cell<u64> = const { Cell::new(0) };
    static ENTITLEMENT_SIGNAL: Cell<u64> = const { Cell::new(0) };
    /// What a snapshot must see to see every change signalled so far, per
    /// kind. A check made under a snapshot that may not see the change that
    /// sent a signal is not conclusive; see `Checked`.
    static CONFIGURATION_SIGNALLED_AT: Cell<Threshold> = const { Cell::new(Threshold::NoSignal) };
    static ENTITLEMENT_SIGNALLED_AT: Cell<Threshold> = const { Cell::new(Threshold::NoSignal) };
    static WATCHED_RELATION: Cell<pg_sys::Oid> = const { Cell::new(pg_sys::InvalidOid) };
    static WATCHED_ENTITLEMENTS: Cell<pg_sys::Oid> = const { Cell::new(pg_sys::InvalidOid) };
    static COMPILED: RefCell<Lru> = RefCell::new(Lru::default());
    static NAMES: RefCell<HashMap<IdentityKey, Named, FxBuildHasher>> =
        RefCell::new(HashMap::default());
    static RECENT: RefCell<Option<Recent>> = const { RefCell::new(None) };
    /// Environments compiled by this backend since it started.
    static LOADS: Cell<u64> = const { Cell::new(0) };
    /// Names located (each one query for the environment and its
    /// versions).
    static LOCATES: Cell<u64> = const { Cell::new(0) };
    /// The statement start and snapshot whose invalidations were last
    /// accepted; no statement starts at MIN, so the first call accepts.
    static ACCEPTED_AT: Cell<(pg_sys::TimestampTz, u64)> = const { Cell::new((i64::MIN, 0)) };
    static ENTITLEMENT_VERSIONS: RefCell<EntitlementVersions> = RefCell::new(HashMap::default());
    /// Bumped when a writing (sub)transaction aborts after this transaction
    /// loaded something while writing (`LoadStamp`).
    static ABORT_GENERATION: Cell<u64> = const { Cell::new(0) };
    static LOADED_WHILE_WRITING: Cell<bool> = const { Cell::new(false) };
}

/// Whether a cached value may hold this backend's own uncommitted writes.
/// Versions are counters: a value compiled under a version an aborted
/// transaction of this backend wrote (V+1) would match a later, different
/// V+1. Values loaded while the transaction had written are dropped when a
/// writing (sub)transaction of this backend aborts.
#[derive(Clone, Copy, Debug)]
struct LoadStamp {
    while_writing: bool,
    generation: u64,
}

impl LoadStamp {
    fn now() -> LoadStamp {
        let while_writing = backend::top_transaction_id_if_any() != pg_sys::InvalidTransactionId;
        if while_writing {
            LOADED_WHILE_WRITING.with(|loaded| loaded.set(true));
        }
        LoadStamp {
            while_writing,
            generation: ABORT_GENERATION.with(Cell::get),
        }
    }

    fn revoked(&self) -> bool {
        self.while_writing && self.generation != ABORT_GENERATION.with(Cell::get)
    }
}

pub fn register_settings() {
    GucRegistry::define_int_guc(
        c"flagship.cache_size",
        c"Memory for compiled environments per backend, in kB.",
        c"Least recently used environments are dropped beyond it and compiled again on their next use.",
        &CACHE_SIZE_KB,
        64,
        i32::MAX / 1024,
        GucContext::Userset,
        GucFlags::UNIT_KB,
    );
    #[cfg(feature = "pg_test")]
    GucRegistry::define_bool_guc(
        c"flagship.test_hold_commit_signals",
        c"Test builds only: keep this session's commit invalidations back.",
        c"",
        &HOLD_COMMIT_SIGNALS,
        GucContext::Suset,
        GucFlags::default(),
    );
}

/// What an environment name resolved to.
#[derive(Clone)]
pub enum Resolved {
    /// The environment's compiled flags and its id.
    Found(Rc<Snapshot>, pgrx::Uuid),
    NotFound(String),
}

/// What a name located, valid while the signal it was read at holds.
#[derive(Clone)]
pub enum Located {
    /// The environment's id, the version its compiled form must have, and
    /// the organization it belongs to.
    Found(pgrx::Uuid, Option<i64>, pgrx::Uuid),
    NotFound(String),
}

struct Named {
    checked: Checked,
    located: Located,
}

/// The last identity a call resolved and what it resolved to: most
/// sessions evaluate in one environment under one identity, so most calls
/// end here with a few byte comparisons instead of a hashed lookup.
struct Recent {
    checked: Checked,
    identity: IdentityKey,
    resolved: Resolved,
}

/// Whose compiled environment: row-level security decides what a load
/// sees from the role and the organization.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CompiledKey {
    pub user: pg_sys::Oid,
    pub organization: Option<[u8; 16]>,
    pub environment: [u8; 16],
}

/// A freshly compiled environment, the versions its rows were read at, and
/// an estimate of its size in memory.
pub struct Loaded {
    pub snapshot: Snapshot,
    pub version: Option<i64>,
    pub bytes: usize,
}

struct Compiled {
    version: Option<i64>,
    snapshot: Rc<Snapshot>,
    bytes: usize,
    used: u64,
    stamp: LoadStamp,
}

#[derive(Default)]
struct Lru {
    entries: HashMap<CompiledKey, Compiled, FxBuildHasher>,
    bytes: usize,
    clock: u64,
}

impl Lru {
    /// Drops least recently used entries until `limit` holds, sparing `keep`.
    fn evict(&mut self, limit: usize, keep: &CompiledKey) {
        while self.bytes > limit && self.entries.len() > 1 {
            let oldest = self
                .entries
                .iter()
                .filter(|(key, _)| *key != keep)
                .min_by_key(|(_, entry)| entry.used)
                .map(|(key, _)| key.clone());
            let Some(oldest) = oldest else { break };
            if let Some(entry) = self.entries.remove(&oldest) {
                self.bytes -= entry.bytes;
            }
        }
    }
}

fn cache_limit_bytes() -> usize {
    usize::try_from(CACHE_SIZE_KB.get()).unwrap_or(0) * 1024
}

/// What the backend holds, for tests and the benchmarks: compiled
/// environments, their estimated bytes, located names.
pub fn usage() -> (usize, usize, usize) {
    let (entries, bytes) = COMPILED.with(|lru| {
        let lru = lru.borrow();
        (lru.entries.len(), lru.bytes)
    });
    (entries, bytes, NAMES.with(|names| names.borrow().len()))
}

/// Picks up other sessions' committed changes when a statement starts and
/// whenever transactions have completed since the last look, so a
/// statement sees every change committed before its snapshot, even inside
/// a DO block or a loop. Later evaluations under the same snapshot do not
/// look again: a query filtering a million rows on a flag pays for the
/// guarded call once. This backend's own changes arrive at its next command.
pub fn accept_invalidations() {
    let seen = (backend::statement_start(), backend::completions_now());
    if ACCEPTED_AT.replace(seen) != seen {
        // Runs our relcache callback, which only bumps counters.
        backend::accept_invalidation_messages();
    }
    // An announced commit this snapshot sees ended is signalled now, as its
    // invalidation would be, in case that has not arrived yet. The bound is
    // this snapshot's age: every snapshot that sees all it saw sees those
    // commits, and a check made under an older one (a cursor's) after this
    // does not vouch for later ones.
    let (configuration, entitlements) = announcements::settle();
    if configuration || entitlements {
        let seen_by = backend::active_snapshot_age().map_or(Threshold::Fresh, Threshold::Seen);
        if configuration {
            signal_configuration(seen_by);
        }
        if entitlements {
            signal_entitlements(seen_by);
        }
    }
}

/// What a snapshot must see to see the changes signalled so far.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Threshold {
    NoSignal,
    /// Everything a snapshot of this age saw ended (`checks::sees_all_of`).
    Seen(SnapshotAge),
    /// Everything that had ended when the last signal arrived: read as the
    /// age of a snapshot taken at the next check (later than needed, so
    /// never too lenient). The invalidation callback that receives the
    /// signal cannot take a snapshot itself.
    Fresh,
}

impl Threshold {
    /// The stricter of two thresholds: the later age (a later snapshot sees
    /// all an earlier one saw).
    fn and(self, other: Threshold) -> Threshold {
        match (self, other) {
            (Threshold::Fresh, _) | (_, Threshold::Fresh) => Threshold::Fresh,
            (Threshold::NoSignal, other) | (other, Threshold::NoSignal) => other,
            (Threshold::Seen(mine), Threshold::Seen(theirs)) => {
                if checks::sees_all_of(mine, theirs) {
                    Threshold::Seen(mine)
                } else {
                    Threshold::Seen(theirs)
                }
            }
        }
    }
}

fn bump(signal: &'static LocalKey<Cell<u64>>) {
    signal.with(|signal| signal.set(signal.get().wrapping_add(1)));
}

pub fn configuration_signal() -> u64 {
    CONFIGURATION_SIGNAL.with(Cell::get)
}

pub fn recall(identity: &RawIdentity) -> Option<Resolved> {
    RECENT.with(|recent| {
        recent
            .borrow()
            .as_ref()
            .filter(|recent| {
                recent.checked.holds_for_configuration() && identity.is(&recent.identity)
            })
            .map(|recent| recent.resolved.clone())
    })
}

pub fn remember(identity: IdentityKey, checked: Checked, resolved: Resolved) {
    RECENT.with(|recent| {
        *recent.borrow_mut() = Some(Recent {
            checked,
            identity,
            resolved,
        })
    });
}

/// Where this identity's environment name pointed, and the check that
/// vouches for it, while that check holds.
pub fn located(identity: &IdentityKey) -> Option<(Located, Checked)> {
    NAMES.with(|names| {
        names
            .borrow()
            .get(identity)
            .filter(|named| named.checked.holds_for_configuration())
            .map(|named| (named.located.clone(), named.checked))
    })
}

/// Names kept at most, each a few hundred bytes; started over beyond.
const MAX_NAMES: usize = 65_536;

pub fn remember_location(identity: IdentityKey, checked: Checked, located: Located) {
    LOCATES.with(|locates| locates.set(locates.get() + 1));
    NAMES.with(|names| {
        let mut names = names.borrow_mut();
        if names.len() >= MAX_NAMES {
            names.clear();
        }
        names.insert(identity, Named { checked, located });
    });
}

/// The compiled environment for `key` at `version` (the versions the
/// current snapshot sees), compiled by `load` when the cache holds none or
/// an older one. Not borrowed while loading, which runs queries.
pub fn compiled(
    key: CompiledKey,
    version: Option<i64>,
    load: impl FnOnce() -> Loaded,
) -> Rc<Snapshot> {
    let hit = COMPILED.with(|lru| {
        let mut lru = lru.borrow_mut();
        lru.clock += 1;
        let clock = lru.clock;
        let entry = lru.entries.get_mut(&key)?;
        if version.is_none() || entry.version != version || entry.stamp.revoked() {
            return None;
        }
        entry.used = clock;
        Some(entry.snapshot.clone())
    });
    if let Some(snapshot) = hit {
        return snapshot;
    }
    let stamp = LoadStamp::now();
    let loaded = load();
    LOADS.with(|loads| loads.set(loads.get() + 1));
    let snapshot = Rc::new(loaded.snapshot);
    COMPILED.with(|lru| {
        let mut lru = lru.borrow_mut();
        let used = lru.clock;
        if let Some(old) = lru.entries.insert(
            key.clone(),
            Compiled {
                version: loaded.version,
                snapshot: snapshot.clone(),
                bytes: loaded.bytes,
                used,
                stamp,
            },
        ) {
            lru.bytes -= old.bytes;
        }
        lru.bytes += loaded.bytes;
        lru.evict(cache_limit_bytes(), &key);
    });
    snapshot
}

/// Whether this database has 0.3.0's version table (not before
/// `ALTER EXTENSION flagship UPDATE` from 0.2.0).
pub fn versioned() -> bool {
    backend::relation_exists(c"flagship", c"cache_versions")
}

/// The SQL for the sum of the configuration versions of the environment
/// whose id `environment` gives, in the organization `organization` gives
/// (its organization, project and itself), as the statement's snapshot
/// sees them; NULL before 0.3.0's SQL is installed.
pub fn configuration_version_sql(environment: &str, organization: &str) -> String {
    if versioned() {
        format!(
            "(SELECT coalesce(sum(v.configuration), 0)::bigint \
                FROM flagship.environments ve \
                JOIN flagship.cache_versions v ON v.organization_id = ve.organization_id \
                 AND v.scope IN (ve.organization_id, ve.project_id, ve.id) \
               WHERE ve.organization_id = {organization} AND ve.id = {environment})"
        )
    } else {
        "NULL::bigint".to_string()
    }
}

/// Remembers which relation's invalidations signal configuration changes.
pub fn watch_configuration(relation: pg_sys::Oid) {
    WATCHED_RELATION.with(|watched| watched.set(relation));
}

/// Signals a configuration change that a snapshot sees once it meets
/// `seen_by` (see `checks::sees_everything_since`).
fn signal_configuration(seen_by: Threshold) {
    bump(&CONFIGURATION_SIGNAL);
    CONFIGURATION_SIGNALLED_AT.with(|at| at.set(at.get().and(seen_by)));
}

fn signal_entitlements(seen_by: Threshold) {
    bump(&ENTITLEMENT_SIGNAL);
    ENTITLEMENT_SIGNALLED_AT.with(|at| at.set(at.get().and(seen_by)));
}

/// Signals what depends on `relation`: entitlements for their relation,
/// configuration for the flags' relation, both for InvalidOid
/// ("everything may have changed", e.g. after an invalidation queue
/// overflow), nothing otherwise. The change that sent the invalidation had
/// completed before it was sent, so a snapshot taken after it arrived sees
/// it (`Threshold::Fresh`).
fn signal_for(relation: pg_sys::Oid) {
    if relation == pg_sys::InvalidOid {
        signal_configuration(Threshold::Fresh);
        signal_entitlements(Threshold::Fresh);
    } else if relation == WATCHED_ENTITLEMENTS.with(Cell::get) {
        signal_entitlements(Threshold::Fresh);
    } else if relation == WATCHED_RELATION.with(Cell::get) {
        signal_configuration(Threshold::Fresh);
    }
}

/// An abort (of a transaction or a savepoint) may take back rows this
/// backend compiled: everything is checked against the versions again.
fn on_transaction_event(event: pg_sys::XactEvent::Type) {
    announcements::on_transaction_event(event);
    if event == pg_sys::XactEvent::XACT_EVENT_ABORT
        || event == pg_sys::XactEvent::XACT_EVENT_PARALLEL_ABORT
    {
        forget_changes_if(backend::top_transaction_id_if_any());
        signal_for(pg_sys::InvalidOid);
    }
    if crate::context::ends_transaction(event) {
        LOADED_WHILE_WRITING.with(|loaded| loaded.set(false));
    }
}

fn on_subtransaction_event(
    event: pg_sys::SubXactEvent::Type,
    _subtransaction: pg_sys::SubTransactionId,
    _parent: pg_sys::SubTransactionId,
) {
    if event == pg_sys::SubXactEvent::SUBXACT_EVENT_ABORT_SUB {
        forget_changes_if(backend::current_transaction_id_if_any());
        signal_for(pg_sys::InvalidOid);
    }
}

/// A (sub)transaction that wrote and aborted takes back versions this
/// backend may have seen uncommitted; its rows' `changed_by` go back to older
/// writers, which no read would report. Every check is then repeated with
/// a query, and organizations are tracked anew.
fn forget_changes_if(writer: pg_sys::TransactionId) {
    if writer != pg_sys::InvalidTransactionId {
        checks::forget_tracked();
        if LOADED_WHILE_WRITING.with(Cell::get) {
            ABORT_GENERATION.with(|generation| generation.set(generation.get() + 1));
        }
    }
}

/// Registers the one relcache callback this library uses (a backend has
/// only ten slots, shared by every extension) and the abort callbacks.
pub fn register_callbacks() {
    callbacks::on_relation_invalidation(signal_for);
    callbacks::on_catalog_cache_invalidation(
        backend::CONFIGURATION_ANNOUNCEMENTS,
        announcements::on_configuration_announcement,
    );
    callbacks::on_catalog_cache_invalidation(
        backend::ENTITLEMENT_ANNOUNCEMENTS,
        announcements::on_entitlement_announcement,
    );
    callbacks::on_transaction_event(on_transaction_event);
    callbacks::on_subtransaction_event(on_subtransaction_event);
}

/// Called by the statement triggers on configuration tables (the function
/// `flagship.configuration_changed`, not the FlagShip roles: it is not
/// executable by PUBLIC). Takes the relation to signal, which the trigger
/// names (`'flagship.features'::regclass`).
#[pg_extern(volatile, parallel_unsafe)]
pub fn invalidate_cache(relation: pg_sys::Oid) {
    let signal = backend::signal_relation_for(relation);
    if !holding_commit_signals() {
        backend::invalidate_relation(signal);
    }
    // A backend learns which relation is which when it first loads; one
    // that has not announces both kinds (a receiver checks once more).
    if signal != WATCHED_ENTITLEMENTS.with(Cell::get) {
        announcements::wrote(announcements::Change::Configuration);
    }
    if signal != WATCHED_RELATION.with(Cell::get) {
        announcements::wrote(announcements::Change::Entitlements);
    }
    signal_for(signal);
}

/// Test builds only: `flagship.test_hold_commit_signals` keeps a writer's
/// commit invalidations back, so a test can show that the announcement
/// alone makes other backends see the commit (the window between a commit
/// becoming visible and its invalidation arriving, held open).
#[cfg(feature = "pg_test")]
fn holding_commit_signals() -> bool {
    HOLD_COMMIT_SIGNALS.get()
}

#[cfg(not(feature = "pg_test"))]
fn holding_commit_signals() -> bool {
    false
}

#[cfg(feature = "pg_test")]
static HOLD_COMMIT_SIGNALS: GucSetting<bool> = GucSetting::<bool>::new(false);

/// This backend's cache, for tests and DBAs: compiled environments, their
/// estimated size in bytes, located environment names, and since it
/// started how many environments it compiled, names it located and change
/// reads it made.
#[pg_extern(volatile, parallel_unsafe)]
pub fn cache_usage() -> pgrx::JsonB {
    let (environments, bytes, names) = usage();
    pgrx::JsonB(serde_json::json!({
        "environments": environments,
        "bytes": bytes,
        "names": names,
        "loads": LOADS.with(Cell::get),
        "locates": LOCATES.with(Cell::get),
        "change_reads": checks::change_reads(),
        "announcements_pending": announcements::pending(),
        "limit_bytes": cache_limit_bytes(),
    }))
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    // In a file of its own to keep this one short; #[pg_schema] needs the
    // module inline.
    include!("cache/tests.rs");
}
