# syntax=docker/dockerfile:1
# cellgate-node: the per-node proxy. Static musl binary on distroless/static, which carries the
# Debian CA certificates the node verifies upstream TLS against (plus any --upstream-ca).
# Non-root: its ports (15001, 15053, 15021, 15011) are above 1024, it sets no iptables rules and
# reads the original destination from the PPv2 header, so it needs no capability.
# Build from the repository root:  docker build -f deploy/docker/node.Dockerfile -t cellgate-node .
FROM rust:1.95 AS build
# musl-gcc: ring (rustls's crypto) compiles C and assembly for the musl target.
RUN apt-get update \
 && apt-get install -y --no-install-recommends musl-tools \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN target="$(uname -m)-unknown-linux-musl" \
 && rustup target add "$target" \
 && cargo build --release --locked -p cellgate-node --target "$target" \
 && install -D -m 0755 "target/$target/release/cellgate-node" /out/cellgate-node

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /out/cellgate-node /usr/local/bin/cellgate-node
USER 65532:65532
EXPOSE 15001 15053/udp 15053/tcp 15021 15011
ENTRYPOINT ["/usr/local/bin/cellgate-node"]
