//! The target's memory through `/proc/PID/mem`.
//!
//! Not `process_vm_readv`: it pins pages, which unshares (copies) every page of a
//! copy-on-write snapshot it reads. Writes pass read-only protection (the kernel uses
//! FOLL_FORCE for /proc/PID/mem; kernels built with `proc_mem.force_override=ptrace` allow it
//! only to the tracer, which we are while the world is stopped).

use std::{fs::File, os::unix::fs::FileExt as _};

use super::PtraceError;

/// An open `/proc/PID/mem`.
#[derive(Debug)]
pub struct Mem {
    pid: i32,
    file: File,
}

impl Mem {
    pub fn open(pid: i32) -> Result<Mem, PtraceError> {
        let path = format!("/proc/{pid}/mem");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|source| PtraceError::Proc { path, source })?;
        Ok(Mem { pid, file })
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    pub fn read_exact_at(&self, addr: u64, buf: &mut [u8]) -> Result<(), PtraceError> {
        self.file.read_exact_at(buf, addr).map_err(|source| PtraceError::Mem {
            pid: self.pid,
            op: "read",
            addr,
            len: buf.len(),
            source,
        })
    }

    pub fn write_all_at(&self, addr: u64, data: &[u8]) -> Result<(), PtraceError> {
        self.file.write_all_at(data, addr).map_err(|source| PtraceError::Mem {
            pid: self.pid,
            op: "write",
            addr,
            len: data.len(),
            source,
        })
    }

    pub fn read_u64(&self, addr: u64) -> Result<u64, PtraceError> {
        let mut b = [0u8; 8];
        self.read_exact_at(addr, &mut b)?;
        Ok(u64::from_ne_bytes(b))
    }

    /// Reads up to `buf.len()` bytes, stopping short at an unreadable page: returns how many.
    pub fn read_at(&self, addr: u64, buf: &mut [u8]) -> Result<usize, PtraceError> {
        self.file.read_at(buf, addr).map_err(|source| PtraceError::Mem {
            pid: self.pid,
            op: "read",
            addr,
            len: buf.len(),
            source,
        })
    }
}
