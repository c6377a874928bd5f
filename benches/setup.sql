-- The flag every evaluation benchmark uses and its hand-written
-- comparators, shared by evaluate.sql (wall clock) and `instructions`
-- (instruction counts). Flag `bench-flag`: two rules of two conditions
-- each (`in` + `eq`, `eq` + `gte`) and a 25% default rollout.
DROP SCHEMA IF EXISTS bench CASCADE;
CREATE SCHEMA bench;

DROP EXTENSION IF EXISTS flagship CASCADE;

CREATE EXTENSION flagship;

SELECT set_config('flagship.organization_id', flagship.create_organization('bench', 'Bench')::text, false);

SELECT flagship.create_project(flagship.current_organization_id(), 'app', 'App');

SELECT flagship.put_flag('app', '{"key": "bench-flag", "environments": {"production": {"enabled": true,
  "rules": [
    {"id": "nordic-enterprise", "conditions": [
        {"attribute": "country", "op": "in", "values": ["NO", "SE"]},
        {"attribute": "plan", "op": "eq", "values": ["enterprise"]}], "serve": {"variant": "on"}},
    {"id": "big-danes", "conditions": [
        {"attribute": "country", "op": "eq", "values": ["DK"]},
        {"attribute": "seats", "op": "gte", "values": [10]}], "serve": {"variant": "on"}}],
  "default": {"rollout": {"on": 25, "off": 75}}}}}');

CREATE OR REPLACE FUNCTION bench.plpgsql_enabled(context jsonb) RETURNS boolean
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
CREATE TABLE bench.flag_config AS
SELECT f.key, flagship.environment_config(r) AS config
  FROM flagship.features f
  JOIN flagship.feature_rules r ON r.feature_id = f.id
  JOIN flagship.environments e ON e.id = r.environment_id
 WHERE e.key = 'production';

ALTER TABLE bench.flag_config ADD PRIMARY KEY (key);

CREATE OR REPLACE FUNCTION bench.plpgsql_generic_enabled(flag text, context jsonb) RETURNS boolean
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
    SELECT c.config INTO config FROM bench.flag_config c WHERE c.key = flag;
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
