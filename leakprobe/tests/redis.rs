//! Debian's redis-server (jemalloc): the values it stores show up at redis's own call sites,
//! growing with the keys written and shrinking with DEL and FLUSHALL. Privileged: run as
//! root, one at a time.

mod common;

use std::{
    io::Write as _,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use common::*;
use serde_json::Value;

const VALUE_LEN: usize = 1000;

struct Redis {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Redis {
    fn start() -> Redis {
        let dir = tempfile::tempdir().unwrap();
        let port = 26000 + (std::process::id() % 2000) as u16;
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server (cargo xtask setup installs it)");
        let r = Redis { child, port, _dir: dir };
        let deadline = Instant::now() + Duration::from_secs(10);
        while r.cli(&["ping"]).trim() != "PONG" {
            assert!(Instant::now() < deadline, "redis-server did not answer on port {port}");
            std::thread::sleep(Duration::from_millis(100));
        }
        r
    }

    fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli").args(["-p", &self.port.to_string()]).args(args).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Sends commands (each a list of arguments) through `redis-cli --pipe`.
    fn pipe(&self, commands: impl Iterator<Item = Vec<String>>) {
        let mut resp = Vec::new();
        for cmd in commands {
            write!(resp, "*{}\r\n", cmd.len()).unwrap();
            for a in cmd {
                write!(resp, "${}\r\n{a}\r\n", a.len()).unwrap();
            }
        }
        let mut child = Command::new("redis-cli")
            .args(["-p", &self.port.to_string(), "--pipe"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(&resp).unwrap();
        let out = child.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && text.contains("errors: 0"), "redis-cli --pipe: {text}");
    }

    fn set(&self, keys: std::ops::Range<u32>) {
        let value = "v".repeat(VALUE_LEN);
        self.pipe(keys.map(|i| vec!["SET".into(), format!("key:{i}"), value.clone()]));
    }

    fn pid(&self) -> String {
        self.child.id().to_string()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn trace(redis: &Redis, during: impl FnOnce()) -> Value {
    let pid = redis.pid();
    let mut lp = Leakprobe::start(&[
        "attach",
        "--pid",
        &pid,
        "--interval",
        "1s",
        "--duration",
        "6s",
        "--format",
        "json",
    ]);
    lp.wait_attached();
    during();
    let (code, out, err) = lp.finish();
    assert_eq!(code, 0, "{err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("bad JSON ({e}):\n{out}\n{err}"))
}

/// Sites that hold stored string values: sds strings created from the client's arguments.
fn value_sites(report: &Value) -> Vec<&Value> {
    sites(report).iter().filter(|s| has_frame(s, "sdsnewlen") && has_frame(s, "createStringObject")).collect()
}

#[test]
fn redis_values_grow_with_keys_and_shrink_with_del_and_flushall() {
    require_root();
    let redis = Redis::start();

    // 4000 values written, 2000 deleted, all while attached.
    let report = trace(&redis, || {
        redis.set(0..4000);
        redis.pipe((0..2000).map(|i| vec!["DEL".into(), format!("key:{i}")]));
    });
    assert_eq!(redis.cli(&["dbsize"]).trim(), "2000");
    assert_eq!(report["allocator"]["name"], "jemalloc", "{}", report["allocator"]);
    assert!(report["allocator"]["module"].as_str().unwrap().contains("libjemalloc"));
    assert_no_drops(&report);
    let values = value_sites(&report);
    assert!(!values.is_empty(), "no site with sdsnewlen <- createStringObject");
    for s in &values {
        assert!(has_frame(s, "zmalloc"), "value site without a zmalloc frame: {}", s["frames"]);
    }
    let (outstanding, count, allocated, freed) = sum(values.iter().copied());
    let alloc_bytes: u64 = values.iter().map(|s| s["allocated_bytes"].as_u64().unwrap()).sum();
    assert!(
        allocated >= 4000 && alloc_bytes >= 4000 * VALUE_LEN as u64,
        "{allocated} values, {alloc_bytes} B"
    );
    assert!(freed >= 2000, "DEL freed only {freed} values");
    // What is still stored: 2000 values of 1000 bytes plus sds headers; were the DELs not
    // seen, this would be twice as much.
    assert_eq!(count, 2000, "outstanding values");
    let want = 2000 * VALUE_LEN as u64;
    assert!(
        (want..want + want / 10).contains(&outstanding),
        "outstanding value bytes {outstanding}, want ~{want}"
    );

    // A new session: 3000 more, then FLUSHALL frees them and the 2000 from before attach.
    let report = trace(&redis, || {
        redis.set(10_000..13_000);
        assert_eq!(redis.cli(&["flushall"]).trim(), "OK");
    });
    assert_eq!(redis.cli(&["dbsize"]).trim(), "0");
    assert_no_drops(&report);
    let (outstanding, count, allocated, freed) = sum(value_sites(&report).into_iter());
    assert!(allocated >= 3000, "{allocated}");
    assert_eq!((outstanding, count), (0, 0), "FLUSHALL freed every value stored in the session");
    assert!(freed >= 3000);
    let unknown = report["activity"]["unknown_frees"].as_u64().unwrap();
    assert!(unknown >= 2000, "FLUSHALL's frees of the 2000 values from before attach: {unknown}");
    assert_all_gone("after tracing redis");
}
