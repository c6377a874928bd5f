-- A per-organization event store in the Dynamic Consistency Boundary style
-- (dcb.events): one log per organization, read by type and tags, and a
-- conditional append ("append these events unless an event matching this
-- query appeared after position P").
--
-- Positions. Each organization has a head row holding its last position.
-- An append moves the head with one UPDATE, whose row lock is held until
-- the appending transaction ends, and only then writes its events. So
-- appends of one organization are serialised from the head on (appends of
-- different organizations never wait for each other), positions are
-- consecutive (a rolled-back append gives its positions back), and commit
-- order is position order: an appender gets its positions only after the
-- previous one has committed and become visible. A reader that polls
-- `position > last seen` therefore never misses an event that commits
-- later.
--
-- Conditions. The condition is checked by a statement that starts after
-- the head's lock is held, so under READ COMMITTED its snapshot sees every
-- append that held the lock before. REPEATABLE READ and SERIALIZABLE keep
-- the transaction's older snapshot, which would answer wrongly: a
-- conditional append refuses them.

-- Events are application data, like usage: appending and reading need no
-- member permission, only, in key mode, the key's scopes.
INSERT INTO flagship.permissions (key, description, builtin) VALUES
    ('events:read',  'Read the event store (API key scope)', true),
    ('events:write', 'Append to the event store (API key scope)', true);

CREATE TABLE flagship.event_heads (
    organization_id uuid   NOT NULL PRIMARY KEY
        REFERENCES flagship.organizations (id) ON DELETE CASCADE,
    last_position   bigint NOT NULL
);

CREATE TABLE flagship.events (
    organization_id uuid        NOT NULL REFERENCES flagship.organizations (id) ON DELETE CASCADE,
    position        bigint      NOT NULL,
    type            text        NOT NULL,
    tags            text[]      NOT NULL DEFAULT '{}',
    data            jsonb       NOT NULL DEFAULT '{}',
    metadata        jsonb       NOT NULL DEFAULT '{}',
    recorded_at     timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (organization_id, position),
    CONSTRAINT events_type_present CHECK (length(type) BETWEEN 1 AND 200),
    CONSTRAINT events_tags_present CHECK (array_position(tags, NULL) IS NULL)
);
-- Queries by type read this index in position order; queries by tags use
-- the GIN index (`tags @> ...`), combined with the primary key's range on
-- position by a bitmap AND (see BENCHMARKS.md for the plans).
CREATE INDEX events_type ON flagship.events (organization_id, type, position);
CREATE INDEX events_tags ON flagship.events USING gin (tags);

SELECT pg_catalog.pg_extension_config_dump('flagship.event_heads', '');
SELECT pg_catalog.pg_extension_config_dump('flagship.events', '');
ALTER TABLE flagship.event_heads ENABLE ROW LEVEL SECURITY;
ALTER TABLE flagship.event_heads FORCE ROW LEVEL SECURITY;
ALTER TABLE flagship.events ENABLE ROW LEVEL SECURITY;
ALTER TABLE flagship.events FORCE ROW LEVEL SECURITY;
CREATE POLICY event_heads_tenant ON flagship.event_heads
    USING (organization_id = (SELECT flagship.current_organization_id()));
CREATE POLICY events_tenant ON flagship.events FOR SELECT
    USING (organization_id = (SELECT flagship.current_organization_id()));
-- Only append_events writes (it runs as the extension's owner); nobody
-- updates or deletes an event.
GRANT SELECT ON flagship.events, flagship.event_heads TO flagship_admin, flagship_app, flagship_auditor;

-- A DCB query's items as an SQL condition on events aliased `e`, for
-- EXECUTE: one item matches when the event's type is one of its `types`
-- (any type when absent) and its tags contain all of its `tags`; items
-- are ORed, and no items match every event. Values are quoted literals,
-- so the planner can use the type and tag indexes for each item.
CREATE FUNCTION flagship.event_query_sql(items jsonb) RETURNS text
LANGUAGE sql
IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT coalesce(string_agg(
               format('(%s AND e.tags @> %L::text[])',
                      CASE WHEN i ? 'types'
                           THEN format('e.type = ANY (%L::text[])',
                                       ARRAY(SELECT jsonb_array_elements_text(i->'types')))
                           ELSE 'true' END,
                      ARRAY(SELECT jsonb_array_elements_text(coalesce(i->'tags', '[]')))),
               ' OR '), 'true')
      FROM jsonb_array_elements(items) i
$fn$;

-- Checks a DCB query document, naming the field at fault: {"items": [...]},
-- each item {"types": [text, ...], "tags": [text, ...]} (both optional).
CREATE FUNCTION flagship.check_event_query(document jsonb, field text) RETURNS jsonb
LANGUAGE plpgsql
IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    item jsonb;
    position int := 0;
BEGIN
    IF jsonb_typeof(document) IS DISTINCT FROM 'object' OR jsonb_typeof(document->'items') IS DISTINCT FROM 'array' THEN
        RAISE EXCEPTION '%: must be an object with an "items" array', field
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = '{"items": [{"types": ["OrderPlaced"], "tags": ["order:42"]}]}; "items": [] matches every event';
    END IF;
    FOR item IN SELECT * FROM jsonb_array_elements(document->'items') LOOP
        IF jsonb_typeof(item) <> 'object'
           OR EXISTS (SELECT FROM jsonb_object_keys(item) k WHERE k NOT IN ('types', 'tags')) THEN
            RAISE EXCEPTION '%.items[%]: must be an object with "types" and/or "tags"', field, position
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        IF (item ? 'types' AND (jsonb_typeof(item->'types') <> 'array'
                                OR EXISTS (SELECT FROM jsonb_array_elements(item->'types') t
                                            WHERE jsonb_typeof(t) <> 'string')))
           OR (item ? 'tags' AND (jsonb_typeof(item->'tags') <> 'array'
                                  OR EXISTS (SELECT FROM jsonb_array_elements(item->'tags') t
                                              WHERE jsonb_typeof(t) <> 'string'))) THEN
            RAISE EXCEPTION '%.items[%]: "types" and "tags" must be arrays of strings', field, position
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        position := position + 1;
    END LOOP;
    RETURN document->'items';
END
$fn$;

-- Appends `events` to the session's organization, unless `condition`
-- says otherwise, and answers {"first_position", "last_position"}.
CREATE FUNCTION flagship.append_events(events jsonb, condition jsonb DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    organization uuid := flagship.current_organization_id();
    count int;
    items jsonb;
    after bigint;
    last bigint;
    problem text;
    conflict boolean := false;
BEGIN
    IF organization IS NULL THEN
        RAISE EXCEPTION 'append_events: no organization in this session'
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'SET LOCAL flagship.organization_id, or authenticate with an API key';
    END IF;
    IF flagship.key_grants('events:write') IS FALSE THEN
        RAISE EXCEPTION 'append_events: this transaction''s API key lacks the scope events:write'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF (SELECT o.status FROM flagship.organizations o WHERE o.id = organization) IS DISTINCT FROM 'active' THEN
        RAISE EXCEPTION 'append_events: the organization is not active'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF jsonb_typeof(events) IS DISTINCT FROM 'array' OR jsonb_array_length(events) = 0 THEN
        RAISE EXCEPTION 'events: must be a non-empty array of events'
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = '[{"type": "OrderPlaced", "tags": ["order:42"], "data": {...}, "metadata": {...}}]';
    END IF;
    -- Every event checked in one statement; the first fault is named.
    SELECT format('events[%s]%s', x.ordinality - 1, x.fault) INTO problem
      FROM (SELECT e.ordinality,
                   CASE WHEN jsonb_typeof(e.event) <> 'object'
                          OR EXISTS (SELECT FROM jsonb_object_keys(e.event) k
                                      WHERE k NOT IN ('type', 'tags', 'data', 'metadata'))
                        THEN ': must be an object with "type" and optional "tags", "data", "metadata"'
                        WHEN jsonb_typeof(e.event->'type') IS DISTINCT FROM 'string'
                          OR length(e.event->>'type') NOT BETWEEN 1 AND 200
                        THEN '.type: must be a string of 1 to 200 characters'
                        WHEN e.event ? 'tags'
                         AND (jsonb_typeof(e.event->'tags') <> 'array'
                              OR EXISTS (SELECT FROM jsonb_array_elements(e.event->'tags') t
                                          WHERE jsonb_typeof(t) <> 'string'))
                        THEN '.tags: must be an array of strings'
                   END AS fault
              FROM jsonb_array_elements(events) WITH ORDINALITY AS e (event, ordinality)) x
     WHERE x.fault IS NOT NULL
     ORDER BY x.ordinality
     LIMIT 1;
    IF problem IS NOT NULL THEN
        RAISE EXCEPTION '%', problem USING ERRCODE = 'invalid_parameter_value';
    END IF;
    count := jsonb_array_length(events);

    IF condition IS NOT NULL THEN
        IF jsonb_typeof(condition) <> 'object'
           OR EXISTS (SELECT FROM jsonb_object_keys(condition) k WHERE k NOT IN ('fail_if_events_match', 'after')) THEN
            RAISE EXCEPTION 'condition: must be an object with "fail_if_events_match" and optional "after"'
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        items := flagship.check_event_query(condition->'fail_if_events_match', 'condition.fail_if_events_match');
        IF condition ? 'after' AND (jsonb_typeof(condition->'after') <> 'number'
                                    OR (condition->>'after')::numeric <> trunc((condition->>'after')::numeric)
                                    OR (condition->>'after')::numeric < 0) THEN
            RAISE EXCEPTION 'condition.after: must be a position (a non-negative integer)'
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        after := coalesce((condition->>'after')::bigint, 0);
        IF current_setting('transaction_isolation') <> 'read committed' THEN
            RAISE EXCEPTION 'append_events: a conditional append needs READ COMMITTED, not %',
                upper(current_setting('transaction_isolation'))
                USING ERRCODE = 'invalid_transaction_state',
                      HINT = 'a transaction snapshot older than the append lock could miss a conflicting event';
        END IF;
    END IF;

    -- Take the organization's head (and its lock, held to commit) first
    -- (created by the first append, racing ones meeting in the upsert) ...
    UPDATE flagship.event_heads h SET last_position = h.last_position + count
     WHERE h.organization_id = organization
    RETURNING h.last_position INTO last;
    IF NOT FOUND THEN
        INSERT INTO flagship.event_heads AS h (organization_id, last_position)
        VALUES (organization, count)
        ON CONFLICT (organization_id) DO UPDATE SET last_position = h.last_position + count
        RETURNING h.last_position INTO last;
    END IF;
    -- ... then check, in a statement whose snapshot sees every append that
    -- held the head before.
    IF items IS NOT NULL THEN
        EXECUTE format('SELECT EXISTS (SELECT 1 FROM flagship.events e
                                        WHERE e.organization_id = $1 AND e.position > $2 AND (%s))',
                       flagship.event_query_sql(items))
           INTO conflict USING organization, after;
    END IF;
    IF conflict THEN
        RAISE EXCEPTION 'append_events: an event matching the condition was appended after position %', after
            USING ERRCODE = '40F01',
                  HINT = 'read the events again, decide again, and append with the new position';
    END IF;
    INSERT INTO flagship.events (organization_id, position, type, tags, data, metadata)
    SELECT organization, last - count + e.ordinality, e.event->>'type',
           ARRAY(SELECT jsonb_array_elements_text(coalesce(e.event->'tags', '[]'))),
           coalesce(e.event->'data', '{}'), coalesce(e.event->'metadata', '{}')
      FROM jsonb_array_elements(events) WITH ORDINALITY AS e (event, ordinality);
    -- Any role may LISTEN to any channel: the notification carries
    -- nothing (not even a position, which would count another
    -- organization's events). A woken reader polls read_events from the
    -- last position it saw.
    PERFORM pg_notify('flagship_events', '');
    RETURN jsonb_build_object('first_position', last - count + 1, 'last_position', last);
END
$fn$;
REVOKE ALL ON FUNCTION flagship.append_events(jsonb, jsonb) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION flagship.append_events(jsonb, jsonb) TO flagship_admin, flagship_app;

-- The session organization's events matching `query` (DCB items, as for
-- conditions), in position order (`backwards`: newest first), from
-- position `from` (inclusive), at most `limit` of them.
CREATE FUNCTION flagship.read_events(query jsonb DEFAULT '{"items": []}', options jsonb DEFAULT '{}')
RETURNS SETOF jsonb
LANGUAGE plpgsql
STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    items jsonb := flagship.check_event_query(query, 'query');
    backwards boolean;
    start bigint;
    most bigint;
BEGIN
    IF flagship.key_grants('events:read') IS FALSE THEN
        RAISE EXCEPTION 'read_events: this transaction''s API key lacks the scope events:read'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF jsonb_typeof(options) IS DISTINCT FROM 'object'
       OR EXISTS (SELECT FROM jsonb_object_keys(options) k WHERE k NOT IN ('from', 'backwards', 'limit'))
       OR (options ? 'from' AND jsonb_typeof(options->'from') <> 'number')
       OR (options ? 'limit' AND jsonb_typeof(options->'limit') <> 'number')
       OR (options ? 'backwards' AND jsonb_typeof(options->'backwards') <> 'boolean') THEN
        RAISE EXCEPTION 'options: must be an object with optional "from" (a position), "backwards" (a boolean) and "limit" (a count)'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    backwards := coalesce((options->>'backwards')::boolean, false);
    start := (options->>'from')::numeric::bigint;
    most := (options->>'limit')::numeric::bigint;
    IF most IS NOT NULL AND most < 0 THEN
        RAISE EXCEPTION 'options.limit: must not be negative' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN QUERY EXECUTE format(
        'SELECT jsonb_build_object(''position'', e.position, ''type'', e.type, ''tags'', to_jsonb(e.tags),
                                   ''data'', e.data, ''metadata'', e.metadata, ''recorded_at'', e.recorded_at)
           FROM flagship.events e
          WHERE e.organization_id = flagship.current_organization_id()
            AND ($1::bigint IS NULL OR e.position %s $1) AND (%s)
          ORDER BY e.position %s
          LIMIT $2',
        CASE WHEN backwards THEN '<=' ELSE '>=' END,
        flagship.event_query_sql(items),
        CASE WHEN backwards THEN 'DESC' ELSE 'ASC' END)
        USING start, most;
END
$fn$;
