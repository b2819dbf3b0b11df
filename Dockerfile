# syntax=docker/dockerfile:1
# Builder: compiles the host. (Plugins join the build with the plugin issue.)
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p wasmbassador

# Runtime: small, non-root, the binary as entrypoint.
FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 65532 --no-create-home wasmbassador
COPY --from=build /src/target/release/wasmbassador /usr/local/bin/wasmbassador
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/wasmbassador"]
CMD ["run", "--config", "/etc/wasmbassador/wasmbassador.toml"]
