//! When a cached answer may be reused without asking the database: checks
//! stamped with the signal they were made at, and the change reads that let
//! one organization's checks outlive another organization's changes.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};
use std::thread::LocalKey;

use pgrx::prelude::*;
use rustc_hash::FxBuildHasher;

use super::{
    configuration_signal, entitlement_signal, versioned, Threshold, CONFIGURATION_SIGNALLED_AT,
    ENTITLEMENT_SIGNALLED_AT, MAX_NAMES,
};
use crate::postgres::backend::{self, SnapshotAge};
use crate::postgres::statement_reads;

thread_local! {
    /// Reads of which organizations changed.
    static CHANGE_READS: Cell<u64> = const { Cell::new(0) };
    /// The last read of which organizations changed (`read_changes`).
    static LAST_CHANGE_READ: Cell<Option<ChangeRead>> = const { Cell::new(None) };
    /// Organizations whose cached checks the change reads vouch for, with
    /// the signals (configuration, entitlements) from which they do: a
    /// check made at an older signal is repeated with a query.
    static TRACKED: RefCell<HashMap<[u8; 16], (u64, u64), FxBuildHasher>> =
        RefCell::new(HashMap::default());
    /// Organizations checked with a query since the last read: tracked from
    /// the next read on.
    static WANTED: RefCell<HashSet<[u8; 16], FxBuildHasher>> = RefCell::new(HashSet::default());
    /// The owner of flagship.cache_versions (InvalidOid: not looked up yet).
    static VERSIONS_OWNER: Cell<pg_sys::Oid> = const { Cell::new(pg_sys::InvalidOid) };
}

/// One read of the change log: the signals it answered for, and the xmin
/// (a full transaction id) of the snapshot it ran under. Every transaction
/// older than that xmin had ended and was visible to the read.
#[derive(Clone, Copy, Debug)]
struct ChangeRead {
    configuration: u64,
    entitlements: u64,
    horizon: u64,
}

/// When a cached answer was last confirmed, and whether that confirmation
/// settles it for later snapshots too. A signal announces a commit that a
/// snapshot taken before it arrived may not see (REPEATABLE READ, or a
/// statement that started just before the commit): a check under such a
/// snapshot answers for that snapshot only, and the next statement checks
/// again. A check is conclusive when its snapshot was taken after the
/// signal's change completed (`sees_everything_since`).
///
/// A check answers only for snapshots that see everything its own saw
/// (`sees_all_of`): a cursor opened before a change keeps its older
/// configuration, as a table read in it does, even after a later statement
/// confirmed the newer one.
///
/// A check also holds after later signals while the change reads show that
/// its organization (as row-level security saw it) has not changed since
/// (`read_changes`): another organization's change costs one read per
/// backend, not a query per cached environment.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Checked {
    signal: u64,
    conclusive: bool,
    /// The checking snapshot's age.
    snapshot: SnapshotAge,
    organization: Option<[u8; 16]>,
}

#[derive(Clone, Copy)]
enum Kind {
    Configuration,
    Entitlements,
}

impl Checked {
    pub fn configuration() -> Checked {
        Checked::now(Kind::Configuration)
    }

    pub(super) fn entitlements() -> Checked {
        Checked::now(Kind::Entitlements)
    }

    fn now(kind: Kind) -> Checked {
        let (signal, signalled_at) = match kind {
            Kind::Configuration => (configuration_signal(), &CONFIGURATION_SIGNALLED_AT),
            Kind::Entitlements => (entitlement_signal(), &ENTITLEMENT_SIGNALLED_AT),
        };
        let organization = crate::context::organization_id().map(|id| *id.as_bytes());
        if let Some(organization) = organization {
            want(organization);
        }
        let snapshot = backend::active_snapshot_age();
        Checked {
            signal,
            conclusive: snapshot.is_some() && sees_everything_since(signalled_at),
            snapshot: snapshot.unwrap_or(SnapshotAge {
                xmax: 0,
                running: None,
            }),
            organization,
        }
    }

    /// The organization this check was made for, if any.
    pub fn organization(&self) -> Option<[u8; 16]> {
        self.organization
    }

    /// This check, made for an environment of `organization`: it stays
    /// valid while that organization does not change, whoever asked.
    pub fn in_organization(self, organization: pgrx::Uuid) -> Checked {
        let organization = *organization.as_bytes();
        if self.organization != Some(organization) {
            want(organization);
        }
        Checked {
            organization: Some(organization),
            ..self
        }
    }

    pub(super) fn holds_for_configuration(&self) -> bool {
        self.conclusive
            && (self.signal == configuration_signal() || self.unchanged_since(Kind::Configuration))
            && self.not_newer_than_the_snapshot()
    }

    pub(super) fn holds_for_entitlements(&self) -> bool {
        self.conclusive
            && (self.signal == entitlement_signal() || self.unchanged_since(Kind::Entitlements))
            && self.not_newer_than_the_snapshot()
    }

    /// Whether the active snapshot sees everything the one this check was
    /// made under saw (an older one, a cursor's, may not).
    fn not_newer_than_the_snapshot(&self) -> bool {
        backend::active_snapshot_age().is_some_and(|now| sees_all_of(now, self.snapshot))
    }

    /// Whether the last change read answered for the current signal and
    /// vouches for this check's organization from this check's signal on.
    fn unchanged_since(&self, kind: Kind) -> bool {
        let Some(organization) = self.organization else {
            return false;
        };
        let Some(read) = LAST_CHANGE_READ.with(Cell::get) else {
            return false;
        };
        let (current, read_at) = match kind {
            Kind::Configuration => (configuration_signal(), read.configuration),
            Kind::Entitlements => (entitlement_signal(), read.entitlements),
        };
        read_at == current
            && TRACKED.with(|tracked| {
                tracked.borrow().get(&organization).is_some_and(|from| {
                    self.signal
                        >= match kind {
                            Kind::Configuration => from.0,
                            Kind::Entitlements => from.1,
                        }
                })
            })
    }
}

/// Tracks `organization` from the next change read on (`WANTED`).
pub(super) fn want(organization: [u8; 16]) {
    WANTED.with(|wanted| {
        let mut wanted = wanted.borrow_mut();
        if wanted.len() < MAX_NAMES {
            wanted.insert(organization);
        }
    });
}

/// Reads, once per signal, which organizations changed since the previous
/// read (true when it read): the organizations of the `cache_versions` rows whose last writer
/// is not older than the previous read's xmin. A check of an organization
/// that is not among them still holds (`Checked::unchanged_since`).
///
/// Why that is exact: a change a check did not see was made by a
/// transaction still running, or not yet started, when the check's snapshot
/// was taken, so its id is at least that snapshot's xmin, which is at least
/// the xmin of the read before the check (snapshots' xmin never goes back).
/// A later writer of the same row committed after it, so it too is at
/// least that old; the row's `changed_by` is then found by the next read.
/// Reads run only under a snapshot that sees every change signalled so far
/// (as conclusive checks do), and as the table's owner: another
/// organization's rows are read only here, and only their organization ids
/// leave the query, to this backend's cache and nowhere else.
pub fn read_changes() -> bool {
    let configuration = configuration_signal();
    let entitlements = entitlement_signal();
    let last = LAST_CHANGE_READ.with(Cell::get);
    let unchanged = match last {
        Some(read) => read.configuration == configuration && read.entitlements == entitlements,
        // Before any signal every check holds by its signal alone: the
        // first read waits for the first signal (a new backend's first
        // evaluation runs one query fewer).
        None => configuration == 0 && entitlements == 0,
    };
    if unchanged {
        return false;
    }
    // The read runs under the statement's snapshot, and counts only when
    // that snapshot sees every change signalled so far (as conclusive
    // checks do). Under REPEATABLE READ and SERIALIZABLE the snapshot is the
    // transaction's: checks there answer for it alone, as without reads.
    if backend::snapshot_per_transaction()
        || !sees_everything_since(&CONFIGURATION_SIGNALLED_AT)
        || !sees_everything_since(&ENTITLEMENT_SIGNALLED_AT)
        || !versioned()
    {
        return false;
    }
    let since = last.map(|read| read.horizon.to_string());
    let (horizon, changed) = as_versions_owner(|| {
        Spi::connect(|client| {
            let rows = statement_reads::select(
                client,
                // Runs as the owner: every name is qualified, so the
                // caller's search path (or pg_temp) chooses nothing.
                statement_reads::Query::Text(
                    "SELECT pg_catalog.pg_snapshot_xmin(pg_catalog.pg_current_snapshot())::pg_catalog.text, \
                            ARRAY(SELECT DISTINCT v.organization_id FROM flagship.cache_versions v \
                                   WHERE v.changed_by OPERATOR(pg_catalog.>=) $1::pg_catalog.xid8)",
                ),
                &[since.into()],
                1,
            );
            match rows.row(0) {
                Some(row) => (
                    row.get::<String>(1).unwrap_or_default(),
                    row.get::<Vec<pgrx::Uuid>>(2).unwrap_or_default(),
                ),
                None => (String::new(), Vec::new()),
            }
        })
    });
    CHANGE_READS.with(|reads| reads.set(reads.get() + 1));
    let Ok(horizon) = horizon.parse::<u64>() else {
        return false;
    };
    // The read's own locks take in invalidations that arrived meanwhile:
    // typically those of the very commit whose announcement started it
    // (PostgreSQL sends a commit's invalidations a moment after making it
    // visible). The read answers for them too when its snapshot sees
    // everything they signal; otherwise every cached check would be
    // repeated with a query right after it.
    let (configuration, entitlements) = if sees_everything_since(&CONFIGURATION_SIGNALLED_AT)
        && sees_everything_since(&ENTITLEMENT_SIGNALLED_AT)
    {
        (configuration_signal(), entitlement_signal())
    } else {
        (configuration, entitlements)
    };
    TRACKED.with(|tracked| {
        let mut tracked = tracked.borrow_mut();
        for organization in &changed {
            if let Some(from) = tracked.get_mut(organization.as_bytes()) {
                *from = (configuration, entitlements);
            }
        }
        for organization in WANTED.with(|wanted| std::mem::take(&mut *wanted.borrow_mut())) {
            tracked
                .entry(organization)
                .or_insert((configuration, entitlements));
        }
        if tracked.len() > MAX_NAMES {
            tracked.clear();
        }
    });
    LAST_CHANGE_READ.with(|read| {
        read.set(Some(ChangeRead {
            configuration,
            entitlements,
            horizon,
        }))
    });
    true
}

/// The first column of the first row of a read-only query, under the
/// statement's snapshot (`statement_reads`). Not `Spi::get_one`: that one
/// runs as a write, which gives the transaction an id, and from then on
/// every query of the transaction takes a snapshot of its own.
pub(super) fn read_one<T: FromDatum>(
    query: &str,
    arguments: &[pgrx::datum::DatumWithOid<'_>],
) -> Option<T> {
    Spi::connect(|client| {
        statement_reads::select(client, statement_reads::Query::Text(query), arguments, 1).get(0, 1)
    })
}

/// Runs `read` as the owner of flagship.cache_versions with row-level
/// security not forced, as PostgreSQL's own foreign-key checks do, then
/// becomes the caller again (also when `read` raises: the restore runs while
/// unwinding, and an aborted transaction restores the user itself).
pub(super) fn as_versions_owner<R>(read: impl FnOnce() -> R) -> R {
    let mut owner = VERSIONS_OWNER.with(Cell::get);
    if owner == pg_sys::InvalidOid {
        owner = read_one::<pg_sys::Oid>(
            "SELECT c.relowner FROM pg_catalog.pg_class c \
              WHERE c.oid = 'flagship.cache_versions'::pg_catalog.regclass",
            &[],
        )
        .unwrap_or(pg_sys::InvalidOid);
        VERSIONS_OWNER.with(|cell| cell.set(owner));
    }
    backend::as_owner_without_forced_security(owner, read)
}

/// Whether the active snapshot sees every change signalled so far (kept in
/// `signalled_at`). A change sends its signal after it has completed, so a
/// snapshot taken after the signal arrived sees it; the threshold is the
/// age of one such snapshot (taken at the first check after the signal),
/// or of a snapshot that saw an announced commit ended. A snapshot that
/// sees all that one saw sees the change. One taken before the signal
/// arrived and before the change completed does not, and its checks answer
/// for it alone. Unlike comparing transaction ids with the next one at the
/// signal, this does not wait for transactions that were merely running
/// when the signal arrived (a writer's next transaction, an idle session).
pub(super) fn sees_everything_since(signalled_at: &'static LocalKey<Cell<Threshold>>) -> bool {
    // This transaction's own change is seen by its later commands only,
    // which ages do not tell apart: every check in it asks again (also
    // before this backend has heard any signal: a backend that has not
    // located yet does not signal itself).
    if super::announcements::wrote_in_this_transaction() {
        return false;
    }
    let threshold = signalled_at.with(Cell::get);
    if let Threshold::NoSignal = threshold {
        return true;
    }
    // Only under an active snapshot: the transaction's xmin is set then,
    // and taking another snapshot leaves it as it is.
    let Some(now) = backend::active_snapshot_age() else {
        return false;
    };
    let threshold = match threshold {
        Threshold::Seen(age) => age,
        _ => {
            let age = backend::fresh_snapshot_age();
            signalled_at.with(|at| at.set(Threshold::Seen(age)));
            age
        }
    };
    sees_all_of(now, threshold)
}

/// Whether a snapshot of age `now` sees every transaction one of age
/// `then` saw as ended. A higher xmax means a transaction completed after
/// `then` was taken, so `now` came later and sees at least as much. With the
/// same xmax no transaction id below it can start in between, so the ids
/// `now` saw running are a subset of `then`'s or a superset of them (when
/// `now` is older): not more of them means a subset. Transaction ids wrap
/// around: compared as PostgreSQL does.
pub(super) fn sees_all_of(now: SnapshotAge, then: SnapshotAge) -> bool {
    let ahead = now.xmax.wrapping_sub(then.xmax) as i32;
    ahead > 0
        || (ahead == 0
            && matches!((now.running, then.running), (Some(now), Some(then)) if now <= then))
}

/// Stops vouching for every organization: after an abort that took back
/// versions this backend may have seen, each is checked with a query again.
pub(super) fn forget_tracked() {
    TRACKED.with(|tracked| tracked.borrow_mut().clear());
}

/// Change reads this backend made since it started.
pub(super) fn change_reads() -> u64 {
    CHANGE_READS.with(Cell::get)
}
