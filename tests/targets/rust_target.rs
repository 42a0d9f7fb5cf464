// Test target (Rust): leaks with Box::leak and a growing Vec of boxed buffers; churns
// temporaries that are all freed.
// Protocol as alloc_funcs.c: "ready"; "leak" -> "done"; "exit".
use std::hint::black_box;
use std::io::{BufRead, Write};

#[inline(never)]
fn leak_box() -> &'static mut [u8; 4096] {
    Box::leak(black_box(Box::new([7u8; 4096])))
}

#[inline(never)]
fn grow_registry(registry: &mut Vec<Box<[u8]>>) {
    registry.push(black_box(vec![1u8; 1500].into_boxed_slice()));
}

#[inline(never)]
fn churn() {
    for i in 0..300 {
        let v: Vec<u64> = black_box(vec![i; 50 + i as usize]);
        let s = black_box(format!("temporary {i} {}", v.len()));
        black_box((v, s));
    }
}

fn main() {
    let mut registry: Vec<Box<[u8]>> = Vec::with_capacity(1024);
    let stdin = std::io::stdin();
    let mut out = std::io::stdout();
    writeln!(out, "ready").unwrap();
    out.flush().unwrap();
    for line in stdin.lock().lines() {
        let Ok(line) = line else { break };
        match line.trim() {
            "leak" => {
                for _ in 0..3 {
                    black_box(leak_box());
                }
                for _ in 0..20 {
                    grow_registry(&mut registry);
                }
                churn();
                writeln!(out, "done").unwrap();
                out.flush().unwrap();
            }
            "exit" => break,
            _ => {}
        }
    }
    black_box(&registry);
}
