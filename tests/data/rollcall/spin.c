/* Stall test program: every rank says it is spinning, then computes in spin() for ever
 * without a word: a silent CPU-bound job, every rank busy in the same place. */
#include <mpi.h>
#include <stdio.h>

static volatile unsigned long counter;

static void spin(void) {
    for (;;) counter++;
}

int main(int argc, char **argv) {
    int rank;
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    printf("spinning %d\n", rank);
    fflush(stdout);
    spin();
    MPI_Finalize();
    return 0;
}
