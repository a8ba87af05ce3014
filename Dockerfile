# syntax=docker/dockerfile:1
#
# activescale container image. Not built in CI (no Docker engine there):
#
#   docker build -t activescale:dev .
#
# Two stages: a Debian 12 Rust toolchain builds a release binary, and the
# binary runs on distroless/cc (glibc, libgcc, CA certificates, no shell) as
# the non-root user 65532. The builder is Debian 12 too, so the binary's glibc
# matches the runtime's.

ARG RUST_VERSION=1.95

FROM docker.io/library/rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src

# Dependencies first, in their own layer: this step re-runs only when the
# manifests, build script or proto change, not on every source edit. The
# throw-away sources give cargo something to compile; build.rs (protox, no
# system protoc) runs for real here because proto/ is already present.
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto ./proto
RUN mkdir src \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && cargo build --release --locked --bin activescale \
    && rm -rf src

# The real sources. Touching the entry points makes cargo rebuild the crate
# itself even where a dummy file's timestamp is newer.
COPY src ./src
RUN touch src/main.rs src/lib.rs \
    && cargo build --release --locked --bin activescale \
    && cp target/release/activescale /activescale

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /activescale /activescale
USER 65532:65532
# 9000: Envoy metrics sink (gRPC); 9090: KEDA external scaler (gRPC);
# 8080: /healthz, /readyz, /metrics, /v1/pods.
EXPOSE 9000 9090 8080
ENTRYPOINT ["/activescale", "serve"]
