# syntax=docker/dockerfile:1
#
# One image with both kvq binaries; the Deployment's `command` picks one:
#
#   docker build -t kvq:0.1.0 .
#   docker run --rm -p 8080:8080 -e KVQ_KV_REDIS_URL=... -e KVQ_QUEUE_REDIS_URL=... kvq:0.1.0
#   docker run --rm kvq:0.1.0 kvq-api token --role writer   # needs KVQ_AUTH_JWT_SECRET
#
# Inside the image kvq-api listens on 0.0.0.0:8080 and kvq-worker's health
# and metrics on 0.0.0.0:9091 (KVQ_BIND, KVQ_WORKER_HEALTH_BIND); the
# binaries themselves keep their loopback defaults. The binaries are built
# with the `dist` profile: no debug info, stripped.
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
RUN cargo chef cook --profile dist --locked -p kvq-api -p kvq-worker --recipe-path recipe.json
COPY . .
RUN cargo build --profile dist --locked -p kvq-api -p kvq-worker --bins

# Distroless "cc": glibc, libgcc, the CA roots (for rediss:// Redis URLs)
# and nothing else: no shell, no package manager, a fraction of Debian
# slim's 74 MB. Its Debian release (12, bookworm) must match the builder's
# DEBIAN_RELEASE, so that the binaries' glibc does.
FROM gcr.io/distroless/cc-debian12:nonroot AS runtime
COPY --from=builder /src/target/dist/kvq-api /src/target/dist/kvq-worker /usr/local/bin/
# glibc's malloc with a fixed mmap threshold: blocks of 128 KiB and more
# (request bodies, values, jobs) are mapped and unmapped on their own, so
# memory goes back to the system after a burst of large writes instead of
# staying in the heap (README: "Memory").
ENV GLIBC_TUNABLES=glibc.malloc.mmap_threshold=131072
# A container is reached through its network namespace: listen on every
# interface of it. The ConfigMap sets the same.
ENV KVQ_BIND=0.0.0.0:8080 \
    KVQ_WORKER_HEALTH_BIND=0.0.0.0:9091
# Numeric, so Kubernetes' runAsNonRoot can verify it without a passwd entry.
USER 10001:10001
EXPOSE 8080 9091
LABEL org.opencontainers.image.title="kvq" \
      org.opencontainers.image.description="A key-value store whose writes go through a durable Redis queue" \
      org.opencontainers.image.licenses="MIT OR Apache-2.0"
CMD ["kvq-api"]
