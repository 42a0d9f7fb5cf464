use crate::symbolize::Frame;
use leakprobe_common::PyConfig;
pub struct Names;
impl Names {
    pub fn detect(_pid: i32) -> (Option<Names>, Option<String>) {
        (None, None)
    }
    pub fn config(&self) -> PyConfig {
        PyConfig::default()
    }
    pub fn frames(&mut self, _w: &[u64]) -> Vec<(Frame, bool)> {
        Vec::new()
    }
}
