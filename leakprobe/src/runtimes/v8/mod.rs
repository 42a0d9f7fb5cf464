//! V8 (Node.js) read from outside: which JavaScript function a frame runs, and where.
//!
//! The kernel side keeps, for each JavaScript frame of an allocation's stack, the function's
//! `SharedFunctionInfo` (`leakprobe_common::js_frame`). This names them: the function's name
//! from its `ScopeInfo` (or its name string), the script's name, and the line and column
//! where the function starts, as V8's own sampling profiles and DevTools give them. (The
//! line of the call being made would need the bytecode offset of interpreted frames and the
//! code's position tables with their inlining for optimized ones.)
//! Everything is checked by instance type before it is trusted; anything that does not check
//! out gives no frame rather than a wrong one. Pure: reads through a [`Memory`].

pub mod detect;
pub mod heap_profile;
pub mod layout;
pub mod positions;
pub mod snapshot;

use std::collections::HashMap;

use leakprobe_common::js_frame;

pub use layout::{Layout, V8Version};

use super::Memory;

/// The longest string read (a function or file name; longer ones are cut).
const MAX_NAME: usize = 512;
/// The longest script source read to find its lines, when V8 kept no line ends.
const MAX_SOURCE: usize = 32 << 20;
/// Nested cons/sliced/thin strings followed, at most.
const MAX_STRING_DEPTH: usize = 32;
/// ScopeInfo slots looked at for the name and the positions.
const SCOPE_SLOTS: usize = 16;

/// Reads V8 heap objects through tagged pointers.
pub struct Heap<'a> {
    pub mem: &'a dyn Memory,
    pub l: &'a Layout,
}

fn untag(v: u64) -> Option<u64> {
    (v & 3 == 1).then(|| v - 1)
}

fn smi(v: u64) -> Option<i64> {
    (v & 1 == 0).then_some((v as i64) >> 32)
}

impl Heap<'_> {
    /// The instance type of the object `tagged` points to.
    pub fn instance_type(&self, tagged: u64) -> Option<u16> {
        let map = untag(self.mem.read_u64(untag(tagged)?)?)?;
        let mut b = [0u8; 2];
        self.mem.read(map + u64::from(self.l.map_instance_type), &mut b).then(|| u16::from_le_bytes(b))
    }

    fn field(&self, tagged: u64, offset: u32) -> Option<u64> {
        self.mem.read_u64(untag(tagged)? + u64::from(offset))
    }

    /// A field that must hold an object of type `ty`.
    fn typed(&self, tagged: u64, offset: u32, ty: u16) -> Option<u64> {
        let v = self.field(tagged, offset)?;
        (self.instance_type(v)? == ty).then_some(v)
    }

    /// A string's contents, up to `max` bytes (UTF-16 is converted; external strings, whose
    /// characters live outside the heap, give `None`).
    pub fn string(&self, tagged: u64, max: usize) -> Option<String> {
        let mut out = String::new();
        self.append_string(tagged, 0, max, &mut out, 0)?;
        Some(out)
    }

    fn append_string(
        &self,
        tagged: u64,
        skip: usize,
        max: usize,
        out: &mut String,
        depth: usize,
    ) -> Option<()> {
        let t = &self.l.strings;
        let ty = self.instance_type(tagged)?;
        if ty >= t.first_nonstring || depth > MAX_STRING_DEPTH {
            return None;
        }
        let len = self.mem.read_i32(untag(tagged)? + u64::from(self.l.string_length))?.max(0) as usize;
        let want = len.saturating_sub(skip).min(max.saturating_sub(out.len()));
        if want == 0 {
            return Some(());
        }
        let repr = ty & t.representation_mask;
        let one_byte = ty & t.encoding_mask == t.one_byte;
        if repr == t.seq {
            let base = untag(tagged)?;
            if one_byte {
                let b = self.mem.read_vec(base + u64::from(self.l.seq_one_byte_chars) + skip as u64, want)?;
                out.extend(b.iter().map(|&c| c as char));
            } else {
                let b = self
                    .mem
                    .read_vec(base + u64::from(self.l.seq_two_byte_chars) + 2 * skip as u64, 2 * want)?;
                let units: Vec<u16> = b.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect();
                out.extend(char::decode_utf16(units).map(|c| c.unwrap_or('\u{fffd}')));
            }
            Some(())
        } else if repr == t.cons {
            let first = self.field(tagged, self.l.cons_first)?;
            let second = self.field(tagged, self.l.cons_second)?;
            let first_len =
                self.mem.read_i32(untag(first)? + u64::from(self.l.string_length))?.max(0) as usize;
            if skip < first_len {
                self.append_string(first, skip, max, out, depth + 1)?;
            }
            self.append_string(second, skip.saturating_sub(first_len), max, out, depth + 1)
        } else if repr == t.thin {
            self.append_string(self.field(tagged, self.l.thin_actual)?, skip, max, out, depth + 1)
        } else if repr == t.sliced {
            let parent = self.field(tagged, self.l.sliced_parent)?;
            let offset = smi(self.field(tagged, self.l.sliced_offset)?)?.max(0) as usize;
            let cap = out.len() + want;
            self.append_string(parent, skip + offset, cap, out, depth + 1)
        } else {
            None
        }
    }

    /// A FixedArray of Smis (a script's line ends).
    fn smi_array(&self, tagged: u64) -> Option<Vec<u32>> {
        if self.instance_type(tagged)? != self.l.types.fixed_array {
            return None;
        }
        let len = smi(self.field(tagged, self.l.fixed_array_length)?)?;
        if !(0..=(1 << 24)).contains(&len) {
            return None;
        }
        let raw = self.mem.read_vec(untag(tagged)? + u64::from(self.l.fixed_array_data), 8 * len as usize)?;
        raw.chunks_exact(8)
            .map(|c| {
                smi(u64::from_le_bytes(c.try_into().unwrap_or_default())).and_then(|v| u32::try_from(v).ok())
            })
            .collect()
    }
}

/// A JavaScript frame, named.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JsFrame {
    pub function: String,
    /// The script's name; `None` for V8's builtins, which have none.
    pub file: Option<String>,
    pub line: Option<u32>,
    pub column: Option<u32>,
}

/// What a `SharedFunctionInfo` says, kept per pointer.
#[derive(Clone, Debug)]
struct Function {
    name: String,
    script: Option<u64>,
    /// The function's own start, as a script offset.
    start: Option<u32>,
}

#[derive(Clone, Debug)]
struct Script {
    name: String,
    line_ends: Option<Vec<u32>>,
}

/// Names JavaScript frames, caching what it read by object address.
pub struct Resolver {
    pub layout: Layout,
    functions: HashMap<u64, Option<Function>>,
    scripts: HashMap<u64, Script>,
}

/// The name V8's tools give a function without one.
pub const ANONYMOUS: &str = "(anonymous)";

impl Resolver {
    pub fn new(layout: Layout) -> Resolver {
        Resolver { layout, functions: HashMap::new(), scripts: HashMap::new() }
    }

    /// The frames of a stack's `js_frame` words, each with the index of the native frame it
    /// stands for and its `SharedFunctionInfo`. Frames that do not check out are left out.
    pub fn name_stack(&mut self, mem: &dyn Memory, words: &[u64]) -> Vec<(usize, u64, JsFrame)> {
        words
            .iter()
            .filter_map(|&w| Some((js_frame::index(w), js_frame::sfi(w), self.frame(mem, js_frame::sfi(w))?)))
            .collect()
    }

    /// One frame: the function, its script, and where the function starts (as V8's own
    /// profiles give a function's position, so the sites here and theirs read alike).
    pub fn frame(&mut self, mem: &dyn Memory, sfi: u64) -> Option<JsFrame> {
        let f = self.function(mem, sfi)?;
        let script = f.script.and_then(|s| self.script(mem, s));
        let (file, ends) = match script {
            Some(s) => (s.name.clone(), s.line_ends.as_deref()),
            None => (String::new(), None),
        };
        let at = f.start.and_then(|p| positions::line_column(ends?, p));
        Some(JsFrame {
            function: f.name,
            file: (!file.is_empty()).then_some(file),
            line: at.map(|(l, _)| l),
            column: at.map(|(_, c)| c),
        })
    }

    fn function(&mut self, mem: &dyn Memory, sfi: u64) -> Option<Function> {
        if let Some(f) = self.functions.get(&sfi) {
            return f.clone();
        }
        let f = self.read_function(mem, sfi);
        self.functions.insert(sfi, f.clone());
        f
    }

    fn read_function(&self, mem: &dyn Memory, sfi: u64) -> Option<Function> {
        let h = Heap { mem, l: &self.layout };
        let l = &self.layout;
        if h.instance_type(sfi)? != l.types.shared_function_info {
            return None;
        }
        let nos = h.field(sfi, l.sfi_name_or_scope_info)?;
        let (name, start) = match h.instance_type(nos) {
            Some(t) if t == l.types.scope_info => self.scope_info(&h, nos),
            Some(t) if t < l.strings.first_nonstring => (h.string(nos, MAX_NAME), None),
            _ => (None, None),
        };
        let script = h.typed(sfi, l.sfi_script, l.types.script);
        let name = name.filter(|n| !n.is_empty()).unwrap_or_else(|| ANONYMOUS.to_string());
        Some(Function { name, script, start })
    }

    /// The function's name and start position from its ScopeInfo. Its layout has no
    /// post-mortem constants past the first slots: the name is the first string after the
    /// context locals; the positions are fixed slots from V8 12.8, and before that the first
    /// pair of increasing Smis after the name.
    fn scope_info(&self, h: &Heap, tagged: u64) -> (Option<String>, Option<u32>) {
        let Some(base) = untag(tagged) else { return (None, None) };
        // The slots follow the map.
        let Some(raw) = h.mem.read_vec(base + 8, 8 * SCOPE_SLOTS) else { return (None, None) };
        let slot = |i: usize| u64::from_le_bytes(raw[8 * i..8 * i + 8].try_into().unwrap_or_default());
        let l = &self.layout;
        let fixed_start = l.scope_info_fixed_positions.then(|| smi(slot(3))).flatten();
        let locals = smi(slot(l.scope_info_context_locals as usize)).unwrap_or(0).clamp(0, SCOPE_SLOTS as i64)
            as usize;
        let mut name = None;
        let mut prev: Option<i64> = None;
        for i in (l.scope_info_first_vars as usize + 2 * locals)..SCOPE_SLOTS {
            let v = slot(i);
            if name.is_none()
                && untag(v).is_some()
                && h.instance_type(v).is_some_and(|t| t < l.strings.first_nonstring)
            {
                name = h.string(v, MAX_NAME);
                if fixed_start.is_some() {
                    break;
                }
                prev = None;
                continue;
            }
            if fixed_start.is_none() && name.is_some() {
                let cur = smi(v);
                if let (Some(s), Some(e)) = (prev, cur)
                    && s >= 0
                    && s < e
                {
                    return (name, u32::try_from(s).ok());
                }
                prev = cur;
            }
        }
        (name, fixed_start.and_then(|s| u32::try_from(s).ok()))
    }

    fn script(&mut self, mem: &dyn Memory, tagged: u64) -> Option<&Script> {
        if !self.scripts.contains_key(&tagged) {
            let h = Heap { mem, l: &self.layout };
            let l = &self.layout;
            let name = h.field(tagged, l.script_name).and_then(|n| h.string(n, MAX_NAME)).unwrap_or_default();
            let line_ends = h.field(tagged, l.script_line_ends).and_then(|e| h.smi_array(e)).or_else(|| {
                let src = h.field(tagged, l.script_source)?;
                Some(positions::line_ends_of(&h.string(src, MAX_SOURCE)?))
            });
            self.scripts.insert(tagged, Script { name, line_ends });
        }
        self.scripts.get(&tagged)
    }
}
