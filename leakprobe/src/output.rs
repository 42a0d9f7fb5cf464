//! Writing result files safely. leakprobe runs as root on other people's servers, so a typo in
//! `--output` must never destroy a file it did not make:
//! - a path may be replaced without asking only if nothing is there, an empty file (`mktemp`),
//!   or a file leakprobe wrote (recognised by the mark every output carries, see [`mark`]);
//! - anything else is refused unless `--force`, which keeps the old file's owner and mode;
//! - system directories (`/etc`, `/usr`, ...) are refused even with `--force`, unless
//!   `--allow-system-path`;
//! - never through a symlink or into a FIFO, and atomically, so a reader (or a leakprobe
//!   killed mid-write) never sees a half-written file.

use std::{
    ffi::CString,
    fs::File,
    io::Write as _,
    os::{
        fd::{AsRawFd as _, FromRawFd as _},
        unix::{ffi::OsStrExt as _, fs::MetadataExt as _},
    },
    path::{Path, PathBuf},
};

use thiserror::Error;

/// Directories leakprobe writes into only with `--allow-system-path`.
pub const SYSTEM_DIRS: &[&str] = &["/etc", "/usr", "/boot", "/proc", "/sys", "/dev"];

#[derive(Debug, Error)]
pub enum OutputError {
    /// The path is a symlink: writing would land wherever it points.
    #[error("refusing to write through symlink {0}")]
    Symlink(PathBuf),
    /// The path exists as a directory, FIFO, device or socket.
    #[error("refusing to write to {0}: not a regular file")]
    NotRegular(PathBuf),
    /// An existing file that leakprobe did not write.
    #[error(
        "{path} already exists and was not written by leakprobe ({description}); choose another \
         name, or pass --force to replace it (its owner and mode are kept)"
    )]
    NotOurs { path: PathBuf, description: String },
    /// The path resolves into a system directory.
    #[error(
        "{path} is inside the system directory {dir}; leakprobe writes there only with \
         --allow-system-path (even --force is not enough)"
    )]
    SystemPath { path: PathBuf, dir: &'static str },
    /// A snapshot directory that holds files leakprobe did not write.
    #[error(
        "{dir} already holds files leakprobe did not write (e.g. {entry}); choose an empty or new \
         directory, or pass --force to write snapshots there anyway"
    )]
    DirNotOurs { dir: PathBuf, entry: String },
    /// A snapshot directory path that exists as something other than a directory.
    #[error("{0} exists and is not a directory")]
    NotADirectory(PathBuf),
    #[error("cannot write {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What the user allowed for existing paths.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    /// `--force`: replace files leakprobe did not write (owner and mode kept).
    pub force: bool,
    /// `--allow-system-path`: write inside [`SYSTEM_DIRS`].
    pub allow_system_path: bool,
}

/// Owner and permission bits of a file being replaced: the new file gets the same.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Existing {
    pub uid: u32,
    pub gid: u32,
    pub mode: u32,
}

/// The system directory `path` would land in, judged on the real location of its deepest
/// existing ancestor (so `../` and symlinked parents do not get around it).
pub fn system_dir_of(path: &Path) -> Option<&'static str> {
    let absolute = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir().map(|d| d.join(path)).unwrap_or_else(|_| path.to_path_buf())
    };
    // The last component is never followed (symlinks are refused), so resolve from its parent.
    let mut existing = absolute.parent().unwrap_or(&absolute);
    let mut rest: Vec<std::ffi::OsString> =
        absolute.file_name().map(|n| n.to_os_string()).into_iter().collect();
    let resolved = loop {
        if let Ok(real) = std::fs::canonicalize(existing) {
            break real;
        }
        match (existing.parent(), existing.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_os_string());
                existing = parent;
            }
            _ => break absolute.clone(),
        }
    };
    let full = rest.iter().rev().fold(resolved, |p, n| p.join(n));
    SYSTEM_DIRS.iter().copied().find(|dir| full.starts_with(dir))
}

fn describe(meta: &std::fs::Metadata) -> String {
    format!("a file of {} bytes owned by uid {}, mode {:04o}", meta.len(), meta.uid(), meta.mode() & 0o7777)
}

/// Decides whether `path` may be written: `Ok(None)` for a new name, `Ok(Some(owner))` for a
/// file that may be replaced, an error otherwise. Reads at most what [`mark::recognise`] needs.
pub fn check_file(path: &Path, policy: Policy) -> Result<Option<Existing>, OutputError> {
    if !policy.allow_system_path
        && let Some(dir) = system_dir_of(path)
    {
        return Err(OutputError::SystemPath { path: path.to_path_buf(), dir });
    }
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(OutputError::Io { path: path.to_path_buf(), source }),
    };
    if meta.file_type().is_symlink() {
        return Err(OutputError::Symlink(path.to_path_buf()));
    }
    if !meta.file_type().is_file() {
        return Err(OutputError::NotRegular(path.to_path_buf()));
    }
    let existing = Existing { uid: meta.uid(), gid: meta.gid(), mode: meta.mode() & 0o7777 };
    // An empty file holds nothing to lose: `mktemp` made it for us.
    if policy.force || meta.len() == 0 {
        return Ok(Some(existing));
    }
    let ours =
        mark::file_is_ours(path).map_err(|source| OutputError::Io { path: path.to_path_buf(), source })?;
    if ours.is_none() {
        return Err(OutputError::NotOurs { path: path.to_path_buf(), description: describe(&meta) });
    }
    Ok(Some(existing))
}

/// Snapshot names: `snapshot-PID-NNNN.json`.
pub fn is_snapshot_name(name: &str) -> bool {
    name.strip_prefix("snapshot-")
        .and_then(|r| r.strip_suffix(".json"))
        .and_then(|r| r.split_once('-'))
        .is_some_and(|(pid, n)| {
            !pid.is_empty()
                && !n.is_empty()
                && pid.bytes().all(|b| b.is_ascii_digit())
                && n.bytes().all(|b| b.is_ascii_digit())
        })
}

/// A directory we write snapshots into: created if missing (mode 0700); an existing one only
/// if it is empty or holds nothing but our own snapshots, unless `--force`.
pub fn prepare_dir(dir: &Path, policy: Policy) -> Result<(), OutputError> {
    let io = |source| OutputError::Io { path: dir.to_path_buf(), source };
    if !policy.allow_system_path
        && let Some(sys) = system_dir_of(dir)
    {
        return Err(OutputError::SystemPath { path: dir.to_path_buf(), dir: sys });
    }
    match std::fs::symlink_metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            use std::os::unix::fs::DirBuilderExt as _;
            return std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(io);
        }
        Err(e) => return Err(io(e)),
        Ok(meta) if meta.file_type().is_symlink() => return Err(OutputError::Symlink(dir.to_path_buf())),
        Ok(meta) if !meta.is_dir() => return Err(OutputError::NotADirectory(dir.to_path_buf())),
        Ok(_) => {}
    }
    if policy.force {
        return Ok(());
    }
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let entry = entry.map_err(io)?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        let ours = is_snapshot_name(&name)
            && entry.file_type().map_err(io)?.is_file()
            && mark::file_is_ours(&path).map_err(io)?.is_some();
        if !ours {
            return Err(OutputError::DirNotOurs { dir: dir.to_path_buf(), entry: name });
        }
    }
    Ok(())
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

/// Gives the new file the replaced one's owner and mode. setuid/setgid are not carried over to
/// a report: that is the one narrowing, and it is said on stderr.
fn take_over(f: &File, path: &Path, old: Existing) -> std::io::Result<()> {
    let mode = old.mode & !(libc::S_ISUID | libc::S_ISGID);
    if mode != old.mode {
        crate::say!(
            "leakprobe: warning: {} had setuid/setgid bits (mode {:04o}); the report is written with mode {mode:04o}",
            path.display(),
            old.mode
        );
    }
    std::os::unix::fs::fchown(f, Some(old.uid), Some(old.gid))?;
    use std::os::unix::fs::PermissionsExt as _;
    f.set_permissions(std::fs::Permissions::from_mode(mode))
}

/// Writes `bytes` to `path` atomically, after checking it again with [`check_file`] (a file
/// may have appeared since the start). The content goes to an unnamed file first (or, where
/// the filesystem has no O_TMPFILE, to a hidden temporary) and is synced; it is then linked in
/// as `path` if that is a new name, or renamed over the existing `path`, keeping its owner and
/// mode. `path` itself is never opened, so a symlink there is refused, not followed.
pub fn write_atomic(path: &Path, bytes: &[u8], policy: Policy) -> Result<(), OutputError> {
    let io = |source| OutputError::Io { path: path.to_path_buf(), source };
    let existing = check_file(path, policy)?;
    let dir = parent_of(path);
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let temp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let _ = std::fs::remove_file(&temp);
    match unnamed_file_in(dir) {
        Ok(mut f) => {
            f.write_all(bytes).map_err(io)?;
            if let Some(old) = existing {
                take_over(&f, path, old).map_err(io)?;
            }
            f.sync_data().map_err(io)?;
            // A new name: link the finished file straight into place.
            if existing.is_none() {
                match link_unnamed(&f, path) {
                    Ok(()) => return Ok(()),
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                        // Appeared just now: judge it like any existing file.
                        if let Some(old) = check_file(path, policy)? {
                            take_over(&f, path, old).map_err(io)?;
                        }
                    }
                    Err(e) => return Err(io(e)),
                }
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
            let written = f.write_all(bytes).and_then(|()| match existing {
                Some(old) => take_over(&f, path, old),
                None => Ok(()),
            });
            if let Err(e) = written.and_then(|()| f.sync_data()) {
                let _ = std::fs::remove_file(&temp);
                return Err(io(e));
            }
        }
    }
    std::fs::rename(&temp, path).map_err(|e| {
        let _ = std::fs::remove_file(&temp);
        io(e)
    })
}

/// The authorship mark every leakprobe output carries, and how it is recognised.
///
/// | output | mark |
/// |---|---|
/// | JSON report, snapshot, diff | `"schema": "leakprobe/..."` |
/// | text report, `--format lsan` | first line `leakprobe VERSION: PID ...` |
/// | text diff | first line `leakprobe diff: ...` |
/// | folded stacks | first line `# leakprobe ...` |
/// | SVG (flame graph, chart) | `<!-- written by leakprobe ... -->` right after the XML declaration |
/// | PNG chart | a `tEXt` chunk `Software` = `leakprobe ...` |
/// | pprof | a profile `comment` starting `leakprobe ` |
pub mod mark {
    use std::io::Read as _;

    const VERSION: &str = env!("CARGO_PKG_VERSION");
    /// How far into an SVG the comment must be.
    const SVG_WINDOW: usize = 1024;
    /// The most a gzipped pprof is inflated to look for its comment.
    const PPROF_LIMIT: u64 = 1 << 30;

    /// `written by leakprobe VERSION`.
    pub fn author() -> String {
        format!("written by leakprobe {VERSION}")
    }

    /// The first line of a folded-stacks file (tools that read folded stacks skip it as a
    /// line without a count).
    pub fn folded_header() -> String {
        format!("# leakprobe {VERSION}: outstanding bytes by stack, root first\n")
    }

    /// `svg` with the authorship comment after its XML declaration (or first, if it has none).
    pub fn svg(svg: &[u8]) -> Vec<u8> {
        let comment = format!("<!-- {} -->\n", author());
        let at = if svg.starts_with(b"<?xml") {
            svg.windows(2).position(|w| w == b"?>").map_or(0, |p| {
                let end = p + 2;
                if svg.get(end) == Some(&b'\n') { end + 1 } else { end }
            })
        } else {
            0
        };
        let mut out = Vec::with_capacity(svg.len() + comment.len() + 1);
        out.extend_from_slice(&svg[..at]);
        if at > 0 && svg.get(at - 1) != Some(&b'\n') {
            out.push(b'\n');
        }
        out.extend_from_slice(comment.as_bytes());
        out.extend_from_slice(&svg[at..]);
        out
    }

    /// The PNG `tEXt` chunk: keyword and text.
    pub fn png_text() -> (String, String) {
        ("Software".to_string(), format!("leakprobe {VERSION}"))
    }

    /// Only the fields of profile.proto the mark lives in.
    #[derive(Clone, PartialEq, prost::Message)]
    struct PprofHead {
        #[prost(string, repeated, tag = "6")]
        string_table: Vec<String>,
        #[prost(int64, repeated, tag = "13")]
        comment: Vec<i64>,
    }

    fn json_is_ours(bytes: &[u8]) -> bool {
        #[derive(serde::Deserialize)]
        struct Head {
            schema: String,
        }
        serde_json::from_slice::<Head>(bytes).is_ok_and(|h| h.schema.starts_with("leakprobe/"))
    }

    fn text_is_ours(bytes: &[u8]) -> bool {
        let first = bytes.split(|b| *b == b'\n').next().unwrap_or_default();
        let Ok(first) = std::str::from_utf8(first) else { return false };
        first.starts_with("leakprobe diff: ")
            || first
                .strip_prefix("leakprobe ")
                .and_then(|r| r.split_once(": PID "))
                .is_some_and(|(version, _)| version.bytes().all(|b| b.is_ascii_digit() || b == b'.'))
    }

    fn png_is_ours(bytes: &[u8]) -> bool {
        let Ok(reader) = png::Decoder::new(bytes).read_info() else { return false };
        let info = reader.info();
        let (key, _) = png_text();
        info.uncompressed_latin1_text.iter().any(|t| t.keyword == key && t.text.starts_with("leakprobe "))
    }

    fn pprof_is_ours(bytes: &[u8]) -> bool {
        let mut raw = Vec::new();
        if flate2::read::GzDecoder::new(bytes).take(PPROF_LIMIT).read_to_end(&mut raw).is_err() {
            return false;
        }
        let Ok(head) = <PprofHead as prost::Message>::decode(raw.as_slice()) else { return false };
        head.comment.iter().any(|&i| {
            usize::try_from(i)
                .ok()
                .and_then(|i| head.string_table.get(i))
                .is_some_and(|s| s.starts_with("leakprobe "))
        })
    }

    /// Which of our outputs `bytes` is, if leakprobe wrote it.
    pub fn recognise(bytes: &[u8]) -> Option<&'static str> {
        match bytes {
            [b'{', ..] => json_is_ours(bytes).then_some("leakprobe JSON"),
            [0x89, b'P', b'N', b'G', ..] => png_is_ours(bytes).then_some("leakprobe PNG chart"),
            [0x1f, 0x8b, ..] => pprof_is_ours(bytes).then_some("leakprobe pprof profile"),
            _ if bytes.starts_with(b"# leakprobe ") => Some("leakprobe folded stacks"),
            _ if bytes.starts_with(b"leakprobe ") => text_is_ours(bytes).then_some("leakprobe text report"),
            [b'<', ..] => {
                let head = &bytes[..bytes.len().min(SVG_WINDOW)];
                let needle = b"<!-- written by leakprobe ";
                head.windows(needle.len()).any(|w| w == needle).then_some("leakprobe SVG")
            }
            _ => None,
        }
    }

    /// [`recognise`] on a file's contents.
    pub fn file_is_ours(path: &std::path::Path) -> std::io::Result<Option<&'static str>> {
        Ok(recognise(&std::fs::read(path)?))
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    const MINE: Policy = Policy { force: false, allow_system_path: false };
    const FORCE: Policy = Policy { force: true, allow_system_path: false };

    fn tempdir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("leakprobe-output-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn writes_replaces_our_own_and_leaves_no_temporaries() {
        let dir = tempdir("own");
        let p = dir.join("a.json");
        write_atomic(&p, b"{\"schema\": \"leakprobe/v1\", \"n\": 1}\n", MINE).unwrap();
        write_atomic(&p, b"{\"schema\": \"leakprobe/v1\", \"n\": 2}\n", MINE).unwrap();
        assert!(std::fs::read_to_string(&p).unwrap().contains("\"n\": 2"));
        let names: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 1, "{names:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn refuses_symlinks_and_non_files() {
        let dir = tempdir("links");
        let link = dir.join("link");
        std::os::unix::fs::symlink("/etc/passwd", &link).unwrap();
        assert!(matches!(check_file(&link, FORCE), Err(OutputError::Symlink(_))));
        assert!(matches!(check_file(&dir, FORCE), Err(OutputError::NotRegular(_))));
        assert_eq!(check_file(&dir.join("new.json"), MINE).unwrap(), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn refuses_unrelated_files_unless_forced_and_keeps_their_owner_and_mode() {
        let dir = tempdir("foreign");
        let p = dir.join("passwd");
        std::fs::write(&p, "root:x:0:0:root:/root:/bin/bash\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::os::unix::fs::chown(&p, Some(1234), Some(2345)).ok();
        let before = std::fs::metadata(&p).unwrap();
        let err = write_atomic(&p, b"leakprobe 0.1.0: PID 1 (x)\n", MINE).unwrap_err();
        assert!(matches!(err, OutputError::NotOurs { .. }), "{err}");
        assert!(err.to_string().contains("--force"), "{err}");
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "root:x:0:0:root:/root:/bin/bash\n");
        write_atomic(&p, b"leakprobe 0.1.0: PID 1 (x)\n", FORCE).unwrap();
        let after = std::fs::metadata(&p).unwrap();
        assert_eq!(
            (after.uid(), after.gid(), after.mode() & 0o7777),
            (before.uid(), before.gid(), before.mode() & 0o7777)
        );
        // Now it is ours: replaced without --force.
        write_atomic(&p, b"leakprobe 0.1.0: PID 2 (x)\n", MINE).unwrap();
        // An empty file (mktemp's) has nothing to lose.
        let empty = dir.join("empty");
        std::fs::write(&empty, "").unwrap();
        write_atomic(&empty, b"{\"schema\": \"leakprobe/v1\"}", MINE).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn system_directories_need_their_own_flag() {
        assert_eq!(system_dir_of(Path::new("/etc/passwd")), Some("/etc"));
        assert_eq!(system_dir_of(Path::new("/etc/no/such/dir/x.json")), Some("/etc"));
        assert_eq!(system_dir_of(Path::new("/tmp/../usr/x")), Some("/usr"));
        assert_eq!(system_dir_of(Path::new("/tmp/x.json")), None);
        assert_eq!(system_dir_of(Path::new("/etcetera/x")), None);
        let err = check_file(Path::new("/etc/leakprobe-never.json"), FORCE).unwrap_err();
        assert!(matches!(err, OutputError::SystemPath { dir: "/etc", .. }), "{err}");
        let allow = Policy { force: false, allow_system_path: true };
        assert_eq!(check_file(Path::new("/etc/leakprobe-never.json"), allow).unwrap(), None);
        // A symlinked parent does not get around it.
        let dir = tempdir("sys");
        std::os::unix::fs::symlink("/usr", dir.join("u")).unwrap();
        assert_eq!(system_dir_of(&dir.join("u/x")), Some("/usr"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn snapshot_dirs_hold_only_our_snapshots() {
        assert!(is_snapshot_name("snapshot-42-0001.json"));
        assert!(!is_snapshot_name("snapshot-42.json"));
        assert!(!is_snapshot_name("notes.txt"));
        let dir = tempdir("snapdir");
        let snaps = dir.join("snaps");
        prepare_dir(&snaps, MINE).unwrap();
        assert!(snaps.is_dir());
        std::fs::write(snaps.join("snapshot-1-0001.json"), "{\"schema\": \"leakprobe/v1\"}").unwrap();
        prepare_dir(&snaps, MINE).unwrap();
        std::fs::write(snaps.join("snapshot-1-0002.json"), "{\"schema\": \"other\"}").unwrap();
        assert!(matches!(prepare_dir(&snaps, MINE), Err(OutputError::DirNotOurs { .. })));
        prepare_dir(&snaps, FORCE).unwrap();
        let file = dir.join("file");
        std::fs::write(&file, "x").unwrap();
        assert!(matches!(prepare_dir(&file, FORCE), Err(OutputError::NotADirectory(_))));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn marks_are_recognised_and_foreign_files_are_not() {
        use mark::recognise;
        assert!(recognise(b"{\"schema\": \"leakprobe/diff/v1\"}").is_some());
        assert!(recognise(b"{\"schema\": \"other/v1\"}").is_none());
        assert!(recognise(b"{not json").is_none());
        assert!(recognise(b"leakprobe 0.1.0: PID 12 (/bin/x) traced for 1.0 s\n").is_some());
        assert!(recognise(b"leakprobe diff: A = a.json, B = b.json\n").is_some());
        assert!(recognise(b"leakprobe 0.1.0: PID 12 (/bin/x), --format lsan\n").is_some());
        assert!(recognise(b"leakprobe is great\n").is_none());
        assert!(recognise(mark::folded_header().as_bytes()).is_some());
        let svg = mark::svg(b"<?xml version=\"1.0\"?><svg></svg>");
        assert!(svg.starts_with(b"<?xml version=\"1.0\"?>\n<!-- written by leakprobe"), "{svg:?}");
        assert!(recognise(&svg).is_some());
        assert!(recognise(b"<?xml version=\"1.0\"?><svg><!-- hi --></svg>").is_none());
        assert!(recognise(&mark::svg(b"<svg></svg>")).is_some());
        assert!(recognise(b"root:x:0:0::/root:/bin/sh\n").is_none());
        assert!(recognise(b"").is_none());
        assert!(recognise(&[0x1f, 0x8b, 0, 0]).is_none());
        assert!(recognise(b"\x89PNG\r\n\x1a\n garbage").is_none());
    }
}
