//! Module data by its ELF extent (issue 21): on Debian's CPython 3.11 running a web app whose
//! global dict caches a 48 KiB bytearray per user, no holder may name a module that does not
//! contain the holding address (the kernel merges a module's .bss with the anonymous mapping
//! after it, pymalloc's arenas here). Privileged: run as root, one at a time.

mod common;

use std::{
    io::{BufRead as _, BufReader},
    path::Path,
    process::{Command, Stdio},
};

use common::*;

const PYTHON: &str = "/usr/bin/python3.11";

/// (start, offset, path) of every file mapping of `pid`.
fn file_maps(pid: i32) -> Vec<(u64, u64, String)> {
    std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .unwrap()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let path = f.get(5).filter(|p| p.starts_with('/'))?;
            let start = u64::from_str_radix(f[0].split('-').next()?, 16).ok()?;
            Some((start, u64::from_str_radix(f[2], 16).ok()?, path.to_string()))
        })
        .collect()
}

/// Per module: the mapping of its lowest file offset.
fn first_maps(maps: &[(u64, u64, String)]) -> std::collections::HashMap<String, (u64, u64, String)> {
    let mut out: std::collections::HashMap<String, (u64, u64, String)> = Default::default();
    for m in maps {
        let e = out.entry(m.2.clone()).or_insert_with(|| m.clone());
        if m.1 < e.1 {
            *e = m.clone();
        }
    }
    out
}

#[test]
fn no_holder_names_a_module_that_does_not_contain_the_address() {
    require_root();
    if !Path::new(PYTHON).exists() {
        panic!("{PYTHON} is missing (cargo xtask setup installs python3.11)");
    }
    let app = repo_root().join("tests/targets/py_cache_server.py");
    let mut server = Command::new(PYTHON).arg(&app).stdout(Stdio::piped()).spawn().unwrap();
    let mut banner = String::new();
    BufReader::new(server.stdout.take().unwrap()).read_line(&mut banner).unwrap();
    let port: u16 = banner
        .split_whitespace()
        .nth(2)
        .and_then(|a| a.rsplit(':').next())
        .and_then(|p| p.parse().ok())
        .unwrap();
    let pid = server.id() as i32;
    let traffic = std::thread::spawn(move || {
        for i in 0..400 {
            let _ = http(port, "GET", &format!("/user?id={i}"));
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    });
    let out = run_leakprobe(&[
        "attach",
        "--pid",
        &pid.to_string(),
        "--duration",
        "4s",
        "--scan",
        "--format",
        "json",
    ]);
    let maps = file_maps(pid);
    let _ = traffic.join();
    let _ = server.kill();
    let _ = server.wait();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let holders: Vec<String> = sites(&report)
        .iter()
        .flat_map(|s| s["held_by"].as_array().cloned().unwrap_or_default())
        .filter_map(|h| h["holder"].as_str().map(str::to_string))
        .collect();
    assert!(!holders.is_empty(), "the cached buffers have holders: {report}");
    let mut checked = 0;
    for h in &holders {
        assert!(!h.contains("liblzma"), "{h}");
        // "anonymous mapping 0xA-0xB": A lies past every module's data (the merged .bss line
        // of /proc/PID/maps is cut where the program headers end the module).
        if let Some(rest) = h.split("anonymous mapping 0x").nth(1) {
            let a = u64::from_str_radix(rest.split('-').next().unwrap(), 16).unwrap();
            for (module, (start, offset, path)) in first_maps(&maps) {
                let Ok(loads) = leakprobe::target::elf::loads(Path::new(&path)) else { continue };
                let Some(end) = leakprobe::target::elf::data_end(&loads, start, offset) else { continue };
                assert!(!(start - offset <= a && a < end), "{h}: inside {module}'s data");
            }
            checked += 1;
            continue;
        }
        // "data of M at +0xOFF (no symbol)": OFF must lie inside M's writable data.
        let Some(rest) = h.split("data of ").nth(1) else { continue };
        let (module, off) = rest.split_once(" at +0x").unwrap();
        let off = u64::from_str_radix(off.split_whitespace().next().unwrap(), 16).unwrap();
        let (start, offset, path) =
            maps.iter().filter(|m| m.2.ends_with(&format!("/{module}"))).min_by_key(|m| m.1).unwrap().clone();
        let base = start - offset;
        let loads = leakprobe::target::elf::loads(Path::new(&path)).unwrap();
        let end = leakprobe::target::elf::data_end(&loads, start, offset).unwrap();
        assert!(base + off < end, "{h}: past {module}'s data, which ends at +{:#x}", end - base);
        checked += 1;
    }
    assert!(checked > 0, "no holder was module data or anonymous memory: {holders:#?}");
    eprintln!(
        "{} holders, {checked} of them checked against the modules' program headers:\n{}",
        holders.len(),
        holders.join("\n")
    );
}
