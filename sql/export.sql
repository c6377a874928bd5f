-- A project as one document, and back: flags, segments, metrics, plans and
-- customers. export_project then import_project into an empty organization
-- reproduces the same evaluations and limits (usage itself is not exported:
-- it is data, kept by pg_dump, not configuration).

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
