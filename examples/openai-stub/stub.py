#!/usr/bin/env python3
"""A stub of an OpenAI-compatible chat endpoint: POST /v1/chat/completions.

With "stream": true it answers server-sent events, one chunk every 0.4 s, flushed as written, so a
client sees them arrive one by one. It logs the Authorization header it received (to show that
Cellgate injected the key the agent never had). Python standard library only.

usage: stub.py --listen 127.0.0.1:8443 --cert leaf.pem --key leaf.key --log upstream.log
"""
import argparse, json, ssl, sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

EXPECTED = None  # the key the stub accepts, read from --key-file


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):
        pass

    def _json(self, status, obj):
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        auth = self.headers.get("authorization")
        with open(ARGS.log, "a") as log:
            log.write(f"upstream saw: {self.command} {self.path} Authorization: {auth}\n")
        length = int(self.headers.get("content-length") or 0)
        req = json.loads(self.rfile.read(length) or b"{}")
        if self.path != "/v1/chat/completions":
            return self._json(404, {"error": {"message": "not found"}})
        if EXPECTED and auth != f"Bearer {EXPECTED}":
            return self._json(401, {"error": {"message": "Incorrect API key provided", "type": "invalid_request_error"}})
        words = ["Hello", " from", " the", " stub", " model", "."]
        if not req.get("stream"):
            return self._json(200, {"id": "chatcmpl-stub", "object": "chat.completion", "model": req.get("model", "stub"),
                                    "choices": [{"index": 0, "finish_reason": "stop",
                                                 "message": {"role": "assistant", "content": "".join(words)}}]})
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("cache-control", "no-cache")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()

        def chunk(data):
            raw = f"data: {data}\n\n".encode()
            self.wfile.write(f"{len(raw):x}\r\n".encode() + raw + b"\r\n")
            self.wfile.flush()

        for w in words:
            chunk(json.dumps({"id": "chatcmpl-stub", "object": "chat.completion.chunk", "model": req.get("model", "stub"),
                              "choices": [{"index": 0, "delta": {"content": w}, "finish_reason": None}]}))
            time.sleep(0.4)
        chunk("[DONE]")
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--listen", default="127.0.0.1:8443")
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--key-file", help="the API key the stub accepts")
    p.add_argument("--log", default="upstream.log")
    ARGS = p.parse_args()
    if ARGS.key_file:
        EXPECTED = open(ARGS.key_file).read().strip()
    host, port = ARGS.listen.rsplit(":", 1)
    srv = ThreadingHTTPServer((host, int(port)), Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(ARGS.cert, ARGS.key)
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    print(f"stub listening on https://{ARGS.listen}", flush=True)
    srv.serve_forever()
