//! Per-sandbox control groups: a whole sandbox's process count, memory and CPU share, where the
//! host lets the provider create cgroups (v1 controllers or a delegated v2 tree); every process a
//! sandbox starts joins its group between fork and exec, so the group is also an exact list of
//! what to kill, whatever the processes did to their environment, session or parent.

use std::ffi::CString;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// One controller's folder for this provider, e.g. `/sys/fs/cgroup/pids/nightshift-1a2b3c4d`.
#[derive(Debug, Clone)]
struct Controller {
    name: &'static str,
    base: PathBuf,
}

/// The cgroup controllers this provider may use (empty: none here; rlimits only).
#[derive(Debug, Clone, Default)]
pub struct Groups {
    controllers: Vec<Controller>,
    v2: bool,
}

/// What a sandbox's group is limited to (0: no limit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupLimits {
    pub procs: u64,
    pub memory_mb: u64,
    /// Whole CPUs' worth of time per period.
    pub cpus: u64,
}

/// A sandbox's group, ready to be joined: the `cgroup.procs` files, as C strings so the
/// child can open them between fork and exec without allocating.
#[derive(Debug, Clone, Default)]
pub struct Join {
    procs: Vec<CString>,
}

const WANTED: [&str; 3] = ["pids", "memory", "cpu"];

impl Groups {
    /// Finds the controllers this process may create groups in, under a folder named after
    /// the provider's root (two providers on one host keep apart; a restarted one finds its
    /// old groups). Nothing found is not an error: the provider reports which it has.
    pub fn detect(root: &Path) -> Groups {
        let tag = format!(
            "nightshift-{:08x}",
            fnv(root.as_os_str().as_encoded_bytes())
        );
        let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        let mut groups = Groups::default();
        // v1: one hierarchy per controller, `/sys/fs/cgroup/<name>` plus this process's path.
        for line in own.lines() {
            let mut parts = line.splitn(3, ':');
            let (Some(_), Some(names), Some(path)) = (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            for name in names.split(',') {
                let Some(wanted) = WANTED.iter().find(|w| **w == name) else {
                    continue;
                };
                let mount = Path::new("/sys/fs/cgroup").join(name);
                let base = mount.join(path.trim_start_matches('/')).join(&tag);
                if usable(&base, &format!("{name}.")) {
                    groups.controllers.push(Controller { name: wanted, base });
                }
            }
        }
        if !groups.controllers.is_empty() {
            return groups;
        }
        // v2: the unified tree, if this process's group delegates the controllers to children.
        let Some(path) = own.lines().find_map(|l| l.strip_prefix("0::")) else {
            return groups;
        };
        let mount = Path::new("/sys/fs/cgroup");
        if !mount.join("cgroup.controllers").exists() {
            return groups;
        }
        let parent = mount.join(path.trim_start_matches('/'));
        let _ = std::fs::write(parent.join("cgroup.subtree_control"), "+pids +memory +cpu");
        let base = parent.join(&tag);
        if std::fs::create_dir_all(&base).is_err() {
            return groups;
        }
        let _ = std::fs::write(base.join("cgroup.subtree_control"), "+pids +memory +cpu");
        let delegated =
            std::fs::read_to_string(base.join("cgroup.subtree_control")).unwrap_or_default();
        for name in WANTED {
            if delegated.split_whitespace().any(|c| c == name) {
                groups.controllers.push(Controller {
                    name,
                    base: base.clone(),
                });
            }
        }
        groups.v2 = true;
        groups
    }

    /// The controllers in use, e.g. `["pids", "memory", "cpu"]`.
    pub fn names(&self) -> Vec<&'static str> {
        let mut names: Vec<&'static str> = self.controllers.iter().map(|c| c.name).collect();
        names.dedup();
        names
    }

    pub fn has(&self, name: &str) -> bool {
        self.controllers.iter().any(|c| c.name == name)
    }

    /// Creates (or reuses) group `name` with `limits` and returns what a child needs to join it.
    pub fn prepare(&self, name: &str, limits: GroupLimits) -> io::Result<Join> {
        if !valid_name(name) {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        let mut join = Join::default();
        for controller in &self.controllers {
            let dir = controller.base.join(name);
            std::fs::create_dir_all(&dir)?;
            let writes: Vec<(&str, String)> = match (controller.name, self.v2) {
                ("pids", _) if limits.procs > 0 => vec![("pids.max", limits.procs.to_string())],
                ("memory", false) if limits.memory_mb > 0 => vec![(
                    "memory.limit_in_bytes",
                    (limits.memory_mb << 20).to_string(),
                )],
                ("memory", true) if limits.memory_mb > 0 => {
                    vec![("memory.max", (limits.memory_mb << 20).to_string())]
                }
                ("cpu", false) if limits.cpus > 0 => vec![
                    ("cpu.cfs_period_us", "100000".to_string()),
                    ("cpu.cfs_quota_us", (limits.cpus * 100_000).to_string()),
                ],
                ("cpu", true) if limits.cpus > 0 => {
                    vec![("cpu.max", format!("{} 100000", limits.cpus * 100_000))]
                }
                _ => Vec::new(),
            };
            for (file, value) in writes {
                std::fs::write(dir.join(file), value)?;
            }
            let procs = CString::new(dir.join("cgroup.procs").as_os_str().as_encoded_bytes())
                .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
            if !join.procs.contains(&procs) {
                join.procs.push(procs);
            }
        }
        Ok(join)
    }

    /// The processes in group `name` (read from the first controller; all hold the same ones).
    pub fn members(&self, name: &str) -> Vec<i32> {
        let Some(controller) = self.controllers.first() else {
            return Vec::new();
        };
        if !valid_name(name) {
            return Vec::new();
        }
        std::fs::read_to_string(controller.base.join(name).join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    /// Kills every process in group `name` until none is left, then removes the group.
    pub async fn kill_and_remove(&self, name: &str) {
        if self.controllers.is_empty() || !valid_name(name) {
            return;
        }
        for _ in 0..100 {
            let pids = self.members(name);
            if pids.is_empty() {
                break;
            }
            for pid in pids {
                // SAFETY: kill(2) on a pid read from the group's own list; no memory is touched.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for controller in &self.controllers {
            // A group empties a moment after its last process is reaped.
            for _ in 0..50 {
                let dir = controller.base.join(name);
                if !dir.exists() || std::fs::remove_dir(&dir).is_ok() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }

    /// The names of this provider's groups (a restarted provider kills what is left in them).
    pub fn existing(&self) -> Vec<String> {
        let Some(controller) = self.controllers.first() else {
            return Vec::new();
        };
        let Ok(dir) = std::fs::read_dir(&controller.base) else {
            return Vec::new();
        };
        dir.flatten()
            .filter(|e| e.path().is_dir())
            .filter_map(|e| e.file_name().to_str().map(str::to_string))
            .filter(|n| valid_name(n))
            .collect()
    }
}

impl Join {
    /// Moves the calling process into the group. Only async-signal-safe calls (open, write,
    /// close): it runs in the child between fork and exec.
    pub fn enter(&self) -> io::Result<()> {
        for procs in &self.procs {
            // SAFETY: open/write/close on a NUL-terminated path and a two-byte buffer we own.
            unsafe {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(io::Error::last_os_error());
                }
                // "0" names the writing process itself.
                let written = libc::write(fd, b"0\n".as_ptr().cast(), 2);
                let error = io::Error::last_os_error();
                libc::close(fd);
                if written < 0 {
                    return Err(error);
                }
            }
        }
        Ok(())
    }
}

/// Whether `base` can hold groups: it exists (or can be created) and a child made in it gets
/// the controller's files.
fn usable(base: &Path, prefix: &str) -> bool {
    if std::fs::create_dir_all(base).is_err() {
        return false;
    }
    let probe = base.join(format!("probe-{}", std::process::id()));
    let ok = std::fs::create_dir(&probe).is_ok()
        && std::fs::read_dir(&probe).is_ok_and(|d| {
            d.flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with(prefix))
        });
    let _ = std::fs::remove_dir(&probe);
    ok
}

/// Group names are sandbox, image or probe ids: letters, digits, `_` and `-`.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn fnv(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(*b)).wrapping_mul(0x0100_0193)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_names_are_ids_only() {
        assert!(valid_name("sbx_0123abcd"));
        assert!(valid_name("img_1-probe"));
        for bad in ["", "..", "a/b", "a b", &"x".repeat(65)] {
            assert!(!valid_name(bad), "{bad}");
        }
    }
}
