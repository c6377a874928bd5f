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
LANGUAGE sql
STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT a.chain_seq, a.id, a.occurred_at, a.change_kind, a.change_key, a.environment_id, a.action
      FROM flagship.audit_events a
     WHERE a.organization_id = flagship.current_organization_id()
       AND a.chain_seq > coalesce(changes_since.after, 0)
     ORDER BY a.chain_seq
     LIMIT 10000
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
        SELECT * INTO environment_row FROM flagship.environments e
         WHERE e.id = flagship.resolve_environment(environment);
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

-- The cache loader reads a flag's environment through environment_config
-- again, now inlined by the planner (#14, cold loads).
CREATE OR REPLACE FUNCTION flagship.environment_config(config flagship.feature_rules) RETURNS jsonb
LANGUAGE sql STABLE PARALLEL SAFE
AS $fn$
    SELECT pg_catalog.jsonb_build_object('enabled', config.enabled, 'targets', config.targets,
                                         'rules', config.rules, 'default', config.default_serve)
$fn$;
