//! Plans and customers compiled per environment, valid while their
//! organization's entitlement version holds: the version read once per
//! signal, and the stamped values checked against it.

use super::*;

pub fn entitlement_signal() -> u64 {
    ENTITLEMENT_SIGNAL.with(Cell::get)
}

/// The SQL for the entitlement version of the environment `$1`; with
/// `organization` (a parameter), read in that organization only: on Citus
/// the read then goes to its shards instead of every shard (#21).
fn entitlement_version_sql(organization: Option<&str>) -> String {
    if versioned() {
        format!(
            "(SELECT coalesce(max(v.entitlements), 0)::bigint \
                FROM flagship.environments ve \
                JOIN flagship.cache_versions v ON v.organization_id = ve.organization_id \
                 AND v.scope = ve.organization_id \
               WHERE ve.id = $1{})",
            organization.map_or(String::new(), |parameter| format!(
                " AND ve.organization_id = {parameter}"
            ))
        )
    } else {
        "NULL::bigint".to_string()
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
    let organization = crate::context::organization_id();
    let mut arguments = vec![environment.into()];
    arguments.extend(organization.map(Into::into));
    let version = read_one::<i64>(
        &format!(
            "SELECT {}",
            entitlement_version_sql(organization.is_some().then_some("$2"))
        ),
        &arguments,
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

/// The loading statements of each document function, planned once per
/// backend (and again when the version table appears: their text depends
/// on it). Planning them on every load cost more than running them.
struct KeptLoad {
    function: &'static str,
    versioned: bool,
    /// Whether the statements take the session's organization last.
    by_organization: bool,
    /// The watched relation and the entitlement version.
    version: statement_reads::KeptPlan,
    /// The document.
    document: statement_reads::KeptPlan,
}

thread_local! {
    static KEPT_LOADS: RefCell<Vec<KeptLoad>> = const { RefCell::new(Vec::new()) };
}

/// Runs `function(arguments)`, a SQL function returning jsonb about plans
/// and customers whose first argument is the environment, and reads the
/// entitlement version, in the session's organization when it has one.
/// Two statements under one snapshot (the statement's: `statement_reads`):
/// in one, Citus would send the function's call into the shard query that
/// reads the version, where its own reads are refused (#21).
pub fn load_entitlement_document(
    function: &'static str,
    mut arguments: Vec<pgrx::datum::DatumWithOid<'_>>,
) -> (Option<serde_json::Value>, Option<i64>) {
    let function_arguments = arguments.len();
    // Only the session's organization's rows are readable.
    let organization = crate::context::organization_id();
    if let Some(organization) = organization {
        crate::citus::require_the_organizations_node(organization);
        arguments.push(organization.into());
    }
    let by_organization = organization.is_some();
    let versioned = versioned();
    let (watched, document, version) = Spi::connect(|client| {
        KEPT_LOADS.with(|kept| {
            let mut kept = kept.borrow_mut();
            let found = kept.iter().position(|load| {
                load.function == function
                    && load.versioned == versioned
                    && load.by_organization == by_organization
            });
            let index = found.unwrap_or_else(|| {
                kept.retain(|load| load.function != function);
                let types: Vec<pg_sys::Oid> =
                    arguments.iter().map(|argument| argument.oid()).collect();
                let placeholders: Vec<String> =
                    (1..=function_arguments).map(|n| format!("${n}")).collect();
                // Declares every argument's type, uses the environment ($1)
                // and the organization (last) only.
                let organization = format!("${}", function_arguments + 1);
                let version = format!(
                    "SELECT coalesce(pg_catalog.to_regclass('flagship.entitlement_signal'), \
                                     'flagship.customers'::regclass)::oid, {}",
                    entitlement_version_sql(by_organization.then_some(organization.as_str()))
                );
                let document = format!(
                    "SELECT flagship.{function}({})::text",
                    placeholders.join(", ")
                );
                kept.push(KeptLoad {
                    function,
                    versioned,
                    by_organization,
                    version: statement_reads::KeptPlan::prepare(client, &version, &types),
                    document: statement_reads::KeptPlan::prepare(
                        client,
                        &document,
                        &types[..function_arguments],
                    ),
                });
                kept.len() - 1
            });
            let load = &kept[index];
            // Stays borrowed while they run: the document functions are SQL
            // and load nothing through here.
            let (watched, version) = {
                let versions = statement_reads::select(
                    client,
                    statement_reads::Query::Kept(&load.version),
                    &arguments,
                    1,
                );
                (versions.get::<pg_sys::Oid>(0, 1), versions.get::<i64>(0, 2))
            };
            let document = statement_reads::select(
                client,
                statement_reads::Query::Kept(&load.document),
                &arguments[..function_arguments],
                1,
            )
            .get::<String>(0, 1);
            (watched, document, version)
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
