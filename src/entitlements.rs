//! What plan-kind flags need from plans and customers: which features a
//! customer's live subscription and overrides grant, and the customer's
//! attributes (`customer.*` in contexts). Kept per backend and customer,
//! stamped with the entitlement generation (see `cache`), so a warm call
//! runs no query; a trial's end is checked at every call.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::rc::Rc;

use pgrx::prelude::*;
use pgrx::JsonB;
use rustc_hash::FxBuildHasher;
use serde_json::Value;

use crate::cache;
use crate::rules::Entitlements;

/// One customer as plan-kind flags see it.
pub struct Customer {
    live: bool,
    trial_ends_at: Option<f64>,
    features: HashSet<String, FxBuildHasher>,
    pub attributes: Value,
}

impl Customer {
    fn from_document(document: &Value) -> Customer {
        let status = document.get("status").and_then(Value::as_str);
        Customer {
            live: matches!(status, Some("active" | "trialing")),
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

    fn grants(&self, flag: &str, now: f64) -> bool {
        self.live && self.trial_ends_at.is_none_or(|end| now < end) && self.features.contains(flag)
    }
}

/// Above this many cached customers, start over rather than grow.
const MAX_CUSTOMERS: usize = 10_000;

/// Environment and external key.
type Key = ([u8; 16], String);
/// The entitlement generation it was loaded at, and the customer if any.
type Cached = (u64, Option<Rc<Customer>>);

thread_local! {
    static CUSTOMERS: RefCell<HashMap<Key, Cached, FxBuildHasher>> =
        RefCell::new(HashMap::default());
}

/// The customer with this external key in the environment, if any.
pub fn customer(environment: pgrx::Uuid, external_key: &str) -> Option<Rc<Customer>> {
    let key = (*environment.as_bytes(), external_key.to_string());
    let current = cache::entitlement_generation();
    let cached = CUSTOMERS.with(|customers| {
        customers
            .borrow()
            .get(&key)
            .filter(|(generation, _)| *generation == current)
            .map(|(_, customer)| customer.clone())
    });
    if let Some(customer) = cached {
        return customer;
    }
    let loaded = load(environment, external_key).map(Rc::new);
    CUSTOMERS.with(|customers| {
        let mut customers = customers.borrow_mut();
        if customers.len() >= MAX_CUSTOMERS {
            customers.clear();
        }
        customers.insert(key, (current, loaded.clone()));
    });
    loaded
}

fn load(environment: pgrx::Uuid, external_key: &str) -> Option<Customer> {
    let (watched, document) = Spi::connect(|client| {
        let row = client
            .select(
                "SELECT 'flagship.customers'::regclass::oid, flagship.customer_entitlements($1, $2)",
                Some(1),
                &[environment.into(), external_key.into()],
            )?
            .first();
        Ok::<_, pgrx::spi::Error>((row.get::<pg_sys::Oid>(1)?, row.get::<JsonB>(2)?))
    })
    .unwrap_or_else(|error| panic!("loading customer \"{external_key}\": {error}"));
    if let Some(watched) = watched {
        cache::watch_entitlements(watched);
    }
    document.map(|document| Customer::from_document(&document.0))
}

/// Plan-kind flags of one environment, answered from the customer cache.
pub struct EnvironmentEntitlements {
    pub environment: pgrx::Uuid,
}

impl Entitlements for EnvironmentEntitlements {
    fn grants(&self, customer: &str, flag: &str) -> bool {
        // SAFETY: reads the statement's start time, a backend global.
        let now = unsafe { pg_sys::GetCurrentStatementStartTimestamp() };
        let now_epoch = now as f64 / 1_000_000.0 + 946_684_800.0;
        self::customer(self.environment, customer)
            .is_some_and(|found| found.grants(flag, now_epoch))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn live_subscriptions_grant_their_features_until_the_trial_ends() {
        let active = Customer::from_document(&json!({"status": "active", "features": ["reports"]}));
        assert!(active.grants("reports", 0.0));
        assert!(!active.grants("exports", 0.0));
        let trial = Customer::from_document(
            &json!({"status": "trialing", "trial_ends_at": 100.0, "features": ["reports"]}),
        );
        assert!(trial.grants("reports", 99.0));
        assert!(!trial.grants("reports", 100.0));
        let canceled =
            Customer::from_document(&json!({"status": "canceled", "features": ["reports"]}));
        assert!(!canceled.grants("reports", 0.0));
        let unsubscribed = Customer::from_document(&json!({"status": null, "features": []}));
        assert!(!unsubscribed.grants("reports", 0.0));
    }
}
