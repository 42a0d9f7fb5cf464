"""A Python program whose memory is held by module globals (tests/python_holders.rs, issue 23).
py_holders.py: fills a module-level dict `cache` (48 KiB bytearrays by user) and a list
`listeners` (closures) before it prints "ready", then keeps adding one of each every few
milliseconds until killed. The containers themselves are from before any attach; what goes
into them after is allocated at the two lines marked CACHE and LISTENERS. It also keeps 50
bytes objects of 10000 bytes in `blobs` (over 512 bytes: malloc's blocks, not pymalloc's), and
4 KiB bytearrays in `main`'s own variable `pending`, which no global reaches (PENDING)."""
import time

cache = {}
listeners = []
blobs = [bytes(10000) for _ in range(50)]


def remember(user):
    cache[user] = bytearray(48 * 1024)  # CACHE


def subscribe(i):
    def on_event(event):  # LISTENERS
        return event, i
    listeners.append(on_event)


def main():
    pending = []  # held by this frame's variable only
    for i in range(100):
        remember(f"early-{i}")
        subscribe(i)
    print("ready", flush=True)
    i = 0
    while True:
        remember(f"user-{i}")
        subscribe(i)
        pending.append(bytearray(4096))  # PENDING
        i += 1
        time.sleep(0.004)


main()
