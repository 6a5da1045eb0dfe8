#!/usr/bin/env bash
# The one prepared GPU session of issue 18: the tiny-model tests on CUDA, then bench/bench_gpu.py.
#
#   OUT=gpu_out bench/gpu_check.sh [TOKENIZER_DIR DATA_DIR]
#
# Runs from the repository root with the machine's own python3, torch, transformers and peft
# (loraens travels as source: PYTHONPATH=src). Every log goes under $OUT as it is written, so a run
# cut short keeps what it did. TOKENIZER_DIR: a folder with SmolLM2's tokenizer files; DATA_DIR: a
# mirror with arc_easy/{train,validation}.jsonl (default: loraens' own lookup for both).
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src:$PWD" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
TOK=${1:+--tokenizer $1}
DATA=${2:+--data-dir $2}
{ nvidia-smi; python3 -c "import sys, torch, transformers, peft; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'peft', peft.__version__)"; } > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt" | tail -3

# The tiny-model suite on CUDA (the files whose tests build models; xdist spreads them over workers).
TESTS="tests/test_scoring.py tests/test_train.py tests/test_packing.py tests/test_last_layer.py tests/test_prefix.py
       tests/test_attention.py tests/test_methods.py tests/test_ensemble.py tests/test_speed.py tests/test_head.py
       tests/test_compiling.py tests/test_device.py tests/test_cli.py tests/test_distributed.py tests/test_sweep.py"
XDIST=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8")
LORAENS_TEST_DEVICE=cuda timeout 150 python3 -m pytest -q -p no:cacheprovider -m "not slow" $XDIST $TESTS \
    > "$OUT/tests_cuda.log" 2>&1
echo "tests on CUDA: exit $? ($(tail -1 "$OUT/tests_cuda.log"))"

timeout 420 python3 bench/bench_gpu.py $TOK $DATA --budget 360 --log-dir "$OUT" --out '' > "$OUT/bench_gpu.log" 2>&1
echo "bench_gpu.py: exit $?"
tail -5 "$OUT/bench_gpu.log"
