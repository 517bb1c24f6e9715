# Two entry points (see README): `make demo` and `make test`. Both create .venv and install first.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed-stamp
HOST   ?= 127.0.0.1
PORT   ?= 8000
DEMO   ?= demo_data

.PHONY: install demo test test-slow clean dicom-deps orthanc-start orthanc-stop ohif-screenshot

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# Writes the demo datastore of synthetic fundus photographs, starts the server on
# $(HOST):$(PORT) and trains the grader in the background.
demo: $(STAMP)
	$(BIN)/monailabel-dr demo $(DEMO) --serve --host $(HOST) --port $(PORT)

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

# DICOM: Debian packages of the DICOM / OHIF tests (root; the tests install them too when missing),
# a loopback Orthanc with DICOMweb on $(ORTHANC_PORT) (data in $(ORTHANC_DIR)), and the OHIF
# browser test writing its screenshot to docs/ohif_fundus.png.
DEBS         = orthanc orthanc-dicomweb dicom3tools chromium chromium-driver
ORTHANC_DIR  ?= .orthanc
ORTHANC_PORT ?= 8042

dicom-deps:
	DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $(DEBS)

orthanc-start: $(STAMP)
	$(BIN)/python -m monailabel_dr.dicom.orthanc start --dir $(ORTHANC_DIR) --port $(ORTHANC_PORT)

orthanc-stop: $(STAMP)
	$(BIN)/python -m monailabel_dr.dicom.orthanc stop --dir $(ORTHANC_DIR)

ohif-screenshot: $(STAMP)
	MLDR_OHIF_SCREENSHOT=docs/ohif_fundus.png $(BIN)/python -m pytest -q tests/test_ohif.py

clean:
	rm -rf $(DEMO) monailabel_dr/model monailabel_dr/logs monailabel_dr/bin
