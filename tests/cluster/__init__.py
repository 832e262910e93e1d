from .cluster import (MPI_ARGS, MPIRUN, Cluster, ClusterError, Host, cleanup_leftovers, free_port,
                      stop_process, to_toml)

__all__ = ["Cluster", "ClusterError", "Host", "MPI_ARGS", "MPIRUN", "cleanup_leftovers", "free_port",
           "stop_process", "to_toml"]
