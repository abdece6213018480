//! Host-side process and file control for sandboxes: kill a process tree or group, find stragglers by their sandbox mark, reap orphans, apply resource limits, and open files in sandbox-writable directories without following links.

use std::collections::{HashMap, HashSet};
use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::Duration;

/// Sends SIGKILL to the whole process group `pgid`.
pub fn kill_group(pgid: i32) {
    if pgid > 1 {
        // SAFETY: kill(2) with a negative pid signals a process group; no memory is touched.
        unsafe {
            libc::kill(-pgid, libc::SIGKILL);
        }
    }
}

/// Pids of live processes whose environment carries `NIGHTSHIFT_SANDBOX_ID=<id>`.
pub fn marked(id: &str) -> Vec<i32> {
    let needle = format!("NIGHTSHIFT_SANDBOX_ID={id}");
    let mut out = Vec::new();
    for pid in pids() {
        let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else {
            continue;
        };
        if env.split(|b| *b == 0).any(|kv| kv == needle.as_bytes()) {
            // A zombie has an empty environ, so anything found here is alive.
            out.push(pid);
        }
    }
    out
}

/// Kills every process marked with sandbox `id`, retrying briefly until none is left.
pub async fn kill_marked(id: &str) {
    for _ in 0..50 {
        let pids = marked(id);
        if pids.is_empty() {
            return;
        }
        for pid in pids {
            // SAFETY: as above; signalling a pid we just read from /proc.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn pids() -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()))
        .collect()
}

/// The parent pid and state of a process, from `/proc/<pid>/stat` (the name may hold spaces and parentheses).
fn stat(pid: i32) -> Option<(i32, char)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((ppid, state))
}

/// `root` and every live process below it, by parent links.
pub fn descendants(root: i32) -> Vec<i32> {
    let mut children: HashMap<i32, Vec<i32>> = HashMap::new();
    for pid in pids() {
        if let Some((ppid, state)) = stat(pid) {
            if state != 'Z' && state != 'X' {
                children.entry(ppid).or_default().push(pid);
            }
        }
    }
    let mut out = Vec::new();
    if stat(root).is_none() {
        return out;
    }
    let mut todo = vec![root];
    let mut seen = HashSet::new();
    while let Some(p) = todo.pop() {
        if !seen.insert(p) {
            continue;
        }
        out.push(p);
        if let Some(c) = children.get(&p) {
            todo.extend(c);
        }
    }
    out
}

/// Kills `root` and all its descendants: stops the whole tree first (so nothing forks or is
/// re-parented away while it is being killed), then kills it.
pub fn kill_tree(root: i32) {
    if root <= 1 {
        return;
    }
    let mut stopped: HashSet<i32> = HashSet::new();
    for _ in 0..50 {
        let tree = descendants(root);
        let fresh: Vec<i32> = tree.into_iter().filter(|p| !stopped.contains(p)).collect();
        if fresh.is_empty() {
            break;
        }
        for pid in fresh {
            // SAFETY: kill(2) on a pid just read from /proc; no memory is touched.
            unsafe {
                libc::kill(pid, libc::SIGSTOP);
            }
            stopped.insert(pid);
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    for pid in stopped {
        // SAFETY: as above.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
    }
}

/// Kills a process tree when dropped (an exec whose request went away).
pub struct TreeGuard(pub Option<i32>);

impl Drop for TreeGuard {
    fn drop(&mut self) {
        if let Some(pid) = self.0.take() {
            kill_tree(pid);
        }
    }
}

/// `nightshift-provider __reap -- argv…`: the launcher of a sandbox process when there is no
/// isolation. It becomes a child subreaper (orphans of the tree, `setsid` or not, re-parent to
/// it instead of init), runs `argv`, and when that exits — or the provider goes away — kills
/// everything left below it, as a pid namespace would. Exits with the program's status.
pub fn reap_main(argv: &[String]) -> ! {
    let Some((prog, args)) = argv.split_first() else {
        eprintln!("usage: nightshift-provider __reap -- PROGRAM [ARG…]");
        std::process::exit(2);
    };
    // SAFETY: prctl(2) and getppid(2) with plain integer arguments.
    let parent = unsafe {
        libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
        libc::getppid()
    };
    let child = match std::process::Command::new(prog).args(args).spawn() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("cannot run {prog}: {e}");
            std::process::exit(127);
        }
    };
    let child_pid = child.id() as i32;
    let me = std::process::id() as i32;
    let mut code = None;
    loop {
        loop {
            let mut status = 0;
            // SAFETY: waitpid(2) writes only the status integer we pass.
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if pid <= 0 {
                break;
            }
            if pid == child_pid {
                code = Some(if libc::WIFEXITED(status) {
                    libc::WEXITSTATUS(status)
                } else {
                    128 + libc::WTERMSIG(status)
                });
            }
        }
        // SAFETY: getppid(2) has no arguments.
        let orphaned = unsafe { libc::getppid() } != parent;
        if code.is_some() || orphaned {
            for pid in descendants(me).into_iter().filter(|p| *p != me) {
                kill_tree(pid);
            }
            std::process::exit(code.unwrap_or(137));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Resource limits applied to every sandbox process (rlimits, inherited by its whole tree).
/// Zero means "leave as it is".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Address space per process, MiB (`RLIMIT_AS`), and the whole sandbox's memory (a
    /// `memory` cgroup, where cgroups are).
    pub memory_mb: u64,
    /// Processes of the whole sandbox (a `pids` cgroup where cgroups are; else `RLIMIT_NPROC`,
    /// counted per user, which the kernel does not apply to root).
    pub procs: u64,
    /// Largest file a process may write, MiB (`RLIMIT_FSIZE`).
    pub file_mb: u64,
    /// CPU time per process, seconds (`RLIMIT_CPU`).
    pub cpu_s: u64,
    /// Open files per process (`RLIMIT_NOFILE`).
    pub open_files: u64,
    /// Whole CPUs' worth of time for the whole sandbox (a cgroup quota, where cgroups are).
    pub cpus: u64,
    /// Disk the whole sandbox folder may use, MiB (checked by the provider's disk watch).
    pub disk_mb: u64,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            memory_mb: 8192,
            procs: 2048,
            file_mb: 8192,
            cpu_s: 6 * 3600,
            open_files: 8192,
            cpus: 2,
            disk_mb: 20480,
        }
    }
}

impl Limits {
    /// Reads `PROVIDER_LIMIT_{MEMORY_MB,PROCS,FILE_MB,CPU_S,OPEN_FILES,CPUS,DISK_MB}` over the
    /// defaults.
    pub fn from_env(get: impl Fn(&str) -> Option<String>) -> Result<Limits, String> {
        let d = Limits::default();
        let read = |name: &str, default: u64| -> Result<u64, String> {
            match get(name) {
                None => Ok(default),
                Some(v) => v
                    .trim()
                    .parse()
                    .map_err(|_| format!("{name} must be a whole number (0: no limit), not `{v}`")),
            }
        };
        Ok(Limits {
            memory_mb: read("PROVIDER_LIMIT_MEMORY_MB", d.memory_mb)?,
            procs: read("PROVIDER_LIMIT_PROCS", d.procs)?,
            file_mb: read("PROVIDER_LIMIT_FILE_MB", d.file_mb)?,
            cpu_s: read("PROVIDER_LIMIT_CPU_S", d.cpu_s)?,
            open_files: read("PROVIDER_LIMIT_OPEN_FILES", d.open_files)?,
            cpus: read("PROVIDER_LIMIT_CPUS", d.cpus)?,
            disk_mb: read("PROVIDER_LIMIT_DISK_MB", d.disk_mb)?,
        })
    }

    /// Applies the limits to the calling process. Only async-signal-safe calls: it runs in
    /// the child between fork and exec.
    pub fn apply(&self) -> io::Result<()> {
        let mb = 1024 * 1024;
        let set = |res, value: u64| -> io::Result<()> {
            let mut cur = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            // SAFETY: getrlimit/setrlimit read and write the one struct we pass.
            unsafe {
                if libc::getrlimit(res, &mut cur) != 0 {
                    return Err(io::Error::last_os_error());
                }
                let v = value as libc::rlim_t;
                let max = if cur.rlim_max == libc::RLIM_INFINITY || v < cur.rlim_max {
                    v
                } else {
                    cur.rlim_max
                };
                let new = libc::rlimit {
                    rlim_cur: max,
                    rlim_max: max,
                };
                if libc::setrlimit(res, &new) != 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        };
        set(libc::RLIMIT_CORE, 0)?;
        if self.memory_mb > 0 {
            set(libc::RLIMIT_AS, self.memory_mb.saturating_mul(mb))?;
        }
        if self.procs > 0 {
            set(libc::RLIMIT_NPROC, self.procs)?;
        }
        if self.file_mb > 0 {
            set(libc::RLIMIT_FSIZE, self.file_mb.saturating_mul(mb))?;
        }
        if self.cpu_s > 0 {
            set(libc::RLIMIT_CPU, self.cpu_s)?;
        }
        if self.open_files > 0 {
            set(libc::RLIMIT_NOFILE, self.open_files)?;
        }
        Ok(())
    }
}

/// Bytes a folder's files take on disk (allocated blocks), walked without following links and
/// without leaving the folder's filesystem.
pub fn disk_usage(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(top) = std::fs::symlink_metadata(dir) else {
        return 0;
    };
    let device = top.dev();
    let mut total = 0u64;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(folder) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&folder) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(meta) = entry.metadata() else { continue };
            total = total.saturating_add(meta.blocks().saturating_mul(512));
            if meta.is_dir() && meta.dev() == device {
                stack.push(entry.path());
            }
        }
    }
    total
}

fn cstr(part: &std::ffi::OsStr) -> io::Result<CString> {
    CString::new(part.as_bytes()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

/// Opens the directory that holds `rel` below `base`: `base` is the provider's own (trusted)
/// path; every component below it is opened with `O_NOFOLLOW`, so a link planted by the
/// sandbox is refused (`ELOOP`/`ENOTDIR`) instead of followed. Returns it and the last name.
fn parent_beneath(base: &Path, rel: &[&str]) -> io::Result<(OwnedFd, CString)> {
    let (last, dirs) = rel
        .split_last()
        .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
    let b = cstr(base.as_os_str())?;
    // SAFETY: open(2) on a NUL-terminated path; the fd is owned at once.
    let fd = unsafe {
        libc::open(
            b.as_ptr(),
            libc::O_DIRECTORY | libc::O_CLOEXEC | libc::O_RDONLY,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor that nothing else owns.
    let mut dir = unsafe { OwnedFd::from_raw_fd(fd) };
    for part in dirs {
        if part.is_empty() || *part == "." || *part == ".." || part.contains('/') {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        let c = cstr(std::ffi::OsStr::new(part))?;
        // SAFETY: openat(2) relative to an fd we own, on a NUL-terminated name.
        let fd = unsafe {
            libc::openat(
                dir.as_raw_fd(),
                c.as_ptr(),
                libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_RDONLY,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: as above.
        dir = unsafe { OwnedFd::from_raw_fd(fd) };
    }
    if last.is_empty() || *last == "." || *last == ".." || last.contains('/') {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    Ok((dir, cstr(std::ffi::OsStr::new(last))?))
}

/// Opens `base/rel…` for reading without following any link below `base`; refuses anything
/// but a regular file (a FIFO would block the provider, a device would read the host).
pub fn open_beneath(base: &Path, rel: &[&str]) -> io::Result<File> {
    let (dir, name) = parent_beneath(base, rel)?;
    // SAFETY: openat(2) relative to an fd we own; O_NONBLOCK so a FIFO never blocks.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            name.as_ptr(),
            libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is fresh and owned here.
    let file = unsafe { File::from_raw_fd(fd) };
    if !file.metadata()?.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    Ok(file)
}

/// Removes `base/rel…` (the link itself if it is one) without following any link below `base`.
pub fn remove_beneath(base: &Path, rel: &[&str]) -> io::Result<()> {
    let (dir, name) = parent_beneath(base, rel)?;
    // SAFETY: unlinkat(2) relative to an fd we own; it never follows the last component.
    if unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Reads at most `max` bytes of `base/rel…` from `offset`, without following links (see [`open_beneath`]).
pub fn read_beneath(base: &Path, rel: &[&str], offset: u64, max: usize) -> io::Result<Vec<u8>> {
    let mut f = open_beneath(base, rel)?;
    read_from(&mut f, offset, max)
}

/// Reads at most `max` bytes of an open file from `offset`.
pub fn read_from(f: &mut File, offset: u64, max: usize) -> io::Result<Vec<u8>> {
    f.seek(SeekFrom::Start(offset))?;
    let mut out = Vec::new();
    f.take(max as u64).read_to_end(&mut out)?;
    Ok(out)
}

/// Opens (creating) a provider-owned log for appending; `O_NOFOLLOW` as a second line of defence.
pub fn open_log(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_below_the_base_are_never_followed() {
        let base = std::env::temp_dir().join(format!("ns-beneath-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(base.join("logs")).expect("dir");
        let outside = base.join("outside.txt");
        std::fs::write(&outside, "host secret").expect("write");
        std::fs::write(base.join("logs/ok.log"), "fine").expect("write");
        std::os::unix::fs::symlink(&outside, base.join("logs/link.log")).expect("link");
        std::os::unix::fs::symlink(base.join("logs"), base.join("dirlink")).expect("link");
        let read = |rel: &[&str]| read_beneath(&base, rel, 0, 100);
        assert_eq!(read(&["logs", "ok.log"]).expect("ok"), b"fine");
        assert!(read(&["logs", "link.log"]).is_err(), "a link to a file");
        assert!(
            read(&["dirlink", "ok.log"]).is_err(),
            "a link to a directory"
        );
        assert!(read(&["logs", "..", "outside.txt"]).is_err());
        assert!(read(&["logs"]).is_err(), "a directory is not a log");
        remove_beneath(&base, &["logs", "link.log"]).expect("remove the link");
        assert_eq!(
            std::fs::read_to_string(&outside).expect("kept"),
            "host secret"
        );
        let _ = std::fs::remove_dir_all(&base);
    }

    #[test]
    fn limits_read_the_environment_and_refuse_nonsense() {
        let env = |k: &str| (k == "PROVIDER_LIMIT_PROCS").then(|| "64".to_string());
        let l = Limits::from_env(env).expect("limits");
        assert_eq!((l.procs, l.memory_mb), (64, Limits::default().memory_mb));
        assert!(Limits::from_env(|_| Some("lots".into())).is_err());
    }
}
