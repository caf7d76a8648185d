# `make test` sets everything up on a fresh machine and runs the suite; `make demo` runs the main job.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test demo bench lint clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	# torch first, pinned, so no CUDA build is ever resolved
	$(BIN)/python -m pip install -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install -c constraints.txt -e ".[dev]"
	# torchvision's and timm's model code (and the model zoos that import torchvision) for the tests only, outside site-packages: the torchvision wheel
	# is built for a CUDA torch and would break transformers and lightning here (see tests/tv.py)
	rm -rf $(VENV)/tests-only
	$(BIN)/python -m pip uninstall -y -q torchvision timm  # a venv made before the split had them installed
	$(BIN)/python -m pip install --no-deps --target $(VENV)/tests-only torchvision==0.28.0 "timm>=1.0" \
		segment-anything==1.0 open_clip_torch==3.3.0 ultralytics==8.4.190
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 -q

demo: $(STAMP)
	$(BIN)/tritonprune demo

bench: $(STAMP)
	$(BIN)/python -m pytest bench --benchmark-only --benchmark-json=bench/results/cpu.json

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV)
