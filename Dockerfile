# A small static non-root image with the controller and the xero-token CLI.
# Build: docker build -t ghcr.io/xero-operator/xero-operator:0.1.0 .
FROM rust:1.95-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends musl-tools && rm -rf /var/lib/apt/lists/* \
 && rustup target add x86_64-unknown-linux-musl
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
# The workspace's other member (the proving ground: emulator, control plane, benchmarks) must be
# present for Cargo to load the workspace; only the product is built.
COPY proving-ground ./proving-ground
RUN cargo build --release --locked --target x86_64-unknown-linux-musl -p xero-operator --bin xero-operator --bin xero-token

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /src/target/x86_64-unknown-linux-musl/release/xero-operator /xero-operator
COPY --from=build /src/target/x86_64-unknown-linux-musl/release/xero-token /xero-token
USER 65532:65532
ENTRYPOINT ["/xero-operator"]
