//! Watching evaluations without making them write, both off by default:
//! `flagship.evaluation_log_rate` sends a sample of evaluations (flag,
//! context, answer) to the server log for debugging, and
//! `flagship.count_exposures` counts served variants per environment and
//! flag in backend memory until `flagship.flush_exposures()` adds them to
//! `flagship.flag_exposures` in one statement. Evaluation stays STABLE and
//! parallel safe: it never writes a row.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;

use rustc_hash::FxBuildHasher;

use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting};
use pgrx::prelude::*;
use serde_json::json;

use crate::postgres::jsonb::JsonbArg;
use crate::postgres::settings;
use flagship_engine::rules::Resolution;

static LOG_RATE: GucSetting<f64> = GucSetting::<f64>::new(0.0);
static COUNT_EXPOSURES: GucSetting<bool> = GucSetting::<bool>::new(false);

/// (Organization, environment) → flag → variant → evaluations not yet
/// flushed. Keyed by the organization the evaluating session acted for, as
/// row-level security sees it (zeros for none), so that in a pooled
/// backend each organization's sessions see and flush only their own.
type Map<K, V> = HashMap<K, V, FxBuildHasher>;
type Pending = Map<([u8; 16], [u8; 16]), Map<String, Map<String, i64>>>;

fn session_organization() -> [u8; 16] {
    crate::context::organization_id().map_or([0; 16], |id| *id.as_bytes())
}

thread_local! {
    static PENDING: RefCell<Pending> = RefCell::new(HashMap::default());
    static RANDOM: Cell<u64> = const { Cell::new(0) };
}

pub fn register_settings() {
    GucRegistry::define_float_guc(
        c"flagship.evaluation_log_rate",
        c"Fraction of evaluations written to the server log (0 to 1).",
        c"Each sampled flagship_evaluate or flagship_enabled call logs its environment, flag, context and answer at LOG level. Contexts may hold personal data: sample briefly, for debugging.",
        &LOG_RATE,
        0.0,
        1.0,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"flagship.count_exposures",
        c"Count served variants in memory until flagship.flush_exposures().",
        c"Counts flagship_evaluate and flagship_enabled calls per environment, flag and variant; evaluation itself never writes.",
        &COUNT_EXPOSURES,
        GucContext::Userset,
        GucFlags::default(),
    );
}

/// A uniform draw in [0, 1) from a per-backend xorshift generator: cheap,
/// and sampling a debug log needs nothing stronger.
fn draw() -> f64 {
    RANDOM.with(|state| {
        let mut x = state.get();
        if x == 0 {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|elapsed| elapsed.as_nanos() as u64)
                .unwrap_or(1);
            x = nanos ^ (u64::from(std::process::id()) << 32) | 1;
        }
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        state.set(x);
        (x >> 11) as f64 / (1u64 << 53) as f64
    })
}

/// Called after every single-flag evaluation; costs two setting reads when
/// both features are off.
#[inline(always)]
pub fn observe(environment: pgrx::Uuid, resolution: &Resolution, context: Option<&JsonbArg>) {
    let count_exposures = settings::plain(&COUNT_EXPOSURES);
    let rate = settings::plain(&LOG_RATE);
    if count_exposures || rate > 0.0 {
        record(environment, resolution, context, count_exposures, rate);
    }
}

#[cold]
#[inline(never)]
fn record(
    environment: pgrx::Uuid,
    resolution: &Resolution,
    context: Option<&JsonbArg>,
    count_exposures: bool,
    rate: f64,
) {
    if count_exposures {
        if let Some(variant) = resolution.variant {
            add(
                session_organization(),
                environment,
                resolution.key,
                variant,
                1,
            );
        }
    }
    if rate > 0.0 && draw() < rate {
        let context = context.map_or_else(|| "{}".to_string(), JsonbArg::to_text);
        let entry = json!({
            "environment": environment.to_string(),
            "flag": resolution.key,
            "variant": resolution.variant,
            "reason": resolution.reason.as_str(),
            "rule": resolution.rule,
            "error_code": resolution.error.as_ref().map(|(code, _)| code.as_str()),
        });
        pgrx::log!("flagship evaluation: {entry} context: {context}");
    }
}

fn add(
    organization: [u8; 16],
    environment: pgrx::Uuid,
    flag: &str,
    variant: &str,
    evaluations: i64,
) {
    PENDING.with(|pending| {
        let mut pending = pending.borrow_mut();
        let flags = pending
            .entry((organization, *environment.as_bytes()))
            .or_default();
        // Look up by &str first so a warm counter costs no allocation.
        let variants = match flags.get_mut(flag) {
            Some(variants) => variants,
            None => flags.entry(flag.to_string()).or_default(),
        };
        match variants.get_mut(variant) {
            Some(counter) => *counter += evaluations,
            None => {
                variants.insert(variant.to_string(), evaluations);
            }
        }
    });
}

type Row = (pgrx::Uuid, String, String, i64);

/// The counts of `organization`'s sessions.
fn pending_rows(organization: [u8; 16]) -> Vec<Row> {
    PENDING.with(|pending| {
        let pending = pending.borrow();
        let mut rows = Vec::new();
        for ((owner, environment), flags) in pending.iter() {
            if *owner != organization {
                continue;
            }
            for (flag, variants) in flags {
                for (variant, count) in variants {
                    rows.push((
                        pgrx::Uuid::from_bytes(*environment),
                        flag.clone(),
                        variant.clone(),
                        *count,
                    ));
                }
            }
        }
        rows.sort();
        rows
    })
}

/// This backend's counts not yet flushed, of the session's organization
/// only (other organizations' stay pending for their own sessions).
#[pg_extern(volatile, parallel_unsafe)]
pub fn pending_exposures() -> TableIterator<
    'static,
    (
        name!(environment_id, pgrx::Uuid),
        name!(flag_key, String),
        name!(variant, String),
        name!(evaluations, i64),
    ),
> {
    TableIterator::new(pending_rows(session_organization()))
}

/// Adds this backend's counts to `flagship.flag_exposures` (per
/// organization, environment, flag, variant and UTC day) and forgets them;
/// returns how many evaluations were flushed. If the transaction then
/// aborts, the counts become pending again.
#[pg_extern(volatile, parallel_unsafe)]
pub fn flush_exposures() -> i64 {
    let organization = session_organization();
    let rows = pending_rows(organization);
    if rows.is_empty() {
        return 0;
    }
    let environments: Vec<pgrx::Uuid> = rows.iter().map(|row| row.0).collect();
    let flags: Vec<&str> = rows.iter().map(|row| row.1.as_str()).collect();
    let variants: Vec<&str> = rows.iter().map(|row| row.2.as_str()).collect();
    let counts: Vec<i64> = rows.iter().map(|row| row.3).collect();
    Spi::run_with_args(
        "INSERT INTO flagship.flag_exposures AS x
                (organization_id, environment_id, flag_key, variant, day, evaluations)
         SELECT e.organization_id, e.id, p.flag_key, p.variant,
                (now() AT TIME ZONE 'UTC')::date, p.evaluations
           FROM unnest($1::uuid[], $2::text[], $3::text[], $4::bigint[])
                AS p(environment_id, flag_key, variant, evaluations)
           JOIN flagship.environments e ON e.id = p.environment_id
         ON CONFLICT (organization_id, environment_id, flag_key, variant, day)
         DO UPDATE SET evaluations = x.evaluations + EXCLUDED.evaluations",
        &[
            environments.into(),
            flags.into(),
            variants.into(),
            counts.clone().into(),
        ],
    )
    .unwrap_or_else(|error| crate::errors::invalid_parameter(error.to_string(), None));
    PENDING.with(|pending| {
        pending
            .borrow_mut()
            .retain(|(owner, _), _| *owner != organization)
    });
    let flushed = rows.clone();
    pgrx::register_xact_callback(pgrx::PgXactCallbackEvent::Abort, move || {
        for (environment, flag, variant, count) in flushed {
            add(organization, environment, &flag, &variant, count);
        }
    });
    counts.iter().sum()
}

#[cfg(test)]
mod draw_tests {
    #[test]
    fn draws_are_uniform_enough_for_sampling() {
        let hits = (0..100_000).filter(|_| super::draw() < 0.1).count();
        assert!((9_000..11_000).contains(&hits), "{hits}");
    }
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use pgrx::prelude::*;

    use crate::test_support::{organization_with_shop, text};

    fn setup() {
        organization_with_shop("expo", "Expo");
        Spi::run(
            "SELECT flagship.put_flag('shop', '{\"key\": \"f\", \"environments\": {\"production\": {\"enabled\": true, \
                 \"rules\": [{\"conditions\": [{\"attribute\": \"beta\", \"op\": \"eq\", \"values\": [true]}], \
                              \"serve\": {\"variant\": \"on\"}}], \"default\": {\"variant\": \"off\"}}}}')",
        )
        .unwrap();
    }

    fn evaluate(times: usize, context: &str) {
        for _ in 0..times {
            Spi::run(&format!(
                "SELECT flagship.flagship_enabled('f', '{context}')"
            ))
            .unwrap();
        }
    }

    #[pg_test]
    fn exposures_are_counted_in_memory_and_flushed_in_one_statement() {
        setup();
        // Off by default: nothing counted.
        evaluate(3, "{}");
        assert_eq!(
            text("SELECT count(*)::text FROM flagship.pending_exposures()"),
            "0"
        );
        Spi::run("SET LOCAL flagship.count_exposures = on").unwrap();
        evaluate(3, "{}");
        evaluate(2, r#"{"beta": true}"#);
        assert_eq!(
            text("SELECT string_agg(variant || '=' || evaluations, ',' ORDER BY variant) FROM flagship.pending_exposures()"),
            "off=3,on=2"
        );
        // Evaluation wrote nothing.
        assert_eq!(
            text("SELECT count(*)::text FROM flagship.flag_exposures"),
            "0"
        );
        assert_eq!(text("SELECT flagship.flush_exposures()::text"), "5");
        assert_eq!(
            text("SELECT count(*)::text FROM flagship.pending_exposures()"),
            "0"
        );
        evaluate(1, r#"{"beta": true}"#);
        assert_eq!(text("SELECT flagship.flush_exposures()::text"), "1");
        assert_eq!(
            text("SELECT string_agg(flag_key || '/' || variant || '=' || evaluations, ',' ORDER BY variant) \
                  FROM flagship.flag_exposures WHERE organization_id = flagship.current_organization_id()"),
            "f/off=3,f/on=3"
        );
        assert_eq!(text("SELECT flagship.flush_exposures()::text"), "0");
    }

    /// Bug of #14: in a pooled backend, pending_exposures() showed the
    /// previous tenant's environment, flags and counts, and
    /// flush_exposures() then dropped them silently.
    #[pg_test]
    fn counts_belong_to_the_organization_that_made_them() {
        setup();
        let first = text("SELECT flagship.current_organization_id()::text");
        Spi::run("SET LOCAL flagship.count_exposures = on").unwrap();
        evaluate(2, "{}");
        organization_with_shop("expo-two", "Expo Two");
        Spi::run(
            "SELECT flagship.put_flag('shop', '{\"key\": \"f\", \"environments\": {\"production\": {\"enabled\": true}}}')",
        )
        .unwrap();
        evaluate(1, "{}");
        assert_eq!(
            text("SELECT string_agg(flag_key || '/' || variant || '=' || evaluations, ',') FROM flagship.pending_exposures()"),
            "f/on=1"
        );
        assert_eq!(text("SELECT flagship.flush_exposures()::text"), "1");
        Spi::run(&format!("SET LOCAL flagship.organization_id = '{first}'")).unwrap();
        assert_eq!(
            text("SELECT string_agg(flag_key || '/' || variant || '=' || evaluations, ',') FROM flagship.pending_exposures()"),
            "f/off=2"
        );
        assert_eq!(text("SELECT flagship.flush_exposures()::text"), "2");
        assert_eq!(
            text("SELECT sum(evaluations)::text FROM flagship.flag_exposures WHERE organization_id = flagship.current_organization_id()"),
            "2"
        );
    }

    #[pg_test]
    fn the_evaluation_log_samples_without_writing() {
        setup();
        Spi::run("SET LOCAL flagship.evaluation_log_rate = 1").unwrap();
        evaluate(2, r#"{"beta": true, "email": "a@example.com"}"#);
        Spi::run("SET LOCAL flagship.evaluation_log_rate = 0").unwrap();
        assert_eq!(
            text("SELECT count(*)::text FROM flagship.flag_exposures"),
            "0"
        );
    }
}
