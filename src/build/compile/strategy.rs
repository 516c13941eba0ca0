//! Compilation strategies and their budgets.
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use crate::base::error::{Error, Result};

/// How much work compilation does. Ordered from least to most.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u32)]
pub enum Strategy {
    /// CPU only, trace without optimisation passes, one validation run.
    Emergency = 0,
    /// Trace on the target device, no freezing, short pre-warm.
    Fast = 1,
    /// Trace + freeze on the target device, full pre-warm (the default).
    Standard = 2,
    /// Standard plus timed optimisation variants; the fastest correct wins.
    Aggressive = 3,
}

impl Strategy {
    /// All strategies, least work first.
    pub const ALL: [Strategy; 4] = [Strategy::Emergency, Strategy::Fast, Strategy::Standard, Strategy::Aggressive];

    /// Lowercase name used by the CLI and in metadata.
    pub fn name(self) -> &'static str {
        match self {
            Strategy::Emergency => "emergency",
            Strategy::Fast => "fast",
            Strategy::Standard => "standard",
            Strategy::Aggressive => "aggressive",
        }
    }

    /// The design's time budget (a ceiling, not a target).
    pub fn budget(self) -> Duration {
        Duration::from_secs(match self {
            Strategy::Emergency => 10,
            Strategy::Fast => 65,
            Strategy::Standard => 250,
            Strategy::Aggressive => 960,
        })
    }

    /// One level lower (conservative mode); Emergency stays Emergency.
    pub fn reduced(self) -> Strategy {
        match self {
            Strategy::Aggressive => Strategy::Standard,
            Strategy::Standard => Strategy::Fast,
            Strategy::Fast | Strategy::Emergency => Strategy::Emergency,
        }
    }

    /// Converts the C ABI's `uint32_t`, refusing unknown values.
    pub fn from_u32(value: u32) -> Result<Self> {
        Strategy::ALL
            .into_iter()
            .find(|s| *s as u32 == value)
            .ok_or_else(|| Error::invalid(format!("unknown strategy {value} (expected 0..=3)")))
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Strategy {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Strategy::ALL.into_iter().find(|st| st.name() == s).ok_or_else(|| {
            Error::invalid(format!("unknown strategy {s:?} (expected emergency, fast, standard or aggressive)"))
        })
    }
}

impl serde::Serialize for Strategy {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> serde::Deserialize<'de> for Strategy {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        name.parse().map_err(serde::de::Error::custom)
    }
}
