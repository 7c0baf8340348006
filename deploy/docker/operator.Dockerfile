# syntax=docker/dockerfile:1
# cellgate-operator: the control plane. Static musl binary on distroless/static (CA certificates,
# /etc/passwd with the nonroot user, nothing else: no shell, no package manager).
# Build from the repository root:  docker build -f deploy/docker/operator.Dockerfile -t cellgate-operator .
FROM rust:1.95 AS build
# musl-gcc: ring (rustls's crypto) compiles C and assembly for the musl target.
RUN apt-get update \
 && apt-get install -y --no-install-recommends musl-tools \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN target="$(uname -m)-unknown-linux-musl" \
 && rustup target add "$target" \
 && cargo build --release --locked -p cellgate-operator --target "$target" \
 && install -D -m 0755 "target/$target/release/cellgate-operator" /out/cellgate-operator

FROM gcr.io/distroless/static-debian12:nonroot
# /etc/ssl/certs/ca-certificates.crt (distroless ships Debian's bundle) is the default
# --system-roots: the public roots put beside the cell CA in every agent's trust bundle.
COPY --from=build /out/cellgate-operator /usr/local/bin/cellgate-operator
# distroless's nonroot user; the Deployment also sets runAsNonRoot.
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/cellgate-operator"]
