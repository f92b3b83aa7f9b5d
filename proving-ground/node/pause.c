/* The sandbox ("pause") process of every pod on the test node: holds the pod's namespaces,
 * reaps orphaned children, exits on SIGINT/SIGTERM. Built static by images.sh. */
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

static void reap(int sig) {
  (void)sig;
  while (waitpid(-1, 0, WNOHANG) > 0) {
  }
}

static void quit(int sig) {
  (void)sig;
  _exit(0);
}

int main(void) {
  struct sigaction reaper = {0};
  reaper.sa_handler = reap;
  reaper.sa_flags = SA_NOCLDSTOP | SA_RESTART;
  sigaction(SIGCHLD, &reaper, 0);
  signal(SIGINT, quit);
  signal(SIGTERM, quit);
  for (;;) {
    pause();
  }
}
