-- Flag evaluation benchmark: 100 000 evaluations of a flag with two rules of
-- two conditions each and a 25% default rollout, against
--   (a) building the same 100 000 contexts and doing nothing with them, and
--   (b) a hand-written PL/pgSQL evaluator of the same flag, rules hard-coded
--       (the most favourable hand-written case: it reads no configuration),
--   (c) a generic PL/pgSQL evaluator reading the flag from a table per call.
-- Each figure is the best of several runs, in milliseconds.
\set ON_ERROR_STOP 1
SET client_min_messages = warning;
\i benches/setup.sql
SELECT set_config('flagship.organization_id', id::text, false) FROM flagship.organizations WHERE slug = 'bench' \gset
SET flagship.environment = 'app/production';

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
       pg_temp.best_of(format('SELECT count(*) FROM (%s) c WHERE bench.plpgsql_enabled(context)', q), 5) AS plpgsql_ms,
       pg_temp.best_of(format('SELECT count(*) FROM (%s) c WHERE bench.plpgsql_generic_enabled(''bench-flag'', context)', q), 3) AS plpgsql_generic_ms
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
       <> bench.plpgsql_generic_enabled('bench-flag', context);
