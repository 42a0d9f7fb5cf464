//! The session's side of the reachability scan: the kernel's live blocks in, the report's
//! per-site classes, holders and cycles out.

use std::collections::HashMap;

use anyhow::Context as _;
use leakprobe_common::{AllocKind, COUNT_SCALE, LiveBlock, SiteKey};

use super::{StackCache, site_frames};
use crate::{
    kernel::probe::Probes,
    report::scan::{Cycle, CycleSite, Holder, Reachability, Scan, ScanPoint, SiteResult},
    scan::{self, mark},
    symbolize::Symbolizer,
};

/// One scan's results, ready for the report.
#[derive(Clone)]
pub struct Done {
    pub scan: Scan,
    pub sites: Vec<SiteResult>,
    pub definitely_lost_bytes: u64,
}

/// The blocks to classify: every tracked heap block (mmap regions are roots, not blocks, as in
/// valgrind). A stale entry overlapping a newer block at the same place (its free went
/// unseen) is dropped.
fn blocks(live: Vec<(u64, LiveBlock)>) -> (Vec<mark::Block>, Vec<LiveBlock>, Vec<SiteKey>, u64) {
    let mut live: Vec<(u64, LiveBlock)> =
        live.into_iter().filter(|(_, b)| AllocKind::from_u32(b.kind) != Some(AllocKind::Mmap)).collect();
    live.sort_unstable_by_key(|(a, _)| *a);
    let mut kept: Vec<(u64, LiveBlock)> = Vec::with_capacity(live.len());
    let mut stale = 0;
    for (addr, b) in live {
        if let Some((last_addr, last)) = kept.last_mut()
            && addr < *last_addr + last.size.max(1)
        {
            stale += 1;
            if b.timestamp_ns > last.timestamp_ns {
                *last_addr = addr;
                *last = b;
            }
            continue;
        }
        kept.push((addr, b));
    }
    let mut keys: Vec<SiteKey> = Vec::new();
    let mut index: HashMap<SiteKey, u32> = HashMap::new();
    let mut out = Vec::with_capacity(kept.len());
    let mut weights = Vec::with_capacity(kept.len());
    for (addr, b) in kept {
        let key = SiteKey { stack_id: b.stack_id, kind: b.kind, _pad: 0 };
        let site = *index.entry(key).or_insert_with(|| {
            keys.push(key);
            (keys.len() - 1) as u32
        });
        out.push(mark::Block { start: addr, size: b.size, site });
        weights.push(b);
    }
    (out, weights, keys, stale)
}

/// A site in a few words: its allocation function and the innermost frame that is the
/// program's own (not the allocator's, not the C++ library's plumbing).
pub fn site_label(key: &SiteKey, stacks: &StackCache, symbolizer: &mut Symbolizer) -> String {
    let func = AllocKind::from_u32(key.kind).map_or("alloc", |k| k.name());
    let (frames, _) = site_frames(key, stacks, symbolizer);
    let plumbing = |f: &str| {
        f.starts_with("std::")
            || f.starts_with("__gnu_cxx::")
            || f.starts_with("operator new")
            || f.starts_with("alloc::")
            || f.starts_with("__rust")
            || f.contains("malloc")
    };
    let caller = frames
        .iter()
        .filter_map(|f| f.function.as_deref())
        .find(|f| !plumbing(f))
        .or_else(|| frames.first().and_then(|f| f.function.as_deref()))
        .unwrap_or("?");
    format!("{func} in {caller}")
}

/// Scans `pid` now and turns the result into report pieces.
#[allow(clippy::too_many_arguments)]
pub fn run(
    pid: i32,
    probes: &Probes,
    exclude: Vec<(u64, u64)>,
    max_pause: std::time::Duration,
    glibc: bool,
    at_s: f64,
    history: &mut Vec<ScanPoint>,
    stacks: &StackCache,
    symbolizer: &mut Symbolizer,
) -> anyhow::Result<Done> {
    let live = probes.live_blocks().context("reading the tracked blocks")?;
    let (blocks, weights, keys, stale) = blocks(live);
    if stale > 0 {
        tracing::info!("{stale} stale tracked blocks overlapped newer ones and were left out of the scan");
    }
    let req = scan::Request {
        pid,
        blocks,
        exclude,
        max_pause,
        no_clone: false,
        allocator_tail: glibc.then_some(scan::glibc_next_chunk as fn(u64, u64) -> Option<u64>),
    };
    let out = scan::scan(&req)?;
    let m = &out.marking;
    if std::env::var_os("LEAKPROBE_DEBUG_SCAN").is_some() {
        for (o, b) in m.blocks.iter().zip(&req.blocks) {
            eprintln!("scan-debug {:#x}+{} {:?} {:?}", b.start, b.size, o.class, o.retainer);
        }
    }

    // Classes per site, weighted (an estimate per block when sampling).
    let mut per_site: Vec<Reachability> = vec![Reachability::default(); keys.len()];
    let mut raw_bytes = vec![0u64; keys.len()];
    let mut totals = Reachability::default();
    for ((o, b), w) in m.blocks.iter().zip(&req.blocks).zip(&weights) {
        let r = &mut per_site[b.site as usize];
        raw_bytes[b.site as usize] += b.size;
        let (bytes, count) = (w.weight_bytes, w.weight_count);
        let (site_class, total_class) = match o.class {
            mark::Class::DefinitelyLost => (&mut r.definitely_lost, &mut totals.definitely_lost),
            mark::Class::IndirectlyLost => (&mut r.indirectly_lost, &mut totals.indirectly_lost),
            mark::Class::PossiblyLost => (&mut r.possibly_lost, &mut totals.possibly_lost),
            mark::Class::Reachable => (&mut r.reachable, &mut totals.reachable),
        };
        site_class.add(bytes, count);
        total_class.add(bytes, count);
    }
    // Counts were summed in 1/COUNT_SCALE units.
    let unscale = |r: &mut Reachability| {
        for c in [&mut r.definitely_lost, &mut r.indirectly_lost, &mut r.possibly_lost, &mut r.reachable] {
            c.count = c.count.div_ceil(COUNT_SCALE);
        }
    };
    per_site.iter_mut().for_each(unscale);
    unscale(&mut totals);
    // A site's raw bytes stand for this many estimated bytes.
    let scale = |site: usize, raw: u64| -> u64 {
        let est: u64 = {
            let r = &per_site[site];
            r.lost_bytes() + r.possibly_lost.bytes + r.reachable.bytes
        };
        if raw_bytes[site] == 0 {
            raw
        } else {
            (raw as f64 * est as f64 / raw_bytes[site] as f64).round() as u64
        }
    };

    let mut labels: HashMap<u32, String> = HashMap::new();
    let mut label = |site: u32, symbolizer: &mut Symbolizer| -> String {
        labels.entry(site).or_insert_with(|| site_label(&keys[site as usize], stacks, symbolizer)).clone()
    };
    let mut cycle_bytes = vec![0u64; keys.len()];
    let mut cycles = Vec::new();
    for c in &m.cycles.list {
        let mut sites = Vec::new();
        let mut bytes = 0;
        for s in &c.sites {
            let est = scale(s.site as usize, s.bytes);
            cycle_bytes[s.site as usize] += est;
            bytes += est;
            sites.push(CycleSite {
                stack_id: format!("{:016x}", keys[s.site as usize].stack_id),
                site: label(s.site, symbolizer),
                blocks: s.blocks,
            });
        }
        cycles.push(Cycle { blocks: c.blocks, bytes, sites });
    }

    let mut results = Vec::new();
    for s in &m.sites {
        let i = s.site as usize;
        let key = keys[i];
        let holders = s
            .holders
            .iter()
            .map(|h| {
                let (kind, holder) = match h.by {
                    mark::HeldBy::Root(r) => match out.holders.get(&r) {
                        Some(n) => {
                            // A stack slot: the function whose frame holds it.
                            let func = n.frame_ip.and_then(|ip| {
                                symbolizer.symbolize(&[ip]).into_iter().find_map(|f| f.function)
                            });
                            let name = match func {
                                Some(f) => format!("{}, in {f}", n.name),
                                None => n.name.clone(),
                            };
                            (n.kind.to_string(), name)
                        }
                        None => ("root".to_string(), format!("root {}", r.root)),
                    },
                    mark::HeldBy::Site(other) => (
                        "site".to_string(),
                        format!(
                            "blocks of {} (stack {:016x})",
                            label(other, symbolizer),
                            keys[other as usize].stack_id
                        ),
                    ),
                };
                Holder { kind, holder, blocks: h.blocks, bytes: scale(i, h.bytes), chain: h.longest_chain }
            })
            .collect();
        results.push(SiteResult {
            stack_id: format!("{:016x}", key.stack_id),
            function: AllocKind::from_u32(key.kind)
                .map_or_else(|| format!("kind {}", key.kind), |k| k.name().into()),
            reachability: per_site[i],
            holders,
            cycle_bytes: cycle_bytes[i],
        });
    }

    // A site held by another site's blocks: show the chain to that site's own root holder,
    // e.g. "global sessions (leaky) -> 471 blocks of calloc in session_create".
    let root_of: HashMap<String, String> = results
        .iter()
        .filter_map(|r| {
            let h = r.holders.first().filter(|h| h.kind != "site")?;
            Some((r.stack_id.clone(), h.holder.clone()))
        })
        .collect();
    for r in results.iter_mut() {
        for h in r.holders.iter_mut().filter(|h| h.kind == "site") {
            if let Some((_, id)) = h.holder.rsplit_once("(stack ")
                && let Some(root) = root_of.get(id.trim_end_matches(')'))
            {
                h.holder = format!("{root} -> {}", h.holder);
            }
        }
    }

    let mut roots: std::collections::BTreeMap<String, u64> =
        out.root_bytes.iter().map(|(k, v)| (k.to_string(), *v)).collect();
    roots.insert("registers".into(), m.stats.root_values);
    history.push(ScanPoint {
        t_s: at_s,
        pause_ms: out.pause.as_secs_f64() * 1e3,
        definitely_lost_bytes: totals.definitely_lost.bytes,
        indirectly_lost_bytes: totals.indirectly_lost.bytes,
        possibly_lost_bytes: totals.possibly_lost.bytes,
        reachable_bytes: totals.reachable.bytes,
    });
    let scan = Scan {
        at_s,
        method: out.method.name().into(),
        no_clone_why: out.no_clone_why.clone(),
        pause_ms: out.pause.as_secs_f64() * 1e3,
        reap_pause_ms: out.reap_pause.as_secs_f64() * 1e3,
        duration_ms: out.duration.as_secs_f64() * 1e3,
        threads: out.threads as u64,
        bytes_read: m.stats.bytes_read,
        blocks_scanned: m.stats.blocks,
        roots,
        unreadable_bytes: m.stats.unreadable_bytes + out.unread_bytes,
        totals,
        cycles,
        cycles_rest: m.cycles.rest.count,
        cycles_complete: m.cycles.complete,
        history: history.clone(),
    };
    Ok(Done { definitely_lost_bytes: totals.definitely_lost.bytes, scan, sites: results })
}
