-- A sample organization, project, segment and flags, then a few evaluations.
-- It runs as an application would: a non-superuser role with flagship_admin
-- starts the organization (and so owns it), and every transaction names its
-- organization with SET LOCAL, which is what a transaction pooler such as
-- PgBouncer needs (a session-level SET would leak to the next client).
CREATE EXTENSION flagship;
DO $$ BEGIN CREATE ROLE demo_admin; EXCEPTION WHEN duplicate_object THEN NULL; END $$;  -- roles outlive the demo database
GRANT flagship_admin TO demo_admin;
SET ROLE demo_admin;

BEGIN;
SET LOCAL flagship.actor = 'dana@acme.example';  -- who the audit trail names, and the new owner
SELECT flagship.create_organization('acme', 'Acme Inc.') AS org \gset
COMMIT;
\set tenant 'SET LOCAL flagship.organization_id = ' :'org' '; SET LOCAL flagship.actor = ''dana@acme.example''; SET LOCAL flagship.environment = ''shop/production'''

BEGIN;
:tenant;
SELECT flagship.create_project(:'org', 'shop', 'Web shop') \gset
SELECT flagship.put_flag('shop', '{"key": "payments-v2", "environments": {"production": {"enabled": true}}}') \gset
SELECT flagship.put_segment('shop', '{"key": "beta-testers", "included": ["user-42"],
  "conditions": [{"attribute": "email", "op": "ends_with", "values": ["@acme.test"]}]}') \gset
SELECT flagship.put_flag('shop', '{
  "key": "new-checkout", "kind": "boolean", "name": "New checkout",
  "prerequisites": [{"flag": "payments-v2", "variant": "on"}],
  "environments": {
    "production": {
      "enabled": true,
      "targets": {"on": ["user-1", "user-2"]},
      "rules": [
        {"id": "nordic-enterprise",
         "conditions": [{"attribute": "country", "op": "in", "values": ["NO", "SE"]},
                        {"attribute": "plan", "op": "eq", "values": ["enterprise"]}],
         "serve": {"variant": "on"}},
        {"id": "beta", "segment": "beta-testers",
         "serve": {"rollout": {"on": 50, "off": 50}, "bucket_by": "targeting_key"}}],
      "default": {"rollout": {"on": 25, "off": 75}}},
    "staging": {"enabled": false}}}') \gset
SELECT flagship.put_flag('shop', '{"key": "checkout-button", "kind": "multivariate",
  "variants": {"blue": "#1e66f5", "green": "#40a02b"}, "off_variant": "blue",
  "environments": {"production": {"enabled": true,
    "default": {"rollout": {"blue": 50, "green": 50}}}}}') \gset

COMMIT;

BEGIN;
:tenant;
\echo
\echo 'flagship_evaluate(flag, context) in shop/production:'
SELECT context, flagship.flagship_evaluate('new-checkout', context::jsonb) AS result
  FROM (VALUES ('{"targeting_key": "user-1"}'),
               ('{"targeting_key": "u-7", "country": "NO", "plan": "enterprise"}'),
               ('{"targeting_key": "user-42"}'),
               ('{"targeting_key": "u-9"}'),
               ('"not an object"')) AS c (context);

\echo 'Share of 10 000 users who get the new checkout (25% rollout):'
SELECT round(100.0 * count(*) FILTER (WHERE flagship.flagship_enabled(
           'new-checkout', jsonb_build_object('targeting_key', 'user-' || i))) / count(*), 1) AS percent_on
  FROM generate_series(1, 10000) AS i;

\echo 'Everything a client SDK needs for one user:'
SELECT jsonb_pretty(flagship.flagship_evaluate_all('{"targeting_key": "user-1"}')) AS bootstrap;

COMMIT;

-- Plans and usage limits ------------------------------------------------------
BEGIN;
:tenant;
SELECT flagship.put_flag('shop', '{"key": "advanced-reports", "kind": "plan",
  "environments": {"production": {"enabled": true}}}') \gset
SELECT flagship.put_metric('shop', '{"key": "api_calls", "unit": "calls"}') \gset
SELECT flagship.put_metric('shop', '{"key": "seats", "aggregation": "gauge"}') \gset
SELECT flagship.put_plan('shop', '{"key": "free", "limits": {"api_calls": {"limit": 3, "period": "day"}, "seats": {"limit": 1}}}') \gset
SELECT flagship.put_plan('shop', '{"key": "pro", "features": {"advanced-reports": true},
  "limits": {"api_calls": {"limit": 10000, "period": "billing_month"}, "seats": {"limit": 10}}}') \gset
SELECT flagship.put_customer('shop/production', '{"key": "acme", "plan": "pro", "billing_anchor": "2024-01-31T00:00:00Z"}') \gset
SELECT flagship.put_customer('shop/production', '{"key": "tiny-co", "plan": "free"}') \gset

COMMIT;

BEGIN;
:tenant;
\echo 'Plan-kind flag: on for a customer whose plan grants it (and, if not, why):'
SELECT c AS customer, r ->> 'reason' AS reason, r ->> 'detail' AS detail
  FROM unnest(ARRAY['acme', 'tiny-co']) AS c,
       flagship.flagship_evaluate('advanced-reports', jsonb_build_object('customer', c)) AS r;

\echo 'tiny-co may make 3 API calls a day; the 4th is refused and records nothing:'
SELECT call, r ->> 'allowed' AS allowed, r ->> 'used' AS used, r ->> 'reason' AS reason
  FROM (SELECT i AS call, flagship.record_usage('tiny-co', 'api_calls') AS r
          FROM generate_series(1, 4) AS i) AS calls;

\echo 'The same idempotency key twice counts once:'
SELECT flagship.record_usage('acme', 'api_calls', 5, 'request-1') ->> 'used' AS first,
       flagship.record_usage('acme', 'api_calls', 5, 'request-1') ->> 'replayed' AS replayed;
SELECT flagship.check_usage_limit('acme', 'api_calls') AS acme_api_calls;

COMMIT;

-- Migrating from Unleash and GrowthBook -----------------------------------------
BEGIN;
:tenant;
-- What GET /api/client/features returns for one Unleash environment.
\set unleash_state '{"version": 1, "features": [{"name": "checkout-redesign", "enabled": true, "strategies": [{"name": "flexibleRollout", "parameters": {"rollout": "50", "stickiness": "default", "groupId": "checkout-redesign"}, "constraints": [{"contextName": "plan", "operator": "IN", "values": ["pro", "team"]}]}], "variants": [{"name": "compact", "weight": 500, "payload": {"type": "string", "value": "compact"}}, {"name": "roomy", "weight": 500, "payload": {"type": "string", "value": "roomy"}}]}]}'
SELECT flagship.import_unleash('shop', :'unleash_state', 'production') AS unleash_flags_imported;
\echo 'Imported from Unleash: pro users in the 50% rollout get a variant, bucketed as Unleash does:'
SELECT u AS user_id, r ->> 'variant' AS variant, r ->> 'reason' AS reason, r ->> 'rule' AS rule
  FROM unnest(ARRAY['u-1', 'u-2', 'u-3', 'u-4']) AS u,
       flagship.flagship_evaluate('checkout-redesign',
         jsonb_build_object('userId', u, 'properties', jsonb_build_object('plan', 'pro'))) AS r;
\echo 'A GrowthBook targeting condition as FlagShip conditions:'
SELECT jsonb_pretty(flagship.import_growthbook_condition(
  '{"$or": [{"country": {"$in": ["NO", "SE"]}}, {"appVersion": {"$vgte": "2.4.0"}}]}')) AS conditions;
SELECT flagship.put_flag('shop', jsonb_build_object('key', 'new-pricing', 'environments',
  jsonb_build_object('production', jsonb_build_object('enabled', true, 'rules', jsonb_build_array(
    jsonb_build_object('conditions', flagship.import_growthbook_condition(
        '{"$or": [{"country": {"$in": ["NO", "SE"]}}, {"appVersion": {"$vgte": "2.4.0"}}]}'),
      'serve', '{"variant": "on"}'::jsonb)), 'default', '{"variant": "off"}'::jsonb)))) \gset
SELECT flagship.flagship_enabled('new-pricing', '{"country": "DK", "appVersion": "2.10.1"}') AS dk_on_2_10,
       flagship.flagship_enabled('new-pricing', '{"country": "DK", "appVersion": "2.3.9"}') AS dk_on_2_3;

COMMIT;

-- Day to day: patch one flag, explain an answer, flags as code ---------------
BEGIN;
:tenant;
\echo 'Turn new-checkout off in production only (a JSON Merge Patch of the flag):'
SELECT flagship.patch_flag('shop', '{"key": "new-checkout", "environments": {"production": {"enabled": false}}}') \gset
SELECT flagship.flagship_evaluate('new-checkout', '{"targeting_key": "user-1"}') ->> 'reason' AS now;
SELECT flagship.patch_flag('shop', '{"key": "new-checkout", "environments": {"production": {"enabled": true}}}') \gset
\echo 'Why did u-7 get the new checkout?'
SELECT jsonb_pretty(flagship.explain_evaluation('new-checkout',
  '{"targeting_key": "u-7", "country": "NO", "plan": "enterprise"}') -> 'trace') AS trace;
\echo 'Flags as code: plan an edited export (staging of checkout-button switched on), then apply it twice:'
SELECT jsonb_set(flagship.export_project('shop', customers => false),
                 '{flags,1,environments,staging}', '{"enabled": true}') AS edited \gset
SELECT jsonb_pretty(flagship.plan_project(:'org', :'edited')) AS plan;
SELECT flagship.apply_project(:'org', :'edited') -> 'update' -> 0 ->> 'key' AS first_apply_updated;
SELECT flagship.apply_project(:'org', :'edited') ->> 'unchanged' AS second_apply_unchanged;
COMMIT;

-- Exposure counts ---------------------------------------------------------------
-- Counted in memory while evaluating (evaluation never writes), flushed in one statement.
BEGIN;
:tenant;
SET LOCAL flagship.count_exposures = on;
SELECT count(*) FILTER (WHERE flagship.flagship_enabled('new-checkout', jsonb_build_object('targeting_key', 'user-' || i))) AS served_on
  FROM generate_series(1, 1000) AS i;
SELECT flagship.flush_exposures() AS evaluations_flushed;
SELECT flag_key, variant, evaluations FROM flagship.flag_exposures ORDER BY 1, 2;
COMMIT;

BEGIN;
:tenant;

-- Audit trail -------------------------------------------------------------------
UPDATE flagship.features SET description = 'The one-page checkout'
 WHERE organization_id = flagship.current_organization_id() AND key = 'new-checkout';
\echo 'Every configuration change above is in the hash-chained audit trail:'
SELECT resource_type, action, count(*) AS events
  FROM flagship.audit_events
 WHERE organization_id = flagship.current_organization_id()
 GROUP BY 1, 2 ORDER BY 1, 2;
SELECT occurred_at::time(0) AS at, actor, resource_type, diff
  FROM flagship.audit_events
 WHERE organization_id = flagship.current_organization_id() AND action = 'update'
 ORDER BY chain_seq DESC LIMIT 3;
SELECT flagship.verify_audit_chain(flagship.current_organization_id()) AS chain;
COMMIT;
