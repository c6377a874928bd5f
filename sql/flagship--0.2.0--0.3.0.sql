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
    PRIMARY KEY (organization_id, scope)
);
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
           entitlements = v.entitlements + EXCLUDED.entitlements;
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
           SET configuration = configuration + 1, entitlements = entitlements + 1;
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

