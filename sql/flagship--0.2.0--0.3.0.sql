-- FlagShip 0.2.0 -> 0.3.0.
--
-- Upgrade scripts are frozen history once 0.3.0 is released: until then
-- this file collects every SQL change of the round, in the order they were
-- made. tests/integration/upgrade.rs checks that the result matches a fresh
-- 0.3.0 install object by object.

\echo Use "ALTER EXTENSION flagship UPDATE TO '0.3.0'" to load this file. \quit

-- Stored values must load back (#13): customer attributes nest at most 64
-- levels and hold numbers that fit a double, on every write path. The
-- upgrade refuses existing customers beyond that, naming each.
CREATE  FUNCTION "check_stored_value"(
	"field" TEXT, /* & str */
	"value" jsonb /* DocumentArg */
) RETURNS bool /* bool */
IMMUTABLE STRICT PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'check_stored_value_wrapper';

ALTER TABLE flagship.customers
    ADD CONSTRAINT customers_attributes_loadable
        CHECK (flagship.check_stored_value('customer "' || external_key || '": attributes', attributes));

-- Many tenants (#14): per-scope cache versions, so one organization's
-- changes cost other organizations a version check, not a reload; the
-- relcache signal is sent only by the statement trigger, which now runs as
-- the owner, and nothing else may call invalidate_cache.
CREATE  FUNCTION "cache_usage"() RETURNS jsonb /* pgrx :: JsonB */
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'cache_usage_wrapper';

CREATE TABLE flagship.cache_versions (
    organization_id uuid   NOT NULL,
    scope           uuid   NOT NULL,
    configuration   bigint NOT NULL DEFAULT 0,
    entitlements    bigint NOT NULL DEFAULT 0,
    -- The transaction that last bumped it. A backend reads, once per
    -- signal, which organizations changed since the oldest transaction its
    -- previous read could not see (one query for every organization it
    -- serves, instead of one per environment); see src/cache.rs.
    changed_by      xid8   NOT NULL DEFAULT pg_current_xact_id(),
    PRIMARY KEY (organization_id, scope)
);
CREATE INDEX cache_versions_changed_by ON flagship.cache_versions (changed_by);
GRANT SELECT ON flagship.cache_versions TO flagship_admin, flagship_app, flagship_auditor;
SELECT flagship.isolate_tenant_table('cache_versions');
SELECT pg_catalog.pg_extension_config_dump('flagship.cache_versions', '');

-- Runs as the extension's owner: the versions are written only here.
CREATE FUNCTION flagship.bump_cache_version() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    changed jsonb[] := CASE TG_OP WHEN 'INSERT' THEN ARRAY[to_jsonb(NEW)]
                                  WHEN 'DELETE' THEN ARRAY[to_jsonb(OLD)]
                                  ELSE ARRAY[to_jsonb(NEW), to_jsonb(OLD)] END;
BEGIN
    -- An update that changes nothing (an upsert of the same document)
    -- changes no answer; skipping it also keeps the lock order of every
    -- writer the audit trail's (chain head first, then versions).
    IF TG_OP = 'UPDATE' AND to_jsonb(OLD) - 'updated_at' = to_jsonb(NEW) - 'updated_at' THEN
        RETURN NULL;
    END IF;
    INSERT INTO flagship.cache_versions AS v (organization_id, scope, configuration, entitlements)
    SELECT DISTINCT (r ->> TG_ARGV[2])::uuid, (r ->> TG_ARGV[1])::uuid,
           (TG_ARGV[0] = 'configuration')::int, (TG_ARGV[0] = 'entitlements')::int
      FROM unnest(changed) AS r
    ON CONFLICT (organization_id, scope) DO UPDATE
       SET configuration = v.configuration + EXCLUDED.configuration,
           entitlements = v.entitlements + EXCLUDED.entitlements,
           changed_by = EXCLUDED.changed_by;
    RETURN NULL;
END
$fn$;
REVOKE ALL ON FUNCTION flagship.bump_cache_version() FROM PUBLIC;

-- Puts a table's rows under a version: `kind` is configuration or
-- entitlements, `scope_column` the column naming the scope.
CREATE FUNCTION flagship.version_on_change(table_name text, kind text, scope_column text,
                                           organization_column text DEFAULT 'organization_id')
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    EXECUTE format(
        'CREATE TRIGGER %I AFTER INSERT OR UPDATE OR DELETE ON flagship.%I
             FOR EACH ROW EXECUTE FUNCTION flagship.bump_cache_version(%L, %L, %L)',
        table_name || '_cache_version', table_name, kind, scope_column, organization_column);
END
$fn$;
REVOKE ALL ON FUNCTION flagship.version_on_change(text, text, text, text) FROM PUBLIC;

SELECT flagship.version_on_change('organizations', 'configuration', 'id', 'id');
SELECT flagship.version_on_change(t, 'configuration', 'organization_id')
  FROM unnest(ARRAY['projects', 'environments']) AS t;
SELECT flagship.version_on_change(t, 'configuration', 'project_id')
  FROM unnest(ARRAY['features', 'segments']) AS t;
SELECT flagship.version_on_change('feature_rules', 'configuration', 'environment_id');

SELECT flagship.version_on_change(t, 'entitlements', 'organization_id')
  FROM unnest(ARRAY['metrics', 'plans', 'plan_features', 'usage_limits', 'customers',
                    'subscriptions', 'customer_feature_overrides',
                    'customer_limit_overrides']) AS t;

CREATE OR REPLACE FUNCTION flagship.configuration_changed() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        UPDATE flagship.cache_versions
           SET configuration = configuration + 1, entitlements = entitlements + 1,
               changed_by = pg_current_xact_id();
    END IF;
    PERFORM flagship.invalidate_cache(TG_ARGV[0]::regclass);
    RETURN NULL;
END
$fn$;
REVOKE ALL ON FUNCTION flagship.configuration_changed() FROM PUBLIC;
-- Only the trigger above may signal other backends.
REVOKE ALL ON FUNCTION flagship.invalidate_cache(oid) FROM PUBLIC;
-- Counts of what this backend holds, across the organizations it served.
REVOKE ALL ON FUNCTION flagship.cache_usage() FROM PUBLIC;


-- Security (#15): the change feed carries only an event id and
-- changes_since tells an organization's own sessions what changed; in key
-- mode the key is the actor and its scopes decide every write; usage
-- counters and the ledger change only through FlagShip's functions; audit
-- events record the login role, the acting role and the key, and
-- anchors (audit_head) let verify_audit_chain detect rewrites; the trail's
-- guards fire in replica mode; chain heads only move forward; a limited
-- key spends a use on every verification, committed or not; scopes are
-- checked when a key is issued.

CREATE  FUNCTION "acting_role"() RETURNS TEXT /* String */
STRICT STABLE PARALLEL RESTRICTED
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'acting_role_wrapper';

CREATE  FUNCTION "current_key_id"() RETURNS uuid /* Option < pgrx :: Uuid > */
STRICT STABLE PARALLEL RESTRICTED
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'current_key_id_wrapper';

CREATE  FUNCTION "key_grants"(
	"permission" TEXT /* & str */
) RETURNS bool /* Option < bool > */
STRICT STABLE PARALLEL RESTRICTED
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'key_grants_wrapper';

CREATE  FUNCTION "usage_writes_open"() RETURNS bool /* bool */
STRICT STABLE PARALLEL RESTRICTED
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'usage_writes_open_wrapper';

ALTER TABLE flagship.audit_events
    ADD COLUMN session_role text, ADD COLUMN acting_role text, ADD COLUMN key_id uuid,
    ADD COLUMN change_kind text, ADD COLUMN change_key text, ADD COLUMN environment_id uuid;

CREATE OR REPLACE FUNCTION flagship.actor_may(permission text) RETURNS boolean
LANGUAGE sql
STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT coalesce(flagship.key_grants(permission),
                    flagship.has_permission(flagship.current_actor(), permission))
$fn$;

DROP FUNCTION flagship.verify_audit_chain(uuid);
DROP FUNCTION flagship.audit_digest(bytea, bigint, bigint, uuid, timestamptz, text, text, text,
                                    text, jsonb, bigint);

CREATE FUNCTION flagship.audit_digest(
    previous_hash bytea, chain_seq bigint, id bigint, organization_id uuid,
    occurred_at timestamptz, actor text, action text, resource_type text,
    resource_id text, diff jsonb, transaction_id bigint,
    session_role text, acting_role text, key_id uuid)
RETURNS bytea
LANGUAGE sql
STABLE PARALLEL SAFE
-- No SET clause, so the planner inlines it into the trigger's cached plan
-- (a SET would make every transaction plan it again); it calls only
-- pg_catalog functions, which no search_path can shadow.
AS $fn$
    SELECT sha256(convert_to((jsonb_build_array(
        encode(previous_hash, 'hex'), chain_seq, id, organization_id,
        extract(epoch FROM occurred_at), actor, action, resource_type,
        resource_id, diff, transaction_id)
        || CASE WHEN session_role IS NULL AND acting_role IS NULL AND key_id IS NULL
                THEN '[]'::jsonb
                ELSE jsonb_build_array(session_role, acting_role, key_id) END)::text, 'UTF8'))
$fn$;

CREATE FUNCTION flagship.audit_maintenance_declared() RETURNS boolean
LANGUAGE sql
STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT current_setting('flagship.audit_maintenance', true) = 'on'
           AND (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)
$fn$;
REVOKE ALL ON FUNCTION flagship.audit_maintenance_declared() FROM PUBLIC;

CREATE OR REPLACE FUNCTION flagship.audit_events_append_only() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    IF flagship.audit_maintenance_declared() THEN
        RETURN CASE TG_OP WHEN 'DELETE' THEN OLD ELSE NEW END;
    END IF;
    RAISE EXCEPTION '% is append-only: % refused', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'a superuser may SET flagship.audit_maintenance = on first; verify_audit_chain will show the edit';
END
$fn$;

CREATE FUNCTION flagship.audit_chain_heads_forward_only() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    IF (pg_trigger_depth() > 1 AND NEW.organization_id = OLD.organization_id
        AND NEW.last_seq = OLD.last_seq + 1)
       OR flagship.audit_maintenance_declared() THEN
        RETURN NEW;
    END IF;
    RAISE EXCEPTION 'audit_chain_heads moves only with the trail: UPDATE refused'
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'a superuser may SET flagship.audit_maintenance = on first; verify_audit_chain with an anchor will show the edit';
END
$fn$;
CREATE TRIGGER audit_chain_heads_forward_only BEFORE UPDATE ON flagship.audit_chain_heads
    FOR EACH ROW EXECUTE FUNCTION flagship.audit_chain_heads_forward_only();

-- The guards fire under session_replication_role = replica too, where
-- ordinary triggers are skipped: that setting must not open the trail.
ALTER TABLE flagship.audit_events ENABLE ALWAYS TRIGGER audit_events_append_only;
ALTER TABLE flagship.audit_events ENABLE ALWAYS TRIGGER audit_events_no_truncate;
ALTER TABLE flagship.audit_chain_heads ENABLE ALWAYS TRIGGER audit_chain_heads_append_only;
ALTER TABLE flagship.audit_chain_heads ENABLE ALWAYS TRIGGER audit_chain_heads_no_truncate;
ALTER TABLE flagship.audit_chain_heads ENABLE ALWAYS TRIGGER audit_chain_heads_forward_only;

CREATE OR REPLACE FUNCTION flagship.audit_change() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    left_out text[] := TG_ARGV[2:];
    before jsonb;
    after jsonb;
    subject jsonb;
    changes jsonb;
    org uuid;
    resource text;
    subject_key text;
    environment uuid;
    event_id bigint;
    acting text;
    acting_role text;
    key uuid;
    xact bigint;
    appended int;
BEGIN
    IF TG_OP <> 'INSERT' THEN
        before := to_jsonb(OLD);
    END IF;
    IF TG_OP <> 'DELETE' THEN
        after := to_jsonb(NEW);
    END IF;
    subject := coalesce(after, before);

    IF TG_OP = 'UPDATE' THEN
        SELECT jsonb_object_agg(n.field, jsonb_build_object('old', before->n.field, 'new', n.value))
          INTO changes
          FROM jsonb_each(after - left_out) AS n (field, value)
         WHERE n.value IS DISTINCT FROM before->n.field;
    ELSE
        -- A new row's fields, or a deleted row's, leaving out the empty ones.
        SELECT jsonb_object_agg(r.field, jsonb_build_object(CASE TG_OP WHEN 'INSERT' THEN 'new' ELSE 'old' END, r.value))
          INTO changes
          FROM jsonb_each(subject - left_out) AS r (field, value)
         WHERE r.value <> 'null';
    END IF;
    IF changes IS NULL THEN
        RETURN NULL;
    END IF;

    org := CASE TG_TABLE_NAME WHEN 'organizations' THEN subject->>'id'
                              ELSE subject->>'organization_id' END;
    resource := subject->>'id';
    IF resource IS NULL THEN
        SELECT string_agg(subject->>column_name, '/' ORDER BY position) INTO resource
          FROM unnest(string_to_array(TG_ARGV[1], ',')) WITH ORDINALITY AS k (column_name, position);
    END IF;

    -- The change feed names what an application caches: a flag, a plan,
    -- a customer, even when the row changed is one of their parts.
    CASE TG_TABLE_NAME
    WHEN 'feature_rules' THEN
        SELECT f.key INTO subject_key FROM flagship.features f
         WHERE f.organization_id = org AND f.id = (subject->>'feature_id')::uuid;
    WHEN 'plan_features', 'usage_limits' THEN
        SELECT p.key INTO subject_key FROM flagship.plans p
         WHERE p.organization_id = org AND p.id = (subject->>'plan_id')::uuid;
    WHEN 'subscriptions', 'customer_feature_overrides', 'customer_limit_overrides' THEN
        SELECT c.external_key, c.environment_id INTO subject_key, environment FROM flagship.customers c
         WHERE c.organization_id = org AND c.id = (subject->>'customer_id')::uuid;
    WHEN 'role_permissions' THEN
        SELECT r.key INTO subject_key FROM flagship.roles r
         WHERE r.organization_id = org AND r.id = (subject->>'role_id')::uuid;
    WHEN 'member_roles' THEN
        SELECT m.user_key INTO subject_key FROM flagship.members m
         WHERE m.organization_id = org AND m.id = (subject->>'member_id')::uuid;
    ELSE
        NULL;
    END CASE;
    subject_key := coalesce(subject_key, subject->>'key', subject->>'external_key',
                            subject->>'user_key', subject->>'slug', resource);
    environment := coalesce(environment, (subject->>'environment_id')::uuid,
                            CASE TG_TABLE_NAME WHEN 'environments' THEN (subject->>'id')::uuid END);

    event_id := nextval('flagship.audit_events_id_seq');
    acting := flagship.current_actor();
    acting_role := flagship.acting_role();
    key := flagship.current_key_id();
    xact := pg_current_xact_id()::text::bigint;
    FOR attempt IN 1..2 LOOP
        WITH link AS (
            UPDATE flagship.audit_chain_heads h
               SET last_seq = h.last_seq + 1,
                   last_hash = flagship.audit_digest(
                       h.last_hash, h.last_seq + 1, event_id, org, now(), acting,
                       lower(TG_OP), TG_TABLE_NAME, resource, changes, xact,
                       session_user, acting_role, key)
             WHERE h.organization_id = org
            RETURNING h.last_seq, h.last_hash)
        INSERT INTO flagship.audit_events (organization_id, id, chain_seq, occurred_at, actor, action,
                                           resource_type, resource_id, diff, transaction_id, hash,
                                           session_role, acting_role, key_id,
                                           change_kind, change_key, environment_id)
        SELECT org, event_id, link.last_seq, now(), acting, lower(TG_OP),
               TG_TABLE_NAME, resource, changes, xact, link.last_hash,
               session_user, acting_role, key,
               TG_ARGV[0], subject_key, environment
          FROM link;
        GET DIAGNOSTICS appended = ROW_COUNT;
        EXIT WHEN appended > 0;
        -- The organization's first event starts its chain.
        INSERT INTO flagship.audit_chain_heads (organization_id) VALUES (org)
        ON CONFLICT DO NOTHING;
    END LOOP;

    -- Any role may LISTEN to any channel, so the payload carries nothing
    -- row-level security would hide: only the event's database-wide id.
    -- A listener asks flagship.changes_since what changed in its own
    -- organization.
    PERFORM pg_notify('flagship_changes', jsonb_build_object('id', event_id)::text);
    RETURN NULL;
END
$fn$;

CREATE FUNCTION flagship.verify_audit_chain(organization_id uuid, anchor jsonb DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql
STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    head flagship.audit_chain_heads;
    checked bigint;
    last_seq bigint;
    last_hash bytea;
    broken record;
    anchor_seq bigint;
    anchor_hash bytea;
BEGIN
    IF anchor IS NOT NULL THEN
        IF jsonb_typeof(anchor) IS DISTINCT FROM 'object'
           OR jsonb_typeof(anchor->'seq') IS DISTINCT FROM 'number'
           OR (anchor->>'hash') !~ '^[0-9a-f]{64}$' THEN
            RAISE EXCEPTION 'anchor: expected {"seq": <number>, "hash": "<64 hex digits>"} from flagship.audit_head, got %', anchor
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        anchor_seq := (anchor->>'seq')::bigint;
        anchor_hash := decode(anchor->>'hash', 'hex');
    END IF;

    SELECT * INTO head FROM flagship.audit_chain_heads h
     WHERE h.organization_id = verify_audit_chain.organization_id;
    IF head IS NULL THEN
        -- No head visible: either the trail is not the session's to read,
        -- or the organization has had no change since the audit began.
        IF NOT ((SELECT r.rolsuper FROM pg_roles r WHERE r.rolname = current_user)
                OR (verify_audit_chain.organization_id = flagship.current_organization_id()
                    AND flagship.actor_may('audit:read'))) THEN
            RAISE EXCEPTION 'the audit trail of organization "%" is not readable here', verify_audit_chain.organization_id
                USING ERRCODE = 'insufficient_privilege',
                      HINT = 'set flagship.organization_id to it and act as a member holding audit:read';
        END IF;
        IF anchor_seq > 0 THEN
            -- The anchor saw events that are gone with their head: a wipe.
            RETURN jsonb_build_object('valid', false, 'checked', 0, 'first_broken_id', NULL,
                                      'reason', 'anchor not found');
        END IF;
        IF NOT EXISTS (SELECT FROM flagship.organizations o WHERE o.id = verify_audit_chain.organization_id) THEN
            RAISE EXCEPTION 'organization "%" not found', verify_audit_chain.organization_id
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        RETURN jsonb_build_object('valid', true, 'checked', 0, 'first_broken_id', NULL);
    END IF;

    SELECT e.id, e.chain_seq,
           CASE WHEN e.chain_seq <> e.expected_seq THEN 'missing events before this one'
                ELSE 'hash mismatch' END AS reason
      INTO broken
      FROM (SELECT a.*,
                   row_number() OVER (ORDER BY a.chain_seq) AS expected_seq,
                   coalesce(lag(a.hash) OVER (ORDER BY a.chain_seq), '\x'::bytea) AS previous_hash
              FROM flagship.audit_events a
             WHERE a.organization_id = verify_audit_chain.organization_id) e
     WHERE e.chain_seq <> e.expected_seq
        OR e.hash IS DISTINCT FROM flagship.audit_digest(
               e.previous_hash, e.chain_seq, e.id, e.organization_id, e.occurred_at, e.actor,
               e.action, e.resource_type, e.resource_id, e.diff, e.transaction_id,
               e.session_role, e.acting_role, e.key_id)
     ORDER BY e.chain_seq
     LIMIT 1;

    SELECT count(*), max(a.chain_seq) INTO checked, last_seq
      FROM flagship.audit_events a WHERE a.organization_id = verify_audit_chain.organization_id;
    IF broken.id IS NOT NULL THEN
        RETURN jsonb_build_object('valid', false, 'checked', checked, 'first_broken_id', broken.id,
                                  'reason', broken.reason);
    END IF;
    SELECT a.hash INTO last_hash FROM flagship.audit_events a
     WHERE a.organization_id = verify_audit_chain.organization_id AND a.chain_seq = last_seq;
    IF coalesce(last_seq, 0) <> head.last_seq OR coalesce(last_hash, '\x') <> head.last_hash THEN
        RETURN jsonb_build_object('valid', false, 'checked', checked, 'first_broken_id', NULL,
                                  'reason', 'truncated');
    END IF;
    IF anchor_seq > 0 AND NOT EXISTS (
           SELECT FROM flagship.audit_events a
            WHERE a.organization_id = verify_audit_chain.organization_id
              AND a.chain_seq = anchor_seq AND a.hash = anchor_hash) THEN
        RETURN jsonb_build_object('valid', false, 'checked', checked, 'first_broken_id', NULL,
                                  'reason', 'anchor not found');
    END IF;
    RETURN jsonb_build_object('valid', true, 'checked', checked, 'first_broken_id', NULL);
END
$fn$;
GRANT EXECUTE ON FUNCTION flagship.verify_audit_chain(uuid, jsonb) TO flagship_admin, flagship_auditor;

-- The chain's newest link, to be copied outside the database (a ticket, a
-- log shipper, another system) and handed back to verify_audit_chain
-- later: {"seq", "hash" (hex), "at"}; seq 0 before the first event.
CREATE FUNCTION flagship.audit_head(organization_id uuid)
RETURNS jsonb
LANGUAGE plpgsql
STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    verdict jsonb := flagship.verify_audit_chain(audit_head.organization_id);
    newest flagship.audit_events;
BEGIN
    -- An anchor of a broken chain would vouch for the break.
    IF NOT (verdict->>'valid')::boolean THEN
        RAISE EXCEPTION 'the audit trail of organization "%" does not verify: %', audit_head.organization_id, verdict
            USING ERRCODE = 'data_corrupted';
    END IF;
    SELECT a.* INTO newest FROM flagship.audit_events a
     WHERE a.organization_id = audit_head.organization_id
     ORDER BY a.chain_seq DESC LIMIT 1;
    RETURN jsonb_build_object('seq', coalesce(newest.chain_seq, 0),
                              'hash', coalesce(encode(newest.hash, 'hex'), ''),
                              'at', newest.occurred_at);
END
$fn$;
GRANT EXECUTE ON FUNCTION flagship.audit_head(uuid) TO flagship_admin, flagship_auditor;

-- What changed in the session's organization after position `after` of its
-- chain (0: from the beginning), for caches woken by flagship_changes. It
-- names only what members of the organization may read anyway (flag,
-- plan, customer keys), so applications need no audit:read; positions
-- commit in order, so a cursor never skips a change.
CREATE FUNCTION flagship.changes_since(after bigint DEFAULT 0)
RETURNS TABLE (seq bigint, id bigint, occurred_at timestamptz, kind text, key text,
               environment_id uuid, action text)
LANGUAGE plpgsql
STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
-- PL/pgSQL with the organization as a value: Citus can plan it and send
-- it to the organization's shard group (#21).
DECLARE
    org constant uuid := flagship.current_organization_id();
BEGIN
    RETURN QUERY
    SELECT a.chain_seq, a.id, a.occurred_at, a.change_kind, a.change_key, a.environment_id, a.action
      FROM flagship.audit_events a
     WHERE a.organization_id = org
       AND a.chain_seq > coalesce(changes_since.after, 0)
     ORDER BY a.chain_seq
     LIMIT 10000;
END
$fn$;
REVOKE ALL ON FUNCTION flagship.changes_since(bigint) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION flagship.changes_since(bigint) TO flagship_admin, flagship_app, flagship_auditor;

CREATE POLICY usage_counters_insert_by_functions ON flagship.usage_counters AS RESTRICTIVE
    FOR INSERT WITH CHECK ((SELECT flagship.usage_writes_open()));
CREATE POLICY usage_counters_update_by_functions ON flagship.usage_counters AS RESTRICTIVE
    FOR UPDATE USING ((SELECT flagship.usage_writes_open()));
CREATE POLICY usage_counters_delete_by_functions ON flagship.usage_counters AS RESTRICTIVE
    FOR DELETE USING ((SELECT flagship.usage_writes_open()));
CREATE POLICY usage_ledger_insert_by_functions ON flagship.usage_ledger AS RESTRICTIVE
    FOR INSERT WITH CHECK ((SELECT flagship.usage_writes_open()));

CREATE FUNCTION flagship.key_use_sequence(key_id uuid) RETURNS text
LANGUAGE sql
IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT 'flagship.' || quote_ident('api_key_uses_' || replace(key_id::text, '-', ''))
$fn$;
REVOKE ALL ON FUNCTION flagship.key_use_sequence(uuid) FROM PUBLIC;

-- Creates a limited key's sequence if it is missing, continuing from the
-- uses already counted. The sequence belongs to api_keys.key_hash, so it
-- goes with the table (DROP EXTENSION) and pg_dump keeps its position.
CREATE FUNCTION flagship.ensure_key_use_sequence(key_id uuid, used bigint) RETURNS regclass
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    name constant text := flagship.key_use_sequence(key_id);
BEGIN
    IF to_regclass(name) IS NULL THEN
        EXECUTE format('CREATE SEQUENCE %s START WITH %s OWNED BY flagship.api_keys.key_hash',
                       name, coalesce(used, 0) + 1);
    END IF;
    RETURN name::regclass;
END
$fn$;
REVOKE ALL ON FUNCTION flagship.ensure_key_use_sequence(uuid, bigint) FROM PUBLIC;

CREATE FUNCTION flagship.api_keys_use_sequence() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    IF TG_OP = 'DELETE' THEN
        EXECUTE format('DROP SEQUENCE IF EXISTS %s', flagship.key_use_sequence(OLD.id));
    ELSIF NEW.usage_limit IS NOT NULL THEN
        PERFORM flagship.ensure_key_use_sequence(NEW.id, NEW.usage_count);
    END IF;
    RETURN NULL;
END
$fn$;
REVOKE ALL ON FUNCTION flagship.api_keys_use_sequence() FROM PUBLIC;
CREATE TRIGGER api_keys_use_sequence AFTER INSERT OR DELETE OR UPDATE OF usage_limit ON flagship.api_keys
    FOR EACH ROW EXECUTE FUNCTION flagship.api_keys_use_sequence();

-- Keys limited before 0.3.0 get their sequence now, continuing from
-- usage_count. Created by this script, a sequence would become a member of
-- the extension (left out of pg_dump); it is handed back to the database,
-- as sequences created after the upgrade are.
DO $keys$
DECLARE
    sequence regclass;
BEGIN
    FOR sequence IN
        SELECT flagship.ensure_key_use_sequence(k.id, k.usage_count)
          FROM flagship.api_keys k WHERE k.usage_limit IS NOT NULL
    LOOP
        EXECUTE format('ALTER EXTENSION flagship DROP SEQUENCE %s', sequence);
    END LOOP;
END
$keys$;
ALTER TABLE flagship.api_keys
    ADD CONSTRAINT api_keys_scopes_present CHECK (array_position(scopes, NULL) IS NULL);
ALTER FUNCTION flagship.record_usage(text, text, bigint, text, text) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION flagship.set_usage(text, text, bigint, text) SET search_path = pg_catalog, pg_temp;

CREATE OR REPLACE FUNCTION flagship.issue_api_key(organization_id uuid, name text, scopes text[] DEFAULT '{}',
                                       environment text DEFAULT NULL,
                                       expires_at timestamptz DEFAULT NULL,
                                       usage_limit bigint DEFAULT NULL)
RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    environment_row flagship.environments;
    secret text;
    plaintext text;
    bad_scope text;
    issuer flagship.api_keys;
BEGIN
    IF organization_id IS NULL
       OR NOT EXISTS (SELECT FROM flagship.organizations o WHERE o.id = issue_api_key.organization_id) THEN
        RAISE EXCEPTION 'organization_id: organization not found'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF name IS NULL OR btrim(name) = '' THEN
        RAISE EXCEPTION 'name: must not be empty' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- A scope is a permission, or every permission of one resource; a typo
    -- is refused now rather than failing at first use.
    SELECT s INTO bad_scope FROM unnest(coalesce(scopes, '{}')) s
     WHERE s IS NULL
        OR NOT EXISTS (SELECT FROM flagship.permissions p
                        WHERE p.key = s OR split_part(p.key, ':', 1) || ':*' = s)
     LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'scopes: "%" is not a scope', coalesce(bad_scope, 'NULL')
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'valid scopes: ' || (SELECT string_agg(k, ', ' ORDER BY k) FROM (
                      SELECT p.key FROM flagship.permissions p
                      UNION SELECT split_part(p.key, ':', 1) || ':*' FROM flagship.permissions p) AS v (k));
    END IF;
    -- A key issues no key wider than itself: within its scopes, its
    -- environment binding, its expiry and its usage limit.
    IF flagship.current_key_id() IS NOT NULL THEN
        SELECT k.scopes, k.environment_id, k.expires_at, k.usage_limit
          INTO issuer.scopes, issuer.environment_id, issuer.expires_at, issuer.usage_limit
          FROM flagship.api_keys k WHERE k.id = flagship.current_key_id();
        IF (cardinality(issuer.scopes) > 0
            AND (cardinality(coalesce(scopes, '{}')) = 0
                 OR EXISTS (SELECT FROM unnest(scopes) s WHERE NOT flagship.key_grants(s))))
           OR (issuer.environment_id IS NOT NULL
               AND (environment IS NULL
                    OR flagship.resolve_environment(environment) IS DISTINCT FROM issuer.environment_id))
           OR (issuer.expires_at IS NOT NULL AND (expires_at IS NULL OR expires_at > issuer.expires_at))
           OR (issuer.usage_limit IS NOT NULL AND usage_limit IS NULL) THEN
            RAISE EXCEPTION 'a key may not issue a key wider than itself'
                USING ERRCODE = 'insufficient_privilege',
                      HINT = 'stay within the scopes, environment, expiry and usage limit of the key this transaction authenticated with';
        END IF;
    END IF;
    IF expires_at IS NOT NULL AND expires_at <= now() THEN
        RAISE EXCEPTION 'expires_at: must be in the future' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF usage_limit IS NOT NULL AND usage_limit <= 0 THEN
        RAISE EXCEPTION 'usage_limit: must be positive' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF environment IS NOT NULL THEN
        environment_row := flagship.environment_row(environment);
        -- A name or uuid of another organization's environment is refused
        -- exactly like one that does not exist.
        IF environment_row.organization_id IS DISTINCT FROM issue_api_key.organization_id THEN
            RAISE EXCEPTION 'environment "%" not found', environment
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
    END IF;

    secret := replace(gen_random_uuid()::text, '-', '') || replace(gen_random_uuid()::text, '-', '');
    plaintext := CASE WHEN environment_row.key IS NULL OR environment_row.key = 'production'
                      THEN 'fs_live_' ELSE 'fs_test_' END || secret;
    INSERT INTO flagship.api_keys AS k
        (organization_id, name, display_prefix, key_hash, scopes, project_id, environment_id,
         expires_at, usage_limit)
    VALUES (issue_api_key.organization_id, btrim(name), left(plaintext, 16),
            sha256(convert_to(plaintext, 'UTF8')), coalesce(scopes, '{}'),
            environment_row.project_id, environment_row.id, expires_at, usage_limit);
    RETURN plaintext;
END
$fn$;

CREATE OR REPLACE FUNCTION flagship.verify_api_key(key text)
RETURNS jsonb
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    key_row flagship.api_keys;
    organization_status text;
    code text;
    uses bigint;
BEGIN
    IF key IS NOT NULL AND key ~ '^fs_(live|test)_[0-9a-f]{64}$' THEN
        SELECT * INTO key_row FROM flagship.api_keys k WHERE k.key_hash = sha256(convert_to(key, 'UTF8'));
    END IF;
    IF key_row.id IS NULL THEN
        code := 'NOT_FOUND';
    ELSIF key_row.revoked_at IS NOT NULL THEN
        code := 'REVOKED';
    ELSIF key_row.expires_at IS NOT NULL AND key_row.expires_at <= now() THEN
        code := 'EXPIRED';
    ELSE
        SELECT o.status INTO organization_status FROM flagship.organizations o
         WHERE o.id = key_row.organization_id;
        IF organization_status IS DISTINCT FROM 'active' THEN
            code := 'FORBIDDEN';
        ELSIF key_row.usage_limit IS NOT NULL THEN
            -- Counting uses is a write by nature; only limited keys pay it.
            uses := nextval(flagship.ensure_key_use_sequence(key_row.id, key_row.usage_count));
            IF uses <= key_row.usage_limit THEN
                code := 'VALID';
                UPDATE flagship.api_keys k SET usage_count = greatest(k.usage_count, uses), last_used_at = now()
                 WHERE k.organization_id = key_row.organization_id AND k.id = key_row.id;
            ELSE
                code := 'USAGE_EXCEEDED';
            END IF;
        ELSE
            code := 'VALID';
            -- At most one write a minute per key, so busy keys do not turn
            -- every verification into a hot-row update.
            UPDATE flagship.api_keys k SET last_used_at = now()
             WHERE k.organization_id = key_row.organization_id AND k.id = key_row.id
               AND (k.last_used_at IS NULL OR k.last_used_at < now() - interval '1 minute');
        END IF;
    END IF;
    IF code <> 'VALID' THEN
        RETURN jsonb_build_object('valid', false, 'code', code, 'key_id', NULL,
                                  'organization_id', NULL, 'environment_id', NULL, 'scopes', NULL);
    END IF;
    RETURN jsonb_build_object('valid', true, 'code', code, 'key_id', key_row.id,
                              'organization_id', key_row.organization_id,
                              'environment_id', key_row.environment_id, 'scopes', to_jsonb(key_row.scopes));
END
$fn$;

-- Functions that read this backend's key session, caches or exposure
-- counts run in the leader only: a parallel worker has none of them and
-- would answer for another context (#15).
ALTER FUNCTION flagship.flagship_evaluate(text, jsonb, text) PARALLEL RESTRICTED;
ALTER FUNCTION flagship.flagship_enabled(text, jsonb, text) PARALLEL RESTRICTED;
ALTER FUNCTION flagship.flagship_evaluate_all(jsonb, text) PARALLEL RESTRICTED;
ALTER FUNCTION flagship.environment_id(text) PARALLEL RESTRICTED;
ALTER FUNCTION flagship.current_organization_id() PARALLEL RESTRICTED;
ALTER FUNCTION flagship.current_scopes() PARALLEL RESTRICTED;
ALTER FUNCTION flagship.current_actor() PARALLEL RESTRICTED;

-- environment_config takes a row's columns, not the row (#21); its callers
-- are redefined below.
DROP FUNCTION flagship.environment_config(flagship.feature_rules);
-- A feature_rules row's columns as the environment object of a flag
-- document: the one shape the validator and export read. STABLE, as
-- jsonb_build_object is, and without a SET clause, so the planner inlines
-- it. It names only pg_catalog, so no search_path can change it. It takes
-- the columns, not the row: on Citus a trigger's row, or a row of a query
-- sent to a shard, is of the shard's own row type (#21).
CREATE FUNCTION flagship.environment_config(enabled boolean, targets jsonb, rules jsonb, default_serve jsonb)
RETURNS jsonb
LANGUAGE sql STABLE PARALLEL SAFE
AS $fn$
    SELECT pg_catalog.jsonb_build_object('enabled', enabled, 'targets', targets,
                                         'rules', rules, 'default', default_serve)
$fn$;


-- Operating FlagShip (#17): whoever starts an organization owns it;
-- export_project can leave customers out; import_project checks the format
-- and says when the project exists; patch_flag, plan_project and
-- apply_project (sql/operations.sql).
CREATE OR REPLACE FUNCTION flagship.create_organization(slug text, name text)
RETURNS uuid
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    new_id uuid;
BEGIN
    IF slug IS NULL OR slug !~ '^[a-z0-9-]+$' OR length(slug) > 63 THEN
        RAISE EXCEPTION 'organization slug "%" is invalid', slug
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'slug: 1 to 63 lowercase letters, digits and hyphens';
    END IF;
    IF name IS NULL OR length(btrim(name)) = 0 THEN
        RAISE EXCEPTION 'organization name must not be empty'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF EXISTS (SELECT FROM flagship.organizations o WHERE o.slug = create_organization.slug) THEN
        RAISE EXCEPTION 'organization slug "%" is already taken', slug
            USING ERRCODE = 'unique_violation';
    END IF;
    -- An organization belongs to people, not to a key of another one.
    IF flagship.current_key_id() IS NOT NULL THEN
        RAISE EXCEPTION 'an API key cannot create organizations'
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'create organizations in a session without flagship.authenticate';
    END IF;

    INSERT INTO flagship.organizations (slug, name)
    VALUES (create_organization.slug, create_organization.name)
    RETURNING id INTO new_id;

    INSERT INTO flagship.roles (organization_id, key, name, builtin)
    SELECT new_id, r.key, initcap(r.key), true
      FROM (VALUES ('owner'), ('admin'), ('developer'), ('viewer')) AS r (key);

    INSERT INTO flagship.role_permissions (organization_id, role_id, permission)
    SELECT new_id, r.id, b.permission
      FROM flagship.roles r
      JOIN flagship.builtin_role_permissions b ON b.role_key = r.key
     WHERE r.organization_id = new_id;

    -- Whoever starts an organization owns it: without a first member
    -- nobody but a superuser could create its projects (row-level security
    -- wants the actor to hold projects:write in it) or add members.
    -- Superusers bypass those policies and are left out.
    IF NOT (SELECT r.rolsuper FROM pg_roles r WHERE r.rolname = flagship.acting_role()) THEN
        WITH owner AS (
            INSERT INTO flagship.members (organization_id, user_key)
            VALUES (new_id, flagship.current_actor())
            RETURNING id)
        INSERT INTO flagship.member_roles (organization_id, member_id, role_id)
        SELECT new_id, owner.id, r.id
          FROM owner JOIN flagship.roles r ON r.organization_id = new_id AND r.key = 'owner';
    END IF;

    RETURN new_id;
END
$fn$;

DROP FUNCTION flagship.export_project(text);
-- With `customers => false` the document holds configuration only (what
-- belongs in git; apply_project then leaves customers alone).
CREATE FUNCTION flagship.export_project(project text, customers boolean DEFAULT true) RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
-- Each item's document is built from its row, fetched first, with the
-- organization as a value in every read: on Citus a row of a query sent to
-- a shard has the shard's row type, which the document functions do not
-- take (#21).
DECLARE
    p flagship.projects := flagship.project_row(project);
    s flagship.segments;
    f flagship.features;
    m flagship.metrics;
    pl flagship.plans;
    c flagship.customers;
    -- Arrays, appended to in place (a jsonb would be copied whole at each
    -- item), and the environments' keys by id, read once.
    segments jsonb[] := '{}';
    flags jsonb[] := '{}';
    metrics jsonb[] := '{}';
    plans jsonb[] := '{}';
    customer_documents jsonb[] := '{}';
    environment_keys jsonb;
BEGIN
    FOR s IN SELECT * FROM flagship.segments x
              WHERE x.organization_id = p.organization_id AND x.project_id = p.id ORDER BY x.key LOOP
        segments := array_append(segments, flagship.segment_document(s));
    END LOOP;
    FOR f IN SELECT * FROM flagship.features x
              WHERE x.organization_id = p.organization_id AND x.project_id = p.id ORDER BY x.key LOOP
        flags := array_append(flags, flagship.flag_document(f));
    END LOOP;
    FOR m IN SELECT * FROM flagship.metrics x
              WHERE x.organization_id = p.organization_id AND x.project_id = p.id ORDER BY x.key LOOP
        metrics := array_append(metrics, flagship.metric_document(m));
    END LOOP;
    FOR pl IN SELECT * FROM flagship.plans x
               WHERE x.organization_id = p.organization_id AND x.project_id = p.id ORDER BY x.key LOOP
        plans := array_append(plans, flagship.plan_document(pl));
    END LOOP;
    IF export_project.customers THEN
        SELECT jsonb_object_agg(e.id, e.key) INTO environment_keys FROM flagship.environments e
         WHERE e.organization_id = p.organization_id AND e.project_id = p.id;
        FOR c IN SELECT x.* FROM flagship.customers x
                   JOIN flagship.environments e ON e.organization_id = x.organization_id AND e.id = x.environment_id
                  WHERE x.organization_id = p.organization_id AND x.project_id = p.id
                  ORDER BY e.key, x.external_key LOOP
            customer_documents := array_append(customer_documents,
                flagship.customer_document(c)
                || jsonb_build_object('environment', environment_keys ->> c.environment_id::text));
        END LOOP;
    END IF;
    RETURN jsonb_build_object(
        'format', 'flagship.project/1',
        'project', jsonb_build_object('key', p.key, 'name', p.name),
        'environments', (SELECT jsonb_agg(jsonb_build_object('key', e.key, 'name', e.name,
                                                              'is_default', e.is_default)
                                          ORDER BY NOT e.is_default, e.created_at, e.key)
                           FROM flagship.environments e
                          WHERE e.organization_id = p.organization_id AND e.project_id = p.id),
        'segments', to_jsonb(segments), 'flags', to_jsonb(flags), 'metrics', to_jsonb(metrics),
        'plans', to_jsonb(plans))
        || CASE WHEN export_project.customers THEN jsonb_build_object('customers', to_jsonb(customer_documents))
                ELSE '{}'::jsonb END;
END
$fn$;

CREATE OR REPLACE FUNCTION flagship.import_project(organization_id uuid, document jsonb) RETURNS uuid
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    new_project uuid;
    item jsonb;
    pending jsonb[];
    still_pending jsonb[];
BEGIN
    IF document IS NULL OR jsonb_typeof(document->'project') <> 'object' THEN
        RAISE EXCEPTION 'import_project: "project" must be an object with key and name'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF document ? 'format' AND document->>'format' IS DISTINCT FROM 'flagship.project/1' THEN
        RAISE EXCEPTION 'import_project: format: unsupported "%"', document->>'format'
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'this version reads "format": "flagship.project/1", as export_project writes';
    END IF;
    IF EXISTS (SELECT FROM flagship.projects p
                WHERE p.organization_id = import_project.organization_id
                  AND p.key = document->'project'->>'key') THEN
        RAISE EXCEPTION 'import_project: organization % already has project "%"',
            organization_id, document->'project'->>'key'
            USING ERRCODE = 'unique_violation',
                  HINT = 'flagship.apply_project updates an existing project (plan_project shows what it would change)';
    END IF;
    new_project := flagship.create_project(
        organization_id, document->'project'->>'key', document->'project'->>'name',
        coalesce((SELECT array_agg(e->>'key' ORDER BY ordinality)
                    FROM jsonb_array_elements(document->'environments') WITH ORDINALITY AS x(e, ordinality)),
                 '{development,staging,production}'));
    FOR item IN SELECT * FROM jsonb_array_elements(coalesce(document->'segments', '[]')) LOOP
        PERFORM flagship.put_segment(new_project::text, item);
    END LOOP;
    -- Prerequisites must exist before the flags that name them.
    SELECT coalesce(array_agg(f), '{}') INTO pending
      FROM jsonb_array_elements(coalesce(document->'flags', '[]')) f;
    WHILE cardinality(pending) > 0 LOOP
        still_pending := '{}';
        FOREACH item IN ARRAY pending LOOP
            IF EXISTS (SELECT FROM jsonb_array_elements(coalesce(item->'prerequisites', '[]')) p
                        WHERE NOT EXISTS (SELECT FROM flagship.features f
                                           WHERE f.organization_id = import_project.organization_id
                                             AND f.project_id = new_project AND f.key = p->>'flag')) THEN
                still_pending := still_pending || item;
            ELSE
                PERFORM flagship.put_flag(new_project::text, item);
            END IF;
        END LOOP;
        IF cardinality(still_pending) = cardinality(pending) THEN
            -- Nothing moved: let put_flag report the missing prerequisite.
            PERFORM flagship.put_flag(new_project::text, pending[1]);
        END IF;
        pending := still_pending;
    END LOOP;
    -- Plans name flags and metrics; customers name plans and metrics.
    FOR item IN SELECT * FROM jsonb_array_elements(coalesce(document->'metrics', '[]')) LOOP
        PERFORM flagship.put_metric(new_project::text, item);
    END LOOP;
    FOR item IN SELECT * FROM jsonb_array_elements(coalesce(document->'plans', '[]')) LOOP
        PERFORM flagship.put_plan(new_project::text, item);
    END LOOP;
    FOR item IN SELECT * FROM jsonb_array_elements(coalesce(document->'customers', '[]')) LOOP
        PERFORM flagship.put_customer(
            coalesce((SELECT e.id::text FROM flagship.environments e
                       WHERE e.organization_id = import_project.organization_id
                         AND e.project_id = new_project AND e.key = item->>'environment'),
                     coalesce(item->>'environment', 'customer without "environment"')),
            item - 'environment');
    END LOOP;
    RETURN new_project;
END
$fn$;

CREATE  FUNCTION "json_merge_patch"(
	"target" jsonb, /* DocumentArg */
	"patch" jsonb /* DocumentArg */
) RETURNS jsonb /* JsonB */
IMMUTABLE STRICT PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'json_merge_patch_wrapper';

-- Operating FlagShip day to day (0.3): patch one flag, and flags as code
-- (plan a project document against what is stored, then apply it). Every
-- function here runs with its caller's rights: row-level security and the
-- table grants decide what each may change, as for the put_ functions.

-- Changes part of a flag: the stored document with a JSON Merge Patch
-- (RFC 7396) applied, written back through put_flag, so it is validated and
-- audited exactly as put_flag is. `null` removes a member (an environment's
-- configuration, say).
CREATE FUNCTION flagship.patch_flag(project text, patch jsonb) RETURNS uuid
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    target_project flagship.projects;
    feature_row flagship.features;
BEGIN
    IF jsonb_typeof(patch) IS DISTINCT FROM 'object'
       OR jsonb_typeof(patch->'key') IS DISTINCT FROM 'string' THEN
        RAISE EXCEPTION 'patch_flag: the patch must be a JSON object naming its flag in "key"'
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'for example {"key": "checkout", "environments": {"production": {"enabled": false}}}';
    END IF;
    target_project := flagship.project_row(project);
    -- The row first, then its document: a row of a query Citus sends to a
    -- shard is of the shard's row type, which flag_document does not take
    -- (#21).
    SELECT * INTO feature_row
      FROM flagship.features f
     WHERE f.organization_id = target_project.organization_id AND f.project_id = target_project.id
       AND f.key = patch->>'key';
    IF NOT FOUND THEN
        RAISE EXCEPTION 'flag "%" not found in project "%"', patch->>'key', project
            USING ERRCODE = 'undefined_object',
                  HINT = 'patch_flag changes an existing flag; create one with flagship.put_flag';
    END IF;
    RETURN flagship.put_flag(target_project.id::text,
                             flagship.json_merge_patch(flagship.flag_document(feature_row), patch));
END
$fn$;

-- Every configuration item of a project as the document export_project
-- writes for it, keyed "<kind> <key>" (customers: "<environment>/<key>").
-- Both sides of a plan are read through it, so "unchanged" compares like
-- with like.
CREATE FUNCTION flagship.project_items(project_id uuid, with_customers boolean) RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
-- Read from export_project's document: one reader of a project for both.
DECLARE
    exported jsonb;
BEGIN
    IF project_id IS NULL THEN
        RETURN '{}';
    END IF;
    exported := flagship.export_project(project_id::text, with_customers);
    RETURN jsonb_build_object('project ' || (exported->'project'->>'key'), exported->'project')
        || coalesce((SELECT jsonb_object_agg(kinds.kind || ' ' || CASE kinds.kind
                                                 WHEN 'customer' THEN (item->>'environment') || '/' || (item->>'key')
                                                 ELSE item->>'key' END,
                                             item)
                       FROM (VALUES ('environment', 'environments'), ('segment', 'segments'), ('flag', 'flags'),
                                    ('metric', 'metrics'), ('plan', 'plans'), ('customer', 'customers'))
                            AS kinds (kind, field),
                            jsonb_array_elements(coalesce(exported->kinds.field, '[]')) AS item), '{}');
END
$fn$;

-- Field by field, what differs between two documents of one item:
-- {"<field>": {"old": ..., "new": ...}}, a flag's environments one by one
-- ("environments.production"). A missing field is null.
CREATE FUNCTION flagship.document_changes(old jsonb, new jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
    WITH old_fields AS (
        SELECT f.key AS field, f.value FROM jsonb_each(coalesce(old, '{}')) f
         WHERE f.key <> 'environments' OR jsonb_typeof(f.value) <> 'object'
        UNION ALL
        SELECT 'environments.' || e.key, e.value
          FROM jsonb_each(CASE WHEN jsonb_typeof(old->'environments') = 'object'
                               THEN old->'environments' ELSE '{}' END) e
    ), new_fields AS (
        SELECT f.key AS field, f.value FROM jsonb_each(coalesce(new, '{}')) f
         WHERE f.key <> 'environments' OR jsonb_typeof(f.value) <> 'object'
        UNION ALL
        SELECT 'environments.' || e.key, e.value
          FROM jsonb_each(CASE WHEN jsonb_typeof(new->'environments') = 'object'
                               THEN new->'environments' ELSE '{}' END) e
    )
    SELECT coalesce(jsonb_object_agg(coalesce(o.field, n.field),
                                     jsonb_build_object('old', o.value, 'new', n.value)), '{}')
      FROM old_fields o FULL JOIN new_fields n ON n.field = o.field
     WHERE o.value IS DISTINCT FROM n.value
$fn$;

-- Writes a project document into the session's organization: the project
-- (created with its environments when missing, renamed otherwise), missing
-- environments, then segments, flags (prerequisites first), metrics, plans
-- and customers, each through its put_ function. `selected` limits the writes
-- to the items it lists ("<kind> <key>", as project_items names them); NULL
-- writes everything. Deletes nothing. Returns the project's id.
CREATE FUNCTION flagship.write_project(organization_id uuid, document jsonb, selected jsonb)
RETURNS uuid
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    target_project uuid;
    project_key text := document->'project'->>'key';
    item jsonb;
    pending jsonb[];
    still_pending jsonb[];
    position int := 0;
BEGIN
    SELECT p.id INTO target_project FROM flagship.projects p
     WHERE p.organization_id = write_project.organization_id AND p.key = project_key;
    IF target_project IS NULL THEN
        target_project := flagship.create_project(
            organization_id, project_key, document->'project'->>'name',
            coalesce((SELECT array_agg(e->>'key' ORDER BY ordinality)
                        FROM jsonb_array_elements(document->'environments') WITH ORDINALITY AS x(e, ordinality)),
                     '{development,staging,production}'));
    ELSIF selected IS NULL OR selected ? ('project ' || project_key) THEN
        UPDATE flagship.projects p SET name = coalesce(document->'project'->>'name', p.key)
         WHERE p.id = target_project AND p.name IS DISTINCT FROM coalesce(document->'project'->>'name', p.key);
    END IF;
    FOR item IN SELECT * FROM jsonb_array_elements(coalesce(document->'environments', '[]')) LOOP
        position := position + 1;
        IF jsonb_typeof(item) <> 'object' OR jsonb_typeof(item->'key') <> 'string' THEN
            RAISE EXCEPTION 'project "%": environments[%] must be an object with a "key"', project_key, position
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        IF selected IS NOT NULL AND NOT selected ? ('environment ' || (item->>'key')) THEN
            CONTINUE;
        END IF;
        IF (item->>'key') !~ '^[a-z0-9][a-z0-9_.-]*$' OR length(item->>'key') > 63 THEN
            RAISE EXCEPTION 'project "%": environments[%]: key "%" is invalid', project_key, position, item->>'key'
                USING ERRCODE = 'invalid_parameter_value',
                      HINT = 'key: lowercase letters, digits, ''_'', ''.'' and ''-''';
        END IF;
        -- The default moves in two steps: the partial unique index allows
        -- one default per project at any moment.
        IF coalesce((item->>'is_default')::boolean, false) THEN
            UPDATE flagship.environments e SET is_default = false
             WHERE e.project_id = target_project AND e.is_default AND e.key <> item->>'key';
        END IF;
        INSERT INTO flagship.environments AS e (organization_id, project_id, key, name, is_default)
        VALUES (organization_id, target_project, item->>'key',
                coalesce(item->>'name', initcap(item->>'key')),
                coalesce((item->>'is_default')::boolean, false))
        ON CONFLICT ON CONSTRAINT environments_key_unique DO UPDATE
           SET name = EXCLUDED.name, is_default = EXCLUDED.is_default
         WHERE (e.name, e.is_default) IS DISTINCT FROM (EXCLUDED.name, EXCLUDED.is_default);
    END LOOP;
    FOR item IN SELECT * FROM jsonb_array_elements(coalesce(document->'segments', '[]')) LOOP
        IF selected IS NULL OR selected ? ('segment ' || (item->>'key')) THEN
            PERFORM flagship.put_segment(target_project::text, item);
        END IF;
    END LOOP;
    -- Prerequisites must exist before the flags that name them.
    SELECT coalesce(array_agg(f), '{}') INTO pending
      FROM jsonb_array_elements(coalesce(document->'flags', '[]')) f
     WHERE selected IS NULL OR selected ? ('flag ' || (f->>'key'));
    WHILE cardinality(pending) > 0 LOOP
        still_pending := '{}';
        FOREACH item IN ARRAY pending LOOP
            IF EXISTS (SELECT FROM jsonb_array_elements(coalesce(item->'prerequisites', '[]')) p
                        WHERE NOT EXISTS (SELECT FROM flagship.features f
                                           WHERE f.project_id = target_project AND f.key = p->>'flag')) THEN
                still_pending := still_pending || item;
            ELSE
                PERFORM flagship.put_flag(target_project::text, item);
            END IF;
        END LOOP;
        IF cardinality(still_pending) = cardinality(pending) THEN
            -- Nothing moved: let put_flag report the missing prerequisite.
            PERFORM flagship.put_flag(target_project::text, pending[1]);
        END IF;
        pending := still_pending;
    END LOOP;
    -- Plans name flags and metrics; customers name plans and metrics.
    FOR item IN SELECT * FROM jsonb_array_elements(coalesce(document->'metrics', '[]')) LOOP
        IF selected IS NULL OR selected ? ('metric ' || (item->>'key')) THEN
            PERFORM flagship.put_metric(target_project::text, item);
        END IF;
    END LOOP;
    FOR item IN SELECT * FROM jsonb_array_elements(coalesce(document->'plans', '[]')) LOOP
        IF selected IS NULL OR selected ? ('plan ' || (item->>'key')) THEN
            PERFORM flagship.put_plan(target_project::text, item);
        END IF;
    END LOOP;
    FOR item IN SELECT * FROM jsonb_array_elements(coalesce(document->'customers', '[]')) LOOP
        IF jsonb_typeof(item->'environment') IS DISTINCT FROM 'string' THEN
            RAISE EXCEPTION 'customer "%": "environment" must name one of the project''s environments', item->>'key'
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        IF selected IS NULL OR selected ? ('customer ' || (item->>'environment') || '/' || (item->>'key')) THEN
            PERFORM flagship.put_customer(
                coalesce((SELECT e.id::text FROM flagship.environments e
                           WHERE e.project_id = target_project AND e.key = item->>'environment'),
                         item->>'environment'),
                item - 'environment');
        END IF;
    END LOOP;
    RETURN target_project;
END
$fn$;

-- Whether a project document lists an item of a kind it manages.
CREATE FUNCTION flagship.document_lists(document jsonb, kind text, key text) RETURNS boolean
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT EXISTS (SELECT FROM jsonb_array_elements(coalesce(document->(kind || 's'), '[]')) i
                    WHERE CASE WHEN kind = 'customer' THEN (i->>'environment') || '/' || (i->>'key')
                               ELSE i->>'key' END = document_lists.key)
$fn$;

-- What applying `document` would change, and with `apply` the change made:
-- {"create": [...], "update": [...], "delete": [...], "unchanged": n}, each
-- item {"kind", "key", "changes"}. The document is first written in a
-- savepoint that is rolled back, so each item's new state is read back in
-- the form export_project gives it (defaults filled in) and compared with
-- the stored one; then, when applying, only the items that differ are
-- written. Items the document lacks are listed under "delete" by a plan and
-- deleted by apply only with `prune`, for the kinds the document has a list
-- of (a document without "customers" says nothing about customers).
-- Environments and the project itself are never deleted.
CREATE FUNCTION flagship.project_changes(organization_id uuid, document jsonb, prune boolean, apply boolean)
RETURNS jsonb
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    caller text := CASE WHEN apply THEN 'apply_project' ELSE 'plan_project' END;
    session_organization uuid := flagship.current_organization_id();
    project_key text;
    target_project uuid;
    with_customers boolean;
    managed text[];
    before jsonb := '{}';
    after jsonb;
    wanted jsonb;
    creates jsonb := '[]';
    updates jsonb := '[]';
    deletes jsonb := '[]';
    unchanged int := 0;
    entry record;
    item_kind text;
    item_key text;
    kind_order constant text[] := '{project,environment,segment,flag,metric,plan,customer}';
BEGIN
    IF jsonb_typeof(document) IS DISTINCT FROM 'object' THEN
        RAISE EXCEPTION '%: the document must be a JSON object (export_project''s output)', caller
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF document->>'format' IS DISTINCT FROM 'flagship.project/1' THEN
        RAISE EXCEPTION '%: format: unsupported "%"', caller, coalesce(document->>'format', 'nothing')
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'this version reads "format": "flagship.project/1", as export_project writes';
    END IF;
    IF jsonb_typeof(document->'project') IS DISTINCT FROM 'object'
       OR jsonb_typeof(document->'project'->'key') IS DISTINCT FROM 'string' THEN
        RAISE EXCEPTION '%: project: must be an object with a "key" and a "name"', caller
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF session_organization IS NULL AND NOT (SELECT r.rolsuper FROM pg_roles r WHERE r.rolname = current_user) THEN
        RAISE EXCEPTION '%: no organization in this session', caller
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'SET LOCAL flagship.organization_id to the organization (or sign in with a JWT or an API key)';
    END IF;
    IF session_organization IS DISTINCT FROM organization_id AND session_organization IS NOT NULL THEN
        RAISE EXCEPTION '%: this session works in organization %, not %', caller, session_organization, organization_id
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'flagship.organization_id names the organization a session may change';
    END IF;
    IF NOT EXISTS (SELECT FROM flagship.organizations o WHERE o.id = project_changes.organization_id) THEN
        RAISE EXCEPTION '%: organization "%" not found', caller, organization_id
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    project_key := document->'project'->>'key';
    with_customers := document ? 'customers';
    managed := ARRAY(SELECT k FROM unnest('{segment,flag,metric,plan,customer}'::text[]) k
                      WHERE document ? (k || 's'));
    SELECT p.id INTO target_project FROM flagship.projects p
     WHERE p.organization_id = project_changes.organization_id AND p.key = project_key;
    IF target_project IS NOT NULL THEN
        before := flagship.project_items(target_project, with_customers);
    END IF;

    -- The trial: everything written, read back (by a statement of its own,
    -- which sees the writes), rolled back.
    BEGIN
        target_project := flagship.write_project(organization_id, document, NULL);
        after := flagship.project_items(target_project, with_customers);
        RAISE EXCEPTION USING ERRCODE = 'FS000';
    EXCEPTION WHEN SQLSTATE 'FS000' THEN
        NULL;
    END;

    wanted := '{}';
    FOR entry IN SELECT * FROM jsonb_each(after) ORDER BY array_position(kind_order, split_part(key, ' ', 1)), key LOOP
        item_kind := split_part(entry.key, ' ', 1);
        item_key := substr(entry.key, length(item_kind) + 2);
        -- Items the trial kept only because nothing deletes there.
        IF before ? entry.key AND item_kind = ANY (managed) AND NOT flagship.document_lists(document, item_kind, item_key) THEN
            CONTINUE;
        END IF;
        IF NOT before ? entry.key THEN
            creates := creates || jsonb_build_object('kind', item_kind, 'key', item_key,
                                                     'changes', flagship.document_changes(NULL, entry.value));
            wanted := wanted || jsonb_build_object(entry.key, true);
        ELSIF before->entry.key <> entry.value THEN
            updates := updates || jsonb_build_object('kind', item_kind, 'key', item_key,
                                                     'changes', flagship.document_changes(before->entry.key, entry.value));
            wanted := wanted || jsonb_build_object(entry.key, true);
        ELSE
            unchanged := unchanged + 1;
        END IF;
    END LOOP;
    FOR entry IN SELECT * FROM jsonb_each(before) ORDER BY array_position(kind_order, split_part(key, ' ', 1)) DESC, key LOOP
        item_kind := split_part(entry.key, ' ', 1);
        item_key := substr(entry.key, length(item_kind) + 2);
        IF item_kind = ANY (managed) AND NOT flagship.document_lists(document, item_kind, item_key) THEN
            deletes := deletes || jsonb_build_object('kind', item_kind, 'key', item_key,
                                                     'changes', flagship.document_changes(entry.value, NULL));
        END IF;
    END LOOP;

    IF apply THEN
        IF wanted <> '{}' THEN
            target_project := flagship.write_project(organization_id, document, wanted);
        END IF;
        IF prune THEN
            -- Dependants first: customers name plans, plans name metrics and
            -- flags, flags name segments.
            FOR entry IN SELECT value FROM jsonb_array_elements(deletes) LOOP
                item_kind := entry.value->>'kind';
                item_key := entry.value->>'key';
                CASE item_kind
                WHEN 'customer' THEN
                    DELETE FROM flagship.customers c USING flagship.environments e
                     WHERE c.project_id = target_project AND e.organization_id = c.organization_id
                       AND e.id = c.environment_id AND e.key || '/' || c.external_key = item_key;
                WHEN 'plan' THEN
                    DELETE FROM flagship.plans p WHERE p.project_id = target_project AND p.key = item_key;
                WHEN 'metric' THEN
                    DELETE FROM flagship.metrics m WHERE m.project_id = target_project AND m.key = item_key;
                WHEN 'flag' THEN
                    DELETE FROM flagship.features f WHERE f.project_id = target_project AND f.key = item_key;
                WHEN 'segment' THEN
                    DELETE FROM flagship.segments s WHERE s.project_id = target_project AND s.key = item_key;
                END CASE;
            END LOOP;
        ELSE
            deletes := '[]';
        END IF;
    END IF;
    RETURN jsonb_build_object('create', creates, 'update', updates, 'delete', deletes, 'unchanged', unchanged);
END
$fn$;

CREATE FUNCTION flagship.plan_project(organization_id uuid, document jsonb) RETURNS jsonb
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT flagship.project_changes(organization_id, document, false, false)
$fn$;

CREATE FUNCTION flagship.apply_project(organization_id uuid, document jsonb, prune boolean DEFAULT false)
RETURNS jsonb
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT flagship.project_changes(organization_id, document, prune, true)
$fn$;

-- An idempotency key used again for another customer, metric or amount is
-- refused (#17): record_usage looks a key up across the organization.
CREATE INDEX usage_ledger_idempotency_by_key
    ON flagship.usage_ledger (organization_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;

-- Why an evaluation answered as it did (#17).
CREATE  FUNCTION "explain_evaluation"(
	"flag_key" TEXT, /* & str */
	"context" jsonb DEFAULT '{}', /* Option < JsonbArg > */
	"environment" TEXT DEFAULT NULL /* Option < & str > */
) RETURNS jsonb /* pgrx :: JsonB */
STABLE PARALLEL RESTRICTED
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'explain_evaluation_wrapper';


-- Refusals name the missing permission, and refusals of plans, customers
-- and metrics name the object (#17): every put_ function and
-- create_project asks flagship.require_permission first.

-- Refuses, before anything is written, an actor who may not use
-- `permission` in the session's organization, naming what is missing and
-- how to get it; the policies would refuse anyway, but only with "new row
-- violates row-level security policy". Roles that bypass row-level
-- security (superusers, BYPASSRLS) and sessions without an organization
-- are left to the policies.

CREATE FUNCTION flagship.require_permission(permission text, action text) RETURNS void
LANGUAGE plpgsql
STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    granting text;
BEGIN
    IF flagship.current_organization_id() IS NULL
       OR (SELECT r.rolsuper OR r.rolbypassrls FROM pg_roles r WHERE r.rolname = current_user)
       OR flagship.actor_may(permission) THEN
        RETURN;
    END IF;
    IF flagship.current_key_id() IS NOT NULL THEN
        RAISE EXCEPTION '%: this transaction''s API key lacks the scope %', action, permission
            USING ERRCODE = 'insufficient_privilege',
                  HINT = format('issue a key with %s (flagship.issue_api_key(..., scopes => ARRAY[%L]))',
                                permission, permission);
    END IF;
    SELECT string_agg(DISTINCT r.key, ', ' ORDER BY r.key) INTO granting
      FROM flagship.roles r
      JOIN flagship.role_permissions rp ON rp.organization_id = r.organization_id AND rp.role_id = r.id
     WHERE r.organization_id = flagship.current_organization_id() AND rp.permission = require_permission.permission;
    RAISE EXCEPTION '%: actor "%" lacks the permission % in organization %',
        action, flagship.current_actor(), permission, flagship.current_organization_id()
        USING ERRCODE = 'insufficient_privilege',
              HINT = format('a member with one of these roles has it: %s; an owner or admin adds the member in flagship.members and the role in flagship.member_roles',
                            coalesce(granting, 'none'));
END
$fn$;

CREATE OR REPLACE FUNCTION flagship.create_project(
    organization_id uuid,
    key text,
    name text,
    environments text[] DEFAULT '{development,staging,production}')
RETURNS uuid
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    new_id uuid;
    env_key text;
    position int := 0;
BEGIN
    PERFORM flagship.require_permission('projects:write', 'create_project');
    IF NOT EXISTS (SELECT 1 FROM flagship.organizations o WHERE o.id = create_project.organization_id) THEN
        RAISE EXCEPTION 'organization "%" not found', create_project.organization_id
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'the organization must exist and match the session''s flagship.organization_id';
    END IF;
    IF key IS NULL OR key !~ '^[a-z0-9][a-z0-9_.-]*$' OR length(key) > 63 THEN
        RAISE EXCEPTION 'project key "%" is invalid', key
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'key: lowercase letters, digits, ''_'', ''.'' and ''-'', starting with a letter or digit';
    END IF;
    IF environments IS NULL OR cardinality(environments) = 0 THEN
        RAISE EXCEPTION 'project "%" needs at least one environment', key
            USING ERRCODE = 'invalid_parameter_value';
    END IF;

    INSERT INTO flagship.projects (organization_id, key, name)
    VALUES (create_project.organization_id, create_project.key, coalesce(create_project.name, create_project.key))
    RETURNING id INTO new_id;

    FOREACH env_key IN ARRAY environments LOOP
        position := position + 1;
        IF env_key IS NULL OR env_key !~ '^[a-z0-9][a-z0-9_.-]*$' OR length(env_key) > 63 THEN
            RAISE EXCEPTION 'environment key "%" is invalid', env_key
                USING ERRCODE = 'invalid_parameter_value',
                      HINT = 'environments[' || position || ']: lowercase letters, digits, ''_'', ''.'' and ''-''';
        END IF;
        -- The first environment listed is where evaluations without one land.
        INSERT INTO flagship.environments (organization_id, project_id, key, name, is_default)
        VALUES (create_project.organization_id, new_id, env_key, initcap(env_key), position = 1);
    END LOOP;

    RETURN new_id;
END
$fn$;

CREATE OR REPLACE FUNCTION flagship.put_segment(project text, definition jsonb)
RETURNS uuid
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    project_row flagship.projects;
    segment_id uuid;
BEGIN
    PERFORM flagship.require_permission('features:write', 'put_segment');
    project_row := flagship.project_row(project);
    PERFORM flagship.validate_segment(definition);
    INSERT INTO flagship.segments AS s
        (organization_id, project_id, key, name, description, included, excluded, conditions)
    VALUES (project_row.organization_id, project_row.id, definition->>'key',
            definition->>'name', definition->>'description',
            coalesce(definition->'included', '[]'), coalesce(definition->'excluded', '[]'),
            coalesce(definition->'conditions', '[]'))
    ON CONFLICT ON CONSTRAINT segments_key_unique DO UPDATE
       SET name = EXCLUDED.name, description = EXCLUDED.description,
           included = EXCLUDED.included, excluded = EXCLUDED.excluded,
           conditions = EXCLUDED.conditions
    RETURNING s.id INTO segment_id;
    RETURN segment_id;
END
$fn$;

CREATE OR REPLACE FUNCTION flagship.put_flag(project text, definition jsonb)
RETURNS uuid
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    project_row flagship.projects;
    normalized jsonb;
    unmet record;
    segment_key text;
    saved_feature uuid;
    environment_key text;
    config jsonb;
    saved_environment uuid;
BEGIN
    PERFORM flagship.require_permission('features:write', 'put_flag');
    project_row := flagship.project_row(project);
    -- Validate the whole document first, so errors name paths in it.
    normalized := flagship.validate_flag(definition);
    -- References to other rows are checked here first, so that errors name
    -- paths in the document; deferred triggers hold plain SQL to the same
    -- rules at commit (features_check_references).
    SELECT * INTO unmet
      FROM flagship.unmet_prerequisites(project_row.organization_id, project_row.id,
                                        normalized->'prerequisites')
     LIMIT 1;
    PERFORM flagship.refuse_unmet_prerequisite(normalized->>'key', unmet.flag, unmet.variant);
    FOR environment_key, segment_key IN
        SELECT env.key, rule->>'segment'
          FROM jsonb_each(coalesce(definition->'environments', '{}')) env
         CROSS JOIN LATERAL jsonb_array_elements(coalesce(env.value->'rules', '[]')) rule
         WHERE rule ? 'segment'
    LOOP
        IF NOT EXISTS (SELECT 1 FROM flagship.segments s
                        WHERE s.organization_id = project_row.organization_id
                          AND s.project_id = project_row.id AND s.key = segment_key) THEN
            RAISE EXCEPTION 'flag "%": environments.%.rules: unknown segment "%"',
                normalized->>'key', environment_key, segment_key
                USING ERRCODE = 'invalid_parameter_value',
                      HINT = 'create it with flagship.put_segment first';
        END IF;
    END LOOP;

    INSERT INTO flagship.features AS f
        (organization_id, project_id, key, kind, name, description, variants,
         off_variant, prerequisites, salt, archived, bucketing)
    VALUES (project_row.organization_id, project_row.id, normalized->>'key',
            normalized->>'kind', normalized->>'name', normalized->>'description',
            normalized->'variants', normalized->>'off_variant', normalized->'prerequisites',
            normalized->>'salt', (normalized->>'archived')::boolean, normalized->>'bucketing')
    ON CONFLICT ON CONSTRAINT features_key_unique DO UPDATE
       SET kind = EXCLUDED.kind, name = EXCLUDED.name, description = EXCLUDED.description,
           variants = EXCLUDED.variants, off_variant = EXCLUDED.off_variant,
           prerequisites = EXCLUDED.prerequisites, salt = EXCLUDED.salt,
           archived = EXCLUDED.archived, bucketing = EXCLUDED.bucketing
    RETURNING f.id INTO saved_feature;

    -- A document with "environments" is the whole truth about them: the
    -- environments it leaves out lose their configuration (and so are off).
    IF definition ? 'environments' THEN
        FOR environment_key, config IN SELECT * FROM jsonb_each(coalesce(definition->'environments', '{}')) LOOP
            SELECT e.id INTO saved_environment
              FROM flagship.environments e
             WHERE e.organization_id = project_row.organization_id
               AND e.project_id = project_row.id AND e.key = environment_key;
            IF saved_environment IS NULL THEN
                RAISE EXCEPTION 'flag "%": environments.%: project "%" has no such environment',
                    normalized->>'key', environment_key, project_row.key
                    USING ERRCODE = 'invalid_parameter_value';
            END IF;
            INSERT INTO flagship.feature_rules AS r
                (organization_id, project_id, feature_id, environment_id, enabled, targets, rules, default_serve)
            VALUES (project_row.organization_id, project_row.id, saved_feature, saved_environment,
                    coalesce((config->>'enabled')::boolean, false),
                    coalesce(config->'targets', '{}'), coalesce(config->'rules', '[]'),
                    config->'default')
            ON CONFLICT ON CONSTRAINT feature_rules_pkey DO UPDATE
               SET enabled = EXCLUDED.enabled, targets = EXCLUDED.targets,
                   rules = EXCLUDED.rules, default_serve = EXCLUDED.default_serve;
        END LOOP;
        DELETE FROM flagship.feature_rules r
         USING flagship.environments e
         WHERE r.organization_id = project_row.organization_id AND r.feature_id = saved_feature
           AND e.organization_id = r.organization_id AND e.id = r.environment_id
           AND NOT (coalesce(definition->'environments', '{}') ? e.key);
    END IF;
    RETURN saved_feature;
END
$fn$;

CREATE OR REPLACE FUNCTION flagship.put_metric(project text, definition jsonb) RETURNS uuid
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    refused text;
    refused_hint text;
    target_project uuid := flagship.resolve_project(project);
    saved uuid;
BEGIN
    PERFORM flagship.require_permission('plans:write', 'put_metric');
    PERFORM flagship.require_object(definition, 'metric', '{key,name,unit,aggregation,description}');
    PERFORM flagship.check_key_format(definition->>'key', 'key');
    IF coalesce(definition->>'aggregation', 'sum') NOT IN ('sum', 'gauge') THEN
        PERFORM flagship.refuse('aggregation', 'must be sum or gauge');
    END IF;
    INSERT INTO flagship.metrics AS m (organization_id, project_id, key, name, unit, aggregation)
    SELECT p.organization_id, p.id, definition->>'key', definition->>'name', definition->>'unit',
           coalesce(definition->>'aggregation', 'sum')
      FROM flagship.projects p WHERE p.id = target_project
    ON CONFLICT ON CONSTRAINT metrics_key_unique DO UPDATE
       SET name = EXCLUDED.name, unit = EXCLUDED.unit, aggregation = EXCLUDED.aggregation,
           updated_at = now()
    RETURNING m.id INTO saved;
    RETURN saved;
EXCEPTION WHEN invalid_parameter_value THEN
    -- Every refusal names the metric it is about, then the field.
    GET STACKED DIAGNOSTICS refused = MESSAGE_TEXT, refused_hint = PG_EXCEPTION_HINT;
    refused := format('metric "%s": %s', coalesce(definition->>'key', '?'), regexp_replace(refused, '^metric: ', ''));
    IF refused_hint = '' THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value', MESSAGE = refused;
    END IF;
    RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value', MESSAGE = refused, HINT = refused_hint;
END
$fn$;

CREATE OR REPLACE FUNCTION flagship.put_plan(project text, definition jsonb) RETURNS uuid
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    refused text;
    refused_hint text;
    project_row flagship.projects;
    saved uuid;
BEGIN
    PERFORM flagship.require_permission('plans:write', 'put_plan');
    project_row := flagship.project_row(project);
    PERFORM flagship.require_object(definition, 'plan', '{key,name,features,limits}');
    PERFORM flagship.check_key_format(definition->>'key', 'key');
    IF jsonb_typeof(coalesce(definition->'features', '{}')) <> 'object' THEN
        PERFORM flagship.refuse('features', 'must be an object of flag key to true/false');
    END IF;
    IF jsonb_typeof(coalesce(definition->'limits', '{}')) <> 'object' THEN
        PERFORM flagship.refuse('limits', 'must be an object of metric key to limit');
    END IF;

    INSERT INTO flagship.plans AS p (organization_id, project_id, key, name)
    VALUES (project_row.organization_id, project_row.id, definition->>'key', definition->>'name')
    ON CONFLICT ON CONSTRAINT plans_key_unique DO UPDATE SET name = EXCLUDED.name, updated_at = now()
    RETURNING p.id INTO saved;

    DELETE FROM flagship.plan_features f WHERE f.organization_id = project_row.organization_id AND f.plan_id = saved;
    INSERT INTO flagship.plan_features (organization_id, project_id, plan_id, feature_key, enabled)
    SELECT project_row.organization_id, project_row.id, saved, s.feature_key, s.enabled
      FROM flagship.feature_switches(project_row.organization_id, project_row.id,
                                     definition->'features', 'features') s;

    DELETE FROM flagship.usage_limits l WHERE l.organization_id = project_row.organization_id AND l.plan_id = saved;
    INSERT INTO flagship.usage_limits
        (organization_id, project_id, plan_id, metric_id, usage_limit, period, enforcement)
    SELECT project_row.organization_id, project_row.id, saved, t.metric_id, t.usage_limit, t.period, t.enforcement
      FROM flagship.metric_limits(project_row.organization_id, project_row.id,
                                  definition->'limits', 'limits') t;
    RETURN saved;
EXCEPTION WHEN invalid_parameter_value THEN
    -- Every refusal names the plan it is about, then the field.
    GET STACKED DIAGNOSTICS refused = MESSAGE_TEXT, refused_hint = PG_EXCEPTION_HINT;
    refused := format('plan "%s": %s', coalesce(definition->>'key', '?'), regexp_replace(refused, '^plan: ', ''));
    IF refused_hint = '' THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value', MESSAGE = refused;
    END IF;
    RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value', MESSAGE = refused, HINT = refused_hint;
END
$fn$;

CREATE OR REPLACE FUNCTION flagship.put_customer(environment text, definition jsonb) RETURNS uuid
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    refused text;
    refused_hint text;
    environment_row flagship.environments;
    plan_row flagship.plans;
    saved uuid;
    new_status text;
    new_trial_end timestamptz;
    new_anchor timestamptz;
BEGIN
    PERFORM flagship.require_permission('plans:write', 'put_customer');
    environment_row := flagship.environment_row(environment);
    PERFORM flagship.require_object(definition, 'customer',
        '{key,name,plan,status,trial_ends_at,billing_anchor,overrides,attributes,environment}');
    -- export_project names each customer's environment: accepted when it is
    -- the one written to, so an exported customer can be put back as is.
    IF definition ? 'environment' AND definition->>'environment' IS DISTINCT FROM environment_row.key THEN
        PERFORM flagship.refuse('environment',
            format('names "%s", but the customer is written to environment "%s"',
                   definition->>'environment', environment_row.key));
    END IF;
    IF jsonb_typeof(definition->'key') IS DISTINCT FROM 'string' OR btrim(definition->>'key') = '' THEN
        PERFORM flagship.refuse('key', 'must be a non-empty string');
    END IF;
    IF jsonb_typeof(coalesce(definition->'attributes', '{}')) <> 'object' THEN
        PERFORM flagship.refuse('attributes', 'must be a JSON object');
    END IF;
    PERFORM flagship.require_object(coalesce(definition->'overrides', '{}'), 'overrides', '{features,limits}');
    new_status := coalesce(definition->>'status', 'active');
    IF new_status NOT IN ('active', 'trialing', 'canceled') THEN
        PERFORM flagship.refuse('status', format('must be active, trialing or canceled, not "%s"', new_status));
    END IF;
    BEGIN
        new_trial_end := (definition->>'trial_ends_at')::timestamptz;
    EXCEPTION WHEN others THEN
        PERFORM flagship.refuse('trial_ends_at', 'must be a timestamp');
    END;
    BEGIN
        new_anchor := (definition->>'billing_anchor')::timestamptz;
    EXCEPTION WHEN others THEN
        PERFORM flagship.refuse('billing_anchor', 'must be a timestamp');
    END;
    IF new_status = 'trialing' AND new_trial_end IS NULL THEN
        PERFORM flagship.refuse('trial_ends_at', 'is required while trialing');
    END IF;
    IF definition ? 'plan' THEN
        SELECT * INTO plan_row FROM flagship.plans p
         WHERE p.organization_id = environment_row.organization_id
           AND p.project_id = environment_row.project_id AND p.key = definition->>'plan';
        IF NOT FOUND THEN
            PERFORM flagship.refuse('plan', format('unknown plan "%s"', definition->>'plan'));
        END IF;
    END IF;

    INSERT INTO flagship.customers AS c
        (organization_id, project_id, environment_id, external_key, name, attributes)
    VALUES (environment_row.organization_id, environment_row.project_id, environment_row.id,
            definition->>'key', definition->>'name', coalesce(definition->'attributes', '{}'))
    ON CONFLICT ON CONSTRAINT customers_key_unique DO UPDATE
       SET name = EXCLUDED.name, attributes = EXCLUDED.attributes, updated_at = now()
    RETURNING c.id INTO saved;

    IF plan_row.id IS NULL THEN
        DELETE FROM flagship.subscriptions s
         WHERE s.organization_id = environment_row.organization_id AND s.customer_id = saved;
    ELSE
        INSERT INTO flagship.subscriptions AS s
            (organization_id, project_id, customer_id, plan_id, status, trial_ends_at, billing_anchor)
        VALUES (environment_row.organization_id, environment_row.project_id, saved, plan_row.id,
                new_status, new_trial_end, coalesce(new_anchor, now()))
        ON CONFLICT (organization_id, customer_id) DO UPDATE
           SET plan_id = EXCLUDED.plan_id, status = EXCLUDED.status,
               trial_ends_at = EXCLUDED.trial_ends_at,
               billing_anchor = coalesce(new_anchor, s.billing_anchor), updated_at = now();
    END IF;

    DELETE FROM flagship.customer_feature_overrides o
     WHERE o.organization_id = environment_row.organization_id AND o.customer_id = saved;
    INSERT INTO flagship.customer_feature_overrides (organization_id, customer_id, feature_key, enabled)
    SELECT environment_row.organization_id, saved, s.feature_key, s.enabled
      FROM flagship.feature_switches(environment_row.organization_id, environment_row.project_id,
                                     definition->'overrides'->'features', 'overrides.features') s;

    DELETE FROM flagship.customer_limit_overrides o
     WHERE o.organization_id = environment_row.organization_id AND o.customer_id = saved;
    INSERT INTO flagship.customer_limit_overrides
        (organization_id, project_id, customer_id, metric_id, usage_limit, period, enforcement)
    SELECT environment_row.organization_id, environment_row.project_id, saved,
           t.metric_id, t.usage_limit, t.period, t.enforcement
      FROM flagship.metric_limits(environment_row.organization_id, environment_row.project_id,
                                  definition->'overrides'->'limits', 'overrides.limits') t;
    RETURN saved;
EXCEPTION WHEN invalid_parameter_value THEN
    -- Every refusal names the customer it is about, then the field.
    GET STACKED DIAGNOSTICS refused = MESSAGE_TEXT, refused_hint = PG_EXCEPTION_HINT;
    refused := format('customer "%s": %s', coalesce(definition->>'key', '?'), regexp_replace(refused, '^customer: ', ''));
    IF refused_hint = '' THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value', MESSAGE = refused;
    END IF;
    RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value', MESSAGE = refused, HINT = refused_hint;
END
$fn$;


-- Keys of customers, with addresses and rotation (#18).
ALTER TABLE flagship.api_keys
    ADD COLUMN customer_id uuid,
    ADD COLUMN allowed_ips cidr[],
    ADD COLUMN rolled_from uuid,
    ADD CONSTRAINT api_keys_customer FOREIGN KEY (organization_id, customer_id)
        REFERENCES flagship.customers (organization_id, id) ON DELETE CASCADE,
    ADD CONSTRAINT api_keys_allowed_ips_present CHECK (array_position(allowed_ips, NULL) IS NULL);
CREATE INDEX api_keys_customer_idx ON flagship.api_keys (organization_id, customer_id)
    WHERE customer_id IS NOT NULL;
GRANT SELECT (customer_id, allowed_ips, rolled_from)
    ON flagship.api_keys TO flagship_admin, flagship_app, flagship_auditor;
GRANT UPDATE (allowed_ips) ON flagship.api_keys TO flagship_admin;

DROP FUNCTION flagship.issue_api_key(uuid, text, text[], text, timestamptz, bigint);
DROP FUNCTION flagship.verify_api_key(text);
DROP FUNCTION flagship.authenticate(text);

-- `customer` (an external key of the key's environment) makes the key the
-- customer's: verification names it, and usage calls in key mode act for
-- it. `allowed_ips` (CIDR, IPv4 or IPv6) limits where it may be used from.
CREATE FUNCTION flagship.issue_api_key(organization_id uuid, name text, scopes text[] DEFAULT '{}',
                                       environment text DEFAULT NULL,
                                       expires_at timestamptz DEFAULT NULL,
                                       usage_limit bigint DEFAULT NULL,
                                       customer text DEFAULT NULL,
                                       allowed_ips text[] DEFAULT NULL)
RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    environment_row flagship.environments;
    secret text;
    plaintext text;
    bad_scope text;
    issuer flagship.api_keys;
    customer_id uuid;
    networks cidr[];
BEGIN
    PERFORM flagship.require_permission('api_keys:write', 'issue_api_key');
    IF organization_id IS NULL
       OR NOT EXISTS (SELECT FROM flagship.organizations o WHERE o.id = issue_api_key.organization_id) THEN
        RAISE EXCEPTION 'organization_id: organization not found'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF name IS NULL OR btrim(name) = '' THEN
        RAISE EXCEPTION 'name: must not be empty' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- A scope is a permission, or every permission of one resource; a typo
    -- is refused now rather than failing at first use.
    SELECT s INTO bad_scope FROM unnest(coalesce(scopes, '{}')) s
     WHERE s IS NULL
        OR NOT EXISTS (SELECT FROM flagship.permissions p
                        WHERE p.key = s OR split_part(p.key, ':', 1) || ':*' = s)
     LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'scopes: "%" is not a scope', coalesce(bad_scope, 'NULL')
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'valid scopes: ' || (SELECT string_agg(k, ', ' ORDER BY k) FROM (
                      SELECT p.key FROM flagship.permissions p
                      UNION SELECT split_part(p.key, ':', 1) || ':*' FROM flagship.permissions p) AS v (k));
    END IF;
    -- A key issues no key wider than itself: within its scopes, its
    -- environment binding, its expiry and its usage limit.
    IF flagship.current_key_id() IS NOT NULL THEN
        SELECT k.scopes, k.environment_id, k.expires_at, k.usage_limit
          INTO issuer.scopes, issuer.environment_id, issuer.expires_at, issuer.usage_limit
          FROM flagship.api_keys k WHERE k.id = flagship.current_key_id();
        IF (cardinality(issuer.scopes) > 0
            AND (cardinality(coalesce(scopes, '{}')) = 0
                 OR EXISTS (SELECT FROM unnest(scopes) s WHERE NOT flagship.key_grants(s))))
           OR (issuer.environment_id IS NOT NULL
               AND (environment IS NULL
                    OR flagship.resolve_environment(environment) IS DISTINCT FROM issuer.environment_id))
           OR (issuer.expires_at IS NOT NULL AND (expires_at IS NULL OR expires_at > issuer.expires_at))
           OR (issuer.usage_limit IS NOT NULL AND usage_limit IS NULL) THEN
            RAISE EXCEPTION 'a key may not issue a key wider than itself'
                USING ERRCODE = 'insufficient_privilege',
                      HINT = 'stay within the scopes, environment, expiry and usage limit of the key this transaction authenticated with';
        END IF;
    END IF;
    IF expires_at IS NOT NULL AND expires_at <= now() THEN
        RAISE EXCEPTION 'expires_at: must be in the future' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF usage_limit IS NOT NULL AND usage_limit <= 0 THEN
        RAISE EXCEPTION 'usage_limit: must be positive' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF environment IS NOT NULL THEN
        environment_row := flagship.environment_row(environment);
        -- A name or uuid of another organization's environment is refused
        -- exactly like one that does not exist.
        IF environment_row.organization_id IS DISTINCT FROM issue_api_key.organization_id THEN
            RAISE EXCEPTION 'environment "%" not found', environment
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
    END IF;

    IF customer IS NOT NULL THEN
        IF environment_row.id IS NULL THEN
            RAISE EXCEPTION 'customer: a customer''s key needs its environment (customers belong to one)'
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        SELECT c.id INTO customer_id FROM flagship.customers c
         WHERE c.organization_id = environment_row.organization_id
           AND c.environment_id = environment_row.id AND c.external_key = customer;
        IF customer_id IS NULL THEN
            RAISE EXCEPTION 'customer: no customer "%" in environment "%"', customer, environment
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
    END IF;
    networks := flagship.parse_networks(allowed_ips, 'allowed_ips');
    -- A key limited to addresses issues none usable from anywhere.
    IF flagship.current_key_id() IS NOT NULL THEN
        SELECT k.allowed_ips, k.customer_id INTO issuer.allowed_ips, issuer.customer_id
          FROM flagship.api_keys k WHERE k.id = flagship.current_key_id();
        IF (issuer.allowed_ips IS NOT NULL
            AND (networks IS NULL OR EXISTS (SELECT FROM unnest(networks) n
                                              WHERE NOT EXISTS (SELECT FROM unnest(issuer.allowed_ips) a
                                                                 WHERE n <<= a))))
           OR (issuer.customer_id IS NOT NULL AND customer_id IS DISTINCT FROM issuer.customer_id) THEN
            RAISE EXCEPTION 'a key may not issue a key wider than itself'
                USING ERRCODE = 'insufficient_privilege',
                      HINT = 'stay within the addresses and the customer of the key this transaction authenticated with';
        END IF;
    END IF;

    secret := replace(gen_random_uuid()::text, '-', '') || replace(gen_random_uuid()::text, '-', '');
    plaintext := CASE WHEN environment_row.key IS NULL OR environment_row.key = 'production'
                      THEN 'fs_live_' ELSE 'fs_test_' END || secret;
    INSERT INTO flagship.api_keys AS k
        (organization_id, name, display_prefix, key_hash, scopes, project_id, environment_id,
         expires_at, usage_limit, customer_id, allowed_ips)
    VALUES (issue_api_key.organization_id, btrim(name), left(plaintext, 16),
            sha256(convert_to(plaintext, 'UTF8')), coalesce(scopes, '{}'),
            environment_row.project_id, environment_row.id, expires_at, usage_limit,
            customer_id, networks);
    RETURN plaintext;
END
$fn$;

-- A CIDR list from text, each entry checked: NULL stays NULL (no limit),
-- anything unparsable is 22023 naming the entry.
CREATE FUNCTION flagship.parse_networks(entries text[], field text) RETURNS cidr[]
LANGUAGE plpgsql
IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    parsed cidr[] := '{}';
    entry text;
    position int := 0;
BEGIN
    IF entries IS NULL THEN
        RETURN NULL;
    END IF;
    IF cardinality(entries) = 0 THEN
        RAISE EXCEPTION '%: must list at least one address or network (NULL: any address)', field
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    FOREACH entry IN ARRAY entries LOOP
        position := position + 1;
        BEGIN
            parsed := parsed || entry::cidr;
        EXCEPTION WHEN others THEN
            RAISE EXCEPTION '%[%]: "%" is not an IPv4 or IPv6 address or network', field, position, coalesce(entry, 'NULL')
                USING ERRCODE = 'invalid_parameter_value',
                      HINT = 'for example 203.0.113.0/24, 198.51.100.7 or 2001:db8::/32';
        END;
        IF entry IS NULL THEN
            RAISE EXCEPTION '%[%]: "NULL" is not an IPv4 or IPv6 address or network', field, position
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
    END LOOP;
    RETURN parsed;
END
$fn$;

-- Verification runs before the caller has any organization, so it is
-- SECURITY DEFINER: it finds the key by hash alone and reveals only what
-- the key itself grants.
CREATE FUNCTION flagship.verify_api_key(key text, client_ip inet DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    key_row flagship.api_keys;
    organization_status text;
    code text;
    uses bigint;
    customer_key text;
BEGIN
    IF key IS NOT NULL AND key ~ '^fs_(live|test)_[0-9a-f]{64}$' THEN
        SELECT * INTO key_row FROM flagship.api_keys k WHERE k.key_hash = sha256(convert_to(key, 'UTF8'));
    END IF;
    IF key_row.id IS NULL THEN
        code := 'NOT_FOUND';
    ELSIF key_row.revoked_at IS NOT NULL THEN
        code := 'REVOKED';
    ELSIF key_row.expires_at IS NOT NULL AND key_row.expires_at <= now() THEN
        code := 'EXPIRED';
    ELSE
        SELECT o.status INTO organization_status FROM flagship.organizations o
         WHERE o.id = key_row.organization_id;
        IF organization_status IS DISTINCT FROM 'active' THEN
            code := 'FORBIDDEN';
        -- An allow-list admits only the addresses it lists: a verification
        -- that does not say where the call comes from is refused too.
        ELSIF key_row.allowed_ips IS NOT NULL
              AND (client_ip IS NULL
                   OR NOT EXISTS (SELECT FROM unnest(key_row.allowed_ips) a WHERE client_ip <<= a)) THEN
            code := 'FORBIDDEN';
        ELSIF key_row.usage_limit IS NOT NULL THEN
            -- Counting uses is a write by nature; only limited keys pay it.
            uses := nextval(flagship.ensure_key_use_sequence(key_row.id, key_row.usage_count));
            IF uses <= key_row.usage_limit THEN
                code := 'VALID';
                UPDATE flagship.api_keys k SET usage_count = greatest(k.usage_count, uses), last_used_at = now()
                 WHERE k.organization_id = key_row.organization_id AND k.id = key_row.id;
            ELSE
                code := 'USAGE_EXCEEDED';
            END IF;
        ELSE
            code := 'VALID';
            -- At most one write a minute per key, so busy keys do not turn
            -- every verification into a hot-row update.
            UPDATE flagship.api_keys k SET last_used_at = now()
             WHERE k.organization_id = key_row.organization_id AND k.id = key_row.id
               AND (k.last_used_at IS NULL OR k.last_used_at < now() - interval '1 minute');
        END IF;
    END IF;
    IF code <> 'VALID' THEN
        RETURN jsonb_build_object('valid', false, 'code', code, 'key_id', NULL,
                                  'organization_id', NULL, 'environment_id', NULL, 'scopes', NULL,
                                  'customer', NULL);
    END IF;
    IF key_row.customer_id IS NOT NULL THEN
        SELECT c.external_key INTO customer_key FROM flagship.customers c
         WHERE c.organization_id = key_row.organization_id AND c.id = key_row.customer_id;
    END IF;
    RETURN jsonb_build_object('valid', true, 'code', code, 'key_id', key_row.id,
                              'organization_id', key_row.organization_id,
                              'environment_id', key_row.environment_id, 'scopes', to_jsonb(key_row.scopes),
                              'customer', customer_key);
END
$fn$;

GRANT EXECUTE ON FUNCTION flagship.verify_api_key(text, inet) TO flagship_admin, flagship_app;
REVOKE EXECUTE ON FUNCTION flagship.verify_api_key(text, inet) FROM PUBLIC;

-- A new key with the same settings (name, scopes, environment, customer,
-- addresses, expiry, usage limit and the uses counted so far, as
-- usage_count shows them: uses spent by verifications whose transactions
-- rolled back are not carried over); the old one keeps verifying for
-- `grace`, then answers EXPIRED. Returns the new key's plaintext, once.
CREATE FUNCTION flagship.roll_api_key(key_id uuid, grace interval DEFAULT '0')
RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    old flagship.api_keys;
    plaintext text;
BEGIN
    PERFORM flagship.require_permission('api_keys:write', 'roll_api_key');
    IF grace IS NULL OR grace < interval '0' THEN
        RAISE EXCEPTION 'grace: must be a non-negative interval' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- Row-level security makes another organization's key look absent; the
    -- row lock makes two concurrent rolls of one key queue.
    SELECT k.organization_id, k.id, k.name, k.display_prefix, k.scopes, k.project_id, k.environment_id,
           k.expires_at, k.revoked_at, k.usage_limit, k.usage_count, k.customer_id, k.allowed_ips
      INTO old.organization_id, old.id, old.name, old.display_prefix, old.scopes, old.project_id,
           old.environment_id, old.expires_at, old.revoked_at, old.usage_limit, old.usage_count,
           old.customer_id, old.allowed_ips
      FROM flagship.api_keys k WHERE k.id = key_id FOR UPDATE;
    IF old.id IS NULL THEN
        RAISE EXCEPTION 'key_id: api key % not found', key_id USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF old.revoked_at IS NOT NULL OR (old.expires_at IS NOT NULL AND old.expires_at <= now()) THEN
        RAISE EXCEPTION 'key_id: api key % is revoked or expired', key_id
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'issue a new key with flagship.issue_api_key';
    END IF;
    plaintext := (CASE WHEN old.display_prefix LIKE 'fs_test_%' THEN 'fs_test_' ELSE 'fs_live_' END)
                 || replace(gen_random_uuid()::text, '-', '') || replace(gen_random_uuid()::text, '-', '');
    INSERT INTO flagship.api_keys
        (organization_id, name, display_prefix, key_hash, scopes, project_id, environment_id,
         expires_at, usage_limit, usage_count, customer_id, allowed_ips, rolled_from)
    VALUES (old.organization_id, old.name, left(plaintext, 16), sha256(convert_to(plaintext, 'UTF8')),
            old.scopes, old.project_id, old.environment_id, old.expires_at, old.usage_limit,
            old.usage_count,
            old.customer_id, old.allowed_ips, old.id);
    UPDATE flagship.api_keys k
       SET expires_at = least(coalesce(k.expires_at, 'infinity'), now() + grace)
     WHERE k.organization_id = old.organization_id AND k.id = old.id;
    RETURN plaintext;
END
$fn$;

CREATE  FUNCTION "authenticate"(
	"key" TEXT, /* Option < & str > */
	"client_ip" inet DEFAULT NULL /* Option < pgrx :: Inet > */
) RETURNS jsonb /* pgrx :: JsonB */
VOLATILE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'authenticate_wrapper';


-- Prepaid credits (#18).
ALTER TABLE flagship.metrics DROP CONSTRAINT metrics_aggregation_valid,
    ADD CONSTRAINT metrics_aggregation_valid CHECK (aggregation IN ('sum', 'gauge', 'credits'));
ALTER TABLE flagship.usage_ledger ADD COLUMN paid_by jsonb;
ALTER POLICY usage_ledger_kind_valid ON flagship.usage_ledger
    WITH CHECK (kind IN ('record', 'set', 'credits'));

-- Prepaid credits (0.3) ------------------------------------------------------
--
-- A metric with "aggregation": "credits" is consumed from the customer's
-- grants instead of counted against a limit: grant_credits adds one (with
-- an optional expiry), record_usage takes from the live grant that expires
-- first (then the next), locking the grants it reads in one fixed order so
-- racing consumers queue instead of deadlocking, and never lets a balance
-- go below zero (CREDITS_EXHAUSTED, nothing recorded). A rollback refunds.
CREATE TABLE flagship.credit_grants (
    organization_id uuid        NOT NULL,
    id              uuid        NOT NULL DEFAULT gen_random_uuid(),
    customer_id     uuid        NOT NULL,
    metric_id       uuid        NOT NULL,
    amount          bigint      NOT NULL,
    remaining       bigint      NOT NULL,
    expires_at      timestamptz,
    idempotency_key text,
    granted_at      timestamptz NOT NULL DEFAULT now(),
    -- 'grant' (grant_credits) or 'plan' (a plan's grant for the period
    -- starting at period_start, made by the period's first consumption).
    source          text        NOT NULL DEFAULT 'grant',
    period_start    timestamptz,
    PRIMARY KEY (organization_id, id),
    FOREIGN KEY (organization_id, customer_id)
        REFERENCES flagship.customers (organization_id, id) ON DELETE CASCADE,
    FOREIGN KEY (organization_id, metric_id)
        REFERENCES flagship.metrics (organization_id, id) ON DELETE CASCADE,
    CONSTRAINT credit_grants_amounts_valid CHECK (amount > 0 AND remaining BETWEEN 0 AND amount),
    CONSTRAINT credit_grants_source_valid
        CHECK (source = 'grant' OR (source = 'plan' AND period_start IS NOT NULL))
);
CREATE INDEX credit_grants_live ON flagship.credit_grants (organization_id, customer_id, metric_id, expires_at)
    WHERE remaining > 0;
CREATE UNIQUE INDEX credit_grants_idempotency ON flagship.credit_grants (organization_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
-- One plan grant per customer, metric and period, however many consumers
-- race to make it.
CREATE UNIQUE INDEX credit_grants_plan_period
    ON flagship.credit_grants (organization_id, customer_id, metric_id, period_start)
    WHERE source = 'plan';
SELECT pg_catalog.pg_extension_config_dump('flagship.credit_grants', '');
ALTER TABLE flagship.credit_grants ENABLE ROW LEVEL SECURITY;
ALTER TABLE flagship.credit_grants FORCE ROW LEVEL SECURITY;
-- Everyone of the organization reads balances; grants are added only by
-- grant_credits for an actor with plans:write (and a plan's own grants by
-- the usage functions), and balances move only while record_usage or
-- grant_credits run.
CREATE POLICY credit_grants_tenant ON flagship.credit_grants FOR SELECT
    USING (organization_id = (SELECT flagship.current_organization_id()));
CREATE POLICY credit_grants_insert ON flagship.credit_grants FOR INSERT
    WITH CHECK (organization_id = (SELECT flagship.current_organization_id())
                AND (source = 'plan' OR (SELECT flagship.actor_may('plans:write')))
                AND (SELECT flagship.usage_writes_open()));
CREATE POLICY credit_grants_update ON flagship.credit_grants FOR UPDATE
    USING (organization_id = (SELECT flagship.current_organization_id())
           AND (SELECT flagship.usage_writes_open()));
CREATE POLICY credit_grants_delete ON flagship.credit_grants FOR DELETE
    USING (organization_id = (SELECT flagship.current_organization_id())
           AND (SELECT flagship.actor_may('plans:write')));
GRANT SELECT ON flagship.credit_grants TO flagship_admin, flagship_app, flagship_auditor;

-- The size of a plan's grant for the period starting at `period_start`:
-- `amount`, plus what the previous period's plan grant left, up to
-- `rollover_max`. After periods with no grant at all (nothing consumed,
-- so nothing was granted) the rollover is least(rollover_max, amount): an
-- unused period would have left at least its own amount.
CREATE FUNCTION flagship.plan_grant_amount(organization_id uuid, customer_id uuid, metric_id uuid,
                                           amount bigint, period_start timestamptz, rollover_max bigint)
RETURNS bigint
LANGUAGE plpgsql
STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
-- PL/pgSQL: Citus cannot plan a SQL function's statements that take
-- parameters, and here the organization is a value of each (#21).
BEGIN
    RETURN (
        SELECT plan_grant_amount.amount + coalesce((
            SELECT CASE WHEN g.expires_at = plan_grant_amount.period_start
                        THEN least(plan_grant_amount.rollover_max, g.remaining)
                        ELSE least(plan_grant_amount.rollover_max, plan_grant_amount.amount) END
              FROM flagship.credit_grants g
             WHERE g.organization_id = plan_grant_amount.organization_id
               AND g.customer_id = plan_grant_amount.customer_id AND g.metric_id = plan_grant_amount.metric_id
               AND g.source = 'plan' AND g.period_start < plan_grant_amount.period_start
             ORDER BY g.period_start DESC
             LIMIT 1), 0));
END
$fn$;
-- Applications insert only a plan's own grants, inside the usage
-- functions (the insert policy); members with plans:write any grant.
GRANT INSERT ON flagship.credit_grants TO flagship_admin, flagship_app;
GRANT DELETE ON flagship.credit_grants TO flagship_admin;
GRANT UPDATE (remaining) ON flagship.credit_grants TO flagship_admin, flagship_app;

CREATE OR REPLACE FUNCTION flagship.put_metric(project text, definition jsonb) RETURNS uuid
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    refused text;
    refused_hint text;
    target_project uuid := flagship.resolve_project(project);
    saved uuid;
BEGIN
    PERFORM flagship.require_permission('plans:write', 'put_metric');
    PERFORM flagship.require_object(definition, 'metric', '{key,name,unit,aggregation,description}');
    PERFORM flagship.check_key_format(definition->>'key', 'key');
    IF coalesce(definition->>'aggregation', 'sum') NOT IN ('sum', 'gauge', 'credits') THEN
        PERFORM flagship.refuse('aggregation', 'must be sum, gauge or credits');
    END IF;
    INSERT INTO flagship.metrics AS m (organization_id, project_id, key, name, unit, aggregation)
    SELECT p.organization_id, p.id, definition->>'key', definition->>'name', definition->>'unit',
           coalesce(definition->>'aggregation', 'sum')
      FROM flagship.projects p WHERE p.id = target_project
    ON CONFLICT ON CONSTRAINT metrics_key_unique DO UPDATE
       SET name = EXCLUDED.name, unit = EXCLUDED.unit, aggregation = EXCLUDED.aggregation,
           updated_at = now()
    RETURNING m.id INTO saved;
    RETURN saved;
EXCEPTION WHEN invalid_parameter_value THEN
    -- Every refusal names the metric it is about, then the field.
    GET STACKED DIAGNOSTICS refused = MESSAGE_TEXT, refused_hint = PG_EXCEPTION_HINT;
    refused := format('metric "%s": %s', coalesce(definition->>'key', '?'), regexp_replace(refused, '^metric: ', ''));
    IF refused_hint = '' THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value', MESSAGE = refused;
    END IF;
    RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value', MESSAGE = refused, HINT = refused_hint;
END
$fn$;

CREATE OR REPLACE FUNCTION flagship.metric_limits(in_organization uuid, in_project uuid, limits jsonb, field text)
RETURNS TABLE (metric_id uuid, usage_limit bigint, period text, enforcement text)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    item record;
    metric_row flagship.metrics;
    terms jsonb;
BEGIN
    FOR item IN SELECT * FROM jsonb_each(coalesce(limits, '{}')) LOOP
        SELECT * INTO metric_row FROM flagship.metrics m
         WHERE m.organization_id = in_organization AND m.project_id = in_project AND m.key = item.key;
        IF NOT FOUND THEN
            PERFORM flagship.refuse(field || '.' || item.key, format('unknown metric "%s"', item.key));
        END IF;
        IF metric_row.aggregation = 'credits' THEN
            PERFORM flagship.refuse(field || '.' || item.key,
                'counts credits, which have a balance, not a limit (grant them with flagship.grant_credits)');
        END IF;
        terms := flagship.limit_terms(item.value, field || '.' || item.key, metric_row.aggregation);
        metric_id := metric_row.id;
        usage_limit := (terms->>'limit')::bigint;
        period := terms->>'period';
        enforcement := terms->>'enforcement';
        RETURN NEXT;
    END LOOP;
END
$fn$;

CREATE  FUNCTION "grant_credits"(
	"customer" TEXT, /* Option < & str > */
	"metric" TEXT, /* & str */
	"amount" bigint, /* Option < i64 > */
	"expires_at" timestamp with time zone DEFAULT NULL, /* Option < TimestampWithTimeZone > */
	"idempotency_key" TEXT DEFAULT NULL, /* Option < & str > */
	"environment" TEXT DEFAULT NULL /* Option < & str > */
) RETURNS jsonb /* pgrx :: JsonB */
VOLATILE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'grant_credits_wrapper';

SELECT flagship.audit_table('credit_grants', 'customer', '{remaining}');

-- Consuming credits updates only `remaining`, which the trail leaves out:
-- the trigger need not fire for it at all (it would find nothing to
-- record, at the cost of every consumption).
DROP TRIGGER credit_grants_audit ON flagship.credit_grants;
CREATE TRIGGER credit_grants_audit
    AFTER INSERT OR DELETE OR UPDATE OF organization_id, id, customer_id, metric_id, amount,
                                        expires_at, idempotency_key, granted_at, source, period_start
    ON flagship.credit_grants
    FOR EACH ROW EXECUTE FUNCTION flagship.audit_change('customer', 'id', 'remaining', 'updated_at');

-- The event store (#19), sql/events.sql as it is.
-- A per-organization event store in the Dynamic Consistency Boundary style
-- (dcb.events): one log per organization, read by type and tags, and a
-- conditional append ("append these events unless an event matching this
-- query appeared after position P").
--
-- Positions. Each organization has a head row holding its last position.
-- An append moves the head with one UPDATE, whose row lock is held until
-- the appending transaction ends, and only then writes its events. So
-- appends of one organization are serialised from the head on (appends of
-- different organizations never wait for each other), positions are
-- consecutive (a rolled-back append gives its positions back), and commit
-- order is position order: an appender gets its positions only after the
-- previous one has committed and become visible. A reader that polls
-- `position > last seen` therefore never misses an event that commits
-- later.
--
-- Conditions. The condition is checked by a statement that starts after
-- the head's lock is held, so under READ COMMITTED its snapshot sees every
-- append that held the lock before. REPEATABLE READ and SERIALIZABLE keep
-- the transaction's older snapshot, which would answer wrongly: a
-- conditional append refuses them.

-- Events are application data, like usage: appending and reading need no
-- member permission, only, in key mode, the key's scopes.
INSERT INTO flagship.permissions (key, description, builtin) VALUES
    ('events:read',  'Read the event store (API key scope)', true),
    ('events:write', 'Append to the event store (API key scope)', true);

CREATE TABLE flagship.event_heads (
    organization_id uuid   NOT NULL PRIMARY KEY
        REFERENCES flagship.organizations (id) ON DELETE CASCADE,
    last_position   bigint NOT NULL
);

CREATE TABLE flagship.events (
    organization_id uuid        NOT NULL REFERENCES flagship.organizations (id) ON DELETE CASCADE,
    position        bigint      NOT NULL,
    type            text        NOT NULL,
    tags            text[]      NOT NULL DEFAULT '{}',
    data            jsonb       NOT NULL DEFAULT '{}',
    metadata        jsonb       NOT NULL DEFAULT '{}',
    recorded_at     timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (organization_id, position),
    CONSTRAINT events_type_present CHECK (length(type) BETWEEN 1 AND 200),
    CONSTRAINT events_tags_present CHECK (array_position(tags, NULL) IS NULL)
);
-- Queries by type read this index in position order; queries by tags use
-- the GIN index (`tags @> ...`), combined with the primary key's range on
-- position by a bitmap AND (see BENCHMARKS.md for the plans).
CREATE INDEX events_type ON flagship.events (organization_id, type, position);
CREATE INDEX events_tags ON flagship.events USING gin (tags);

SELECT pg_catalog.pg_extension_config_dump('flagship.event_heads', '');
SELECT pg_catalog.pg_extension_config_dump('flagship.events', '');
ALTER TABLE flagship.event_heads ENABLE ROW LEVEL SECURITY;
ALTER TABLE flagship.event_heads FORCE ROW LEVEL SECURITY;
ALTER TABLE flagship.events ENABLE ROW LEVEL SECURITY;
ALTER TABLE flagship.events FORCE ROW LEVEL SECURITY;
CREATE POLICY event_heads_tenant ON flagship.event_heads
    USING (organization_id = (SELECT flagship.current_organization_id()));
CREATE POLICY events_tenant ON flagship.events FOR SELECT
    USING (organization_id = (SELECT flagship.current_organization_id()));
-- Only append_events writes (it runs as the extension's owner); nobody
-- updates or deletes an event.
GRANT SELECT ON flagship.events, flagship.event_heads TO flagship_admin, flagship_app, flagship_auditor;

-- A DCB query's items as an SQL condition on events aliased `e`, for
-- EXECUTE: one item matches when the event's type is one of its `types`
-- (any type when absent) and its tags contain all of its `tags`; items
-- are ORed, and no items match every event. Values are quoted literals,
-- so the planner can use the type and tag indexes for each item.
CREATE FUNCTION flagship.event_query_sql(items jsonb) RETURNS text
LANGUAGE sql
IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT coalesce(string_agg(
               format('(%s AND e.tags @> %L::text[])',
                      CASE WHEN i ? 'types'
                           THEN format('e.type = ANY (%L::text[])',
                                       ARRAY(SELECT jsonb_array_elements_text(i->'types')))
                           ELSE 'true' END,
                      ARRAY(SELECT jsonb_array_elements_text(coalesce(i->'tags', '[]')))),
               ' OR '), 'true')
      FROM jsonb_array_elements(items) i
$fn$;

-- Checks a DCB query document, naming the field at fault: {"items": [...]},
-- each item {"types": [text, ...], "tags": [text, ...]} (both optional).
CREATE FUNCTION flagship.check_event_query(document jsonb, field text) RETURNS jsonb
LANGUAGE plpgsql
IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    item jsonb;
    position int := 0;
BEGIN
    IF jsonb_typeof(document) IS DISTINCT FROM 'object' OR jsonb_typeof(document->'items') IS DISTINCT FROM 'array' THEN
        RAISE EXCEPTION '%: must be an object with an "items" array', field
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = '{"items": [{"types": ["OrderPlaced"], "tags": ["order:42"]}]}; "items": [] matches every event';
    END IF;
    FOR item IN SELECT * FROM jsonb_array_elements(document->'items') LOOP
        IF jsonb_typeof(item) <> 'object'
           OR EXISTS (SELECT FROM jsonb_object_keys(item) k WHERE k NOT IN ('types', 'tags')) THEN
            RAISE EXCEPTION '%.items[%]: must be an object with "types" and/or "tags"', field, position
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        IF (item ? 'types' AND (jsonb_typeof(item->'types') <> 'array'
                                OR EXISTS (SELECT FROM jsonb_array_elements(item->'types') t
                                            WHERE jsonb_typeof(t) <> 'string')))
           OR (item ? 'tags' AND (jsonb_typeof(item->'tags') <> 'array'
                                  OR EXISTS (SELECT FROM jsonb_array_elements(item->'tags') t
                                              WHERE jsonb_typeof(t) <> 'string'))) THEN
            RAISE EXCEPTION '%.items[%]: "types" and "tags" must be arrays of strings', field, position
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        position := position + 1;
    END LOOP;
    RETURN document->'items';
END
$fn$;

-- Appends `events` to the session's organization, unless `condition`
-- says otherwise, and answers {"first_position", "last_position"}.
CREATE FUNCTION flagship.append_events(events jsonb, condition jsonb DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    organization uuid := flagship.current_organization_id();
    count int;
    items jsonb;
    after bigint;
    last bigint;
    problem text;
    conflict boolean := false;
BEGIN
    IF organization IS NULL THEN
        RAISE EXCEPTION 'append_events: no organization in this session'
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'SET LOCAL flagship.organization_id, or authenticate with an API key';
    END IF;
    IF flagship.key_grants('events:write') IS FALSE THEN
        RAISE EXCEPTION 'append_events: this transaction''s API key lacks the scope events:write'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF (SELECT o.status FROM flagship.organizations o WHERE o.id = organization) IS DISTINCT FROM 'active' THEN
        RAISE EXCEPTION 'append_events: the organization is not active'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF jsonb_typeof(events) IS DISTINCT FROM 'array' OR jsonb_array_length(events) = 0 THEN
        RAISE EXCEPTION 'events: must be a non-empty array of events'
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = '[{"type": "OrderPlaced", "tags": ["order:42"], "data": {...}, "metadata": {...}}]';
    END IF;
    -- Every event checked in one statement; the first fault is named.
    SELECT format('events[%s]%s', x.ordinality - 1, x.fault) INTO problem
      FROM (SELECT e.ordinality,
                   CASE WHEN jsonb_typeof(e.event) <> 'object'
                          OR EXISTS (SELECT FROM jsonb_object_keys(e.event) k
                                      WHERE k NOT IN ('type', 'tags', 'data', 'metadata'))
                        THEN ': must be an object with "type" and optional "tags", "data", "metadata"'
                        WHEN jsonb_typeof(e.event->'type') IS DISTINCT FROM 'string'
                          OR length(e.event->>'type') NOT BETWEEN 1 AND 200
                        THEN '.type: must be a string of 1 to 200 characters'
                        WHEN e.event ? 'tags'
                         AND (jsonb_typeof(e.event->'tags') <> 'array'
                              OR EXISTS (SELECT FROM jsonb_array_elements(e.event->'tags') t
                                          WHERE jsonb_typeof(t) <> 'string'))
                        THEN '.tags: must be an array of strings'
                   END AS fault
              FROM jsonb_array_elements(events) WITH ORDINALITY AS e (event, ordinality)) x
     WHERE x.fault IS NOT NULL
     ORDER BY x.ordinality
     LIMIT 1;
    IF problem IS NOT NULL THEN
        RAISE EXCEPTION '%', problem USING ERRCODE = 'invalid_parameter_value';
    END IF;
    count := jsonb_array_length(events);

    IF condition IS NOT NULL THEN
        IF jsonb_typeof(condition) <> 'object'
           OR EXISTS (SELECT FROM jsonb_object_keys(condition) k WHERE k NOT IN ('fail_if_events_match', 'after')) THEN
            RAISE EXCEPTION 'condition: must be an object with "fail_if_events_match" and optional "after"'
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        items := flagship.check_event_query(condition->'fail_if_events_match', 'condition.fail_if_events_match');
        IF condition ? 'after' AND (jsonb_typeof(condition->'after') <> 'number'
                                    OR (condition->>'after')::numeric <> trunc((condition->>'after')::numeric)
                                    OR (condition->>'after')::numeric < 0) THEN
            RAISE EXCEPTION 'condition.after: must be a position (a non-negative integer)'
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        after := coalesce((condition->>'after')::bigint, 0);
        IF current_setting('transaction_isolation') <> 'read committed' THEN
            RAISE EXCEPTION 'append_events: a conditional append needs READ COMMITTED, not %',
                upper(current_setting('transaction_isolation'))
                USING ERRCODE = 'invalid_transaction_state',
                      HINT = 'a transaction snapshot older than the append lock could miss a conflicting event';
        END IF;
    END IF;

    -- Take the organization's head (and its lock, held to commit) first
    -- (created by the first append, racing ones meeting in the upsert) ...
    UPDATE flagship.event_heads h SET last_position = h.last_position + count
     WHERE h.organization_id = organization
    RETURNING h.last_position INTO last;
    IF NOT FOUND THEN
        INSERT INTO flagship.event_heads AS h (organization_id, last_position)
        VALUES (organization, count)
        ON CONFLICT (organization_id) DO UPDATE SET last_position = h.last_position + count
        RETURNING h.last_position INTO last;
    END IF;
    -- ... then check, in a statement whose snapshot sees every append that
    -- held the head before.
    IF items IS NOT NULL THEN
        EXECUTE format('SELECT EXISTS (SELECT 1 FROM flagship.events e
                                        WHERE e.organization_id = $1 AND e.position > $2 AND (%s))',
                       flagship.event_query_sql(items))
           INTO conflict USING organization, after;
    END IF;
    IF conflict THEN
        RAISE EXCEPTION 'append_events: an event matching the condition was appended after position %', after
            USING ERRCODE = '40F01',
                  HINT = 'read the events again, decide again, and append with the new position';
    END IF;
    INSERT INTO flagship.events (organization_id, position, type, tags, data, metadata)
    SELECT organization, last - count + e.ordinality, e.event->>'type',
           ARRAY(SELECT jsonb_array_elements_text(coalesce(e.event->'tags', '[]'))),
           coalesce(e.event->'data', '{}'), coalesce(e.event->'metadata', '{}')
      FROM jsonb_array_elements(events) WITH ORDINALITY AS e (event, ordinality);
    -- Any role may LISTEN to any channel: the notification carries
    -- nothing (not even a position, which would count another
    -- organization's events). A woken reader polls read_events from the
    -- last position it saw.
    PERFORM pg_notify('flagship_events', '');
    RETURN jsonb_build_object('first_position', last - count + 1, 'last_position', last);
END
$fn$;
REVOKE ALL ON FUNCTION flagship.append_events(jsonb, jsonb) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION flagship.append_events(jsonb, jsonb) TO flagship_admin, flagship_app;

-- The session organization's events matching `query` (DCB items, as for
-- conditions), in position order (`backwards`: newest first), from
-- position `from` (inclusive), at most `limit` of them.
CREATE FUNCTION flagship.read_events(query jsonb DEFAULT '{"items": []}', options jsonb DEFAULT '{}')
RETURNS SETOF jsonb
LANGUAGE plpgsql
STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    items jsonb := flagship.check_event_query(query, 'query');
    backwards boolean;
    start bigint;
    most bigint;
BEGIN
    IF flagship.key_grants('events:read') IS FALSE THEN
        RAISE EXCEPTION 'read_events: this transaction''s API key lacks the scope events:read'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF jsonb_typeof(options) IS DISTINCT FROM 'object'
       OR EXISTS (SELECT FROM jsonb_object_keys(options) k WHERE k NOT IN ('from', 'backwards', 'limit'))
       OR (options ? 'from' AND jsonb_typeof(options->'from') <> 'number')
       OR (options ? 'limit' AND jsonb_typeof(options->'limit') <> 'number')
       OR (options ? 'backwards' AND jsonb_typeof(options->'backwards') <> 'boolean') THEN
        RAISE EXCEPTION 'options: must be an object with optional "from" (a position), "backwards" (a boolean) and "limit" (a count)'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    backwards := coalesce((options->>'backwards')::boolean, false);
    start := (options->>'from')::numeric::bigint;
    most := (options->>'limit')::numeric::bigint;
    IF most IS NOT NULL AND most < 0 THEN
        RAISE EXCEPTION 'options.limit: must not be negative' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN QUERY EXECUTE format(
        'SELECT jsonb_build_object(''position'', e.position, ''type'', e.type, ''tags'', to_jsonb(e.tags),
                                   ''data'', e.data, ''metadata'', e.metadata, ''recorded_at'', e.recorded_at)
           FROM flagship.events e
          WHERE e.organization_id = flagship.current_organization_id()
            AND ($1::bigint IS NULL OR e.position %s $1) AND (%s)
          ORDER BY e.position %s
          LIMIT $2',
        CASE WHEN backwards THEN '<=' ELSE '>=' END,
        flagship.event_query_sql(items),
        CASE WHEN backwards THEN 'DESC' ELSE 'ASC' END)
        USING start, most;
END
$fn$;

-- A key issues, rolls or writes only keys within itself; an allow-list
-- answers before anything else; customer keys list their scopes (#18,
-- review).

-- Whether a key with these settings stays within the key this transaction
-- authenticated with (true without one): its scopes, its environment
-- binding, its expiry, its usage limit, its addresses and its customer. A
-- key may issue or roll only keys within itself.
CREATE FUNCTION flagship.within_session_key(scopes text[], environment_id uuid, expires_at timestamptz,
                                            usage_limit bigint, allowed_ips cidr[], customer_id uuid)
RETURNS boolean
LANGUAGE plpgsql
STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
-- PL/pgSQL with the organization as a value: Citus can plan it and send
-- it to the organization's shard group (#21).
DECLARE
    session_key constant uuid := flagship.current_key_id();
    org constant uuid := flagship.current_organization_id();
    -- The columns a key's bounds are in (no role may read its hash).
    k record;
BEGIN
    IF session_key IS NULL THEN
        RETURN true;
    END IF;
    SELECT ak.scopes, ak.environment_id, ak.expires_at, ak.usage_limit, ak.allowed_ips, ak.customer_id
      INTO k FROM flagship.api_keys ak
     WHERE ak.organization_id = org AND ak.id = session_key;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    RETURN coalesce(NOT ((cardinality(k.scopes) > 0
                          AND (cardinality(coalesce(within_session_key.scopes, '{}')) = 0
                               OR EXISTS (SELECT FROM unnest(within_session_key.scopes) s
                                           WHERE NOT flagship.key_grants(s))))
                         OR (k.environment_id IS NOT NULL
                             AND within_session_key.environment_id IS DISTINCT FROM k.environment_id)
                         OR (k.expires_at IS NOT NULL
                             AND (within_session_key.expires_at IS NULL OR within_session_key.expires_at > k.expires_at))
                         OR (k.usage_limit IS NOT NULL
                             AND (within_session_key.usage_limit IS NULL OR within_session_key.usage_limit > k.usage_limit))
                         OR (k.allowed_ips IS NOT NULL
                             AND (within_session_key.allowed_ips IS NULL
                                  OR EXISTS (SELECT FROM unnest(within_session_key.allowed_ips) n
                                              WHERE NOT EXISTS (SELECT FROM unnest(k.allowed_ips) a WHERE n <<= a))))
                         OR (k.customer_id IS NOT NULL
                             AND within_session_key.customer_id IS DISTINCT FROM k.customer_id)), false);
END
$fn$;

-- `customer` (an external key of the key's environment) makes the key the
-- customer's: verification names it, and usage calls in key mode act for
-- it. `allowed_ips` (CIDR, IPv4 or IPv6) limits where it may be used from.
CREATE OR REPLACE FUNCTION flagship.issue_api_key(organization_id uuid, name text, scopes text[] DEFAULT '{}',
                                       environment text DEFAULT NULL,
                                       expires_at timestamptz DEFAULT NULL,
                                       usage_limit bigint DEFAULT NULL,
                                       customer text DEFAULT NULL,
                                       allowed_ips text[] DEFAULT NULL)
RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    environment_row flagship.environments;
    secret text;
    plaintext text;
    bad_scope text;
    customer_id uuid;
    networks cidr[];
BEGIN
    PERFORM flagship.require_permission('api_keys:write', 'issue_api_key');
    IF organization_id IS NULL
       OR NOT EXISTS (SELECT FROM flagship.organizations o WHERE o.id = issue_api_key.organization_id) THEN
        RAISE EXCEPTION 'organization_id: organization not found'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF name IS NULL OR btrim(name) = '' THEN
        RAISE EXCEPTION 'name: must not be empty' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- A scope is a permission, or every permission of one resource; a typo
    -- is refused now rather than failing at first use.
    SELECT s INTO bad_scope FROM unnest(coalesce(scopes, '{}')) s
     WHERE s IS NULL
        OR NOT EXISTS (SELECT FROM flagship.permissions p
                        WHERE p.key = s OR split_part(p.key, ':', 1) || ':*' = s)
     LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'scopes: "%" is not a scope', coalesce(bad_scope, 'NULL')
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'valid scopes: ' || (SELECT string_agg(k, ', ' ORDER BY k) FROM (
                      SELECT p.key FROM flagship.permissions p
                      UNION SELECT split_part(p.key, ':', 1) || ':*' FROM flagship.permissions p) AS v (k));
    END IF;
    -- A key issues no key wider than itself (checked before anything of
    -- the request is resolved, so a wider request learns nothing more).
    IF NOT flagship.within_session_key(scopes,
               CASE WHEN environment IS NOT NULL THEN flagship.resolve_environment(environment) END,
               expires_at, usage_limit,
               CASE WHEN allowed_ips IS NOT NULL THEN flagship.parse_networks(allowed_ips, 'allowed_ips') END,
               CASE WHEN customer IS NOT NULL AND environment IS NOT NULL THEN
                   (SELECT c.id FROM flagship.customers c
                     WHERE c.environment_id = flagship.resolve_environment(environment)
                       AND c.external_key = customer) END) THEN
        RAISE EXCEPTION 'a key may not issue a key wider than itself'
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'stay within the scopes, environment, expiry, usage limit, addresses and customer of the key this transaction authenticated with';
    END IF;
    IF expires_at IS NOT NULL AND expires_at <= now() THEN
        RAISE EXCEPTION 'expires_at: must be in the future' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF usage_limit IS NOT NULL AND usage_limit <= 0 THEN
        RAISE EXCEPTION 'usage_limit: must be positive' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF environment IS NOT NULL THEN
        environment_row := flagship.environment_row(environment);
        -- A name or uuid of another organization's environment is refused
        -- exactly like one that does not exist.
        IF environment_row.organization_id IS DISTINCT FROM issue_api_key.organization_id THEN
            RAISE EXCEPTION 'environment "%" not found', environment
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
    END IF;

    IF customer IS NOT NULL THEN
        IF environment_row.id IS NULL THEN
            RAISE EXCEPTION 'customer: a customer''s key needs its environment (customers belong to one)'
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        SELECT c.id INTO customer_id FROM flagship.customers c
         WHERE c.organization_id = environment_row.organization_id
           AND c.environment_id = environment_row.id AND c.external_key = customer;
        IF customer_id IS NULL THEN
            RAISE EXCEPTION 'customer: no customer "%" in environment "%"', customer, environment
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
    END IF;
    IF customer IS NOT NULL AND cardinality(coalesce(scopes, '{}')) = 0 THEN
        -- A key without scopes is restricted only by its role: a customer's
        -- key says what it may do.
        RAISE EXCEPTION 'scopes: a customer''s key must list its scopes'
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'for example ARRAY[''usage:read'', ''usage:write'', ''features:read'']';
    END IF;
    networks := flagship.parse_networks(allowed_ips, 'allowed_ips');

    secret := replace(gen_random_uuid()::text, '-', '') || replace(gen_random_uuid()::text, '-', '');
    plaintext := CASE WHEN environment_row.key IS NULL OR environment_row.key = 'production'
                      THEN 'fs_live_' ELSE 'fs_test_' END || secret;
    INSERT INTO flagship.api_keys AS k
        (organization_id, name, display_prefix, key_hash, scopes, project_id, environment_id,
         expires_at, usage_limit, customer_id, allowed_ips)
    VALUES (issue_api_key.organization_id, btrim(name), left(plaintext, 16),
            sha256(convert_to(plaintext, 'UTF8')), coalesce(scopes, '{}'),
            environment_row.project_id, environment_row.id, expires_at, usage_limit,
            customer_id, networks);
    RETURN plaintext;
END
$fn$;

-- Verification runs before the caller has any organization, so it is
-- SECURITY DEFINER: it finds the key by hash alone and reveals only what
-- the key itself grants.
CREATE OR REPLACE FUNCTION flagship.verify_api_key(key text, client_ip inet DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    key_row flagship.api_keys;
    organization_status text;
    code text;
    uses bigint;
    customer_key text;
BEGIN
    IF key IS NOT NULL AND key ~ '^fs_(live|test)_[0-9a-f]{64}$' THEN
        SELECT * INTO key_row FROM flagship.api_keys k WHERE k.key_hash = sha256(convert_to(key, 'UTF8'));
    END IF;
    IF key_row.id IS NULL THEN
        code := 'NOT_FOUND';
    -- An allow-list admits only the addresses it lists, and tells callers
    -- elsewhere nothing more (not even that the key was revoked); a
    -- verification that does not say where the call comes from is refused.
    ELSIF key_row.allowed_ips IS NOT NULL
          AND (client_ip IS NULL
               OR NOT EXISTS (SELECT FROM unnest(key_row.allowed_ips) a WHERE client_ip <<= a)) THEN
        code := 'FORBIDDEN';
    ELSIF key_row.revoked_at IS NOT NULL THEN
        code := 'REVOKED';
    ELSIF key_row.expires_at IS NOT NULL AND key_row.expires_at <= now() THEN
        code := 'EXPIRED';
    ELSE
        SELECT o.status INTO organization_status FROM flagship.organizations o
         WHERE o.id = key_row.organization_id;
        IF organization_status IS DISTINCT FROM 'active' THEN
            code := 'FORBIDDEN';
        ELSIF key_row.usage_limit IS NOT NULL THEN
            -- Counting uses is a write by nature; only limited keys pay it.
            uses := nextval(flagship.ensure_key_use_sequence(key_row.id, key_row.usage_count));
            IF uses <= key_row.usage_limit THEN
                code := 'VALID';
                UPDATE flagship.api_keys k SET usage_count = greatest(k.usage_count, uses), last_used_at = now()
                 WHERE k.organization_id = key_row.organization_id AND k.id = key_row.id;
            ELSE
                code := 'USAGE_EXCEEDED';
            END IF;
        ELSE
            code := 'VALID';
            -- At most one write a minute per key, so busy keys do not turn
            -- every verification into a hot-row update.
            UPDATE flagship.api_keys k SET last_used_at = now()
             WHERE k.organization_id = key_row.organization_id AND k.id = key_row.id
               AND (k.last_used_at IS NULL OR k.last_used_at < now() - interval '1 minute');
        END IF;
    END IF;
    IF code <> 'VALID' THEN
        RETURN jsonb_build_object('valid', false, 'code', code, 'key_id', NULL,
                                  'organization_id', NULL, 'environment_id', NULL, 'scopes', NULL,
                                  'customer', NULL);
    END IF;
    IF key_row.customer_id IS NOT NULL THEN
        SELECT c.external_key INTO customer_key FROM flagship.customers c
         WHERE c.organization_id = key_row.organization_id AND c.id = key_row.customer_id;
    END IF;
    RETURN jsonb_build_object('valid', true, 'code', code, 'key_id', key_row.id,
                              'organization_id', key_row.organization_id,
                              'environment_id', key_row.environment_id, 'scopes', to_jsonb(key_row.scopes),
                              'customer', customer_key);
END
$fn$;

-- A new key with the same settings (name, scopes, environment, customer,
-- addresses, expiry, usage limit and the uses counted so far, as
-- usage_count shows them: uses spent by verifications whose transactions
-- rolled back are not carried over); the old one keeps verifying for
-- `grace`, then answers EXPIRED. Returns the new key's plaintext, once.
CREATE OR REPLACE FUNCTION flagship.roll_api_key(key_id uuid, grace interval DEFAULT '0')
RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    old flagship.api_keys;
    plaintext text;
BEGIN
    PERFORM flagship.require_permission('api_keys:write', 'roll_api_key');
    IF grace IS NULL OR grace < interval '0' THEN
        RAISE EXCEPTION 'grace: must be a non-negative interval' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- Row-level security makes another organization's key look absent.
    SELECT k.organization_id, k.id, k.name, k.display_prefix, k.scopes, k.project_id, k.environment_id,
           k.expires_at, k.revoked_at, k.usage_limit, k.usage_count, k.customer_id, k.allowed_ips
      INTO old.organization_id, old.id, old.name, old.display_prefix, old.scopes, old.project_id,
           old.environment_id, old.expires_at, old.revoked_at, old.usage_limit, old.usage_count,
           old.customer_id, old.allowed_ips
      FROM flagship.api_keys k WHERE k.id = key_id;
    IF old.id IS NULL THEN
        RAISE EXCEPTION 'key_id: api key % not found', key_id USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF NOT flagship.within_session_key(old.scopes, old.environment_id, old.expires_at, old.usage_limit,
                                       old.allowed_ips, old.customer_id) THEN
        RAISE EXCEPTION 'a key may not roll a key wider than itself'
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'roll it in a session of a member with api_keys:write, or with a key at least as wide';
    END IF;
    -- The row lock makes two concurrent rolls of one key queue; the second
    -- then finds it expired (or still within its grace) as the first left it.
    SELECT k.expires_at, k.revoked_at, k.usage_count INTO old.expires_at, old.revoked_at, old.usage_count
      FROM flagship.api_keys k WHERE k.organization_id = old.organization_id AND k.id = old.id FOR UPDATE;
    IF old.revoked_at IS NOT NULL OR (old.expires_at IS NOT NULL AND old.expires_at <= now()) THEN
        RAISE EXCEPTION 'key_id: api key % is revoked or expired', key_id
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'issue a new key with flagship.issue_api_key';
    END IF;
    plaintext := (CASE WHEN old.display_prefix LIKE 'fs_test_%' THEN 'fs_test_' ELSE 'fs_live_' END)
                 || replace(gen_random_uuid()::text, '-', '') || replace(gen_random_uuid()::text, '-', '');
    INSERT INTO flagship.api_keys
        (organization_id, name, display_prefix, key_hash, scopes, project_id, environment_id,
         expires_at, usage_limit, usage_count, customer_id, allowed_ips, rolled_from)
    VALUES (old.organization_id, old.name, left(plaintext, 16), sha256(convert_to(plaintext, 'UTF8')),
            old.scopes, old.project_id, old.environment_id, old.expires_at, old.usage_limit,
            old.usage_count,
            old.customer_id, old.allowed_ips, old.id);
    UPDATE flagship.api_keys k
       SET expires_at = least(coalesce(k.expires_at, 'infinity'), now() + grace)
     WHERE k.organization_id = old.organization_id AND k.id = old.id;
    RETURN plaintext;
END
$fn$;

-- In key mode a key writes only keys within itself, into keys within
-- itself: it cannot lift its own limits, or another key's, with a plain
-- UPDATE (the api_keys:write policy alone would let it). Outside key mode
-- within_session_key is true.
CREATE POLICY api_keys_insert_within_key ON flagship.api_keys AS RESTRICTIVE FOR INSERT
    WITH CHECK (flagship.within_session_key(scopes, environment_id, expires_at, usage_limit,
                                            allowed_ips, customer_id));
CREATE POLICY api_keys_update_within_key ON flagship.api_keys AS RESTRICTIVE FOR UPDATE
    USING (flagship.within_session_key(scopes, environment_id, expires_at, usage_limit,
                                       allowed_ips, customer_id))
    WITH CHECK (flagship.within_session_key(scopes, environment_id, expires_at, usage_limit,
                                            allowed_ips, customer_id));
CREATE POLICY api_keys_delete_within_key ON flagship.api_keys AS RESTRICTIVE FOR DELETE
    USING (flagship.within_session_key(scopes, environment_id, expires_at, usage_limit,
                                       allowed_ips, customer_id));

CREATE OR REPLACE FUNCTION flagship.create_organization(slug text, name text)
RETURNS uuid
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    new_id uuid;
BEGIN
    IF slug IS NULL OR slug !~ '^[a-z0-9-]+$' OR length(slug) > 63 THEN
        RAISE EXCEPTION 'organization slug "%" is invalid', slug
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'slug: 1 to 63 lowercase letters, digits and hyphens';
    END IF;
    IF name IS NULL OR length(btrim(name)) = 0 THEN
        RAISE EXCEPTION 'organization name must not be empty'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- An organization belongs to people, not to a key of another one (and
    -- a key learns nothing of other organizations' slugs).
    IF flagship.current_key_id() IS NOT NULL THEN
        RAISE EXCEPTION 'an API key cannot create organizations'
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'create organizations in a session without flagship.authenticate';
    END IF;
    -- Two organizations created at once with one slug queue here: once
    -- FlagShip's tables are distributed no unique index holds slugs (it
    -- would have to contain the organization), and this check is all
    -- there is (for creations made through one node: README, Citus).
    PERFORM pg_advisory_xact_lock(hashtextextended('flagship slug ' || slug, 0));
    IF EXISTS (SELECT 1 FROM flagship.organizations o WHERE o.slug = create_organization.slug) THEN
        RAISE EXCEPTION 'organization slug "%" is already taken', slug
            USING ERRCODE = 'unique_violation';
    END IF;

    INSERT INTO flagship.organizations (slug, name)
    VALUES (create_organization.slug, create_organization.name)
    RETURNING id INTO new_id;

    INSERT INTO flagship.roles (organization_id, key, name, builtin)
    SELECT new_id, r.key, initcap(r.key), true
      FROM (VALUES ('owner'), ('admin'), ('developer'), ('viewer')) AS r (key);

    INSERT INTO flagship.role_permissions (organization_id, role_id, permission)
    SELECT new_id, r.id, b.permission
      FROM flagship.roles r
      JOIN flagship.builtin_role_permissions b ON b.role_key = r.key
     WHERE r.organization_id = new_id;

    -- Whoever starts an organization owns it: without a first member
    -- nobody but a superuser could create its projects (row-level security
    -- wants the actor to hold projects:write in it) or add members.
    -- Superusers bypass those policies and are left out.
    IF NOT (SELECT r.rolsuper FROM pg_roles r WHERE r.rolname = flagship.acting_role()) THEN
        WITH owner AS (
            INSERT INTO flagship.members (organization_id, user_key)
            VALUES (new_id, flagship.current_actor())
            RETURNING id)
        INSERT INTO flagship.member_roles (organization_id, member_id, role_id)
        SELECT new_id, owner.id, r.id
          FROM owner JOIN flagship.roles r ON r.organization_id = new_id AND r.key = 'owner';
    END IF;

    RETURN new_id;
END
$fn$;


-- Plans grant credits per period, with rollover (#18).

-- Credits a plan grants each period (0.3): `amount` of a credits metric
-- every `period`, plus what the previous period left, up to
-- `rollover_max`. Granted lazily, by the first consumption of a period.
CREATE TABLE flagship.plan_credits (
    organization_id uuid   NOT NULL,
    project_id      uuid   NOT NULL,
    plan_id         uuid   NOT NULL,
    metric_id       uuid   NOT NULL,
    amount          bigint NOT NULL,
    period          text   NOT NULL DEFAULT 'month',
    rollover_max    bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (organization_id, plan_id, metric_id),
    CONSTRAINT plan_credits_amount_valid CHECK (amount > 0),
    CONSTRAINT plan_credits_period_valid
        CHECK (period IN ('hour', 'day', 'week', 'month', 'billing_month')),
    CONSTRAINT plan_credits_rollover_valid CHECK (rollover_max >= 0),
    FOREIGN KEY (organization_id, project_id, plan_id)
        REFERENCES flagship.plans (organization_id, project_id, id) ON DELETE CASCADE,
    FOREIGN KEY (organization_id, project_id, metric_id)
        REFERENCES flagship.metrics (organization_id, project_id, id) ON DELETE CASCADE
);

SELECT pg_catalog.pg_extension_config_dump('flagship.plan_credits', '');

SELECT flagship.isolate_tenant_table('plan_credits', 'plans:write');

GRANT SELECT ON flagship.plan_credits TO flagship_admin, flagship_app, flagship_auditor;

GRANT INSERT, UPDATE, DELETE ON flagship.plan_credits TO flagship_admin;

SELECT flagship.invalidate_on_change('plan_credits', 'flagship.customers'),
       flagship.version_on_change('plan_credits', 'entitlements', 'organization_id');

-- `{credits metric key: {"amount", "period", "rollover": {"max"}}}` of a
-- plan, checked, with defaults (month, no rollover) filled in.
CREATE FUNCTION flagship.plan_credit_terms(in_organization uuid, in_project uuid, credits jsonb, field text)
RETURNS TABLE (metric_id uuid, amount bigint, period text, rollover_max bigint)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    item record;
    metric_row flagship.metrics;
    path text;
BEGIN
    FOR item IN SELECT * FROM jsonb_each(coalesce(credits, '{}')) LOOP
        path := field || '.' || item.key;
        SELECT * INTO metric_row FROM flagship.metrics m
         WHERE m.organization_id = in_organization AND m.project_id = in_project AND m.key = item.key;
        IF NOT FOUND THEN
            PERFORM flagship.refuse(path, format('unknown metric "%s"', item.key));
        ELSIF metric_row.aggregation <> 'credits' THEN
            PERFORM flagship.refuse(path, 'the metric does not count credits (give it "aggregation": "credits")');
        END IF;
        PERFORM flagship.require_object(item.value, path, '{amount,period,rollover}');
        IF jsonb_typeof(item.value->'amount') IS DISTINCT FROM 'number'
           OR (item.value->>'amount')::numeric <> trunc((item.value->>'amount')::numeric)
           OR (item.value->>'amount')::numeric NOT BETWEEN 1 AND 1000000000000 THEN
            PERFORM flagship.refuse(path || '.amount', 'must be a whole number of credits from 1 to 10^12');
        END IF;
        period := coalesce(item.value->>'period', 'month');
        IF period NOT IN ('hour', 'day', 'week', 'month', 'billing_month') THEN
            PERFORM flagship.refuse(path || '.period',
                format('unknown period "%s" (hour, day, week, month, billing_month)', period));
        END IF;
        PERFORM flagship.require_object(coalesce(item.value->'rollover', '{}'), path || '.rollover', '{max}');
        IF item.value->'rollover' ? 'max'
           AND (jsonb_typeof(item.value->'rollover'->'max') <> 'number'
                OR (item.value->'rollover'->>'max')::numeric <> trunc((item.value->'rollover'->>'max')::numeric)
                OR (item.value->'rollover'->>'max')::numeric NOT BETWEEN 0 AND 1000000000000) THEN
            PERFORM flagship.refuse(path || '.rollover.max', 'must be a whole number of credits from 0 to 10^12');
        END IF;
        metric_id := metric_row.id;
        amount := (item.value->>'amount')::bigint;
        rollover_max := coalesce((item.value->'rollover'->>'max')::bigint, 0);
        RETURN NEXT;
    END LOOP;
END
$fn$;

CREATE OR REPLACE FUNCTION flagship.put_plan(project text, definition jsonb) RETURNS uuid
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    refused text;
    refused_hint text;
    project_row flagship.projects;
    saved uuid;
BEGIN
    PERFORM flagship.require_permission('plans:write', 'put_plan');
    project_row := flagship.project_row(project);
    PERFORM flagship.require_object(definition, 'plan', '{key,name,features,limits,credits}');
    PERFORM flagship.check_key_format(definition->>'key', 'key');
    IF jsonb_typeof(coalesce(definition->'features', '{}')) <> 'object' THEN
        PERFORM flagship.refuse('features', 'must be an object of flag key to true/false');
    END IF;
    IF jsonb_typeof(coalesce(definition->'limits', '{}')) <> 'object' THEN
        PERFORM flagship.refuse('limits', 'must be an object of metric key to limit');
    END IF;
    IF jsonb_typeof(coalesce(definition->'credits', '{}')) <> 'object' THEN
        PERFORM flagship.refuse('credits', 'must be an object of credits metric key to {"amount", "period", "rollover"}');
    END IF;

    INSERT INTO flagship.plans AS p (organization_id, project_id, key, name)
    VALUES (project_row.organization_id, project_row.id, definition->>'key', definition->>'name')
    ON CONFLICT ON CONSTRAINT plans_key_unique DO UPDATE SET name = EXCLUDED.name, updated_at = now()
    RETURNING p.id INTO saved;

    DELETE FROM flagship.plan_features f WHERE f.organization_id = project_row.organization_id AND f.plan_id = saved;
    INSERT INTO flagship.plan_features (organization_id, project_id, plan_id, feature_key, enabled)
    SELECT project_row.organization_id, project_row.id, saved, s.feature_key, s.enabled
      FROM flagship.feature_switches(project_row.organization_id, project_row.id,
                                     definition->'features', 'features') s;

    DELETE FROM flagship.usage_limits l WHERE l.organization_id = project_row.organization_id AND l.plan_id = saved;
    INSERT INTO flagship.usage_limits
        (organization_id, project_id, plan_id, metric_id, usage_limit, period, enforcement)
    SELECT project_row.organization_id, project_row.id, saved, t.metric_id, t.usage_limit, t.period, t.enforcement
      FROM flagship.metric_limits(project_row.organization_id, project_row.id,
                                  definition->'limits', 'limits') t;

    DELETE FROM flagship.plan_credits c WHERE c.organization_id = project_row.organization_id AND c.plan_id = saved;
    INSERT INTO flagship.plan_credits
        (organization_id, project_id, plan_id, metric_id, amount, period, rollover_max)
    SELECT project_row.organization_id, project_row.id, saved, t.metric_id, t.amount, t.period, t.rollover_max
      FROM flagship.plan_credit_terms(project_row.organization_id, project_row.id,
                                      definition->'credits', 'credits') t;
    RETURN saved;
EXCEPTION WHEN invalid_parameter_value THEN
    -- Every refusal names the plan it is about, then the field.
    GET STACKED DIAGNOSTICS refused = MESSAGE_TEXT, refused_hint = PG_EXCEPTION_HINT;
    refused := format('plan "%s": %s', coalesce(definition->>'key', '?'), regexp_replace(refused, '^plan: ', ''));
    IF refused_hint = '' THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value', MESSAGE = refused;
    END IF;
    RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value', MESSAGE = refused, HINT = refused_hint;
END
$fn$;

CREATE OR REPLACE FUNCTION flagship.plan_document(plan flagship.plans) RETURNS jsonb
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT flagship.jsonb_without_nulls(jsonb_build_object(
        'key', plan.key, 'name', plan.name,
        'features', coalesce((SELECT jsonb_object_agg(f.feature_key, f.enabled)
                                FROM flagship.plan_features f
                               WHERE f.organization_id = plan.organization_id AND f.plan_id = plan.id), '{}'),
        'limits', coalesce((SELECT jsonb_object_agg(m.key, flagship.limit_document(l.usage_limit, l.period, l.enforcement))
                              FROM flagship.usage_limits l
                              JOIN flagship.metrics m ON m.organization_id = l.organization_id AND m.id = l.metric_id
                             WHERE l.organization_id = plan.organization_id AND l.plan_id = plan.id), '{}'),
        -- Absent when the plan grants none (0.2.0 documents stay as they were).
        'credits', (SELECT jsonb_object_agg(m.key, jsonb_build_object('amount', c.amount, 'period', c.period,
                                                                     'rollover', jsonb_build_object('max', c.rollover_max)))
                      FROM flagship.plan_credits c
                      JOIN flagship.metrics m ON m.organization_id = c.organization_id AND m.id = c.metric_id
                     WHERE c.organization_id = plan.organization_id AND c.plan_id = plan.id)))
$fn$;

-- Everything a limit decision needs about one customer and metric, in one
-- query: ids, subscription status and the limit that applies (a customer
-- override wins over the plan). The limit functions (Rust, src/usage.rs)
-- keep the answer per backend until a configuration change; epochs are in
-- seconds.
CREATE OR REPLACE FUNCTION flagship.usage_facts(environment_id uuid, customer text, metric text)
RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    facts jsonb;
BEGIN
    SELECT jsonb_build_object(
               'organization_id', c.organization_id, 'customer_id', c.id, 'metric_id', m.id,
               'aggregation', m.aggregation, 'status', s.status,
               'trial_ends_at', extract(epoch FROM s.trial_ends_at),
               'billing_anchor', extract(epoch FROM s.billing_anchor),
               'has_limit', coalesce(o.metric_id, l.metric_id) IS NOT NULL,
               'usage_limit', CASE WHEN o.metric_id IS NOT NULL THEN o.usage_limit ELSE l.usage_limit END,
               'period', coalesce(o.period, l.period),
               'enforcement', coalesce(o.enforcement, l.enforcement),
               'plan_credits', CASE WHEN pc.metric_id IS NOT NULL THEN
                   jsonb_build_object('amount', pc.amount, 'period', pc.period,
                                      'rollover_max', pc.rollover_max) END)
      INTO facts
      FROM flagship.customers c
      LEFT JOIN flagship.metrics m
        ON m.organization_id = c.organization_id AND m.project_id = c.project_id
       AND m.key = usage_facts.metric
      LEFT JOIN flagship.subscriptions s
        ON s.organization_id = c.organization_id AND s.customer_id = c.id
      LEFT JOIN flagship.customer_limit_overrides o
        ON o.organization_id = c.organization_id AND o.customer_id = c.id AND o.metric_id = m.id
      LEFT JOIN flagship.usage_limits l
        ON l.organization_id = c.organization_id AND l.plan_id = s.plan_id AND l.metric_id = m.id
      LEFT JOIN flagship.plan_credits pc
        ON pc.organization_id = c.organization_id AND pc.plan_id = s.plan_id AND pc.metric_id = m.id
     WHERE c.environment_id = usage_facts.environment_id AND c.external_key = usage_facts.customer;
    RETURN coalesce(facts, '{}');
END
$fn$;

-- The audit and change-feed trigger. Arguments: the change-feed kind, the
-- primary-key columns naming a row (besides organization_id), then the
-- columns left out of the trail: secrets (key hashes) and bookkeeping
-- (updated_at, usage counts). An UPDATE that changes only those is no
-- configuration change and records nothing.
--
-- SECURITY DEFINER so that it can append to tables no role may write;
-- current_actor() names the session's user, not the definer.
CREATE OR REPLACE FUNCTION flagship.audit_change() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    left_out text[] := TG_ARGV[2:];
    before jsonb;
    after jsonb;
    subject jsonb;
    changes jsonb;
    org uuid;
    resource text;
    subject_key text;
    environment uuid;
    event_id bigint;
    acting text;
    acting_role text;
    key uuid;
    xact bigint;
    appended int;
BEGIN
    IF TG_OP <> 'INSERT' THEN
        before := to_jsonb(OLD);
    END IF;
    IF TG_OP <> 'DELETE' THEN
        after := to_jsonb(NEW);
    END IF;
    subject := coalesce(after, before);

    IF TG_OP = 'UPDATE' THEN
        SELECT jsonb_object_agg(n.field, jsonb_build_object('old', before->n.field, 'new', n.value))
          INTO changes
          FROM jsonb_each(after - left_out) AS n (field, value)
         WHERE n.value IS DISTINCT FROM before->n.field;
    ELSE
        -- A new row's fields, or a deleted row's, leaving out the empty ones.
        SELECT jsonb_object_agg(r.field, jsonb_build_object(CASE TG_OP WHEN 'INSERT' THEN 'new' ELSE 'old' END, r.value))
          INTO changes
          FROM jsonb_each(subject - left_out) AS r (field, value)
         WHERE r.value <> 'null';
    END IF;
    IF changes IS NULL THEN
        RETURN NULL;
    END IF;

    org := CASE TG_TABLE_NAME WHEN 'organizations' THEN subject->>'id'
                              ELSE subject->>'organization_id' END;
    resource := subject->>'id';
    IF resource IS NULL THEN
        SELECT string_agg(subject->>column_name, '/' ORDER BY position) INTO resource
          FROM unnest(string_to_array(TG_ARGV[1], ',')) WITH ORDINALITY AS k (column_name, position);
    END IF;

    -- The change feed names what an application caches: a flag, a plan,
    -- a customer, even when the row changed is one of their parts.
    CASE TG_TABLE_NAME
    WHEN 'feature_rules' THEN
        SELECT f.key INTO subject_key FROM flagship.features f
         WHERE f.organization_id = org AND f.id = (subject->>'feature_id')::uuid;
    WHEN 'plan_features', 'usage_limits', 'plan_credits' THEN
        SELECT p.key INTO subject_key FROM flagship.plans p
         WHERE p.organization_id = org AND p.id = (subject->>'plan_id')::uuid;
    WHEN 'subscriptions', 'customer_feature_overrides', 'customer_limit_overrides' THEN
        SELECT c.external_key, c.environment_id INTO subject_key, environment FROM flagship.customers c
         WHERE c.organization_id = org AND c.id = (subject->>'customer_id')::uuid;
    WHEN 'role_permissions' THEN
        SELECT r.key INTO subject_key FROM flagship.roles r
         WHERE r.organization_id = org AND r.id = (subject->>'role_id')::uuid;
    WHEN 'member_roles' THEN
        SELECT m.user_key INTO subject_key FROM flagship.members m
         WHERE m.organization_id = org AND m.id = (subject->>'member_id')::uuid;
    ELSE
        NULL;
    END CASE;
    subject_key := coalesce(subject_key, subject->>'key', subject->>'external_key',
                            subject->>'user_key', subject->>'slug', resource);
    environment := coalesce(environment, (subject->>'environment_id')::uuid,
                            CASE TG_TABLE_NAME WHEN 'environments' THEN (subject->>'id')::uuid END);

    event_id := nextval('flagship.audit_events_id_seq');
    acting := flagship.current_actor();
    acting_role := flagship.acting_role();
    key := flagship.current_key_id();
    xact := pg_current_xact_id()::text::bigint;
    FOR attempt IN 1..2 LOOP
        WITH link AS (
            UPDATE flagship.audit_chain_heads h
               SET last_seq = h.last_seq + 1,
                   last_hash = flagship.audit_digest(
                       h.last_hash, h.last_seq + 1, event_id, org, now(), acting,
                       lower(TG_OP), TG_TABLE_NAME, resource, changes, xact,
                       session_user, acting_role, key)
             WHERE h.organization_id = org
            RETURNING h.last_seq, h.last_hash)
        INSERT INTO flagship.audit_events (organization_id, id, chain_seq, occurred_at, actor, action,
                                           resource_type, resource_id, diff, transaction_id, hash,
                                           session_role, acting_role, key_id,
                                           change_kind, change_key, environment_id)
        SELECT org, event_id, link.last_seq, now(), acting, lower(TG_OP),
               TG_TABLE_NAME, resource, changes, xact, link.last_hash,
               session_user, acting_role, key,
               TG_ARGV[0], subject_key, environment
          FROM link;
        GET DIAGNOSTICS appended = ROW_COUNT;
        EXIT WHEN appended > 0;
        -- The organization's first event starts its chain.
        INSERT INTO flagship.audit_chain_heads (organization_id) VALUES (org)
        ON CONFLICT DO NOTHING;
    END LOOP;

    -- Any role may LISTEN to any channel, so the payload carries nothing
    -- row-level security would hide: only the event's database-wide id.
    -- A listener asks flagship.changes_since what changed in its own
    -- organization.
    PERFORM pg_notify('flagship_changes', jsonb_build_object('id', event_id)::text);
    RETURN NULL;
END
$fn$;

SELECT flagship.audit_table('plan_credits', 'plan', '{}');


-- Planning needs no write permission, applying only that of what changes
-- (#17, review).

-- The items `document` would leave in the session's organization: it is
-- written in full (write_project) and read back (project_items), then the
-- writes are rolled back, always: nothing this function does outlives it,
-- whoever calls it. Runs as the extension's owner, so that the trial of a
-- plan needs no write permission (the real writes of apply_project run
-- with the caller's rights); refuses any organization but the session's.
CREATE FUNCTION flagship.project_trial(organization_id uuid, document jsonb, with_customers boolean)
RETURNS jsonb
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    written uuid;
    items jsonb;
BEGIN
    IF project_trial.organization_id IS DISTINCT FROM flagship.current_organization_id()
       AND NOT (flagship.current_organization_id() IS NULL
                AND (SELECT r.rolsuper FROM pg_roles r WHERE r.rolname = flagship.acting_role())) THEN
        RAISE EXCEPTION 'project_trial: only in the session''s organization'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    BEGIN
        -- Each a statement of its own: the read sees the writes.
        written := flagship.write_project(organization_id, document, NULL);
        items := flagship.project_items(written, with_customers);
        RAISE EXCEPTION USING ERRCODE = 'FS000';
    EXCEPTION WHEN SQLSTATE 'FS000' THEN
        RETURN items;
    END;
END
$fn$;

REVOKE ALL ON FUNCTION flagship.project_trial(uuid, jsonb, boolean) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION flagship.project_trial(uuid, jsonb, boolean) TO flagship_admin;

-- Writes a project document into the session's organization: the project
-- (created with its environments when missing, renamed otherwise), missing
-- environments, then segments, flags (prerequisites first), metrics, plans
-- and customers, each through its put_ function. `selected` limits the writes
-- to the items it lists ("<kind> <key>", as project_items names them); NULL
-- writes everything. Deletes nothing. Returns the project's id.
CREATE OR REPLACE FUNCTION flagship.write_project(organization_id uuid, document jsonb, selected jsonb)
RETURNS uuid
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    target_project uuid;
    project_key text := document->'project'->>'key';
    item jsonb;
    pending jsonb[];
    still_pending jsonb[];
    position int := 0;
BEGIN
    SELECT p.id INTO target_project FROM flagship.projects p
     WHERE p.organization_id = write_project.organization_id AND p.key = project_key;
    IF target_project IS NULL THEN
        target_project := flagship.create_project(
            organization_id, project_key, document->'project'->>'name',
            coalesce((SELECT array_agg(e->>'key' ORDER BY ordinality)
                        FROM jsonb_array_elements(document->'environments') WITH ORDINALITY AS x(e, ordinality)),
                     '{development,staging,production}'));
    ELSIF (selected IS NULL OR selected ? ('project ' || project_key))
          AND EXISTS (SELECT 1 FROM flagship.projects p
                       WHERE p.id = target_project
                         AND p.name IS DISTINCT FROM coalesce(document->'project'->>'name', p.key)) THEN
        -- Only a real change needs projects:write (a member who may only
        -- change flags applies documents that leave the project alone).
        PERFORM flagship.require_permission('projects:write', 'apply_project');
        UPDATE flagship.projects p SET name = coalesce(document->'project'->>'name', p.key)
         WHERE p.id = target_project;
    END IF;
    FOR item IN SELECT * FROM jsonb_array_elements(coalesce(document->'environments', '[]')) LOOP
        position := position + 1;
        IF jsonb_typeof(item) <> 'object' OR jsonb_typeof(item->'key') <> 'string' THEN
            RAISE EXCEPTION 'project "%": environments[%] must be an object with a "key"', project_key, position
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        IF selected IS NOT NULL AND NOT selected ? ('environment ' || (item->>'key')) THEN
            CONTINUE;
        END IF;
        IF (item->>'key') !~ '^[a-z0-9][a-z0-9_.-]*$' OR length(item->>'key') > 63 THEN
            RAISE EXCEPTION 'project "%": environments[%]: key "%" is invalid', project_key, position, item->>'key'
                USING ERRCODE = 'invalid_parameter_value',
                      HINT = 'key: lowercase letters, digits, ''_'', ''.'' and ''-''';
        END IF;
        IF EXISTS (SELECT 1 FROM flagship.environments e
                    WHERE e.project_id = target_project AND e.key = item->>'key'
                      AND e.name = coalesce(item->>'name', initcap(item->>'key'))
                      AND e.is_default = coalesce((item->>'is_default')::boolean, false)) THEN
            CONTINUE;
        END IF;
        PERFORM flagship.require_permission('projects:write', 'apply_project');
        -- The default moves in two steps: the partial unique index allows
        -- one default per project at any moment.
        IF coalesce((item->>'is_default')::boolean, false) THEN
            UPDATE flagship.environments e SET is_default = false
             WHERE e.project_id = target_project AND e.is_default AND e.key <> item->>'key';
        END IF;
        INSERT INTO flagship.environments AS e (organization_id, project_id, key, name, is_default)
        VALUES (organization_id, target_project, item->>'key',
                coalesce(item->>'name', initcap(item->>'key')),
                coalesce((item->>'is_default')::boolean, false))
        ON CONFLICT ON CONSTRAINT environments_key_unique DO UPDATE
           SET name = EXCLUDED.name, is_default = EXCLUDED.is_default
         WHERE (e.name, e.is_default) IS DISTINCT FROM (EXCLUDED.name, EXCLUDED.is_default);
    END LOOP;
    FOR item IN SELECT * FROM jsonb_array_elements(coalesce(document->'segments', '[]')) LOOP
        IF selected IS NULL OR selected ? ('segment ' || (item->>'key')) THEN
            PERFORM flagship.put_segment(target_project::text, item);
        END IF;
    END LOOP;
    -- Prerequisites must exist before the flags that name them.
    SELECT coalesce(array_agg(f), '{}') INTO pending
      FROM jsonb_array_elements(coalesce(document->'flags', '[]')) f
     WHERE selected IS NULL OR selected ? ('flag ' || (f->>'key'));
    WHILE cardinality(pending) > 0 LOOP
        still_pending := '{}';
        FOREACH item IN ARRAY pending LOOP
            -- A join, not a correlated subquery: Citus plans no correlated
            -- subquery beside a set-returning function (#21).
            IF EXISTS (SELECT 1 FROM jsonb_array_elements(coalesce(item->'prerequisites', '[]')) p
                         LEFT JOIN flagship.features f
                           ON f.organization_id = write_project.organization_id
                          AND f.project_id = target_project AND f.key = p->>'flag'
                        WHERE f.id IS NULL) THEN
                still_pending := still_pending || item;
            ELSE
                PERFORM flagship.put_flag(target_project::text, item);
            END IF;
        END LOOP;
        IF cardinality(still_pending) = cardinality(pending) THEN
            -- Nothing moved: let put_flag report the missing prerequisite.
            PERFORM flagship.put_flag(target_project::text, pending[1]);
        END IF;
        pending := still_pending;
    END LOOP;
    -- Plans name flags and metrics; customers name plans and metrics.
    FOR item IN SELECT * FROM jsonb_array_elements(coalesce(document->'metrics', '[]')) LOOP
        IF selected IS NULL OR selected ? ('metric ' || (item->>'key')) THEN
            PERFORM flagship.put_metric(target_project::text, item);
        END IF;
    END LOOP;
    FOR item IN SELECT * FROM jsonb_array_elements(coalesce(document->'plans', '[]')) LOOP
        IF selected IS NULL OR selected ? ('plan ' || (item->>'key')) THEN
            PERFORM flagship.put_plan(target_project::text, item);
        END IF;
    END LOOP;
    FOR item IN SELECT * FROM jsonb_array_elements(coalesce(document->'customers', '[]')) LOOP
        IF jsonb_typeof(item->'environment') IS DISTINCT FROM 'string' THEN
            RAISE EXCEPTION 'customer "%": "environment" must name one of the project''s environments', item->>'key'
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        IF selected IS NULL OR selected ? ('customer ' || (item->>'environment') || '/' || (item->>'key')) THEN
            PERFORM flagship.put_customer(
                coalesce((SELECT e.id::text FROM flagship.environments e
                           WHERE e.project_id = target_project AND e.key = item->>'environment'),
                         item->>'environment'),
                item - 'environment');
        END IF;
    END LOOP;
    RETURN target_project;
END
$fn$;

-- What applying `document` would change, and with `apply` the change made:
-- {"create": [...], "update": [...], "delete": [...], "unchanged": n}, each
-- item {"kind", "key", "changes"}. The document is first written in a
-- savepoint that is rolled back, so each item's new state is read back in
-- the form export_project gives it (defaults filled in) and compared with
-- the stored one; then, when applying, only the items that differ are
-- written. Items the document lacks are listed under "delete" by a plan and
-- deleted by apply only with `prune`, for the kinds the document has a list
-- of (a document without "customers" says nothing about customers).
-- Environments and the project itself are never deleted.
CREATE OR REPLACE FUNCTION flagship.project_changes(organization_id uuid, document jsonb, prune boolean, apply boolean)
RETURNS jsonb
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    caller text := CASE WHEN apply THEN 'apply_project' ELSE 'plan_project' END;
    session_organization uuid := flagship.current_organization_id();
    project_key text;
    target_project uuid;
    with_customers boolean;
    managed text[];
    before jsonb := '{}';
    after jsonb;
    wanted jsonb;
    creates jsonb := '[]';
    updates jsonb := '[]';
    deletes jsonb := '[]';
    unchanged int := 0;
    entry record;
    item_kind text;
    item_key text;
    kind_order constant text[] := '{project,environment,segment,flag,metric,plan,customer}';
BEGIN
    IF jsonb_typeof(document) IS DISTINCT FROM 'object' THEN
        RAISE EXCEPTION '%: the document must be a JSON object (export_project''s output)', caller
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF document->>'format' IS DISTINCT FROM 'flagship.project/1' THEN
        RAISE EXCEPTION '%: format: unsupported "%"', caller, coalesce(document->>'format', 'nothing')
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'this version reads "format": "flagship.project/1", as export_project writes';
    END IF;
    IF jsonb_typeof(document->'project') IS DISTINCT FROM 'object'
       OR jsonb_typeof(document->'project'->'key') IS DISTINCT FROM 'string' THEN
        RAISE EXCEPTION '%: project: must be an object with a "key" and a "name"', caller
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF session_organization IS NULL AND NOT (SELECT r.rolsuper FROM pg_roles r WHERE r.rolname = current_user) THEN
        RAISE EXCEPTION '%: no organization in this session', caller
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'SET LOCAL flagship.organization_id to the organization (or sign in with a JWT or an API key)';
    END IF;
    IF session_organization IS DISTINCT FROM organization_id AND session_organization IS NOT NULL THEN
        RAISE EXCEPTION '%: this session works in organization %, not %', caller, session_organization, organization_id
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'flagship.organization_id names the organization a session may change';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM flagship.organizations o WHERE o.id = project_changes.organization_id) THEN
        RAISE EXCEPTION '%: organization "%" not found', caller, organization_id
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    project_key := document->'project'->>'key';
    with_customers := document ? 'customers';
    managed := ARRAY(SELECT k FROM unnest('{segment,flag,metric,plan,customer}'::text[]) k
                      WHERE document ? (k || 's'));
    SELECT p.id INTO target_project FROM flagship.projects p
     WHERE p.organization_id = project_changes.organization_id AND p.key = project_key;
    IF target_project IS NOT NULL THEN
        before := flagship.project_items(target_project, with_customers);
    END IF;

    -- The trial: everything written, read back and rolled back, with the
    -- extension owner's rights, so that planning needs no write
    -- permission and applying needs only those of what really changes.
    after := flagship.project_trial(organization_id, document, with_customers);

    wanted := '{}';
    FOR entry IN SELECT * FROM jsonb_each(after) ORDER BY array_position(kind_order, split_part(key, ' ', 1)), key LOOP
        item_kind := split_part(entry.key, ' ', 1);
        item_key := substr(entry.key, length(item_kind) + 2);
        -- Items the trial kept only because nothing deletes there.
        IF before ? entry.key AND item_kind = ANY (managed) AND NOT flagship.document_lists(document, item_kind, item_key) THEN
            CONTINUE;
        END IF;
        IF NOT before ? entry.key THEN
            creates := creates || jsonb_build_object('kind', item_kind, 'key', item_key,
                                                     'changes', flagship.document_changes(NULL, entry.value));
            wanted := wanted || jsonb_build_object(entry.key, true);
        ELSIF before->entry.key <> entry.value THEN
            updates := updates || jsonb_build_object('kind', item_kind, 'key', item_key,
                                                     'changes', flagship.document_changes(before->entry.key, entry.value));
            wanted := wanted || jsonb_build_object(entry.key, true);
        ELSE
            unchanged := unchanged + 1;
        END IF;
    END LOOP;
    FOR entry IN SELECT * FROM jsonb_each(before) ORDER BY array_position(kind_order, split_part(key, ' ', 1)) DESC, key LOOP
        item_kind := split_part(entry.key, ' ', 1);
        item_key := substr(entry.key, length(item_kind) + 2);
        IF item_kind = ANY (managed) AND NOT flagship.document_lists(document, item_kind, item_key) THEN
            deletes := deletes || jsonb_build_object('kind', item_kind, 'key', item_key,
                                                     'changes', flagship.document_changes(entry.value, NULL));
        END IF;
    END LOOP;

    IF apply THEN
        IF wanted <> '{}' THEN
            target_project := flagship.write_project(organization_id, document, wanted);
        END IF;
        IF prune THEN
            -- Dependants first: customers name plans, plans name metrics and
            -- flags, flags name segments.
            FOR entry IN SELECT value FROM jsonb_array_elements(deletes) LOOP
                item_kind := entry.value->>'kind';
                item_key := entry.value->>'key';
                CASE item_kind
                WHEN 'customer' THEN
                    DELETE FROM flagship.customers c USING flagship.environments e
                     WHERE c.project_id = target_project AND e.organization_id = c.organization_id
                       AND e.id = c.environment_id AND e.key || '/' || c.external_key = item_key;
                WHEN 'plan' THEN
                    DELETE FROM flagship.plans p WHERE p.project_id = target_project AND p.key = item_key;
                WHEN 'metric' THEN
                    DELETE FROM flagship.metrics m WHERE m.project_id = target_project AND m.key = item_key;
                WHEN 'flag' THEN
                    DELETE FROM flagship.features f WHERE f.project_id = target_project AND f.key = item_key;
                WHEN 'segment' THEN
                    DELETE FROM flagship.segments s WHERE s.project_id = target_project AND s.key = item_key;
                END CASE;
            END LOOP;
        ELSE
            deletes := '[]';
        END IF;
    END IF;
    RETURN jsonb_build_object('create', creates, 'update', updates, 'delete', deletes, 'unchanged', unchanged);
END
$fn$;


-- A rolled key counts its uses on its predecessor's sequence (#18).
ALTER TABLE flagship.api_keys ADD COLUMN uses_of uuid;
GRANT SELECT (uses_of) ON flagship.api_keys TO flagship_admin, flagship_app, flagship_auditor;

CREATE OR REPLACE FUNCTION flagship.api_keys_use_sequence() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    IF TG_OP = 'DELETE' THEN
        -- A sequence that a rolled key still counts on stays (it goes with
        -- the last key using it).
        IF NOT EXISTS (SELECT 1 FROM flagship.api_keys k
                        WHERE k.uses_of = coalesce(OLD.uses_of, OLD.id) AND k.id <> OLD.id)
           AND (OLD.uses_of IS NULL
                OR NOT EXISTS (SELECT 1 FROM flagship.api_keys k WHERE k.id = OLD.uses_of)) THEN
            EXECUTE format('DROP SEQUENCE IF EXISTS %s',
                           flagship.key_use_sequence(coalesce(OLD.uses_of, OLD.id)));
        END IF;
    ELSIF NEW.usage_limit IS NOT NULL THEN
        PERFORM flagship.ensure_key_use_sequence(coalesce(NEW.uses_of, NEW.id), NEW.usage_count);
    END IF;
    RETURN NULL;
END
$fn$;

-- Verification runs before the caller has any organization, so it is
-- SECURITY DEFINER: it finds the key by hash alone and reveals only what
-- the key itself grants.
CREATE OR REPLACE FUNCTION flagship.verify_api_key(key text, client_ip inet DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    key_row flagship.api_keys;
    organization_status text;
    code text;
    uses bigint;
    customer_key text;
BEGIN
    IF key IS NOT NULL AND key ~ '^fs_(live|test)_[0-9a-f]{64}$' THEN
        SELECT * INTO key_row FROM flagship.api_keys k WHERE k.key_hash = sha256(convert_to(key, 'UTF8'));
    END IF;
    IF key_row.id IS NULL THEN
        code := 'NOT_FOUND';
    -- An allow-list admits only the addresses it lists, and tells callers
    -- elsewhere nothing more (not even that the key was revoked); a
    -- verification that does not say where the call comes from is refused.
    ELSIF key_row.allowed_ips IS NOT NULL
          AND (client_ip IS NULL
               OR NOT EXISTS (SELECT FROM unnest(key_row.allowed_ips) a WHERE client_ip <<= a)) THEN
        code := 'FORBIDDEN';
    ELSIF key_row.revoked_at IS NOT NULL THEN
        code := 'REVOKED';
    ELSIF key_row.expires_at IS NOT NULL AND key_row.expires_at <= now() THEN
        code := 'EXPIRED';
    ELSE
        SELECT o.status INTO organization_status FROM flagship.organizations o
         WHERE o.id = key_row.organization_id;
        IF organization_status IS DISTINCT FROM 'active' THEN
            code := 'FORBIDDEN';
        ELSIF key_row.usage_limit IS NOT NULL THEN
            -- Counting uses is a write by nature; only limited keys pay it.
            uses := nextval(flagship.ensure_key_use_sequence(coalesce(key_row.uses_of, key_row.id),
                                                              key_row.usage_count));
            IF uses <= key_row.usage_limit THEN
                code := 'VALID';
                UPDATE flagship.api_keys k SET usage_count = greatest(k.usage_count, uses), last_used_at = now()
                 WHERE k.organization_id = key_row.organization_id AND k.id = key_row.id;
            ELSE
                code := 'USAGE_EXCEEDED';
            END IF;
        ELSE
            code := 'VALID';
            -- At most one write a minute per key, so busy keys do not turn
            -- every verification into a hot-row update.
            UPDATE flagship.api_keys k SET last_used_at = now()
             WHERE k.organization_id = key_row.organization_id AND k.id = key_row.id
               AND (k.last_used_at IS NULL OR k.last_used_at < now() - interval '1 minute');
        END IF;
    END IF;
    IF code <> 'VALID' THEN
        RETURN jsonb_build_object('valid', false, 'code', code, 'key_id', NULL,
                                  'organization_id', NULL, 'environment_id', NULL, 'scopes', NULL,
                                  'customer', NULL);
    END IF;
    IF key_row.customer_id IS NOT NULL THEN
        SELECT c.external_key INTO customer_key FROM flagship.customers c
         WHERE c.organization_id = key_row.organization_id AND c.id = key_row.customer_id;
    END IF;
    RETURN jsonb_build_object('valid', true, 'code', code, 'key_id', key_row.id,
                              'organization_id', key_row.organization_id,
                              'environment_id', key_row.environment_id, 'scopes', to_jsonb(key_row.scopes),
                              'customer', customer_key);
END
$fn$;

-- A new key with the same settings (name, scopes, environment, customer,
-- addresses, expiry, usage limit, and the same use sequence, so both keys
-- together stay within the limit); the old one keeps verifying for
-- `grace`, then answers EXPIRED. Returns the new key's plaintext, once.
CREATE OR REPLACE FUNCTION flagship.roll_api_key(key_id uuid, grace interval DEFAULT '0')
RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    old flagship.api_keys;
    plaintext text;
BEGIN
    PERFORM flagship.require_permission('api_keys:write', 'roll_api_key');
    IF grace IS NULL OR grace < interval '0' THEN
        RAISE EXCEPTION 'grace: must be a non-negative interval' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- Row-level security makes another organization's key look absent.
    SELECT k.organization_id, k.id, k.name, k.display_prefix, k.scopes, k.project_id, k.environment_id,
           k.expires_at, k.revoked_at, k.usage_limit, k.usage_count, k.customer_id, k.allowed_ips, k.uses_of
      INTO old.organization_id, old.id, old.name, old.display_prefix, old.scopes, old.project_id,
           old.environment_id, old.expires_at, old.revoked_at, old.usage_limit, old.usage_count,
           old.customer_id, old.allowed_ips, old.uses_of
      FROM flagship.api_keys k WHERE k.id = key_id;
    IF old.id IS NULL THEN
        RAISE EXCEPTION 'key_id: api key % not found', key_id USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF NOT flagship.within_session_key(old.scopes, old.environment_id, old.expires_at, old.usage_limit,
                                       old.allowed_ips, old.customer_id) THEN
        RAISE EXCEPTION 'a key may not roll a key wider than itself'
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'roll it in a session of a member with api_keys:write, or with a key at least as wide';
    END IF;
    -- The row lock makes two concurrent rolls of one key queue; the second
    -- then finds it expired (or still within its grace) as the first left it.
    SELECT k.expires_at, k.revoked_at, k.usage_count INTO old.expires_at, old.revoked_at, old.usage_count
      FROM flagship.api_keys k WHERE k.organization_id = old.organization_id AND k.id = old.id FOR UPDATE;
    IF old.revoked_at IS NOT NULL OR (old.expires_at IS NOT NULL AND old.expires_at <= now()) THEN
        RAISE EXCEPTION 'key_id: api key % is revoked or expired', key_id
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'issue a new key with flagship.issue_api_key';
    END IF;
    plaintext := (CASE WHEN old.display_prefix LIKE 'fs_test_%' THEN 'fs_test_' ELSE 'fs_live_' END)
                 || replace(gen_random_uuid()::text, '-', '') || replace(gen_random_uuid()::text, '-', '');
    INSERT INTO flagship.api_keys
        (organization_id, name, display_prefix, key_hash, scopes, project_id, environment_id,
         expires_at, usage_limit, usage_count, customer_id, allowed_ips, rolled_from, uses_of)
    VALUES (old.organization_id, old.name, left(plaintext, 16), sha256(convert_to(plaintext, 'UTF8')),
            old.scopes, old.project_id, old.environment_id, old.expires_at, old.usage_limit,
            old.usage_count,
            old.customer_id, old.allowed_ips, old.id, coalesce(old.uses_of, old.id));
    UPDATE flagship.api_keys k
       SET expires_at = least(coalesce(k.expires_at, 'infinity'), now() + grace)
     WHERE k.organization_id = old.organization_id AND k.id = old.id;
    RETURN plaintext;
END
$fn$;


-- One piece for each: import_project writes through write_project; the
-- object-naming refusal of put_metric/put_plan/put_customer is
-- refuse_about; document_changes compares document_fields.

-- Raises a refusal of one object's document again, naming the object
-- first: `<kind> "<key>": <field>: <message>` (a message that starts with
-- the kind loses it), as 22023 with its hint.
CREATE FUNCTION flagship.refuse_about(kind text, key text, message text, hint text) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    refused constant text := format('%s "%s": %s', kind, coalesce(key, '?'),
                                     regexp_replace(message, '^' || kind || ': ', ''));
BEGIN
    IF coalesce(hint, '') = '' THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value', MESSAGE = refused;
    END IF;
    RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value', MESSAGE = refused, HINT = hint;
END
$fn$;

CREATE OR REPLACE FUNCTION flagship.put_metric(project text, definition jsonb) RETURNS uuid
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    refused text;
    refused_hint text;
    target_project uuid := flagship.resolve_project(project);
    saved uuid;
BEGIN
    PERFORM flagship.require_permission('plans:write', 'put_metric');
    PERFORM flagship.require_object(definition, 'metric', '{key,name,unit,aggregation,description}');
    PERFORM flagship.check_key_format(definition->>'key', 'key');
    IF coalesce(definition->>'aggregation', 'sum') NOT IN ('sum', 'gauge', 'credits') THEN
        PERFORM flagship.refuse('aggregation', 'must be sum, gauge or credits');
    END IF;
    INSERT INTO flagship.metrics AS m (organization_id, project_id, key, name, unit, aggregation)
    SELECT p.organization_id, p.id, definition->>'key', definition->>'name', definition->>'unit',
           coalesce(definition->>'aggregation', 'sum')
      FROM flagship.projects p WHERE p.id = target_project
    ON CONFLICT ON CONSTRAINT metrics_key_unique DO UPDATE
       SET name = EXCLUDED.name, unit = EXCLUDED.unit, aggregation = EXCLUDED.aggregation,
           updated_at = now()
    RETURNING m.id INTO saved;
    RETURN saved;
EXCEPTION WHEN invalid_parameter_value THEN
    -- Every refusal names the metric it is about, then the field.
    GET STACKED DIAGNOSTICS refused = MESSAGE_TEXT, refused_hint = PG_EXCEPTION_HINT;
    PERFORM flagship.refuse_about('metric', definition->>'key', refused, refused_hint);
END
$fn$;

CREATE OR REPLACE FUNCTION flagship.put_plan(project text, definition jsonb) RETURNS uuid
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    refused text;
    refused_hint text;
    project_row flagship.projects;
    saved uuid;
BEGIN
    PERFORM flagship.require_permission('plans:write', 'put_plan');
    project_row := flagship.project_row(project);
    PERFORM flagship.require_object(definition, 'plan', '{key,name,features,limits,credits}');
    PERFORM flagship.check_key_format(definition->>'key', 'key');
    IF jsonb_typeof(coalesce(definition->'features', '{}')) <> 'object' THEN
        PERFORM flagship.refuse('features', 'must be an object of flag key to true/false');
    END IF;
    IF jsonb_typeof(coalesce(definition->'limits', '{}')) <> 'object' THEN
        PERFORM flagship.refuse('limits', 'must be an object of metric key to limit');
    END IF;
    IF jsonb_typeof(coalesce(definition->'credits', '{}')) <> 'object' THEN
        PERFORM flagship.refuse('credits', 'must be an object of credits metric key to {"amount", "period", "rollover"}');
    END IF;

    INSERT INTO flagship.plans AS p (organization_id, project_id, key, name)
    VALUES (project_row.organization_id, project_row.id, definition->>'key', definition->>'name')
    ON CONFLICT ON CONSTRAINT plans_key_unique DO UPDATE SET name = EXCLUDED.name, updated_at = now()
    RETURNING p.id INTO saved;

    DELETE FROM flagship.plan_features f WHERE f.organization_id = project_row.organization_id AND f.plan_id = saved;
    INSERT INTO flagship.plan_features (organization_id, project_id, plan_id, feature_key, enabled)
    SELECT project_row.organization_id, project_row.id, saved, s.feature_key, s.enabled
      FROM flagship.feature_switches(project_row.organization_id, project_row.id,
                                     definition->'features', 'features') s;

    DELETE FROM flagship.usage_limits l WHERE l.organization_id = project_row.organization_id AND l.plan_id = saved;
    INSERT INTO flagship.usage_limits
        (organization_id, project_id, plan_id, metric_id, usage_limit, period, enforcement)
    SELECT project_row.organization_id, project_row.id, saved, t.metric_id, t.usage_limit, t.period, t.enforcement
      FROM flagship.metric_limits(project_row.organization_id, project_row.id,
                                  definition->'limits', 'limits') t;

    DELETE FROM flagship.plan_credits c WHERE c.organization_id = project_row.organization_id AND c.plan_id = saved;
    INSERT INTO flagship.plan_credits
        (organization_id, project_id, plan_id, metric_id, amount, period, rollover_max)
    SELECT project_row.organization_id, project_row.id, saved, t.metric_id, t.amount, t.period, t.rollover_max
      FROM flagship.plan_credit_terms(project_row.organization_id, project_row.id,
                                      definition->'credits', 'credits') t;
    RETURN saved;
EXCEPTION WHEN invalid_parameter_value THEN
    -- Every refusal names the plan it is about, then the field.
    GET STACKED DIAGNOSTICS refused = MESSAGE_TEXT, refused_hint = PG_EXCEPTION_HINT;
    PERFORM flagship.refuse_about('plan', definition->>'key', refused, refused_hint);
END
$fn$;

CREATE OR REPLACE FUNCTION flagship.put_customer(environment text, definition jsonb) RETURNS uuid
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    refused text;
    refused_hint text;
    environment_row flagship.environments;
    plan_row flagship.plans;
    saved uuid;
    new_status text;
    new_trial_end timestamptz;
    new_anchor timestamptz;
BEGIN
    PERFORM flagship.require_permission('plans:write', 'put_customer');
    environment_row := flagship.environment_row(environment);
    PERFORM flagship.require_object(definition, 'customer',
        '{key,name,plan,status,trial_ends_at,billing_anchor,overrides,attributes,environment}');
    -- export_project names each customer's environment: accepted when it is
    -- the one written to, so an exported customer can be put back as is.
    IF definition ? 'environment' AND definition->>'environment' IS DISTINCT FROM environment_row.key THEN
        PERFORM flagship.refuse('environment',
            format('names "%s", but the customer is written to environment "%s"',
                   definition->>'environment', environment_row.key));
    END IF;
    IF jsonb_typeof(definition->'key') IS DISTINCT FROM 'string' OR btrim(definition->>'key') = '' THEN
        PERFORM flagship.refuse('key', 'must be a non-empty string');
    END IF;
    IF jsonb_typeof(coalesce(definition->'attributes', '{}')) <> 'object' THEN
        PERFORM flagship.refuse('attributes', 'must be a JSON object');
    END IF;
    PERFORM flagship.require_object(coalesce(definition->'overrides', '{}'), 'overrides', '{features,limits}');
    new_status := coalesce(definition->>'status', 'active');
    IF new_status NOT IN ('active', 'trialing', 'canceled') THEN
        PERFORM flagship.refuse('status', format('must be active, trialing or canceled, not "%s"', new_status));
    END IF;
    BEGIN
        new_trial_end := (definition->>'trial_ends_at')::timestamptz;
    EXCEPTION WHEN others THEN
        PERFORM flagship.refuse('trial_ends_at', 'must be a timestamp');
    END;
    BEGIN
        new_anchor := (definition->>'billing_anchor')::timestamptz;
    EXCEPTION WHEN others THEN
        PERFORM flagship.refuse('billing_anchor', 'must be a timestamp');
    END;
    IF new_status = 'trialing' AND new_trial_end IS NULL THEN
        PERFORM flagship.refuse('trial_ends_at', 'is required while trialing');
    END IF;
    IF definition ? 'plan' THEN
        SELECT * INTO plan_row FROM flagship.plans p
         WHERE p.organization_id = environment_row.organization_id
           AND p.project_id = environment_row.project_id AND p.key = definition->>'plan';
        IF NOT FOUND THEN
            PERFORM flagship.refuse('plan', format('unknown plan "%s"', definition->>'plan'));
        END IF;
    END IF;

    INSERT INTO flagship.customers AS c
        (organization_id, project_id, environment_id, external_key, name, attributes)
    VALUES (environment_row.organization_id, environment_row.project_id, environment_row.id,
            definition->>'key', definition->>'name', coalesce(definition->'attributes', '{}'))
    ON CONFLICT ON CONSTRAINT customers_key_unique DO UPDATE
       SET name = EXCLUDED.name, attributes = EXCLUDED.attributes, updated_at = EXCLUDED.updated_at
    RETURNING c.id INTO saved;

    IF plan_row.id IS NULL THEN
        DELETE FROM flagship.subscriptions s
         WHERE s.organization_id = environment_row.organization_id AND s.customer_id = saved;
    ELSE
        INSERT INTO flagship.subscriptions AS s
            (organization_id, project_id, customer_id, plan_id, status, trial_ends_at, billing_anchor)
        VALUES (environment_row.organization_id, environment_row.project_id, saved, plan_row.id,
                new_status, new_trial_end, coalesce(new_anchor, now()))
        ON CONFLICT (organization_id, customer_id) DO UPDATE
           SET plan_id = EXCLUDED.plan_id, status = EXCLUDED.status,
               trial_ends_at = EXCLUDED.trial_ends_at,
               billing_anchor = coalesce(new_anchor, s.billing_anchor), updated_at = EXCLUDED.updated_at;
    END IF;

    DELETE FROM flagship.customer_feature_overrides o
     WHERE o.organization_id = environment_row.organization_id AND o.customer_id = saved;
    INSERT INTO flagship.customer_feature_overrides (organization_id, customer_id, feature_key, enabled)
    SELECT environment_row.organization_id, saved, s.feature_key, s.enabled
      FROM flagship.feature_switches(environment_row.organization_id, environment_row.project_id,
                                     definition->'overrides'->'features', 'overrides.features') s;

    DELETE FROM flagship.customer_limit_overrides o
     WHERE o.organization_id = environment_row.organization_id AND o.customer_id = saved;
    INSERT INTO flagship.customer_limit_overrides
        (organization_id, project_id, customer_id, metric_id, usage_limit, period, enforcement)
    SELECT environment_row.organization_id, environment_row.project_id, saved,
           t.metric_id, t.usage_limit, t.period, t.enforcement
      FROM flagship.metric_limits(environment_row.organization_id, environment_row.project_id,
                                  definition->'overrides'->'limits', 'overrides.limits') t;
    RETURN saved;
EXCEPTION WHEN invalid_parameter_value THEN
    -- Every refusal names the customer it is about, then the field.
    GET STACKED DIAGNOSTICS refused = MESSAGE_TEXT, refused_hint = PG_EXCEPTION_HINT;
    PERFORM flagship.refuse_about('customer', definition->>'key', refused, refused_hint);
END
$fn$;

CREATE OR REPLACE FUNCTION flagship.import_project(organization_id uuid, document jsonb) RETURNS uuid
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    IF document IS NULL OR jsonb_typeof(document->'project') <> 'object' THEN
        RAISE EXCEPTION 'import_project: "project" must be an object with key and name'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF document ? 'format' AND document->>'format' IS DISTINCT FROM 'flagship.project/1' THEN
        RAISE EXCEPTION 'import_project: format: unsupported "%"', document->>'format'
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'this version reads "format": "flagship.project/1", as export_project writes';
    END IF;
    IF EXISTS (SELECT 1 FROM flagship.projects p
                WHERE p.organization_id = import_project.organization_id
                  AND p.key = document->'project'->>'key') THEN
        RAISE EXCEPTION 'import_project: organization % already has project "%"',
            organization_id, document->'project'->>'key'
            USING ERRCODE = 'unique_violation',
                  HINT = 'flagship.apply_project updates an existing project (plan_project shows what it would change)';
    END IF;
    -- The same writes apply_project makes for a new project
    -- (write_project, sql/operations.sql): segments, then flags with their
    -- prerequisites first, metrics, plans, customers.
    RETURN flagship.write_project(organization_id, document, NULL);
END
$fn$;

-- The fields of one item's document as document_changes compares them:
-- each top-level member, and a flag's environments one by one
-- ("environments.production").
CREATE FUNCTION flagship.document_fields(document jsonb) RETURNS TABLE (field text, value jsonb)
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT f.key, f.value FROM jsonb_each(coalesce(document, '{}')) f
     WHERE f.key <> 'environments' OR jsonb_typeof(f.value) <> 'object'
    UNION ALL
    SELECT 'environments.' || e.key, e.value
      FROM jsonb_each(CASE WHEN jsonb_typeof(document->'environments') = 'object'
                           THEN document->'environments' ELSE '{}' END) e
$fn$;

-- Field by field, what differs between two documents of one item:
-- {"<field>": {"old": ..., "new": ...}} (see document_fields). A missing
-- field is null.
CREATE OR REPLACE FUNCTION flagship.document_changes(old jsonb, new jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT coalesce(jsonb_object_agg(coalesce(o.field, n.field),
                                     jsonb_build_object('old', o.value, 'new', n.value)), '{}')
      FROM flagship.document_fields(old) o FULL JOIN flagship.document_fields(new) n ON n.field = o.field
     WHERE o.value IS DISTINCT FROM n.value
$fn$;


-- Rate limits (#18): definitions on plans and keys, counted in shared
-- memory by flagship.rate_limit and verify_api_key.
CREATE  FUNCTION "rate_window_us"(
	"window" TEXT /* & str */
) RETURNS bigint /* Option < i64 > */
IMMUTABLE STRICT PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'rate_window_us_wrapper';

-- Whether `spec` is a valid set of rate limits (NULL: none), by the rules
-- of checked_rate_limits (one set of rules, read there); for CHECK
-- constraints, which cannot name the field at fault. A stored column holds
-- NULL, not '{}', for "none".
CREATE FUNCTION flagship.rate_limits_valid(spec jsonb) RETURNS boolean
LANGUAGE plpgsql
IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    IF spec IS NULL THEN
        RETURN true;
    END IF;
    IF jsonb_typeof(spec) <> 'object' OR spec = '{}' THEN
        RETURN false;
    END IF;
    PERFORM flagship.checked_rate_limits(spec, 'rate_limits');
    RETURN true;
EXCEPTION WHEN invalid_parameter_value THEN
    RETURN false;
END
$fn$;

ALTER TABLE flagship.plans ADD COLUMN rate_limits jsonb
    CONSTRAINT plans_rate_limits_valid CHECK (flagship.rate_limits_valid(rate_limits));
ALTER TABLE flagship.api_keys ADD COLUMN rate_limits jsonb
    CONSTRAINT api_keys_rate_limits_valid CHECK (flagship.rate_limits_valid(rate_limits));
GRANT SELECT (rate_limits) ON flagship.api_keys TO flagship_admin, flagship_app, flagship_auditor;


CREATE  FUNCTION "rate_limit"(
	"subject" TEXT, /* & str */
	"name" TEXT, /* & str */
	"cost" INT DEFAULT 1, /* i32 */
	"environment" TEXT DEFAULT NULL /* Option < & str > */
) RETURNS jsonb /* JsonB */
VOLATILE PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'rate_limit_wrapper';

CREATE  FUNCTION "rate_limit_hit"(
	"organization_id" uuid, /* pgrx :: Uuid */
	"subject" TEXT, /* & str */
	"name" TEXT, /* & str */
	"rate_limit" bigint, /* i64 */
	"window" TEXT, /* & str */
	"cost" INT /* i32 */
) RETURNS jsonb /* JsonB */
STRICT VOLATILE PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'rate_limit_hit_wrapper';

-- `{name: {"limit": n, "window": "1m"}}` of a plan or key, checked
-- (windows 1s..1d); NULL for none.
CREATE FUNCTION flagship.checked_rate_limits(spec jsonb, field text) RETURNS jsonb
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    item record;
    path text;
BEGIN
    IF spec IS NULL OR spec = 'null' OR spec = '{}' THEN
        RETURN NULL;
    END IF;
    IF jsonb_typeof(spec) <> 'object' THEN
        PERFORM flagship.refuse(field, 'must be an object of rate limit name to {"limit", "window"}');
    END IF;
    FOR item IN SELECT * FROM jsonb_each(spec) LOOP
        path := field || '.' || item.key;
        IF item.key !~ '^[a-z0-9][a-z0-9_.-]*$' OR length(item.key) > 63 THEN
            PERFORM flagship.refuse(path, 'a rate limit name is lower-case letters, digits, "_", "." and "-" (at most 63)');
        END IF;
        PERFORM flagship.require_object(item.value, path, '{limit,window}');
        IF jsonb_typeof(item.value->'limit') IS DISTINCT FROM 'number'
           OR (item.value->>'limit')::numeric <> trunc((item.value->>'limit')::numeric)
           OR (item.value->>'limit')::numeric NOT BETWEEN 1 AND 1000000000 THEN
            PERFORM flagship.refuse(path || '.limit', 'must be a whole number of requests from 1 to 10^9');
        END IF;
        IF jsonb_typeof(item.value->'window') IS DISTINCT FROM 'string'
           OR flagship.rate_window_us(item.value->>'window') IS NULL THEN
            PERFORM flagship.refuse(path || '.window',
                format('%s is not a window from 1s to 1d (a whole number and s, m, h or d, such as "1m")',
                       coalesce(item.value->'window', 'null')));
        END IF;
    END LOOP;
    RETURN spec;
END
$fn$;

CREATE OR REPLACE FUNCTION flagship.put_plan(project text, definition jsonb) RETURNS uuid
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    refused text;
    refused_hint text;
    project_row flagship.projects;
    saved uuid;
BEGIN
    PERFORM flagship.require_permission('plans:write', 'put_plan');
    project_row := flagship.project_row(project);
    PERFORM flagship.require_object(definition, 'plan', '{key,name,features,limits,credits,rate_limits}');
    PERFORM flagship.check_key_format(definition->>'key', 'key');
    IF jsonb_typeof(coalesce(definition->'features', '{}')) <> 'object' THEN
        PERFORM flagship.refuse('features', 'must be an object of flag key to true/false');
    END IF;
    IF jsonb_typeof(coalesce(definition->'limits', '{}')) <> 'object' THEN
        PERFORM flagship.refuse('limits', 'must be an object of metric key to limit');
    END IF;
    IF jsonb_typeof(coalesce(definition->'credits', '{}')) <> 'object' THEN
        PERFORM flagship.refuse('credits', 'must be an object of credits metric key to {"amount", "period", "rollover"}');
    END IF;

    INSERT INTO flagship.plans AS p (organization_id, project_id, key, name, rate_limits)
    VALUES (project_row.organization_id, project_row.id, definition->>'key', definition->>'name',
            flagship.checked_rate_limits(definition->'rate_limits', 'rate_limits'))
    ON CONFLICT ON CONSTRAINT plans_key_unique DO UPDATE
       SET name = EXCLUDED.name, rate_limits = EXCLUDED.rate_limits, updated_at = EXCLUDED.updated_at
    RETURNING p.id INTO saved;

    DELETE FROM flagship.plan_features f WHERE f.organization_id = project_row.organization_id AND f.plan_id = saved;
    INSERT INTO flagship.plan_features (organization_id, project_id, plan_id, feature_key, enabled)
    SELECT project_row.organization_id, project_row.id, saved, s.feature_key, s.enabled
      FROM flagship.feature_switches(project_row.organization_id, project_row.id,
                                     definition->'features', 'features') s;

    DELETE FROM flagship.usage_limits l WHERE l.organization_id = project_row.organization_id AND l.plan_id = saved;
    INSERT INTO flagship.usage_limits
        (organization_id, project_id, plan_id, metric_id, usage_limit, period, enforcement)
    SELECT project_row.organization_id, project_row.id, saved, t.metric_id, t.usage_limit, t.period, t.enforcement
      FROM flagship.metric_limits(project_row.organization_id, project_row.id,
                                  definition->'limits', 'limits') t;

    DELETE FROM flagship.plan_credits c WHERE c.organization_id = project_row.organization_id AND c.plan_id = saved;
    INSERT INTO flagship.plan_credits
        (organization_id, project_id, plan_id, metric_id, amount, period, rollover_max)
    SELECT project_row.organization_id, project_row.id, saved, t.metric_id, t.amount, t.period, t.rollover_max
      FROM flagship.plan_credit_terms(project_row.organization_id, project_row.id,
                                      definition->'credits', 'credits') t;
    RETURN saved;
EXCEPTION WHEN invalid_parameter_value THEN
    -- Every refusal names the plan it is about, then the field.
    GET STACKED DIAGNOSTICS refused = MESSAGE_TEXT, refused_hint = PG_EXCEPTION_HINT;
    PERFORM flagship.refuse_about('plan', definition->>'key', refused, refused_hint);
END
$fn$;

CREATE OR REPLACE FUNCTION flagship.plan_document(plan flagship.plans) RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
-- PL/pgSQL: Citus cannot plan a SQL function's statements that take
-- parameters, and here the organization is a value of each (#21).
BEGIN
    RETURN (
        SELECT flagship.jsonb_without_nulls(jsonb_build_object(
            'key', plan.key, 'name', plan.name,
            'features', coalesce((SELECT jsonb_object_agg(f.feature_key, f.enabled)
                                    FROM flagship.plan_features f
                                   WHERE f.organization_id = plan.organization_id AND f.plan_id = plan.id), '{}'),
            'limits', coalesce((SELECT jsonb_object_agg(m.key, flagship.limit_document(l.usage_limit, l.period, l.enforcement))
                                  FROM flagship.usage_limits l
                                  JOIN flagship.metrics m ON m.organization_id = l.organization_id AND m.id = l.metric_id
                                 WHERE l.organization_id = plan.organization_id AND l.plan_id = plan.id), '{}'),
            -- Absent when the plan grants none (0.2.0 documents stay as they were).
            'credits', (SELECT jsonb_object_agg(m.key, jsonb_build_object('amount', c.amount, 'period', c.period,
                                                                         'rollover', jsonb_build_object('max', c.rollover_max)))
                          FROM flagship.plan_credits c
                          JOIN flagship.metrics m ON m.organization_id = c.organization_id AND m.id = c.metric_id
                         WHERE c.organization_id = plan.organization_id AND c.plan_id = plan.id),
            'rate_limits', plan.rate_limits)));
END
$fn$;

-- Whether `limits` is at least as tight as the rate limits of the key
-- this transaction authenticated with (true outside key mode): each of the
-- key's limits, with a limit no higher and a window no shorter.
CREATE FUNCTION flagship.within_session_rate_limits(limits jsonb) RETURNS boolean
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
-- PL/pgSQL with the organization as a value: Citus can plan it and send
-- it to the organization's shard group (#21).
DECLARE
    org constant uuid := flagship.current_organization_id();
    session_key constant uuid := flagship.current_key_id();
    own_limits jsonb;
BEGIN
    SELECT k.rate_limits INTO own_limits FROM flagship.api_keys k
     WHERE k.organization_id = org AND k.id = session_key;
    RETURN NOT EXISTS (
        SELECT FROM jsonb_each(own_limits) own
         WHERE NOT coalesce(limits ? own.key
                    AND (limits->own.key->>'limit')::bigint <= (own.value->>'limit')::bigint
                    AND flagship.rate_window_us(limits->own.key->>'window')
                        >= flagship.rate_window_us(own.value->>'window'), false));
END
$fn$;

-- What flagship.rate_limit counts against for key:<key id>, read under the
-- caller's row-level security: {"organization_id", "subject" (whose
-- window: a rolled key counts in its predecessor's), "limit", "window"}.
CREATE FUNCTION flagship.key_rate_limit(subject text, name text)
RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
#variable_conflict use_variable
DECLARE
    key_row record;
BEGIN
    IF substr(subject, 5) !~* '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$' THEN
        RAISE EXCEPTION 'subject: "%" is not key:<key id>', subject USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- Row-level security makes another organization's key look absent.
    SELECT k.organization_id, coalesce(k.uses_of, k.id) AS counted, k.rate_limits INTO key_row
      FROM flagship.api_keys k WHERE k.id = substr(subject, 5)::uuid;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'subject: api key % not found', substr(subject, 5)
            USING ERRCODE = 'invalid_parameter_value';
    ELSIF NOT coalesce(key_row.rate_limits ? name, false) THEN
        RAISE EXCEPTION 'api key %: no rate limit "%"', substr(subject, 5), name
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = coalesce('the key declares: ' || (SELECT string_agg(n, ', ' ORDER BY n)
                                                             FROM jsonb_object_keys(key_row.rate_limits) n),
                                  'the key declares no rate limits');
    END IF;
    RETURN jsonb_build_object('organization_id', key_row.organization_id,
                              'subject', 'key:' || key_row.counted,
                              'limit', key_row.rate_limits->name->'limit',
                              'window', key_row.rate_limits->name->'window');
END
$fn$;

-- The same for a customer of the environment (kept per backend like the
-- other entitlement facts): limit and window NULL when the customer's plan
-- declares no such limit while another plan of the project does
-- (unlimited). A name nobody declares is refused as a typo.
CREATE FUNCTION flagship.customer_rate_limit(environment_id uuid, subject text, name text)
RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
#variable_conflict use_variable
DECLARE
    -- The customer's organization as a value (the session's, else the
    -- environment's): on Citus the read goes to its shards alone (#21).
    org uuid := flagship.current_organization_id();
    customer_row record;
BEGIN
    IF org IS NULL THEN
        SELECT e.organization_id INTO org FROM flagship.environments e WHERE e.id = environment_id;
    END IF;
    SELECT c.organization_id, c.project_id, c.id, p.rate_limits INTO customer_row
      FROM flagship.customers c
      LEFT JOIN flagship.subscriptions s ON s.organization_id = c.organization_id AND s.customer_id = c.id
      LEFT JOIN flagship.plans p ON p.organization_id = s.organization_id AND p.id = s.plan_id
     WHERE c.organization_id = org AND c.environment_id = environment_id AND c.external_key = subject;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'subject: no customer "%" in this environment', subject
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'a subject is a customer''s key (flagship.put_customer) or key:<api key id>';
    END IF;
    IF NOT coalesce(customer_row.rate_limits ? name, false)
       AND NOT EXISTS (SELECT 1 FROM flagship.plans p
                        WHERE p.organization_id = customer_row.organization_id
                          AND p.project_id = customer_row.project_id AND p.rate_limits ? name) THEN
        RAISE EXCEPTION 'name: no plan of this project declares a rate limit "%"', name
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = coalesce('plans declare: ' || (SELECT string_agg(DISTINCT n, ', ')
                                                          FROM flagship.plans p, jsonb_object_keys(p.rate_limits) n
                                                         WHERE p.organization_id = customer_row.organization_id
                                                           AND p.project_id = customer_row.project_id),
                                  'no plan of this project declares rate limits');
    END IF;
    -- Customers are counted by id: the same key in two environments is
    -- two customers.
    RETURN jsonb_build_object('organization_id', customer_row.organization_id,
                              'subject', 'customer:' || customer_row.id,
                              'limit', customer_row.rate_limits->name->'limit',
                              'window', customer_row.rate_limits->name->'window');
END
$fn$;

DROP FUNCTION flagship.issue_api_key(uuid, text, text[], text, timestamptz, bigint, text, text[]);
-- `customer` (an external key of the key's environment) makes the key the
-- customer's: verification names it, and usage calls in key mode act for
-- it. `allowed_ips` (CIDR, IPv4 or IPv6) limits where it may be used from.
CREATE FUNCTION flagship.issue_api_key(organization_id uuid, name text, scopes text[] DEFAULT '{}',
                                       environment text DEFAULT NULL,
                                       expires_at timestamptz DEFAULT NULL,
                                       usage_limit bigint DEFAULT NULL,
                                       customer text DEFAULT NULL,
                                       allowed_ips text[] DEFAULT NULL,
                                       rate_limits jsonb DEFAULT NULL)
RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    environment_row flagship.environments;
    secret text;
    plaintext text;
    bad_scope text;
    customer_id uuid;
    networks cidr[];
    checked_limits jsonb;
BEGIN
    PERFORM flagship.require_permission('api_keys:write', 'issue_api_key');
    IF organization_id IS NULL
       OR NOT EXISTS (SELECT 1 FROM flagship.organizations o WHERE o.id = issue_api_key.organization_id) THEN
        RAISE EXCEPTION 'organization_id: organization not found'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF name IS NULL OR btrim(name) = '' THEN
        RAISE EXCEPTION 'name: must not be empty' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- A scope is a permission, or every permission of one resource; a typo
    -- is refused now rather than failing at first use.
    SELECT s INTO bad_scope FROM unnest(coalesce(scopes, '{}')) s
     WHERE s IS NULL
        OR NOT EXISTS (SELECT 1 FROM flagship.permissions p
                        WHERE p.key = s OR split_part(p.key, ':', 1) || ':*' = s)
     LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'scopes: "%" is not a scope', coalesce(bad_scope, 'NULL')
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'valid scopes: ' || (SELECT string_agg(k, ', ' ORDER BY k) FROM (
                      SELECT p.key FROM flagship.permissions p
                      UNION SELECT split_part(p.key, ':', 1) || ':*' FROM flagship.permissions p) AS v (k));
    END IF;
    -- A key issues no key wider than itself (checked before anything of
    -- the request is resolved, so a wider request learns nothing more).
    IF NOT flagship.within_session_key(scopes,
               CASE WHEN environment IS NOT NULL THEN flagship.resolve_environment(environment) END,
               expires_at, usage_limit,
               CASE WHEN allowed_ips IS NOT NULL THEN flagship.parse_networks(allowed_ips, 'allowed_ips') END,
               CASE WHEN customer IS NOT NULL AND environment IS NOT NULL THEN
                   (SELECT c.id FROM flagship.customers c
                     WHERE c.environment_id = flagship.resolve_environment(environment)
                       AND c.external_key = customer) END) THEN
        RAISE EXCEPTION 'a key may not issue a key wider than itself'
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'stay within the scopes, environment, expiry, usage limit, addresses and customer of the key this transaction authenticated with';
    END IF;
    IF expires_at IS NOT NULL AND expires_at <= now() THEN
        RAISE EXCEPTION 'expires_at: must be in the future' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF usage_limit IS NOT NULL AND usage_limit <= 0 THEN
        RAISE EXCEPTION 'usage_limit: must be positive' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF environment IS NOT NULL THEN
        environment_row := flagship.environment_row(environment);
        -- A name or uuid of another organization's environment is refused
        -- exactly like one that does not exist.
        IF environment_row.organization_id IS DISTINCT FROM issue_api_key.organization_id THEN
            RAISE EXCEPTION 'environment "%" not found', environment
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
    END IF;

    IF customer IS NOT NULL THEN
        IF environment_row.id IS NULL THEN
            RAISE EXCEPTION 'customer: a customer''s key needs its environment (customers belong to one)'
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        SELECT c.id INTO customer_id FROM flagship.customers c
         WHERE c.organization_id = environment_row.organization_id
           AND c.environment_id = environment_row.id AND c.external_key = customer;
        IF customer_id IS NULL THEN
            RAISE EXCEPTION 'customer: no customer "%" in environment "%"', customer, environment
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
    END IF;
    IF customer IS NOT NULL AND cardinality(coalesce(scopes, '{}')) = 0 THEN
        -- A key without scopes is restricted only by its role: a customer's
        -- key says what it may do.
        RAISE EXCEPTION 'scopes: a customer''s key must list its scopes'
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'for example ARRAY[''usage:read'', ''usage:write'', ''features:read'']';
    END IF;
    networks := flagship.parse_networks(allowed_ips, 'allowed_ips');
    checked_limits := flagship.checked_rate_limits(rate_limits, 'rate_limits');
    -- A rate-limited key issues only keys limited at least as tightly.
    IF NOT flagship.within_session_rate_limits(checked_limits) THEN
        RAISE EXCEPTION 'a key may not issue a key wider than itself'
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'give the new key every rate limit of the key this transaction authenticated with, each with a limit no higher and a window no shorter';
    END IF;

    secret := replace(gen_random_uuid()::text, '-', '') || replace(gen_random_uuid()::text, '-', '');
    plaintext := CASE WHEN environment_row.key IS NULL OR environment_row.key = 'production'
                      THEN 'fs_live_' ELSE 'fs_test_' END || secret;
    INSERT INTO flagship.api_keys AS k
        (organization_id, name, display_prefix, key_hash, scopes, project_id, environment_id,
         expires_at, usage_limit, customer_id, allowed_ips, rate_limits)
    VALUES (issue_api_key.organization_id, btrim(name), left(plaintext, 16),
            sha256(convert_to(plaintext, 'UTF8')), coalesce(scopes, '{}'),
            environment_row.project_id, environment_row.id, expires_at, usage_limit,
            customer_id, networks, checked_limits);
    RETURN plaintext;
END
$fn$;

-- A new key with the same settings (name, scopes, environment, customer,
-- addresses, expiry, usage limit, and the same use sequence, so both keys
-- together stay within the limit); the old one keeps verifying for
-- `grace`, then answers EXPIRED. Returns the new key's plaintext, once.
CREATE OR REPLACE FUNCTION flagship.roll_api_key(key_id uuid, grace interval DEFAULT '0')
RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    org constant uuid := flagship.current_organization_id();
    old flagship.api_keys;
    plaintext text;
BEGIN
    PERFORM flagship.require_permission('api_keys:write', 'roll_api_key');
    IF grace IS NULL OR grace < interval '0' THEN
        RAISE EXCEPTION 'grace: must be a non-negative interval' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- Another organization's key looks absent, as row-level security
    -- would make it.
    SELECT k.organization_id, k.id, k.name, k.display_prefix, k.scopes, k.project_id, k.environment_id,
           k.expires_at, k.revoked_at, k.usage_limit, k.usage_count, k.customer_id, k.allowed_ips, k.uses_of,
           k.rate_limits
      INTO old.organization_id, old.id, old.name, old.display_prefix, old.scopes, old.project_id,
           old.environment_id, old.expires_at, old.revoked_at, old.usage_limit, old.usage_count,
           old.customer_id, old.allowed_ips, old.uses_of, old.rate_limits
      FROM flagship.api_keys k WHERE (org IS NULL OR k.organization_id = org) AND k.id = key_id;
    IF old.id IS NULL THEN
        RAISE EXCEPTION 'key_id: api key % not found', key_id USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF NOT flagship.within_session_key(old.scopes, old.environment_id, old.expires_at, old.usage_limit,
                                       old.allowed_ips, old.customer_id) THEN
        RAISE EXCEPTION 'a key may not roll a key wider than itself'
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'roll it in a session of a member with api_keys:write, or with a key at least as wide';
    END IF;
    -- The row lock makes two concurrent rolls of one key queue; the second
    -- then finds it expired (or still within its grace) as the first left it.
    SELECT k.expires_at, k.revoked_at, k.usage_count INTO old.expires_at, old.revoked_at, old.usage_count
      FROM flagship.api_keys k WHERE k.organization_id = old.organization_id AND k.id = old.id FOR UPDATE;
    IF old.revoked_at IS NOT NULL OR (old.expires_at IS NOT NULL AND old.expires_at <= now()) THEN
        RAISE EXCEPTION 'key_id: api key % is revoked or expired', key_id
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'issue a new key with flagship.issue_api_key';
    END IF;
    plaintext := (CASE WHEN old.display_prefix LIKE 'fs_test_%' THEN 'fs_test_' ELSE 'fs_live_' END)
                 || replace(gen_random_uuid()::text, '-', '') || replace(gen_random_uuid()::text, '-', '');
    INSERT INTO flagship.api_keys
        (organization_id, name, display_prefix, key_hash, scopes, project_id, environment_id,
         expires_at, usage_limit, usage_count, customer_id, allowed_ips, rolled_from, uses_of, rate_limits)
    VALUES (old.organization_id, old.name, left(plaintext, 16), sha256(convert_to(plaintext, 'UTF8')),
            old.scopes, old.project_id, old.environment_id, old.expires_at, old.usage_limit,
            old.usage_count,
            old.customer_id, old.allowed_ips, old.id, coalesce(old.uses_of, old.id), old.rate_limits);
    UPDATE flagship.api_keys k
       SET expires_at = least(coalesce(k.expires_at, 'infinity'), now() + grace)
     WHERE k.organization_id = old.organization_id AND k.id = old.id;
    RETURN plaintext;
END
$fn$;

-- Verification runs before the caller has any organization, so it is
-- SECURITY DEFINER: it finds the key by hash alone and reveals only what
-- the key itself grants.
CREATE OR REPLACE FUNCTION flagship.verify_api_key(key text, client_ip inet DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    key_row flagship.api_keys;
    organization_status text;
    code text;
    uses bigint;
    customer_key text;
    rate_limit record;
BEGIN
    IF key IS NOT NULL AND key ~ '^fs_(live|test)_[0-9a-f]{64}$' THEN
        SELECT * INTO key_row FROM flagship.api_keys k WHERE k.key_hash = sha256(convert_to(key, 'UTF8'));
    END IF;
    IF key_row.id IS NULL THEN
        code := 'NOT_FOUND';
    -- An allow-list admits only the addresses it lists, and tells callers
    -- elsewhere nothing more (not even that the key was revoked); a
    -- verification that does not say where the call comes from is refused.
    ELSIF key_row.allowed_ips IS NOT NULL
          AND (client_ip IS NULL
               OR NOT EXISTS (SELECT FROM unnest(key_row.allowed_ips) a WHERE client_ip <<= a)) THEN
        code := 'FORBIDDEN';
    ELSIF key_row.revoked_at IS NOT NULL THEN
        code := 'REVOKED';
    ELSIF key_row.expires_at IS NOT NULL AND key_row.expires_at <= now() THEN
        code := 'EXPIRED';
    ELSE
        SELECT o.status INTO organization_status FROM flagship.organizations o
         WHERE o.id = key_row.organization_id;
        IF organization_status IS DISTINCT FROM 'active' THEN
            code := 'FORBIDDEN';
        END IF;
        -- Rate limits before the usage limit: a refused attempt spends no
        -- use. Every limit counts the attempt (it happened either way).
        FOR rate_limit IN SELECT * FROM jsonb_each(key_row.rate_limits) WHERE code IS NULL LOOP
            IF NOT (flagship.rate_limit_hit(key_row.organization_id,
                                            'key:' || coalesce(key_row.uses_of, key_row.id), rate_limit.key,
                                            (rate_limit.value->>'limit')::bigint, rate_limit.value->>'window',
                                            1)->>'allowed')::boolean THEN
                code := 'RATE_LIMITED';
            END IF;
        END LOOP;
        IF code IS NOT NULL THEN
            NULL;
        ELSIF key_row.usage_limit IS NOT NULL THEN
            -- Counting uses is a write by nature; only limited keys pay it.
            uses := nextval(flagship.ensure_key_use_sequence(coalesce(key_row.uses_of, key_row.id),
                                                              key_row.usage_count));
            IF uses <= key_row.usage_limit THEN
                code := 'VALID';
                UPDATE flagship.api_keys k SET usage_count = greatest(k.usage_count, uses), last_used_at = now()
                 WHERE k.organization_id = key_row.organization_id AND k.id = key_row.id;
            ELSE
                code := 'USAGE_EXCEEDED';
            END IF;
        ELSE
            code := 'VALID';
            -- At most one write a minute per key, so busy keys do not turn
            -- every verification into a hot-row update.
            UPDATE flagship.api_keys k SET last_used_at = now()
             WHERE k.organization_id = key_row.organization_id AND k.id = key_row.id
               AND (k.last_used_at IS NULL OR k.last_used_at < now() - interval '1 minute');
        END IF;
    END IF;
    IF code <> 'VALID' THEN
        RETURN jsonb_build_object('valid', false, 'code', code, 'key_id', NULL,
                                  'organization_id', NULL, 'environment_id', NULL, 'scopes', NULL,
                                  'customer', NULL);
    END IF;
    IF key_row.customer_id IS NOT NULL THEN
        SELECT c.external_key INTO customer_key FROM flagship.customers c
         WHERE c.organization_id = key_row.organization_id AND c.id = key_row.customer_id;
    END IF;
    RETURN jsonb_build_object('valid', true, 'code', code, 'key_id', key_row.id,
                              'organization_id', key_row.organization_id,
                              'environment_id', key_row.environment_id, 'scopes', to_jsonb(key_row.scopes),
                              'customer', customer_key);
END
$fn$;

-- Only verification counts a key's attempts by itself: any other caller
-- could spend another organization's windows.
REVOKE ALL ON FUNCTION flagship.rate_limit_hit(uuid, text, text, bigint, text, integer) FROM PUBLIC;

-- A rate-limited key inserts only keys limited at least as tightly (the
-- column cannot be updated).
CREATE POLICY api_keys_insert_within_rate_limits ON flagship.api_keys AS RESTRICTIVE FOR INSERT
    WITH CHECK (flagship.within_session_rate_limits(rate_limits));


-- Reservations (#18) --------------------------------------------------------
-- Usage reservations (0.3): reserve_usage holds an amount before the work
-- (an LLM call, say), finalize_usage consumes what the work really cost and
-- releases the rest, release_usage gives it all back.
--
-- A reservation *is* a consumption, made by record_usage under the ledger
-- key `reservation:<id>`: it counts against the limit, or draws from the
-- credit grants, at once and exactly as any consumption (the counter's or
-- the grants' row locks), so reservations racing with record_usage never
-- overshoot. Settling refunds the unused part: to the counter of the
-- period it was reserved in, or back into the grants it drew from (the
-- last-drawn first), with a ledger row of kind `release` and a negative
-- amount, so the ledger sums to what was consumed.
--
-- Expiry needs no job runner: a held reservation past `expires_at` is
-- released by the first call that would be refused without it
-- (record_usage, reserve_usage), and check_usage_limit counts it as
-- released already.

CREATE TABLE flagship.usage_reservations (
    organization_id uuid        NOT NULL,
    id              uuid        NOT NULL DEFAULT gen_random_uuid(),
    customer_id     uuid        NOT NULL,
    metric_id       uuid        NOT NULL,
    amount          bigint      NOT NULL,
    -- The counter period the amount was counted in (NULL: none, or credits).
    period_start    timestamptz,
    -- Credits metrics: the grants that paid, [{"grant": id, "amount": n}].
    paid_by         jsonb,
    expires_at      timestamptz NOT NULL,
    idempotency_key text,
    state           text        NOT NULL DEFAULT 'held',
    consumed        bigint,
    created_at      timestamptz NOT NULL DEFAULT now(),
    settled_at      timestamptz,
    PRIMARY KEY (organization_id, id),
    CONSTRAINT usage_reservations_state_valid CHECK (state IN ('held', 'finalized', 'released', 'expired')),
    CONSTRAINT usage_reservations_amount_valid CHECK (amount > 0),
    CONSTRAINT usage_reservations_consumed_valid
        CHECK ((state = 'held') = (consumed IS NULL) AND consumed BETWEEN 0 AND amount),
    FOREIGN KEY (organization_id, customer_id)
        REFERENCES flagship.customers (organization_id, id) ON DELETE CASCADE,
    FOREIGN KEY (organization_id, metric_id)
        REFERENCES flagship.metrics (organization_id, id) ON DELETE CASCADE
);
CREATE UNIQUE INDEX usage_reservations_idempotency
    ON flagship.usage_reservations (organization_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
-- What lazy expiry and checks look for: a customer's held reservations.
CREATE INDEX usage_reservations_held
    ON flagship.usage_reservations (organization_id, customer_id, metric_id, expires_at)
    WHERE state = 'held';

SELECT pg_catalog.pg_extension_config_dump('flagship.usage_reservations', '');
SELECT flagship.isolate_tenant_table('usage_reservations');
-- Only FlagShip's usage functions write reservations (as for counters).
CREATE POLICY usage_reservations_insert_by_functions ON flagship.usage_reservations AS RESTRICTIVE
    FOR INSERT WITH CHECK ((SELECT flagship.usage_writes_open()));
CREATE POLICY usage_reservations_update_by_functions ON flagship.usage_reservations AS RESTRICTIVE
    FOR UPDATE USING ((SELECT flagship.usage_writes_open()));
CREATE POLICY usage_reservations_delete_by_functions ON flagship.usage_reservations AS RESTRICTIVE
    FOR DELETE USING ((SELECT flagship.usage_writes_open()));
GRANT SELECT ON flagship.usage_reservations TO flagship_admin, flagship_app, flagship_auditor;
GRANT INSERT, UPDATE ON flagship.usage_reservations TO flagship_app, flagship_admin;

-- Records the reservation whose consumption record_usage just made under
-- the ledger key `reservation:<id>`; answers its expiry. Called by
-- reserve_usage with usage writes open.
CREATE FUNCTION flagship.hold_reservation(reservation_id uuid, ttl interval, idempotency_key text)
RETURNS timestamptz
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    held flagship.usage_reservations;
BEGIN
    INSERT INTO flagship.usage_reservations AS r
        (organization_id, id, customer_id, metric_id, amount, period_start, paid_by, expires_at,
         idempotency_key)
    SELECT l.organization_id, reservation_id, l.customer_id, l.metric_id, l.amount, l.period_start,
           l.paid_by, now() + ttl, hold_reservation.idempotency_key
      FROM flagship.usage_ledger l
     WHERE l.organization_id = flagship.current_organization_id()
       AND l.idempotency_key = 'reservation:' || reservation_id
    RETURNING r.* INTO held;
    RETURN held.expires_at;
END
$fn$;

-- Gives `refund` of a reservation back: to its period's counter, or into
-- the grants it drew from (last drawn first; a grant that expired since
-- keeps what it gets back, unusable). Appends the `release` ledger row.
CREATE FUNCTION flagship.refund_reservation(reservation flagship.usage_reservations, refund bigint)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    drawn record;
    take bigint;
    left_over bigint := refund;
    refunded jsonb := '[]';
    after bigint;
    terms flagship.usage_ledger;
BEGIN
    IF refund = 0 THEN
        RETURN;
    END IF;
    SELECT * INTO terms FROM flagship.usage_ledger l
     WHERE l.organization_id = reservation.organization_id
       AND l.idempotency_key = 'reservation:' || reservation.id;
    IF reservation.paid_by IS NULL THEN
        -- Never below zero, whatever happened to the counter meanwhile.
        UPDATE flagship.usage_counters c SET used = greatest(c.used - refund, 0), updated_at = now()
         WHERE c.organization_id = reservation.organization_id AND c.customer_id = reservation.customer_id
           AND c.metric_id = reservation.metric_id
           AND c.period_start IS NOT DISTINCT FROM reservation.period_start
        RETURNING c.used INTO after;
    ELSE
        FOR drawn IN SELECT p.value FROM jsonb_array_elements(reservation.paid_by) WITH ORDINALITY p
                      ORDER BY p.ordinality DESC LOOP
            EXIT WHEN left_over = 0;
            take := least(left_over, (drawn.value->>'amount')::bigint);
            UPDATE flagship.credit_grants g SET remaining = g.remaining + take
             WHERE g.organization_id = reservation.organization_id AND g.id = (drawn.value->>'grant')::uuid;
            refunded := refunded || jsonb_build_array(jsonb_build_object('grant', drawn.value->'grant', 'amount', take));
            left_over := left_over - take;
        END LOOP;
        SELECT coalesce(sum(g.remaining), 0) INTO after FROM flagship.credit_grants g
         WHERE g.organization_id = reservation.organization_id AND g.customer_id = reservation.customer_id
           AND g.metric_id = reservation.metric_id AND g.remaining > 0
           AND (g.expires_at IS NULL OR g.expires_at > now());
    END IF;
    INSERT INTO flagship.usage_ledger
        (organization_id, customer_id, metric_id, period_start, kind, amount, used_after,
         idempotency_key, usage_limit, enforcement, resets_at, paid_by)
    VALUES (reservation.organization_id, reservation.customer_id, reservation.metric_id,
            reservation.period_start, 'release', -refund, coalesce(after, 0), NULL,
            terms.usage_limit, coalesce(terms.enforcement, 'hard'), terms.resets_at,
            CASE WHEN reservation.paid_by IS NOT NULL THEN refunded END);
END
$fn$;

CREATE FUNCTION flagship.reservation_document(reservation flagship.usage_reservations) RETURNS jsonb
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT jsonb_build_object('reservation_id', reservation.id, 'state', reservation.state,
                              'reserved', reservation.amount, 'consumed', reservation.consumed,
                              'released', reservation.amount - reservation.consumed,
                              'expires_at', reservation.expires_at)
$fn$;

-- Finalizes (consume = what the work cost) or releases (consume = 0) a
-- held reservation; one past its expiry is expired instead. A settled
-- reservation answers how it was settled ("replayed": true); finalizing
-- it again with another amount is 22023. A key bound to an environment
-- (`key_environment`) settles only reservations of its customers, and a
-- customer's key (`acting_customer`) only its own. Called with usage
-- writes open.
CREATE FUNCTION flagship.settle_reservation(reservation_id uuid, consume bigint, settle_as text,
                                            acting_customer text, key_environment uuid)
RETURNS jsonb
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    org constant uuid := flagship.current_organization_id();
    held flagship.usage_reservations;
BEGIN
    -- Another organization's reservation is absent (row-level security
    -- would hide it too; named as a value, Citus locks it in the
    -- organization's shard, #21). A superuser without an organization
    -- finds any.
    IF org IS NULL THEN
        SELECT * INTO held FROM flagship.usage_reservations r WHERE r.id = reservation_id FOR UPDATE;
    ELSE
        SELECT * INTO held FROM flagship.usage_reservations r
         WHERE r.organization_id = org AND r.id = reservation_id FOR UPDATE;
    END IF;
    IF NOT FOUND OR ((acting_customer IS NOT NULL OR key_environment IS NOT NULL) AND NOT EXISTS (
            SELECT 1 FROM flagship.customers c
             WHERE c.organization_id = held.organization_id AND c.id = held.customer_id
               AND (acting_customer IS NULL OR c.external_key = acting_customer)
               AND (key_environment IS NULL OR c.environment_id = key_environment))) THEN
        RAISE EXCEPTION 'reservation_id: reservation % not found', reservation_id
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF consume IS NULL OR consume < 0 OR consume > held.amount THEN
        RAISE EXCEPTION 'amount: must be from 0 to the % reserved, got %', held.amount, coalesce(consume::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF held.state <> 'held' THEN
        IF settle_as = 'finalized' AND held.state = 'finalized' AND held.consumed <> consume THEN
            RAISE EXCEPTION 'reservation %: finalized already, with %', reservation_id, held.consumed
                USING ERRCODE = 'invalid_parameter_value',
                      HINT = 'a retry must repeat the first call exactly';
        END IF;
        RETURN flagship.reservation_document(held) || '{"replayed": true}';
    END IF;
    IF held.expires_at <= now() THEN
        settle_as := 'expired';
        consume := 0;
    END IF;
    PERFORM flagship.refund_reservation(held, held.amount - consume);
    UPDATE flagship.usage_reservations r SET state = settle_as, consumed = consume, settled_at = now()
     WHERE r.organization_id = held.organization_id AND r.id = held.id
    RETURNING r.* INTO held;
    RETURN flagship.reservation_document(held);
END
$fn$;

-- Releases a customer's held reservations of a metric that are past their
-- expiry (skipping any another session is settling); answers how many.
-- Called with usage writes open, by a call that would be refused otherwise.
CREATE FUNCTION flagship.expire_reservations(customer_id uuid, metric_id uuid) RETURNS integer
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    org constant uuid := flagship.current_organization_id();
    held flagship.usage_reservations;
    released integer := 0;
BEGIN
    FOR held IN SELECT * FROM flagship.usage_reservations r
                 WHERE r.organization_id = org
                   AND r.customer_id = expire_reservations.customer_id
                   AND r.metric_id = expire_reservations.metric_id
                   AND r.state = 'held' AND r.expires_at <= now()
                 ORDER BY r.id
                   FOR UPDATE SKIP LOCKED LOOP
        PERFORM flagship.refund_reservation(held, held.amount);
        UPDATE flagship.usage_reservations r SET state = 'expired', consumed = 0, settled_at = now()
         WHERE r.organization_id = held.organization_id AND r.id = held.id;
        released := released + 1;
    END LOOP;
    RETURN released;
END
$fn$;

-- A reservation's unused part comes back as a ledger row of kind release.
DROP POLICY usage_ledger_kind_valid ON flagship.usage_ledger;
CREATE POLICY usage_ledger_kind_valid ON flagship.usage_ledger AS RESTRICTIVE
    FOR INSERT WITH CHECK (kind IN ('record', 'set', 'credits', 'release'));

CREATE  FUNCTION "reserve_usage"(
	"customer" TEXT, /* Option < & str > */
	"metric" TEXT, /* & str */
	"amount" bigint, /* Option < i64 > */
	"ttl" interval DEFAULT '5 minutes', /* Option < Interval > */
	"idempotency_key" TEXT DEFAULT NULL, /* Option < & str > */
	"environment" TEXT DEFAULT NULL /* Option < & str > */
) RETURNS jsonb /* JsonB */
VOLATILE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'reserve_usage_wrapper';

CREATE  FUNCTION "finalize_usage"(
	"reservation_id" uuid, /* pgrx :: Uuid */
	"amount" bigint /* Option < i64 > */
) RETURNS jsonb /* JsonB */
VOLATILE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'finalize_usage_wrapper';

CREATE  FUNCTION "release_usage"(
	"reservation_id" uuid /* pgrx :: Uuid */
) RETURNS jsonb /* JsonB */
STRICT VOLATILE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'release_usage_wrapper';



-- Erasure (#19) -------------------------------------------------------------
--
-- The chain now hashes a digest of each event's content (actor and diff)
-- instead of the content, so erase_subject can replace personal values.
-- Existing chains are re-hashed link by link in the new form, as far as
-- they verify in the old one (from a broken link on, events keep their old
-- hash, so verification still reports the break where it was); each
-- event keeps its old hash in legacy_hash, which anchors taken before this
-- upgrade still match.
ALTER TABLE flagship.audit_events
    ADD COLUMN content_digest bytea,
    ADD COLUMN legacy_hash bytea,
    ADD COLUMN erased_by bigint;
ALTER TABLE flagship.audit_events DROP CONSTRAINT audit_events_action_valid;
ALTER TABLE flagship.audit_events ADD CONSTRAINT audit_events_action_valid
    CHECK (action IN ('insert', 'update', 'delete', 'erase'));

-- The digest of an event's erasable content: who (actor) and what (diff),
-- serialised as a jsonb array (canonical text).
CREATE FUNCTION flagship.audit_content_digest(actor text, diff jsonb)
RETURNS bytea
LANGUAGE sql
IMMUTABLE PARALLEL SAFE
-- No SET clause, so that it inlines (see audit_link_digest).
AS $fn$
    SELECT sha256(convert_to(jsonb_build_array(actor, diff)::text, 'UTF8'))
$fn$;

-- The hash of one event: the previous hash, its position, time, action,
-- resource, transaction and roles, and its content digest, serialised as a
-- jsonb array (canonical text, unambiguous separators), times as epoch
-- seconds so that neither DateStyle nor TimeZone changes it.
CREATE FUNCTION flagship.audit_link_digest(
    previous_hash bytea, chain_seq bigint, id bigint, organization_id uuid,
    occurred_at timestamptz, action text, resource_type text, resource_id text,
    content_digest bytea, transaction_id bigint,
    session_role text, acting_role text, key_id uuid)
RETURNS bytea
LANGUAGE sql
STABLE PARALLEL SAFE
-- No SET clause, so the planner inlines it into the trigger's cached plan
-- (a SET would make every transaction plan it again); it calls only
-- pg_catalog functions, which no search_path can shadow.
AS $fn$
    SELECT sha256(convert_to(jsonb_build_array(
        encode(previous_hash, 'hex'), chain_seq, id, organization_id,
        extract(epoch FROM occurred_at), action, resource_type, resource_id,
        encode(content_digest, 'hex'), transaction_id,
        session_role, acting_role, key_id)::text, 'UTF8'))
$fn$;

SELECT set_config('flagship.audit_maintenance', 'on', true);
DO $migrate$
DECLARE
    org uuid;
    e flagship.audit_events;
    expected bigint;
    intact boolean;
    previous_old bytea;
    previous_new bytea;
    rehashed bytea;
    content bytea;
BEGIN
    FOR org IN SELECT DISTINCT a.organization_id FROM flagship.audit_events a LOOP
        expected := 0;
        intact := true;
        previous_old := '\x';
        previous_new := '\x';
        FOR e IN SELECT * FROM flagship.audit_events a WHERE a.organization_id = org ORDER BY a.chain_seq LOOP
            expected := expected + 1;
            content := flagship.audit_content_digest(e.actor, e.diff);
            intact := intact AND e.chain_seq = expected
                      AND e.hash = flagship.audit_digest(
                              previous_old, e.chain_seq, e.id, e.organization_id, e.occurred_at, e.actor,
                              e.action, e.resource_type, e.resource_id, e.diff, e.transaction_id,
                              e.session_role, e.acting_role, e.key_id);
            rehashed := CASE WHEN intact THEN flagship.audit_link_digest(
                                 previous_new, e.chain_seq, e.id, e.organization_id, e.occurred_at, e.action,
                                 e.resource_type, e.resource_id, content, e.transaction_id,
                                 e.session_role, e.acting_role, e.key_id)
                             ELSE e.hash END;
            UPDATE flagship.audit_events a
               SET content_digest = content, legacy_hash = e.hash, hash = rehashed
             WHERE a.organization_id = org AND a.chain_seq = e.chain_seq;
            previous_old := e.hash;
            previous_new := rehashed;
        END LOOP;
        -- A head that agreed with its chain agrees with the re-hashed one.
        UPDATE flagship.audit_chain_heads h SET last_hash = previous_new
         WHERE h.organization_id = org AND h.last_seq = expected AND h.last_hash = previous_old;
    END LOOP;
END
$migrate$;
SELECT set_config('flagship.audit_maintenance', 'off', true);
ALTER TABLE flagship.audit_events ALTER COLUMN content_digest SET NOT NULL;
DROP FUNCTION flagship.audit_digest(bytea, bigint, bigint, uuid, timestamptz, text, text, text,
                                    text, jsonb, bigint, text, text, uuid);

CREATE OR REPLACE FUNCTION flagship.audit_events_append_only() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    -- On Citus the trigger fires on a shard, named <table>_<shard id>
    -- (#21); no table of FlagShip's ends in digits.
    table_name constant text := regexp_replace(TG_TABLE_NAME, '_[0-9]+$', '');
BEGIN
    IF flagship.audit_maintenance_declared() THEN
        RETURN CASE TG_OP WHEN 'DELETE' THEN OLD ELSE NEW END;
    END IF;
    -- erase_subject (running as the extension's owner, with the erasure's
    -- chain position set for its transaction) may replace an event's
    -- content and mark it erased by that erasure; nothing the chain
    -- hashes changes.
    -- (Nested: NEW has those columns only on audit_events.)
    IF table_name = 'audit_events' AND TG_OP = 'UPDATE' THEN
        IF current_setting('flagship.erasing', true) = NEW.erased_by::text
           AND current_user::text::regrole = (SELECT x.extowner FROM pg_extension x WHERE x.extname = 'flagship')
           AND (NEW.organization_id, NEW.chain_seq, NEW.id, NEW.occurred_at, NEW.action, NEW.resource_type,
                NEW.resource_id, NEW.transaction_id, NEW.hash, NEW.session_role, NEW.acting_role, NEW.key_id,
                NEW.content_digest, NEW.legacy_hash, NEW.change_kind, NEW.environment_id)
               IS NOT DISTINCT FROM
               (OLD.organization_id, OLD.chain_seq, OLD.id, OLD.occurred_at, OLD.action, OLD.resource_type,
                OLD.resource_id, OLD.transaction_id, OLD.hash, OLD.session_role, OLD.acting_role, OLD.key_id,
                OLD.content_digest, OLD.legacy_hash, OLD.change_kind, OLD.environment_id) THEN
            RETURN NEW;
        END IF;
    END IF;
    RAISE EXCEPTION '% is append-only: % refused', table_name, TG_OP
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'a superuser may SET flagship.audit_maintenance = on first; verify_audit_chain will show the edit';
END
$fn$;

-- A head moves only forward, one event at a time, and only from inside the
-- audit trigger (trigger depth 2: the trigger of a configuration change
-- updating the head) or erase_subject (running as the extension's owner). Moving it back or aside needs audit_maintenance too.
CREATE OR REPLACE FUNCTION flagship.audit_chain_heads_forward_only() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    IF ((pg_trigger_depth() > 1
         OR current_user::text::regrole = (SELECT x.extowner FROM pg_extension x WHERE x.extname = 'flagship'))
        AND NEW.organization_id = OLD.organization_id AND NEW.last_seq = OLD.last_seq + 1)
       OR flagship.audit_maintenance_declared() THEN
        RETURN NEW;
    END IF;
    RAISE EXCEPTION 'audit_chain_heads moves only with the trail: UPDATE refused'
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'a superuser may SET flagship.audit_maintenance = on first; verify_audit_chain with an anchor will show the edit';
END
$fn$;

-- Appends one event to the organization's chain and announces it; answers
-- its chain position. Runs as the extension's owner (from audit_change or
-- erase_subject, both SECURITY DEFINER): no role may call it.
CREATE FUNCTION flagship.audit_append(org uuid, action text, resource_type text, resource text,
                                      changes jsonb, change_kind text, change_key text,
                                      environment uuid)
RETURNS bigint
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    event_id bigint := nextval('flagship.audit_events_id_seq');
    acting text := flagship.current_actor();
    acting_role text := flagship.acting_role();
    key uuid := flagship.current_key_id();
    xact bigint := pg_current_xact_id()::text::bigint;
    content bytea := flagship.audit_content_digest(acting, changes);
    previous_hash bytea;
    link_hash bytea;
    position bigint;
BEGIN
    -- The head is locked and read, then moved, in two statements: Citus
    -- cannot send an UPDATE whose SET calls a STABLE function with the
    -- row's columns (#21), and the lock orders appends as the UPDATE did.
    FOR attempt IN 1..2 LOOP
        SELECT h.last_seq + 1, h.last_hash INTO position, previous_hash
          FROM flagship.audit_chain_heads h
         WHERE h.organization_id = org
           FOR UPDATE;
        EXIT WHEN position IS NOT NULL;
        -- The organization's first event starts its chain.
        INSERT INTO flagship.audit_chain_heads (organization_id) VALUES (org)
        ON CONFLICT DO NOTHING;
    END LOOP;
    link_hash := flagship.audit_link_digest(
        previous_hash, position, event_id, org, now(), action,
        resource_type, resource, content, xact,
        session_user, acting_role, key);
    UPDATE flagship.audit_chain_heads h
       SET last_seq = position, last_hash = link_hash
     WHERE h.organization_id = org;
    INSERT INTO flagship.audit_events (organization_id, id, chain_seq, occurred_at, actor, action,
                                       resource_type, resource_id, diff, transaction_id, hash,
                                       session_role, acting_role, key_id,
                                       change_kind, change_key, environment_id, content_digest)
    VALUES (org, event_id, position, now(), acting, action,
            resource_type, resource, changes, xact, link_hash,
            session_user, acting_role, key,
            change_kind, change_key, environment, content);

    -- Any role may LISTEN to any channel, so the payload carries nothing
    -- row-level security would hide: only the event's database-wide id.
    -- A listener asks flagship.changes_since what changed in its own
    -- organization. On Citus, a change sent from another node runs in a
    -- connection of Citus's own, whose transaction may be prepared for a
    -- two-phase commit, which a NOTIFY makes fail: there the change is
    -- left unannounced, in changes_since for the next poll (#21).
    IF current_setting('citus.version', true) IS NULL
       OR current_setting('application_name') NOT LIKE 'citus\_internal gpid=%' THEN
        PERFORM pg_notify('flagship_changes', jsonb_build_object('id', event_id)::text);
    END IF;
    RETURN position;
END
$fn$;
REVOKE ALL ON FUNCTION flagship.audit_append(uuid, text, text, text, jsonb, text, text, uuid) FROM PUBLIC;

-- The audit and change-feed trigger. Arguments: the change-feed kind, the
-- primary-key columns naming a row (besides organization_id), then the
-- columns left out of the trail: secrets (key hashes) and bookkeeping
-- (updated_at, usage counts). An UPDATE that changes only those is no
-- configuration change and records nothing.
--
-- SECURITY DEFINER so that it can append to tables no role may write;
-- current_actor() names the session's user, not the definer.
CREATE OR REPLACE FUNCTION flagship.audit_change() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    -- On Citus the trigger fires on a shard, named <table>_<shard id>
    -- (#21); no table of FlagShip's ends in digits.
    table_name constant text := regexp_replace(TG_TABLE_NAME, '_[0-9]+$', '');
    left_out text[] := TG_ARGV[2:];
    before jsonb;
    after jsonb;
    subject jsonb;
    changes jsonb;
    org uuid;
    resource text;
    subject_key text;
    environment uuid;
BEGIN
    IF TG_OP <> 'INSERT' THEN
        before := to_jsonb(OLD);
    END IF;
    IF TG_OP <> 'DELETE' THEN
        after := to_jsonb(NEW);
    END IF;
    subject := coalesce(after, before);

    IF TG_OP = 'UPDATE' THEN
        SELECT jsonb_object_agg(n.field, jsonb_build_object('old', before->n.field, 'new', n.value))
          INTO changes
          FROM jsonb_each(after - left_out) AS n (field, value)
         WHERE n.value IS DISTINCT FROM before->n.field;
    ELSE
        -- A new row's fields, or a deleted row's, leaving out the empty ones.
        SELECT jsonb_object_agg(r.field, jsonb_build_object(CASE TG_OP WHEN 'INSERT' THEN 'new' ELSE 'old' END, r.value))
          INTO changes
          FROM jsonb_each(subject - left_out) AS r (field, value)
         WHERE r.value <> 'null';
    END IF;
    IF changes IS NULL THEN
        RETURN NULL;
    END IF;

    org := CASE table_name WHEN 'organizations' THEN subject->>'id'
                              ELSE subject->>'organization_id' END;
    resource := subject->>'id';
    IF resource IS NULL THEN
        SELECT string_agg(subject->>column_name, '/' ORDER BY position) INTO resource
          FROM unnest(string_to_array(TG_ARGV[1], ',')) WITH ORDINALITY AS k (column_name, position);
    END IF;

    -- The change feed names what an application caches: a flag, a plan,
    -- a customer, even when the row changed is one of their parts.
    CASE table_name
    WHEN 'feature_rules' THEN
        SELECT f.key INTO subject_key FROM flagship.features f
         WHERE f.organization_id = org AND f.id = (subject->>'feature_id')::uuid;
    WHEN 'plan_features', 'usage_limits', 'plan_credits' THEN
        SELECT p.key INTO subject_key FROM flagship.plans p
         WHERE p.organization_id = org AND p.id = (subject->>'plan_id')::uuid;
    WHEN 'subscriptions', 'customer_feature_overrides', 'customer_limit_overrides' THEN
        SELECT c.external_key, c.environment_id INTO subject_key, environment FROM flagship.customers c
         WHERE c.organization_id = org AND c.id = (subject->>'customer_id')::uuid;
    WHEN 'role_permissions' THEN
        SELECT r.key INTO subject_key FROM flagship.roles r
         WHERE r.organization_id = org AND r.id = (subject->>'role_id')::uuid;
    WHEN 'member_roles' THEN
        SELECT m.user_key INTO subject_key FROM flagship.members m
         WHERE m.organization_id = org AND m.id = (subject->>'member_id')::uuid;
    ELSE
        NULL;
    END CASE;
    subject_key := coalesce(subject_key, subject->>'key', subject->>'external_key',
                            subject->>'user_key', subject->>'slug', resource);
    environment := coalesce(environment, (subject->>'environment_id')::uuid,
                            CASE table_name WHEN 'environments' THEN (subject->>'id')::uuid END);

    PERFORM flagship.audit_append(org, lower(TG_OP), table_name, resource, changes,
                                  TG_ARGV[0], subject_key, environment);
    RETURN NULL;
END
$fn$;

-- Recomputes an organization's chain. `first_broken_id` is the first event
-- whose hash does not follow from its predecessor (edited content, an
-- edited hash, or a missing predecessor); events deleted from the end show
-- as a head that no event reaches (`reason`: "truncated", first_broken_id
-- NULL). Invoker's rights: a session that may not read the trail is told
-- so rather than shown an empty, valid chain.
--
-- Without an anchor the chain proves only that it is consistent: whoever
-- may bypass the guards (a superuser) can rewrite it and re-hash it, or
-- cut it short and move the head back. `anchor` is an earlier answer of
-- audit_head, kept outside the database; the chain must still hold that
-- hash at that position, so a rewrite, a deletion or a wipe of anything up
-- to the anchor is detected (`reason`: "anchor not found").
CREATE OR REPLACE FUNCTION flagship.verify_audit_chain(organization_id uuid, anchor jsonb DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql
STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    head flagship.audit_chain_heads;
    checked bigint;
    last_seq bigint;
    last_hash bytea;
    broken record;
    anchor_seq bigint;
    anchor_hash bytea;
BEGIN
    IF anchor IS NOT NULL THEN
        IF jsonb_typeof(anchor) IS DISTINCT FROM 'object'
           OR jsonb_typeof(anchor->'seq') IS DISTINCT FROM 'number'
           OR (anchor->>'hash') !~ '^[0-9a-f]{64}$' THEN
            RAISE EXCEPTION 'anchor: expected {"seq": <number>, "hash": "<64 hex digits>"} from flagship.audit_head, got %', anchor
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        anchor_seq := (anchor->>'seq')::bigint;
        anchor_hash := decode(anchor->>'hash', 'hex');
    END IF;

    SELECT * INTO head FROM flagship.audit_chain_heads h
     WHERE h.organization_id = verify_audit_chain.organization_id;
    IF head IS NULL THEN
        -- No head visible: either the trail is not the session's to read,
        -- or the organization has had no change since the audit began.
        IF NOT ((SELECT r.rolsuper FROM pg_roles r WHERE r.rolname = current_user)
                OR (verify_audit_chain.organization_id = flagship.current_organization_id()
                    AND flagship.actor_may('audit:read'))) THEN
            RAISE EXCEPTION 'the audit trail of organization "%" is not readable here', verify_audit_chain.organization_id
                USING ERRCODE = 'insufficient_privilege',
                      HINT = 'set flagship.organization_id to it and act as a member holding audit:read';
        END IF;
        IF anchor_seq > 0 THEN
            -- The anchor saw events that are gone with their head: a wipe.
            RETURN jsonb_build_object('valid', false, 'checked', 0, 'first_broken_id', NULL,
                                      'reason', 'anchor not found');
        END IF;
        IF NOT EXISTS (SELECT 1 FROM flagship.organizations o WHERE o.id = verify_audit_chain.organization_id) THEN
            RAISE EXCEPTION 'organization "%" not found', verify_audit_chain.organization_id
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        RETURN jsonb_build_object('valid', true, 'checked', 0, 'first_broken_id', NULL);
    END IF;

    -- Each link, and each content against its digest, or for an erased
    -- event against the digest its erasure event (itself in the chain)
    -- recorded for the erased content.
    SELECT e.id, e.chain_seq,
           CASE WHEN e.chain_seq <> e.expected_seq THEN 'missing events before this one'
                WHEN e.hash IS DISTINCT FROM e.expected_hash THEN 'hash mismatch'
                WHEN e.erased_by IS NULL THEN 'content does not match its digest'
                ELSE 'erased content does not match its erasure event' END AS reason
      INTO broken
      FROM (SELECT a.*,
                   row_number() OVER (ORDER BY a.chain_seq) AS expected_seq,
                   flagship.audit_link_digest(
                       coalesce(lag(a.hash) OVER (ORDER BY a.chain_seq), '\x'::bytea), a.chain_seq, a.id,
                       a.organization_id, a.occurred_at, a.action, a.resource_type, a.resource_id,
                       a.content_digest, a.transaction_id, a.session_role, a.acting_role, a.key_id)
                       AS expected_hash
              FROM flagship.audit_events a
             WHERE a.organization_id = verify_audit_chain.organization_id) e
      -- The erasure event of an erased one (a join, not a correlated
      -- subquery, which Citus does not plan over a subquery: #21).
      LEFT JOIN flagship.audit_events x
        ON x.organization_id = verify_audit_chain.organization_id AND x.chain_seq = e.erased_by
       AND x.action = 'erase'
     WHERE e.chain_seq <> e.expected_seq
        OR e.hash IS DISTINCT FROM e.expected_hash
        OR (e.erased_by IS NULL
            AND e.content_digest IS DISTINCT FROM flagship.audit_content_digest(e.actor, e.diff))
        OR (e.erased_by IS NOT NULL
            AND (x.diff->'audit_events'->>e.chain_seq::text)
                IS DISTINCT FROM encode(flagship.audit_content_digest(e.actor, e.diff), 'hex'))
     ORDER BY e.chain_seq
     LIMIT 1;

    SELECT count(*), max(a.chain_seq) INTO checked, last_seq
      FROM flagship.audit_events a WHERE a.organization_id = verify_audit_chain.organization_id;
    IF broken.id IS NOT NULL THEN
        RETURN jsonb_build_object('valid', false, 'checked', checked, 'first_broken_id', broken.id,
                                  'reason', broken.reason);
    END IF;
    SELECT a.hash INTO last_hash FROM flagship.audit_events a
     WHERE a.organization_id = verify_audit_chain.organization_id AND a.chain_seq = last_seq;
    IF coalesce(last_seq, 0) <> head.last_seq OR coalesce(last_hash, '\x') <> head.last_hash THEN
        RETURN jsonb_build_object('valid', false, 'checked', checked, 'first_broken_id', NULL,
                                  'reason', 'truncated');
    END IF;
    -- An anchor taken before the 0.3.0 upgrade holds the event's 0.2.0 hash.
    IF anchor_seq > 0 AND NOT EXISTS (
           SELECT 1 FROM flagship.audit_events a
            WHERE a.organization_id = verify_audit_chain.organization_id
              AND a.chain_seq = anchor_seq AND anchor_hash IN (a.hash, a.legacy_hash)) THEN
        RETURN jsonb_build_object('valid', false, 'checked', checked, 'first_broken_id', NULL,
                                  'reason', 'anchor not found');
    END IF;
    RETURN jsonb_build_object('valid', true, 'checked', checked, 'first_broken_id', NULL);
END
$fn$;

-- Erasing a person (0.3): flagship.erase_subject replaces one person's
-- personal data in the session's organization with a pseudonym, and
-- records the erasure in the audit chain.
--
-- The chain hashes each event's content digest, not the content (see
-- audit.sql), so content can be replaced while the chain still proves
-- order and completeness; the erasure event lists the events it erased,
-- with the digest of each one's new content, which is what verify_audit_chain
-- checks their content against.

-- `value` with every string value equal to `subject` (never an object's
-- key) replaced by `pseudonym`, at any depth.
CREATE FUNCTION flagship.erase_values(value jsonb, subject text, pseudonym text)
RETURNS jsonb
LANGUAGE sql
IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT CASE jsonb_typeof(value)
        WHEN 'string' THEN CASE WHEN value = to_jsonb(subject) THEN to_jsonb(pseudonym) ELSE value END
        WHEN 'object' THEN (SELECT coalesce(jsonb_object_agg(f.key, flagship.erase_values(f.value, subject, pseudonym)), '{}')
                              FROM jsonb_each(value) f)
        WHEN 'array' THEN (SELECT coalesce(jsonb_agg(flagship.erase_values(e.value, subject, pseudonym) ORDER BY e.ordinality), '[]')
                             FROM jsonb_array_elements(value) WITH ORDINALITY e)
        ELSE value END
$fn$;

-- An audit diff with the subject's values replaced (see erase_values), and
-- the values of `fields` (top-level members, each an {"old", "new"} pair)
-- replaced by "[erased]".
CREATE FUNCTION flagship.erase_from_document(document jsonb, subject text, pseudonym text, fields text[])
RETURNS jsonb
LANGUAGE sql
IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT CASE WHEN jsonb_typeof(replaced) = 'object' THEN
        (SELECT coalesce(jsonb_object_agg(f.key,
                    CASE WHEN f.key = ANY (fields) AND jsonb_typeof(f.value) = 'object'
                         THEN (SELECT jsonb_object_agg(side.key, '"[erased]"'::jsonb)
                                 FROM jsonb_each(f.value) side)
                         ELSE f.value END), '{}')
           FROM jsonb_each(replaced) f)
        ELSE replaced END
      FROM (SELECT flagship.erase_values(document, subject, pseudonym) AS replaced) r
$fn$;

CREATE FUNCTION flagship.erase_subject(subject text) RETURNS jsonb
LANGUAGE plpgsql
-- It rewrites what no role may write (events, the audit trail's content),
-- so it runs as the extension's owner and confines itself to the session's
-- organization explicitly (the owner is not bound by row-level security).
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    org uuid := flagship.current_organization_id();
    pseudonym text := 'erased:' || gen_random_uuid();
    subject_digest text;
    member_ids uuid[];
    customer_ids uuid[];
    events_erased bigint;
    erased_seqs bigint[];
    erased_diffs jsonb[];
    erased_actors text[];
    erased_digests jsonb;
    erasure_seq bigint;
BEGIN
    IF subject IS NULL OR btrim(subject) = '' THEN
        RAISE EXCEPTION 'subject: must not be empty' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF org IS NULL THEN
        RAISE EXCEPTION 'no organization in this session: set flagship.organization_id first'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    -- Checked here, not by require_permission: as the owner this function
    -- would pass it. The actor's roles, or in key mode the key's scopes.
    IF NOT (flagship.actor_may('organization:write')
            OR (SELECT r.rolsuper FROM pg_roles r WHERE r.rolname = flagship.acting_role())) THEN
        RAISE EXCEPTION 'erase_subject: actor "%" lacks the permission organization:write in organization %',
            flagship.current_actor(), org
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'an owner of the organization erases subjects (in key mode: a key with organization:write)';
    END IF;
    -- One erasure at a time per organization: each reads the trail as the
    -- previous one left it (under READ COMMITTED; under REPEATABLE READ a
    -- concurrent erasure's rewrite of the same event fails with 40001).
    PERFORM pg_advisory_xact_lock(hashtextextended('flagship erase ' || org::text, 0));
    -- Salted with the organization, so digests do not link a person across tenants.
    subject_digest := encode(sha256(convert_to(org::text || ':' || subject, 'UTF8')), 'hex');

    -- The member: their key becomes the pseudonym and their name goes
    -- (roles stay, so the history of who could do what stays readable).
    UPDATE flagship.members m SET user_key = pseudonym, name = NULL
     WHERE m.organization_id = org AND m.user_key = subject;
    SELECT array_agg(m.id) INTO member_ids FROM flagship.members m
     WHERE m.organization_id = org AND m.user_key = pseudonym;
    -- The customer whose key is theirs: key, attributes and name (the
    -- application finds it under the pseudonym, or not at all).
    UPDATE flagship.customers c SET external_key = pseudonym, attributes = '{}', name = NULL, updated_at = now()
     WHERE c.organization_id = org AND c.external_key = subject;
    SELECT array_agg(c.id) INTO customer_ids FROM flagship.customers c
     WHERE c.organization_id = org AND c.external_key = pseudonym;
    -- Events about them: content emptied, their tag renamed to the pseudonym.
    UPDATE flagship.events e
       SET data = '{}', metadata = '{"erased": true}',
           tags = array_replace(e.tags, 'subject:' || subject, 'subject:' || pseudonym)
     WHERE e.organization_id = org AND e.tags @> ARRAY['subject:' || subject];
    GET DIAGNOSTICS events_erased = ROW_COUNT;

    -- The trail: every event whose content names them (the changes just
    -- made included), whose actor they were, or that changed the erased
    -- customer's attributes, with its content as it will be.
    SELECT array_agg(x.chain_seq ORDER BY x.chain_seq), array_agg(x.diff ORDER BY x.chain_seq),
           array_agg(x.actor ORDER BY x.chain_seq),
           jsonb_object_agg(x.chain_seq::text, encode(flagship.audit_content_digest(x.actor, x.diff), 'hex'))
      INTO erased_seqs, erased_diffs, erased_actors, erased_digests
      FROM (SELECT a.chain_seq,
                   flagship.erase_from_document(a.diff, subject, pseudonym, personal.fields) AS diff,
                   CASE WHEN a.actor = subject THEN pseudonym ELSE a.actor END AS actor
              FROM flagship.audit_events a
             -- The fields that are theirs wherever they change: the erased
             -- customer's attributes and name, the erased member's name.
             CROSS JOIN LATERAL (
                 SELECT CASE WHEN a.resource_type = 'customers'
                                  AND a.resource_id = ANY (coalesce(customer_ids, '{}')::text[])
                             THEN ARRAY['attributes', 'name']
                             WHEN a.resource_type = 'members'
                                  AND a.resource_id = ANY (coalesce(member_ids, '{}')::text[])
                             THEN ARRAY['name'] ELSE '{}'::text[] END AS fields) personal
             WHERE a.organization_id = org
               -- Erasure events name no one, and their records are what
               -- erased events are verified against: never rewritten.
               AND a.action <> 'erase'
               AND (a.actor = subject OR a.change_key = subject
                    OR strpos(a.diff::text, to_jsonb(subject)::text) > 0
                    OR a.diff ?| personal.fields)) x;
    -- The erasure event commits, in the chain, to the digest of each
    -- erased event's new content: changing it afterwards is detected.
    erasure_seq := flagship.audit_append(
        org, 'erase', 'subject', subject_digest,
        jsonb_build_object('subject_digest', subject_digest,
                           'members', coalesce(cardinality(member_ids), 0),
                           'customers', coalesce(cardinality(customer_ids), 0),
                           'events', events_erased,
                           'audit_events', coalesce(erased_digests, '{}')),
        'erasure', NULL, NULL);
    PERFORM set_config('flagship.erasing', erasure_seq::text, true);
    UPDATE flagship.audit_events a
       SET diff = e.diff, actor = e.actor,
           change_key = CASE WHEN a.change_key = subject THEN pseudonym ELSE a.change_key END,
           erased_by = erasure_seq
      FROM unnest(erased_seqs, erased_diffs, erased_actors) AS e (chain_seq, diff, actor)
     WHERE a.organization_id = org AND a.chain_seq = e.chain_seq;
    PERFORM set_config('flagship.erasing', '', true);

    RETURN jsonb_build_object('subject_digest', subject_digest, 'pseudonym', pseudonym,
                              'members', coalesce(cardinality(member_ids), 0),
                              'customers', coalesce(cardinality(customer_ids), 0),
                              'events', events_erased,
                              'audit_events', coalesce(cardinality(erased_seqs), 0),
                              'erasure_event', erasure_seq);
END
$fn$;
REVOKE ALL ON FUNCTION flagship.erase_subject(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION flagship.erase_subject(text) TO flagship_admin;
REVOKE ALL ON FUNCTION flagship.erase_from_document(jsonb, text, text, text[]) FROM PUBLIC;
REVOKE ALL ON FUNCTION flagship.erase_values(jsonb, text, text) FROM PUBLIC;

-- Escrow slices (#20) ---------------------------------------------------------
-- Counters of a metric with "slices": N are N rows whose caps sum to the
-- limit; existing counters become slice 0 of their metric.
ALTER TABLE flagship.metrics
    ADD COLUMN slices smallint NOT NULL DEFAULT 1,
    ADD CONSTRAINT metrics_slices_valid CHECK (slices BETWEEN 1 AND 64 AND (slices = 1 OR aggregation = 'sum'));
ALTER TABLE flagship.usage_counters
    ADD COLUMN slice smallint NOT NULL DEFAULT 0,
    ADD COLUMN cap bigint,
    ADD COLUMN split_limit bigint,
    DROP CONSTRAINT usage_counters_pkey,
    ADD CONSTRAINT usage_counters_pkey PRIMARY KEY (organization_id, customer_id, metric_id, slice);

CREATE OR REPLACE FUNCTION flagship.put_metric(project text, definition jsonb) RETURNS uuid
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    refused text;
    refused_hint text;
    project_row flagship.projects := flagship.project_row(project);
    saved uuid;
    -- NULL: not given, which keeps an existing metric's split.
    slice_count smallint;
BEGIN
    PERFORM flagship.require_permission('plans:write', 'put_metric');
    PERFORM flagship.require_object(definition, 'metric', '{key,name,unit,aggregation,description,slices}');
    PERFORM flagship.check_key_format(definition->>'key', 'key');
    IF coalesce(definition->>'aggregation', 'sum') NOT IN ('sum', 'gauge', 'credits') THEN
        PERFORM flagship.refuse('aggregation', 'must be sum, gauge or credits');
    END IF;
    IF definition ? 'slices' AND jsonb_typeof(definition->'slices') IS DISTINCT FROM 'null' THEN
        IF jsonb_typeof(definition->'slices') <> 'number' OR (definition->>'slices')::numeric NOT BETWEEN 1 AND 64
           OR (definition->>'slices')::numeric <> trunc((definition->>'slices')::numeric) THEN
            PERFORM flagship.refuse('slices', 'must be a whole number from 1 to 64');
        END IF;
        slice_count := (definition->>'slices')::smallint;
        IF slice_count > 1 AND coalesce(definition->>'aggregation', 'sum') <> 'sum' THEN
            PERFORM flagship.refuse('slices', 'only a sum can be split into slices (gauges are set, credits are grants)');
        END IF;
    END IF;
    -- Counters of a sliced metric have several rows: going back to one
    -- would have to merge the rows of running periods under every
    -- consumer's feet. Fewer slices (at least 2) are fine: consumers use
    -- whichever rows exist.
    IF slice_count = 1 AND EXISTS (SELECT 1 FROM flagship.metrics m
                                    WHERE m.organization_id = project_row.organization_id
                                      AND m.project_id = project_row.id AND m.key = definition->>'key'
                                      AND m.slices > 1) THEN
        PERFORM flagship.refuse('slices', 'a sliced metric keeps at least 2 slices (to count in one row again, meter a new metric)');
    END IF;
    -- DO UPDATE takes the time from the row it would have inserted: Citus
    -- refuses a call there that is not IMMUTABLE, such as now() (#21).
    INSERT INTO flagship.metrics AS m (organization_id, project_id, key, name, unit, aggregation, slices)
    VALUES (project_row.organization_id, project_row.id, definition->>'key', definition->>'name',
            definition->>'unit', coalesce(definition->>'aggregation', 'sum'), coalesce(slice_count, 1))
    ON CONFLICT ON CONSTRAINT metrics_key_unique DO UPDATE
       SET name = EXCLUDED.name, unit = EXCLUDED.unit, aggregation = EXCLUDED.aggregation,
           slices = coalesce(slice_count, m.slices), updated_at = EXCLUDED.updated_at
    RETURNING m.id INTO saved;
    RETURN saved;
EXCEPTION WHEN invalid_parameter_value THEN
    -- Every refusal names the metric it is about, then the field.
    GET STACKED DIAGNOSTICS refused = MESSAGE_TEXT, refused_hint = PG_EXCEPTION_HINT;
    PERFORM flagship.refuse_about('metric', definition->>'key', refused, refused_hint);
END
$fn$;

CREATE OR REPLACE FUNCTION flagship.metric_document(metric flagship.metrics) RETURNS jsonb
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT flagship.jsonb_without_nulls(jsonb_build_object(
        'key', metric.key, 'name', metric.name, 'unit', metric.unit, 'aggregation', metric.aggregation,
        'slices', CASE WHEN metric.slices > 1 THEN metric.slices END))
$fn$;

-- Everything a limit decision needs about one customer and metric, in one
-- query: ids, subscription status and the limit that applies (a customer
-- override wins over the plan). The limit functions (Rust, src/usage.rs)
-- keep the answer per backend until a configuration change; epochs are in
-- seconds.
CREATE OR REPLACE FUNCTION flagship.usage_facts(environment_id uuid, customer text, metric text)
RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    -- The customer's organization as a value (the session's, else the
    -- environment's): on Citus the read goes to its shards alone (#21).
    org uuid := flagship.current_organization_id();
    facts jsonb;
BEGIN
    IF org IS NULL THEN
        SELECT e.organization_id INTO org FROM flagship.environments e WHERE e.id = usage_facts.environment_id;
    END IF;
    SELECT jsonb_build_object(
               'organization_id', c.organization_id, 'customer_id', c.id, 'metric_id', m.id,
               'aggregation', m.aggregation, 'slices', m.slices, 'status', s.status,
               'trial_ends_at', extract(epoch FROM s.trial_ends_at),
               'billing_anchor', extract(epoch FROM s.billing_anchor),
               'has_limit', coalesce(o.metric_id, l.metric_id) IS NOT NULL,
               'usage_limit', CASE WHEN o.metric_id IS NOT NULL THEN o.usage_limit ELSE l.usage_limit END,
               'period', coalesce(o.period, l.period),
               'enforcement', coalesce(o.enforcement, l.enforcement),
               'plan_credits', CASE WHEN pc.metric_id IS NOT NULL THEN
                   jsonb_build_object('amount', pc.amount, 'period', pc.period,
                                      'rollover_max', pc.rollover_max) END)
      INTO facts
      FROM flagship.customers c
      LEFT JOIN flagship.metrics m
        ON m.organization_id = c.organization_id AND m.project_id = c.project_id
       AND m.key = usage_facts.metric
      LEFT JOIN flagship.subscriptions s
        ON s.organization_id = c.organization_id AND s.customer_id = c.id
      LEFT JOIN flagship.customer_limit_overrides o
        ON o.organization_id = c.organization_id AND o.customer_id = c.id AND o.metric_id = m.id
      LEFT JOIN flagship.usage_limits l
        ON l.organization_id = c.organization_id AND l.plan_id = s.plan_id AND l.metric_id = m.id
      LEFT JOIN flagship.plan_credits pc
        ON pc.organization_id = c.organization_id AND pc.plan_id = s.plan_id AND pc.metric_id = m.id
     WHERE c.organization_id = org AND c.environment_id = usage_facts.environment_id
       AND c.external_key = usage_facts.customer;
    RETURN coalesce(facts, '{}');
END
$fn$;

-- Escrow slices (0.3) ---------------------------------------------------------
--
-- One hot customer is capped by its counter row: each consumer holds the
-- row lock until its commit record is flushed. A metric with "slices": N
-- splits each counter into N rows whose caps sum to the limit (O'Neil's
-- escrow): record_usage takes a free slice with room (its backend's first,
-- SKIP LOCKED, so it never waits) and fills it within its cap. When no
-- free slice has room, rebalance_slices locks every slice of the counter
-- in slice order (the one order every rebalancing takes, so two of them
-- never deadlock), sums them, refuses exactly when the sum leaves no room,
-- and otherwise consumes and shares the headroom left out as new caps.
-- A slice whose split_limit is not the limit in force (the limit changed,
-- or the slice is new) has no usable cap until a rebalancing, so lowering
-- a limit holds at once.
--
-- Returns whether `amount` was consumed and the counter's use afterwards
-- (or, refused, as it is). Called by record_usage with usage writes open.
CREATE FUNCTION flagship.rebalance_slices(
    org uuid, customer uuid, metric uuid, period timestamptz, amount bigint, hard_limit bigint,
    slice_count integer, preferred integer, OUT granted boolean, OUT used_after bigint)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    total bigint := 0;
    headroom bigint;
BEGIN
    INSERT INTO flagship.usage_counters (organization_id, customer_id, metric_id, slice, period_start, used)
    SELECT org, customer, metric, i, period, 0 FROM generate_series(0, slice_count - 1) AS i
    ON CONFLICT DO NOTHING;
    -- Twice: the first statement waits for the slices it sees, in slice
    -- order; the second, under a snapshot taken once it holds them, also
    -- sees (and locks, still in order: they come after) slices another
    -- consumer created meanwhile when the metric's split was raised, which
    -- the first statement's snapshot may have missed. It alone counts.
    PERFORM 1 FROM flagship.usage_counters c
      WHERE c.organization_id = org AND c.customer_id = customer AND c.metric_id = metric
      ORDER BY c.slice
        FOR UPDATE;
    SELECT coalesce(sum(u.used), 0) INTO total FROM (
        SELECT CASE WHEN c.period_start IS NOT DISTINCT FROM period THEN c.used ELSE 0 END AS used
          FROM flagship.usage_counters c
         WHERE c.organization_id = org AND c.customer_id = customer AND c.metric_id = metric
         ORDER BY c.slice
           FOR UPDATE) u;
    IF hard_limit IS NOT NULL AND total + amount > hard_limit THEN
        granted := false;
        used_after := total;
        RETURN;
    END IF;
    headroom := coalesce(hard_limit - total - amount, 0);
    -- Slices 0 .. slice_count - 1 share the headroom (the first ones one
    -- more each until the remainder is gone); slices left over from a
    -- larger split keep what they hold and get no room.
    UPDATE flagship.usage_counters c
       SET used = u.used + u.taken,
           period_start = period,
           split_limit = hard_limit,
           cap = CASE WHEN hard_limit IS NOT NULL THEN
                     u.used + u.taken + CASE WHEN c.slice < slice_count THEN
                         headroom / slice_count + CASE WHEN c.slice < headroom % slice_count THEN 1 ELSE 0 END
                     ELSE 0 END
                 END,
           updated_at = now()
      FROM (SELECT c2.slice,
                   CASE WHEN c2.period_start IS NOT DISTINCT FROM period THEN c2.used ELSE 0 END AS used,
                   CASE WHEN c2.slice = preferred THEN amount ELSE 0 END AS taken
              FROM flagship.usage_counters c2
             WHERE c2.organization_id = org AND c2.customer_id = customer AND c2.metric_id = metric) u
     WHERE c.organization_id = org AND c.customer_id = customer AND c.metric_id = metric
       AND c.slice = u.slice;
    granted := true;
    used_after := total + amount;
END
$fn$;
REVOKE ALL ON FUNCTION flagship.rebalance_slices(uuid, uuid, uuid, timestamptz, bigint, bigint, integer, integer)
    FROM PUBLIC;
GRANT EXECUTE ON FUNCTION flagship.rebalance_slices(uuid, uuid, uuid, timestamptz, bigint, bigint, integer, integer)
    TO flagship_app, flagship_admin;

-- Gives `refund` of a reservation back: to its period's counter, or into
-- the grants it drew from (last drawn first; a grant that expired since
-- keeps what it gets back, unusable). Appends the `release` ledger row.
CREATE OR REPLACE FUNCTION flagship.refund_reservation(reservation flagship.usage_reservations, refund bigint)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    drawn record;
    take bigint;
    left_over bigint := refund;
    refunded jsonb := '[]';
    after bigint;
    terms flagship.usage_ledger;
BEGIN
    IF refund = 0 THEN
        RETURN;
    END IF;
    SELECT * INTO terms FROM flagship.usage_ledger l
     WHERE l.organization_id = reservation.organization_id
       AND l.idempotency_key = 'reservation:' || reservation.id;
    IF reservation.paid_by IS NULL THEN
        -- Into the period's slices (one, unless the metric is sliced), in
        -- slice order as every rebalancing locks them; never below zero,
        -- whatever happened to the counter meanwhile. A slice's cap stays:
        -- what comes back is room in that slice.
        FOR drawn IN SELECT c.slice, c.used FROM flagship.usage_counters c
                      WHERE c.organization_id = reservation.organization_id
                        AND c.customer_id = reservation.customer_id
                        AND c.metric_id = reservation.metric_id
                        AND c.period_start IS NOT DISTINCT FROM reservation.period_start
                      ORDER BY c.slice FOR UPDATE LOOP
            EXIT WHEN left_over = 0;
            take := least(left_over, drawn.used);
            UPDATE flagship.usage_counters c SET used = c.used - take, updated_at = now()
             WHERE c.organization_id = reservation.organization_id AND c.customer_id = reservation.customer_id
               AND c.metric_id = reservation.metric_id AND c.slice = drawn.slice;
            left_over := left_over - take;
        END LOOP;
        SELECT sum(c.used) INTO after FROM flagship.usage_counters c
         WHERE c.organization_id = reservation.organization_id AND c.customer_id = reservation.customer_id
           AND c.metric_id = reservation.metric_id
           AND c.period_start IS NOT DISTINCT FROM reservation.period_start;
    ELSE
        FOR drawn IN SELECT p.value FROM jsonb_array_elements(reservation.paid_by) WITH ORDINALITY p
                      ORDER BY p.ordinality DESC LOOP
            EXIT WHEN left_over = 0;
            take := least(left_over, (drawn.value->>'amount')::bigint);
            UPDATE flagship.credit_grants g SET remaining = g.remaining + take
             WHERE g.organization_id = reservation.organization_id AND g.id = (drawn.value->>'grant')::uuid;
            refunded := refunded || jsonb_build_array(jsonb_build_object('grant', drawn.value->'grant', 'amount', take));
            left_over := left_over - take;
        END LOOP;
        SELECT coalesce(sum(g.remaining), 0) INTO after FROM flagship.credit_grants g
         WHERE g.organization_id = reservation.organization_id AND g.customer_id = reservation.customer_id
           AND g.metric_id = reservation.metric_id AND g.remaining > 0
           AND (g.expires_at IS NULL OR g.expires_at > now());
    END IF;
    INSERT INTO flagship.usage_ledger
        (organization_id, customer_id, metric_id, period_start, kind, amount, used_after,
         idempotency_key, usage_limit, enforcement, resets_at, paid_by)
    VALUES (reservation.organization_id, reservation.customer_id, reservation.metric_id,
            reservation.period_start, 'release', -refund, coalesce(after, 0), NULL,
            terms.usage_limit, coalesce(terms.enforcement, 'hard'), terms.resets_at,
            CASE WHEN reservation.paid_by IS NOT NULL THEN refunded END);
END
$fn$;

-- Signal relations (#14) -----------------------------------------------------
-- The caches' invalidations go to two sequences no statement or policy
-- reads, instead of flagship.features and flagship.customers themselves
-- (which made every backend rebuild those relations' cache entries and
-- replan the statements reading them after any change anywhere).
CREATE SEQUENCE flagship.configuration_signal;
CREATE SEQUENCE flagship.entitlement_signal;
REVOKE ALL ON SEQUENCE flagship.configuration_signal, flagship.entitlement_signal FROM PUBLIC;

-- References checked on every write path ---------------------------------------
-- The prerequisites in `prerequisites` that the project cannot meet, in
-- their order: an unknown flag (`variant` NULL), or a variant the flag does
-- not have. One rule for put_flag and for plain SQL (the deferred check).
CREATE FUNCTION flagship.unmet_prerequisites(organization_id uuid, project_id uuid, prerequisites jsonb)
RETURNS TABLE (flag text, variant text)
LANGUAGE plpgsql
STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
-- PL/pgSQL: Citus cannot plan a SQL function's statement with parameters
-- (#21); the organization is a value of the join.
BEGIN
    RETURN QUERY
    SELECT p.value->>'flag', missing.wanted
      FROM jsonb_array_elements(prerequisites) WITH ORDINALITY AS p (value, position)
      LEFT JOIN flagship.features f
        ON f.organization_id = unmet_prerequisites.organization_id
       AND f.project_id = unmet_prerequisites.project_id AND f.key = p.value->>'flag'
      LEFT JOIN LATERAL (
          SELECT wanted
            FROM jsonb_array_elements_text(coalesce(p.value->'variants',
                                                    jsonb_build_array(p.value->'variant'))) wanted
           WHERE NOT f.variants ? wanted
           LIMIT 1) missing ON true
     WHERE f.key IS NULL OR missing.wanted IS NOT NULL
     ORDER BY p.position;
END
$fn$;

-- Raises for an unmet prerequisite of flag `flag_key` (nothing when
-- `prerequisite` is NULL): put_flag and the deferred check say it alike.
CREATE FUNCTION flagship.refuse_unmet_prerequisite(flag_key text, prerequisite text, variant text)
RETURNS void
LANGUAGE plpgsql
STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    IF prerequisite IS NULL THEN
        RETURN;
    ELSIF variant IS NULL THEN
        RAISE EXCEPTION 'flag "%": prerequisites: unknown flag "%"', flag_key, prerequisite
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'create the prerequisite flag first';
    END IF;
    RAISE EXCEPTION 'flag "%": prerequisites: flag "%" has no variant "%"', flag_key, prerequisite, variant
        USING ERRCODE = 'invalid_parameter_value';
END
$fn$;

-- References between rows are checked at commit (deferred constraint
-- triggers), whatever the write path: put_flag checks them up front too,
-- naming the document's paths, but plain SQL (an UPDATE of a flag's
-- prerequisites or a rule's segment, a DELETE of a flag others need) is
-- held to the same rules. At commit, so that one transaction may write
-- flags and segments in any order (imports, apply_project); a restore with
-- triggers off (README, Backup and restore) runs none of them. They read
-- the row's own organization as the owner: a transaction that changed its
-- organization setting after writing is checked alike.
CREATE FUNCTION flagship.features_check_references() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    flag flagship.features;
    unmet record;
    dependant text;
BEGIN
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        -- The row as the transaction leaves it (or none, if it went).
        SELECT * INTO flag FROM flagship.features f
         WHERE f.organization_id = NEW.organization_id AND f.id = NEW.id;
        IF FOUND AND flag.prerequisites <> '[]' THEN
            SELECT * INTO unmet
              FROM flagship.unmet_prerequisites(flag.organization_id, flag.project_id, flag.prerequisites)
             LIMIT 1;
            PERFORM flagship.refuse_unmet_prerequisite(flag.key, unmet.flag, unmet.variant);
        END IF;
    END IF;
    -- Only a flag's key and variants are what others rely on (put_flag
    -- rewrites them with every save: unchanged, nothing to look at).
    IF TG_OP = 'DELETE' OR (TG_OP = 'UPDATE' AND (OLD.key, OLD.variants) IS DISTINCT FROM (NEW.key, NEW.variants)) THEN
        -- A flag that names this one as a prerequisite must still find a
        -- flag of that key, with the variants it names.
        SELECT d.key INTO dependant
          FROM flagship.features d
         CROSS JOIN LATERAL flagship.unmet_prerequisites(d.organization_id, d.project_id, d.prerequisites) u
         WHERE d.organization_id = OLD.organization_id AND d.project_id = OLD.project_id
           AND d.prerequisites @> jsonb_build_array(jsonb_build_object('flag', OLD.key))
           AND u.flag = OLD.key
         LIMIT 1;
        IF dependant IS NOT NULL THEN
            RAISE EXCEPTION 'flag "%" is a prerequisite of flag "%"', OLD.key, dependant
                USING ERRCODE = 'foreign_key_violation',
                      HINT = 'change or remove the prerequisite first';
        END IF;
    END IF;
    RETURN NULL;
END
$fn$;

CREATE CONSTRAINT TRIGGER features_check_references
    AFTER INSERT OR UPDATE OF key, variants, prerequisites OR DELETE ON flagship.features
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION flagship.features_check_references();

CREATE FUNCTION flagship.feature_rules_check_segments() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    config flagship.feature_rules;
    missing text;
    flag_key text;
    environment_key text;
BEGIN
    SELECT * INTO config FROM flagship.feature_rules r
     WHERE r.organization_id = NEW.organization_id AND r.feature_id = NEW.feature_id
       AND r.environment_id = NEW.environment_id;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    SELECT rule->>'segment' INTO missing
      FROM jsonb_array_elements(config.rules) rule
     WHERE rule ? 'segment'
       AND NOT EXISTS (SELECT 1 FROM flagship.segments s
                        WHERE s.organization_id = config.organization_id
                          AND s.project_id = config.project_id AND s.key = rule->>'segment')
     LIMIT 1;
    IF missing IS NOT NULL THEN
        SELECT f.key INTO flag_key FROM flagship.features f
         WHERE f.organization_id = config.organization_id AND f.id = config.feature_id;
        SELECT e.key INTO environment_key FROM flagship.environments e
         WHERE e.organization_id = config.organization_id AND e.id = config.environment_id;
        RAISE EXCEPTION 'flag "%": environments.%.rules: unknown segment "%"', flag_key, environment_key, missing
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'create it with flagship.put_segment first';
    END IF;
    RETURN NULL;
END
$fn$;

CREATE CONSTRAINT TRIGGER feature_rules_check_segments
    AFTER INSERT OR UPDATE OF rules ON flagship.feature_rules
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION flagship.feature_rules_check_segments();
REVOKE ALL ON FUNCTION flagship.features_check_references(), flagship.feature_rules_check_segments() FROM PUBLIC;

-- Keys and permissions checked away from the organization (#21) ------------
-- A key verification or a permission check made where the organization's
-- rows are not (a Citus worker while FlagShip's tables are the
-- coordinator's, another node once they are distributed) raises instead of
-- answering no for every row. Executable by everyone: has_permission
-- (invoker's rights) calls it; it does nothing without Citus.
CREATE  FUNCTION "refuse_away_from_the_organization"() RETURNS void
STRICT VOLATILE PARALLEL RESTRICTED
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'refuse_away_from_the_organization_wrapper';

-- import_unleash reads its project with project_row (#21).
CREATE OR REPLACE FUNCTION flagship.import_unleash(project text, state jsonb, environment text DEFAULT NULL)
RETURNS integer
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    project_row flagship.projects;
    environment_key text;
    document jsonb;
    kept jsonb;
    inherited jsonb;
    imported integer := 0;
BEGIN
    project_row := flagship.project_row(project);
    IF state IS NULL OR jsonb_typeof(state) <> 'object' THEN
        RAISE EXCEPTION 'unleash import: state must be the JSON object Unleash''s client API returns'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT e.key INTO environment_key
      FROM flagship.environments e
     WHERE e.organization_id = project_row.organization_id AND e.project_id = project_row.id
       AND CASE WHEN environment IS NULL THEN e.is_default ELSE e.key = environment END;
    IF environment_key IS NULL THEN
        RAISE EXCEPTION 'unleash import: project "%" has no environment "%"',
            project_row.key, coalesce(environment, '(default)')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    FOR document IN
        SELECT d FROM jsonb_array_elements(flagship.unleash_flag_documents(state, environment_key)) d
    LOOP
        -- put_flag replaces every environment it is given and drops the
        -- others: hand it the flag's other environments unchanged, with the
        -- flag-level salt and bucketing they were written under (imported
        -- rollouts name their own).
        SELECT (SELECT jsonb_object_agg(e.key, jsonb_build_object(
                           'enabled', r.enabled, 'targets', r.targets, 'rules', r.rules,
                           'default', r.default_serve))
                  FROM flagship.feature_rules r
                  JOIN flagship.environments e
                    ON e.organization_id = r.organization_id AND e.id = r.environment_id
                 WHERE r.organization_id = f.organization_id AND r.feature_id = f.id
                   AND e.key <> environment_key),
               flagship.jsonb_without_nulls(jsonb_build_object('salt', f.salt, 'bucketing', f.bucketing))
          INTO kept, inherited
          FROM flagship.features f
         WHERE f.organization_id = project_row.organization_id AND f.project_id = project_row.id
           AND f.key = document->>'key';
        -- A new flag has neither.
        document := document || coalesce(inherited, '{}');
        PERFORM flagship.put_flag(project_row.id::text,
            jsonb_set(document, '{environments}',
                      coalesce(kept, '{}') || (document->'environments')));
        imported := imported + 1;
    END LOOP;
    RETURN imported;
END
$fn$;

-- Where an environment name leads for this session (its candidates), and,
-- when it means one, that environment's organization and configuration
-- version, for src/evaluation/loading.rs. A STABLE function's statements
-- share the calling statement's snapshot, so the three answers agree. Each
-- read names the organization as a value: on Citus it then goes to the
-- shard group that holds the organization (#21).
CREATE FUNCTION flagship.locate_environment(environment text,
    OUT candidates uuid[], OUT organization uuid, OUT version bigint)
LANGUAGE plpgsql
STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    org constant uuid := flagship.current_organization_id();
    project uuid;
BEGIN
    candidates := flagship.environment_candidates(environment);
    IF cardinality(candidates) <> 1 THEN
        RETURN;
    END IF;
    IF org IS NULL THEN
        SELECT e.organization_id, e.project_id INTO organization, project
          FROM flagship.environments e WHERE e.id = candidates[1];
    ELSE
        SELECT e.organization_id, e.project_id INTO organization, project
          FROM flagship.environments e WHERE e.organization_id = org AND e.id = candidates[1];
    END IF;
    SELECT coalesce(sum(v.configuration), 0)::bigint INTO version
      FROM flagship.cache_versions v
     WHERE v.organization_id = organization AND v.scope IN (organization, project, candidates[1]);
END
$fn$;

CREATE OR REPLACE FUNCTION flagship.revoke_api_key(key_id uuid)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    org constant uuid := flagship.current_organization_id();
    revoked constant timestamptz := now();
BEGIN
    -- Another organization's key looks absent, as row-level security
    -- would make it. The organization and the time are values: Citus
    -- sends the statement to the organization's shard, and refuses a
    -- function call inside coalesce (#21).
    UPDATE flagship.api_keys k SET revoked_at = coalesce(k.revoked_at, revoked)
     WHERE (org IS NULL OR k.organization_id = org) AND k.id = key_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'key_id: api key % not found', key_id USING ERRCODE = 'invalid_parameter_value';
    END IF;
END
$fn$;

CREATE OR REPLACE FUNCTION flagship.features_revalidate_rules() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    config record;
BEGIN
    FOR config IN
        SELECT flagship.environment_config(r.enabled, r.targets, r.rules, r.default_serve) AS document, e.key AS environment_key
          FROM flagship.feature_rules r
          JOIN flagship.environments e ON e.organization_id = r.organization_id AND e.id = r.environment_id
         WHERE r.organization_id = NEW.organization_id AND r.feature_id = NEW.id
    LOOP
        PERFORM flagship.validate_flag_config(
            NEW.key, NEW.variants, NEW.bucketing, config.environment_key, config.document);
    END LOOP;
    RETURN NULL;
END
$fn$;

CREATE OR REPLACE FUNCTION flagship.feature_rules_validate() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    feature record;
    environment_key text;
BEGIN
    SELECT f.key, f.variants, f.bucketing INTO feature
      FROM flagship.features f
     WHERE f.organization_id = NEW.organization_id AND f.id = NEW.feature_id;
    SELECT e.key INTO environment_key
      FROM flagship.environments e
     WHERE e.organization_id = NEW.organization_id AND e.id = NEW.environment_id;
    -- Unknown feature or environment: the foreign keys report it.
    IF feature.key IS NULL OR environment_key IS NULL THEN
        RETURN NEW;
    END IF;
    PERFORM flagship.validate_flag_config(
        feature.key, feature.variants, feature.bucketing, environment_key,
        flagship.environment_config(NEW.enabled, NEW.targets, NEW.rules, NEW.default_serve));
    NEW.updated_at := now();
    RETURN NEW;
END
$fn$;

CREATE OR REPLACE FUNCTION flagship.flag_document(feature flagship.features) RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
-- PL/pgSQL with the organization as a value: Citus can plan it and send
-- it to the organization's shard group (#21).
BEGIN
    RETURN flagship.jsonb_without_nulls(
               to_jsonb(feature) - '{organization_id,project_id,id,created_at,updated_at}'::text[])
           || jsonb_build_object('environments', coalesce((
               SELECT jsonb_object_agg(e.key, flagship.jsonb_without_nulls(
                          flagship.environment_config(r.enabled, r.targets, r.rules, r.default_serve)))
                 FROM flagship.feature_rules r
                 JOIN flagship.environments e
                   ON e.organization_id = r.organization_id AND e.id = r.environment_id
                WHERE r.organization_id = feature.organization_id AND r.feature_id = feature.id),
               '{}'));
END
$fn$;

CREATE OR REPLACE FUNCTION flagship.environment_snapshot(environment_id uuid) RETURNS jsonb
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT jsonb_build_object(
        'flags', coalesce((
            SELECT jsonb_agg(jsonb_build_object(
                       'definition', to_jsonb(f) - '{organization_id,project_id,id,created_at,updated_at}'::text[],
                       'config', CASE WHEN r.feature_id IS NOT NULL
                                      THEN flagship.environment_config(r.enabled, r.targets, r.rules, r.default_serve) END))
              FROM flagship.features f
              LEFT JOIN flagship.feature_rules r
                ON r.organization_id = f.organization_id AND r.feature_id = f.id
               AND r.environment_id = e.id
             WHERE f.organization_id = e.organization_id AND f.project_id = e.project_id), '[]'),
        'segments', coalesce((
            SELECT jsonb_agg(to_jsonb(s) - '{organization_id,project_id,id,created_at,updated_at}'::text[])
              FROM flagship.segments s
             WHERE s.organization_id = e.organization_id AND s.project_id = e.project_id), '[]'))
      FROM flagship.environments e
     WHERE e.id = environment_id
$fn$;

CREATE OR REPLACE FUNCTION flagship.customer_document(customer flagship.customers) RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
-- PL/pgSQL, each read naming the organization as a value: Citus plans
-- each as a query on the organization's shards (#21).
DECLARE
    subscription record;
BEGIN
    SELECT s.status, s.trial_ends_at, s.billing_anchor, p.key AS plan_key INTO subscription
      FROM flagship.subscriptions s
      LEFT JOIN flagship.plans p ON p.organization_id = s.organization_id AND p.id = s.plan_id
     WHERE s.organization_id = customer.organization_id AND s.customer_id = customer.id;
    RETURN flagship.jsonb_without_nulls(jsonb_build_object(
        'key', customer.external_key, 'name', customer.name,
        'plan', subscription.plan_key, 'status', subscription.status,
        'trial_ends_at', subscription.trial_ends_at, 'billing_anchor', subscription.billing_anchor,
        'overrides', jsonb_build_object(
            'features', coalesce((SELECT jsonb_object_agg(o.feature_key, o.enabled)
                                    FROM flagship.customer_feature_overrides o
                                   WHERE o.organization_id = customer.organization_id
                                     AND o.customer_id = customer.id), '{}'),
            'limits', coalesce((SELECT jsonb_object_agg(m.key, flagship.limit_document(o.usage_limit, o.period, o.enforcement))
                                  FROM flagship.customer_limit_overrides o
                                  JOIN flagship.metrics m ON m.organization_id = o.organization_id AND m.id = o.metric_id
                                 WHERE o.organization_id = customer.organization_id
                                   AND o.customer_id = customer.id), '{}')),
        'attributes', customer.attributes));
END
$fn$;

CREATE OR REPLACE FUNCTION flagship.feature_switches(in_organization uuid, in_project uuid, switches jsonb, field text)
RETURNS TABLE (feature_key text, enabled boolean)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    item record;
BEGIN
    FOR item IN SELECT * FROM jsonb_each(coalesce(switches, '{}')) LOOP
        IF jsonb_typeof(item.value) <> 'boolean' THEN
            PERFORM flagship.refuse(field || '.' || item.key, 'must be true or false');
        END IF;
        IF NOT EXISTS (SELECT 1 FROM flagship.features f
                        WHERE f.organization_id = in_organization AND f.project_id = in_project
                          AND f.key = item.key) THEN
            PERFORM flagship.refuse(field || '.' || item.key, format('unknown flag "%s"', item.key));
        END IF;
        feature_key := item.key;
        enabled := item.value::boolean;
        RETURN NEXT;
    END LOOP;
END
$fn$;

CREATE OR REPLACE FUNCTION flagship.customer_entitlements(environment_id uuid, external_key text) RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
-- PL/pgSQL, the customer read by the session's organization when it has
-- one: Citus plans it as a query on that organization's shards (#21).
DECLARE
    org constant uuid := flagship.current_organization_id();
    c flagship.customers;
    s flagship.subscriptions;
BEGIN
    IF org IS NULL THEN
        SELECT * INTO c FROM flagship.customers x
         WHERE x.environment_id = customer_entitlements.environment_id
           AND x.external_key = customer_entitlements.external_key;
    ELSE
        SELECT * INTO c FROM flagship.customers x
         WHERE x.organization_id = org AND x.environment_id = customer_entitlements.environment_id
           AND x.external_key = customer_entitlements.external_key;
    END IF;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    SELECT * INTO s FROM flagship.subscriptions x
     WHERE x.organization_id = c.organization_id AND x.customer_id = c.id;
    RETURN jsonb_build_object(
        'status', s.status,
        'trial_ends_at', extract(epoch FROM s.trial_ends_at),
        'features', coalesce((
            SELECT jsonb_agg(k.feature_key) FROM (
                SELECT f.feature_key FROM flagship.plan_features f
                 WHERE f.organization_id = c.organization_id AND f.plan_id = s.plan_id AND f.enabled
                   AND NOT EXISTS (SELECT 1 FROM flagship.customer_feature_overrides o
                                    WHERE o.organization_id = c.organization_id AND o.customer_id = c.id
                                      AND o.feature_key = f.feature_key AND NOT o.enabled)
                UNION
                SELECT o.feature_key FROM flagship.customer_feature_overrides o
                 WHERE o.organization_id = c.organization_id AND o.customer_id = c.id AND o.enabled) k), '[]'),
        'attributes', c.attributes);
END
$fn$;

-- The row of the project or environment a name means (resolve_project's,
-- resolve_environment's), read with its organization as a value when the
-- session has one: Citus then reads it from that organization's shard
-- (#21), where a call to resolve_project inside a query's WHERE would be
-- sent to every shard along with the query.
CREATE FUNCTION flagship.project_row(project text)
RETURNS flagship.projects
LANGUAGE plpgsql
STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    wanted constant uuid := flagship.resolve_project(project);
    org constant uuid := flagship.current_organization_id();
    found flagship.projects;
BEGIN
    IF org IS NULL THEN
        SELECT * INTO found FROM flagship.projects p WHERE p.id = wanted;
    ELSE
        SELECT * INTO found FROM flagship.projects p WHERE p.organization_id = org AND p.id = wanted;
    END IF;
    RETURN found;
END
$fn$;

CREATE FUNCTION flagship.environment_row(environment text)
RETURNS flagship.environments
LANGUAGE plpgsql
STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    wanted constant uuid := flagship.resolve_environment(environment);
    org constant uuid := flagship.current_organization_id();
    found flagship.environments;
BEGIN
    IF org IS NULL THEN
        SELECT * INTO found FROM flagship.environments e WHERE e.id = wanted;
    ELSE
        SELECT * INTO found FROM flagship.environments e WHERE e.organization_id = org AND e.id = wanted;
    END IF;
    RETURN found;
END
$fn$;

-- Whether a member holds a permission through any of its roles in the
-- organization (the session's when NULL). Invoker's rights: row-level
-- security answers false for any organization but the session's.
CREATE OR REPLACE FUNCTION flagship.has_permission(user_key text, permission text, organization_id uuid DEFAULT NULL)
RETURNS boolean
LANGUAGE plpgsql
STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
-- PL/pgSQL, not SQL: its statement is planned once per session (a SQL
-- function with its own search_path is planned at every call), and with
-- the organization as a value in every table's condition Citus can send it
-- to the one shard group that holds the organization (#21).
DECLARE
    org constant uuid := coalesce(has_permission.organization_id, flagship.current_organization_id());
BEGIN
    IF EXISTS (
        SELECT 1 FROM flagship.members m
          JOIN flagship.member_roles mr ON mr.organization_id = m.organization_id AND mr.member_id = m.id
          JOIN flagship.role_permissions rp ON rp.organization_id = mr.organization_id AND rp.role_id = mr.role_id
         WHERE m.organization_id = org AND mr.organization_id = org AND rp.organization_id = org
           AND m.user_key = has_permission.user_key
           AND rp.permission = has_permission.permission) THEN
        RETURN true;
    END IF;
    -- Away from the organization's rows (Citus, #21) a false answer raises
    -- instead: a call pushed down into a shard query would deny every row
    -- in silence.
    PERFORM flagship.refuse_away_from_the_organization();
    RETURN false;
END
$fn$;

-- While FlagShip's tables stay on the Citus coordinator (#21;
-- flagship.distribute() does not keep this trigger): an organization
-- created on a worker would be one the coordinator never sees, and that
-- worker would answer from it. Every tenant row hangs off an organization,
-- so new organizations are refused there (rows a node held before it
-- became a worker stay: README, Citus).
CREATE FUNCTION flagship.organizations_only_on_the_coordinator() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    PERFORM flagship.refuse_away_from_the_organization();
    RETURN NULL;
END
$fn$;
CREATE TRIGGER organizations_only_on_the_coordinator BEFORE INSERT ON flagship.organizations
    FOR EACH STATEMENT EXECUTE FUNCTION flagship.organizations_only_on_the_coordinator();

-- Verification runs before the caller has any organization, so it is
-- SECURITY DEFINER: it finds the key by hash alone and reveals only what
-- the key itself grants.
CREATE OR REPLACE FUNCTION flagship.verify_api_key(key text, client_ip inet DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    key_row flagship.api_keys;
    organization_status text;
    code text;
    uses bigint;
    customer_key text;
    rate_limit record;
BEGIN
    IF key IS NOT NULL AND key ~ '^fs_(live|test)_[0-9a-f]{64}$' THEN
        SELECT * INTO key_row FROM flagship.api_keys k WHERE k.key_hash = sha256(convert_to(key, 'UTF8'));
    END IF;
    IF key_row.id IS NULL THEN
        -- Away from the organization's rows (Citus) this raises instead.
        PERFORM flagship.refuse_away_from_the_organization();
        code := 'NOT_FOUND';
    -- An allow-list admits only the addresses it lists, and tells callers
    -- elsewhere nothing more (not even that the key was revoked); a
    -- verification that does not say where the call comes from is refused.
    ELSIF key_row.allowed_ips IS NOT NULL
          AND (client_ip IS NULL
               OR NOT EXISTS (SELECT FROM unnest(key_row.allowed_ips) a WHERE client_ip <<= a)) THEN
        code := 'FORBIDDEN';
    ELSIF key_row.revoked_at IS NOT NULL THEN
        code := 'REVOKED';
    ELSIF key_row.expires_at IS NOT NULL AND key_row.expires_at <= now() THEN
        code := 'EXPIRED';
    ELSE
        SELECT o.status INTO organization_status FROM flagship.organizations o
         WHERE o.id = key_row.organization_id;
        IF organization_status IS DISTINCT FROM 'active' THEN
            code := 'FORBIDDEN';
        END IF;
        -- Rate limits before the usage limit: a refused attempt spends no
        -- use. Every limit counts the attempt (it happened either way).
        FOR rate_limit IN SELECT * FROM jsonb_each(key_row.rate_limits) WHERE code IS NULL LOOP
            IF NOT (flagship.rate_limit_hit(key_row.organization_id,
                                            'key:' || coalesce(key_row.uses_of, key_row.id), rate_limit.key,
                                            (rate_limit.value->>'limit')::bigint, rate_limit.value->>'window',
                                            1)->>'allowed')::boolean THEN
                code := 'RATE_LIMITED';
            END IF;
        END LOOP;
        IF code IS NOT NULL THEN
            NULL;
        ELSIF key_row.usage_limit IS NOT NULL THEN
            -- Counting uses is a write by nature; only limited keys pay it.
            uses := nextval(flagship.ensure_key_use_sequence(coalesce(key_row.uses_of, key_row.id),
                                                              key_row.usage_count));
            IF uses <= key_row.usage_limit THEN
                code := 'VALID';
                UPDATE flagship.api_keys k SET usage_count = greatest(k.usage_count, uses), last_used_at = now()
                 WHERE k.organization_id = key_row.organization_id AND k.id = key_row.id;
            ELSE
                code := 'USAGE_EXCEEDED';
            END IF;
        ELSE
            code := 'VALID';
            -- At most one write a minute per key, so busy keys do not turn
            -- every verification into a hot-row update.
            UPDATE flagship.api_keys k SET last_used_at = now()
             WHERE k.organization_id = key_row.organization_id AND k.id = key_row.id
               AND (k.last_used_at IS NULL OR k.last_used_at < now() - interval '1 minute');
        END IF;
    END IF;
    IF code <> 'VALID' THEN
        RETURN jsonb_build_object('valid', false, 'code', code, 'key_id', NULL,
                                  'organization_id', NULL, 'environment_id', NULL, 'scopes', NULL,
                                  'customer', NULL);
    END IF;
    IF key_row.customer_id IS NOT NULL THEN
        SELECT c.external_key INTO customer_key FROM flagship.customers c
         WHERE c.organization_id = key_row.organization_id AND c.id = key_row.customer_id;
    END IF;
    RETURN jsonb_build_object('valid', true, 'code', code, 'key_id', key_row.id,
                              'organization_id', key_row.organization_id,
                              'environment_id', key_row.environment_id, 'scopes', to_jsonb(key_row.scopes),
                              'customer', customer_key);
END
$fn$;

-- Distributing FlagShip over a Citus cluster (#21; README, "Citus"):
-- every tenant table hash-distributed by organization, all of an
-- organization's rows in one co-located shard group, so that FlagShip runs
-- on the node holding that group as on a single server: each statement
-- names the organization as a value and Citus executes it on the local
-- shard, in the session's own backend, where row-level security, key mode
-- and the cache signals work as they do on one server.

-- The expression PostgreSQL applies for `command` on table `table_name`
-- from its policies: any permissive one's and every restrictive one's
-- USING, or, for the rows a command writes (`written`), each one's WITH
-- CHECK, else its USING. NULL when no permissive policy allows the command.
-- prepare_for_distribution folds restrictive policies with it, and the
-- tenant guard checks written rows with it.
CREATE FUNCTION flagship.policy_expression(table_name text, command text, written boolean) RETURNS text
LANGUAGE sql
STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT '(' || string_agg('(' || e.expression || ')', ' OR ') FILTER (WHERE e.permissive = 'PERMISSIVE') || ')'
           || coalesce(' AND ' || string_agg('(' || e.expression || ')', ' AND ')
                                      FILTER (WHERE e.permissive = 'RESTRICTIVE'), '')
      FROM (SELECT pol.permissive,
                   CASE WHEN policy_expression.written THEN coalesce(pol.with_check, pol.qual) ELSE pol.qual END
                       AS expression
              FROM pg_catalog.pg_policies pol
             WHERE pol.schemaname = 'flagship' AND pol.tablename = policy_expression.table_name
               AND pol.cmd IN (policy_expression.command, 'ALL')) e
$fn$;
REVOKE ALL ON FUNCTION flagship.policy_expression(text, text, boolean) FROM PUBLIC;

-- What every node does to its copy of FlagShip's tables before they are
-- distributed (each node's copy is the extension's own until then). Safe
-- to run twice: distribute() runs it again after a failure.
CREATE FUNCTION flagship.prepare_for_distribution(trigger_names text[]) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    p record;
    command text;
    folded_statements text[];
    statement text;
    t record;
BEGIN
    -- Unique only within an organization once distributed: slugs are
    -- checked by create_organization, key hashes are random.
    ALTER TABLE flagship.organizations DROP CONSTRAINT IF EXISTS organizations_slug_key;
    DROP INDEX IF EXISTS flagship.api_keys_hash;
    -- Still looked up by hash (verify_api_key): an index that need not be
    -- unique.
    CREATE INDEX IF NOT EXISTS api_keys_key_hash ON flagship.api_keys (key_hash);
    -- Citus refuses subqueries in the policies of distributed tables: the
    -- (SELECT f()) around each function call goes (PostgreSQL then calls
    -- it per row instead of once per statement).
    FOR p IN SELECT pol.*, regexp_replace(pol.qual, subquery, '\1', 'g') AS using_clause,
                    regexp_replace(pol.with_check, subquery, '\1', 'g') AS check_clause
               FROM pg_catalog.pg_policies pol
              CROSS JOIN (VALUES ('\(\s*SELECT\s+([a-z_.]+\([^()]*\))\s+AS\s+[a-z_]+\)')) AS pattern (subquery)
              WHERE pol.schemaname = 'flagship' LOOP
        CONTINUE WHEN p.using_clause IS NOT DISTINCT FROM p.qual AND p.check_clause IS NOT DISTINCT FROM p.with_check;
        EXECUTE format('DROP POLICY %I ON flagship.%I', p.policyname, p.tablename);
        statement := format('CREATE POLICY %I ON flagship.%I AS %s FOR %s TO public',
                            p.policyname, p.tablename, p.permissive, p.cmd);
        IF p.using_clause IS NOT NULL THEN
            statement := statement || format(' USING (%s)', p.using_clause);
        END IF;
        IF p.check_clause IS NOT NULL THEN
            statement := statement || format(' WITH CHECK (%s)', p.check_clause);
        END IF;
        EXECUTE statement;
    END LOOP;
    -- Citus copies a restrictive policy to the shards as a permissive one
    -- (13.2: CreatePolicyCommandForPolicy writes no AS RESTRICTIVE), which
    -- would let any role write what only FlagShip's functions may. On a
    -- table with restrictive policies, each command any permissive policy
    -- allows gets one permissive policy instead, the restrictions folded in
    -- as PostgreSQL combines them (policy_expression).
    FOR t IN SELECT DISTINCT pol.tablename FROM pg_catalog.pg_policies pol
              WHERE pol.schemaname = 'flagship' AND pol.permissive = 'RESTRICTIVE' LOOP
        folded_statements := '{}';
        FOREACH command IN ARRAY ARRAY['SELECT', 'INSERT', 'UPDATE', 'DELETE'] LOOP
            -- No permissive policy allows the command (a written row's check
            -- falls back to USING, so it is NULL only then).
            CONTINUE WHEN flagship.policy_expression(t.tablename, command, true) IS NULL;
            statement := format('CREATE POLICY %I ON flagship.%I FOR %s TO public',
                                t.tablename || '_' || lower(command) || '_folded', t.tablename, command);
            IF command <> 'INSERT' THEN
                statement := statement
                    || format(' USING (%s)', flagship.policy_expression(t.tablename, command, false));
            END IF;
            IF command IN ('INSERT', 'UPDATE') THEN
                statement := statement
                    || format(' WITH CHECK (%s)', flagship.policy_expression(t.tablename, command, true));
            END IF;
            folded_statements := folded_statements || statement;
        END LOOP;
        FOR p IN SELECT pol.policyname FROM pg_catalog.pg_policies pol
                  WHERE pol.schemaname = 'flagship' AND pol.tablename = t.tablename LOOP
            EXECUTE format('DROP POLICY %I ON flagship.%I', p.policyname, t.tablename);
        END LOOP;
        FOREACH statement IN ARRAY folded_statements LOOP
            EXECUTE statement;
        END LOOP;
    END LOOP;
    -- Copying the rows into the shards would fire the triggers:
    -- distribute() creates them again afterwards.
    FOR t IN SELECT tg.tgname, c.relname FROM pg_catalog.pg_trigger tg
               JOIN pg_catalog.pg_class c ON c.oid = tg.tgrelid
              WHERE c.relnamespace = 'flagship'::regnamespace AND NOT tg.tgisinternal
                AND tg.tgname = ANY (trigger_names) LOOP
        EXECUTE format('DROP TRIGGER %I ON flagship.%I', t.tgname, t.relname);
    END LOOP;
    -- A reference table takes no foreign key of a local table.
    ALTER TABLE flagship.role_permissions DROP CONSTRAINT IF EXISTS role_permissions_permission_fkey;
    ALTER TABLE flagship.builtin_role_permissions
        DROP CONSTRAINT IF EXISTS builtin_role_permissions_permission_fkey;
END
$fn$;
REVOKE ALL ON FUNCTION flagship.prepare_for_distribution(text[]) FROM PUBLIC;

-- Citus writes the rows of an INSERT ... SELECT it cannot push down, and
-- of a COPY, into a shard on the same node with PostgreSQL's COPY
-- machinery called directly, which checks no row-level security policy
-- (13.2; on another node the shard's COPY refuses the table instead): an
-- admin of one organization could then write rows of another whose shards
-- share the node, and a member could give itself a role. distribute()
-- puts this guard on every tenant table. Arguments: the organization
-- column; whether only FlagShip's usage functions write the table (then
-- the check is theirs: the row's organization and usage writes open);
-- otherwise the write checks of the table's policies for INSERT and for
-- UPDATE, evaluated on the new row. Superusers and roles with BYPASSRLS
-- pass, as they pass row-level security.
CREATE FUNCTION flagship.guard_tenant_row() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    allowed boolean;
BEGIN
    IF (SELECT r.rolsuper OR r.rolbypassrls FROM pg_catalog.pg_roles r WHERE r.rolname = current_user) THEN
        RETURN NEW;
    END IF;
    allowed := (to_jsonb(NEW) ->> TG_ARGV[0])::uuid IS NOT DISTINCT FROM flagship.current_organization_id();
    IF allowed AND TG_ARGV[1]::boolean THEN
        allowed := flagship.usage_writes_open();
    ELSIF allowed THEN
        EXECUTE format('SELECT coalesce((%s), false) FROM (SELECT ($1).*) AS guarded',
                       CASE TG_OP WHEN 'INSERT' THEN TG_ARGV[2] ELSE TG_ARGV[3] END)
           INTO allowed USING NEW;
    END IF;
    IF NOT allowed THEN
        RAISE EXCEPTION 'new row violates row-level security policy for table "%"',
            regexp_replace(TG_TABLE_NAME, '_[0-9]+$', '')
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN NEW;
END
$fn$;
REVOKE ALL ON FUNCTION flagship.guard_tenant_row() FROM PUBLIC;

-- Trigger and policy functions run inside the queries Citus executes on
-- the shards, and those that read FlagShip's tables make distributed
-- queries there, which Citus refuses unless allowed: allowed for them
-- alone. It reads right: an organization's rows are all in one shard
-- group, so the nested query reads the same node's shards, in the same
-- transaction. Every node runs it, again after ALTER EXTENSION ... UPDATE
-- (which defines the functions anew): flagship.distribute() does both.
CREATE FUNCTION flagship.allow_nested_reads() RETURNS integer
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    fn record;
    altered integer := 0;
BEGIN
    FOR fn IN SELECT p.oid::regprocedure AS signature
                FROM pg_catalog.pg_proc p
               WHERE p.pronamespace = 'flagship'::regnamespace
                 AND p.prolang IN (SELECT l.oid FROM pg_catalog.pg_language l WHERE l.lanname IN ('sql', 'plpgsql'))
                 AND (p.oid IN (SELECT tg.tgfoid FROM pg_catalog.pg_trigger tg
                                  JOIN pg_catalog.pg_class c ON c.oid = tg.tgrelid
                                 WHERE c.relnamespace = 'flagship'::regnamespace)
                      OR p.proname IN (SELECT m[1] FROM pg_catalog.pg_policies pol,
                                              regexp_matches(coalesce(pol.qual, '') || ' ' || coalesce(pol.with_check, ''),
                                                             'flagship\.([a-z_]+)\(', 'g') AS m
                                        WHERE pol.schemaname = 'flagship'))
               ORDER BY 1 LOOP
        EXECUTE format('ALTER FUNCTION %s SET citus.allow_nested_distributed_execution = on', fn.signature);
        altered := altered + 1;
    END LOOP;
    RETURN altered;
END
$fn$;
REVOKE ALL ON FUNCTION flagship.allow_nested_reads() FROM PUBLIC;

-- Runs `command` here and on every worker (Citus's own connections, each
-- in a transaction of its own), raising for the first node it fails on.
CREATE FUNCTION flagship.on_every_node(command text, doing text) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    worker record;
BEGIN
    EXECUTE command;
    FOR worker IN SELECT * FROM pg_catalog.run_command_on_workers(command) LOOP
        IF NOT worker.success THEN
            RAISE EXCEPTION 'distribute: % on the worker %:% failed: %', doing,
                worker.nodename, worker.nodeport, worker.result
                USING ERRCODE = 'object_not_in_prerequisite_state';
        END IF;
    END LOOP;
END
$fn$;
REVOKE ALL ON FUNCTION flagship.on_every_node(text, text) FROM PUBLIC;

CREATE FUNCTION flagship.distribute() RETURNS jsonb
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    definitions text[];
    names text[];
    always text[];
    guarded_column text;
    usage_only boolean;
    insert_check text;
    update_check text;
    pending text[];
    failed text[];
    progress boolean := true;
    t text;
    definition text;
BEGIN
    IF NOT (SELECT r.rolsuper FROM pg_catalog.pg_roles r WHERE r.rolname = current_user) THEN
        RAISE EXCEPTION 'distribute: only a superuser distributes FlagShip''s tables'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF pg_catalog.to_regclass('pg_catalog.pg_dist_partition') IS NULL THEN
        RAISE EXCEPTION 'distribute: Citus is not installed in this database'
            USING ERRCODE = 'feature_not_supported',
                  HINT = 'CREATE EXTENSION citus on every node, add the workers, then call flagship.distribute() on the coordinator';
    END IF;
    IF (SELECT g.groupid FROM pg_catalog.pg_dist_local_group g) <> 0 THEN
        RAISE EXCEPTION 'distribute: this is a Citus worker; call it on the coordinator'
            USING ERRCODE = 'feature_not_supported';
    END IF;
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_dist_partition d
                WHERE d.logicalrelid = 'flagship.organizations'::regclass) THEN
        -- Already distributed: after ALTER EXTENSION ... UPDATE the
        -- functions are new and need the nested reads allowed again.
        PERFORM flagship.on_every_node('SELECT flagship.allow_nested_reads()', 'allowing nested reads');
        RETURN jsonb_build_object('already_distributed', true);
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_dist_node n WHERE n.groupid <> 0 AND n.isactive) THEN
        RAISE EXCEPTION 'distribute: the coordinator has no worker'
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'add the workers first: SELECT citus_add_node(host, port)';
    END IF;

    -- The triggers as they are now (the coordinator's copy), but the one
    -- that keeps organizations off the workers while FlagShip's tables are
    -- the coordinator's alone.
    SELECT array_agg(pg_catalog.pg_get_triggerdef(tg.oid) ORDER BY c.relname, tg.tgname),
           array_agg(tg.tgname::text),
           array_agg(format('ALTER TABLE flagship.%I ENABLE ALWAYS TRIGGER %I', c.relname, tg.tgname))
               FILTER (WHERE tg.tgenabled = 'A')
      INTO definitions, names, always
      FROM pg_catalog.pg_trigger tg JOIN pg_catalog.pg_class c ON c.oid = tg.tgrelid
     WHERE c.relnamespace = 'flagship'::regnamespace AND NOT tg.tgisinternal;
    PERFORM flagship.on_every_node('SELECT flagship.allow_nested_reads()', 'allowing nested reads');
    PERFORM flagship.on_every_node(format('SELECT flagship.prepare_for_distribution(%L)', names), 'preparing');

    PERFORM pg_catalog.create_reference_table('flagship.permissions');
    PERFORM pg_catalog.create_reference_table('flagship.builtin_role_permissions');
    ALTER TABLE flagship.builtin_role_permissions ADD CONSTRAINT builtin_role_permissions_permission_fkey
        FOREIGN KEY (permission) REFERENCES flagship.permissions (key);
    PERFORM set_config('citus.enable_unsafe_triggers', 'on', true);
    PERFORM pg_catalog.create_distributed_table('flagship.organizations', 'id');
    SELECT array_agg(c.relname::text ORDER BY c.relname) INTO pending
      FROM pg_catalog.pg_class c
     WHERE c.relnamespace = 'flagship'::regnamespace AND c.relkind = 'r'
       AND EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a
                    WHERE a.attrelid = c.oid AND a.attname = 'organization_id' AND NOT a.attisdropped);
    -- A table whose foreign keys name tables not yet distributed waits for
    -- the next round.
    WHILE progress AND cardinality(pending) > 0 LOOP
        progress := false;
        failed := '{}';
        FOREACH t IN ARRAY pending LOOP
            BEGIN
                PERFORM pg_catalog.create_distributed_table('flagship.' || t, 'organization_id',
                                                            colocate_with => 'flagship.organizations');
                progress := true;
            EXCEPTION WHEN OTHERS THEN
                failed := failed || t;
            END;
        END LOOP;
        pending := failed;
    END LOOP;
    IF cardinality(pending) > 0 THEN
        -- Once more, to raise the first table's own error.
        PERFORM pg_catalog.create_distributed_table('flagship.' || pending[1], 'organization_id',
                                                    colocate_with => 'flagship.organizations');
    END IF;
    FOREACH definition IN ARRAY definitions LOOP
        CONTINUE WHEN definition LIKE '% organizations_only_on_the_coordinator %';
        IF definition LIKE '% OR TRUNCATE ON %' THEN
            -- Citus puts no trigger on the shards that has TRUNCATE among
            -- its events (13.2: "we don't have truncate triggers on shard
            -- relations"), so its other events would fire nowhere (the
            -- cache signals did not): TRUNCATE gets a trigger of its own.
            EXECUTE replace(definition, ' OR TRUNCATE ON ', ' ON ');
            EXECUTE regexp_replace(definition, '^CREATE TRIGGER (\S+) (AFTER|BEFORE) [A-Z ]+ ON ',
                                   'CREATE TRIGGER \1_truncate \2 TRUNCATE ON ');
        ELSE
            EXECUTE definition;
        END IF;
    END LOOP;
    -- Row-level security as Citus's own writes into a local shard skip it:
    -- each table's write checks, as PostgreSQL combines its policies.
    FOR t, guarded_column, usage_only, insert_check, update_check IN
        SELECT c.relname::text, CASE c.relname WHEN 'organizations' THEN 'id' ELSE 'organization_id' END,
               EXISTS (SELECT 1 FROM pg_catalog.pg_policies pol
                        WHERE pol.schemaname = 'flagship' AND pol.tablename = c.relname
                          AND pol.cmd IN ('INSERT', 'UPDATE', 'ALL')
                          AND coalesce(pol.with_check, pol.qual) LIKE '%usage_writes_open()%'),
               coalesce(flagship.policy_expression(c.relname::text, 'INSERT', true), 'false'),
               coalesce(flagship.policy_expression(c.relname::text, 'UPDATE', true), 'false')
          FROM pg_catalog.pg_dist_partition d
          JOIN pg_catalog.pg_class c ON c.oid = d.logicalrelid
         WHERE c.relnamespace = 'flagship'::regnamespace AND d.partmethod = 'h'
    LOOP
        EXECUTE format('CREATE TRIGGER %I BEFORE INSERT OR UPDATE ON flagship.%I
                            FOR EACH ROW EXECUTE FUNCTION flagship.guard_tenant_row(%L, %L, %L, %L)',
                       t || '_tenant_guard', t, guarded_column, usage_only, insert_check, update_check);
    END LOOP;
    -- The guard reads tables inside shard queries too (a policy's
    -- actor_may reads members).
    PERFORM flagship.on_every_node('SELECT flagship.allow_nested_reads()', 'allowing nested reads');
    -- The guards that fire under session_replication_role = replica too.
    FOREACH definition IN ARRAY coalesce(always, '{}') LOOP
        EXECUTE definition;
    END LOOP;

    -- Citus gives an extension's sequences no per-node ranges: each worker
    -- draws ledger and trail ids from its own block of 2^48.
    PERFORM flagship.on_every_node(
        'SELECT count(pg_catalog.setval(s, greatest(pg_catalog.nextval(s),
                 (SELECT g.groupid FROM pg_catalog.pg_dist_local_group g)::bigint << 48)))
           FROM unnest(ARRAY[''flagship.usage_ledger_id_seq'', ''flagship.audit_events_id_seq'']::regclass[]) s',
        'setting id ranges');
    RETURN jsonb_build_object(
        'distributed', (SELECT count(*) FROM pg_catalog.pg_dist_partition d
                         JOIN pg_catalog.pg_class c ON c.oid = d.logicalrelid
                        WHERE c.relnamespace = 'flagship'::regnamespace AND d.partmethod = 'h'),
        'reference', (SELECT count(*) FROM pg_catalog.pg_dist_partition d
                       JOIN pg_catalog.pg_class c ON c.oid = d.logicalrelid
                      WHERE c.relnamespace = 'flagship'::regnamespace AND d.partmethod = 'n'),
        'workers', (SELECT count(*) FROM pg_catalog.pg_dist_node n WHERE n.groupid <> 0 AND n.isactive));
END
$fn$;
REVOKE ALL ON FUNCTION flagship.distribute() FROM PUBLIC;

-- Where an organization's rows are (the session's when NULL): the node to
-- call FlagShip on once its tables are distributed; no row before.
CREATE FUNCTION flagship.organization_node(organization_id uuid DEFAULT NULL)
RETURNS TABLE (host text, port integer)
LANGUAGE plpgsql
STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    org constant uuid := coalesce(organization_node.organization_id, flagship.current_organization_id());
BEGIN
    -- Two tests: the second names a catalog only Citus has, and PL/pgSQL
    -- plans an expression whole, when first reached.
    IF org IS NULL OR pg_catalog.to_regclass('pg_catalog.pg_dist_partition') IS NULL THEN
        RETURN;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_dist_partition d
                    WHERE d.logicalrelid = 'flagship.organizations'::regclass) THEN
        RETURN;
    END IF;
    RETURN QUERY EXECUTE
        'SELECT n.nodename::text, n.nodeport::integer
           FROM pg_catalog.pg_dist_placement pl
           JOIN pg_catalog.pg_dist_node n ON n.groupid = pl.groupid
          WHERE pl.shardid = pg_catalog.get_shard_id_for_distribution_column(''flagship.organizations'', $1)'
        USING org;
END
$fn$;
