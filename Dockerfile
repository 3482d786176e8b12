# The predictor sidecar's image: the `meshserve` binary and ONNX Runtime's library, on
# Debian slim, as a non-root user. It is what `meshserve render` puts in docker-compose and
# in Kubernetes Deployments (--image):
#   docker build -t ghcr.io/meshserve/meshserve:0.1.0 .
# The Envoy filters are packaged apart: filters/wasm/Dockerfile or scripts/package-wasm.py.
# For GPUs, build with ONNXRUNTIME_PACKAGE=onnxruntime-gpu on a CUDA base image.
ARG RUST_VERSION=1.89
ARG ONNXRUNTIME_VERSION=1.31.1

FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p meshserve --bin meshserve

FROM python:3.11-slim-bookworm AS onnxruntime
ARG ONNXRUNTIME_VERSION
ARG ONNXRUNTIME_PACKAGE=onnxruntime
RUN pip install --no-cache-dir --target /ort "${ONNXRUNTIME_PACKAGE}==${ONNXRUNTIME_VERSION}" \
 && mkdir /out && cp /ort/onnxruntime/capi/libonnxruntime*.so* /out/

FROM debian:bookworm-slim
ARG ONNXRUNTIME_VERSION
COPY --from=onnxruntime /out/ /usr/lib/meshserve/
COPY --from=build /src/target/release/meshserve /usr/local/bin/meshserve
ENV ORT_DYLIB_PATH=/usr/lib/meshserve/libonnxruntime.so.${ONNXRUNTIME_VERSION} \
    MESHSERVE_HOST=0.0.0.0 \
    MESHSERVE_LOG_FORMAT=json
USER 65532:65532
EXPOSE 8080 8081
ENTRYPOINT ["/usr/local/bin/meshserve"]
# KServe's convention: the model at /mnt/models.
CMD ["serve", "--storage", "/mnt/models"]
