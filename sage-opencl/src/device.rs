//! Finding OpenCL devices, and choosing one by index or name.

use std::fmt;
use std::sync::Mutex;

use ocl::core::{self, DeviceId, DeviceInfo, DeviceInfoResult, DeviceType, PlatformId};

use crate::Error;

/// What this backend knows about one OpenCL device.
#[derive(Clone, Debug, PartialEq)]
pub struct DeviceDesc {
    /// Index of its platform in the platform list.
    pub platform: usize,
    /// Index of the device within its platform.
    pub device: usize,
    /// Platform name (e.g. `Portable Computing Language`).
    pub platform_name: String,
    /// Device name.
    pub name: String,
    /// Device vendor.
    pub vendor: String,
    /// `CL_DEVICE_VERSION`.
    pub version: String,
    /// `GPU`, `CPU`, `accelerator` or `other`.
    pub kind: &'static str,
    /// Compute units.
    pub compute_units: u32,
    /// Global memory in bytes.
    pub global_mem: u64,
    /// Whether the device has `cl_khr_fp16` (f16 storage works without it: see the crate docs).
    pub fp16: bool,
    /// Whether the device has `cl_khr_fp64` (squared norms then accumulate in double).
    pub fp64: bool,
    /// Whether single-precision divide and sqrt can be built correctly rounded.
    pub correctly_rounded_div_sqrt: bool,
    /// `CL_DEVICE_MAX_PARAMETER_SIZE`: bounds how many tensors one launch can take.
    pub max_parameter_size: usize,
    pub(crate) id: DeviceId,
    pub(crate) platform_id: PlatformId,
}

impl DeviceDesc {
    /// The OpenCL device id (for `ocl::Device::from`).
    pub fn device_id(&self) -> DeviceId {
        self.id
    }
    /// The OpenCL platform id (for `ocl::Platform::new`).
    pub fn platform_id(&self) -> PlatformId {
        self.platform_id
    }
}

impl fmt::Display for DeviceDesc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{} {} [{}] ({}, {} CUs, {} MiB, {})",
            self.platform,
            self.device,
            self.name,
            self.kind,
            self.platform_name,
            self.compute_units,
            self.global_mem >> 20,
            self.version
        )
    }
}

/// Which device a backend opens.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Select {
    /// The first GPU, else the first accelerator, else the first device of any kind.
    #[default]
    Default,
    /// Device `device` of platform `platform` (indices as [`devices`] lists them).
    Index {
        /// Platform index.
        platform: usize,
        /// Device index within the platform.
        device: usize,
    },
    /// The first device whose name, vendor or platform name contains this text
    /// (case-insensitive).
    Name(String),
}

impl Select {
    /// Parses `P:D` (indices), `default`, or anything else as a name.
    ///
    /// ```
    /// use sage_opencl::Select;
    /// assert_eq!(Select::parse("0:1"), Select::Index { platform: 0, device: 1 });
    /// assert_eq!(Select::parse("pocl"), Select::Name("pocl".into()));
    /// assert_eq!(Select::parse(""), Select::Default);
    /// ```
    pub fn parse(s: &str) -> Self {
        let s = s.trim();
        if s.is_empty() || s.eq_ignore_ascii_case("default") {
            return Select::Default;
        }
        if let Some((p, d)) = s.split_once(':') {
            if let (Ok(platform), Ok(device)) = (p.parse(), d.parse()) {
                return Select::Index { platform, device };
            }
        }
        Select::Name(s.to_string())
    }

    /// The device this selects among `list`.
    pub fn pick<'a>(&self, list: &'a [DeviceDesc]) -> Result<&'a DeviceDesc, Error> {
        if list.is_empty() {
            return Err(Error::NotAvailable("no OpenCL device found".into()));
        }
        let found = match self {
            Select::Default => ["GPU", "accelerator"]
                .iter()
                .find_map(|k| list.iter().find(|d| d.kind == *k))
                .or(list.first()),
            Select::Index { platform, device } => list
                .iter()
                .find(|d| d.platform == *platform && d.device == *device),
            Select::Name(n) => {
                let n = n.to_lowercase();
                list.iter().find(|d| {
                    [&d.name, &d.vendor, &d.platform_name]
                        .iter()
                        .any(|s| s.to_lowercase().contains(&n))
                })
            }
        };
        found.ok_or_else(|| {
            let names: Vec<String> = list.iter().map(|d| d.to_string()).collect();
            Error::NotAvailable(format!(
                "no OpenCL device matches {self:?}; found: {}",
                names.join("; ")
            ))
        })
    }
}

/// Number of platforms, asked of the ICD loader directly: ocl's own listing retries for ten
/// seconds when the loader finds no platform, and "none" must be a quick answer.
fn platform_count() -> Result<u32, Error> {
    let mut n: ocl::ffi::cl_uint = 0;
    // SAFETY: a count query with no output array, as the OpenCL spec allows.
    let status = unsafe { ocl::ffi::clGetPlatformIDs(0, std::ptr::null_mut(), &mut n) };
    if status == core::Status::CL_PLATFORM_NOT_FOUND_KHR as i32 || (status == 0 && n == 0) {
        return Err(Error::NotAvailable(
            "no OpenCL platform (install an ICD such as pocl-opencl-icd)".into(),
        ));
    }
    if status != 0 {
        return Err(Error::NotAvailable(format!(
            "clGetPlatformIDs failed with status {status}"
        )));
    }
    Ok(n)
}

fn text(id: DeviceId, what: DeviceInfo) -> String {
    core::get_device_info(id, what)
        .map(|r| r.to_string().trim_end_matches('\0').trim().to_string())
        .unwrap_or_default()
}

pub(crate) fn describe(
    platform: usize,
    device: usize,
    pid: PlatformId,
    id: DeviceId,
) -> DeviceDesc {
    let platform_name = core::get_platform_info(pid, core::PlatformInfo::Name)
        .map(|r| r.to_string().trim().to_string())
        .unwrap_or_default();
    let kind = match core::get_device_info(id, DeviceInfo::Type) {
        Ok(DeviceInfoResult::Type(t)) if t.contains(DeviceType::GPU) => "GPU",
        Ok(DeviceInfoResult::Type(t)) if t.contains(DeviceType::CPU) => "CPU",
        Ok(DeviceInfoResult::Type(t)) if t.contains(DeviceType::ACCELERATOR) => "accelerator",
        _ => "other",
    };
    let extensions = text(id, DeviceInfo::Extensions);
    let has = |e: &str| extensions.split_whitespace().any(|x| x == e);
    let compute_units = match core::get_device_info(id, DeviceInfo::MaxComputeUnits) {
        Ok(DeviceInfoResult::MaxComputeUnits(n)) => n,
        _ => 0,
    };
    let global_mem = match core::get_device_info(id, DeviceInfo::GlobalMemSize) {
        Ok(DeviceInfoResult::GlobalMemSize(n)) => n,
        _ => 0,
    };
    let correctly_rounded_div_sqrt = match core::get_device_info(id, DeviceInfo::SingleFpConfig) {
        Ok(DeviceInfoResult::SingleFpConfig(c)) => {
            c.contains(core::FP_CORRECTLY_ROUNDED_DIVIDE_SQRT)
        }
        _ => false,
    };
    let max_parameter_size = match core::get_device_info(id, DeviceInfo::MaxParameterSize) {
        Ok(DeviceInfoResult::MaxParameterSize(n)) => n,
        // The embedded-profile minimum.
        _ => 256,
    };
    DeviceDesc {
        platform,
        device,
        platform_name,
        name: text(id, DeviceInfo::Name),
        vendor: text(id, DeviceInfo::Vendor),
        version: text(id, DeviceInfo::Version),
        kind,
        compute_units,
        global_mem,
        fp16: has("cl_khr_fp16"),
        fp64: has("cl_khr_fp64"),
        correctly_rounded_div_sqrt,
        max_parameter_size,
        id,
        platform_id: pid,
    }
}

/// Every OpenCL device on this machine, platform by platform. No platform is
/// [`Error::NotAvailable`], never a panic.
pub fn devices() -> Result<Vec<DeviceDesc>, Error> {
    // Drivers initialise lazily on the first device query, and not all do so thread-safely
    // (PoCL 3.1 crashes when one thread lists devices while another initialises them).
    static LISTING: Mutex<()> = Mutex::new(());
    let _one_at_a_time = LISTING.lock().unwrap_or_else(|p| p.into_inner());
    platform_count()?;
    let platforms = core::get_platform_ids().map_err(|e| Error::cl("listing platforms", e))?;
    let mut out = Vec::new();
    for (pi, &pid) in platforms.iter().enumerate() {
        // A platform without devices answers CL_DEVICE_NOT_FOUND: skip it.
        let Ok(ids) = core::get_device_ids(pid, Some(DeviceType::ALL), None) else {
            continue;
        };
        for (di, id) in ids.into_iter().enumerate() {
            out.push(describe(pi, di, pid, id));
        }
    }
    if out.is_empty() {
        return Err(Error::NotAvailable(
            "OpenCL platforms found, but no devices".into(),
        ));
    }
    Ok(out)
}
