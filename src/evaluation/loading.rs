//! Where an environment name leads (`locate`) and what its stored rows
//! compile to (`load`): one kept statement each, read-only under the
//! statement's snapshot.

use std::cell::RefCell;

use pgrx::prelude::*;
use serde_json::Value;

use crate::cache::{self, Located};
use crate::postgres::statement_reads::{self, KeptPlan, Query};
use flagship_engine::rules::document::{parse_flag_definition, parse_segment};
use flagship_engine::rules::environment_config::parse_environment_config;
use flagship_engine::rules::Snapshot;

/// The environments a name can mean for this session, and the versions
/// of the one it means, in one statement.
pub(super) fn locate(environment: &str) -> Located {
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

pub(super) fn load(environment_id: pgrx::Uuid) -> cache::Loaded {
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
