# The two commands of the README: `make demo` and `make test`. Every target first runs
# scripts/setup (idempotent; seconds on a warm cache) and builds with the paths of
# scripts/env.sh, so a bare machine needs nothing else.

SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
ENV := source scripts/env.sh &&

.PHONY: setup build test demo bench fuzz soak check fmt hf-parity

setup:
	@scripts/setup

build: setup
	$(ENV) cargo build --workspace --bins

## Run every test: unit, contract, golden, CLI and runtime smoke tests (nextest: one
## process per test, so each loads native runtimes afresh).
test: setup
	$(ENV) cargo nextest run --workspace --no-fail-fast

## Run the main job on the embedded default. ARGS are passed to scripts/demo.
demo: build
	$(ENV) scripts/demo $(ARGS)

## Benchmarks (not tests): JSON under target/bench/.
bench: setup
	$(ENV) cargo bench -p alignx-trainer --bench trainer -- $(CURDIR)/target/bench/trainer.json
	$(ENV) cargo bench -p alignx-tests --bench onnx -- $(CURDIR)/target/bench/onnx.json
	$(ENV) cargo bench -p alignx-tests --bench engine -- $(CURDIR)/target/bench/engine.json
	$(ENV) cargo build --release -p alignx-consumer --bin alignx-consumer
	$(ENV) cargo bench -p alignx-tests --bench pipeline -- $(CURDIR)/target/bench/pipeline.json

## Fuzz the signal gate and the prompt/answer protocol (RUNS executions per target,
## default 1,000,000; not part of `make test`, which replays the kept corpus).
fuzz:
	scripts/fuzz

## A bounded soak with faults (kill -9 of consumer, Redis or broker on a schedule), ending
## with the exactly-once audit and a memory bound; JSON in target/bench/soak.json.
DURATION ?= 10m
soak: build
	$(ENV) target/debug/alignx-soak --duration $(DURATION) $(ARGS)

## Qwen2 logits and greedy decoding against Hugging Face transformers, both ways
## (installs a Python oracle once; not part of `make test`).
hf-parity: setup
	scripts/hf-parity

## Formatting and lints (not part of `make test`).
check:
	$(ENV) cargo fmt --all --check && cargo clippy --workspace --all-targets -- -D warnings

fmt:
	cargo fmt --all
