# orthanc-cbir: the two commands of the README, and what they stand on.
#   make demo   install what is missing, run the pipeline end to end on loopback, stop
#   make test   install what is missing, run ruff and mypy, then every test (unit, integration and browser)
#   make ohif   fetch the pinned OHIF viewer into build/ohif (npm pack, sha512 checked) and build this project's
#               OHIF extension and mode (ohif_extension/, npm ci from its lock file); `make viewer` serves both

SHELL := /bin/bash
PYTHON := /usr/bin/python3.11
VENV := .venv
# Extras of the package to install: `make install EXTRAS=` gives the runtime alone (the Docker image);
# the default adds torch (training, and the tests that compare ONNX with torch) and the test tools.
EXTRAS ?= test,train
# chromium and chromium-driver: the browser tests (tests/browser) drive Debian's Chromium, never a downloaded one.
# docker-compose: the tests validate docker/compose.yaml with `docker-compose config` (no Docker engine needed).
APT_PACKAGES := orthanc orthanc-python orthanc-dicomweb dcmtk dicom3tools redis-server python3.11-venv chromium chromium-driver \
	docker-compose
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install system-packages ohif viewer demo test clean

install: system-packages $(VENV)/.installed

# apt only when a package is missing: a second run installs nothing.
system-packages:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "apt: installing $$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; \
	fi

# The venv uses Debian's python3.11: the interpreter Orthanc's Python plugin embeds.
$(VENV)/.installed: pyproject.toml
	@[ -x $(VENV)/bin/python ] || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.$(if $(EXTRAS),[$(EXTRAS)])'
	@touch $@

# The OHIF viewer (@ohif/app's prebuilt dist, ~50 MB packed, ~205 MB unpacked) for `orthanc-cbir viewer`
# and the browser tests; nothing when it is there already. Not part of `install`: the Docker image has no use for it.
ohif: $(VENV)/.installed
	@command -v npm >/dev/null || { echo "apt: installing npm"; $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends npm; }
	$(VENV)/bin/orthanc-cbir viewer --fetch-only

# OHIF on http://127.0.0.1:3000 in front of the Orthanc of the CBIR_ORTHANC_* settings.
viewer: install ohif
	$(VENV)/bin/orthanc-cbir viewer

demo: install ohif
	$(VENV)/bin/orthanc-cbir demo --state state/demo

# The lint and type gate first (configured in pyproject.toml), then every test.
test: install ohif
	$(VENV)/bin/ruff check plugin tests benchmarks
	$(VENV)/bin/mypy
	$(VENV)/bin/pytest -ra

clean:
	rm -rf $(VENV) state .pytest_cache build/ohif ohif_extension/node_modules
