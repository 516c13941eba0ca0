//! Where an artifact runs, as stored in journals, manifests and guard slots
//! (`cpu`, `cuda:0`).
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::error::{Error, Result};

/// A compute device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ComputeDevice {
    /// The CPU.
    Cpu,
    /// A CUDA device by ordinal.
    Cuda(usize),
}

impl ComputeDevice {
    /// The stored name: `cpu` or `cuda:N`.
    pub fn name(self) -> String {
        match self {
            ComputeDevice::Cpu => "cpu".to_string(),
            ComputeDevice::Cuda(i) => format!("cuda:{i}"),
        }
    }

    /// Parses a stored name, refusing anything else.
    pub fn parse(name: &str) -> Result<ComputeDevice> {
        if name == "cpu" {
            return Ok(ComputeDevice::Cpu);
        }
        match name.strip_prefix("cuda:").map(str::parse) {
            Some(Ok(i)) => Ok(ComputeDevice::Cuda(i)),
            _ => Err(Error::invalid(format!("unknown device {name:?} (expected cpu or cuda:N)"))),
        }
    }

    /// The libtorch device.
    pub fn to_tch(self) -> tch::Device {
        match self {
            ComputeDevice::Cpu => tch::Device::Cpu,
            ComputeDevice::Cuda(i) => tch::Device::Cuda(i),
        }
    }

    /// From a libtorch device (anything but CUDA counts as the CPU).
    pub fn from_tch(device: tch::Device) -> ComputeDevice {
        match device {
            tch::Device::Cuda(i) => ComputeDevice::Cuda(i),
            _ => ComputeDevice::Cpu,
        }
    }
}

impl std::fmt::Display for ComputeDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name())
    }
}

impl Serialize for ComputeDevice {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.name())
    }
}

impl<'de> Deserialize<'de> for ComputeDevice {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        ComputeDevice::parse(&String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::ComputeDevice;

    #[test]
    fn names_round_trip_strictly() {
        for d in [ComputeDevice::Cpu, ComputeDevice::Cuda(0), ComputeDevice::Cuda(3)] {
            assert_eq!(ComputeDevice::parse(&d.name()).unwrap(), d);
        }
        for bad in ["", "gpu", "cuda:", "cuda:x", "CPU"] {
            assert!(ComputeDevice::parse(bad).is_err(), "{bad}");
        }
    }
}
