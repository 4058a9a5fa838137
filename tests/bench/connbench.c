/* New-TCP-connection load generator and checking listener for the datapath benchmark.
 *
 *   connbench listen PORT EXPECT_ADDR EXPECT_PORT THREADS
 *       Accept on 0.0.0.0:PORT in THREADS threads. For every connection read the original destination
 *       (SO_ORIGINAL_DST, as Envoy does; getsockname when the connection was not NATed), compare it with
 *       EXPECT_ADDR:EXPECT_PORT, answer one byte ('Y' match, 'N' mismatch) and close. Prints "ready" once
 *       listening; on SIGTERM prints one line of counts and CPU time and exits.
 *   connbench connect ADDR PORT THREADS SECONDS
 *       THREADS threads open connections to ADDR:PORT for SECONDS: connect, read the one byte, close with
 *       RST (SO_LINGER 0: no TIME_WAIT, so ephemeral ports do not run out). Prints one line of counts.
 *
 * Output lines are "key=value ..." for the Python driver. Bounded: the client stops at its deadline, every
 * socket has a 2 s timeout, the thread count is capped.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#ifndef SO_ORIGINAL_DST
#define SO_ORIGINAL_DST 80
#endif
#define MAX_THREADS 64

static atomic_long n_ok, n_mismatch, n_error;
static struct sockaddr_in target;
static double deadline;
static int listen_fd;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void cpu_times(double *user, double *sys) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    *user = ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6;
    *sys = ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
}

static void set_timeouts(int fd) {
    struct timeval tv = {2, 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
}

static void *serve(void *arg) {
    (void)arg;
    for (;;) {
        int fd = accept(listen_fd, NULL, NULL);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED) continue;
            atomic_fetch_add(&n_error, 1);
            continue;
        }
        set_timeouts(fd);
        struct sockaddr_in odst;
        socklen_t len = sizeof odst;
        if (getsockopt(fd, SOL_IP, SO_ORIGINAL_DST, &odst, &len) != 0) {
            len = sizeof odst;
            getsockname(fd, (struct sockaddr *)&odst, &len);
        }
        int match = odst.sin_addr.s_addr == target.sin_addr.s_addr && odst.sin_port == target.sin_port;
        atomic_fetch_add(match ? &n_ok : &n_mismatch, 1);
        char answer = match ? 'Y' : 'N';
        if (write(fd, &answer, 1) != 1) atomic_fetch_add(&n_error, 1);
        close(fd);
    }
    return NULL;
}

static void *client(void *arg) {
    (void)arg;
    struct linger rst = {1, 0};
    while (now() < deadline) {
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        if (fd < 0) { atomic_fetch_add(&n_error, 1); continue; }
        set_timeouts(fd);
        char answer = 0;
        if (connect(fd, (struct sockaddr *)&target, sizeof target) != 0 || read(fd, &answer, 1) != 1)
            atomic_fetch_add(&n_error, 1);
        else
            atomic_fetch_add(answer == 'Y' ? &n_ok : &n_mismatch, 1);
        setsockopt(fd, SOL_SOCKET, SO_LINGER, &rst, sizeof rst);
        close(fd);
    }
    return NULL;
}

static int threads_arg(const char *text) {
    int n = atoi(text);
    if (n < 1 || n > MAX_THREADS) { fprintf(stderr, "threads must be 1..%d\n", MAX_THREADS); exit(2); }
    return n;
}

static void parse_target(const char *addr, const char *port) {
    target.sin_family = AF_INET;
    target.sin_port = htons((unsigned short)atoi(port));
    if (inet_pton(AF_INET, addr, &target.sin_addr) != 1) { fprintf(stderr, "bad address %s\n", addr); exit(2); }
}

static int do_listen(int argc, char **argv) {
    if (argc != 6) return 2;
    parse_target(argv[3], argv[4]);
    int threads = threads_arg(argv[5]);
    listen_fd = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(listen_fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in local = {.sin_family = AF_INET, .sin_port = htons((unsigned short)atoi(argv[2]))};
    if (bind(listen_fd, (struct sockaddr *)&local, sizeof local) != 0 || listen(listen_fd, 4096) != 0) {
        perror("listen");
        return 1;
    }
    sigset_t term;
    sigemptyset(&term);
    sigaddset(&term, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &term, NULL); /* the threads inherit the mask; main waits for it */
    pthread_t tid;
    for (int i = 0; i < threads; i++) pthread_create(&tid, NULL, serve, NULL);
    printf("ready\n");
    fflush(stdout);
    int sig;
    sigwait(&term, &sig);
    double user, sys;
    cpu_times(&user, &sys);
    printf("ok=%ld mismatch=%ld error=%ld user=%.3f sys=%.3f\n", atomic_load(&n_ok), atomic_load(&n_mismatch),
           atomic_load(&n_error), user, sys);
    fflush(stdout);
    _exit(0);
}

static int do_connect(int argc, char **argv) {
    if (argc != 6) return 2;
    parse_target(argv[2], argv[3]);
    int threads = threads_arg(argv[4]);
    double seconds = atof(argv[5]);
    if (seconds <= 0 || seconds > 60) { fprintf(stderr, "seconds must be in (0, 60]\n"); return 2; }
    double start = now();
    deadline = start + seconds;
    pthread_t tids[MAX_THREADS];
    for (int i = 0; i < threads; i++) pthread_create(&tids[i], NULL, client, NULL);
    for (int i = 0; i < threads; i++) pthread_join(tids[i], NULL);
    double user, sys;
    cpu_times(&user, &sys);
    printf("ok=%ld mismatch=%ld error=%ld seconds=%.4f user=%.3f sys=%.3f\n", atomic_load(&n_ok),
           atomic_load(&n_mismatch), atomic_load(&n_error), now() - start, user, sys);
    return 0;
}

int main(int argc, char **argv) {
    int rc = 2;
    if (argc > 1 && strcmp(argv[1], "listen") == 0) rc = do_listen(argc, argv);
    else if (argc > 1 && strcmp(argv[1], "connect") == 0) rc = do_connect(argc, argv);
    if (rc == 2)
        fprintf(stderr, "usage: connbench listen PORT EXPECT_ADDR EXPECT_PORT THREADS\n"
                        "       connbench connect ADDR PORT THREADS SECONDS\n");
    return rc;
}
