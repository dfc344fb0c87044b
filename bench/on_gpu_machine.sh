#!/usr/bin/env bash
# bench-gpu on a machine whose Python already has torch with CUDA but not this project's
# other packages (a lent GPU machine, say). Wheels for what it lacks go in .whl/ beforehand
# (bitsandbytes, peft, transformers at the versions pyproject.toml allows); they are installed
# into a scratch folder, never over the machine's own packages. Then:
#   bash bench/on_gpu_machine.sh              both shapes, no profile (about 8 minutes on an H100, an estimate)
#   SIZES=8b PROFILE=1 bash bench/on_gpu_machine.sh
#   SIZES=8b SKIP=none bash bench/on_gpu_machine.sh   every experiment (the default leaves out bench.gpu.DEFAULT_SKIP)
#   TESTS=1 bash bench/on_gpu_machine.sh      also the test suite, on the GPU, first
#   TESTS=tests/test_lora_triton.py bash ...  only those test files first (the Triton kernel compiled on the GPU)
#   PRODUCTS=1 bash bench/on_gpu_machine.sh   then bench/lora_products.py (batch-1 LoRA products, ~1 min)
#   BENCH=0 PRODUCTS=1 bash ...               that one alone
#   NF4=1 bash bench/on_gpu_machine.sh        then bench/nf4_decode.py (the fused NF4 kernel vs bitsandbytes, batch 1 and 16)
#   TESTS=tests/test_nf4_kernel.py BENCH=0 NF4=1 bash ...   its checks compiled on the GPU, then that bench alone
# Results go to $OUT (or bench/results/): gpu.json, gpu.log, gpu-profile.txt, tests.log,
# lora-products.json and .log, nf4-decode.json and .log.
set -o pipefail
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
out=${OUT:-bench/results}
mkdir -p "$out"
python3 -c "import torch, bitsandbytes, peft, transformers; assert torch.cuda.is_available(), 'no GPU'; print(torch.cuda.get_device_name(), torch.__version__, bitsandbytes.__version__, peft.__version__, transformers.__version__)" || exit 1
if [ -n "$TESTS" ]; then
    # gradio and a browser are not on such machines: the live-server and browser tests are left out.
    [ "$TESTS" = 1 ] && TESTS=tests
    timeout "${TESTS_TIMEOUT:-240}" python3 -m pytest -q -p no:cacheprovider --ignore=tests/test_server.py \
        --ignore=tests/test_browser.py $TESTS 2>&1 | tee "$out/tests.log"
fi
if [ "${BENCH:-1}" != 0 ]; then
    timeout "${BENCH_TIMEOUT:-540}" python3 -m bench.gpu --sizes ${SIZES:-8b 1b} --out "$out/gpu.json" ${SKIP:+--skip $SKIP} \
        ${PROFILE:+--profile} 2>&1 | tee "$out/gpu.log"
    status=$?
fi
if [ -n "$PRODUCTS" ]; then
    timeout "${PRODUCTS_TIMEOUT:-55}" python3 -m bench.lora_products --out "$out/lora-products.json" 2>&1 | tee "$out/lora-products.log"
fi
if [ -n "$NF4" ]; then
    timeout "${NF4_TIMEOUT:-240}" python3 -m bench.nf4_decode --out "$out/nf4-decode.json" 2>&1 | tee "$out/nf4-decode.log"
fi
exit ${status:-0}
