# One venv, installed from this repo. `make demo` and `make test` install first if needed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# DeepSpeed: no op pre-builds by pip; ops JIT-built on first use are cached here between runs.
export DS_BUILD_OPS := 0
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.torch_extensions
export HF_HUB_OFFLINE := 1
ENGINE ?= cpu

.PHONY: install browser demo demo-real lint test test-e2e test-faults test-real test-fast bench clean

# the three real model folders (.venv/bin/python ../shared/models/fetch_real_models.py DIR builds them)
REAL_MODELS ?= models/real

install: $(VENV)/.installed-$(ENGINE)
ifeq ($(ENGINE),cpu)
install: $(TORCH_EXTENSIONS_DIR)/deepspeed_shm_comm/deepspeed_shm_comm.so
endif

$(VENV)/.installed-$(ENGINE): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
ifeq ($(ENGINE),cpu)
	# CPU build of torch first, so nothing later pulls a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[cpu,test,bench]'
	# PyPI's torchvision/torchaudio break `transformers` imports beside this torch.
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec || true
else
	$(BIN)/pip install -q -e '.[gpu,test,bench]'
endif
	touch $@

# DeepSpeed's shared-memory all-reduce for CPU training, otherwise JIT-built (~35 s on 2 cores) by the
# first training run: built once here so no run or test pays for it.
$(TORCH_EXTENSIONS_DIR)/deepspeed_shm_comm/deepspeed_shm_comm.so: $(VENV)/.installed-$(ENGINE)
	$(BIN)/python -c "from deepspeed.comm.torch import build_shm_op; assert build_shm_op() is not None"

models/tiny/tiny_models.json: pipelines/training/tiny_models.py | install
	$(BIN)/chillguard tiny-models models/tiny

# A headless browser for the serving playground's test: Debian's chromium + chromedriver (as root, or
# with passwordless sudo). Elsewhere install Chromium and its driver yourself; that test skips without them.
browser:
	@command -v chromedriver >/dev/null && command -v chromium >/dev/null || { \
	  if command -v apt-get >/dev/null; then \
	    $$( [ "$$(id -u)" = 0 ] || echo sudo ) apt-get install -y -q chromium chromium-driver >/dev/null \
	      || echo "could not install chromium + chromium-driver: the playground test will skip"; \
	  else echo "no apt-get: install chromium and chromedriver for the playground test"; fi; }

demo: install models/tiny/tiny_models.json
	$(BIN)/chillguard run configs/recipes/demo.yaml

# The demo's chain on real pretrained weights and samples of the human-labelled Chinese sets (~50 min on
# 2 cores once the models are built): configs/recipes/real_small.yaml.
demo-real: install
	@test -f "$(REAL_MODELS)/qwen2.5-coder-1.5b-instruct/config.json" -a -f "$(REAL_MODELS)/gemma-3-270m/config.json" \
	  -a -f "$(REAL_MODELS)/embeddinggemma-300m/config.json" || { echo "error: no real models in $(REAL_MODELS): \
	build them with \`$(BIN)/python ../shared/models/fetch_real_models.py $(REAL_MODELS)\` (or set REAL_MODELS=DIR)" >&2; exit 2; }
	REAL_MODELS=$(abspath $(REAL_MODELS)) $(BIN)/chillguard run configs/recipes/real_small.yaml

# the house rules: ruff (settings in pyproject.toml); CI runs it before the tests
lint: install
	$(BIN)/ruff check .

test: install browser
	$(BIN)/python -m pytest -v -rfEs --durations=25 -m "not e2e and not faults and not real" tests

# Whole recipes as users run them, each in its own Ray (~10 min on 2 cores): `chillguard run` of the
# generator-classifier loop killed in iteration 2 and resumed, and the data chain as a `ray job submit`.
test-e2e: install
	$(BIN)/python -m pytest -v -rfEs --durations=10 -m e2e tests

# Dead nodes mid-stage on a multi-node Ray in this machine (ray.cluster_utils.Cluster, ~6 min on 2
# cores): their own Ray cluster, so their own pytest process. Also a killed driver resumed, and MDPO
# paused, continued and restarted through a killed training worker (~4 min).
test-faults: install
	$(BIN)/python -m pytest -v -rs --durations=10 -m faults tests/faults

# Real pretrained models on the human-labelled Chinese sets (~13 min on 2 cores); skipped, naming the
# build command, where REAL_MODELS (default models/real) does not hold the three folders.
test-real: install
	REAL_MODELS=$(REAL_MODELS) $(BIN)/python -m pytest -v -rs -s --durations=10 -m real tests/real

# The inner loop: tests that start no vLLM engine, no Ray and no training (`slow` marks those).
test-fast: install
	$(BIN)/python -m pytest -q -rs -m "not slow" --durations=10 tests

bench: install
	$(BIN)/python benchmarks/llm_stage.py
	$(BIN)/python benchmarks/loop_generation.py
	$(BIN)/python benchmarks/corpus_index.py
	$(BIN)/python benchmarks/preprocess.py
	$(BIN)/python benchmarks/jury.py
	$(BIN)/python benchmarks/train.py
	$(BIN)/python benchmarks/serve.py

clean:
	rm -rf runs models bench_out
