"""Jobs: validate a request, place it, launch mpirun detached on a master, follow,
cancel, re-attach.  The modules, from the bottom up:

- ``request``: the request's fields, checked into a frozen ``Request``;
- ``remote``: the remote shell scripts and the parsing of their answers (the only
  code that knows the job directory's files);
- ``placement``: choosing nodes and master, the mpirun argv;
- ``clock``: time, waits and timers (injectable);
- ``failure``: why a job that did not succeed failed (pure: the launcher's output,
  the rank map, host names -> node names);
- ``preflight``: launch-readiness checks run from the master (the API's preflight,
  and the one that explains a failed daemon launch);
- ``run``: one ``JobRun`` per live job (launch, follow, re-attach, timeout, cancel,
  the failure of a job that did not succeed);
- ``manager``: ``Jobs``, the API api/ calls: slots, the FIFO queue, JSON shapes;
- ``runspec``: an MLBench run's form and command template -> argv(s) (pure);
- ``runs``: ``Runs``, MLBench runs: each a job on nodes it holds alone, queued in order.
"""

from mlbench_daemon.jobs.manager import Jobs, json_with_response, to_json
from mlbench_daemon.jobs.request import Request, validate

__all__ = ["Jobs", "Request", "json_with_response", "to_json", "validate"]
