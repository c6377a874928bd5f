//! FlagShip next to Citus: whether this backend runs where the session's
//! organization's rows are.
//!
//! Two setups (README, "Citus"). FlagShip's tables local to the
//! coordinator: `CREATE EXTENSION flagship` reaches every worker, but the
//! workers' copies stay empty, and Citus runs the functions of a query on a
//! distributed table inside the shard queries it sends to the workers, so
//! `WHERE flagship_enabled(...)` there would find no environment and answer
//! false for every row. Distributed (`flagship.distribute()`): each
//! organization's rows are in one shard group on one node, and FlagShip
//! answers there; on any other node the statements that read them run over
//! connections whose sessions have no organization, and find nothing. In
//! both, an answer of "not found" away from the rows raises instead.

use std::cell::Cell;

use pgrx::prelude::*;

use crate::postgres::statement_reads::{self, Query};

/// This node's Citus group (0: the coordinator, or no Citus at all), and
/// whether FlagShip's tables are distributed.
#[derive(Clone, Copy)]
struct Node {
    group: i32,
    distributed: bool,
}

thread_local! {
    /// Kept for one transaction (its start time): a node becomes a worker
    /// when a coordinator adds it, and the tables become distributed when
    /// `flagship.distribute()` commits.
    static NODE: Cell<Option<(pg_sys::TimestampTz, Node)>> = const { Cell::new(None) };
}

/// `verify_api_key` calls this before it answers `NOT_FOUND`, and
/// `has_permission` before it answers false: away from the organization's
/// rows every key and every member is unknown, and a pushed-down call would
/// refuse every row in silence. Executable by everyone (`has_permission`
/// runs with its caller's rights); it tells nothing but where the session's
/// own organization is.
#[pg_extern(volatile, parallel_restricted)]
pub fn refuse_away_from_the_organization() {
    refuse_away_from_the_rows();
}

/// Whether the Citus library is loaded in this backend at all: without it
/// nothing here needs a query.
fn citus_loaded() -> bool {
    crate::postgres::settings::text(c"citus.version").is_some()
}

fn node() -> Node {
    if !citus_loaded() {
        return Node {
            group: 0,
            distributed: false,
        };
    }
    let transaction = crate::postgres::backend::transaction_start();
    if let Some((looked_up_in, node)) = NODE.with(Cell::get) {
        if looked_up_in == transaction {
            return node;
        }
    }
    let node = Spi::connect(|client| {
        let read = |sql: &str| statement_reads::select(client, Query::Text(sql), &[], 1);
        // The catalogs exist only where the citus extension is created.
        let citus = read(
            "SELECT 1 WHERE pg_catalog.to_regclass('pg_catalog.pg_dist_local_group') IS NOT NULL",
        )
        .get::<i32>(0, 1)
        .is_some();
        if !citus {
            return Node {
                group: 0,
                distributed: false,
            };
        }
        let found = read(
            "SELECT g.groupid, EXISTS (SELECT 1 FROM pg_catalog.pg_dist_partition d \
                                        WHERE d.logicalrelid = 'flagship.organizations'::regclass) \
               FROM pg_catalog.pg_dist_local_group g",
        );
        Node {
            group: found.get::<i32>(0, 1).unwrap_or(0),
            distributed: found.get::<bool>(0, 2).unwrap_or(false),
        }
    });
    NODE.with(|cell| cell.set(Some((transaction, node))));
    node
}

/// Whether FlagShip's tables are distributed (cached for the transaction;
/// no query without Citus).
pub fn distributed() -> bool {
    node().distributed
}

/// Raises feature_not_supported when this backend runs away from the
/// session's organization's rows: called before answering that something
/// was not found (evaluation, usage limits and metering look an
/// environment up), which there would be a silent wrong answer.
pub fn refuse_away_from_the_rows() {
    let node = node();
    if node.distributed {
        refuse_away_from_the_shards(node.group);
    } else if node.group != 0 {
        crate::errors::raise(
            PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
            format!(
                "FlagShip was called on a Citus worker (node group {}), where it has no \
                 configuration: that lives on the coordinator, and FlagShip's tables are not \
                 distributed",
                node.group
            ),
            Some(
                "Citus runs the functions of a query on a distributed table on the workers. \
                 Call FlagShip on the coordinator: over the rows a subquery brings back (add \
                 OFFSET 0 to it), or for the distinct values first, then join.",
            ),
        );
    }
}

/// Called before loading what a cache keeps for `organization` (an
/// environment's flags, a customer's terms): once FlagShip's tables are
/// distributed, only the node that holds the organization's shards hears
/// of its changes (their triggers fire there), so a copy kept on any other
/// node could outlive a change. Such a load raises instead, and nothing is
/// kept (a session there that sends its organization along, with SET
/// LOCAL and citus.propagate_set_commands = 'local', could read the rows).
/// Costs nothing without Citus, and runs on cache misses only.
pub fn require_the_organizations_node(organization: pgrx::Uuid) {
    let node = node();
    if node.distributed {
        refuse_unless_here(node.group, organization);
    }
}

/// With FlagShip's tables distributed: raises unless the shards of the
/// session's organization are on this node (a session with no
/// organization finds nothing anywhere, rightly).
fn refuse_away_from_the_shards(group: i32) {
    if let Some(organization) = crate::context::organization_id() {
        refuse_unless_here(group, organization);
    }
}

fn refuse_unless_here(group: i32, organization: pgrx::Uuid) {
    let (holder, host, port) = Spi::connect(|client| {
        let found = statement_reads::select(
            client,
            Query::Text(
                "SELECT pl.groupid, n.nodename::text, n.nodeport \
                   FROM pg_catalog.pg_dist_placement pl \
                   JOIN pg_catalog.pg_dist_node n ON n.groupid = pl.groupid \
                  WHERE pl.shardid = pg_catalog.get_shard_id_for_distribution_column( \
                            'flagship.organizations', $1) \
                  LIMIT 1",
            ),
            &[organization.into()],
            1,
        );
        (
            found.get::<i32>(0, 1),
            found.get::<String>(0, 2).unwrap_or_default(),
            found.get::<i32>(0, 3).unwrap_or(0),
        )
    });
    if holder.is_some_and(|holder| holder != group) {
        crate::errors::raise(
            PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
            format!(
                "FlagShip's tables are distributed and organization {organization} is on the \
                 node {host}:{port}, not on this one (node group {group}): its rows are read \
                 only there"
            ),
            Some(
                "connect to the node that holds the organization (SELECT * FROM \
                 flagship.organization_node()) and call FlagShip there",
            ),
        );
    }
}
