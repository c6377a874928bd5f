//! `flagship.explain_evaluation`: the answer `flagship_evaluate` gives,
//! with the engine's trace of how it was reached and, for plan-kind flags,
//! the customer's plan, subscription status and trial end.

use pgrx::prelude::*;
use serde_json::{json, Value};

use super::{evaluation_snapshot, Extracted};
use crate::entitlements::EnvironmentEntitlements;
use crate::postgres::jsonb::JsonbArg;
use crate::postgres::statement_reads;
use flagship_engine::rules::Resolution;

/// The `flagship_evaluate` result plus `"trace"`. Like evaluation it never
/// raises for a missing flag or environment; unlike it, it counts no
/// exposure (explaining is not serving).
#[pg_extern(stable, parallel_restricted)]
pub fn explain_evaluation(
    flag_key: Option<&str>,
    context: default!(Option<JsonbArg>, "'{}'"),
    environment: default!(Option<&str>, "NULL"),
) -> pgrx::JsonB {
    let flag_key = crate::errors::required(flag_key, "flag_key");
    let (snapshot, environment_id) = match evaluation_snapshot(environment) {
        Ok(found) => found,
        Err((code, message)) => {
            let mut answer = Resolution::error(flag_key, code, message).to_json();
            answer["trace"] = json!({"decided_by": "the environment could not be used"});
            return pgrx::JsonB(answer);
        }
    };
    let entitlements = EnvironmentEntitlements {
        environment: environment_id,
    };
    let (resolution, mut trace) = match context.as_ref() {
        None => {
            let empty = Extracted::empty(environment_id);
            snapshot.explain(flag_key, Some(&empty), &entitlements)
        }
        Some(context) if !context.is_object() => snapshot.explain(flag_key, None, &entitlements),
        Some(context) => {
            let extracted =
                Extracted::from(context, snapshot.context_keys(flag_key), environment_id);
            snapshot.explain(flag_key, Some(&extracted), &entitlements)
        }
    };
    if let Some(entitlement) = trace.get_mut("entitlement") {
        add_subscription(entitlement, environment_id);
    }
    let mut answer = resolution.to_json();
    answer["trace"] = trace;
    pgrx::JsonB(answer)
}

/// The customer's plan, subscription status and trial end, as the session
/// may read them (row-level security applies).
fn add_subscription(entitlement: &mut Value, environment: pgrx::Uuid) {
    let Some(customer) = entitlement["customer"].as_str().map(str::to_string) else {
        return;
    };
    // Read-only under the statement's snapshot, as the caches read: no
    // transaction id for a STABLE function.
    let found: Option<pgrx::JsonB> = Spi::connect(|client| {
        statement_reads::select(
            client,
            statement_reads::Query::Text(
                "SELECT jsonb_build_object('plan', p.key, 'status', s.status, 'trial_ends_at', s.trial_ends_at)
                   FROM flagship.customers c
                   LEFT JOIN flagship.subscriptions s
                     ON s.organization_id = c.organization_id AND s.customer_id = c.id
                   LEFT JOIN flagship.plans p ON p.organization_id = s.organization_id AND p.id = s.plan_id
                  WHERE c.environment_id = $1 AND c.external_key = $2
                    AND ($3::uuid IS NULL OR c.organization_id = $3)",
            ),
            // The session's organization as a value, where it has one: on
            // Citus the read then goes to that organization's shards (#21).
            &[
                environment.into(),
                customer.as_str().into(),
                crate::context::organization_id().into(),
            ],
            1,
        )
        .get(0, 1)
    });
    if let Some(pgrx::JsonB(Value::Object(subscription))) = found {
        for (field, value) in subscription {
            entitlement[field] = value;
        }
    }
}
