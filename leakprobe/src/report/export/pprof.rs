//! pprof's profile.proto (github.com/google/pprof, proto/profile.proto), gzipped, as
//! `go tool pprof`, Pyroscope, Parca and speedscope read it.
//!
//! One sample per call site, values `inuse_space`, `inuse_objects`, `alloc_space`,
//! `alloc_objects` (the names of Go's heap profiles, so tools pick the right views). The
//! allocation function is a label (`allocator`), not a frame: the leaf is the code that
//! called it, which is where a leak is fixed.

use std::{collections::HashMap, io::Write as _};

use super::ExportError;
use crate::report::Report;

/// The message types of profile.proto that leakprobe writes (field numbers as upstream).
pub mod proto {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Profile {
        #[prost(message, repeated, tag = "1")]
        pub sample_type: Vec<ValueType>,
        #[prost(message, repeated, tag = "2")]
        pub sample: Vec<Sample>,
        #[prost(message, repeated, tag = "3")]
        pub mapping: Vec<Mapping>,
        #[prost(message, repeated, tag = "4")]
        pub location: Vec<Location>,
        #[prost(message, repeated, tag = "5")]
        pub function: Vec<Function>,
        #[prost(string, repeated, tag = "6")]
        pub string_table: Vec<String>,
        #[prost(int64, tag = "7")]
        pub drop_frames: i64,
        #[prost(int64, tag = "8")]
        pub keep_frames: i64,
        #[prost(int64, tag = "9")]
        pub time_nanos: i64,
        #[prost(int64, tag = "10")]
        pub duration_nanos: i64,
        #[prost(message, optional, tag = "11")]
        pub period_type: Option<ValueType>,
        #[prost(int64, tag = "12")]
        pub period: i64,
        #[prost(int64, repeated, tag = "13")]
        pub comment: Vec<i64>,
        #[prost(int64, tag = "14")]
        pub default_sample_type: i64,
    }

    #[derive(Clone, Copy, PartialEq, prost::Message)]
    pub struct ValueType {
        #[prost(int64, tag = "1")]
        pub r#type: i64,
        #[prost(int64, tag = "2")]
        pub unit: i64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Sample {
        /// Leaf first.
        #[prost(uint64, repeated, tag = "1")]
        pub location_id: Vec<u64>,
        #[prost(int64, repeated, tag = "2")]
        pub value: Vec<i64>,
        #[prost(message, repeated, tag = "3")]
        pub label: Vec<Label>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Label {
        #[prost(int64, tag = "1")]
        pub key: i64,
        #[prost(int64, tag = "2")]
        pub str: i64,
        #[prost(int64, tag = "3")]
        pub num: i64,
        #[prost(int64, tag = "4")]
        pub num_unit: i64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Mapping {
        #[prost(uint64, tag = "1")]
        pub id: u64,
        #[prost(uint64, tag = "2")]
        pub memory_start: u64,
        #[prost(uint64, tag = "3")]
        pub memory_limit: u64,
        #[prost(uint64, tag = "4")]
        pub file_offset: u64,
        #[prost(int64, tag = "5")]
        pub filename: i64,
        #[prost(int64, tag = "6")]
        pub build_id: i64,
        #[prost(bool, tag = "7")]
        pub has_functions: bool,
        #[prost(bool, tag = "8")]
        pub has_filenames: bool,
        #[prost(bool, tag = "9")]
        pub has_line_numbers: bool,
        #[prost(bool, tag = "10")]
        pub has_inline_frames: bool,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Location {
        #[prost(uint64, tag = "1")]
        pub id: u64,
        #[prost(uint64, tag = "2")]
        pub mapping_id: u64,
        #[prost(uint64, tag = "3")]
        pub address: u64,
        /// Innermost first: the last line is the function the others were inlined into.
        #[prost(message, repeated, tag = "4")]
        pub line: Vec<Line>,
        #[prost(bool, tag = "5")]
        pub is_folded: bool,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Line {
        #[prost(uint64, tag = "1")]
        pub function_id: u64,
        #[prost(int64, tag = "2")]
        pub line: i64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Function {
        #[prost(uint64, tag = "1")]
        pub id: u64,
        #[prost(int64, tag = "2")]
        pub name: i64,
        #[prost(int64, tag = "3")]
        pub system_name: i64,
        #[prost(int64, tag = "4")]
        pub filename: i64,
        #[prost(int64, tag = "5")]
        pub start_line: i64,
    }
}

use proto::*;

/// The sample types, in the order of every sample's values.
pub const SAMPLE_TYPES: [(&str, &str); 4] = [
    ("inuse_space", "bytes"),
    ("inuse_objects", "count"),
    ("alloc_space", "bytes"),
    ("alloc_objects", "count"),
];

/// Strings interned into the profile's string table (index 0 is always "").
struct Strings {
    table: Vec<String>,
    index: HashMap<String, i64>,
}

impl Strings {
    fn new() -> Self {
        Strings { table: vec![String::new()], index: HashMap::from([(String::new(), 0)]) }
    }

    fn get(&mut self, s: &str) -> i64 {
        if let Some(&i) = self.index.get(s) {
            return i;
        }
        let i = self.table.len() as i64;
        self.table.push(s.to_string());
        self.index.insert(s.to_string(), i);
        i
    }
}

fn signed(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// What symbolization found for a mapping's frames, for its `has_*` flags.
#[derive(Default)]
struct Resolution {
    functions: bool,
    filenames: bool,
    lines: bool,
    inline: bool,
}

/// The class with the most bytes (ties: the more serious one), if any block was scanned.
fn dominant_class(r: &crate::report::scan::Reachability) -> Option<&'static str> {
    [
        ("definitely_lost", r.definitely_lost),
        ("indirectly_lost", r.indirectly_lost),
        ("possibly_lost", r.possibly_lost),
        ("reachable", r.reachable),
    ]
    .into_iter()
    .filter(|(_, t)| t.count > 0)
    .rev()
    .max_by_key(|(_, t)| t.bytes)
    .map(|(name, _)| name)
}

/// The profile of a report (not yet encoded).
pub fn profile(report: &Report) -> Profile {
    let mut strings = Strings::new();
    let sample_type = SAMPLE_TYPES
        .iter()
        .map(|(t, u)| ValueType { r#type: strings.get(t), unit: strings.get(u) })
        .collect();

    // The executable first: tools take the first mapping as the main binary.
    let mut modules: Vec<&crate::report::Module> = report.modules.iter().collect();
    modules.sort_by_key(|m| m.path != report.target.exe);
    let mapping_of = |address: u64| modules.iter().position(|m| (m.start..m.end).contains(&address));
    let mut resolution: Vec<Resolution> = modules.iter().map(|_| Resolution::default()).collect();

    let mut functions: Vec<Function> = Vec::new();
    let mut function_ids: HashMap<(String, Option<String>), u64> = HashMap::new();
    let mut locations: Vec<Location> = Vec::new();
    // A native location is its address; an interpreter's frame is its code object and line
    // (one code object runs many lines).
    let mut location_ids: HashMap<(u64, Option<u32>), u64> = HashMap::new();
    let allocator_key = strings.get("allocator");
    let mut samples = Vec::with_capacity(report.sites.len());

    for site in &report.sites {
        let mut location_id = Vec::new();
        for group in super::by_address(&site.frames) {
            let address = group[0].address;
            let key = (address, group[0].runtime.as_ref().and(group[0].line));
            if let Some(&id) = location_ids.get(&key) {
                location_id.push(id);
                continue;
            }
            let mapping = if group[0].runtime.is_some() { None } else { mapping_of(address) };
            let mut line = Vec::new();
            for frame in group {
                // "[unknown] module+0x..." names say only where the address is, which the
                // location's mapping and address already say: no function for them.
                let Some(name) = frame.function.as_deref().filter(|n| !n.starts_with("[unknown]")) else {
                    continue;
                };
                let key = (name.to_string(), frame.file.clone());
                let function_id = *function_ids.entry(key).or_insert_with(|| {
                    let id = functions.len() as u64 + 1;
                    let name = strings.get(name);
                    functions.push(Function {
                        id,
                        name,
                        system_name: name,
                        filename: frame.file.as_deref().map_or(0, |f| strings.get(f)),
                        start_line: 0,
                    });
                    id
                });
                line.push(Line { function_id, line: frame.line.map_or(0, i64::from) });
                if let Some(r) = mapping.map(|m| &mut resolution[m]) {
                    r.functions = true;
                    r.filenames |= frame.file.is_some();
                    r.lines |= frame.line.is_some();
                    r.inline |= frame.inlined;
                }
            }
            let id = locations.len() as u64 + 1;
            locations.push(Location {
                id,
                mapping_id: mapping.map_or(0, |m| m as u64 + 1),
                address,
                line,
                is_folded: false,
            });
            location_ids.insert(key, id);
            location_id.push(id);
        }
        samples.push(Sample {
            location_id,
            value: vec![
                signed(site.outstanding_bytes),
                signed(site.outstanding_count),
                signed(site.allocated_bytes),
                signed(site.allocated_count),
            ],
            label: {
                let mut l =
                    vec![Label { key: allocator_key, str: strings.get(&site.function), num: 0, num_unit: 0 }];
                // --scan: the class holding most of the site's bytes, and its verdict.
                if let Some(class) = site.reachability.as_ref().and_then(dominant_class) {
                    let key = strings.get("reachability");
                    l.push(Label { key, str: strings.get(class), num: 0, num_unit: 0 });
                }
                if let Some(v) = &site.verdict {
                    let key = strings.get("verdict");
                    l.push(Label { key, str: strings.get(v), num: 0, num_unit: 0 });
                }
                // pprof has no peak: the site's peak and temporaries ride as numeric labels
                // (`go tool pprof -traces` prints them per stack, `-tagfocus` filters on them).
                let (key, unit) = (strings.get("peak_bytes"), strings.get("bytes"));
                l.push(Label { key, str: 0, num: signed(site.peak_bytes), num_unit: unit });
                if let Some(t) = site.temporary_count {
                    let (key, unit) = (strings.get("temporary"), strings.get("count"));
                    l.push(Label { key, str: 0, num: signed(t), num_unit: unit });
                }
                if let Some(rule) = &site.suppressed {
                    let key = strings.get("suppressed");
                    l.push(Label { key, str: strings.get(rule), num: 0, num_unit: 0 });
                }
                l
            },
        });
    }

    // A frame of no code: a root or leaf that names what a stackless sample is.
    let frame = |n: i64, functions: &mut Vec<Function>, locations: &mut Vec<Location>| {
        let id = functions.len() as u64 + 1;
        functions.push(Function { id, name: n, system_name: n, filename: 0, start_line: 0 });
        let loc = locations.len() as u64 + 1;
        locations.push(Location {
            id: loc,
            mapping_id: 0,
            address: 0,
            line: vec![Line { function_id: id, line: 0 }],
            is_folded: false,
        });
        loc
    };
    // --census: blocks from before attach have no stack; their "stack" is their type or size,
    // under one root frame, so that flame graphs group them.
    if let Some(census) = report.scan.as_ref().and_then(|s| s.census.as_ref()) {
        let root = frame(strings.get("[heap from before attach]"), &mut functions, &mut locations);
        let origin_key = strings.get("origin");
        let before = strings.get("before-attach");
        for g in &census.groups {
            let r = &g.reachability;
            let bytes = r.lost_bytes() + r.possibly_lost.bytes + r.reachable.bytes;
            let count =
                r.definitely_lost.count + r.indirectly_lost.count + r.possibly_lost.count + r.reachable.count;
            let leaf = frame(strings.get(&g.group), &mut functions, &mut locations);
            let mut label = vec![Label { key: origin_key, str: before, num: 0, num_unit: 0 }];
            if let Some(class) = dominant_class(r) {
                let key = strings.get("reachability");
                label.push(Label { key, str: strings.get(class), num: 0, num_unit: 0 });
            }
            samples.push(Sample {
                location_id: vec![leaf, root],
                value: vec![signed(bytes), signed(count), 0, 0],
                label,
            });
        }
    }

    // A CPython target's live objects by type, under one root: a sample per type.
    if let Some(py) = report.scan.as_ref().and_then(|s| s.python_objects.as_ref()) {
        let root = frame(strings.get("[python objects]"), &mut functions, &mut locations);
        let origin =
            Label { key: strings.get("origin"), str: strings.get("python-objects"), num: 0, num_unit: 0 };
        for t in &py.types {
            let leaf = frame(strings.get(&t.label()), &mut functions, &mut locations);
            samples.push(Sample {
                location_id: vec![leaf, root],
                value: vec![signed(t.bytes), signed(t.count), 0, 0],
                label: vec![origin.clone()],
            });
        }
    }

    let mapping = modules
        .iter()
        .zip(&resolution)
        .enumerate()
        .map(|(i, (m, r))| Mapping {
            id: i as u64 + 1,
            memory_start: m.start,
            memory_limit: m.end,
            file_offset: m.file_offset,
            filename: strings.get(&m.path),
            build_id: m.build_id.as_deref().map_or(0, |b| strings.get(b)),
            has_functions: r.functions,
            has_filenames: r.filenames,
            has_line_numbers: r.lines,
            has_inline_frames: r.inline,
        })
        .collect();

    let mut comment = vec![strings.get(&format!(
        "leakprobe {}: PID {} {}, ended by {}",
        report.leakprobe.version, report.target.pid, report.target.exe, report.target.ended_by
    ))];
    if report.sampling.estimated {
        comment.push(strings.get(&format!(
            "estimated: one allocation sampled per {} bytes (--sample-bytes)",
            report.sampling.sample_bytes
        )));
    }
    if report.degraded {
        comment.push(strings.get("DEGRADED: events were dropped; figures are incomplete"));
    }
    let time_nanos = humantime::parse_rfc3339(&report.window.start)
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX));
    let period_type = ValueType { r#type: strings.get("space"), unit: strings.get("bytes") };
    let default_sample_type = strings.get(SAMPLE_TYPES[0].0);

    Profile {
        sample_type,
        sample: samples,
        mapping,
        location: locations,
        function: functions,
        drop_frames: 0,
        keep_frames: 0,
        time_nanos,
        duration_nanos: (report.window.duration_s * 1e9) as i64,
        period_type: Some(period_type),
        // Bytes between sampled allocations: every byte when all are tracked.
        period: signed(report.sampling.sample_bytes.max(1)),
        comment,
        default_sample_type,
        string_table: strings.table,
    }
}

/// The report as a gzipped profile.proto.
pub fn encode(report: &Report) -> Result<Vec<u8>, ExportError> {
    let raw = prost::Message::encode_to_vec(&profile(report));
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&raw).map_err(|source| ExportError::Gzip { source })?;
    gz.finish().map_err(|source| ExportError::Gzip { source })
}

#[cfg(test)]
mod tests {
    use std::io::Read as _;

    use prost::Message as _;

    use super::*;
    use crate::report::export::testing::report;

    fn decode(bytes: &[u8]) -> Profile {
        let mut raw = Vec::new();
        flate2::read::GzDecoder::new(bytes).read_to_end(&mut raw).expect("gzip");
        Profile::decode(raw.as_slice()).expect("profile.proto")
    }

    fn s(p: &Profile, i: i64) -> &str {
        &p.string_table[i as usize]
    }

    /// Function names of a sample's stack, leaf first, inlined lines expanded.
    fn stack(p: &Profile, sample: &Sample) -> Vec<String> {
        sample
            .location_id
            .iter()
            .flat_map(|id| {
                let loc = p.location.iter().find(|l| l.id == *id).expect("location");
                if loc.line.is_empty() {
                    return vec![format!("{:#x}", loc.address)];
                }
                loc.line
                    .iter()
                    .map(|l| {
                        let f = p.function.iter().find(|f| f.id == l.function_id).expect("function");
                        format!("{}:{}", s(p, f.name), l.line)
                    })
                    .collect()
            })
            .collect()
    }

    #[test]
    fn round_trip_through_gzip_and_protobuf() {
        let r = report();
        let p = decode(&encode(&r).unwrap());
        assert_eq!(s(&p, 0), "");
        let types: Vec<(&str, &str)> =
            p.sample_type.iter().map(|t| (s(&p, t.r#type), s(&p, t.unit))).collect();
        assert_eq!(types, SAMPLE_TYPES);
        assert_eq!(s(&p, p.default_sample_type), "inuse_space");
        assert_eq!(p.duration_nanos, 2_500_000_000);
        // 2026-01-02T03:04:05Z
        assert_eq!(p.time_nanos, 1_767_323_045_000_000_000);
        assert_eq!(p.period, 1);

        assert_eq!(p.sample.len(), 3);
        let first = &p.sample[0];
        assert_eq!(first.value, [4000, 4, 4000, 4]);
        assert_eq!(s(&p, first.label[0].key), "allocator");
        assert_eq!(s(&p, first.label[0].str), "malloc");
        assert_eq!(stack(&p, first), ["parse:40", "handle:69", "main:90"]);
        // The inlined frame and its caller are one location, innermost line first.
        assert_eq!(p.location.iter().find(|l| l.address == 0x1100).unwrap().line.len(), 2);
        assert_eq!(p.sample[1].value, [300, 1, 600, 2]);
        assert_eq!(s(&p, p.sample[1].label[0].str), "calloc");
        let keys: Vec<&str> = first.label.iter().map(|l| s(&p, l.key)).collect();
        assert_eq!(keys, ["allocator", "peak_bytes", "temporary"], "no scan, no reachability label");
        assert_eq!(first.label[1].num, first.value[0], "the fixture's peak is what it holds");
        // No symbol: an address in libc's mapping, and no function.
        assert_eq!(stack(&p, &p.sample[1]), ["cache_put;v2\nx:12", "0x7f0000001010", "main:90"]);
        assert_eq!(p.sample[2].value, [0, 0, 500, 6]);
        // `main` is one location and one function, shared by every stack.
        assert_eq!(p.location.iter().filter(|l| l.address == 0x1900).count(), 1);
        assert_eq!(p.function.iter().filter(|f| s(&p, f.name) == "main").count(), 1);
        let main = p.function.iter().find(|f| s(&p, f.name) == "main").unwrap();
        assert_eq!(s(&p, main.filename), "/src/app.c");
    }

    #[test]
    fn python_object_types_are_samples_under_one_root() {
        use crate::report::scan::{PythonObjects, PythonType, Scan};
        let mut r = report();
        let ty = |module: &str, qualname: &str, count, bytes| PythonType {
            module: module.into(),
            qualname: qualname.into(),
            count,
            untracked: 0,
            bytes,
            count_change: None,
            sites: Vec::new(),
        };
        r.scan = Some(Scan {
            python_objects: Some(PythonObjects {
                types: vec![ty("__main__", "Node", 6000, 336_000), ty("builtins", "tuple", 50, 3200)],
                ..PythonObjects::default()
            }),
            ..Scan::default()
        });
        let p = decode(&encode(&r).unwrap());
        let py: Vec<&Sample> =
            p.sample.iter().filter(|x| x.label.iter().any(|l| s(&p, l.str) == "python-objects")).collect();
        assert_eq!(py.len(), 2);
        assert_eq!(stack(&p, py[0]), ["__main__.Node:0", "[python objects]:0"]);
        assert_eq!(py[0].value, [336_000, 6000, 0, 0]);
        assert_eq!(stack(&p, py[1]), ["tuple:0", "[python objects]:0"]);
    }

    #[test]
    fn a_scanned_site_carries_its_reachability_and_verdict() {
        use crate::report::scan::{ClassTally, Reachability};
        let mut r = report();
        r.sites[0].reachability = Some(Reachability {
            definitely_lost: ClassTally { bytes: 3000, count: 3 },
            reachable: ClassTally { bytes: 1000, count: 1 },
            ..Reachability::default()
        });
        r.sites[0].verdict = Some("LEAK".into());
        let p = profile(&r);
        let labels: Vec<(&str, &str)> = p.sample[0]
            .label
            .iter()
            .filter(|l| l.num_unit == 0)
            .map(|l| (s(&p, l.key), s(&p, l.str)))
            .collect();
        assert_eq!(
            labels,
            [("allocator", "malloc"), ("reachability", "definitely_lost"), ("verdict", "LEAK")]
        );
        assert_eq!(
            p.sample[1].label.iter().filter(|l| l.num_unit == 0).count(),
            1,
            "not scanned: the allocator only"
        );
    }

    #[test]
    fn mappings_say_what_symbolization_found() {
        let p = profile(&report());
        // The executable first, then libc.
        let names: Vec<&str> = p.mapping.iter().map(|m| s(&p, m.filename)).collect();
        assert_eq!(names, ["/usr/bin/app", "/usr/lib/libc.so.6"]);
        let (app, libc) = (&p.mapping[0], &p.mapping[1]);
        assert_eq!((app.memory_start, app.memory_limit, app.file_offset), (0x1000, 0x2000, 0));
        assert_eq!(s(&p, app.build_id), "abcd");
        assert!(app.has_functions && app.has_filenames && app.has_line_numbers && app.has_inline_frames);
        assert_eq!(libc.build_id, 0);
        assert_eq!(libc.file_offset, 0x2000);
        assert!(!libc.has_functions && !libc.has_filenames && !libc.has_line_numbers);
        let unknown = p.location.iter().find(|l| l.address == 0x7f00_0000_1010).unwrap();
        assert_eq!(unknown.mapping_id, libc.id);
        assert!(unknown.line.is_empty());
    }

    #[test]
    fn python_frames_are_a_location_per_line_and_a_function_per_code_object() {
        use crate::report::export::testing::{frame, site};
        let py = |line| {
            crate::symbolize::Frame::python(
                0x7f55_0000_1000,
                "cache_user".into(),
                "/srv/app.py".into(),
                Some(line),
            )
        };
        let mut r = report();
        r.sites = vec![
            site(
                "malloc",
                (4000, 4),
                (4000, 4),
                vec![frame(0x1100, Some("PyByteArray_Resize"), None, false), py(40)],
            ),
            site(
                "malloc",
                (2000, 2),
                (2000, 2),
                vec![frame(0x1100, Some("PyByteArray_Resize"), None, false), py(41)],
            ),
        ];
        let p = decode(&encode(&r).unwrap());
        assert_eq!(stack(&p, &p.sample[0]), ["PyByteArray_Resize:0", "cache_user:40"]);
        assert_eq!(stack(&p, &p.sample[1]), ["PyByteArray_Resize:0", "cache_user:41"]);
        assert_eq!(p.function.iter().filter(|f| s(&p, f.name) == "cache_user").count(), 1);
        let py_locs: Vec<&Location> = p.location.iter().filter(|l| l.address == 0x7f55_0000_1000).collect();
        assert_eq!(py_locs.len(), 2, "one location per line");
        assert!(py_locs.iter().all(|l| l.mapping_id == 0), "an interpreter's frame is in no mapping");
    }

    #[test]
    fn sampling_and_drops_are_stated() {
        let mut r = report();
        r.sampling.sample_bytes = 524_288;
        r.sampling.estimated = true;
        r.degraded = true;
        let p = profile(&r);
        assert_eq!(p.period, 524_288);
        let comments: Vec<&str> = p.comment.iter().map(|c| s(&p, *c)).collect();
        assert!(comments.iter().any(|c| c.starts_with("estimated")), "{comments:?}");
        assert!(comments.iter().any(|c| c.starts_with("DEGRADED")), "{comments:?}");
    }

    #[test]
    fn the_profile_carries_leakprobes_mark() {
        let bytes = encode(&report()).unwrap();
        assert_eq!(crate::output::mark::recognise(&bytes), Some("leakprobe pprof profile"));
        // Another tool's profile (no leakprobe comment) is not ours.
        let mut other = profile(&report());
        other.comment.clear();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(&other.encode_to_vec()).unwrap();
        assert_eq!(crate::output::mark::recognise(&gz.finish().unwrap()), None);
    }
}
