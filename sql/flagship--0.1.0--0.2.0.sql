-- FlagShip 0.1.0 -> 0.2.0: the audit trail and change feed; importing from
-- Unleash and GrowthBook (bucketing profiles per flag, rollout and sample,
-- samples, condition groups and the operators they need); exposure counts
-- and the sampled evaluation log.
--
-- Upgrade scripts are frozen history: this one repeats what sql/audit.sql,
-- sql/exposures.sql, sql/migration.sql and the functions it replaces held
-- at 0.2.0, so that later edits there cannot change what an upgrade from
-- 0.1.0 does. tests/integration/upgrade.rs checks that the result matches
-- a fresh 0.2.0 install object by object.
--
-- Organizations that existed before the upgrade start their chain with
-- their first change after it.

\echo Use "ALTER EXTENSION flagship UPDATE TO '0.2.0'" to load this file. \quit

-- Functions in Rust new in 0.2.0.
CREATE  FUNCTION "unleash_flag_documents"(
	"state" jsonb, /* JsonB */
	"environment" TEXT /* & str */
) RETURNS jsonb /* JsonB */
IMMUTABLE STRICT PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'unleash_flag_documents_wrapper';

CREATE  FUNCTION "import_growthbook_condition"(
	"condition" jsonb, /* JsonB */
	"saved_groups" jsonb DEFAULT '{}' /* JsonB */
) RETURNS jsonb /* JsonB */
IMMUTABLE STRICT PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'import_growthbook_condition_wrapper';

CREATE  FUNCTION "pending_exposures"() RETURNS TABLE (
	"environment_id" uuid,  /* pgrx :: Uuid */
	"flag_key" TEXT,  /* String */
	"variant" TEXT,  /* String */
	"evaluations" bigint  /* i64 */
)
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'pending_exposures_wrapper';

CREATE  FUNCTION "flush_exposures"() RETURNS bigint /* i64 */
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'flush_exposures_wrapper';

-- A flag may name the bucketing profile of its rollouts and samples, so
-- environment configurations are validated against it.
ALTER TABLE flagship.features ADD COLUMN bucketing text;
CREATE  FUNCTION "validate_flag_config"(
	"flag_key" TEXT, /* & str */
	"variants" jsonb, /* JsonB */
	"bucketing" TEXT, /* Option < & str > */
	"environment_key" TEXT, /* & str */
	"config" jsonb /* JsonB */
) RETURNS bool /* bool */
IMMUTABLE PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'validate_flag_config_wrapper';

CREATE OR REPLACE FUNCTION flagship.features_revalidate_rules() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    config record;
BEGIN
    FOR config IN
        SELECT flagship.environment_config(r) AS document, e.key AS environment_key
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
        flagship.environment_config(NEW));
    NEW.updated_at := now();
    RETURN NEW;
END
$fn$;

DROP TRIGGER features_revalidate_rules ON flagship.features;
CREATE TRIGGER features_revalidate_rules AFTER UPDATE OF variants, bucketing ON flagship.features
    FOR EACH ROW EXECUTE FUNCTION flagship.features_revalidate_rules();

-- The ledger's kind is checked by a restrictive policy instead of a CHECK
-- constraint, whose expression PostgreSQL parses again for every INSERT.
ALTER TABLE flagship.usage_ledger DROP CONSTRAINT usage_ledger_kind_valid;
CREATE POLICY usage_ledger_kind_valid ON flagship.usage_ledger AS RESTRICTIVE
    FOR INSERT WITH CHECK (kind IN ('record', 'set'));

-- resolve_project never casts a project key to uuid inside its query.
CREATE OR REPLACE FUNCTION flagship.resolve_project(project text)
RETURNS uuid
LANGUAGE plpgsql
STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    found uuid[];
    org uuid := flagship.current_organization_id();
    project_id uuid;
BEGIN
    IF project IS NULL OR project = '' THEN
        RAISE EXCEPTION 'project must be given' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- Cast before the query: SQL does not promise to test the pattern
    -- first (a BitmapOr plan evaluates the cast as an index key), and a key
    -- like 'shop' must never reach ::uuid.
    IF project ~* '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$' THEN
        project_id := project::uuid;
    END IF;
    SELECT array_agg(p.id) INTO found
      FROM flagship.projects p
     WHERE (org IS NULL OR p.organization_id = org)
       AND (p.key = project OR p.id = project_id);
    IF found IS NULL THEN
        RAISE EXCEPTION 'project "%" not found', project USING ERRCODE = 'invalid_parameter_value';
    ELSIF cardinality(found) > 1 THEN
        RAISE EXCEPTION 'project "%" is ambiguous: % organizations have it', project, cardinality(found)
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'set flagship.organization_id or pass the project uuid';
    END IF;
    RETURN found[1];
END
$fn$;

-- put_flag stores the bucketing profile and accepts prerequisites met by
-- any of several variants.
CREATE OR REPLACE FUNCTION flagship.put_flag(project text, definition jsonb)
RETURNS uuid
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    project_row flagship.projects;
    normalized jsonb;
    prerequisite jsonb;
    prerequisite_variants jsonb;
    missing_variant text;
    segment_key text;
    saved_feature uuid;
    environment_key text;
    config jsonb;
    saved_environment uuid;
BEGIN
    SELECT * INTO project_row FROM flagship.projects p WHERE p.id = flagship.resolve_project(project);
    -- Validate the whole document first, so errors name paths in it.
    normalized := flagship.validate_flag(definition);
    -- References to other rows are checked here rather than in the table
    -- triggers, so that pg_restore may load tables in any order.
    FOR prerequisite IN SELECT * FROM jsonb_array_elements(normalized->'prerequisites') LOOP
        SELECT f.variants INTO prerequisite_variants
          FROM flagship.features f
         WHERE f.organization_id = project_row.organization_id AND f.project_id = project_row.id
           AND f.key = prerequisite->>'flag';
        IF NOT FOUND THEN
            RAISE EXCEPTION 'flag "%": prerequisites: unknown flag "%"', normalized->>'key', prerequisite->>'flag'
                USING ERRCODE = 'invalid_parameter_value',
                      HINT = 'create the prerequisite flag first';
        END IF;
        SELECT wanted INTO missing_variant
          FROM jsonb_array_elements_text(coalesce(prerequisite->'variants',
                                                  jsonb_build_array(prerequisite->'variant'))) wanted
         WHERE NOT prerequisite_variants ? wanted
         LIMIT 1;
        IF FOUND THEN
            RAISE EXCEPTION 'flag "%": prerequisites: flag "%" has no variant "%"',
                normalized->>'key', prerequisite->>'flag', missing_variant
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
    END LOOP;
    FOR environment_key, segment_key IN
        SELECT env.key, rule->>'segment'
          FROM jsonb_each(coalesce(definition->'environments', '{}')) env
         CROSS JOIN LATERAL jsonb_array_elements(coalesce(env.value->'rules', '[]')) rule
         WHERE rule ? 'segment'
    LOOP
        IF NOT EXISTS (SELECT FROM flagship.segments s
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

-- Exposure counts: how often each variant of each flag was served, per
-- environment and UTC day. Evaluation never writes them: backends count in
-- memory while flagship.count_exposures is on, and flagship.flush_exposures()
-- adds a backend's counts here in one statement (call it when a pooled
-- connection is returned, or from a periodic job). Like the usage ledger,
-- this is observation, not configuration: it has no audit trigger.
CREATE TABLE flagship.flag_exposures (
    organization_id uuid   NOT NULL,
    environment_id  uuid   NOT NULL,
    flag_key        text   NOT NULL,
    variant         text   NOT NULL,
    day             date   NOT NULL,
    evaluations     bigint NOT NULL CHECK (evaluations >= 0),
    PRIMARY KEY (organization_id, environment_id, flag_key, variant, day),
    FOREIGN KEY (organization_id, environment_id)
        REFERENCES flagship.environments (organization_id, id) ON DELETE CASCADE
);
SELECT pg_catalog.pg_extension_config_dump('flagship.flag_exposures', '');
SELECT flagship.isolate_tenant_table('flag_exposures');
GRANT SELECT ON flagship.flag_exposures TO flagship_admin, flagship_app, flagship_auditor;
-- Flushing is what applications do.
GRANT INSERT, UPDATE ON flagship.flag_exposures TO flagship_app, flagship_admin;

-- Importers from other flag systems. The translation is Rust
-- (unleash_flag_documents); storing goes through put_flag, so an import is
-- validated, policed and audited like any other write, and all of it is one
-- transaction: a refused feature leaves nothing behind.

-- Imports an Unleash client state (GET /api/client/features, or the delta
-- API's {"events": [...]}) into one environment of a project (by default
-- its default environment). Flags that already exist keep their other
-- environments' configuration. Returns how many flags were written.
CREATE FUNCTION flagship.import_unleash(project text, state jsonb, environment text DEFAULT NULL)
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
    SELECT * INTO project_row FROM flagship.projects p WHERE p.id = flagship.resolve_project(project);
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

-- Audit trail and change feed.
--
-- Every configuration table gets one AFTER ROW trigger that, in the same
-- transaction as the change, appends an audit_events row (who, what, the
-- changed fields with old and new values) and sends NOTIFY flagship_changes
-- (delivered only if the transaction commits). Usage counters and the
-- usage ledger are not audited: the ledger is their history.
--
-- Tamper evidence: each organization's events form a hash chain. An event's
-- hash is sha256 over its content and the previous event's hash; the chain
-- head (last position and hash) lives in audit_chain_heads, one row per
-- organization. Appending updates that row, so writers of one organization
-- serialise on its row lock until commit and each sees the previous
-- writer's head: under READ COMMITTED the UPDATE re-reads the committed
-- head, under REPEATABLE READ or SERIALIZABLE it fails with 40001 and the
-- application retries, so the chain never forks. Configuration writes are
-- rare; the lock is never taken by evaluation or usage calls.

CREATE SEQUENCE flagship.audit_events_id_seq;
CREATE TABLE flagship.audit_events (
    organization_id uuid        NOT NULL,
    id              bigint      NOT NULL DEFAULT nextval('flagship.audit_events_id_seq'),
    -- Position in the organization's chain: 1, 2, 3, ... with no gaps.
    chain_seq       bigint      NOT NULL,
    occurred_at     timestamptz NOT NULL DEFAULT now(),
    actor           text        NOT NULL,
    action          text        NOT NULL,
    resource_type   text        NOT NULL,
    resource_id     text        NOT NULL,
    diff            jsonb       NOT NULL,
    transaction_id  bigint      NOT NULL,
    hash            bytea       NOT NULL,
    -- `id` comes from a sequence and needs no index of its own: each
    -- index costs every configuration write.
    PRIMARY KEY (organization_id, chain_seq),
    CONSTRAINT audit_events_action_valid CHECK (action IN ('insert', 'update', 'delete'))
);
ALTER SEQUENCE flagship.audit_events_id_seq OWNED BY flagship.audit_events.id;
-- "What happened to this flag": history of one resource.
CREATE INDEX audit_events_resource_idx
    ON flagship.audit_events (organization_id, resource_type, resource_id);

-- No foreign key to organizations: the trail outlives what it describes.
CREATE TABLE flagship.audit_chain_heads (
    organization_id uuid   NOT NULL PRIMARY KEY,
    last_seq        bigint NOT NULL DEFAULT 0,
    last_hash       bytea  NOT NULL DEFAULT '\x'
);

DO $dump$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['audit_events', 'audit_events_id_seq', 'audit_chain_heads'] LOOP
        PERFORM pg_catalog.pg_extension_config_dump(('flagship.' || t)::regclass, '');
    END LOOP;
END
$dump$;

-- Reading the trail needs the audit:read permission in the organization.
DO $policies$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['audit_events', 'audit_chain_heads'] LOOP
        EXECUTE format('ALTER TABLE flagship.%I ENABLE ROW LEVEL SECURITY', t);
        EXECUTE format('ALTER TABLE flagship.%I FORCE ROW LEVEL SECURITY', t);
        EXECUTE format(
            'CREATE POLICY %I ON flagship.%I FOR SELECT
                 USING (organization_id = (SELECT flagship.current_organization_id())
                        AND (SELECT flagship.actor_may(''audit:read'')))',
            t || '_read', t);
    END LOOP;
END
$policies$;
-- Only the audit trigger (SECURITY DEFINER) writes; no role may.
GRANT SELECT ON flagship.audit_events, flagship.audit_chain_heads
    TO flagship_admin, flagship_auditor;

-- The hash of one event: its content and the previous hash, serialised as
-- a jsonb array (canonical text, unambiguous separators), times as epoch
-- seconds so that neither DateStyle nor TimeZone changes the digest.
CREATE FUNCTION flagship.audit_digest(
    previous_hash bytea, chain_seq bigint, id bigint, organization_id uuid,
    occurred_at timestamptz, actor text, action text, resource_type text,
    resource_id text, diff jsonb, transaction_id bigint)
RETURNS bytea
LANGUAGE sql
STABLE PARALLEL SAFE
-- No SET clause, so the planner inlines it into the trigger's cached plan
-- (a SET would make every transaction plan it again); it calls only
-- pg_catalog functions, which no search_path can shadow.
AS $fn$
    SELECT sha256(convert_to(jsonb_build_array(
        encode(previous_hash, 'hex'), chain_seq, id, organization_id,
        extract(epoch FROM occurred_at), actor, action, resource_type,
        resource_id, diff, transaction_id)::text, 'UTF8'))
$fn$;

-- Nobody edits the trail. A superuser who must (a court order, a broken
-- restore) says so first with SET flagship.audit_maintenance = on; the
-- chain then shows where history was rewritten.
CREATE FUNCTION flagship.audit_events_append_only() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    IF current_setting('flagship.audit_maintenance', true) = 'on'
       AND (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN
        RETURN CASE TG_OP WHEN 'DELETE' THEN OLD ELSE NEW END;
    END IF;
    RAISE EXCEPTION 'audit_events is append-only: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'a superuser may SET flagship.audit_maintenance = on first; verify_audit_chain will show the edit';
END
$fn$;
CREATE TRIGGER audit_events_append_only BEFORE UPDATE OR DELETE ON flagship.audit_events
    FOR EACH ROW EXECUTE FUNCTION flagship.audit_events_append_only();
CREATE TRIGGER audit_events_no_truncate BEFORE TRUNCATE ON flagship.audit_events
    FOR EACH STATEMENT EXECUTE FUNCTION flagship.audit_events_append_only();
CREATE TRIGGER audit_chain_heads_append_only BEFORE DELETE ON flagship.audit_chain_heads
    FOR EACH ROW EXECUTE FUNCTION flagship.audit_events_append_only();
CREATE TRIGGER audit_chain_heads_no_truncate BEFORE TRUNCATE ON flagship.audit_chain_heads
    FOR EACH STATEMENT EXECUTE FUNCTION flagship.audit_events_append_only();

-- The audit and change-feed trigger. Arguments: the change-feed kind, the
-- primary-key columns naming a row (besides organization_id), then the
-- columns left out of the trail: secrets (key hashes) and bookkeeping
-- (updated_at, usage counts). An UPDATE that changes only those is no
-- configuration change and records nothing.
--
-- SECURITY DEFINER so that it can append to tables no role may write;
-- current_actor() names the session's user, not the definer.
CREATE FUNCTION flagship.audit_change() RETURNS trigger
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
    xact := pg_current_xact_id()::text::bigint;
    FOR attempt IN 1..2 LOOP
        WITH link AS (
            UPDATE flagship.audit_chain_heads h
               SET last_seq = h.last_seq + 1,
                   last_hash = flagship.audit_digest(
                       h.last_hash, h.last_seq + 1, event_id, org, now(), acting,
                       lower(TG_OP), TG_TABLE_NAME, resource, changes, xact)
             WHERE h.organization_id = org
            RETURNING h.last_seq, h.last_hash)
        INSERT INTO flagship.audit_events (organization_id, id, chain_seq, occurred_at, actor, action,
                                           resource_type, resource_id, diff, transaction_id, hash)
        SELECT org, event_id, link.last_seq, now(), acting, lower(TG_OP),
               TG_TABLE_NAME, resource, changes, xact, link.last_hash
          FROM link;
        GET DIAGNOSTICS appended = ROW_COUNT;
        EXIT WHEN appended > 0;
        -- The organization's first event starts its chain.
        INSERT INTO flagship.audit_chain_heads (organization_id) VALUES (org)
        ON CONFLICT DO NOTHING;
    END LOOP;

    PERFORM pg_notify('flagship_changes', jsonb_build_object(
        'organization', org, 'environment', environment,
        'kind', TG_ARGV[0], 'key', subject_key)::text);
    RETURN NULL;
END
$fn$;

REVOKE ALL ON FUNCTION flagship.audit_change() FROM PUBLIC;

-- Puts a configuration table under audit. Later tables call this too (and
-- a test checks that every configuration table has the trigger).
CREATE FUNCTION flagship.audit_table(table_name text, kind text, left_out text[] DEFAULT '{}')
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    key_columns text;
BEGIN
    SELECT string_agg(a.attname, ',' ORDER BY k.position) INTO key_columns
      FROM pg_index i
      CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k (attnum, position)
      JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
     WHERE i.indrelid = format('flagship.%I', table_name)::regclass
       AND i.indisprimary AND a.attname <> 'organization_id';
    EXECUTE format(
        'CREATE TRIGGER %I AFTER INSERT OR UPDATE OR DELETE ON flagship.%I
             FOR EACH ROW EXECUTE FUNCTION flagship.audit_change(%L, %L%s)',
        table_name || '_audit', table_name, kind, key_columns,
        (SELECT coalesce(string_agg(format(', %L', c), ''), '')
           FROM unnest(left_out || ARRAY['updated_at']) AS c));
END
$fn$;
REVOKE ALL ON FUNCTION flagship.audit_table(text, text, text[]) FROM PUBLIC;

SELECT flagship.audit_table(t.name, t.kind, t.left_out)
  FROM (VALUES ('organizations', 'organization', '{}'::text[]),
               ('projects', 'project', '{}'),
               ('environments', 'environment', '{}'),
               ('members', 'member', '{}'),
               ('roles', 'role', '{}'),
               ('role_permissions', 'role', '{}'),
               ('member_roles', 'member', '{}'),
               ('features', 'flag', '{}'),
               ('feature_rules', 'flag', '{}'),
               ('segments', 'segment', '{}'),
               ('metrics', 'metric', '{}'),
               ('plans', 'plan', '{}'),
               ('plan_features', 'plan', '{}'),
               ('usage_limits', 'plan', '{}'),
               ('customers', 'customer', '{}'),
               ('subscriptions', 'customer', '{}'),
               ('customer_feature_overrides', 'customer', '{}'),
               ('customer_limit_overrides', 'customer', '{}'),
               -- Verification bumps usage_count and last_used_at: usage, not configuration.
               ('api_keys', 'api_key', '{key_hash,usage_count,last_used_at}')) AS t (name, kind, left_out);

-- Recomputes an organization's chain. `first_broken_id` is the first event
-- whose hash does not follow from its predecessor (edited content, an
-- edited hash, or a missing predecessor); events deleted from the end show
-- as a head that no event reaches (`reason`: "truncated", first_broken_id
-- NULL). Invoker's rights: a session that may not read the trail is told
-- so rather than shown an empty, valid chain.
CREATE FUNCTION flagship.verify_audit_chain(organization_id uuid)
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
BEGIN
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
               e.action, e.resource_type, e.resource_id, e.diff, e.transaction_id)
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
    RETURN jsonb_build_object('valid', true, 'checked', checked, 'first_broken_id', NULL);
END
$fn$;
GRANT EXECUTE ON FUNCTION flagship.verify_audit_chain(uuid) TO flagship_admin, flagship_auditor;
