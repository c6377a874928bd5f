//! Commit announcements: no snapshot sees a configuration change before
//! this backend has heard of it.
//!
//! PostgreSQL makes a commit visible (ProcArrayEndTransaction) a few
//! microseconds before it sends the commit's invalidations. A statement
//! whose snapshot is taken in between would see the change in a table read
//! but still trust checks stamped at the last signal. So a transaction that
//! changed configuration also announces itself just before committing
//! (`backend::announce_commit`, with its xid), and every backend keeps the
//! announced xids it has received. When a statement's snapshot sees one of
//! them ended, the backend signals itself as the commit's invalidation
//! would have, and forgets the xid. Announcements are not WAL-logged: a hot
//! standby relies on the commit invalidations alone (untested here).

use std::cell::{Cell, RefCell};

use pgrx::pg_sys;

use crate::postgres::backend;

/// Announced xids this backend keeps at most (distinct configuration
/// commits in flight between two of its statements). Beyond it the oldest
/// is dropped, and for that commit the backend falls back on the commit's
/// own invalidation, as without announcements.
const MAX_PENDING: usize = 4096;

thread_local! {
    /// This transaction changed configuration (a statement trigger ran).
    static WROTE: Cell<bool> = const { Cell::new(false) };
    /// Announced commits not yet seen ended by a snapshot of this backend.
    static PENDING: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
}

/// Called by the statement triggers: this transaction will announce its
/// commit.
pub(super) fn wrote() {
    WROTE.with(|wrote| wrote.set(true));
}

/// Announces the commit of a transaction that changed configuration, at
/// PRE_COMMIT (before it becomes visible). A transaction that is prepared
/// for two-phase commit is not announced: COMMIT PREPARED runs elsewhere
/// later, and only its invalidations tell.
pub(super) fn on_transaction_event(event: pg_sys::XactEvent::Type) {
    if event == pg_sys::XactEvent::XACT_EVENT_PRE_COMMIT && WROTE.with(Cell::get) {
        let xid = backend::top_transaction_id_if_any();
        if xid != pg_sys::InvalidTransactionId {
            backend::announce_commit(xid);
        }
    }
    if event == pg_sys::XactEvent::XACT_EVENT_PRE_PREPARE || crate::context::ends_transaction(event)
    {
        WROTE.with(|wrote| wrote.set(false));
    }
}

/// Receives an announcement (the hash value of an invalidation of the
/// announcement cache). 0 means the queue overflowed: the relcache
/// callback signals everything then.
pub(super) fn on_announcement(xid: u32) {
    if xid == 0 {
        return;
    }
    PENDING.with(|pending| {
        let mut pending = pending.borrow_mut();
        if !pending.contains(&xid) {
            if pending.len() >= MAX_PENDING {
                pending.remove(0);
            }
            pending.push(xid);
        }
    });
}

/// Whether the active snapshot sees an announced commit ended (each one
/// is then forgotten): the caller signals itself as its invalidation
/// would. Cheap when nothing is pending, which is almost always.
pub(super) fn settle() -> bool {
    PENDING.with(|pending| {
        let mut pending = pending.borrow_mut();
        if pending.is_empty() {
            return false;
        }
        let before = pending.len();
        pending.retain(|xid| backend::active_snapshot_sees_ended(*xid) != Some(true));
        pending.len() != before
    })
}

/// Announced commits still pending, for tests.
pub(super) fn pending() -> usize {
    PENDING.with(|pending| pending.borrow().len())
}
