# syntax=docker/dockerfile:1
#
# activescale container image. Not built in CI (no Docker engine there):
#
#   docker build -t activescale:dev .
#
# A Debian 12 Rust toolchain builds a release binary, which runs on
# distroless/cc (glibc, libgcc, CA certificates, no shell) as the non-root
# user 65532. Builder and runtime are both Debian 12, so the binary's glibc
# matches. The only network access during the build is crates.io.

ARG RUST_VERSION=1.95

FROM docker.io/library/rust:${RUST_VERSION}-bookworm AS chef
RUN cargo install cargo-chef --locked
WORKDIR /src

# The recipe holds only the manifests and Cargo.lock (with stub targets for
# every lib, bin, test and bench they declare), so it changes, and the
# dependency layer below is rebuilt, only when dependencies change.
FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS build
COPY --from=planner /src/recipe.json recipe.json
# Builds every dependency, build-dependencies included (tonic-build,
# protox: no system protoc), into a cached layer.
RUN cargo chef cook --release --recipe-path recipe.json
COPY . .
RUN cargo build --release --locked --bin activescale \
    && cp target/release/activescale /activescale

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /activescale /activescale
# Numeric, so that Kubernetes' runAsNonRoot can verify it.
USER 65532:65532
# 9000: Envoy metrics sink (gRPC); 9090: KEDA external scaler (gRPC);
# 8080: /healthz, /readyz, /metrics, /v1/pods; 8081: the activator proxy
# (when activator_addr is set); 6443: the Custom Metrics API (HTTPS, when
# custom_metrics_addr is set).
EXPOSE 9000 9090 8080 8081 6443
ENTRYPOINT ["/activescale", "serve"]
