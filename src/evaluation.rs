//! `flagship_evaluate` and friends: resolve the environment, fetch its
//! compiled configuration from the backend cache (compiling it on a miss),
//! and run the pure engine. Evaluation answers problems with an ERROR
//! result instead of raising, so it is safe in WHERE clauses and policies.

use std::cell::{Cell, OnceCell, RefCell};
use std::rc::Rc;

use crate::postgres::statement_reads::{self, KeptPlan, Query};
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
use flagship_engine::rules::document::{parse_flag_definition, parse_segment};
use flagship_engine::rules::engine::ErrorCode;
use flagship_engine::rules::environment_config::parse_environment_config;
use flagship_engine::rules::{Resolution, Snapshot};

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
        Resolved::NotFound(message) => Err((ErrorCode::EnvironmentNotFound, message)),
    }
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
    let name = match explicit {
        Some(name) => name.to_string(),
        None => context::environment().ok_or_else(|| {
            (
                ErrorCode::EnvironmentNotFound,
                "no environment given: pass one or set flagship.environment".to_string(),
            )
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
    let (environment_id, version) = match located {
        Located::Found(environment_id, version, _) => (environment_id, version),
        Located::NotFound(message) => return Ok((Resolved::NotFound(message), checked)),
    };
    let key = CompiledKey {
        user: crate::postgres::backend::user_id(),
        organization: context::organization_id().map(|id| *id.as_bytes()),
        environment: *environment_id.as_bytes(),
    };
    let snapshot = cache::compiled(key, version, || load(environment_id));
    Ok((Resolved::Found(snapshot, environment_id), checked))
}

/// The environments a name can mean for this session, and the versions
/// of the one it means, in one statement.
fn locate(environment: &str) -> Located {
    let query = || {
        format!(
            "SELECT 'flagship.features'::regclass::oid, c.ids, \
                    CASE WHEN cardinality(c.ids) = 1 THEN {} END, \
                    (SELECT e.organization_id FROM flagship.environments e \
                      WHERE e.id = c.ids[1] AND cardinality(c.ids) = 1) \
               FROM (SELECT flagship.environment_candidates($1) AS ids) c",
            cache::configuration_version_sql("c.ids[1]")
        )
    };
    let (watched, candidates, version, organization) = select_kept(
        &LOCATE_STATEMENT,
        query,
        environment.into(),
        pg_sys::TEXTOID,
        |found| {
            (
                found.get::<pg_sys::Oid>(0, 1).unwrap_or(pg_sys::InvalidOid),
                found.get::<Vec<pgrx::Uuid>>(0, 2).unwrap_or_default(),
                found.get::<i64>(0, 3),
                found.get::<pgrx::Uuid>(0, 4),
            )
        },
    );
    cache::watch_configuration(watched);
    match candidates.as_slice() {
        [one] => match organization {
            Some(organization) => Located::Found(*one, version, organization),
            // Gone between the two reads of one snapshot: cannot happen,
            // but answers as absent rather than trusting a half answer.
            None => Located::NotFound(format!("environment \"{environment}\" not found")),
        },
        [] => Located::NotFound(format!("environment \"{environment}\" not found")),
        many => Located::NotFound(format!(
            "environment \"{environment}\" is ambiguous: {} organizations have it",
            many.len()
        )),
    }
}

fn load(environment_id: pgrx::Uuid) -> cache::Loaded {
    let rows = load_rows(environment_id);
    // The compiled form's size, roughly: its documents' text, twice over
    // for the parsed and compiled structures, plus a fixed cost per item.
    let bytes = 4096
        + rows
            .flags
            .iter()
            .map(|flag| {
                512 + 2
                    * (flag.definition.text_bytes
                        + flag.config.as_ref().map_or(0, |config| config.text_bytes))
            })
            .sum::<usize>()
        + rows
            .segments
            .iter()
            .map(|segment| 256 + 2 * segment.text_bytes)
            .sum::<usize>();
    let version = rows.version;
    cache::Loaded {
        snapshot: compile(rows),
        version,
        bytes,
    }
}

/// One environment's stored documents, one per flag and per segment, so
/// that a row that cannot be read fails alone.
struct StoredRows {
    flags: Vec<StoredFlag>,
    segments: Vec<StoredDocument>,
    /// The versions these rows were read at.
    version: Option<i64>,
}

/// A stored row as the document it stores (the columns that place it, and
/// the timestamps, left out: documents do not have them).
struct StoredDocument {
    key: String,
    document: Result<Value, String>,
    /// The text read, for the cache's memory accounting.
    text_bytes: usize,
}

struct StoredFlag {
    definition: StoredDocument,
    /// This environment's configuration, when it has one.
    config: Option<StoredDocument>,
}

/// How a column of the loading statement becomes a document field.
#[derive(Clone, Copy)]
enum Column {
    Text,
    Boolean,
    /// jsonb, read as its text.
    Json,
}

/// The loading statement's columns, by position (1-based): a flag row
/// (tag 'flag') uses 2-16, a segment row ('segment') 2, 4-6, 8 and 14, the
/// version row ('version') 17. The tables' columns are read one by one,
/// not as `row_to_json` of the row, which spent most of a cold load
/// printing uuids and timestamps the documents do not have and escaping
/// the jsonb text a second time.
const FLAG_FIELDS: &[(&str, i32, Column)] = &[
    ("key", 2, Column::Text),
    ("kind", 3, Column::Text),
    ("name", 4, Column::Text),
    ("description", 5, Column::Text),
    ("variants", 6, Column::Json),
    ("off_variant", 7, Column::Text),
    ("prerequisites", 8, Column::Json),
    ("salt", 9, Column::Text),
    ("archived", 10, Column::Boolean),
    ("bucketing", 11, Column::Text),
];
/// Column 12 says whether the flag has a configuration row here.
const HAS_CONFIG_COLUMN: i32 = 12;
const CONFIG_FIELDS: &[(&str, i32, Column)] = &[
    ("enabled", 13, Column::Boolean),
    ("targets", 14, Column::Json),
    ("rules", 15, Column::Json),
    ("default", 16, Column::Json),
];
const SEGMENT_FIELDS: &[(&str, i32, Column)] = &[
    ("key", 2, Column::Text),
    ("name", 4, Column::Text),
    ("description", 5, Column::Text),
    ("included", 6, Column::Json),
    ("excluded", 8, Column::Json),
    ("conditions", 14, Column::Json),
];
const VERSION_COLUMN: i32 = 17;

/// Every row one environment's evaluation needs, and its versions, in one
/// statement, so that all of it comes from one snapshot. Column positions:
/// `FLAG_FIELDS`, `CONFIG_FIELDS`, `SEGMENT_FIELDS`, `VERSION_COLUMN`.
fn rows_query() -> String {
    format!(
        "SELECT 'flag', f.key, f.kind, f.name, f.description, f.variants::text, f.off_variant, \
                f.prerequisites::text, f.salt, f.archived, {bucketing}, \
                r.feature_id IS NOT NULL, r.enabled, r.targets::text, r.rules::text, \
                r.default_serve::text, NULL::bigint \
           FROM flagship.environments e \
           JOIN flagship.features f ON f.organization_id = e.organization_id AND f.project_id = e.project_id \
           LEFT JOIN flagship.feature_rules r \
             ON r.organization_id = f.organization_id AND r.feature_id = f.id AND r.environment_id = e.id \
          WHERE e.id = $1 \
         UNION ALL \
         SELECT 'segment', s.key, NULL, s.name, s.description, s.included::text, NULL, \
                s.excluded::text, NULL, NULL, NULL, NULL, NULL, s.conditions::text, NULL, NULL, NULL \
           FROM flagship.environments e \
           JOIN flagship.segments s ON s.organization_id = e.organization_id AND s.project_id = e.project_id \
          WHERE e.id = $1 \
         UNION ALL \
         SELECT 'version', NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, \
                NULL, NULL, NULL, {version}",
        // 0.1.0's features table has no bucketing column: until the SQL is
        // updated, the column is read by name from the row, where a missing
        // one is NULL.
        bucketing = if cache::versioned() {
            "f.bucketing"
        } else {
            "row_to_json(f) ->> 'bucketing'"
        },
        version = cache::configuration_version_sql("$1")
    )
}

/// A statement planned once per backend, and again when the version table
/// appears (its text depends on it): planning the loading statements cost
/// more than running them.
type KeptStatement = RefCell<Option<(bool, KeptPlan)>>;

thread_local! {
    static ROWS_STATEMENT: KeptStatement = const { RefCell::new(None) };
    static LOCATE_STATEMENT: KeptStatement = const { RefCell::new(None) };
}

/// Runs the kept statement `kept` (planned from `sql` on first use)
/// read-only under the statement's snapshot (`statement_reads`) and hands
/// its rows to `read`. The statement stays borrowed while it runs: the
/// loading statements call nothing that loads again.
fn select_kept<R>(
    kept: &'static std::thread::LocalKey<KeptStatement>,
    sql: impl FnOnce() -> String,
    argument: pgrx::datum::DatumWithOid<'_>,
    argument_type: pg_sys::Oid,
    read: impl FnOnce(&statement_reads::Rows<'_>) -> R,
) -> R {
    let versioned = cache::versioned();
    Spi::connect(|client| {
        kept.with(|cell| {
            let mut cell = cell.borrow_mut();
            if cell
                .as_ref()
                .is_none_or(|(for_versioned, _)| *for_versioned != versioned)
            {
                *cell = Some((
                    versioned,
                    KeptPlan::prepare(client, &sql(), &[argument_type]),
                ));
            }
            let (_, plan) = cell.as_ref().expect("prepared above");
            let rows = statement_reads::select(client, Query::Kept(plan), &[argument], 0);
            read(&rows)
        })
    })
}

fn load_rows(environment_id: pgrx::Uuid) -> StoredRows {
    select_kept(
        &ROWS_STATEMENT,
        rows_query,
        environment_id.into(),
        pg_sys::UUIDOID,
        |found| {
            let mut rows = StoredRows {
                flags: Vec::new(),
                segments: Vec::new(),
                version: None,
            };
            for row in 0..found.len() {
                match found.get::<String>(row, 1).as_deref() {
                    Some("flag") => rows.flags.push(StoredFlag {
                        definition: stored_document(found, row, FLAG_FIELDS),
                        config: found
                            .get::<bool>(row, HAS_CONFIG_COLUMN)
                            .unwrap_or(false)
                            .then(|| stored_document(found, row, CONFIG_FIELDS)),
                    }),
                    Some("segment") => {
                        rows.segments
                            .push(stored_document(found, row, SEGMENT_FIELDS))
                    }
                    _ => rows.version = found.get::<i64>(row, VERSION_COLUMN),
                }
            }
            rows
        },
    )
}

/// Row `row`'s `fields` as a document object: a NULL column is a `null`
/// field, as the documents were written.
fn stored_document(
    found: &statement_reads::Rows<'_>,
    row: usize,
    fields: &[(&str, i32, Column)],
) -> StoredDocument {
    let mut document = serde_json::Map::with_capacity(fields.len());
    let mut text_bytes = 0;
    let mut unreadable = None;
    for &(field, column, kind) in fields {
        let value = match kind {
            Column::Boolean => found.get::<bool>(row, column).map(Value::Bool),
            Column::Text => found.get::<String>(row, column).map(|text| {
                text_bytes += text.len();
                Value::String(text)
            }),
            Column::Json => found.get::<String>(row, column).and_then(|text| {
                text_bytes += text.len();
                match crate::postgres::jsonb::parse_document(&text) {
                    Ok(value) => Some(value),
                    Err(why) => {
                        unreadable.get_or_insert(format!("its stored \"{field}\" {why}"));
                        None
                    }
                }
            }),
        };
        document.insert(field.to_string(), value.unwrap_or(Value::Null));
    }
    StoredDocument {
        key: match document.get("key") {
            Some(Value::String(key)) => key.clone(),
            _ => String::new(),
        },
        document: match unreadable {
            Some(why) => Err(why),
            None => Ok(Value::Object(document)),
        },
        text_bytes,
    }
}

/// Compiles one environment's stored documents. The validators refuse on
/// write whatever would fail here, so a failure means a row written around
/// them (a superuser with triggers off, an older version): that flag, and
/// every flag whose rules use a segment that failed, answers an ERROR of
/// its own, and the rest of the environment evaluates normally.
fn compile(rows: StoredRows) -> Snapshot {
    let mut unloadable: Vec<(String, String)> = Vec::new();
    let mut broken_segments: Vec<String> = Vec::new();
    let mut segments = Vec::new();
    for stored in rows.segments {
        match stored
            .document
            .and_then(|document| parse_segment(&document).map_err(|error| error.to_string()))
        {
            Ok(segment) => segments.push(segment),
            Err(_) => broken_segments.push(stored.key),
        }
    }
    let mut flags = Vec::new();
    for stored in rows.flags {
        let key = stored.definition.key.clone();
        match compile_flag(stored, &broken_segments) {
            Ok(flag) => flags.push(flag),
            Err(why) => unloadable.push((key, why)),
        }
    }
    let mut snapshot = Snapshot::compile(flags, segments);
    for (key, why) in unloadable {
        snapshot.mark_unloadable(key, why);
    }
    snapshot
}

type LoadedFlag = (
    flagship_engine::rules::document::FlagDefinition,
    Option<flagship_engine::rules::environment_config::EnvironmentConfig>,
);

fn compile_flag(stored: StoredFlag, broken_segments: &[String]) -> Result<LoadedFlag, String> {
    let definition = stored.definition.document?;
    let definition = parse_flag_definition(&definition).map_err(|error| error.to_string())?;
    let config = match stored.config {
        None => None,
        Some(config) => {
            let config = parse_environment_config(
                &config.document?,
                &definition.variants,
                definition.bucketing.unwrap_or_default(),
                "",
            )
            .map_err(|error| error.to_string())?;
            if let Some(segment) = config
                .rules
                .iter()
                .filter_map(|rule| rule.segment.as_ref())
                .find(|segment| broken_segments.contains(segment))
            {
                return Err(format!("its segment \"{segment}\" cannot be read"));
            }
            Some(config)
        }
    };
    Ok((definition, config))
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
        Some(context) => {
            let extracted =
                Extracted::from(context, snapshot.context_keys(flag_key), environment_id);
            snapshot.evaluate_attributes(flag_key, Some(&extracted), &entitlements)
        }
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
