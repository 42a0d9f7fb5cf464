//! **Layer: the reachability scan.** Why memory is kept: capture a consistent picture of the
//! live process ([`snapshot`], through the ptrace layer), name the places a pointer can live
//! ([`roots`]), mark from them ([`mark`], pure), and classify each tracked block as
//! definitely, indirectly or possibly lost, or still reachable, with what holds it.

pub mod roots;
pub mod snapshot;
