#!/usr/bin/env python3
"""A WebSocket client (the `websockets` package), no TLS options: the default trust only.

usage: ws_client.py ALLOWED_URL DENIED_URL
Sends a text and a binary message on ALLOWED_URL and prints the echoes; then opens DENIED_URL and
prints the HTTP status and body of the refusal.
"""
import sys

import websockets
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

print("client websockets", websockets.version.version, file=sys.stderr)
allowed, denied = sys.argv[1], sys.argv[2]
with connect(allowed, open_timeout=20) as ws:
    ws.send("hello through the cell")
    print("echo text:", ws.recv(timeout=20), flush=True)
    ws.send(b"\x00\x01binary\xff")
    print("echo binary:", ws.recv(timeout=20).hex(), flush=True)
try:
    with connect(denied, open_timeout=20):
        print("denied: connected (unexpected)")
except InvalidStatus as e:
    r = e.response
    print("denied:", r.status_code, r.body.decode().strip(), flush=True)
