//! Our code page in the target: injected system calls run from here, and the code after
//! each `syscall` restores the thread's saved context by itself.
//!
//! If leakprobe dies while a thread is mid-sequence, the kernel detaches it and it runs on
//! from wherever it stopped: at an entry (it makes the loaded call, then restores) or just after
//! a `syscall` (it restores). Either way it returns to where it was with every general register
//! and rflags as saved, like a signal handler that returned. The restore writes one word (rflags,
//! for `popfq`) below the red zone, where a signal frame would go anyway.
//!
//! A clone's child takes the `exit_group` path: a detached snapshot child exits at once rather
//! than run the target's code as a second copy.
//!
//! The page is mapped `PROT_READ|PROT_EXEC` and written through `/proc/PID/mem` (FOLL_FORCE).
//! Two system calls stay exposed: the first `mmap` (it runs from libc's `syscall`, before the
//! page exists) and the final `munmap` (it returns into the page it removed); about 40 µs each
//! here. A leakprobe killed mid-sequence leaves the page behind (4 KiB, never run again).

use super::sys::Regs;

pub const PAGE_SIZE: usize = 4096;
/// `syscall`, then the restore.
pub const ENTRY_SYSCALL: usize = 0x000;
/// `syscall`; the child (rax 0) exits, the parent restores.
pub const ENTRY_CLONE: usize = 0x100;
/// Saved context: 18 words, see [`CTX_SLOTS`].
pub const CONTEXT: usize = 0x800;
/// Free for arguments (a memfd's name...).
pub const SCRATCH: usize = 0xc00;
pub const SCRATCH_LEN: usize = PAGE_SIZE - SCRATCH;

/// Context slots in order; the restore reads them by these indices.
pub const CTX_SLOTS: [&str; 18] = [
    "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
    "rsp", "rflags", "rip",
];
const SLOT_RSP: usize = 15;
const SLOT_RFLAGS: usize = 16;
const SLOT_RIP: usize = 17;
/// Register numbers (ModRM encoding) of slots 0..15.
const SLOT_REG: [u8; 15] = [0, 3, 1, 2, 6, 7, 5, 8, 9, 10, 11, 12, 13, 14, 15];

const RED_ZONE: u8 = 128;
const SYS_RESTART_SYSCALL: u64 = 219;
const SYS_EXIT_GROUP: u32 = 231;

fn slot(i: usize) -> usize {
    CONTEXT + 8 * i
}

/// Appends an instruction ending in a rip-relative disp32 aimed at `target` (page offsets).
fn rip_rel(code: &mut Vec<u8>, base: usize, opcode: &[u8], target: usize) {
    code.extend_from_slice(opcode);
    let next = base + code.len() + 4;
    code.extend_from_slice(&((target as i64 - next as i64) as i32).to_le_bytes());
}

/// The restore sequence, placed at page offset `base`.
fn restore_code(base: usize) -> Vec<u8> {
    let mut c = Vec::new();
    rip_rel(&mut c, base, &[0x48, 0x8b, 0x25], slot(SLOT_RSP)); // mov rsp, [rip+rsp]
    c.extend_from_slice(&[0x48, 0x8d, 0x64, 0x24, RED_ZONE.wrapping_neg()]); // lea rsp, [rsp-128]
    rip_rel(&mut c, base, &[0xff, 0x35], slot(SLOT_RFLAGS)); // push qword [rip+rflags]
    c.push(0x9d); // popfq
    for (i, &reg) in SLOT_REG.iter().enumerate() {
        let rex = if reg >= 8 { 0x4c } else { 0x48 };
        rip_rel(&mut c, base, &[rex, 0x8b, 0x05 | ((reg & 7) << 3)], slot(i)); // mov reg, [rip+slot]
    }
    c.extend_from_slice(&[0x48, 0x8d, 0xa4, 0x24, RED_ZONE, 0, 0, 0]); // lea rsp, [rsp+128]
    rip_rel(&mut c, base, &[0xff, 0x25], slot(SLOT_RIP)); // jmp [rip+rip]
    c
}

/// The page's code (context and scratch zeroed).
pub fn page_code() -> Vec<u8> {
    let mut page = vec![0xccu8; CONTEXT]; // int3 between the pieces
    let restore_at = ENTRY_SYSCALL + 2;
    page[ENTRY_SYSCALL..restore_at].copy_from_slice(&[0x0f, 0x05]);
    let restore = restore_code(restore_at);
    page[restore_at..restore_at + restore.len()].copy_from_slice(&restore);

    let mut clone = vec![0x0f, 0x05, 0x48, 0x85, 0xc0]; // syscall; test rax, rax
    clone.extend_from_slice(&[0x0f, 0x85]); // jnz restore
    let next = ENTRY_CLONE + clone.len() + 4;
    clone.extend_from_slice(&((restore_at as i64 - next as i64) as i32).to_le_bytes());
    clone.push(0xb8); // mov eax, exit_group
    clone.extend_from_slice(&SYS_EXIT_GROUP.to_le_bytes());
    clone.extend_from_slice(&[0x31, 0xff, 0x0f, 0x05, 0x0f, 0x0b]); // xor edi, edi; syscall; ud2
    page[ENTRY_CLONE..ENTRY_CLONE + clone.len()].copy_from_slice(&clone);
    page.resize(PAGE_SIZE, 0);
    page
}

/// Where a thread must go if it is let go without us: the saved registers, with a system
/// call the stop interrupted set up to restart, as the kernel would on resume (no handler
/// runs, so every -ERESTART* restarts). Our own calls use no restart block, so
/// `restart_syscall` still finds the interrupted sleep's.
pub fn resume_context(r: &Regs) -> Regs {
    let mut c = *r;
    if (r.orig_rax as i64) >= 0 {
        match r.rax as i64 {
            -514..=-512 => {
                c.rax = r.orig_rax;
                c.rip = r.rip.wrapping_sub(2);
            }
            -516 => {
                c.rax = SYS_RESTART_SYSCALL;
                c.rip = r.rip.wrapping_sub(2);
            }
            _ => {}
        }
    }
    c
}

/// The context slots' bytes for `r` (already passed through [`resume_context`]).
pub fn context_bytes(r: &Regs) -> Vec<u8> {
    let words = [
        r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp, r.r8, r.r9, r.r10, r.r11, r.r12, r.r13, r.r14,
        r.r15, r.rsp, r.eflags, r.rip,
    ];
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use iced_x86::{Decoder, DecoderOptions, Instruction, Mnemonic, OpKind, Register};

    use super::*;

    const BASE: u64 = 0x7f00_0000_0000;

    fn decode(code: &[u8], at: usize, count: usize) -> Vec<Instruction> {
        let mut d = Decoder::with_ip(64, &code[at..], BASE + at as u64, DecoderOptions::NONE);
        (0..count).map(|_| d.decode()).collect()
    }

    fn slot_addr(i: usize) -> u64 {
        BASE + slot(i) as u64
    }

    #[test]
    fn restore_reads_every_slot_and_jumps_back() {
        let page = page_code();
        let ins = decode(&page, ENTRY_SYSCALL, 22);
        assert_eq!(ins[0].mnemonic(), Mnemonic::Syscall);
        assert_eq!((ins[1].mnemonic(), ins[1].op0_register()), (Mnemonic::Mov, Register::RSP));
        assert_eq!(ins[1].memory_displacement64(), slot_addr(SLOT_RSP));
        assert_eq!((ins[2].mnemonic(), ins[2].memory_displacement64()), (Mnemonic::Lea, (-128i64) as u64));
        assert_eq!(
            (ins[3].mnemonic(), ins[3].memory_displacement64()),
            (Mnemonic::Push, slot_addr(SLOT_RFLAGS))
        );
        assert_eq!(ins[4].mnemonic(), Mnemonic::Popfq);
        let want = [
            Register::RAX,
            Register::RBX,
            Register::RCX,
            Register::RDX,
            Register::RSI,
            Register::RDI,
            Register::RBP,
            Register::R8,
            Register::R9,
            Register::R10,
            Register::R11,
            Register::R12,
            Register::R13,
            Register::R14,
            Register::R15,
        ];
        for (i, reg) in want.iter().enumerate() {
            let mov = &ins[5 + i];
            assert_eq!((mov.mnemonic(), mov.op0_register()), (Mnemonic::Mov, *reg), "slot {i}");
            assert!(mov.is_ip_rel_memory_operand());
            assert_eq!(mov.memory_displacement64(), slot_addr(i), "{}", CTX_SLOTS[i]);
        }
        // lea leaves the restored flags alone; the jump reads the saved rip.
        assert_eq!((ins[20].mnemonic(), ins[20].memory_displacement64()), (Mnemonic::Lea, 128));
        assert_eq!(ins[21].mnemonic(), Mnemonic::Jmp);
        assert_eq!(
            (ins[21].op0_kind(), ins[21].memory_displacement64()),
            (OpKind::Memory, slot_addr(SLOT_RIP))
        );
        assert!(ins[21].next_ip() < BASE + ENTRY_CLONE as u64);
    }

    #[test]
    fn clone_child_exits_parent_restores() {
        let page = page_code();
        let ins = decode(&page, ENTRY_CLONE, 7);
        let m: Vec<_> = ins.iter().map(|i| i.mnemonic()).collect();
        assert_eq!(
            m,
            [
                Mnemonic::Syscall,
                Mnemonic::Test,
                Mnemonic::Jne,
                Mnemonic::Mov,
                Mnemonic::Xor,
                Mnemonic::Syscall,
                Mnemonic::Ud2
            ]
        );
        assert_eq!(ins[2].near_branch_target(), BASE + ENTRY_SYSCALL as u64 + 2);
        assert_eq!(ins[3].immediate32(), SYS_EXIT_GROUP);
        assert!(ins[6].next_ip() <= BASE + CONTEXT as u64);
    }

    fn regs() -> Regs {
        // SAFETY: plain integers.
        let mut r: Regs = unsafe { std::mem::zeroed() };
        r.rip = 0x1002;
        r.orig_rax = 230;
        r.rax = (-516i64) as u64;
        r
    }

    #[test]
    fn interrupted_sleep_restarts_through_restart_syscall() {
        let c = resume_context(&regs());
        assert_eq!((c.rip, c.rax), (0x1000, SYS_RESTART_SYSCALL));
        let mut r = regs();
        r.rax = (-512i64) as u64;
        let c = resume_context(&r);
        assert_eq!((c.rip, c.rax), (0x1000, 230));
        r.rax = (-4i64) as u64; // EINTR: returned as is
        assert_eq!(resume_context(&r).rip, 0x1002);
        r.orig_rax = u64::MAX; // not in a system call
        r.rax = (-516i64) as u64;
        assert_eq!(resume_context(&r).rip, 0x1002);
    }

    #[test]
    fn context_layout_matches_slots() {
        let mut r = regs();
        r.rbx = 0xb;
        r.r15 = 0xf15;
        r.rsp = 0x5;
        r.eflags = 0x246;
        let b = context_bytes(&r);
        assert_eq!(b.len(), 8 * CTX_SLOTS.len());
        let word = |i: usize| u64::from_le_bytes(b[8 * i..8 * i + 8].try_into().unwrap());
        assert_eq!(
            (word(1), word(14), word(SLOT_RSP), word(SLOT_RFLAGS), word(SLOT_RIP)),
            (0xb, 0xf15, 5, 0x246, 0x1002)
        );
        assert!(CONTEXT + b.len() <= SCRATCH);
    }
}
