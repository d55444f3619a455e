/* The C side of tools/bench_udp.py: a recvmmsg receiver and sendmmsg senders on loopback.
 *
 *   udp_mmsg recv PORT SECONDS BATCH      -> prints "<datagrams> <seconds from first to last>"
 *   udp_mmsg send PORT SECONDS SIZE COUNT [GSO]
 *                                         -> sends SIZE-byte datagrams to 127.0.0.1:PORT for SECONDS, prints
 *                                            how many: valid chunks 1..COUNT of frames of COUNT + 1 chunks,
 *                                            one frame (sequence 0, 1, 2, ...) per sendmmsg call; chunk 0
 *                                            is never sent, so a server never runs these frames. GSO > 0:
 *                                            runs of GSO datagrams per message, split by the kernel
 *                                            (UDP_SEGMENT, generic segmentation offload)
 *
 * Built at run time by bench_udp.py (gcc -O2), so the figure it is compared with is this machine's.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_BATCH 1024
#define BUF 2048

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int do_recv(int port, double seconds, int batch) {
    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    int size = 16 * 1024 * 1024;
    if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &size, sizeof size) != 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, sizeof size);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(port)};
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(fd, (struct sockaddr *)&addr, sizeof addr) != 0) { perror("bind"); return 1; }
    static char bufs[MAX_BATCH][BUF];
    static struct mmsghdr msgs[MAX_BATCH];
    static struct iovec iovs[MAX_BATCH];
    static struct sockaddr_in names[MAX_BATCH];
    if (batch > MAX_BATCH) batch = MAX_BATCH;
    for (int i = 0; i < batch; i++) {
        iovs[i].iov_base = bufs[i];
        iovs[i].iov_len = BUF;
        msgs[i].msg_hdr.msg_iov = &iovs[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
        msgs[i].msg_hdr.msg_name = &names[i];
    }
    struct timeval tv = {.tv_sec = 0, .tv_usec = 200000};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    printf("ready\n");
    fflush(stdout);
    long long total = 0;
    double first = 0, last = 0, give_up = 0;
    for (;;) {
        for (int i = 0; i < batch; i++) msgs[i].msg_hdr.msg_namelen = sizeof names[i];
        int n = recvmmsg(fd, msgs, batch, 0, NULL);
        double t = now();
        if (n > 0) {
            if (!total) { first = t; give_up = t + seconds; }
            total += n;
            last = t;
            if (t > give_up) break;
        } else if (total && t > give_up) {
            break;
        } else if (total && t - last > 0.5) {
            break; /* the senders stopped */
        }
    }
    printf("%lld %.6f\n", total, last - first);
    return 0;
}

#ifndef UDP_SEGMENT
#define UDP_SEGMENT 103
#endif

static int do_send(int port, double seconds, int size, int count, int gso) {
    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(port)};
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) != 0) { perror("connect"); return 1; }
    enum { BATCH = 1024 };
    static char bufs[BATCH][BUF];
    static struct mmsghdr msgs[BATCH];
    static struct iovec iovs[BATCH];
    if (size > BUF) size = BUF;
    if (count > BATCH) count = BATCH;
    uint32_t length = (uint32_t)count * (size - 32);
    for (int i = 0; i < count; i++) {
        /* a chunk header (docs/PROTOCOL.md section 10.1): chunk i + 1 of a frame of `count` + 1 */
        char *b = bufs[i];
        memcpy(b, "SGUD", 4);
        b[4] = 1; b[5] = 1;
        uint16_t index = (uint16_t)(i + 1), chunks = (uint16_t)(count + 1);
        uint32_t offset = (uint32_t)(index - 1) * (size - 32);
        memcpy(b + 20, &index, 2);
        memcpy(b + 22, &chunks, 2);
        memcpy(b + 24, &offset, 4);
        memcpy(b + 28, &length, 4);
        iovs[i].iov_base = b;
        iovs[i].iov_len = size;
        msgs[i].msg_hdr.msg_iov = &iovs[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
    }
    int messages = count;
    static char control[BATCH][CMSG_SPACE(sizeof(uint16_t))];
    if (gso > 0) { /* message j: datagrams j*gso .. (one iovec each, SIZE bytes: the kernel splits there) */
        messages = (count + gso - 1) / gso;
        for (int j = 0; j < messages; j++) {
            int first = j * gso, n = count - first < gso ? count - first : gso;
            msgs[j].msg_hdr.msg_iov = &iovs[first];
            msgs[j].msg_hdr.msg_iovlen = n;
            msgs[j].msg_hdr.msg_control = control[j];
            msgs[j].msg_hdr.msg_controllen = sizeof control[j];
            struct cmsghdr *cm = CMSG_FIRSTHDR(&msgs[j].msg_hdr);
            cm->cmsg_level = IPPROTO_UDP;
            cm->cmsg_type = UDP_SEGMENT;
            cm->cmsg_len = CMSG_LEN(sizeof(uint16_t));
            uint16_t segment = (uint16_t)size;
            memcpy(CMSG_DATA(cm), &segment, sizeof segment);
        }
    }
    long long sent = 0;
    uint64_t sequence = 0;
    double end = now() + seconds;
    while (now() < end) {
        int n = sendmmsg(fd, msgs, messages, 0);
        for (int j = 0; j < n; j++) sent += msgs[j].msg_hdr.msg_iovlen;
        if (n < 0 && errno != EAGAIN && errno != ENOBUFS && errno != ECONNREFUSED) { perror("sendmmsg"); return 1; }
        sequence++;
        for (int i = 0; i < count; i++) memcpy(bufs[i] + 12, &sequence, 8);
    }
    printf("%lld\n", sent);
    return 0;
}

int main(int argc, char **argv) {
    if (argc >= 5 && !strcmp(argv[1], "recv")) return do_recv(atoi(argv[2]), atof(argv[3]), atoi(argv[4]));
    if (argc >= 6 && !strcmp(argv[1], "send"))
        return do_send(atoi(argv[2]), atof(argv[3]), atoi(argv[4]), atoi(argv[5]), argc >= 7 ? atoi(argv[6]) : 0);
    fprintf(stderr, "usage: %s recv PORT SECONDS BATCH | send PORT SECONDS SIZE COUNT [GSO]\n", argv[0]);
    return 2;
}
