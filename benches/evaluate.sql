-- Flag evaluation benchmark: 100 000 evaluations of a flag with two rules of
-- two conditions each and a 25% default rollout, against
--   (a) building the same 100 000 contexts and doing nothing with them, and
--   (b) a hand-written PL/pgSQL evaluator of the same flag, rules hard-coded
--       (the most favourable hand-written case: it reads no configuration),
--   (c) a generic PL/pgSQL evaluator reading the flag from a table per call.
-- flagship_evaluate is timed twice: producing its jsonb result, and with the
-- caller extracting the value from it (->> 'value' and a cast to boolean).
-- Each figure is the best of 7 interleaved runs (the generic evaluator: 3),
-- in milliseconds.
\set ON_ERROR_STOP 1
SET client_min_messages = warning;
\i benches/setup.sql
-- Leave autovacuum and the checkpointer nothing to do while we measure: on two
-- cores their bursts right after setup would be timed with the queries.
VACUUM ANALYZE;
CHECKPOINT;
SELECT set_config('flagship.organization_id', id::text, false) FROM flagship.organizations WHERE slug = 'bench' \gset
SET flagship.environment = 'app/production';

-- The best time of each query over `runs` rounds, the queries interleaved
-- within a round: a burst of noise on this shared machine (another tenant,
-- autovacuum after setup) then costs every query one round, instead of
-- costing one query all of its runs.
CREATE OR REPLACE FUNCTION pg_temp.best_of_interleaved(queries text[], runs int) RETURNS numeric[]
LANGUAGE plpgsql AS $$
DECLARE
    started timestamptz;
    best numeric[] := array_fill(1e18::numeric, ARRAY[cardinality(queries)]);
BEGIN
    FOR round IN 1..runs LOOP
        FOR i IN 1..cardinality(queries) LOOP
            started := clock_timestamp();
            EXECUTE queries[i];
            best[i] := least(best[i], extract(epoch FROM clock_timestamp() - started) * 1000);
        END LOOP;
    END LOOP;
    RETURN (SELECT array_agg(round(b, 1) ORDER BY n) FROM unnest(best) WITH ORDINALITY AS t (b, n));
END
$$;

CREATE TEMP TABLE contexts_sql AS SELECT $q$
    SELECT jsonb_build_object('targeting_key', 'user-' || i,
                              'country', (ARRAY['NO', 'SE', 'DK', 'FI', 'US'])[1 + i % 5],
                              'plan', CASE WHEN i % 3 = 0 THEN 'enterprise' ELSE 'free' END,
                              'seats', i % 20) AS context
      FROM generate_series(1, 100000) AS i $q$ AS q;

-- Warm-up, discarded: right after setup the first scans pay for cold caches.
SELECT pg_temp.best_of_interleaved(ARRAY[format('SELECT count(*) FROM (%s) c WHERE flagship.flagship_enabled(''bench-flag'', context)', q)], 2)
  FROM contexts_sql \gset

SELECT best[1] AS build_contexts_ms, best[2] AS flagship_enabled_ms, best[3] AS flagship_evaluate_ms,
       best[4] AS flagship_evaluate_value_ms, best[5] AS plpgsql_ms
  FROM (SELECT pg_temp.best_of_interleaved(ARRAY[
            format('SELECT count(*) FROM (%s) c WHERE context IS NOT NULL', q),
            format('SELECT count(*) FROM (%s) c WHERE flagship.flagship_enabled(''bench-flag'', context)', q),
            format('SELECT count(*) FROM (%s) c WHERE flagship.flagship_evaluate(''bench-flag'', context) IS NOT NULL', q),
            format('SELECT count(*) FROM (%s) c WHERE (flagship.flagship_evaluate(''bench-flag'', context)->>''value'')::boolean', q),
            format('SELECT count(*) FROM (%s) c WHERE bench.plpgsql_enabled(context)', q)], 7) AS best
          FROM contexts_sql) AS runs \gset
-- The generic evaluator takes seconds per run; three of its own suffice.
SELECT (pg_temp.best_of_interleaved(ARRAY[
            format('SELECT count(*) FROM (%s) c WHERE bench.plpgsql_generic_enabled(''bench-flag'', context)', q)], 3))[1]
           AS plpgsql_generic_ms
  FROM contexts_sql \gset

\x on
SELECT :build_contexts_ms AS build_contexts_ms,
       :flagship_enabled_ms AS flagship_enabled_ms,
       :flagship_evaluate_ms AS flagship_evaluate_ms,
       :flagship_evaluate_value_ms AS flagship_evaluate_value_ms,
       :plpgsql_ms AS plpgsql_ms,
       round((:flagship_enabled_ms - :build_contexts_ms) / 100.0, 3) AS enabled_us_per_eval,
       round((:flagship_evaluate_ms - :build_contexts_ms) / 100.0, 3) AS evaluate_us_per_eval,
       round((:flagship_evaluate_value_ms - :build_contexts_ms) / 100.0, 3) AS evaluate_value_us_per_eval,
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
