-- FlagShip 0.2.0 -> 0.3.0.
--
-- Upgrade scripts are frozen history once 0.3.0 is released: until then
-- this file collects every SQL change of the round, in the order they were
-- made. tests/integration/upgrade.rs checks that the result matches a fresh
-- 0.3.0 install object by object.

\echo Use "ALTER EXTENSION flagship UPDATE TO '0.3.0'" to load this file. \quit

-- Stored values must load back (#13): customer attributes nest at most 64
-- levels and hold numbers that fit a double, on every write path. The
-- upgrade refuses existing customers beyond that, naming each.
CREATE  FUNCTION "check_stored_value"(
	"field" TEXT, /* & str */
	"value" jsonb /* DocumentArg */
) RETURNS bool /* bool */
IMMUTABLE STRICT PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'check_stored_value_wrapper';

ALTER TABLE flagship.customers
    ADD CONSTRAINT customers_attributes_loadable
        CHECK (flagship.check_stored_value('customer "' || external_key || '": attributes', attributes));
