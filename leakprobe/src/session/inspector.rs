//! Node's inspector, for `--js-heap`: found or opened, spoken to over the Chrome DevTools
//! Protocol, and closed again. **Layer: edges** (signals, sockets, the target's /proc).
//!
//! An open inspector lets any local process run code in the target: there is no
//! authentication. So the window is kept as short as the session and no wider:
//! - an inspector the target already had open is used as it is and left open (it is theirs);
//! - otherwise leakprobe opens it the way Node documents (`SIGUSR1`), on the target's own
//!   port (`--inspect-port`, default 9229, loopback), and only after checking that nothing
//!   else holds that port in the target's network namespace: if something does, it refuses
//!   before any signal is sent;
//! - it closes it again at the end (`process._debugEnd()`, Node's own counterpart of
//!   `SIGUSR1`, evaluated through the session), on Ctrl-C and on a panic (drop), and the
//!   guard does so if leakprobe is SIGKILLed. The report says how long it was open.

use std::{
    io::{BufRead as _, Read as _, Write as _},
    net::TcpStream,
    os::fd::AsFd as _,
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use thiserror::Error;
use tungstenite::{Message, WebSocket};

/// The inspector's port when the target names none.
pub const DEFAULT_PORT: u16 = 9229;
/// How long Node gets to open its inspector after `SIGUSR1`.
const OPEN_WAIT: Duration = Duration::from_secs(5);
/// How long one CDP call may take (a profile of a big heap takes a while).
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Error)]
pub enum InspectorError {
    #[error(
        "PID {pid} was started with --disable-sigusr1: its inspector cannot be opened from outside, so --js-heap cannot run (start it with --inspect-port=PORT, or leave --js-heap out)"
    )]
    Sigusr1Disabled { pid: i32 },
    #[error(
        "the inspector port 127.0.0.1:{port} is already held by another process in PID {pid}'s network namespace (socket inode {inode}); no signal was sent. Free the port or start the target with --inspect-port=PORT"
    )]
    PortHeld { pid: i32, port: u16, inode: u64 },
    #[error(
        "PID {pid} was started with --inspect, but nothing of it listens on port {port} (--inspect=0 picks a random port); no signal was sent. Restart it with a fixed --inspect-port to use --js-heap"
    )]
    InspectorElsewhere { pid: i32, port: u16 },
    #[error(
        "PID {pid} did not open its inspector on port {port} within {waited:?} of SIGUSR1 (a SIGUSR1 handler of its own, or a Node without an inspector?)"
    )]
    DidNotOpen { pid: i32, port: u16, waited: Duration },
    #[error("cannot read PID {pid}'s {what}: {source}")]
    Proc {
        pid: i32,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot signal PID {pid}: {source}")]
    Signal {
        pid: i32,
        #[source]
        source: nix::Error,
    },
    #[error("talking to the inspector on port {port}: {why}")]
    Connect { port: u16, why: String },
    #[error("the inspector answered {method} with an error: {error}")]
    Protocol { method: String, error: String },
    #[error("the inspector connection failed during {method}: {why}")]
    Transport { method: String, why: String },
}

/// How the target's command line and `NODE_OPTIONS` set up its inspector. Pure.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InspectOptions {
    pub sigusr1_disabled: bool,
    /// `--inspect-port=P`, `--inspect=[host:]P` and its `-brk`/`-wait` forms.
    pub port: Option<u16>,
    /// An `--inspect*` flag: it was started with an inspector of its own.
    pub inspect_flag: bool,
}

impl InspectOptions {
    /// From the target's arguments and the words of its `NODE_OPTIONS`, up to the script
    /// (Node's own options come first).
    pub fn parse<'a>(words: impl IntoIterator<Item = &'a str>) -> InspectOptions {
        let mut o = InspectOptions::default();
        let mut words = words.into_iter().peekable();
        while let Some(w) = words.next() {
            let (flag, value) = match w.split_once('=') {
                Some((f, v)) => (f, Some(v.to_string())),
                None => (w, None),
            };
            match flag {
                "--disable-sigusr1" => o.sigusr1_disabled = true,
                "--inspect-port" | "--debug-port" => {
                    let v = value.or_else(|| words.next().map(str::to_string));
                    o.port = v.as_deref().and_then(port_of).or(o.port);
                }
                "--inspect" | "--inspect-brk" | "--inspect-wait" => {
                    o.inspect_flag = true;
                    o.port = value.as_deref().and_then(port_of).or(o.port);
                }
                _ => {}
            }
        }
        o
    }
}

/// The port of `host:port` or `port`.
fn port_of(v: &str) -> Option<u16> {
    v.rsplit(':').next()?.parse().ok()
}

/// The listening TCP sockets of a `/proc/PID/net/tcp` or `tcp6` table: (local port, inode).
pub fn listening(table: &str) -> Vec<(u16, u64)> {
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
            if f.len() < 10 || f[3] != "0A" {
                return None;
            }
            let port = u16::from_str_radix(f[1].rsplit(':').next()?, 16).ok()?;
            Some((port, f[9].parse().ok()?))
        })
        .collect()
}

/// The target's view of the listening TCP sockets (its network namespace).
fn listening_in(pid: i32) -> Result<Vec<(u16, u64)>, InspectorError> {
    let mut out = Vec::new();
    for t in ["tcp", "tcp6"] {
        match std::fs::read_to_string(format!("/proc/{pid}/net/{t}")) {
            Ok(s) => out.extend(listening(&s)),
            Err(e) if t == "tcp6" && e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(InspectorError::Proc { pid, what: "TCP sockets", source }),
        }
    }
    Ok(out)
}

/// The socket inodes the target holds open.
fn socket_inodes(pid: i32) -> Result<Vec<u64>, InspectorError> {
    let dir = std::fs::read_dir(format!("/proc/{pid}/fd")).map_err(|source| InspectorError::Proc {
        pid,
        what: "open files",
        source,
    })?;
    Ok(dir
        .flatten()
        .filter_map(|e| {
            let link = std::fs::read_link(e.path()).ok()?;
            link.to_str()?.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
        })
        .collect())
}

/// Whether the target itself (a socket it holds) listens on TCP `port`.
pub fn target_listens(pid: i32, port: u16) -> Result<bool, InspectorError> {
    let ours = socket_inodes(pid)?;
    Ok(listening_in(pid)?.iter().any(|(p, i)| *p == port && ours.contains(i)))
}

/// The target's inspector options: its arguments and `NODE_OPTIONS`.
fn options_of(pid: i32) -> Result<InspectOptions, InspectorError> {
    let read = |what: &'static str| {
        std::fs::read(format!("/proc/{pid}/{what}")).map_err(|source| InspectorError::Proc {
            pid,
            what,
            source,
        })
    };
    let cmdline = read("cmdline")?;
    let environ = read("environ").unwrap_or_default();
    let node_options: String = environ
        .split(|&b| b == 0)
        .find_map(|kv| kv.strip_prefix(b"NODE_OPTIONS="))
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .unwrap_or_default();
    let args: Vec<String> =
        cmdline.split(|&b| b == 0).skip(1).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
    // Node's options come before the script.
    let own = args.iter().take_while(|a| a.starts_with('-')).map(String::as_str);
    Ok(InspectOptions::parse(node_options.split_whitespace().chain(own)))
}

/// Connects to `127.0.0.1:port` from inside the target's network namespace (a thread of ours
/// enters it when it is not ours).
fn connect(pid: i32, port: u16) -> Result<TcpStream, InspectorError> {
    let err = |why: String| InspectorError::Connect { port, why };
    let ns = |p: &str| std::fs::metadata(p).map(|m| std::os::unix::fs::MetadataExt::ino(&m)).ok();
    let theirs = format!("/proc/{pid}/ns/net");
    if ns("/proc/self/ns/net") == ns(&theirs) {
        return TcpStream::connect(("127.0.0.1", port)).map_err(|e| err(e.to_string()));
    }
    let file = std::fs::File::open(&theirs).map_err(|e| err(format!("{theirs}: {e}")))?;
    std::thread::spawn(move || {
        nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| format!("entering the target's network namespace: {e}"))?;
        TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())
    })
    .join()
    .map_err(|_| err("the connecting thread panicked".into()))?
    .map_err(err)
}

/// The WebSocket path of the target's first session (`/json/list`).
fn debugger_path(pid: i32, port: u16) -> Result<String, InspectorError> {
    let err = |why: String| InspectorError::Connect { port, why };
    let mut s = connect(pid, port)?;
    s.set_read_timeout(Some(Duration::from_secs(5))).map_err(|e| err(e.to_string()))?;
    write!(s, "GET /json/list HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n").map_err(|e| err(e.to_string()))?;
    // Node keeps the connection open: read the headers, then Content-Length bytes.
    let mut r = std::io::BufReader::new(s);
    let mut length = None;
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).map_err(|e| err(e.to_string()))? == 0 {
            break;
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':')
            && k.eq_ignore_ascii_case("content-length")
        {
            length = v.trim().parse::<usize>().ok();
        }
    }
    let length =
        length.filter(|&n| n <= 1 << 20).ok_or_else(|| err("/json/list: no Content-Length".into()))?;
    let mut body = vec![0u8; length];
    r.read_exact(&mut body).map_err(|e| err(e.to_string()))?;
    let json = String::from_utf8_lossy(&body);
    let list: Value = serde_json::from_str(&json).map_err(|e| err(format!("/json/list: {e}")))?;
    let url = list[0]["webSocketDebuggerUrl"]
        .as_str()
        .ok_or_else(|| err(format!("/json/list lists no session: {json:.200}")))?;
    // ws://host:port/PATH
    let path = url.splitn(4, '/').nth(3).ok_or_else(|| err(format!("odd session URL {url}")))?;
    Ok(format!("/{path}"))
}

/// An open CDP session with the target's inspector.
pub struct Inspector {
    pid: i32,
    pub port: u16,
    ws: Option<WebSocket<TcpStream>>,
    next_id: u64,
    /// Whether leakprobe opened it (and so must close it).
    pub opened_by_us: bool,
    opened_at: Instant,
    /// The WebSocket path, for the guard.
    pub path: String,
}

/// What `Inspector::open` found or did, for the progress line and the report.
pub struct Opened {
    pub inspector: Inspector,
    pub line: String,
}

impl Inspector {
    /// Finds the target's inspector, or opens it with `SIGUSR1` (see the module's rules).
    pub fn open(pid: i32) -> Result<Opened, InspectorError> {
        let opts = options_of(pid)?;
        let port = opts.port.unwrap_or(DEFAULT_PORT);
        let ours = socket_inodes(pid)?;
        let held = listening_in(pid)?.into_iter().find(|(p, _)| *p == port);
        // Only the inspector's own port is ever spoken to: the target's other listening
        // sockets are its business, and an HTTP request to them would be one more request.
        if let Some((_, inode)) = held {
            if !ours.contains(&inode) {
                return Err(InspectorError::PortHeld { pid, port, inode });
            }
            let path = debugger_path(pid, port)?;
            let inspector = Inspector::connect_session(pid, port, path, false)?;
            let line = format!(
                "--js-heap: PID {pid}'s inspector was already open on port {port}; using it, and leaving it open"
            );
            return Ok(Opened { inspector, line });
        }
        if opts.sigusr1_disabled {
            return Err(InspectorError::Sigusr1Disabled { pid });
        }
        if opts.inspect_flag {
            return Err(InspectorError::InspectorElsewhere { pid, port });
        }
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGUSR1)
            .map_err(|source| InspectorError::Signal { pid, source })?;
        let opened_at = Instant::now();
        let path = loop {
            if target_listens(pid, port)?
                && let Ok(path) = debugger_path(pid, port)
            {
                break path;
            }
            if opened_at.elapsed() > OPEN_WAIT {
                return Err(InspectorError::DidNotOpen { pid, port, waited: OPEN_WAIT });
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut inspector = Inspector::connect_session(pid, port, path, true)?;
        inspector.opened_at = opened_at;
        let own = if opts.port.is_some() { " (its own --inspect-port)" } else { "" };
        let line = format!(
            "--js-heap: opened PID {pid}'s inspector on 127.0.0.1:{port}{own} with SIGUSR1; any local process can use it until leakprobe closes it at the end"
        );
        Ok(Opened { inspector, line })
    }

    fn connect_session(
        pid: i32,
        port: u16,
        path: String,
        opened_by_us: bool,
    ) -> Result<Inspector, InspectorError> {
        let err = |why: String| InspectorError::Connect { port, why };
        let stream = connect(pid, port)?;
        stream.set_read_timeout(Some(CALL_TIMEOUT)).map_err(|e| err(e.to_string()))?;
        // A sampling profile of a big heap is one large message.
        let config = tungstenite::protocol::WebSocketConfig::default()
            .max_message_size(Some(1 << 30))
            .max_frame_size(Some(1 << 30));
        let (ws, _) = tungstenite::client::client_with_config(
            format!("ws://127.0.0.1:{port}{path}"),
            stream,
            Some(config),
        )
        .map_err(|e| err(format!("WebSocket handshake: {e}")))?;
        Ok(Inspector { pid, port, ws: Some(ws), next_id: 1, opened_by_us, opened_at: Instant::now(), path })
    }

    /// One CDP call: its `result`. Events that arrive meanwhile are dropped.
    pub fn call(&mut self, method: &str, params: Value) -> Result<Value, InspectorError> {
        self.call_with_events(method, params, |_, _| {})
    }

    /// One CDP call: its `result`; events that arrive before it go to `on_event` (method,
    /// params), as `takeHeapSnapshot`'s chunks do.
    pub fn call_with_events(
        &mut self,
        method: &str,
        params: Value,
        mut on_event: impl FnMut(&str, &Value),
    ) -> Result<Value, InspectorError> {
        let transport = |why: String| InspectorError::Transport { method: method.to_string(), why };
        let ws = self.ws.as_mut().ok_or_else(|| transport("the session is closed".into()))?;
        let id = self.next_id;
        self.next_id += 1;
        let msg = json!({"id": id, "method": method, "params": params}).to_string();
        ws.send(Message::text(msg)).map_err(|e| transport(e.to_string()))?;
        loop {
            let text = match ws.read().map_err(|e| transport(e.to_string()))? {
                Message::Text(t) => t,
                Message::Close(_) => return Err(transport("the inspector closed the session".into())),
                _ => continue,
            };
            let v: Value = serde_json::from_str(text.as_str()).map_err(|e| transport(e.to_string()))?;
            if let Some(event) = v["method"].as_str() {
                on_event(event, &v["params"]);
                continue;
            }
            if v["id"].as_u64() != Some(id) {
                continue;
            }
            if let Some(e) = v.get("error") {
                return Err(InspectorError::Protocol { method: method.to_string(), error: e.to_string() });
            }
            return Ok(v["result"].clone());
        }
    }

    /// How long it has been open (since our `SIGUSR1`, or since we connected to theirs).
    pub fn open_for(&self) -> Duration {
        self.opened_at.elapsed()
    }

    /// Ends the session; closes the inspector if leakprobe opened it, and checks it is gone.
    /// Returns how long it was open.
    pub fn close(&mut self) -> Result<Duration, InspectorError> {
        let Some(mut ws) = self.ws.take() else { return Ok(self.open_for()) };
        let open_for = self.open_for();
        if !self.opened_by_us {
            let _ = ws.close(None);
            let _ = ws.flush();
            return Ok(open_for);
        }
        close_inspector(&mut ws, self.pid, self.port)?;
        Ok(open_for)
    }
}

impl Drop for Inspector {
    fn drop(&mut self) {
        if let Err(e) = self.close() {
            tracing::warn!("closing the inspector: {e}");
        }
    }
}

/// Has the target close its inspector (`process._debugEnd()`, through the session), then
/// waits until nothing of the target's listens on `port`.
fn close_inspector(ws: &mut WebSocket<TcpStream>, pid: i32, port: u16) -> Result<(), InspectorError> {
    let transport = |why: String| InspectorError::Transport { method: "closing".into(), why };
    let msg = json!({"id": 0, "method": "Runtime.evaluate", "params": {"expression": "process._debugEnd()"}});
    ws.send(Message::text(msg.to_string())).map_err(|e| transport(e.to_string()))?;
    // The server drops the connection as it stops.
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        match ws.read() {
            Ok(Message::Close(_)) | Err(_) => break,
            Ok(_) => {}
        }
    }
    while Instant::now() < deadline {
        if !target_listens(pid, port).unwrap_or(false) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(transport(format!("PID {pid} still listens on port {port} 5 s after process._debugEnd()")))
}

/// The guard's part: connects to the inspector leakprobe opened and closes it (leakprobe was
/// killed). Only while the target still listens on `port` with a session at `path`.
pub fn guard_close(pid: i32, port: u16, path: &str) -> Result<(), InspectorError> {
    let mut i = Inspector::connect_session(pid, port, path.to_string(), true)?;
    let mut ws = i.ws.take().ok_or(InspectorError::Connect { port, why: "no session".into() })?;
    close_inspector(&mut ws, pid, port)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inspector_options_from_node_flags() {
        let o = InspectOptions::parse(["--disable-sigusr1", "--max-old-space-size=512"]);
        assert!(o.sigusr1_disabled && o.port.is_none());
        assert_eq!(InspectOptions::parse(["--inspect-port=9333"]).port, Some(9333));
        assert_eq!(InspectOptions::parse(["--inspect-port", "9334"]).port, Some(9334));
        let o = InspectOptions::parse(["--inspect=0.0.0.0:9335"]);
        assert_eq!((o.port, o.inspect_flag), (Some(9335), true));
        let o = InspectOptions::parse(["--inspect"]);
        assert_eq!((o.port, o.inspect_flag), (None, true));
        assert_eq!(InspectOptions::parse(["--inspect-brk=9336"]).port, Some(9336));
    }

    #[test]
    fn listening_sockets_from_proc_net_tcp() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:2405 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0000000000000000 100 0 0 10 0
   1: 0100007F:A2B4 0100007F:2405 01 00000000:00000000 00:00000000 00000000     0        0 4343 1 0000000000000000 20 4 30 10 -1
";
        assert_eq!(listening(table), vec![(9221, 4242)]);
    }
}
