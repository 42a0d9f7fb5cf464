"""Prints the line-table fixtures of leakprobe/src/runtimes/cpython/linetable_fixtures.rs.

Run with each interpreter (3.9 ... 3.13): it compiles one function with multi-line
statements, a 300-line gap, a line longer than 255 bytes of bytecode and a loop, and prints
its table and PyCode_Addr2Line (the interpreter's own answer, through ctypes) for every
code unit, as runs (start byte, end byte, line).
"""
import sys, ctypes
A2L = ctypes.pythonapi.PyCode_Addr2Line
A2L.argtypes = [ctypes.py_object, ctypes.c_int]
A2L.restype = ctypes.c_int
SRC = (
    "def f(a,\n"
    "      b):\n"
    "    x = [i\n"
    "         for i in range(a)]\n"
    "    try:\n"
    "        y = (a +\n"
    "             b)\n"
    "    except Exception:\n"
    "        y = None\n"
    + "\n" * 300 +
    "    z = " + " + ".join(["a"] * 90) + "\n"
    "    for i in range(3):\n"
    "        if i: continue\n"
    "    return (x,\n"
    "            y, z)\n"
)
mod = compile(SRC, "fx.py", "exec")
f = [c for c in mod.co_consts if hasattr(c, "co_code")][0]
table = f.co_lnotab if sys.version_info < (3, 10) else f.co_linetable
n = len(f.co_code)
rle = []
for off in range(0, n, 2):
    line = A2L(f, off)
    if rle and rle[-1][2] == line and rle[-1][1] == off:
        rle[-1][1] = off + 2
    else:
        rle.append([off, off + 2, line])
v = "%d%d" % sys.version_info[:2]
print("const FX_%s: Fixture = Fixture {" % v)
print("    firstlineno: %d," % f.co_firstlineno)
print('    table: "%s",' % table.hex())
print("    code_bytes: %d," % n)
print("    lines: &[%s]," % ", ".join("(%d, %d, %d)" % tuple(r) for r in rle))
print("};")
