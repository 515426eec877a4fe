# The two commands of README's quick start. Both create or reuse .venv through scripts/setup.sh.
.PHONY: setup run test lint

PROMPT ?= In two sentences, what is confidential computing?

setup:
	@bash scripts/setup.sh

# The main job: a chat answer from the bundled model on the emulated confidential device, every
# decoder layer's weights sealed with AES-256-GCM and streamed in by the pipellm transport.
run: setup
	.venv/bin/veil generate --chat --max-tokens 64 --offload 1.0 --transport pipellm --prompt "$(PROMPT)"

lint: setup
	.venv/bin/ruff check src tests

test: lint
	.venv/bin/pytest
