-- Erasing a person (0.3): flagship.erase_subject replaces one person's
-- personal data in the session's organization with a pseudonym, and
-- records the erasure in the audit chain.
--
-- The chain hashes each event's content digest, not the content (see
-- audit.sql), so content can be replaced while the chain still proves
-- order and completeness; the erasure event lists the events it erased,
-- with the digest of each one's new content, which is what verify_audit_chain
-- checks their content against.

-- `value` with every string value equal to `subject` (never an object's
-- key) replaced by `pseudonym`, at any depth.
CREATE FUNCTION flagship.erase_values(value jsonb, subject text, pseudonym text)
RETURNS jsonb
LANGUAGE sql
IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT CASE jsonb_typeof(value)
        WHEN 'string' THEN CASE WHEN value = to_jsonb(subject) THEN to_jsonb(pseudonym) ELSE value END
        WHEN 'object' THEN (SELECT coalesce(jsonb_object_agg(f.key, flagship.erase_values(f.value, subject, pseudonym)), '{}')
                              FROM jsonb_each(value) f)
        WHEN 'array' THEN (SELECT coalesce(jsonb_agg(flagship.erase_values(e.value, subject, pseudonym) ORDER BY e.ordinality), '[]')
                             FROM jsonb_array_elements(value) WITH ORDINALITY e)
        ELSE value END
$fn$;

-- An audit diff with the subject's values replaced (see erase_values), and
-- the values of `fields` (top-level members, each an {"old", "new"} pair)
-- replaced by "[erased]".
CREATE FUNCTION flagship.erase_from_document(document jsonb, subject text, pseudonym text, fields text[])
RETURNS jsonb
LANGUAGE sql
IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT CASE WHEN jsonb_typeof(replaced) = 'object' THEN
        (SELECT coalesce(jsonb_object_agg(f.key,
                    CASE WHEN f.key = ANY (fields) AND jsonb_typeof(f.value) = 'object'
                         THEN (SELECT jsonb_object_agg(side.key, '"[erased]"'::jsonb)
                                 FROM jsonb_each(f.value) side)
                         ELSE f.value END), '{}')
           FROM jsonb_each(replaced) f)
        ELSE replaced END
      FROM (SELECT flagship.erase_values(document, subject, pseudonym) AS replaced) r
$fn$;

CREATE FUNCTION flagship.erase_subject(subject text) RETURNS jsonb
LANGUAGE plpgsql
-- It rewrites what no role may write (events, the audit trail's content),
-- so it runs as the extension's owner and confines itself to the session's
-- organization explicitly (the owner is not bound by row-level security).
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    org uuid := flagship.current_organization_id();
    pseudonym text := 'erased:' || gen_random_uuid();
    subject_digest text;
    member_ids uuid[];
    customer_ids uuid[];
    events_erased bigint;
    erased_seqs bigint[];
    erased_diffs jsonb[];
    erased_actors text[];
    erased_digests jsonb;
    erasure_seq bigint;
BEGIN
    IF subject IS NULL OR btrim(subject) = '' THEN
        RAISE EXCEPTION 'subject: must not be empty' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF org IS NULL THEN
        RAISE EXCEPTION 'no organization in this session: set flagship.organization_id first'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    -- Checked here, not by require_permission: as the owner this function
    -- would pass it. The actor's roles, or in key mode the key's scopes.
    IF NOT (flagship.actor_may('organization:write')
            OR (SELECT r.rolsuper FROM pg_roles r WHERE r.rolname = flagship.acting_role())) THEN
        RAISE EXCEPTION 'erase_subject: actor "%" lacks the permission organization:write in organization %',
            flagship.current_actor(), org
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'an owner of the organization erases subjects (in key mode: a key with organization:write)';
    END IF;
    -- One erasure at a time per organization: each reads the trail as the
    -- previous one left it (under READ COMMITTED; under REPEATABLE READ a
    -- concurrent erasure's rewrite of the same event fails with 40001).
    PERFORM pg_advisory_xact_lock(hashtextextended('flagship erase ' || org::text, 0));
    -- Salted with the organization, so digests do not link a person across tenants.
    subject_digest := encode(sha256(convert_to(org::text || ':' || subject, 'UTF8')), 'hex');

    -- The member: their key becomes the pseudonym and their name goes
    -- (roles stay, so the history of who could do what stays readable).
    UPDATE flagship.members m SET user_key = pseudonym, name = NULL
     WHERE m.organization_id = org AND m.user_key = subject;
    SELECT array_agg(m.id) INTO member_ids FROM flagship.members m
     WHERE m.organization_id = org AND m.user_key = pseudonym;
    -- The customer whose key is theirs: key, attributes and name (the
    -- application finds it under the pseudonym, or not at all).
    UPDATE flagship.customers c SET external_key = pseudonym, attributes = '{}', name = NULL, updated_at = now()
     WHERE c.organization_id = org AND c.external_key = subject;
    SELECT array_agg(c.id) INTO customer_ids FROM flagship.customers c
     WHERE c.organization_id = org AND c.external_key = pseudonym;
    -- Events about them: content emptied, their tag renamed to the pseudonym.
    UPDATE flagship.events e
       SET data = '{}', metadata = '{"erased": true}',
           tags = array_replace(e.tags, 'subject:' || subject, 'subject:' || pseudonym)
     WHERE e.organization_id = org AND e.tags @> ARRAY['subject:' || subject];
    GET DIAGNOSTICS events_erased = ROW_COUNT;

    -- The trail: every event whose content names them (the changes just
    -- made included), whose actor they were, or that changed the erased
    -- customer's attributes, with its content as it will be.
    SELECT array_agg(x.chain_seq ORDER BY x.chain_seq), array_agg(x.diff ORDER BY x.chain_seq),
           array_agg(x.actor ORDER BY x.chain_seq),
           jsonb_object_agg(x.chain_seq::text, encode(flagship.audit_content_digest(x.actor, x.diff), 'hex'))
      INTO erased_seqs, erased_diffs, erased_actors, erased_digests
      FROM (SELECT a.chain_seq,
                   flagship.erase_from_document(a.diff, subject, pseudonym, personal.fields) AS diff,
                   CASE WHEN a.actor = subject THEN pseudonym ELSE a.actor END AS actor
              FROM flagship.audit_events a
             -- The fields that are theirs wherever they change: the erased
             -- customer's attributes and name, the erased member's name.
             CROSS JOIN LATERAL (
                 SELECT CASE WHEN a.resource_type = 'customers'
                                  AND a.resource_id = ANY (coalesce(customer_ids, '{}')::text[])
                             THEN ARRAY['attributes', 'name']
                             WHEN a.resource_type = 'members'
                                  AND a.resource_id = ANY (coalesce(member_ids, '{}')::text[])
                             THEN ARRAY['name'] ELSE '{}'::text[] END AS fields) personal
             WHERE a.organization_id = org
               -- Erasure events name no one, and their records are what
               -- erased events are verified against: never rewritten.
               AND a.action <> 'erase'
               AND (a.actor = subject OR a.change_key = subject
                    OR strpos(a.diff::text, to_jsonb(subject)::text) > 0
                    OR a.diff ?| personal.fields)) x;
    -- The erasure event commits, in the chain, to the digest of each
    -- erased event's new content: changing it afterwards is detected.
    erasure_seq := flagship.audit_append(
        org, 'erase', 'subject', subject_digest,
        jsonb_build_object('subject_digest', subject_digest,
                           'members', coalesce(cardinality(member_ids), 0),
                           'customers', coalesce(cardinality(customer_ids), 0),
                           'events', events_erased,
                           'audit_events', coalesce(erased_digests, '{}')),
        'erasure', NULL, NULL);
    PERFORM set_config('flagship.erasing', erasure_seq::text, true);
    UPDATE flagship.audit_events a
       SET diff = e.diff, actor = e.actor,
           change_key = CASE WHEN a.change_key = subject THEN pseudonym ELSE a.change_key END,
           erased_by = erasure_seq
      FROM unnest(erased_seqs, erased_diffs, erased_actors) AS e (chain_seq, diff, actor)
     WHERE a.organization_id = org AND a.chain_seq = e.chain_seq;
    PERFORM set_config('flagship.erasing', '', true);

    RETURN jsonb_build_object('subject_digest', subject_digest, 'pseudonym', pseudonym,
                              'members', coalesce(cardinality(member_ids), 0),
                              'customers', coalesce(cardinality(customer_ids), 0),
                              'events', events_erased,
                              'audit_events', coalesce(cardinality(erased_seqs), 0),
                              'erasure_event', erasure_seq);
END
$fn$;
REVOKE ALL ON FUNCTION flagship.erase_subject(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION flagship.erase_subject(text) TO flagship_admin;
REVOKE ALL ON FUNCTION flagship.erase_from_document(jsonb, text, text, text[]) FROM PUBLIC;
REVOKE ALL ON FUNCTION flagship.erase_values(jsonb, text, text) FROM PUBLIC;
