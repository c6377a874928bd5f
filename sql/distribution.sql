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
