"""Roll-call test program (mpi4py): every rank says it is ready, then rank 1 naps for
argv[1] seconds before the allreduce while the others already wait in it."""

import sys
import time

from mpi4py import MPI


def nap_before_allreduce(seconds):
    time.sleep(seconds)


def wait_for_peers(comm):
    return comm.allreduce(1)


comm = MPI.COMM_WORLD
rank = comm.Get_rank()
print(f"ready {rank}", flush=True)
if rank == 1:
    nap_before_allreduce(float(sys.argv[1]))
print(f"done {rank} {wait_for_peers(comm)}", flush=True)
