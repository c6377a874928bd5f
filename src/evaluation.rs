//! `flagship_evaluate` and friends: resolve the environment, fetch its
//! compiled configuration from the backend cache (compiling it on a miss),
//! and run the pure engine. Evaluation answers problems with an ERROR
//! result instead of raising, so it is safe in WHERE clauses and policies.

use std::cell::{Cell, OnceCell, RefCell};
use std::rc::Rc;

use pgrx::prelude::*;
use serde_json::Value;

use crate::cache::{self, CompiledKey, Located, Resolved};
use crate::context::{self, IdentityKey, RawIdentity};
use crate::encoded;
use crate::entitlements::{self, Customer, EnvironmentEntitlements};
use crate::exposures;
use crate::postgres::args::TextArg;
use crate::postgres::jsonb::{Builder, BuiltJsonb, JsonbArg};
use flagship_engine::rules::conditions::Attributes;
use flagship_engine::rules::resolution::ErrorCode;
use flagship_engine::rules::{Resolution, Snapshot};

mod explain;
mod loading;
use loading::{load, locate};

/// `snapshot_for`, for evaluation: an API key must grant `features:read`.
fn evaluation_snapshot(
    environment: Option<&str>,
) -> Result<(Rc<Snapshot>, pgrx::Uuid), (ErrorCode, String)> {
    if !context::scope_allows("features:read") {
        return Err((
            ErrorCode::General,
            "this transaction's API key lacks the scope features:read".to_string(),
        ));
    }
    snapshot_for(environment)
}

/// The compiled configuration of the named environment (or of the session's
/// `flagship.environment`), or why there is none.
fn snapshot_for(
    environment: Option<&str>,
) -> Result<(Rc<Snapshot>, pgrx::Uuid), (ErrorCode, String)> {
    cache::accept_invalidations();
    let explicit = environment.map(str::trim).filter(|name| !name.is_empty());
    // The identity is copied only on a miss, before any query runs.
    let recall = || {
        RawIdentity::with_current(explicit, |identity| {
            cache::recall(identity).ok_or_else(|| identity.to_key())
        })
    };
    let mut recalled = recall();
    // A miss after a signal may hold once the change read vouches for it:
    // the read runs only then, off the path of a warm call.
    if recalled.is_err() && cache::read_changes() {
        recalled = recall();
    }
    let resolved = match recalled {
        Ok(resolved) => resolved,
        Err(identity) => {
            let (resolved, checked) =
                locate_and_compile(explicit, &identity, cache::Checked::configuration())?;
            cache::remember(identity, checked, resolved.clone());
            resolved
        }
    };
    match resolved {
        Resolved::Found(_, environment_id)
            if context::bound_environment().is_some_and(|bound| bound != environment_id) =>
        {
            Err((
                ErrorCode::EnvironmentNotFound,
                "this transaction's API key is bound to another environment".to_string(),
            ))
        }
        Resolved::Found(snapshot, environment_id) => Ok((snapshot, environment_id)),
        Resolved::NotFound(message) => Err(not_found(message)),
    }
}

/// Why no environment was found. A session with no organization sees no
/// environment at all under row-level security (unless its role bypasses
/// it), and is told that rather than that one name is missing.
fn not_found(message: String) -> (ErrorCode, String) {
    crate::citus::refuse_away_from_the_rows();
    if context::organization_id().is_some() || crate::postgres::backend::sees_every_organization() {
        return (ErrorCode::EnvironmentNotFound, message);
    }
    let why = if context::key_required() {
        "no organization in this session: it requires an API key \
         (flagship.require_key), and none was authenticated in this transaction"
    } else {
        "no organization in this session: set flagship.organization_id (SET LOCAL \
         behind a transaction pooler), send JWT claims with org_id, or call \
         flagship.authenticate with an API key in this transaction"
    };
    (ErrorCode::General, why.to_string())
}

/// Where the name points (from the name cache while no change was
/// signalled, else one query that also reads the environment's versions),
/// then its compiled form for this role and organization, and the check
/// that vouches for both (made for the environment's organization).
fn locate_and_compile(
    explicit: Option<&str>,
    identity: &IdentityKey,
    checked: cache::Checked,
) -> Result<(Resolved, cache::Checked), (ErrorCode, String)> {
    // Without a name: the session's setting, else the environment the
    // transaction's API key is bound to.
    let name = match explicit {
        Some(name) => name.to_string(),
        None => context::environment()
            .or_else(|| context::bound_environment().map(|id| id.to_string()))
            .ok_or_else(|| {
                not_found("no environment given: pass one or set flagship.environment".into())
            })?,
    };
    let (located, checked) = match cache::located(identity) {
        Some(found) => found,
        None => {
            let located = locate(&name);
            // A name pins its organization when the session names one (the
            // candidates come from it alone), or names it itself (a uuid
            // or '<org>/<project>/<env>'). '<project>/<env>' with no
            // organization could come to mean two environments when
            // another organization adds it: any change rechecks it.
            let pinned = checked.organization().is_some() || name.split('/').count() != 2;
            let checked = match located {
                Located::Found(_, _, organization) if pinned => {
                    checked.in_organization(organization)
                }
                _ => checked,
            };
            cache::remember_location(identity.clone(), checked, located.clone());
            (located, checked)
        }
    };
    let (environment_id, version, organization) = match located {
        Located::Found(environment_id, version, organization) => {
            (environment_id, version, organization)
        }
        Located::NotFound(message) => return Ok((Resolved::NotFound(message), checked)),
    };
    let key = CompiledKey {
        user: crate::postgres::backend::user_id(),
        organization: context::organization_id().map(|id| *id.as_bytes()),
        environment: *environment_id.as_bytes(),
    };
    let snapshot = cache::compiled(key, version, || load(environment_id, organization));
    Ok((Resolved::Found(snapshot, environment_id), checked))
}

/// Where one evaluation keeps a converted context attribute. Slots outlive
/// the call (see `SPARE_SLOTS`), so a string attribute is copied into the
/// buffer the previous call left behind instead of a fresh allocation.
/// Safe code only: the converted value is set once per call (`OnceCell`,
/// so references to it stay valid for the call) and the reusable buffer
/// waits beside it in `spare` until it is needed.
#[derive(Default)]
struct Slot {
    /// Unset: not read yet; `Some(None)`: absent; `Some(Some(_))`: present.
    read: OnceCell<Option<Value>>,
    spare: Cell<Value>,
}

impl Slot {
    /// Back to unread, keeping what was read as the next buffer.
    fn reset(&mut self) {
        if let Some(Some(value)) = self.read.take() {
            self.spare.set(value);
        }
    }
}

thread_local! {
    /// Slot arrays between calls. A stack rather than a single array, because
    /// an evaluation can run inside another (a `customer.*` lookup runs a
    /// query, whose policies may evaluate flags).
    static SPARE_SLOTS: RefCell<Vec<Vec<Slot>>> = const { RefCell::new(Vec::new()) };
}

/// The top-level context keys the rules can read, converted from the
/// `jsonb` argument on first use: a rule that fails on its first condition
/// never pays for the attributes of its second, and the rest of the
/// document is never converted at all.
struct Extracted<'k, 'c> {
    context: Option<&'c JsonbArg<'c>>,
    keys: &'k [String],
    /// One per key, taken from `SPARE_SLOTS` and given back on drop.
    slots: Vec<Slot>,
    environment: pgrx::Uuid,
    /// The customer named by the context's `customer`, for `customer.*`.
    customer: OnceCell<Option<Rc<Customer>>>,
}

impl<'k, 'c> Extracted<'k, 'c> {
    fn from(
        context: &'c JsonbArg<'c>,
        keys: &'k [String],
        environment: pgrx::Uuid,
    ) -> Extracted<'k, 'c> {
        let mut slots = SPARE_SLOTS
            .with(|spare| spare.borrow_mut().pop())
            .unwrap_or_default();
        if slots.len() < keys.len() {
            slots.resize_with(keys.len(), Slot::default);
        }
        slots[..keys.len()].iter_mut().for_each(Slot::reset);
        Extracted {
            context: Some(context),
            keys,
            slots,
            environment,
            customer: OnceCell::new(),
        }
    }

    fn empty(environment: pgrx::Uuid) -> Extracted<'k, 'c> {
        Extracted {
            context: None,
            keys: &[],
            slots: Vec::new(),
            environment,
            customer: OnceCell::new(),
        }
    }

    /// The converted value of the `index`th key, converting it on first use.
    fn attribute(&self, context: &JsonbArg, index: usize) -> Option<&Value> {
        let slot = &self.slots[index];
        slot.read
            .get_or_init(|| {
                let mut buffer = slot.spare.take();
                if context.read_into(&self.keys[index], &mut buffer) {
                    Some(buffer)
                } else {
                    slot.spare.set(buffer);
                    None
                }
            })
            .as_ref()
    }

    /// `customer.<path>` from the attributes stored with the customer.
    fn customer_attribute(&self, path: &str) -> Option<&Value> {
        let customer = self
            .customer
            .get_or_init(|| {
                let key = match self.get("customer")? {
                    Value::String(key) => key.clone(),
                    Value::Number(number) => number.to_string(),
                    _ => return None,
                };
                entitlements::customer(self.environment, &key)
            })
            .as_ref()?;
        let attributes = customer.attributes.as_object()?;
        if let Some(value) = attributes.get(path) {
            return Some(value);
        }
        let mut segments = path.split('.');
        let mut current = attributes.get(segments.next()?)?;
        for segment in segments {
            current = current.as_object()?.get(segment)?;
        }
        Some(current)
    }
}

impl Attributes for Extracted<'_, '_> {
    fn get(&self, key: &str) -> Option<&Value> {
        let context = self.context?;
        let index = self.keys.iter().position(|known| known == key)?;
        let found = self.attribute(context, index);
        if found.is_some() {
            return found;
        }
        self.customer_attribute(key.strip_prefix("customer.")?)
    }
}

impl Drop for Extracted<'_, '_> {
    fn drop(&mut self) {
        if self.slots.is_empty() {
            return;
        }
        let mut slots = std::mem::take(&mut self.slots);
        // Keep small string buffers for the next call, not a large document
        // (the next `from` moves what was read back to `spare`).
        for slot in &mut slots[..self.keys.len()] {
            if let Some(Some(value)) = slot.read.get_mut() {
                let small = match value {
                    Value::String(text) => text.capacity() <= 256,
                    Value::Array(_) | Value::Object(_) => false,
                    _ => true,
                };
                if !small {
                    *value = Value::Null;
                }
            }
        }
        SPARE_SLOTS.with(|spare| spare.borrow_mut().push(slots));
    }
}

/// Evaluates one flag and hands the resolution, which borrows from the
/// compiled snapshot, to `answer`.
fn resolve<R>(
    flag_key: Option<&str>,
    context: Option<&JsonbArg>,
    environment: Option<&str>,
    answer: impl FnOnce(&Resolution, Option<&Rc<Snapshot>>) -> R,
) -> R {
    let Some(flag_key) = flag_key else {
        let resolution = Resolution::error("", ErrorCode::FlagNotFound, "flag key is NULL");
        return answer(&resolution, None);
    };
    let (snapshot, environment_id) = match evaluation_snapshot(environment) {
        Ok(found) => found,
        Err((code, message)) => return answer(&Resolution::error(flag_key, code, message), None),
    };
    let entitlements = EnvironmentEntitlements {
        environment: environment_id,
    };
    let resolution = match context {
        // A missing context counts as an empty object.
        None => snapshot.evaluate_attributes(
            flag_key,
            Some(&Extracted::empty(environment_id)),
            &entitlements,
        ),
        Some(context) if !context.is_object() => {
            snapshot.evaluate_attributes(flag_key, None, &entitlements)
        }
        Some(context) => snapshot.evaluate_extracting(
            flag_key,
            |keys| Some(Extracted::from(context, keys, environment_id)),
            &entitlements,
        ),
    };
    exposures::observe(environment_id, &resolution, context);
    answer(&resolution, Some(&snapshot))
}

/// Evaluates one flag for a context. Never raises for a missing flag,
/// environment or a malformed context: the result says what went wrong.
#[pg_extern(stable, parallel_restricted)]
pub fn flagship_evaluate(
    flag_key: Option<TextArg>,
    context: default!(Option<JsonbArg>, "'{}'"),
    environment: default!(Option<&str>, "NULL"),
) -> BuiltJsonb {
    resolve(
        flag_key.as_deref(),
        context.as_ref(),
        environment,
        |resolution, snapshot| match snapshot {
            Some(snapshot) => encoded::encode(snapshot, resolution),
            None => encoded::build(resolution),
        },
    )
}

/// True when the flag's value for this context is `true`; false for every
/// other value and every error. Meant for WHERE clauses, views and policies.
#[pg_extern(stable, parallel_restricted)]
pub fn flagship_enabled(
    flag_key: Option<TextArg>,
    context: default!(Option<JsonbArg>, "'{}'"),
    environment: default!(Option<&str>, "NULL"),
) -> bool {
    resolve(
        flag_key.as_deref(),
        context.as_ref(),
        environment,
        |resolution, _| resolution.is_enabled(),
    )
}

/// Every live flag of the environment for one context: `{key: details}`,
/// what a client SDK needs to bootstrap.
#[pg_extern(stable, parallel_restricted)]
pub fn flagship_evaluate_all(
    context: default!(Option<JsonbArg>, "'{}'"),
    environment: default!(Option<&str>, "NULL"),
) -> BuiltJsonb {
    match evaluation_snapshot(environment) {
        Ok((snapshot, environment_id)) => all_flags(&snapshot, environment_id, context.as_ref()),
        Err((code, message)) => {
            let mut result = Builder::new();
            result.begin_object();
            result.key("error_code");
            result.string_value(code.as_str());
            result.key("error_message");
            result.string_value(&message);
            result.end_object();
            result.finish()
        }
    }
}

/// The answers of every live flag, each the document `flagship_evaluate`
/// gives for it. The answers are owned here and outlive the builder that
/// references their strings (the builder's lifetime makes that a rule the
/// compiler checks).
fn all_flags(
    snapshot: &Snapshot,
    environment_id: pgrx::Uuid,
    context: Option<&JsonbArg>,
) -> BuiltJsonb {
    let entitlements = EnvironmentEntitlements {
        environment: environment_id,
    };
    // One conversion of everything any flag reads, not one per flag.
    let keys = snapshot.live_context_keys();
    let extracted = context
        .filter(|context| context.is_object())
        .map(|context| Extracted::from(context, keys, environment_id));
    let empty = Extracted::empty(environment_id);
    let attributes: Option<&dyn Attributes> = match (context, &extracted) {
        (None, _) => Some(&empty),
        (Some(_), Some(extracted)) => Some(extracted),
        (Some(_), None) => None,
    };
    let answers: Vec<(&str, Value)> = snapshot
        .live_flag_keys()
        .map(|key| {
            let answer = snapshot
                .evaluate_attributes(key, attributes, &entitlements)
                .to_json();
            (key, answer)
        })
        .collect();
    let mut result = Builder::new();
    result.begin_object();
    for (key, answer) in &answers {
        result.key(key);
        result.value(answer);
    }
    result.end_object();
    result.finish()
}

/// The uuid of an environment named in any accepted form (NULL: the
/// session's `flagship.environment`), from the same per-backend cache that
/// evaluation uses, so usage calls resolve it without a query. Unknown or
/// ambiguous names raise 22023 naming them.
#[pg_extern(stable, parallel_restricted)]
pub fn environment_id(environment: Option<&str>) -> pgrx::Uuid {
    match snapshot_for(environment) {
        Ok((_, environment_id)) => environment_id,
        Err((_, message)) => crate::errors::invalid_parameter(
            message,
            Some("name it by uuid, '<project>/<env>' or '<org slug>/<project>/<env>'"),
        ),
    }
}

/// The bucket (0..99 999) a subject falls in under a salt: lets other
/// clients and DBAs check the frozen bucketing mapping.
#[pg_extern(immutable, parallel_safe, strict)]
pub fn bucket(salt: &str, value: &str) -> i32 {
    flagship_engine::bucketing::bucket(salt, value) as i32
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    // In a file of its own to keep this one short; #[pg_schema] needs the
    // module inline.
    include!("evaluation/tests.rs");
}
