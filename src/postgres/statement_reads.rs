//! Read-only queries under the statement's own snapshot, for the caches.
//!
//! pgrx's `SpiClient` runs a query read-only only while the transaction has
//! no id: once the transaction has written anything, every query runs as a
//! write, and under READ COMMITTED a write takes a snapshot of its own. A
//! cache check in the middle of a statement would then see configuration
//! committed after the statement began, which a table read in the same
//! statement does not. The caches' checks and loads run here instead: SPI
//! with `read_only` always true, which runs under the active snapshot and
//! never assigns a transaction id.

use std::ffi::CString;
use std::marker::PhantomData;
use std::ptr::NonNull;

use pgrx::datum::DatumWithOid;
use pgrx::prelude::*;
use pgrx::spi::SpiClient;

use crate::postgres::jsonb::JsonbArg;

/// A plan kept for the life of the backend (PostgreSQL plans it again
/// itself when a relation it reads changes, or the role it runs as).
pub struct KeptPlan(NonNull<pg_sys::_SPI_plan>);

impl KeptPlan {
    /// Plans `sql`, whose parameters have the types `types`, inside the SPI
    /// connection `_client` proves is open.
    pub fn prepare(_client: &SpiClient<'_>, sql: &str, types: &[pg_sys::Oid]) -> KeptPlan {
        let sql = CString::new(sql).expect("SQL without NUL bytes");
        let mut types = types.to_vec();
        // SAFETY: an SPI connection is open (`_client`); SPI_prepare raises
        // (inside pgrx's guard) on a bad query and otherwise returns a plan,
        // which SPI_keepplan moves out of the connection's memory.
        unsafe {
            let plan = pg_sys::SPI_prepare(sql.as_ptr(), types.len() as i32, types.as_mut_ptr());
            let Some(plan) = NonNull::new(plan) else {
                let code = std::ptr::addr_of!(pg_sys::SPI_result).read();
                panic!("planning a cache query failed (SPI code {code})");
            };
            pg_sys::SPI_keepplan(plan.as_ptr());
            KeptPlan(plan)
        }
    }
}

impl Drop for KeptPlan {
    fn drop(&mut self) {
        // SAFETY: the plan was kept by `prepare` and is freed once, here.
        unsafe { pg_sys::SPI_freeplan(self.0.as_ptr()) };
    }
}

/// What to run: a kept plan, or SQL planned for this one call.
pub enum Query<'q> {
    Kept(&'q KeptPlan),
    Text(&'q str),
}

/// The rows of one query. They live in the SPI connection's memory, so
/// they cannot outlive the connection (`'c`), whatever runs after them.
pub struct Rows<'c> {
    table: *mut pg_sys::SPITupleTable,
    count: usize,
    _connection: PhantomData<&'c ()>,
}

impl<'c> Rows<'c> {
    pub fn len(&self) -> usize {
        self.count
    }

    /// Column `column` (1-based) of row `row`, as `T`; None when NULL or
    /// when there is no such row or column. To read several columns of a
    /// row, take it apart once with `row`.
    pub fn get<T: FromDatum>(&self, row: usize, column: i32) -> Option<T> {
        self.row(row)?.get(column)
    }

    /// Row `row` with all its columns taken apart at once: one call into
    /// PostgreSQL per row instead of two per column (a loaded environment
    /// reads some 300 columns).
    pub fn row(&self, row: usize) -> Option<Row<'_>> {
        if row >= self.count || self.table.is_null() {
            return None;
        }
        // SAFETY: `table` is this query's tuple table, alive until the
        // connection closes; `row` is within its `count` rows; the arrays
        // have one entry per attribute of its descriptor, which
        // heap_deform_tuple fills (pointers into the tuple, which the
        // returned row borrows through `self`).
        unsafe {
            let table = &*self.table;
            let tuple = *table.vals.add(row);
            let attributes = usize::try_from((*table.tupdesc).natts).unwrap_or(0);
            let mut values = vec![pg_sys::Datum::from(0usize); attributes];
            let mut nulls = vec![true; attributes];
            pg_sys::heap_deform_tuple(
                tuple,
                table.tupdesc,
                values.as_mut_ptr(),
                nulls.as_mut_ptr(),
            );
            Some(Row {
                descriptor: table.tupdesc,
                values,
                nulls,
                _rows: PhantomData,
            })
        }
    }
}

/// One row's columns, taken apart; it borrows the rows they point into.
pub struct Row<'r> {
    descriptor: pg_sys::TupleDesc,
    values: Vec<pg_sys::Datum>,
    nulls: Vec<bool>,
    _rows: PhantomData<&'r ()>,
}

impl Row<'_> {
    /// Column `column` (1-based) as `T`; None when NULL or out of range.
    pub fn get<T: FromDatum>(&self, column: i32) -> Option<T> {
        let index = usize::try_from(column - 1)
            .ok()
            .filter(|index| *index < self.values.len())?;
        // SAFETY: `index` is within the descriptor's attributes (as many as
        // `values`); the datum is of that attribute's type and lives in the
        // rows this row borrows.
        unsafe {
            let attribute = (*self.descriptor).attrs.as_ptr().add(index);
            T::from_polymorphic_datum(self.values[index], self.nulls[index], (*attribute).atttypid)
        }
    }

    /// Column `column` (of type jsonb) read in place: it borrows the row,
    /// so it cannot outlive the rows.
    pub fn jsonb(&self, column: i32) -> Option<JsonbArg<'_>> {
        self.get::<JsonbArg<'_>>(column)
    }
}

/// Runs `query` read-only under the active snapshot, with `arguments`, and
/// returns at most `limit` rows (0: all).
pub fn select<'c>(
    _client: &'c SpiClient<'_>,
    query: Query<'_>,
    arguments: &[DatumWithOid<'_>],
    limit: i64,
) -> Rows<'c> {
    let mut types: Vec<pg_sys::Oid> = arguments.iter().map(DatumWithOid::oid).collect();
    let mut values: Vec<pg_sys::Datum> = arguments
        .iter()
        .map(|argument| {
            argument
                .datum()
                .map_or(pg_sys::Datum::from(0usize), |datum| datum.sans_lifetime())
        })
        .collect();
    let nulls: Vec<std::ffi::c_char> = arguments
        .iter()
        .map(|argument| if argument.datum().is_some() { b' ' } else { b'n' } as std::ffi::c_char)
        .collect();
    // SAFETY: an SPI connection is open (`_client`); the arrays hold one
    // entry per argument and outlive the call; SPI raises (inside pgrx's
    // guard) on errors and returns a negative code on misuse, checked below.
    let status = unsafe {
        pg_sys::SPI_tuptable = std::ptr::null_mut();
        match query {
            Query::Kept(plan) => pg_sys::SPI_execute_plan(
                plan.0.as_ptr(),
                values.as_mut_ptr(),
                nulls.as_ptr(),
                true,
                limit,
            ),
            Query::Text(sql) => {
                let sql = CString::new(sql).expect("SQL without NUL bytes");
                pg_sys::SPI_execute_with_args(
                    sql.as_ptr(),
                    types.len() as i32,
                    types.as_mut_ptr(),
                    values.as_mut_ptr(),
                    nulls.as_ptr(),
                    true,
                    limit,
                )
            }
        }
    };
    if status < 0 {
        panic!("a cache query failed (SPI code {status})");
    }
    // SAFETY: read right after the query, as SPI documents.
    let (table, count) = unsafe { (pg_sys::SPI_tuptable, pg_sys::SPI_processed as usize) };
    Rows {
        table,
        count,
        _connection: PhantomData,
    }
}
