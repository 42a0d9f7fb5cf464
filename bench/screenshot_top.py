#!/usr/bin/env python3
"""Takes docs/top.png, the README's picture of `leakprobe top` (root): builds the demo server,
drives its leaks, runs `leakprobe top` in a 160x32 tmux pane, captures the pane with its
colours after 12 s, and renders it with headless Chromium. Needs tmux, chromium and
`pip install ansi2html`. Run from anywhere: python3 bench/screenshot_top.py"""
import os, subprocess, sys, tempfile, threading, time, urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LP = os.path.join(ROOT, "target/release/leakprobe")


def main():
    from ansi2html import Ansi2HTMLConverter
    work = tempfile.mkdtemp(prefix="leakprobe-shot-")
    subprocess.run(["cargo", "build", "--quiet", "--release", "-p", "leakprobe"], cwd=ROOT, check=True)
    server = os.path.join(work, "leaky_server")
    subprocess.run(["gcc", "-O2", "-g", "-o", server, os.path.join(ROOT, "demo/leaky_server.c")], check=True)
    srv = subprocess.Popen([server], stdout=subprocess.PIPE, text=True)
    port = int(srv.stdout.readline().split()[2].rsplit(":", 1)[1])
    stop = threading.Event()

    def traffic():
        i = 0
        while not stop.is_set():
            path = [f"/login?user=user{i}", "/upload", "/health", "/health"][i % 4]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5).read()
            except OSError:
                pass
            i += 1
            time.sleep(0.005)

    t = threading.Thread(target=traffic)
    t.start()
    name = f"shot{os.getpid()}"
    try:
        subprocess.run(["tmux", "new-session", "-d", "-s", name, "-x", "160", "-y", "16",
                        f"cd {work} && {LP} top --pid {srv.pid} --interval 1s"], check=True)
        time.sleep(12)
        ansi = subprocess.run(["tmux", "capture-pane", "-e", "-p", "-t", name], capture_output=True,
                              text=True, check=True).stdout
        subprocess.run(["tmux", "send-keys", "-t", name, "q"])
        time.sleep(3)
    finally:
        subprocess.run(["tmux", "kill-session", "-t", name], stderr=subprocess.DEVNULL)
        stop.set(); t.join(); srv.kill(); srv.wait()
    html = Ansi2HTMLConverter(dark_bg=True, font_size="13px", title="leakprobe top").convert(ansi)
    page = os.path.join(work, "top.html")
    open(page, "w").write(html)
    out = os.path.join(ROOT, "docs/top.png")
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
                    f"--user-data-dir={work}/chrome", "--window-size=1300,330", f"--screenshot={out}",
                    f"file://{page}"], check=True, stderr=subprocess.DEVNULL)
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
