//! Per-backend cache of compiled environments.
//!
//! Writes to configuration tables fire a statement trigger that calls
//! `CacheInvalidateRelcacheByRelid` on `flagship.features`. PostgreSQL
//! delivers that invalidation to the writing backend at its next command
//! (so it sees its own uncommitted change) and, once the write commits, to
//! every other backend at its next statement that evaluates (see
//! `accept_invalidations_once_per_statement`); our one relcache callback
//! then bumps a generation counter and every compiled environment built
//! before it is discarded.
//! An abort (of a transaction or a savepoint) bumps the counter too, since
//! this backend may have compiled rows that no longer exist.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::hash::Hash;
use std::rc::Rc;
use std::thread::LocalKey;

use rustc_hash::FxBuildHasher;

use pgrx::prelude::*;

use crate::context::{IdentityKey, RawIdentity};
use crate::rules::Snapshot;

/// Above this many compiled environments, start over rather than grow.
const MAX_ENTRIES: usize = 256;

thread_local! {
    static GENERATION: Cell<u64> = const { Cell::new(0) };
    static WATCHED_RELATION: Cell<pg_sys::Oid> = const { Cell::new(pg_sys::InvalidOid) };
    /// Customers, subscriptions and plans change far more often than flags,
    /// so they stamp a cache of their own, invalidated through
    /// `flagship.customers`, and leave compiled flags alone.
    static ENTITLEMENT_GENERATION: Cell<u64> = const { Cell::new(0) };
    static WATCHED_ENTITLEMENTS: Cell<pg_sys::Oid> = const { Cell::new(pg_sys::InvalidOid) };
    static ENTRIES: RefCell<HashMap<CacheKey, Entry>> = RefCell::new(HashMap::new());
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CacheKey {
    /// Row-level security depends on who asks and for which organization.
    pub user: pg_sys::Oid,
    pub organization: Option<[u8; 16]>,
    pub environment: String,
}

/// What an environment name resolved to when it was cached.
#[derive(Clone)]
pub enum Resolved {
    /// The environment's compiled flags and its id.
    Found(Rc<Snapshot>, pgrx::Uuid),
    NotFound(String),
}

struct Entry {
    generation: u64,
    resolved: Resolved,
}

/// The last identity a call resolved and what it resolved to: most
/// sessions evaluate in one environment under one identity, so most calls
/// end here with a few byte comparisons instead of a hashed lookup.
struct Recent {
    generation: u64,
    identity: IdentityKey,
    resolved: Resolved,
}

thread_local! {
    static RECENT: RefCell<Option<Recent>> = const { RefCell::new(None) };
}

thread_local! {
    /// The start of the statement whose invalidations were last accepted; no
    /// statement starts at MIN, so the first evaluation always accepts.
    static STATEMENT_SEEN: Cell<pg_sys::TimestampTz> = const { Cell::new(i64::MIN) };
}

/// Picks up other sessions' committed changes at the first evaluation of
/// every statement, even inside a long transaction. Later evaluations in
/// the same statement do not look again: a query filtering a million rows
/// on a flag pays for the guarded call once, and normally sees one version
/// of the flag throughout. This backend's own changes do not wait for it:
/// they arrive at its next command.
pub fn accept_invalidations_once_per_statement() {
    // SAFETY: returns a backend global; it neither allocates nor raises.
    let statement = unsafe { crate::unguarded::GetCurrentStatementStartTimestamp() };
    if STATEMENT_SEEN.replace(statement) != statement {
        // SAFETY: guarded; it runs our (guarded) relcache callback, which
        // only bumps counters, and may raise on a broken invalidation queue.
        unsafe { pg_sys::AcceptInvalidationMessages() };
    }
}

pub fn recall(identity: &RawIdentity) -> Option<Resolved> {
    let current = generation();
    RECENT.with(|recent| {
        recent
            .borrow()
            .as_ref()
            .filter(|recent| recent.generation == current && identity.is(&recent.identity))
            .map(|recent| recent.resolved.clone())
    })
}

pub fn remember(identity: IdentityKey, built_at: u64, resolved: Resolved) {
    RECENT.with(|recent| {
        *recent.borrow_mut() = Some(Recent {
            generation: built_at,
            identity,
            resolved,
        })
    });
}

pub fn generation() -> u64 {
    GENERATION.with(Cell::get)
}

fn bump() {
    GENERATION.with(|generation| generation.set(generation.get().wrapping_add(1)));
    bump_entitlements();
}

fn bump_entitlements() {
    ENTITLEMENT_GENERATION.with(|generation| generation.set(generation.get().wrapping_add(1)));
}

pub fn entitlement_generation() -> u64 {
    ENTITLEMENT_GENERATION.with(Cell::get)
}

/// Values loaded from plans and customers, valid while the entitlement
/// generation they were loaded at holds; emptied rather than grown past
/// `limit` entries.
pub struct Stamped<K, V> {
    entries: HashMap<K, (u64, V), FxBuildHasher>,
    limit: usize,
}

impl<K, V> Stamped<K, V> {
    pub fn new(limit: usize) -> Stamped<K, V> {
        Stamped {
            entries: HashMap::default(),
            limit,
        }
    }
}

/// The cached value for `key`, or what `load` returns (then cached). The
/// cache is not borrowed while loading, which may run queries that come
/// back here.
pub fn stamped<K: Hash + Eq, V: Clone>(
    cache: &'static LocalKey<RefCell<Stamped<K, V>>>,
    key: K,
    load: impl FnOnce() -> V,
) -> V {
    let current = entitlement_generation();
    let cached = cache.with(|cache| {
        cache
            .borrow()
            .entries
            .get(&key)
            .filter(|(generation, _)| *generation == current)
            .map(|(_, value)| value.clone())
    });
    if let Some(value) = cached {
        return value;
    }
    let loaded = load();
    cache.with(|cache| {
        let mut cache = cache.borrow_mut();
        if cache.entries.len() >= cache.limit {
            cache.entries.clear();
        }
        cache.entries.insert(key, (current, loaded.clone()));
    });
    loaded
}

/// Runs `function(arguments)`, a SQL function returning jsonb about plans
/// and customers, and notes the relation whose invalidations stale it.
pub fn load_entitlement_document(
    function: &str,
    arguments: &[pgrx::datum::DatumWithOid<'_>],
) -> Option<serde_json::Value> {
    let placeholders: Vec<String> = (1..=arguments.len()).map(|n| format!("${n}")).collect();
    let query = format!(
        "SELECT 'flagship.customers'::regclass::oid, flagship.{function}({})::text",
        placeholders.join(", ")
    );
    let (watched, document) = Spi::connect(|client| {
        let row = client.select(&query, Some(1), arguments)?.first();
        Ok::<_, pgrx::spi::Error>((row.get::<pg_sys::Oid>(1)?, row.get::<String>(2)?))
    })
    .unwrap_or_else(|error| panic!("{function}: {error}"));
    if let Some(watched) = watched {
        watch_entitlements(watched);
    }
    // Read as text and parsed here, so that a stored document too deep or
    // too large to read (written around the CHECK constraints) makes this
    // one customer unknown, with a warning, instead of raising inside an
    // evaluation.
    match crate::jsonb::parse_document(&document?) {
        Ok(document) => Some(document),
        Err(why) => {
            pgrx::warning!(
                "flagship.{function}: the stored document {why}; answering as if it did not exist"
            );
            None
        }
    }
}

/// Remembers which relation's invalidations stale the entitlement cache.
pub fn watch_entitlements(relation: pg_sys::Oid) {
    WATCHED_ENTITLEMENTS.with(|watched| watched.set(relation));
}

/// Stales what depends on `relation`: entitlements alone for their
/// relation, everything for the flags' relation or InvalidOid ("everything
/// changed", e.g. after an invalidation queue overflow), nothing otherwise.
fn bump_for(relation: pg_sys::Oid) {
    let entitlements = WATCHED_ENTITLEMENTS.with(Cell::get);
    if relation != pg_sys::InvalidOid && relation == entitlements {
        bump_entitlements();
    } else if relation == pg_sys::InvalidOid || relation == WATCHED_RELATION.with(Cell::get) {
        bump();
    }
}

pub fn lookup(key: &CacheKey) -> Option<Resolved> {
    let current = generation();
    ENTRIES.with(|entries| {
        entries
            .borrow()
            .get(key)
            .filter(|entry| entry.generation == current)
            .map(|entry| entry.resolved.clone())
    })
}

/// Stores what was built, stamped with the generation observed *before*
/// building, so an invalidation that arrived meanwhile makes it stale.
pub fn store(key: CacheKey, built_at: u64, resolved: Resolved, watched: pg_sys::Oid) {
    WATCHED_RELATION.with(|relation| relation.set(watched));
    ENTRIES.with(|entries| {
        let mut entries = entries.borrow_mut();
        if entries.len() >= MAX_ENTRIES {
            entries.clear();
        }
        entries.retain(|_, entry| entry.generation == generation());
        entries.insert(
            key,
            Entry {
                generation: built_at,
                resolved,
            },
        );
    });
}

// The three callbacks are called only by PostgreSQL, with the arguments its
// callback types promise; #[pg_guard] turns a panic into an ERROR rather
// than unwinding into C. They only bump counters.
#[pg_guard]
unsafe extern "C-unwind" fn on_relcache_invalidation(_arg: pg_sys::Datum, relid: pg_sys::Oid) {
    // InvalidOid means "everything" (e.g. after an invalidation queue overflow).
    bump_for(relid);
}

#[pg_guard]
unsafe extern "C-unwind" fn on_transaction_event(
    event: pg_sys::XactEvent::Type,
    _arg: *mut std::ffi::c_void,
) {
    if event == pg_sys::XactEvent::XACT_EVENT_ABORT
        || event == pg_sys::XactEvent::XACT_EVENT_PARALLEL_ABORT
    {
        bump();
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn on_subtransaction_event(
    event: pg_sys::SubXactEvent::Type,
    _subid: pg_sys::SubTransactionId,
    _parent: pg_sys::SubTransactionId,
    _arg: *mut std::ffi::c_void,
) {
    if event == pg_sys::SubXactEvent::SUBXACT_EVENT_ABORT_SUB {
        bump();
    }
}

/// Registers the one relcache callback this library uses (a backend has
/// only ten slots, shared by every extension) and the abort callbacks.
pub fn register_callbacks() {
    // SAFETY: called once from _PG_init, in the backend's main thread.
    unsafe {
        pg_sys::CacheRegisterRelcacheCallback(
            Some(on_relcache_invalidation),
            pg_sys::Datum::from(0),
        );
        pg_sys::RegisterXactCallback(Some(on_transaction_event), std::ptr::null_mut());
        pg_sys::RegisterSubXactCallback(Some(on_subtransaction_event), std::ptr::null_mut());
    }
}

/// Called by the statement triggers on configuration tables. Takes the
/// relation to invalidate so the trigger names it (`'flagship.features'::regclass`).
#[pg_extern(volatile, parallel_unsafe)]
pub fn invalidate_cache(relation: pg_sys::Oid) {
    // SAFETY: registers a relcache invalidation for the current transaction;
    // PostgreSQL sends it to other backends at commit and drops it on abort.
    unsafe { pg_sys::CacheInvalidateRelcacheByRelid(relation) };
    bump_for(relation);
}
