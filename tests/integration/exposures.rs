//! Exposure counts from several sessions: evaluation counts in memory,
//! flushes from concurrent sessions add up, and an aborted flush gives its
//! counts back.

use postgres::Client;

use crate::harness::{connect, organization, role_in};

fn session(org: &str) -> Client {
    let mut client = connect();
    client
        .batch_execute(&format!(
            "SET flagship.organization_id = '{org}'; SET flagship.environment = 'shop/production';
             SET flagship.count_exposures = on"
        ))
        .unwrap();
    client
}

fn evaluate(client: &mut Client, times: i32) {
    client
        .execute(
            "SELECT count(*) FROM generate_series(1, $1) i
              WHERE flagship.flagship_enabled('exposed', jsonb_build_object('targeting_key', 'u' || i))",
            &[&times],
        )
        .unwrap();
}

fn flush(client: &mut Client) -> i64 {
    client
        .query_one("SELECT flagship.flush_exposures()", &[])
        .unwrap()
        .get(0)
}

#[test]
fn concurrent_flushes_add_up_and_an_aborted_flush_gives_counts_back() {
    let mut admin = connect();
    let (org, _) = organization(&mut admin, "exposures");
    admin
        .batch_execute(&format!(
            "SET flagship.organization_id = '{org}';
             SELECT flagship.put_flag('shop', '{{\"key\": \"exposed\", \"environments\": {{\"production\":
                {{\"enabled\": true, \"default\": {{\"rollout\": {{\"on\": 50, \"off\": 50}}}}}}}}}}')"
        ))
        .unwrap();

    let app = role_in(&mut admin, "exposure_app", Some("flagship_app"));
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let org = org.clone();
            let app = app.clone();
            std::thread::spawn(move || {
                let mut client = session(&org);
                // The application role flushes its own organization's counts.
                client.batch_execute(&format!("SET ROLE {app}")).unwrap();
                let mut flushed = 0;
                for _ in 0..5 {
                    evaluate(&mut client, 100);
                    flushed += flush(&mut client);
                }
                flushed
            })
        })
        .collect();
    let flushed: i64 = workers.into_iter().map(|w| w.join().unwrap()).sum();
    assert_eq!(flushed, 2_000);
    let stored: i64 = admin
        .query_one(
            "SELECT sum(evaluations)::bigint FROM flagship.flag_exposures
              WHERE organization_id = $1::text::uuid AND flag_key = 'exposed'",
            &[&org],
        )
        .unwrap()
        .get(0);
    assert_eq!(stored, 2_000);

    let mut client = session(&org);
    evaluate(&mut client, 7);
    client.batch_execute("BEGIN").unwrap();
    assert_eq!(flush(&mut client), 7);
    client.batch_execute("ROLLBACK").unwrap();
    let pending: i64 = client
        .query_one(
            "SELECT coalesce(sum(evaluations), 0)::bigint FROM flagship.pending_exposures()",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(pending, 7, "an aborted flush gives its counts back");
    assert_eq!(flush(&mut client), 7);
    let stored: i64 = admin
        .query_one(
            "SELECT sum(evaluations)::bigint FROM flagship.flag_exposures
              WHERE organization_id = $1::text::uuid",
            &[&org],
        )
        .unwrap()
        .get(0);
    assert_eq!(stored, 2_007);
}
