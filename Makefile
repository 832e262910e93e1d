.PHONY: test demo bench install

PYTHON ?= python3

test:
	bash .ci/run

demo:
	bash demo/run.sh

bench:
	$(PYTHON) bench/nodes.py && $(PYTHON) bench/jobs.py

install:
	$(PYTHON) -m pip install .
