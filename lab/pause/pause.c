/* The pod sandbox's process for lab kubelets (no registry to pull registry.k8s.io/pause from).
 *
 * It holds the pod's namespaces open and does nothing else. As PID 1 of the pod's PID
 * namespace the kernel drops every signal it has no handler for, so SIGTERM/SIGINT need a
 * handler or the runtime's stop would wait for SIGKILL; orphans of the pod are reparented to
 * it, so it reaps them or they stay zombies. Built `gcc -static -Os`: the image has nothing else. */
#include <errno.h>
#include <signal.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static void stop(int sig) {
    (void)sig;
    _exit(0);
}

static void reap(int sig) {
    int saved = errno;
    (void)sig;
    while (waitpid(-1, NULL, WNOHANG) > 0) {
    }
    errno = saved;
}

int main(int argc, char **argv) {
    struct sigaction sa;
    if (argc > 1 && strcmp(argv[1], "-v") == 0) {
        static const char version[] = "zvolt-lab pause\n";
        return write(STDOUT_FILENO, version, sizeof version - 1) == (ssize_t)(sizeof version - 1) ? 0 : 1;
    }
    memset(&sa, 0, sizeof sa);
    sigemptyset(&sa.sa_mask);
    sa.sa_handler = stop;
    if (sigaction(SIGINT, &sa, NULL) < 0 || sigaction(SIGTERM, &sa, NULL) < 0)
        return 1;
    sa.sa_handler = reap;
    sa.sa_flags = SA_NOCLDSTOP | SA_RESTART;
    if (sigaction(SIGCHLD, &sa, NULL) < 0)
        return 2;
    for (;;)
        pause();
}
