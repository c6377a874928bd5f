-- Audit trail and change feed.
--
-- Every configuration table gets one AFTER ROW trigger that, in the same
-- transaction as the change, appends an audit_events row (who, what, the
-- changed fields with old and new values) and sends NOTIFY flagship_changes
-- (delivered only if the transaction commits). Usage counters and the
-- usage ledger are not audited: the ledger is their history.
--
-- Tamper evidence: each organization's events form a hash chain. An event's
-- hash is sha256 over its position, time, action, resource, transaction and
-- roles, a digest of its content (actor and diff, `content_digest`) and the
-- previous event's hash: content can be erased (erase_subject) while the
-- chain still proves order and completeness, and verification checks each
-- event's content against its digest unless an erasure recorded in the
-- chain erased it. The chain
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
    -- Who really wrote it, whatever the claimed actor says: the login role
    -- (session_user), the role whose rights applied (the caller of any
    -- SECURITY DEFINER function) and, in key mode, the API key. Hashed
    -- with the rest; NULL only in events written before 0.3.0.
    session_role    text,
    acting_role     text,
    key_id          uuid,
    -- What the change feed names (not hashed: derived from the row, for
    -- flagship.changes_since): the kind and key an application caches,
    -- and the environment when the change belongs to one.
    change_kind     text,
    change_key      text,
    environment_id  uuid,
    -- 0.3.0: sha256 of the content (actor and diff) that the chain hashes
    -- instead of the content itself; the 0.2.0 hash of an event the 0.3.0
    -- upgrade re-hashed (anchors taken before the upgrade match it); the
    -- chain position of the erasure that erased personal values from it.
    content_digest  bytea       NOT NULL,
    legacy_hash     bytea,
    erased_by       bigint,
    -- `id` comes from a sequence and needs no index of its own: each
    -- index costs every configuration write.
    PRIMARY KEY (organization_id, chain_seq),
    CONSTRAINT audit_events_action_valid CHECK (action IN ('insert', 'update', 'delete', 'erase'))
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

-- The digest of an event's erasable content: who (actor) and what (diff),
-- serialised as a jsonb array (canonical text).
CREATE FUNCTION flagship.audit_content_digest(actor text, diff jsonb)
RETURNS bytea
LANGUAGE sql
IMMUTABLE PARALLEL SAFE
-- No SET clause, so that it inlines (see audit_link_digest).
AS $fn$
    SELECT sha256(convert_to(jsonb_build_array(actor, diff)::text, 'UTF8'))
$fn$;

-- The hash of one event: the previous hash, its position, time, action,
-- resource, transaction and roles, and its content digest, serialised as a
-- jsonb array (canonical text, unambiguous separators), times as epoch
-- seconds so that neither DateStyle nor TimeZone changes it.
CREATE FUNCTION flagship.audit_link_digest(
    previous_hash bytea, chain_seq bigint, id bigint, organization_id uuid,
    occurred_at timestamptz, action text, resource_type text, resource_id text,
    content_digest bytea, transaction_id bigint,
    session_role text, acting_role text, key_id uuid)
RETURNS bytea
LANGUAGE sql
STABLE PARALLEL SAFE
-- No SET clause, so the planner inlines it into the trigger's cached plan
-- (a SET would make every transaction plan it again); it calls only
-- pg_catalog functions, which no search_path can shadow.
AS $fn$
    SELECT sha256(convert_to(jsonb_build_array(
        encode(previous_hash, 'hex'), chain_seq, id, organization_id,
        extract(epoch FROM occurred_at), action, resource_type, resource_id,
        encode(content_digest, 'hex'), transaction_id,
        session_role, acting_role, key_id)::text, 'UTF8'))
$fn$;

-- Nobody edits the trail. A superuser who must (a court order, a broken
-- restore) says so first with SET flagship.audit_maintenance = on; the
-- chain then shows where history was rewritten.
CREATE FUNCTION flagship.audit_maintenance_declared() RETURNS boolean
LANGUAGE sql
STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT current_setting('flagship.audit_maintenance', true) = 'on'
           AND (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)
$fn$;
REVOKE ALL ON FUNCTION flagship.audit_maintenance_declared() FROM PUBLIC;

CREATE FUNCTION flagship.audit_events_append_only() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    -- On Citus the trigger fires on a shard, named <table>_<shard id>
    -- (#21); no table of FlagShip's ends in digits.
    table_name constant text := regexp_replace(TG_TABLE_NAME, '_[0-9]+$', '');
BEGIN
    IF flagship.audit_maintenance_declared() THEN
        RETURN CASE TG_OP WHEN 'DELETE' THEN OLD ELSE NEW END;
    END IF;
    -- erase_subject (running as the extension's owner, with the erasure's
    -- chain position set for its transaction) may replace an event's
    -- content and mark it erased by that erasure; nothing the chain
    -- hashes changes.
    -- (Nested: NEW has those columns only on audit_events.)
    IF table_name = 'audit_events' AND TG_OP = 'UPDATE' THEN
        IF current_setting('flagship.erasing', true) = NEW.erased_by::text
           AND current_user::text::regrole = (SELECT x.extowner FROM pg_extension x WHERE x.extname = 'flagship')
           AND (NEW.organization_id, NEW.chain_seq, NEW.id, NEW.occurred_at, NEW.action, NEW.resource_type,
                NEW.resource_id, NEW.transaction_id, NEW.hash, NEW.session_role, NEW.acting_role, NEW.key_id,
                NEW.content_digest, NEW.legacy_hash, NEW.change_kind, NEW.environment_id)
               IS NOT DISTINCT FROM
               (OLD.organization_id, OLD.chain_seq, OLD.id, OLD.occurred_at, OLD.action, OLD.resource_type,
                OLD.resource_id, OLD.transaction_id, OLD.hash, OLD.session_role, OLD.acting_role, OLD.key_id,
                OLD.content_digest, OLD.legacy_hash, OLD.change_kind, OLD.environment_id) THEN
            RETURN NEW;
        END IF;
    END IF;
    RAISE EXCEPTION '% is append-only: % refused', table_name, TG_OP
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

-- A head moves only forward, one event at a time, and only from inside the
-- audit trigger (trigger depth 2: the trigger of a configuration change
-- updating the head) or erase_subject (running as the extension's owner). Moving it back or aside needs audit_maintenance too.
CREATE FUNCTION flagship.audit_chain_heads_forward_only() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    IF ((pg_trigger_depth() > 1
         OR current_user::text::regrole = (SELECT x.extowner FROM pg_extension x WHERE x.extname = 'flagship'))
        AND NEW.organization_id = OLD.organization_id AND NEW.last_seq = OLD.last_seq + 1)
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

-- Appends one event to the organization's chain and announces it; answers
-- its chain position. Runs as the extension's owner (from audit_change or
-- erase_subject, both SECURITY DEFINER): no role may call it.
CREATE FUNCTION flagship.audit_append(org uuid, action text, resource_type text, resource text,
                                      changes jsonb, change_kind text, change_key text,
                                      environment uuid)
RETURNS bigint
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    event_id bigint := nextval('flagship.audit_events_id_seq');
    acting text := flagship.current_actor();
    acting_role text := flagship.acting_role();
    key uuid := flagship.current_key_id();
    xact bigint := pg_current_xact_id()::text::bigint;
    content bytea := flagship.audit_content_digest(acting, changes);
    previous_hash bytea;
    link_hash bytea;
    position bigint;
BEGIN
    -- The head is locked and read, then moved, in two statements: Citus
    -- cannot send an UPDATE whose SET calls a STABLE function with the
    -- row's columns (#21), and the lock orders appends as the UPDATE did.
    FOR attempt IN 1..2 LOOP
        SELECT h.last_seq + 1, h.last_hash INTO position, previous_hash
          FROM flagship.audit_chain_heads h
         WHERE h.organization_id = org
           FOR UPDATE;
        EXIT WHEN position IS NOT NULL;
        -- The organization's first event starts its chain.
        INSERT INTO flagship.audit_chain_heads (organization_id) VALUES (org)
        ON CONFLICT DO NOTHING;
    END LOOP;
    link_hash := flagship.audit_link_digest(
        previous_hash, position, event_id, org, now(), action,
        resource_type, resource, content, xact,
        session_user, acting_role, key);
    UPDATE flagship.audit_chain_heads h
       SET last_seq = position, last_hash = link_hash
     WHERE h.organization_id = org;
    INSERT INTO flagship.audit_events (organization_id, id, chain_seq, occurred_at, actor, action,
                                       resource_type, resource_id, diff, transaction_id, hash,
                                       session_role, acting_role, key_id,
                                       change_kind, change_key, environment_id, content_digest)
    VALUES (org, event_id, position, now(), acting, action,
            resource_type, resource, changes, xact, link_hash,
            session_user, acting_role, key,
            change_kind, change_key, environment, content);

    -- Any role may LISTEN to any channel, so the payload carries nothing
    -- row-level security would hide: only the event's database-wide id.
    -- A listener asks flagship.changes_since what changed in its own
    -- organization. On Citus, a change sent from another node runs in a
    -- connection of Citus's own, whose transaction may be prepared for a
    -- two-phase commit, which a NOTIFY makes fail: there the change is
    -- left unannounced, in changes_since for the next poll (#21).
    IF current_setting('citus.version', true) IS NULL
       OR current_setting('application_name') NOT LIKE 'citus\_internal gpid=%' THEN
        PERFORM pg_notify('flagship_changes', jsonb_build_object('id', event_id)::text);
    END IF;
    RETURN position;
END
$fn$;
REVOKE ALL ON FUNCTION flagship.audit_append(uuid, text, text, text, jsonb, text, text, uuid) FROM PUBLIC;

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
    -- On Citus the trigger fires on a shard, named <table>_<shard id>
    -- (#21); no table of FlagShip's ends in digits.
    table_name constant text := regexp_replace(TG_TABLE_NAME, '_[0-9]+$', '');
    left_out text[] := TG_ARGV[2:];
    before jsonb;
    after jsonb;
    subject jsonb;
    changes jsonb;
    org uuid;
    resource text;
    subject_key text;
    environment uuid;
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

    org := CASE table_name WHEN 'organizations' THEN subject->>'id'
                              ELSE subject->>'organization_id' END;
    resource := subject->>'id';
    IF resource IS NULL THEN
        SELECT string_agg(subject->>column_name, '/' ORDER BY position) INTO resource
          FROM unnest(string_to_array(TG_ARGV[1], ',')) WITH ORDINALITY AS k (column_name, position);
    END IF;

    -- The change feed names what an application caches: a flag, a plan,
    -- a customer, even when the row changed is one of their parts.
    CASE table_name
    WHEN 'feature_rules' THEN
        SELECT f.key INTO subject_key FROM flagship.features f
         WHERE f.organization_id = org AND f.id = (subject->>'feature_id')::uuid;
    WHEN 'plan_features', 'usage_limits', 'plan_credits' THEN
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
                            CASE table_name WHEN 'environments' THEN (subject->>'id')::uuid END);

    PERFORM flagship.audit_append(org, lower(TG_OP), table_name, resource, changes,
                                  TG_ARGV[0], subject_key, environment);
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
               ('plan_credits', 'plan', '{}'),
               ('customers', 'customer', '{}'),
               ('subscriptions', 'customer', '{}'),
               ('customer_feature_overrides', 'customer', '{}'),
               ('customer_limit_overrides', 'customer', '{}'),
               -- Verification bumps usage_count and last_used_at: usage, not configuration.
               ('api_keys', 'api_key', '{key_hash,usage_count,last_used_at}'),
               -- A grant is recorded; consuming it (remaining) is usage, in the ledger.
               ('credit_grants', 'customer', '{remaining}')) AS t (name, kind, left_out);

-- Consuming credits updates only `remaining`, which the trail leaves out:
-- the trigger need not fire for it at all (it would find nothing to
-- record, at the cost of every consumption).
DROP TRIGGER credit_grants_audit ON flagship.credit_grants;
CREATE TRIGGER credit_grants_audit
    AFTER INSERT OR DELETE OR UPDATE OF organization_id, id, customer_id, metric_id, amount,
                                        expires_at, idempotency_key, granted_at, source, period_start
    ON flagship.credit_grants
    FOR EACH ROW EXECUTE FUNCTION flagship.audit_change('customer', 'id', 'remaining', 'updated_at');

-- Recomputes an organization's chain. `first_broken_id` is the first event
-- whose hash does not follow from its predecessor (edited content, an
-- edited hash, or a missing predecessor); events deleted from the end show
-- as a head that no event reaches (`reason`: "truncated", first_broken_id
-- NULL). Invoker's rights: a session that may not read the trail is told
-- so rather than shown an empty, valid chain.
--
-- Without an anchor the chain proves only that it is consistent: whoever
-- may bypass the guards (a superuser) can rewrite it and re-hash it, or
-- cut it short and move the head back. `anchor` is an earlier answer of
-- audit_head, kept outside the database; the chain must still hold that
-- hash at that position, so a rewrite, a deletion or a wipe of anything up
-- to the anchor is detected (`reason`: "anchor not found").
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
        IF NOT EXISTS (SELECT 1 FROM flagship.organizations o WHERE o.id = verify_audit_chain.organization_id) THEN
            RAISE EXCEPTION 'organization "%" not found', verify_audit_chain.organization_id
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        RETURN jsonb_build_object('valid', true, 'checked', 0, 'first_broken_id', NULL);
    END IF;

    -- Each link, and each content against its digest, or for an erased
    -- event against the digest its erasure event (itself in the chain)
    -- recorded for the erased content.
    SELECT e.id, e.chain_seq,
           CASE WHEN e.chain_seq <> e.expected_seq THEN 'missing events before this one'
                WHEN e.hash IS DISTINCT FROM e.expected_hash THEN 'hash mismatch'
                WHEN e.erased_by IS NULL THEN 'content does not match its digest'
                ELSE 'erased content does not match its erasure event' END AS reason
      INTO broken
      FROM (SELECT a.*,
                   row_number() OVER (ORDER BY a.chain_seq) AS expected_seq,
                   flagship.audit_link_digest(
                       coalesce(lag(a.hash) OVER (ORDER BY a.chain_seq), '\x'::bytea), a.chain_seq, a.id,
                       a.organization_id, a.occurred_at, a.action, a.resource_type, a.resource_id,
                       a.content_digest, a.transaction_id, a.session_role, a.acting_role, a.key_id)
                       AS expected_hash
              FROM flagship.audit_events a
             WHERE a.organization_id = verify_audit_chain.organization_id) e
      -- The erasure event of an erased one (a join, not a correlated
      -- subquery, which Citus does not plan over a subquery: #21).
      LEFT JOIN flagship.audit_events x
        ON x.organization_id = verify_audit_chain.organization_id AND x.chain_seq = e.erased_by
       AND x.action = 'erase'
     WHERE e.chain_seq <> e.expected_seq
        OR e.hash IS DISTINCT FROM e.expected_hash
        OR (e.erased_by IS NULL
            AND e.content_digest IS DISTINCT FROM flagship.audit_content_digest(e.actor, e.diff))
        OR (e.erased_by IS NOT NULL
            AND (x.diff->'audit_events'->>e.chain_seq::text)
                IS DISTINCT FROM encode(flagship.audit_content_digest(e.actor, e.diff), 'hex'))
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
    -- An anchor taken before the 0.3.0 upgrade holds the event's 0.2.0 hash.
    IF anchor_seq > 0 AND NOT EXISTS (
           SELECT 1 FROM flagship.audit_events a
            WHERE a.organization_id = verify_audit_chain.organization_id
              AND a.chain_seq = anchor_seq AND anchor_hash IN (a.hash, a.legacy_hash)) THEN
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
LANGUAGE plpgsql
STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
-- PL/pgSQL with the organization as a value: Citus can plan it and send
-- it to the organization's shard group (#21).
DECLARE
    org constant uuid := flagship.current_organization_id();
BEGIN
    RETURN QUERY
    SELECT a.chain_seq, a.id, a.occurred_at, a.change_kind, a.change_key, a.environment_id, a.action
      FROM flagship.audit_events a
     WHERE a.organization_id = org
       AND a.chain_seq > coalesce(changes_since.after, 0)
     ORDER BY a.chain_seq
     LIMIT 10000;
END
$fn$;
REVOKE ALL ON FUNCTION flagship.changes_since(bigint) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION flagship.changes_since(bigint) TO flagship_admin, flagship_app, flagship_auditor;
