# make demo  — run the whole path once (synthetic study → node → Celery worker → SR/SC)
# make test  — the test suite, against real Orthanc, dcmtk, dciodvfy and a real Celery worker
#
# Both create what they need: the virtualenv in .venv and, when run as root, the
# Debian packages (Orthanc + DICOMweb plugin, dcmtk, dicom3tools).

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
DEBS   := orthanc orthanc-dicomweb dcmtk dicom3tools
PYTEST_ARGS ?=

.PHONY: demo test venv sysdeps clean

demo: sysdeps $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/cmr-ai demo

test: sysdeps $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/pytest -ra $(PYTEST_ARGS)

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	touch $(STAMP)

# Install the DICOM peers when missing (needs root; otherwise say what is missing).
sysdeps:
	@missing=""; \
	test -x /usr/sbin/Orthanc || missing="$$missing orthanc"; \
	test -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so || missing="$$missing orthanc-dicomweb"; \
	test -x /usr/bin/storescu || missing="$$missing dcmtk"; \
	test -x /usr/bin/dciodvfy || missing="$$missing dicom3tools"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(DEBS) >/dev/null; \
	  else \
	    echo "missing Debian packages:$$missing — run as root or: sudo apt-get install $(DEBS)"; exit 1; \
	  fi; \
	fi

clean:
	rm -rf var build *.egg-info .pytest_cache
