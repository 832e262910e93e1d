/* The test cluster's MPI program.
 *
 * Every rank joins an allreduce of its rank number and prints one line with
 * the address of the host it runs on, so output proves that all ranks ran,
 * where they ran, and that they communicated:
 *
 *   rank R of N on IP: sum=S expected=E
 *   allreduce ok N        (rank 0, when S == E)
 *
 * Options, scanned anywhere in argv (anything else is ignored, so hostile
 * arguments can be passed through untouched):
 *   --argv        rank 0 prints "arg I HEX" for every argv[i], i >= 1
 *   --env NAME    every rank prints "env R NAME=VALUE" (or "env R NAME unset")
 *   --sleep S     every rank sleeps S seconds (fractions allowed) after the allreduce
 *   --bytes N     rank 0 writes N bytes of '0'..'9' lines (100 bytes a line) to stdout
 *   --stderr TEXT rank 0 writes TEXT and a newline to stderr
 *   --exit C      every rank exits with code C after MPI_Finalize
 *   --exit-rank R C  rank R alone exits with code C after MPI_Finalize
 */
#include <arpa/inet.h>
#include <ifaddrs.h>
#include <mpi.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static void host_ip(char *buf, size_t len) {
    struct ifaddrs *ifs, *i;
    snprintf(buf, len, "unknown");
    if (getifaddrs(&ifs) != 0) return;
    for (i = ifs; i; i = i->ifa_next) {
        if (!i->ifa_addr || i->ifa_addr->sa_family != AF_INET) continue;
        struct in_addr a = ((struct sockaddr_in *)i->ifa_addr)->sin_addr;
        if ((ntohl(a.s_addr) >> 24) == 127) continue;
        inet_ntop(AF_INET, &a, buf, len);
        break;
    }
    freeifaddrs(ifs);
}

static void write_bytes(long long n) {
    /* whole blocks of 100-byte lines, as a program logging at full speed would */
    static char block[1 << 16];
    for (size_t i = 0; i < sizeof block; i++) block[i] = i % 100 == 99 ? '\n' : '0' + i % 100 % 10;
    fflush(stdout);
    while (n > 0) {
        size_t k = n < 65500 ? (size_t)n : 65500;  /* a multiple of 100: lines stay whole */
        if (fwrite(block, 1, k, stdout) != k) return;
        fflush(stdout);
        n -= k;
    }
}

int main(int argc, char **argv) {
    int rank, size, sum = 0, code = 0;
    double sleep_s = 0;
    long long nbytes = 0;
    char ip[64];

    setvbuf(stdout, NULL, _IOLBF, 0);
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    MPI_Allreduce(&rank, &sum, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
    host_ip(ip, sizeof ip);
    printf("rank %d of %d on %s: sum=%d expected=%d\n", rank, size, ip, sum,
           size * (size - 1) / 2);
    if (rank == 0 && sum == size * (size - 1) / 2) printf("allreduce ok %d\n", size);

    for (int i = 1; i < argc; i++) {
        const char *next = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(argv[i], "--argv") && rank == 0) {
            for (int j = 1; j < argc; j++) {
                printf("arg %d ", j);
                for (const unsigned char *p = (const unsigned char *)argv[j]; *p; p++)
                    printf("%02x", *p);
                printf("\n");
            }
        } else if (!strcmp(argv[i], "--env") && next) {
            const char *v = getenv(next);
            if (v) printf("env %d %s=%s\n", rank, next, v);
            else printf("env %d %s unset\n", rank, next);
        } else if (!strcmp(argv[i], "--sleep") && next) {
            sleep_s = atof(next);
        } else if (!strcmp(argv[i], "--bytes") && next) {
            nbytes = atoll(next);
        } else if (!strcmp(argv[i], "--stderr") && next && rank == 0) {
            fprintf(stderr, "%s\n", next);
        } else if (!strcmp(argv[i], "--exit") && next) {
            code = atoi(next);
        } else if (!strcmp(argv[i], "--exit-rank") && next && i + 2 < argc) {
            if (atoi(next) == rank) code = atoi(argv[i + 2]);
        }
    }
    if (rank == 0 && nbytes > 0) write_bytes(nbytes);
    fflush(stdout);
    if (sleep_s > 0) {
        struct timespec ts = {(time_t)sleep_s, (long)((sleep_s - (time_t)sleep_s) * 1e9)};
        nanosleep(&ts, NULL);
    }
    MPI_Finalize();
    return code;
}
