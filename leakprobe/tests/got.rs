//! GOT planning against a live target (`tests/targets/got_target.c`): every slot the plan
//! lists holds, in the running process, the very function the loader bound, found here
//! independently from /proc/PID/maps and the defining file's symbol table; lazy slots are
//! resolved to where the loader binds them once called; ld.so is never planned.
//! Privileged (reads /proc/PID/mem): run as root, one at a time.

mod common;

use std::{os::unix::fs::FileExt as _, path::Path};

use common::*;
use leakprobe::{
    inprocess::got::{self, PatchPlan, RelocType, Slot, SlotKind, SlotState},
    target::elf,
};

const SRC: &str = "got_target.c";

fn build(name: &str, link: &'static str) -> std::path::PathBuf {
    build_target(SRC, name, "gcc", &["-O2", "-fomit-frame-pointer", link])
}

/// Reads target words the way the ptrace layer will: through /proc/PID/mem.
fn mem_reader(pid: i32) -> impl FnMut(u64) -> Option<u64> {
    let mem = std::fs::File::open(format!("/proc/{pid}/mem")).expect("open /proc/PID/mem (root)");
    move |addr| {
        let mut b = [0u8; 8];
        mem.read_exact_at(&mut b, addr).ok()?;
        Some(u64::from_le_bytes(b))
    }
}

/// Where `name` lives in the target: the libc mapping (from /proc/PID/maps, parsed here by
/// hand) that covers the symbol's file offset in libc's own symbol table.
fn libc_function(pid: i32, name: &str) -> u64 {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let lines: Vec<Vec<&str>> = maps
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|f| f.len() >= 6 && f[5].ends_with("/libc.so.6"))
        .collect();
    assert!(!lines.is_empty(), "target maps libc.so.6:\n{maps}");
    let path = format!("/proc/{pid}/root{}", lines[0][5]);
    let (syms, _) = elf::functions(Path::new(&path), &[name]).unwrap();
    let off = syms.get(name).unwrap_or_else(|| panic!("libc defines {name}")).offset;
    for f in &lines {
        let (s, e) = f[0].split_once('-').unwrap();
        let (start, end) = (u64::from_str_radix(s, 16).unwrap(), u64::from_str_radix(e, 16).unwrap());
        let file_off = u64::from_str_radix(f[2], 16).unwrap();
        if file_off <= off && off < file_off + (end - start) {
            return start + (off - file_off);
        }
    }
    panic!("no libc mapping covers {name} at file offset {off:#x}");
}

fn show(plan: &PatchPlan) -> String {
    let mut s = plan.to_string();
    for sl in &plan.slots {
        s += &format!(
            "  {} {:#x} {} {} {:?} relro={} {:x?}\n",
            sl.module.display(),
            sl.address,
            sl.function,
            sl.reloc,
            sl.kind,
            sl.in_relro,
            sl.state
        );
    }
    s
}

fn in_exe<'a>(plan: &'a PatchPlan, exe: &str, function: &str, kind: SlotKind) -> &'a Slot {
    let found: Vec<&Slot> = plan
        .slots
        .iter()
        .filter(|s| s.module.ends_with(exe) && s.function == function && s.kind == kind)
        .collect();
    assert_eq!(found.len(), 1, "{exe} {function} {kind:?}:\n{}", show(plan));
    found[0]
}

/// What holds for every plan of this program: every slot forwards to libc's definition (the
/// only allocator mapped), bound slots hold it right now, ld.so is skipped and never listed,
/// libc's own malloc/free are GLOB_DAT in RELRO, and restoring writes back what is there.
fn check_common(pid: i32, plan: &PatchPlan) {
    let text = show(plan);
    eprintln!("{text}");
    for s in &plan.slots {
        assert!(!s.module.to_string_lossy().contains("ld-linux"), "ld.so slot listed:\n{text}");
        let want = libc_function(pid, s.function);
        match s.state {
            SlotState::Bound { value } => assert_eq!(value, want, "{s:x?}"),
            SlotState::Lazy { resolved, .. } => assert_eq!(resolved, want, "{s:x?}"),
            _ => panic!("unresolved slot: {s:?}"),
        }
    }
    assert!(
        plan.skipped
            .iter()
            .any(|(p, why)| p.to_string_lossy().contains("ld-linux") && why.contains("__rtld_malloc")),
        "ld.so skipped with its reason:\n{text}"
    );
    for f in ["malloc", "free"] {
        let s = in_exe(plan, "libc.so.6", f, SlotKind::Got);
        assert_eq!((s.reloc, s.in_relro), (RelocType::GlobDat, true), "libc {f}");
        assert!(matches!(s.state, SlotState::Bound { .. }), "libc calls {f} at start: {s:?}");
    }
    for f in ["realloc", "calloc"] {
        let s = in_exe(plan, "libc.so.6", f, SlotKind::Got);
        assert_eq!((s.reloc, s.in_relro), (RelocType::JumpSlot, false), "libc {f}");
    }
    let mut read = mem_reader(pid);
    for (addr, value) in plan.restore_values() {
        assert_eq!(read(addr), Some(value), "restore value at {addr:#x} is what the slot holds");
    }
    assert_eq!(plan.restore_values().len(), plan.slots.len());
}

#[test]
fn lazy_program_slots_bind_where_the_plan_says() {
    require_root();
    let exe = build("got_lazy", "-Wl,-z,lazy");
    let mut t = Target::spawn(&exe);
    let pid = t.pid();

    let before = got::plan_pid(pid, mem_reader(pid)).unwrap();
    check_common(pid, &before);
    // Called at start: bound. Not called yet: still at their PLT entry, lazy.
    for f in ["malloc", "free"] {
        let s = in_exe(&before, "got_lazy", f, SlotKind::Got);
        assert_eq!((s.reloc, s.in_relro), (RelocType::JumpSlot, false));
        assert!(matches!(s.state, SlotState::Bound { .. }), "{f}: {s:?}");
    }
    let mut lazy = Vec::new();
    for f in ["calloc", "posix_memalign"] {
        let s = in_exe(&before, "got_lazy", f, SlotKind::Got);
        let SlotState::Lazy { plt_value, resolved } = s.state else { panic!("{f} not lazy: {s:?}") };
        assert!(
            plt_value > s.address.saturating_sub(1 << 20) && plt_value < s.address,
            "{f}: a lazy slot points back into its own module's PLT: {s:x?}"
        );
        lazy.push((s.address, resolved));
    }
    let table = in_exe(&before, "got_lazy", "free", SlotKind::DataPointer);
    assert_eq!(table.reloc, RelocType::Abs64);
    assert!(matches!(table.state, SlotState::Bound { .. }), "{table:?}");

    // Now the loader binds them: exactly where the plan resolved them.
    t.send("call");
    t.expect("done");
    let after = got::plan_pid(pid, mem_reader(pid)).unwrap();
    check_common(pid, &after);
    for (addr, resolved) in lazy {
        let s = after.slots.iter().find(|s| s.address == addr).unwrap();
        assert_eq!(s.state, SlotState::Bound { value: resolved }, "{s:x?}");
    }
    t.send("exit");
}

#[test]
fn bind_now_program_slots_are_bound_and_read_only() {
    require_root();
    let exe = build("got_now", "-Wl,-z,now");
    let t = Target::spawn(&exe);
    let pid = t.pid();
    let plan = got::plan_pid(pid, mem_reader(pid)).unwrap();
    check_common(pid, &plan);
    for f in ["malloc", "free", "calloc", "posix_memalign"] {
        let s = in_exe(&plan, "got_now", f, SlotKind::Got);
        assert_eq!((s.reloc, s.in_relro), (RelocType::JumpSlot, true), "{f}");
        assert!(matches!(s.state, SlotState::Bound { .. }), "{f}: {s:?}");
    }
    let exe_summary = plan.summary().into_iter().find(|m| m.module.ends_with("got_now")).unwrap();
    assert_eq!(
        exe_summary.to_string(),
        "got_now: 5 slots (malloc 1, free 2, calloc 1, posix_memalign 1), 4 in RELRO, 1 data pointers"
    );
}
