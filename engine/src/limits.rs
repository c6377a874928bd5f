//! Usage-limit decisions, without PostgreSQL: which terms apply to a
//! customer and metric, what a check or a consumption answers, and the
//! result document of DESIGN.md. The SQL side (`usage`) only fetches facts
//! and moves counters.

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{json, Map, Value};

use crate::periods::{self, Period};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    WithinLimit,
    Unlimited,
    LimitExceeded,
    NotEntitled,
    CustomerNotFound,
    MetricNotFound,
    SubscriptionInactive,
    /// A credits metric whose live grants cannot pay the amount: distinct
    /// from NOT_ENTITLED, so integrators do not mistake an empty balance
    /// for a plan without the metric (or fail open on it).
    CreditsExhausted,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::WithinLimit => "WITHIN_LIMIT",
            Reason::Unlimited => "UNLIMITED",
            Reason::LimitExceeded => "LIMIT_EXCEEDED",
            Reason::NotEntitled => "NOT_ENTITLED",
            Reason::CustomerNotFound => "CUSTOMER_NOT_FOUND",
            Reason::MetricNotFound => "METRIC_NOT_FOUND",
            Reason::SubscriptionInactive => "SUBSCRIPTION_INACTIVE",
            Reason::CreditsExhausted => "CREDITS_EXHAUSTED",
        }
    }
}

/// The limit a plan or a customer override sets for one metric.
#[derive(Debug, Clone, PartialEq)]
pub struct Limit {
    /// None: unlimited.
    pub usage_limit: Option<i64>,
    pub period: Period,
    pub soft: bool,
}

/// Credits a plan grants each period: `amount`, plus what the previous
/// period left up to `rollover_max`.
#[derive(Debug, Clone, PartialEq)]
pub struct PlanCredits {
    pub amount: i64,
    pub period: Period,
    pub rollover_max: i64,
}

/// What the database knows about one customer and metric (see
/// `flagship.usage_facts`), kept per backend between changes.
#[derive(Debug, Clone, PartialEq)]
pub struct Facts {
    pub organization: Option<[u8; 16]>,
    pub customer: Option<[u8; 16]>,
    pub metric: Option<[u8; 16]>,
    pub gauge: bool,
    /// Consumed from prepaid grants, not counted against a limit.
    pub credits: bool,
    pub status: Option<String>,
    pub trial_ends_at: Option<DateTime<Utc>>,
    pub billing_anchor: Option<DateTime<Utc>>,
    /// The override if the customer has one, else the plan's.
    pub limit: Option<Limit>,
    /// The credits the customer's plan grants of this metric, if any.
    pub plan_credits: Option<PlanCredits>,
    /// How many escrow slices each counter of the metric is split into (1:
    /// one row).
    pub slices: u16,
}

/// The terms a decision is made under, at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct Terms {
    pub limit: Limit,
    pub gauge: bool,
    pub window: Option<(DateTime<Utc>, DateTime<Utc>)>,
}

impl Terms {
    /// The limit a consumption must stay under, if it is enforced.
    pub fn hard_limit(&self) -> Option<i64> {
        self.limit.usage_limit.filter(|_| !self.limit.soft)
    }
}

fn uuid_bytes(value: Option<&Value>) -> Option<[u8; 16]> {
    let text = value?.as_str()?;
    uuid::Uuid::parse_str(text).ok().map(|id| *id.as_bytes())
}

fn instant(value: Option<&Value>) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp_micros((value?.as_f64()? * 1_000_000.0).round() as i64)
}

impl Facts {
    /// Reads the document `flagship.usage_facts` returns (epochs in seconds).
    pub fn from_document(document: &Value) -> Facts {
        let limit = document
            .get("has_limit")
            .and_then(Value::as_bool)
            .unwrap_or(false)
            .then(|| Limit {
                usage_limit: document.get("usage_limit").and_then(Value::as_i64),
                period: document
                    .get("period")
                    .and_then(Value::as_str)
                    .and_then(Period::parse)
                    .unwrap_or(Period::Month),
                soft: document.get("enforcement").and_then(Value::as_str) == Some("soft"),
            });
        Facts {
            organization: uuid_bytes(document.get("organization_id")),
            customer: uuid_bytes(document.get("customer_id")),
            metric: uuid_bytes(document.get("metric_id")),
            gauge: document.get("aggregation").and_then(Value::as_str) == Some("gauge"),
            credits: document.get("aggregation").and_then(Value::as_str) == Some("credits"),
            slices: document
                .get("slices")
                .and_then(Value::as_u64)
                .and_then(|slices| u16::try_from(slices).ok())
                .filter(|slices| *slices >= 1)
                .unwrap_or(1),
            status: document
                .get("status")
                .and_then(Value::as_str)
                .map(str::to_string),
            trial_ends_at: instant(document.get("trial_ends_at")),
            billing_anchor: instant(document.get("billing_anchor")),
            limit,
            plan_credits: document
                .get("plan_credits")
                .filter(|credits| credits.is_object())
                .map(|credits| PlanCredits {
                    amount: credits.get("amount").and_then(Value::as_i64).unwrap_or(0),
                    period: credits
                        .get("period")
                        .and_then(Value::as_str)
                        .and_then(Period::parse)
                        .unwrap_or(Period::Month),
                    rollover_max: credits
                        .get("rollover_max")
                        .and_then(Value::as_i64)
                        .unwrap_or(0),
                }),
        }
    }

    /// Whether the subscription is live at `now` (active, or trialing
    /// before the trial's end).
    pub fn live(&self, now: DateTime<Utc>) -> bool {
        match self.status.as_deref() {
            Some("active") => true,
            Some("trialing") => self.trial_ends_at.is_some_and(|end| now < end),
            _ => false,
        }
    }

    /// The plan's grant for the period holding `now`: amount, rollover cap
    /// and the period's bounds; None without plan credits or a live
    /// subscription.
    pub fn plan_grant(
        &self,
        now: DateTime<Utc>,
    ) -> Option<(i64, i64, DateTime<Utc>, DateTime<Utc>)> {
        let credits = self.plan_credits.as_ref().filter(|_| self.live(now))?;
        let (start, end) = periods::window(credits.period, now, self.billing_anchor)?;
        Some((credits.amount, credits.rollover_max, start, end))
    }

    /// The terms in force at `now`, or why there are none.
    pub fn terms(&self, now: DateTime<Utc>) -> Result<Terms, Reason> {
        if self.customer.is_none() {
            return Err(Reason::CustomerNotFound);
        }
        if self.metric.is_none() {
            return Err(Reason::MetricNotFound);
        }
        if !self.live(now) {
            return Err(Reason::SubscriptionInactive);
        }
        let limit = self.limit.clone().ok_or(Reason::NotEntitled)?;
        Ok(Terms {
            window: periods::window(limit.period, now, self.billing_anchor),
            gauge: self.gauge,
            limit,
        })
    }
}

/// What `check_usage_limit` answers for `amount` more on top of `used`:
/// (allowed, reason, over_limit).
pub fn check(terms: &Terms, used: i64, amount: i64) -> (bool, Reason, Option<bool>) {
    match terms.limit.usage_limit {
        None => (true, Reason::Unlimited, None),
        Some(limit) if used.saturating_add(amount) <= limit => {
            (true, Reason::WithinLimit, terms.limit.soft.then_some(false))
        }
        Some(_) => (terms.limit.soft, Reason::LimitExceeded, Some(true)),
    }
}

/// The reason and over_limit flag of a consumption that left `used_after`.
pub fn consumed(terms: &Terms, used_after: i64) -> (Reason, Option<bool>) {
    match terms.limit.usage_limit {
        None => (Reason::Unlimited, None),
        Some(limit) => {
            let over = used_after > limit;
            let reason = if over {
                Reason::LimitExceeded
            } else {
                Reason::WithinLimit
            };
            (reason, terms.limit.soft.then_some(over))
        }
    }
}

/// How every answer writes a time (RFC 3339, UTC).
pub(crate) fn timestamp(at: DateTime<Utc>) -> Value {
    Value::String(at.to_rfc3339_opts(SecondsFormat::AutoSi, false))
}

/// The answer for a credits metric, in the shape of `result`: `remaining`
/// is the live balance (after the consumption, for a granted one), and
/// there is no limit, count or period.
pub fn credits_result(allowed: bool, balance: i64, reason: Reason) -> Value {
    json!({
        "allowed": allowed,
        "limit": null,
        "used": null,
        "remaining": balance,
        "period_start": null,
        "resets_at": null,
        "enforcement": "hard",
        "reason": reason.as_str(),
    })
}

/// The result document: `{"allowed", "limit", "used", "remaining",
/// "period_start", "resets_at", "enforcement", "reason"}`, plus
/// `over_limit` for soft limits.
pub fn result(
    terms: Option<&Terms>,
    allowed: bool,
    used: i64,
    reason: Reason,
    over_limit: Option<bool>,
) -> Value {
    let limit = terms.and_then(|terms| terms.limit.usage_limit);
    let window = terms.and_then(|terms| terms.window);
    let mut out = Map::with_capacity(9);
    out.insert("allowed".into(), json!(allowed));
    out.insert("limit".into(), json!(limit));
    out.insert("used".into(), json!(used));
    out.insert(
        "remaining".into(),
        json!(limit.map(|limit| (limit - used).max(0))),
    );
    out.insert(
        "period_start".into(),
        window.map_or(Value::Null, |(start, _)| timestamp(start)),
    );
    out.insert(
        "resets_at".into(),
        window.map_or(Value::Null, |(_, end)| timestamp(end)),
    );
    out.insert(
        "enforcement".into(),
        terms.map_or(Value::Null, |terms| {
            json!(if terms.limit.soft { "soft" } else { "hard" })
        }),
    );
    out.insert("reason".into(), json!(reason.as_str()));
    if let Some(over) = over_limit {
        out.insert("over_limit".into(), json!(over));
    }
    Value::Object(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text)
            .unwrap()
            .with_timezone(&Utc)
    }

    fn facts(status: &str, limit: Option<Limit>) -> Facts {
        Facts {
            organization: Some([1; 16]),
            customer: Some([2; 16]),
            metric: Some([3; 16]),
            gauge: false,
            credits: false,
            status: Some(status.into()),
            trial_ends_at: Some(at("2024-06-01T00:00:00Z")),
            billing_anchor: None,
            limit,
            plan_credits: None,
            slices: 1,
        }
    }

    fn hard(limit: i64) -> Option<Limit> {
        Some(Limit {
            usage_limit: Some(limit),
            period: Period::Month,
            soft: false,
        })
    }

    #[test]
    fn every_reason_for_missing_terms() {
        let now = at("2024-05-10T00:00:00Z");
        let mut missing = facts("active", hard(5));
        missing.customer = None;
        assert_eq!(missing.terms(now), Err(Reason::CustomerNotFound));
        let mut missing = facts("active", hard(5));
        missing.metric = None;
        assert_eq!(missing.terms(now), Err(Reason::MetricNotFound));
        assert_eq!(
            facts("canceled", hard(5)).terms(now),
            Err(Reason::SubscriptionInactive)
        );
        assert!(facts("trialing", hard(5)).terms(now).is_ok());
        assert_eq!(
            facts("trialing", hard(5)).terms(at("2024-06-01T00:00:00Z")),
            Err(Reason::SubscriptionInactive),
            "the trial ends at trial_ends_at"
        );
        assert_eq!(facts("active", None).terms(now), Err(Reason::NotEntitled));
    }

    #[test]
    fn hard_soft_and_unlimited_decisions() {
        let now = at("2024-05-10T00:00:00Z");
        let terms = facts("active", hard(5)).terms(now).unwrap();
        assert_eq!(check(&terms, 4, 1), (true, Reason::WithinLimit, None));
        assert_eq!(
            check(&terms, 5, 1),
            (false, Reason::LimitExceeded, Some(true))
        );
        assert_eq!(terms.hard_limit(), Some(5));
        let soft = facts(
            "active",
            Some(Limit {
                usage_limit: Some(5),
                period: Period::Day,
                soft: true,
            }),
        )
        .terms(now)
        .unwrap();
        assert_eq!(soft.hard_limit(), None);
        assert_eq!(
            check(&soft, 5, 1),
            (true, Reason::LimitExceeded, Some(true))
        );
        assert_eq!(consumed(&soft, 6), (Reason::LimitExceeded, Some(true)));
        assert_eq!(consumed(&soft, 5), (Reason::WithinLimit, Some(false)));
        let unlimited = facts(
            "active",
            Some(Limit {
                usage_limit: None,
                period: Period::None,
                soft: false,
            }),
        )
        .terms(now)
        .unwrap();
        assert_eq!(
            check(&unlimited, i64::MAX, 1),
            (true, Reason::Unlimited, None)
        );
        assert_eq!(unlimited.window, None);
    }

    #[test]
    fn result_document_shape() {
        let terms = facts("active", hard(5))
            .terms(at("2024-05-10T12:00:00Z"))
            .unwrap();
        assert_eq!(
            result(Some(&terms), true, 7, Reason::LimitExceeded, None),
            json!({"allowed": true, "limit": 5, "used": 7, "remaining": 0,
                   "period_start": "2024-05-01T00:00:00+00:00",
                   "resets_at": "2024-06-01T00:00:00+00:00",
                   "enforcement": "hard", "reason": "LIMIT_EXCEEDED"})
        );
        assert_eq!(
            result(None, false, 0, Reason::CustomerNotFound, None),
            json!({"allowed": false, "limit": null, "used": 0, "remaining": null,
                   "period_start": null, "resets_at": null, "enforcement": null,
                   "reason": "CUSTOMER_NOT_FOUND"})
        );
    }

    #[test]
    fn facts_are_read_from_their_document() {
        let document = json!({
            "organization_id": "7c9e6679-7425-40de-944b-e07fc1f90ae7",
            "customer_id": "7c9e6679-7425-40de-944b-e07fc1f90ae8",
            "metric_id": "7c9e6679-7425-40de-944b-e07fc1f90ae9",
            "aggregation": "gauge", "status": "trialing", "trial_ends_at": 1717200000.5,
            "billing_anchor": 1706695200, "has_limit": true, "usage_limit": null,
            "period": "billing_month", "enforcement": "soft", "slices": 8});
        let facts = Facts::from_document(&document);
        assert!(facts.gauge);
        assert_eq!(facts.slices, 8);
        assert_eq!(Facts::from_document(&json!({})).slices, 1);
        assert_eq!(facts.trial_ends_at, Some(at("2024-06-01T00:00:00.5Z")));
        assert_eq!(facts.billing_anchor, Some(at("2024-01-31T10:00:00Z")));
        assert_eq!(
            facts.limit,
            Some(Limit {
                usage_limit: None,
                period: Period::BillingMonth,
                soft: true
            })
        );
    }
}
