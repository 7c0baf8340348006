#!/usr/bin/env python3
"""Reads a server-sent-event stream incrementally with urllib, no TLS options.

usage: sse_client.py URL
Prints one line per `data:` line: SECONDS-SINCE-THE-REQUEST DATA.
"""
import sys
import time
import urllib.request

start = time.monotonic()
with urllib.request.urlopen(sys.argv[1], timeout=20) as r:
    print("status", r.status, r.headers.get("content-type"), flush=True)
    while True:
        line = r.readline()  # returns as soon as one line has arrived
        if not line:
            break
        line = line.decode().rstrip("\r\n")
        if line.startswith("data:"):
            print("%.3f %s" % (time.monotonic() - start, line), flush=True)
