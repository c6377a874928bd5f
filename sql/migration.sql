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
