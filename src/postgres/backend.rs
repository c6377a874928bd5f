//! The backend's own state, read and changed through safe functions:
//! who is running, which transaction, what the active snapshot sees, and
//! the invalidation queue. Each wraps one C call or one global.

use std::ffi::{c_int, CStr};

use pgrx::pg_sys;

use super::unguarded;

/// The current user id.
pub fn user_id() -> pg_sys::Oid {
    // SAFETY: GetUserId returns a backend global; it cannot raise.
    unsafe { unguarded::GetUserId() }
}

/// The name of the session's outer user: whoever called, outside any
/// SECURITY DEFINER function.
pub fn outer_user_name() -> String {
    // SAFETY: GetUserNameFromId returns a palloc'd copy, or raises (inside
    // pgrx's guard, as a panic) for a dropped role.
    unsafe {
        let name = pg_sys::GetUserNameFromId(pg_sys::GetOuterUserId(), false);
        CStr::from_ptr(name).to_string_lossy().into_owned()
    }
}

/// When the current top-level statement started.
pub fn statement_start() -> pg_sys::TimestampTz {
    // SAFETY: returns a backend global; it neither allocates nor raises.
    unsafe { unguarded::GetCurrentStatementStartTimestamp() }
}

/// When the transaction started: `now()`.
pub fn transaction_start() -> pg_sys::TimestampTz {
    // SAFETY: reads the transaction start time, a backend global.
    unsafe { pg_sys::GetCurrentTransactionStartTimestamp() }
}

/// The top-level transaction's id, InvalidTransactionId until it writes.
pub fn top_transaction_id_if_any() -> pg_sys::TransactionId {
    // SAFETY: reads the transaction's state; cannot raise.
    unsafe { pg_sys::GetTopTransactionIdIfAny() }
}

/// The current (sub)transaction's id, InvalidTransactionId until it writes.
pub fn current_transaction_id_if_any() -> pg_sys::TransactionId {
    // SAFETY: reads the transaction's state; cannot raise.
    unsafe { pg_sys::GetCurrentTransactionIdIfAny() }
}

/// The current subtransaction's id (the top level's outside savepoints).
pub fn current_subtransaction_id() -> pg_sys::SubTransactionId {
    // SAFETY: reads a backend global; cannot raise.
    unsafe { pg_sys::GetCurrentSubTransactionId() }
}

/// Whether the transaction keeps one snapshot (REPEATABLE READ or
/// SERIALIZABLE) rather than taking one per statement.
pub fn snapshot_per_transaction() -> bool {
    // SAFETY: reads a backend global; cannot raise.
    unsafe { pg_sys::XactIsoLevel >= pg_sys::XACT_REPEATABLE_READ as i32 }
}

/// What a snapshot's age can be told by: its xmax (one past the newest
/// completed transaction id then) and how many transaction ids below that
/// it saw running (top-level ones; on a standby every known one), or None
/// when the snapshot cannot say (a standby's overflowed list).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct SnapshotAge {
    pub xmax: u32,
    pub running: Option<u32>,
}

impl SnapshotAge {
    fn of(snapshot: &pg_sys::SnapshotData) -> SnapshotAge {
        let running = if snapshot.takenDuringRecovery {
            (!snapshot.suboverflowed).then_some(snapshot.subxcnt as u32)
        } else if snapshot.xcnt >= 2 && prepared_transactions_possible() {
            // A transaction being prepared is in the procarray twice for a
            // moment (its dummy entry is added before its own is cleared,
            // then it waits for a synchronous standby), and GetSnapshotData
            // lists its xid twice: count each running xid once, or a
            // completion could hide behind the duplicate.
            // SAFETY: `xip` holds `xcnt` xids of this live snapshot.
            let xids = unsafe { std::slice::from_raw_parts(snapshot.xip, snapshot.xcnt as usize) };
            Some(distinct_count(xids.iter().map(|xid| xid.into_inner())) as u32)
        } else {
            Some(snapshot.xcnt)
        };
        SnapshotAge {
            xmax: snapshot.xmax.into_inner(),
            running,
        }
    }
}

/// How many different xids `xids` holds. A Citus node always allows
/// prepared transactions, so this runs for most of its evaluations: up to
/// `ON_STACK` xids are sorted in place on the stack, without allocating.
fn distinct_count(xids: impl ExactSizeIterator<Item = u32>) -> usize {
    const ON_STACK: usize = 64;
    fn count_sorted(sorted: &mut [u32]) -> usize {
        sorted.sort_unstable();
        1 + sorted.windows(2).filter(|pair| pair[0] != pair[1]).count()
    }
    match xids.len() {
        0 => 0,
        length if length <= ON_STACK => {
            let mut buffer = [0u32; ON_STACK];
            for (slot, xid) in buffer.iter_mut().zip(xids) {
                *slot = xid;
            }
            count_sorted(&mut buffer[..length])
        }
        _ => count_sorted(&mut xids.collect::<Vec<u32>>()),
    }
}

/// Whether this server allows prepared transactions
/// (`max_prepared_transactions` > 0, fixed at server start).
fn prepared_transactions_possible() -> bool {
    use std::sync::atomic::{AtomicU8, Ordering::Relaxed};
    // 0: not read yet, 1: no, 2: yes.
    static POSSIBLE: AtomicU8 = AtomicU8::new(0);
    match POSSIBLE.load(Relaxed) {
        1 => false,
        2 => true,
        _ => {
            // SAFETY: a guarded read of a setting's current value, copied
            // before anything can change it.
            let possible = unsafe {
                let value =
                    pg_sys::GetConfigOption(c"max_prepared_transactions".as_ptr(), false, false);
                value.is_null() || std::ffi::CStr::from_ptr(value).to_bytes() != b"0"
            };
            POSSIBLE.store(if possible { 2 } else { 1 }, Relaxed);
            possible
        }
    }
}

/// The active snapshot's age, if a snapshot is active.
pub fn active_snapshot_age() -> Option<SnapshotAge> {
    // SAFETY: ActiveSnapshotSet and GetActiveSnapshot read backend globals;
    // the snapshot is only dereferenced when one is set.
    unsafe {
        if !unguarded::ActiveSnapshotSet() {
            return None;
        }
        Some(SnapshotAge::of(&*unguarded::GetActiveSnapshot()))
    }
}

thread_local! {
    /// A snapshot of our own, for `fresh_snapshot_age`: not the
    /// transaction's or the secondary snapshot, which the executor and
    /// foreign-key checks may be using. GetSnapshotData allocates its id
    /// arrays on first use (malloc) and reuses them.
    static OWN_SNAPSHOT: std::cell::UnsafeCell<pg_sys::SnapshotData> = const {
        std::cell::UnsafeCell::new(pg_sys::SnapshotData {
            snapshot_type: pg_sys::SnapshotType::SNAPSHOT_MVCC,
            // SAFETY: every other field of SnapshotData is an integer, a
            // boolean or a pointer, for which zero is valid (NULL arrays
            // are what GetSnapshotData expects of a new snapshot).
            ..unsafe { std::mem::zeroed() }
        })
    };
}

/// The age of a snapshot taken now: it sees every transaction that has
/// completed before this call.
pub fn fresh_snapshot_age() -> SnapshotAge {
    OWN_SNAPSHOT.with(|own| {
        // SAFETY: the snapshot is ours alone (thread-local, no reference
        // to it outlives this call); GetSnapshotData fills it in place
        // (guarded: it may raise only when out of memory).
        unsafe {
            let snapshot = pg_sys::GetSnapshotData(own.get());
            SnapshotAge::of(&*snapshot)
        }
    })
}

/// Whether row-level security lets the current role see every
/// organization's rows (a superuser, or a role with BYPASSRLS).
pub fn sees_every_organization() -> bool {
    // SAFETY: guarded catalog lookups of the current user; they may raise
    // only if the role vanished, which aborts the statement cleanly.
    unsafe { pg_sys::superuser() || pg_sys::has_bypassrls_privilege(pg_sys::GetUserId()) }
}

/// The catalog caches whose invalidations carry commit announcements
/// (`announce_commit`), one per kind of change: pg_am's two, which change
/// only with CREATE or DROP ACCESS METHOD, so their real invalidations are
/// rare, and a stray one costs a receiver one extra version check.
pub const CONFIGURATION_ANNOUNCEMENTS: i32 = pg_sys::SysCacheIdentifier::AMOID as i32;
pub const ENTITLEMENT_ANNOUNCEMENTS: i32 = pg_sys::SysCacheIdentifier::AMNAME as i32;

/// Tells every backend of this database, now and not at commit, that
/// transaction `xid` is about to commit a change. Sent before the commit
/// becomes visible, so a backend whose snapshot sees the commit has the
/// announcement in its queue (PostgreSQL sends a commit's own
/// invalidations only after making it visible). The xid travels as the
/// hash value of an invalidation of `cache` (one of the two above):
/// receivers drop pg_am cache entries with that hash, if any, and call its
/// callbacks.
pub fn announce_commit(cache: i32, xid: pg_sys::TransactionId) {
    // SAFETY: the message is fully initialised (zeroed, then the catcache
    // member set); SendSharedInvalidMessages copies it into the queue under
    // its lock and may raise only on a broken queue.
    unsafe {
        let mut message: pg_sys::SharedInvalidationMessage = std::mem::zeroed();
        message.cc = pg_sys::SharedInvalCatcacheMsg {
            id: cache as i8,
            dbId: pg_sys::MyDatabaseId,
            hashValue: xid.into_inner(),
        };
        pg_sys::SendSharedInvalidMessages(&message, 1);
    }
}

/// Whether the active snapshot sees transaction `xid` as ended (committed
/// or aborted), None without an active snapshot.
pub fn active_snapshot_sees_ended(xid: u32) -> Option<bool> {
    // SAFETY: as for active_snapshot_age; `xip` holds `xcnt` ids.
    unsafe {
        if !unguarded::ActiveSnapshotSet() {
            return None;
        }
        let snapshot = &*unguarded::GetActiveSnapshot();
        let before = |a: u32, b: u32| (a.wrapping_sub(b) as i32) < 0;
        if !before(xid, snapshot.xmax.into_inner()) {
            return Some(false);
        }
        if before(xid, snapshot.xmin.into_inner()) {
            return Some(true);
        }
        let running: &[pg_sys::TransactionId] = if snapshot.takenDuringRecovery {
            if snapshot.subxip.is_null() {
                &[]
            } else {
                std::slice::from_raw_parts(snapshot.subxip, snapshot.subxcnt.max(0) as usize)
            }
        } else if snapshot.xip.is_null() {
            &[]
        } else {
            std::slice::from_raw_parts(snapshot.xip, snapshot.xcnt as usize)
        };
        Some(!running.iter().any(|id| id.into_inner() == xid))
    }
}

/// How many transactions have completed so far (procarray's counter): a
/// change tells `cache::accept_invalidations` to read the queue again.
pub fn completions_now() -> u64 {
    // SAFETY: ShmemVariableCache points to shared memory set up before any
    // backend runs; an aligned u64 is read whole on the 64-bit platforms
    // pgrx supports.
    unsafe {
        let cache = pg_sys::ShmemVariableCache;
        if cache.is_null() {
            0
        } else {
            std::ptr::read_volatile(std::ptr::addr_of!((*cache).xactCompletionCount))
        }
    }
}

/// Reads the invalidation queue: other sessions' committed catalog and
/// relcache changes, which run the registered callbacks.
pub fn accept_invalidation_messages() {
    // SAFETY: guarded; it runs the (guarded) registered callbacks and may
    // raise on a broken invalidation queue.
    unsafe { pg_sys::AcceptInvalidationMessages() };
}

/// Queues a relcache invalidation of `relation` for the current
/// transaction: other backends receive it at commit; an abort drops it.
pub fn invalidate_relation(relation: pg_sys::Oid) {
    // SAFETY: guarded; registers an invalidation for this transaction.
    unsafe { pg_sys::CacheInvalidateRelcacheByRelid(relation) };
}

/// The relation whose invalidation carries the signal for changes of
/// `watched` (flagship.features: configuration, flagship.customers:
/// entitlements): its `_signal` sequence beside it, or `watched` itself
/// under SQL older than 0.3.0, which has none.
pub fn signal_relation_for(watched: pg_sys::Oid) -> pg_sys::Oid {
    // SAFETY: guarded catalog lookups; get_rel_name answers NULL for a
    // missing relation, and its palloc'd name is read before it is freed
    // with the statement.
    unsafe {
        let name = pg_sys::get_rel_name(watched);
        if name.is_null() {
            return watched;
        }
        let signal: &CStr = match CStr::from_ptr(name).to_bytes() {
            b"features" => c"configuration_signal",
            b"customers" => c"entitlement_signal",
            _ => return watched,
        };
        match pg_sys::get_relname_relid(signal.as_ptr(), pg_sys::get_rel_namespace(watched)) {
            pg_sys::InvalidOid => watched,
            found => found,
        }
    }
}

/// Whether `schema`.`relation` exists.
pub fn relation_exists(schema: &CStr, relation: &CStr) -> bool {
    // SAFETY: guarded catalog lookups that answer InvalidOid when missing.
    unsafe {
        let schema = pg_sys::get_namespace_oid(schema.as_ptr(), true);
        schema != pg_sys::InvalidOid
            && pg_sys::get_relname_relid(relation.as_ptr(), schema) != pg_sys::InvalidOid
    }
}

/// Runs `read` as `owner` with row-level security not forced, as
/// PostgreSQL's own foreign-key checks do, inside a restricted operation
/// (no temporary objects, no session state, no SET ROLE), then becomes the
/// caller again: also when `read` raises, since the restore runs while
/// unwinding (and an aborted transaction restores the user itself).
pub fn as_owner_without_forced_security<R>(owner: pg_sys::Oid, read: impl FnOnce() -> R) -> R {
    struct Restore(pg_sys::Oid, c_int);
    impl Drop for Restore {
        fn drop(&mut self) {
            // SAFETY: puts back the user and security context read below;
            // a plain assignment of backend globals that cannot raise.
            unsafe { pg_sys::SetUserIdAndSecContext(self.0, self.1) };
        }
    }
    let mut user = pg_sys::InvalidOid;
    let mut context: c_int = 0;
    // SAFETY: reads and assigns backend globals; neither call can raise.
    unsafe {
        pg_sys::GetUserIdAndSecContext(&mut user, &mut context);
        pg_sys::SetUserIdAndSecContext(
            owner,
            context
                | pg_sys::SECURITY_LOCAL_USERID_CHANGE as c_int
                | pg_sys::SECURITY_RESTRICTED_OPERATION as c_int
                | pg_sys::SECURITY_NOFORCE_RLS as c_int,
        );
    }
    let _restore = Restore(user, context);
    read()
}

/// The database encoding's answer, once known: 0 not yet, 1 other, 2 UTF-8.
/// A process-wide static rather than a thread-local, because a thread-local
/// costs a `__tls_get_addr` call in a shared library and this is read for
/// every string argument and attribute (backends are single-threaded).
static DATABASE_IS_UTF8: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// Whether text in this database is UTF-8 (fixed for a backend's lifetime).
#[inline]
pub fn database_is_utf8() -> bool {
    match DATABASE_IS_UTF8.load(std::sync::atomic::Ordering::Relaxed) {
        1 => false,
        2 => true,
        _ => look_up_database_encoding(),
    }
}

#[cold]
#[inline(never)]
fn look_up_database_encoding() -> bool {
    // SAFETY: GetDatabaseEncoding returns a backend global set at
    // connection; it cannot raise. MyDatabaseId is a plain global.
    let (utf8, connected) = unsafe {
        (
            pg_sys::GetDatabaseEncoding() == pg_sys::pg_enc::PG_UTF8 as i32,
            pg_sys::MyDatabaseId != pg_sys::InvalidOid,
        )
    };
    // Kept only once connected: before that (the postmaster loading a
    // preloaded library) the encoding is not the database's, and a value
    // kept there would be inherited by every backend.
    if connected {
        DATABASE_IS_UTF8.store(
            if utf8 { 2 } else { 1 },
            std::sync::atomic::Ordering::Relaxed,
        );
    }
    utf8
}

/// Microseconds between the Unix epoch and PostgreSQL's (2000-01-01), for
/// turning a `TimestampTz` into Unix time.
pub const POSTGRES_EPOCH_MICROS: i64 = 946_684_800_000_000;

#[cfg(all(test, feature = "pg_test"))]
mod tests {
    use proptest::prelude::*;

    proptest! {
        /// The stack path and the allocating one count as a set would,
        /// on both sides of the stack's size and with many duplicates.
        #[test]
        fn distinct_count_counts_each_xid_once(xids in proptest::collection::vec(0u32..40, 0..140)) {
            let expected = xids.iter().collect::<std::collections::BTreeSet<_>>().len();
            prop_assert_eq!(super::distinct_count(xids.iter().copied()), expected);
        }
    }
}
