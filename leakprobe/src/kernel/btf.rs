//! Offsets in the running kernel's own structures, from its BTF (`/sys/kernel/btf/vmlinux`).

use btf_rs::{Btf, Type};
use thiserror::Error;

/// Where the kernel describes its types.
pub const VMLINUX: &str = "/sys/kernel/btf/vmlinux";

#[derive(Debug, Error)]
pub enum BtfError {
    #[error("cannot read the kernel's BTF ({VMLINUX})")]
    Read {
        #[source]
        source: btf_rs::Error,
    },
    #[error("the kernel's BTF has no struct {name}")]
    NoStruct { name: String },
    #[error("the kernel's BTF has no member {path} (at {member})")]
    NoMember { path: String, member: String },
}

/// The byte offset of `path` (members, outermost first) in struct `name`; anonymous struct
/// and union members are looked through.
pub fn offset_of(name: &str, path: &[&str]) -> Result<u64, BtfError> {
    let btf = Btf::from_file(VMLINUX).map_err(|source| BtfError::Read { source })?;
    offset_in(&btf, name, path)
}

/// `vm_area_struct.vm_start` and `.vm_end`: from the BTF, else their offsets in every kernel
/// since 2.6 (0 and 8).
pub fn vma_bounds_offsets() -> (u64, u64) {
    let read = || -> Result<(u64, u64), BtfError> {
        let btf = Btf::from_file(VMLINUX).map_err(|source| BtfError::Read { source })?;
        Ok((
            offset_in(&btf, "vm_area_struct", &["vm_start"])?,
            offset_in(&btf, "vm_area_struct", &["vm_end"])?,
        ))
    };
    read().unwrap_or_else(|e| {
        tracing::debug!("vm_area_struct from BTF: {e}; taking offsets 0 and 8");
        (0, 8)
    })
}

fn offset_in(btf: &Btf, name: &str, path: &[&str]) -> Result<u64, BtfError> {
    let no_struct = || BtfError::NoStruct { name: name.to_string() };
    let mut ty = btf
        .resolve_types_by_name(name)
        .map_err(|_| no_struct())?
        .into_iter()
        .find(|t| matches!(t, Type::Struct(_)))
        .ok_or_else(no_struct)?;
    let mut offset = 0u64;
    for member in path {
        let (off, next) = find_member(btf, &ty, member, 0).ok_or_else(|| BtfError::NoMember {
            path: format!("{name}.{}", path.join(".")),
            member: member.to_string(),
        })?;
        offset += off;
        ty = next;
    }
    Ok(offset)
}

/// `member` of the struct or union `ty`: its byte offset and its type (typedefs and
/// qualifiers resolved), looking through anonymous members up to a few levels deep.
fn find_member(btf: &Btf, ty: &Type, member: &str, depth: u32) -> Option<(u64, Type)> {
    let s = match ty {
        Type::Struct(s) | Type::Union(s) => s,
        _ => return None,
    };
    for m in &s.members {
        let name = btf.resolve_name(m).unwrap_or_default();
        let mty = resolve(btf, btf.resolve_chained_type(m).ok()?);
        let off = u64::from(m.bit_offset() / 8);
        if name == member {
            return Some((off, mty));
        }
        if name.is_empty()
            && depth < 4
            && let Some((inner, t)) = find_member(btf, &mty, member, depth + 1)
        {
            return Some((off + inner, t));
        }
    }
    None
}

/// Through typedefs and qualifiers to the type itself.
fn resolve(btf: &Btf, mut ty: Type) -> Type {
    for _ in 0..16 {
        match &ty {
            Type::Typedef(_) | Type::Const(_) | Type::Volatile(_) | Type::Restrict(_) | Type::TypeTag(_) => {
                match ty.as_btf_type().and_then(|t| btf.resolve_chained_type(t).ok()) {
                    Some(next) => ty = next,
                    None => return ty,
                }
            }
            _ => return ty,
        }
    }
    ty
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fs_base_of_a_task_is_found_in_this_kernels_btf() {
        // Every kernel this runs on has BTF (preflight requires it).
        let off = offset_of("task_struct", &["thread", "fsbase"]).expect("task_struct.thread.fsbase");
        let thread = offset_of("task_struct", &["thread"]).expect("task_struct.thread");
        let fs = offset_of("thread_struct", &["fsbase"]).expect("thread_struct.fsbase");
        assert_eq!(off, thread + fs);
        assert!(off > 0 && off < 1 << 16 && off.is_multiple_of(8), "{off}");
        assert!(matches!(offset_of("task_struct", &["no_such_member"]), Err(BtfError::NoMember { .. })));
    }
}
