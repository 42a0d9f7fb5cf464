//! CPython: recognising the runtime in a process, and naming its frames.

pub mod code;
pub mod layout;
pub mod linetable;
