//! pg_dump and pg_restore keep every configuration row: a restored database
//! exports the same project and answers the same evaluations.

use std::process::Command;

use crate::harness::{connect, organization, put_flag, text, unique};

fn evaluations(client: &mut postgres::Client, slug: &str) -> String {
    text(
        client,
        &format!(
            "SELECT string_agg(flagship.flagship_evaluate(f, jsonb_build_object('targeting_key', 'u-' || i), \
                 '{slug}/shop/production')::text, ';' ORDER BY f, i) \
             FROM generate_series(1, 100) i, unnest(ARRAY['base', 'exp']) f"
        ),
    )
}

#[test]
fn dump_and_restore_keep_rows_and_evaluations() {
    let mut su = connect();
    let (org, slug) = organization(&mut su, "dump");
    su.batch_execute(&format!(
        "SET flagship.organization_id = '{org}';
         SELECT flagship.put_segment('shop', '{{\"key\": \"beta\", \"included\": [\"u-1\"]}}');"
    ))
    .unwrap();
    put_flag(
        &mut su,
        &org,
        r#"{"key": "base", "environments": {"production": {"enabled": true}}}"#,
    );
    put_flag(
        &mut su,
        &org,
        r#"{"key": "exp", "kind": "multivariate", "variants": {"a": 1, "b": 2, "c": 3}, "off_variant": "a",
            "prerequisites": [{"flag": "base"}],
            "environments": {"production": {"enabled": true,
               "rules": [{"id": "beta", "segment": "beta", "serve": {"variant": "c"}}],
               "default": {"rollout": {"a": 20, "b": 30, "c": 50}}}}}"#,
    );
    // Update the prerequisite after its dependant, so its row moves behind.
    put_flag(
        &mut su,
        &org,
        r#"{"key": "base", "name": "Base", "environments": {"production": {"enabled": true}}}"#,
    );
    let exported = text(&mut su, "SELECT flagship.export_project('shop')::text");
    let before = evaluations(&mut su, &slug);

    let host = text(&mut su, "SELECT current_setting('unix_socket_directories')");
    let port = text(&mut su, "SELECT current_setting('port')");
    let user = text(&mut su, "SELECT current_user::text");
    let source = text(&mut su, "SELECT current_database()::text");
    // The server's own binaries, whatever is first on PATH.
    let bindir = text(
        &mut su,
        "SELECT setting FROM pg_config WHERE name = 'BINDIR'",
    );
    let target = unique("restored").replace('-', "_");
    let dump = std::env::temp_dir().join(format!("{target}.dump"));

    let status = Command::new(format!("{bindir}/pg_dump"))
        .args(["-h", &host, "-p", &port, "-U", &user, "-Fc", "-f"])
        .arg(&dump)
        .arg(&source)
        .status()
        .unwrap();
    assert!(status.success(), "pg_dump failed");
    su.batch_execute(&format!("CREATE DATABASE {target}"))
        .unwrap();
    let output = Command::new(format!("{bindir}/pg_restore"))
        .args([
            "-h",
            &host,
            "-p",
            &port,
            "-U",
            &user,
            "--exit-on-error",
            "-d",
            &target,
        ])
        .arg(&dump)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "pg_restore failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let _ = std::fs::remove_file(&dump);

    let mut restored = postgres::Config::new()
        .host(&host)
        .port(port.parse().unwrap())
        .user(&user)
        .dbname(&target)
        .connect(postgres::NoTls)
        .unwrap();
    restored
        .batch_execute(&format!("SET flagship.organization_id = '{org}'"))
        .unwrap();
    assert_eq!(
        text(
            &mut restored,
            "SELECT flagship.export_project('shop')::text"
        ),
        exported
    );
    assert_eq!(evaluations(&mut restored, &slug), before);
    drop(restored);
    su.batch_execute(&format!("DROP DATABASE {target}"))
        .unwrap();
}
