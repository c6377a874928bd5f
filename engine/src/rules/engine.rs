//! Compiled configuration of one environment and the evaluation of flags
//! against a context. The order of evaluation is: archived or missing flag,
//! context check, environment switch, prerequisites, plan entitlement,
//! individual targets, rules in order, default.

use std::collections::{HashMap, HashSet};

use rustc_hash::FxBuildHasher;
use serde_json::Value;

use super::conditions::Attributes;
use super::criteria::{all_hold, Criterion};
use super::document::{FlagDefinition, Kind, SegmentDefinition};
use super::environment_config::{EnvironmentConfig, Sample, Serve};
use super::placement::{scalar_text, targeting_key, CompiledSample, Placement};
use super::resolution::{Denial, Entitlements, ErrorCode, Reason, Resolution};
use crate::bucketing;

mod explain;
pub use explain::Decision;

/// How deep prerequisite chains may go; writes refuse cycles, this guards
/// evaluation against anything that slipped past them.
const MAX_PREREQUISITE_DEPTH: usize = 16;

#[derive(Debug)]
enum CompiledServe {
    Variant(usize),
    Rollout {
        /// (variant index, weight) in the flag's variant order.
        slots: Vec<(usize, u32)>,
        weights: Vec<u32>,
        /// What positions are taken modulo: the weights' sum for an
        /// integer-weight profile, else the 100 000 buckets.
        total: u32,
        placement: Placement,
        unplaced: Option<usize>,
    },
}

#[derive(Debug)]
struct CompiledRule {
    id: String,
    segment: Option<String>,
    conditions: Vec<Criterion>,
    sample: Option<CompiledSample>,
    serve: CompiledServe,
}

#[derive(Debug)]
struct CompiledEnvironment {
    enabled: bool,
    targets: HashMap<String, usize, FxBuildHasher>,
    rules: Vec<CompiledRule>,
    default: CompiledServe,
    /// No targets and no rules: the answer does not depend on the context.
    is_static: bool,
}

#[derive(Debug)]
struct CompiledFlag {
    key: String,
    kind: Kind,
    variants: Vec<(String, Value)>,
    off: usize,
    /// Each prerequisite flag with the variants that satisfy it.
    prerequisites: Vec<(String, Vec<String>)>,
    archived: bool,
    environment: Option<CompiledEnvironment>,
    /// Every top-level context key an evaluation of this flag may read,
    /// prerequisites and segments included, so callers can hand the engine
    /// only those instead of converting the whole context.
    context_keys: Vec<String>,
}

#[derive(Debug)]
struct CompiledSegment {
    included: HashSet<String, FxBuildHasher>,
    excluded: HashSet<String, FxBuildHasher>,
    conditions: Vec<Criterion>,
}

/// Everything needed to evaluate every flag of one environment.
#[derive(Debug, Default)]
pub struct Snapshot {
    flags: HashMap<String, CompiledFlag, FxBuildHasher>,
    /// Flag keys in a stable order, for evaluate_all.
    order: Vec<String>,
    segments: HashMap<String, CompiledSegment, FxBuildHasher>,
    /// Every context key any live flag may read, sorted: what evaluate_all
    /// extracts once for all flags.
    live_context_keys: Vec<String>,
    /// Flags whose stored configuration could not be compiled (written
    /// around the validators, or by an older version), with why: each one
    /// answers an ERROR of its own, and every other flag evaluates normally.
    unloadable: HashMap<String, String, FxBuildHasher>,
}

fn variant_index(variants: &[(String, Value)], name: &str) -> usize {
    variants
        .iter()
        .position(|(known, _)| known == name)
        .expect("validated documents only name known variants")
}

fn compile_serve(serve: &Serve, flag: &FlagDefinition) -> CompiledServe {
    let salt = flag.salt.as_ref();
    match serve {
        Serve::Variant(name) => CompiledServe::Variant(variant_index(&flag.variants, name)),
        Serve::Rollout(rollout) => {
            let slots: Vec<(usize, u32)> = rollout
                .weights
                .iter()
                .map(|(name, weight)| (variant_index(&flag.variants, name), *weight))
                .collect();
            CompiledServe::Rollout {
                weights: slots.iter().map(|(_, weight)| *weight).collect(),
                total: if rollout.profile.has_integer_weights() {
                    slots.iter().map(|(_, weight)| weight).sum()
                } else {
                    bucketing::BUCKETS
                },
                slots,
                unplaced: rollout
                    .unplaced
                    .as_ref()
                    .map(|name| variant_index(&flag.variants, name)),
                placement: Placement::new(
                    &rollout.bucket_by,
                    rollout.salt.as_ref().or(salt),
                    &flag.key,
                    rollout.profile,
                ),
            }
        }
    }
}

fn compile_sample(sample: &Sample, flag: &FlagDefinition) -> CompiledSample {
    CompiledSample {
        percent: sample.percent,
        placement: Placement::new(
            &sample.bucket_by,
            sample.salt.as_ref().or(flag.salt.as_ref()),
            &flag.key,
            sample.profile,
        ),
    }
}

/// Takes the configuration by value: its rule ids, segments and condition
/// trees move into the compiled form instead of being copied.
fn compile_environment(flag: &FlagDefinition, config: EnvironmentConfig) -> CompiledEnvironment {
    let mut targets = HashMap::default();
    for (variant, keys) in config.targets {
        let index = variant_index(&flag.variants, &variant);
        for key in keys {
            targets.insert(key, index);
        }
    }
    let rules: Vec<CompiledRule> = config
        .rules
        .into_iter()
        .map(|rule| CompiledRule {
            serve: compile_serve(&rule.serve, flag),
            id: rule.id,
            segment: rule.segment,
            conditions: rule.conditions,
            sample: rule
                .sample
                .as_ref()
                .map(|sample| compile_sample(sample, flag)),
        })
        .collect();
    let default = match &config.default {
        Some(serve) => compile_serve(serve, flag),
        // An enabled boolean flag with nothing else configured is on.
        None => CompiledServe::Variant(
            flag.variants
                .iter()
                .position(|(name, _)| name == "on")
                .unwrap_or_else(|| variant_index(&flag.variants, &flag.off_variant)),
        ),
    };
    CompiledEnvironment {
        enabled: config.enabled,
        is_static: targets.is_empty() && rules.is_empty(),
        targets,
        rules,
        default,
    }
}

impl Snapshot {
    /// Compiles validated definitions. `flags` pairs each flag with its
    /// configuration in this environment, if it has one.
    pub fn compile(
        flags: Vec<(FlagDefinition, Option<EnvironmentConfig>)>,
        segments: Vec<SegmentDefinition>,
    ) -> Snapshot {
        let mut snapshot = Snapshot::default();
        for segment in segments {
            snapshot.segments.insert(
                segment.key.clone(),
                CompiledSegment {
                    included: segment.included.into_iter().collect(),
                    excluded: segment.excluded.into_iter().collect(),
                    conditions: segment.conditions,
                },
            );
        }
        for (flag, config) in flags {
            let compiled = CompiledFlag {
                key: flag.key.clone(),
                kind: flag.kind,
                off: variant_index(&flag.variants, &flag.off_variant),
                prerequisites: flag
                    .prerequisites
                    .iter()
                    .map(|p| (p.flag.clone(), p.variants.clone()))
                    .collect(),
                archived: flag.archived,
                environment: config.map(|config| compile_environment(&flag, config)),
                variants: flag.variants,
                context_keys: Vec::new(),
            };
            snapshot.order.push(compiled.key.clone());
            snapshot.flags.insert(compiled.key.clone(), compiled);
        }
        snapshot.order.sort();
        let keys: Vec<(String, Vec<String>)> = snapshot
            .order
            .iter()
            .map(|key| (key.clone(), snapshot.collect_context_keys(key)))
            .collect();
        for (key, context_keys) in keys {
            if let Some(flag) = snapshot.flags.get_mut(&key) {
                flag.context_keys = context_keys;
            }
        }
        let mut live: Vec<String> = snapshot
            .live_flag_keys()
            .flat_map(|key| snapshot.context_keys(key).iter().cloned())
            .collect();
        live.sort_unstable();
        live.dedup();
        snapshot.live_context_keys = live;
        snapshot
    }

    /// Records a flag that could not be compiled: it answers ERROR
    /// (`GENERAL`) with `why`, and stays among the live flags so that
    /// evaluate_all shows the problem instead of hiding the flag.
    pub fn mark_unloadable(&mut self, key: String, why: String) {
        if self.flags.remove(&key).is_none() && self.unloadable.contains_key(&key) {
            return;
        }
        if !self.order.contains(&key) {
            self.order.push(key.clone());
            self.order.sort();
        }
        self.unloadable.insert(key, why);
    }

    /// The context keys `evaluate` may read for any live flag.
    pub fn live_context_keys(&self) -> &[String] {
        &self.live_context_keys
    }

    fn collect_context_keys(&self, flag_key: &str) -> Vec<String> {
        let mut keys: Vec<&str> = vec!["targeting_key", "key"];
        let mut pending = vec![(flag_key, 0)];
        let mut visited: Vec<&str> = Vec::new();
        while let Some((key, depth)) = pending.pop() {
            if visited.contains(&key) || depth > MAX_PREREQUISITE_DEPTH {
                continue;
            }
            visited.push(key);
            let Some(flag) = self.flags.get(key) else {
                continue;
            };
            if flag.kind == Kind::Plan {
                keys.push("customer");
            }
            for (prerequisite, _) in &flag.prerequisites {
                pending.push((prerequisite, depth + 1));
            }
            let Some(environment) = &flag.environment else {
                continue;
            };
            let serves = environment
                .rules
                .iter()
                .map(|rule| &rule.serve)
                .chain([&environment.default]);
            for serve in serves {
                if let CompiledServe::Rollout { placement, .. } = serve {
                    keys.extend(placement.context_keys());
                }
            }
            for sample in environment
                .rules
                .iter()
                .filter_map(|rule| rule.sample.as_ref())
            {
                keys.extend(sample.placement.context_keys());
            }
            for rule in &environment.rules {
                let segment_conditions = rule
                    .segment
                    .as_ref()
                    .and_then(|segment| self.segments.get(segment))
                    .map(|segment| segment.conditions.as_slice())
                    .unwrap_or_default();
                for criterion in rule.conditions.iter().chain(segment_conditions) {
                    criterion.context_keys(&mut keys);
                }
            }
        }
        keys.sort_unstable();
        keys.dedup();
        keys.into_iter().map(str::to_string).collect()
    }

    /// The top-level context keys evaluating `flag_key` may read; empty for
    /// an unknown flag.
    pub fn context_keys(&self, flag_key: &str) -> &[String] {
        self.flags
            .get(flag_key)
            .map(|flag| flag.context_keys.as_slice())
            .unwrap_or_default()
    }

    /// Keys of every flag that is not archived, sorted.
    pub fn live_flag_keys(&self) -> impl Iterator<Item = &str> {
        self.order
            .iter()
            .filter(|key| {
                self.flags
                    .get(key.as_str())
                    .is_none_or(|flag| !flag.archived)
            })
            .map(String::as_str)
    }

    /// Evaluates with a JSON context; anything but an object is
    /// INVALID_CONTEXT.
    pub fn evaluate<'a>(
        &'a self,
        flag_key: &'a str,
        context: &Value,
        entitlements: &dyn Entitlements,
    ) -> Resolution<'a> {
        self.evaluate_extracting(flag_key, |_| context.as_object(), entitlements)
    }

    /// Evaluates with attributes made for the flag: `extract` gets the
    /// context keys the flag may read (`context_keys`) and gives the
    /// attributes, or `None` for a context that is not an object. One
    /// lookup of the flag serves both, instead of one per call (evaluation
    /// runs per row).
    pub fn evaluate_extracting<'a, A: Attributes>(
        &'a self,
        flag_key: &'a str,
        extract: impl FnOnce(&'a [String]) -> Option<A>,
        entitlements: &dyn Entitlements,
    ) -> Resolution<'a> {
        match self.flags.get(flag_key) {
            Some(flag) => {
                let attributes = extract(&flag.context_keys);
                let attributes = attributes.as_ref().map(|found| found as &dyn Attributes);
                self.evaluate_flag(flag, attributes, entitlements, 0)
            }
            None => self.missing(flag_key),
        }
    }

    /// Evaluates with any attribute source; `None` stands for a context
    /// that is not an object.
    pub fn evaluate_attributes<'a>(
        &'a self,
        flag_key: &'a str,
        attributes: Option<&dyn Attributes>,
        entitlements: &dyn Entitlements,
    ) -> Resolution<'a> {
        self.evaluate_at_depth(flag_key, attributes, entitlements, 0)
    }

    fn evaluate_at_depth<'a>(
        &'a self,
        flag_key: &'a str,
        attributes: Option<&dyn Attributes>,
        entitlements: &dyn Entitlements,
        depth: usize,
    ) -> Resolution<'a> {
        match self.flags.get(flag_key) {
            Some(flag) => self.evaluate_flag(flag, attributes, entitlements, depth),
            None => self.missing(flag_key),
        }
    }

    /// The answer for a flag key that names no compiled flag.
    fn missing<'a>(&'a self, flag_key: &'a str) -> Resolution<'a> {
        if let Some(why) = self.unloadable.get(flag_key) {
            return Resolution::error(
                flag_key,
                ErrorCode::General,
                format!("flag \"{flag_key}\" cannot be evaluated: {why}"),
            );
        }
        Resolution::error(
            flag_key,
            ErrorCode::FlagNotFound,
            format!("flag \"{flag_key}\" not found"),
        )
    }

    fn evaluate_flag<'a>(
        &'a self,
        flag: &'a CompiledFlag,
        attributes: Option<&dyn Attributes>,
        entitlements: &dyn Entitlements,
        depth: usize,
    ) -> Resolution<'a> {
        let flag_key = flag.key.as_str();
        if flag.archived {
            return Resolution::error(
                flag_key,
                ErrorCode::FlagNotFound,
                format!("flag \"{flag_key}\" is archived"),
            );
        }
        let Some(attributes) = attributes else {
            let mut resolution = flag.serve_index(flag.off, Reason::Error, None);
            resolution.error = Some((
                ErrorCode::InvalidContext,
                "context must be a JSON object".into(),
            ));
            return resolution;
        };
        let Some(environment) = flag.environment.as_ref().filter(|env| env.enabled) else {
            return flag.serve_index(flag.off, Reason::Disabled, None);
        };

        for (prerequisite, wanted) in &flag.prerequisites {
            let met = depth < MAX_PREREQUISITE_DEPTH && {
                let outcome =
                    self.evaluate_at_depth(prerequisite, Some(attributes), entitlements, depth + 1);
                outcome.error.is_none()
                    && outcome
                        .variant
                        .is_some_and(|variant| wanted.iter().any(|w| w == variant))
            };
            if !met {
                return flag.serve_index(flag.off, Reason::PrerequisiteFailed, Some(prerequisite));
            }
        }

        if flag.kind == Kind::Plan {
            let entitled = match attributes.get("customer").and_then(scalar_text) {
                Some(customer) => entitlements.grants(&customer, &flag.key),
                None => Err(Denial::NoCustomer),
            };
            if let Err(denial) = entitled {
                let mut resolution = flag.serve_index(flag.off, Reason::NotEntitled, None);
                resolution.detail = Some(denial);
                return resolution;
            }
        }

        let targeting_key = targeting_key(attributes);
        if let Some(key) = targeting_key
            .as_ref()
            .filter(|_| !environment.targets.is_empty())
        {
            if let Some(&index) = environment.targets.get(key.as_ref()) {
                return flag.serve_index(index, Reason::TargetingMatch, Some("targets"));
            }
        }

        for rule in &environment.rules {
            if !self.rule_matches(rule, attributes, targeting_key.as_deref()) {
                continue;
            }
            if let Some(sample) = &rule.sample {
                if !sample.admits(attributes, targeting_key.as_deref()) {
                    continue;
                }
            }
            match &rule.serve {
                CompiledServe::Variant(index) => {
                    return flag.serve_index(*index, Reason::TargetingMatch, Some(&rule.id));
                }
                rollout => {
                    // Without a value to bucket by, a rollout rule cannot place
                    // the subject: it falls through to the next rule.
                    if let Some(index) = pick_slot(rollout, attributes, targeting_key.as_deref()) {
                        return flag.serve_index(index, Reason::Split, Some(&rule.id));
                    }
                }
            }
        }

        match &environment.default {
            CompiledServe::Variant(index) => {
                let reason = if environment.is_static {
                    Reason::Static
                } else {
                    Reason::Default
                };
                flag.serve_index(*index, reason, None)
            }
            rollout => match pick_slot(rollout, attributes, targeting_key.as_deref()) {
                Some(index) => flag.serve_index(index, Reason::Split, None),
                None => flag.serve_index(flag.off, Reason::Default, None),
            },
        }
    }

    fn rule_matches(
        &self,
        rule: &CompiledRule,
        attributes: &dyn Attributes,
        targeting_key: Option<&str>,
    ) -> bool {
        if let Some(segment) = &rule.segment {
            if !self.in_segment(segment, attributes, targeting_key) {
                return false;
            }
        }
        all_hold(&rule.conditions, attributes)
    }

    fn in_segment(
        &self,
        key: &str,
        attributes: &dyn Attributes,
        targeting_key: Option<&str>,
    ) -> bool {
        let Some(segment) = self.segments.get(key) else {
            return false;
        };
        if let Some(subject) = targeting_key {
            if segment.excluded.contains(subject) {
                return false;
            }
            if segment.included.contains(subject) {
                return true;
            }
        }
        !segment.conditions.is_empty() && all_hold(&segment.conditions, attributes)
    }
}

impl CompiledFlag {
    fn serve_index<'a>(
        &'a self,
        index: usize,
        reason: Reason,
        rule: Option<&'a str>,
    ) -> Resolution<'a> {
        let (variant, value) = &self.variants[index];
        Resolution {
            key: &self.key,
            value,
            variant: Some(variant),
            reason,
            rule,
            detail: None,
            error: None,
        }
    }
}

fn pick_slot(
    serve: &CompiledServe,
    attributes: &dyn Attributes,
    targeting_key: Option<&str>,
) -> Option<usize> {
    let CompiledServe::Rollout {
        slots,
        weights,
        total,
        placement,
        unplaced,
    } = serve
    else {
        return None;
    };
    let Some(subject) = placement.subject(attributes, targeting_key) else {
        return *unplaced;
    };
    let position = placement.rollout_position(&subject, *total);
    bucketing::slot_for(position, weights).map(|slot| slots[slot].0)
}
