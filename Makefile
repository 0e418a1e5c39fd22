# make demo  — run the whole path once (synthetic study → node → Celery worker → SR/SC)
# make test  — the test suite, against real Orthanc, dcmtk, dciodvfy, a real Celery worker
#              and the real OHIF viewer in headless Chromium
# make viewer — only the viewer's parts: Debian chromium and the OHIF build in var/ohif/dist
#
# Both create what they need: the virtualenv in .venv, the OHIF build (npm package
# @ohif/app, fetched once with npm) and, when run as root, the Debian packages
# (Orthanc + DICOMweb plugin, dcmtk, dicom3tools, chromium-headless-shell).

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
DEBS   := orthanc orthanc-dicomweb dcmtk dicom3tools
# Headless Chromium for the viewer test (Playwright drives it by executable_path, never
# downloads a browser); Debian's full `chromium` where the release has no headless shell.
CHROMIUM_DEB := chromium-headless-shell
OHIF_VERSION := 3.13.2
OHIF   := var/ohif/dist
OHIF_STAMP := var/ohif/.installed-$(OHIF_VERSION)
PYTEST_ARGS ?=

.PHONY: demo test venv viewer sysdeps clean

demo: sysdeps $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/cmr-ai demo

test: sysdeps $(STAMP) $(OHIF_STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/pytest -ra $(PYTEST_ARGS)

venv: $(STAMP)

viewer: sysdeps $(OHIF_STAMP)

# The built OHIF viewer: `dist/` of the npm package @ohif/app, pinned, fetched once.
$(OHIF_STAMP):
	@command -v npm >/dev/null || { echo "npm missing: install Node.js 20+ (Debian: nodejs npm)"; exit 1; }
	rm -rf $(OHIF) var/ohif/.installed-* && mkdir -p var/ohif
	tmp=$$(mktemp -d) && \
	  (cd $$tmp && npm pack --silent @ohif/app@$(OHIF_VERSION) >/dev/null) && \
	  tar -xzf $$tmp/*.tgz -C $$tmp package/dist && \
	  mv $$tmp/package/dist $(OHIF) && rm -rf $$tmp
	test -f $(OHIF)/index.html && test -f $(OHIF)/app-config.js
	touch $@

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
	test -x /usr/bin/chromium-headless-shell || test -x /usr/bin/chromium || missing="$$missing $(CHROMIUM_DEB)"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing:$$missing"; \
	    chromium=$(CHROMIUM_DEB); \
	    apt-get update -qq && { apt-cache show $$chromium >/dev/null 2>&1 || chromium=chromium; } && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(DEBS) $$chromium >/dev/null; \
	  else \
	    echo "missing Debian packages:$$missing — run as root or: sudo apt-get install $(DEBS) $(CHROMIUM_DEB) (or chromium)"; exit 1; \
	  fi; \
	fi

clean:
	rm -rf var build *.egg-info .pytest_cache
