//! CPython: recognising the runtime in a process, and naming its frames.
