//! GPU readings through NVML, loaded at run time (build feature `nvml`): utilisation
//! for `[busy]`, power draw for `[power]`. Without the feature, or without an NVIDIA
//! driver, there is no GPU reading and configured values apply.

/// An open NVML handle (or nothing).
pub(crate) struct Gpu {
    #[cfg(feature = "nvml")]
    nvml: nvml_wrapper::Nvml,
}

impl Gpu {
    /// Open NVML if it is built in and present.
    pub(crate) fn open() -> Option<Self> {
        #[cfg(feature = "nvml")]
        {
            match nvml_wrapper::Nvml::init() {
                Ok(nvml) => Some(Self { nvml }),
                Err(e) => {
                    tracing::info!(error = %e, "no NVML (no NVIDIA driver?): GPU readings off");
                    None
                }
            }
        }
        #[cfg(not(feature = "nvml"))]
        {
            None
        }
    }

    /// Highest utilisation over the GPUs, percent.
    pub(crate) fn utilization_percent(&self) -> Option<f64> {
        #[cfg(feature = "nvml")]
        {
            let n = self.nvml.device_count().ok()?;
            (0..n)
                .filter_map(|i| self.nvml.device_by_index(i).ok()?.utilization_rates().ok())
                .map(|u| f64::from(u.gpu))
                .reduce(f64::max)
        }
        #[cfg(not(feature = "nvml"))]
        {
            None
        }
    }

    /// Total power draw over the GPUs, watts.
    pub(crate) fn power_watts(&self) -> Option<f64> {
        #[cfg(feature = "nvml")]
        {
            let n = self.nvml.device_count().ok()?;
            let mw: u64 = (0..n)
                .filter_map(|i| self.nvml.device_by_index(i).ok()?.power_usage().ok())
                .map(u64::from)
                .sum();
            (mw > 0).then(|| mw as f64 / 1000.0)
        }
        #[cfg(not(feature = "nvml"))]
        {
            None
        }
    }
}
