//! What one evaluation answers: the value, the variant and why, shaped
//! like OpenFeature's resolution details, and the plan entitlements a
//! plan-kind flag asks.

use serde_json::{Map, Value};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    Static,
    Default,
    TargetingMatch,
    Split,
    Disabled,
    PrerequisiteFailed,
    NotEntitled,
    Error,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Static => "STATIC",
            Reason::Default => "DEFAULT",
            Reason::TargetingMatch => "TARGETING_MATCH",
            Reason::Split => "SPLIT",
            Reason::Disabled => "DISABLED",
            Reason::PrerequisiteFailed => "PREREQUISITE_FAILED",
            Reason::NotEntitled => "NOT_ENTITLED",
            Reason::Error => "ERROR",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    FlagNotFound,
    EnvironmentNotFound,
    InvalidContext,
    TypeMismatch,
    General,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::FlagNotFound => "FLAG_NOT_FOUND",
            ErrorCode::EnvironmentNotFound => "ENVIRONMENT_NOT_FOUND",
            ErrorCode::InvalidContext => "INVALID_CONTEXT",
            ErrorCode::TypeMismatch => "TYPE_MISMATCH",
            ErrorCode::General => "GENERAL",
        }
    }
}

/// Why a plan-kind flag answered `NOT_ENTITLED`: integrators must tell "this
/// customer's plan lacks it" from "the call named no customer", or they
/// end up failing open on their own bugs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Denial {
    NoCustomer,
    UnknownCustomer,
    NoSubscription,
    Canceled,
    TrialEnded,
    NotInPlan,
}

impl Denial {
    pub fn as_str(self) -> &'static str {
        match self {
            Denial::NoCustomer => "the context names no customer (attribute \"customer\")",
            Denial::UnknownCustomer => "no such customer in this environment",
            Denial::NoSubscription => "the customer has no plan",
            Denial::Canceled => "the customer's subscription is canceled",
            Denial::TrialEnded => "the customer's trial has ended",
            Denial::NotInPlan => "neither the customer's plan nor its overrides grant this flag",
        }
    }
}

static NULL: Value = Value::Null;

/// The outcome of one evaluation, shaped like OpenFeature's resolution
/// details. It borrows from the compiled snapshot, so answering costs no
/// allocation unless something went wrong.
#[derive(Debug, Clone, PartialEq)]
pub struct Resolution<'a> {
    pub key: &'a str,
    pub value: &'a Value,
    pub variant: Option<&'a str>,
    pub reason: Reason,
    pub rule: Option<&'a str>,
    /// Why, beyond the reason (`NOT_ENTITLED`'s cause).
    pub detail: Option<Denial>,
    pub error: Option<(ErrorCode, String)>,
}

impl<'a> Resolution<'a> {
    pub fn error(key: &'a str, code: ErrorCode, message: impl Into<String>) -> Resolution<'a> {
        Resolution {
            key,
            value: &NULL,
            variant: None,
            reason: Reason::Error,
            rule: None,
            detail: None,
            error: Some((code, message.into())),
        }
    }

    pub fn to_json(&self) -> Value {
        let mut out = Map::with_capacity(8);
        out.insert("key".into(), Value::String(self.key.to_string()));
        out.insert("value".into(), self.value.clone());
        out.insert(
            "variant".into(),
            self.variant
                .map(|variant| Value::String(variant.to_string()))
                .unwrap_or(Value::Null),
        );
        out.insert("reason".into(), Value::String(self.reason.as_str().into()));
        if let Some(rule) = &self.rule {
            out.insert("rule".into(), Value::String(rule.to_string()));
        }
        if let Some(detail) = self.detail {
            out.insert("detail".into(), Value::String(detail.as_str().into()));
        }
        if let Some((code, message)) = &self.error {
            out.insert("error_code".into(), Value::String(code.as_str().into()));
            out.insert("error_message".into(), Value::String(message.clone()));
        }
        Value::Object(out)
    }

    /// The boolean reading `flagship_enabled` gives: only a true value is on.
    pub fn is_enabled(&self) -> bool {
        *self.value == Value::Bool(true)
    }
}

/// Answers whether a customer's plan or overrides grant a plan-kind flag,
/// and if not, why.
pub trait Entitlements {
    fn grants(&self, customer: &str, flag: &str) -> Result<(), Denial>;
}

/// Until plans are connected, nobody is entitled to anything.
pub struct NoEntitlements;

impl Entitlements for NoEntitlements {
    fn grants(&self, _customer: &str, _flag: &str) -> Result<(), Denial> {
        Err(Denial::UnknownCustomer)
    }
}
