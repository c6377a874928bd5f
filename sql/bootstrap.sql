-- Group roles a DBA grants to login roles. Roles are cluster-wide, so they
-- may already exist from another database: create only what is missing.
DO $roles$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'flagship_admin') THEN
        CREATE ROLE flagship_admin NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'flagship_app') THEN
        CREATE ROLE flagship_app NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'flagship_auditor') THEN
        CREATE ROLE flagship_auditor NOLOGIN;
    END IF;
END
$roles$;

-- Nothing in the schema is reachable until granted below, table by table.
REVOKE ALL ON SCHEMA flagship FROM PUBLIC;
GRANT USAGE ON SCHEMA flagship TO flagship_admin, flagship_app, flagship_auditor;
