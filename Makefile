# orthanc-cbir: the two commands of the README, and what they stand on.
#   make demo   install what is missing, run the pipeline end to end on loopback, stop
#   make test   install what is missing, run every test (unit and integration)

SHELL := /bin/bash
PYTHON := /usr/bin/python3.11
VENV := .venv
# Extras of the package to install: `make install EXTRAS=` gives the runtime alone (the Docker image);
# the default adds torch (training, and the tests that compare ONNX with torch) and the test tools.
EXTRAS ?= test,train
APT_PACKAGES := orthanc orthanc-python orthanc-dicomweb dcmtk dicom3tools redis-server python3.11-venv
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install system-packages demo test clean

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

demo: install
	$(VENV)/bin/orthanc-cbir demo --state state/demo

test: install
	$(VENV)/bin/pytest -ra

clean:
	rm -rf $(VENV) state .pytest_cache
