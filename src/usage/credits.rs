//! Prepaid credits: metrics with `"aggregation": "credits"` are consumed
//! from the customer's grants (`flagship.credit_grants`) instead of counted
//! against a limit.
//!
//! A consumption locks the customer's live grants of the metric in one
//! fixed order (the grant that expires first, then by grant time and id),
//! so consumers racing on one balance queue on the first grant instead of
//! deadlocking, and each sees the balance its predecessor left: the balance
//! never goes below zero. The grants it draws from are recorded in the
//! ledger row (`paid_by`). A rollback of the caller's transaction refunds,
//! as for every usage.

use pgrx::prelude::*;
use pgrx::spi::OwnedPreparedStatement;
use serde_json::{json, Value};

use super::{check_positive_amount, first_i64, prepare, spi, to_postgres, transaction_now};
use crate::errors::invalid_parameter;
use crate::postgres::jsonb::BuiltJsonb;
use flagship_engine::limits::{self, Facts, Reason};

/// The customer and metric whose grants a call draws from.
pub(super) struct Account {
    organization: pgrx::Uuid,
    customer: pgrx::Uuid,
    metric: pgrx::Uuid,
    /// The plan's grant of the current period: amount, rollover cap,
    /// period start and end.
    plan_grant: Option<(i64, i64, TimestampWithTimeZone, TimestampWithTimeZone)>,
}

impl Account {
    /// The account of a credits metric's customer, or why there is none.
    /// Credits are prepaid: they do not depend on a subscription.
    pub(super) fn from_facts(facts: &Facts) -> Result<Account, Reason> {
        let id = pgrx::Uuid::from_bytes;
        match (facts.organization, facts.customer, facts.metric) {
            (Some(organization), Some(customer), Some(metric)) => Ok(Account {
                organization: id(organization),
                customer: id(customer),
                metric: id(metric),
                plan_grant: facts.plan_grant(transaction_now()).map(
                    |(amount, rollover_max, start, end)| {
                        (amount, rollover_max, to_postgres(start), to_postgres(end))
                    },
                ),
            }),
            (_, None, _) => Err(Reason::CustomerNotFound),
            _ => Err(Reason::MetricNotFound),
        }
    }

    /// Organization, customer and metric ids.
    pub(super) fn ids(&self) -> (pgrx::Uuid, pgrx::Uuid, pgrx::Uuid) {
        (self.organization, self.customer, self.metric)
    }

    /// The arguments of the plan grant statements, if the plan grants.
    fn plan_arguments(&self) -> Option<[pgrx::datum::DatumWithOid<'static>; 7]> {
        let (amount, rollover_max, start, end) = self.plan_grant?;
        Some([
            self.organization.into(),
            self.customer.into(),
            self.metric.into(),
            amount.into(),
            start.into(),
            end.into(),
            rollover_max.into(),
        ])
    }

    fn key(&self) -> [pgrx::datum::DatumWithOid<'static>; 3] {
        [
            self.organization.into(),
            self.customer.into(),
            self.metric.into(),
        ]
    }
}

/// The live grants of an account, in the order they are drawn from.
const LIVE: &str = "FROM flagship.credit_grants g
     WHERE g.organization_id = $1 AND g.customer_id = $2 AND g.metric_id = $3
       AND g.remaining > 0 AND (g.expires_at IS NULL OR g.expires_at > now())";

struct Statements {
    plan_grant_amount: OwnedPreparedStatement,
    plan_grant: OwnedPreparedStatement,
    plan_grant_made: OwnedPreparedStatement,
    lock_live: OwnedPreparedStatement,
    balance: OwnedPreparedStatement,
    debit: OwnedPreparedStatement,
    ledger: OwnedPreparedStatement,
}

thread_local! {
    static STATEMENTS: std::cell::OnceCell<Statements> = const { std::cell::OnceCell::new() };
}

fn with_statements<R>(run: impl FnOnce(&mut pgrx::spi::SpiClient<'_>, &Statements) -> R) -> R {
    use pg_sys::{INT8OID, JSONBOID, TEXTOID, TIMESTAMPTZOID, UUIDOID};
    let account = [UUIDOID, UUIDOID, UUIDOID];
    // $4-$7: the plan's amount, the period's start and end, the rollover cap.
    let plan = [
        UUIDOID,
        UUIDOID,
        UUIDOID,
        INT8OID,
        TIMESTAMPTZOID,
        TIMESTAMPTZOID,
        INT8OID,
    ];
    Spi::connect_mut(|client| {
        STATEMENTS.with(|statements| {
            let statements = statements.get_or_init(|| Statements {
                // The period's first consumption makes the plan's grant
                // ($4: its amount, read first by plan_grant_amount; in the
                // INSERT, Citus would send that call into the shard's
                // query, #21); racing ones meet in the unique index.
                plan_grant_amount: prepare(
                    client,
                    "SELECT flagship.plan_grant_amount($1, $2, $3, $4, $5, $7)",
                    &plan,
                ),
                plan_grant: prepare(
                    client,
                    "INSERT INTO flagship.credit_grants
                         (organization_id, customer_id, metric_id, amount, remaining, expires_at,
                          source, period_start)
                     VALUES ($1, $2, $3, $4, $4, $6, 'plan', $5)
                     ON CONFLICT (organization_id, customer_id, metric_id, period_start)
                        WHERE source = 'plan' DO NOTHING",
                    &plan[..6],
                ),
                // 1 when the period's grant is made, or the period over.
                plan_grant_made: prepare(
                    client,
                    "SELECT CASE WHEN EXISTS (SELECT 1 FROM flagship.credit_grants g
                                               WHERE g.organization_id = $1 AND g.customer_id = $2
                                                 AND g.metric_id = $3 AND g.source = 'plan'
                                                 AND g.period_start = $5)
                                 OR $6 <= now() THEN 1 ELSE 0 END::bigint",
                    &plan,
                ),
                lock_live: prepare(
                    client,
                    &format!(
                        "SELECT g.id, g.remaining {LIVE}
                          ORDER BY g.expires_at NULLS LAST, g.granted_at, g.id
                            FOR UPDATE"
                    ),
                    &account,
                ),
                balance: prepare(
                    client,
                    &format!("SELECT coalesce(sum(g.remaining), 0)::bigint {LIVE}"),
                    &account,
                ),
                debit: prepare(
                    client,
                    "UPDATE flagship.credit_grants g SET remaining = g.remaining - $3
                      WHERE g.organization_id = $1 AND g.id = $2",
                    &[UUIDOID, UUIDOID, INT8OID],
                ),
                ledger: prepare(
                    client,
                    "INSERT INTO flagship.usage_ledger
                         (organization_id, customer_id, metric_id, kind, amount, used_after,
                          idempotency_key, enforcement, paid_by)
                     VALUES ($1, $2, $3, 'credits', $4, $5, $6, 'hard', $7)",
                    &[
                        UUIDOID, UUIDOID, UUIDOID, INT8OID, INT8OID, TEXTOID, JSONBOID,
                    ],
                ),
            });
            run(client, statements)
        })
    })
}

/// The live balance, with no side effects.
pub(super) fn check(account: &Account, amount: i64) -> BuiltJsonb {
    // Reservations past their expiry give their credits back, though no
    // call has released them yet.
    let balance = balance(account) + super::reservations::expired_holds(account.ids(), None, true);
    let allowed = balance >= amount;
    BuiltJsonb::from_value(&limits::credits_result(
        allowed,
        balance,
        if allowed {
            Reason::WithinLimit
        } else {
            Reason::CreditsExhausted
        },
    ))
}

pub(super) fn balance(account: &Account) -> i64 {
    with_statements(|client, statements| {
        let granted = first_i64(spi(client.select(
            &statements.balance,
            Some(1),
            &account.key(),
        )))
        .unwrap_or(0);
        // What the period's grant would hold while nobody has consumed
        // yet: two statements, as the grant is made (#21).
        let pending = match account.plan_arguments() {
            Some(arguments)
                if first_i64(spi(client.select(
                    &statements.plan_grant_made,
                    Some(1),
                    &arguments,
                ))) == Some(0) =>
            {
                first_i64(spi(client.select(
                    &statements.plan_grant_amount,
                    Some(1),
                    &arguments,
                )))
                .unwrap_or(0)
            }
            _ => 0,
        };
        granted + pending
    })
}

/// Draws `amount` from the live grants, first-expiring first, or answers
/// CREDITS_EXHAUSTED and records nothing. Runs with usage writes open; an
/// idempotency key was handled by the caller.
pub(super) fn consume(account: &Account, amount: i64, idempotency_key: Option<&str>) -> Value {
    with_statements(|client, statements| {
        if let Some(arguments) = account.plan_arguments() {
            let amount = first_i64(spi(client.select(
                &statements.plan_grant_amount,
                Some(1),
                &arguments,
            )))
            .unwrap_or(0);
            let [organization, customer, metric, _, start, end, _] = arguments;
            spi(client.update(
                &statements.plan_grant,
                None,
                &[organization, customer, metric, amount.into(), start, end],
            ));
        }
        let grants = spi(client.update(&statements.lock_live, None, &account.key()));
        let mut live: Vec<(pgrx::Uuid, i64)> = Vec::new();
        for row in grants {
            if let (Some(id), Some(remaining)) =
                (spi(row.get::<pgrx::Uuid>(1)), spi(row.get::<i64>(2)))
            {
                live.push((id, remaining));
            }
        }
        let balance: i64 = live.iter().map(|(_, remaining)| remaining).sum();
        if balance < amount {
            return limits::credits_result(false, balance, Reason::CreditsExhausted);
        }
        let mut left = amount;
        let mut paid_by = Vec::new();
        for (grant, remaining) in live {
            if left == 0 {
                break;
            }
            let take = remaining.min(left);
            spi(client.update(
                &statements.debit,
                None,
                &[account.organization.into(), grant.into(), take.into()],
            ));
            paid_by.push(json!({"grant": grant.to_string(), "amount": take}));
            left -= take;
        }
        let after = balance - amount;
        spi(client.update(
            &statements.ledger,
            None,
            &[
                account.organization.into(),
                account.customer.into(),
                account.metric.into(),
                amount.into(),
                after.into(),
                idempotency_key.map(str::to_string).into(),
                pgrx::JsonB(Value::Array(paid_by)).into(),
            ],
        ));
        limits::credits_result(true, after, Reason::WithinLimit)
    })
}

/// Adds a grant of `amount` credits (expiring at `expires_at`, if given)
/// to the account. The same idempotency key again with the same grant
/// answers the first grant (`"replayed": true`); with another, 22023.
pub(super) fn grant(
    account: &Account,
    amount: i64,
    expires_at: Option<TimestampWithTimeZone>,
    idempotency_key: Option<&str>,
) -> Value {
    super::with_statements(|client, statements| {
        if let Some(key) = idempotency_key {
            // Racing duplicates wait here for the first one's transaction
            // (the lock record_usage takes for its keys, in a space of
            // its own).
            let lock = format!("credits/{}/{key}", account.organization);
            spi(client.update(&statements.lock_key, None, &[lock.as_str().into()]));
            let found = spi(client.select(
                "SELECT g.id, g.customer_id = $2 AND g.metric_id = $3 AND g.amount = $5
                        AND g.expires_at IS NOT DISTINCT FROM $6
                   FROM flagship.credit_grants g
                  WHERE g.organization_id = $1 AND g.idempotency_key = $4",
                Some(1),
                &[
                    account.organization.into(),
                    account.customer.into(),
                    account.metric.into(),
                    key.into(),
                    amount.into(),
                    expires_at.into(),
                ],
            ));
            if !found.is_empty() {
                let row = found.first();
                if spi(row.get::<bool>(2)) != Some(true) {
                    invalid_parameter(
                        format!("idempotency key \"{key}\" was first used for another grant"),
                        Some("a retry must repeat the first call exactly; use a new key for a new grant"),
                    );
                }
                let id = spi(row.get::<pgrx::Uuid>(1));
                return json!({"grant_id": id.map(|id| id.to_string()), "amount": amount,
                              "expires_at": expires_at, "replayed": true});
            }
        }
        let id = spi(client.update(
            "INSERT INTO flagship.credit_grants
                 (organization_id, customer_id, metric_id, amount, remaining, expires_at, idempotency_key)
             VALUES ($1, $2, $3, $4, $4, $5, $6)
             RETURNING id",
            Some(1),
            &[
                account.organization.into(),
                account.customer.into(),
                account.metric.into(),
                amount.into(),
                expires_at.into(),
                idempotency_key.into(),
            ],
        ));
        let id = spi(id.first().get::<pgrx::Uuid>(1));
        json!({"grant_id": id.map(|id| id.to_string()), "amount": amount, "expires_at": expires_at})
    })
}

/// Checks a grant's amount (1 to the usage maximum) and expiry (future).
pub(super) fn check_grant(amount: Option<i64>, expires_at: Option<TimestampWithTimeZone>) -> i64 {
    let amount = check_positive_amount(amount, "amount");
    if let Some(expires_at) = expires_at {
        let future = Spi::get_one_with_args::<bool>("SELECT $1 > now()", &[expires_at.into()])
            .ok()
            .flatten();
        if future != Some(true) {
            invalid_parameter("expires_at: must be in the future", None);
        }
    }
    amount
}
