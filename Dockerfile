# One image with every Tandem binary role (operator, GFD, replica, LFD, client):
#   docker build -t tandem:0.1.0 .
# Build stage: the release binary (protoc comes vendored, nothing else to install).
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin tandem \
 && cp target/release/tandem /tandem

# Runtime: glibc and CA certificates only, no shell, a non-root user.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /tandem /usr/local/bin/tandem
USER 65532:65532
# 7000 clients, 17000 the internal plane (mutual TLS), 7100 the GFD.
EXPOSE 7000 17000 7100
ENTRYPOINT ["/usr/local/bin/tandem"]
