//! The session context: which organization, environment and actor a call
//! acts for, read from FlagShip's settings or from PostgREST/Supabase JWT
//! claims. Anything unset, empty or malformed means "no organization", which
//! RLS turns into "no rows" rather than an error.

use std::cell::{Cell, RefCell};
use std::ffi::CString;

use crate::postgres::{backend, callbacks, settings};
use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting};
use pgrx::prelude::*;

static ORGANIZATION_ID: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
static ENVIRONMENT: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
static ACTOR: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
static REQUIRE_KEY: GucSetting<bool> = GucSetting::<bool>::new(false);

/// What `flagship.authenticate` proved for the current transaction. Kept in
/// backend memory rather than a setting, so SQL cannot forge it, and
/// cleared when the transaction ends, so a pooled connection (PgBouncer in
/// transaction mode) never hands it to the next client.
#[derive(Debug, Clone)]
pub struct KeySession {
    pub key_id: pgrx::Uuid,
    pub organization: pgrx::Uuid,
    pub environment: Option<pgrx::Uuid>,
    pub scopes: Vec<String>,
    /// The customer (external key) the key belongs to, if any.
    pub customer: Option<String>,
}

/// The key session an `authenticate` replaced, and the subtransaction that
/// replaced it: rolling that subtransaction back restores it, as it rolls
/// back the table writes made there.
struct Replaced {
    in_subtransaction: pg_sys::SubTransactionId,
    previous: Option<KeySession>,
}

thread_local! {
    static KEY_SESSION: RefCell<Option<KeySession>> = const { RefCell::new(None) };
    static REPLACED: RefCell<Vec<Replaced>> = const { RefCell::new(Vec::new()) };
    /// How many of FlagShip's usage functions are running in this backend:
    /// while none is, row-level security refuses every write to the usage
    /// counters and ledger (`usage_writes_open`).
    static USAGE_WRITERS: Cell<u32> = const { Cell::new(0) };
}

pub fn key_session() -> Option<KeySession> {
    KEY_SESSION.with(|session| session.borrow().clone())
}

/// Makes `session` the transaction's key context, remembering what it
/// replaces until the current subtransaction ends.
fn replace_key_session(session: Option<KeySession>) {
    let in_subtransaction = backend::current_subtransaction_id();
    let previous = KEY_SESSION.with(|current| current.replace(session));
    REPLACED.with(|replaced| {
        replaced.borrow_mut().push(Replaced {
            in_subtransaction,
            previous,
        })
    });
}

fn clear_key_session() {
    KEY_SESSION.with(|current| current.replace(None));
    REPLACED.with(|replaced| replaced.borrow_mut().clear());
    USAGE_WRITERS.with(|writers| writers.set(0));
}

/// Open while FlagShip's own usage functions write counters and the ledger;
/// the tables' policies refuse every other write, so neither table grants
/// nor a forged idempotency key let an application edit consumption.
pub struct UsageWrites(());

impl UsageWrites {
    pub fn open() -> Self {
        USAGE_WRITERS.with(|writers| writers.set(writers.get() + 1));
        UsageWrites(())
    }
}

impl Drop for UsageWrites {
    fn drop(&mut self) {
        USAGE_WRITERS.with(|writers| writers.set(writers.get().saturating_sub(1)));
    }
}

/// Whether a usage function of FlagShip is writing (see `UsageWrites`):
/// the write policies of usage_counters and usage_ledger.
#[pg_extern(stable, parallel_restricted)]
pub fn usage_writes_open() -> bool {
    USAGE_WRITERS.with(|writers| writers.get() > 0)
}

/// Whether the transaction's API key, if any, grants `scope`
/// (`resource:action`): by that exact scope or by `resource:*`. A key
/// issued without scopes, and a session without a key, are not restricted.
pub fn scope_allows(scope: &str) -> bool {
    KEY_SESSION.with(|session| {
        let session = session.borrow();
        let Some(session) = session.as_ref() else {
            return true;
        };
        let resource = scope.split(':').next().unwrap_or(scope);
        session.scopes.is_empty()
            || session
                .scopes
                .iter()
                .any(|granted| granted == scope || granted.strip_suffix(":*") == Some(resource))
    })
}

/// Raises 42501 unless the transaction's API key grants `scope`.
pub fn require_scope(scope: &str) {
    if !scope_allows(scope) {
        crate::errors::raise(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!("this transaction's API key lacks the scope {scope}"),
            None,
        );
    }
}

/// The environment the session's API key is bound to, if any.
pub fn bound_environment() -> Option<pgrx::Uuid> {
    KEY_SESSION.with(|session| session.borrow().as_ref().and_then(|s| s.environment))
}

/// At transaction end: the key session lives as long as the transaction.
fn end_key_session(event: pg_sys::XactEvent::Type) {
    if ends_transaction(event) {
        clear_key_session();
    }
}

/// Whether a transaction callback's `event` ends the transaction (commit,
/// abort or prepare, of a backend or of a parallel worker): where state
/// that lives only as long as the transaction is let go.
pub fn ends_transaction(event: pg_sys::XactEvent::Type) -> bool {
    use pg_sys::XactEvent::*;
    matches!(
        event,
        XACT_EVENT_COMMIT
            | XACT_EVENT_ABORT
            | XACT_EVENT_PREPARE
            | XACT_EVENT_PARALLEL_COMMIT
            | XACT_EVENT_PARALLEL_ABORT
    )
}

/// When a subtransaction (a savepoint, a PL/pgSQL exception block) ends:
/// an authentication made inside one that rolls back is undone with it;
/// one that commits now belongs to the parent.
fn end_key_subtransaction(
    event: pg_sys::SubXactEvent::Type,
    subtransaction: pg_sys::SubTransactionId,
    parent: pg_sys::SubTransactionId,
) {
    use pg_sys::SubXactEvent::*;
    REPLACED.with(|replaced| {
        let mut replaced = replaced.borrow_mut();
        if event == SUBXACT_EVENT_ABORT_SUB {
            while replaced
                .last()
                .is_some_and(|entry| entry.in_subtransaction == subtransaction)
            {
                let entry = replaced.pop().expect("checked above");
                KEY_SESSION.with(|current| current.replace(entry.previous));
            }
        } else if event == SUBXACT_EVENT_COMMIT_SUB {
            for entry in replaced.iter_mut() {
                if entry.in_subtransaction == subtransaction {
                    entry.in_subtransaction = parent;
                }
            }
        }
    });
}

pub fn register_settings() {
    GucRegistry::define_string_guc(
        c"flagship.organization_id",
        c"Organization (uuid) this session acts for.",
        c"Row-level security shows only this organization's rows. Unset, empty or not a uuid: no rows.",
        &ORGANIZATION_ID,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"flagship.environment",
        c"Environment used when an evaluation names none.",
        c"An environment uuid, '<project>/<env>' or '<org slug>/<project>/<env>'.",
        &ENVIRONMENT,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"flagship.require_key",
        c"Only an API key (flagship.authenticate) sets the organization.",
        c"When on, flagship.organization_id and JWT claims are ignored. Only a superuser can change it: set it for the application's login role with ALTER ROLE.",
        &REQUIRE_KEY,
        GucContext::Suset,
        GucFlags::default(),
    );
    callbacks::on_transaction_event(end_key_session);
    callbacks::on_subtransaction_event(end_key_subtransaction);
    GucRegistry::define_string_guc(
        c"flagship.actor",
        c"Who is making configuration changes, for the audit trail.",
        c"Falls back to the JWT 'sub' claim, then to current_user.",
        &ACTOR,
        GucContext::Userset,
        GucFlags::default(),
    );
}

fn setting_text(setting: &GucSetting<Option<CString>>) -> Option<String> {
    setting
        .get()
        .and_then(|value| value.into_string().ok())
        .filter(|value| !value.trim().is_empty())
}

/// A claim from `request.jwt.claims`, as PostgREST and Supabase set it.
fn jwt_claim(claim: &str) -> Option<String> {
    let raw = settings::text(c"request.jwt.claims")?;
    if raw.trim().is_empty() {
        return None;
    }
    let claims: serde_json::Value = serde_json::from_str(&raw).ok()?;
    match claims.get(claim)? {
        serde_json::Value::String(text) if !text.trim().is_empty() => Some(text.clone()),
        _ => None,
    }
}

/// Everything the session's identity for evaluation is derived from, as
/// raw borrowed text, so a per-call cache can tell without parsing or
/// allocating whether it changed since the last call.
#[derive(Debug, PartialEq, Eq)]
pub struct RawIdentity<'a> {
    pub user: pg_sys::Oid,
    /// The organization an API key proved; when set (or when a key is
    /// required) the settings below are ignored and left empty.
    pub authenticated: Option<[u8; 16]>,
    pub require_key: bool,
    /// `flagship.organization_id`; empty when blank, as `organization_id`
    /// then falls back to the claims.
    pub organization: &'a [u8],
    /// Only read when `organization` is empty, as the fallback is.
    pub claims: &'a [u8],
    pub environment: &'a [u8],
}

/// A `RawIdentity` copied out of the settings, to keep across queries.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IdentityKey {
    pub user: pg_sys::Oid,
    pub authenticated: Option<[u8; 16]>,
    pub require_key: bool,
    pub organization: Vec<u8>,
    pub claims: Vec<u8>,
    pub environment: Vec<u8>,
}

impl RawIdentity<'_> {
    /// Hands this call's identity to `inspect`; `environment` is the
    /// explicit argument, if any, else `flagship.environment`. The identity
    /// borrows setting memory that SQL can free, so it cannot leave the
    /// closure (the closure is generic over the borrow's lifetime); copy it
    /// with `to_key` to keep it.
    pub fn with_current<R>(
        environment: Option<&str>,
        inspect: impl FnOnce(&RawIdentity<'_>) -> R,
    ) -> R {
        let authenticated = KEY_SESSION.with(|session| {
            session
                .borrow()
                .as_ref()
                .map(|session| *session.organization.as_bytes())
        });
        let require_key = REQUIRE_KEY.get();
        settings::with_borrowed(|settings| {
            let organization = if authenticated.is_some() || require_key {
                &[][..]
            } else {
                let raw = settings.ours(&ORGANIZATION_ID);
                if raw.iter().all(u8::is_ascii_whitespace) {
                    &[][..]
                } else {
                    raw
                }
            };
            let claims = if organization.is_empty() && authenticated.is_none() && !require_key {
                settings.named(c"request.jwt.claims")
            } else {
                &[]
            };
            let identity = RawIdentity {
                user: backend::user_id(),
                authenticated,
                require_key,
                organization,
                claims,
                environment: environment
                    .map(str::as_bytes)
                    .unwrap_or_else(|| settings.ours(&ENVIRONMENT)),
            };
            inspect(&identity)
        })
    }

    pub fn to_key(&self) -> IdentityKey {
        IdentityKey {
            user: self.user,
            authenticated: self.authenticated,
            require_key: self.require_key,
            organization: self.organization.to_vec(),
            claims: self.claims.to_vec(),
            environment: self.environment.to_vec(),
        }
    }

    /// Whether `key` was copied from an identity equal to this one.
    pub fn is(&self, key: &IdentityKey) -> bool {
        self.user == key.user
            && self.authenticated == key.authenticated
            && self.require_key == key.require_key
            && self.organization == key.organization
            && self.claims == key.claims
            && self.environment == key.environment
    }
}

/// Whether this session's organization can only come from an API key
/// (`flagship.require_key`).
pub fn key_required() -> bool {
    REQUIRE_KEY.get()
}

pub fn organization_id() -> Option<pgrx::Uuid> {
    let authenticated =
        KEY_SESSION.with(|session| session.borrow().as_ref().map(|s| s.organization));
    if authenticated.is_some() {
        return authenticated;
    }
    if REQUIRE_KEY.get() {
        return None;
    }
    let text = setting_text(&ORGANIZATION_ID).or_else(|| jwt_claim("org_id"))?;
    let parsed = uuid::Uuid::parse_str(text.trim()).ok()?;
    Some(pgrx::Uuid::from_bytes(*parsed.as_bytes()))
}

pub fn environment() -> Option<String> {
    setting_text(&ENVIRONMENT)
}

/// The organization this session acts for, or NULL. RLS policies call it once
/// per query (wrapped in a sub-select).
#[pg_extern(stable, parallel_restricted)]
pub fn current_organization_id() -> Option<pgrx::Uuid> {
    organization_id()
}

/// Verifies an API key and, when it is valid, makes its organization (and
/// environment binding and scopes) this transaction's context: settings and
/// JWT claims are ignored until the transaction ends. Answers what
/// `verify_api_key` answers; an invalid key leaves the transaction without
/// a key context.
#[pg_extern(volatile)]
pub fn authenticate(
    key: Option<&str>,
    client_ip: default!(Option<pgrx::Inet>, "NULL"),
) -> pgrx::JsonB {
    replace_key_session(None);
    let client_ip = client_ip.map(|address| address.0);
    let verified = Spi::get_one_with_args::<pgrx::JsonB>(
        "SELECT flagship.verify_api_key($1, $2::inet)",
        &[key.into(), client_ip.into()],
    )
    .unwrap_or_else(|error| panic!("verifying the key: {error}"))
    .map(|document| document.0)
    .unwrap_or(serde_json::Value::Null);
    let uuid = |field: &str| {
        verified
            .get(field)
            .and_then(serde_json::Value::as_str)
            .and_then(|text| uuid::Uuid::parse_str(text).ok())
            .map(|id| pgrx::Uuid::from_bytes(*id.as_bytes()))
    };
    if verified.get("valid") == Some(&serde_json::Value::Bool(true)) {
        if let (Some(key_id), Some(organization)) = (uuid("key_id"), uuid("organization_id")) {
            KEY_SESSION.with(|current| {
                current.replace(Some(KeySession {
                    key_id,
                    organization,
                    environment: uuid("environment_id"),
                    scopes: verified
                        .get("scopes")
                        .and_then(serde_json::Value::as_array)
                        .map(|scopes| {
                            scopes
                                .iter()
                                // A scope that is not text (a NULL written
                                // straight into the table) grants nothing,
                                // and keeps the key restricted.
                                .map(|scope| scope.as_str().unwrap_or("-").to_string())
                                .collect()
                        })
                        .unwrap_or_default(),
                    customer: verified
                        .get("customer")
                        .and_then(serde_json::Value::as_str)
                        .map(str::to_string),
                }))
            });
        }
    }
    pgrx::JsonB(verified)
}

/// The customer the transaction's API key belongs to, if any.
pub fn key_customer() -> Option<String> {
    KEY_SESSION.with(|session| session.borrow().as_ref().and_then(|s| s.customer.clone()))
}

/// The scopes of the key this transaction authenticated with (NULL without one).
#[pg_extern(stable, parallel_restricted)]
pub fn current_scopes() -> Option<Vec<String>> {
    key_session().map(|session| session.scopes)
}

/// The actor recorded in the audit trail. In key mode it is the key
/// (`api_key:<key id>`), whatever the settings or claims say. Otherwise it
/// is what the application claims: `flagship.actor`, else the JWT `sub`
/// claim, else the database role (`acting_role`).
#[pg_extern(stable, parallel_restricted)]
pub fn current_actor() -> String {
    if let Some(key_id) = KEY_SESSION.with(|session| session.borrow().as_ref().map(|s| s.key_id)) {
        return format!("api_key:{key_id}");
    }
    setting_text(&ACTOR)
        .or_else(|| jwt_claim("sub"))
        .unwrap_or_else(acting_role)
}

/// The role whose rights the session's statement runs with: the current
/// role outside any SECURITY DEFINER function (the outer user), so the
/// audit trigger and create_organization, which run as the extension's
/// owner, still name whoever called them.
#[pg_extern(stable, parallel_restricted)]
pub fn acting_role() -> String {
    backend::outer_user_name()
}

/// The API key this transaction authenticated with (NULL without one).
#[pg_extern(stable, parallel_restricted)]
pub fn current_key_id() -> Option<pgrx::Uuid> {
    KEY_SESSION.with(|session| session.borrow().as_ref().map(|s| s.key_id))
}

/// In key mode, whether the key's scopes grant `permission`; NULL outside
/// key mode, where members' roles decide (`flagship.actor_may`).
#[pg_extern(stable, parallel_restricted)]
pub fn key_grants(permission: &str) -> Option<bool> {
    KEY_SESSION
        .with(|session| session.borrow().is_some())
        .then(|| scope_allows(permission))
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use pgrx::prelude::*;

    #[pg_test]
    fn organization_comes_from_setting_then_jwt() {
        let org = "7c9e6679-7425-40de-944b-e07fc1f90ae7";
        Spi::run(&format!("SET flagship.organization_id = '{org}'")).unwrap();
        let found = Spi::get_one::<String>("SELECT flagship.current_organization_id()::text");
        assert_eq!(found.unwrap().as_deref(), Some(org));

        Spi::run("SET flagship.organization_id = ''").unwrap();
        Spi::run(
            r#"SET request.jwt.claims = '{"org_id": "11111111-2222-3333-4444-555555555555", "sub": "alice"}'"#,
        )
        .unwrap();
        let found = Spi::get_one::<String>("SELECT flagship.current_organization_id()::text");
        assert_eq!(
            found.unwrap().as_deref(),
            Some("11111111-2222-3333-4444-555555555555")
        );
        let actor = Spi::get_one::<String>("SELECT flagship.current_actor()");
        assert_eq!(actor.unwrap().as_deref(), Some("alice"));
    }

    #[pg_test]
    fn malformed_context_means_no_organization() {
        Spi::run("SET flagship.organization_id = 'not-a-uuid'").unwrap();
        Spi::run("SET request.jwt.claims = '{broken json'").unwrap();
        let found = Spi::get_one::<pgrx::Uuid>("SELECT flagship.current_organization_id()");
        assert_eq!(found.unwrap(), None);
    }
}
