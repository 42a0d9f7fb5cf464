//! V8's object and frame layout, from the post-mortem constants (`v8dbg_*`) that every Node
//! build exports, with the few fallbacks a version lacks. Pure: built from a name → value
//! table, so it is tested without a process.

use std::collections::HashMap;

use leakprobe_common::V8Config;

/// A V8 version (`v8::internal::Version::major_` and friends).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct V8Version {
    pub major: u32,
    pub minor: u32,
    pub build: u32,
    pub patch: u32,
}

impl std::fmt::Display for V8Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}.{}", self.major, self.minor, self.build, self.patch)
    }
}

impl V8Version {
    fn at_least(&self, major: u32, minor: u32, build: u32) -> bool {
        (self.major, self.minor, self.build) >= (major, minor, build)
    }
}

/// The oldest V8 whose layout this reads (Node 18's is 10.2).
pub const OLDEST: V8Version = V8Version { major: 10, minor: 2, build: 0, patch: 0 };

/// Why a V8 layout cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LayoutError {
    #[error("no post-mortem constant {0} (v8dbg_*)")]
    Missing(String),
    #[error("V8 {0}: tagged values are {1} bytes (pointer compression), which leakprobe does not read")]
    Compressed(V8Version, u32),
    #[error("V8 {0} is older than {OLDEST}, whose layouts leakprobe reads")]
    TooOld(V8Version),
}

/// String instance-type bits (`v8dbg_StringRepresentationMask` and the tags).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StringTags {
    pub representation_mask: u16,
    pub encoding_mask: u16,
    pub one_byte: u16,
    pub seq: u16,
    pub cons: u16,
    pub sliced: u16,
    pub thin: u16,
    /// Instance types below this are strings.
    pub first_nonstring: u16,
}

/// Instance types this reader checks before it trusts an object.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Types {
    pub shared_function_info: u16,
    pub script: u16,
    pub scope_info: u16,
    pub fixed_array: u16,
}

/// Where things are, in bytes from an object's start (untagged), or from a frame pointer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Layout {
    pub version: Option<V8Version>,
    pub fp_context: i32,
    pub fp_function: i32,
    pub function_shared: u32,
    pub map_instance_type: u32,
    pub sfi_name_or_scope_info: u32,
    pub sfi_script: u32,
    pub script_name: u32,
    pub script_source: u32,
    pub script_line_ends: u32,
    pub string_length: u32,
    pub seq_one_byte_chars: u32,
    pub seq_two_byte_chars: u32,
    pub cons_first: u32,
    pub cons_second: u32,
    pub thin_actual: u32,
    pub sliced_parent: u32,
    pub sliced_offset: u32,
    pub fixed_array_length: u32,
    pub fixed_array_data: u32,
    pub scope_info_first_vars: u32,
    pub scope_info_context_locals: u32,
    /// From V8 12.8 the function's start and end positions sit at fixed ScopeInfo slots.
    pub scope_info_fixed_positions: bool,
    pub types: Types,
    pub strings: StringTags,
}

/// `v8dbg_*` constants by name (without the prefix), read from the target.
pub struct Constants(pub HashMap<String, u32>);

impl Constants {
    fn get(&self, name: &str) -> Result<u32, LayoutError> {
        self.0.get(name).copied().ok_or_else(|| LayoutError::Missing(name.to_string()))
    }

    /// `class_C__member__Type`, whatever the type's spelling (it changed across versions:
    /// `Object`, `Tagged_Object_`, ...). The first of `members` present wins.
    fn field(&self, class: &str, members: &[&str]) -> Result<u32, LayoutError> {
        for m in members {
            let prefix = format!("class_{class}__{m}__");
            if let Some((_, v)) =
                self.0.iter().filter(|(k, _)| k.starts_with(&prefix)).min_by_key(|(k, _)| k.len())
            {
                return Ok(*v);
            }
        }
        Err(LayoutError::Missing(format!("class_{class}__{}", members[0])))
    }

    /// `type_C__C_TYPE`, the instance type of class `class`.
    fn instance_type(&self, class: &str) -> Result<u16, LayoutError> {
        let prefix = format!("type_{class}__");
        self.0
            .iter()
            .filter(|(k, _)| k.starts_with(&prefix))
            .min_by_key(|(k, _)| k.len())
            .map(|(_, v)| *v as u16)
            .ok_or_else(|| LayoutError::Missing(format!("type_{class}")))
    }

    /// A frame offset: stored as a 32-bit two's complement value.
    fn fp(&self, name: &str) -> Result<i32, LayoutError> {
        self.get(&format!("off_fp_{name}")).map(|v| v as i32)
    }
}

impl Layout {
    /// The layout `c` describes, for `version`. Constants V8 stopped exporting get the value
    /// they have kept since (each noted).
    pub fn from_constants(c: &Constants, version: Option<V8Version>) -> Result<Layout, LayoutError> {
        let tagged = c.get("TaggedSize")?;
        let v = version.unwrap_or(OLDEST);
        if tagged != 8 {
            return Err(LayoutError::Compressed(v, tagged));
        }
        if version.is_some_and(|v| v < OLDEST) {
            return Err(LayoutError::TooOld(v));
        }
        let fp_function = c.fp("function")?;
        let fixed_array_length = c.field("FixedArrayBase", &["length"])?;
        let strings = StringTags {
            representation_mask: c.get("StringRepresentationMask")? as u16,
            encoding_mask: c.get("StringEncodingMask")? as u16,
            one_byte: c.get("OneByteStringTag")? as u16,
            // Zero-valued constants live in .bss and read 0, as they should.
            seq: c.get("SeqStringTag").unwrap_or(0) as u16,
            cons: c.get("ConsStringTag")? as u16,
            sliced: c.get("SlicedStringTag")? as u16,
            thin: c.get("ThinStringTag")? as u16,
            first_nonstring: c.get("FirstNonstringType")? as u16,
        };
        let types = Types {
            shared_function_info: c.instance_type("SharedFunctionInfo")?,
            script: c.instance_type("Script")?,
            scope_info: c.instance_type("ScopeInfo")?,
            fixed_array: c.instance_type("FixedArray")?,
        };
        Ok(Layout {
            version,
            fp_context: c.fp("context_or_frame_type").or_else(|_| c.fp("context"))?,
            fp_function,
            function_shared: c.field("JSFunction", &["shared"])?,
            map_instance_type: c.field("Map", &["instance_type"])?,
            sfi_name_or_scope_info: c.field("SharedFunctionInfo", &["name_or_scope_info"])?,
            sfi_script: c.field("SharedFunctionInfo", &["script_or_debug_info", "script", "raw_script"])?,
            script_name: c.field("Script", &["name"])?,
            script_source: c.field("Script", &["source"])?,
            script_line_ends: c.field("Script", &["line_ends"])?,
            string_length: c.field("String", &["length"])?,
            seq_one_byte_chars: c.field("SeqOneByteString", &["chars"])?,
            seq_two_byte_chars: c.field("SeqTwoByteString", &["chars"])?,
            cons_first: c.field("ConsString", &["first"])?,
            cons_second: c.field("ConsString", &["second"])?,
            thin_actual: c.field("ThinString", &["actual"])?,
            sliced_parent: c.field("SlicedString", &["parent"]).unwrap_or(16),
            sliced_offset: c.field("SlicedString", &["offset"])?,
            fixed_array_length,
            fixed_array_data: c.field("FixedArray", &["data"])?,
            scope_info_first_vars: c.get("scopeinfo_idx_first_vars")?,
            scope_info_context_locals: c.get("scopeinfo_idx_ncontextlocals")?,
            scope_info_fixed_positions: v.at_least(12, 8, 44),
            types,
            strings,
        })
    }

    /// What the kernel side needs to find JavaScript frames.
    pub fn bpf_config(&self) -> V8Config {
        V8Config {
            enabled: 1,
            fp_context: self.fp_context,
            fp_function: self.fp_function,
            function_shared: self.function_shared,
            _pad: 0,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The constants of Node 20.20 (V8 11.3), as its binary exports them (the ones read).
    pub(crate) fn node20() -> Constants {
        let c = [
            ("TaggedSize", 8),
            ("off_fp_context_or_frame_type", -8i32 as u32),
            ("off_fp_context", -8i32 as u32),
            ("off_fp_function", -16i32 as u32),
            ("off_fp_bytecode_array", -32i32 as u32),
            ("off_fp_bytecode_offset", -40i32 as u32),
            ("class_FixedArrayBase__length__SMI", 8),
            ("class_FixedArray__data__uintptr_t", 16),
            ("class_BytecodeArray__data__uintptr_t", 54),
            ("StringRepresentationMask", 7),
            ("StringEncodingMask", 8),
            ("OneByteStringTag", 8),
            ("SeqStringTag", 0),
            ("ConsStringTag", 1),
            ("SlicedStringTag", 3),
            ("ThinStringTag", 5),
            ("FirstNonstringType", 128),
            ("type_SharedFunctionInfo__SHARED_FUNCTION_INFO_TYPE", 262),
            ("type_Script__SCRIPT_TYPE", 167),
            ("type_ScopeInfo__SCOPE_INFO_TYPE", 261),
            ("type_BytecodeArray__BYTECODE_ARRAY_TYPE", 191),
            ("type_FixedArray__FIXED_ARRAY_TYPE", 175),
            ("type_ByteArray__BYTE_ARRAY_TYPE", 190),
            ("class_JSFunction__shared__SharedFunctionInfo", 24),
            ("class_Map__instance_type__uint16_t", 12),
            ("class_SharedFunctionInfo__name_or_scope_info__Object", 16),
            ("class_SharedFunctionInfo__script_or_debug_info__HeapObject", 32),
            ("class_Script__name__Object", 16),
            ("class_Script__source__Object", 8),
            ("class_Script__line_ends__Object", 56),
            ("class_String__length__int32_t", 12),
            ("class_SeqOneByteString__chars__char", 16),
            ("class_SeqTwoByteString__chars__char", 16),
            ("class_ConsString__first__String", 16),
            ("class_ConsString__second__String", 24),
            ("class_ThinString__actual__String", 16),
            ("class_SlicedString__parent__String", 16),
            ("class_SlicedString__offset__SMI", 24),
            ("scopeinfo_idx_first_vars", 3),
            ("scopeinfo_idx_ncontextlocals", 2),
        ];
        Constants(c.iter().map(|(k, v)| (k.to_string(), *v)).collect())
    }

    #[test]
    fn node20_constants_give_the_frame_layout() {
        let v = V8Version { major: 11, minor: 3, build: 244, patch: 8 };
        let l = Layout::from_constants(&node20(), Some(v)).unwrap();
        let cfg = l.bpf_config();
        assert_eq!((cfg.fp_context, cfg.fp_function), (-8, -16));
        assert_eq!(cfg.function_shared, 24);
        assert_eq!(l.sfi_script, 32);
        assert_eq!(l.types.shared_function_info, 262);
        assert!(!l.scope_info_fixed_positions);
    }

    #[test]
    fn compressed_pointers_and_missing_constants_are_refused() {
        let mut c = node20();
        c.0.insert("TaggedSize".into(), 4);
        assert!(matches!(Layout::from_constants(&c, None), Err(LayoutError::Compressed(_, 4))));
        let mut c = node20();
        c.0.remove("class_JSFunction__shared__SharedFunctionInfo");
        assert_eq!(
            Layout::from_constants(&c, None),
            Err(LayoutError::Missing("class_JSFunction__shared".into()))
        );
        let old = V8Version { major: 9, minor: 4, build: 0, patch: 0 };
        assert_eq!(Layout::from_constants(&node20(), Some(old)), Err(LayoutError::TooOld(old)));
    }

    #[test]
    fn renamed_fields_are_found_by_member() {
        let mut c = node20();
        c.0.remove("class_SharedFunctionInfo__script_or_debug_info__HeapObject");
        c.0.insert("class_SharedFunctionInfo__script__Tagged_HeapObject_".into(), 40);
        c.0.insert("class_SharedFunctionInfo__raw_script__Tagged_Object_".into(), 40);
        assert_eq!(Layout::from_constants(&c, None).unwrap().sfi_script, 40);
    }
}
