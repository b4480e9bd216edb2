//! `--device cpu|cuda[:N]`, shared by every verb that runs a model; the one place the binary
//! chooses a device (the library takes it as a parameter).

use std::str::FromStr;

use anyhow::{bail, Result};
use candle_core::Device;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceArg {
    Cpu,
    Cuda(usize),
}

impl FromStr for DeviceArg {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "cpu" => Ok(DeviceArg::Cpu),
            "cuda" => Ok(DeviceArg::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceArg::Cuda)
                .ok_or_else(|| format!("{s:?}: use cpu, cuda or cuda:N (N = 0, 1, …)")),
        }
    }
}

#[derive(clap::Args, Clone, Debug)]
pub struct DeviceOpt {
    /// Where the model runs: cpu, cuda or cuda:N (CUDA needs a build with the `cuda` feature).
    #[arg(long, default_value = "cpu", value_name = "cpu|cuda[:N]")]
    device: DeviceArg,
}

impl DeviceOpt {
    /// The candle device; CUDA in a build without it is a one-line error.
    pub fn resolve(&self) -> Result<Device> {
        self.resolve_for(0)
    }

    /// The device of a rank whose local rank (among the ranks on its machine) is `local`:
    /// `cuda:N` names the first GPU of the machine's ranks, which take N, N+1, … in turn.
    pub fn resolve_for(&self, local: usize) -> Result<Device> {
        let device = match self.device {
            DeviceArg::Cuda(n) => DeviceArg::Cuda(n + local),
            cpu => cpu,
        };
        match device {
            DeviceArg::Cpu => Ok(Device::Cpu),
            DeviceArg::Cuda(n) => {
                if !candle_core::utils::cuda_is_available() {
                    bail!(
                        "--device cuda:{n}: this vlalign was built without CUDA support (cargo \
                         feature `cuda`); use --device cpu"
                    );
                }
                let device = Device::new_cuda(n)?;
                vlalign::nn::device::prepare(&device)?;
                Ok(device)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names_parse() {
        assert_eq!("cpu".parse(), Ok(DeviceArg::Cpu));
        assert_eq!("cuda".parse(), Ok(DeviceArg::Cuda(0)));
        assert_eq!("cuda:3".parse(), Ok(DeviceArg::Cuda(3)));
        for bad in ["gpu", "cuda:", "cuda:x", "CPU"] {
            assert!(bad.parse::<DeviceArg>().is_err(), "{bad}");
        }
    }
}
