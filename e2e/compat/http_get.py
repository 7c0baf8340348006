#!/usr/bin/env python3
"""GET each URL with Python's urllib or requests, no TLS options: the default trust only.

usage: http_get.py urllib|requests URL...
Prints one line per URL: STATUS PROTOCOL BODY (the body on one line).
"""
import sys


def via_urllib(url):
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=20) as r:
            return r.status, r.version, r.read()
    except urllib.error.HTTPError as e:  # a 403 is an answer too
        return e.code, getattr(e.fp, "version", None), e.read()


def via_requests(url):
    import requests

    r = requests.get(url, timeout=20)
    return r.status_code, r.raw.version, r.content


def main():
    client, urls = sys.argv[1], sys.argv[2:]
    if client == "requests":
        import requests

        print("client requests", requests.__version__, file=sys.stderr)
    get = {"urllib": via_urllib, "requests": via_requests}[client]
    for url in urls:
        status, version, body = get(url)
        proto = {10: "HTTP/1.0", 11: "HTTP/1.1", 20: "HTTP/2"}.get(version, "-")
        print(status, proto, body.decode().strip().replace("\n", " "), flush=True)


main()
