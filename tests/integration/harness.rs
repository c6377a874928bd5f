//! Starts (once per test binary) the PostgreSQL server of pgrx's test
//! framework and hands out fresh connections to it.

use std::sync::Once;

use postgres::Client;

static SERVER: Once = Once::new();

/// A new connection, as the cluster's superuser, to the test database.
pub fn connect() -> Client {
    SERVER.call_once(|| {
        // Running any #[pg_test] installs the extension, starts the server
        // and creates the database; this one has no side effects.
        pgrx_tests::run_test(
            "bucket_function_matches_the_published_vectors",
            None,
            // As in the pg_test module: rate limits need shared memory;
            // a small table, so a test can fill it.
            vec![
                "shared_preload_libraries = 'flagship'",
                "flagship.rate_limit_windows = 1024",
            ],
        )
        .expect("starting the test server");
    });
    let (client, _session) = pgrx_tests::client().expect("connecting to the test server");
    client
}

/// A name no other test (or earlier run against the same server) uses.
pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Creates an organization with a project `shop` (development, staging,
/// production) and returns its id and slug.
pub fn organization(client: &mut Client, prefix: &str) -> (String, String) {
    let slug = unique(prefix);
    let id: String = client
        .query_one(
            "SELECT flagship.create_organization($1, $1)::text",
            &[&slug],
        )
        .unwrap()
        .get(0);
    client
        .execute(
            "SELECT flagship.create_project($1::text::uuid, 'shop', 'Shop')",
            &[&id],
        )
        .unwrap();
    (id, slug)
}

/// A new NOLOGIN role, member of `group` (or of nothing), that this
/// connection's superuser may `SET ROLE` to.
pub fn role_in(client: &mut Client, prefix: &str, group: Option<&str>) -> String {
    let role = unique(prefix).replace('-', "_");
    let membership = group.map_or(String::new(), |group| format!(" IN ROLE {group}"));
    client
        .batch_execute(&format!(
            "CREATE ROLE {role} NOLOGIN{membership}; GRANT {role} TO CURRENT_USER"
        ))
        .unwrap();
    role
}

/// Makes `user` a member of the organization holding its built-in `role`.
pub fn add_member(client: &mut Client, organization: &str, user: &str, role: &str) {
    client
        .batch_execute(&format!(
            "INSERT INTO flagship.members (organization_id, user_key) VALUES ('{organization}', '{user}');
             INSERT INTO flagship.member_roles (organization_id, member_id, role_id)
             SELECT m.organization_id, m.id, r.id FROM flagship.members m
               JOIN flagship.roles r ON r.organization_id = m.organization_id AND r.key = '{role}'
              WHERE m.organization_id = '{organization}' AND m.user_key = '{user}';"
        ))
        .unwrap();
}

pub fn put_flag(client: &mut Client, organization: &str, document: &str) {
    client
        .batch_execute(&format!(
            "SET flagship.organization_id = '{organization}'; \
             SELECT flagship.put_flag('shop', $doc${document}$doc$)"
        ))
        .unwrap();
}

pub fn text(client: &mut Client, sql: &str) -> String {
    client
        .query_one(sql, &[])
        .unwrap()
        .get::<_, Option<String>>(0)
        .unwrap_or_default()
}

/// The SQLSTATE a statement fails with, or "none". Inside a transaction
/// the statement runs in a savepoint that is rolled back; outside one it
/// runs (and, if it succeeds, commits) on its own.
pub fn sqlstate(client: &mut Client, sql: &str) -> String {
    let in_transaction = match client.batch_execute("SAVEPOINT probe") {
        Ok(()) => true,
        Err(error) if error.code().map(|code| code.code()) == Some("25P01") => false,
        Err(error) => panic!("SAVEPOINT probe: {error}"),
    };
    let outcome = match client.batch_execute(sql) {
        Ok(()) => "none".to_string(),
        Err(error) => {
            // Shown only when a test fails: what the server said, in full.
            eprintln!("{sql}: {error:?}");
            error
                .code()
                .map(|code| code.code().to_string())
                .unwrap_or_else(|| format!("no sqlstate: {error}"))
        }
    };
    if in_transaction {
        client.batch_execute("ROLLBACK TO SAVEPOINT probe").unwrap();
    }
    outcome
}

/// A new LOGIN role, member of `groups`, and a connection that logs in as
/// it: not a superuser, nothing granted but the groups.
pub fn login_as(su: &mut Client, prefix: &str, groups: &[&str]) -> (String, Client) {
    let role = unique(prefix).replace('-', "_");
    let membership = if groups.is_empty() {
        String::new()
    } else {
        format!(" IN ROLE {}", groups.join(", "))
    };
    su.batch_execute(&format!("CREATE ROLE {role} LOGIN{membership}"))
        .unwrap();
    let database = text(su, "SELECT current_database()::text");
    let client = connect_as(su, &role, &database);
    (role, client)
}

/// A new connection to `database` of the server `su` is connected to, as
/// `user` (the test server trusts local connections).
pub fn connect_as(su: &mut Client, user: &str, database: &str) -> Client {
    let host = text(su, "SELECT current_setting('unix_socket_directories')");
    let port = text(su, "SELECT current_setting('port')");
    postgres::Config::new()
        .host(host.split(',').next().unwrap().trim())
        .port(port.parse().unwrap())
        .user(user)
        .dbname(database)
        .connect(postgres::NoTls)
        .unwrap()
}

/// The jsonb `sql` evaluates to, parsed: for asserting whole answers.
pub fn answer(client: &mut Client, sql: &str) -> serde_json::Value {
    serde_json::from_str(&text(client, &format!("SELECT ({sql})::text"))).unwrap()
}

/// A `flagship_app` login session in `org`, environment shop/production.
pub fn app_session(su: &mut Client, org: &str, prefix: &str) -> Client {
    let (_, mut app) = login_as(su, prefix, &["flagship_app"]);
    app.batch_execute(&format!(
        "SET flagship.organization_id = '{org}'; SET flagship.environment = 'shop/production'"
    ))
    .unwrap();
    app
}

/// An organization (project shop) where bea@acme.example is an admin, and a
/// `flagship_admin` login session acting as her in it, environment
/// shop/production.
pub fn admin_session(su: &mut Client, prefix: &str) -> (String, Client) {
    let (org, _) = organization(su, prefix);
    add_member(su, &org, "bea@acme.example", "admin");
    let (_, mut admin) = login_as(su, prefix, &["flagship_admin"]);
    admin
        .batch_execute(&format!(
            "SET flagship.organization_id = '{org}'; SET flagship.actor = 'bea@acme.example';
             SET flagship.environment = 'shop/production'"
        ))
        .unwrap();
    (org, admin)
}

/// Every table of the schema that holds tenant rows, `organizations`
/// included: new tables join the matrices without anyone remembering.
pub fn all_tenant_tables(client: &mut Client) -> Vec<String> {
    client
        .query(include_str!("../fixtures/tenant_tables.sql"), &[])
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect()
}

/// The tables of the schema that hold tenant rows in an organization_id
/// (all but `organizations` itself).
pub fn tenant_tables(client: &mut Client) -> Vec<String> {
    all_tenant_tables(client)
        .into_iter()
        .filter(|table| table != "organizations")
        .collect()
}

/// A second server of the same installation, in a data directory of its
/// own, for what the shared test server must not go through: starting
/// without preloading, crashes. Stopped (immediately) and removed on drop.
pub struct ThrowawayServer {
    port: u16,
    bindir: String,
    data: std::path::PathBuf,
    options: String,
}

impl ThrowawayServer {
    /// initdb and start, with `options` given to the server (`-c name=value ...`).
    pub fn start(name: &str, options: &str) -> ThrowawayServer {
        let bindir = text(
            &mut connect(),
            "SELECT setting FROM pg_config WHERE name = 'BINDIR'",
        );
        // Apart for each test process and each name, so that tests running at
        // once do not meet on one port.
        let name_offset = name.bytes().map(u16::from).sum::<u16>() % 97;
        let port = 5600 + (std::process::id() % 200) as u16 + name_offset;
        let data = std::env::temp_dir().join(format!("flagship-{name}-{port}"));
        let _ = std::fs::remove_dir_all(&data);
        std::fs::create_dir_all(&data).unwrap();
        let server = ThrowawayServer {
            port,
            bindir,
            data,
            options: options.to_string(),
        };
        let initialized = server
            .command("initdb")
            .args(["-A", "trust", "-U", "postgres"])
            .output()
            .unwrap();
        assert!(initialized.status.success(), "{initialized:?}");
        server.pg_ctl_start();
        server
    }

    /// A program of the installation, run as the server's user: initdb
    /// refuses root, so as postgres when we are root.
    fn command(&self, program: &str) -> std::process::Command {
        use std::process::Command;
        let mut command = if Command::new("id").arg("-u").output().unwrap().stdout == b"0\n" {
            let _ = Command::new("chown")
                .arg("-R")
                .arg("postgres")
                .arg(&self.data)
                .status();
            let mut sudo = Command::new("sudo");
            sudo.args(["-u", "postgres", &format!("{}/{program}", self.bindir)]);
            sudo
        } else {
            Command::new(format!("{}/{program}", self.bindir))
        };
        command.arg("-D").arg(&self.data);
        command
    }

    pub fn pg_ctl_start(&self) {
        let started = self
            .command("pg_ctl")
            .args(["-w", "-l"])
            .arg(self.data.join("server.log"))
            .args([
                "-o",
                &format!(
                    "-p {} -k /tmp -c listen_addresses='' {}",
                    self.port, self.options
                ),
                "start",
            ])
            .output()
            .unwrap();
        assert!(started.status.success(), "{started:?}");
    }

    /// `pg_ctl stop -m <mode>` (`immediate`: no shutdown checkpoint, as a
    /// power cut leaves it).
    pub fn pg_ctl_stop(&self, mode: &str) {
        let _ = self
            .command("pg_ctl")
            .args(["-w", "-m", mode, "stop"])
            .output();
    }

    pub fn connect(&self, database: &str) -> Client {
        self.try_connect(database).unwrap()
    }

    /// Connects, waiting up to 30 s for the server to accept connections
    /// again (after a crash, the postmaster restarts and recovers).
    pub fn reconnect(&self, database: &str) -> Client {
        for _ in 0..300 {
            if let Ok(client) = self.try_connect(database) {
                return client;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        panic!("the server did not come back within 30 s");
    }

    /// The connection string of `database` on this server, for threads.
    pub fn address(&self, database: &str) -> String {
        format!(
            "host=/tmp port={} user=postgres dbname={database}",
            self.port
        )
    }

    /// A connection, or why there is none (the server may be restarting).
    pub fn try_connect(&self, database: &str) -> Result<Client, postgres::Error> {
        Client::connect(&self.address(database), postgres::NoTls)
    }
}

impl Drop for ThrowawayServer {
    fn drop(&mut self) {
        self.pg_ctl_stop("immediate");
        let _ = std::fs::remove_dir_all(&self.data);
    }
}
