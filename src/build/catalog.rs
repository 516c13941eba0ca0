//! Blueprint descriptors: the embedded default catalog, JSON
//! catalogs in its format, and validation of descriptors from the host.
use std::collections::BTreeMap;

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::base::leyline::{self, BlueprintParameterBounds, BlueprintTier};
use crate::base::error::{Error, Result};

/// Karn's 50 default descriptors, embedded in the library.
pub const DEFAULT_CATALOG_JSON: &str = include_str!("../../data/karn-default-catalog.json");

/// Inclusive bounds of one parameter.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bounds {
    /// Smallest allowed value.
    pub min: f64,
    /// Largest allowed value.
    pub max: f64,
}

impl Bounds {
    /// The default value of a parameter: the midpoint of its bounds.
    pub fn midpoint(&self) -> f64 {
        self.min + (self.max - self.min) / 2.0
    }

    /// Whether `value` lies within the bounds.
    pub fn contains(&self, value: f64) -> bool {
        value >= self.min && value <= self.max
    }
}

/// A validated blueprint descriptor.
#[derive(Debug, Clone, PartialEq)]
pub struct Descriptor {
    /// Unique, non-empty id (e.g. `BP016`).
    pub blueprint_id: String,
    /// What to build (e.g. `squeeze_excitation`).
    pub name: String,
    /// Risk tier (never `Unspecified` once validated).
    pub tier: BlueprintTier,
    /// Parameters and their bounds, sorted by name.
    pub allowed_parameters: BTreeMap<String, Bounds>,
    /// Risk score.
    pub risk: f32,
    /// Curriculum stage.
    pub stage: u32,
    /// Compiled only with quarantine compilation enabled.
    pub quarantine_only: bool,
    /// Needs approval before use.
    pub approval_required: bool,
    /// Human description.
    pub description: String,
}

impl Descriptor {
    /// Validates a Leyline descriptor: non-empty id and name, a known tier,
    /// finite bounds with min ≤ max, a finite risk.
    pub fn from_leyline(message: &leyline::BlueprintDescriptor) -> Result<Self> {
        let id = message.blueprint_id.trim();
        if id.is_empty() {
            return Err(Error::invalid("BlueprintDescriptor.blueprint_id is empty"));
        }
        if id != message.blueprint_id || id.chars().any(|c| c.is_control()) {
            return Err(Error::invalid(format!(
                "BlueprintDescriptor.blueprint_id {:?} has surrounding whitespace or control characters",
                message.blueprint_id
            )));
        }
        if message.name.trim().is_empty() {
            return Err(Error::invalid(format!("BlueprintDescriptor.name of {id} is empty")));
        }
        let tier = match BlueprintTier::try_from(message.tier) {
            Ok(BlueprintTier::Unspecified) => {
                return Err(Error::invalid(format!("BlueprintDescriptor.tier of {id} is unspecified")))
            }
            Ok(tier) => tier,
            Err(_) => {
                return Err(Error::invalid(format!(
                    "BlueprintDescriptor.tier of {id} is unknown ({})",
                    message.tier
                )))
            }
        };
        if !message.risk.is_finite() {
            return Err(Error::invalid(format!("BlueprintDescriptor.risk of {id} is not finite")));
        }
        let mut allowed_parameters = BTreeMap::new();
        for (name, bounds) in &message.allowed_parameters {
            if name.trim().is_empty() {
                return Err(Error::invalid(format!(
                    "BlueprintDescriptor.allowed_parameters of {id} has an empty parameter name"
                )));
            }
            let (min, max) = (bounds.min_value, bounds.max_value);
            if !min.is_finite() || !max.is_finite() {
                return Err(Error::invalid(format!(
                    "BlueprintDescriptor.allowed_parameters[{name:?}] of {id} has non-finite bounds [{min}, {max}]"
                )));
            }
            if min > max {
                return Err(Error::invalid(format!(
                    "BlueprintDescriptor.allowed_parameters[{name:?}] of {id} has min {min} > max {max}"
                )));
            }
            allowed_parameters.insert(name.clone(), Bounds { min, max });
        }
        Ok(Descriptor {
            blueprint_id: message.blueprint_id.clone(),
            name: message.name.clone(),
            tier,
            allowed_parameters,
            risk: message.risk,
            stage: message.stage,
            quarantine_only: message.quarantine_only,
            approval_required: message.approval_required,
            description: message.description.clone(),
        })
    }

    /// Decodes and validates Leyline `BlueprintDescriptor` bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        Self::from_leyline(&leyline::decode::<leyline::BlueprintDescriptor>(bytes)?)
    }

    /// The Leyline form of this descriptor.
    pub fn to_leyline(&self) -> leyline::BlueprintDescriptor {
        leyline::BlueprintDescriptor {
            blueprint_id: self.blueprint_id.clone(),
            name: self.name.clone(),
            tier: self.tier as i32,
            allowed_parameters: self
                .allowed_parameters
                .iter()
                .map(|(k, b)| (k.clone(), BlueprintParameterBounds { min_value: b.min, max_value: b.max }))
                .collect(),
            risk: self.risk,
            stage: self.stage,
            quarantine_only: self.quarantine_only,
            approval_required: self.approval_required,
            description: self.description.clone(),
        }
    }

    /// sha256 of the descriptor's canonical Leyline encoding: changes exactly
    /// when the descriptor does (maps are encoded in sorted order).
    pub fn content_hash(&self) -> [u8; 32] {
        Sha256::digest(leyline::encode(&self.to_leyline())).into()
    }

    /// Whether compiling this descriptor needs quarantine compilation enabled.
    pub fn is_quarantined(&self) -> bool {
        self.quarantine_only || self.tier == BlueprintTier::HighRisk
    }
}

/// A validated set of descriptors with unique ids, in the order given.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Catalog {
    descriptors: Vec<Descriptor>,
    /// Position of each id in `descriptors`.
    by_id: std::collections::HashMap<String, usize>,
}

impl Catalog {
    /// Builds a catalog, refusing duplicate ids.
    pub fn new(descriptors: Vec<Descriptor>) -> Result<Self> {
        let mut by_id = std::collections::HashMap::with_capacity(descriptors.len());
        for (i, d) in descriptors.iter().enumerate() {
            if by_id.insert(d.blueprint_id.clone(), i).is_some() {
                return Err(Error::invalid(format!("duplicate blueprint_id {:?} in catalog", d.blueprint_id)));
            }
        }
        Ok(Catalog { descriptors, by_id })
    }

    /// The embedded default catalog.
    pub fn default_catalog() -> Self {
        Self::from_json(DEFAULT_CATALOG_JSON).expect("the embedded default catalog is valid")
    }

    /// Parses a catalog in the format of `karn-default-catalog.json`.
    pub fn from_json(text: &str) -> Result<Self> {
        let raw: Vec<JsonDescriptor> = serde_json::from_str(text)
            .map_err(|e| Error::malformed(format!("catalog JSON: {e}")))?;
        let descriptors = raw
            .into_iter()
            .enumerate()
            .map(|(i, d)| d.into_descriptor().map_err(|e| e.context(format!("catalog entry {i}"))))
            .collect::<Result<Vec<_>>>()?;
        Self::new(descriptors)
    }

    /// The descriptors, in catalog order.
    pub fn descriptors(&self) -> &[Descriptor] {
        &self.descriptors
    }

    /// Looks a descriptor up by id.
    pub fn get(&self, blueprint_id: &str) -> Option<&Descriptor> {
        self.by_id.get(blueprint_id).map(|&i| &self.descriptors[i])
    }

    /// Number of descriptors.
    pub fn len(&self) -> usize {
        self.descriptors.len()
    }

    /// Whether the catalog is empty.
    pub fn is_empty(&self) -> bool {
        self.descriptors.is_empty()
    }
}

/// One entry of a JSON catalog file.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonDescriptor {
    blueprint_id: String,
    name: String,
    tier: String,
    #[serde(default)]
    description: String,
    #[serde(default)]
    risk: f32,
    #[serde(default)]
    stage: u32,
    #[serde(default)]
    quarantine_only: bool,
    #[serde(default)]
    approval_required: bool,
    #[serde(default)]
    allowed_parameters: BTreeMap<String, [f64; 2]>,
}

impl JsonDescriptor {
    fn into_descriptor(self) -> Result<Descriptor> {
        let tier = match self.tier.as_str() {
            "BLUEPRINT_TIER_SAFE" | "SAFE" => BlueprintTier::Safe,
            "BLUEPRINT_TIER_EXPERIMENTAL" | "EXPERIMENTAL" => BlueprintTier::Experimental,
            "BLUEPRINT_TIER_HIGH_RISK" | "HIGH_RISK" => BlueprintTier::HighRisk,
            other => {
                return Err(Error::invalid(format!(
                    "tier {other:?} of {:?} is not a BlueprintTier",
                    self.blueprint_id
                )))
            }
        };
        let message = leyline::BlueprintDescriptor {
            blueprint_id: self.blueprint_id,
            name: self.name,
            tier: tier as i32,
            allowed_parameters: self
                .allowed_parameters
                .into_iter()
                .map(|(k, [min_value, max_value])| (k, BlueprintParameterBounds { min_value, max_value }))
                .collect(),
            risk: self.risk,
            stage: self.stage,
            quarantine_only: self.quarantine_only,
            approval_required: self.approval_required,
            description: self.description,
        };
        Descriptor::from_leyline(&message)
    }
}
