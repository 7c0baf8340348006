# syntax=docker/dockerfile:1
# cellgate-init: the pod init container that installs the cell's egress rules.
#
# Not scratch or distroless: cellgate-init drives iptables-save/iptables-restore and their ip6tables
# twins, which are separate programs with shared libraries (libxtables, libnftnl, libmnl) and
# extension modules loaded at run time. Debian slim with the iptables package gives those, matched
# to each other, in about 30 MB. cellgate-init itself is still a static musl binary.
# Debian's iptables uses the nf_tables backend by default; clusters whose nodes still use the
# legacy backend can switch with `update-alternatives --set iptables /usr/sbin/iptables-legacy`
# (and ip6tables) in a derived image.
#
# Runs as root with NET_ADMIN and NET_RAW (set by the operator in the pod): changing a network
# namespace's netfilter tables needs them. It is the only Cellgate container that has them.
# Build from the repository root:  docker build -f deploy/docker/init.Dockerfile -t cellgate-init .
FROM rust:1.95 AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends musl-tools \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN target="$(uname -m)-unknown-linux-musl" \
 && rustup target add "$target" \
 && cargo build --release --locked -p cellgate-init --target "$target" \
 && install -D -m 0755 "target/$target/release/cellgate-init" /out/cellgate-init

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends iptables \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/cellgate-init /usr/local/bin/cellgate-init
USER 0:0
ENTRYPOINT ["/usr/local/bin/cellgate-init"]
