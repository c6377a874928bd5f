//! An internal subtransaction, as PL/pgSQL opens one for a block with an
//! EXCEPTION clause: what runs inside is undone, row locks included, unless
//! it is released into the enclosing transaction.

use pgrx::pg_sys;

/// Open from `begin` until `release`; dropped unreleased, it rolls back.
/// The memory context and resource owner of the caller are restored either
/// way, so values allocated before it stay where they were.
pub struct Subtransaction {
    memory: pg_sys::MemoryContext,
    owner: pg_sys::ResourceOwner,
    open: bool,
}

impl Subtransaction {
    pub fn begin() -> Subtransaction {
        // SAFETY: inside a transaction (every caller runs in a statement);
        // BeginInternalSubTransaction switches to the subtransaction's
        // memory context and resource owner, and we switch the memory
        // context back at once, as PL/pgSQL does.
        unsafe {
            let memory = pg_sys::CurrentMemoryContext;
            let owner = pg_sys::CurrentResourceOwner;
            pg_sys::BeginInternalSubTransaction(std::ptr::null());
            pg_sys::MemoryContextSwitchTo(memory);
            Subtransaction {
                memory,
                owner,
                open: true,
            }
        }
    }

    /// Keeps what ran inside: it becomes part of the enclosing transaction.
    pub fn release(mut self) {
        // SAFETY: this subtransaction is the current one (nothing opened
        // since is left open: SPI calls inside end their own).
        unsafe { pg_sys::ReleaseCurrentSubTransaction() };
        self.restore();
    }

    fn restore(&mut self) {
        self.open = false;
        // SAFETY: both were current when `begin` ran and outlive it.
        unsafe {
            pg_sys::MemoryContextSwitchTo(self.memory);
            pg_sys::CurrentResourceOwner = self.owner;
        }
    }
}

impl Drop for Subtransaction {
    fn drop(&mut self) {
        // Also while an ERROR unwinds: PostgreSQL's abort would end only
        // the innermost subtransaction, this one, and leave the caller's
        // level failed (autocommit would stay in an aborted transaction).
        // pgrx has copied and flushed the error before it unwinds, as
        // PL/pgSQL's handler does before it rolls its subtransaction back.
        if self.open {
            // SAFETY: as in `release`.
            unsafe { pg_sys::RollbackAndReleaseCurrentSubTransaction() };
            self.restore();
        }
    }
}
