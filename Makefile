# Two commands on a fresh machine: `make demo` and `make test`.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

DEMO_MODEL := runs/demo-pretrained

.PHONY: demo demo-scratch test test-all test-gpu setup clean

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $$(tools/find_python.sh) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	@touch $(STAMP)

setup: $(STAMP)

# The LoZA stages on the committed pretrained demo model (assets/demo_pretrained, made by demo-scratch).
demo: $(STAMP) $(DEMO_MODEL)/loza_model.json
	$(PY) -m train.pipeline --config configs/demo_cpu.yaml --init $(DEMO_MODEL)

$(DEMO_MODEL)/loza_model.json: $(STAMP) assets/demo_pretrained/manifest.json assets/demo_pretrained/params.*
	rm -rf $(DEMO_MODEL)
	$(PY) tools/pack_params.py unpack assets/demo_pretrained $(DEMO_MODEL)

# The same, pretraining the full model from scratch first (~12 min on 2 cores; docs/demo.md).
demo-scratch: $(STAMP)
	$(PY) -m train.pipeline --config configs/demo_cpu.yaml --set train.run_dir=runs/demo-scratch

test: $(STAMP)
	$(PY) -m pytest -q -n 2

test-all: $(STAMP)
	$(PY) -m pytest -q -m 'not gpu'

test-gpu: $(STAMP)
	$(PY) -m pytest -q -m gpu

clean:
	rm -rf $(VENV) runs .pytest_cache
