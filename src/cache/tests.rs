    use pgrx::prelude::*;

    use crate::test_support::{organization_with_shop, text};

    fn usage(field: &str) -> i64 {
        text(&format!("SELECT flagship.cache_usage() ->> '{field}'"))
            .parse()
            .unwrap()
    }

    /// Bug of #14: every spelling of an environment compiled a copy of its
    /// own (40 spellings of a 10 MB variant took a backend to 431 MB).
    #[pg_test]
    fn one_compiled_copy_per_environment_however_it_is_named() {
        organization_with_shop("spell", "Spell");
        Spi::run(
            r#"SELECT flagship.put_flag('shop', '{"key": "f", "environments": {"production": {"enabled": true}}}')"#,
        )
        .unwrap();
        let id = text(
            "SELECT e.id::text FROM flagship.environments e JOIN flagship.projects p ON p.id = e.project_id \
              WHERE p.key = 'shop' AND e.key = 'production' \
                AND e.organization_id = flagship.current_organization_id()",
        );
        let before = usage("environments");
        let loads = usage("loads");
        for name in [
            "shop/production".to_string(),
            format!("{}/shop/production", text("SELECT slug FROM flagship.organizations WHERE id = flagship.current_organization_id()")),
            id.clone(),
            id.to_uppercase(),
            " shop/production ".to_string(),
        ] {
            assert_eq!(
                text(&format!("SELECT flagship.flagship_evaluate('f', '{{}}', '{name}') ->> 'reason'")),
                "STATIC",
                "{name}"
            );
        }
        assert_eq!(usage("environments"), before + 1);
        assert_eq!(usage("loads"), loads + 1);
    }

    /// Bug of #14: past 256 environments the cache started over and then
    /// reloaded on every call. Now it drops the least recently used within
    /// flagship.cache_size, and answers stay exact through evictions.
    #[pg_test]
    fn eviction_under_the_memory_limit_keeps_answers_exact() {
        organization_with_shop("evict", "Evict");
        Spi::run("SET LOCAL flagship.cache_size = 64").unwrap();
        let projects = 24;
        for i in 0..projects {
            Spi::run(&format!(
                r#"SELECT flagship.create_project(flagship.current_organization_id(), 'p{i}', 'P{i}');
                   SELECT flagship.put_flag('p{i}', '{{"key": "which", "kind": "multivariate", "off_variant": "v",
                       "variants": {{"v": "project {i}"}}, "environments": {{"production": {{"enabled": true}}}}}}')"#
            ))
            .unwrap();
        }
        for round in 0..3 {
            for i in 0..projects {
                assert_eq!(
                    text(&format!(
                        "SELECT flagship.flagship_evaluate('which', '{{}}', 'p{i}/production') ->> 'value'"
                    )),
                    format!("project {i}"),
                    "round {round}"
                );
            }
            let bytes = usage("bytes");
            assert!(bytes <= 64 * 1024 + 16 * 1024, "{bytes} bytes held");
        }
        assert!(usage("environments") < projects, "nothing was evicted");
    }
