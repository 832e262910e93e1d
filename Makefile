.PHONY: test demo bench install screenshots

PYTHON ?= python3

test:
	bash .ci/run

demo:
	bash demo/run.sh

bench:
	command -v wrk >/dev/null || { apt-get update -q && apt-get install -y -q wrk; }
	$(PYTHON) -m bench.cluster && $(PYTHON) -m bench.nodes && $(PYTHON) -m bench.jobs \
		&& $(PYTHON) -m bench.preflight \
		&& $(PYTHON) -m bench.web

# a screenshot of each view of the status page, from the test cluster, into docs/ (root)
screenshots:
	$(PYTHON) -m demo.screenshots --out docs

install:
	$(PYTHON) -m pip install .
