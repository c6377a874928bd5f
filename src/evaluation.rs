//! `flagship_evaluate` and friends: resolve the environment, fetch its
//! compiled configuration from the backend cache (compiling it on a miss),
//! and run the pure engine. Evaluation answers problems with an ERROR
//! result instead of raising, so it is safe in WHERE clauses and policies.

use std::cell::{Cell, OnceCell, RefCell};
use std::rc::Rc;

use crate::statement_reads::{self, KeptPlan, Query};
use pgrx::prelude::*;
use serde_json::Value;

use crate::args::TextArg;
use crate::cache::{self, CompiledKey, Located, Resolved};
use crate::context::{self, IdentityKey, RawIdentity};
use crate::encoded;
use crate::entitlements::{self, Customer, EnvironmentEntitlements};
use crate::exposures;
use crate::jsonb::{Builder, BuiltJsonb, JsonbArg};
use flagship_engine::rules::conditions::Attributes;
use flagship_engine::rules::document::{parse_environment_config, parse_flag_definition, parse_segment};
use flagship_engine::rules::engine::ErrorCode;
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
        // SAFETY: GetUserId returns a backend global; it cannot raise.
        user: unsafe { crate::unguarded::GetUserId() },
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
                512 + 2 * (flag.definition.text_bytes
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
                f.prerequisites::text, f.salt, f.archived, f.bucketing, \
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
                NULL, NULL, NULL, {}",
        cache::configuration_version_sql("$1")
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
                    Some("segment") => rows
                        .segments
                        .push(stored_document(found, row, SEGMENT_FIELDS)),
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
                match crate::jsonb::parse_document(&text) {
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
    Option<flagship_engine::rules::document::EnvironmentConfig>,
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
    use pgrx::prelude::*;

    use crate::test_support::{failure, organization_with_shop, text};

    fn setup() {
        organization_with_shop("acme", "Acme");
    }

    fn put_flag(document: &str) {
        Spi::run(&format!(
            "SELECT flagship.put_flag('shop', $doc${document}$doc$)"
        ))
        .unwrap();
    }

    fn reason(flag: &str, context: &str) -> String {
        text(&format!(
            "SELECT flagship.flagship_evaluate('{flag}', '{context}') ->> 'reason'"
        ))
    }

    #[pg_test]
    fn evaluates_with_targets_rules_and_default() {
        setup();
        put_flag(
            r#"{"key": "new-checkout", "environments": {"production": {"enabled": true,
                "targets": {"on": ["user-1"]},
                "rules": [{"id": "nordic", "conditions": [{"attribute": "country", "op": "in", "values": ["NO", "SE"]}],
                           "serve": {"variant": "on"}}],
                "default": {"variant": "off"}}}}"#,
        );
        assert_eq!(
            text("SELECT flagship.flagship_evaluate('new-checkout', '{\"targeting_key\": \"user-1\"}')::text"),
            r#"{"key": "new-checkout", "rule": "targets", "value": true, "reason": "TARGETING_MATCH", "variant": "on"}"#
        );
        assert_eq!(
            text("SELECT flagship.flagship_evaluate('new-checkout', '{\"country\": \"SE\"}') ->> 'rule'"),
            "nordic"
        );
        assert_eq!(reason("new-checkout", "{\"country\": \"DK\"}"), "DEFAULT");
        // Usable in WHERE clauses.
        let count = Spi::get_one::<i64>(
            "SELECT count(*) FROM (VALUES ('NO'), ('SE'), ('DK')) AS c (country) \
             WHERE flagship.flagship_enabled('new-checkout', jsonb_build_object('country', country))",
        )
        .unwrap();
        assert_eq!(count, Some(2));
        // An explicit environment wins over the session's.
        assert_eq!(
            text("SELECT flagship.flagship_evaluate('new-checkout', '{}', 'acme/shop/staging') ->> 'reason'"),
            "DISABLED"
        );
    }

    /// Contexts are read straight from jsonb's binary layout: keys sorted by
    /// length then bytes, offsets stored on every 32nd entry, numbers padded.
    /// Each rule below matches only when its attribute reads wrongly (or not
    /// at all), so DEFAULT proves every read right.
    #[pg_test]
    fn reads_every_kind_of_context_attribute() {
        setup();
        let expected = |i: u32| match i % 3 {
            0 => i.to_string(),
            1 => format!("\"v{i}\""),
            _ => i.is_multiple_of(2).to_string(),
        };
        let mut rules: Vec<String> = [1, 2, 3, 31, 32, 33, 34, 63, 64, 65, 79, 80]
            .into_iter()
            .map(|i| {
                format!(
                    r#"{{"id": "k{i}", "conditions": [{{"attribute": "k{i}", "op": "neq",
                        "values": [{}], "if_missing": true}}], "serve": {{"variant": "on"}}}}"#,
                    expected(i)
                )
            })
            .collect();
        for (id, attribute, value) in [
            ("unicode", "ключ", "\"значение\""),
            ("nested", "nested.inner", "\"x\""),
        ] {
            rules.push(format!(
                r#"{{"id": "{id}", "conditions": [{{"attribute": "{attribute}", "op": "neq",
                    "values": [{value}], "if_missing": true}}], "serve": {{"variant": "on"}}}}"#
            ));
        }
        put_flag(&format!(
            r#"{{"key": "wide", "environments": {{"production": {{"enabled": true,
                "rules": [{}], "default": {{"variant": "off"}}}}}}}}"#,
            rules.join(", ")
        ));
        let context = "(SELECT jsonb_object_agg('k' || i, CASE i % 3 WHEN 0 THEN to_jsonb(i) \
                        WHEN 1 THEN to_jsonb('v' || i) ELSE to_jsonb(i % 2 = 0) END) \
                        || '{\"ключ\": \"значение\", \"nested\": {\"inner\": \"x\"}}' \
                        FROM generate_series(1, 80) AS i)";
        let answer = |context: &str| {
            text(&format!(
                "SELECT flagship.flagship_evaluate('wide', {context})::text"
            ))
        };
        let all_read = answer(context);
        assert!(all_read.contains("\"reason\": \"DEFAULT\""), "{all_read}");
        // A wrong value, a null and a missing key are each noticed.
        for (change, rule) in [
            ("|| '{\"k64\": \"v0\"}'", "k64"),
            ("|| '{\"k65\": null}'", "k65"),
            ("- 'k80'", "k80"),
            ("- 'ключ'", "unicode"),
            ("|| '{\"nested\": {\"inner\": 1}}'", "nested"),
        ] {
            let changed = answer(&format!("({context} {change})"));
            assert!(
                changed.contains(&format!("\"rule\": \"{rule}\"")),
                "{change}: {changed}"
            );
        }
    }

    #[pg_test]
    fn errors_are_answered_not_raised() {
        setup();
        put_flag(r#"{"key": "f", "environments": {"production": {"enabled": true}}}"#);
        let missing = text("SELECT flagship.flagship_evaluate('nope')::text");
        assert!(
            missing.contains("\"error_code\": \"FLAG_NOT_FOUND\""),
            "{missing}"
        );
        let no_env =
            text("SELECT flagship.flagship_evaluate('f', '{}', 'shop/nowhere') ->> 'error_code'");
        assert_eq!(no_env, "ENVIRONMENT_NOT_FOUND");
        Spi::run("SET LOCAL flagship.environment = ''").unwrap();
        assert_eq!(
            text("SELECT flagship.flagship_evaluate('f') ->> 'error_code'"),
            "ENVIRONMENT_NOT_FOUND"
        );
        assert_eq!(
            text(
                "SELECT flagship.flagship_evaluate('f', '[1]', 'shop/production') ->> 'error_code'"
            ),
            "INVALID_CONTEXT"
        );
        assert_eq!(
            Spi::get_one::<bool>("SELECT flagship.flagship_enabled(NULL, NULL, 'shop/production')")
                .unwrap(),
            Some(false)
        );
        let all = text("SELECT flagship.flagship_evaluate_all('{}', 'nope/nope') ->> 'error_code'");
        assert_eq!(all, "ENVIRONMENT_NOT_FOUND");
    }

    #[pg_test]
    fn kill_switch_and_archiving() {
        setup();
        put_flag(r#"{"key": "f", "environments": {"production": {"enabled": true}}}"#);
        assert_eq!(reason("f", "{}"), "STATIC");
        Spi::run(
            "UPDATE flagship.feature_rules SET enabled = false \
             WHERE feature_id = (SELECT id FROM flagship.features WHERE key = 'f')",
        )
        .unwrap();
        assert_eq!(reason("f", "{}"), "DISABLED");
        Spi::run("UPDATE flagship.features SET archived = true WHERE key = 'f'").unwrap();
        assert_eq!(reason("f", "{}"), "ERROR");
        assert_eq!(text("SELECT flagship.flagship_evaluate_all()::text"), "{}");
    }

    #[pg_test]
    fn own_changes_are_seen_and_rollback_restores() {
        setup();
        put_flag(r#"{"key": "f", "environments": {"production": {"enabled": true}}}"#);
        assert_eq!(reason("f", "{}"), "STATIC");
        // A subtransaction that changes the flag, reads it, then rolls back.
        let inside = text(
            r#"DO $do$ BEGIN
                 PERFORM flagship.put_flag('shop', '{"key": "f", "environments": {"production": {"enabled": false}}}');
                 RAISE EXCEPTION '%', flagship.flagship_evaluate('f') ->> 'reason';
               EXCEPTION WHEN raise_exception THEN
                 PERFORM set_config('flagship_test.inside', SQLERRM, true);
               END $do$;
               SELECT current_setting('flagship_test.inside')"#,
        );
        assert_eq!(inside, "DISABLED", "own uncommitted change");
        assert_eq!(reason("f", "{}"), "STATIC", "rolled back");
    }

    #[pg_test]
    fn prerequisites_and_plan_flags() {
        setup();
        put_flag(
            r#"{"key": "payments", "environments": {"production": {"enabled": true,
                "rules": [{"conditions": [{"attribute": "country", "op": "eq", "values": ["NO"]}], "serve": {"variant": "on"}}],
                "default": {"variant": "off"}}}}"#,
        );
        put_flag(
            r#"{"key": "checkout", "prerequisites": [{"flag": "payments"}],
                "environments": {"production": {"enabled": true}}}"#,
        );
        assert_eq!(reason("checkout", "{\"country\": \"NO\"}"), "STATIC");
        assert_eq!(
            reason("checkout", "{\"country\": \"SE\"}"),
            "PREREQUISITE_FAILED"
        );
        put_flag(
            r#"{"key": "reports", "kind": "plan", "environments": {"production": {"enabled": true}}}"#,
        );
        assert_eq!(
            reason("reports", "{\"customer\": \"acme\"}"),
            "NOT_ENTITLED"
        );
    }

    #[pg_test]
    fn bad_documents_are_refused_and_nothing_is_written() {
        setup();
        put_flag(
            r#"{"key": "base", "environments": {"production": {"enabled": true, "default": {"variant": "on"}}}}"#,
        );
        let cases = [
            (
                r#"{"key": "f", "environments": {"production": {"rules": [{"conditions": [{"attribute": "a", "op": "lolwut", "values": [1]}], "serve": {"variant": "on"}}]}}}"#,
                "environments.production.rules[0].conditions[0].op: unknown operator \"lolwut\"",
            ),
            (
                r#"{"key": "f", "environments": {"production": {"default": {"rollout": {"on": 60, "off": 60}}}}}"#,
                "environments.production.default.rollout: weights sum to 120%, not 100%",
            ),
            (
                r#"{"key": "f", "environments": {"production": {"default": {"variant": "blue"}}}}"#,
                "environments.production.default.variant: unknown variant \"blue\"",
            ),
            (
                r#"{"key": "f", "environments": {"moon": {"enabled": true}}}"#,
                "environments.moon: project \"shop\" has no such environment",
            ),
            (
                r#"{"key": "f", "prerequisites": [{"flag": "ghost"}]}"#,
                "prerequisites: unknown flag \"ghost\"",
            ),
            (
                r#"{"key": "f", "environments": {"production": {"rules": [{"segment": "ghosts", "serve": {"variant": "on"}}]}}}"#,
                "unknown segment \"ghosts\"",
            ),
        ];
        for (document, expected) in cases {
            let (code, message) = failure(&format!(
                "PERFORM flagship.put_flag('shop', $doc${document}$doc$)"
            ));
            assert_eq!(code, "22023", "{document}: {message}");
            assert!(
                message.contains(expected),
                "{message} should contain {expected}"
            );
        }
        // A cycle through prerequisites.
        put_flag(r#"{"key": "a", "prerequisites": [{"flag": "base"}]}"#);
        let (code, message) = failure(
            r#"PERFORM flagship.put_flag('shop', '{"key": "base", "prerequisites": [{"flag": "a"}]}')"#,
        );
        assert_eq!(code, "22023");
        assert!(message.contains("cycle base -> a -> base"), "{message}");
        // Plain SQL writes meet the same validator.
        let (code, message) = failure(
            "UPDATE flagship.feature_rules SET rules = '[{\"conditions\": [{\"attribute\": \"a\", \"op\": \"nope\"}], \"serve\": {\"variant\": \"on\"}}]'",
        );
        assert_eq!(code, "22023");
        assert!(message.contains("unknown operator \"nope\""), "{message}");
        let (code, _) = failure(
            "INSERT INTO flagship.features (organization_id, project_id, key, kind) \
             SELECT organization_id, id, 'bad', 'ternary' FROM flagship.projects",
        );
        assert_eq!(code, "22023");
        let (code, message) = failure("UPDATE flagship.features SET variants = '{\"yes\": true, \"no\": false}', off_variant = 'no' WHERE key = 'base'");
        assert_eq!(code, "22023", "{message}");
        // Nothing of the refused documents was written.
        assert_eq!(
            text("SELECT string_agg(key, ',' ORDER BY key) FROM flagship.features"),
            "a,base"
        );
        assert_eq!(reason("base", "{}"), "STATIC");
    }

    #[pg_test]
    fn a_flag_bucketing_profile_is_stored_validated_and_exported() {
        setup();
        put_flag(
            r#"{"key": "u", "bucketing": "unleash", "environments": {"production": {"enabled": true,
                "default": {"rollout": [{"variant": "on", "weight": 1}, {"variant": "off", "weight": 2}],
                            "bucket_by": "userId"}}}}"#,
        );
        assert_eq!(
            text("SELECT bucketing FROM flagship.features WHERE key = 'u'"),
            "unleash"
        );
        assert_eq!(
            text("SELECT flagship.export_project('shop') -> 'flags' -> 0 ->> 'bucketing'"),
            "unleash"
        );
        // Unleash weights 1 and 2 are no percentages: a plain SQL switch back
        // to xxh3 is refused, and nothing changes.
        let (code, message) =
            failure("UPDATE flagship.features SET bucketing = NULL WHERE key = 'u'");
        assert_eq!(code, "22023", "{message}");
        assert!(message.contains("weights sum to 3%, not 100%"), "{message}");
        let (code, message) =
            failure("UPDATE flagship.features SET bucketing = 'md5' WHERE key = 'u'");
        assert_eq!(code, "22023", "{message}");
        assert!(
            message.contains("unknown bucketing profile \"md5\""),
            "{message}"
        );
        assert_eq!(
            text("SELECT bucketing FROM flagship.features WHERE key = 'u'"),
            "unleash"
        );
        // The stored profile places subjects as Unleash does.
        let expected = if flagship_engine::profiles::unleash_variant_target("42", "u", 3) <= 1 {
            "on"
        } else {
            "off"
        };
        assert_eq!(
            text(r#"SELECT flagship.flagship_evaluate('u', '{"userId": "42"}') ->> 'variant'"#),
            expected
        );
    }

    #[pg_test]
    fn export_then_import_reproduces_evaluations() {
        setup();
        Spi::run(r#"SELECT flagship.put_segment('shop', '{"key": "beta", "included": ["u-1"]}')"#)
            .unwrap();
        put_flag(r#"{"key": "base", "environments": {"production": {"enabled": true}}}"#);
        put_flag(
            r#"{"key": "exp", "kind": "multivariate", "variants": {"a": 1, "b": {"x": [2]}}, "off_variant": "a",
                "prerequisites": [{"flag": "base"}],
                "environments": {"production": {"enabled": true,
                   "rules": [{"id": "beta", "segment": "beta", "serve": {"variant": "b"}}],
                   "default": {"rollout": {"a": 37.5, "b": 62.5}, "salt": "s"}}}}"#,
        );
        let exported = text("SELECT flagship.export_project('shop')::text");
        let before = text(
            "SELECT string_agg(flagship.flagship_evaluate('exp', jsonb_build_object('targeting_key', 'u-' || i))::text, ';' ORDER BY i) \
             FROM generate_series(1, 200) i",
        );
        Spi::run(&format!(
            "SELECT set_config('flagship.organization_id', flagship.create_organization('other', 'Other')::text, true); \
             SELECT flagship.import_project(flagship.current_organization_id(), $doc${exported}$doc$)"
        ))
        .unwrap();
        let after = text(
            "SELECT string_agg(flagship.flagship_evaluate('exp', jsonb_build_object('targeting_key', 'u-' || i))::text, ';' ORDER BY i) \
             FROM generate_series(1, 200) i",
        );
        assert_eq!(before, after);
        assert!(before.contains("\"rule\": \"beta\""));
        assert_eq!(
            text("SELECT flagship.export_project('shop')::text"),
            exported
        );
    }

    #[pg_test]
    fn results_and_contexts_keep_every_json_type() {
        setup();
        put_flag(
            r#"{"key": "cfg", "kind": "multivariate", "off_variant": "small",
                "variants": {"small": {"limit": 10, "ratio": 0.25, "tags": ["a", null, true]}, "big": 1000},
                "environments": {"production": {"enabled": true,
                   "rules": [{"id": "adults", "conditions": [{"attribute": "user.age", "op": "gte", "values": [18]}],
                              "serve": {"variant": "big"}},
                             {"id": "named", "conditions": [{"attribute": "name", "op": "eq", "values": ["Åse ✓"]}],
                              "serve": {"variant": "big"}}],
                   "default": {"variant": "small"}}}}"#,
        );
        assert_eq!(
            text("SELECT (flagship.flagship_evaluate('cfg') -> 'value')::text"),
            r#"{"tags": ["a", null, true], "limit": 10, "ratio": 0.25}"#
        );
        // Nested objects, numbers and non-ASCII text in the context, read
        // from a stored row (short varlena header) and from a literal.
        Spi::run(
            r#"CREATE TEMP TABLE contexts (c jsonb);
               INSERT INTO contexts VALUES ('{"user": {"age": 30}}'), ('{"user": {"age": 12.5}}'),
                                           ('{"name": "Åse ✓"}'), ('{"user": "flat"}')"#,
        )
        .unwrap();
        assert_eq!(
            text("SELECT string_agg(coalesce(flagship.flagship_evaluate('cfg', c) ->> 'rule', '-'), ',') FROM contexts"),
            "adults,-,named,-"
        );
        assert_eq!(
            text(
                r#"SELECT flagship.flagship_evaluate('cfg', '{"user": {"age": 18}}') ->> 'value'"#
            ),
            "1000"
        );
        // Raw scalars and arrays are not objects.
        for context in ["'3'", "'\"x\"'", "'[]'", "'null'"] {
            assert_eq!(
                text(&format!(
                    "SELECT flagship.flagship_evaluate('cfg', {context}) ->> 'error_code'"
                )),
                "INVALID_CONTEXT",
                "{context}"
            );
        }
    }

    /// Flags of every kind, for comparing evaluate_all with evaluate.
    fn every_kind_of_flag() {
        Spi::run(
            r#"SELECT flagship.put_segment('shop', '{"key": "beta", "included": ["u-3"]}');
               SELECT flagship.put_metric('shop', '{"key": "calls"}')"#,
        )
        .unwrap();
        for document in [
            r#"{"key": "new-checkout", "environments": {"production": {"enabled": true,
                "targets": {"on": ["user-1"]},
                "rules": [{"id": "nordic", "conditions": [{"attribute": "country", "op": "in", "values": ["NO", "SE"]}],
                           "serve": {"variant": "on"}}],
                "default": {"variant": "off"}}}}"#,
            r##"{"key": "theme", "kind": "multivariate", "off_variant": "none",
                "variants": {"dark": {"bg": "#000", "名前": "暗い", "n": [1, 2.5, null, {"deep": [true]}]},
                             "light": "light ✓ \"quoted\"", "none": null},
                "environments": {"production": {"enabled": true,
                   "rules": [{"id": "adults", "conditions": [{"attribute": "age", "op": "gte", "values": [18]}],
                              "serve": {"variant": "dark"}},
                             {"id": "beta", "segment": "beta", "serve": {"variant": "light"}},
                             {"id": "gold", "conditions": [{"attribute": "customer.tier", "op": "eq", "values": ["gold"]}],
                              "serve": {"variant": "light"}},
                             {"id": "pro-users", "conditions": [{"attribute": "user.plan", "op": "eq", "values": ["pro"]}],
                              "serve": {"variant": "dark"}}],
                   "default": {"rollout": {"dark": 50, "light": 50}}}}}"##,
            r#"{"key": "plan-reports", "kind": "plan", "environments": {"production": {"enabled": true}}}"#,
            r#"{"key": "dependent", "prerequisites": [{"flag": "new-checkout"}],
                "environments": {"production": {"enabled": true}}}"#,
            r#"{"key": "switched-off", "environments": {"production": {"enabled": false}}}"#,
            r#"{"key": "unconfigured"}"#,
            r#"{"key": "retired", "archived": true, "environments": {"production": {"enabled": true}}}"#,
        ] {
            put_flag(document);
        }
        Spi::run(
            r#"SELECT flagship.put_plan('shop', '{"key": "pro", "features": {"plan-reports": true}}');
               SELECT flagship.put_customer('shop/production',
                   '{"key": "acme", "plan": "pro", "attributes": {"tier": "gold", "name": "Åse ✓"}}')"#,
        )
        .unwrap();
    }

    /// The bug of issue #13: every inner key and string of evaluate_all's
    /// answers was freed memory. Each answer must be exactly what
    /// flagship_evaluate gives for that flag, for generated contexts.
    #[pg_test]
    fn evaluate_all_equals_evaluate_flag_by_flag() {
        use crate::test_support::generated;
        use proptest::prelude::*;
        setup();
        every_kind_of_flag();
        // Another organization's flags evaluated first in this backend, so
        // freed memory would hold its data.
        Spi::run(
            "SELECT set_config('flagship.organization_id', \
                 flagship.create_organization('globex', 'Globex')::text, true); \
             SELECT flagship.create_project(flagship.current_organization_id(), 'shop', 'Shop')",
        )
        .unwrap();
        put_flag(
            r#"{"key": "globex-secret", "kind": "multivariate", "variants": {"s": "globex-only-value"},
                     "off_variant": "s", "environments": {"production": {"enabled": true}}}"#,
        );
        assert!(text("SELECT flagship.flagship_evaluate_all()::text").contains("globex-only-value"));
        Spi::run("SELECT set_config('flagship.organization_id', id::text, true) FROM flagship.organizations WHERE slug = 'acme'")
            .unwrap();

        let member = prop_oneof![
            prop_oneof![Just("user-1"), Just("u-2"), Just("u-3")]
                .prop_map(|key| ("targeting_key".to_string(), serde_json::json!(key))),
            prop_oneof![Just("NO"), Just("SE"), Just("DK")]
                .prop_map(|country| ("country".to_string(), serde_json::json!(country))),
            generated::number().prop_map(|age| ("age".to_string(), age)),
            prop_oneof![Just("acme"), Just("nobody")]
                .prop_map(|customer| ("customer".to_string(), serde_json::json!(customer))),
            prop_oneof![Just("pro"), Just("free")]
                .prop_map(|plan| ("user".to_string(), serde_json::json!({"plan": plan}))),
            (generated::key(), generated::value()),
        ];
        let contexts = prop_oneof![
            8 => prop::collection::vec(member, 0..8).prop_map(|members| generated::object_text(&members)),
            1 => generated::value().prop_map(|value| value.to_string()),
            1 => Just("NULL".to_string()),
        ];
        let compare = "SELECT flagship.flagship_evaluate_all(NULLIF($1, 'NULL')::jsonb)::text, \
                              (SELECT jsonb_object_agg(key, flagship.flagship_evaluate(key, NULLIF($1, 'NULL')::jsonb)) \
                                 FROM flagship.features WHERE NOT archived AND organization_id = flagship.current_organization_id())::text";
        generated::runner(1_000, "evaluate_all against evaluate")
            .run(&contexts, |context| {
                let (all, one_by_one) =
                    Spi::get_two_with_args::<String, String>(compare, &[context.clone().into()])
                        .unwrap();
                prop_assert_eq!(&all, &one_by_one, "context {}", context);
                prop_assert!(!all.unwrap_or_default().contains("globex"));
                Ok(())
            })
            .unwrap();
        // One answer in full, inner fields included.
        assert_eq!(
            text(
                r#"SELECT (flagship.flagship_evaluate_all('{"targeting_key": "u-3", "age": 30}') -> 'theme')::text"#
            ),
            r##"{"key": "theme", "rule": "adults", "value": {"n": [1, 2.5, null, {"deep": [true]}], "bg": "#000", "名前": "暗い"}, "reason": "TARGETING_MATCH", "variant": "dark"}"##
        );
        // The error object carries the real message.
        assert_eq!(
            text("SELECT flagship.flagship_evaluate_all('{}', 'nope/nope')::text"),
            r#"{"error_code": "ENVIRONMENT_NOT_FOUND", "error_message": "environment \"nope/nope\" not found"}"#
        );
    }

    fn nested(depth: usize) -> String {
        format!("{}1{}", "[".repeat(depth), "]".repeat(depth))
    }

    /// Documents too deep or too large to load back are refused on every
    /// write path, naming the field and the limit; what is accepted
    /// evaluates.
    #[pg_test]
    fn pathological_documents_are_refused_at_write_or_evaluated() {
        setup();
        let variant = |value: &str| {
            format!(
                r#"PERFORM flagship.put_flag('shop', '{{"key": "deep", "kind": "multivariate", "off_variant": "x",
                     "variants": {{"x": {value}}}, "environments": {{"production": {{"enabled": true}}}}}}')"#
            )
        };
        for (value, expected) in [
            (
                nested(65),
                "variants.x: nests 65 levels of JSON, more than the limit of 64",
            ),
            (
                nested(124),
                "variants.x: nests 124 levels of JSON, more than the limit of 64",
            ),
            (nested(200), "nests deeper than 128 levels of JSON"),
            ("1e400".to_string(), "numbers must fit a double"),
        ] {
            let (code, message) = failure(&variant(&value));
            assert_eq!(code, "22023", "{message}");
            assert!(
                message.contains(expected),
                "{message} should contain {expected}"
            );
        }
        // At the limit, accepted, and evaluated.
        Spi::run(&format!("DO $do$ BEGIN {}; END $do$", variant(&nested(64)))).unwrap();
        assert_eq!(reason("deep", "{}"), "STATIC");
        // Plain SQL meets the same limits.
        let (code, message) = failure(&format!(
            "UPDATE flagship.features SET variants = '{{\"x\": {}}}' WHERE key = 'deep'",
            nested(100)
        ));
        assert_eq!(code, "22023", "{message}");
        assert!(message.contains("more than the limit of 64"), "{message}");
        // Customer attributes, through put_customer and plain SQL.
        let (code, message) = failure(&format!(
            r#"PERFORM flagship.put_customer('shop/production', '{{"key": "c1", "attributes": {{"a": {}}}}}')"#,
            nested(100)
        ));
        assert_eq!(code, "22023", "{message}");
        assert!(
            message.contains("customer \"c1\": attributes: nests 101 levels"),
            "{message}"
        );
        let (code, message) = failure(&format!(
            "INSERT INTO flagship.customers (organization_id, project_id, environment_id, external_key, attributes) \
             SELECT organization_id, project_id, id, 'c2', '{{\"a\": {}}}' FROM flagship.environments WHERE key = 'production'",
            nested(300)
        ));
        assert_eq!(code, "22023", "{message}");
        assert!(
            message.contains("customer \"c2\": attributes: nests deeper than 128"),
            "{message}"
        );
        // A million-element variant is accepted and served whole.
        Spi::run(
            r#"SELECT flagship.put_flag('shop', jsonb_build_object('key', 'big', 'kind', 'multivariate',
                   'off_variant', 'x', 'variants', jsonb_build_object('x', (SELECT jsonb_agg(i) FROM generate_series(1, 1000000) i)),
                   'environments', '{"production": {"enabled": true}}'::jsonb))"#,
        )
        .unwrap();
        assert_eq!(
            text("SELECT jsonb_array_length(flagship.flagship_evaluate('big') -> 'value')::text"),
            "1000000"
        );
    }

    /// Rows written around the validators (a superuser with triggers off)
    /// fail only their own flag: it answers ERROR naming itself, the rest of
    /// the environment evaluates as before, and nothing raises.
    #[pg_test]
    fn a_flag_that_cannot_be_loaded_fails_alone() {
        setup();
        put_flag(r#"{"key": "healthy", "environments": {"production": {"enabled": true}}}"#);
        put_flag(r#"{"key": "broken", "environments": {"production": {"enabled": true}}}"#);
        Spi::run(r#"SELECT flagship.put_segment('shop', '{"key": "beta", "included": ["u-1"]}')"#)
            .unwrap();
        put_flag(
            r#"{"key": "segmented", "environments": {"production": {"enabled": true,
                "rules": [{"segment": "beta", "serve": {"variant": "off"}}]}}}"#,
        );
        Spi::run(&format!(
            r#"SET LOCAL session_replication_role = replica;
               UPDATE flagship.features SET variants = '{{"on": {}, "off": false}}' WHERE key = 'broken';
               UPDATE flagship.segments SET conditions = '[{{"attribute": "a", "op": "lolwut"}}]' WHERE key = 'beta';
               SET LOCAL session_replication_role = origin"#,
            nested(200)
        ))
        .unwrap();
        let broken = text("SELECT flagship.flagship_evaluate('broken')::text");
        assert_eq!(
            broken,
            r#"{"key": "broken", "value": null, "reason": "ERROR", "variant": null, "error_code": "GENERAL", "error_message": "flag \"broken\" cannot be evaluated: its stored \"variants\" nests deeper than 128 levels of JSON"}"#
        );
        assert_eq!(reason("healthy", "{}"), "STATIC");
        assert_eq!(
            text("SELECT flagship.flagship_evaluate('segmented') ->> 'error_message'"),
            "flag \"segmented\" cannot be evaluated: its segment \"beta\" cannot be read"
        );
        assert_eq!(
            Spi::get_one::<bool>("SELECT flagship.flagship_enabled('broken')").unwrap(),
            Some(false)
        );
        assert_eq!(
            text("SELECT string_agg(key || '=' || (value ->> 'reason'), ',' ORDER BY key) FROM jsonb_each(flagship.flagship_evaluate_all())"),
            "broken=ERROR,healthy=STATIC,segmented=ERROR"
        );
    }

    #[pg_test]
    fn bucket_function_matches_the_published_vectors() {
        assert_eq!(
            Spi::get_one::<i32>("SELECT flagship.bucket('new-checkout', 'user-1')").unwrap(),
            Some(31_778)
        );
    }
}
