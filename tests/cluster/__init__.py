from .cluster import (
    MPI_ARGS,
    MPIRUN,
    MPIS,
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
    "MPIS",
    "MPI_ARGS",
    "Cluster",
    "ClusterError",
    "Host",
    "cleanup_leftovers",
    "free_port",
    "stop_process",
    "to_toml",
]
