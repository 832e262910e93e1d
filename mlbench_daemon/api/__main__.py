"""python3 -m mlbench_daemon.api > tests/data/openapi.json: print the served document."""

from mlbench_daemon.api import render

print(render())
