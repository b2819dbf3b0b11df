# syntax=docker/dockerfile:1
#
# wasmbassador container image.
#
#   docker build -t wasmbassador .
#   docker run --rm wasmbassador --version
#
# Layout of the final image:
#   /usr/local/bin/wasmbassador              the binary (the ENTRYPOINT)
#   /usr/lib/wasmbassador/plugins/*.wasm     the ready-made plugins (allow_list.wasm,
#                                            access_log.wasm, route_by_database.wasm,
#                                            bearer_token.wasm, header_router.wasm,
#                                            http_metrics.wasm)
#   /etc/wasmbassador/wasmbassador.toml      a default config (admin on 127.0.0.1:9901,
#                                            no listeners); mount your own elsewhere
#                                            and pass `run --config FILE`
# It runs as the distroless "nonroot" user (65532:65532) and has no shell: the
# Kubernetes probes use `wasmbassador probe ...`, which needs nothing but the binary.

# --- Builder for the host binary --------------------------------------------------
FROM rust:1.95-bookworm AS host
WORKDIR /src
COPY . .
# The cache mounts keep the registry and the target folder between builds; the binary
# is copied out of the cached target folder in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p wasmbassador \
    && install -D -s -m 0755 target/release/wasmbassador /out/wasmbassador

# --- Builder for the ready-made plugins (wasm32-wasip2 components) ----------------
# A separate stage, so BuildKit builds it alongside the host. The repository's
# .cargo/config.toml (copied with the sources) sets the plugins' 64 KiB stack; it is
# read because the build runs from the repository root.
FROM rust:1.95-bookworm AS plugins
WORKDIR /src
RUN rustup target add wasm32-wasip2
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/plugins/target \
    cargo build --manifest-path plugins/Cargo.toml --target wasm32-wasip2 --release --locked \
        -p allow-list -p access-log -p route-by-database \
        -p bearer-token -p header-router -p http-metrics \
    && mkdir -p /out \
    && cp plugins/target/wasm32-wasip2/release/allow_list.wasm \
          plugins/target/wasm32-wasip2/release/access_log.wasm \
          plugins/target/wasm32-wasip2/release/route_by_database.wasm \
          plugins/target/wasm32-wasip2/release/bearer_token.wasm \
          plugins/target/wasm32-wasip2/release/header_router.wasm \
          plugins/target/wasm32-wasip2/release/http_metrics.wasm /out/

# --- Runtime ---------------------------------------------------------------------
# distroless/cc: glibc, libgcc, CA certificates (for `tls.roots = "system"`) and a
# non-root user, nothing else. The binary links only libc, libm and libgcc_s.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=host /out/wasmbassador /usr/local/bin/wasmbassador
COPY --from=plugins /out/ /usr/lib/wasmbassador/plugins/
COPY examples/container/wasmbassador.toml /etc/wasmbassador/wasmbassador.toml
USER 65532:65532
# Documentation only: the listener ports come from the config. The admin server binds
# 127.0.0.1 by default and is not reachable from outside the pod.
EXPOSE 9901
ENTRYPOINT ["/usr/local/bin/wasmbassador"]
CMD ["run", "--config", "/etc/wasmbassador/wasmbassador.toml"]
