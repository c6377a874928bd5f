//! Where the public conformance suites (`../shared/conformance`, not copied
//! into this repository) are found at test time: `FLAGSHIP_CONFORMANCE_DIR`,
//! else `shared/conformance` beside this checkout or any folder above it.

use std::path::PathBuf;

pub fn dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("FLAGSHIP_CONFORMANCE_DIR") {
        return Some(PathBuf::from(dir));
    }
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest
        .ancestors()
        .map(|folder| folder.join("shared/conformance"))
        .chain(std::iter::once(PathBuf::from("/work/shared/conformance")))
        .find(|candidate| candidate.is_dir())
}

/// One section of GrowthBook's `cases.json`, if the suite is present.
pub fn growthbook(section: &str) -> Option<Vec<serde_json::Value>> {
    let path = dir()?.join("growthbook-sdk-cases/cases.json");
    let text = std::fs::read_to_string(path).ok()?;
    let cases: serde_json::Value = serde_json::from_str(&text).ok()?;
    cases.get(section)?.as_array().cloned()
}
