# The wire observer: runs in the HOST network namespace as root, on the host end of the cell's
# veth pair, and prints one JSON line per frame the cell sends. A frame is "expected" only if it
# is ARP, or IPv4 to the node on the host end of the link: TCP to the intake (15001) or DNS
# (53, UDP or TCP). Everything else that leaves the cell is reported as unexpected.
import json, socket, struct, sys

ifname, host_ip = sys.argv[1], sys.argv[2]
# Protocol 0 at creation: the socket receives nothing until it is bound to the interface (a
# socket created with ETH_P_ALL would queue frames of every interface, loopback included, until
# bind). Frames are also checked for the interface they came from.
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
s.bind((ifname, 3))  # ETH_P_ALL; CPython converts the address tuple to network order
print(json.dumps({"ready": True}), flush=True)
while True:
    try:
        data, addr = s.recvfrom(65535)
    except OSError:
        break
    if addr[0] != ifname or addr[2] == socket.PACKET_OUTGOING:
        continue
    f = {"len": len(data)}
    eth = struct.unpack("!H", data[12:14])[0]
    if eth == 0x0806:
        f.update(eth="arp", expected=True)
    elif eth == 0x0800:
        ihl = (data[14] & 0x0F) * 4
        proto = data[23]
        f.update(eth="ipv4", proto=proto, src=socket.inet_ntoa(data[26:30]), dst=socket.inet_ntoa(data[30:34]))
        if proto in (6, 17):
            f["sport"], f["dport"] = struct.unpack("!HH", data[14 + ihl:18 + ihl])
        f["expected"] = f["dst"] == host_ip and (
            (proto == 6 and f.get("dport") in (15001, 53)) or (proto == 17 and f.get("dport") == 53))
    elif eth == 0x86DD:
        f.update(eth="ipv6", next=data[20], src=socket.inet_ntop(socket.AF_INET6, data[22:38]),
                 dst=socket.inet_ntop(socket.AF_INET6, data[38:54]), expected=False)
    else:
        f.update(eth="0x%04x" % eth, expected=False)
    print(json.dumps(f), flush=True)
