-- Exposure counts: how often each variant of each flag was served, per
-- environment and UTC day. Evaluation never writes them: backends count in
-- memory while flagship.count_exposures is on, and flagship.flush_exposures()
-- adds a backend's counts here in one statement (call it when a pooled
-- connection is returned, or from a periodic job). Like the usage ledger,
-- this is observation, not configuration: it has no audit trigger.
CREATE TABLE flagship.flag_exposures (
    organization_id uuid   NOT NULL,
    environment_id  uuid   NOT NULL,
    flag_key        text   NOT NULL,
    variant         text   NOT NULL,
    day             date   NOT NULL,
    evaluations     bigint NOT NULL CHECK (evaluations >= 0),
    PRIMARY KEY (organization_id, environment_id, flag_key, variant, day),
    FOREIGN KEY (organization_id, environment_id)
        REFERENCES flagship.environments (organization_id, id) ON DELETE CASCADE
);
SELECT pg_catalog.pg_extension_config_dump('flagship.flag_exposures', '');
SELECT flagship.isolate_tenant_table('flag_exposures');
GRANT SELECT ON flagship.flag_exposures TO flagship_admin, flagship_app, flagship_auditor;
-- Flushing is what applications do.
GRANT INSERT, UPDATE ON flagship.flag_exposures TO flagship_app, flagship_admin;
