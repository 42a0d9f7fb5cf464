//! **Layer: kernel side.** Loads the embedded eBPF programs, decides where each probe goes,
//! feeds them `.eh_frame` unwind rows, attaches them and reads their maps. May use `target` (what
//! to hook) and `model` types (what the maps mean); the only layer that calls bpf(2).

pub mod btf;
pub mod doctor;
pub mod placement;
pub mod preflight;
pub mod probe;
pub mod unwind;
