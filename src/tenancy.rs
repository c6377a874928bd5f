//! Organizations, projects and environments. The tables and the functions
//! that manage them are SQL (`sql/tenancy.sql`); this module holds what must
//! be Rust and the tests of the whole tenancy layer.

use pgrx::prelude::*;

/// The version of the installed extension library.
#[pg_extern(immutable, parallel_safe)]
pub fn version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use pgrx::prelude::*;

    fn sqlstate_of(sql: &str) -> Option<String> {
        // A savepoint per attempt, so one failing statement does not abort
        // the test's transaction.
        Spi::get_one::<String>(&format!(
            "DO $$ BEGIN {sql}; RAISE EXCEPTION USING ERRCODE = '00000', MESSAGE = 'no error'; \
             EXCEPTION WHEN OTHERS THEN PERFORM set_config('flagship_test.sqlstate', SQLSTATE, true); END $$; \
             SELECT nullif(current_setting('flagship_test.sqlstate'), '00000')"
        ))
        .ok()
        .flatten()
    }

    #[pg_test]
    fn version_matches_the_crate() {
        let found = Spi::get_one::<String>("SELECT flagship.version()").unwrap();
        assert_eq!(found.as_deref(), Some(env!("CARGO_PKG_VERSION")));
        let installed = Spi::get_one::<String>(
            "SELECT extversion FROM pg_extension WHERE extname = 'flagship'",
        )
        .unwrap();
        assert_eq!(installed.as_deref(), Some(env!("CARGO_PKG_VERSION")));
    }

    #[pg_test]
    fn create_project_makes_three_environments_with_a_default() {
        let org = Spi::get_one::<pgrx::Uuid>("SELECT flagship.create_organization('acme', 'Acme')")
            .unwrap()
            .unwrap();
        Spi::run(&format!(
            "SELECT flagship.create_project('{org}', 'shop', 'Shop')"
        ))
        .unwrap();
        let envs = Spi::get_one::<String>(
            "SELECT string_agg(key || ':' || is_default, ',' ORDER BY created_at, key) \
             FROM flagship.environments",
        )
        .unwrap();
        assert_eq!(
            envs.as_deref(),
            Some("development:true,production:false,staging:false")
        );
        let roles = Spi::get_one::<i64>("SELECT count(*) FROM flagship.roles").unwrap();
        assert_eq!(roles, Some(4));
    }

    #[pg_test]
    fn bad_slugs_and_keys_are_refused_with_22023() {
        assert_eq!(
            sqlstate_of("PERFORM flagship.create_organization('Bad Slug', 'x')").as_deref(),
            Some("22023")
        );
        // Plain SQL writes meet the same rule as a check constraint.
        assert_eq!(
            sqlstate_of("INSERT INTO flagship.organizations (slug, name) VALUES ('UPPER', 'x')")
                .as_deref(),
            Some("23514")
        );
        let org = Spi::get_one::<pgrx::Uuid>("SELECT flagship.create_organization('acme', 'Acme')")
            .unwrap()
            .unwrap();
        assert_eq!(
            sqlstate_of(&format!(
                "PERFORM flagship.create_project('{org}', 'a/b', 'x')"
            ))
            .as_deref(),
            Some("22023")
        );
        assert_eq!(
            sqlstate_of(&format!(
                "PERFORM flagship.create_project('{org}', 'ok', 'x', ARRAY['prod', 'Bad Env'])"
            ))
            .as_deref(),
            Some("22023")
        );
        assert_eq!(
            sqlstate_of("PERFORM flagship.create_organization('acme', 'Again')").as_deref(),
            Some("23505")
        );
        // Nothing of the refused project was written.
        let projects = Spi::get_one::<i64>("SELECT count(*) FROM flagship.projects").unwrap();
        assert_eq!(projects, Some(0));
    }

    #[pg_test]
    fn deleting_a_project_cascades_to_its_environments() {
        let org = Spi::get_one::<pgrx::Uuid>("SELECT flagship.create_organization('acme', 'Acme')")
            .unwrap()
            .unwrap();
        Spi::run(&format!(
            "SELECT flagship.create_project('{org}', 'shop', 'Shop')"
        ))
        .unwrap();
        Spi::run("DELETE FROM flagship.projects WHERE key = 'shop'").unwrap();
        let left = Spi::get_one::<i64>("SELECT count(*) FROM flagship.environments").unwrap();
        assert_eq!(left, Some(0));
        Spi::run(&format!(
            "DELETE FROM flagship.organizations WHERE id = '{org}'"
        ))
        .unwrap();
        let roles = Spi::get_one::<i64>("SELECT count(*) FROM flagship.roles").unwrap();
        assert_eq!(roles, Some(0));
    }

    #[pg_test]
    fn environment_names_resolve_in_every_form() {
        let org = Spi::get_one::<pgrx::Uuid>("SELECT flagship.create_organization('acme', 'Acme')")
            .unwrap()
            .unwrap();
        Spi::run(&format!(
            "SELECT flagship.create_project('{org}', 'shop', 'Shop')"
        ))
        .unwrap();
        let by_id = Spi::get_one::<String>(
            "SELECT id::text FROM flagship.environments WHERE key = 'production'",
        )
        .unwrap()
        .unwrap();
        for name in ["shop/production", "acme/shop/production", by_id.as_str()] {
            let found = Spi::get_one::<String>(&format!(
                "SELECT flagship.resolve_environment('{name}')::text"
            ))
            .unwrap();
            assert_eq!(found.as_deref(), Some(by_id.as_str()), "resolving {name}");
        }
        for unknown in [
            "shop/nope",
            "nope/production",
            "x/y/z/w",
            "other/shop/production",
        ] {
            assert_eq!(
                sqlstate_of(&format!(
                    "PERFORM flagship.resolve_environment('{unknown}')"
                ))
                .as_deref(),
                Some("22023"),
                "resolving {unknown}"
            );
        }
    }

    #[pg_test]
    fn short_names_shared_by_two_organizations_are_ambiguous() {
        for slug in ["acme", "globex"] {
            Spi::run(&format!(
                "SELECT flagship.create_project(flagship.create_organization('{slug}', '{slug}'), 'shop', 'Shop')"
            ))
            .unwrap();
        }
        // A superuser without a session organization sees both.
        assert_eq!(
            sqlstate_of("PERFORM flagship.resolve_environment('shop/production')").as_deref(),
            Some("22023")
        );
        let message = Spi::get_one::<String>(
            "DO $$ BEGIN PERFORM flagship.resolve_environment('shop/production'); \
             EXCEPTION WHEN OTHERS THEN PERFORM set_config('flagship_test.message', SQLERRM, true); END $$; \
             SELECT current_setting('flagship_test.message')",
        )
        .unwrap();
        assert!(message
            .unwrap()
            .contains("\"shop/production\" is ambiguous"));
        // Naming the organization settles it.
        Spi::run(
            "SELECT set_config('flagship.organization_id', \
             (SELECT id::text FROM flagship.organizations WHERE slug = 'globex'), true)",
        )
        .unwrap();
        let resolved =
            Spi::get_one::<String>("SELECT flagship.resolve_environment('shop/production')::text")
                .unwrap();
        let org = Spi::get_one_with_args::<String>(
            "SELECT o.slug FROM flagship.environments e JOIN flagship.organizations o \
             ON o.id = e.organization_id WHERE e.id::text = $1",
            &[resolved.into()],
        )
        .unwrap();
        assert_eq!(org.as_deref(), Some("globex"));
    }

    #[pg_test]
    fn rls_isolates_organizations_for_a_non_superuser() {
        let a = Spi::get_one::<pgrx::Uuid>("SELECT flagship.create_organization('acme', 'Acme')")
            .unwrap()
            .unwrap();
        let b =
            Spi::get_one::<pgrx::Uuid>("SELECT flagship.create_organization('globex', 'Globex')")
                .unwrap()
                .unwrap();
        Spi::run(&format!(
            "SELECT flagship.create_project('{a}', 'shop', 'Shop')"
        ))
        .unwrap();
        Spi::run(&format!(
            "SELECT flagship.create_project('{b}', 'shop', 'Shop')"
        ))
        .unwrap();
        Spi::run("CREATE ROLE flagship_test_admin NOLOGIN IN ROLE flagship_admin").unwrap();
        Spi::run("SET LOCAL ROLE flagship_test_admin").unwrap();

        let count = |table: &str| {
            Spi::get_one::<i64>(&format!("SELECT count(*) FROM flagship.{table}"))
                .unwrap()
                .unwrap()
        };
        // No context: no rows anywhere.
        for table in [
            "organizations",
            "projects",
            "environments",
            "roles",
            "role_permissions",
        ] {
            assert_eq!(count(table), 0, "{table} without context");
        }
        Spi::run(&format!("SET LOCAL flagship.organization_id = '{a}'")).unwrap();
        assert_eq!(count("organizations"), 1);
        assert_eq!(count("environments"), 3);
        let visible = Spi::get_one::<i64>(&format!(
            "SELECT count(*) FROM flagship.environments WHERE organization_id = '{b}'"
        ))
        .unwrap();
        assert_eq!(visible, Some(0));
        // Writing into another organization is refused by the policy.
        assert_eq!(
            sqlstate_of(&format!(
                "INSERT INTO flagship.projects (organization_id, key, name) VALUES ('{b}', 'x', 'x')"
            ))
            .as_deref(),
            Some("42501")
        );
        // Updates cannot reach the other organization's rows.
        Spi::run("UPDATE flagship.projects SET name = 'Mine'").unwrap();
        Spi::run("RESET ROLE").unwrap();
        let untouched = Spi::get_one::<String>(&format!(
            "SELECT name FROM flagship.projects WHERE organization_id = '{b}'"
        ))
        .unwrap();
        assert_eq!(untouched.as_deref(), Some("Shop"));
    }
}
