//! The SQL face of rate limits: `flagship.rate_limit`, and the counting
//! step `verify_api_key` uses.
//!
//! Definitions are configuration (a plan's or a key's `rate_limits`, read
//! under the caller's row-level security by `flagship.customer_rate_limit`
//! and `flagship.key_rate_limit`; a customer's are kept per backend like
//! the other entitlement facts);
//! counts are not: they live in shared memory (`postgres::shared_windows`),
//! outside every transaction, because an attempt that is refused or rolled
//! back still happened. The window arithmetic is the engine's
//! (`rate_window`).

use std::cell::RefCell;
use std::rc::Rc;

use pgrx::datum::DatumWithOid;
use pgrx::prelude::*;
use pgrx::JsonB;
use serde_json::Value;

use crate::cache::{self, Stamped};
use crate::errors::invalid_parameter;
use crate::postgres::backend::POSTGRES_EPOCH_MICROS;
use crate::postgres::shared_windows::{self, NotCounted};
use flagship_engine::rate_window;

/// Larger costs are mistakes, not requests.
const MAX_COST: i32 = 1_000_000;

/// Environment, customer key, limit name.
type TermsKey = ([u8; 16], String, String);

thread_local! {
    static CUSTOMER_TERMS: RefCell<Stamped<TermsKey, Rc<Value>>> = RefCell::new(Stamped::new(50_000));
}

/// A customer's rate limit `name`, kept until its organization's plans or
/// customers change (as `record_usage` keeps its terms).
fn customer_terms(environment: pgrx::Uuid, subject: &str, name: &str) -> Rc<Value> {
    let key = (
        *environment.as_bytes(),
        subject.to_string(),
        name.to_string(),
    );
    cache::stamped(&CUSTOMER_TERMS, environment, key, || {
        let (document, version) = cache::load_entitlement_document(
            "customer_rate_limit",
            vec![environment.into(), subject.into(), name.into()],
        );
        (Rc::new(document.unwrap_or(Value::Null)), version)
    })
}

/// Counts an attempt and answers it; raises when the table is missing or full.
fn count(
    organization: pgrx::Uuid,
    subject: &str,
    name: &str,
    limit: i64,
    window: &str,
    cost: u32,
) -> Value {
    let window_us = rate_window::parse_window(window).unwrap_or_else(|message| {
        invalid_parameter(format!("rate limit \"{name}\": window: {message}"), None)
    });
    let limit = u64::try_from(limit).unwrap_or_else(|_| {
        invalid_parameter(
            format!("rate limit \"{name}\": limit: must not be negative"),
            None,
        )
    });
    let now = shared_windows::clock_now();
    let (seed, database) = (shared_windows::seed(), shared_windows::database());
    let key = rate_window::counter_key(
        seed,
        database,
        organization.as_bytes(),
        subject,
        name,
        window_us,
    );
    let holder = rate_window::organization_key(seed, database, organization.as_bytes());
    match shared_windows::attempt(key, holder, window_us, now, cost, limit) {
        Ok(attempt) => rate_window::result(Some(limit), Some(&attempt), POSTGRES_EPOCH_MICROS),
        Err(NotCounted::NoTable) => crate::errors::raise(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            "rate limits need shared memory, and flagship was not loaded at server start",
            Some("add flagship to shared_preload_libraries in postgresql.conf (shared_preload_libraries = 'flagship') and restart PostgreSQL"),
        ),
        Err(NotCounted::OverShare) => crate::errors::raise(
            PgSqlErrorCode::ERRCODE_CONFIGURATION_LIMIT_EXCEEDED,
            format!(
                "rate limit \"{name}\": no window for subject \"{subject}\": this organization holds \
                 its share (a quarter) of the windows this one may use"
            ),
            Some("raise flagship.rate_limit_windows in postgresql.conf and restart; idle windows are freed as they expire"),
        ),
        Err(NotCounted::Full) => crate::errors::raise(
            PgSqlErrorCode::ERRCODE_CONFIGURATION_LIMIT_EXCEEDED,
            format!("rate limit \"{name}\": no free window for subject \"{subject}\""),
            Some("raise flagship.rate_limit_windows in postgresql.conf and restart; idle windows are freed as they expire"),
        ),
    }
}

fn checked_cost(cost: Option<i32>) -> u32 {
    let cost = crate::errors::required(cost, "cost");
    if !(1..=MAX_COST).contains(&cost) {
        invalid_parameter(
            format!("cost: must be from 1 to {MAX_COST}, not {cost}"),
            None,
        );
    }
    cost as u32
}

/// Counts one attempt of `cost` by `subject` (a customer's key, or
/// `key:<key_id>`) against its rate limit `name`:
/// `{"allowed", "limit", "remaining", "reset_at", "retry_after_ms", "reason"}`.
/// A subject whose plan declares no such limit (while another plan does)
/// is unlimited; a name no plan or key declares is refused as a typo.
#[pg_extern(volatile, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn rate_limit(
    subject: Option<&str>,
    name: Option<&str>,
    cost: default!(Option<i32>, 1),
    environment: default!(Option<&str>, "NULL"),
) -> JsonB {
    let subject = crate::errors::required(subject, "subject");
    let name = crate::errors::required(name, "name");
    crate::context::require_scope("usage:write");
    let cost = checked_cost(cost);
    // A customer's key counts for its customer, or for itself, only.
    if let Some(own) = crate::context::key_customer() {
        let own_key = crate::context::current_key_id().map(|id| format!("key:{id}"));
        if subject != own && Some(subject) != own_key.as_deref() {
            crate::errors::raise(
                PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
                format!(
                    "this transaction's API key belongs to customer \"{own}\", not \"{subject}\""
                ),
                Some("a customer's key counts rate limits for that customer, or for itself, only"),
            );
        }
    }
    let terms = if subject.starts_with("key:") {
        Rc::new(
            // Read-only: counting an attempt takes no transaction id.
            Spi::connect(|client| {
                client
                    .select(
                        "SELECT flagship.key_rate_limit($1, $2)",
                        Some(1),
                        &[DatumWithOid::from(subject), DatumWithOid::from(name)],
                    )?
                    .first()
                    .get_one::<JsonB>()
            })
            .unwrap_or_else(|error| pgrx::error!("reading the key's rate limit: {error}"))
            .map_or(Value::Null, |terms| terms.0),
        )
    } else {
        customer_terms(
            crate::evaluation::environment_id(environment),
            subject,
            name,
        )
    };
    let organization = terms["organization_id"]
        .as_str()
        .and_then(|id| pgrx::Uuid::from_slice(uuid::Uuid::parse_str(id).ok()?.as_bytes()).ok())
        .unwrap_or_else(|| pgrx::error!("rate limit terms without an organization"));
    match (terms["limit"].as_i64(), terms["window"].as_str()) {
        (Some(limit), Some(window)) => JsonB(count(
            organization,
            terms["subject"].as_str().unwrap_or(subject),
            name,
            limit,
            window,
            cost,
        )),
        _ => JsonB(rate_window::result(None, None, POSTGRES_EPOCH_MICROS)),
    }
}

/// The counting step alone, for `verify_api_key` (SECURITY DEFINER, which
/// has read the key's own limits): not executable by anyone else, so no
/// caller can spend another organization's windows.
#[pg_extern(volatile, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn rate_limit_hit(
    organization_id: pgrx::Uuid,
    subject: &str,
    name: &str,
    rate_limit: i64,
    window: &str,
    cost: i32,
) -> JsonB {
    JsonB(count(
        organization_id,
        subject,
        name,
        rate_limit,
        window,
        checked_cost(Some(cost)),
    ))
}

/// A window such as `1m` in microseconds, NULL when it is not one (1s..1d):
/// what `put_plan` and `issue_api_key` check definitions with.
#[pg_extern(immutable, parallel_safe)]
fn rate_window_us(window: &str) -> Option<i64> {
    rate_window::parse_window(window).ok()
}

/// When the postmaster is loading the library: registers
/// `flagship.rate_limit_windows` (a server-start setting, which PostgreSQL
/// lets only preloaded libraries define) and reserves the shared table.
/// Call from `_PG_init`.
pub fn register() {
    if !shared_windows::preloading() {
        return;
    }
    pgrx::guc::GucRegistry::define_int_guc(
        c"flagship.rate_limit_windows",
        c"Rate-limit windows kept in shared memory (one per organization, subject and limit name).",
        c"Read at server start; each window takes about 300 bytes. Idle windows are reused.",
        &WINDOWS,
        PARTITION_FLOOR,
        16 * 1024 * 1024,
        pgrx::guc::GucContext::Postmaster,
        pgrx::guc::GucFlags::default(),
    );
    shared_windows::reserve(WINDOWS.get() as usize);
}

const PARTITION_FLOOR: i32 = (shared_windows::PARTITIONS * 64) as i32;
static WINDOWS: pgrx::guc::GucSetting<i32> = pgrx::guc::GucSetting::<i32>::new(65_536);
