//! Writing result files safely: never through a symlink or into a FIFO, and atomically, so a
//! reader (or a leakprobe killed mid-write) never sees a half-written file.

use std::{
    ffi::CString,
    fs::File,
    io::Write as _,
    os::{
        fd::{AsRawFd as _, FromRawFd as _},
        unix::ffi::OsStrExt as _,
    },
    path::{Path, PathBuf},
};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum OutputError {
    #[error("refusing to write through symlink {0}")]
    Symlink(PathBuf),
    #[error("refusing to write to {0}: not a regular file")]
    NotRegular(PathBuf),
    #[error("cannot write {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Refuses paths that are symlinks or exist as something other than a regular file.
pub fn check_path(path: &Path) -> Result<(), OutputError> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_symlink() => Err(OutputError::Symlink(path.to_path_buf())),
        Ok(meta) if !meta.file_type().is_file() => Err(OutputError::NotRegular(path.to_path_buf())),
        _ => Ok(()),
    }
}

fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

fn cstr(path: &Path) -> std::io::Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| std::io::Error::other("path contains NUL"))
}

/// An unnamed file in `dir` (O_TMPFILE): it vanishes if we die before naming it.
fn unnamed_file_in(dir: &Path) -> std::io::Result<File> {
    let c = cstr(dir)?;
    // SAFETY: c is a valid NUL-terminated path; a non-negative return is a new fd we own.
    let fd = unsafe { libc::open(c.as_ptr(), libc::O_TMPFILE | libc::O_WRONLY | libc::O_CLOEXEC, 0o600) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by open and is owned by nobody else.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// Gives the unnamed file `f` the name `to` (fails if `to` exists).
fn link_unnamed(f: &File, to: &Path) -> std::io::Result<()> {
    let from = cstr(Path::new(&format!("/proc/self/fd/{}", f.as_raw_fd())))?;
    let to = cstr(to)?;
    // SAFETY: both are valid NUL-terminated paths.
    let rc = unsafe {
        libc::linkat(libc::AT_FDCWD, from.as_ptr(), libc::AT_FDCWD, to.as_ptr(), libc::AT_SYMLINK_FOLLOW)
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Writes `bytes` to `path` atomically: the content goes to an unnamed file first (or, where
/// the filesystem has no O_TMPFILE, to a hidden temporary) and is synced; it is then linked in
/// as `path` if that is a new name, or renamed over the existing `path`. `path` itself is
/// never opened, so a symlink there is replaced, not followed.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), OutputError> {
    let io = |source| OutputError::Io { path: path.to_path_buf(), source };
    let dir = parent_of(path);
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let temp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let _ = std::fs::remove_file(&temp);
    match unnamed_file_in(dir) {
        Ok(mut f) => {
            f.write_all(bytes).and_then(|()| f.sync_data()).map_err(io)?;
            // A new name: link the finished file straight into place.
            match link_unnamed(&f, path) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io(e)),
            }
            link_unnamed(&f, &temp).map_err(io)?;
        }
        Err(_) => {
            use std::os::unix::fs::OpenOptionsExt as _;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .custom_flags(libc::O_NOFOLLOW)
                .mode(0o600)
                .open(&temp)
                .map_err(io)?;
            f.write_all(bytes).and_then(|()| f.sync_data()).map_err(io)?;
        }
    }
    std::fs::rename(&temp, path).map_err(|e| {
        let _ = std::fs::remove_file(&temp);
        io(e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_replaces_and_leaves_no_temporaries() {
        let dir = std::env::temp_dir().join(format!("leakprobe-output-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("a.json");
        write_atomic(&p, b"first").unwrap();
        write_atomic(&p, b"second").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"second");
        let names: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 1, "{names:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn refuses_symlinks_and_non_files() {
        let dir = std::env::temp_dir().join(format!("leakprobe-output-test2-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let link = dir.join("link");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink("/etc/passwd", &link).unwrap();
        assert!(matches!(check_path(&link), Err(OutputError::Symlink(_))));
        assert!(matches!(check_path(&dir), Err(OutputError::NotRegular(_))));
        assert!(check_path(&dir.join("new.json")).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
