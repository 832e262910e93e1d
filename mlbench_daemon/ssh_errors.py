"""SSH failures, importable without the pool (and without paramiko).

``SSHError`` carries a machine-readable ``.reason`` (an ``SSHReason``) and the node
``.phase`` it maps to; ``str()`` is the human message.  ``ssh.classify()`` is the one
place that turns socket and paramiko exceptions into these.
"""

from mlbench_daemon.vocabulary import Phase, SSHReason, checked

R = SSHReason


class SSHError(Exception):
    """An SSH failure: ``.reason`` (machine-readable), ``.phase`` (node phase), str() = message."""

    phase = Phase.UNKNOWN
    reasons: tuple[SSHReason, ...] = tuple(SSHReason)

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = SSHReason(checked(reason, self.reasons, type(self).__name__))


class Unreachable(SSHError):
    """Could not reach the host or lost it (node phase Unknown)."""

    phase = Phase.UNKNOWN
    reasons = (
        R.CONNECTION_REFUSED,
        R.CONNECT_TIMEOUT,
        R.NO_BANNER,
        R.NETWORK_UNREACHABLE,
        R.CONNECTION_LOST,
        R.SSH_ERROR,
        R.COMMAND_TIMEOUT,
    )


class ListenerDown(Unreachable):
    """The node's own check of its sshd listener failed (refused, no banner, ...): the
    session still works, new logins would not."""


class CommandTimeout(Unreachable, TimeoutError):
    """``run()`` did not finish within its timeout (reason ``command-timeout``).

    The channel is closed; a command without a pty may go on running remotely.
    """

    def __init__(self, message: str) -> None:
        super().__init__(R.COMMAND_TIMEOUT, message)


class Untrusted(SSHError):
    """Reached the host, but it refused us or could not be trusted (node phase Failed)."""

    phase = Phase.FAILED
    reasons = (R.AUTH_FAILED, R.HOST_KEY_UNKNOWN, R.HOST_KEY_CHANGED)
