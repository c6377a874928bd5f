//! Rate-limit windows in shared memory: a fixed table of slots, split into
//! partitions that each have their own lightweight lock, so attempts on
//! different subjects rarely wait for each other. Counts live outside any
//! transaction: a rolled-back attempt stays counted.
//!
//! Shared memory is reserved only while the postmaster loads the library
//! (`shared_preload_libraries`); a backend that loaded it later has no
//! table, and [`attempt`] says so instead of counting nowhere.

use std::ffi::CStr;
use std::sync::atomic::{AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::OnceLock;

use flagship_engine::rate_window::{has_its_share, Attempt, Window};
use pgrx::pg_sys;
use pgrx::prelude::*;

const TRANCHE: &CStr = c"flagship rate limits";
/// Independent locks; a subject's slot lives in one partition.
pub const PARTITIONS: usize = 16;
/// How far a lookup probes within a partition before calling it full.
const PROBES: usize = 64;

/// A subject's window; `key` all zero marks a slot never used.
#[repr(C)]
#[derive(Clone, Copy)]
struct Slot {
    key: [u64; 2],
    /// The organization whose window it is: each may hold only its share
    /// of the slots a window may take (`rate_window::has_its_share`).
    organization: u64,
    window: Window,
}

static SLOTS: AtomicPtr<Slot> = AtomicPtr::new(std::ptr::null_mut());
static SLOT_COUNT: AtomicUsize = AtomicUsize::new(0);
static LOCKS: AtomicPtr<pg_sys::LWLockPadded> = AtomicPtr::new(std::ptr::null_mut());
/// The server's secret for placing windows, drawn when the table is made.
static SEED: AtomicU64 = AtomicU64::new(0);
static PREVIOUS_REQUEST_HOOK: OnceLock<pg_sys::shmem_request_hook_type> = OnceLock::new();
static PREVIOUS_STARTUP_HOOK: OnceLock<pg_sys::shmem_startup_hook_type> = OnceLock::new();

/// Slots the postmaster reserves (set from `_PG_init`, before the hooks run).
static WANTED_SLOTS: AtomicUsize = AtomicUsize::new(0);

/// Whether the postmaster is loading the library now: the only moment
/// shared memory can be asked for.
pub fn preloading() -> bool {
    // SAFETY: reads a postmaster global that is set before libraries load.
    unsafe { pg_sys::process_shared_preload_libraries_in_progress }
}

/// Asks for `slots` slots (rounded up to whole partitions). Call from
/// `_PG_init` while [`preloading`].
pub fn reserve(slots: usize) {
    let per_partition = slots.div_ceil(PARTITIONS).max(PROBES);
    WANTED_SLOTS.store(per_partition * PARTITIONS, Ordering::Relaxed);
    // SAFETY: chains PostgreSQL's hook variables, as every extension does,
    // in the single-threaded postmaster during library load.
    unsafe {
        let _ = PREVIOUS_REQUEST_HOOK.set(pg_sys::shmem_request_hook);
        pg_sys::shmem_request_hook = Some(request_shared_memory);
        let _ = PREVIOUS_STARTUP_HOOK.set(pg_sys::shmem_startup_hook);
        pg_sys::shmem_startup_hook = Some(attach_shared_memory);
    }
}

fn table_bytes() -> usize {
    WANTED_SLOTS.load(Ordering::Relaxed) * std::mem::size_of::<Slot>()
}

#[pg_guard]
unsafe extern "C-unwind" fn request_shared_memory() {
    // SAFETY: called by PostgreSQL in the postmaster's request phase, where
    // these two requests are allowed.
    unsafe {
        if let Some(Some(previous)) = PREVIOUS_REQUEST_HOOK.get() {
            previous();
        }
        pg_sys::RequestAddinShmemSpace(table_bytes());
        pg_sys::RequestNamedLWLockTranche(TRANCHE.as_ptr(), PARTITIONS as i32);
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn attach_shared_memory() {
    // SAFETY: called by PostgreSQL once shared memory exists (in the
    // postmaster, and again after a crash restart); the add-in lock makes
    // creation and zeroing happen once. Backends inherit the pointers.
    unsafe {
        if let Some(Some(previous)) = PREVIOUS_STARTUP_HOOK.get() {
            previous();
        }
        let init_lock = &raw mut (*pg_sys::MainLWLockArray.add(21)).lock;
        pg_sys::LWLockAcquire(init_lock, pg_sys::LWLockMode::LW_EXCLUSIVE);
        let mut found = false;
        let bytes = table_bytes();
        let slots = pg_sys::ShmemInitStruct(TRANCHE.as_ptr(), bytes, &mut found).cast::<Slot>();
        if !found {
            // All-zero is a table of unused slots.
            std::ptr::write_bytes(slots.cast::<u8>(), 0, bytes);
        }
        // A new secret with every new table (a restart empties it anyway).
        let mut seed = [0u8; 8];
        if !pg_sys::pg_strong_random(seed.as_mut_ptr().cast(), seed.len()) {
            pgrx::error!("no strong random source for the rate-limit table's seed");
        }
        SEED.store(u64::from_le_bytes(seed), Ordering::Release);
        SLOTS.store(slots, Ordering::Release);
        SLOT_COUNT.store(WANTED_SLOTS.load(Ordering::Relaxed), Ordering::Release);
        LOCKS.store(GetNamedLWLockTranche(), Ordering::Release);
        pg_sys::LWLockRelease(init_lock);
    }
}

#[allow(non_snake_case)]
unsafe fn GetNamedLWLockTranche() -> *mut pg_sys::LWLockPadded {
    // SAFETY: the tranche was requested in the request phase.
    unsafe { pg_sys::GetNamedLWLockTranche(TRANCHE.as_ptr()) }
}

/// The secret windows are placed with (0 without the table).
pub fn seed() -> u64 {
    SEED.load(Ordering::Acquire)
}

/// The database this backend is connected to.
pub fn database() -> u32 {
    // SAFETY: reads a backend global set at connection.
    unsafe { pg_sys::MyDatabaseId.to_u32() }
}

/// Why an attempt was not counted.
#[derive(Debug, PartialEq, Eq)]
pub enum NotCounted {
    /// The library was not preloaded: there is no table.
    NoTable,
    /// Every slot the subject may use holds another live window.
    Full,
    /// The organization already holds its share of those slots.
    OverShare,
}

/// The time on PostgreSQL's clock (µs since 2000-01-01), not the
/// transaction's: windows move while a transaction runs.
pub fn clock_now() -> i64 {
    // SAFETY: reads the system clock; cannot raise.
    unsafe { pg_sys::GetCurrentTimestamp() }
}

/// Counts an attempt of `cost` by the subject hashed to `key`, of the
/// organization hashed to `organization`, against `limit` per `window_us`,
/// at `now_us`.
pub fn attempt(
    key: [u64; 2],
    organization: u64,
    window_us: i64,
    now_us: i64,
    cost: u32,
    limit: u64,
) -> Result<Attempt, NotCounted> {
    let slots = SLOTS.load(Ordering::Acquire);
    if slots.is_null() {
        return Err(NotCounted::NoTable);
    }
    let key = [key[0] | 1, key[1]];
    let per_partition = SLOT_COUNT.load(Ordering::Acquire) / PARTITIONS;
    let partition = (key[1] % PARTITIONS as u64) as usize;
    let start = (key[0] >> 1) as usize % per_partition;
    let probes = PROBES.min(per_partition);
    // SAFETY: the tranche holds PARTITIONS locks and the table
    // PARTITIONS * per_partition slots (per_partition >= PROBES, see
    // `reserve`), both in shared memory for the life of the server; a slot
    // is read or written only under its partition's exclusive lock, held
    // until the end of this block (an error raised meanwhile releases it at
    // abort). Nothing in the block allocates or raises.
    unsafe {
        let lock = &raw mut (*LOCKS.load(Ordering::Acquire).add(partition)).lock;
        pg_sys::LWLockAcquire(lock, pg_sys::LWLockMode::LW_EXCLUSIVE);
        let base = slots.add(partition * per_partition);
        let slot_at = |probe: usize| base.add((start + probe) % per_partition);
        let mut found: Option<*mut Slot> = None;
        let mut free: Option<*mut Slot> = None;
        let mut held = 0;
        for probe in 0..probes {
            let slot = slot_at(probe);
            if (*slot).key == key {
                found = Some(slot);
                break;
            }
            let idle = (*slot).key == [0, 0] || (*slot).window.is_idle(now_us);
            if idle {
                free = free.or(Some(slot));
            } else if (*slot).organization == organization {
                held += 1;
            }
        }
        let answer = match (found, free) {
            (Some(slot), _) => Ok((*slot).window.attempt(window_us, now_us, cost, limit)),
            (None, _) if has_its_share(held, probes) => Err(NotCounted::OverShare),
            (None, Some(slot)) => {
                *slot = Slot {
                    key,
                    organization,
                    window: Window::unused(),
                };
                Ok((*slot).window.attempt(window_us, now_us, cost, limit))
            }
            (None, None) => Err(NotCounted::Full),
        };
        pg_sys::LWLockRelease(lock);
        answer
    }
}
