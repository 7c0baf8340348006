# syntax=docker/dockerfile:1
# cellgate-tagger: the sidecar in every agent pod. A static musl binary alone on scratch: it opens
# no files but its token and needs no CA certificates, users database or shell.
# Built with the workspace's release-small profile (size-optimized, fat LTO, stripped): it must stay
# tiny (see docs/benchmarks.md).
# Build from the repository root:  docker build -f deploy/docker/tagger.Dockerfile -t cellgate-tagger .
FROM rust:1.95 AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends musl-tools \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN target="$(uname -m)-unknown-linux-musl" \
 && rustup target add "$target" \
 && cargo build --profile release-small --locked -p cellgate-tagger --target "$target" \
 && install -D -m 0755 "target/$target/release-small/cellgate-tagger" /out/cellgate-tagger

FROM scratch
COPY --from=build /out/cellgate-tagger /cellgate-tagger
# The tagger's uid: cellgate-init's rules exempt exactly this uid from the redirect to the tagger.
# The operator sets runAsUser 15006 too; it must never be 0 or the agent's uid.
USER 15006:15006
ENTRYPOINT ["/cellgate-tagger"]
