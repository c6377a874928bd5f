//! Rate-limit windows in shared memory: a fixed table of slots, split into
//! partitions that each have their own lightweight lock, so attempts on
//! different subjects rarely wait for each other. Counts live outside any
//! transaction: a rolled-back attempt stays counted.
//!
//! Shared memory is reserved only while the postmaster loads the library
//! (`shared_preload_libraries`); a backend that loaded it later has no
//! table, and [`attempt`] says so instead of counting nowhere.

use std::ffi::CStr;
use std::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};
use std::sync::OnceLock;

use flagship_engine::rate_window::{Attempt, Window};
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
    window: Window,
}

static SLOTS: AtomicPtr<Slot> = AtomicPtr::new(std::ptr::null_mut());
static SLOT_COUNT: AtomicUsize = AtomicUsize::new(0);
static LOCKS: AtomicPtr<pg_sys::LWLockPadded> = AtomicPtr::new(std::ptr::null_mut());
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

/// Whether this backend has the table.
pub fn available() -> bool {
    !SLOTS.load(Ordering::Acquire).is_null()
}

/// The slots the table holds (0 without it).
pub fn capacity() -> usize {
    if available() {
        SLOT_COUNT.load(Ordering::Acquire)
    } else {
        0
    }
}

/// Why an attempt was not counted.
#[derive(Debug, PartialEq, Eq)]
pub enum NotCounted {
    /// The library was not preloaded: there is no table.
    NoTable,
    /// Every slot the subject may use holds another live window.
    Full,
}

/// The time on PostgreSQL's clock (µs since 2000-01-01), not the
/// transaction's: windows move while a transaction runs.
pub fn clock_now() -> i64 {
    // SAFETY: reads the system clock; cannot raise.
    unsafe { pg_sys::GetCurrentTimestamp() }
}

/// Counts an attempt of `cost` by the subject hashed to `key` against
/// `limit` per `window_us`, at `now_us`.
pub fn attempt(
    key: [u64; 2],
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
    // SAFETY: the tranche holds PARTITIONS locks and the table
    // PARTITIONS * per_partition slots, both in shared memory for the life
    // of the server; a slot is read or written only under its partition's
    // exclusive lock, held until the end of this block (an error raised
    // meanwhile releases it at abort). Nothing in the block allocates or
    // raises.
    unsafe {
        let lock = &raw mut (*LOCKS.load(Ordering::Acquire).add(partition)).lock;
        pg_sys::LWLockAcquire(lock, pg_sys::LWLockMode::LW_EXCLUSIVE);
        let base = slots.add(partition * per_partition);
        let mut chosen: Option<*mut Slot> = None;
        for probe in 0..PROBES {
            let slot = base.add((start + probe) % per_partition);
            if (*slot).key == key {
                chosen = Some(slot);
                break;
            }
            if chosen.is_none() && ((*slot).key == [0, 0] || (*slot).window.is_idle(now_us)) {
                chosen = Some(slot);
            }
        }
        let answer = match chosen {
            Some(slot) => {
                if (*slot).key != key {
                    *slot = Slot {
                        key,
                        window: Window::unused(),
                    };
                }
                Ok((*slot).window.attempt(window_us, now_us, cost, limit))
            }
            None => Err(NotCounted::Full),
        };
        pg_sys::LWLockRelease(lock);
        answer
    }
}
