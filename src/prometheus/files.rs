//! Files named by trigger metadata: `caCert`, `bearerTokenFile`, `passwordFile`.
//!
//! A tenant chooses the name, so a name is only ever a path relative to
//! `<prometheus_credentials_dir>/<ScaledObject namespace>/`, and it is read
//! only if, every symlink resolved, it is still inside that directory (a
//! Kubernetes Secret volume's `token -> ..data/token` links stay inside and
//! pass), it is a regular file (not a FIFO, a device or a socket) and it holds
//! at most [`MAX_BYTES`]. Anything else is refused before a byte is read.
//!
//! Reading never holds up a runtime worker: files are opened with
//! `O_NONBLOCK` (opening a FIFO cannot wait for a writer) and `O_NOFOLLOW`
//! (the resolved name cannot be swapped for a link in between), and the
//! reads run on a blocking thread: [`CredentialFile::read`] through
//! `spawn_blocking`, the parse-time checks through [`off_worker`].

use std::{
    fmt,
    fs::{File, OpenOptions},
    io::{self, Read},
    os::unix::fs::{FileTypeExt, OpenOptionsExt},
    path::{Component, Path, PathBuf},
};

/// Largest credential file read: a CA bundle or a token is a few KiB.
pub const MAX_BYTES: u64 = 1 << 20;

/// A file named by a trigger, inside its namespace's credentials directory.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct CredentialFile {
    /// `<credentials dir>/<namespace>`.
    dir: PathBuf,
    /// `dir` joined with the name the trigger gave.
    path: PathBuf,
}

/// Why a credential file was not read; the message names the file, never
/// its contents.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("{path} resolves to {resolved}, outside {dir}")]
    Outside {
        path: String,
        resolved: String,
        dir: String,
    },
    #[error("{path} is a {kind}, not a regular file")]
    NotRegular { path: String, kind: &'static str },
    #[error("{path} is larger than 1 MiB")]
    TooLarge { path: String },
}

impl fmt::Display for CredentialFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.path.display().fmt(f)
    }
}

impl fmt::Debug for CredentialFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CredentialFile({})", self.path.display())
    }
}

impl CredentialFile {
    /// `name` under `<credentials_dir>/<namespace>/`, if it is a plain
    /// relative name (no root, no `..`); checks the text only. On refusal,
    /// what is accepted.
    pub fn locate(name: &str, namespace: &str, credentials_dir: &Path) -> Result<Self, String> {
        let dir = credentials_dir.join(namespace);
        let plain = |p: &Path| {
            p.components().all(|c| matches!(c, Component::Normal(_)))
                && p.components().next().is_some()
        };
        // A namespace is one directory name (Kubernetes makes it a DNS
        // label; this does not rely on that).
        let one_dir = plain(Path::new(namespace)) && !namespace.contains('/');
        if !plain(Path::new(name)) || !one_dir {
            return Err(Self::expected(&dir));
        }
        Ok(Self {
            path: dir.join(name),
            dir,
        })
    }

    /// What a file-valued key accepts, for error messages.
    pub fn expected(dir: &Path) -> String {
        format!(
            "a file name relative to {}/ (no leading '/', no '..'): a regular file of at most 1 MiB in that \
             directory, where the operator mounts this namespace's credentials",
            dir.display()
        )
    }

    /// The directory this file must stay in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Checks that the file can be read, without reading it. Blocks.
    pub fn check_blocking(&self) -> Result<(), FileError> {
        self.open().map(drop)
    }

    /// The file's contents, checked. Blocks.
    pub fn read_blocking(&self) -> Result<Vec<u8>, FileError> {
        let (file, len) = self.open()?;
        let mut out = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
        // One byte more than allowed tells a file that grew since the check.
        file.take(MAX_BYTES + 1)
            .read_to_end(&mut out)
            .map_err(|e| self.io(e))?;
        if out.len() as u64 > MAX_BYTES {
            return Err(FileError::TooLarge { path: self.shown() });
        }
        Ok(out)
    }

    /// [`CredentialFile::read_blocking`] on a blocking thread.
    pub async fn read(&self) -> Result<Vec<u8>, FileError> {
        let file = self.clone();
        match tokio::task::spawn_blocking(move || file.read_blocking()).await {
            Ok(r) => r,
            Err(e) => Err(self.io(io::Error::other(e))),
        }
    }

    /// Opens the resolved file and returns it with its length, once it is
    /// known to be a regular file of at most [`MAX_BYTES`] inside `dir`.
    fn open(&self) -> Result<(File, u64), FileError> {
        let dir = self.dir.canonicalize().map_err(|e| FileError::Io {
            path: self.dir.display().to_string(),
            source: e,
        })?;
        let resolved = self.path.canonicalize().map_err(|e| self.io(e))?;
        if !resolved.starts_with(&dir) {
            return Err(FileError::Outside {
                path: self.shown(),
                resolved: resolved.display().to_string(),
                dir: dir.display().to_string(),
            });
        }
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW)
            .open(&resolved)
            .map_err(|e| self.io(e))?;
        // The type of what was opened, not of what the name meant a moment ago.
        let meta = file.metadata().map_err(|e| self.io(e))?;
        let t = meta.file_type();
        if !t.is_file() {
            let kind = if t.is_dir() {
                "directory"
            } else if t.is_fifo() {
                "FIFO"
            } else if t.is_char_device() {
                "character device"
            } else if t.is_block_device() {
                "block device"
            } else if t.is_socket() {
                "socket"
            } else {
                "special file"
            };
            return Err(FileError::NotRegular {
                path: self.shown(),
                kind,
            });
        }
        if meta.len() > MAX_BYTES {
            return Err(FileError::TooLarge { path: self.shown() });
        }
        Ok((file, meta.len()))
    }

    fn shown(&self) -> String {
        self.path.display().to_string()
    }

    fn io(&self, source: io::Error) -> FileError {
        FileError::Io {
            path: self.shown(),
            source,
        }
    }
}

/// Runs `f`, which touches the filesystem, without holding up a runtime
/// worker: on a multi-threaded runtime the worker hands its other tasks to
/// another thread first (`block_in_place`). Trigger parsing is synchronous
/// and happens inside an RPC, and only on first sight of a trigger. On a
/// current-thread runtime (tests) or outside one (`activescale check`) `f`
/// runs as it is: the files are already opened non-blocking and capped.
pub fn off_worker<T>(f: impl FnOnce() -> T) -> T {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current() {
        Ok(h) if h.runtime_flavor() == RuntimeFlavor::MultiThread => tokio::task::block_in_place(f),
        _ => f(),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    fn setup() -> (tempfile::TempDir, PathBuf) {
        let root = tempfile::tempdir().unwrap();
        let ns = root.path().join("shop");
        std::fs::create_dir_all(&ns).unwrap();
        (root, ns)
    }

    fn file(root: &Path, name: &str) -> CredentialFile {
        CredentialFile::locate(name, "shop", root).unwrap()
    }

    #[test]
    fn names_must_be_plain_and_relative() {
        let root = Path::new("/creds");
        for bad in ["/dev/zero", "../other/token", "a/../../b", "", ".", "./"] {
            assert!(
                CredentialFile::locate(bad, "shop", root).is_err(),
                "{bad:?}"
            );
        }
        for bad_ns in ["..", "a/b", "/", ""] {
            assert!(CredentialFile::locate("t", bad_ns, root).is_err());
        }
        let f = CredentialFile::locate("sub/token", "shop", root).unwrap();
        assert_eq!(f.to_string(), "/creds/shop/sub/token");
    }

    #[test]
    fn regular_files_and_secret_volume_links_are_read() {
        let (root, ns) = setup();
        std::fs::write(ns.join("plain"), "p").unwrap();
        // What the kubelet writes for a Secret volume.
        std::fs::create_dir(ns.join("..2024_01_01")).unwrap();
        std::fs::write(ns.join("..2024_01_01/token"), "t").unwrap();
        symlink("..2024_01_01", ns.join("..data")).unwrap();
        symlink("..data/token", ns.join("token")).unwrap();
        assert_eq!(file(root.path(), "plain").read_blocking().unwrap(), b"p");
        assert_eq!(file(root.path(), "token").read_blocking().unwrap(), b"t");
    }

    #[test]
    fn everything_else_is_refused_without_reading() {
        let (root, ns) = setup();
        std::fs::create_dir(ns.join("dir")).unwrap();
        symlink("/proc/self/environ", ns.join("environ")).unwrap();
        symlink("/dev/zero", ns.join("zero")).unwrap();
        std::fs::create_dir_all(root.path().join("other")).unwrap();
        std::fs::write(root.path().join("other/token"), "x").unwrap();
        symlink("../other/token", ns.join("neighbour")).unwrap();
        let status = std::process::Command::new("mkfifo")
            .arg(ns.join("fifo"))
            .status()
            .unwrap();
        assert!(status.success());
        std::fs::write(ns.join("big"), vec![b'a'; MAX_BYTES as usize + 1]).unwrap();
        std::fs::write(ns.join("exact"), vec![b'a'; MAX_BYTES as usize]).unwrap();

        let err = |name: &str| file(root.path(), name).read_blocking().unwrap_err();
        assert!(matches!(
            err("dir"),
            FileError::NotRegular {
                kind: "directory",
                ..
            }
        ));
        assert!(matches!(
            err("fifo"),
            FileError::NotRegular { kind: "FIFO", .. }
        ));
        assert!(matches!(err("environ"), FileError::Outside { .. }));
        assert!(matches!(err("zero"), FileError::Outside { .. }));
        assert!(matches!(err("neighbour"), FileError::Outside { .. }));
        assert!(matches!(err("big"), FileError::TooLarge { .. }));
        assert!(matches!(err("missing"), FileError::Io { .. }));
        assert!(
            err("fifo")
                .to_string()
                .ends_with("shop/fifo is a FIFO, not a regular file")
        );
        assert_eq!(
            file(root.path(), "exact").read_blocking().unwrap().len(),
            MAX_BYTES as usize
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn reads_run_off_the_worker() {
        let (root, ns) = setup();
        std::fs::write(ns.join("token"), "t").unwrap();
        let f = file(root.path(), "token");
        assert_eq!(f.read().await.unwrap(), b"t");
        assert!(off_worker(|| f.check_blocking()).is_ok());
    }
}
