//! Process-tree control for sandboxes: kill a process group, and find stragglers by their sandbox mark.

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
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(env) = std::fs::read(entry.path().join("environ")) else {
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
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}
