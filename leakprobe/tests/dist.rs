//! Shipping (issue 16): the artifacts of `cargo xtask dist` tried the way a user would (the
//! static binary from an empty directory with no toolchain and no build tree in sight, the
//! Debian package installed and removed), `leakprobe doctor` with and without privileges, and
//! the committed eBPF object checked against its sources.
//!
//! The dist artifacts must exist: `cargo xtask test` runs `cargo xtask dist` first.

mod common;

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

use common::*;

fn target_dir() -> PathBuf {
    // CARGO_BIN_EXE_leakprobe is <target>/<profile>/leakprobe.
    leakprobe_bin().parent().and_then(Path::parent).unwrap().to_path_buf()
}

fn dist_file(name: &str) -> PathBuf {
    let p = target_dir().join("dist").join(name);
    assert!(p.exists(), "{} is missing: run `cargo xtask dist` first (`cargo xtask test` does)", p.display());
    p
}

fn static_binary() -> PathBuf {
    dist_file(&format!("leakprobe-{}-x86_64-linux-musl", env!("CARGO_PKG_VERSION")))
}

fn deb() -> PathBuf {
    let dir = target_dir().join("dist");
    let found = std::fs::read_dir(&dir)
        .ok()
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "deb"));
    found.unwrap_or_else(|| panic!("no .deb in {}: run `cargo xtask dist` first", dir.display()))
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

#[test]
fn prebuilt_ebpf_object_matches_its_sources() {
    let record = std::fs::read_to_string(repo_root().join("leakprobe-ebpf/prebuilt/leakprobe-ebpf.inputs"))
        .expect("leakprobe-ebpf/prebuilt/leakprobe-ebpf.inputs is missing: run `cargo xtask prebuild`");
    let recorded = record.lines().find_map(|l| l.strip_prefix("sha256 ")).unwrap_or("").trim();
    // What build.rs computed from the sources this test was built from.
    let current = env!("LEAKPROBE_EBPF_INPUTS");
    assert_eq!(
        recorded, current,
        "the committed eBPF object is stale (leakprobe-ebpf or leakprobe-common changed since it \
         was built): run `cargo xtask prebuild` and commit leakprobe-ebpf/prebuilt"
    );
    let obj = std::fs::read(repo_root().join("leakprobe-ebpf/prebuilt/leakprobe-ebpf.o")).unwrap();
    assert_eq!(&obj[..4], b"\x7fELF", "the committed object is not an ELF file");
    assert_eq!(obj[18], 247, "the committed object is not for the BPF machine (EM_BPF = 247)");
}

const CHECKS: &[&str] = &[
    "kernel",
    "privileges",
    "btf",
    "uprobes",
    "ebpf",
    "bpf_send_signal",
    "pidfd",
    "ptrace",
    "lockdown",
    "memfd_exec",
    "proc_mem_write",
    "uprobe_trampoline",
];

/// The line of check `name` in doctor's text output.
fn check_line<'a>(out: &'a str, name: &str) -> &'a str {
    out.lines()
        .find(|l| l.split_whitespace().nth(1) == Some(format!("{name}:").as_str()))
        .unwrap_or_else(|| panic!("no `{name}` line in:\n{out}"))
}

#[test]
fn doctor_passes_every_check_here() {
    require_root();
    let o = run(Command::new(leakprobe_bin()).arg("doctor"));
    let out = text(&o);
    assert_eq!(o.status.code(), Some(0), "{out}");
    for name in CHECKS {
        let line = check_line(&out, name);
        assert!(line.starts_with("ok "), "{line}");
        assert!(line.contains(" — without it: "), "no consequence named: {line}");
    }
    // JSON says the same.
    let o = run(Command::new(leakprobe_bin()).args(["doctor", "--format", "json"]));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["schema"], "leakprobe/doctor/v1");
    let checks = v["checks"].as_array().unwrap();
    assert_eq!(checks.len(), CHECKS.len());
    assert!(checks.iter().all(|c| c["status"] == "ok"), "{v:#}");
}

#[test]
fn doctor_without_bpf_capabilities_names_what_fails() {
    require_root();
    let bin = leakprobe_bin();
    // capsh drops them from the bounding set, so the shell it runs (and its children) never
    // get them; nothing outside that process tree changes.
    let o = run(Command::new("/usr/sbin/capsh").args([
        "--drop=cap_bpf,cap_perfmon,cap_sys_admin",
        "--",
        "-c",
        &format!("exec {} doctor", bin.display()),
    ]));
    let out = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    let line = check_line(&out, "privileges");
    assert!(line.starts_with("FAIL privileges: missing privileges: CAP_BPF, CAP_PERFMON"), "{line}");
    assert!(line.contains("without it: no eBPF program can be loaded"), "{line}");
    let line = check_line(&out, "ebpf");
    assert!(line.starts_with("FAIL ebpf: loading the embedded programs failed"), "{line}");
    // Root keeps CAP_SYS_PTRACE: the ptrace modes are still available.
    assert!(check_line(&out, "ptrace").starts_with("ok "), "{out}");
    assert!(check_line(&out, "btf").starts_with("ok "), "{out}");
}

#[test]
fn doctor_as_an_unprivileged_user() {
    require_root();
    // A copy nobody can read and run (the target dir may be under /root).
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("leakprobe");
    std::fs::copy(leakprobe_bin(), &bin).unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let o = run(Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all"])
        .arg(&bin)
        .arg("doctor")
        .current_dir(dir.path()));
    let out = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    let line = check_line(&out, "privileges");
    assert!(line.starts_with("FAIL privileges: missing privileges"), "{line}");
    assert!(check_line(&out, "ebpf").starts_with("FAIL "), "{out}");
    let line = check_line(&out, "ptrace");
    assert!(line.starts_with("warn ptrace: no CAP_SYS_PTRACE"), "{line}");
    assert!(
        line.contains("run (holding the command), --in-process, --scan and census are refused"),
        "{line}"
    );
    // Features of the kernel itself do not depend on who asks.
    assert!(check_line(&out, "pidfd").starts_with("ok "), "{out}");
    assert!(out.contains("required check(s) failed"), "{out}");
}

#[test]
fn static_binary_runs_alone_from_an_empty_directory() {
    require_root();
    let src = static_binary();
    let ldd = run(Command::new("ldd").arg(&src));
    assert!(text(&ldd).contains("not a dynamic executable"), "ldd says: {}", text(&ldd));

    let work = tempfile::tempdir().unwrap();
    let bin = work.path().join("leakprobe");
    std::fs::copy(&src, &bin).unwrap();
    let mut demo = Demo::start();
    demo.drive();
    // In a mount namespace of its own, the build tree, the target directory and the Rust
    // toolchains are hidden under empty tmpfs mounts, gone when the namespace ends: the binary
    // must need none of them. PATH holds no cargo, rustc or bpf-linker either.
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    let mut hide = vec![repo_root(), target_dir()];
    for d in [".cargo", ".rustup"] {
        hide.push(Path::new(&home).join(d));
    }
    // A directory inside another hidden one (target/ inside the clone) is hidden with it; once
    // its parent is covered it no longer exists as a mount point.
    let inside_another = |d: &PathBuf| hide.iter().any(|h| h != d && d.starts_with(h));
    let mounts: String = hide
        .iter()
        .filter(|d| d.is_dir() && !inside_another(d))
        .map(|d| format!("mount -t tmpfs -o size=1m leakprobe-test-hide '{}' && ", d.display()))
        .collect();
    let script = format!(
        "{mounts}test -z \"$(ls -A '{}')\" && ! command -v cargo && ! command -v rustc && ! command -v bpf-linker \
         && exec ./leakprobe attach --pid {} --duration 4s --interval 1s --top 5",
        repo_root().display(),
        demo.pid()
    );
    let o = run(Command::new("unshare")
        .args(["--mount", "--propagation", "private", "/bin/sh", "-c", &script])
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .current_dir(work.path()));
    drop(demo);
    let out = text(&o);
    assert!(o.status.success(), "the static binary failed:\n{out}");
    assert!(out.contains("parse_upload"), "the report does not name parse_upload:\n{out}");
    assert!(out.contains("VERDICT"), "{out}");
}

/// `dpkg -i`, `man`, completions from /usr/bin, `dpkg -r`: every packaged file gone after.
#[test]
fn debian_package_installs_and_removes_cleanly() {
    require_root();
    let deb = deb();
    // Never replace what we did not install: a leakprobe already in /usr/bin, or an installed
    // package of that name, must be dealt with by its owner.
    let owned = run(Command::new("dpkg-query").args(["-W", "-f=${Status}", "leakprobe"]));
    assert!(
        !String::from_utf8_lossy(&owned.stdout).contains("installed"),
        "a leakprobe package is already installed; this test installs and removes its own: \
         remove it first (dpkg -r leakprobe)"
    );
    assert!(
        !Path::new("/usr/bin/leakprobe").exists(),
        "/usr/bin/leakprobe exists and is not from a leakprobe package: refusing to overwrite it"
    );

    let o = run(Command::new("dpkg").arg("-i").arg(&deb));
    assert!(o.status.success(), "dpkg -i failed:\n{}", text(&o));
    let listed =
        String::from_utf8_lossy(&run(Command::new("dpkg").args(["-L", "leakprobe"])).stdout).to_string();
    let result = std::panic::catch_unwind(|| {
        let files: Vec<&str> = listed.lines().filter(|l| Path::new(l).is_file()).collect();
        for want in [
            "/usr/bin/leakprobe",
            "/usr/share/man/man1/leakprobe.1.gz",
            "/usr/share/man/man1/leakprobe-attach.1.gz",
            "/usr/share/bash-completion/completions/leakprobe",
            "/usr/share/zsh/vendor-completions/_leakprobe",
            "/usr/share/fish/vendor_completions.d/leakprobe.fish",
        ] {
            assert!(files.contains(&want), "{want} not in the package:\n{listed}");
        }
        let man = run(Command::new("man").args(["-P", "cat", "leakprobe"]).env("MANWIDTH", "100"));
        let page = String::from_utf8_lossy(&man.stdout);
        assert!(man.status.success(), "man leakprobe failed: {}", text(&man));
        for want in ["NAME", "leakprobe", "SUBCOMMANDS", "attach", "doctor", "completions"] {
            assert!(page.contains(want), "man page lacks {want}:\n{page}");
        }
        let attach = run(Command::new("man").args(["-P", "cat", "leakprobe-attach"]));
        assert!(String::from_utf8_lossy(&attach.stdout).contains("--pid"), "{}", text(&attach));
        let comp = run(Command::new("/usr/bin/leakprobe").args(["completions", "bash"]));
        let script = String::from_utf8_lossy(&comp.stdout);
        assert!(
            comp.status.success() && script.contains("complete -F") && script.contains("attach"),
            "{script}"
        );
        // The packaged bash completion is the one the binary prints.
        assert_eq!(
            std::fs::read_to_string("/usr/share/bash-completion/completions/leakprobe").unwrap(),
            script
        );
        let doctor = run(Command::new("/usr/bin/leakprobe").arg("doctor"));
        assert_eq!(doctor.status.code(), Some(0), "{}", text(&doctor));
    });
    let o = run(Command::new("dpkg").args(["-r", "leakprobe"]));
    assert!(o.status.success(), "dpkg -r failed:\n{}", text(&o));
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
    let left: Vec<&str> =
        listed.lines().filter(|l| l.starts_with("/usr/") && Path::new(l).is_file()).collect();
    assert!(left.is_empty(), "left behind after dpkg -r: {left:?}");
    let status = run(Command::new("dpkg-query").args(["-W", "-f=${Status}", "leakprobe"]));
    assert!(!String::from_utf8_lossy(&status.stdout).contains("ok installed"), "still installed");
}
