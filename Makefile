# The two commands of the README, and the pieces they are made of. Works on a fresh machine:
# it creates .venv, installs torch==2.13.0 FIRST (a bare `torch` requirement would pull
# gigabytes of CUDA packages), then the project with its extras.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
DEMO_DIR ?= .demo
SHARED_DATA ?= ../shared/data

.PHONY: install demo test test-py310 lint typecheck benchmarks-tables clean-demo mosquitto rtsp-server

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[train,daemon,opencv,push,demo,dev]"
	# tensorrt-stubs declares a dependency on the tensorrt wheel, which cannot be installed
	# without NVIDIA's servers; the stubs alone are all mypy needs.
	$(BIN)/python -m pip install -q --no-deps "tensorrt-stubs>=10.0"
	touch $@

install: $(VENV)/.installed

# The main job, end to end on real data: MNIST (digit 3 normal) -> train the AE baseline ->
# evaluate on the official test set; then the same on real factory images (MVTec AD bottle),
# exported as a signed detector bundle and verified; then the daemon watches a "line" video made of
# the bottle's real test photographs and its events arrive over MQTT from a private broker (Debian's
# mosquitto when it is installed, else the embedded amqtt broker: no root needed).
demo: install
	$(BIN)/edge-trainer datasets prepare mnist --normal-class 3 --out $(DEMO_DIR)/data/mnist-3
	$(BIN)/edge-trainer train --model ae --data $(DEMO_DIR)/data/mnist-3 --out $(DEMO_DIR)/runs/ae-3 --epochs 3
	$(BIN)/edge-trainer eval $(DEMO_DIR)/runs/ae-3 --data $(DEMO_DIR)/data/mnist-3
	$(BIN)/edge-trainer datasets prepare folder --out $(SHARED_DATA)/mvtec_bottle
	$(BIN)/edge-trainer train --model ae --data $(SHARED_DATA)/mvtec_bottle --out $(DEMO_DIR)/runs/ae-bottle \
		--image-size 64 --batch-size 16 --epochs 30
	$(BIN)/edge-trainer eval $(DEMO_DIR)/runs/ae-bottle --json
	rm -rf $(DEMO_DIR)/keys $(DEMO_DIR)/bundles
	$(BIN)/edge-deploy keygen --out $(DEMO_DIR)/keys/demo
	$(BIN)/edge-trainer export $(DEMO_DIR)/runs/ae-bottle --out $(DEMO_DIR)/bundles/ae-bottle \
		--sign-key $(DEMO_DIR)/keys/demo.key
	$(BIN)/edge-deploy verify $(DEMO_DIR)/bundles/ae-bottle --trusted $(DEMO_DIR)/keys/demo.pub
	$(BIN)/python scripts/demo_line.py --bundle $(DEMO_DIR)/bundles/ae-bottle --trusted $(DEMO_DIR)/keys/demo.pub \
		--data $(SHARED_DATA)/mvtec_bottle --work $(DEMO_DIR)/line

# The tests start private mosquitto brokers (they restart them, with persistence and TLS): Debian's
# mosquitto, installed here when we may.
mosquitto:
	@command -v mosquitto >/dev/null || test -x /usr/sbin/mosquitto || \
	  { if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto >/dev/null; \
	    else echo "error: mosquitto is missing: sudo apt-get install mosquitto" >&2; exit 1; fi; }

# The RTSP capture tests serve a real stream with GStreamer's gst-rtsp-server, run by the system Python.
RTSP_PACKAGES = python3-gi gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-base gstreamer1.0-plugins-good \
	gstreamer1.0-plugins-bad
rtsp-server:
	@/usr/bin/python3 -c "import gi; gi.require_version('GstRtspServer', '1.0')" 2>/dev/null || \
	  { if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(RTSP_PACKAGES) >/dev/null; \
	    else echo "error: the RTSP test server is missing: sudo apt-get install $(RTSP_PACKAGES)" >&2; exit 1; fi; }

test: install mosquitto rtsp-server
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# deploy/ and edge_daemon/ as Python 3.10 (JetPack 6), with TensorRT calls checked against a repaired
# copy of tensorrt-stubs (see scripts/trt_stubs.py for why the installed one checks nothing).
typecheck: install
	$(BIN)/python scripts/trt_stubs.py .cache/trt-stubs
	MYPYPATH=.cache/trt-stubs $(BIN)/mypy --python-version 3.10 deploy edge_daemon
	$(BIN)/mypy trainer scripts

# deploy/ and edge_daemon/ RUN on Python 3.10 (JetPack 6), not only type-check as it: their tests in a venv of their
# own, the daemon's on a detector trained beforehand by the project's venv (the CPU torch wheel here is cp311 only;
# tests/bundle_factory.py). Tests of the trainer and the benchmark scripts are not in the list. Said and skipped
# where no Python 3.10 works (pyenv's counts).
PY310 ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.10*/bin/python3.10) $(shell command -v python3.10))
PY310_TESTS = tests/test_bundle.py tests/test_camera_health.py tests/test_capture.py tests/test_deploy_cli.py \
	tests/test_download.py tests/test_durable.py tests/test_engines.py tests/test_events.py tests/test_mqtt_link.py \
	tests/test_signing.py tests/test_spool.py tests/test_systemd_unit.py tests/test_daemon_bundle.py \
	tests/test_daemon_config.py tests/test_daemon_e2e.py tests/test_daemon_service.py tests/test_daemon_updates.py \
	tests/test_push.py
test-py310: install mosquitto rtsp-server
	@if [ -z "$(PY310)" ] || ! $(PY310) -c '' 2>/dev/null; then \
	  echo "test-py310: no working Python 3.10 on this machine: not run (ruff and mypy still check 3.10)"; exit 0; fi; \
	set -e; test -x .venv310/bin/python || $(PY310) -m venv .venv310; \
	.venv310/bin/python -m pip install -q --disable-pip-version-check -e ".[daemon,opencv,push,demo,dev]"; \
	.venv310/bin/python -c 'import sys; assert sys.version_info[:2] == (3, 10), sys.version'; \
	mkdir -p .cache; $(BIN)/python -m tests.bundle_factory .cache/py310-bundle >.cache/py310-bundle.log 2>&1 || \
	  { cat .cache/py310-bundle.log; echo "test-py310: building the test detector failed"; exit 1; }; \
	EDGE_INSPECT_TEST_BUNDLE=.cache/py310-bundle .venv310/bin/python -m pytest -q $(PY310_TESTS)

benchmarks-tables: install
	$(BIN)/python scripts/make_benchmarks.py

clean-demo:
	rm -rf $(DEMO_DIR)
