//! **Layer: in-process sampling.** What to patch in the target and the stub it points to;
//! may use [`crate::target`] and `ptrace/`.

pub mod got;
pub mod guard;
pub mod install;
pub mod place;
pub mod stub;
