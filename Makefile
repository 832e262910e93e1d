.PHONY: test demo bench install screenshots

PYTHON ?= python3

test:
	bash .ci/run

demo:
	bash demo/run.sh

bench:
	command -v wrk >/dev/null || { apt-get update -q && apt-get install -y -q wrk; }
	$(PYTHON) bench/cluster.py && $(PYTHON) bench/nodes.py && $(PYTHON) bench/jobs.py && $(PYTHON) bench/web.py

# a screenshot of each view of the status page, from the test cluster, into docs/ (root)
screenshots:
	$(PYTHON) demo/screenshots.py --out docs

install:
	$(PYTHON) -m pip install .
