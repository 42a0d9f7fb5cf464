"""A WSGI app for gunicorn's pre-fork workers (issue 25): each request caches a 48 KiB
bytearray per user in a module-level dict, the seed's "Python web app, global cache" leak, and
answers with the worker's PID so that a test knows who served it. Everything else a request
allocates is freed."""

import os

CACHE = {}


def cache_user(user):
    CACHE[user] = bytearray(48 * 1024)  # the leak: one buffer per user, never dropped


def render(user):
    page = ["<p>%s</p>" % user for _ in range(20)]  # temporaries, freed at return
    return "".join(page)


def app(environ, start_response):
    user = "u%d" % len(CACHE)
    cache_user(user)
    render(user)
    body = ("pid %d\n" % os.getpid()).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
