.PHONY: test demo bench install

PYTHON ?= python3

test:
	bash .ci/run

demo:
	bash demo/run.sh

bench:
	command -v wrk >/dev/null || { apt-get update -q && apt-get install -y -q wrk; }
	$(PYTHON) -m bench.cluster && $(PYTHON) -m bench.nodes && $(PYTHON) -m bench.jobs \
		&& $(PYTHON) -m bench.preflight

install:
	$(PYTHON) -m pip install .
