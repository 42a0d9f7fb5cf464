//! Where exactly to put a probe inside a function, decided by decoding its first instructions.
//!
//! A uprobe on an instruction the kernel cannot emulate is single-stepped out of line, which
//! cost ~5.5 µs per hit here against ~1.1 µs for an emulated one (shared/DESIGN.md). glibc's
//! `free` starts with `test %rdi,%rdi; je <return>`: `test` is single-stepped. Every non-NULL
//! free then runs the `push` after the `je`, which the kernel emulates, and there the stack
//! pointer and the argument are still those of the entry. So free's probe goes there when the
//! code has exactly that shape, and stays at the entry otherwise.

use iced_x86::{Code, Decoder, DecoderOptions, FlowControl, Instruction, Mnemonic, OpKind, Register};

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
    // could skip the probe.
    let spot = next.ip();
    let mut body = Decoder::with_ip(64, code, ip, DecoderOptions::NONE);
    for i in &mut body {
        if i.is_invalid() {
            break;
        }
        let target_kind =
            matches!(i.flow_control(), FlowControl::ConditionalBranch | FlowControl::UnconditionalBranch);
        if target_kind && i.op0_kind() == OpKind::NearBranch64 {
            let t = i.near_branch_target();
            if t > ip && t < spot {
                return AT_ENTRY;
            }
        }
    }
    Placement { offset: spot - ip, note: "after the NULL check (emulated push, not single-stepped)" }
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
}
