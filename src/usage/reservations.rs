//! Reservations: `reserve_usage`, `finalize_usage`, `release_usage`.
//!
//! A reservation is a consumption made through `record` (so it counts
//! against the limit, or draws from the grants, exactly as `record_usage`
//! does, under the same row locks) under the ledger key
//! `reservation:<id>`, plus a row in `flagship.usage_reservations` saying
//! how much is held until when. Settling it refunds what the work did not
//! use (`sql/reservations.sql`). Expiry is lazy: the first call that would
//! be refused releases expired reservations first, and checks count them
//! as released.

use pgrx::datum::{DatumWithOid, Interval};
use pgrx::prelude::*;
use pgrx::JsonB;
use serde_json::{json, Value};

use super::{
    acting_customer, check_idempotency_key, check_positive_amount, metered, record, Metered,
};
use crate::errors::invalid_parameter;
use crate::postgres::statement_reads::{self, KeptPlan, Query};

/// Organization, customer and metric.
type Ids = (pgrx::Uuid, pgrx::Uuid, pgrx::Uuid);

/// Whether 0.3.0's SQL is installed: until `ALTER EXTENSION flagship
/// UPDATE`, a database of 0.2.0 runs this library without reservations.
fn installed() -> bool {
    crate::postgres::backend::relation_exists(c"flagship", c"usage_reservations")
}

/// Releases the customer's expired reservations of the metric; whether any
/// was. Runs with usage writes open.
pub(super) fn expire(customer: pgrx::Uuid, metric: pgrx::Uuid) -> bool {
    if !installed() {
        return false;
    }
    Spi::get_one_with_args::<i32>(
        "SELECT flagship.expire_reservations($1, $2)",
        &[customer.into(), metric.into()],
    )
    .unwrap_or_else(|error| panic!("expiring reservations: {error}"))
    .unwrap_or(0)
        > 0
}

/// Kept plans of the two expired-holds reads (one per backend: a check
/// runs one on every call, and planning it would cost more than running it).
struct HoldReads {
    counted: KeptPlan,
    credits: KeptPlan,
}

thread_local! {
    static HOLD_READS: std::cell::OnceCell<HoldReads> = const { std::cell::OnceCell::new() };
}

/// Held reservations past their expiry of one customer and metric.
const EXPIRED_HELD: &str = "r.organization_id = $1 AND r.customer_id = $2 AND r.metric_id = $3
                            AND r.state = 'held' AND r.expires_at <= now()";

/// What reservations past their expiry still hold: of the counter's
/// period, or (credits) of grants still live. Read-only, under the
/// statement's snapshot: a check takes no transaction id.
pub(super) fn expired_holds(
    (organization, customer, metric): Ids,
    period_start: Option<TimestampWithTimeZone>,
    credits: bool,
) -> i64 {
    if !installed() {
        return 0;
    }
    Spi::connect(|client| {
        HOLD_READS.with(|reads| {
            let reads = reads.get_or_init(|| {
                use pg_sys::{TIMESTAMPTZOID, UUIDOID};
                HoldReads {
                    counted: KeptPlan::prepare(
                        client,
                        &format!(
                            "SELECT coalesce(sum(r.amount), 0)::bigint FROM flagship.usage_reservations r
                              WHERE {EXPIRED_HELD} AND r.period_start IS NOT DISTINCT FROM $4"
                        ),
                        &[UUIDOID, UUIDOID, UUIDOID, TIMESTAMPTZOID],
                    ),
                    credits: KeptPlan::prepare(
                        client,
                        &format!(
                            "SELECT coalesce(sum((p.value->>'amount')::bigint), 0)::bigint
                               FROM flagship.usage_reservations r
                              CROSS JOIN LATERAL jsonb_array_elements(r.paid_by) p
                               JOIN flagship.credit_grants g
                                 ON g.organization_id = r.organization_id AND g.id = (p.value->>'grant')::uuid
                              WHERE {EXPIRED_HELD} AND (g.expires_at IS NULL OR g.expires_at > now())"
                        ),
                        &[UUIDOID, UUIDOID, UUIDOID],
                    ),
                }
            });
            let rows = if credits {
                let key: [DatumWithOid<'_>; 3] =
                    [organization.into(), customer.into(), metric.into()];
                statement_reads::select(client, Query::Kept(&reads.credits), &key, 1)
            } else {
                let key: [DatumWithOid<'_>; 4] = [
                    organization.into(),
                    customer.into(),
                    metric.into(),
                    period_start.into(),
                ];
                statement_reads::select(client, Query::Kept(&reads.counted), &key, 1)
            };
            rows.get::<i64>(0, 1).unwrap_or(0)
        })
    })
}

fn check_ttl(ttl: Option<Interval>) -> Interval {
    let ttl = crate::errors::required(ttl, "ttl");
    let seconds =
        Spi::get_one_with_args::<f64>("SELECT extract(epoch FROM $1)::float8", &[ttl.into()])
            .ok()
            .flatten()
            .unwrap_or(0.0);
    if !(1.0..=7.0 * 86_400.0).contains(&seconds) {
        invalid_parameter(
            format!("ttl: must be from 1 second to 7 days, got {seconds} seconds"),
            None,
        );
    }
    ttl
}

/// Holds `amount` of `metric` for `customer` until the work is done: it
/// counts against the limit (or the credit balance) at once, as
/// `record_usage` would; `{"allowed", ..., "reservation_id", "expires_at"}`.
/// An idempotency key answers the first reservation again.
#[pg_extern(volatile)]
#[search_path(pg_catalog, pg_temp)]
pub fn reserve_usage(
    customer: Option<&str>,
    metric: Option<&str>,
    amount: Option<i64>,
    ttl: default!(Option<Interval>, "'5 minutes'"),
    idempotency_key: default!(Option<&str>, "NULL"),
    environment: default!(Option<&str>, "NULL"),
) -> JsonB {
    let metric = crate::errors::required(metric, "metric");
    let amount = check_positive_amount(amount, "amount");
    let ttl = check_ttl(ttl);
    check_idempotency_key(idempotency_key);
    crate::context::require_scope("usage:write");
    let customer = &acting_customer(customer);
    let ids = match metered(customer, metric, environment) {
        // A gauge is set, not consumed: there is nothing to hold back.
        Ok(Metered::Limit(subject)) if subject.terms.gauge => invalid_parameter(
            format!("metric: \"{metric}\" is a gauge; only sums and credits are reserved"),
            Some("set_usage sets a gauge"),
        ),
        Ok(Metered::Limit(subject)) => Some((subject.customer, subject.metric)),
        Ok(Metered::Credits(account)) => {
            let (_, customer, metric) = account.ids();
            Some((customer, metric))
        }
        Err(_) => None,
    };
    // Each reservation first releases the expired ones of its customer and
    // metric, so that abandoned holds go even where nothing is ever refused
    // (soft limits, no limit).
    if let Some((customer_id, metric_id)) = ids {
        let _writes = crate::context::UsageWrites::open();
        expire(customer_id, metric_id);
    }
    if let Some(key) = idempotency_key {
        if let Some(first) = replay(customer, metric, amount, key, environment) {
            return JsonB(first);
        }
    }
    let id = Spi::get_one::<pgrx::Uuid>("SELECT gen_random_uuid()")
        .ok()
        .flatten()
        .expect("gen_random_uuid() answers");
    let mut answer = record(
        customer,
        metric,
        amount,
        Some(&format!("reservation:{id}")),
        environment,
    );
    let (reservation, expires_at) = if answer["allowed"] == json!(true) {
        let _writes = crate::context::UsageWrites::open();
        let expires_at = Spi::get_one_with_args::<TimestampWithTimeZone>(
            "SELECT flagship.hold_reservation($1, $2, $3)",
            &[id.into(), ttl.into(), idempotency_key.into()],
        )
        .unwrap_or_else(|error| panic!("holding the reservation: {error}"));
        (json!(id.to_string()), json!(expires_at))
    } else {
        (Value::Null, Value::Null)
    };
    if let Value::Object(map) = &mut answer {
        map.insert("reservation_id".into(), reservation);
        map.insert("expires_at".into(), expires_at);
    }
    JsonB(answer)
}

/// The first reservation made with `key`, answered again as it was first
/// answered; 22023 when the key was first used for another reservation.
fn replay(
    customer: &str,
    metric: &str,
    amount: i64,
    key: &str,
    environment: Option<&str>,
) -> Option<Value> {
    // A duplicate racing the first call waits for its transaction.
    Spi::run_with_args(
        "SELECT pg_advisory_xact_lock(hashtextextended('reserve/' || flagship.current_organization_id() || '/' || $1, 0))",
        &[key.into()],
    )
    .unwrap_or_else(|error| panic!("locking the idempotency key: {error}"));
    let first = Spi::connect(|client| {
        let found = client.select(
            "SELECT flagship.reservation_document(r)
                    || jsonb_build_object('same', c.external_key = $2 AND m.key = $3 AND r.amount = $4,
                                          'customer', c.external_key, 'metric', m.key)
               FROM flagship.usage_reservations r
               JOIN flagship.customers c ON c.organization_id = r.organization_id AND c.id = r.customer_id
               JOIN flagship.metrics m ON m.organization_id = r.organization_id AND m.id = r.metric_id
              WHERE r.organization_id = flagship.current_organization_id() AND r.idempotency_key = $1",
            Some(1),
            &[key.into(), customer.into(), metric.into(), amount.into()],
        )?;
        if found.is_empty() {
            return Ok(None);
        }
        found.first().get_one::<JsonB>()
    })
    .unwrap_or_else(|error: pgrx::spi::Error| panic!("finding the idempotency key: {error}"))?
    .0;
    if first["same"] != json!(true) {
        let hint =
            Some("a retry must repeat the first call exactly; use a new key for a new reservation");
        // A customer's key learns nothing of other customers' reservations.
        if crate::context::key_customer().is_some() {
            invalid_parameter(
                format!("idempotency key \"{key}\" was first used for another reservation"),
                hint,
            );
        }
        invalid_parameter(
            format!(
                "idempotency key \"{key}\" was first used to reserve {} of \"{}\" for customer \"{}\"",
                first["reserved"],
                first["metric"].as_str().unwrap_or("?"),
                first["customer"].as_str().unwrap_or("?")
            ),
            hint,
        );
    }
    // The consumption the reservation made was recorded under its own
    // idempotency key: recording it again replays that first answer (the
    // terms it was granted under, rebuilt from its ledger row) and counts
    // nothing.
    let consumption = format!(
        "reservation:{}",
        first["reservation_id"].as_str().unwrap_or_default()
    );
    let mut answer = super::record(customer, metric, amount, Some(&consumption), environment);
    if let Value::Object(map) = &mut answer {
        map.insert("reservation_id".into(), first["reservation_id"].clone());
        map.insert("expires_at".into(), first["expires_at"].clone());
        map.insert("state".into(), first["state"].clone());
        map.insert("replayed".into(), json!(true));
    }
    Some(answer)
}

fn settle(reservation_id: pgrx::Uuid, consume: Option<i64>, settle_as: &str) -> JsonB {
    crate::context::require_scope("usage:write");
    let _writes = crate::context::UsageWrites::open();
    let answer = Spi::get_one_with_args::<JsonB>(
        "SELECT flagship.settle_reservation($1, $2, $3, $4, $5)",
        &[
            reservation_id.into(),
            consume.into(),
            settle_as.into(),
            DatumWithOid::from(crate::context::key_customer()),
            DatumWithOid::from(crate::context::bound_environment()),
        ],
    )
    .unwrap_or_else(|error| panic!("settling the reservation: {error}"));
    answer.unwrap_or(JsonB(Value::Null))
}

/// Consumes `amount` (at most what was reserved) and releases the rest:
/// `{"reservation_id", "state", "reserved", "consumed", "released",
/// "expires_at"}`. Past its expiry the reservation is released instead
/// (`"state": "expired"`, nothing consumed).
#[pg_extern(volatile)]
#[search_path(pg_catalog, pg_temp)]
pub fn finalize_usage(reservation_id: Option<pgrx::Uuid>, amount: Option<i64>) -> JsonB {
    let reservation_id = crate::errors::required(reservation_id, "reservation_id");
    settle(reservation_id, amount, "finalized")
}

/// Releases everything a reservation holds.
#[pg_extern(volatile)]
#[search_path(pg_catalog, pg_temp)]
pub fn release_usage(reservation_id: pgrx::Uuid) -> JsonB {
    settle(reservation_id, Some(0), "released")
}
