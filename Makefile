# Two commands on a fresh machine: `make demo` and `make test`. Everything installs itself into .venv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
VENV_FLAGS ?=
RUNTIME_STAMP := $(VENV)/.runtime-installed
DEV_STAMP := $(VENV)/.dev-installed
MUTATE_STAMP := $(VENV)/.mutate-installed
MODELS_STAMP := models/manifest.json
CONFIG ?= config.yaml
export OMP_NUM_THREADS ?= 1
export OPENBLAS_NUM_THREADS ?= 1

.PHONY: help venv dev system-tools models test demo bench bench-fleet engine run doctor install uninstall clean mutate

help:
	@echo "make demo      set up, fetch models, run the pipeline on bundled samples (simulated door)"
	@echo "make test      set up with test deps and run the test suite"
	@echo "make models    fetch + sha256-verify + convert the models (offline once done)"
	@echo "make mutate    mutation testing of the safety modules, see README (slow; MUTATE=\"decide door\" for some)"
	@echo "make bench     per-stage timings vs face_recognition (same run), kiosk RSS over 1000 frames, MQTT on/off frame time, degradation suite, unknown-face grouping"
	@echo "make bench-fleet  20 door processes, 10,000 people, 1,000 operations and a 60 s cut against PostgreSQL"
	@echo "make engine    build the TensorRT engine (Jetson / NVIDIA GPU)"
	@echo "make run       run the door controller with $(CONFIG) on the real camera and GPIO"

$(RUNTIME_STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

$(DEV_STAMP): $(RUNTIME_STAMP) requirements-dev.txt
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps face_recognition==1.3.0
	@test -x /usr/sbin/mosquitto || command -v mosquitto >/dev/null || ! command -v apt-get >/dev/null \
		|| (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto >/dev/null) \
		|| echo "mosquitto could not be installed: the MQTT broker tests will skip"
	touch $@

venv: $(RUNTIME_STAMP)
dev: $(DEV_STAMP)

# System tools the sandbox tests (tests/test_systemd.py) and the browser tests (tests/test_web.py: Debian's chromium
# and its chromedriver, so nothing downloads a browser build) use: command:package pairs, installed with apt-get where
# missing and possible; the tests skip, naming the package, where they cannot be.
SYSTEM_TOOLS := strace:strace systemd-analyze:systemd unshare:util-linux chromium:chromium chromedriver:chromium-driver
system-tools:
	@missing=$$(for pair in $(SYSTEM_TOOLS); do command -v $${pair%%:*} >/dev/null || echo $${pair#*:}; done); \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then \
	  apt-get install -y -q $$missing || { apt-get update -q && apt-get install -y -q $$missing; }; \
	else echo "make: missing $$missing (apt-get install as root); the sandbox tests skip without" >&2; fi

models: $(RUNTIME_STAMP)
	$(PY) -m engines.fetch

test: dev models system-tools
	$(PY) -m pytest

demo: models
	$(PY) -m edge demo

BENCH_DATA ?= ../shared/data

bench: dev models
	$(PY) -m edge bench $(if $(wildcard $(BENCH_DATA)/pairs),--photos $(BENCH_DATA)/pairs)
	@echo "one core, one thread (Pi-class figure):"
	taskset -c 0 $(PY) -m edge bench --threads 1
	$(PY) bench/kiosk_rss.py --frames 1000 --camera-width 640
	$(PY) bench/kiosk_rss.py --frames 1000 --camera-width 1920
	$(PY) bench/kiosk_rss.py --frames 1000
	-$(PY) bench/mqtt_frame_time.py
	$(if $(wildcard $(BENCH_DATA)/pairs/master.csv),$(PY) -m edge bench degrade --pairs $(BENCH_DATA)/pairs/master.csv)
	$(if $(wildcard $(BENCH_DATA)/lfw_dev),$(PY) bench/cluster_unknown.py --photos $(BENCH_DATA)/lfw_dev)

$(MUTATE_STAMP): $(DEV_STAMP) requirements-mutate.txt
	$(PY) -m pip install --quiet -r requirements-mutate.txt
	touch $@

# One module after the other at low priority; results in out/mutate/current/summary.json (README, Development).
MUTATE ?=
mutate: $(MUTATE_STAMP) models
	nice -n 10 $(PY) tools/mutate.py $(MUTATE)

FLEET_DSN ?= postgresql://postgres@127.0.0.1:5432/test

bench-fleet: venv
	$(PY) -m edge fleet bench --dsn $(FLEET_DSN)

engine: models
	$(PY) -m edge build-engine

run: models
	$(PY) -m edge run --config $(CONFIG)

doctor: models
	$(PY) -m edge doctor --config $(CONFIG)

clean:
	rm -rf $(VENV) .pytest_cache

install:
	VENV_FLAGS="$(VENV_FLAGS)" systemd/install.sh

uninstall:
	systemd/uninstall.sh
