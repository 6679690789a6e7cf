/* frames.c - sockets with deadlines, request frames out and reply frames in, busy polling.
 *
 * Rules:
 * - Every wait is a poll() bounded by the call's deadline; sends use
 *   MSG_NOSIGNAL; every read is bounds-checked against the frame limit.
 * - kg_exchange sends the frames of one or more calls in one write and reads
 *   a reply for each, matched by id (a FATAL message ends the connection).
 * - Busy polling: a call that is the only one of the process in flight polls
 *   its socket for up to busy_poll_us before it sleeps in poll(). A reply
 *   that comes within that time costs no wakeup; when several threads call
 *   at once none of them polls, so they do not take CPU time the daemon
 *   needs. Polling adapts: after a poll that the reply outlasted, the next
 *   2, 4, ... 64 calls do not poll (slow operations, a busy daemon); a poll
 *   that catches its reply resets that.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "keygrid.h"

static atomic_int in_flight;   /* calls of this process waiting for a reply */
static atomic_int poll_skip;   /* calls left that do not busy-poll */
static atomic_int poll_misses; /* busy polls in a row that the reply outlasted */

/* ---- sockets with deadlines ---- */

static int64_t now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Waits for `events` until the deadline (0: none); 0 when ready. */
static int wait_fd(int fd, short events, int64_t deadline)
{
	struct pollfd p = {fd, events, 0};
	for (;;) {
		int left = -1;
		if (deadline) {
			int64_t ms = deadline - now_ms();
			if (ms <= 0) return -1;
			left = ms > 60000 ? 60000 : (int)ms;
		}
		int n = poll(&p, 1, left);
		if (n > 0) return 0;
		if (n < 0 && errno != EINTR) return -1;
	}
}

static int64_t now_us(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

/* Polls for a reply for up to `us` microseconds: the bytes received, or -1 with errno. */
static ssize_t recv_polling(int fd, uint8_t *p, size_t n, int us)
{
	int64_t end = now_us() + us;
	for (;;) {
		ssize_t k = recv(fd, p, n, MSG_DONTWAIT);
		if (k >= 0 || (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) || now_us() >= end) return k;
	}
}

static int64_t deadline_in(int ms)
{
	return ms > 0 ? now_ms() + ms : 0;
}

static int send_all(int fd, const uint8_t *p, size_t n, int64_t deadline)
{
	while (n) {
		ssize_t k = send(fd, p, n, MSG_NOSIGNAL);
		if (k > 0) {
			p += k;
			n -= (size_t)k;
		} else if (k < 0 && errno == EINTR) {
			continue;
		} else if (k < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
			if (wait_fd(fd, POLLOUT, deadline)) return -1;
		} else {
			return -1;
		}
	}
	return 0;
}

static int recv_all(int fd, uint8_t *p, size_t n, int64_t deadline)
{
	while (n) {
		ssize_t k = recv(fd, p, n, 0);
		if (k > 0) {
			p += k;
			n -= (size_t)k;
		} else if (k < 0 && errno == EINTR) {
			continue;
		} else if (k < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
			if (wait_fd(fd, POLLIN, deadline)) return -1;
		} else {
			return -1; /* EOF or error */
		}
	}
	return 0;
}

int kg_open_socket(const char *path, int timeout_ms)
{
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	int64_t deadline = deadline_in(timeout_ms);
	if (strlen(path) >= sizeof(sa.sun_path)) return -1;
	memcpy(sa.sun_path, path, strlen(path));
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
	if (fd < 0) return -1;
	for (;;) {
		if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) == 0) return fd;
		if (errno == EINTR) continue;
		if (errno == EINPROGRESS) {
			int err = 0;
			socklen_t len = sizeof(err);
			if (!wait_fd(fd, POLLOUT, deadline) && !getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) &&
			    !err)
				return fd;
		} else if (errno == EAGAIN && (!deadline || now_ms() < deadline)) { /* backlog full */
			struct timespec ts = {0, 5 * 1000000};
			nanosleep(&ts, NULL);
			continue;
		}
		close(fd);
		return -1;
	}
}

/* ---- frames and replies ---- */

/* A request frame the daemon can take: 0, CKR_HOST_MEMORY or CKR_DEVICE_MEMORY. */
CK_RV kg_frame_check(const struct kg_buf *req, uint32_t max_frame)
{
	if (req->failed || req->len < 5) return CKR_HOST_MEMORY;
	if (req->len - 4 > max_frame) return CKR_DEVICE_MEMORY; /* the daemon would refuse the frame */
	return CKR_OK;
}

/* Sends the frames of calls[0..n) in one write (several when memory is short). */
static int send_frames(int fd, struct kg_call **calls, size_t n, int64_t deadline)
{
	size_t total = 0, off = 0;
	uint8_t *all;
	if (n == 1) return send_all(fd, calls[0]->req.data, calls[0]->req.len, deadline);
	for (size_t i = 0; i < n; i++)
		total += calls[i]->req.len;
	if (!(all = malloc(total))) {
		for (size_t i = 0; i < n; i++)
			if (send_all(fd, calls[i]->req.data, calls[i]->req.len, deadline)) return -1;
		return 0;
	}
	for (size_t i = 0; i < n; i++) {
		memcpy(all + off, calls[i]->req.data, calls[i]->req.len);
		off += calls[i]->req.len;
	}
	int rc = send_all(fd, all, total, deadline);
	free(all);
	return rc;
}

/* Bytes received and not yet taken by a frame. */
struct inbox {
	uint8_t buf[4096];
	size_t have, pos;
};

/* Reads one reply frame into a new buffer. `poll_us`: busy-poll that long before sleeping. */
static CK_RV read_frame(int fd, struct inbox *in, uint32_t max_frame, int64_t deadline, int poll_us, uint8_t **body,
                        size_t *len)
{
	const uint8_t *h;
	if (in->pos && in->have - in->pos < 4) { /* keep the partial header, make room after it */
		memmove(in->buf, in->buf + in->pos, in->have - in->pos);
		in->have -= in->pos;
		in->pos = 0;
	}
	ssize_t k = -1;
	if (poll_us > 0 && in->have - in->pos < 4) {
		k = recv_polling(fd, in->buf + in->have, sizeof(in->buf) - in->have, poll_us);
		if (k > 0) {
			atomic_store(&poll_misses, 0);
		} else if (k < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
			int misses = atomic_fetch_add(&poll_misses, 1) + 1;
			atomic_store(&poll_skip, 1 << (misses < 6 ? misses : 6));
		}
	}
	if (k > 0)
		in->have += (size_t)k;
	else if (k == 0)
		return CKR_DEVICE_REMOVED; /* EOF */
	while (in->have - in->pos < 4) {
		if (wait_fd(fd, POLLIN, deadline)) return CKR_DEVICE_REMOVED;
		k = recv(fd, in->buf + in->have, sizeof(in->buf) - in->have, 0);
		if (k > 0)
			in->have += (size_t)k;
		else if (!(k < 0 && (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK)))
			return CKR_DEVICE_REMOVED; /* EOF or error */
	}
	h = in->buf + in->pos;
	*len = (size_t)h[0] << 24 | (size_t)h[1] << 16 | (size_t)h[2] << 8 | h[3];
	if (*len == 0 || *len > max_frame) return CKR_DEVICE_ERROR;
	in->pos += 4;
	size_t got = in->have - in->pos < *len ? in->have - in->pos : *len;
	if (!(*body = malloc(*len))) return CKR_HOST_MEMORY;
	memcpy(*body, in->buf + in->pos, got);
	in->pos += got;
	if (in->pos == in->have) in->pos = in->have = 0;
	return recv_all(fd, *body + got, *len - got, deadline) ? CKR_DEVICE_REMOVED : CKR_OK;
}

/* The request a reply answers: the first unanswered one with its id; a FATAL message ends the
 * connection and is given to the first unanswered one. -1: none. */
static int match_reply(struct kg_call **calls, size_t n, const uint8_t *body, size_t len, int *fatal)
{
	struct kg_reader r = {body, len, 0, 0};
	uint32_t items;
	uint64_t kind, id;
	if (kg_get_array(&r, &items) || kg_get_uint(&r, &kind) || kg_get_uint(&r, &id)) return -1;
	*fatal = kind == 2;
	for (size_t i = 0; i < n; i++)
		if (!calls[i]->reply && (*fatal || id == calls[i]->id)) return (int)i;
	return -1;
}

/* Sends the requests of calls[0..n) together and reads one reply for each into calls[i]->reply
 * (length lens[i]), busy-polling for the first reply for `poll_us` microseconds. `clean`: nothing was sent, the connection stays usable. */
static CK_RV exchange_frames(int fd, struct kg_call **calls, size_t n, uint32_t max_frame, size_t *lens, int *clean,
                             int64_t deadline, int poll_us)
{
	struct inbox in = {.have = 0};
	*clean = 1;
	for (size_t i = 0; i < n; i++) {
		CK_RV rv = kg_frame_check(&calls[i]->req, max_frame);
		if (rv != CKR_OK) return rv;
	}
	*clean = 0;
	for (size_t i = 0; i < n; i++) {
		size_t body = calls[i]->req.len - 4;
		for (int j = 0; j < 4; j++)
			calls[i]->req.data[j] = (uint8_t)(body >> (24 - 8 * j));
	}
	if (send_frames(fd, calls, n, deadline)) return CKR_DEVICE_REMOVED;
	for (size_t done = 0; done < n; done++) {
		uint8_t *body = NULL;
		size_t len = 0;
		int fatal = 0, to;
		CK_RV rv = read_frame(fd, &in, max_frame, deadline, !done ? poll_us : 0, &body, &len);
		if (rv == CKR_OK && (to = match_reply(calls, n, body, len, &fatal)) < 0) rv = CKR_DEVICE_ERROR;
		if (rv != CKR_OK) {
			free(body);
			return rv;
		}
		calls[to]->reply = body;
		lens[to] = len;
		if (fatal) return kg_parse_reply(calls[to], len); /* logs the message: CKR_DEVICE_REMOVED */
	}
	return in.pos < in.have ? CKR_DEVICE_ERROR : CKR_OK; /* nothing may follow the last reply */
}

CK_RV kg_exchange(int fd, struct kg_call **calls, size_t n, uint32_t max_frame, size_t *lens, int *clean,
                  int call_timeout_ms, int busy_poll_us)
{
	int alone = atomic_fetch_add(&in_flight, 1) == 0, poll_us = 0;
	if (alone && busy_poll_us > 0) {
		int skip = atomic_load(&poll_skip);
		if (skip > 0)
			atomic_store(&poll_skip, skip - 1);
		else
			poll_us = busy_poll_us;
	}
	CK_RV rv = exchange_frames(fd, calls, n, max_frame, lens, clean, deadline_in(call_timeout_ms), poll_us);
	atomic_fetch_sub(&in_flight, 1);
	return rv;
}
