//! Code objects to `function (file:line)`. Pure: reads the target through a [`Memory`].
//!
//! A frame word ([`leakprobe_common::py_frame`]) holds a code object's address and a
//! position; [`CodeResolver`] checks that the address still holds a code object, reads its
//! names and line table once per (address, checksum), and maps the position to a line as
//! `PyCode_Addr2Line` does:
//! - 3.9: `f_lasti` counts bytes: the offset is the position;
//! - 3.10: `f_lasti` counts instructions: the offset is 2 × the position;
//! - 3.11/3.12: the code-unit index of `prev_instr` (the last instruction started; during a
//!   call, the CALL or its last cache entry, which share its location): 2 × the position;
//! - 3.13: the code-unit index of `instr_ptr` (the instruction executing; for a caller, its
//!   CALL): 2 × the position.
//!
//! This is `_PyInterpreterFrame_LASTI` × 2 in each version, which is what the interpreter's
//! own `frame.f_lineno` uses. `POS_MASK` means the position is unknown (not started yet, or
//! clamped): the frame is named, with no line.

use std::collections::HashMap;

use leakprobe_common::py_frame;

use super::{
    layout::{BYTES_SVAL, CodeLayout, OB_SIZE, OB_TYPE, UNICODE_LENGTH, UNICODE_STATE},
    linetable::{self, LineRange},
};
use crate::runtimes::Memory;

/// One named Python frame.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PyFrame {
    /// `co_qualname` (3.11+) or `co_name`.
    pub function: String,
    /// `co_filename`.
    pub file: String,
    /// `None` when the bytecode position has no line or is unknown.
    pub line: Option<u32>,
}

impl std::fmt::Display for PyFrame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.line {
            Some(l) => write!(f, "{} ({}:{l})", self.function, self.file),
            None => write!(f, "{} ({})", self.function, self.file),
        }
    }
}

/// Addresses of the type objects a read must find (load bias applied).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TypeAddrs {
    pub code: u64,
    pub unicode: u64,
    pub bytes: u64,
}

/// Strings longer than this (in characters) are refused as corrupt: names and paths.
pub const MAX_STR_CHARS: u64 = 4096;
/// Line tables longer than this are refused.
pub const MAX_TABLE_BYTES: u64 = 4 << 20;
/// Code objects remembered before the cache starts over.
const MAX_CACHED: usize = 1 << 16;

/// What identifies one code object's life at an address: a reused address almost surely
/// differs in one of these (the OTel profiler's argcount/flags/firstlineno checksum, plus
/// the name, file and table pointers).
type Checksum = [u64; 8];

#[derive(Clone, Debug)]
struct CodeInfo {
    sum: Checksum,
    function: String,
    file: String,
    lines: Vec<LineRange>,
    first_traceable: Option<u32>,
}

/// Names code objects of one CPython runtime, with a cache.
#[derive(Debug)]
pub struct CodeResolver {
    layout: CodeLayout,
    types: TypeAddrs,
    cache: HashMap<u64, CodeInfo>,
}

fn u64_at(b: &[u8], off: u64) -> Option<u64> {
    let off = usize::try_from(off).ok()?;
    Some(u64::from_le_bytes(b.get(off..off.checked_add(8)?)?.try_into().ok()?))
}

fn i32_at(b: &[u8], off: u64) -> Option<i32> {
    let off = usize::try_from(off).ok()?;
    Some(i32::from_le_bytes(b.get(off..off.checked_add(4)?)?.try_into().ok()?))
}

/// Reads a `str` object: compact ASCII, compact 1/2/4-byte kinds, or a non-compact string
/// through `data.any`. `None` if it is not a ready `str` of `unicode_type`, is longer than
/// [`MAX_STR_CHARS`], or holds invalid code points.
pub fn read_str(mem: &dyn Memory, addr: u64, layout: &CodeLayout, unicode_type: u64) -> Option<String> {
    if addr == 0 {
        return None;
    }
    // The PyASCIIObject header (what every str has), then more only as the kind needs.
    let head = mem.read_vec(addr, usize::try_from(layout.ascii_size).ok()?)?;
    if u64_at(&head, OB_TYPE)? != unicode_type {
        return None;
    }
    let len = u64_at(&head, UNICODE_LENGTH)?;
    let state = i32_at(&head, UNICODE_STATE)? as u32;
    let (kind, compact, ascii, ready) =
        ((state >> 2) & 7, state & (1 << 5) != 0, state & (1 << 6) != 0, state & (1 << 7) != 0);
    if len > MAX_STR_CHARS
        || (layout.has_ready_bit && !ready)
        || !matches!(kind, 1 | 2 | 4)
        || (ascii && kind != 1)
    {
        return None;
    }
    let data = match (compact, ascii) {
        (true, true) => addr.wrapping_add(layout.ascii_size),
        (true, false) => addr.wrapping_add(layout.compact_size),
        // PyUnicodeObject.data.any, right after the compact header.
        (false, _) => mem.read_u64(addr.wrapping_add(layout.compact_size))?,
    };
    if data == 0 && len > 0 {
        return None;
    }
    let raw = mem.read_vec(data, usize::try_from(len * u64::from(kind)).ok()?)?;
    match kind {
        1 if ascii => raw.is_ascii().then(|| raw.iter().map(|&b| b as char).collect()),
        1 => Some(raw.iter().map(|&b| b as char).collect()),
        2 => {
            raw.chunks_exact(2).map(|c| char::from_u32(u32::from(u16::from_le_bytes([c[0], c[1]])))).collect()
        }
        _ => raw
            .chunks_exact(4)
            .map(|c| char::from_u32(u32::from_le_bytes([c[0], c[1], c[2], c[3]])))
            .collect(),
    }
}

/// Reads a `bytes` object's contents; `None` unless it is a `bytes` of `bytes_type` of at
/// most [`MAX_TABLE_BYTES`].
pub fn read_bytes(mem: &dyn Memory, addr: u64, bytes_type: u64) -> Option<Vec<u8>> {
    if addr == 0 || mem.read_u64(addr + OB_TYPE)? != bytes_type {
        return None;
    }
    let len = mem.read_u64(addr + OB_SIZE)?;
    if len > MAX_TABLE_BYTES {
        return None;
    }
    mem.read_vec(addr + BYTES_SVAL, usize::try_from(len).ok()?)
}

impl CodeResolver {
    pub fn new(layout: CodeLayout, types: TypeAddrs) -> CodeResolver {
        CodeResolver { layout, types, cache: HashMap::new() }
    }

    /// Code objects currently cached.
    pub fn cached(&self) -> usize {
        self.cache.len()
    }

    /// The byte offset a frame word's position stands for; `None` when unknown.
    fn offset(&self, pos: u64) -> Option<u32> {
        if pos >= py_frame::POS_MASK {
            return None;
        }
        let off = if self.layout.pos_in_bytes { pos } else { pos * 2 };
        u32::try_from(off).ok()
    }

    /// Reads and checks the code object at `code`, from the cache when its checksum still
    /// matches.
    fn info(&mut self, mem: &dyn Memory, code: u64) -> Option<&CodeInfo> {
        let l = self.layout;
        if code == 0 || !code.is_multiple_of(8) {
            return None;
        }
        let head = mem.read_vec(code, usize::try_from(l.size).ok()?)?;
        if u64_at(&head, OB_TYPE)? != self.types.code {
            return None;
        }
        let word = |off: u64| i32_at(&head, off).map(|v| v as u32 as u64);
        let filename = u64_at(&head, l.filename)?;
        let name = u64_at(&head, l.qualname.unwrap_or(l.name))?;
        let table = u64_at(&head, l.linetable)?;
        let firstlineno = i32_at(&head, l.firstlineno)?;
        let sum: Checksum = [
            word(l.argcount)?,
            word(l.kwonlyargcount)?,
            word(l.flags)?,
            firstlineno as u32 as u64,
            filename,
            name,
            table,
            l.first_traceable.map(word).unwrap_or(Some(0))?,
        ];
        if self.cache.get(&code).is_some_and(|c| c.sum == sum) {
            return self.cache.get(&code);
        }
        let function = read_str(mem, name, &l, self.types.unicode)?;
        let file = read_str(mem, filename, &l, self.types.unicode)?;
        let bytes = read_bytes(mem, table, self.types.bytes)?;
        let lines = linetable::decode(l.format, &bytes, firstlineno)?;
        let first_traceable = match l.first_traceable {
            Some(off) => Some(u32::try_from(i32_at(&head, off)?).ok()?),
            None => None,
        };
        if self.cache.len() >= MAX_CACHED {
            self.cache.clear();
        }
        self.cache.insert(code, CodeInfo { sum, function, file, lines, first_traceable });
        self.cache.get(&code)
    }

    /// Names the code object at `code` at position `pos` (a [`py_frame::pos`]); `None` if
    /// `code` is not (or no longer) a readable code object of this runtime.
    pub fn resolve(&mut self, mem: &dyn Memory, code: u64, pos: u64) -> Option<PyFrame> {
        let offset = self.offset(pos);
        let info = self.info(mem, code)?;
        let line = offset.and_then(|o| linetable::line_at(&info.lines, o));
        Some(PyFrame { function: info.function.clone(), file: info.file.clone(), line })
    }

    /// Whether the interpreter itself would show this frame: 3.11+ hides frames that have
    /// not reached `_co_firsttraceable` yet (still copying cells or making the generator).
    /// `None` when `code` does not check out.
    pub fn is_complete(&mut self, mem: &dyn Memory, code: u64, pos: u64) -> Option<bool> {
        let known = pos < py_frame::POS_MASK;
        let info = self.info(mem, code)?;
        Some(match info.first_traceable {
            Some(first) if known => pos >= u64::from(first),
            _ => true,
        })
    }

    /// Each word of a captured stack as the interpreter would show it: `None` for a frame it
    /// hides (3.11+: not at its first traceable instruction yet), `Some(None)` for one that
    /// does not check out, `Some(Some(name))` otherwise.
    fn shown(&mut self, mem: &dyn Memory, w: u64) -> Option<Option<PyFrame>> {
        let (code, pos) = (py_frame::code(w), py_frame::pos(w));
        match self.is_complete(mem, code, pos) {
            Some(false) => None,
            Some(true) => Some(self.resolve(mem, code, pos)),
            None => Some(None),
        }
    }

    /// Names a captured stack ([`leakprobe_common::Stack::py`], innermost first), dropping
    /// incomplete frames as the interpreter's own tracebacks do; a frame that does not check
    /// out is `None` in its place.
    pub fn resolve_stack(&mut self, mem: &dyn Memory, words: &[u64]) -> Vec<Option<PyFrame>> {
        words.iter().filter_map(|&w| self.shown(mem, w)).collect()
    }

    /// The named frames of a captured stack, innermost first: (code object, name, entry
    /// flag). A frame left out (hidden, or not checking out) hands its entry flag to the
    /// frame inside it, where its C call's native frames belong. Never a guessed name.
    /// A resolver of the same runtime with nothing cached: for another process (a forked
    /// worker's code objects created since the fork are its own, at addresses the parent may
    /// use for others).
    pub fn fresh(&self) -> CodeResolver {
        CodeResolver { layout: self.layout, types: self.types, cache: HashMap::new() }
    }

    pub fn name_stack(&mut self, mem: &dyn Memory, words: &[u64]) -> Vec<(u64, PyFrame, bool)> {
        let mut out: Vec<(u64, PyFrame, bool)> = Vec::with_capacity(words.len());
        for &w in words {
            match self.shown(mem, w) {
                Some(Some(f)) => out.push((py_frame::code(w), f, py_frame::entry(w))),
                _ if py_frame::entry(w) => {
                    if let Some(last) = out.last_mut() {
                        last.2 = true;
                    }
                }
                _ => {}
            }
        }
        out
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::cell::RefCell;

    use super::*;
    use crate::runtimes::cpython::layout::Layout;

    /// A sparse test memory: byte ranges at addresses.
    #[derive(Default)]
    pub(crate) struct FakeMem {
        pub regions: RefCell<Vec<(u64, Vec<u8>)>>,
    }

    impl FakeMem {
        pub fn put(&self, addr: u64, bytes: &[u8]) {
            let mut r = self.regions.borrow_mut();
            if let Some((a, b)) =
                r.iter_mut().find(|(a, b)| *a <= addr && addr + bytes.len() as u64 <= a + b.len() as u64)
            {
                let off = (addr - *a) as usize;
                b[off..off + bytes.len()].copy_from_slice(bytes);
            } else {
                r.push((addr, bytes.to_vec()));
            }
        }
        pub fn put_u64(&self, addr: u64, v: u64) {
            self.put(addr, &v.to_le_bytes());
        }
    }

    impl Memory for FakeMem {
        fn read(&self, addr: u64, buf: &mut [u8]) -> bool {
            for (a, b) in self.regions.borrow().iter() {
                if *a <= addr && addr + buf.len() as u64 <= a + b.len() as u64 {
                    let off = (addr - a) as usize;
                    buf.copy_from_slice(&b[off..off + buf.len()]);
                    return true;
                }
            }
            false
        }
    }

    pub(crate) const TYPES: TypeAddrs = TypeAddrs { code: 0x1000, unicode: 0x2000, bytes: 0x3000 };

    /// Writes a compact str object at `addr` in the layout of `l`.
    pub(crate) fn put_str(mem: &FakeMem, addr: u64, l: &CodeLayout, s: &str) {
        let chars: Vec<u32> = s.chars().map(u32::from).collect();
        let max = chars.iter().copied().max().unwrap_or(0);
        let (kind, ascii) = match max {
            0..=0x7f => (1u32, true),
            0x80..=0xff => (1, false),
            0x100..=0xffff => (2, false),
            _ => (4, false),
        };
        let data_at = if ascii { l.ascii_size } else { l.compact_size };
        let mut obj = vec![0u8; data_at as usize];
        obj[8..16].copy_from_slice(&TYPES.unicode.to_le_bytes());
        obj[16..24].copy_from_slice(&(chars.len() as u64).to_le_bytes());
        let state = (kind << 2) | (1 << 5) | (u32::from(ascii) << 6) | (1 << 7);
        obj[32..36].copy_from_slice(&state.to_le_bytes());
        for c in &chars {
            obj.extend_from_slice(&c.to_le_bytes()[..kind as usize]);
        }
        obj.extend_from_slice(&[0; 4]);
        mem.put(addr, &obj);
    }

    pub(crate) fn put_bytes(mem: &FakeMem, addr: u64, data: &[u8]) {
        let mut obj = vec![0u8; 32];
        obj[8..16].copy_from_slice(&TYPES.bytes.to_le_bytes());
        obj[16..24].copy_from_slice(&(data.len() as u64).to_le_bytes());
        obj.extend_from_slice(data);
        obj.push(0);
        mem.put(addr, &obj);
    }

    /// A code object at `addr` named `name` in `file`, with a location table saying line
    /// firstlineno+1 for the first 4 code units and +3 for the next 4.
    pub(crate) fn put_code(
        mem: &FakeMem,
        addr: u64,
        l: &CodeLayout,
        name: &str,
        file: &str,
        firstlineno: i32,
    ) {
        let mut obj = vec![0u8; l.size as usize];
        obj[8..16].copy_from_slice(&TYPES.code.to_le_bytes());
        obj[l.firstlineno as usize..][..4].copy_from_slice(&firstlineno.to_le_bytes());
        let (n, f, t) = (addr + 0x1000, addr + 0x2000, addr + 0x3000);
        obj[l.qualname.unwrap_or(l.name) as usize..][..8].copy_from_slice(&n.to_le_bytes());
        obj[l.filename as usize..][..8].copy_from_slice(&f.to_le_bytes());
        obj[l.linetable as usize..][..8].copy_from_slice(&t.to_le_bytes());
        if let Some(ft) = l.first_traceable {
            obj[ft as usize..][..4].copy_from_slice(&1i32.to_le_bytes());
        }
        mem.put(addr, &obj);
        put_str(mem, n, l, name);
        put_str(mem, f, l, file);
        // ONE_LINE1 x4 units, ONE_LINE2 x4 units.
        put_bytes(mem, t, &[0x80 | (11 << 3) | 3, 0, 0, 0x80 | (12 << 3) | 3, 0, 0]);
    }

    #[test]
    fn reads_strings_of_every_kind() {
        for minor in [11u8, 12] {
            let l = Layout::for_version(3, minor).unwrap().code;
            let mem = FakeMem::default();
            for (i, s) in ["plain", "grüße", "函数名", "f𠀀x", ""].iter().enumerate() {
                let at = 0x10_000 * (i as u64 + 1);
                put_str(&mem, at, &l, s);
                assert_eq!(read_str(&mem, at, &l, TYPES.unicode).as_deref(), Some(*s), "3.{minor} {s}");
                // Wrong type.
                assert_eq!(read_str(&mem, at, &l, 0x9999), None);
            }
            // Absurd length.
            put_str(&mem, 0x100_000, &l, "x");
            mem.put_u64(0x100_000 + 16, 1 << 40);
            assert_eq!(read_str(&mem, 0x100_000, &l, TYPES.unicode), None);
            // An invalid kind (3) and an unreadable object.
            put_str(&mem, 0x200_000, &l, "xy");
            mem.put(0x200_000 + 32, &((3u32 << 2) | (1 << 5) | (1 << 7)).to_le_bytes());
            assert_eq!(read_str(&mem, 0x200_000, &l, TYPES.unicode), None);
            assert_eq!(read_str(&mem, 0xdead_0000, &l, TYPES.unicode), None);
        }
    }

    #[test]
    fn non_ready_strings_are_refused_before_312() {
        let l = Layout::for_version(3, 10).unwrap().code;
        let mem = FakeMem::default();
        put_str(&mem, 0x10_000, &l, "abc");
        assert_eq!(read_str(&mem, 0x10_000, &l, TYPES.unicode).as_deref(), Some("abc"));
        mem.put(0x10_000 + 32, &((1u32 << 2) | (1 << 5) | (1 << 6)).to_le_bytes());
        assert_eq!(read_str(&mem, 0x10_000, &l, TYPES.unicode), None);
    }

    #[test]
    fn resolves_checks_type_and_notices_reuse() {
        let l = Layout::for_version(3, 12).unwrap().code;
        let mem = FakeMem::default();
        put_code(&mem, 0x100_000, &l, "Outer.method", "/app/x.py", 10);
        let mut r = CodeResolver::new(l, TYPES);
        let f = r.resolve(&mem, 0x100_000, 2).unwrap();
        assert_eq!(f.to_string(), "Outer.method (/app/x.py:11)");
        assert_eq!(r.resolve(&mem, 0x100_000, 5).unwrap().line, Some(13));
        assert_eq!(r.resolve(&mem, 0x100_000, 8).unwrap().line, None, "past the table");
        assert_eq!(r.resolve(&mem, 0x100_000, py_frame::POS_MASK).unwrap().line, None);
        assert_eq!(r.cached(), 1);
        // Freed and reused by another code object at the same address.
        put_code(&mem, 0x100_000, &l, "other", "/app/y.py", 20);
        assert_eq!(r.resolve(&mem, 0x100_000, 0).unwrap().to_string(), "other (/app/y.py:21)");
        // Reused by something else entirely.
        mem.put_u64(0x100_000 + 8, 0x4444);
        assert_eq!(r.resolve(&mem, 0x100_000, 0), None);
        assert_eq!(r.resolve(&mem, 0, 0), None);
        assert_eq!(r.resolve(&mem, 0x100_001, 0), None, "misaligned");
    }

    #[test]
    fn resolve_stack_drops_incomplete_frames() {
        let l = Layout::for_version(3, 13).unwrap().code;
        let mem = FakeMem::default();
        put_code(&mem, 0x100_000, &l, "inner", "/a.py", 1);
        put_code(&mem, 0x200_000, &l, "outer", "/a.py", 5);
        let mut r = CodeResolver::new(l, TYPES);
        let words = [
            py_frame::pack(0x100_000, 0, false), // before _co_firsttraceable (1): hidden
            py_frame::pack(0x200_000, 4, false),
            py_frame::pack(0x300_000, 4, true), // not a code object
        ];
        let got = r.resolve_stack(&mem, &words);
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].as_ref().unwrap().to_string(), "outer (/a.py:8)");
        assert_eq!(got[1], None);
        // Named: only what checks out; the bad frame's entry flag goes to the frame inside it.
        let named = r.name_stack(&mem, &words);
        assert_eq!(named.len(), 1);
        assert_eq!((named[0].0, named[0].1.function.as_str(), named[0].2), (0x200_000, "outer", true));
    }

    #[test]
    fn positions_count_bytes_in_39_and_units_after() {
        let mut l9 = Layout::for_version(3, 9).unwrap().code;
        let r9 = CodeResolver::new(l9, TYPES);
        assert_eq!(r9.offset(6), Some(6));
        l9 = Layout::for_version(3, 10).unwrap().code;
        assert_eq!(CodeResolver::new(l9, TYPES).offset(6), Some(12));
        assert_eq!(CodeResolver::new(l9, TYPES).offset(py_frame::POS_MASK), None);
    }
}
