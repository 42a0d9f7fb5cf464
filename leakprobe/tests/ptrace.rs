//! The ptrace layer on a live multi-threaded target built without frame pointers: stop the
//! world, remote system calls, registers untouched, signals and group stops kept, and a
//! tracer SIGKILLed mid-sequence leaving the target running correctly. Privileged: run as
//! root, one at a time.

mod common;

use std::{
    collections::BTreeSet,
    io::{BufRead as _, BufReader, Write as _},
    os::unix::fs::FileExt as _,
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::*;
use leakprobe::ptrace::{Mem, PtraceError, RemoteSyscalls, StopKind, StopOptions, StoppedWorld};
use nix::sys::ptrace::Options;

fn target_bin() -> PathBuf {
    build_target(
        "ptrace_target.c",
        "ptrace_target",
        "gcc",
        &["-O2", "-g", "-fomit-frame-pointer", "-pthread"],
    )
}

/// A target with `n` worker threads, all started and past their first round.
fn spawn(n: usize) -> Target {
    let mut t = Target::spawn_with_args(&target_bin(), &[&n.to_string()]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while tasks(t.pid()).len() < n + 1 {
        assert!(Instant::now() < deadline, "target never started {n} threads");
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(120));
    let c = count(&mut t);
    assert!(c.errors == 0, "target reports errors before the test: {c:?}");
    t
}

#[derive(Debug, Clone, Copy)]
struct Count {
    spins: u64,
    sleeps: u64,
    errors: u64,
    usr1: u64,
}

fn count(t: &mut Target) -> Count {
    t.send("count");
    loop {
        let line = t.read_line();
        let f: Vec<u64> = line.split_whitespace().skip(1).filter_map(|w| w.parse().ok()).collect();
        if line.starts_with("count ") && f.len() == 4 {
            return Count { spins: f[0], sleeps: f[1], errors: f[2], usr1: f[3] };
        }
    }
}

fn tasks(pid: i32) -> BTreeSet<i32> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect())
        .unwrap_or_default()
}

fn task_state(pid: i32, tid: i32) -> char {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).unwrap_or_default();
    stat.rfind(')')
        .and_then(|i| stat[i + 1..].split_whitespace().next())
        .and_then(|s| s.chars().next())
        .unwrap_or('?')
}

fn tracer_of(pid: i32, tid: i32) -> i32 {
    let st = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).unwrap_or_default();
    leakprobe::ptrace::parse_status(&st).tracer_pid
}

fn maps(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap()
}

fn map_line(pid: i32, addr: u64) -> Option<String> {
    maps(pid).lines().find(|l| l.starts_with(&format!("{addr:x}-"))).map(str::to_string)
}

fn regs_bytes(r: &libc::user_regs_struct) -> Vec<u8> {
    // SAFETY: plain u64 fields.
    unsafe {
        std::slice::from_raw_parts((r as *const libc::user_regs_struct).cast::<u8>(), size_of_val(r)).to_vec()
    }
}

/// A thread's tid, GETREGS bytes, NT_PRSTATUS bytes and NT_X86_XSTATE bytes.
type ThreadRegs = (i32, Vec<u8>, Vec<u8>, Vec<u8>);

/// Every general register, the NT_PRSTATUS set and the vector registers of every thread.
fn snapshot(w: &StoppedWorld) -> Vec<ThreadRegs> {
    w.threads()
        .iter()
        .map(|t| (t.tid(), regs_bytes(&t.read_regs().unwrap()), t.prstatus().unwrap(), t.xstate().unwrap()))
        .collect()
}

/// The target keeps going: spinners and sleepers advance, nobody saw an error; then it
/// exits 0 when told.
fn assert_healthy(t: &mut Target, before: Count) -> Count {
    std::thread::sleep(Duration::from_millis(150));
    let after = count(t);
    assert_eq!(after.errors, 0, "the target saw errors: {after:?}");
    assert!(after.spins > before.spins, "spinners stalled: {before:?} -> {after:?}");
    assert!(after.sleeps > before.sleeps, "sleepers stalled: {before:?} -> {after:?}");
    after
}

fn assert_exits_0(mut t: Target) {
    t.send("exit");
    let status = t.child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "target exit status {status:?}");
}

fn opts(max_pause: Duration) -> StopOptions {
    StopOptions { max_pause, ..StopOptions::default() }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[test]
fn stops_every_thread_and_resumes_4_and_64() {
    require_root();
    for n in [4usize, 64] {
        let mut t = spawn(n);
        let pid = t.pid();
        let before = count(&mut t);
        let (mut latencies, mut pauses) = (Vec::new(), Vec::new());
        for _ in 0..10 {
            let w = StoppedWorld::stop(pid, opts(Duration::from_secs(2))).unwrap();
            let stopped: BTreeSet<i32> = w.tids().into_iter().collect();
            assert_eq!(stopped, tasks(pid), "every thread is stopped, and only those");
            for &tid in &stopped {
                assert_eq!(task_state(pid, tid), 't', "thread {tid} in tracing stop");
                assert_eq!(tracer_of(pid, tid), nix::unistd::gettid().as_raw(), "traced by this thread");
            }
            assert!(w.threads().iter().all(|th| th.stop() == StopKind::Interrupt), "all interrupt stops");
            latencies.push(w.stop_latency());
            if std::env::var("PTRACE_DEBUG").is_ok() {
                let mut v: Vec<_> = w
                    .threads()
                    .iter()
                    .map(|t| (t.stopped_after(), t.tid(), t.regs().orig_rax as i64))
                    .collect();
                v.sort();
                println!("{v:?}");
            }
            pauses.push(w.resume());
            for &tid in &stopped {
                assert_eq!(tracer_of(pid, tid), 0, "thread {tid} detached");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        println!(
            "stop the world, {n} threads (+main): stop latency median {:?} max {:?}; whole pause (stop+GETREGS+detach) median {:?} max {:?}",
            median(latencies.clone()),
            latencies.iter().max().unwrap(),
            median(pauses.clone()),
            pauses.iter().max().unwrap()
        );
        assert_healthy(&mut t, before);
        assert_exits_0(t);
    }
}

/// Finds a thread blocked in clock_nanosleep (orig_rax 230, rax -ERESTART_RESTARTBLOCK).
fn stop_with_sleeper(pid: i32, max_pause: Duration) -> (StoppedWorld, i32) {
    for _ in 0..50 {
        let w = StoppedWorld::stop(pid, opts(max_pause)).unwrap();
        let sleeper = w.threads().iter().find(|t| t.regs().orig_rax == 230 && t.regs().rax as i64 == -516);
        if let Some(s) = sleeper {
            let tid = s.tid();
            return (w, tid);
        }
        drop(w);
        std::thread::sleep(Duration::from_millis(7));
    }
    panic!("no thread was ever caught inside clock_nanosleep");
}

#[test]
fn remote_syscalls_in_a_sleeping_thread_leave_every_register_alone() {
    require_root();
    let mut t = spawn(4);
    let pid = t.pid();
    let before = count(&mut t);
    let (mut w, sleeper) = stop_with_sleeper(pid, Duration::from_secs(5));
    let regs_before = snapshot(&w);
    let mem = Mem::open(pid).unwrap();
    let (page, cost, window);
    {
        let mut rs = RemoteSyscalls::on_thread(&mut w, sleeper).unwrap();
        page = rs.page().expect("code page mapped");
        let line = map_line(pid, page).expect("code page in maps");
        assert!(line.contains(" r-xp "), "code page is r-x: {line}");

        assert_eq!(rs.getpid().unwrap(), pid, "remote getpid returns the tgid");

        let anon = rs
            .mmap(0, 8192, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0)
            .unwrap();
        assert!(map_line(pid, anon).is_some_and(|l| l.contains(" rw-p ")), "anonymous mapping appears");
        mem.write_all_at(anon + 100, b"hello").unwrap();
        assert_eq!(mem.read_u64(anon + 96).unwrap().to_le_bytes()[4..], *b"hell");
        rs.mprotect(anon, 8192, libc::PROT_READ).unwrap();
        assert!(map_line(pid, anon).is_some_and(|l| l.contains(" r--p ")), "mprotect shows");
        // FOLL_FORCE: our writes pass read-only protection.
        mem.write_all_at(anon, b"forced").unwrap();
        rs.munmap(anon, 8192).unwrap();
        assert!(map_line(pid, anon).is_none(), "munmap'd mapping is gone");

        // A memfd written from our side through /proc/PID/fd, then mapped r-x.
        let fd = rs.memfd_create("leakprobe-test", libc::MFD_CLOEXEC).unwrap();
        let path = format!("/proc/{pid}/fd/{fd}");
        let file = std::fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
        let mut code = vec![0u8; 4096];
        code[..6].copy_from_slice(&[0xb8, 42, 0, 0, 0, 0xc3]); // mov eax, 42; ret
        file.write_all_at(&code, 0).unwrap();
        let exec = rs.mmap(0, 4096, libc::PROT_READ | libc::PROT_EXEC, libc::MAP_SHARED, fd, 0).unwrap();
        let line = map_line(pid, exec).expect("memfd mapping");
        assert!(line.contains(" r-xs ") && line.contains("memfd:leakprobe-test"), "memfd mapped r-x: {line}");
        let mut back = vec![0u8; 6];
        mem.read_exact_at(exec, &mut back).unwrap();
        assert_eq!(back, code[..6]);
        rs.munmap(exec, 4096).unwrap();
        rs.close(fd).unwrap();
        assert!(std::fs::metadata(&path).is_err(), "remote close closed the fd");
        assert!(matches!(rs.close(fd), Err(PtraceError::Syscall { source: nix::errno::Errno::EBADF, .. })));

        // Cost per call, measured on getpid.
        let (calls0, busy0) = rs.stats();
        let t0 = Instant::now();
        for _ in 0..2000 {
            assert_eq!(rs.getpid().unwrap(), pid);
        }
        let (calls1, busy1) = rs.stats();
        cost = (t0.elapsed() / 2000, (busy1 - busy0) / (calls1 - calls0) as u32);
        window = rs.world().exposed_window();
    }
    assert!(map_line(pid, page).is_none(), "code page unmapped at the end");
    let regs_after = snapshot(&w);
    for (a, b) in regs_before.iter().zip(&regs_after) {
        assert_eq!(a.0, b.0);
        assert!(a.1 == b.1, "thread {}: general registers changed", a.0);
        assert!(a.2 == b.2, "thread {}: NT_PRSTATUS changed", a.0);
        assert!(a.3 == b.3, "thread {}: xstate changed ({} bytes)", a.0, a.3.len());
    }
    let after_regs = w.thread(sleeper).unwrap().regs();
    assert_eq!((after_regs.orig_rax, after_regs.rax as i64), (230, -516));
    let exposed = w.exposed_window();
    let pause = w.resume();
    println!(
        "remote getpid: {:?} per call wall, {:?} inside the layer; exposed window (first mmap + final munmap): {:?} (at page open: {:?}); whole pause {:?}",
        cost.0, cost.1, exposed, window, pause
    );

    // Plain mode, for comparison.
    let mut w = StoppedWorld::stop(pid, opts(Duration::from_secs(5))).unwrap();
    let tid = w.tids()[0];
    let mut rs = RemoteSyscalls::plain(&mut w, tid).unwrap();
    let t0 = Instant::now();
    for _ in 0..2000 {
        assert_eq!(rs.getpid().unwrap(), pid);
    }
    println!("remote getpid without the code page: {:?} per call", t0.elapsed() / 2000);
    assert!(matches!(rs.clone(0, 0, 0, 0, 0), Err(PtraceError::NeedsCodePage { .. })));
    drop(rs);
    drop(w);

    // The sleeper slept on (restarted through restart_syscall), never early, never failing.
    assert_healthy(&mut t, before);
    assert_exits_0(t);
}

#[test]
fn pause_bound_resumes_the_target() {
    require_root();
    let mut t = spawn(4);
    let pid = t.pid();
    let before = count(&mut t);
    let max = Duration::from_millis(40);
    let mut w = StoppedWorld::stop(pid, opts(max)).unwrap();
    let regs_before = snapshot(&w);
    let err = {
        let mut rs = RemoteSyscalls::new(&mut w).unwrap();
        loop {
            if let Err(e) = rs.getpid() {
                break e;
            }
        }
    };
    assert!(matches!(err, PtraceError::PauseExceeded { .. }), "{err}");
    assert!(w.is_resumed(), "resumed as soon as the bound was hit");
    let pause = w.pause().unwrap();
    assert!(pause < max + Duration::from_millis(20), "pause {pause:?} overshot {max:?}");
    println!("pause bound {max:?}: stopped {pause:?}; {err}");
    drop(w);
    // Registers were put back before the resume: the threads run on correctly.
    assert_eq!(regs_before.len(), 5);
    assert_healthy(&mut t, before);
    assert_exits_0(t);
}

#[test]
fn signal_arriving_during_injection_is_held_and_reinjected() {
    require_root();
    let mut t = spawn(4);
    let pid = t.pid();
    let before = count(&mut t);
    let mut w = StoppedWorld::stop(pid, opts(Duration::from_secs(2))).unwrap();
    let tid = w.tids().into_iter().find(|&tid| tid != pid).unwrap();
    // Pending on that thread while it is stopped: our first resume of it meets it.
    // SAFETY: plain syscall.
    assert_eq!(unsafe { libc::syscall(libc::SYS_tgkill, pid, tid, libc::SIGUSR1) }, 0);
    {
        let mut rs = RemoteSyscalls::on_thread(&mut w, tid).unwrap();
        assert_eq!(rs.getpid().unwrap(), pid);
    }
    assert_eq!(w.thread(tid).unwrap().held_signals(), [libc::SIGUSR1], "held, not delivered or lost");
    drop(w);
    let after = assert_healthy(&mut t, before);
    assert_eq!(after.usr1, before.usr1 + 1, "re-injected exactly once");
    assert_exits_0(t);
}

#[test]
fn a_stopped_process_stays_stopped() {
    require_root();
    let mut t = spawn(4);
    let pid = t.pid();
    let before = count(&mut t);
    // SAFETY: plain syscall.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let deadline = Instant::now() + Duration::from_secs(5);
    while !tasks(pid).iter().all(|&tid| task_state(pid, tid) == 'T') {
        assert!(Instant::now() < deadline, "SIGSTOP never took");
        std::thread::sleep(Duration::from_millis(5));
    }
    {
        let mut w = StoppedWorld::stop(pid, opts(Duration::from_secs(2))).unwrap();
        assert!(
            w.threads().iter().all(|th| th.stop() == StopKind::GroupStop(libc::SIGSTOP)),
            "group stops seen"
        );
        let mut rs = RemoteSyscalls::new(&mut w).unwrap();
        assert_eq!(rs.getpid().unwrap(), pid);
    }
    std::thread::sleep(Duration::from_millis(100));
    for tid in tasks(pid) {
        assert_eq!(task_state(pid, tid), 'T', "thread {tid} still stopped after we detached");
        assert_eq!(tracer_of(pid, tid), 0);
    }
    // SAFETY: plain syscall.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    assert_healthy(&mut t, before);
    assert_exits_0(t);
}

#[test]
fn clone_snapshot_child_is_ours_then_reaped_by_injected_wait4() {
    require_root();
    let mut t = spawn(4);
    let pid = t.pid();
    let before = count(&mut t);
    let options =
        StopOptions { ptrace_options: Options::PTRACE_O_TRACECLONE, ..opts(Duration::from_secs(2)) };
    let mut w = StoppedWorld::stop(pid, options).unwrap();
    let (rsp, tid) = (w.threads()[0].regs().rsp, w.threads()[0].tid());
    let flags = (libc::CLONE_FILES | libc::CLONE_FS) as u64; // exit signal 0
    let (child, orphan) = {
        let mut rs = RemoteSyscalls::on_thread(&mut w, tid).unwrap();
        let child = rs.clone(flags, 0, 0, 0, 0).unwrap();
        assert_eq!(rs.last_child(), Some(child));
        (child, rs.clone(flags, 0, 0, 0, 0).unwrap())
    };
    // A snapshot child let go (as if leakprobe died) exits at once through the page's
    // exit_group path instead of running the target's code.
    let mut status = 0;
    // SAFETY: plain syscalls.
    unsafe {
        assert_eq!(libc::waitpid(orphan, &mut status, libc::__WALL), orphan);
        assert_eq!(libc::ptrace(libc::PTRACE_DETACH, orphan, 0, 0), 0);
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    while task_state(orphan, orphan) != 'Z' {
        assert!(Instant::now() < deadline, "a detached snapshot child kept running");
        std::thread::sleep(Duration::from_millis(5));
    }
    let stat = std::fs::read_to_string(format!("/proc/{orphan}/stat")).unwrap();
    let exit_code = stat.rsplit(' ').next().unwrap().trim();
    assert_eq!(exit_code, "0", "exit_group(0), not a crash");
    // Its first stop comes before any instruction of its own.
    // SAFETY: plain syscall.
    let r = unsafe { libc::waitpid(child, &mut status, libc::__WALL) };
    assert_eq!(r, child);
    assert!(libc::WIFSTOPPED(status) && status >> 16 == libc::PTRACE_EVENT_STOP, "status {status:#x}");
    // The snapshot holds the parent's memory as it was.
    let (parent_mem, child_mem) = (Mem::open(pid).unwrap(), Mem::open(child).unwrap());
    let (mut a, mut b) = (vec![0u8; 4096], vec![0u8; 4096]);
    parent_mem.read_exact_at(rsp & !4095, &mut a).unwrap();
    child_mem.read_exact_at(rsp & !4095, &mut b).unwrap();
    assert!(a == b, "child's stack page equals the parent's");
    drop(w);
    // The snapshot child outlives the pause; then it is killed and reaped.
    // SAFETY: plain syscalls.
    unsafe {
        libc::kill(child, libc::SIGKILL);
        assert_eq!(libc::waitpid(child, &mut status, libc::__WALL), child);
    }
    std::thread::sleep(Duration::from_millis(20));
    let st = std::fs::read_to_string(format!("/proc/{child}/status")).unwrap();
    assert_eq!(leakprobe::ptrace::parse_status(&st).state, 'Z', "a zombie under the target until reaped");
    let mut w = StoppedWorld::stop(pid, opts(Duration::from_secs(2))).unwrap();
    {
        let mut rs = RemoteSyscalls::new(&mut w).unwrap();
        assert_eq!(rs.wait4(child, libc::__WALL | libc::WNOHANG).unwrap(), child);
        assert_eq!(rs.wait4(orphan, libc::__WALL | libc::WNOHANG).unwrap(), orphan);
        assert!(matches!(rs.wait4(-1, libc::__WALL | libc::WNOHANG), Err(PtraceError::Syscall { .. })));
    }
    drop(w);
    assert!(std::fs::metadata(format!("/proc/{child}")).is_err(), "reaped");
    assert!(std::fs::metadata(format!("/proc/{orphan}")).is_err(), "reaped");
    assert_healthy(&mut t, before);
    assert_exits_0(t);
}

#[test]
fn refuses_targets_it_must_not_stop() {
    require_root();
    let o = || opts(Duration::from_secs(1));
    assert!(matches!(StoppedWorld::stop(999_999_999, o()), Err(PtraceError::NoSuchProcess { .. })));
    assert!(matches!(StoppedWorld::stop(2, o()), Err(PtraceError::KernelThread { .. })), "kthreadd");
    let mut zombie = Command::new("true").spawn().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let e = StoppedWorld::stop(zombie.id() as i32, o()).err().unwrap();
    assert!(matches!(e, PtraceError::Zombie { .. }), "{e}");
    zombie.wait().unwrap();

    // Traced already (by another thread of ours): named, with what to do.
    let t = spawn(4);
    let pid = t.pid();
    let (tx, rx) = std::sync::mpsc::channel();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let holder = std::thread::spawn(move || {
        let _w = StoppedWorld::stop(pid, opts(Duration::from_secs(5))).unwrap();
        tx.send(()).unwrap();
        let _ = done_rx.recv_timeout(Duration::from_secs(4));
    });
    rx.recv().unwrap();
    let e = StoppedWorld::stop(pid, o()).err().unwrap();
    done_tx.send(()).unwrap();
    holder.join().unwrap();
    assert!(matches!(e, PtraceError::AlreadyTraced { .. }), "{e}");
    assert!(
        e.to_string().contains("already traced by PID") && e.to_string().contains("detach that tracer"),
        "{e}"
    );
    assert_exits_0(t);

    // A seccomp filter: refused by default, allowed on request (this one allows everything).
    let mut t = Target::spawn_with_args(&target_bin(), &["4", "seccomp"]);
    let pid = t.pid();
    let before = count(&mut t);
    let e = StoppedWorld::stop(pid, o()).err().unwrap();
    assert!(matches!(e, PtraceError::SeccompFilter { .. }), "{e}");
    println!("refused: {e}");
    let mut allowed = o();
    allowed.checks.allow_seccomp_filter = true;
    let mut w = StoppedWorld::stop(pid, allowed).unwrap();
    assert_eq!(RemoteSyscalls::new(&mut w).unwrap().getpid().unwrap(), pid);
    drop(w);
    assert_healthy(&mut t, before);
    assert_exits_0(t);
}

const INJECT_PID: &str = "LEAKPROBE_PTRACE_INJECT_PID";
const INJECT_FLAG: &str = "LEAKPROBE_PTRACE_INJECT_FLAG";

/// Not a test: the injector process `sigkill_of_the_tracer_*` kills. Loops over sessions of
/// many remote calls; marks the exposed window in a flag file.
#[test]
#[ignore]
fn injector_process() {
    let Ok(pid) = std::env::var(INJECT_PID) else { return };
    let pid: i32 = pid.parse().unwrap();
    let flag = std::fs::OpenOptions::new().write(true).open(std::env::var(INJECT_FLAG).unwrap()).unwrap();
    let mut said = false;
    loop {
        let mut w = StoppedWorld::stop(pid, opts(Duration::from_secs(2))).unwrap();
        let f = flag.try_clone().unwrap();
        w.set_window_observer(move |open| {
            let _ = f.write_all_at(if open { b"1" } else { b"0" }, 0);
        });
        let tids = w.tids();
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
        let tid = tids[nanos as usize / 1000 % tids.len()];
        let mut rs = RemoteSyscalls::on_thread(&mut w, tid).unwrap();
        if !said {
            println!("\ninjector-ready");
            std::io::stdout().flush().unwrap();
            said = true;
        }
        for i in 0..400u64 {
            assert_eq!(rs.getpid().unwrap(), pid);
            let a =
                rs.mmap(0, 4096, libc::PROT_READ, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0).unwrap();
            rs.mprotect(a, 4096, if i % 2 == 0 { libc::PROT_NONE } else { libc::PROT_READ }).unwrap();
            rs.munmap(a, 4096).unwrap();
        }
        drop(rs);
        drop(w);
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn xorshift(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

#[test]
fn sigkill_of_the_tracer_mid_sequence_leaves_the_target_running() {
    require_root();
    let mut t = spawn(6);
    let flag = tempfile::NamedTempFile::new().unwrap();
    let mut seed = (std::process::id() as u64) << 20 | 0x9e37_79b9;
    let (mut in_window, mut leftover_pages) = (0, 0);
    for round in 0..20 {
        let pid = t.pid();
        let before = count(&mut t);
        std::fs::write(flag.path(), b"0").unwrap();
        let mut inj = Command::new(std::env::current_exe().unwrap())
            .args(["--ignored", "--exact", "injector_process", "--nocapture", "--test-threads=1"])
            .env(INJECT_PID, pid.to_string())
            .env(INJECT_FLAG, flag.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut out = BufReader::new(inj.stdout.take().unwrap());
        let mut line = String::new();
        while !line.contains("injector-ready") {
            line.clear();
            assert!(out.read_line(&mut line).unwrap() > 0, "injector ended before starting");
        }
        let delay = Duration::from_micros(500 + xorshift(&mut seed) % 60_000);
        std::thread::sleep(delay);
        inj.kill().unwrap();
        inj.wait().unwrap();
        let window = std::fs::read(flag.path()).unwrap() == b"1";
        std::thread::sleep(Duration::from_millis(50));
        let alive = t.is_running();
        if !alive || !window {
            assert!(
                alive || window,
                "round {round}: target died after a kill at {delay:?}, outside the exposed window"
            );
        }
        if !alive {
            // Killed inside the documented window: note it and go on with a fresh target.
            in_window += 1;
            t = spawn(6);
            continue;
        }
        for tid in tasks(pid) {
            assert_eq!(tracer_of(pid, tid), 0, "round {round}: thread {tid} still traced");
        }
        assert_healthy(&mut t, before);
        leftover_pages = maps(pid).lines().filter(|l| l.contains(" r-xp 00000000 00:00 0")).count();
        if window {
            in_window += 1;
        }
    }
    println!(
        "20 SIGKILLs of the injector: target survived all outside the window; {in_window} landed in the exposed window; {leftover_pages} code pages left behind (expected after kills mid-session)"
    );
    assert_exits_0(t);
}
