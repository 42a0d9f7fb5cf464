//! Language runtimes read from outside: where their frames and objects are, per version.
//! Decoders here do no I/O of their own: they read the target through a [`Memory`].

pub mod cpython;
pub mod v8;

/// A name fit to print: an identifier-like key (letters, digits, `_`, `.`, `-`), else a
/// placeholder. Keys are names, but a dict may be keyed by data: that is never printed.
pub fn printable_name(s: Option<String>) -> String {
    match s {
        Some(s)
            if !s.is_empty()
                && s.len() <= 120
                && s.chars().all(|c| c.is_alphanumeric() || matches!(c, '_' | '.' | '-')) =>
        {
            s
        }
        _ => "<key>".to_string(),
    }
}

/// Read access to the target's memory (`/proc/PID/mem`, a snapshot, or a test buffer).
pub trait Memory {
    /// Fills `buf` from `addr`; `false` if any of it cannot be read.
    fn read(&self, addr: u64, buf: &mut [u8]) -> bool;

    fn read_u64(&self, addr: u64) -> Option<u64> {
        let mut b = [0u8; 8];
        self.read(addr, &mut b).then(|| u64::from_le_bytes(b))
    }

    fn read_u32(&self, addr: u64) -> Option<u32> {
        let mut b = [0u8; 4];
        self.read(addr, &mut b).then(|| u32::from_le_bytes(b))
    }

    fn read_i32(&self, addr: u64) -> Option<i32> {
        self.read_u32(addr).map(|v| v as i32)
    }

    fn read_u8(&self, addr: u64) -> Option<u8> {
        let mut b = [0u8; 1];
        self.read(addr, &mut b).then_some(b[0])
    }

    /// `len` bytes from `addr`, all or nothing. The caller bounds `len`: it is allocated.
    fn read_vec(&self, addr: u64, len: usize) -> Option<Vec<u8>> {
        let mut v = vec![0u8; len];
        self.read(addr, &mut v).then_some(v)
    }
}

impl Memory for crate::ptrace::Mem {
    fn read(&self, addr: u64, buf: &mut [u8]) -> bool {
        self.read_exact_at(addr, buf).is_ok()
    }
}
