# Sourced by scripts/check-cuda and scripts/gpu-check: a CUDA 13 compiler
# from NVIDIA's PyPI wheels in a venv (no toolkit installed, no GPU needed),
# and the environment candle's build scripts look for. See check-cuda for
# why these wheels.
# Pinned, mutually consistent CUDA 13.0 wheels (cudarc 0.19 knows 13.0).
wheels=(
    "nvidia-cuda-nvcc==13.0.88"
    "nvidia-nvvm==13.0.88"
    "nvidia-cuda-crt==13.0.88"
    "nvidia-cuda-runtime==13.0.96"
    "nvidia-cuda-cccl==13.0.85"
)
venv=${HELEXA_CUDA_VENV:-/var/tmp/helexa-cuda-venv}
export CARGO_TARGET_DIR=${HELEXA_CUDA_TARGET_DIR:-/var/tmp/helexa-cuda-target}
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-80}

for tool in python3 g++ cargo; do
    command -v "$tool" >/dev/null 2>&1 || {
        echo "cuda-wheels: $tool not found (g++: apt-get install g++ / dnf install gcc-c++)" >&2
        exit 1
    }
done

stamp=$venv/.helexa-wheels
if [ "$(cat "$stamp" 2>/dev/null)" != "${wheels[*]}" ]; then
    echo "== CUDA wheels into $venv" >&2
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check "${wheels[@]}"
    echo "${wheels[*]}" > "$stamp"
fi
cuda_root=$("$venv/bin/python" -c 'import os, nvidia; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')
[ -x "$cuda_root/bin/nvcc" ] || { echo "cuda-wheels: no nvcc in $cuda_root/bin" >&2; exit 1; }

# nvcc finds cicc, libdevice, its headers and CCCL relative to itself
# (bin/nvcc.profile); the build scripts look for nvcc on PATH and for the
# toolkit in CUDA_ROOT/CUDA_PATH/CUDA_HOME.
export PATH=$cuda_root/bin:$PATH
export CUDA_ROOT=$cuda_root CUDA_PATH=$cuda_root CUDA_HOME=$cuda_root
export LD_LIBRARY_PATH=$cuda_root/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
echo "== $(nvcc --version | tail -2 | head -1); compute capability $CUDA_COMPUTE_CAP; target dir $CARGO_TARGET_DIR" >&2

