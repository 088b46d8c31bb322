//! The machine under the daemon: io_uring, memory against the pool
//! (`RLIMIT_MEMLOCK`, huge pages) and the GPUs the daemon would copy to.

use super::Check;
use crate::units::human_bytes;

/// CAP_IPC_LOCK's bit in the capability sets (capability.h).
const CAP_IPC_LOCK: u32 = 14;

/// All system checks for a pool of `pool_bytes`.
pub fn checks(pool_bytes: u64) -> Vec<Check> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    vec![
        io_uring_check(),
        memory_check(&meminfo, cgroup_memory_max(), pool_bytes),
        memlock_check(pool_bytes),
        huge_pages_check(&meminfo, pool_bytes),
        gpu_check(),
    ]
}

fn io_uring_check() -> Check {
    let name = "system.io_uring";
    let sysctl = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
        .ok()
        .map(|s| s.trim().to_owned());
    let kernel = rustix::system::uname()
        .release()
        .to_string_lossy()
        .into_owned();
    match crate::io::uring::UringEngine::probe(64) {
        Ok(_) => Check::pass(
            name,
            format!("io_uring works (kernel {kernel}, a ring of 64 entries was set up)"),
        ),
        Err(e) => {
            let fix = match sysctl.as_deref() {
                Some("2") => "io_uring is switched off: `sysctl kernel.io_uring_disabled=0`",
                Some("1") => {
                    "io_uring is limited to the group in kernel.io_uring_group: add the \
                     daemon's user to it, or `sysctl kernel.io_uring_disabled=0`"
                }
                _ => {
                    "in a container, the default seccomp profile blocks io_uring: allow the \
                     io_uring_setup/enter/register syscalls (docker --security-opt seccomp=...)"
                }
            };
            Check::warn(
                name,
                format!(
                    "io_uring refused ({e}; kernel {kernel}, kernel.io_uring_disabled = {}): \
                     loads fall back to the slower pread threads",
                    sysctl.as_deref().unwrap_or("absent")
                ),
                fix,
            )
        }
    }
}

/// A `/proc/meminfo` field, in bytes (`kB` lines) or as a count.
fn meminfo_field(meminfo: &str, key: &str) -> Option<u64> {
    let rest = meminfo
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))?;
    let mut words = rest.split_whitespace();
    let n: u64 = words.next()?.parse().ok()?;
    Some(if words.next() == Some("kB") {
        n << 10
    } else {
        n
    })
}

/// This process's cgroup v2 memory limit (`memory.max`), when it has one:
/// in a container, the pool must fit under it, not under the host's RAM.
fn cgroup_memory_max() -> Option<u64> {
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let path = cgroup.lines().find_map(|l| l.strip_prefix("0::"))?;
    let file = std::path::Path::new("/sys/fs/cgroup")
        .join(path.trim_start_matches('/'))
        .join("memory.max");
    std::fs::read_to_string(file).ok()?.trim().parse().ok()
}

fn memory_check(meminfo: &str, cgroup_max: Option<u64>, pool: u64) -> Check {
    let name = "system.memory";
    let (Some(total), Some(available)) = (
        meminfo_field(meminfo, "MemTotal"),
        meminfo_field(meminfo, "MemAvailable"),
    ) else {
        return Check::warn(
            name,
            "cannot read MemTotal/MemAvailable from /proc/meminfo",
            "check that /proc is mounted",
        );
    };
    let (total, within) = match cgroup_max {
        Some(limit) if limit < total => (limit, "this cgroup's memory.max"),
        _ => (total, "RAM"),
    };
    let available = available.min(total);
    let summary = format!(
        "pool {} of {} {within} ({} available now)",
        human_bytes(pool),
        human_bytes(total),
        human_bytes(available)
    );
    if pool >= total {
        return Check::stop(
            name,
            format!("{summary}: the pool does not fit in memory"),
            "start the daemon with a smaller --mem-pool-size (or $MEM_POOL_SIZE), or raise the \
             container's memory limit",
        );
    }
    if pool > total / 10 * 8 {
        return Check::warn(
            name,
            format!("{summary}: the pool leaves little for vLLM and the OS"),
            "keep --mem-pool-size under about 80% of RAM",
        );
    }
    if pool > available {
        return Check::warn(
            name,
            format!("{summary}: more than is free right now"),
            "if the daemon is already running its pool is counted in use; otherwise free \
             memory or lower --mem-pool-size",
        );
    }
    Check::pass(name, summary)
}

/// Whether this process holds CAP_IPC_LOCK (from `/proc/self/status`).
fn has_ipc_lock() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let hex = s
                .lines()
                .find_map(|l| l.strip_prefix("CapEff:"))?
                .trim()
                .to_owned();
            u64::from_str_radix(&hex, 16).ok()
        })
        .is_some_and(|caps| caps & (1 << CAP_IPC_LOCK) != 0)
}

fn memlock_check(pool: u64) -> Check {
    let name = "system.memlock";
    if has_ipc_lock() {
        return Check::pass(
            name,
            "CAP_IPC_LOCK held by this process (run the doctor as the daemon's user to judge \
             the daemon's): the pool can be locked in RAM",
        );
    }
    let limit = rustix::process::getrlimit(rustix::process::Resource::Memlock).current;
    match limit {
        None => Check::pass(
            name,
            "RLIMIT_MEMLOCK unlimited: the pool can be locked in RAM",
        ),
        Some(l) if l >= pool => Check::pass(
            name,
            format!(
                "RLIMIT_MEMLOCK {} covers the pool ({})",
                human_bytes(l),
                human_bytes(pool)
            ),
        ),
        Some(l) => Check::warn(
            name,
            format!(
                "RLIMIT_MEMLOCK is {}, below the pool's {}: the pool will not be locked and can \
                 be swapped out under memory pressure",
                human_bytes(l),
                human_bytes(pool)
            ),
            "raise it for the daemon: `ulimit -l unlimited`, systemd LimitMEMLOCK=infinity, \
             docker --ulimit memlock=-1, or run with CAP_IPC_LOCK",
        ),
    }
}

fn huge_pages_check(meminfo: &str, pool: u64) -> Check {
    let name = "system.huge_pages";
    // The pool asks for 2 MiB pages whatever the default huge page size is.
    let page: u64 = 2 << 20;
    let free = std::fs::read_to_string("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .or_else(|| {
            (meminfo_field(meminfo, "Hugepagesize") == Some(page))
                .then(|| meminfo_field(meminfo, "HugePages_Free"))
                .flatten()
        })
        .unwrap_or(0);
    let thp = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
        .ok()
        .and_then(|s| {
            let start = s.find('[')?;
            let end = s[start..].find(']')?;
            Some(s[start + 1..start + end].to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    let pages_needed = pool.div_ceil(page.max(1));
    if free * page >= pool {
        return Check::pass(
            name,
            format!("{free} huge pages of 2 MiB free: the pool takes {pages_needed} of them"),
        );
    }
    if thp == "never" {
        return Check::warn(
            name,
            format!(
                "no reserved huge pages for the pool ({free} free) and transparent huge pages \
                 off: the pool uses 4 KiB pages, slower to start and to copy from"
            ),
            format!(
                "reserve them (`sysctl vm.nr_hugepages={pages_needed}`) or allow THP (`echo \
                 madvise > /sys/kernel/mm/transparent_hugepage/enabled`)"
            ),
        );
    }
    Check::pass(
        name,
        format!(
            "transparent huge pages [{thp}]: the pool asks for them ({free} reserved pages free; \
             `sysctl vm.nr_hugepages={pages_needed}` makes start-up faster still)"
        ),
    )
}

fn gpu_check() -> Check {
    let name = "system.gpu";
    let driver = std::fs::read_to_string("/proc/driver/nvidia/version")
        .ok()
        .and_then(|s| {
            let line = s.lines().next()?.to_owned();
            // "NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  ..."
            let after = line.split("Kernel Module").nth(1)?;
            after.split_whitespace().next().map(str::to_owned)
        });
    // Listing only: a context per GPU would cost GPU memory beside a running
    // vLLM, and fail on GPUs in exclusive-process mode.
    match crate::device::cuda::CudaBackend::list_devices() {
        Ok(list) => {
            let devices: Vec<String> = list
                .iter()
                .map(|d| format!("{} {} (GPU-{})", d.index, d.name, d.uuid))
                .collect();
            Check::pass(
                name,
                format!(
                    "{} GPU(s), driver {}: {}",
                    devices.len(),
                    driver.as_deref().unwrap_or("unknown"),
                    devices.join("; ")
                ),
            )
        }
        Err(e) => Check::warn(
            name,
            format!("no GPU usable: {e}; the daemon can only run the host backend (tests)"),
            match driver {
                Some(_) => {
                    "the driver is loaded but CUDA sees no device: check CUDA_VISIBLE_DEVICES \
                     and, in a container, --gpus all / the NVIDIA container toolkit"
                }
                None => {
                    "install the NVIDIA driver (or run on a GPU host); in a container use \
                         --gpus all with the NVIDIA container toolkit"
                }
            },
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MEMINFO: &str = "MemTotal:       16384000 kB\nMemAvailable:    8192000 kB\n\
                           HugePages_Total:      10\nHugePages_Free:        4\nHugepagesize:       2048 kB\n";

    #[test]
    fn reads_meminfo_fields_in_bytes_or_counts() {
        assert_eq!(meminfo_field(MEMINFO, "MemTotal"), Some(16_384_000 << 10));
        assert_eq!(meminfo_field(MEMINFO, "HugePages_Free"), Some(4));
        assert_eq!(meminfo_field(MEMINFO, "Hugepagesize"), Some(2 << 20));
        assert_eq!(meminfo_field(MEMINFO, "Missing"), None);
    }

    #[test]
    fn judges_the_pool_against_memory() {
        use super::super::Status;
        let gib = 1u64 << 30;
        assert_eq!(memory_check(MEMINFO, None, 4 * gib).status, Status::Pass);
        assert_eq!(memory_check(MEMINFO, None, 15 * gib).status, Status::Warn);
        assert_eq!(memory_check(MEMINFO, None, 20 * gib).status, Status::Stop);
        assert_eq!(
            memory_check(MEMINFO, Some(2 * gib), 4 * gib).status,
            Status::Stop,
            "a container's limit counts"
        );
        assert_eq!(huge_pages_check(MEMINFO, 8 << 20).status, Status::Pass);
    }
}
