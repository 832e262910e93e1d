/* The first process of a test host's PID namespace.
 *
 *   hostinit NAME COMMAND [ARG...]
 *
 * Sets the host name (its own UTS namespace), starts COMMAND (the host's sshd,
 * in the foreground) and starts it again on SIGUSR1; reaps whatever is
 * reparented to it (sessions of a stopped sshd listener, detached jobs), so no
 * zombie is left for the tests to see.  SIGTERM ends it, and with it (the
 * kernel kills the rest of the namespace) the whole host.
 */
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static volatile sig_atomic_t stop, start = 1;

static void on_term(int sig) { (void)sig; stop = 1; }
static void on_usr1(int sig) { (void)sig; start = 1; }
static void on_chld(int sig) { (void)sig; }

int main(int argc, char **argv) {
    if (argc < 3 || sethostname(argv[1], strlen(argv[1])) != 0) {
        perror("hostinit: usage hostinit NAME COMMAND..., or sethostname");
        return 1;
    }
    sigset_t block, none;
    sigemptyset(&block);
    sigaddset(&block, SIGCHLD);
    sigaddset(&block, SIGTERM);
    sigaddset(&block, SIGINT);
    sigaddset(&block, SIGUSR1);
    sigprocmask(SIG_BLOCK, &block, NULL);
    signal(SIGTERM, on_term);
    signal(SIGINT, on_term);
    signal(SIGUSR1, on_usr1);
    signal(SIGCHLD, on_chld);
    sigemptyset(&none);
    for (;;) {
        while (waitpid(-1, NULL, WNOHANG) > 0)
            ;
        if (stop)
            return 0;
        if (start) {
            start = 0;
            pid_t pid = fork();
            if (pid == 0) {
                sigprocmask(SIG_SETMASK, &none, NULL);
                execv(argv[2], argv + 2);
                perror("hostinit: exec");
                _exit(127);
            }
            if (pid < 0)
                perror("hostinit: fork");
        }
        sigsuspend(&none);
    }
}
