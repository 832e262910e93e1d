.PHONY: test demo bench install uninstall wheelhouse screenshots

PYTHON ?= python3
WHEELHOUSE ?= dist/wheelhouse

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

# As root: a venv under /opt/mlbench-daemon, the user, /etc/mlbench-daemon, the unit.
# Again to upgrade; `deploy/install.sh --help` for the details.
install:
	sh deploy/install.sh

uninstall:
	sh deploy/install.sh --uninstall

# Every wheel the daemon needs (and pip), the installer, the unit and the example
# config in one directory: copy it to an air-gapped head node and run install.sh
# there.  Build it with the head node's Python version (PYTHON=python3.12 ...).
wheelhouse:
	rm -rf $(WHEELHOUSE) build mlbench_daemon.egg-info   # a stale build/ could ship removed files
	$(PYTHON) -m pip wheel -q --disable-pip-version-check --wheel-dir $(WHEELHOUSE) . pip
	cp deploy/install.sh systemd/mlbench-daemon.service config/mlbench-daemon.toml $(WHEELHOUSE)/
	$(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])' > $(WHEELHOUSE)/PYTHON
	@echo "$(WHEELHOUSE): copy it to the head node, then as root: sh install.sh"
