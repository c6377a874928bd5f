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

/// Which signals an announcement stands for.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Change {
    Configuration,
    Entitlements,
}

impl Change {
    fn cache(self) -> i32 {
        match self {
            Change::Configuration => backend::CONFIGURATION_ANNOUNCEMENTS,
            Change::Entitlements => backend::ENTITLEMENT_ANNOUNCEMENTS,
        }
    }
}

thread_local! {
    /// What this transaction changed (statement triggers ran):
    /// configuration, entitlements.
    static WROTE: Cell<(bool, bool)> = const { Cell::new((false, false)) };
    /// Announced commits not yet seen ended by a snapshot of this backend.
    static PENDING: RefCell<Vec<(u32, Change)>> = const { RefCell::new(Vec::new()) };
}

/// Called by the statement triggers: this transaction will announce its
/// commit.
pub(super) fn wrote(change: Change) {
    WROTE.with(|wrote| {
        let (configuration, entitlements) = wrote.get();
        wrote.set(match change {
            Change::Configuration => (true, entitlements),
            Change::Entitlements => (configuration, true),
        })
    });
}

/// Whether this transaction changed configuration or entitlements. Its own
/// change signals before it commits, and its snapshots differ from one
/// another by command, not by age: no check made in it answers for another
/// of its snapshots (`checks::sees_everything_since`).
pub(super) fn wrote_in_this_transaction() -> bool {
    WROTE.with(|wrote| {
        let (configuration, entitlements) = wrote.get();
        configuration || entitlements
    })
}

/// Announces the commit of a transaction that changed configuration or
/// entitlements, at PRE_COMMIT (before it becomes visible). A transaction
/// prepared for two-phase commit is not announced: COMMIT PREPARED runs
/// elsewhere later, and only its invalidations tell.
pub(super) fn on_transaction_event(event: pg_sys::XactEvent::Type) {
    if event == pg_sys::XactEvent::XACT_EVENT_PRE_COMMIT {
        let (configuration, entitlements) = WROTE.with(Cell::get);
        let xid = backend::top_transaction_id_if_any();
        if xid != pg_sys::InvalidTransactionId {
            if configuration {
                backend::announce_commit(Change::Configuration.cache(), xid);
            }
            if entitlements {
                backend::announce_commit(Change::Entitlements.cache(), xid);
            }
        }
    }
    if event == pg_sys::XactEvent::XACT_EVENT_PRE_PREPARE || crate::context::ends_transaction(event)
    {
        WROTE.with(|wrote| wrote.set((false, false)));
    }
}

/// Receives a configuration announcement (the hash value of an
/// invalidation of its cache). 0 means the queue overflowed: the relcache
/// callback signals everything then.
pub(super) fn on_configuration_announcement(xid: u32) {
    receive(xid, Change::Configuration);
}

pub(super) fn on_entitlement_announcement(xid: u32) {
    receive(xid, Change::Entitlements);
}

fn receive(xid: u32, change: Change) {
    if xid == 0 {
        return;
    }
    PENDING.with(|pending| {
        let mut pending = pending.borrow_mut();
        if !pending.contains(&(xid, change)) {
            if pending.len() >= MAX_PENDING {
                pending.remove(0);
            }
            pending.push((xid, change));
        }
    });
}

/// Which kinds of announced commits the active snapshot sees ended
/// (configuration, entitlements); each one seen is forgotten, and the
/// caller signals itself as its invalidation would. Cheap when nothing is
/// pending, which is almost always.
pub(super) fn settle() -> (bool, bool) {
    PENDING.with(|pending| {
        let mut pending = pending.borrow_mut();
        let mut settled = (false, false);
        if pending.is_empty() {
            return settled;
        }
        pending.retain(|&(xid, change)| {
            let ended = backend::active_snapshot_sees_ended(xid) == Some(true);
            if ended {
                match change {
                    Change::Configuration => settled.0 = true,
                    Change::Entitlements => settled.1 = true,
                }
            }
            !ended
        });
        settled
    })
}

/// Announced commits still pending, for tests.
pub(super) fn pending() -> usize {
    PENDING.with(|pending| pending.borrow().len())
}
