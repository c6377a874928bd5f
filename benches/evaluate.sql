-- Flag evaluation benchmark: 100 000 evaluations of a flag with two rules of
-- two conditions each and a 25% default rollout, against
--   (a) building the same 100 000 contexts and doing nothing with them, and
--   (b) a hand-written PL/pgSQL evaluator of the same flag, rules hard-coded
--       (the most favourable hand-written case: it reads no configuration),
--   (c) a generic PL/pgSQL evaluator reading the flag from a table per call.
-- Each figure is the best of several runs, in milliseconds.
\set ON_ERROR_STOP 1
SET client_min_messages = warning;
DROP EXTENSION IF EXISTS flagship CASCADE;
CREATE EXTENSION flagship;
SELECT set_config('flagship.organization_id', flagship.create_organization('bench', 'Bench')::text, false) \gset
SELECT flagship.create_project(flagship.current_organization_id(), 'app', 'App') \gset
SET flagship.environment = 'app/production';
SELECT flagship.put_flag('app', '{"key": "bench-flag", "environments": {"production": {"enabled": true,
  "rules": [
    {"id": "nordic-enterprise", "conditions": [
        {"attribute": "country", "op": "in", "values": ["NO", "SE"]},
        {"attribute": "plan", "op": "eq", "values": ["enterprise"]}], "serve": {"variant": "on"}},
    {"id": "big-danes", "conditions": [
        {"attribute": "country", "op": "eq", "values": ["DK"]},
        {"attribute": "seats", "op": "gte", "values": [10]}], "serve": {"variant": "on"}}],
  "default": {"rollout": {"on": 25, "off": 75}}}}}') \gset

CREATE OR REPLACE FUNCTION pg_temp.plpgsql_enabled(context jsonb) RETURNS boolean
LANGUAGE plpgsql STABLE AS $$
BEGIN
    IF context->>'country' IN ('NO', 'SE') AND context->>'plan' = 'enterprise' THEN
        RETURN true;
    END IF;
    IF context->>'country' = 'DK' AND (context->>'seats')::numeric >= 10 THEN
        RETURN true;
    END IF;
    RETURN abs(hashtext('bench-flag:' || (context->>'targeting_key'))) % 100000 < 25000;
END
$$;

-- (c) What a team writes when flags live in a table: a generic PL/pgSQL
-- evaluator that reads the flag's environment configuration on every call
-- and interprets its rules (only the operators this flag uses).
CREATE TEMP TABLE flag_config AS
SELECT f.key, flagship.environment_config(r) AS config
  FROM flagship.features f
  JOIN flagship.feature_rules r ON r.feature_id = f.id
  JOIN flagship.environments e ON e.id = r.environment_id
 WHERE e.key = 'production';
ALTER TABLE flag_config ADD PRIMARY KEY (key);

CREATE OR REPLACE FUNCTION pg_temp.plpgsql_generic_enabled(flag text, context jsonb) RETURNS boolean
LANGUAGE plpgsql STABLE AS $$
DECLARE
    config jsonb;
    rule jsonb;
    cond jsonb;
    actual text;
    matched boolean;
    bucket int;
    upper_bound int := 0;
    variant record;
BEGIN
    SELECT c.config INTO config FROM flag_config c WHERE c.key = flag;
    IF config IS NULL OR NOT (config->>'enabled')::boolean THEN
        RETURN false;
    END IF;
    FOR rule IN SELECT * FROM jsonb_array_elements(config->'rules') LOOP
        matched := true;
        FOR cond IN SELECT * FROM jsonb_array_elements(rule->'conditions') LOOP
            actual := context->>(cond->>'attribute');
            matched := CASE cond->>'op'
                WHEN 'in' THEN actual IN (SELECT jsonb_array_elements_text(cond->'values'))
                WHEN 'eq' THEN actual = cond->'values'->>0
                WHEN 'gte' THEN actual::numeric >= (cond->'values'->>0)::numeric
                ELSE false END;
            EXIT WHEN NOT matched OR matched IS NULL;
        END LOOP;
        IF matched THEN
            RETURN rule->'serve'->>'variant' = 'on';
        END IF;
    END LOOP;
    bucket := flagship.bucket(flag, context->>'targeting_key');
    FOR variant IN SELECT key, value FROM jsonb_each(config->'default'->'rollout') ORDER BY key LOOP
        upper_bound := upper_bound + (variant.value::numeric * 1000)::int;
        IF bucket < upper_bound THEN
            RETURN variant.key = 'on';
        END IF;
    END LOOP;
    RETURN false;
END
$$;

CREATE OR REPLACE FUNCTION pg_temp.best_of(query text, runs int) RETURNS numeric
LANGUAGE plpgsql AS $$
DECLARE
    started timestamptz;
    best numeric := 1e18;
BEGIN
    FOR i IN 1..runs LOOP
        started := clock_timestamp();
        EXECUTE query;
        best := least(best, extract(epoch FROM clock_timestamp() - started) * 1000);
    END LOOP;
    RETURN round(best, 1);
END
$$;

CREATE TEMP TABLE contexts_sql AS SELECT $q$
    SELECT jsonb_build_object('targeting_key', 'user-' || i,
                              'country', (ARRAY['NO', 'SE', 'DK', 'FI', 'US'])[1 + i % 5],
                              'plan', CASE WHEN i % 3 = 0 THEN 'enterprise' ELSE 'free' END,
                              'seats', i % 20) AS context
      FROM generate_series(1, 100000) AS i $q$ AS q;

SELECT pg_temp.best_of(format('SELECT count(*) FROM (%s) c WHERE context IS NOT NULL', q), 5) AS build_contexts_ms,
       pg_temp.best_of(format('SELECT count(*) FROM (%s) c WHERE flagship.flagship_enabled(''bench-flag'', context)', q), 5) AS flagship_enabled_ms,
       pg_temp.best_of(format('SELECT count(*) FROM (%s) c WHERE (flagship.flagship_evaluate(''bench-flag'', context)->>''value'')::boolean', q), 5) AS flagship_evaluate_ms,
       pg_temp.best_of(format('SELECT count(*) FROM (%s) c WHERE pg_temp.plpgsql_enabled(context)', q), 5) AS plpgsql_ms,
       pg_temp.best_of(format('SELECT count(*) FROM (%s) c WHERE pg_temp.plpgsql_generic_enabled(''bench-flag'', context)', q), 3) AS plpgsql_generic_ms
  FROM contexts_sql \gset

\x on
SELECT :build_contexts_ms AS build_contexts_ms,
       :flagship_enabled_ms AS flagship_enabled_ms,
       :flagship_evaluate_ms AS flagship_evaluate_ms,
       :plpgsql_ms AS plpgsql_ms,
       round((:flagship_enabled_ms - :build_contexts_ms) / 100.0, 3) AS enabled_us_per_eval,
       round((:flagship_evaluate_ms - :build_contexts_ms) / 100.0, 3) AS evaluate_us_per_eval,
       round((:plpgsql_ms - :build_contexts_ms) / 100.0, 3) AS plpgsql_us_per_eval,
       round((:plpgsql_generic_ms - :build_contexts_ms) / 100.0, 3) AS plpgsql_generic_us_per_eval,
       round((:plpgsql_ms - :build_contexts_ms) / nullif(:flagship_enabled_ms - :build_contexts_ms, 0), 2)
           AS speedup_over_hardcoded,
       round((:plpgsql_generic_ms - :build_contexts_ms) / nullif(:flagship_enabled_ms - :build_contexts_ms, 0), 2)
           AS speedup_over_generic;

-- Both evaluators must agree on every context, or the comparison is void.
SELECT count(*) AS disagreements
  FROM (SELECT context FROM (SELECT jsonb_build_object('targeting_key', 'user-' || i,
                              'country', (ARRAY['NO', 'SE', 'DK', 'FI', 'US'])[1 + i % 5],
                              'plan', CASE WHEN i % 3 = 0 THEN 'enterprise' ELSE 'free' END,
                              'seats', i % 20) AS context FROM generate_series(1, 100000) i) c) c
 WHERE flagship.flagship_enabled('bench-flag', context)
       <> (context->>'country' IN ('NO', 'SE') AND context->>'plan' = 'enterprise'
           OR context->>'country' = 'DK' AND (context->>'seats')::numeric >= 10
           OR flagship.bucket('bench-flag', context->>'targeting_key') >= 75000)
    OR flagship.flagship_enabled('bench-flag', context)
       <> pg_temp.plpgsql_generic_enabled('bench-flag', context);
