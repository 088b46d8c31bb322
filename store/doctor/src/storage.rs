//! Where the storage path really lives: its mount (from
//! `/proc/self/mountinfo`), the block devices under it (from sysfs, through
//! partitions, device-mapper and md layers), free space, write access and
//! whether `O_DIRECT` reads work there.
//!
//! The trap this catches: a model folder that silently sits on the OS disk
//! (or in a container's overlay layer, or on tmpfs) instead of the NVMe drive
//! the runbook assumed, so every figure measured afterwards is wrong.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::Check;
use crate::units::human_bytes;

/// Below this much free space (and with no model to size against), warn.
const LOW_FREE_BYTES: u64 = 20 << 30;

/// The file Azure leaves at the root of a VM's temporary disk.
const AZURE_TEMP_DISK_MARKER: &str = "DATALOSS_WARNING_README.txt";

/// The fix for a storage path in the wrong place, with the one example
/// mount the docs use.
const MOVE_TO_NVME: &str = "mount the NVMe drive (e.g. at /nvme) and pass --storage-path on it, \
                            e.g. --storage-path /nvme/models (in a container: mount a volume \
                            from the host's NVMe)";

/// The mount and devices holding a path.
#[derive(Clone, Debug, Serialize)]
pub struct Location {
    /// The path examined: the storage path, or its nearest existing ancestor.
    pub path: PathBuf,
    pub mount_point: PathBuf,
    pub fstype: String,
    /// The mount's source as mountinfo names it, e.g. `/dev/nvme0n1p1`.
    pub source: String,
    /// `major:minor` of the filesystem (`st_dev`).
    pub dev: String,
    /// The whole disks underneath (empty for tmpfs, overlay, network, ...).
    pub disks: Vec<Disk>,
}

/// One whole block device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Disk {
    /// Kernel name, e.g. `nvme0n1`, `sda`, `vda`.
    pub name: String,
    pub nvme: bool,
    pub rotational: bool,
    /// The drive's model string, when sysfs has one.
    pub model: Option<String>,
}

impl Location {
    /// Finds the mount and disks of `path` (or of its nearest existing ancestor).
    pub fn of(path: &Path) -> std::io::Result<Self> {
        let existing = nearest_existing(path);
        let canonical = std::fs::canonicalize(&existing)?;
        let st_dev = rustix::fs::stat(&canonical)?.st_dev;
        let dev = format!(
            "{}:{}",
            rustix::fs::major(st_dev),
            rustix::fs::minor(st_dev)
        );
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
        let mount = find_mount(&mountinfo, &canonical, &dev);
        let (mount_point, fstype, source) = mount.unwrap_or_else(|| {
            (
                PathBuf::from("?"),
                "unknown".to_owned(),
                "unknown".to_owned(),
            )
        });
        let mut disks = disks_of_dev(&dev);
        if disks.is_empty() && source.starts_with("/dev/") {
            // btrfs and some others report an anonymous st_dev; the mount's
            // source names the real device.
            if let Ok(st) = rustix::fs::stat(source.as_str()) {
                let rdev = format!(
                    "{}:{}",
                    rustix::fs::major(st.st_rdev),
                    rustix::fs::minor(st.st_rdev)
                );
                disks = disks_of_dev(&rdev);
            }
        }
        Ok(Self {
            path: canonical,
            mount_point,
            fstype,
            source,
            dev,
            disks,
        })
    }

    /// `nvme0n1 (Samsung ...)`, `vda`, or `no block device`.
    pub fn describe_disks(&self) -> String {
        if self.disks.is_empty() {
            return "no block device".to_owned();
        }
        self.disks
            .iter()
            .map(|d| match &d.model {
                Some(m) => format!("{} ({m})", d.name),
                None => d.name.clone(),
            })
            .collect::<Vec<_>>()
            .join(" + ")
    }

    fn memory_backed(&self) -> bool {
        matches!(self.fstype.as_str(), "tmpfs" | "ramfs")
    }

    fn network(&self) -> bool {
        matches!(
            self.fstype.as_str(),
            "nfs" | "nfs4" | "cifs" | "smb3" | "9p" | "virtiofs" | "ceph" | "glusterfs" | "lustre"
        ) || self.fstype.starts_with("fuse")
    }
}

/// The longest existing prefix of `path` (`path` itself when it exists).
fn nearest_existing(path: &Path) -> PathBuf {
    let mut p = path.to_owned();
    loop {
        if p.exists() {
            return p;
        }
        if !p.pop() || p.as_os_str().is_empty() {
            return PathBuf::from(".");
        }
    }
}

/// The mount of `path` in `mountinfo` (proc(5) format): among the entries
/// whose mount point is a prefix of `path`, the longest; one with the same
/// `major:minor` wins over one without.
fn find_mount(mountinfo: &str, path: &Path, dev: &str) -> Option<(PathBuf, String, String)> {
    let mut best: Option<(bool, usize, PathBuf, String, String)> = None;
    for line in mountinfo.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(dash) = fields.iter().position(|f| *f == "-") else {
            continue;
        };
        let (Some(majmin), Some(mp), Some(fstype), Some(source)) = (
            fields.get(2),
            fields.get(4),
            fields.get(dash + 1),
            fields.get(dash + 2),
        ) else {
            continue;
        };
        let mp = PathBuf::from(unescape_mountinfo(mp));
        if !path.starts_with(&mp) {
            continue;
        }
        let key = (*majmin == dev, mp.as_os_str().len());
        if best.as_ref().is_none_or(|b| key >= (b.0, b.1)) {
            best = Some((key.0, key.1, mp, fstype.to_string(), source.to_string()));
        }
    }
    best.map(|(_, _, mp, fstype, source)| (mp, fstype, source))
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        let code = rest
            .get(i + 1..i + 4)
            .and_then(|o| u8::from_str_radix(o, 8).ok());
        match code {
            Some(c) => {
                out.push(c as char);
                rest = &rest[i + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[i + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// The whole disks behind block device `major:minor`, through partitions
/// and stacked devices (`slaves/`). Empty when sysfs knows no such device.
fn disks_of_dev(dev: &str) -> Vec<Disk> {
    match std::fs::canonicalize(Path::new("/sys/dev/block").join(dev)) {
        Ok(node) => {
            let mut out = Vec::new();
            leaf_disks(&node, 0, &mut out);
            out.dedup();
            out
        }
        Err(_) => Vec::new(),
    }
}

fn leaf_disks(node: &Path, depth: usize, out: &mut Vec<Disk>) {
    // A partition's sysfs node sits inside its disk's.
    let disk = if node.join("partition").exists() {
        node.parent().unwrap_or(node).to_owned()
    } else {
        node.to_owned()
    };
    let slaves: Vec<PathBuf> = std::fs::read_dir(disk.join("slaves"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::canonicalize(e.path()).ok())
        .collect();
    if !slaves.is_empty() && depth < 8 {
        for s in slaves {
            leaf_disks(&s, depth + 1, out);
        }
        return;
    }
    let name = disk
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let read = |rel: &str| {
        std::fs::read_to_string(disk.join(rel))
            .ok()
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
    };
    out.push(Disk {
        nvme: name.starts_with("nvme") || disk.components().any(|c| c.as_os_str() == "nvme"),
        rotational: read("queue/rotational").as_deref() == Some("1"),
        model: read("device/model"),
        name,
    });
}

/// The storage checks. `needed_bytes` is what a pending conversion needs.
pub fn checks(storage: &Path, needed_bytes: Option<u64>) -> Vec<Check> {
    let mut out = Vec::new();
    match std::fs::metadata(storage) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            out.push(Check::stop(
                "storage.path",
                format!(
                    "cannot access {} as uid {}: {e}",
                    storage.display(),
                    rustix::process::geteuid().as_raw()
                ),
                "fix the permissions of the path and its parents for the user the daemon runs as",
            ));
            return out;
        }
        _ => {}
    }
    if !storage.exists() {
        out.push(Check::warn(
            "storage.path",
            format!("{} does not exist yet", storage.display()),
            format!(
                "`sllm-store save` creates it; the daemon needs it to exist: mkdir -p {}",
                storage.display()
            ),
        ));
    } else if !storage.is_dir() {
        out.push(Check::stop(
            "storage.path",
            format!("{} exists but is not a directory", storage.display()),
            "point --storage-path (or $STORAGE_PATH) at a directory",
        ));
        return out;
    }
    match Location::of(storage) {
        Ok(loc) => {
            out.push(device_check("storage.device", storage, &loc));
            out.push(free_space_check(&loc, needed_bytes));
        }
        Err(e) => out.push(Check::warn(
            "storage.device",
            format!("cannot tell which device holds {}: {e}", storage.display()),
            "check that /proc and /sys are mounted",
        )),
    }
    if storage.is_dir() {
        out.push(direct_io_check(storage));
    }
    out
}

/// The verdict on where the data at `path` (found at `loc`) lives.
pub fn device_check(name: &'static str, path: &Path, loc: &Location) -> Check {
    let place = format!(
        "{} is on {} ({}, mounted at {}, from {})",
        path.display(),
        loc.describe_disks(),
        loc.fstype,
        loc.mount_point.display(),
        loc.source
    );
    let root = Location::of(Path::new("/")).ok();
    if root.as_ref().is_some_and(|r| r.dev == loc.dev) {
        return Check::stop(
            name,
            format!("{place}: the same filesystem as / -- you are writing to the OS disk"),
            MOVE_TO_NVME,
        );
    }
    if loc.mount_point.join(AZURE_TEMP_DISK_MARKER).exists() {
        return Check::warn(
            name,
            format!(
                "{place}: Azure's temporary disk ({} is there) -- everything on it is lost when \
                 the VM is stopped, deallocated or moved",
                loc.mount_point.join(AZURE_TEMP_DISK_MARKER).display()
            ),
            "fine as a cache you can refill; keep the converted models on a persistent NVMe \
             data disk (or convert them again after every deallocation)",
        );
    }
    if loc.memory_backed() {
        return Check::warn(
            name,
            format!("{place}: memory, not a disk -- models vanish at reboot and take RAM"),
            "fine for tests; for serving, use a directory on a local NVMe drive",
        );
    }
    if loc.network() {
        return Check::warn(
            name,
            format!("{place}: a network or virtual filesystem -- cold loads run at its speed"),
            "copy the models to a local NVMe drive and point --storage-path there",
        );
    }
    if loc.disks.is_empty() {
        return Check::warn(
            name,
            format!("{place}: no block device found behind it"),
            "check that this is the drive you meant (`findmnt -T <path>`, `lsblk`)",
        );
    }
    let shares_root = root.is_some_and(|r| r.disks.iter().any(|d| loc.disks.contains(d)));
    if shares_root {
        return Check::warn(
            name,
            format!("{place}: a separate filesystem, but on the same disk as /"),
            "the OS shares this disk's bandwidth; a dedicated NVMe drive is better",
        );
    }
    if loc.disks.iter().any(|d| d.rotational) {
        return Check::warn(
            name,
            format!("{place}: a spinning disk"),
            "cold loads will be slow; use a local NVMe drive",
        );
    }
    if !loc.disks.iter().all(|d| d.nvme) {
        return Check::warn(
            name,
            format!("{place}: not NVMe"),
            "cold loads run at this device's speed; a local NVMe drive is what the daemon is \
             built for",
        );
    }
    Check::pass(name, format!("{place}: NVMe"))
}

/// A warning, once per command, when `storage` shares `/`'s filesystem
/// (`save` and `start` print it; the doctor says STOP): `None` when it does
/// not, or when that cannot be told.
pub fn os_disk_warning(storage: &Path) -> Option<String> {
    let loc = Location::of(storage).ok()?;
    let root = Location::of(Path::new("/")).ok()?;
    (root.dev == loc.dev).then(|| {
        format!(
            "{} is on the same filesystem as / ({}, {}): models on the OS disk load at its speed \
             and fill it; {MOVE_TO_NVME}",
            storage.display(),
            loc.fstype,
            loc.source
        )
    })
}

/// Do the files at `a` and `b` sit on the same disks? `None` when either
/// cannot be located.
pub fn same_disks(a: &Path, b: &Path) -> Option<(bool, Location, Location)> {
    let (la, lb) = (Location::of(a).ok()?, Location::of(b).ok()?);
    let same = la.dev == lb.dev || (!la.disks.is_empty() && la.disks == lb.disks);
    Some((same, la, lb))
}

fn free_space_check(loc: &Location, needed: Option<u64>) -> Check {
    let name = "storage.free";
    let free = match crate::save::free_bytes(&loc.path) {
        Ok(f) => f,
        Err(e) => {
            return Check::warn(
                name,
                format!("cannot read free space of {}: {e}", loc.path.display()),
                "check the mount with `df -h`",
            );
        }
    };
    let summary = format!(
        "{} free on {}",
        human_bytes(free),
        loc.mount_point.display()
    );
    match needed {
        Some(n) if free < n => Check::stop(
            name,
            format!("{summary}; converting the model needs {}", human_bytes(n)),
            "free space there or choose another --storage-path",
        ),
        Some(n) => Check::pass(
            name,
            format!("{summary}; the conversion needs {}", human_bytes(n)),
        ),
        None if free < LOW_FREE_BYTES => Check::warn(
            name,
            format!("{summary}: little room for models"),
            "free space there or choose another --storage-path",
        ),
        None => Check::pass(name, summary),
    }
}

/// Writes a small file in `dir` and reads it back with `O_DIRECT`.
fn direct_io_check(dir: &Path) -> Check {
    let name = "storage.direct_io";
    let probe = tempfile::Builder::new()
        .prefix(".sllm-doctor-")
        .tempfile_in(dir)
        .and_then(|mut f| {
            f.write_all(&[0x5a; 8192])?; // two pages: the second is read back
            f.as_file().sync_all()?;
            Ok(f)
        });
    let probe = match probe {
        Ok(p) => p,
        Err(e) => {
            return Check::warn(
                name,
                format!("cannot write in {}: {e}", dir.display()),
                "`sllm-store save` needs write access there (the daemon only reads): fix the \
                 owner or permissions, or run as the user that converts models",
            );
        }
    };
    let opened = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32)
        .open(probe.path());
    let mut buf = vec![0u8; 3 * 4096];
    let start = buf.as_ptr().align_offset(4096);
    let result = opened.and_then(|f| {
        let aligned = &mut buf[start..start + 4096];
        Ok(rustix::io::pread(&f, aligned, 4096)?)
    });
    match result {
        Ok(4096) if buf[start..start + 4096].iter().all(|&b| b == 0x5a) => Check::pass(
            name,
            format!("writable, and O_DIRECT reads work in {}", dir.display()),
        ),
        Ok(n) => Check::warn(
            name,
            format!(
                "an O_DIRECT read in {} returned {n} bytes, or wrong ones",
                dir.display()
            ),
            "report this filesystem; the daemon falls back to buffered reads",
        ),
        Err(e) => Check::warn(
            name,
            format!("{} refuses O_DIRECT reads ({e})", dir.display()),
            "loads will go through the page cache (an extra copy, and they evict other data); \
             use a filesystem that supports O_DIRECT such as ext4 or xfs on NVMe",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
22 1 259:2 / / rw,relatime shared:1 - ext4 /dev/nvme0n1p2 rw
30 22 0:25 / /dev/shm rw shared:2 - tmpfs tmpfs rw
41 22 259:5 / /mnt/nvme\\040data rw shared:3 - xfs /dev/nvme1n1 rw
42 22 259:5 /models /srv/models rw shared:4 - xfs /dev/nvme1n1 rw
";

    #[test]
    fn picks_the_longest_mount_and_prefers_the_same_device() {
        let m = |p: &str, dev: &str| find_mount(MOUNTINFO, Path::new(p), dev).unwrap();
        assert_eq!(m("/home/u/models", "259:2").0, Path::new("/"));
        assert_eq!(m("/dev/shm/x", "0:25").1, "tmpfs");
        let (mp, fs, src) = m("/mnt/nvme data/m", "259:5");
        assert_eq!(
            (mp.as_path(), fs.as_str()),
            (Path::new("/mnt/nvme data"), "xfs")
        );
        assert_eq!(src, "/dev/nvme1n1");
        assert_eq!(m("/srv/models/a", "259:5").0, Path::new("/srv/models"));
    }

    #[test]
    fn azures_temporary_disk_is_named_and_the_fix_says_where_to_keep_models() {
        let mount = tempfile::tempdir().unwrap();
        let loc = Location {
            path: mount.path().join("models"),
            mount_point: mount.path().to_owned(),
            fstype: "ext4".into(),
            source: "/dev/sdb1".into(),
            // Not the root filesystem, whatever this machine's is.
            dev: "999:999".into(),
            disks: vec![Disk {
                name: "sdb".into(),
                nvme: false,
                rotational: false,
                model: Some("Virtual Disk".into()),
            }],
        };
        let without = device_check("storage.device", &loc.path, &loc);
        assert!(!without.summary.contains("Azure"), "{}", without.summary);
        std::fs::write(mount.path().join(AZURE_TEMP_DISK_MARKER), "").unwrap();
        let with = device_check("storage.device", &loc.path, &loc);
        assert_eq!(with.status, crate::Status::Warn);
        assert!(
            with.summary.contains("Azure's temporary disk") && with.summary.contains("lost"),
            "{}",
            with.summary
        );
        assert!(
            with.fix.as_deref().unwrap_or("").contains("persistent"),
            "{with:?}"
        );
    }

    #[test]
    fn unescapes_octal_sequences() {
        assert_eq!(unescape_mountinfo("/a\\040b\\011c"), "/a b\tc");
        assert_eq!(unescape_mountinfo("/a\\b"), "/a\\b");
    }

    #[test]
    fn nearest_existing_walks_up() {
        let dir = tempfile::tempdir().unwrap();
        let deep = dir.path().join("a/b/c");
        assert_eq!(nearest_existing(&deep), dir.path());
    }
}
