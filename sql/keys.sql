-- API keys and permission checks.
--
-- A key looks like `fs_live_<64 hex digits>` (`fs_test_` when bound to a
-- non-production environment): 244 random bits from two gen_random_uuid()
-- calls, PostgreSQL's cryptographic random source. Only its SHA-256
-- (sha256()) and an 8-digit display prefix are stored; the plaintext is
-- returned once, by issue_api_key.

CREATE TABLE flagship.api_keys (
    organization_id uuid        NOT NULL REFERENCES flagship.organizations (id) ON DELETE CASCADE,
    id              uuid        NOT NULL DEFAULT gen_random_uuid(),
    name            text        NOT NULL,
    display_prefix  text        NOT NULL,
    key_hash        bytea       NOT NULL,
    scopes          text[]      NOT NULL DEFAULT '{}',
    project_id      uuid,
    environment_id  uuid,
    expires_at      timestamptz,
    revoked_at      timestamptz,
    usage_limit     bigint,
    usage_count     bigint      NOT NULL DEFAULT 0,
    last_used_at    timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    -- 0.3.0: the customer a key belongs to (its usage calls act for it),
    -- the addresses it may be used from, and the key it replaced.
    customer_id     uuid,
    allowed_ips     cidr[],
    rolled_from     uuid,
    -- The key whose use sequence counts this key's uses (NULL: its own):
    -- a rolled key shares its predecessor's, so old and new key together
    -- stay within one usage limit during the grace period.
    uses_of         uuid,
    -- `{name: {"limit", "window"}}`: verification counts each (fixed at
    -- issue; a rolled key keeps them and shares their windows).
    rate_limits     jsonb CONSTRAINT api_keys_rate_limits_valid CHECK (flagship.rate_limits_valid(rate_limits)),
    PRIMARY KEY (organization_id, id),
    CONSTRAINT api_keys_name_present CHECK (length(btrim(name)) > 0 AND length(name) <= 200),
    CONSTRAINT api_keys_hash_is_sha256 CHECK (length(key_hash) = 32),
    CONSTRAINT api_keys_usage_limit_valid CHECK (usage_limit IS NULL OR usage_limit > 0),
    CONSTRAINT api_keys_scopes_present CHECK (array_position(scopes, NULL) IS NULL),
    FOREIGN KEY (organization_id, project_id, environment_id)
        REFERENCES flagship.environments (organization_id, project_id, id) ON DELETE CASCADE,
    CONSTRAINT api_keys_customer FOREIGN KEY (organization_id, customer_id)
        REFERENCES flagship.customers (organization_id, id) ON DELETE CASCADE,
    CONSTRAINT api_keys_allowed_ips_present CHECK (array_position(allowed_ips, NULL) IS NULL)
);
CREATE INDEX api_keys_customer_idx ON flagship.api_keys (organization_id, customer_id)
    WHERE customer_id IS NOT NULL;
-- Verification knows nothing but the key: the hash alone finds it.
CREATE UNIQUE INDEX api_keys_hash ON flagship.api_keys (key_hash);

SELECT pg_catalog.pg_extension_config_dump('flagship.api_keys', '');
SELECT flagship.isolate_tenant_table('api_keys', 'api_keys:write');

-- Nobody reads a hash back, not even an administrator.
GRANT SELECT (organization_id, id, name, display_prefix, scopes, project_id, environment_id,
              expires_at, revoked_at, usage_limit, usage_count, last_used_at, created_at,
              customer_id, allowed_ips, rolled_from, uses_of, rate_limits)
    ON flagship.api_keys TO flagship_admin, flagship_app, flagship_auditor;
GRANT INSERT ON flagship.api_keys TO flagship_admin;
GRANT UPDATE (name, revoked_at, expires_at, usage_limit, allowed_ips) ON flagship.api_keys TO flagship_admin;
GRANT DELETE ON flagship.api_keys TO flagship_admin;

-- Uses of a key with a usage limit are counted by a sequence of the key's
-- own: nextval is never rolled back, so a verification spends a use
-- whether its transaction commits, rolls back, or is rolled back to a
-- savepoint. usage_count mirrors it for display (transactionally, so it
-- may lag). After a crash a sequence resumes up to 32 values ahead
-- (PostgreSQL logs sequences ahead of use): a key may then lose up to 32
-- uses, never gain one.
CREATE FUNCTION flagship.key_use_sequence(key_id uuid) RETURNS text
LANGUAGE sql
IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT 'flagship.' || quote_ident('api_key_uses_' || replace(key_id::text, '-', ''))
$fn$;
REVOKE ALL ON FUNCTION flagship.key_use_sequence(uuid) FROM PUBLIC;

-- Creates a limited key's sequence if it is missing, continuing from the
-- uses already counted. The sequence belongs to api_keys.key_hash, so it
-- goes with the table (DROP EXTENSION) and pg_dump keeps its position.
CREATE FUNCTION flagship.ensure_key_use_sequence(key_id uuid, used bigint) RETURNS regclass
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    name constant text := flagship.key_use_sequence(key_id);
BEGIN
    IF to_regclass(name) IS NULL THEN
        EXECUTE format('CREATE SEQUENCE %s START WITH %s OWNED BY flagship.api_keys.key_hash',
                       name, coalesce(used, 0) + 1);
    END IF;
    RETURN name::regclass;
END
$fn$;
REVOKE ALL ON FUNCTION flagship.ensure_key_use_sequence(uuid, bigint) FROM PUBLIC;

CREATE FUNCTION flagship.api_keys_use_sequence() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    IF TG_OP = 'DELETE' THEN
        -- A sequence that a rolled key still counts on stays (it goes with
        -- the last key using it).
        IF NOT EXISTS (SELECT 1 FROM flagship.api_keys k
                        WHERE k.uses_of = coalesce(OLD.uses_of, OLD.id) AND k.id <> OLD.id)
           AND (OLD.uses_of IS NULL
                OR NOT EXISTS (SELECT 1 FROM flagship.api_keys k WHERE k.id = OLD.uses_of)) THEN
            EXECUTE format('DROP SEQUENCE IF EXISTS %s',
                           flagship.key_use_sequence(coalesce(OLD.uses_of, OLD.id)));
        END IF;
    ELSIF NEW.usage_limit IS NOT NULL THEN
        PERFORM flagship.ensure_key_use_sequence(coalesce(NEW.uses_of, NEW.id), NEW.usage_count);
    END IF;
    RETURN NULL;
END
$fn$;
REVOKE ALL ON FUNCTION flagship.api_keys_use_sequence() FROM PUBLIC;
CREATE TRIGGER api_keys_use_sequence AFTER INSERT OR DELETE OR UPDATE OF usage_limit ON flagship.api_keys
    FOR EACH ROW EXECUTE FUNCTION flagship.api_keys_use_sequence();

-- Whether a key with these settings stays within the key this transaction
-- authenticated with (true without one): its scopes, its environment
-- binding, its expiry, its usage limit, its addresses and its customer. A
-- key may issue or roll only keys within itself.
CREATE FUNCTION flagship.within_session_key(scopes text[], environment_id uuid, expires_at timestamptz,
                                            usage_limit bigint, allowed_ips cidr[], customer_id uuid)
RETURNS boolean
LANGUAGE plpgsql
STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
-- PL/pgSQL with the organization as a value: Citus can plan it and send
-- it to the organization's shard group (#21).
DECLARE
    session_key constant uuid := flagship.current_key_id();
    org constant uuid := flagship.current_organization_id();
    -- The columns a key's bounds are in (no role may read its hash).
    k record;
BEGIN
    IF session_key IS NULL THEN
        RETURN true;
    END IF;
    SELECT ak.scopes, ak.environment_id, ak.expires_at, ak.usage_limit, ak.allowed_ips, ak.customer_id
      INTO k FROM flagship.api_keys ak
     WHERE ak.organization_id = org AND ak.id = session_key;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    RETURN coalesce(NOT ((cardinality(k.scopes) > 0
                          AND (cardinality(coalesce(within_session_key.scopes, '{}')) = 0
                               OR EXISTS (SELECT FROM unnest(within_session_key.scopes) s
                                           WHERE NOT flagship.key_grants(s))))
                         OR (k.environment_id IS NOT NULL
                             AND within_session_key.environment_id IS DISTINCT FROM k.environment_id)
                         OR (k.expires_at IS NOT NULL
                             AND (within_session_key.expires_at IS NULL OR within_session_key.expires_at > k.expires_at))
                         OR (k.usage_limit IS NOT NULL
                             AND (within_session_key.usage_limit IS NULL OR within_session_key.usage_limit > k.usage_limit))
                         OR (k.allowed_ips IS NOT NULL
                             AND (within_session_key.allowed_ips IS NULL
                                  OR EXISTS (SELECT FROM unnest(within_session_key.allowed_ips) n
                                              WHERE NOT EXISTS (SELECT FROM unnest(k.allowed_ips) a WHERE n <<= a))))
                         OR (k.customer_id IS NOT NULL
                             AND within_session_key.customer_id IS DISTINCT FROM k.customer_id)), false);
END
$fn$;

-- Whether `limits` is at least as tight as the rate limits of the key
-- this transaction authenticated with (true outside key mode): each of the
-- key's limits, with a limit no higher and a window no shorter.
CREATE FUNCTION flagship.within_session_rate_limits(limits jsonb) RETURNS boolean
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
-- PL/pgSQL with the organization as a value: Citus can plan it and send
-- it to the organization's shard group (#21).
DECLARE
    org constant uuid := flagship.current_organization_id();
    session_key constant uuid := flagship.current_key_id();
    own_limits jsonb;
BEGIN
    SELECT k.rate_limits INTO own_limits FROM flagship.api_keys k
     WHERE k.organization_id = org AND k.id = session_key;
    RETURN NOT EXISTS (
        SELECT FROM jsonb_each(own_limits) own
         WHERE NOT coalesce(limits ? own.key
                    AND (limits->own.key->>'limit')::bigint <= (own.value->>'limit')::bigint
                    AND flagship.rate_window_us(limits->own.key->>'window')
                        >= flagship.rate_window_us(own.value->>'window'), false));
END
$fn$;

-- What flagship.rate_limit counts against for key:<key id>, read under the
-- caller's row-level security: {"organization_id", "subject" (whose
-- window: a rolled key counts in its predecessor's), "limit", "window"}.
CREATE FUNCTION flagship.key_rate_limit(subject text, name text)
RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
#variable_conflict use_variable
DECLARE
    key_row record;
BEGIN
    IF substr(subject, 5) !~* '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$' THEN
        RAISE EXCEPTION 'subject: "%" is not key:<key id>', subject USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- Row-level security makes another organization's key look absent.
    SELECT k.organization_id, coalesce(k.uses_of, k.id) AS counted, k.rate_limits INTO key_row
      FROM flagship.api_keys k WHERE k.id = substr(subject, 5)::uuid;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'subject: api key % not found', substr(subject, 5)
            USING ERRCODE = 'invalid_parameter_value';
    ELSIF NOT coalesce(key_row.rate_limits ? name, false) THEN
        RAISE EXCEPTION 'api key %: no rate limit "%"', substr(subject, 5), name
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = coalesce('the key declares: ' || (SELECT string_agg(n, ', ' ORDER BY n)
                                                             FROM jsonb_object_keys(key_row.rate_limits) n),
                                  'the key declares no rate limits');
    END IF;
    RETURN jsonb_build_object('organization_id', key_row.organization_id,
                              'subject', 'key:' || key_row.counted,
                              'limit', key_row.rate_limits->name->'limit',
                              'window', key_row.rate_limits->name->'window');
END
$fn$;

-- The same for a customer of the environment (kept per backend like the
-- other entitlement facts): limit and window NULL when the customer's plan
-- declares no such limit while another plan of the project does
-- (unlimited). A name nobody declares is refused as a typo.
CREATE FUNCTION flagship.customer_rate_limit(environment_id uuid, subject text, name text)
RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
#variable_conflict use_variable
DECLARE
    -- The customer's organization as a value (the session's, else the
    -- environment's): on Citus the read goes to its shards alone (#21).
    org uuid := flagship.current_organization_id();
    customer_row record;
BEGIN
    IF org IS NULL THEN
        SELECT e.organization_id INTO org FROM flagship.environments e WHERE e.id = environment_id;
    END IF;
    SELECT c.organization_id, c.project_id, c.id, p.rate_limits INTO customer_row
      FROM flagship.customers c
      LEFT JOIN flagship.subscriptions s ON s.organization_id = c.organization_id AND s.customer_id = c.id
      LEFT JOIN flagship.plans p ON p.organization_id = s.organization_id AND p.id = s.plan_id
     WHERE c.organization_id = org AND c.environment_id = environment_id AND c.external_key = subject;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'subject: no customer "%" in this environment', subject
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'a subject is a customer''s key (flagship.put_customer) or key:<api key id>';
    END IF;
    IF NOT coalesce(customer_row.rate_limits ? name, false)
       AND NOT EXISTS (SELECT 1 FROM flagship.plans p
                        WHERE p.organization_id = customer_row.organization_id
                          AND p.project_id = customer_row.project_id AND p.rate_limits ? name) THEN
        RAISE EXCEPTION 'name: no plan of this project declares a rate limit "%"', name
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = coalesce('plans declare: ' || (SELECT string_agg(DISTINCT n, ', ')
                                                          FROM flagship.plans p, jsonb_object_keys(p.rate_limits) n
                                                         WHERE p.organization_id = customer_row.organization_id
                                                           AND p.project_id = customer_row.project_id),
                                  'no plan of this project declares rate limits');
    END IF;
    -- Customers are counted by id: the same key in two environments is
    -- two customers.
    RETURN jsonb_build_object('organization_id', customer_row.organization_id,
                              'subject', 'customer:' || customer_row.id,
                              'limit', customer_row.rate_limits->name->'limit',
                              'window', customer_row.rate_limits->name->'window');
END
$fn$;

-- `customer` (an external key of the key's environment) makes the key the
-- customer's: verification names it, and usage calls in key mode act for
-- it. `allowed_ips` (CIDR, IPv4 or IPv6) limits where it may be used from.
CREATE FUNCTION flagship.issue_api_key(organization_id uuid, name text, scopes text[] DEFAULT '{}',
                                       environment text DEFAULT NULL,
                                       expires_at timestamptz DEFAULT NULL,
                                       usage_limit bigint DEFAULT NULL,
                                       customer text DEFAULT NULL,
                                       allowed_ips text[] DEFAULT NULL,
                                       rate_limits jsonb DEFAULT NULL)
RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    environment_row flagship.environments;
    secret text;
    plaintext text;
    bad_scope text;
    customer_id uuid;
    networks cidr[];
    checked_limits jsonb;
BEGIN
    PERFORM flagship.require_permission('api_keys:write', 'issue_api_key');
    IF organization_id IS NULL
       OR NOT EXISTS (SELECT 1 FROM flagship.organizations o WHERE o.id = issue_api_key.organization_id) THEN
        RAISE EXCEPTION 'organization_id: organization not found'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF name IS NULL OR btrim(name) = '' THEN
        RAISE EXCEPTION 'name: must not be empty' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- A scope is a permission, or every permission of one resource; a typo
    -- is refused now rather than failing at first use.
    SELECT s INTO bad_scope FROM unnest(coalesce(scopes, '{}')) s
     WHERE s IS NULL
        OR NOT EXISTS (SELECT 1 FROM flagship.permissions p
                        WHERE p.key = s OR split_part(p.key, ':', 1) || ':*' = s)
     LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'scopes: "%" is not a scope', coalesce(bad_scope, 'NULL')
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'valid scopes: ' || (SELECT string_agg(k, ', ' ORDER BY k) FROM (
                      SELECT p.key FROM flagship.permissions p
                      UNION SELECT split_part(p.key, ':', 1) || ':*' FROM flagship.permissions p) AS v (k));
    END IF;
    -- A key issues no key wider than itself (checked before anything of
    -- the request is resolved, so a wider request learns nothing more).
    IF NOT flagship.within_session_key(scopes,
               CASE WHEN environment IS NOT NULL THEN flagship.resolve_environment(environment) END,
               expires_at, usage_limit,
               CASE WHEN allowed_ips IS NOT NULL THEN flagship.parse_networks(allowed_ips, 'allowed_ips') END,
               CASE WHEN customer IS NOT NULL AND environment IS NOT NULL THEN
                   (SELECT c.id FROM flagship.customers c
                     WHERE c.environment_id = flagship.resolve_environment(environment)
                       AND c.external_key = customer) END) THEN
        RAISE EXCEPTION 'a key may not issue a key wider than itself'
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'stay within the scopes, environment, expiry, usage limit, addresses and customer of the key this transaction authenticated with';
    END IF;
    IF expires_at IS NOT NULL AND expires_at <= now() THEN
        RAISE EXCEPTION 'expires_at: must be in the future' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF usage_limit IS NOT NULL AND usage_limit <= 0 THEN
        RAISE EXCEPTION 'usage_limit: must be positive' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF environment IS NOT NULL THEN
        environment_row := flagship.environment_row(environment);
        -- A name or uuid of another organization's environment is refused
        -- exactly like one that does not exist.
        IF environment_row.organization_id IS DISTINCT FROM issue_api_key.organization_id THEN
            RAISE EXCEPTION 'environment "%" not found', environment
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
    END IF;

    IF customer IS NOT NULL THEN
        IF environment_row.id IS NULL THEN
            RAISE EXCEPTION 'customer: a customer''s key needs its environment (customers belong to one)'
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        SELECT c.id INTO customer_id FROM flagship.customers c
         WHERE c.organization_id = environment_row.organization_id
           AND c.environment_id = environment_row.id AND c.external_key = customer;
        IF customer_id IS NULL THEN
            RAISE EXCEPTION 'customer: no customer "%" in environment "%"', customer, environment
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
    END IF;
    IF customer IS NOT NULL AND cardinality(coalesce(scopes, '{}')) = 0 THEN
        -- A key without scopes is restricted only by its role: a customer's
        -- key says what it may do.
        RAISE EXCEPTION 'scopes: a customer''s key must list its scopes'
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'for example ARRAY[''usage:read'', ''usage:write'', ''features:read'']';
    END IF;
    networks := flagship.parse_networks(allowed_ips, 'allowed_ips');
    checked_limits := flagship.checked_rate_limits(rate_limits, 'rate_limits');
    -- A rate-limited key issues only keys limited at least as tightly.
    IF NOT flagship.within_session_rate_limits(checked_limits) THEN
        RAISE EXCEPTION 'a key may not issue a key wider than itself'
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'give the new key every rate limit of the key this transaction authenticated with, each with a limit no higher and a window no shorter';
    END IF;

    secret := replace(gen_random_uuid()::text, '-', '') || replace(gen_random_uuid()::text, '-', '');
    plaintext := CASE WHEN environment_row.key IS NULL OR environment_row.key = 'production'
                      THEN 'fs_live_' ELSE 'fs_test_' END || secret;
    INSERT INTO flagship.api_keys AS k
        (organization_id, name, display_prefix, key_hash, scopes, project_id, environment_id,
         expires_at, usage_limit, customer_id, allowed_ips, rate_limits)
    VALUES (issue_api_key.organization_id, btrim(name), left(plaintext, 16),
            sha256(convert_to(plaintext, 'UTF8')), coalesce(scopes, '{}'),
            environment_row.project_id, environment_row.id, expires_at, usage_limit,
            customer_id, networks, checked_limits);
    RETURN plaintext;
END
$fn$;

-- A CIDR list from text, each entry checked: NULL stays NULL (no limit),
-- anything unparsable is 22023 naming the entry.
CREATE FUNCTION flagship.parse_networks(entries text[], field text) RETURNS cidr[]
LANGUAGE plpgsql
IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    parsed cidr[] := '{}';
    entry text;
    position int := 0;
BEGIN
    IF entries IS NULL THEN
        RETURN NULL;
    END IF;
    IF cardinality(entries) = 0 THEN
        RAISE EXCEPTION '%: must list at least one address or network (NULL: any address)', field
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    FOREACH entry IN ARRAY entries LOOP
        position := position + 1;
        BEGIN
            parsed := parsed || entry::cidr;
        EXCEPTION WHEN others THEN
            RAISE EXCEPTION '%[%]: "%" is not an IPv4 or IPv6 address or network', field, position, coalesce(entry, 'NULL')
                USING ERRCODE = 'invalid_parameter_value',
                      HINT = 'for example 203.0.113.0/24, 198.51.100.7 or 2001:db8::/32';
        END;
        IF entry IS NULL THEN
            RAISE EXCEPTION '%[%]: "NULL" is not an IPv4 or IPv6 address or network', field, position
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
    END LOOP;
    RETURN parsed;
END
$fn$;

-- Verification runs before the caller has any organization, so it is
-- SECURITY DEFINER: it finds the key by hash alone and reveals only what
-- the key itself grants.
CREATE FUNCTION flagship.verify_api_key(key text, client_ip inet DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    key_row flagship.api_keys;
    organization_status text;
    code text;
    uses bigint;
    customer_key text;
    rate_limit record;
BEGIN
    IF key IS NOT NULL AND key ~ '^fs_(live|test)_[0-9a-f]{64}$' THEN
        SELECT * INTO key_row FROM flagship.api_keys k WHERE k.key_hash = sha256(convert_to(key, 'UTF8'));
    END IF;
    IF key_row.id IS NULL THEN
        -- Away from the organization's rows (Citus) this raises instead.
        PERFORM flagship.refuse_away_from_the_organization();
        code := 'NOT_FOUND';
    -- An allow-list admits only the addresses it lists, and tells callers
    -- elsewhere nothing more (not even that the key was revoked); a
    -- verification that does not say where the call comes from is refused.
    ELSIF key_row.allowed_ips IS NOT NULL
          AND (client_ip IS NULL
               OR NOT EXISTS (SELECT FROM unnest(key_row.allowed_ips) a WHERE client_ip <<= a)) THEN
        code := 'FORBIDDEN';
    ELSIF key_row.revoked_at IS NOT NULL THEN
        code := 'REVOKED';
    ELSIF key_row.expires_at IS NOT NULL AND key_row.expires_at <= now() THEN
        code := 'EXPIRED';
    ELSE
        SELECT o.status INTO organization_status FROM flagship.organizations o
         WHERE o.id = key_row.organization_id;
        IF organization_status IS DISTINCT FROM 'active' THEN
            code := 'FORBIDDEN';
        END IF;
        -- Rate limits before the usage limit: a refused attempt spends no
        -- use. Every limit counts the attempt (it happened either way).
        FOR rate_limit IN SELECT * FROM jsonb_each(key_row.rate_limits) WHERE code IS NULL LOOP
            IF NOT (flagship.rate_limit_hit(key_row.organization_id,
                                            'key:' || coalesce(key_row.uses_of, key_row.id), rate_limit.key,
                                            (rate_limit.value->>'limit')::bigint, rate_limit.value->>'window',
                                            1)->>'allowed')::boolean THEN
                code := 'RATE_LIMITED';
            END IF;
        END LOOP;
        IF code IS NOT NULL THEN
            NULL;
        ELSIF key_row.usage_limit IS NOT NULL THEN
            -- Counting uses is a write by nature; only limited keys pay it.
            uses := nextval(flagship.ensure_key_use_sequence(coalesce(key_row.uses_of, key_row.id),
                                                              key_row.usage_count));
            IF uses <= key_row.usage_limit THEN
                code := 'VALID';
                UPDATE flagship.api_keys k SET usage_count = greatest(k.usage_count, uses), last_used_at = now()
                 WHERE k.organization_id = key_row.organization_id AND k.id = key_row.id;
            ELSE
                code := 'USAGE_EXCEEDED';
            END IF;
        ELSE
            code := 'VALID';
            -- At most one write a minute per key, so busy keys do not turn
            -- every verification into a hot-row update.
            UPDATE flagship.api_keys k SET last_used_at = now()
             WHERE k.organization_id = key_row.organization_id AND k.id = key_row.id
               AND (k.last_used_at IS NULL OR k.last_used_at < now() - interval '1 minute');
        END IF;
    END IF;
    IF code <> 'VALID' THEN
        RETURN jsonb_build_object('valid', false, 'code', code, 'key_id', NULL,
                                  'organization_id', NULL, 'environment_id', NULL, 'scopes', NULL,
                                  'customer', NULL);
    END IF;
    IF key_row.customer_id IS NOT NULL THEN
        SELECT c.external_key INTO customer_key FROM flagship.customers c
         WHERE c.organization_id = key_row.organization_id AND c.id = key_row.customer_id;
    END IF;
    RETURN jsonb_build_object('valid', true, 'code', code, 'key_id', key_row.id,
                              'organization_id', key_row.organization_id,
                              'environment_id', key_row.environment_id, 'scopes', to_jsonb(key_row.scopes),
                              'customer', customer_key);
END
$fn$;
-- Only verification counts a key's attempts by itself: any other caller
-- could spend another organization's windows.
REVOKE ALL ON FUNCTION flagship.rate_limit_hit(uuid, text, text, bigint, text, integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION flagship.verify_api_key(text, inet) TO flagship_admin, flagship_app;
REVOKE EXECUTE ON FUNCTION flagship.verify_api_key(text, inet) FROM PUBLIC;

-- A new key with the same settings (name, scopes, environment, customer,
-- addresses, expiry, usage limit, and the same use sequence, so both keys
-- together stay within the limit); the old one keeps verifying for
-- `grace`, then answers EXPIRED. Returns the new key's plaintext, once.
CREATE FUNCTION flagship.roll_api_key(key_id uuid, grace interval DEFAULT '0')
RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    org constant uuid := flagship.current_organization_id();
    old flagship.api_keys;
    plaintext text;
BEGIN
    PERFORM flagship.require_permission('api_keys:write', 'roll_api_key');
    IF grace IS NULL OR grace < interval '0' THEN
        RAISE EXCEPTION 'grace: must be a non-negative interval' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- Another organization's key looks absent, as row-level security
    -- would make it.
    SELECT k.organization_id, k.id, k.name, k.display_prefix, k.scopes, k.project_id, k.environment_id,
           k.expires_at, k.revoked_at, k.usage_limit, k.usage_count, k.customer_id, k.allowed_ips, k.uses_of,
           k.rate_limits
      INTO old.organization_id, old.id, old.name, old.display_prefix, old.scopes, old.project_id,
           old.environment_id, old.expires_at, old.revoked_at, old.usage_limit, old.usage_count,
           old.customer_id, old.allowed_ips, old.uses_of, old.rate_limits
      FROM flagship.api_keys k WHERE (org IS NULL OR k.organization_id = org) AND k.id = key_id;
    IF old.id IS NULL THEN
        RAISE EXCEPTION 'key_id: api key % not found', key_id USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF NOT flagship.within_session_key(old.scopes, old.environment_id, old.expires_at, old.usage_limit,
                                       old.allowed_ips, old.customer_id) THEN
        RAISE EXCEPTION 'a key may not roll a key wider than itself'
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'roll it in a session of a member with api_keys:write, or with a key at least as wide';
    END IF;
    -- The row lock makes two concurrent rolls of one key queue; the second
    -- then finds it expired (or still within its grace) as the first left it.
    SELECT k.expires_at, k.revoked_at, k.usage_count INTO old.expires_at, old.revoked_at, old.usage_count
      FROM flagship.api_keys k WHERE k.organization_id = old.organization_id AND k.id = old.id FOR UPDATE;
    IF old.revoked_at IS NOT NULL OR (old.expires_at IS NOT NULL AND old.expires_at <= now()) THEN
        RAISE EXCEPTION 'key_id: api key % is revoked or expired', key_id
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'issue a new key with flagship.issue_api_key';
    END IF;
    plaintext := (CASE WHEN old.display_prefix LIKE 'fs_test_%' THEN 'fs_test_' ELSE 'fs_live_' END)
                 || replace(gen_random_uuid()::text, '-', '') || replace(gen_random_uuid()::text, '-', '');
    INSERT INTO flagship.api_keys
        (organization_id, name, display_prefix, key_hash, scopes, project_id, environment_id,
         expires_at, usage_limit, usage_count, customer_id, allowed_ips, rolled_from, uses_of, rate_limits)
    VALUES (old.organization_id, old.name, left(plaintext, 16), sha256(convert_to(plaintext, 'UTF8')),
            old.scopes, old.project_id, old.environment_id, old.expires_at, old.usage_limit,
            old.usage_count,
            old.customer_id, old.allowed_ips, old.id, coalesce(old.uses_of, old.id), old.rate_limits);
    UPDATE flagship.api_keys k
       SET expires_at = least(coalesce(k.expires_at, 'infinity'), now() + grace)
     WHERE k.organization_id = old.organization_id AND k.id = old.id;
    RETURN plaintext;
END
$fn$;

-- In key mode a key writes only keys within itself, into keys within
-- itself: it cannot lift its own limits, or another key's, with a plain
-- UPDATE (the api_keys:write policy alone would let it). Outside key mode
-- within_session_key is true.
CREATE POLICY api_keys_insert_within_key ON flagship.api_keys AS RESTRICTIVE FOR INSERT
    WITH CHECK (flagship.within_session_key(scopes, environment_id, expires_at, usage_limit,
                                            allowed_ips, customer_id));
-- A rate-limited key inserts only keys limited at least as tightly (the
-- column cannot be updated).
CREATE POLICY api_keys_insert_within_rate_limits ON flagship.api_keys AS RESTRICTIVE FOR INSERT
    WITH CHECK (flagship.within_session_rate_limits(rate_limits));
CREATE POLICY api_keys_update_within_key ON flagship.api_keys AS RESTRICTIVE FOR UPDATE
    USING (flagship.within_session_key(scopes, environment_id, expires_at, usage_limit,
                                       allowed_ips, customer_id))
    WITH CHECK (flagship.within_session_key(scopes, environment_id, expires_at, usage_limit,
                                            allowed_ips, customer_id));
CREATE POLICY api_keys_delete_within_key ON flagship.api_keys AS RESTRICTIVE FOR DELETE
    USING (flagship.within_session_key(scopes, environment_id, expires_at, usage_limit,
                                       allowed_ips, customer_id));

CREATE FUNCTION flagship.revoke_api_key(key_id uuid)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    org constant uuid := flagship.current_organization_id();
    revoked constant timestamptz := now();
BEGIN
    -- Another organization's key looks absent, as row-level security
    -- would make it. The organization and the time are values: Citus
    -- sends the statement to the organization's shard, and refuses a
    -- function call inside coalesce (#21).
    UPDATE flagship.api_keys k SET revoked_at = coalesce(k.revoked_at, revoked)
     WHERE (org IS NULL OR k.organization_id = org) AND k.id = key_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'key_id: api key % not found', key_id USING ERRCODE = 'invalid_parameter_value';
    END IF;
END
$fn$;
