//! Provides the eBPF object the daemon embeds (`$OUT_DIR/leakprobe`), from one of two places:
//!
//! - **the toolchain**: built from `leakprobe-ebpf` with the nightly toolchain and bpf-linker
//!   (aya-build), whenever bpf-linker is on PATH;
//! - **the committed object** `leakprobe-ebpf/prebuilt/leakprobe-ebpf.o`, when bpf-linker is
//!   missing (a fresh machine, a demo), but only if it was built from exactly these sources:
//!   its `.inputs` file records the SHA-256 of the eBPF crate, the common crate, the eBPF
//!   profile and the aya-ebpf crates of Cargo.lock, and it must equal what is computed here.
//!
//! `LEAKPROBE_EBPF=build|prebuilt` forces one of them. `LEAKPROBE_EBPF_EXPORT=DIR` copies the
//! object built with the toolchain, and its inputs record, into DIR (`cargo xtask prebuild`).
//! The inputs hash is exported as `LEAKPROBE_EBPF_INPUTS` so a test can tell when the
//! committed object is stale.
use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, anyhow, bail};
use aya_build::Toolchain;
use sha2::{Digest as _, Sha256};

const OBJECT: &str = "leakprobe-ebpf.o";
const INPUTS: &str = "leakprobe-ebpf.inputs";

fn main() -> anyhow::Result<()> {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let root =
        manifest_dir.parent().ok_or_else(|| anyhow!("no workspace root above {}", manifest_dir.display()))?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let prebuilt = root.join("leakprobe-ebpf/prebuilt");
    for var in ["LEAKPROBE_EBPF", "LEAKPROBE_EBPF_EXPORT"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    for p in
        ["leakprobe-ebpf", "leakprobe-common/src", "leakprobe-common/Cargo.toml", "Cargo.lock", "Cargo.toml"]
    {
        println!("cargo:rerun-if-changed={}", root.join(p).display());
    }

    let inputs = inputs_hash(root)?;
    println!("cargo:rustc-env=LEAKPROBE_EBPF_INPUTS={inputs}");

    let mode = std::env::var("LEAKPROBE_EBPF").unwrap_or_default();
    let use_toolchain = match mode.as_str() {
        "build" => true,
        "prebuilt" => false,
        "" => match find_on_path("bpf-linker") {
            Some(linker) => {
                println!("cargo:rerun-if-changed={}", linker.display());
                true
            }
            None => false,
        },
        other => bail!("LEAKPROBE_EBPF={other}: expected `build` or `prebuilt`"),
    };
    if use_toolchain {
        build_with_toolchain()?;
        if let Ok(dir) = std::env::var("LEAKPROBE_EBPF_EXPORT") {
            export(&out_dir, Path::new(&dir), &inputs)?;
        }
        return Ok(());
    }

    let recorded = fs::read_to_string(prebuilt.join(INPUTS)).unwrap_or_default();
    let recorded =
        recorded.lines().find_map(|l| l.strip_prefix("sha256 ")).unwrap_or("(none)").trim().to_string();
    if recorded != inputs {
        bail!(
            "bpf-linker is not on PATH and the committed eBPF object ({}) is stale: it was built \
             from inputs {recorded}, these sources are {inputs}. Install the eBPF toolchain with \
             `cargo xtask setup` (LLVM 22 and bpf-linker, about 3 minutes), or regenerate the \
             object on a machine that has it with `cargo xtask prebuild`.",
            prebuilt.join(OBJECT).display()
        );
    }
    fs::copy(prebuilt.join(OBJECT), out_dir.join("leakprobe"))
        .with_context(|| format!("copying {}", prebuilt.join(OBJECT).display()))?;
    println!(
        "cargo:warning=bpf-linker not found: using the committed eBPF object {OBJECT} \
         (built from these exact sources, inputs {})",
        &inputs[..12]
    );
    Ok(())
}

fn build_with_toolchain() -> anyhow::Result<()> {
    let cargo_metadata::Metadata { packages, .. } =
        cargo_metadata::MetadataCommand::new().no_deps().exec().context("MetadataCommand::exec")?;
    let ebpf_package = packages
        .into_iter()
        .find(|cargo_metadata::Package { name, .. }| name.as_str() == "leakprobe-ebpf")
        .ok_or_else(|| anyhow!("leakprobe-ebpf package not found"))?;
    let cargo_metadata::Package { name, manifest_path, .. } = ebpf_package;
    let ebpf_package = aya_build::Package {
        name: name.as_str(),
        root_dir: manifest_path.parent().ok_or_else(|| anyhow!("no parent for {manifest_path}"))?.as_str(),
        ..Default::default()
    };
    aya_build::build_ebpf([ebpf_package], Toolchain::Nightly).context(
        "building the eBPF programs failed; run `cargo xtask setup` to install bpf-linker and rust-src",
    )
}

fn export(out_dir: &Path, dir: &Path, inputs: &str) -> anyhow::Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    fs::copy(out_dir.join("leakprobe"), dir.join(OBJECT)).context("exporting the eBPF object")?;
    let tool = |cmd: &str, args: &[&str]| {
        std::process::Command::new(cmd)
            .args(args)
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    };
    let record = format!(
        "sha256 {inputs}\n# built with {} and {}; checked by build.rs and tests/dist.rs, \
         regenerated by `cargo xtask prebuild`\n",
        tool("rustup", &["run", "nightly", "rustc", "-V"]),
        tool("bpf-linker", &["--version"]),
    );
    fs::write(dir.join(INPUTS), record).context("writing the inputs record")
}

fn find_on_path(program: &str) -> Option<PathBuf> {
    let paths = std::env::var_os("PATH")?;
    std::env::split_paths(&paths).map(|d| d.join(program)).find(|p| p.is_file())
}

/// SHA-256 over everything the object is built from: every file of the eBPF and common crates
/// (path and contents, in path order), the workspace's eBPF profile sections, and the
/// aya-ebpf crates' Cargo.lock entries (version and checksum).
fn inputs_hash(root: &Path) -> anyhow::Result<String> {
    let mut files = Vec::new();
    for dir in ["leakprobe-ebpf/src", "leakprobe-common/src"] {
        collect(&root.join(dir), &mut files)?;
    }
    for f in ["leakprobe-ebpf/Cargo.toml", "leakprobe-ebpf/build.rs", "leakprobe-common/Cargo.toml"] {
        files.push(root.join(f));
    }
    files.sort();
    let mut h = Sha256::new();
    for f in &files {
        let rel = f.strip_prefix(root).unwrap_or(f);
        h.update(rel.to_string_lossy().as_bytes());
        h.update([0]);
        let data = fs::read(f).with_context(|| format!("reading {}", f.display()))?;
        h.update((data.len() as u64).to_le_bytes());
        h.update(&data);
    }
    // The eBPF crate's profile sections of the workspace manifest.
    let manifest = fs::read_to_string(root.join("Cargo.toml")).context("reading Cargo.toml")?;
    h.update(sections(&manifest, "[", |header| header.contains("leakprobe-ebpf")).as_bytes());
    // The aya-ebpf crates as locked (the code compiled into the object).
    let lock = fs::read_to_string(root.join("Cargo.lock")).context("reading Cargo.lock")?;
    for block in lock.split("[[package]]") {
        let name = block.lines().find_map(|l| l.strip_prefix("name = ")).unwrap_or("").trim_matches('"');
        if name.starts_with("aya-ebpf") || name.starts_with("aya-log-ebpf") {
            for l in block
                .lines()
                .filter(|l| l.starts_with("name") || l.starts_with("version") || l.starts_with("checksum"))
            {
                h.update(l.as_bytes());
                h.update(b"\n");
            }
        }
    }
    Ok(format!("{:x}", h.finalize()))
}

/// The lines of every `[section]` whose header matches.
fn sections(text: &str, open: &str, keep: impl Fn(&str) -> bool) -> String {
    let mut out = String::new();
    let mut on = false;
    for line in text.lines() {
        if line.starts_with(open) {
            on = keep(line);
        }
        if on {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

fn collect(dir: &Path, out: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            collect(&path, out)?;
        } else {
            out.push(path);
        }
    }
    Ok(())
}
