//! The SQL face of usage limits: `check_usage_limit`, `record_usage`,
//! `set_usage`, and the period helpers.
//!
//! A call finds its terms (customer, metric, subscription, limit) in a
//! per-backend cache stamped with the entitlement generation, so the warm
//! path runs only the statements that must run: one conditional UPDATE of
//! the counter row (its row lock makes the limit exact under concurrency)
//! and one INSERT into the append-only ledger, both through plans prepared
//! once per backend. Decisions are made by the pure `limits` module.

use std::cell::RefCell;
use std::rc::Rc;

use chrono::{DateTime, Utc};
use pgrx::datum::DatumWithOid;
use pgrx::datum::TimestampWithTimeZone;
use pgrx::prelude::*;
use pgrx::spi::{OwnedPreparedStatement, SpiClient};
use pgrx::PgOid;
use serde_json::{json, Value};

use crate::cache::{self, Stamped};
use crate::errors::invalid_parameter;
use crate::postgres::backend;
use crate::postgres::jsonb::BuiltJsonb;
use crate::postgres::subtransaction::Subtransaction;
use flagship_engine::limits::{self, Facts, Reason, Terms};
use flagship_engine::periods::{self, Period};

/// Larger amounts are mistakes, not usage.
const MAX_AMOUNT: i64 = 1_000_000_000_000;

fn to_chrono(at: TimestampWithTimeZone, name: &str) -> DateTime<Utc> {
    if !at.is_finite() {
        invalid_parameter(format!("{name} must be a finite timestamp"), None);
    }
    let micros = pg_sys::TimestampTz::from(at);
    DateTime::from_timestamp_micros(micros + backend::POSTGRES_EPOCH_MICROS)
        .unwrap_or_else(|| invalid_parameter(format!("{name} is out of range"), None))
}

fn to_postgres(at: DateTime<Utc>) -> TimestampWithTimeZone {
    TimestampWithTimeZone::try_from(at.timestamp_micros() - backend::POSTGRES_EPOCH_MICROS)
        .unwrap_or_else(|_| invalid_parameter("period bound is out of range", None))
}

fn window(
    period: Option<&str>,
    at: Option<TimestampWithTimeZone>,
    anchor: Option<TimestampWithTimeZone>,
) -> Option<(DateTime<Utc>, DateTime<Utc>)> {
    let period = crate::errors::required(period, "period");
    let at = crate::errors::required(at, "at");
    let Some(parsed) = Period::parse(period) else {
        invalid_parameter(
            format!("period: unknown period \"{period}\""),
            Some("use none, hour, day, week, month or billing_month"),
        )
    };
    periods::window(
        parsed,
        to_chrono(at, "at"),
        anchor.map(|anchor| to_chrono(anchor, "billing_anchor")),
    )
}

/// Start of the period holding `at`; NULL for `none` (never resets).
#[pg_extern(immutable, parallel_safe)]
pub fn usage_period_start(
    period: Option<&str>,
    at: Option<TimestampWithTimeZone>,
    billing_anchor: default!(Option<TimestampWithTimeZone>, "NULL"),
) -> Option<TimestampWithTimeZone> {
    window(period, at, billing_anchor).map(|(start, _)| to_postgres(start))
}

/// When the period holding `at` resets; NULL for `none`.
#[pg_extern(immutable, parallel_safe)]
pub fn usage_period_end(
    period: Option<&str>,
    at: Option<TimestampWithTimeZone>,
    billing_anchor: default!(Option<TimestampWithTimeZone>, "NULL"),
) -> Option<TimestampWithTimeZone> {
    window(period, at, billing_anchor).map(|(_, end)| to_postgres(end))
}

// Terms ----------------------------------------------------------------------

/// Environment, customer key, metric key.
type FactsKey = ([u8; 16], String, String);

thread_local! {
    static FACTS: RefCell<Stamped<FactsKey, Rc<Facts>>> = RefCell::new(Stamped::new(50_000));
}

fn facts(environment: pgrx::Uuid, customer: &str, metric: &str) -> Rc<Facts> {
    let key = (
        *environment.as_bytes(),
        customer.to_string(),
        metric.to_string(),
    );
    cache::stamped(&FACTS, environment, key, || {
        let (document, version) = cache::load_entitlement_document(
            "usage_facts",
            vec![environment.into(), customer.into(), metric.into()],
        );
        (
            Rc::new(Facts::from_document(&document.unwrap_or(Value::Null))),
            version,
        )
    })
}

/// `now()`: the transaction's start, as every other time in the transaction.
fn transaction_now() -> DateTime<Utc> {
    let now = backend::transaction_start();
    DateTime::from_timestamp_micros(now + backend::POSTGRES_EPOCH_MICROS).expect("now is in range")
}

fn check_amount(amount: Option<i64>, field: &str) -> i64 {
    match amount {
        Some(amount) if (0..=MAX_AMOUNT).contains(&amount) => amount,
        other => invalid_parameter(
            format!(
                "{field}: must be between 0 and {MAX_AMOUNT}, got {}",
                other.map_or("NULL".to_string(), |amount| amount.to_string())
            ),
            None,
        ),
    }
}

/// A consumption that must take something: 1 to the usage maximum.
fn check_positive_amount(amount: Option<i64>, field: &str) -> i64 {
    let amount = check_amount(amount, field);
    if amount == 0 {
        invalid_parameter(format!("{field}: must be between 1 and {MAX_AMOUNT}"), None);
    }
    amount
}

/// Idempotency keys are 1 to 200 characters.
fn check_idempotency_key(idempotency_key: Option<&str>) {
    if idempotency_key.is_some_and(|key| key.is_empty() || key.chars().count() > 200) {
        invalid_parameter("idempotency_key: must be 1 to 200 characters", None);
    }
}

mod credits;
mod reservations;

/// Ids and terms of one call, or the answer when there is nothing to
/// consume against.
struct Subject {
    organization: pgrx::Uuid,
    customer: pgrx::Uuid,
    metric: pgrx::Uuid,
    terms: Terms,
    /// How many escrow slices the counter is split into (1: one row).
    slices: u16,
}

impl Subject {
    fn period_start(&self) -> Option<TimestampWithTimeZone> {
        self.terms.window.map(|(start, _)| to_postgres(start))
    }
}

/// What a call meters against: a limit (counted), or prepaid credits.
enum Metered {
    Limit(Subject),
    Credits(credits::Account),
}

fn metered(customer: &str, metric: &str, environment: Option<&str>) -> Result<Metered, Reason> {
    let environment = crate::evaluation::environment_id(environment);
    let facts = facts(environment, customer, metric);
    if facts.credits {
        return credits::Account::from_facts(&facts).map(Metered::Credits);
    }
    let terms = facts.terms(transaction_now())?;
    let id = |bytes: Option<[u8; 16]>| pgrx::Uuid::from_bytes(bytes.expect("terms imply ids"));
    Ok(Metered::Limit(Subject {
        organization: id(facts.organization),
        customer: id(facts.customer),
        metric: id(facts.metric),
        terms,
        slices: facts.slices,
    }))
}

/// The customer a usage call acts for: the one it names, or with NULL the
/// customer the transaction's API key belongs to. A customer's key acts
/// for that customer alone.
fn acting_customer(named: Option<&str>) -> String {
    match (named, crate::context::key_customer()) {
        (Some(named), Some(own)) if named != own => crate::errors::raise(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!("this transaction's API key belongs to customer \"{own}\", not \"{named}\""),
            Some("a customer's key records and checks usage for that customer only"),
        ),
        (Some(named), _) => named.to_string(),
        (None, Some(own)) => own,
        (None, None) => invalid_parameter(
            "customer: must be given (NULL names the customer of the transaction's API key, and there is none)",
            None,
        ),
    }
}

fn refusal(reason: Reason) -> BuiltJsonb {
    BuiltJsonb::from_value(&refused(reason))
}

fn refused(reason: Reason) -> Value {
    limits::result(None, false, 0, reason, None)
}

// Statements -------------------------------------------------------------------

const USED: &str = "CASE WHEN c.period_start IS NOT DISTINCT FROM $4 THEN c.used ELSE 0 END";

/// The ledger row written with each change: the terms it was granted under,
/// from which a replay rebuilds the first answer exactly.
const LEDGER_COLUMNS: &str =
    "organization_id, customer_id, metric_id, period_start, kind, amount, \
     used_after, idempotency_key, usage_limit, enforcement, resets_at";

/// Plans prepared once per backend and kept. Each change is one statement
/// (a data-modifying CTE moves the counter and appends to the ledger), so a
/// consumption costs one executor run, like a hand-written UPDATE.
/// They are planned for the SQL they were planned against: 0.2.0's (one
/// row per counter) until `ALTER EXTENSION flagship UPDATE`, 0.3.0's
/// (escrow slices) after, and planned again when that changes.
struct Statements {
    sliced_schema: bool,
    consume: OwnedPreparedStatement,
    /// When present, `consume` only moves the counter (returning its use)
    /// and this writes the ledger row: once FlagShip's tables are
    /// distributed, Citus runs the one statement that does both (an
    /// INSERT ... SELECT from a modifying CTE) through intermediate
    /// results, many times slower (#21). Decided when planned.
    log_consumed: Option<OwnedPreparedStatement>,
    /// With 0.3.0's SQL only: consuming from a sliced counter.
    sliced: Option<SlicedStatements>,
    create_counter: OwnedPreparedStatement,
    read_counter: OwnedPreparedStatement,
    set_counter: OwnedPreparedStatement,
    find_replay: OwnedPreparedStatement,
    lock_key: OwnedPreparedStatement,
}

struct SlicedStatements {
    consume_own_slice: OwnedPreparedStatement,
    consume_slice: OwnedPreparedStatement,
    rebalance_slices: OwnedPreparedStatement,
    append_record: OwnedPreparedStatement,
}

thread_local! {
    static STATEMENTS: RefCell<Option<Rc<Statements>>> = const { RefCell::new(None) };
}

fn prepare(client: &SpiClient<'_>, sql: &str, types: &[pg_sys::Oid]) -> OwnedPreparedStatement {
    let types: Vec<PgOid> = types.iter().map(|oid| PgOid::from(*oid)).collect();
    client
        .prepare_mut(sql, &types)
        .unwrap_or_else(|error| panic!("preparing {sql}: {error}"))
        .keep()
}

fn with_statements<R>(run: impl FnOnce(&mut SpiClient<'_>, &Statements) -> R) -> R {
    use pg_sys::{INT4OID, INT8OID, TEXTOID, TIMESTAMPTZOID, UUIDOID};
    // $1-$4 identify the counter and its period in every statement; the
    // ledger's terms follow the change's own parameters.
    let key = [UUIDOID, UUIDOID, UUIDOID, TIMESTAMPTZOID];
    let change = [INT8OID, INT8OID, TEXTOID, INT8OID, TEXTOID, TIMESTAMPTZOID];
    let with = |extra: &[pg_sys::Oid]| [&key[..], extra].concat();
    let sliced_schema = crate::cache::versioned();
    // 0.2.0's counters have no slices: the same statements without them.
    // A row split for a limit (`split_limit`) belongs to a sliced counter:
    // the one-row path refuses it rather than ignore its caps (terms read
    // before a metric was sliced, or slices set back to 1 behind put_metric).
    let (slice_zero, counter_key) = if sliced_schema {
        (
            "AND c.slice = 0 AND c.split_limit IS NULL",
            "organization_id, customer_id, metric_id, slice",
        )
    } else {
        ("", "organization_id, customer_id, metric_id")
    };
    let plan = |client: &SpiClient<'_>| {
        // Asked when planning only: on a Citus node the question is a query.
        let two_statements = crate::citus::distributed();
        Statements {
                sliced_schema,
                consume: prepare(
                    client,
                    &if two_statements {
                        format!(
                            "UPDATE flagship.usage_counters c
                                SET used = {USED} + $5, period_start = $4, updated_at = now()
                              WHERE c.organization_id = $1 AND c.customer_id = $2
                                AND c.metric_id = $3 {slice_zero}
                                AND ($6::bigint IS NULL OR {USED} + $5 <= $6)
                          RETURNING c.used"
                        )
                    } else {
                        format!(
                        "WITH consumed AS (
                             UPDATE flagship.usage_counters c
                                SET used = {USED} + $5, period_start = $4, updated_at = now()
                              WHERE c.organization_id = $1 AND c.customer_id = $2
                                AND c.metric_id = $3 {slice_zero}
                                AND ($6::bigint IS NULL OR {USED} + $5 <= $6)
                          RETURNING c.used)
                         INSERT INTO flagship.usage_ledger ({LEDGER_COLUMNS})
                         SELECT $1, $2, $3, $4, 'record', $5, used, $7, $8, $9, $10 FROM consumed
                         RETURNING used_after"
                        )
                    },
                    &with(&change),
                ),
                log_consumed: two_statements.then(|| {
                    prepare(
                        client,
                        &format!(
                            "INSERT INTO flagship.usage_ledger ({LEDGER_COLUMNS})
                             VALUES ($1, $2, $3, $4, 'record', $5, $11, $7, $8, $9, $10)"
                        ),
                        &with(&[&change[..], &[INT8OID]].concat()),
                    )
                }),
                // A sliced counter: the first free slice with room within
                // its cap (the backend's own, $11, first), never waiting
                // for a locked one. The answer's use adds the other slices
                // as this statement sees them.
                sliced: sliced_schema.then(|| SlicedStatements {
                consume_own_slice: prepare(
                    client,
                    &consume_own_slice_sql(),
                    &with(&[&change[..], &[INT4OID]].concat()),
                ),
                consume_slice: prepare(
                    client,
                    &consume_any_slice_sql(),
                    &with(&[&change[..], &[INT4OID]].concat()),
                ),
                rebalance_slices: prepare(
                    client,
                    "SELECT granted, used_after FROM flagship.rebalance_slices($1, $2, $3, $4, $5, $6, $7, $8)",
                    &with(&[INT8OID, INT8OID, INT4OID, INT4OID]),
                ),
                append_record: prepare(
                    client,
                    &format!(
                        "INSERT INTO flagship.usage_ledger ({LEDGER_COLUMNS})
                         VALUES ($1, $2, $3, $4, 'record', $5, $11, $7, $8, $9, $10)"
                    ),
                    &with(&[&change[..], &[INT8OID]].concat()),
                ),
                }),
                create_counter: prepare(
                    client,
                    "INSERT INTO flagship.usage_counters
                         (organization_id, customer_id, metric_id, period_start, used)
                     VALUES ($1, $2, $3, $4, 0) ON CONFLICT DO NOTHING",
                    &key,
                ),
                read_counter: prepare(
                    client,
                    &format!(
                        "SELECT sum({USED})::bigint FROM flagship.usage_counters c
                          WHERE c.organization_id = $1 AND c.customer_id = $2 AND c.metric_id = $3"
                    ),
                    &key,
                ),
                set_counter: prepare(
                    client,
                    &format!(
                        "WITH gauge AS (
                             INSERT INTO flagship.usage_counters AS c
                                 (organization_id, customer_id, metric_id, period_start, used)
                             VALUES ($1, $2, $3, $4, $5)
                             ON CONFLICT ({counter_key}) DO UPDATE
                                SET used = EXCLUDED.used, period_start = EXCLUDED.period_start,
                                    updated_at = EXCLUDED.updated_at
                          RETURNING c.used)
                         INSERT INTO flagship.usage_ledger ({LEDGER_COLUMNS})
                         SELECT $1, $2, $3, $4, 'set', $5, used, $7, $8, $9, $10 FROM gauge
                         RETURNING used_after"
                    ),
                    &with(&change),
                ),
                // A key belongs to the organization: its first use, and
                // what that use recorded (the one with this customer and
                // metric first, should rows from before 0.3 share a key).
                find_replay: prepare(
                    client,
                    "SELECT l.used_after, l.usage_limit, l.enforcement, l.period_start, l.resets_at,
                            l.customer_id = $2 AND l.metric_id = $3 AND l.amount = $5,
                            l.amount, c.external_key, m.key, l.kind
                       FROM flagship.usage_ledger l
                       JOIN flagship.customers c
                         ON c.organization_id = l.organization_id AND c.id = l.customer_id
                       JOIN flagship.metrics m
                         ON m.organization_id = l.organization_id AND m.id = l.metric_id
                      WHERE l.organization_id = $1 AND l.idempotency_key = $4
                      ORDER BY l.customer_id = $2 AND l.metric_id = $3 DESC
                      LIMIT 1",
                    &[UUIDOID, UUIDOID, UUIDOID, TEXTOID, INT8OID],
                ),
                lock_key: prepare(
                    client,
                    "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
                    &[TEXTOID],
                ),
            }
    };
    Spi::connect_mut(|client| {
        let statements = STATEMENTS.with(|kept| {
            let mut kept = kept.borrow_mut();
            if kept
                .as_ref()
                .is_none_or(|statements| statements.sliced_schema != sliced_schema)
            {
                *kept = Some(Rc::new(plan(client)));
            }
            Rc::clone(kept.as_ref().expect("planned above"))
        });
        run(client, &statements)
    })
}

/// Whether a slice (`c`) has room for $5 within a cap split for the limit
/// in force ($6; NULL: soft or unlimited, which only rows without a split
/// take).
fn slice_has_room() -> String {
    format!(
        "(($6::bigint IS NULL AND c.split_limit IS NULL) \
          OR (c.split_limit = $6 AND {USED} + $5 <= c.cap))"
    )
}

/// A sliced counter's consumption: the `consumed` CTE moves one slice
/// (returning its slice and used); the ledger row follows, and the answer
/// is the counter's use (the other slices as this statement sees them).
fn consume_slice_sql(consumed: &str) -> String {
    format!(
        "WITH {consumed},
        logged AS (
            INSERT INTO flagship.usage_ledger ({LEDGER_COLUMNS})
            SELECT $1, $2, $3, $4, 'record', $5,
                   consumed.used + coalesce((SELECT sum({USED}) FROM flagship.usage_counters c
                                              WHERE c.organization_id = $1 AND c.customer_id = $2
                                                AND c.metric_id = $3 AND c.slice <> consumed.slice), 0),
                   $7, $8, $9, $10
              FROM consumed
         RETURNING used_after)
        SELECT used_after FROM logged"
    )
}

/// The backend's own slice ($11), as the one-row path moves its row: a
/// consumer waits only behind another of the same slice.
fn consume_own_slice_sql() -> String {
    let room = slice_has_room();
    consume_slice_sql(&format!(
        "consumed AS (
            UPDATE flagship.usage_counters c
               SET used = {USED} + $5, period_start = $4, updated_at = now()
             WHERE c.organization_id = $1 AND c.customer_id = $2 AND c.metric_id = $3
               AND c.slice = $11 AND {room}
         RETURNING c.slice, c.used)"
    ))
}

/// Any free slice with room (the backend's own first), never waiting for a
/// locked one.
fn consume_any_slice_sql() -> String {
    let room = slice_has_room();
    consume_slice_sql(&format!(
        "target AS (
            SELECT c.slice FROM flagship.usage_counters c
             WHERE c.organization_id = $1 AND c.customer_id = $2 AND c.metric_id = $3
               AND {room}
             ORDER BY c.slice = $11 DESC, c.slice
             LIMIT 1
               FOR UPDATE SKIP LOCKED),
        consumed AS (
            UPDATE flagship.usage_counters c
               SET used = {USED} + $5, period_start = $4, updated_at = now()
              FROM target
             WHERE c.organization_id = $1 AND c.customer_id = $2 AND c.metric_id = $3
               AND c.slice = target.slice
         RETURNING c.slice, c.used)"
    ))
}

fn spi<T>(result: pgrx::spi::SpiResult<T>) -> T {
    result.unwrap_or_else(|error| panic!("usage statement failed: {error}"))
}

/// The first column of the first row, if any.
fn first_i64(table: pgrx::spi::SpiTupleTable<'_>) -> Option<i64> {
    if table.is_empty() {
        return None;
    }
    spi(table.first().get_one::<i64>())
}

impl Subject {
    fn key(&self) -> [DatumWithOid<'static>; 4] {
        [
            self.organization.into(),
            self.customer.into(),
            self.metric.into(),
            self.period_start().into(),
        ]
    }

    /// Parameters $5-$10 of a change: amount, enforced limit, idempotency
    /// key, and the terms the ledger keeps.
    fn change(&self, amount: i64, idempotency_key: Option<&str>) -> Vec<DatumWithOid<'static>> {
        let terms = &self.terms;
        let mut parameters = Vec::from(self.key());
        parameters.extend([
            amount.into(),
            terms.hard_limit().into(),
            idempotency_key.map(str::to_string).into(),
            terms.limit.usage_limit.into(),
            (if terms.limit.soft { "soft" } else { "hard" }).into(),
            terms.window.map(|(_, end)| to_postgres(end)).into(),
        ]);
        parameters
    }

    /// The answer to a change that left `used_after`: the same for the
    /// first call and every replay.
    fn granted(&self, used_after: i64) -> Value {
        let (reason, over_limit) = limits::consumed(&self.terms, used_after);
        limits::result(Some(&self.terms), true, used_after, reason, over_limit)
    }

    fn denied(&self, used: i64) -> Value {
        limits::result(Some(&self.terms), false, used, Reason::LimitExceeded, None)
    }
}

/// The first answer to an idempotency key, rebuilt from its ledger row and
/// the terms recorded there (not today's). A key used again for another
/// customer, metric or amount is a bug in the caller (a reused key, or a
/// retry that changed the call): 22023 naming the key, never a silent
/// replay of an answer to a different question.
fn replay(
    found: pgrx::spi::SpiTupleTable<'_>,
    key: &str,
    customer: &str,
    metric: &str,
    amount: i64,
) -> Option<Value> {
    if found.is_empty() {
        return None;
    }
    let row = found.first();
    let credits = spi(row.get::<String>(10)).as_deref() == Some("credits");
    if spi(row.get::<bool>(6)) != Some(true) {
        let first_amount = spi(row.get::<i64>(7)).unwrap_or_default();
        let first_customer = spi(row.get::<String>(8)).unwrap_or_default();
        let first_metric = spi(row.get::<String>(9)).unwrap_or_default();
        invalid_parameter(
            format!(
                "idempotency key \"{key}\" was first used to record {first_amount} of \
                 \"{first_metric}\" for customer \"{first_customer}\", not {amount} of \
                 \"{metric}\" for \"{customer}\""
            ),
            Some("a retry must repeat the first call exactly; use a new key for a new call"),
        );
    }
    let used_after = spi(row.get::<i64>(1))?;
    if credits {
        // A consumption of credits keeps the balance it left.
        return Some(limits::credits_result(
            true,
            used_after,
            Reason::WithinLimit,
        ));
    }
    let period_start = spi(row.get::<TimestampWithTimeZone>(4));
    let resets_at = spi(row.get::<TimestampWithTimeZone>(5));
    let terms = Terms {
        limit: limits::Limit {
            usage_limit: spi(row.get::<i64>(2)),
            period: Period::None,
            soft: spi(row.get::<String>(3)).as_deref() == Some("soft"),
        },
        gauge: false,
        window: period_start.zip(resets_at).map(|(start, end)| {
            (
                to_chrono(start, "period_start"),
                to_chrono(end, "resets_at"),
            )
        }),
    };
    let (reason, over_limit) = limits::consumed(&terms, used_after);
    Some(limits::result(
        Some(&terms),
        true,
        used_after,
        reason,
        over_limit,
    ))
}

fn current_usage(client: &mut SpiClient<'_>, statements: &Statements, subject: &Subject) -> i64 {
    first_i64(spi(client.select(
        &statements.read_counter,
        Some(1),
        &subject.key(),
    )))
    .unwrap_or(0)
}

// Functions ------------------------------------------------------------------

/// Whether `amount` more would be allowed, with no side effects.
#[pg_extern(stable)]
pub fn check_usage_limit(
    customer: Option<&str>,
    metric: Option<&str>,
    amount: default!(Option<i64>, 1),
    environment: default!(Option<&str>, "NULL"),
) -> BuiltJsonb {
    let metric = crate::errors::required(metric, "metric");
    let amount = check_amount(amount, "amount");
    crate::context::require_scope("usage:read");
    let customer = &acting_customer(customer);
    let subject = match metered(customer, metric, environment) {
        Ok(Metered::Limit(subject)) => subject,
        Ok(Metered::Credits(account)) => return credits::check(&account, amount),
        Err(reason) => return refusal(reason),
    };
    // Reservations past their expiry count as released, though no call
    // has released them yet.
    let used = with_statements(|client, statements| current_usage(client, statements, &subject))
        - reservations::expired_holds(
            (subject.organization, subject.customer, subject.metric),
            subject.period_start(),
            false,
        );
    let (allowed, reason, over_limit) = limits::check(&subject.terms, used, amount);
    BuiltJsonb::from_value(&limits::result(
        Some(&subject.terms),
        allowed,
        used,
        reason,
        over_limit,
    ))
}

/// Consumes `amount` atomically: over a hard limit nothing is recorded; an
/// idempotency key replays the first answer and counts once; a rollback of
/// the caller's transaction refunds.
// The search path is pinned: while usage writes are open, no function or
// operator of the caller's choosing may run.
#[pg_extern(volatile)]
#[search_path(pg_catalog, pg_temp)]
pub fn record_usage(
    customer: Option<&str>,
    metric: Option<&str>,
    amount: default!(Option<i64>, 1),
    idempotency_key: default!(Option<&str>, "NULL"),
    environment: default!(Option<&str>, "NULL"),
) -> BuiltJsonb {
    let metric = crate::errors::required(metric, "metric");
    let amount = check_amount(amount, "amount");
    check_idempotency_key(idempotency_key);
    crate::context::require_scope("usage:write");
    let customer = &acting_customer(customer);
    let answer = record(customer, metric, amount, idempotency_key, environment);
    BuiltJsonb::from_value(&answer)
}

/// Consumes `amount` for `customer` (already authorized), as `record_usage`
/// answers it; reservations consume through here too.
fn record(
    customer: &str,
    metric: &str,
    amount: i64,
    idempotency_key: Option<&str>,
    environment: Option<&str>,
) -> Value {
    let metered = match metered(customer, metric, environment) {
        Ok(metered) => metered,
        Err(reason) => return refused(reason),
    };
    let (organization, customer_id, metric_id) = match &metered {
        Metered::Limit(subject) => (subject.organization, subject.customer, subject.metric),
        Metered::Credits(account) => account.ids(),
    };
    // Only these statements may write counters, grants and the ledger.
    let _writes = crate::context::UsageWrites::open();
    let consume = || {
        with_statements(|client, statements| {
            if let Some(key) = idempotency_key {
                // A duplicate racing the first call waits here until that call's
                // transaction ends, then finds (or not) its ledger row.
                let lock = format!("{organization}/{key}");
                spi(client.update(&statements.lock_key, None, &[lock.as_str().into()]));
                let found = spi(client.select(
                    &statements.find_replay,
                    Some(1),
                    &[
                        organization.into(),
                        customer_id.into(),
                        metric_id.into(),
                        key.into(),
                        amount.into(),
                    ],
                ));
                if let Some(mut replayed) = replay(found, key, customer, metric, amount) {
                    if let Value::Object(map) = &mut replayed {
                        map.insert("replayed".into(), json!(true));
                    }
                    return replayed;
                }
            }
            let subject = match &metered {
                Metered::Limit(subject) => subject,
                Metered::Credits(account) => {
                    return credits::consume(account, amount, idempotency_key)
                }
            };
            if let Some(sliced) = statements.sliced.as_ref().filter(|_| subject.slices > 1) {
                return consume_sliced(client, sliced, subject, amount, idempotency_key);
            }
            let change = subject.change(amount, idempotency_key);
            for _ in 0..2 {
                if let Some(used_after) =
                    first_i64(spi(client.update(&statements.consume, None, &change)))
                {
                    if let Some(log_consumed) = &statements.log_consumed {
                        let mut logged = subject.change(amount, idempotency_key);
                        logged.push(used_after.into());
                        spi(client.update(log_consumed, None, &logged));
                    }
                    return subject.granted(used_after);
                }
                // Either the hard limit denies, or there is no counter yet.
                let created = spi(client.update(&statements.create_counter, None, &subject.key()));
                if created.is_empty() {
                    break;
                }
            }
            subject.denied(current_usage(client, statements, subject))
        })
    };
    let answer = consume();
    // A refusal may be owed to reservations past their expiry: release them
    // (no job runner does) and try once more.
    if refused_for_lack(&answer) && reservations::expire(customer_id, metric_id) {
        return consume();
    }
    answer
}

/// Consumes from a sliced counter (see "Escrow slices" in usage.sql): a
/// free slice with room, else the rebalancing that locks them all.
fn consume_sliced(
    client: &mut SpiClient<'_>,
    statements: &SlicedStatements,
    subject: &Subject,
    amount: i64,
    idempotency_key: Option<&str>,
) -> Value {
    // Each backend starts from a slice of its own, so concurrent consumers
    // of one customer spread over the slices without asking each other.
    let preferred = (std::process::id() % u32::from(subject.slices)) as i32;
    let mut parameters = subject.change(amount, idempotency_key);
    parameters.push(preferred.into());
    // In a subtransaction, rolled back when it finds no room: an attempt
    // may end up holding a slice it could not use (locked, then found full
    // on the newest version: EvalPlanQual keeps the lock), and holding it
    // while the rebalancing waits for every slice in order could deadlock
    // with another rebalancing.
    let attempt = Subtransaction::begin();
    let mut consume = |statement: &OwnedPreparedStatement| {
        first_i64(spi(client.update(statement, None, &parameters)))
    };
    // The backend's own slice first (waiting only behind a consumer of the
    // same slice), then any free one.
    let consumed =
        consume(&statements.consume_own_slice).or_else(|| consume(&statements.consume_slice));
    if let Some(used_after) = consumed {
        attempt.release();
        return subject.granted(used_after);
    }
    drop(attempt);
    let mut arguments = Vec::from(subject.key());
    arguments.extend([
        amount.into(),
        subject.terms.hard_limit().into(),
        i32::from(subject.slices).into(),
        preferred.into(),
    ]);
    let rebalanced = spi(client.update(&statements.rebalance_slices, None, &arguments));
    let row = rebalanced.first();
    let granted = spi(row.get::<bool>(1)).unwrap_or(false);
    let used_after = spi(row.get::<i64>(2)).unwrap_or(0);
    if !granted {
        return subject.denied(used_after);
    }
    let mut record = subject.change(amount, idempotency_key);
    record.push(used_after.into());
    spi(client.update(&statements.append_record, None, &record));
    subject.granted(used_after)
}

/// Whether an answer refuses for want of room: over a hard limit, or out of
/// credits (not: unknown customer, no plan).
fn refused_for_lack(answer: &Value) -> bool {
    answer["allowed"] == json!(false)
        && [Reason::LimitExceeded, Reason::CreditsExhausted]
            .iter()
            .any(|reason| answer["reason"] == json!(reason.as_str()))
}

/// Adds `amount` credits of a credits metric to a customer's balance,
/// expiring at `expires_at` (never, by default). Needs plans:write.
// The search path is pinned: while usage writes are open, no function or
// operator of the caller's choosing may run.
#[pg_extern(volatile)]
#[search_path(pg_catalog, pg_temp)]
pub fn grant_credits(
    customer: Option<&str>,
    metric: Option<&str>,
    amount: Option<i64>,
    expires_at: default!(Option<TimestampWithTimeZone>, "NULL"),
    idempotency_key: default!(Option<&str>, "NULL"),
    environment: default!(Option<&str>, "NULL"),
) -> pgrx::JsonB {
    let metric = crate::errors::required(metric, "metric");
    Spi::run("SELECT flagship.require_permission('plans:write', 'grant_credits')")
        .unwrap_or_else(|error| panic!("checking the permission: {error}"));
    let amount = credits::check_grant(amount, expires_at);
    check_idempotency_key(idempotency_key);
    let customer = &acting_customer(customer);
    let account = match metered(customer, metric, environment) {
        Ok(Metered::Credits(account)) => account,
        Ok(Metered::Limit(_)) => invalid_parameter(
            format!("metric: \"{metric}\" does not count credits"),
            Some("give the metric \"aggregation\": \"credits\" (put_metric)"),
        ),
        Err(Reason::MetricNotFound) => {
            invalid_parameter(format!("metric: unknown metric \"{metric}\""), None)
        }
        Err(_) => invalid_parameter(format!("customer: unknown customer \"{customer}\""), None),
    };
    let _writes = crate::context::UsageWrites::open();
    let mut answer = credits::grant(&account, amount, expires_at, idempotency_key);
    answer["balance"] = json!(credits::balance(&account));
    pgrx::JsonB(answer)
}

/// Sets a gauge (seats, projects) to `value`; a hard limit refuses values
/// above it and records nothing.
// The search path is pinned: while usage writes are open, no function or
// operator of the caller's choosing may run.
#[pg_extern(volatile)]
#[search_path(pg_catalog, pg_temp)]
pub fn set_usage(
    customer: Option<&str>,
    metric: Option<&str>,
    value: Option<i64>,
    environment: default!(Option<&str>, "NULL"),
) -> BuiltJsonb {
    let metric = crate::errors::required(metric, "metric");
    let value = check_amount(value, "value");
    crate::context::require_scope("usage:write");
    let customer = &acting_customer(customer);
    let subject = match metered(customer, metric, environment) {
        Ok(Metered::Limit(subject)) => subject,
        Ok(Metered::Credits(_)) => crate::errors::raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("metric: \"{metric}\" counts credits; set_usage is for gauge metrics"),
            Some("use record_usage to consume credits and grant_credits to add them"),
        ),
        Err(reason) => return refusal(reason),
    };
    if !subject.terms.gauge {
        crate::errors::raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("metric: \"{metric}\" is a sum; set_usage is for gauge metrics"),
            Some("use record_usage to add to a sum"),
        );
    }
    // Only these statements may write counters and the ledger.
    let _writes = crate::context::UsageWrites::open();
    let answer = with_statements(|client, statements| {
        if subject
            .terms
            .hard_limit()
            .is_some_and(|limit| value > limit)
        {
            return subject.denied(current_usage(client, statements, &subject));
        }
        let change = subject.change(value, None);
        let used = first_i64(spi(client.update(&statements.set_counter, None, &change)));
        subject.granted(used.unwrap_or(value))
    });
    BuiltJsonb::from_value(&answer)
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    // In a file of its own to keep this one short; #[pg_schema] needs the
    // module inline.
    include!("usage/tests.rs");
}
