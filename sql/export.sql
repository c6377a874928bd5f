-- A project as one document, and back: flags, segments, metrics, plans and
-- customers. export_project then import_project into an empty organization
-- reproduces the same evaluations and limits (usage itself is not exported:
-- it is data, kept by pg_dump, not configuration).

-- With `customers => false` the document holds configuration only (what
-- belongs in git; apply_project then leaves customers alone).
CREATE FUNCTION flagship.export_project(project text, customers boolean DEFAULT true) RETURNS jsonb
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT jsonb_build_object(
        'format', 'flagship.project/1',
        'project', jsonb_build_object('key', p.key, 'name', p.name),
        'environments', (SELECT jsonb_agg(jsonb_build_object('key', e.key, 'name', e.name,
                                                              'is_default', e.is_default)
                                          ORDER BY NOT e.is_default, e.created_at, e.key)
                           FROM flagship.environments e
                          WHERE e.organization_id = p.organization_id AND e.project_id = p.id),
        'segments', coalesce((SELECT jsonb_agg(flagship.segment_document(s) ORDER BY s.key)
                                FROM flagship.segments s
                               WHERE s.organization_id = p.organization_id AND s.project_id = p.id), '[]'),
        'flags', coalesce((SELECT jsonb_agg(flagship.flag_document(f) ORDER BY f.key)
                             FROM flagship.features f
                            WHERE f.organization_id = p.organization_id AND f.project_id = p.id), '[]'),
        'metrics', coalesce((SELECT jsonb_agg(flagship.metric_document(m) ORDER BY m.key)
                               FROM flagship.metrics m
                              WHERE m.organization_id = p.organization_id AND m.project_id = p.id), '[]'),
        'plans', coalesce((SELECT jsonb_agg(flagship.plan_document(pl) ORDER BY pl.key)
                             FROM flagship.plans pl
                            WHERE pl.organization_id = p.organization_id AND pl.project_id = p.id), '[]'))
        || CASE WHEN NOT export_project.customers THEN '{}'::jsonb ELSE jsonb_build_object(
        'customers', coalesce((SELECT jsonb_agg(flagship.customer_document(c) || jsonb_build_object('environment', e.key)
                                                ORDER BY e.key, c.external_key)
                                 FROM flagship.customers c
                                 JOIN flagship.environments e
                                   ON e.organization_id = c.organization_id AND e.id = c.environment_id
                                WHERE c.organization_id = p.organization_id AND c.project_id = p.id), '[]')) END
      FROM flagship.projects p
     WHERE p.id = flagship.resolve_project(project)
$fn$;

CREATE FUNCTION flagship.import_project(organization_id uuid, document jsonb) RETURNS uuid
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
    IF EXISTS (SELECT FROM flagship.projects p
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
