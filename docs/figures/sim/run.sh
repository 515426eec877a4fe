#!/bin/sh
# The small real-bench runs the simulator is validated against (docs/sim.md, "Validation").
set -x
V="nice -n 19 env PYTHONPATH=src /work/main/.venv/bin/python -m veil.cli.main bench"
$V transfer --json > out/validate/transfer.json
$V model --batch-sizes 1 8 --new-tokens 16 --repeats 2 --json > out/validate/model.json
$V offload --batch-sizes 8 --new-tokens 8 --prompt-tokens 16 --prefill-tokens 32 --host-dtypes fp32 --repeats 1 --json --out out/validate/offload > out/validate/offload.json
$V kvswap --requests 8 --mean-output 16 --max-output 32 --levels 0.3 --json --out out/validate/kvswap > out/validate/kvswap.json
$V lora --adapters 8 --slots 2 --requests 12 --mean-output 8 --max-output 16 --max-num-seqs 4 --repeats 1 --json --out out/validate/lora > out/validate/lora.json
