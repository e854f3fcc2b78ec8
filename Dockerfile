# syntax=docker/dockerfile:1
# One image for the chart: alignx-consumer and alignx-trainer, with ONNX Runtime (CPU and
# CUDA execution providers) and libtorch (CUDA 13) in place. The native versions are the
# ones scripts/deps.sh pins; everything comes from PyPI and crates.io, as in scripts/setup.
# This repository's CI has no container engine, so this file is not built there.
#
#   docker build -t alignx-stream:0.1.0 .

ARG RUST_VERSION=1.92
FROM rust:${RUST_VERSION}-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-pip cmake \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY scripts/deps.sh scripts/deps.sh
# libtorch with its CUDA dependencies (nvidia-* wheels), and the onnxruntime-gpu wheel's
# libraries (core, shared provider bridge, CUDA provider).
RUN . scripts/deps.sh \
 && python3 -m pip install --break-system-packages --no-compile --target /opt/torch "torch==$TORCH_VERSION" \
 && python3 -m pip download --no-deps --only-binary=:all: -d /tmp/ort "onnxruntime-gpu==$ORT_VERSION" \
 && python3 -m zipfile -e /tmp/ort/*.whl /tmp/ort/wheel \
 && mkdir -p /opt/ort \
 && cp /tmp/ort/wheel/onnxruntime/capi/libonnxruntime.so.* \
       /tmp/ort/wheel/onnxruntime/capi/libonnxruntime_providers_*.so /opt/ort/ \
 && rm -rf /tmp/ort
COPY . .
# LIBTORCH's lib directory becomes the binaries' rpath (trainer/build.rs), so the runtime
# stage keeps the same path.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    LIBTORCH=/opt/torch/torch cargo build --release --locked -p alignx-consumer -p alignx-trainer \
 && install -D -m 0755 target/release/alignx-consumer target/release/alignx-trainer -t /out/bin

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libgomp1 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/torch/torch/lib /opt/torch/torch/lib
COPY --from=build /opt/torch/nvidia /opt/torch/nvidia
COPY --from=build /opt/ort /opt/ort
COPY --from=build /out/bin/ /usr/local/bin/
# The CUDA libraries of the nvidia-* wheels and ONNX Runtime's providers on the loader's
# path; on a machine without a GPU the consumer's `--device auto` falls back to the CPU.
RUN find /opt/torch/nvidia -name 'lib*.so*' -printf '%h\n' | sort -u > /etc/ld.so.conf.d/alignx.conf \
 && echo /opt/ort >> /etc/ld.so.conf.d/alignx.conf \
 && ldconfig
# Keep in step with ORT_VERSION in scripts/deps.sh.
ENV ORT_DYLIB_PATH=/opt/ort/libonnxruntime.so.1.31.1 \
    OMP_NUM_THREADS=1
# The chart runs as this user with a read-only root filesystem (/tmp is an emptyDir).
USER 65532:65532
ENTRYPOINT []
CMD ["alignx-consumer", "--help"]
