-- Usage-limit benchmark setup: 1000 customers on a plan whose limit is far
-- away (so every call is granted and the work is the same for both sides),
-- and the hand-written baselines: one table of counters consumed with a
-- single conditional UPDATE, and the same work record_usage does written
-- by hand (the conditional UPDATE and a ledger row, in one statement).
\set ON_ERROR_STOP 1
SET client_min_messages = warning;
SELECT set_config('flagship.organization_id', id::text, false) FROM flagship.organizations WHERE slug = 'bench' \gset
SELECT flagship.put_metric('app', '{"key": "api_calls"}');
-- The same metric split into 8 escrow slices (#20), for the hot customer.
SELECT flagship.put_metric('app', '{"key": "api_calls_sliced", "slices": 8}');
SELECT flagship.put_plan('app', '{"key": "pro", "limits": {"api_calls": {"limit": 1000000000000, "period": "month"},
                                                  "api_calls_sliced": {"limit": 1000000000000, "period": "month"}}}');
SELECT count(flagship.put_customer('app/production', jsonb_build_object('key', 'cust-' || i, 'plan', 'pro')))
  FROM generate_series(1, 1000) AS i;

DROP TABLE IF EXISTS bench.quota;
CREATE TABLE bench.quota (customer text PRIMARY KEY, used bigint NOT NULL, usage_limit bigint NOT NULL);
INSERT INTO bench.quota SELECT 'cust-' || i, 0, 1000000000000 FROM generate_series(1, 1000) AS i;
DROP TABLE IF EXISTS bench.quota_ledger;
CREATE TABLE bench.quota_ledger (id bigserial PRIMARY KEY, customer text NOT NULL, amount bigint NOT NULL,
                                 used_after bigint NOT NULL, recorded_at timestamptz NOT NULL DEFAULT now());
VACUUM ANALYZE;
-- The same rows record_usage writes, written by hand into FlagShip's own
-- tables (benches/same_rows_many.pgbench): customer ids by number, and
-- every customer's counter created (record_usage creates it on first use).
DROP TABLE IF EXISTS bench.customer_ids;
CREATE TABLE bench.customer_ids (n int PRIMARY KEY, id uuid NOT NULL);
INSERT INTO bench.customer_ids
SELECT substr(external_key, 6)::int, id FROM flagship.customers WHERE external_key LIKE 'cust-%';
SELECT count(flagship.record_usage('cust-' || i, 'api_calls', environment => 'app/production')) FROM generate_series(1, 1000) AS i;
VACUUM ANALYZE;
