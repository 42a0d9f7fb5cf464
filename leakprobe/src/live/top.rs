//! `leakprobe top`: the live terminal view.
