//! Plans and customers compiled per environment, valid while their
//! organization's entitlement version holds: the version read once per
//! signal, and the stamped values checked against it.

use super::*;

pub fn entitlement_signal() -> u64 {
    ENTITLEMENT_SIGNAL.with(Cell::get)
}

fn entitlement_version_sql() -> &'static str {
    if versioned() {
        "(SELECT coalesce(max(v.entitlements), 0)::bigint \
            FROM flagship.environments ve \
            JOIN flagship.cache_versions v ON v.organization_id = ve.organization_id \
             AND v.scope = ve.organization_id \
           WHERE ve.id = $1)"
    } else {
        "NULL::bigint"
    }
}

/// The entitlement version of the environment's organization, read once
/// per signal.
fn entitlement_version(environment: pgrx::Uuid) -> Option<i64> {
    let key = *environment.as_bytes();
    let known = ENTITLEMENT_VERSIONS.with(|versions| {
        versions
            .borrow()
            .get(&key)
            .filter(|(at, _)| at.holds_for_entitlements())
            .map(|(_, version)| *version)
    });
    if let Some(version) = known {
        return version;
    }
    // Taken before the query: a signal arriving during it is not vouched for.
    let checked = Checked::entitlements();
    let version = read_one::<i64>(
        &format!("SELECT {}", entitlement_version_sql()),
        &[environment.into()],
    );
    ENTITLEMENT_VERSIONS.with(|versions| {
        let mut versions = versions.borrow_mut();
        if versions.len() >= MAX_NAMES {
            versions.clear();
        }
        versions.insert(key, (checked, version));
    });
    version
}

/// Values loaded from plans and customers of one environment, valid while
/// no signal came or, after one, while the organization's entitlement
/// version holds; emptied rather than grown past `limit` entries.
pub struct Stamped<K, V> {
    entries: HashMap<K, StampedEntry<V>, FxBuildHasher>,
    limit: usize,
}

struct StampedEntry<V> {
    checked: Checked,
    version: Option<i64>,
    value: V,
    stamp: LoadStamp,
}

impl<K, V> Stamped<K, V> {
    pub fn new(limit: usize) -> Stamped<K, V> {
        Stamped {
            entries: HashMap::default(),
            limit,
        }
    }
}

/// The cached value for `key` (of `environment`), or what `load` returns
/// with the version it was read at (then cached). The cache is not
/// borrowed while loading, which may run queries that come back here.
pub fn stamped<K: Hash + Eq, V: Clone>(
    cache: &'static LocalKey<RefCell<Stamped<K, V>>>,
    environment: pgrx::Uuid,
    key: K,
    load: impl FnOnce() -> (V, Option<i64>),
) -> V {
    read_changes();
    let cached = cache.with(|cache| {
        cache
            .borrow()
            .entries
            .get(&key)
            .filter(|entry| !entry.stamp.revoked())
            .map(|entry| {
                (
                    entry.checked.holds_for_entitlements(),
                    entry.version,
                    entry.value.clone(),
                )
            })
    });
    if let Some((true, _, value)) = cached {
        return value;
    }
    // Taken before any query: a signal arriving during one is not vouched for.
    let checked = Checked::entitlements();
    match cached {
        Some((false, Some(version), value))
            if entitlement_version(environment) == Some(version) =>
        {
            cache.with(|cache| {
                if let Some(entry) = cache.borrow_mut().entries.get_mut(&key) {
                    entry.checked = checked;
                }
            });
            return value;
        }
        _ => {}
    }
    let stamp = LoadStamp::now();
    let (loaded, version) = load();
    cache.with(|cache| {
        let mut cache = cache.borrow_mut();
        if cache.entries.len() >= cache.limit {
            cache.entries.clear();
        }
        cache.entries.insert(
            key,
            StampedEntry {
                checked,
                version,
                value: loaded.clone(),
                stamp,
            },
        );
    });
    loaded
}

/// The loading statement of each document function, planned once per
/// backend (and again when the version table appears: its text depends on
/// it). Planning it on every load cost more than running it.
struct KeptLoad {
    function: &'static str,
    versioned: bool,
    plan: statement_reads::KeptPlan,
}

thread_local! {
    static KEPT_LOADS: RefCell<Vec<KeptLoad>> = const { RefCell::new(Vec::new()) };
}

/// Runs `function(arguments)`, a SQL function returning jsonb about plans
/// and customers whose first argument is the environment, and reads the
/// entitlement version in the same statement (one snapshot for both).
pub fn load_entitlement_document(
    function: &'static str,
    arguments: &[pgrx::datum::DatumWithOid<'_>],
) -> (Option<serde_json::Value>, Option<i64>) {
    // Only the session's organization's rows are readable.
    if let Some(organization) = crate::context::organization_id() {
        crate::citus::require_the_organizations_node(organization);
    }
    let versioned = versioned();
    let sql = || {
        let placeholders: Vec<String> = (1..=arguments.len()).map(|n| format!("${n}")).collect();
        format!(
            "SELECT coalesce(pg_catalog.to_regclass('flagship.entitlement_signal'), \
                             'flagship.customers'::regclass)::oid, \
                    flagship.{function}({})::text, {}",
            placeholders.join(", "),
            entitlement_version_sql()
        )
    };
    let (watched, document, version) = Spi::connect(|client| {
        KEPT_LOADS.with(|kept| {
            let mut kept = kept.borrow_mut();
            let found = kept
                .iter()
                .position(|load| load.function == function && load.versioned == versioned);
            let index = found.unwrap_or_else(|| {
                kept.retain(|load| load.function != function);
                let types: Vec<pg_sys::Oid> =
                    arguments.iter().map(|argument| argument.oid()).collect();
                kept.push(KeptLoad {
                    function,
                    versioned,
                    plan: statement_reads::KeptPlan::prepare(client, &sql(), &types),
                });
                kept.len() - 1
            });
            // Stays borrowed while it runs: the document functions are SQL
            // and load nothing through here.
            let rows = statement_reads::select(
                client,
                statement_reads::Query::Kept(&kept[index].plan),
                arguments,
                1,
            );
            match rows.row(0) {
                Some(row) => (
                    row.get::<pg_sys::Oid>(1),
                    row.get::<String>(2),
                    row.get::<i64>(3),
                ),
                None => (None, None, None),
            }
        })
    });
    if let Some(watched) = watched {
        WATCHED_ENTITLEMENTS.with(|cell| cell.set(watched));
    }
    // Read as text and parsed here, so that a stored document too deep or
    // too large to read (written around the CHECK constraints) makes this
    // one customer unknown, with a warning, instead of raising inside an
    // evaluation.
    let document = document.and_then(|text| match crate::postgres::jsonb::parse_document(&text) {
        Ok(document) => Some(document),
        Err(why) => {
            pgrx::warning!(
                "flagship.{function}: the stored document {why}; answering as if it did not exist"
            );
            None
        }
    });
    (document, version)
}
