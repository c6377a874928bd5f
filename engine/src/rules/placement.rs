//! Where a subject falls: the attributes that identify it (the first
//! present wins), the salt and the hash profile, for rollouts and samples.

use std::borrow::Cow;

use serde_json::Value;

use super::conditions::{lookup_path, Attributes};
use crate::bucketing::Profile;

#[derive(Debug)]
pub(super) enum BucketBy {
    TargetingKey,
    Attribute(String, Vec<String>),
}

/// How a subject is placed: which attributes identify it (the first present
/// wins), under which salt, with whose hash.
#[derive(Debug)]
pub(super) struct Placement {
    pub(super) bucket_by: Vec<BucketBy>,
    pub(super) salt: String,
    pub(super) flag_key: String,
    pub(super) profile: Profile,
}

impl Placement {
    pub(super) fn new(
        bucket_by: &[String],
        salt: Option<&String>,
        flag_key: &str,
        profile: Profile,
    ) -> Placement {
        Placement {
            bucket_by: bucket_by
                .iter()
                .map(|attribute| match attribute.as_str() {
                    "targeting_key" | "key" => BucketBy::TargetingKey,
                    attribute => BucketBy::Attribute(
                        attribute.to_string(),
                        attribute.split('.').map(str::to_string).collect(),
                    ),
                })
                .collect(),
            salt: salt.cloned().unwrap_or_else(|| flag_key.to_string()),
            flag_key: flag_key.to_string(),
            profile,
        }
    }

    /// The value the subject is bucketed by, if the context has one.
    pub(super) fn subject<'c>(
        &self,
        attributes: &'c dyn Attributes,
        targeting_key: Option<&'c str>,
    ) -> Option<Cow<'c, str>> {
        self.bucket_by.iter().find_map(|bucket_by| match bucket_by {
            BucketBy::TargetingKey => targeting_key.map(Cow::Borrowed),
            BucketBy::Attribute(name, path) => scalar_text(lookup_path(attributes, name, path)?),
        })
    }

    /// Where `subject` falls in a rollout of `total` positions.
    pub(super) fn rollout_position(&self, subject: &str, total: u32) -> u32 {
        self.profile
            .rollout_position(&self.flag_key, &self.salt, subject, total)
    }

    pub(super) fn context_keys(&self) -> impl Iterator<Item = &str> {
        self.bucket_by
            .iter()
            .flat_map(|bucket_by| match bucket_by {
                BucketBy::TargetingKey => [None, None],
                BucketBy::Attribute(attribute, path) => {
                    [Some(attribute.as_str()), Some(path[0].as_str())]
                }
            })
            .flatten()
    }
}

#[derive(Debug)]
pub(super) struct CompiledSample {
    pub(super) percent: u32,
    pub(super) placement: Placement,
}

impl CompiledSample {
    pub(super) fn admits(&self, attributes: &dyn Attributes, targeting_key: Option<&str>) -> bool {
        // A subject the context cannot identify is outside every partial
        // sample (Unleash would draw it at random; evaluation stays
        // deterministic) and inside a full one only if identified.
        self.place(attributes, targeting_key)
            .is_some_and(|(_, position)| position < self.percent)
    }

    /// The subject the context identifies and its position in the
    /// sample, if it identifies one.
    pub(super) fn place<'c>(
        &self,
        attributes: &'c dyn Attributes,
        targeting_key: Option<&'c str>,
    ) -> Option<(Cow<'c, str>, u32)> {
        let subject = self.placement.subject(attributes, targeting_key)?;
        let position = self.placement.profile.sample_position(
            &self.placement.flag_key,
            &self.placement.salt,
            &subject,
        );
        Some((subject, position))
    }
}

pub(super) fn scalar_text(value: &Value) -> Option<Cow<'_, str>> {
    match value {
        Value::String(text) => Some(Cow::Borrowed(text)),
        Value::Number(number) => Some(Cow::Owned(number.to_string())),
        _ => None,
    }
}

/// The subject's identity: `targeting_key`, else `key`.
pub fn targeting_key(attributes: &dyn Attributes) -> Option<Cow<'_, str>> {
    attributes
        .get("targeting_key")
        .and_then(scalar_text)
        .or_else(|| attributes.get("key").and_then(scalar_text))
}
