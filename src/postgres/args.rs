//! Arguments read in place, without pgrx's conversions.
//!
//! pgrx's `&str` argument always goes through the guarded
//! `pg_detoast_datum_packed`, whose error guard costs more than the rest of
//! reading a flag key. A key is short and arrives uncompressed and inline
//! (a literal, a bound parameter or a column value), so its bytes are
//! borrowed where they lie; only external or compressed values take the
//! guarded detoast.

use std::borrow::Cow;
use std::ops::Deref;

use pgrx::prelude::*;
use pgrx::varlena;

/// The text of an argument, valid for the call.
pub struct TextArg<'fcx>(Cow<'fcx, str>);

impl Deref for TextArg<'_> {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

impl FromDatum for TextArg<'_> {
    unsafe fn from_polymorphic_datum(
        datum: pg_sys::Datum,
        is_null: bool,
        _: pg_sys::Oid,
    ) -> Option<Self> {
        if is_null {
            return None;
        }
        // SAFETY (the caller's, as FromDatum requires): a non-null text
        // datum valid for the call. Only its header is read here; external
        // or compressed values are detoasted (guarded) into a palloc'd copy
        // in the call's memory context.
        let mut value = datum.cast_mut_ptr::<pg_sys::varlena>();
        if varlena::varatt_is_1b_e(value) || varlena::varatt_is_4b_c(value) {
            value = pg_sys::pg_detoast_datum_packed(value);
        }
        // SAFETY: `value` is now an inline, uncompressed varlena with either
        // header, which lives for the call.
        let bytes = std::slice::from_raw_parts(
            varlena::vardata_any(value).cast::<u8>(),
            varlena::varsize_any_exhdr(value),
        );
        Some(TextArg(if super::backend::database_is_utf8() {
            // SAFETY: PostgreSQL validated the text against the UTF-8
            // database encoding.
            Cow::Borrowed(std::str::from_utf8_unchecked(bytes))
        } else {
            String::from_utf8_lossy(bytes)
        }))
    }
}

/// Passes an argument type that implements `FromDatum` to `#[pg_extern]`
/// functions; NULL is only allowed where the parameter is an `Option`.
macro_rules! arg_from_datum {
    ($($argument:tt)+) => {
        // SAFETY: the argument is read with its own FromDatum conversion,
        // which pgrx calls with the argument's datum and null flag.
        unsafe impl<'fcx> pgrx::callconv::ArgAbi<'fcx> for $($argument)+ {
            unsafe fn unbox_arg_unchecked(arg: pgrx::callconv::Arg<'_, 'fcx>) -> Self {
                let index = arg.index();
                arg.unbox_arg_using_from_datum()
                    .unwrap_or_else(|| panic!("argument {index} must not be null"))
            }

            unsafe fn unbox_nullable_arg(
                arg: pgrx::callconv::Arg<'_, 'fcx>,
            ) -> pgrx::nullable::Nullable<Self> {
                arg.unbox_arg_using_from_datum().into()
            }
        }
    };
}
pub(crate) use arg_from_datum;

arg_from_datum!(TextArg<'fcx>);

impl_sql_translatable!(TextArg<'_>, arg_only = "text");
