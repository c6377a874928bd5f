-- A sample organization, project, segment and flags, then a few evaluations.
CREATE EXTENSION flagship;

SELECT set_config('flagship.organization_id',
                  flagship.create_organization('acme', 'Acme Inc.')::text, false) \gset
SELECT flagship.create_project(flagship.current_organization_id(), 'shop', 'Web shop') \gset
SET flagship.environment = 'shop/production';

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
