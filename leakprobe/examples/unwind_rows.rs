//! Prints the unwind rows leakprobe builds for an ELF file, or the row covering an address.
//! Usage: cargo run --example unwind_rows -- FILE [VADDR_HEX]
fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let path = args.get(1).ok_or_else(|| anyhow::anyhow!("usage: unwind_rows FILE [VADDR_HEX]"))?;
    let table = leakprobe::kernel::unwind::build(&std::fs::read(path)?)?;
    println!("{} rows; segments {:x?}", table.rows.len(), table.segments);
    match args.get(2).map(|a| u64::from_str_radix(a.trim_start_matches("0x"), 16)).transpose()? {
        Some(addr) => {
            let idx = table.rows.partition_point(|r| r.pc <= addr);
            for r in &table.rows[idx.saturating_sub(2)..(idx + 1).min(table.rows.len())] {
                println!("{r:x?}");
            }
        }
        None => table.rows.iter().take(20).for_each(|r| println!("{r:x?}")),
    }
    Ok(())
}
