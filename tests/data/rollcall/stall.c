/* Roll-call test program: every rank says it is ready, then rank 1 sleeps for argv[1]
 * seconds before MPI_Allreduce while the others already wait in it. */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

int main(int argc, char **argv) {
    int rank, one = 1, sum = 0;
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    printf("ready %d\n", rank);
    fflush(stdout);
    if (rank == 1) sleep(argc > 1 ? atoi(argv[1]) : 600);
    MPI_Allreduce(&one, &sum, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
    printf("done %d %d\n", rank, sum);
    MPI_Finalize();
    return 0;
}
