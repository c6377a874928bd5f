//! Escrow slices (#20): a hot customer's counter split into rows whose caps
//! sum to the limit. Real sessions racing, rolling back, rebalancing, a
//! limit lowered under load, and a server killed in the middle: the grants
//! never pass the limit, the slices always sum to the ledger, and nothing
//! acknowledged is lost.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;

use crate::harness::{
    app_session, connect, login_as, organization, sqlstate, text, ThrowawayServer,
};

/// An organization whose customer `acme` may use `limit` of `calls`, a sum
/// split into `slices`. Returns the organization id.
fn sliced_customer(client: &mut postgres::Client, prefix: &str, limit: i64, slices: u16) -> String {
    let (org, _) = organization(client, prefix);
    setup_sliced(client, &org, limit, slices);
    org
}

fn setup_sliced(client: &mut postgres::Client, org: &str, limit: i64, slices: u16) {
    client
        .batch_execute(&format!(
            r#"SET flagship.organization_id = '{org}';
               SELECT flagship.put_metric('shop', '{{"key": "calls", "slices": {slices}}}');
               SELECT flagship.put_plan('shop', '{{"key": "pro", "limits": {{"calls": {{"limit": {limit}}}}}}}');
               SELECT flagship.put_customer('shop/production', '{{"key": "acme", "plan": "pro"}}');
               RESET flagship.organization_id;"#
        ))
        .unwrap();
}

fn session_on(mut client: postgres::Client, org: &str) -> postgres::Client {
    client
        .batch_execute(&format!(
            "SET flagship.organization_id = '{org}'; SET flagship.environment = 'shop/production'"
        ))
        .unwrap();
    client
}

/// The counter as its rows hold it, and the ledger: (used by the answer,
/// sum of slices, sum of recorded amounts, sum of caps of slices split for
/// `limit`, slices).
fn books(client: &mut postgres::Client, org: &str, limit: i64) -> (i64, i64, i64, i64, i64) {
    let row = client
        .query_one(
            &format!(
                "SELECT (flagship.check_usage_limit('acme', 'calls') ->> 'used')::bigint,
                        (SELECT coalesce(sum(used), 0)::bigint FROM flagship.usage_counters
                          WHERE organization_id = '{org}'),
                        (SELECT coalesce(sum(amount), 0)::bigint FROM flagship.usage_ledger
                          WHERE organization_id = '{org}'),
                        (SELECT coalesce(sum(cap), 0)::bigint FROM flagship.usage_counters
                          WHERE organization_id = '{org}' AND split_limit = {limit}),
                        (SELECT count(*) FROM flagship.usage_counters WHERE organization_id = '{org}')"
            ),
            &[],
        )
        .unwrap();
    (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4))
}

/// 8 sessions consuming `amount` at a time until the returned closure is
/// called, which stops and joins them.
fn consume_until_stopped(org: &str, amount: i64) -> impl FnOnce() {
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..8)
        .map(|_| {
            let org = org.to_string();
            let stop = Arc::clone(&stop);
            thread::spawn(move || {
                let mut client = session_on(connect(), &org);
                while !stop.load(Ordering::Relaxed) {
                    client
                        .execute(
                            "SELECT flagship.record_usage('acme', 'calls', $1)",
                            &[&amount],
                        )
                        .unwrap();
                }
            })
        })
        .collect();
    move || {
        stop.store(true, Ordering::Relaxed);
        for worker in workers {
            worker.join().unwrap();
        }
    }
}

/// A tiny deterministic generator per thread (no dependency for dice).
fn dice(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

/// 8 sessions x `attempts` consumes of 1 to 5 against `limit`, each in its
/// own transaction at `isolation`; one in ten rolled back, one in ten
/// consumed under a savepoint rolled back to. Serialization failures
/// (40001, REPEATABLE READ and SERIALIZABLE only) are rolled back and
/// counted as not granted. Returns what committed grants added up to.
fn race(org: &str, attempts: u64, isolation: &str) -> i64 {
    let workers: Vec<_> = (0..8u64)
        .map(|worker| {
            let org = org.to_string();
            let isolation = isolation.to_string();
            thread::spawn(move || {
                let mut client = session_on(connect(), &org);
                let mut seed = 0x9E37_79B9_7F4A_7C15 ^ ((worker + 1) * 7919);
                let mut committed = 0i64;
                for _ in 0..attempts {
                    let amount = (dice(&mut seed) % 5 + 1) as i64;
                    let fate = dice(&mut seed) % 10;
                    client
                        .batch_execute(&format!("BEGIN ISOLATION LEVEL {isolation}"))
                        .unwrap();
                    if fate == 1 {
                        client.batch_execute("SAVEPOINT s").unwrap();
                    }
                    let granted = match client.query_one(
                        "SELECT (flagship.record_usage('acme', 'calls', $1) ->> 'allowed')::boolean",
                        &[&amount],
                    ) {
                        Ok(row) => row.get::<_, bool>(0),
                        Err(error) => {
                            let code = error.code().map(|code| code.code().to_string());
                            assert_eq!(code.as_deref(), Some("40001"), "{error}");
                            client.batch_execute("ROLLBACK").unwrap();
                            continue;
                        }
                    };
                    match fate {
                        0 => client.batch_execute("ROLLBACK").unwrap(),
                        1 => client
                            .batch_execute("ROLLBACK TO SAVEPOINT s; COMMIT")
                            .unwrap(),
                        _ => {
                            client.batch_execute("COMMIT").unwrap();
                            if granted {
                                committed += amount;
                            }
                        }
                    }
                }
                committed
            })
        })
        .collect();
    workers
        .into_iter()
        .map(|worker| worker.join().unwrap())
        .sum()
}

/// 8 sessions x 1 000 racing consumes of random amounts, with rollbacks
/// and savepoints: exactly what committed is counted, in the slices and in
/// the ledger; never more than the limit; the caps sum to the limit; and
/// the counter fills up (a refusal leaves less room than the largest
/// amount). No deadlock ever surfaces (every wait is in slice order).
#[test]
fn sliced_counters_grant_exactly_up_to_the_limit() {
    let mut su = connect();
    let org = sliced_customer(&mut su, "escrow-race", 6000, 8);
    let committed = race(&org, 1000, "READ COMMITTED");
    let mut client = session_on(connect(), &org);
    let (used, slices_sum, ledger_sum, caps, rows) = books(&mut client, &org, 6000);
    assert_eq!(
        (used, slices_sum, ledger_sum, caps, rows),
        (committed, committed, committed, 6000, 8),
        "(answer, slices, ledger, caps, rows)"
    );
    assert!(committed <= 6000 && committed > 6000 - 5, "{committed}");
}

/// REPEATABLE READ callers: exact, or 40001 to retry; never an overshoot.
#[test]
fn repeatable_read_callers_are_exact_or_told_to_retry() {
    let mut su = connect();
    let org = sliced_customer(&mut su, "escrow-rr", 1500, 4);
    let committed = race(&org, 300, "REPEATABLE READ");
    let mut client = session_on(connect(), &org);
    let (used, slices_sum, ledger_sum, caps, _) = books(&mut client, &org, 1500);
    assert_eq!(
        (used, slices_sum, ledger_sum, caps),
        (committed, committed, committed, 1500)
    );
    assert!(committed <= 1500, "{committed}");
}

/// One session, step by step: room in any slice is found (no false
/// refusal), a refusal is exact, a reservation's refund comes back, and
/// the rows say what happened.
#[test]
fn a_slice_without_room_borrows_from_the_others() {
    let mut su = connect();
    let org = sliced_customer(&mut su, "escrow-steps", 100, 4);
    let mut client = session_on(connect(), &org);
    let consume = |client: &mut postgres::Client, amount: i64| -> (bool, i64) {
        let row = client
            .query_one(
                "SELECT (r ->> 'allowed')::boolean, (r ->> 'used')::bigint
                   FROM flagship.record_usage('acme', 'calls', $1) r",
                &[&amount],
            )
            .unwrap();
        (row.get(0), row.get(1))
    };
    // The first consumption creates the slices: 60 on this backend's, the
    // 40 left shared out (10 each).
    assert_eq!(consume(&mut client, 60), (true, 60));
    assert_eq!(books(&mut client, &org, 100), (60, 60, 60, 100, 4));
    // No slice has 30 of room: the rebalancing finds it in all of them.
    assert_eq!(consume(&mut client, 30), (true, 90));
    assert_eq!(consume(&mut client, 11), (false, 90));
    assert_eq!(consume(&mut client, 10), (true, 100));
    assert_eq!(consume(&mut client, 1), (false, 100));
    assert_eq!(books(&mut client, &org, 100), (100, 100, 100, 100, 4));
    // A reservation settled for less gives the rest back, into the slices.
    let mut limit_raised = session_on(connect(), &org);
    limit_raised
        .batch_execute(
            r#"SELECT flagship.put_plan('shop', '{"key": "pro", "limits": {"calls": {"limit": 200}}}')"#,
        )
        .unwrap();
    let reservation = text(
        &mut client,
        "SELECT flagship.reserve_usage('acme', 'calls', 50) ->> 'reservation_id'",
    );
    assert_eq!(books(&mut client, &org, 200).0, 150);
    text(
        &mut client,
        &format!("SELECT flagship.finalize_usage('{reservation}', 20)::text"),
    );
    let (used, slices_sum, ledger_sum, caps, _) = books(&mut client, &org, 200);
    assert_eq!((used, slices_sum, ledger_sum, caps), (120, 120, 120, 200));
}

/// A limit that was soft (or absent) for a while, then hard again: the
/// caps split before it are void (found by review: a slice kept its old
/// cap while another went far past the limit, and granted it again).
#[test]
fn a_limit_soft_for_a_while_voids_the_caps() {
    let mut su = connect();
    let org = sliced_customer(&mut su, "escrow-soft", 100, 2);
    let mut client = session_on(connect(), &org);
    let allowed = |client: &mut postgres::Client, amount: i64| -> String {
        text(
            client,
            &format!("SELECT flagship.record_usage('acme', 'calls', {amount}) ->> 'allowed'"),
        )
    };
    let plan = |client: &mut postgres::Client, enforcement: &str| {
        client
            .batch_execute(&format!(
                r#"SELECT flagship.put_plan('shop', '{{"key": "pro", "limits": {{"calls":
                       {{"limit": 100, "enforcement": "{enforcement}"}}}}}}')"#
            ))
            .unwrap();
    };
    assert_eq!(allowed(&mut client, 10), "true");
    plan(&mut client, "soft");
    for _ in 0..4 {
        assert_eq!(allowed(&mut client, 50), "true");
    }
    plan(&mut client, "hard");
    assert_eq!(allowed(&mut client, 1), "false");
    let (used, slices_sum, ledger_sum, _, _) = books(&mut client, &org, 100);
    assert_eq!((used, slices_sum, ledger_sum), (210, 210, 210));
}

/// An error while a consumption waits for its slice (here a lock timeout)
/// fails that statement only: in autocommit the session goes on (found by
/// review: the subtransaction around the attempt stayed open, and every
/// later command answered 25P02).
#[test]
fn an_error_inside_a_consumption_leaves_the_session_usable() {
    let mut su = connect();
    let org = sliced_customer(&mut su, "escrow-error", 1000, 2);
    let mut client = session_on(connect(), &org);
    assert_eq!(
        text(
            &mut client,
            "SELECT flagship.record_usage('acme', 'calls') ->> 'allowed'"
        ),
        "true"
    );
    let mut holder = connect();
    holder
        .batch_execute(&format!(
            "BEGIN; SELECT slice FROM flagship.usage_counters
              WHERE organization_id = '{org}' FOR UPDATE"
        ))
        .unwrap();
    client.batch_execute("SET lock_timeout = '100ms'").unwrap();
    let error = client
        .batch_execute("SELECT flagship.record_usage('acme', 'calls')")
        .unwrap_err();
    assert_eq!(
        error.code().map(|code| code.code()),
        Some("55P03"),
        "{error}"
    );
    holder.batch_execute("ROLLBACK").unwrap();
    client.batch_execute("RESET lock_timeout").unwrap();
    assert_eq!(
        text(
            &mut client,
            "SELECT flagship.record_usage('acme', 'calls') ->> 'used'"
        ),
        "2"
    );
}

/// The split raised from 2 to 8 while 8 sessions consume close to the
/// limit: consumers that read either split agree on the books.
#[test]
fn raising_the_split_while_hot_keeps_the_books() {
    let mut su = connect();
    let org = sliced_customer(&mut su, "escrow-raise", 3000, 2);
    let stop = consume_until_stopped(&org, 3);
    let mut admin = session_on(connect(), &org);
    while books(&mut admin, &org, 0).1 < 1500 {
        thread::sleep(std::time::Duration::from_millis(5));
    }
    admin
        .batch_execute(r#"SELECT flagship.put_metric('shop', '{"key": "calls", "slices": 8}')"#)
        .unwrap();
    while books(&mut admin, &org, 3000).1 < 2998 {
        thread::sleep(std::time::Duration::from_millis(10));
    }
    stop();
    let (used, slices_sum, ledger_sum, caps, rows) = books(&mut admin, &org, 3000);
    assert_eq!((slices_sum, ledger_sum, caps, rows), (used, used, 3000, 8));
    assert!((2998..=3000).contains(&used), "{used}");
}

/// Sliced counters as the application uses them: non-superuser login
/// roles of two organizations, each consuming (and rebalancing) its own
/// slices only; the rebalancing is not a way around record_usage; a role
/// with no FlagShip role reaches none of it.
#[test]
fn slices_under_application_roles_of_two_organizations() {
    let mut su = connect();
    let org_a = sliced_customer(&mut su, "escrow-app-a", 10, 2);
    let org_b = sliced_customer(&mut su, "escrow-app-b", 10, 2);
    let mut app_a = app_session(&mut su, &org_a, "escrow_app_a");
    let mut app_b = app_session(&mut su, &org_b, "escrow_app_b");
    let consume = |client: &mut postgres::Client, amount: i64| -> String {
        text(
            client,
            &format!("SELECT flagship.record_usage('acme', 'calls', {amount}) ->> 'allowed'"),
        )
    };
    assert_eq!(consume(&mut app_a, 6), "true");
    assert_eq!(consume(&mut app_a, 4), "true");
    assert_eq!(consume(&mut app_a, 1), "false");
    assert_eq!(consume(&mut app_b, 3), "true");
    assert_eq!(
        text(
            &mut app_b,
            "SELECT flagship.check_usage_limit('acme', 'calls') ->> 'used'"
        ),
        "3"
    );
    assert_eq!(
        text(
            &mut app_a,
            "SELECT count(*)::text || ' ' || sum(used)::text FROM flagship.usage_counters"
        ),
        "2 10"
    );
    let counter = text(
        &mut app_a,
        "SELECT format('%L::uuid, %L::uuid, %L::uuid, %L::timestamptz', organization_id,
                       customer_id, metric_id, period_start)
           FROM flagship.usage_counters LIMIT 1",
    );
    assert_eq!(
        sqlstate(
            &mut app_a,
            &format!("SELECT flagship.rebalance_slices({counter}, 5, NULL, 2, 0)")
        ),
        "42501"
    );
    let (_, mut nobody) = login_as(&mut su, "escrow_nobody", &[]);
    assert_eq!(
        sqlstate(
            &mut nobody,
            "SELECT flagship.record_usage('acme', 'calls', 1, NULL, 'shop/production')"
        ),
        "42501"
    );
    assert_eq!(
        sqlstate(
            &mut nobody,
            &format!("SELECT flagship.rebalance_slices({counter}, 5, NULL, 2, 0)")
        ),
        "42501"
    );
}

/// The limit lowered while 8 sessions consume: once the change commits, the
/// counter stops at the new limit (the transactions already past their
/// check when it committed may finish: one each at most).
#[test]
fn lowering_the_limit_while_hot_holds() {
    let mut su = connect();
    let org = sliced_customer(&mut su, "escrow-lower", 1_000_000, 8);
    let stop = consume_until_stopped(&org, 1);
    let mut admin = session_on(connect(), &org);
    while books(&mut admin, &org, 0).1 < 500 {
        thread::sleep(std::time::Duration::from_millis(10));
    }
    admin
        .batch_execute(
            r#"SELECT flagship.put_plan('shop', '{"key": "pro", "limits": {"calls": {"limit": 1500}}}')"#,
        )
        .unwrap();
    // Long enough for the counter to reach the new limit many times over.
    while books(&mut admin, &org, 1500).1 < 1500 {
        thread::sleep(std::time::Duration::from_millis(10));
    }
    thread::sleep(std::time::Duration::from_millis(300));
    stop();
    let (used, slices_sum, ledger_sum, _, _) = books(&mut admin, &org, 1500);
    assert_eq!((slices_sum, ledger_sum), (used, used));
    assert!((1500..=1508).contains(&used), "{used}");
    assert_eq!(
        text(
            &mut admin,
            "SELECT flagship.record_usage('acme', 'calls', 1) ->> 'allowed'"
        ),
        "false"
    );
}

/// A sliced metric's document: what may be split, into how many, and no
/// way back to one row (the counters of running periods would have to be
/// merged under their consumers).
#[test]
fn slices_are_a_checked_metric_setting() {
    let mut su = connect();
    let org = sliced_customer(&mut su, "escrow-settings", 10, 8);
    let mut client = session_on(connect(), &org);
    for (document, expected) in [
        (
            r#"{"key": "calls", "slices": 0}"#,
            "slices: must be a whole number from 1 to 64",
        ),
        (
            r#"{"key": "calls", "slices": 65}"#,
            "slices: must be a whole number from 1 to 64",
        ),
        (
            r#"{"key": "calls", "slices": 2.5}"#,
            "slices: must be a whole number from 1 to 64",
        ),
        (
            r#"{"key": "calls", "slices": "8"}"#,
            "slices: must be a whole number from 1 to 64",
        ),
        (
            r#"{"key": "seats", "aggregation": "gauge", "slices": 2}"#,
            "slices: only a sum can be split",
        ),
        (
            r#"{"key": "calls", "slices": 1}"#,
            "slices: a sliced metric keeps at least 2 slices",
        ),
    ] {
        let error = client
            .batch_execute(&format!("SELECT flagship.put_metric('shop', '{document}')"))
            .unwrap_err();
        let error = error.as_db_error().unwrap();
        assert_eq!(error.code().code(), "22023", "{document}");
        assert!(
            error.message().contains(expected),
            "{document}: {}",
            error.message()
        );
        assert!(
            error.message().starts_with("metric \""),
            "{}",
            error.message()
        );
    }
    // A document without "slices" (an export from before) keeps the split.
    assert_eq!(
        sqlstate(
            &mut client,
            r#"SELECT flagship.put_metric('shop', '{"key": "calls", "name": "Calls"}')"#
        ),
        "none"
    );
    assert_eq!(
        text(
            &mut client,
            "SELECT flagship.export_project('shop') -> 'metrics' -> 0 ->> 'slices'"
        ),
        "8"
    );
    assert_eq!(
        sqlstate(
            &mut client,
            r#"SELECT flagship.put_metric('shop', '{"key": "calls", "slices": 2}')"#
        ),
        "none"
    );
    assert_eq!(
        text(
            &mut client,
            "SELECT flagship.export_project('shop') -> 'metrics' -> 0 ->> 'slices'"
        ),
        "2"
    );
}

/// Acknowledged consumptions survive a backend killed with SIGKILL (the
/// server restarts and recovers) and an immediate stop; after each, the
/// slices sum to the ledger and stay within the limit.
#[test]
fn crashes_in_the_middle_of_a_hot_run_keep_the_books() {
    let server = ThrowawayServer::start("escrow-crash", "");
    let mut setup = server.connect("postgres");
    setup
        .batch_execute(
            "CREATE EXTENSION flagship;
             SELECT flagship.create_project(flagship.create_organization('crash', 'Crash'), 'shop', 'Shop');",
        )
        .unwrap();
    let org = text(&mut setup, "SELECT id::text FROM flagship.organizations");
    // Far enough that the counter does not fill up before the crashes.
    setup_sliced(&mut setup, &org, 10_000_000, 8);
    let address = server.address("postgres");
    for (round, crash) in ["kill -9 of a backend", "pg_ctl stop -m immediate"]
        .iter()
        .enumerate()
    {
        let stop = Arc::new(AtomicBool::new(false));
        let workers: Vec<_> = (0..8)
            .map(|worker| {
                let org = org.clone();
                let stop = Arc::clone(&stop);
                let address = address.clone();
                thread::spawn(move || {
                    let connection = postgres::Client::connect(&address, postgres::NoTls).unwrap();
                    let mut client = session_on(connection, &org);
                    let mut acknowledged = Vec::new();
                    let mut attempt = 0;
                    while !stop.load(Ordering::Relaxed) {
                        attempt += 1;
                        let key = format!("r{round}-w{worker}-{attempt}");
                        match client.query_one(
                            "SELECT (flagship.record_usage('acme', 'calls', 1, $1) ->> 'allowed')::boolean",
                            &[&key],
                        ) {
                            Ok(row) if row.get::<_, bool>(0) => acknowledged.push(key),
                            Ok(_) => {}
                            Err(_) => break,
                        }
                    }
                    acknowledged
                })
            })
            .collect();
        thread::sleep(std::time::Duration::from_millis(800));
        let mut watcher = server.connect("postgres");
        if round == 0 {
            let victim: i32 = watcher
                .query_one(
                    "SELECT pid FROM pg_stat_activity WHERE query LIKE '%record_usage%'
                       AND pid <> pg_backend_pid() LIMIT 1",
                    &[],
                )
                .unwrap()
                .get(0);
            let killed = std::process::Command::new("kill")
                .args(["-9", &victim.to_string()])
                .status()
                .unwrap();
            assert!(killed.success(), "{crash}");
            // The postmaster answers the kill by ending every session and
            // restarting; a session opened before it gets there is ended
            // too. Until then the victim's entry stays in shared memory.
            let restarted = (0..300).any(|_| {
                std::thread::sleep(std::time::Duration::from_millis(100));
                server
                    .try_connect("postgres")
                    .and_then(|mut client| {
                        client.query_one(
                            "SELECT count(*) = 0 FROM pg_stat_activity WHERE pid = $1",
                            &[&victim],
                        )
                    })
                    .is_ok_and(|row| row.get::<_, bool>(0))
            });
            assert!(restarted, "{crash}: the server did not restart within 30 s");
        } else {
            server.pg_ctl_stop("immediate");
            server.pg_ctl_start();
        }
        drop(watcher);
        stop.store(true, Ordering::Relaxed);
        let acknowledged: Vec<String> = workers
            .into_iter()
            .flat_map(|worker| worker.join().unwrap())
            .collect();
        let mut after = session_on(server.reconnect("postgres"), &org);
        let (used, slices_sum, ledger_sum, caps, _) = books(&mut after, &org, 10_000_000);
        assert_eq!((slices_sum, ledger_sum), (used, used), "{crash}");
        assert!(
            used <= 10_000_000 && caps <= 10_000_000,
            "{crash}: used {used}, caps {caps}"
        );
        let found: i64 = after
            .query_one(
                "SELECT count(*) FROM flagship.usage_ledger WHERE idempotency_key = ANY($1)",
                &[&acknowledged],
            )
            .unwrap()
            .get(0);
        assert_eq!(
            found,
            acknowledged.len() as i64,
            "{crash}: acknowledged and lost"
        );
        assert!(
            !acknowledged.is_empty(),
            "{crash}: nothing ran before the crash"
        );
    }
}
