#![no_std]
// The programs live in main.rs; this lib target only lets the daemon build-depend on us.
