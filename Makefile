# The two commands of README's quick start. Both create or reuse .venv through scripts/setup.sh.
.PHONY: setup run test lint

PROMPT ?= Alice Smith lives at 42 Baker Street in London. She works as a nurse, and in her free time she

setup:
	@bash scripts/setup.sh

# The main job (`veil demo`): a confidential server on the bundled model (PipeLLM streaming sealed
# weights into a device smaller than the model) and a CMIF client (attested enclave, DP-sanitized
# prompt sent as embeddings), end to end on loopback, then what protected what and what it cost.
run: setup
	.venv/bin/veil demo --prompt "$(PROMPT)"

lint: setup
	.venv/bin/ruff check src tests

test: lint
	.venv/bin/pytest
