//! What plan-kind flags need from plans and customers: which features a
//! customer's live subscription and overrides grant, and the customer's
//! attributes (`customer.*` in contexts). Kept per backend and customer,
//! stamped with the entitlement generation (see `cache`), so a warm call
//! runs no query; a trial's end is checked at every call.

use std::cell::RefCell;
use std::collections::HashSet;
use std::rc::Rc;

use rustc_hash::FxBuildHasher;
use serde_json::Value;

use crate::cache::{self, Stamped};
use flagship_engine::rules::{Denial, Entitlements};

#[derive(Clone, Copy)]
enum Status {
    Live,
    Canceled,
}

/// One customer as plan-kind flags see it.
pub struct Customer {
    /// Its subscription's status (None: no plan).
    status: Option<Status>,
    trial_ends_at: Option<f64>,
    features: HashSet<String, FxBuildHasher>,
    pub attributes: Value,
}

impl Customer {
    fn from_document(document: &Value) -> Customer {
        let status = document.get("status").and_then(Value::as_str);
        Customer {
            status: match status {
                Some("active" | "trialing") => Some(Status::Live),
                Some(_) => Some(Status::Canceled),
                None => None,
            },
            trial_ends_at: if status == Some("trialing") {
                document.get("trial_ends_at").and_then(Value::as_f64)
            } else {
                None
            },
            features: document
                .get("features")
                .and_then(Value::as_array)
                .map(|keys| {
                    keys.iter()
                        .filter_map(|key| key.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default(),
            attributes: document.get("attributes").cloned().unwrap_or(Value::Null),
        }
    }

    fn grants(&self, flag: &str, now: f64) -> Result<(), Denial> {
        match self.status {
            None => Err(Denial::NoSubscription),
            Some(Status::Canceled) => Err(Denial::Canceled),
            Some(Status::Live) if self.trial_ends_at.is_some_and(|end| now >= end) => {
                Err(Denial::TrialEnded)
            }
            Some(Status::Live) if !self.features.contains(flag) => Err(Denial::NotInPlan),
            Some(Status::Live) => Ok(()),
        }
    }
}

/// Environment and external key.
type Key = ([u8; 16], String);

thread_local! {
    static CUSTOMERS: RefCell<Stamped<Key, Option<Rc<Customer>>>> =
        RefCell::new(Stamped::new(10_000));
}

/// The customer with this external key in the environment, if any.
pub fn customer(environment: pgrx::Uuid, external_key: &str) -> Option<Rc<Customer>> {
    let key = (*environment.as_bytes(), external_key.to_string());
    cache::stamped(&CUSTOMERS, environment, key, || {
        let (document, version) = cache::load_entitlement_document(
            "customer_entitlements",
            vec![environment.into(), external_key.into()],
        );
        (
            document.map(|document| Rc::new(Customer::from_document(&document))),
            version,
        )
    })
}

/// Plan-kind flags of one environment, answered from the customer cache.
pub struct EnvironmentEntitlements {
    pub environment: pgrx::Uuid,
}

impl Entitlements for EnvironmentEntitlements {
    fn grants(&self, customer: &str, flag: &str) -> Result<(), Denial> {
        let now = crate::postgres::backend::statement_start();
        let now_epoch =
            (now + crate::postgres::backend::POSTGRES_EPOCH_MICROS) as f64 / 1_000_000.0;
        self::customer(self.environment, customer)
            .ok_or(Denial::UnknownCustomer)?
            .grants(flag, now_epoch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn live_subscriptions_grant_their_features_until_the_trial_ends() {
        let active = Customer::from_document(&json!({"status": "active", "features": ["reports"]}));
        assert_eq!(active.grants("reports", 0.0), Ok(()));
        assert_eq!(active.grants("exports", 0.0), Err(Denial::NotInPlan));
        let trial = Customer::from_document(
            &json!({"status": "trialing", "trial_ends_at": 100.0, "features": ["reports"]}),
        );
        assert_eq!(trial.grants("reports", 99.0), Ok(()));
        assert_eq!(trial.grants("reports", 100.0), Err(Denial::TrialEnded));
        let canceled =
            Customer::from_document(&json!({"status": "canceled", "features": ["reports"]}));
        assert_eq!(canceled.grants("reports", 0.0), Err(Denial::Canceled));
        let unsubscribed = Customer::from_document(&json!({"status": null, "features": []}));
        assert_eq!(
            unsubscribed.grants("reports", 0.0),
            Err(Denial::NoSubscription)
        );
    }
}
