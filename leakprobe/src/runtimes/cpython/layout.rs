//! Where CPython keeps what we read, per version (x86_64, default non-debug, GIL builds).
//!
//! Every offset in [`Layout::for_version`] was read from the DWARF of the pyenv builds on
//! the development machine (`gdb -batch -ex 'print/d (long)&((struct _ts*)0)->next'`, etc.,
//! on `~/.pyenv/versions/3.X/lib/libpython3.X.so.1.0`): 3.9.18, 3.10.13, 3.11.7, 3.12.1,
//! 3.13.0. Debian's stripped 3.11.2 is held to the same 3.11 table by behaviour (the
//! `cpython_frames` integration test). 3.13+ also describes itself in `_Py_DebugOffsets`,
//! which [`DebugOffsets::parse`] reads and [`DebugOffsets::check`] holds to the table.
//! Pure: no I/O.

use leakprobe_common::py_flavor;

use super::linetable::LineTableFormat;

/// `PyObject.ob_type`, every supported version (default builds).
pub const OB_TYPE: u64 = 8;
/// `PyVarObject.ob_size`.
pub const OB_SIZE: u64 = 16;
/// `PyBytesObject.ob_sval`.
pub const BYTES_SVAL: u64 = 32;
/// `PyTypeObject.tp_name` and `.tp_basicsize`.
pub const TP_NAME: u64 = 24;
pub const TP_BASICSIZE: u64 = 32;
/// `PyASCIIObject.length` and `.state` (a 32-bit bitfield: interned:2, kind:3, compact:1,
/// ascii:1, then ready:1 up to 3.11).
pub const UNICODE_LENGTH: u64 = 16;
pub const UNICODE_STATE: u64 = 32;

/// A CPython version, as far as we know it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PyVersion {
    pub major: u8,
    pub minor: u8,
    /// Known from `Py_Version` (3.11+), `_Py_DebugOffsets` or a version string.
    pub micro: Option<u8>,
}

impl PyVersion {
    /// From `PY_VERSION_HEX` (`0x030b02f0` is 3.11.2 final).
    pub fn from_hex(hex: u64) -> PyVersion {
        PyVersion { major: (hex >> 24) as u8, minor: (hex >> 16) as u8, micro: Some((hex >> 8) as u8) }
    }
}

impl std::fmt::Display for PyVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.micro {
            Some(m) => write!(f, "{}.{}.{m}", self.major, self.minor),
            None => write!(f, "{}.{}", self.major, self.minor),
        }
    }
}

/// `PyCodeObject` and the strings it points at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CodeLayout {
    pub argcount: u64,
    pub kwonlyargcount: u64,
    pub flags: u64,
    pub firstlineno: u64,
    pub filename: u64,
    pub name: u64,
    /// `co_qualname` (3.11+).
    pub qualname: Option<u64>,
    /// `co_lnotab` (3.9) or `co_linetable`.
    pub linetable: u64,
    pub format: LineTableFormat,
    /// `_co_firsttraceable` (3.11+): frames stopped before it are not yet complete.
    pub first_traceable: Option<u64>,
    /// `co_code_adaptive` (3.11+) = `PyCode_Type.tp_basicsize`; 3.9/3.10: `sizeof`.
    pub size: u64,
    /// The position in a frame word counts bytes (3.9) or 2-byte code units.
    pub pos_in_bytes: bool,
    /// `sizeof(PyASCIIObject)`: where compact ASCII data starts; 48 up to 3.11 (`wstr`).
    pub ascii_size: u64,
    /// `sizeof(PyCompactUnicodeObject)`: where other compact data starts (and non-compact
    /// strings keep `data.any`).
    pub compact_size: u64,
    /// Up to 3.11 a string must have `state.ready` set for its data to be there.
    pub has_ready_bit: bool,
    /// The frame's named variables: `co_nlocals` (an int) and `co_varnames` (a tuple of str)
    /// up to 3.10; `co_nlocalsplus` and `co_localsplusnames` (locals, cells and free
    /// variables) from 3.11.
    pub nlocals: u64,
    pub localnames: u64,
}

/// What the eBPF walk and the code resolver need of one CPython version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub flavor: u32,
    /// `_PyRuntime.interpreters.head`.
    pub runtime_interp_head: u64,
    /// `PyInterpreterState.threads.head` (3.9/3.10: `tstate_head`).
    pub interp_threads_head: u64,
    pub tstate_next: u64,
    pub tstate_interp: u64,
    /// `PyThreadState.thread_id`: `pthread_self()` of the thread.
    pub tstate_thread_id: u64,
    /// `PyThreadState.native_thread_id` (3.11+): the kernel tid.
    pub tstate_native_thread_id: Option<u64>,
    /// `PyThreadState.datastack_top` (3.11+), followed by `datastack_limit`: the frames'
    /// stack ends at `top`; its chunk's words up to `limit` are what returned frames left.
    pub tstate_datastack_top: Option<u64>,
    /// `frame` (3.9/3.10), `cframe` (3.11/3.12), `current_frame` (3.13).
    pub tstate_frame: u64,
    /// `_PyCFrame.current_frame` (3.11/3.12).
    pub cframe_current_frame: u64,
    pub frame_code: u64,
    pub frame_back: u64,
    pub frame_instr: u64,
    /// `is_entry` (3.11) or `owner` (3.12+); 0 when unused.
    pub frame_entry: u64,
    /// The frame's variables, in the order of the code's names: `f_localsplus` (3.9/3.10) or
    /// `localsplus`.
    pub frame_localsplus: u64,
    pub code: CodeLayout,
}

const fn code_39_310(format: LineTableFormat, pos_in_bytes: bool) -> CodeLayout {
    CodeLayout {
        argcount: 16,
        kwonlyargcount: 24,
        flags: 36,
        firstlineno: 40,
        filename: 104,
        name: 112,
        qualname: None,
        linetable: 120,
        format,
        first_traceable: None,
        size: 176,
        pos_in_bytes,
        ascii_size: 48,
        compact_size: 72,
        has_ready_bit: true,
        nlocals: 28,
        localnames: 72,
    }
}

const fn code_311_313(argcount: u64, first_traceable: u64, size: u64) -> CodeLayout {
    let new_strings = size != 184;
    CodeLayout {
        argcount,
        kwonlyargcount: argcount + 8,
        flags: 48,
        firstlineno: argcount + 16,
        filename: 112,
        name: 120,
        qualname: Some(128),
        linetable: 136,
        format: LineTableFormat::Locations,
        first_traceable: Some(first_traceable),
        size,
        pos_in_bytes: false,
        ascii_size: if new_strings { 40 } else { 48 },
        compact_size: if new_strings { 56 } else { 72 },
        has_ready_bit: !new_strings,
        nlocals: argcount + 20,
        localnames: 96,
    }
}

impl Layout {
    /// The verified table for 3.`minor` (3.9–3.13); `None` for any other version.
    pub fn for_version(major: u8, minor: u8) -> Option<Layout> {
        if major != 3 {
            return None;
        }
        let frame_object = |f_lasti, f_localsplus, format, pos_in_bytes| Layout {
            flavor: py_flavor::FRAME_OBJECT,
            runtime_interp_head: 32,
            interp_threads_head: 8,
            tstate_next: 8,
            tstate_interp: 16,
            tstate_thread_id: 176,
            tstate_native_thread_id: None,
            tstate_datastack_top: None,
            tstate_frame: 24,
            cframe_current_frame: 0,
            frame_code: 32,
            frame_back: 24,
            frame_instr: f_lasti,
            frame_entry: 0,
            frame_localsplus: f_localsplus,
            code: code_39_310(format, pos_in_bytes),
        };
        Some(match minor {
            9 => frame_object(104, 360, LineTableFormat::Lnotab, true),
            10 => frame_object(96, 352, LineTableFormat::Pep626, false),
            11 => Layout {
                flavor: py_flavor::CFRAME_311,
                runtime_interp_head: 40,
                interp_threads_head: 16,
                tstate_next: 8,
                tstate_interp: 16,
                tstate_thread_id: 152,
                tstate_native_thread_id: Some(160),
                tstate_datastack_top: Some(304),
                tstate_frame: 56,
                cframe_current_frame: 8,
                frame_code: 32,
                frame_back: 48,
                frame_instr: 56,
                frame_entry: 68,
                frame_localsplus: 72,
                code: code_311_313(56, 168, 184),
            },
            12 => Layout {
                flavor: py_flavor::CFRAME_312,
                runtime_interp_head: 40,
                interp_threads_head: 72,
                tstate_next: 8,
                tstate_interp: 16,
                tstate_thread_id: 136,
                tstate_native_thread_id: Some(144),
                tstate_datastack_top: Some(240),
                tstate_frame: 56,
                cframe_current_frame: 0,
                frame_code: 0,
                frame_back: 8,
                frame_instr: 56,
                frame_entry: 70,
                frame_localsplus: 72,
                code: code_311_313(52, 176, 192),
            },
            13 => Layout {
                flavor: py_flavor::CURRENT_313,
                runtime_interp_head: 632,
                interp_threads_head: 7344,
                tstate_next: 8,
                tstate_interp: 16,
                tstate_thread_id: 152,
                tstate_native_thread_id: Some(160),
                tstate_datastack_top: Some(240),
                tstate_frame: 72,
                cframe_current_frame: 0,
                frame_code: 0,
                frame_back: 8,
                frame_instr: 56,
                frame_entry: 70,
                frame_localsplus: 72,
                code: code_311_313(52, 184, 200),
            },
            _ => return None,
        })
    }
}

/// `_Py_DebugOffsets` (3.13's layout), at the very start of `_PyRuntime`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DebugOffsets {
    pub version: u64,
    pub free_threaded: bool,
    pub runtime_interpreters_head: u64,
    pub interp_threads_head: u64,
    pub tstate_next: u64,
    pub tstate_interp: u64,
    pub tstate_current_frame: u64,
    pub tstate_thread_id: u64,
    pub tstate_native_thread_id: u64,
    pub frame_previous: u64,
    pub frame_executable: u64,
    pub frame_instr_ptr: u64,
    pub frame_owner: u64,
    pub code_filename: u64,
    pub code_name: u64,
    pub code_qualname: u64,
    pub code_linetable: u64,
    pub code_firstlineno: u64,
    pub code_argcount: u64,
    pub code_adaptive: u64,
    pub pyobject_ob_type: u64,
    pub type_tp_name: u64,
    pub bytes_ob_size: u64,
    pub bytes_ob_sval: u64,
    pub unicode_state: u64,
    pub unicode_length: u64,
    pub unicode_ascii_size: u64,
}

impl DebugOffsets {
    pub const COOKIE: &'static [u8; 8] = b"xdebugpy";
    /// `sizeof(_Py_DebugOffsets)` in 3.13.0.
    pub const SIZE: usize = 584;

    /// Parses the 3.13 form; `None` without the cookie or if `bytes` is short.
    pub fn parse(bytes: &[u8]) -> Option<DebugOffsets> {
        if bytes.get(..8)? != Self::COOKIE {
            return None;
        }
        let at = |off: usize| -> Option<u64> {
            Some(u64::from_le_bytes(bytes.get(off..off + 8)?.try_into().ok()?))
        };
        Some(DebugOffsets {
            version: at(8)?,
            free_threaded: at(16)? != 0,
            runtime_interpreters_head: at(40)?,
            interp_threads_head: at(72)?,
            tstate_next: at(168)?,
            tstate_interp: at(176)?,
            tstate_current_frame: at(184)?,
            tstate_thread_id: at(192)?,
            tstate_native_thread_id: at(200)?,
            frame_previous: at(232)?,
            frame_executable: at(240)?,
            frame_instr_ptr: at(248)?,
            frame_owner: at(264)?,
            code_filename: at(280)?,
            code_name: at(288)?,
            code_qualname: at(296)?,
            code_linetable: at(304)?,
            code_firstlineno: at(312)?,
            code_argcount: at(320)?,
            code_adaptive: at(344)?,
            pyobject_ob_type: at(360)?,
            type_tp_name: at(376)?,
            bytes_ob_size: at(520)?,
            bytes_ob_sval: at(528)?,
            unicode_state: at(544)?,
            unicode_length: at(552)?,
            unicode_ascii_size: at(560)?,
        })
    }

    /// Holds every offset the table also has to the table; the first disagreement, as
    /// "field: debug offsets say X, table says Y".
    pub fn check(&self, t: &Layout) -> Result<(), String> {
        let c = &t.code;
        let pairs: [(&str, u64, Option<u64>); 24] = [
            ("runtime.interpreters.head", self.runtime_interpreters_head, Some(t.runtime_interp_head)),
            ("interp.threads.head", self.interp_threads_head, Some(t.interp_threads_head)),
            ("tstate.next", self.tstate_next, Some(t.tstate_next)),
            ("tstate.interp", self.tstate_interp, Some(t.tstate_interp)),
            ("tstate.current_frame", self.tstate_current_frame, Some(t.tstate_frame)),
            ("tstate.thread_id", self.tstate_thread_id, Some(t.tstate_thread_id)),
            ("tstate.native_thread_id", self.tstate_native_thread_id, t.tstate_native_thread_id),
            ("frame.previous", self.frame_previous, Some(t.frame_back)),
            ("frame.f_executable", self.frame_executable, Some(t.frame_code)),
            ("frame.instr_ptr", self.frame_instr_ptr, Some(t.frame_instr)),
            ("frame.owner", self.frame_owner, Some(t.frame_entry)),
            ("code.co_filename", self.code_filename, Some(c.filename)),
            ("code.co_name", self.code_name, Some(c.name)),
            ("code.co_qualname", self.code_qualname, c.qualname),
            ("code.co_linetable", self.code_linetable, Some(c.linetable)),
            ("code.co_firstlineno", self.code_firstlineno, Some(c.firstlineno)),
            ("code.co_argcount", self.code_argcount, Some(c.argcount)),
            ("code.co_code_adaptive", self.code_adaptive, Some(c.size)),
            ("object.ob_type", self.pyobject_ob_type, Some(OB_TYPE)),
            ("type.tp_name", self.type_tp_name, Some(TP_NAME)),
            ("bytes.ob_size", self.bytes_ob_size, Some(OB_SIZE)),
            ("bytes.ob_sval", self.bytes_ob_sval, Some(BYTES_SVAL)),
            ("unicode.state", self.unicode_state, Some(UNICODE_STATE)),
            ("unicode.asciiobject_size", self.unicode_ascii_size, Some(c.ascii_size)),
        ];
        for (what, debug, table) in pairs {
            if Some(debug) != table {
                return Err(format!("{what}: _Py_DebugOffsets says {debug}, the table says {table:?}"));
            }
        }
        if self.unicode_length != UNICODE_LENGTH {
            return Err(format!("unicode.length: _Py_DebugOffsets says {}", self.unicode_length));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `_Py_DebugOffsets` of pyenv's 3.13.0: the start of the `.PyRuntime` section of
    /// libpython3.13.so.1.0 (initialised data), its nonzero words after the cookie as
    /// (offset, value).
    #[rustfmt::skip]
    const DEBUG_313_0: &[(usize, u64)] = &[
        (8, 51183856), (24, 283320), (32, 608), (40, 632), (48, 194968), (56, 7272), (64, 7264),
        (72, 7344), (80, 7400), (88, 7656), (96, 7640), (104, 7648), (112, 16), (120, 7752),
        (136, 7768), (144, 7760), (152, 304), (168, 8), (176, 16), (184, 72), (192, 152),
        (200, 160), (208, 232), (216, 32), (224, 80), (232, 8), (248, 56), (256, 72), (264, 70),
        (272, 208), (280, 112), (288, 120), (296, 128), (304, 136), (312, 68), (320, 52),
        (328, 96), (336, 104), (344, 200), (352, 16), (360, 8), (368, 416), (376, 24), (384, 88),
        (392, 168), (400, 32), (408, 24), (416, 16), (424, 40), (432, 24), (440, 16), (448, 48),
        (456, 32), (464, 40), (472, 24), (480, 16), (488, 32), (496, 16), (504, 24), (512, 40),
        (520, 16), (528, 32), (536, 64), (544, 32), (552, 16), (560, 40), (568, 240), (576, 200),
    ];

    fn debug_313_0() -> Vec<u8> {
        let mut b = vec![0u8; DebugOffsets::SIZE];
        b[..8].copy_from_slice(DebugOffsets::COOKIE);
        for &(at, v) in DEBUG_313_0 {
            b[at..at + 8].copy_from_slice(&v.to_le_bytes());
        }
        b
    }

    #[test]
    fn debug_offsets_of_313_0_agree_with_the_table() {
        let d = DebugOffsets::parse(&debug_313_0()).unwrap();
        assert_eq!(PyVersion::from_hex(d.version).to_string(), "3.13.0");
        assert!(!d.free_threaded);
        assert_eq!(d.check(&Layout::for_version(3, 13).unwrap()), Ok(()));
        // And they would catch a table that is off.
        let err = d.check(&Layout::for_version(3, 12).unwrap()).unwrap_err();
        assert!(err.starts_with("runtime.interpreters.head"), "{err}");
        let mut t = Layout::for_version(3, 13).unwrap();
        t.frame_instr += 8;
        assert!(d.check(&t).unwrap_err().starts_with("frame.instr_ptr"));
    }

    #[test]
    fn debug_offsets_need_the_cookie() {
        let mut b = debug_313_0();
        assert!(DebugOffsets::parse(&b).is_some());
        assert_eq!(DebugOffsets::parse(&b[..100]), None, "short");
        b[0] = b'X';
        assert_eq!(DebugOffsets::parse(&b), None);
    }

    #[test]
    fn tables_exist_for_39_to_313_only() {
        for minor in 9..=13 {
            assert!(Layout::for_version(3, minor).is_some(), "3.{minor}");
        }
        for (major, minor) in [(3, 8), (3, 14), (2, 7), (4, 0)] {
            assert!(Layout::for_version(major, minor).is_none(), "{major}.{minor}");
        }
        // co_code_adaptive = tp_basicsize: 184, 192, 200 (gdb on pyenv 3.11.7, 3.12.1, 3.13.0).
        let sizes: Vec<u64> = (11..=13).map(|m| Layout::for_version(3, m).unwrap().code.size).collect();
        assert_eq!(sizes, [184, 192, 200]);
        assert_eq!(Layout::for_version(3, 12).unwrap().code.ascii_size, 40);
        assert_eq!(Layout::for_version(3, 11).unwrap().code.ascii_size, 48);
    }

    #[test]
    fn version_from_hex() {
        let v = PyVersion::from_hex(0x030b02f0);
        assert_eq!((v.major, v.minor, v.micro), (3, 11, Some(2)));
        assert_eq!(v.to_string(), "3.11.2");
    }
}
