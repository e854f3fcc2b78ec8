# Source this to build, test or run by hand exactly as `make` does:
#   source scripts/env.sh && cargo test
# It only sets variables; scripts/setup is what installs the files they point at.
_alignx_dir="$(cd "$(dirname "${BASH_SOURCE[0]:-$0}")" && pwd)"
. "$_alignx_dir/deps.sh"
unset _alignx_dir

# tch's build script finds libtorch here; our build.rs files turn it into an rpath.
export LIBTORCH="$TORCH_PREFIX/torch"
# The ort crate loads ONNX Runtime at run time (feature load-dynamic).
export ORT_DYLIB_PATH="${ORT_DYLIB_PATH:-$ORT_PREFIX/libonnxruntime.so.$ORT_VERSION}"
# The Kafka-protocol broker used by tests and the demo.
export ALIGNX_TANSU="${ALIGNX_TANSU:-$TANSU_PREFIX/tansu}"
# Python packages of the chart tests (helm-python-sdk, kubernetes-validate).
export ALIGNX_CHART_TOOLS="${ALIGNX_CHART_TOOLS:-$CHART_TOOLS_PREFIX}"
# moto's S3 server (Python packages), the persistent storage of tansu in restart tests.
export ALIGNX_MOTO="${ALIGNX_MOTO:-$MOTO_PREFIX}"
# libtorch's OpenMP pool would fight test threads on this small machine.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
