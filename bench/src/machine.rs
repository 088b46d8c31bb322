//! What machine a figure came from: CPUs, memory, kernel, and the filesystem
//! and block device holding the data.

use std::path::Path;

use serde::Serialize;

/// The machine and the data's home, as recorded beside every result.
#[derive(Clone, Debug, Serialize)]
pub struct Machine {
    pub hostname: String,
    pub cpu_model: String,
    pub cpus: usize,
    pub memory_gib: f64,
    pub kernel: String,
    pub data_dir: String,
    pub data_filesystem: String,
    pub data_device: String,
    pub gpu: Option<String>,
}

impl Machine {
    /// Describes this machine, with `data_dir` as where the benchmark's files live.
    pub fn probe(data_dir: &Path) -> Self {
        let uname = rustix::system::uname();
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| {
                l.strip_prefix("model name")
                    .and_then(|r| r.split(':').nth(1))
            })
            .unwrap_or("unknown")
            .trim()
            .to_owned();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let mem_kib: f64 = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|r| r.split_whitespace().next()?.parse().ok())
            .unwrap_or(0.0);
        let (fs, device) =
            mount_of(data_dir).unwrap_or_else(|| ("unknown".into(), "unknown".into()));
        Self {
            hostname: uname.nodename().to_string_lossy().into_owned(),
            cpu_model,
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            memory_gib: mem_kib / (1u64 << 20) as f64,
            kernel: uname.release().to_string_lossy().into_owned(),
            data_dir: data_dir.display().to_string(),
            data_filesystem: fs,
            data_device: device,
            gpu: gpu_name(),
        }
    }
}

impl Machine {
    /// The machine and the data's home as markdown list items.
    pub fn markdown(&self) -> String {
        format!(
            "- machine: {} ({} CPUs, {}, {:.1} GiB RAM, kernel {}{})\n- data: {} on {} ({})\n",
            self.hostname,
            self.cpus,
            self.cpu_model,
            self.memory_gib,
            self.kernel,
            self.gpu
                .as_deref()
                .map(|g| format!(", GPU {g}"))
                .unwrap_or_default(),
            self.data_dir,
            self.data_device,
            self.data_filesystem,
        )
    }
}

/// Filesystem type and source device (with the disks under it) of the
/// mount holding `path`, as the doctor finds them.
fn mount_of(path: &Path) -> Option<(String, String)> {
    let loc = sllm_doctor::storage::Location::of(path).ok()?;
    let device = format!("{} ({})", loc.source, loc.describe_disks());
    Some((loc.fstype, device))
}

fn gpu_name() -> Option<String> {
    let out = std::process::Command::new("nvidia-smi")
        .args(["--query-gpu=name", "--format=csv,noheader"])
        .output()
        .ok()?;
    let name = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    (out.status.success() && !name.is_empty()).then_some(name)
}

/// Current UTC time as `2026-11-23T16:35:14Z`.
pub fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}
