//! Unix socket addresses for folders whose path is longer than `sun_path` allows (108 bytes).
//!
//! A provider root can sit deep in a checkout (`/check/work/main/target/tmp/provider-…/host/
//! sbx_…/run/egress.sock` is past the limit), so a socket is never named by its full path: the
//! folder is opened (without following a link) and the socket is named through that open
//! folder, `/proc/self/fd/<fd>/<name>`, which is always short.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// A short name for `dir/name`, valid while it lives (it holds the folder open).
pub struct SocketPath {
    _dir: File,
    path: PathBuf,
}

impl SocketPath {
    /// Opens `dir` (refusing a link in its place) and names `name` inside it.
    pub fn new(dir: &Path, name: &str) -> std::io::Result<SocketPath> {
        let folder = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(dir)?;
        let path = PathBuf::from(format!("/proc/self/fd/{}/{name}", folder.as_raw_fd()));
        Ok(SocketPath { _dir: folder, path })
    }

    /// Names an existing socket `dir/name` to connect to, pinned: the socket itself is opened
    /// (`O_PATH`, not following a link) and checked to be a socket, and the name refers to that
    /// open file, so a sandbox that swaps in a link to a host socket afterwards changes nothing.
    pub fn existing(dir: &Path, name: &str) -> std::io::Result<SocketPath> {
        use std::os::unix::fs::FileTypeExt;
        if name.is_empty() || name.contains('/') || name == "." || name == ".." {
            return Err(std::io::Error::from(std::io::ErrorKind::InvalidInput));
        }
        let folder = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(dir)?;
        let socket = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(format!("/proc/self/fd/{}/{name}", folder.as_raw_fd()))?;
        if !socket.metadata()?.file_type().is_socket() {
            return Err(std::io::Error::other("not a socket"));
        }
        let path = PathBuf::from(format!("/proc/self/fd/{}", socket.as_raw_fd()));
        Ok(SocketPath { _dir: socket, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_socket_deeper_than_sun_path_allows_is_bound_and_reached() {
        let mut dir = std::env::temp_dir().join(format!("socket-path-{}", rand::random::<u32>()));
        while dir.as_os_str().len() < 200 {
            dir = dir.join("a-folder-with-a-long-name");
        }
        std::fs::create_dir_all(&dir).expect("folders");
        let named = SocketPath::new(&dir, "test.sock").expect("open");
        assert!(named.path().as_os_str().len() < 64);
        let listener = tokio::net::UnixListener::bind(named.path()).expect("bind");
        assert!(dir.join("test.sock").exists());
        let reach = SocketPath::new(&dir, "test.sock").expect("open");
        let (client, server) = tokio::join!(
            tokio::net::UnixStream::connect(reach.path()),
            listener.accept()
        );
        client.expect("connect");
        server.expect("accept");
        let pinned = SocketPath::existing(&dir, "test.sock").expect("pinned");
        let (client, server) = tokio::join!(
            tokio::net::UnixStream::connect(pinned.path()),
            listener.accept()
        );
        client.expect("connect pinned");
        server.expect("accept pinned");
        // A link in place of the socket is refused, even one to a real socket.
        std::os::unix::fs::symlink(dir.join("test.sock"), dir.join("link.sock")).expect("link");
        assert!(SocketPath::existing(&dir, "link.sock").is_err());
        std::fs::write(dir.join("plain"), "x").expect("file");
        assert!(SocketPath::existing(&dir, "plain").is_err());
        // A link in place of the folder is refused.
        let link = std::env::temp_dir().join(format!("socket-link-{}", rand::random::<u32>()));
        std::os::unix::fs::symlink(&dir, &link).expect("link");
        assert!(SocketPath::new(&link, "test.sock").is_err());
        let _ = std::fs::remove_file(&link);
        let _ = std::fs::remove_dir_all(
            dir.ancestors()
                .find(|a| {
                    a.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with("socket-path-"))
                })
                .unwrap_or(&dir),
        );
    }
}
