# The two commands of the README:
#   make demo   create .venv, install guardx, run the CPU demo pipeline (digits, ~3 min on 2 cores)
#   make study  the multi-seed digits study behind the README's headline result (~45 min on 2 cores)
#   make test   create .venv, install guardx with every extra (+ FFCV's system libraries), run the tests
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip

.PHONY: demo study test install install-full clean-venv

$(VENV)/.core: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q -e '.[dev]'
	touch $@

$(VENV)/.full: $(VENV)/.core
	bash scripts/install_system_deps.sh
	$(PIP) install -q -e '.[dev,deepspeed,dali,ffcv,attacks]'
	$(PIP) install -q --no-deps torchattacks==3.5.1
	touch $@

install: $(VENV)/.core
install-full: $(VENV)/.full

demo: $(VENV)/.core
	$(PY) -m guardx pipeline --config configs/demo.yaml

study: $(VENV)/.full
	$(PY) -m guardx pipeline --config configs/digits-study.yaml

test: $(VENV)/.full
	$(PY) -m pytest -q

clean-venv:
	rm -rf $(VENV)
