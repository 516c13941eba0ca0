//! Parameter resolution: midpoints by default, host values
//! validated against the descriptor's bounds.
use std::collections::BTreeMap;

use crate::build::catalog::Descriptor;
use crate::base::error::{Error, Result};

/// Host-supplied parameter values, by name.
pub type ParameterOverrides = BTreeMap<String, f64>;

/// The parameter values a job compiles with, sorted by name.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ResolvedParams {
    values: BTreeMap<String, f64>,
}

impl ResolvedParams {
    /// Resolves parameters: each allowed parameter takes the host's value if
    /// given (it must be finite and within bounds) or its bounds' midpoint.
    /// A host value for a parameter the descriptor does not allow is refused.
    pub fn resolve(descriptor: &Descriptor, overrides: &ParameterOverrides) -> Result<Self> {
        for (name, value) in overrides {
            let Some(bounds) = descriptor.allowed_parameters.get(name) else {
                let allowed: Vec<&str> = descriptor.allowed_parameters.keys().map(String::as_str).collect();
                return Err(Error::invalid(format!(
                    "unknown parameter {name:?} for {} ({}); allowed: {}",
                    descriptor.blueprint_id,
                    descriptor.name,
                    if allowed.is_empty() { "none".to_string() } else { allowed.join(", ") }
                )));
            };
            if !value.is_finite() || !bounds.contains(*value) {
                return Err(Error::invalid(format!(
                    "parameter {name:?} = {value} of {} ({}) is outside its bounds [{}, {}]",
                    descriptor.blueprint_id, descriptor.name, bounds.min, bounds.max
                )));
            }
        }
        let values = descriptor
            .allowed_parameters
            .iter()
            .map(|(name, bounds)| (name.clone(), overrides.get(name).copied().unwrap_or_else(|| bounds.midpoint())))
            .collect();
        Ok(ResolvedParams { values })
    }

    /// A parameter's value, or `default` when the descriptor does not have it.
    pub fn float(&self, name: &str, default: f64) -> f64 {
        self.values.get(name).copied().unwrap_or(default)
    }

    /// A parameter rounded to the nearest integer (at least `min`), or `default`.
    pub fn int(&self, name: &str, default: i64, min: i64) -> i64 {
        self.values.get(name).map(|v| v.round() as i64).unwrap_or(default).max(min)
    }

    /// The values, sorted by name.
    pub fn values(&self) -> &BTreeMap<String, f64> {
        &self.values
    }

    /// `name=value` pairs joined by `,` (values in Rust's shortest exact form).
    pub fn canonical_string(&self) -> String {
        self.values.iter().map(|(k, v)| format!("{k}={v:?}")).collect::<Vec<_>>().join(",")
    }
}
