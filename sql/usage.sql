-- Plans, entitlements, customers and metered usage.
--
-- Configuration (metrics, plans, plan_features, usage_limits, customers,
-- subscriptions, overrides) follows the same tenancy rules as flags. Usage
-- lives in two tables: usage_counters, one row per customer and metric (one
-- per slice of a sliced metric: see "Escrow slices" below) holding the
-- current period's total (what limit checks read and lock), and
-- usage_ledger, an append-only history of every consumption (billing export
-- and idempotency).
--
-- Locking design. A consumption is one conditional UPDATE of the counter
-- row: the row lock it takes serialises consumers of the same customer and
-- metric until commit, which is exactly what makes the limit exact, and
-- nothing else is locked, so different customers never wait for each
-- other. An idempotency key takes a transaction-scoped advisory lock on its
-- hash first, so a duplicate racing the first call waits for it to commit
-- and then replays its answer. The ledger has no foreign keys on purpose:
-- a foreign-key check would take a share lock on the hot customer row in
-- every transaction.

CREATE TABLE flagship.metrics (
    organization_id uuid        NOT NULL,
    project_id      uuid        NOT NULL,
    id              uuid        NOT NULL DEFAULT gen_random_uuid(),
    key             text        NOT NULL,
    name            text,
    unit            text,
    aggregation     text        NOT NULL DEFAULT 'sum',
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    -- 0.3.0: how many rows (escrow slices) each counter of a hard-limited
    -- sum is split into, so that consumers of one hot customer lock
    -- different rows (see "Escrow slices" below).
    slices          smallint    NOT NULL DEFAULT 1,
    PRIMARY KEY (organization_id, id),
    CONSTRAINT metrics_key_unique UNIQUE (organization_id, project_id, key),
    CONSTRAINT metrics_project_unique UNIQUE (organization_id, project_id, id),
    CONSTRAINT metrics_key_format CHECK (key ~ '^[a-z0-9][a-z0-9_.-]*$' AND length(key) <= 63),
    CONSTRAINT metrics_aggregation_valid CHECK (aggregation IN ('sum', 'gauge', 'credits')),
    CONSTRAINT metrics_slices_valid CHECK (slices BETWEEN 1 AND 64 AND (slices = 1 OR aggregation = 'sum')),
    FOREIGN KEY (organization_id, project_id)
        REFERENCES flagship.projects (organization_id, id) ON DELETE CASCADE
);

-- Whether `spec` is a valid set of rate limits (NULL: none), by the rules
-- of checked_rate_limits (one set of rules, read there); for CHECK
-- constraints, which cannot name the field at fault. A stored column holds
-- NULL, not '{}', for "none".
CREATE FUNCTION flagship.rate_limits_valid(spec jsonb) RETURNS boolean
LANGUAGE plpgsql
IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    IF spec IS NULL THEN
        RETURN true;
    END IF;
    IF jsonb_typeof(spec) <> 'object' OR spec = '{}' THEN
        RETURN false;
    END IF;
    PERFORM flagship.checked_rate_limits(spec, 'rate_limits');
    RETURN true;
EXCEPTION WHEN invalid_parameter_value THEN
    RETURN false;
END
$fn$;

CREATE TABLE flagship.plans (
    organization_id uuid        NOT NULL,
    project_id      uuid        NOT NULL,
    id              uuid        NOT NULL DEFAULT gen_random_uuid(),
    key             text        NOT NULL,
    name            text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    -- 0.3.0: `{name: {"limit", "window"}}` per customer, counted by
    -- flagship.rate_limit (put_plan names what is wrong; the CHECK holds
    -- plain SQL to the same).
    rate_limits     jsonb CONSTRAINT plans_rate_limits_valid CHECK (flagship.rate_limits_valid(rate_limits)),
    PRIMARY KEY (organization_id, id),
    CONSTRAINT plans_key_unique UNIQUE (organization_id, project_id, key),
    CONSTRAINT plans_project_unique UNIQUE (organization_id, project_id, id),
    CONSTRAINT plans_key_format CHECK (key ~ '^[a-z0-9][a-z0-9_.-]*$' AND length(key) <= 63),
    FOREIGN KEY (organization_id, project_id)
        REFERENCES flagship.projects (organization_id, id) ON DELETE CASCADE
);

-- Features are named by key, like prerequisites, so that tables restore in
-- any order; put_plan checks that the flag exists.
CREATE TABLE flagship.plan_features (
    organization_id uuid    NOT NULL,
    project_id      uuid    NOT NULL,
    plan_id         uuid    NOT NULL,
    feature_key     text    NOT NULL,
    enabled         boolean NOT NULL DEFAULT true,
    PRIMARY KEY (organization_id, plan_id, feature_key),
    FOREIGN KEY (organization_id, project_id, plan_id)
        REFERENCES flagship.plans (organization_id, project_id, id) ON DELETE CASCADE
);

-- The terms of one limit: shared by plan limits and customer overrides.
CREATE TABLE flagship.usage_limits (
    organization_id uuid   NOT NULL,
    project_id      uuid   NOT NULL,
    plan_id         uuid   NOT NULL,
    metric_id       uuid   NOT NULL,
    usage_limit     bigint,
    period          text   NOT NULL DEFAULT 'month',
    enforcement     text   NOT NULL DEFAULT 'hard',
    PRIMARY KEY (organization_id, plan_id, metric_id),
    CONSTRAINT usage_limits_limit_valid CHECK (usage_limit IS NULL OR usage_limit >= 0),
    CONSTRAINT usage_limits_period_valid
        CHECK (period IN ('none', 'hour', 'day', 'week', 'month', 'billing_month')),
    CONSTRAINT usage_limits_enforcement_valid CHECK (enforcement IN ('hard', 'soft')),
    FOREIGN KEY (organization_id, project_id, plan_id)
        REFERENCES flagship.plans (organization_id, project_id, id) ON DELETE CASCADE,
    FOREIGN KEY (organization_id, project_id, metric_id)
        REFERENCES flagship.metrics (organization_id, project_id, id) ON DELETE CASCADE
);

-- Credits a plan grants each period (0.3): `amount` of a credits metric
-- every `period`, plus what the previous period left, up to
-- `rollover_max`. Granted lazily, by the first consumption of a period.
CREATE TABLE flagship.plan_credits (
    organization_id uuid   NOT NULL,
    project_id      uuid   NOT NULL,
    plan_id         uuid   NOT NULL,
    metric_id       uuid   NOT NULL,
    amount          bigint NOT NULL,
    period          text   NOT NULL DEFAULT 'month',
    rollover_max    bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (organization_id, plan_id, metric_id),
    CONSTRAINT plan_credits_amount_valid CHECK (amount > 0),
    CONSTRAINT plan_credits_period_valid
        CHECK (period IN ('hour', 'day', 'week', 'month', 'billing_month')),
    CONSTRAINT plan_credits_rollover_valid CHECK (rollover_max >= 0),
    FOREIGN KEY (organization_id, project_id, plan_id)
        REFERENCES flagship.plans (organization_id, project_id, id) ON DELETE CASCADE,
    FOREIGN KEY (organization_id, project_id, metric_id)
        REFERENCES flagship.metrics (organization_id, project_id, id) ON DELETE CASCADE
);

CREATE TABLE flagship.customers (
    organization_id uuid        NOT NULL,
    project_id      uuid        NOT NULL,
    environment_id  uuid        NOT NULL,
    id              uuid        NOT NULL DEFAULT gen_random_uuid(),
    external_key    text        NOT NULL,
    name            text,
    attributes      jsonb       NOT NULL DEFAULT '{}',
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (organization_id, id),
    CONSTRAINT customers_key_unique UNIQUE (organization_id, environment_id, external_key),
    CONSTRAINT customers_project_unique UNIQUE (organization_id, project_id, id),
    CONSTRAINT customers_key_present
        CHECK (length(btrim(external_key)) > 0 AND length(external_key) <= 200),
    CONSTRAINT customers_attributes_object CHECK (jsonb_typeof(attributes) = 'object'),
    -- Raises 22023 naming the customer when the attributes nest too deep to
    -- load back (evaluation reads them as customer.*).
    CONSTRAINT customers_attributes_loadable
        CHECK (flagship.check_stored_value('customer "' || external_key || '": attributes', attributes)),
    FOREIGN KEY (organization_id, project_id, environment_id)
        REFERENCES flagship.environments (organization_id, project_id, id) ON DELETE CASCADE
);

-- Usage calls find customers by environment and key alone.
CREATE INDEX customers_environment_key ON flagship.customers (environment_id, external_key);

-- A customer's current subscription (one at a time).
CREATE TABLE flagship.subscriptions (
    organization_id uuid        NOT NULL,
    project_id      uuid        NOT NULL,
    customer_id     uuid        NOT NULL,
    plan_id         uuid        NOT NULL,
    status          text        NOT NULL DEFAULT 'active',
    trial_ends_at   timestamptz,
    billing_anchor  timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (organization_id, customer_id),
    CONSTRAINT subscriptions_status_valid CHECK (status IN ('active', 'trialing', 'canceled')),
    CONSTRAINT subscriptions_trial_has_end CHECK (status <> 'trialing' OR trial_ends_at IS NOT NULL),
    FOREIGN KEY (organization_id, project_id, customer_id)
        REFERENCES flagship.customers (organization_id, project_id, id) ON DELETE CASCADE,
    FOREIGN KEY (organization_id, project_id, plan_id)
        REFERENCES flagship.plans (organization_id, project_id, id)
);

-- Add-ons and exceptions for one customer, on top of (or instead of) the plan.
CREATE TABLE flagship.customer_feature_overrides (
    organization_id uuid    NOT NULL,
    customer_id     uuid    NOT NULL,
    feature_key     text    NOT NULL,
    enabled         boolean NOT NULL,
    PRIMARY KEY (organization_id, customer_id, feature_key),
    FOREIGN KEY (organization_id, customer_id)
        REFERENCES flagship.customers (organization_id, id) ON DELETE CASCADE
);

CREATE TABLE flagship.customer_limit_overrides (
    organization_id uuid   NOT NULL,
    project_id      uuid   NOT NULL,
    customer_id     uuid   NOT NULL,
    metric_id       uuid   NOT NULL,
    usage_limit     bigint,
    period          text   NOT NULL DEFAULT 'month',
    enforcement     text   NOT NULL DEFAULT 'hard',
    PRIMARY KEY (organization_id, customer_id, metric_id),
    CONSTRAINT customer_limit_overrides_limit_valid CHECK (usage_limit IS NULL OR usage_limit >= 0),
    CONSTRAINT customer_limit_overrides_period_valid
        CHECK (period IN ('none', 'hour', 'day', 'week', 'month', 'billing_month')),
    CONSTRAINT customer_limit_overrides_enforcement_valid CHECK (enforcement IN ('hard', 'soft')),
    FOREIGN KEY (organization_id, project_id, customer_id)
        REFERENCES flagship.customers (organization_id, project_id, id) ON DELETE CASCADE,
    FOREIGN KEY (organization_id, project_id, metric_id)
        REFERENCES flagship.metrics (organization_id, project_id, id) ON DELETE CASCADE
);

-- The current period's total per customer and metric. `period_start` is
-- NULL for limits that never reset; a row whose period_start is older than
-- the current period's counts as zero (lazy rollover).
CREATE TABLE flagship.usage_counters (
    organization_id uuid        NOT NULL,
    customer_id     uuid        NOT NULL,
    metric_id       uuid        NOT NULL,
    period_start    timestamptz,
    used            bigint      NOT NULL DEFAULT 0,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    -- 0.3.0, escrow slices: a counter of a sliced metric is several rows
    -- (slice 0, 1, ...); its use is their sum. While a slice's split_limit
    -- is the limit in force, its `cap` is its share of that limit (the caps
    -- of a counter's slices sum to it) and a consumer may fill it without
    -- looking at the other slices. An unsliced counter is slice 0 alone,
    -- without a cap.
    slice           smallint    NOT NULL DEFAULT 0,
    cap             bigint,
    split_limit     bigint,
    PRIMARY KEY (organization_id, customer_id, metric_id, slice),
    FOREIGN KEY (organization_id, customer_id)
        REFERENCES flagship.customers (organization_id, id) ON DELETE CASCADE,
    FOREIGN KEY (organization_id, metric_id)
        REFERENCES flagship.metrics (organization_id, id) ON DELETE CASCADE
);

CREATE SEQUENCE flagship.usage_ledger_id_seq;
CREATE TABLE flagship.usage_ledger (
    organization_id uuid        NOT NULL,
    id              bigint      NOT NULL DEFAULT nextval('flagship.usage_ledger_id_seq'),
    customer_id     uuid        NOT NULL,
    metric_id       uuid        NOT NULL,
    kind            text        NOT NULL,
    amount          bigint      NOT NULL,
    used_after      bigint      NOT NULL,
    period_start    timestamptz,
    idempotency_key text,
    -- The terms the change was granted under (limit NULL: unlimited), from
    -- which an idempotent replay rebuilds the first answer.
    usage_limit     bigint,
    enforcement     text        NOT NULL,
    resets_at       timestamptz,
    recorded_at     timestamptz NOT NULL DEFAULT now(),
    -- 0.3.0: which credit grants paid for a consumption of a credits
    -- metric, [{"grant": id, "amount": n}] (billing export).
    paid_by         jsonb,
    PRIMARY KEY (organization_id, id)
);
ALTER SEQUENCE flagship.usage_ledger_id_seq OWNED BY flagship.usage_ledger.id;
CREATE UNIQUE INDEX usage_ledger_idempotency
    ON flagship.usage_ledger (organization_id, customer_id, metric_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
-- A key belongs to the organization: record_usage finds its first use
-- whatever the customer and metric, to refuse a reuse for another call.
CREATE INDEX usage_ledger_idempotency_by_key
    ON flagship.usage_ledger (organization_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
-- No time index: `id` grows with time, so billing exports read id ranges
-- through the primary key, and every extra index would slow each consumption.

-- The ledger is history: nobody edits it.
CREATE FUNCTION flagship.usage_ledger_append_only() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    RAISE EXCEPTION 'usage_ledger is append-only: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$fn$;
CREATE TRIGGER usage_ledger_append_only BEFORE UPDATE OR DELETE ON flagship.usage_ledger
    FOR EACH ROW EXECUTE FUNCTION flagship.usage_ledger_append_only();
CREATE TRIGGER usage_ledger_no_truncate BEFORE TRUNCATE ON flagship.usage_ledger
    FOR EACH STATEMENT EXECUTE FUNCTION flagship.usage_ledger_append_only();

-- One statement per table: each call updates the pg_extension row.
DO $dump$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['metrics', 'plans', 'plan_features', 'usage_limits', 'plan_credits', 'customers',
                             'subscriptions', 'customer_feature_overrides', 'customer_limit_overrides',
                             'usage_counters', 'usage_ledger', 'usage_ledger_id_seq'] LOOP
        PERFORM pg_catalog.pg_extension_config_dump(('flagship.' || t)::regclass, '');
    END LOOP;
END
$dump$;

SELECT flagship.isolate_tenant_table(t, 'plans:write')
  FROM unnest(ARRAY['metrics', 'plans', 'plan_features', 'usage_limits', 'plan_credits', 'customers',
                    'subscriptions', 'customer_feature_overrides', 'customer_limit_overrides']) AS t;
-- Consuming usage is what applications do: no member permission involved.
SELECT flagship.isolate_tenant_table(t)
  FROM unnest(ARRAY['usage_counters', 'usage_ledger']) AS t;
-- Only these kinds of change exist (`release`: what a reservation gave back). This is a restrictive policy rather than a
-- CHECK constraint because PostgreSQL parses a table's CHECK expressions
-- afresh for every INSERT statement, which cost 14% of each record_usage;
-- policies are kept parsed with the table. Like every policy it binds all
-- but superusers and BYPASSRLS roles (the ledger forces row security, so
-- its owner too).
CREATE POLICY usage_ledger_kind_valid ON flagship.usage_ledger AS RESTRICTIVE
    FOR INSERT WITH CHECK (kind IN ('record', 'set', 'credits', 'release'));

-- Consumption changes only through record_usage and set_usage: the table
-- grants below exist for those functions, which run as their caller, and
-- these policies refuse any write they do not make (a restrictive policy
-- binds every role but superusers and BYPASSRLS roles).
CREATE POLICY usage_counters_insert_by_functions ON flagship.usage_counters AS RESTRICTIVE
    FOR INSERT WITH CHECK ((SELECT flagship.usage_writes_open()));
CREATE POLICY usage_counters_update_by_functions ON flagship.usage_counters AS RESTRICTIVE
    FOR UPDATE USING ((SELECT flagship.usage_writes_open()));
CREATE POLICY usage_counters_delete_by_functions ON flagship.usage_counters AS RESTRICTIVE
    FOR DELETE USING ((SELECT flagship.usage_writes_open()));
CREATE POLICY usage_ledger_insert_by_functions ON flagship.usage_ledger AS RESTRICTIVE
    FOR INSERT WITH CHECK ((SELECT flagship.usage_writes_open()));

GRANT SELECT ON flagship.metrics, flagship.plans, flagship.plan_features, flagship.usage_limits, flagship.plan_credits,
                flagship.customers, flagship.subscriptions, flagship.customer_feature_overrides,
                flagship.customer_limit_overrides, flagship.usage_counters, flagship.usage_ledger
    TO flagship_admin, flagship_app, flagship_auditor;
GRANT INSERT, UPDATE, DELETE ON flagship.metrics, flagship.plans, flagship.plan_features,
                                flagship.usage_limits, flagship.plan_credits, flagship.customers, flagship.subscriptions,
                                flagship.customer_feature_overrides,
                                flagship.customer_limit_overrides
    TO flagship_admin;
-- Consuming usage is the application's job; the ledger only grows.
GRANT INSERT, UPDATE ON flagship.usage_counters TO flagship_app, flagship_admin;
GRANT INSERT ON flagship.usage_ledger TO flagship_app, flagship_admin;
GRANT USAGE ON SEQUENCE flagship.usage_ledger_id_seq TO flagship_app, flagship_admin;

-- Escrow slices (0.3) ---------------------------------------------------------
--
-- One hot customer is capped by its counter row: each consumer holds the
-- row lock until its commit record is flushed. A metric with "slices": N
-- splits each counter into N rows whose caps sum to the limit (O'Neil's
-- escrow): record_usage takes a free slice with room (its backend's first,
-- SKIP LOCKED, so it never waits) and fills it within its cap. When no
-- free slice has room, rebalance_slices locks every slice of the counter
-- in slice order (the one order every rebalancing takes, so two of them
-- never deadlock), sums them, refuses exactly when the sum leaves no room,
-- and otherwise consumes and shares the headroom left out as new caps.
-- A slice whose split_limit is not the limit in force (the limit changed,
-- or the slice is new) has no usable cap until a rebalancing, so lowering
-- a limit holds at once.
--
-- Returns whether `amount` was consumed and the counter's use afterwards
-- (or, refused, as it is). Called by record_usage with usage writes open.
CREATE FUNCTION flagship.rebalance_slices(
    org uuid, customer uuid, metric uuid, period timestamptz, amount bigint, hard_limit bigint,
    slice_count integer, preferred integer, OUT granted boolean, OUT used_after bigint)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    total bigint := 0;
    headroom bigint;
BEGIN
    INSERT INTO flagship.usage_counters (organization_id, customer_id, metric_id, slice, period_start, used)
    SELECT org, customer, metric, i, period, 0 FROM generate_series(0, slice_count - 1) AS i
    ON CONFLICT DO NOTHING;
    -- Twice: the first statement waits for the slices it sees, in slice
    -- order; the second, under a snapshot taken once it holds them, also
    -- sees (and locks, still in order: they come after) slices another
    -- consumer created meanwhile when the metric's split was raised, which
    -- the first statement's snapshot may have missed. It alone counts.
    PERFORM 1 FROM flagship.usage_counters c
      WHERE c.organization_id = org AND c.customer_id = customer AND c.metric_id = metric
      ORDER BY c.slice
        FOR UPDATE;
    SELECT coalesce(sum(u.used), 0) INTO total FROM (
        SELECT CASE WHEN c.period_start IS NOT DISTINCT FROM period THEN c.used ELSE 0 END AS used
          FROM flagship.usage_counters c
         WHERE c.organization_id = org AND c.customer_id = customer AND c.metric_id = metric
         ORDER BY c.slice
           FOR UPDATE) u;
    IF hard_limit IS NOT NULL AND total + amount > hard_limit THEN
        granted := false;
        used_after := total;
        RETURN;
    END IF;
    headroom := coalesce(hard_limit - total - amount, 0);
    -- Slices 0 .. slice_count - 1 share the headroom (the first ones one
    -- more each until the remainder is gone); slices left over from a
    -- larger split keep what they hold and get no room.
    UPDATE flagship.usage_counters c
       SET used = u.used + u.taken,
           period_start = period,
           split_limit = hard_limit,
           cap = CASE WHEN hard_limit IS NOT NULL THEN
                     u.used + u.taken + CASE WHEN c.slice < slice_count THEN
                         headroom / slice_count + CASE WHEN c.slice < headroom % slice_count THEN 1 ELSE 0 END
                     ELSE 0 END
                 END,
           updated_at = now()
      FROM (SELECT c2.slice,
                   CASE WHEN c2.period_start IS NOT DISTINCT FROM period THEN c2.used ELSE 0 END AS used,
                   CASE WHEN c2.slice = preferred THEN amount ELSE 0 END AS taken
              FROM flagship.usage_counters c2
             WHERE c2.organization_id = org AND c2.customer_id = customer AND c2.metric_id = metric) u
     WHERE c.organization_id = org AND c.customer_id = customer AND c.metric_id = metric
       AND c.slice = u.slice;
    granted := true;
    used_after := total + amount;
END
$fn$;
REVOKE ALL ON FUNCTION flagship.rebalance_slices(uuid, uuid, uuid, timestamptz, bigint, bigint, integer, integer)
    FROM PUBLIC;
GRANT EXECUTE ON FUNCTION flagship.rebalance_slices(uuid, uuid, uuid, timestamptz, bigint, bigint, integer, integer)
    TO flagship_app, flagship_admin;

-- Prepaid credits (0.3) ------------------------------------------------------
--
-- A metric with "aggregation": "credits" is consumed from the customer's
-- grants instead of counted against a limit: grant_credits adds one (with
-- an optional expiry), record_usage takes from the live grant that expires
-- first (then the next), locking the grants it reads in one fixed order so
-- racing consumers queue instead of deadlocking, and never lets a balance
-- go below zero (CREDITS_EXHAUSTED, nothing recorded). A rollback refunds.
CREATE TABLE flagship.credit_grants (
    organization_id uuid        NOT NULL,
    id              uuid        NOT NULL DEFAULT gen_random_uuid(),
    customer_id     uuid        NOT NULL,
    metric_id       uuid        NOT NULL,
    amount          bigint      NOT NULL,
    remaining       bigint      NOT NULL,
    expires_at      timestamptz,
    idempotency_key text,
    granted_at      timestamptz NOT NULL DEFAULT now(),
    -- 'grant' (grant_credits) or 'plan' (a plan's grant for the period
    -- starting at period_start, made by the period's first consumption).
    source          text        NOT NULL DEFAULT 'grant',
    period_start    timestamptz,
    PRIMARY KEY (organization_id, id),
    FOREIGN KEY (organization_id, customer_id)
        REFERENCES flagship.customers (organization_id, id) ON DELETE CASCADE,
    FOREIGN KEY (organization_id, metric_id)
        REFERENCES flagship.metrics (organization_id, id) ON DELETE CASCADE,
    CONSTRAINT credit_grants_amounts_valid CHECK (amount > 0 AND remaining BETWEEN 0 AND amount),
    CONSTRAINT credit_grants_source_valid
        CHECK (source = 'grant' OR (source = 'plan' AND period_start IS NOT NULL))
);
CREATE INDEX credit_grants_live ON flagship.credit_grants (organization_id, customer_id, metric_id, expires_at)
    WHERE remaining > 0;
CREATE UNIQUE INDEX credit_grants_idempotency ON flagship.credit_grants (organization_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
-- One plan grant per customer, metric and period, however many consumers
-- race to make it.
CREATE UNIQUE INDEX credit_grants_plan_period
    ON flagship.credit_grants (organization_id, customer_id, metric_id, period_start)
    WHERE source = 'plan';
SELECT pg_catalog.pg_extension_config_dump('flagship.credit_grants', '');
ALTER TABLE flagship.credit_grants ENABLE ROW LEVEL SECURITY;
ALTER TABLE flagship.credit_grants FORCE ROW LEVEL SECURITY;
-- Everyone of the organization reads balances; grants are added only by
-- grant_credits for an actor with plans:write (and a plan's own grants by
-- the usage functions), and balances move only while record_usage or
-- grant_credits run.
CREATE POLICY credit_grants_tenant ON flagship.credit_grants FOR SELECT
    USING (organization_id = (SELECT flagship.current_organization_id()));
CREATE POLICY credit_grants_insert ON flagship.credit_grants FOR INSERT
    WITH CHECK (organization_id = (SELECT flagship.current_organization_id())
                AND (source = 'plan' OR (SELECT flagship.actor_may('plans:write')))
                AND (SELECT flagship.usage_writes_open()));
CREATE POLICY credit_grants_update ON flagship.credit_grants FOR UPDATE
    USING (organization_id = (SELECT flagship.current_organization_id())
           AND (SELECT flagship.usage_writes_open()));
CREATE POLICY credit_grants_delete ON flagship.credit_grants FOR DELETE
    USING (organization_id = (SELECT flagship.current_organization_id())
           AND (SELECT flagship.actor_may('plans:write')));
GRANT SELECT ON flagship.credit_grants TO flagship_admin, flagship_app, flagship_auditor;

-- The size of a plan's grant for the period starting at `period_start`:
-- `amount`, plus what the previous period's plan grant left, up to
-- `rollover_max`. After periods with no grant at all (nothing consumed,
-- so nothing was granted) the rollover is least(rollover_max, amount): an
-- unused period would have left at least its own amount.
CREATE FUNCTION flagship.plan_grant_amount(organization_id uuid, customer_id uuid, metric_id uuid,
                                           amount bigint, period_start timestamptz, rollover_max bigint)
RETURNS bigint
LANGUAGE plpgsql
STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
-- PL/pgSQL: Citus cannot plan a SQL function's statements that take
-- parameters, and here the organization is a value of each (#21).
BEGIN
    RETURN (
        SELECT plan_grant_amount.amount + coalesce((
            SELECT CASE WHEN g.expires_at = plan_grant_amount.period_start
                        THEN least(plan_grant_amount.rollover_max, g.remaining)
                        ELSE least(plan_grant_amount.rollover_max, plan_grant_amount.amount) END
              FROM flagship.credit_grants g
             WHERE g.organization_id = plan_grant_amount.organization_id
               AND g.customer_id = plan_grant_amount.customer_id AND g.metric_id = plan_grant_amount.metric_id
               AND g.source = 'plan' AND g.period_start < plan_grant_amount.period_start
             ORDER BY g.period_start DESC
             LIMIT 1), 0));
END
$fn$;
-- Applications insert only a plan's own grants, inside the usage
-- functions (the insert policy); members with plans:write any grant.
GRANT INSERT ON flagship.credit_grants TO flagship_admin, flagship_app;
GRANT DELETE ON flagship.credit_grants TO flagship_admin;
GRANT UPDATE (remaining) ON flagship.credit_grants TO flagship_admin, flagship_app;

-- Plan-kind flags and limit checks read metrics, plans, customers,
-- subscriptions and overrides: any change there marks every backend's
-- cached entitlements and limit terms stale (flags stay compiled).
SELECT flagship.invalidate_on_change(t, 'flagship.customers'),
       flagship.version_on_change(t, 'entitlements', 'organization_id')
  FROM unnest(ARRAY['metrics', 'plans', 'plan_features', 'usage_limits', 'plan_credits', 'customers',
                    'subscriptions', 'customer_feature_overrides',
                    'customer_limit_overrides']) AS t;

-- Documents ------------------------------------------------------------------

-- Raises 22023 naming the field when `value` is not what `expected` says.
CREATE FUNCTION flagship.refuse(field text, message text) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    RAISE EXCEPTION '%: %', field, message USING ERRCODE = 'invalid_parameter_value';
END
$fn$;

-- Raises a refusal of one object's document again, naming the object
-- first: `<kind> "<key>": <field>: <message>` (a message that starts with
-- the kind loses it), as 22023 with its hint.
CREATE FUNCTION flagship.refuse_about(kind text, key text, message text, hint text) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    refused constant text := format('%s "%s": %s', kind, coalesce(key, '?'),
                                     regexp_replace(message, '^' || kind || ': ', ''));
BEGIN
    IF coalesce(hint, '') = '' THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value', MESSAGE = refused;
    END IF;
    RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value', MESSAGE = refused, HINT = hint;
END
$fn$;

CREATE FUNCTION flagship.require_object(document jsonb, field text, allowed text[]) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    unknown text;
BEGIN
    IF document IS NULL OR jsonb_typeof(document) <> 'object' THEN
        PERFORM flagship.refuse(field, 'must be a JSON object');
    END IF;
    SELECT k INTO unknown FROM jsonb_object_keys(document) k WHERE k <> ALL (allowed) LIMIT 1;
    IF unknown IS NOT NULL THEN
        PERFORM flagship.refuse(field, format('unknown field "%s"', unknown));
    END IF;
END
$fn$;

-- Validates one limit specification ({"limit", "period", "enforcement"}) and
-- returns it with defaults filled in: sums reset monthly, gauges never.
CREATE FUNCTION flagship.limit_terms(spec jsonb, field text, aggregation text) RETURNS jsonb
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    limit_value jsonb;
    period text;
    enforcement text;
BEGIN
    PERFORM flagship.require_object(spec, field, '{limit,period,enforcement}');
    limit_value := coalesce(spec->'limit', 'null');
    IF jsonb_typeof(limit_value) NOT IN ('null', 'number')
       OR (jsonb_typeof(limit_value) = 'number'
           AND (limit_value::numeric < 0 OR limit_value::numeric <> trunc(limit_value::numeric)
                OR limit_value::numeric > 9000000000000000000)) THEN
        PERFORM flagship.refuse(field || '.limit', 'must be a non-negative integer, or null for unlimited');
    END IF;
    period := coalesce(spec->>'period', CASE WHEN aggregation = 'gauge' THEN 'none' ELSE 'month' END);
    IF period NOT IN ('none', 'hour', 'day', 'week', 'month', 'billing_month') THEN
        PERFORM flagship.refuse(field || '.period',
            format('unknown period "%s" (none, hour, day, week, month, billing_month)', period));
    END IF;
    enforcement := coalesce(spec->>'enforcement', 'hard');
    IF enforcement NOT IN ('hard', 'soft') THEN
        PERFORM flagship.refuse(field || '.enforcement', format('must be hard or soft, not "%s"', enforcement));
    END IF;
    RETURN jsonb_build_object('limit', limit_value, 'period', period, 'enforcement', enforcement);
END
$fn$;

CREATE FUNCTION flagship.check_key_format(key text, field text) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    IF coalesce(key, '') !~ '^[a-z0-9][a-z0-9_.-]*$' THEN
        PERFORM flagship.refuse(field, 'must be lowercase letters, digits, ".", "_" or "-"');
    END IF;
END
$fn$;

-- `{flag key: true|false}` of a plan or a customer's overrides, checked:
-- every value a boolean, every flag one of the project's.
CREATE FUNCTION flagship.feature_switches(in_organization uuid, in_project uuid, switches jsonb, field text)
RETURNS TABLE (feature_key text, enabled boolean)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    item record;
BEGIN
    FOR item IN SELECT * FROM jsonb_each(coalesce(switches, '{}')) LOOP
        IF jsonb_typeof(item.value) <> 'boolean' THEN
            PERFORM flagship.refuse(field || '.' || item.key, 'must be true or false');
        END IF;
        IF NOT EXISTS (SELECT 1 FROM flagship.features f
                        WHERE f.organization_id = in_organization AND f.project_id = in_project
                          AND f.key = item.key) THEN
            PERFORM flagship.refuse(field || '.' || item.key, format('unknown flag "%s"', item.key));
        END IF;
        feature_key := item.key;
        enabled := item.value::boolean;
        RETURN NEXT;
    END LOOP;
END
$fn$;

-- `{metric key: limit}` of a plan or a customer's overrides, checked and
-- with defaults filled in (see limit_terms).
CREATE FUNCTION flagship.metric_limits(in_organization uuid, in_project uuid, limits jsonb, field text)
RETURNS TABLE (metric_id uuid, usage_limit bigint, period text, enforcement text)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    item record;
    metric_row flagship.metrics;
    terms jsonb;
BEGIN
    FOR item IN SELECT * FROM jsonb_each(coalesce(limits, '{}')) LOOP
        SELECT * INTO metric_row FROM flagship.metrics m
         WHERE m.organization_id = in_organization AND m.project_id = in_project AND m.key = item.key;
        IF NOT FOUND THEN
            PERFORM flagship.refuse(field || '.' || item.key, format('unknown metric "%s"', item.key));
        END IF;
        IF metric_row.aggregation = 'credits' THEN
            PERFORM flagship.refuse(field || '.' || item.key,
                'counts credits, which have a balance, not a limit (grant them with flagship.grant_credits)');
        END IF;
        terms := flagship.limit_terms(item.value, field || '.' || item.key, metric_row.aggregation);
        metric_id := metric_row.id;
        usage_limit := (terms->>'limit')::bigint;
        period := terms->>'period';
        enforcement := terms->>'enforcement';
        RETURN NEXT;
    END LOOP;
END
$fn$;

-- `{credits metric key: {"amount", "period", "rollover": {"max"}}}` of a
-- plan, checked, with defaults (month, no rollover) filled in.
CREATE FUNCTION flagship.plan_credit_terms(in_organization uuid, in_project uuid, credits jsonb, field text)
RETURNS TABLE (metric_id uuid, amount bigint, period text, rollover_max bigint)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    item record;
    metric_row flagship.metrics;
    path text;
BEGIN
    FOR item IN SELECT * FROM jsonb_each(coalesce(credits, '{}')) LOOP
        path := field || '.' || item.key;
        SELECT * INTO metric_row FROM flagship.metrics m
         WHERE m.organization_id = in_organization AND m.project_id = in_project AND m.key = item.key;
        IF NOT FOUND THEN
            PERFORM flagship.refuse(path, format('unknown metric "%s"', item.key));
        ELSIF metric_row.aggregation <> 'credits' THEN
            PERFORM flagship.refuse(path, 'the metric does not count credits (give it "aggregation": "credits")');
        END IF;
        PERFORM flagship.require_object(item.value, path, '{amount,period,rollover}');
        IF jsonb_typeof(item.value->'amount') IS DISTINCT FROM 'number'
           OR (item.value->>'amount')::numeric <> trunc((item.value->>'amount')::numeric)
           OR (item.value->>'amount')::numeric NOT BETWEEN 1 AND 1000000000000 THEN
            PERFORM flagship.refuse(path || '.amount', 'must be a whole number of credits from 1 to 10^12');
        END IF;
        period := coalesce(item.value->>'period', 'month');
        IF period NOT IN ('hour', 'day', 'week', 'month', 'billing_month') THEN
            PERFORM flagship.refuse(path || '.period',
                format('unknown period "%s" (hour, day, week, month, billing_month)', period));
        END IF;
        PERFORM flagship.require_object(coalesce(item.value->'rollover', '{}'), path || '.rollover', '{max}');
        IF item.value->'rollover' ? 'max'
           AND (jsonb_typeof(item.value->'rollover'->'max') <> 'number'
                OR (item.value->'rollover'->>'max')::numeric <> trunc((item.value->'rollover'->>'max')::numeric)
                OR (item.value->'rollover'->>'max')::numeric NOT BETWEEN 0 AND 1000000000000) THEN
            PERFORM flagship.refuse(path || '.rollover.max', 'must be a whole number of credits from 0 to 10^12');
        END IF;
        metric_id := metric_row.id;
        amount := (item.value->>'amount')::bigint;
        rollover_max := coalesce((item.value->'rollover'->>'max')::bigint, 0);
        RETURN NEXT;
    END LOOP;
END
$fn$;

-- `{name: {"limit": n, "window": "1m"}}` of a plan or key, checked
-- (windows 1s..1d); NULL for none.
CREATE FUNCTION flagship.checked_rate_limits(spec jsonb, field text) RETURNS jsonb
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    item record;
    path text;
BEGIN
    IF spec IS NULL OR spec = 'null' OR spec = '{}' THEN
        RETURN NULL;
    END IF;
    IF jsonb_typeof(spec) <> 'object' THEN
        PERFORM flagship.refuse(field, 'must be an object of rate limit name to {"limit", "window"}');
    END IF;
    FOR item IN SELECT * FROM jsonb_each(spec) LOOP
        path := field || '.' || item.key;
        IF item.key !~ '^[a-z0-9][a-z0-9_.-]*$' OR length(item.key) > 63 THEN
            PERFORM flagship.refuse(path, 'a rate limit name is lower-case letters, digits, "_", "." and "-" (at most 63)');
        END IF;
        PERFORM flagship.require_object(item.value, path, '{limit,window}');
        IF jsonb_typeof(item.value->'limit') IS DISTINCT FROM 'number'
           OR (item.value->>'limit')::numeric <> trunc((item.value->>'limit')::numeric)
           OR (item.value->>'limit')::numeric NOT BETWEEN 1 AND 1000000000 THEN
            PERFORM flagship.refuse(path || '.limit', 'must be a whole number of requests from 1 to 10^9');
        END IF;
        IF jsonb_typeof(item.value->'window') IS DISTINCT FROM 'string'
           OR flagship.rate_window_us(item.value->>'window') IS NULL THEN
            PERFORM flagship.refuse(path || '.window',
                format('%s is not a window from 1s to 1d (a whole number and s, m, h or d, such as "1m")',
                       coalesce(item.value->'window', 'null')));
        END IF;
    END LOOP;
    RETURN spec;
END
$fn$;

CREATE FUNCTION flagship.put_metric(project text, definition jsonb) RETURNS uuid
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    refused text;
    refused_hint text;
    project_row flagship.projects := flagship.project_row(project);
    saved uuid;
    -- NULL: not given, which keeps an existing metric's split.
    slice_count smallint;
BEGIN
    PERFORM flagship.require_permission('plans:write', 'put_metric');
    PERFORM flagship.require_object(definition, 'metric', '{key,name,unit,aggregation,description,slices}');
    PERFORM flagship.check_key_format(definition->>'key', 'key');
    IF coalesce(definition->>'aggregation', 'sum') NOT IN ('sum', 'gauge', 'credits') THEN
        PERFORM flagship.refuse('aggregation', 'must be sum, gauge or credits');
    END IF;
    IF definition ? 'slices' AND jsonb_typeof(definition->'slices') IS DISTINCT FROM 'null' THEN
        IF jsonb_typeof(definition->'slices') <> 'number' OR (definition->>'slices')::numeric NOT BETWEEN 1 AND 64
           OR (definition->>'slices')::numeric <> trunc((definition->>'slices')::numeric) THEN
            PERFORM flagship.refuse('slices', 'must be a whole number from 1 to 64');
        END IF;
        slice_count := (definition->>'slices')::smallint;
        IF slice_count > 1 AND coalesce(definition->>'aggregation', 'sum') <> 'sum' THEN
            PERFORM flagship.refuse('slices', 'only a sum can be split into slices (gauges are set, credits are grants)');
        END IF;
    END IF;
    -- Counters of a sliced metric have several rows: going back to one
    -- would have to merge the rows of running periods under every
    -- consumer's feet. Fewer slices (at least 2) are fine: consumers use
    -- whichever rows exist.
    IF slice_count = 1 AND EXISTS (SELECT 1 FROM flagship.metrics m
                                    WHERE m.organization_id = project_row.organization_id
                                      AND m.project_id = project_row.id AND m.key = definition->>'key'
                                      AND m.slices > 1) THEN
        PERFORM flagship.refuse('slices', 'a sliced metric keeps at least 2 slices (to count in one row again, meter a new metric)');
    END IF;
    -- DO UPDATE takes the time from the row it would have inserted: Citus
    -- refuses a call there that is not IMMUTABLE, such as now() (#21).
    INSERT INTO flagship.metrics AS m (organization_id, project_id, key, name, unit, aggregation, slices)
    VALUES (project_row.organization_id, project_row.id, definition->>'key', definition->>'name',
            definition->>'unit', coalesce(definition->>'aggregation', 'sum'), coalesce(slice_count, 1))
    ON CONFLICT ON CONSTRAINT metrics_key_unique DO UPDATE
       SET name = EXCLUDED.name, unit = EXCLUDED.unit, aggregation = EXCLUDED.aggregation,
           slices = coalesce(slice_count, m.slices), updated_at = EXCLUDED.updated_at
    RETURNING m.id INTO saved;
    RETURN saved;
EXCEPTION WHEN invalid_parameter_value THEN
    -- Every refusal names the metric it is about, then the field.
    GET STACKED DIAGNOSTICS refused = MESSAGE_TEXT, refused_hint = PG_EXCEPTION_HINT;
    PERFORM flagship.refuse_about('metric', definition->>'key', refused, refused_hint);
END
$fn$;

CREATE FUNCTION flagship.put_plan(project text, definition jsonb) RETURNS uuid
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    refused text;
    refused_hint text;
    project_row flagship.projects;
    saved uuid;
BEGIN
    PERFORM flagship.require_permission('plans:write', 'put_plan');
    project_row := flagship.project_row(project);
    PERFORM flagship.require_object(definition, 'plan', '{key,name,features,limits,credits,rate_limits}');
    PERFORM flagship.check_key_format(definition->>'key', 'key');
    IF jsonb_typeof(coalesce(definition->'features', '{}')) <> 'object' THEN
        PERFORM flagship.refuse('features', 'must be an object of flag key to true/false');
    END IF;
    IF jsonb_typeof(coalesce(definition->'limits', '{}')) <> 'object' THEN
        PERFORM flagship.refuse('limits', 'must be an object of metric key to limit');
    END IF;
    IF jsonb_typeof(coalesce(definition->'credits', '{}')) <> 'object' THEN
        PERFORM flagship.refuse('credits', 'must be an object of credits metric key to {"amount", "period", "rollover"}');
    END IF;

    INSERT INTO flagship.plans AS p (organization_id, project_id, key, name, rate_limits)
    VALUES (project_row.organization_id, project_row.id, definition->>'key', definition->>'name',
            flagship.checked_rate_limits(definition->'rate_limits', 'rate_limits'))
    ON CONFLICT ON CONSTRAINT plans_key_unique DO UPDATE
       SET name = EXCLUDED.name, rate_limits = EXCLUDED.rate_limits, updated_at = EXCLUDED.updated_at
    RETURNING p.id INTO saved;

    DELETE FROM flagship.plan_features f WHERE f.organization_id = project_row.organization_id AND f.plan_id = saved;
    INSERT INTO flagship.plan_features (organization_id, project_id, plan_id, feature_key, enabled)
    SELECT project_row.organization_id, project_row.id, saved, s.feature_key, s.enabled
      FROM flagship.feature_switches(project_row.organization_id, project_row.id,
                                     definition->'features', 'features') s;

    DELETE FROM flagship.usage_limits l WHERE l.organization_id = project_row.organization_id AND l.plan_id = saved;
    INSERT INTO flagship.usage_limits
        (organization_id, project_id, plan_id, metric_id, usage_limit, period, enforcement)
    SELECT project_row.organization_id, project_row.id, saved, t.metric_id, t.usage_limit, t.period, t.enforcement
      FROM flagship.metric_limits(project_row.organization_id, project_row.id,
                                  definition->'limits', 'limits') t;

    DELETE FROM flagship.plan_credits c WHERE c.organization_id = project_row.organization_id AND c.plan_id = saved;
    INSERT INTO flagship.plan_credits
        (organization_id, project_id, plan_id, metric_id, amount, period, rollover_max)
    SELECT project_row.organization_id, project_row.id, saved, t.metric_id, t.amount, t.period, t.rollover_max
      FROM flagship.plan_credit_terms(project_row.organization_id, project_row.id,
                                      definition->'credits', 'credits') t;
    RETURN saved;
EXCEPTION WHEN invalid_parameter_value THEN
    -- Every refusal names the plan it is about, then the field.
    GET STACKED DIAGNOSTICS refused = MESSAGE_TEXT, refused_hint = PG_EXCEPTION_HINT;
    PERFORM flagship.refuse_about('plan', definition->>'key', refused, refused_hint);
END
$fn$;

CREATE FUNCTION flagship.put_customer(environment text, definition jsonb) RETURNS uuid
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    refused text;
    refused_hint text;
    environment_row flagship.environments;
    plan_row flagship.plans;
    saved uuid;
    new_status text;
    new_trial_end timestamptz;
    new_anchor timestamptz;
BEGIN
    PERFORM flagship.require_permission('plans:write', 'put_customer');
    environment_row := flagship.environment_row(environment);
    PERFORM flagship.require_object(definition, 'customer',
        '{key,name,plan,status,trial_ends_at,billing_anchor,overrides,attributes,environment}');
    -- export_project names each customer's environment: accepted when it is
    -- the one written to, so an exported customer can be put back as is.
    IF definition ? 'environment' AND definition->>'environment' IS DISTINCT FROM environment_row.key THEN
        PERFORM flagship.refuse('environment',
            format('names "%s", but the customer is written to environment "%s"',
                   definition->>'environment', environment_row.key));
    END IF;
    IF jsonb_typeof(definition->'key') IS DISTINCT FROM 'string' OR btrim(definition->>'key') = '' THEN
        PERFORM flagship.refuse('key', 'must be a non-empty string');
    END IF;
    IF jsonb_typeof(coalesce(definition->'attributes', '{}')) <> 'object' THEN
        PERFORM flagship.refuse('attributes', 'must be a JSON object');
    END IF;
    PERFORM flagship.require_object(coalesce(definition->'overrides', '{}'), 'overrides', '{features,limits}');
    new_status := coalesce(definition->>'status', 'active');
    IF new_status NOT IN ('active', 'trialing', 'canceled') THEN
        PERFORM flagship.refuse('status', format('must be active, trialing or canceled, not "%s"', new_status));
    END IF;
    BEGIN
        new_trial_end := (definition->>'trial_ends_at')::timestamptz;
    EXCEPTION WHEN others THEN
        PERFORM flagship.refuse('trial_ends_at', 'must be a timestamp');
    END;
    BEGIN
        new_anchor := (definition->>'billing_anchor')::timestamptz;
    EXCEPTION WHEN others THEN
        PERFORM flagship.refuse('billing_anchor', 'must be a timestamp');
    END;
    IF new_status = 'trialing' AND new_trial_end IS NULL THEN
        PERFORM flagship.refuse('trial_ends_at', 'is required while trialing');
    END IF;
    IF definition ? 'plan' THEN
        SELECT * INTO plan_row FROM flagship.plans p
         WHERE p.organization_id = environment_row.organization_id
           AND p.project_id = environment_row.project_id AND p.key = definition->>'plan';
        IF NOT FOUND THEN
            PERFORM flagship.refuse('plan', format('unknown plan "%s"', definition->>'plan'));
        END IF;
    END IF;

    INSERT INTO flagship.customers AS c
        (organization_id, project_id, environment_id, external_key, name, attributes)
    VALUES (environment_row.organization_id, environment_row.project_id, environment_row.id,
            definition->>'key', definition->>'name', coalesce(definition->'attributes', '{}'))
    ON CONFLICT ON CONSTRAINT customers_key_unique DO UPDATE
       SET name = EXCLUDED.name, attributes = EXCLUDED.attributes, updated_at = EXCLUDED.updated_at
    RETURNING c.id INTO saved;

    IF plan_row.id IS NULL THEN
        DELETE FROM flagship.subscriptions s
         WHERE s.organization_id = environment_row.organization_id AND s.customer_id = saved;
    ELSE
        INSERT INTO flagship.subscriptions AS s
            (organization_id, project_id, customer_id, plan_id, status, trial_ends_at, billing_anchor)
        VALUES (environment_row.organization_id, environment_row.project_id, saved, plan_row.id,
                new_status, new_trial_end, coalesce(new_anchor, now()))
        ON CONFLICT (organization_id, customer_id) DO UPDATE
           SET plan_id = EXCLUDED.plan_id, status = EXCLUDED.status,
               trial_ends_at = EXCLUDED.trial_ends_at,
               billing_anchor = coalesce(new_anchor, s.billing_anchor), updated_at = EXCLUDED.updated_at;
    END IF;

    DELETE FROM flagship.customer_feature_overrides o
     WHERE o.organization_id = environment_row.organization_id AND o.customer_id = saved;
    INSERT INTO flagship.customer_feature_overrides (organization_id, customer_id, feature_key, enabled)
    SELECT environment_row.organization_id, saved, s.feature_key, s.enabled
      FROM flagship.feature_switches(environment_row.organization_id, environment_row.project_id,
                                     definition->'overrides'->'features', 'overrides.features') s;

    DELETE FROM flagship.customer_limit_overrides o
     WHERE o.organization_id = environment_row.organization_id AND o.customer_id = saved;
    INSERT INTO flagship.customer_limit_overrides
        (organization_id, project_id, customer_id, metric_id, usage_limit, period, enforcement)
    SELECT environment_row.organization_id, environment_row.project_id, saved,
           t.metric_id, t.usage_limit, t.period, t.enforcement
      FROM flagship.metric_limits(environment_row.organization_id, environment_row.project_id,
                                  definition->'overrides'->'limits', 'overrides.limits') t;
    RETURN saved;
EXCEPTION WHEN invalid_parameter_value THEN
    -- Every refusal names the customer it is about, then the field.
    GET STACKED DIAGNOSTICS refused = MESSAGE_TEXT, refused_hint = PG_EXCEPTION_HINT;
    PERFORM flagship.refuse_about('customer', definition->>'key', refused, refused_hint);
END
$fn$;

CREATE FUNCTION flagship.metric_document(metric flagship.metrics) RETURNS jsonb
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT flagship.jsonb_without_nulls(jsonb_build_object(
        'key', metric.key, 'name', metric.name, 'unit', metric.unit, 'aggregation', metric.aggregation,
        'slices', CASE WHEN metric.slices > 1 THEN metric.slices END))
$fn$;

CREATE FUNCTION flagship.limit_document(usage_limit bigint, period text, enforcement text) RETURNS jsonb
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT jsonb_build_object('limit', usage_limit, 'period', period, 'enforcement', enforcement)
$fn$;

CREATE FUNCTION flagship.plan_document(plan flagship.plans) RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
-- PL/pgSQL: Citus cannot plan a SQL function's statements that take
-- parameters, and here the organization is a value of each (#21).
BEGIN
    RETURN (
        SELECT flagship.jsonb_without_nulls(jsonb_build_object(
            'key', plan.key, 'name', plan.name,
            'features', coalesce((SELECT jsonb_object_agg(f.feature_key, f.enabled)
                                    FROM flagship.plan_features f
                                   WHERE f.organization_id = plan.organization_id AND f.plan_id = plan.id), '{}'),
            'limits', coalesce((SELECT jsonb_object_agg(m.key, flagship.limit_document(l.usage_limit, l.period, l.enforcement))
                                  FROM flagship.usage_limits l
                                  JOIN flagship.metrics m ON m.organization_id = l.organization_id AND m.id = l.metric_id
                                 WHERE l.organization_id = plan.organization_id AND l.plan_id = plan.id), '{}'),
            -- Absent when the plan grants none (0.2.0 documents stay as they were).
            'credits', (SELECT jsonb_object_agg(m.key, jsonb_build_object('amount', c.amount, 'period', c.period,
                                                                         'rollover', jsonb_build_object('max', c.rollover_max)))
                          FROM flagship.plan_credits c
                          JOIN flagship.metrics m ON m.organization_id = c.organization_id AND m.id = c.metric_id
                         WHERE c.organization_id = plan.organization_id AND c.plan_id = plan.id),
            'rate_limits', plan.rate_limits)));
END
$fn$;

CREATE FUNCTION flagship.customer_document(customer flagship.customers) RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
-- PL/pgSQL, each read naming the organization as a value: Citus plans
-- each as a query on the organization's shards (#21).
DECLARE
    subscription record;
BEGIN
    SELECT s.status, s.trial_ends_at, s.billing_anchor, p.key AS plan_key INTO subscription
      FROM flagship.subscriptions s
      LEFT JOIN flagship.plans p ON p.organization_id = s.organization_id AND p.id = s.plan_id
     WHERE s.organization_id = customer.organization_id AND s.customer_id = customer.id;
    RETURN flagship.jsonb_without_nulls(jsonb_build_object(
        'key', customer.external_key, 'name', customer.name,
        'plan', subscription.plan_key, 'status', subscription.status,
        'trial_ends_at', subscription.trial_ends_at, 'billing_anchor', subscription.billing_anchor,
        'overrides', jsonb_build_object(
            'features', coalesce((SELECT jsonb_object_agg(o.feature_key, o.enabled)
                                    FROM flagship.customer_feature_overrides o
                                   WHERE o.organization_id = customer.organization_id
                                     AND o.customer_id = customer.id), '{}'),
            'limits', coalesce((SELECT jsonb_object_agg(m.key, flagship.limit_document(o.usage_limit, o.period, o.enforcement))
                                  FROM flagship.customer_limit_overrides o
                                  JOIN flagship.metrics m ON m.organization_id = o.organization_id AND m.id = o.metric_id
                                 WHERE o.organization_id = customer.organization_id
                                   AND o.customer_id = customer.id), '{}')),
        'attributes', customer.attributes));
END
$fn$;

-- What plan-kind flags need to know about one customer, for the evaluation
-- cache: whether its subscription is live (and until when), the features
-- its plan and overrides grant, and its attributes.
CREATE FUNCTION flagship.customer_entitlements(environment_id uuid, external_key text) RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
-- PL/pgSQL, the customer read by the session's organization when it has
-- one: Citus plans it as a query on that organization's shards (#21).
DECLARE
    org constant uuid := flagship.current_organization_id();
    c flagship.customers;
    s flagship.subscriptions;
BEGIN
    IF org IS NULL THEN
        SELECT * INTO c FROM flagship.customers x
         WHERE x.environment_id = customer_entitlements.environment_id
           AND x.external_key = customer_entitlements.external_key;
    ELSE
        SELECT * INTO c FROM flagship.customers x
         WHERE x.organization_id = org AND x.environment_id = customer_entitlements.environment_id
           AND x.external_key = customer_entitlements.external_key;
    END IF;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    SELECT * INTO s FROM flagship.subscriptions x
     WHERE x.organization_id = c.organization_id AND x.customer_id = c.id;
    RETURN jsonb_build_object(
        'status', s.status,
        'trial_ends_at', extract(epoch FROM s.trial_ends_at),
        'features', coalesce((
            SELECT jsonb_agg(k.feature_key) FROM (
                SELECT f.feature_key FROM flagship.plan_features f
                 WHERE f.organization_id = c.organization_id AND f.plan_id = s.plan_id AND f.enabled
                   AND NOT EXISTS (SELECT 1 FROM flagship.customer_feature_overrides o
                                    WHERE o.organization_id = c.organization_id AND o.customer_id = c.id
                                      AND o.feature_key = f.feature_key AND NOT o.enabled)
                UNION
                SELECT o.feature_key FROM flagship.customer_feature_overrides o
                 WHERE o.organization_id = c.organization_id AND o.customer_id = c.id AND o.enabled) k), '[]'),
        'attributes', c.attributes);
END
$fn$;

-- Limits ----------------------------------------------------------------------

-- Everything a limit decision needs about one customer and metric, in one
-- query: ids, subscription status and the limit that applies (a customer
-- override wins over the plan). The limit functions (Rust, src/usage.rs)
-- keep the answer per backend until a configuration change; epochs are in
-- seconds.
CREATE FUNCTION flagship.usage_facts(environment_id uuid, customer text, metric text)
RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    -- The customer's organization as a value (the session's, else the
    -- environment's): on Citus the read goes to its shards alone (#21).
    org uuid := flagship.current_organization_id();
    facts jsonb;
BEGIN
    IF org IS NULL THEN
        SELECT e.organization_id INTO org FROM flagship.environments e WHERE e.id = usage_facts.environment_id;
    END IF;
    SELECT jsonb_build_object(
               'organization_id', c.organization_id, 'customer_id', c.id, 'metric_id', m.id,
               'aggregation', m.aggregation, 'slices', m.slices, 'status', s.status,
               'trial_ends_at', extract(epoch FROM s.trial_ends_at),
               'billing_anchor', extract(epoch FROM s.billing_anchor),
               'has_limit', coalesce(o.metric_id, l.metric_id) IS NOT NULL,
               'usage_limit', CASE WHEN o.metric_id IS NOT NULL THEN o.usage_limit ELSE l.usage_limit END,
               'period', coalesce(o.period, l.period),
               'enforcement', coalesce(o.enforcement, l.enforcement),
               'plan_credits', CASE WHEN pc.metric_id IS NOT NULL THEN
                   jsonb_build_object('amount', pc.amount, 'period', pc.period,
                                      'rollover_max', pc.rollover_max) END)
      INTO facts
      FROM flagship.customers c
      LEFT JOIN flagship.metrics m
        ON m.organization_id = c.organization_id AND m.project_id = c.project_id
       AND m.key = usage_facts.metric
      LEFT JOIN flagship.subscriptions s
        ON s.organization_id = c.organization_id AND s.customer_id = c.id
      LEFT JOIN flagship.customer_limit_overrides o
        ON o.organization_id = c.organization_id AND o.customer_id = c.id AND o.metric_id = m.id
      LEFT JOIN flagship.usage_limits l
        ON l.organization_id = c.organization_id AND l.plan_id = s.plan_id AND l.metric_id = m.id
      LEFT JOIN flagship.plan_credits pc
        ON pc.organization_id = c.organization_id AND pc.plan_id = s.plan_id AND pc.metric_id = m.id
     WHERE c.organization_id = org AND c.environment_id = usage_facts.environment_id
       AND c.external_key = usage_facts.customer;
    RETURN coalesce(facts, '{}');
END
$fn$;
