-- Flags, their per-environment configuration, and segments.
--
-- Both put_flag and plain INSERT/UPDATE go through the same Rust validators
-- (flagship.validate_flag, validate_flag_config, validate_segment), called
-- from BEFORE triggers, so no path can store a document the engine refuses.

CREATE TABLE flagship.features (
    organization_id uuid        NOT NULL,
    project_id      uuid        NOT NULL,
    id              uuid        NOT NULL DEFAULT gen_random_uuid(),
    key             text        NOT NULL,
    kind            text        NOT NULL DEFAULT 'boolean',
    name            text,
    description     text,
    variants        jsonb       NOT NULL DEFAULT '{"on": true, "off": false}',
    off_variant     text        NOT NULL DEFAULT 'off',
    prerequisites   jsonb       NOT NULL DEFAULT '[]',
    salt            text,
    archived        boolean     NOT NULL DEFAULT false,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    -- The bucketing profile of rollouts and samples that name none (NULL:
    -- xxh3). Last because 0.2.0 added it: upgrades append it here too.
    bucketing       text,
    PRIMARY KEY (organization_id, id),
    CONSTRAINT features_key_unique UNIQUE (organization_id, project_id, key),
    CONSTRAINT features_project_unique UNIQUE (organization_id, project_id, id),
    FOREIGN KEY (organization_id, project_id)
        REFERENCES flagship.projects (organization_id, id) ON DELETE CASCADE
);

CREATE TABLE flagship.feature_rules (
    organization_id uuid        NOT NULL,
    project_id      uuid        NOT NULL,
    feature_id      uuid        NOT NULL,
    environment_id  uuid        NOT NULL,
    enabled         boolean     NOT NULL DEFAULT false,
    targets         jsonb       NOT NULL DEFAULT '{}',
    rules           jsonb       NOT NULL DEFAULT '[]',
    default_serve   jsonb,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (organization_id, feature_id, environment_id),
    FOREIGN KEY (organization_id, project_id, feature_id)
        REFERENCES flagship.features (organization_id, project_id, id) ON DELETE CASCADE,
    FOREIGN KEY (organization_id, project_id, environment_id)
        REFERENCES flagship.environments (organization_id, project_id, id) ON DELETE CASCADE
);
CREATE INDEX feature_rules_environment_idx ON flagship.feature_rules (organization_id, environment_id);

CREATE TABLE flagship.segments (
    organization_id uuid        NOT NULL,
    project_id      uuid        NOT NULL,
    id              uuid        NOT NULL DEFAULT gen_random_uuid(),
    key             text        NOT NULL,
    name            text,
    description     text,
    included        jsonb       NOT NULL DEFAULT '[]',
    excluded        jsonb       NOT NULL DEFAULT '[]',
    conditions      jsonb       NOT NULL DEFAULT '[]',
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (organization_id, id),
    CONSTRAINT segments_key_unique UNIQUE (organization_id, project_id, key),
    FOREIGN KEY (organization_id, project_id)
        REFERENCES flagship.projects (organization_id, id) ON DELETE CASCADE
);

SELECT pg_catalog.pg_extension_config_dump('flagship.features', '');
SELECT pg_catalog.pg_extension_config_dump('flagship.feature_rules', '');
SELECT pg_catalog.pg_extension_config_dump('flagship.segments', '');

SELECT flagship.isolate_tenant_table(t, 'features:write')
  FROM unnest(ARRAY['features', 'feature_rules', 'segments']) AS t;

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

GRANT SELECT ON flagship.features, flagship.feature_rules, flagship.segments
    TO flagship_admin, flagship_app, flagship_auditor;
GRANT INSERT, UPDATE, DELETE ON flagship.features, flagship.feature_rules, flagship.segments
    TO flagship_admin;

-- Validation on every write path ------------------------------------------

CREATE FUNCTION flagship.features_validate() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    target record;
    cycle text[];
BEGIN
    -- Fill the defaults the document format implies (variants, off variant).
    SELECT * INTO target FROM jsonb_populate_record(NEW, flagship.validate_flag(
        to_jsonb(NEW) - '{organization_id,project_id,id,created_at,updated_at}'::text[]));
    NEW.variants := target.variants;
    NEW.off_variant := target.off_variant;
    NEW.prerequisites := target.prerequisites;
    NEW.updated_at := now();

    -- Refuse a prerequisite chain that leads back to this flag.
    WITH RECURSIVE chain (key, path) AS (
        SELECT p->>'flag', ARRAY[NEW.key, p->>'flag']
          FROM jsonb_array_elements(NEW.prerequisites) p
        UNION ALL
        SELECT p->>'flag', chain.path || (p->>'flag')
          FROM chain
          JOIN flagship.features f
            ON f.organization_id = NEW.organization_id AND f.project_id = NEW.project_id
           AND f.key = chain.key AND f.id IS DISTINCT FROM NEW.id
         CROSS JOIN LATERAL jsonb_array_elements(f.prerequisites) p
         WHERE chain.key <> NEW.key AND cardinality(chain.path) < 64
    )
    SELECT path INTO cycle FROM chain WHERE key = NEW.key LIMIT 1;
    IF cycle IS NOT NULL THEN
        RAISE EXCEPTION 'flag "%": prerequisites: cycle %', NEW.key, array_to_string(cycle, ' -> ')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN NEW;
END
$fn$;

CREATE TRIGGER features_validate BEFORE INSERT OR UPDATE ON flagship.features
    FOR EACH ROW EXECUTE FUNCTION flagship.features_validate();

-- Changing a flag's variants must not strand a configuration that serves a
-- variant the flag no longer has.
CREATE FUNCTION flagship.features_revalidate_rules() RETURNS trigger
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

CREATE TRIGGER features_revalidate_rules AFTER UPDATE OF variants, bucketing ON flagship.features
    FOR EACH ROW EXECUTE FUNCTION flagship.features_revalidate_rules();

CREATE FUNCTION flagship.feature_rules_validate() RETURNS trigger
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

CREATE TRIGGER feature_rules_validate BEFORE INSERT OR UPDATE ON flagship.feature_rules
    FOR EACH ROW EXECUTE FUNCTION flagship.feature_rules_validate();

CREATE FUNCTION flagship.segments_validate() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    PERFORM flagship.validate_segment(
        to_jsonb(NEW) - '{organization_id,project_id,id,created_at,updated_at}'::text[]);
    NEW.updated_at := now();
    RETURN NEW;
END
$fn$;

CREATE TRIGGER segments_validate BEFORE INSERT OR UPDATE ON flagship.segments
    FOR EACH ROW EXECUTE FUNCTION flagship.segments_validate();

-- A segment that rules still use cannot disappear from under them.
CREATE FUNCTION flagship.segments_guard_delete() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    user_flag text;
BEGIN
    SELECT f.key INTO user_flag
      FROM flagship.feature_rules r
      JOIN flagship.features f ON f.organization_id = r.organization_id AND f.id = r.feature_id
     CROSS JOIN LATERAL jsonb_array_elements(r.rules) rule
     WHERE r.organization_id = OLD.organization_id AND r.project_id = OLD.project_id
       AND rule->>'segment' = OLD.key
     LIMIT 1;
    IF user_flag IS NOT NULL THEN
        RAISE EXCEPTION 'segment "%" is used by flag "%"', OLD.key, user_flag
            USING ERRCODE = 'foreign_key_violation';
    END IF;
    RETURN OLD;
END
$fn$;

CREATE TRIGGER segments_guard_delete BEFORE DELETE ON flagship.segments
    FOR EACH ROW EXECUTE FUNCTION flagship.segments_guard_delete();

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

-- Cache invalidation, in two parts (README, "How the cache stays exact").
-- (1) Every changed row bumps, in the same transaction, the version of the
-- scope it belongs to: its organization, project or environment for flags,
-- its organization for entitlements. A backend's compiled copy of an
-- environment is valid for a snapshot exactly when the versions that
-- snapshot sees are the ones it was built from, so one organization's
-- changes never discard another's compiled flags.
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

-- (2) A statement trigger sends a relcache invalidation of the relation the
-- caches watch (flagship.configuration_signal for flags,
-- flagship.entitlement_signal for entitlements; the trigger names
-- flagship.features or flagship.customers for the kind): PostgreSQL
-- delivers it to this backend at its next command and to the others at
-- commit, and it tells them to compare versions at their next use (it
-- discards nothing). The signal relations are sequences no statement or
-- policy reads, so a signal makes no backend rebuild a relation's cache
-- entry or replan a statement (signalling flagship.features itself did:
-- half of a put_flag's CPU). TRUNCATE fires no row trigger, so it bumps
-- every version. SECURITY DEFINER because invalidate_cache is not
-- executable by the FlagShip roles.
CREATE SEQUENCE flagship.configuration_signal;
CREATE SEQUENCE flagship.entitlement_signal;
REVOKE ALL ON SEQUENCE flagship.configuration_signal, flagship.entitlement_signal FROM PUBLIC;

CREATE FUNCTION flagship.configuration_changed() RETURNS trigger
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

-- Puts a table under one of those caches.
CREATE FUNCTION flagship.invalidate_on_change(table_name text, watched regclass) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    EXECUTE format(
        'CREATE TRIGGER %I AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON flagship.%I
             FOR EACH STATEMENT EXECUTE FUNCTION flagship.configuration_changed(%L)',
        table_name || '_invalidate_cache', table_name, watched::text);
END
$fn$;
REVOKE ALL ON FUNCTION flagship.invalidate_on_change(text, regclass) FROM PUBLIC;

SELECT flagship.invalidate_on_change(t, 'flagship.features')
  FROM unnest(ARRAY['organizations', 'projects', 'environments', 'features',
                    'feature_rules', 'segments']) AS t;

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

-- Documents -----------------------------------------------------------------

-- Drops the keys whose value is JSON null, at the top level only.
CREATE FUNCTION flagship.jsonb_without_nulls(document jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT coalesce(jsonb_object_agg(key, value), '{}')
      FROM jsonb_each(document) WHERE jsonb_typeof(value) <> 'null'
$fn$;

CREATE FUNCTION flagship.flag_document(feature flagship.features) RETURNS jsonb
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

CREATE FUNCTION flagship.segment_document(segment flagship.segments) RETURNS jsonb
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT flagship.jsonb_without_nulls(
               to_jsonb(segment) - '{organization_id,project_id,id,created_at,updated_at}'::text[])
$fn$;

CREATE FUNCTION flagship.put_segment(project text, definition jsonb)
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

CREATE FUNCTION flagship.put_flag(project text, definition jsonb)
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

-- Everything evaluation needs for one environment, in one document.
CREATE FUNCTION flagship.environment_snapshot(environment_id uuid) RETURNS jsonb
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

