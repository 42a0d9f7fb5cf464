//! JavaScript frames in native stacks (issue 24): `leakprobe attach` on a running Node names
//! the JavaScript functions above a native allocation (a Buffer's backing store), with no
//! inspector, on Debian's machine node (20) and the current LTS (24, from the npm registry).
//! Privileged: run as root, one at a time.

mod common;

use std::path::Path;

use common::*;
use serde_json::Value;

const REQUESTS: u64 = 200;

/// The line of `needle` in the test server's source (1-based).
fn line_in_server(needle: &str) -> u64 {
    let src = std::fs::read_to_string(repo_root().join("tests/targets/node_leaks.js")).unwrap();
    1 + src.lines().position(|l| l.contains(needle)).unwrap_or_else(|| panic!("{needle} not in the server"))
        as u64
}

/// The JavaScript frames of a site, innermost first: (function, file, line).
fn js_frames(site: &Value) -> Vec<(String, String, u64)> {
    site["frames"]
        .as_array()
        .map(|fs| {
            fs.iter()
                .filter(|f| f["runtime"] == "javascript")
                .map(|f| {
                    (
                        f["function"].as_str().unwrap_or("").to_string(),
                        f["file"].as_str().unwrap_or("").to_string(),
                        f["line"].as_u64().unwrap_or(0),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Starts the server under `node`; returns it and its port.
fn start_server(node: &Path) -> (Target, u16) {
    let script = repo_root().join("tests/targets/node_leaks.js");
    let port = free_port();
    // It prints "ready" once it listens.
    let t = Target::spawn_with_args(node, &[script.to_str().unwrap(), &port.to_string()]);
    (t, port)
}

fn drive(port: u16, n: u64) {
    for _ in 0..n {
        let (code, _) = http(port, "GET", "/leak").expect("a request to the test server");
        assert_eq!(code, 200);
    }
}

fn case(node: &Path) {
    require_root();
    let (mut t, port) = start_server(node);
    // Some requests first: the functions get compiled (baseline, optimized) as a server's are.
    drive(port, 100);
    let dir = tempfile::tempdir().unwrap();
    let prof = dir.path().join("p.pb.gz");
    let report = attach_report(
        &mut t,
        &["--duration", "4s", "--format", "json", "--pprof", prof.to_str().unwrap()],
        |_| drive(port, REQUESTS),
    );
    let version = report["runtime"]["version"].as_str().unwrap_or("?").to_string();
    assert_eq!(report["runtime"]["name"], "V8", "{node:?}: V8 recognised: {:#}", report["runtime"]);

    // The listener's Buffer: 16 KiB per request, all still held, named by subscribe.
    let subscribe = line_in_server("function subscribe(");
    let handle = line_in_server("function handle(");
    // The site's name: its innermost JavaScript frame outside Node's own modules. A Buffer's
    // bytes come from Node's ArrayBuffer allocator (V8's own bookkeeping for it, in blocks of
    // their own, are other sites).
    let headline = |s: &Value| {
        js_frames(s).into_iter().find(|(_, file, _)| !file.is_empty() && !file.starts_with("node:"))
    };
    let ours: Vec<&Value> = sites(&report)
        .iter()
        .filter(|s| headline(s).is_some_and(|(f, _, _)| f == "subscribe"))
        .filter(|s| has_frame(s, "node::NodeArrayBufferAllocator::"))
        .collect();
    assert!(
        !ours.is_empty(),
        "V8 {version}: no site named subscribe: {:#?}",
        sites(&report).iter().map(headline).collect::<Vec<_>>()
    );
    let (count, bytes) = ours.iter().fold((0, 0), |(c, b), s| {
        (c + s["outstanding_count"].as_u64().unwrap_or(0), b + s["outstanding_bytes"].as_u64().unwrap_or(0))
    });
    let others: Vec<_> = sites(&report)
        .iter()
        .filter(|s| {
            has_frame(s, "node::NodeArrayBufferAllocator::") && s["outstanding_bytes"].as_u64() >= Some(16384)
        })
        .map(|s| (s["outstanding_count"].clone(), s["truncated"].clone(), js_frames(s)))
        .collect();
    assert_eq!(
        count, REQUESTS,
        "V8 {version}: one Buffer per request under subscribe; all Buffer sites: {others:#?}"
    );
    assert_eq!(bytes, REQUESTS * 16 * 1024, "V8 {version}: 16 KiB each");
    for s in &ours {
        let js = js_frames(s);
        let at = |name: &str| js.iter().position(|(f, _, _)| f == name);
        let (Some(sub), Some(han)) = (at("subscribe"), at("handle")) else {
            panic!("V8 {version}: the stack lacks subscribe or handle: {js:?}");
        };
        assert!(sub < han, "V8 {version}: subscribe is called by handle: {js:?}");
        assert!(js[sub].1.ends_with("node_leaks.js") && js[sub].2 == subscribe, "V8 {version}: {js:?}");
        assert_eq!(js[han].2, handle, "V8 {version}: {js:?}");
        // Buffer.alloc (Node's own JavaScript) below it, the native allocator below that.
        let alloc = js.iter().position(|(f, file, _)| f == "alloc" && file == "node:buffer");
        assert!(alloc.is_some_and(|a| a < sub), "V8 {version}: Buffer.alloc above subscribe: {js:?}");
        let frames = s["frames"].as_array().unwrap();
        assert!(frames[0]["runtime"].is_null(), "V8 {version}: the innermost frame is native");
    }

    // pprof: the real go tool reads it; subscribe is a function of its own.
    let home = tempfile::tempdir().unwrap();
    let top = go_pprof(home.path(), &["-top", "-sample_index=inuse_space", "-nodecount=1000"], &prof);
    let (_, cum) = top_row(&top, "subscribe");
    let cum_bytes: f64 = match cum.find(|c: char| c.is_ascii_alphabetic()) {
        Some(i) => {
            let unit = match &cum[i..] {
                "B" => 1.0,
                "kB" => 1024.0,
                "MB" => 1024.0 * 1024.0,
                u => panic!("unit {u}"),
            };
            cum[..i].parse::<f64>().unwrap() * unit
        }
        None => panic!("{cum}"),
    };
    assert!(
        cum_bytes >= (REQUESTS * 16 * 1024) as f64 * 0.99,
        "V8 {version}: subscribe's cum in -top: {cum}\n{top}"
    );
    let _ = t.child.kill();
    let _ = t.child.wait();
}

#[test]
fn node_20_names_the_javascript_above_a_buffer() {
    case(Path::new("/usr/bin/node"));
}

#[test]
fn node_24_names_the_javascript_above_a_buffer() {
    case(&node_lts());
}
