//! Where exactly to put a probe inside a function, decided by decoding its first instructions.
//!
//! A uprobe on an instruction the kernel cannot emulate is single-stepped out of line, which
//! cost ~5.5 µs per hit here against ~1.1 µs for an emulated one (shared/DESIGN.md). glibc's
//! `free` starts with `test %rdi,%rdi; je <return>`: `test` is single-stepped. Every non-NULL
//! free then runs the `push` after the `je`, which the kernel emulates, and there the stack
//! pointer and the argument are still those of the entry. So free's probe goes there when the
//! code has exactly that shape, and stays at the entry otherwise.
//!
//! More generally ([`first_emulated`]): many allocators start with a few instructions the
//! kernel would single-step (jemalloc's `malloc` opens with `cmp $0x1000,%rdi; ja`, its `free`
//! with nine `mov`/`shr`/`and`s before a `jne`; tcmalloc's with `mov; test; jne`). When such a
//! prefix is straight-line code that leaves the stack pointer, rbp, memory and the arguments
//! the probe reads untouched, the probe (and the uretprobe, which only needs `[rsp]` to still
//! be the return address) can sit on the first emulated instruction after it: the program
//! sees exactly what it would have seen at the entry. Measured with bench/trap_cost.sh's probe
//! tool on jemalloc: 4266 ns per malloc+free pair with the probe on `cmp`, 951 ns on `ja`.
//! Only branches inside the function's symbol are checked: code outside it (a `.cold`
//! partition) returns into the body past its prologue, not into this straight-line prefix.

use iced_x86::{
    Code, Decoder, DecoderOptions, FlowControl, Instruction, InstructionInfoFactory, Mnemonic, OpAccess,
    OpKind, Register,
};

/// The chosen spot, as an offset from the function's start, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    pub offset: u64,
    pub note: &'static str,
}

const AT_ENTRY: Placement = Placement { offset: 0, note: "at entry" };

fn is_push_reg(i: &Instruction) -> bool {
    i.mnemonic() == Mnemonic::Push && i.op0_kind() == OpKind::Register
}

/// For a function whose first argument is a pointer that may be NULL (free): the first
/// emulated instruction after a leading `test rdi,rdi; je/jz`, if every path through the
/// function's start that has a non-NULL argument reaches it. `code` is the function's bytes
/// and `ip` its address (any base, used only for branch targets).
pub fn after_null_check(code: &[u8], ip: u64) -> Placement {
    let mut decoder = Decoder::with_ip(64, code, ip, DecoderOptions::NONE);
    let mut insns = Vec::new();
    while decoder.can_decode() && insns.len() < 4 {
        let i = decoder.decode();
        if i.is_invalid() {
            return AT_ENTRY;
        }
        insns.push(i);
    }
    let mut k = 0;
    if insns.first().is_some_and(|i| i.code() == Code::Endbr64) {
        k = 1;
    }
    let (Some(test), Some(je), Some(next)) = (insns.get(k), insns.get(k + 1), insns.get(k + 2)) else {
        return AT_ENTRY;
    };
    let tests_rdi = test.mnemonic() == Mnemonic::Test
        && test.op0_kind() == OpKind::Register
        && test.op1_kind() == OpKind::Register
        && test.op0_register() == Register::RDI
        && test.op1_register() == Register::RDI;
    let is_je = je.mnemonic() == Mnemonic::Je && je.flow_control() == FlowControl::ConditionalBranch;
    if !(tests_rdi && is_je && is_push_reg(next)) {
        return AT_ENTRY;
    }
    // No branch in the function may land between the entry and the chosen spot, or a path
    // could skip the probe (or pass it twice).
    let spot = next.ip();
    if branch_lands_in(code, ip, ip + 1..=spot) {
        return AT_ENTRY;
    }
    Placement { offset: spot - ip, note: "after the NULL check (emulated push, not single-stepped)" }
}

/// Arguments a probe reads at entry: the first one (frees), or all six (allocations, whose
/// programs read up to six).
pub const FIRST_ARG: &[Register] = &[Register::RDI];
pub const ALL_ARGS: &[Register] =
    &[Register::RDI, Register::RSI, Register::RDX, Register::RCX, Register::R8, Register::R9];

/// Instructions the x86 kernel emulates for uprobes instead of single-stepping them: push of
/// a register, relative jmp/jcc/call, and nops.
fn emulated(i: &Instruction) -> bool {
    if is_push_reg(i) || i.mnemonic() == Mnemonic::Nop {
        return true;
    }
    let relative = i.op_count() == 1 && matches!(i.op0_kind(), OpKind::NearBranch64 | OpKind::NearBranch32);
    match i.flow_control() {
        FlowControl::UnconditionalBranch | FlowControl::Call => relative,
        FlowControl::ConditionalBranch => {
            relative
                && !matches!(
                    i.mnemonic(),
                    Mnemonic::Loop | Mnemonic::Loope | Mnemonic::Loopne | Mnemonic::Jrcxz | Mnemonic::Jecxz
                )
        }
        _ => false,
    }
}

/// Whether `i` can run before the probe without changing what the probe reads: falls
/// through, writes no memory, and leaves rsp, rbp and `args` (and their sub-registers) alone.
fn skippable(i: &Instruction, info: &mut InstructionInfoFactory, args: &[Register]) -> bool {
    if i.flow_control() != FlowControl::Next || i.has_lock_prefix() {
        return false;
    }
    let info = info.info(i);
    let writes = |a: OpAccess| {
        !matches!(a, OpAccess::Read | OpAccess::CondRead | OpAccess::NoMemAccess | OpAccess::None)
    };
    if info.used_memory().iter().any(|m| writes(m.access())) {
        return false;
    }
    let kept: Vec<Register> =
        [Register::RSP, Register::RBP].iter().chain(args).map(|r| r.full_register()).collect();
    !info.used_registers().iter().any(|r| writes(r.access()) && kept.contains(&r.register().full_register()))
}

/// The first emulated instruction of the function, when the instructions before it can be
/// skipped (see the module doc) and no direct branch in the function lands after the entry
/// and at or before it (a path must neither skip the probe nor pass it twice). `code` is the
/// whole function (its symbol's size) and `ip` its address. At most 16 instructions are
/// looked at; otherwise, or on anything unexpected, the probe stays at the entry.
pub fn first_emulated(code: &[u8], ip: u64, args: &[Register]) -> Placement {
    let mut decoder = Decoder::with_ip(64, code, ip, DecoderOptions::NONE);
    let mut info = InstructionInfoFactory::new();
    let mut spot = None;
    for (k, i) in (&mut decoder).into_iter().take(16).enumerate() {
        if i.is_invalid() {
            return AT_ENTRY;
        }
        if emulated(&i) {
            if k == 0 {
                return AT_ENTRY;
            }
            spot = Some(i.ip());
            break;
        }
        if !(i.code() == Code::Endbr64 || skippable(&i, &mut info, args)) {
            return AT_ENTRY;
        }
    }
    let Some(spot) = spot else { return AT_ENTRY };
    if branch_lands_in(code, ip, ip + 1..=spot) {
        return AT_ENTRY;
    }
    Placement {
        offset: spot - ip,
        note: "past a prefix that changes nothing the probe reads (emulated, not single-stepped)",
    }
}

/// Whether any direct jump, conditional jump or call in `code` targets `range`.
fn branch_lands_in(code: &[u8], ip: u64, range: std::ops::RangeInclusive<u64>) -> bool {
    Decoder::with_ip(64, code, ip, DecoderOptions::NONE).into_iter().take_while(|i| !i.is_invalid()).any(
        |i| {
            matches!(
                i.flow_control(),
                FlowControl::ConditionalBranch | FlowControl::UnconditionalBranch | FlowControl::Call
            ) && i.op0_kind() == OpKind::NearBranch64
                && range.contains(&i.near_branch_target())
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glibc_free_shape() {
        // test %rdi,%rdi; je +0xbf; push %rbp; lea -0x10(%rdi),%rsi
        let code = [0x48, 0x85, 0xff, 0x0f, 0x84, 0xbf, 0x00, 0x00, 0x00, 0x55, 0x48, 0x8d, 0x77, 0xf0];
        assert_eq!(after_null_check(&code, 0x1000).offset, 9);
        // With endbr64 in front.
        let mut cet = vec![0xf3, 0x0f, 0x1e, 0xfa];
        cet.extend_from_slice(&code);
        assert_eq!(after_null_check(&cet, 0x1000).offset, 13);
    }

    #[test]
    fn other_shapes_stay_at_entry() {
        // push %rbp first: already emulated, nothing to gain.
        assert_eq!(after_null_check(&[0x55, 0x48, 0x89, 0xe5], 0).offset, 0);
        // test %rsi,%rsi: not the first argument.
        assert_eq!(after_null_check(&[0x48, 0x85, 0xf6, 0x74, 0x10, 0x55], 0).offset, 0);
        // Followed by mov, which would be single-stepped anyway.
        assert_eq!(after_null_check(&[0x48, 0x85, 0xff, 0x74, 0x10, 0x48, 0x89, 0xf8], 0).offset, 0);
        // A backward jump into the skipped range.
        let code = [0x48, 0x85, 0xff, 0x74, 0x10, 0x55, 0xeb, 0xfb];
        assert_eq!(after_null_check(&code, 0).offset, 0, "jmp to offset 3 lands before the spot");
        assert_eq!(after_null_check(&[], 0).offset, 0);
    }

    #[test]
    fn jemalloc_malloc_and_free_shapes() {
        // cmp $0x1000,%rdi; ja +0x93; lea ...: the ja, 7 bytes in.
        let malloc =
            [0x48, 0x81, 0xff, 0x00, 0x10, 0x00, 0x00, 0x0f, 0x87, 0x93, 0x00, 0x00, 0x00, 0x48, 0x8d];
        assert_eq!(first_emulated(&malloc, 0x1000, ALL_ARGS).offset, 7);
        // mov %rdi,%rax; mov %rdi,%rcx; shr $0x1a,%rax; jne +0x10: free reads only rdi.
        let free = [0x48, 0x89, 0xf8, 0x48, 0x89, 0xf9, 0x48, 0xc1, 0xe8, 0x1a, 0x75, 0x10];
        assert_eq!(first_emulated(&free, 0, FIRST_ARG).offset, 10);
        // The same prefix clobbers rcx, an argument an allocation probe may read.
        assert_eq!(first_emulated(&free, 0, ALL_ARGS).offset, 0);
    }

    #[test]
    fn prefixes_that_change_what_the_probe_reads_stay_at_entry() {
        // push first: already emulated.
        assert_eq!(first_emulated(&[0x41, 0x54, 0x55], 0, ALL_ARGS).offset, 0);
        // sub $8,%rsp; jne: moves the stack pointer.
        assert_eq!(first_emulated(&[0x48, 0x83, 0xec, 0x08, 0x75, 0x10], 0, FIRST_ARG).offset, 0);
        // mov %rsi,%rdi; jne: overwrites the first argument.
        assert_eq!(first_emulated(&[0x48, 0x89, 0xf7, 0x75, 0x10], 0, FIRST_ARG).offset, 0);
        // mov %rax,(%rsp); jne: writes memory (the return address, here).
        assert_eq!(first_emulated(&[0x48, 0x89, 0x04, 0x24, 0x75, 0x10], 0, FIRST_ARG).offset, 0);
        // mov %rdi,%rbp; jne: rbp is the caller's frame pointer.
        assert_eq!(first_emulated(&[0x48, 0x89, 0xfd, 0x75, 0x10], 0, FIRST_ARG).offset, 0);
        // ret before anything emulated.
        assert_eq!(first_emulated(&[0x48, 0x89, 0xf8, 0xc3], 0, FIRST_ARG).offset, 0);
        // A later jump back to the chosen spot would pass the probe twice.
        let code = [0x48, 0x39, 0xf7, 0x75, 0x02, 0x90, 0x90, 0xeb, 0xfa];
        assert_eq!(first_emulated(&code, 0, ALL_ARGS).offset, 0, "jmp to offset 3");
        // Nothing emulated within 16 instructions.
        assert_eq!(first_emulated(&[0x48, 0x89, 0xf8].repeat(20), 0, FIRST_ARG).offset, 0);
    }
}
