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
CREATE FUNCTION flagship.document_changes(old jsonb, new jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT coalesce(jsonb_object_agg(coalesce(o.field, n.field),
                                     jsonb_build_object('old', o.value, 'new', n.value)), '{}')
      FROM flagship.document_fields(old) o FULL JOIN flagship.document_fields(new) n ON n.field = o.field
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
