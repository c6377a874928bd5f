//! PostgreSQL's callbacks (relcache invalidation, transaction and
//! subtransaction end), registered with plain safe Rust functions. The
//! function travels as the callback's argument, so one trampoline per
//! callback type serves every module; the trampolines are guarded, so a
//! panic becomes an ERROR instead of unwinding into C.

use std::ffi::c_void;

use pgrx::pg_guard;
use pgrx::pg_sys;

pub type RelationCallback = fn(pg_sys::Oid);
/// The hash value of a catalog cache invalidation (0: everything).
pub type CatalogCacheCallback = fn(u32);
pub type TransactionCallback = fn(pg_sys::XactEvent::Type);
/// The event, the subtransaction that ends, and its parent.
pub type SubtransactionCallback =
    fn(pg_sys::SubXactEvent::Type, pg_sys::SubTransactionId, pg_sys::SubTransactionId);

/// Calls `callback` with the relation of every relcache invalidation this
/// backend processes (InvalidOid: everything may have changed). A backend
/// has only ten slots, shared by every extension: register once.
/// Call from `_PG_init`.
pub fn on_relation_invalidation(callback: RelationCallback) {
    // SAFETY: registers a function of the type PostgreSQL expects; the
    // argument is `callback` itself, a plain fn that lives as long as the
    // library.
    unsafe {
        pg_sys::CacheRegisterRelcacheCallback(
            Some(relation_trampoline),
            pg_sys::Datum::from(callback as usize),
        );
    }
}

/// Calls `callback` with the hash value of every invalidation of the
/// catalog cache `cache` this backend processes (0 after an invalidation
/// queue overflow). Call from `_PG_init`.
pub fn on_catalog_cache_invalidation(cache: i32, callback: CatalogCacheCallback) {
    // SAFETY: as for on_relation_invalidation; `cache` is a valid
    // SysCacheIdentifier (PostgreSQL raises otherwise).
    unsafe {
        pg_sys::CacheRegisterSyscacheCallback(
            cache,
            Some(catalog_cache_trampoline),
            pg_sys::Datum::from(callback as usize),
        );
    }
}

/// Calls `callback` with every transaction event. Call from `_PG_init`.
pub fn on_transaction_event(callback: TransactionCallback) {
    // SAFETY: as for on_relation_invalidation.
    unsafe {
        pg_sys::RegisterXactCallback(Some(transaction_trampoline), callback as *mut c_void);
    }
}

/// Calls `callback` with every subtransaction event. Call from `_PG_init`.
pub fn on_subtransaction_event(callback: SubtransactionCallback) {
    // SAFETY: as for on_relation_invalidation.
    unsafe {
        pg_sys::RegisterSubXactCallback(Some(subtransaction_trampoline), callback as *mut c_void);
    }
}

// Called only by PostgreSQL, with the argument registered above: a
// function pointer of the matching type, turned back into one.
#[pg_guard]
unsafe extern "C-unwind" fn relation_trampoline(argument: pg_sys::Datum, relation: pg_sys::Oid) {
    // SAFETY: `argument` is the RelationCallback registered with it.
    let callback = unsafe { std::mem::transmute::<usize, RelationCallback>(argument.value()) };
    callback(relation);
}

#[pg_guard]
unsafe extern "C-unwind" fn catalog_cache_trampoline(
    argument: pg_sys::Datum,
    _cache: i32,
    hash_value: u32,
) {
    // SAFETY: `argument` is the CatalogCacheCallback registered with it.
    let callback = unsafe { std::mem::transmute::<usize, CatalogCacheCallback>(argument.value()) };
    callback(hash_value);
}

#[pg_guard]
unsafe extern "C-unwind" fn transaction_trampoline(
    event: pg_sys::XactEvent::Type,
    argument: *mut c_void,
) {
    // SAFETY: `argument` is the TransactionCallback registered with it.
    let callback = unsafe { std::mem::transmute::<*mut c_void, TransactionCallback>(argument) };
    callback(event);
}

#[pg_guard]
unsafe extern "C-unwind" fn subtransaction_trampoline(
    event: pg_sys::SubXactEvent::Type,
    subtransaction: pg_sys::SubTransactionId,
    parent: pg_sys::SubTransactionId,
    argument: *mut c_void,
) {
    // SAFETY: `argument` is the SubtransactionCallback registered with it.
    let callback = unsafe { std::mem::transmute::<*mut c_void, SubtransactionCallback>(argument) };
    callback(event, subtransaction, parent);
}
