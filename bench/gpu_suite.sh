#!/usr/bin/env bash
# The GPU test lane: every CUDA test of the suite, compiled Triton (not the interpreter), on a GPU machine.
# Run it on the device (the .whl folder carries llama-cpp-python, gguf, transformers and exllamav2, which
# the GPU image lacks); it writes the pytest output to $OUT/gpu_suite.log (default bench/results/).
#   bash bench/gpu_suite.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench/results}"
mkdir -p "$out"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD"
fi
# the converter (no registry there to fetch the sdist): a copy in .devcarry/llama.cpp, if carried
[ -d .devcarry/llama.cpp ] && export DQ_LLAMA_CPP_DIR="$PWD/.devcarry/llama.cpp"
unset TRITON_INTERPRET
python3 -c "import torch, triton; assert torch.cuda.is_available(); print(torch.cuda.get_device_name(), 'torch', torch.__version__, 'triton', triton.__version__)" | tee "$out/gpu_suite.log"
python3 -m pytest -q -p no:cacheprovider -rs \
    tests/kernels tests/analysis/test_device_path.py \
    "tests/analysis/test_damage_gradients.py::test_streamed_damage_equals_whole_model" \
    "tests/evals/test_gguf_torch.py::test_bf16_gguf_gives_the_hf_models_logits" \
    "tests/export/test_quantize_tiny.py::test_cuda_quantizer_writes_llama_cpps_file" 2>&1 | tee -a "$out/gpu_suite.log"
