# syntax=docker/dockerfile:1
#
# One image with both kvq binaries; the Deployment's `command` picks one:
#
#   docker build -t kvq:0.1.0 .
#   docker run --rm kvq:0.1.0 kvq-api token --role writer   # needs KVQ_AUTH_JWT_SECRET
#
# Build and runtime share one Debian release, so the binaries' glibc matches.
ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS chef
RUN cargo install cargo-chef --locked --version 0.1.78
WORKDIR /src

# The recipe is the workspace's manifests and lock file only, so the next
# stage's dependency layer is reused until those change.
FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS builder
COPY --from=planner /src/recipe.json recipe.json
RUN cargo chef cook --release --locked -p kvq-api -p kvq-worker --recipe-path recipe.json
COPY . .
RUN cargo build --release --locked -p kvq-api -p kvq-worker --bins

FROM debian:${DEBIAN_RELEASE}-slim AS runtime
# ca-certificates: the system roots, for rediss:// (TLS) Redis URLs.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=builder /src/target/release/kvq-api /src/target/release/kvq-worker /usr/local/bin/
# glibc's malloc with a fixed mmap threshold: blocks of 128 KiB and more
# (request bodies, values, jobs) are mapped and unmapped on their own, so
# memory goes back to the system after a burst of large writes instead of
# staying in the heap (README: "Memory").
ENV GLIBC_TUNABLES=glibc.malloc.mmap_threshold=131072
# Numeric, so Kubernetes' runAsNonRoot can verify it without a passwd entry.
USER 10001:10001
EXPOSE 8080 9091
LABEL org.opencontainers.image.title="kvq" \
      org.opencontainers.image.description="A key-value store whose writes go through a durable Redis queue" \
      org.opencontainers.image.licenses="MIT OR Apache-2.0"
CMD ["kvq-api"]
