-- Tenancy: organizations, projects, environments, members, roles, permissions.
--
-- Every tenant table carries organization_id and every primary key, unique
-- constraint and foreign key between tenant tables includes it, so the schema
-- can be distributed by organization (Citus) and RLS has one column to check.

CREATE TABLE flagship.organizations (
    id          uuid        NOT NULL DEFAULT gen_random_uuid() PRIMARY KEY,
    slug        text        NOT NULL,
    name        text        NOT NULL,
    status      text        NOT NULL DEFAULT 'active',
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT organizations_slug_key UNIQUE (slug),
    CONSTRAINT organizations_slug_format CHECK (slug ~ '^[a-z0-9-]+$' AND length(slug) <= 63),
    CONSTRAINT organizations_name_present CHECK (length(btrim(name)) > 0),
    CONSTRAINT organizations_status_valid CHECK (status IN ('active', 'suspended'))
);

CREATE TABLE flagship.projects (
    organization_id uuid        NOT NULL REFERENCES flagship.organizations (id) ON DELETE CASCADE,
    id              uuid        NOT NULL DEFAULT gen_random_uuid(),
    key             text        NOT NULL,
    name            text        NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (organization_id, id),
    CONSTRAINT projects_key_unique UNIQUE (organization_id, key),
    -- No '/' so that '<project>/<env>' names are unambiguous.
    CONSTRAINT projects_key_format CHECK (key ~ '^[a-z0-9][a-z0-9_.-]*$' AND length(key) <= 63),
    CONSTRAINT projects_name_present CHECK (length(btrim(name)) > 0)
);

CREATE TABLE flagship.environments (
    organization_id uuid        NOT NULL,
    project_id      uuid        NOT NULL,
    id              uuid        NOT NULL DEFAULT gen_random_uuid(),
    key             text        NOT NULL,
    name            text        NOT NULL,
    is_default      boolean     NOT NULL DEFAULT false,
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (organization_id, id),
    CONSTRAINT environments_key_unique UNIQUE (organization_id, project_id, key),
    -- Target of foreign keys that must also pin the project.
    CONSTRAINT environments_project_unique UNIQUE (organization_id, project_id, id),
    FOREIGN KEY (organization_id, project_id)
        REFERENCES flagship.projects (organization_id, id) ON DELETE CASCADE,
    CONSTRAINT environments_key_format CHECK (key ~ '^[a-z0-9][a-z0-9_.-]*$' AND length(key) <= 63),
    CONSTRAINT environments_name_present CHECK (length(btrim(name)) > 0)
);
CREATE UNIQUE INDEX environments_one_default_idx
    ON flagship.environments (organization_id, project_id) WHERE is_default;
-- Environment lookups by uuid alone (an API argument) must not scan.
CREATE INDEX environments_id_idx ON flagship.environments (id);

CREATE TABLE flagship.members (
    organization_id uuid        NOT NULL REFERENCES flagship.organizations (id) ON DELETE CASCADE,
    id              uuid        NOT NULL DEFAULT gen_random_uuid(),
    user_key        text        NOT NULL,
    name            text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (organization_id, id),
    CONSTRAINT members_user_key_unique UNIQUE (organization_id, user_key),
    CONSTRAINT members_user_key_present CHECK (length(btrim(user_key)) > 0)
);

-- Global reference data: the permission vocabulary, read-only to applications.
CREATE TABLE flagship.permissions (
    key         text    NOT NULL PRIMARY KEY,
    description text    NOT NULL,
    builtin     boolean NOT NULL DEFAULT false,
    CONSTRAINT permissions_key_format CHECK (key ~ '^[a-z_]+:[a-z_]+$')
);

CREATE TABLE flagship.roles (
    organization_id uuid        NOT NULL REFERENCES flagship.organizations (id) ON DELETE CASCADE,
    id              uuid        NOT NULL DEFAULT gen_random_uuid(),
    key             text        NOT NULL,
    name            text        NOT NULL,
    builtin         boolean     NOT NULL DEFAULT false,
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (organization_id, id),
    CONSTRAINT roles_key_unique UNIQUE (organization_id, key),
    CONSTRAINT roles_key_format CHECK (key ~ '^[a-z0-9][a-z0-9_-]*$')
);

CREATE TABLE flagship.role_permissions (
    organization_id uuid NOT NULL,
    role_id         uuid NOT NULL,
    permission      text NOT NULL REFERENCES flagship.permissions (key) ON DELETE CASCADE,
    PRIMARY KEY (organization_id, role_id, permission),
    FOREIGN KEY (organization_id, role_id)
        REFERENCES flagship.roles (organization_id, id) ON DELETE CASCADE
);

CREATE TABLE flagship.member_roles (
    organization_id uuid NOT NULL,
    member_id       uuid NOT NULL,
    role_id         uuid NOT NULL,
    PRIMARY KEY (organization_id, member_id, role_id),
    FOREIGN KEY (organization_id, member_id)
        REFERENCES flagship.members (organization_id, id) ON DELETE CASCADE,
    FOREIGN KEY (organization_id, role_id)
        REFERENCES flagship.roles (organization_id, id) ON DELETE CASCADE
);
CREATE INDEX member_roles_role_idx ON flagship.member_roles (organization_id, role_id);

INSERT INTO flagship.permissions (key, description, builtin) VALUES
    ('organization:read',  'Read the organization and its members', true),
    ('organization:write', 'Rename the organization, manage members and roles', true),
    ('projects:read',      'Read projects and environments', true),
    ('projects:write',     'Create and change projects and environments', true),
    ('features:read',      'Read flags and segments', true),
    ('features:write',     'Create and change flags and segments', true),
    ('plans:read',         'Read plans, metrics and customers', true),
    ('plans:write',        'Create and change plans, metrics and customers', true),
    ('usage:read',         'Read usage counters and the ledger', true),
    ('usage:write',        'Record usage', true),
    ('api_keys:read',      'List API keys', true),
    ('api_keys:write',     'Issue and revoke API keys', true),
    ('audit:read',         'Read the audit trail', true);

-- Permissions granted to the roles every organization starts with.
CREATE TABLE flagship.builtin_role_permissions (
    role_key   text NOT NULL,
    permission text NOT NULL REFERENCES flagship.permissions (key) ON DELETE CASCADE,
    PRIMARY KEY (role_key, permission)
);
INSERT INTO flagship.builtin_role_permissions (role_key, permission)
SELECT 'owner', key FROM flagship.permissions
UNION ALL
SELECT 'admin', key FROM flagship.permissions WHERE key <> 'organization:write'
UNION ALL
SELECT 'developer', key FROM flagship.permissions
 WHERE key IN ('projects:read', 'features:read', 'features:write', 'plans:read',
               'usage:read', 'usage:write', 'api_keys:read')
UNION ALL
SELECT 'viewer', key FROM flagship.permissions WHERE key LIKE '%:read' AND key <> 'audit:read';

-- Rows created after installation are user data that pg_dump must keep; the
-- built-in vocabulary is recreated by CREATE EXTENSION on restore.
SELECT pg_catalog.pg_extension_config_dump('flagship.organizations', '');
SELECT pg_catalog.pg_extension_config_dump('flagship.projects', '');
SELECT pg_catalog.pg_extension_config_dump('flagship.environments', '');
SELECT pg_catalog.pg_extension_config_dump('flagship.members', '');
SELECT pg_catalog.pg_extension_config_dump('flagship.roles', '');
SELECT pg_catalog.pg_extension_config_dump('flagship.role_permissions', '');
SELECT pg_catalog.pg_extension_config_dump('flagship.member_roles', '');
SELECT pg_catalog.pg_extension_config_dump('flagship.permissions', 'WHERE NOT builtin');

-- Row-level security: a session sees only the organization named by its
-- context (flagship.current_organization_id()); no context, no rows. The
-- sub-select makes the planner evaluate the context once per query.
ALTER TABLE flagship.organizations ENABLE ROW LEVEL SECURITY;
ALTER TABLE flagship.organizations FORCE ROW LEVEL SECURITY;
CREATE POLICY organizations_tenant ON flagship.organizations
    USING (id = (SELECT flagship.current_organization_id()))
    WITH CHECK (id = (SELECT flagship.current_organization_id()));

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

-- Whether a member holds a permission through any of its roles in the
-- organization (the session's when NULL). Invoker's rights: row-level
-- security answers false for any organization but the session's.
CREATE FUNCTION flagship.has_permission(user_key text, permission text, organization_id uuid DEFAULT NULL)
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

-- Whether the session's actor may use a permission in the session's
-- organization. In key mode (flagship.authenticate) the actor is the key:
-- its scopes decide, whatever flagship.actor or the JWT claim. Otherwise
-- the actor (flagship.actor, the JWT `sub`, else the database user) must
-- hold it through a member role.
CREATE FUNCTION flagship.actor_may(permission text) RETURNS boolean
LANGUAGE sql
STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT coalesce(flagship.key_grants(permission),
                    flagship.has_permission(flagship.current_actor(), permission))
$fn$;

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

-- Every tenant table gets the same isolation: RLS enabled and forced, and
-- rows of the session's organization only. With a write permission, reads
-- stay per organization while INSERT, UPDATE and DELETE also need the
-- session's actor to hold that permission (superusers and SECURITY DEFINER
-- functions owned by them bypass it, as they bypass every policy). Later
-- tables call this too.
CREATE FUNCTION flagship.isolate_tenant_table(table_name text, write_permission text DEFAULT NULL)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    tenant constant text := 'organization_id = (SELECT flagship.current_organization_id())';
    allowed text;
BEGIN
    EXECUTE format('ALTER TABLE flagship.%I ENABLE ROW LEVEL SECURITY', table_name);
    EXECUTE format('ALTER TABLE flagship.%I FORCE ROW LEVEL SECURITY', table_name);
    IF write_permission IS NULL THEN
        EXECUTE format('CREATE POLICY %I ON flagship.%I USING (%s) WITH CHECK (%s)',
                       table_name || '_tenant', table_name, tenant, tenant);
        RETURN;
    END IF;
    allowed := format('%s AND (SELECT flagship.actor_may(%L))', tenant, write_permission);
    EXECUTE format('CREATE POLICY %I ON flagship.%I FOR SELECT USING (%s)',
                   table_name || '_tenant', table_name, tenant);
    EXECUTE format('CREATE POLICY %I ON flagship.%I FOR INSERT WITH CHECK (%s)',
                   table_name || '_insert', table_name, allowed);
    EXECUTE format('CREATE POLICY %I ON flagship.%I FOR UPDATE USING (%s) WITH CHECK (%s)',
                   table_name || '_update', table_name, allowed, allowed);
    EXECUTE format('CREATE POLICY %I ON flagship.%I FOR DELETE USING (%s)',
                   table_name || '_delete', table_name, allowed);
END
$fn$;
REVOKE ALL ON FUNCTION flagship.isolate_tenant_table(text, text) FROM PUBLIC;

SELECT flagship.isolate_tenant_table(t, 'projects:write')
  FROM unnest(ARRAY['projects', 'environments']) AS t;
SELECT flagship.isolate_tenant_table(t, 'organization:write')
  FROM unnest(ARRAY['members', 'roles', 'role_permissions', 'member_roles']) AS t;

GRANT SELECT ON flagship.permissions, flagship.builtin_role_permissions
    TO flagship_admin, flagship_app, flagship_auditor;
GRANT SELECT ON flagship.organizations, flagship.projects, flagship.environments,
                flagship.members, flagship.roles, flagship.role_permissions,
                flagship.member_roles
    TO flagship_admin, flagship_app, flagship_auditor;
GRANT UPDATE (name) ON flagship.organizations TO flagship_admin;
GRANT INSERT, UPDATE, DELETE ON flagship.projects, flagship.environments,
                                flagship.members, flagship.roles,
                                flagship.role_permissions, flagship.member_roles
    TO flagship_admin;

CREATE FUNCTION flagship.create_organization(slug text, name text)
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
REVOKE ALL ON FUNCTION flagship.create_organization(text, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION flagship.create_organization(text, text) TO flagship_admin;

CREATE FUNCTION flagship.create_project(
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

-- Resolves a project uuid or key inside the session's organization (every
-- visible organization when the session names none, e.g. a superuser's psql).
CREATE FUNCTION flagship.resolve_project(project text)
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

-- The environments a name could mean: an environment uuid, '<project>/<env>'
-- or '<org slug>/<project>/<env>', inside the session's organization (every
-- visible organization when the session names none). Never raises, so
-- evaluation can answer ENVIRONMENT_NOT_FOUND instead.
CREATE FUNCTION flagship.environment_candidates(environment text)
RETURNS uuid[]
LANGUAGE plpgsql
STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
-- PL/pgSQL rather than SQL so that each form's plan is cached per session
-- (a SQL function with its own search_path is planned again at every call).
DECLARE
    part text[] := string_to_array(environment, '/');
    org uuid := flagship.current_organization_id();
    found uuid[];
BEGIN
    IF cardinality(part) = 1 THEN
        IF environment !~* '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$' THEN
            RETURN '{}';
        END IF;
        SELECT array_agg(e.id ORDER BY e.id) INTO found
          FROM flagship.environments e
         WHERE e.id = environment::uuid AND (org IS NULL OR e.organization_id = org);
    ELSIF cardinality(part) = 2 THEN
        SELECT array_agg(e.id ORDER BY e.id) INTO found
          FROM flagship.projects p
          JOIN flagship.environments e ON e.organization_id = p.organization_id AND e.project_id = p.id
         WHERE p.key = part[1] AND e.key = part[2] AND (org IS NULL OR p.organization_id = org);
    ELSIF cardinality(part) = 3 THEN
        SELECT array_agg(e.id ORDER BY e.id) INTO found
          FROM flagship.organizations o
          JOIN flagship.projects p ON p.organization_id = o.id
          JOIN flagship.environments e ON e.organization_id = p.organization_id AND e.project_id = p.id
         WHERE o.slug = part[1] AND p.key = part[2] AND e.key = part[3]
           AND (org IS NULL OR o.id = org);
    END IF;
    RETURN coalesce(found, '{}');
END
$fn$;

-- Resolves an environment name to its uuid, or raises 22023 naming it.
CREATE FUNCTION flagship.resolve_environment(environment text)
RETURNS uuid
LANGUAGE plpgsql
STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    found uuid[];
BEGIN
    IF environment IS NULL OR environment = '' THEN
        RAISE EXCEPTION 'environment must be given'
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'pass ''<project>/<environment>'' or set flagship.environment';
    END IF;
    found := flagship.environment_candidates(environment);
    IF cardinality(found) = 0 THEN
        RAISE EXCEPTION 'environment "%" not found', environment
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'name it by uuid, ''<project>/<env>'' or ''<org slug>/<project>/<env>''';
    ELSIF cardinality(found) > 1 THEN
        RAISE EXCEPTION 'environment "%" is ambiguous: % organizations have it', environment, cardinality(found)
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'set flagship.organization_id or use ''<org>/<project>/<env>''';
    END IF;
    RETURN found[1];
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
