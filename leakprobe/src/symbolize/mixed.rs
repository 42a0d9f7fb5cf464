//! Mixed stacks: an interpreter's frames put in place among the native ones.
//!
//! Each C call of CPython's evaluation loop (`_PyEval_EvalFrameDefault`) runs one or more
//! Python frames. The kernel side marks the outermost Python frame of each such call as its
//! entry (every frame up to 3.10; `is_entry` in 3.11; the frame above each C-stack shim from
//! 3.12). Walking both stacks innermost first, the k-th evaluation-loop frame of the native
//! stack is replaced by the k-th group of Python frames, so a C extension called from Python
//! sits between the right Python frames. Which native frames are the loop's own is the
//! runtime's to say (by address: its callers' inlined wrappers, `_PyEval_EvalFrame` up to
//! 3.10, sit next to it and must not take a group).

use super::Frame;

/// Python frames (innermost first, each with its entry flag) split into the groups each
/// evaluation-loop call ran: a group ends at an entry frame.
fn groups(python: Vec<(Frame, bool)>) -> Vec<Vec<Frame>> {
    let mut out = Vec::new();
    let mut cur = Vec::new();
    for (f, entry) in python {
        cur.push(f);
        if entry {
            out.push(std::mem::take(&mut cur));
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// `native` with each evaluation-loop frame (`is_eval`) replaced by the Python frames it ran.
/// Python frames left over (a native stack cut short, or one the unwinder could not follow
/// through the interpreter) go after the last native frame; an evaluation-loop frame with no
/// group left stays as it is.
pub fn interleave(
    native: Vec<Frame>,
    python: Vec<(Frame, bool)>,
    is_eval: impl Fn(&Frame) -> bool,
) -> Vec<Frame> {
    if python.is_empty() {
        return native;
    }
    let mut groups = groups(python).into_iter();
    let mut out = Vec::with_capacity(native.len() + 8);
    let mut last_eval = None;
    for f in native {
        if is_eval(&f) {
            match groups.next() {
                Some(g) => {
                    out.extend(g);
                    last_eval = Some(out.len());
                    continue;
                }
                None => {
                    out.push(f);
                    continue;
                }
            }
        }
        out.push(f);
    }
    // Left over: after the last group placed (the interpreter's outer frames come next), or
    // at the end when none was.
    let rest: Vec<Frame> = groups.flatten().collect();
    match last_eval {
        Some(at) if !rest.is_empty() => {
            let tail = out.split_off(at);
            out.extend(rest);
            out.extend(tail);
        }
        _ => out.extend(rest),
    }
    out
}

/// `native` (the symbolized `ips`, inlined frames before the frame they were inlined into)
/// with the frames of each JavaScript frame's return address replaced by it: `js` pairs the
/// index in `ips` with the frame. V8's JIT code has no symbols, and the interpreter's
/// trampoline stands for whichever function it runs, so the JavaScript frame is the better
/// name in both cases.
pub fn place_javascript(native: Vec<Frame>, js: Vec<(usize, Frame)>) -> Vec<Frame> {
    if js.is_empty() {
        return native;
    }
    let mut js = js.into_iter().peekable();
    let mut out = Vec::with_capacity(native.len());
    let mut group = Vec::new();
    let mut index = 0;
    for f in native {
        let last = !f.inlined;
        group.push(f);
        if !last {
            continue;
        }
        while js.peek().is_some_and(|(i, _)| *i < index) {
            js.next();
        }
        match js.next_if(|(i, _)| *i == index) {
            Some((_, f)) => {
                out.push(f);
                group.clear();
            }
            None => out.append(&mut group),
        }
        index += 1;
    }
    out.extend(group);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nat(name: &str) -> Frame {
        Frame {
            address: 0x1000,
            function: Some(name.into()),
            file: None,
            line: None,
            module: Some("/usr/bin/python3.11".into()),
            inlined: false,
            runtime: None,
            column: None,
        }
    }

    fn py(name: &str, entry: bool) -> (Frame, bool) {
        (Frame::python(0x7000, name.into(), "app.py".into(), Some(1)), entry)
    }

    /// The loop's own frames, by name here (the session goes by its address range).
    fn is_eval(f: &Frame) -> bool {
        !f.inlined && f.function.as_deref().is_some_and(|n| n.starts_with("_PyEval_EvalFrameDefault"))
    }

    fn names(frames: &[Frame]) -> Vec<&str> {
        frames.iter().map(|f| f.function.as_deref().unwrap_or("?")).collect()
    }

    #[test]
    fn a_c_extension_sits_between_the_right_python_frames() {
        // handler() calls json.loads (C), which calls back into Python (object_hook), which
        // allocates.
        let native = vec![
            nat("PyByteArray_Resize"),
            nat("_PyEval_EvalFrameDefault"),
            nat("_PyFunction_Vectorcall"),
            nat("scanner_call"),
            nat("_PyEval_EvalFrameDefault.cold"),
            nat("Py_BytesMain"),
        ];
        let python = vec![py("hook", true), py("handler", false), py("serve", false), py("<module>", true)];
        let got = interleave(native, python, is_eval);
        assert_eq!(
            names(&got),
            [
                "PyByteArray_Resize",
                "hook",
                "_PyFunction_Vectorcall",
                "scanner_call",
                "handler",
                "serve",
                "<module>",
                "Py_BytesMain"
            ]
        );
        assert_eq!(Frame::headline(&got).and_then(|f| f.function.as_deref()), Some("hook"));
    }

    #[test]
    fn the_loops_inlined_wrappers_take_no_group() {
        // 3.9/3.10: every Python frame is an entry, and each call site inlines
        // _PyEval_EvalFrame, which calls the loop.
        let mut wrapper = nat("_PyEval_EvalFrame");
        wrapper.inlined = true;
        let native = vec![
            nat("PyByteArray_Resize"),
            nat("_PyEval_EvalFrameDefault"),
            wrapper.clone(),
            nat("function_code_fastcall"),
            nat("scanner_call"),
            nat("_PyEval_EvalFrameDefault"),
            wrapper,
            nat("_PyEval_EvalCode"),
        ];
        let got = interleave(native, vec![py("keep", true), py("raw_decode", true)], is_eval);
        assert_eq!(
            names(&got),
            [
                "PyByteArray_Resize",
                "keep",
                "_PyEval_EvalFrame",
                "function_code_fastcall",
                "scanner_call",
                "raw_decode",
                "_PyEval_EvalFrame",
                "_PyEval_EvalCode"
            ]
        );
    }

    fn js(name: &str) -> Frame {
        let f = crate::runtimes::v8::JsFrame {
            function: name.into(),
            file: Some("app.js".into()),
            line: Some(3),
            column: Some(5),
        };
        Frame::javascript(0x9000, f)
    }

    #[test]
    fn javascript_frames_take_the_place_of_their_return_addresses() {
        let mut inl = nat("node::Buffer::New");
        inl.inlined = true;
        let native = vec![
            nat("node::ArrayBufferAllocator::Allocate"),
            inl,
            nat("node::Buffer::Create"),
            nat("Builtins_CallApiCallback"),
            Frame::unknown(0x3a00_0000, None),
            nat("Builtins_InterpreterEntryTrampoline"),
            nat("Builtins_JSEntry"),
        ];
        // Index 1 is Create with New inlined into it; 3 is JIT code, 4 the interpreter.
        let got = place_javascript(native, vec![(3, js("alloc")), (4, js("handler"))]);
        assert_eq!(
            names(&got),
            [
                "node::ArrayBufferAllocator::Allocate",
                "node::Buffer::New",
                "node::Buffer::Create",
                "Builtins_CallApiCallback",
                "alloc",
                "handler",
                "Builtins_JSEntry"
            ]
        );
        assert_eq!(got[5].location().as_deref(), Some("app.js:3:5"));
        assert_eq!(Frame::headline(&got).and_then(|f| f.function.as_deref()), Some("alloc"));
        // Node's own modules give way to the application's code that called them.
        let mut own = js("alloc");
        own.file = Some("node:buffer".into());
        let got = place_javascript(
            vec![nat("malloc_caller"), nat("a"), nat("b")],
            vec![(1, own), (2, js("handler"))],
        );
        assert_eq!(Frame::headline(&got).and_then(|f| f.function.as_deref()), Some("handler"));
    }

    #[test]
    fn leftover_python_frames_follow_the_last_placed_group() {
        // The native walk lost the interpreter's outer frames: two entries, one loop frame.
        let native = vec![nat("malloc_caller"), nat("_PyEval_EvalFrameDefault"), nat("main")];
        let got = interleave(native, vec![py("inner", true), py("outer", true)], is_eval);
        assert_eq!(names(&got), ["malloc_caller", "inner", "outer", "main"]);
        // No loop frame at all: Python frames after the native ones.
        let got = interleave(vec![nat("malloc_caller")], vec![py("f", false)], is_eval);
        assert_eq!(names(&got), ["malloc_caller", "f"]);
        // More loop frames than groups: the extra ones stay.
        let native = vec![nat("_PyEval_EvalFrameDefault"), nat("_PyEval_EvalFrameDefault")];
        let got = interleave(native, vec![py("f", true)], is_eval);
        assert_eq!(names(&got), ["f", "_PyEval_EvalFrameDefault"]);
        assert_eq!(Frame::headline(&got).and_then(|f| f.function.as_deref()), Some("f"));
    }
}
