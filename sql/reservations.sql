-- Usage reservations (0.3): reserve_usage holds an amount before the work
-- (an LLM call, say), finalize_usage consumes what the work really cost and
-- releases the rest, release_usage gives it all back.
--
-- A reservation *is* a consumption, made by record_usage under the ledger
-- key `reservation:<id>`: it counts against the limit, or draws from the
-- credit grants, at once and exactly as any consumption (the counter's or
-- the grants' row locks), so reservations racing with record_usage never
-- overshoot. Settling refunds the unused part: to the counter of the
-- period it was reserved in, or back into the grants it drew from (the
-- last-drawn first), with a ledger row of kind `release` and a negative
-- amount, so the ledger sums to what was consumed.
--
-- Expiry needs no job runner: a held reservation past `expires_at` is
-- released by the first call that would be refused without it
-- (record_usage, reserve_usage), and check_usage_limit counts it as
-- released already.

CREATE TABLE flagship.usage_reservations (
    organization_id uuid        NOT NULL,
    id              uuid        NOT NULL DEFAULT gen_random_uuid(),
    customer_id     uuid        NOT NULL,
    metric_id       uuid        NOT NULL,
    amount          bigint      NOT NULL,
    -- The counter period the amount was counted in (NULL: none, or credits).
    period_start    timestamptz,
    -- Credits metrics: the grants that paid, [{"grant": id, "amount": n}].
    paid_by         jsonb,
    expires_at      timestamptz NOT NULL,
    idempotency_key text,
    state           text        NOT NULL DEFAULT 'held',
    consumed        bigint,
    created_at      timestamptz NOT NULL DEFAULT now(),
    settled_at      timestamptz,
    PRIMARY KEY (organization_id, id),
    CONSTRAINT usage_reservations_state_valid CHECK (state IN ('held', 'finalized', 'released', 'expired')),
    CONSTRAINT usage_reservations_amount_valid CHECK (amount > 0),
    CONSTRAINT usage_reservations_consumed_valid
        CHECK ((state = 'held') = (consumed IS NULL) AND consumed BETWEEN 0 AND amount),
    FOREIGN KEY (organization_id, customer_id)
        REFERENCES flagship.customers (organization_id, id) ON DELETE CASCADE,
    FOREIGN KEY (organization_id, metric_id)
        REFERENCES flagship.metrics (organization_id, id) ON DELETE CASCADE
);
CREATE UNIQUE INDEX usage_reservations_idempotency
    ON flagship.usage_reservations (organization_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
-- What lazy expiry and checks look for: a customer's held reservations.
CREATE INDEX usage_reservations_held
    ON flagship.usage_reservations (organization_id, customer_id, metric_id, expires_at)
    WHERE state = 'held';

SELECT pg_catalog.pg_extension_config_dump('flagship.usage_reservations', '');
SELECT flagship.isolate_tenant_table('usage_reservations');
-- Only FlagShip's usage functions write reservations (as for counters).
CREATE POLICY usage_reservations_insert_by_functions ON flagship.usage_reservations AS RESTRICTIVE
    FOR INSERT WITH CHECK ((SELECT flagship.usage_writes_open()));
CREATE POLICY usage_reservations_update_by_functions ON flagship.usage_reservations AS RESTRICTIVE
    FOR UPDATE USING ((SELECT flagship.usage_writes_open()));
CREATE POLICY usage_reservations_delete_by_functions ON flagship.usage_reservations AS RESTRICTIVE
    FOR DELETE USING ((SELECT flagship.usage_writes_open()));
GRANT SELECT ON flagship.usage_reservations TO flagship_admin, flagship_app, flagship_auditor;
GRANT INSERT, UPDATE ON flagship.usage_reservations TO flagship_app, flagship_admin;

-- Records the reservation whose consumption record_usage just made under
-- the ledger key `reservation:<id>`; answers its expiry. Called by
-- reserve_usage with usage writes open.
CREATE FUNCTION flagship.hold_reservation(reservation_id uuid, ttl interval, idempotency_key text)
RETURNS timestamptz
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    held flagship.usage_reservations;
BEGIN
    INSERT INTO flagship.usage_reservations AS r
        (organization_id, id, customer_id, metric_id, amount, period_start, paid_by, expires_at,
         idempotency_key)
    SELECT l.organization_id, reservation_id, l.customer_id, l.metric_id, l.amount, l.period_start,
           l.paid_by, now() + ttl, hold_reservation.idempotency_key
      FROM flagship.usage_ledger l
     WHERE l.organization_id = flagship.current_organization_id()
       AND l.idempotency_key = 'reservation:' || reservation_id
    RETURNING r.* INTO held;
    RETURN held.expires_at;
END
$fn$;

-- Gives `refund` of a reservation back: to its period's counter, or into
-- the grants it drew from (last drawn first; a grant that expired since
-- keeps what it gets back, unusable). Appends the `release` ledger row.
CREATE FUNCTION flagship.refund_reservation(reservation flagship.usage_reservations, refund bigint)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    drawn record;
    take bigint;
    left_over bigint := refund;
    refunded jsonb := '[]';
    after bigint;
    terms flagship.usage_ledger;
BEGIN
    IF refund = 0 THEN
        RETURN;
    END IF;
    SELECT * INTO terms FROM flagship.usage_ledger l
     WHERE l.organization_id = reservation.organization_id
       AND l.idempotency_key = 'reservation:' || reservation.id;
    IF reservation.paid_by IS NULL THEN
        -- Into the period's slices (one, unless the metric is sliced), in
        -- slice order as every rebalancing locks them; never below zero,
        -- whatever happened to the counter meanwhile. A slice's cap stays:
        -- what comes back is room in that slice.
        FOR drawn IN SELECT c.slice, c.used FROM flagship.usage_counters c
                      WHERE c.organization_id = reservation.organization_id
                        AND c.customer_id = reservation.customer_id
                        AND c.metric_id = reservation.metric_id
                        AND c.period_start IS NOT DISTINCT FROM reservation.period_start
                      ORDER BY c.slice FOR UPDATE LOOP
            EXIT WHEN left_over = 0;
            take := least(left_over, drawn.used);
            UPDATE flagship.usage_counters c SET used = c.used - take, updated_at = now()
             WHERE c.organization_id = reservation.organization_id AND c.customer_id = reservation.customer_id
               AND c.metric_id = reservation.metric_id AND c.slice = drawn.slice;
            left_over := left_over - take;
        END LOOP;
        SELECT sum(c.used) INTO after FROM flagship.usage_counters c
         WHERE c.organization_id = reservation.organization_id AND c.customer_id = reservation.customer_id
           AND c.metric_id = reservation.metric_id
           AND c.period_start IS NOT DISTINCT FROM reservation.period_start;
    ELSE
        FOR drawn IN SELECT p.value FROM jsonb_array_elements(reservation.paid_by) WITH ORDINALITY p
                      ORDER BY p.ordinality DESC LOOP
            EXIT WHEN left_over = 0;
            take := least(left_over, (drawn.value->>'amount')::bigint);
            UPDATE flagship.credit_grants g SET remaining = g.remaining + take
             WHERE g.organization_id = reservation.organization_id AND g.id = (drawn.value->>'grant')::uuid;
            refunded := refunded || jsonb_build_array(jsonb_build_object('grant', drawn.value->'grant', 'amount', take));
            left_over := left_over - take;
        END LOOP;
        SELECT coalesce(sum(g.remaining), 0) INTO after FROM flagship.credit_grants g
         WHERE g.organization_id = reservation.organization_id AND g.customer_id = reservation.customer_id
           AND g.metric_id = reservation.metric_id AND g.remaining > 0
           AND (g.expires_at IS NULL OR g.expires_at > now());
    END IF;
    INSERT INTO flagship.usage_ledger
        (organization_id, customer_id, metric_id, period_start, kind, amount, used_after,
         idempotency_key, usage_limit, enforcement, resets_at, paid_by)
    VALUES (reservation.organization_id, reservation.customer_id, reservation.metric_id,
            reservation.period_start, 'release', -refund, coalesce(after, 0), NULL,
            terms.usage_limit, coalesce(terms.enforcement, 'hard'), terms.resets_at,
            CASE WHEN reservation.paid_by IS NOT NULL THEN refunded END);
END
$fn$;

CREATE FUNCTION flagship.reservation_document(reservation flagship.usage_reservations) RETURNS jsonb
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT jsonb_build_object('reservation_id', reservation.id, 'state', reservation.state,
                              'reserved', reservation.amount, 'consumed', reservation.consumed,
                              'released', reservation.amount - reservation.consumed,
                              'expires_at', reservation.expires_at)
$fn$;

-- Finalizes (consume = what the work cost) or releases (consume = 0) a
-- held reservation; one past its expiry is expired instead. A settled
-- reservation answers how it was settled ("replayed": true); finalizing
-- it again with another amount is 22023. A key bound to an environment
-- (`key_environment`) settles only reservations of its customers, and a
-- customer's key (`acting_customer`) only its own. Called with usage
-- writes open.
CREATE FUNCTION flagship.settle_reservation(reservation_id uuid, consume bigint, settle_as text,
                                            acting_customer text, key_environment uuid)
RETURNS jsonb
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    org constant uuid := flagship.current_organization_id();
    held flagship.usage_reservations;
BEGIN
    -- Another organization's reservation is absent (row-level security
    -- would hide it too; named as a value, Citus locks it in the
    -- organization's shard, #21). A superuser without an organization
    -- finds any.
    IF org IS NULL THEN
        SELECT * INTO held FROM flagship.usage_reservations r WHERE r.id = reservation_id FOR UPDATE;
    ELSE
        SELECT * INTO held FROM flagship.usage_reservations r
         WHERE r.organization_id = org AND r.id = reservation_id FOR UPDATE;
    END IF;
    IF NOT FOUND OR ((acting_customer IS NOT NULL OR key_environment IS NOT NULL) AND NOT EXISTS (
            SELECT 1 FROM flagship.customers c
             WHERE c.organization_id = held.organization_id AND c.id = held.customer_id
               AND (acting_customer IS NULL OR c.external_key = acting_customer)
               AND (key_environment IS NULL OR c.environment_id = key_environment))) THEN
        RAISE EXCEPTION 'reservation_id: reservation % not found', reservation_id
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF consume IS NULL OR consume < 0 OR consume > held.amount THEN
        RAISE EXCEPTION 'amount: must be from 0 to the % reserved, got %', held.amount, coalesce(consume::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF held.state <> 'held' THEN
        IF settle_as = 'finalized' AND held.state = 'finalized' AND held.consumed <> consume THEN
            RAISE EXCEPTION 'reservation %: finalized already, with %', reservation_id, held.consumed
                USING ERRCODE = 'invalid_parameter_value',
                      HINT = 'a retry must repeat the first call exactly';
        END IF;
        RETURN flagship.reservation_document(held) || '{"replayed": true}';
    END IF;
    IF held.expires_at <= now() THEN
        settle_as := 'expired';
        consume := 0;
    END IF;
    PERFORM flagship.refund_reservation(held, held.amount - consume);
    UPDATE flagship.usage_reservations r SET state = settle_as, consumed = consume, settled_at = now()
     WHERE r.organization_id = held.organization_id AND r.id = held.id
    RETURNING r.* INTO held;
    RETURN flagship.reservation_document(held);
END
$fn$;

-- Releases a customer's held reservations of a metric that are past their
-- expiry (skipping any another session is settling); answers how many.
-- Called with usage writes open, by a call that would be refused otherwise.
CREATE FUNCTION flagship.expire_reservations(customer_id uuid, metric_id uuid) RETURNS integer
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    org constant uuid := flagship.current_organization_id();
    held flagship.usage_reservations;
    released integer := 0;
BEGIN
    FOR held IN SELECT * FROM flagship.usage_reservations r
                 WHERE r.organization_id = org
                   AND r.customer_id = expire_reservations.customer_id
                   AND r.metric_id = expire_reservations.metric_id
                   AND r.state = 'held' AND r.expires_at <= now()
                 ORDER BY r.id
                   FOR UPDATE SKIP LOCKED LOOP
        PERFORM flagship.refund_reservation(held, held.amount);
        UPDATE flagship.usage_reservations r SET state = 'expired', consumed = 0, settled_at = now()
         WHERE r.organization_id = held.organization_id AND r.id = held.id;
        released := released + 1;
    END LOOP;
    RETURN released;
END
$fn$;
