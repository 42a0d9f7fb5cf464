//! CPython: recognising the runtime in a process, and naming its frames.

pub mod linetable;
