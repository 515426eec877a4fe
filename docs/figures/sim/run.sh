#!/bin/sh
# The small real-bench runs the simulator is validated against (docs/sim.md, "Validation").
# Usage: sh docs/figures/sim/run.sh [DIR] (default out/validate). Every figure is a best of 3:
# offload and lora take each transport's best of 3 interleaved rounds (--repeats 3); kvswap has no
# --repeats, so it runs 3 times and the validation takes each transport's best run.
# DIR/cpu.log gets the machine's cpu line of /proc/stat before and after each bench: user time there
# is other people's (un-niced) work, nice time is ours.
set -x
D=${1:-out/validate}
mkdir -p "$D"
V="nice -n 19 env PYTHONPATH=src /work/main/.venv/bin/python -m veil.cli.main bench"
run() { name=$1; shift; echo "$name start $(head -1 /proc/stat)" >> "$D/cpu.log"; "$@"; echo "$name end $(head -1 /proc/stat)" >> "$D/cpu.log"; }
run transfer $V transfer --json > "$D/transfer.json"
run model $V model --batch-sizes 1 8 --new-tokens 16 --repeats 2 --json > "$D/model.json"
run offload $V offload --batch-sizes 8 --new-tokens 8 --prompt-tokens 16 --prefill-tokens 32 --host-dtypes fp32 --repeats 3 --json --out "$D/offload" > "$D/offload.json"
for i in 1 2 3; do
  run kvswap-$i $V kvswap --requests 8 --mean-output 32 --max-output 64 --levels 0.3 --json --out "$D/kvswap-$i" > "$D/kvswap-$i.json"
done
run lora $V lora --adapters 8 --slots 2 --requests 12 --mean-output 8 --max-output 16 --max-num-seqs 4 --repeats 3 --json --out "$D/lora" > "$D/lora.json"
