import pathlib
import re

from setuptools import find_packages, setup

HERE = pathlib.Path(__file__).parent
VERSION = re.search(r'^__version__ = "([^"]+)"', (HERE / "mlbench_daemon" / "__init__.py").read_text(), re.M).group(1)

setup(
    name="mlbench-daemon",
    version=VERSION,
    description="SSH-native launcher daemon for MPI jobs on bare-metal clusters",
    packages=find_packages(include=["mlbench_daemon", "mlbench_daemon.*"]),
    python_requires=">=3.11",
    install_requires=["paramiko", "bottle", "dnspython", "waitress", "prometheus_client"],
    extras_require={"test": ["pytest", "pytest-mock", "hypothesis", "schemathesis", "pytest-timeout"]},
    entry_points={"console_scripts": ["mlbench-daemon=mlbench_daemon.cli:main"]},
)
