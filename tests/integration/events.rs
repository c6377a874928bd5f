//! The event store (#19, DESIGN.md section 8): conditional appends racing
//! in several sessions, gap-free polling, isolation.

use std::sync::{Arc, Barrier};
use std::time::Duration;

use postgres::fallible_iterator::FallibleIterator;
use postgres::Client;
use serde_json::{json, Value};

use crate::harness::{connect, login_as, organization, sqlstate, text};

fn app(su: &mut Client, org: &str, prefix: &str) -> Client {
    let (_, mut app) = login_as(su, prefix, &["flagship_app"]);
    app.batch_execute(&format!("SET flagship.organization_id = '{org}'"))
        .unwrap();
    app
}

/// The last position of events tagged `tag` (0: none).
fn last_position(client: &mut Client, tag: &str) -> i64 {
    text(
        client,
        &format!(
            r#"SELECT coalesce((SELECT (e ->> 'position') FROM flagship.read_events(
                   '{{"items": [{{"tags": ["{tag}"]}}]}}', '{{"backwards": true, "limit": 1}}') e), '0')"#
        ),
    )
    .parse()
    .unwrap()
}

/// Appends one event tagged `tag` unless another appeared after `after`:
/// Ok(position) or Err(SQLSTATE).
fn append_unless(client: &mut Client, tag: &str, after: i64) -> Result<i64, String> {
    client
        .query_one(
            "SELECT (flagship.append_events($1::text::jsonb, $2::text::jsonb) ->> 'last_position')::bigint",
            &[
                &json!([{"type": "Deposited", "tags": [tag], "data": {"amount": 1}}]).to_string(),
                &json!({"fail_if_events_match": {"items": [{"tags": [tag]}]}, "after": after})
                    .to_string(),
            ],
        )
        .map(|row| row.get::<_, i64>(0))
        .map_err(|error| error.code().map(|code| code.code().to_string()).unwrap_or_default())
}

/// Rounds of 8 sessions that each read the stream's last position and then
/// append on condition that nothing appeared after it. `tag` gives each
/// session's stream: the same for all (one winner a round) or its own.
fn race(
    rounds: usize,
    tag: impl Fn(usize) -> String + Send + Sync + 'static,
) -> Vec<Vec<Result<i64, String>>> {
    let mut su = connect();
    let (org, _) = organization(&mut su, "events-race");
    let sessions: Vec<Client> = (0..8)
        .map(|i| app(&mut su, &org, &format!("events-racer-{i}")))
        .collect();
    let barrier = Arc::new(Barrier::new(8));
    let tag = Arc::new(tag);
    let racers: Vec<_> = sessions
        .into_iter()
        .enumerate()
        .map(|(i, mut session)| {
            let barrier = barrier.clone();
            let tag = tag.clone();
            std::thread::spawn(move || {
                (0..rounds)
                    .map(|_| {
                        let tag = tag(i);
                        barrier.wait();
                        let after = last_position(&mut session, &tag);
                        // Everyone has decided before anyone appends.
                        barrier.wait();
                        append_unless(&mut session, &tag, after)
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let results: Vec<Vec<Result<i64, String>>> = racers
        .into_iter()
        .map(|racer| racer.join().unwrap())
        .collect();
    // Transposed: one vector per round.
    (0..rounds)
        .map(|round| {
            results
                .iter()
                .map(|session| session[round].clone())
                .collect()
        })
        .collect()
}

#[test]
fn exactly_one_of_eight_racing_conditional_appends_commits_each_round() {
    let rounds = race(50, |_| "account:1".to_string());
    for (round, results) in rounds.iter().enumerate() {
        let winners = results.iter().filter(|result| result.is_ok()).count();
        assert_eq!(winners, 1, "round {round}: {results:?}");
        for result in results.iter().filter(|result| result.is_err()) {
            assert_eq!(result, &Err("40F01".to_string()), "round {round}");
        }
    }
    // The winners' positions are 1..=50, one per round.
    let mut positions: Vec<i64> = rounds
        .iter()
        .flat_map(|results| results.iter().filter_map(|result| result.clone().ok()))
        .collect();
    positions.sort();
    assert_eq!(positions, (1..=50).collect::<Vec<i64>>());
}

#[test]
fn racing_appends_with_disjoint_tags_all_commit() {
    let rounds = race(20, |session| format!("account:{session}"));
    for (round, results) in rounds.iter().enumerate() {
        assert!(
            results.iter().all(Result::is_ok),
            "round {round}: {results:?}"
        );
    }
}

#[test]
fn a_poller_misses_no_event_that_commits_later() {
    let mut su = connect();
    let (org, _) = organization(&mut su, "events-poll");
    let writers: Vec<_> = (0..8)
        .map(|i| {
            let mut session = app(&mut su, &org, &format!("events-writer-{i}"));
            std::thread::spawn(move || {
                for n in 0..40 {
                    // Batches of one to three events, some transactions
                    // slower than others.
                    let events: Vec<Value> = (0..1 + n % 3)
                        .map(|k| json!({"type": "Ticked", "tags": [format!("writer:{i}")], "data": {"n": n, "k": k}}))
                        .collect();
                    let mut transaction = session.transaction().unwrap();
                    transaction
                        .execute(
                            "SELECT flagship.append_events($1::text::jsonb)",
                            &[&Value::Array(events).to_string()],
                        )
                        .unwrap();
                    if n % 7 == 0 {
                        std::thread::sleep(Duration::from_millis(3));
                    }
                    transaction.commit().unwrap();
                }
            })
        })
        .collect();
    let mut poller = app(&mut su, &org, "events-poller");
    let mut seen: Vec<i64> = Vec::new();
    let mut last = 0i64;
    let poll = |poller: &mut Client, last: i64| -> Vec<i64> {
        poller
            .query(
                "SELECT (e ->> 'position')::bigint FROM flagship.read_events('{\"items\": []}',
                        jsonb_build_object('from', $1::bigint + 1)) e",
                &[&last],
            )
            .unwrap()
            .iter()
            .map(|row| row.get(0))
            .collect()
    };
    while writers.iter().any(|writer| !writer.is_finished()) {
        let batch = poll(&mut poller, last);
        if let Some(&newest) = batch.last() {
            last = newest;
        }
        seen.extend(batch);
    }
    for writer in writers {
        writer.join().unwrap();
    }
    seen.extend(poll(&mut poller, last));
    let total: i64 = text(&mut poller, "SELECT count(*)::text FROM flagship.events")
        .parse()
        .unwrap();
    // 8 writers x (14 x 1 + 13 x 2 + 13 x 3) events.
    assert_eq!(total, 8 * (14 + 26 + 39));
    assert_eq!(
        seen,
        (1..=total).collect::<Vec<i64>>(),
        "the poller missed or repeated events"
    );
}

/// The "position 2 visible while 1 in flight" case: a conditional append
/// that waits for another append to the same organization decides after
/// that append has committed, and sees it.
#[test]
fn a_condition_sees_an_append_that_committed_while_it_waited() {
    let mut su = connect();
    let (org, _) = organization(&mut su, "events-wait");
    let mut first = app(&mut su, &org, "events-first");
    let mut second = app(&mut su, &org, "events-second");
    first.batch_execute("BEGIN").unwrap();
    first
        .batch_execute(
            r#"SELECT flagship.append_events('[{"type": "Reserved", "tags": ["seat:7"]}]')"#,
        )
        .unwrap();
    let waiting = std::thread::spawn(move || {
        let result = append_unless(&mut second, "seat:7", 0);
        (second, result)
    });
    std::thread::sleep(Duration::from_millis(300));
    assert!(!waiting.is_finished(), "the second append did not wait");
    first.batch_execute("COMMIT").unwrap();
    let (mut second, result) = waiting.join().unwrap();
    assert_eq!(result, Err("40F01".to_string()));
    // A conditional append under REPEATABLE READ is refused, not answered
    // from an old snapshot.
    second
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        .unwrap();
    assert_eq!(
        append_unless(&mut second, "seat:8", 1),
        Err("25000".to_string())
    );
    second.batch_execute("ROLLBACK").unwrap();
}

#[test]
fn events_are_the_organizations_alone_and_bad_input_is_named() {
    let mut su = connect();
    let (a, _) = organization(&mut su, "events-a");
    let (b, _) = organization(&mut su, "events-b");
    let mut in_a = app(&mut su, &a, "events-a-app");
    let mut in_b = app(&mut su, &b, "events-b-app");
    let appended = text(
        &mut in_a,
        r#"SELECT flagship.append_events('[{"type": "OrderPlaced", "tags": ["order:1", "customer:acme"],
               "data": {"total": 12.5}, "metadata": {"correlation_id": "c-1"}},
             {"type": "OrderPaid", "tags": ["order:1"]}]')::text"#,
    );
    assert_eq!(
        serde_json::from_str::<Value>(&appended).unwrap(),
        json!({"first_position": 1, "last_position": 2})
    );
    // Positions are per organization.
    assert_eq!(
        text(
            &mut in_b,
            r#"SELECT flagship.append_events('[{"type": "OrderPlaced"}]') ->> 'first_position'"#
        ),
        "1"
    );
    let read: Vec<Value> = in_a
        .query(
            r#"SELECT e::text FROM flagship.read_events('{"items": [{"types": ["OrderPlaced"], "tags": ["customer:acme"]}]}') e"#,
            &[],
        )
        .unwrap()
        .iter()
        .map(|row| {
            let mut event: Value = serde_json::from_str(row.get::<_, &str>(0)).unwrap();
            event.as_object_mut().unwrap().remove("recorded_at");
            event
        })
        .collect();
    assert_eq!(
        read,
        [
            json!({"position": 1, "type": "OrderPlaced", "tags": ["order:1", "customer:acme"],
                "data": {"total": 12.5}, "metadata": {"correlation_id": "c-1"}})
        ]
    );
    assert_eq!(
        text(
            &mut in_b,
            "SELECT count(*)::text FROM flagship.read_events()"
        ),
        "1"
    );
    // No update, no delete, no direct insert.
    for sql in [
        "UPDATE flagship.events SET type = 'x'",
        "DELETE FROM flagship.events",
        "INSERT INTO flagship.events (organization_id, position, type) VALUES (flagship.current_organization_id(), 99, 'x')",
    ] {
        assert_eq!(sqlstate(&mut in_a, sql), "42501", "{sql}");
    }
    for sql in [
        "SELECT flagship.append_events('[]')",
        r#"SELECT flagship.append_events('[{"tags": ["x"]}]')"#,
        r#"SELECT flagship.append_events('[{"type": "T", "tags": "x"}]')"#,
        r#"SELECT flagship.append_events('[{"type": "T"}]', '{"fail_if_events_match": {}}')"#,
        r#"SELECT flagship.append_events('[{"type": "T"}]', '{"fail_if_events_match": {"items": []}, "after": -1}')"#,
        r#"SELECT * FROM flagship.read_events('{"items": [{"kinds": []}]}')"#,
    ] {
        assert_eq!(sqlstate(&mut in_a, sql), "22023", "{sql}");
    }
    // A session without an organization cannot append.
    let (_, mut stranger) = login_as(&mut su, "events-stranger", &["flagship_app"]);
    assert_eq!(
        sqlstate(
            &mut stranger,
            r#"SELECT flagship.append_events('[{"type": "T"}]')"#
        ),
        "42501"
    );
}

/// Appends notify `flagship_events` with an empty payload (any role may
/// listen: nothing of the organization is in it); a suspended organization
/// appends nothing.
#[test]
fn appends_notify_without_a_payload_and_suspended_organizations_cannot_append() {
    let mut su = connect();
    let (org, _) = organization(&mut su, "events-notify");
    let (_, mut stranger) = login_as(&mut su, "events-listener", &[]);
    stranger.batch_execute("LISTEN flagship_events").unwrap();
    let mut writer = app(&mut su, &org, "events-notify-app");
    writer
        .batch_execute(r#"SELECT flagship.append_events('[{"type": "T", "tags": ["secret:1"]}]')"#)
        .unwrap();
    let payloads: Vec<String> = stranger
        .notifications()
        .timeout_iter(Duration::from_secs(1))
        .map(|notification| Ok(notification.payload().to_string()))
        .collect()
        .unwrap();
    // Other tests append at the same time: every payload is empty.
    assert!(
        !payloads.is_empty() && payloads.iter().all(String::is_empty),
        "{payloads:?}"
    );
    su.batch_execute(&format!(
        "UPDATE flagship.organizations SET status = 'suspended' WHERE id = '{org}'"
    ))
    .unwrap();
    assert_eq!(
        sqlstate(
            &mut writer,
            r#"SELECT flagship.append_events('[{"type": "T"}]')"#
        ),
        "42501"
    );
}
