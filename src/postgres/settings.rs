//! Settings read without copying: the flag and rate settings on the
//! evaluation path, and string settings borrowed for the length of a
//! comparison.

use std::ffi::{CStr, CString};

use pgrx::pg_sys;
use pgrx::{GucSetting, GucValue};

/// A plain (bool, int, real) setting's current value. pgrx's `get` checks
/// it runs on the backend's thread first, which costs more than the read
/// on the evaluation path; the value is one PostgreSQL writes on this,
/// the backend's only thread, so the check has nothing to find.
pub fn plain<T: GucValue<Raw = T> + Copy>(setting: &GucSetting<T>) -> T {
    // SAFETY: the cell holds an initialised `T` (its boot value, or what
    // PostgreSQL assigned); reading a Copy value from it cannot tear here.
    unsafe { *setting.as_ptr() }
}

/// A setting's current text, copied (None when unset or unknown).
pub fn text(name: &CStr) -> Option<String> {
    // SAFETY: GetConfigOption with missing_ok returns NULL or a valid C
    // string owned by the GUC machinery, copied before anything can change
    // it.
    unsafe {
        let raw = pg_sys::GetConfigOption(name.as_ptr(), true, false);
        if raw.is_null() {
            None
        } else {
            Some(CStr::from_ptr(raw).to_string_lossy().into_owned())
        }
    }
}

/// The current values of string settings, lent to one closure.
pub struct Borrowed<'s>(std::marker::PhantomData<&'s ()>);

impl<'s> Borrowed<'s> {
    /// One of this library's string settings (empty when unset).
    pub fn ours(&self, setting: &GucSetting<Option<CString>>) -> &'s [u8] {
        // SAFETY: `as_ptr` points to the setting's current value, NULL or a
        // NUL-terminated string owned by the GUC machinery; it stays
        // allocated until the setting is next assigned, which only SQL
        // does, and `with_borrowed`'s closure runs none.
        unsafe {
            let raw = *setting.as_ptr();
            if raw.is_null() {
                &[]
            } else {
                CStr::from_ptr(raw).to_bytes()
            }
        }
    }

    /// Any setting by name (empty when unset or unknown).
    pub fn named(&self, name: &CStr) -> &'s [u8] {
        // SAFETY: as for `ours`: GetConfigOption with missing_ok returns
        // NULL or the setting's current value.
        unsafe {
            let raw = pg_sys::GetConfigOption(name.as_ptr(), true, false);
            if raw.is_null() {
                &[]
            } else {
                CStr::from_ptr(raw).to_bytes()
            }
        }
    }
}

/// Lends the settings' current text to `read` without copying. The text
/// belongs to the GUC machinery, which frees it when SQL assigns the
/// setting: `read` is generic over the borrow's lifetime, so nothing it
/// borrows can leave it, and it must run no SQL (it compares and hashes).
pub fn with_borrowed<R>(read: impl for<'s> FnOnce(&Borrowed<'s>) -> R) -> R {
    read(&Borrowed(std::marker::PhantomData))
}
