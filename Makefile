# captionflow: `make run-local` sets up and captions the example photos; `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A CPU build is enough to test and run locally; GPU workers get a CUDA build (see docker/).
TORCH ?= torch==2.13.0
INPUT ?= examples/dataset.txt
OUTPUT ?= out/examples
CAPTIONER ?= blip
RANKER ?= clip
ARGS ?=

# Dataflow (see README "Dataflow with GPUs"). DRY_RUN=1 builds the job offline and submits nothing.
PROJECT ?= $(shell gcloud config get-value project 2>/dev/null)
REGION ?= us-central1
BUCKET ?= $(PROJECT)-captionflow
VERSION ?= $(shell $(PYTHON) -c "import tomllib;print(tomllib.load(open('pyproject.toml','rb'))['project']['version'])")
IMAGE ?= $(REGION)-docker.pkg.dev/$(PROJECT)/captionflow/worker:$(VERSION)
CPU_IMAGE ?= $(REGION)-docker.pkg.dev/$(PROJECT)/captionflow/worker-cpu:$(VERSION)
LAVIS_IMAGE ?= $(REGION)-docker.pkg.dev/$(PROJECT)/captionflow/worker-lavis:$(VERSION)
DATAFLOW_INPUT ?= gs://$(BUCKET)/images/dataset.txt
DATAFLOW_OUTPUT ?= gs://$(BUCKET)/images
GPU_TYPE ?= nvidia-l4
GPU_COUNT ?= 1
MACHINE_TYPE ?= g2-standard-8
MAX_WORKERS ?= 4
# One SDK process per vCPU decodes; each of its HARNESS_THREADS threads sends CAPTION_BATCH
# images at a time to the machine's engines (ENGINES, one per GPU by default), which merge
# them into GPU batches of up to ENGINE_BATCH. MPS=1 lets several engines share one GPU.
HARNESS_THREADS ?= 4
CAPTION_BATCH ?= 64
ENGINE_BATCH ?= 256
RANK_BATCH ?= 256
ENGINES ?= $(GPU_COUNT)
MPS ?=
DRY_RUN ?=

.PHONY: install test browser lint format run-local demo clean bench-rankers bench-captioners install-lavis test-lavis bench-lavis docker-build-lavis docker-build docker-build-cpu docker-push run-dataflow \
	bench bench-quick bench-gpu bench-feed bench-decode bench-scale gpu-bundle

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)" -c constraints.txt
	$(PY) -m pip install -q -e ".[dev]" -c constraints.txt
	touch $@

test: install browser
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

# Debian's Chromium and ChromeDriver, for the report's test in a real headless browser; where
# they cannot be installed (not Debian, not root) that one test is skipped and says why.
browser:
	@test -x /usr/bin/chromium -a -x /usr/bin/chromedriver || \
		{ apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null; } || \
		echo "no Chromium here: the report's browser test will be skipped"

# The LAVIS backend (--captioner lavis-blip, --ranker lavis-clip) in an environment of its own:
# salesforce-lavis 1.0.2 pins transformers<4.27, which cannot live beside transformers 5.
# About 3 minutes and 7.3 GB (torch's CUDA libraries); captionflow goes in with --no-deps.
LAVIS_VENV ?= .venv-lavis
LAVIS_PY := $(LAVIS_VENV)/bin/python
install-lavis: $(LAVIS_VENV)/.installed

$(LAVIS_VENV)/.installed: pyproject.toml requirements-lavis.txt
	$(PYTHON) -m venv $(LAVIS_VENV)
	$(LAVIS_PY) -m pip install -q --upgrade pip
	$(LAVIS_PY) -m pip install -q -r requirements-lavis.txt 'pytest>=8'
	$(LAVIS_PY) -m pip install -q --no-deps -e .
	touch $@

bench-lavis: install-lavis  # the LAVIS handlers' speed, full-size random weights: a few minutes
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(LAVIS_PY) -m benchmarks.lavis $(ARGS)

test-lavis: install-lavis  # offline: random weights, a stand-in bert-base-uncased vocabulary
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(LAVIS_PY) -m pytest -q -p no:cacheprovider tests_lavis

lint: install
	$(PY) -m ruff check src tests tests_lavis benchmarks
	$(PY) -m ruff format --check src tests tests_lavis benchmarks

format: install
	$(PY) -m ruff check --fix src tests tests_lavis benchmarks
	$(PY) -m ruff format src tests tests_lavis benchmarks

run-local: install
	$(PY) -m captionflow run --input $(INPUT) --output $(OUTPUT) \
		--captioner $(CAPTIONER) --ranker $(RANKER) --report $(ARGS)

demo: install
	$(PY) -m captionflow.demo $(INPUT) out/demo $(ARGS)

bench: install  # full-size models on the CPU: about 25 minutes here (bench-decode included)
	$(PY) -m benchmarks.bench $(ARGS)
	$(PY) -m benchmarks.decoding

bench-quick: install  # reduced depth, few images: under 3 minutes
	$(PY) -m benchmarks.bench --quick $(ARGS)

bench-gpu: install  # every GPU figure in one run, under 8 minutes (offline box: benchmarks/gpu.sh)
	$(PY) -m benchmarks.gpu $(ARGS)

bench-decode: install  # full-size BLIP: fast loop vs generate (token ids, rates): about 8 minutes
	$(PY) -m benchmarks.decoding $(ARGS)

bench-scale: install  # zero-cost models, 10k to 1M images: cost growth, memory per process: about 18 minutes here
	$(PY) -m benchmarks.scale $(ARGS)

bench-captioners: install  # each captioner's s per image, full-size random weights (BLIP-2 needs ~20 GB)
	$(PY) -m benchmarks.captioners $(ARGS)

bench-rankers: install  # each ranker's ms per image, full-size random weights: about 2 minutes here
	$(PY) -m benchmarks.rankers $(ARGS)

bench-feed: install  # CPU per image per phase, and pipeline / engine bare: about 9 minutes here
	$(PY) -m benchmarks.feed $(ARGS)

# For a GPU box with no network (benchmarks/README.md): cp312 wheels of what it lacks into .whl/,
# listed in benchmarks/gpu-requirements.txt (`python3.12 -m benchmarks.bundle lock` rewrites it),
# and captionflow's own; there, `bash benchmarks/gpu.sh` installs them with --no-index.
gpu-bundle:
	rm -rf .whl build
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
		--implementation cp $$($(PYTHON) -m benchmarks.bundle platforms) \
		-r benchmarks/gpu-requirements.txt -d .whl
	$(PYTHON) -m pip wheel -q --no-deps -w .whl .
	$(PYTHON) -m benchmarks.bundle size .whl

clean:
	rm -rf out .pytest_cache .ruff_cache

docker-build:
	docker build -f docker/Dockerfile -t $(IMAGE) .

docker-build-cpu:
	docker build -f docker/Dockerfile -t $(CPU_IMAGE) \
		--build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .

docker-build-lavis:  # the LAVIS backend's worker image (requirements-lavis.txt)
	docker build -f docker/Dockerfile.lavis -t $(LAVIS_IMAGE) .

docker-push:
	docker push $(IMAGE)

run-dataflow: install
	@test -n "$(PROJECT)" || { echo "set PROJECT=your-gcp-project (and BUCKET, IMAGE)"; exit 2; }
	$(PY) -m captionflow run --input $(DATAFLOW_INPUT) --output $(DATAFLOW_OUTPUT) \
		--engine shared --model-copies $(ENGINES) --caption-batch-size $(CAPTION_BATCH) \
		--engine-batch-size $(ENGINE_BATCH) --rank-batch-size $(RANK_BATCH) \
		--number_of_worker_harness_threads $(HARNESS_THREADS) \
		--runner DataflowRunner --project $(PROJECT) --region $(REGION) \
		--temp_location gs://$(BUCKET)/tmp \
		--sdk_container_image $(IMAGE) --sdk_location container \
		--dataflow_service_options "worker_accelerator=type:$(GPU_TYPE);count:$(GPU_COUNT);install-nvidia-driver$(if $(MPS),;use_nvidia_mps)" \
		--machine_type $(MACHINE_TYPE) --max_num_workers $(MAX_WORKERS) --disk_size_gb 50 \
		$(if $(DRY_RUN),--dry_run True --no_auth) $(ARGS)
