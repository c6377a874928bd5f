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
        if cache::versioned() {
            // One function whose reads each name the organization, so that
            // Citus sends them to its shard group (#21).
            "SELECT coalesce(pg_catalog.to_regclass('flagship.configuration_signal'), \
                             'flagship.features'::regclass)::oid, \
                    l.candidates, l.version, l.organization \
               FROM flagship.locate_environment($1) l"
                .to_string()
        } else {
            // Before 0.3.0's SQL: no versions, no locate_environment.
            "SELECT 'flagship.features'::regclass::oid, c.ids, NULL::bigint, \
                    (SELECT e.organization_id FROM flagship.environments e \
                      WHERE e.id = c.ids[1] AND cardinality(c.ids) = 1) \
               FROM (SELECT flagship.environment_candidates($1) AS ids) c"
                .to_string()
        }
    };
    let (watched, candidates, version, organization) = select_kept(
        &LOCATE_STATEMENT,
        query,
        &[environment.into()],
        &[pg_sys::TEXTOID],
        |found| match found.row(0) {
            Some(row) => (
                row.get::<pg_sys::Oid>(1).unwrap_or(pg_sys::InvalidOid),
                row.get::<Vec<pgrx::Uuid>>(2).unwrap_or_default(),
                row.get::<i64>(3),
                row.get::<pgrx::Uuid>(4),
            ),
            None => (pg_sys::InvalidOid, Vec::new(), None, None),
        },
    );
    cache::watch_configuration(watched);
    if let (Some(organization), [_]) = (organization, candidates.as_slice()) {
        // What locate finds is kept too (the name cache).
        crate::citus::require_the_organizations_node(organization);
    }
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

pub(super) fn load(environment_id: pgrx::Uuid, organization: pgrx::Uuid) -> cache::Loaded {
    crate::citus::require_the_organizations_node(organization);
    let rows = load_rows(environment_id, organization);
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
    /// jsonb, read from its binary form.
    Json,
}

impl Column {
    /// The typed NULL a row that does not fill this column selects, so the
    /// branches of the UNION agree on every column's type.
    fn null(self) -> &'static str {
        match self {
            Column::Boolean => "NULL::boolean",
            Column::Text => "NULL::text",
            Column::Json => "NULL::jsonb",
        }
    }
}

/// A document field, the SQL that reads it, and how.
struct Field {
    name: &'static str,
    sql: &'static str,
    kind: Column,
}

const fn field(name: &'static str, sql: &'static str, kind: Column) -> Field {
    Field { name, sql, kind }
}

/// The tables' columns are read one by one, not as `row_to_json` of the
/// row, which spent most of a cold load printing uuids and timestamps the
/// documents do not have and escaping the jsonb text a second time.
const FLAG_FIELDS: &[Field] = &[
    field("key", "f.key", Column::Text),
    field("kind", "f.kind", Column::Text),
    field("name", "f.name", Column::Text),
    field("description", "f.description", Column::Text),
    field("variants", "f.variants", Column::Json),
    field("off_variant", "f.off_variant", Column::Text),
    field("prerequisites", "f.prerequisites", Column::Json),
    field("salt", "f.salt", Column::Text),
    field("archived", "f.archived", Column::Boolean),
    field("bucketing", "f.bucketing", Column::Text),
];
/// Whether the flag has a configuration row in this environment.
const HAS_CONFIG: &[Field] = &[field("", "r.feature_id IS NOT NULL", Column::Boolean)];
const CONFIG_FIELDS: &[Field] = &[
    field("enabled", "r.enabled", Column::Boolean),
    field("targets", "r.targets", Column::Json),
    field("rules", "r.rules", Column::Json),
    field("default", "r.default_serve", Column::Json),
];
const SEGMENT_FIELDS: &[Field] = &[
    field("key", "s.key", Column::Text),
    field("name", "s.name", Column::Text),
    field("description", "s.description", Column::Text),
    field("included", "s.included", Column::Json),
    field("excluded", "s.excluded", Column::Json),
    field("conditions", "s.conditions", Column::Json),
];

/// The loading statement's columns after the row's tag, block by block: a
/// row fills its own blocks and selects NULL for the others. The statement
/// and the reader both take positions from this one list, so they cannot
/// drift apart. The version column follows the last block.
const BLOCKS: [&[Field]; 4] = [FLAG_FIELDS, HAS_CONFIG, CONFIG_FIELDS, SEGMENT_FIELDS];
const FLAG_BLOCK: usize = 0;
const HAS_CONFIG_BLOCK: usize = 1;
const CONFIG_BLOCK: usize = 2;
const SEGMENT_BLOCK: usize = 3;
const VERSION_BLOCK: usize = BLOCKS.len();

/// The position (1-based) of block `block`'s first column.
fn first_column(block: usize) -> i32 {
    let before: usize = BLOCKS[..block].iter().map(|fields| fields.len()).sum();
    2 + before as i32
}

/// A row's tag and its block columns: the `filled` blocks read, the others
/// NULL. 0.1.0's features table has no bucketing column: until the SQL is
/// updated (no version table yet), that column is read by name from the
/// row, where a missing one is NULL.
fn select_list(tag: &str, filled: &[usize]) -> String {
    let mut columns = vec![format!("'{tag}'")];
    for (block, fields) in BLOCKS.iter().enumerate() {
        for field in *fields {
            columns.push(if !filled.contains(&block) {
                field.kind.null().to_string()
            } else if field.name == "bucketing" && !cache::versioned() {
                "row_to_json(f) ->> 'bucketing'".to_string()
            } else {
                field.sql.to_string()
            });
        }
    }
    columns.join(", ")
}

/// Every row one environment (`$1`, of organization `$2`) needs for its
/// evaluation, and its versions, in one statement, so that all of it comes
/// from one snapshot. Columns: `BLOCKS`. Every table is read with the
/// organization as a value: Citus sends the statement to the shard group
/// that holds it (#21).
fn rows_query() -> String {
    format!(
        "SELECT {flag}, NULL::bigint \
           FROM flagship.environments e \
           JOIN flagship.features f ON f.organization_id = e.organization_id AND f.project_id = e.project_id \
           LEFT JOIN flagship.feature_rules r \
             ON r.organization_id = f.organization_id AND r.feature_id = f.id AND r.environment_id = e.id \
          WHERE e.organization_id = $2 AND e.id = $1 \
         UNION ALL \
         SELECT {segment}, NULL::bigint \
           FROM flagship.environments e \
           JOIN flagship.segments s ON s.organization_id = e.organization_id AND s.project_id = e.project_id \
          WHERE e.organization_id = $2 AND e.id = $1 \
         UNION ALL \
         SELECT {version_row}, {version}",
        flag = select_list("flag", &[FLAG_BLOCK, HAS_CONFIG_BLOCK, CONFIG_BLOCK]),
        segment = select_list("segment", &[SEGMENT_BLOCK]),
        version_row = select_list("version", &[]),
        version = cache::configuration_version_sql("$1", "$2")
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
    arguments: &[pgrx::datum::DatumWithOid<'_>],
    argument_types: &[pg_sys::Oid],
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
                *cell = Some((versioned, KeptPlan::prepare(client, &sql(), argument_types)));
            }
            let (_, plan) = cell.as_ref().expect("prepared above");
            let rows = statement_reads::select(client, Query::Kept(plan), arguments, 0);
            read(&rows)
        })
    })
}

fn load_rows(environment_id: pgrx::Uuid, organization: pgrx::Uuid) -> StoredRows {
    select_kept(
        &ROWS_STATEMENT,
        rows_query,
        &[environment_id.into(), organization.into()],
        &[pg_sys::UUIDOID, pg_sys::UUIDOID],
        |found| {
            let mut rows = StoredRows {
                flags: Vec::new(),
                segments: Vec::new(),
                version: None,
            };
            for row in (0..found.len()).filter_map(|row| found.row(row)) {
                match row.get::<String>(1).as_deref() {
                    Some("flag") => rows.flags.push(StoredFlag {
                        definition: stored_document(&row, FLAG_BLOCK),
                        config: row
                            .get::<bool>(first_column(HAS_CONFIG_BLOCK))
                            .unwrap_or(false)
                            .then(|| stored_document(&row, CONFIG_BLOCK)),
                    }),
                    Some("segment") => rows.segments.push(stored_document(&row, SEGMENT_BLOCK)),
                    _ => rows.version = row.get::<i64>(first_column(VERSION_BLOCK)),
                }
            }
            rows
        },
    )
}

/// Row `row`'s block `block` as a document object: a NULL column is a
/// `null` field, as the documents were written.
fn stored_document(row: &statement_reads::Row<'_>, block: usize) -> StoredDocument {
    let fields = BLOCKS[block];
    let mut document = serde_json::Map::with_capacity(fields.len());
    let mut text_bytes = 0;
    let mut unreadable = None;
    for (column, field) in (first_column(block)..).zip(fields) {
        let value = match field.kind {
            Column::Boolean => row.get::<bool>(column).map(Value::Bool),
            Column::Text => row.get::<String>(column).map(|text| {
                text_bytes += text.len();
                Value::String(text)
            }),
            Column::Json => row.jsonb(column).and_then(|stored| {
                text_bytes += stored.size_bytes();
                match stored.to_document() {
                    Ok(value) => Some(value),
                    Err(why) => {
                        unreadable.get_or_insert(format!("its stored \"{}\" {why}", field.name));
                        None
                    }
                }
            }),
        };
        document.insert(field.name.to_string(), value.unwrap_or(Value::Null));
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
                flagship_engine::rules::ROOT,
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
