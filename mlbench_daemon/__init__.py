"""mlbench-daemon: an SSH-native launcher daemon for MPI jobs on bare-metal clusters."""

__version__ = "0.1.0"
