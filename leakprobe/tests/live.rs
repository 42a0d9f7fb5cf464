//! Live monitoring (issue 15): `--metrics` scraped by a real Prometheus and linted by promtool,
//! the rules and dashboard in docs/monitoring, `leakprobe top` under tmux, progress on a
//! terminal, eviction of ended call sites and snapshot rotation. Needs root (eBPF), and
//! Debian's prometheus and tmux (installed by `cargo xtask setup`).

mod common;

use std::{
    io::Write as _,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use common::*;
use serde_json::Value;

/// Percent-encodes a query parameter.
fn encode(q: &str) -> String {
    q.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn monitoring(file: &str) -> PathBuf {
    repo_root().join("docs/monitoring").join(file)
}

/// Debian's prometheus on loopback, scraping leakprobe every second, with our rules loaded.
struct Prometheus {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(target_port: u16) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\n\
                 scrape_configs:\n  - job_name: leakprobe\n    static_configs:\n      - targets: ['127.0.0.1:{target_port}']\n",
                monitoring("leakprobe-rules.yml").display()
            ),
        )
        .unwrap();
        let port = free_port();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("Debian's prometheus (cargo xtask setup installs it)");
        let p = Prometheus { child, port, _dir: dir };
        let deadline = Instant::now() + Duration::from_secs(30);
        while http(port, "GET", "/-/ready").map(|r| r.0).ok() != Some(200) {
            assert!(Instant::now() < deadline, "prometheus never became ready");
            std::thread::sleep(Duration::from_millis(200));
        }
        p
    }

    fn query(&self, q: &str) -> Value {
        let (status, body) =
            http(self.port, "GET", &format!("/api/v1/query?query={}", encode(q))).expect("query prometheus");
        let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
        assert_eq!(status, 200, "query {q} failed: {body}");
        assert_eq!(v["status"], "success", "query {q}: {body}");
        v
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn promtool(args: &[&str], stdin: Option<&str>) -> (bool, String) {
    let mut child = Command::new("promtool")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus package)");
    let mut input = child.stdin.take().unwrap();
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).unwrap();
    }
    drop(input);
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
    )
}

fn sigint(child: &Child) {
    // SAFETY: a plain kill of our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
}

/// Whether `port` is listened on at 127.0.0.1 only (from /proc/net/tcp: state 0A, address
/// 0100007F).
fn listens_on_loopback_only(port: u16) -> bool {
    let tcp = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let mine: Vec<&str> = tcp
        .lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[3] == "0A" && f[1].ends_with(&format!(":{port:04X}"))
        })
        .collect();
    !mine.is_empty()
        && mine.iter().all(|l| l.split_whitespace().nth(1).is_some_and(|a| a.starts_with("0100007F:")))
}

#[test]
fn a_real_prometheus_sees_the_leaking_site_rise_and_promtool_accepts_the_scrape() {
    require_root();
    let mut demo = Demo::start();
    let mport = free_port();
    let pid = demo.pid().to_string();
    let addr = mport.to_string();
    let mut lp = Leakprobe::start(&[
        "attach",
        "--pid",
        &pid,
        "--interval",
        "1s",
        "--metrics",
        &addr,
        "--scan-every",
        "3s",
    ]);
    lp.wait_attached();
    demo.drive();
    assert!(listens_on_loopback_only(mport), "--metrics PORT must bind to 127.0.0.1 only");

    // Only GET /metrics and the index are served.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(http(mport, "GET", "/").unwrap().0, 200);
    assert_eq!(http(mport, "POST", "/metrics").unwrap().0, 405);
    assert_eq!(http(mport, "GET", "/debug").unwrap().0, 404);
    let (status, scrape) = http(mport, "GET", "/metrics").unwrap();
    assert_eq!(status, 200);
    assert!(scrape.contains("function=\"parse_upload\""), "{scrape}");
    let (ok, lint) = promtool(&["check", "metrics"], Some(&scrape));
    assert!(ok && lint.trim().is_empty(), "promtool check metrics: {lint}\n{scrape}");

    let prom = Prometheus::start(mport);
    // The leaking site's outstanding bytes, as Prometheus stored them: rising across scrapes.
    let q = r#"leakprobe_site_outstanding_bytes{function="parse_upload"}[60s]"#;
    let deadline = Instant::now() + Duration::from_secs(60);
    let values = loop {
        let v = prom.query(q);
        let values: Vec<f64> = v["data"]["result"]
            .as_array()
            .and_then(|r| r.first())
            .and_then(|s| s["values"].as_array())
            .map(|vals| vals.iter().filter_map(|p| p[1].as_str()?.parse().ok()).collect())
            .unwrap_or_default();
        let rises = values.windows(2).filter(|w| w[1] > w[0]).count();
        if values.len() >= 4 && rises >= 3 {
            break values;
        }
        assert!(Instant::now() < deadline, "no rise across three scrapes in 60 s: {values:?}");
        std::thread::sleep(Duration::from_secs(1));
    };
    assert!(values.windows(2).all(|w| w[1] >= w[0]), "a leak never shrinks: {values:?}");

    // Every query of the dashboard runs on this Prometheus, and the growth panel names the site.
    let dash: Value =
        serde_json::from_str(&std::fs::read_to_string(monitoring("leakprobe-dashboard.json")).unwrap())
            .unwrap();
    for panel in dash["panels"].as_array().unwrap() {
        for t in panel["targets"].as_array().unwrap() {
            prom.query(&t["expr"].as_str().unwrap().replace("$instance", ".*"));
        }
    }
    let growth = prom.query("leakprobe:site_growth_bytes_per_second:rate1h");
    let growth_query = dash["panels"][0]["targets"][0]["expr"].as_str().unwrap().replace("$instance", ".*");
    let by_site = prom.query(&growth_query);
    let leaking = by_site["data"]["result"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["metric"]["function"] == "parse_upload")
        .unwrap_or_else(|| panic!("no growth series for parse_upload: {by_site}"));
    let rate: f64 = leaking["value"][1].as_str().unwrap().parse().unwrap();
    assert!(rate > 0.0, "parse_upload grows: {leaking}");
    assert_eq!(growth["status"], "success");
    // The rules file loaded in a real Prometheus.
    let (_, rules) = http(prom.port, "GET", "/api/v1/rules").unwrap();
    assert!(rules.contains("LeakprobeSiteGrowingSteadily"), "{rules}");
    // After a scan, the leaked site's bytes are classed as definitely lost.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v = prom.query(
            r#"leakprobe_site_reachability_bytes{function="parse_upload",class="definitely_lost"} > 0"#,
        );
        if v["data"]["result"].as_array().is_some_and(|r| !r.is_empty()) {
            break;
        }
        assert!(Instant::now() < deadline, "no reachability series after the scans");
        std::thread::sleep(Duration::from_secs(1));
    }
    drop(prom);

    sigint(&lp.child);
    let (code, report, err) = lp.finish();
    assert_eq!(code, 0, "{err}");
    assert!(report.contains("parse_upload"), "{report}");
    drop(demo);
    assert_all_gone("after --metrics");
}

#[test]
fn promtool_checks_the_rules_and_their_unit_tests() {
    let rules = monitoring("leakprobe-rules.yml");
    let (ok, out) = promtool(&["check", "rules", rules.to_str().unwrap()], None);
    assert!(ok, "{out}");
    assert!(out.contains("SUCCESS: 3 rules found"), "{out}");
    // The alert fires for a steady grower after 30 minutes and not for a filled cache.
    let tests = monitoring("leakprobe-rules.test.yml");
    let (ok, out) = promtool(&["test", "rules", tests.to_str().unwrap()], None);
    assert!(ok, "{out}");
}

#[test]
fn the_dashboard_is_valid_json_with_the_panels_the_readme_names() {
    let dash: Value =
        serde_json::from_str(&std::fs::read_to_string(monitoring("leakprobe-dashboard.json")).unwrap())
            .unwrap();
    let readme = std::fs::read_to_string(repo_root().join("README.md")).unwrap();
    let panels = dash["panels"].as_array().unwrap();
    assert!(panels.len() >= 4);
    for p in panels {
        let title = p["title"].as_str().unwrap();
        assert!(readme.contains(title), "README does not name the panel {title:?}");
        assert!(p["targets"].as_array().is_some_and(|t| t.iter().all(|t| t["expr"].is_string())));
    }
    let exprs: Vec<&str> = panels
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap())
        .filter_map(|t| t["expr"].as_str())
        .collect();
    assert!(exprs.iter().any(|e| e.contains("[1h]") && e.contains("rate(")), "the growth rate over 1 h");
    assert!(exprs.iter().any(|e| e.contains("topk(")), "the top growing sites");
}

/// A tmux session running `cmd` in a 220x45 terminal.
struct Tmux {
    name: String,
}

impl Tmux {
    fn start(cmd: &str) -> Tmux {
        let name = format!("lp{}", std::process::id());
        let ok = Command::new("tmux")
            .args(["new-session", "-d", "-s", &name, "-x", "220", "-y", "45", cmd])
            .status()
            .expect("tmux (cargo xtask setup installs it)")
            .success();
        assert!(ok, "tmux new-session failed");
        Tmux { name }
    }

    fn screen(&self) -> String {
        let out = Command::new("tmux").args(["capture-pane", "-p", "-t", &self.name]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn display(&self, format: &str) -> String {
        let out =
            Command::new("tmux").args(["display-message", "-p", "-t", &self.name, format]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    fn keys(&self, keys: &[&str]) {
        assert!(
            Command::new("tmux").args(["send-keys", "-t", &self.name]).args(keys).status().unwrap().success()
        );
    }

    /// Waits until the screen satisfies `pred`; returns it.
    fn wait(&self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(40);
        loop {
            let s = self.screen();
            if pred(&s) {
                return s;
            }
            assert!(Instant::now() < deadline, "never saw {what}; screen:\n{s}");
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux").args(["kill-session", "-t", &self.name]).status();
    }
}

/// The first site row of top's table (the line after the header).
fn first_row(screen: &str) -> String {
    let mut lines = screen.lines().skip_while(|l| !l.starts_with("SITE "));
    lines.nth(1).unwrap_or("").to_string()
}

fn top_command(pid: i32, env: &str, args: &str) -> String {
    format!(
        "{env} {} top --pid {pid} --interval 1s {args}; echo TOP-DONE rc=$?; sleep 600",
        leakprobe_bin().display()
    )
}

#[test]
fn top_shows_the_leaking_site_first_sorts_on_a_key_and_leaves_a_clean_terminal() {
    require_root();
    let mut demo = Demo::start();
    demo.drive();
    let snaps = tempfile::tempdir().unwrap();
    let tmux =
        Tmux::start(&top_command(demo.pid(), "", &format!("--snapshot-dir {}", snaps.path().display())));
    // The upload copy (1 KiB per upload) outgrows everything else.
    let s = tmux.wait("parse_upload at the top", |s| {
        first_row(s).contains("parse_upload") && s.contains("call sites by growth") && s.contains("VERDICT")
    });
    assert!(s.contains("tracked heap / RSS"), "{s}");
    assert_eq!(tmux.display("#{alternate_on}"), "1", "top draws on the alternate screen");
    tmux.keys(&["s"]);
    tmux.wait("the sort change", |s| s.contains("call sites by outstanding"));
    tmux.keys(&["s"]);
    tmux.wait("the second sort change", |s| s.contains("call sites by peak"));
    // By calls, and by temporaries: the health check, which allocates and frees at once on
    // every request, comes first, its buffers counted as temporaries.
    tmux.keys(&["s"]);
    let s = tmux.wait("the sort by calls", |s| s.contains("call sites by calls"));
    assert!(first_row(&s).contains("health"), "{s}");
    tmux.keys(&["s"]);
    let s = tmux.wait("the sort by temporaries", |s| s.contains("call sites by temporary"));
    assert!(first_row(&s).contains("health") && s.contains("TEMP"), "{s}");
    // Filter by module: the demo's own sites stay, the others go.
    tmux.keys(&["/", "s", "e", "s", "s", "i", "o", "n", "Enter"]);
    let s = tmux.wait("the filter", |s| s.contains("matching \"session\""));
    assert!(!first_row(&s).contains("parse_upload"), "{s}");
    // `w`: the report so far, as a snapshot in --snapshot-dir, named on the status line.
    tmux.keys(&["w"]);
    tmux.wait("the snapshot's status line", |s| s.contains("snapshot written to"));
    let written = std::fs::read_dir(snaps.path()).unwrap().map(|e| e.unwrap().path()).collect::<Vec<_>>();
    assert_eq!(written.len(), 1, "{written:?}");
    let snap: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&written[0]).unwrap()).unwrap();
    assert!(snap["sites"].as_array().unwrap().iter().any(|s| frame0(s) == "parse_upload"), "{snap}");
    tmux.keys(&["q"]);
    let s = tmux.wait("top's exit", |s| s.contains("TOP-DONE"));
    assert!(s.contains("TOP-DONE rc=0"), "{s}");
    assert_eq!(tmux.display("#{alternate_on}"), "0", "the alternate screen was left");
    assert_eq!(tmux.display("#{cursor_flag}"), "1", "the cursor is visible again");
    assert!(!s.contains("call sites by"), "nothing of the view is left on the terminal:\n{s}");
    assert!(s.contains("detached from PID"), "{s}");
    drop(tmux);
    drop(demo);
    assert_all_gone("after top");
}

#[test]
fn top_restores_the_terminal_when_leakprobe_panics() {
    require_root();
    let mut demo = Demo::start();
    demo.drive();
    let tmux =
        Tmux::start(&top_command(demo.pid(), "RUST_BACKTRACE=0 LEAKPROBE_TEST_PANIC_AFTER_ATTACH=1", ""));
    let s = tmux.wait("top's exit", |s| s.contains("TOP-DONE"));
    assert!(s.contains("TOP-DONE rc=101"), "a panic's exit status: {s}");
    assert!(s.contains("LEAKPROBE_TEST_PANIC_AFTER_ATTACH"), "the panic message is readable: {s}");
    assert_eq!(tmux.display("#{alternate_on}"), "0");
    assert_eq!(tmux.display("#{cursor_flag}"), "1");
    assert!(demo.server.try_wait().unwrap().is_none(), "the target runs on");
    drop(tmux);
    drop(demo);
    assert_all_gone("after a panic in top");
}

#[test]
fn a_terminal_gets_a_progress_bar_and_a_pipe_gets_lines() {
    require_root();
    let mut demo = Demo::start();
    demo.drive();
    let cmd = format!(
        "{} attach --pid {} --duration 4s --interval 1s > /dev/null; echo ATTACH-DONE rc=$?; sleep 600",
        leakprobe_bin().display(),
        demo.pid()
    );
    let tmux = Tmux::start(&cmd);
    // indicatif's bar: the elapsed clock, then outstanding figures as its message.
    tmux.wait("the window's bar", |s| s.contains("leakprobe: [00:00:0") && s.contains("outstanding"));
    let s = tmux.wait("the end", |s| s.contains("ATTACH-DONE"));
    assert!(s.contains("ATTACH-DONE rc=0"), "{s}");
    assert!(!s.contains("[   1.0s] outstanding"), "no per-interval lines on a terminal:\n{s}");
    drop(tmux);
    // Without a terminal, the plain lines.
    let pid = demo.pid().to_string();
    let mut lp = Leakprobe::start(&["attach", "--pid", &pid, "--duration", "3s", "--interval", "1s"]);
    lp.wait_for("[   1.0s] outstanding");
    let (code, _, err) = lp.finish();
    assert_eq!(code, 0, "{err}");
    assert!(!err.contains('\u{1b}'), "no escape sequences without a terminal: {err:?}");
}

#[test]
fn ended_call_sites_are_evicted_and_the_totals_stay_exact() {
    require_root();
    let bin = build_target("phases.c", "phases", "gcc", NOFP_C);
    let mut target = Target::spawn(&bin);
    let report = attach_report(
        &mut target,
        &["--duration", "7s", "--evict-after", "2s", "--format", "json", "--max-stack", "64"],
        |t| {
            t.send("go");
            t.expect("phase2");
        },
    );
    // 32 startup sites, each called (depth + 1) x 4 times, all freed and idle since.
    assert_eq!(report["totals"]["evicted_sites"], 32, "{}", report["totals"]);
    let live = sites(&report);
    assert!(live.iter().all(|s| !has_frame(s, "startup")), "no startup site is left");
    let steady = live.iter().find(|s| frame0(s) == "leak_steadily").expect("the leaking site stays");
    let churn = live.iter().find(|s| frame0(s) == "churn").expect("a busy empty site stays");
    let startup_calls = 4 * (1..=32).sum::<u64>();
    let (_, _, allocated, freed) = sum(live.iter());
    assert_eq!(report["totals"]["allocated_count"], allocated + startup_calls);
    assert_eq!(report["totals"]["freed_count"], freed + startup_calls);
    assert!(steady["outstanding_count"].as_u64().unwrap() > 100);
    assert_eq!(churn["outstanding_count"], 0);
    assert_no_drops(&report);
}

#[test]
fn snapshot_keep_leaves_only_the_newest_snapshots() {
    require_root();
    let bin = build_target("phases.c", "phases", "gcc", NOFP_C);
    let mut target = Target::spawn(&bin);
    let dir = tempfile::tempdir().unwrap();
    let snaps = dir.path().join("snaps");
    // Someone else's file in the directory is never touched (--force lets the dir be used).
    std::fs::create_dir(&snaps).unwrap();
    std::fs::write(snaps.join("notes.txt"), "mine").unwrap();
    let (code, _, err) = attach_with(
        &mut target,
        &[
            "--duration",
            "6s",
            "--snapshot-every",
            "1s",
            "--snapshot-dir",
            snaps.to_str().unwrap(),
            "--snapshot-keep",
            "2",
            "--force",
        ],
        |t| t.send("go"),
    );
    assert_eq!(code, 0, "{err}");
    let names: Vec<String> = std::fs::read_dir(&snaps)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.contains(&"notes.txt".to_string()), "{names:?}");
    let pid = target.pid();
    let mut kept: Vec<u32> = names
        .iter()
        .filter_map(|n| n.strip_prefix(&format!("snapshot-{pid}-"))?.strip_suffix(".json")?.parse().ok())
        .collect();
    kept.sort();
    let written = err.matches("snapshot written to").count() as u32;
    assert!(written >= 4, "a snapshot a second for 6 s: {err}");
    assert_eq!(kept, [written - 1, written], "the newest two of {written}: {names:?}");
    let newest = snaps.join(format!("snapshot-{pid}-{written:04}.json"));
    let newest: Value = serde_json::from_str(&std::fs::read_to_string(newest).unwrap()).unwrap();
    assert!(newest["sites"].is_array());
}
