from .cluster import (
    MPI_ARGS,
    MPIRUN,
    Cluster,
    ClusterError,
    Host,
    cleanup_leftovers,
    free_port,
    stop_process,
    to_toml,
)

__all__ = [
    "MPIRUN",
    "MPI_ARGS",
    "Cluster",
    "ClusterError",
    "Host",
    "cleanup_leftovers",
    "free_port",
    "stop_process",
    "to_toml",
]
