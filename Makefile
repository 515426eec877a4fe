# The two commands of README's quick start. Both create or reuse .venv through scripts/setup.sh.
.PHONY: setup run test lint

PROMPT ?= In two sentences, what is confidential computing?

setup:
	@bash scripts/setup.sh

run: setup
	.venv/bin/veil generate --chat --max-tokens 96 --prompt "$(PROMPT)"

lint: setup
	.venv/bin/ruff check src tests

test: lint
	.venv/bin/pytest
