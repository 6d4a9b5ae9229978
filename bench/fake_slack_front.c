/* The fake Slack's front for relaybot benchmarks, in C: the hot requests answered here, the rest relayed.
 *
 * On a 2-core machine the fake Slack shares the CPU with what is measured (relaybot, PostgreSQL), and every
 * microsecond it spends per message is taken from them: Slack's servers are never on the bot's machine. The
 * Python front (`lean_http.py`) cost 18-25 µs of CPU per request, two requests per card; this one does the same
 * work in a few. It answers exactly what `fake_slack_relay.py`'s `BenchSlack.hot_answer` answers:
 *
 *   POST /api/chat.postMessage and /api/chat.update, HTTP/1.1, Content-Length framed, `Content-Type`
 *   application/json, `Authorization: Bearer <token>`, a JSON object body whose "channel" is the bench channel
 *   (and whose "channel", "thread_ts" and "ts", where present, are strings without escapes).
 *
 * A card (a postMessage without a truthy "thread_ts") is counted with its receive time and, if its body holds
 * `probe t=<epoch seconds>`, the latency since then; thread replies and updates are counted. The counts are not
 * kept here: before any request is relayed they are posted to the internal server (`POST /bench/counts`), which
 * adds them to the harness's `fake_slack.STATE`. So `/stats` and `/reset`, which are relayed, see every card
 * counted before them, in order, and the harness's own code still computes what it reports.
 *
 * Every other request (set-up, slash commands, response_url, `/stats`, a body that is not such JSON, HTTP/1.0,
 * an unusual header) is relayed as received, with `Connection: close`, to the internal server; its answer goes
 * back with `Connection: close` and the client's connection is closed after it. Refused with 400 and a closed
 * connection: a request head that cannot be read without guessing (bare CR or LF, a bad request line, a bad or
 * conflicting Content-Length) and any `Transfer-Encoding` (relaybot never sends one); 413 over 8 MB, 431 for a
 * head over 64 KB.
 *
 * Usage: fake_slack_front --port P (0: any) --upstream-port U --token T --channel C
 * Prints "PORT <bound port>" on stdout once listening. Loopback only.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_HEAD (64 * 1024)
#define MAX_BODY (8 * 1024 * 1024)

typedef struct {
    char *data;
    size_t len, cap;
} buffer;

static void buffer_add(buffer *b, const char *data, size_t len) {
    if (b->len + len > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (cap < b->len + len) cap *= 2;
        b->data = realloc(b->data, cap);
        if (!b->data) { perror("realloc"); exit(1); }
        b->cap = cap;
    }
    memcpy(b->data + b->len, data, len);
    b->len += len;
}

static void buffer_printf(buffer *b, const char *format, ...) {
    char text[512];
    va_list args;
    va_start(args, format);
    int n = vsnprintf(text, sizeof text, format, args);
    va_end(args);
    if (n > 0) buffer_add(b, text, (size_t)n < sizeof text ? (size_t)n : sizeof text - 1);
}

static void buffer_drop(buffer *b, size_t n) {
    memmove(b->data, b->data + n, b->len - n);
    b->len -= n;
}

static void buffer_free(buffer *b) { free(b->data); b->data = NULL; b->len = b->cap = 0; }

/* ------------------------------------------------------------------------------------ configuration, counts */

static const char *token, *channel;
static int upstream_port;
static int epoll_fd;

static struct {
    long cards, replies, updates;
    double first_wall, first_mono, last_wall, last_mono;
    double *probes;
    size_t n_probes, cap_probes;
} counts;

static long long last_ts_us;

static double clock_seconds(clockid_t clock) {
    struct timespec now;
    clock_gettime(clock, &now);
    return (double)now.tv_sec + now.tv_nsec / 1e9;
}

/* A Slack-style ts, strictly increasing (as `fake_slack.State.next_ts`). */
static void next_ts(char *out, size_t size) {
    long long now_us = (long long)(clock_seconds(CLOCK_REALTIME) * 1e6);
    if (now_us <= last_ts_us) now_us = last_ts_us + 1;
    last_ts_us = now_us;
    snprintf(out, size, "%lld.%06lld", now_us / 1000000, now_us % 1000000);
}

static int counts_pending(void) { return counts.cards || counts.replies || counts.updates; }

/* The counts as the body of `POST /bench/counts` (one line each; see `fake_slack_relay.py`), then forgotten. */
static void take_counts(buffer *body) {
    buffer_printf(body, "cards %ld %.6f %.9f %.6f %.9f\n", counts.cards, counts.first_wall, counts.first_mono,
                  counts.last_wall, counts.last_mono);
    buffer_printf(body, "replies %ld\nupdates %ld\n", counts.replies, counts.updates);
    for (size_t i = 0; i < counts.n_probes; i++) buffer_printf(body, "probe %.9f\n", counts.probes[i]);
    counts.cards = counts.replies = counts.updates = 0;
    counts.n_probes = 0;
}

static void count_card(const char *body, size_t len) {
    double wall = clock_seconds(CLOCK_REALTIME), mono = clock_seconds(CLOCK_MONOTONIC);
    if (!counts.cards) { counts.first_wall = wall; counts.first_mono = mono; }
    counts.cards++;
    counts.last_wall = wall;
    counts.last_mono = mono;
    /* fake_slack.PROBE_RE: probe t=([0-9]+\.[0-9]+), its first match */
    const char *end = body + len;
    for (const char *at = memmem(body, len, "probe t=", 8); at; at = memmem(at + 1, end - at - 1, "probe t=", 8)) {
        const char *p = at + 8, *digits = p;
        while (p < end && isdigit((unsigned char)*p)) p++;
        if (p == digits || p >= end || *p != '.') continue;
        p++;
        const char *fraction = p;
        while (p < end && isdigit((unsigned char)*p)) p++;
        if (p == fraction) continue;
        char number[64];
        size_t n = (size_t)(p - digits) < sizeof number - 1 ? (size_t)(p - digits) : sizeof number - 1;
        memcpy(number, digits, n);
        number[n] = 0;
        if (counts.n_probes == counts.cap_probes) {
            counts.cap_probes = counts.cap_probes ? counts.cap_probes * 2 : 1024;
            counts.probes = realloc(counts.probes, counts.cap_probes * sizeof(double));
            if (!counts.probes) { perror("realloc"); exit(1); }
        }
        counts.probes[counts.n_probes++] = wall - strtod(number, NULL);
        break;
    }
}

/* ------------------------------------------------------------------------------------------- the JSON body */

typedef struct {
    const char *start;
    size_t len;
    int present, is_string;
} json_field;

static const char *skip_blanks(const char *p, const char *end) {
    while (p < end && (*p == ' ' || *p == '\t' || *p == '\r' || *p == '\n')) p++;
    return p;
}

/* A JSON string at p ('"'): its end (past the closing quote), or NULL; *escaped says whether it has escapes. */
static const char *skip_string(const char *p, const char *end, int *escaped) {
    *escaped = 0;
    for (p++; p < end; p++) {
        unsigned char c = (unsigned char)*p;
        if (c == '"') return p + 1;
        if (c < 0x20) return NULL;
        if (c == '\\') {
            *escaped = 1;
            if (++p >= end) return NULL;
        }
    }
    return NULL;
}

/* Any JSON value at p, loosely: strings, nesting and literals are skipped without checking the grammar inside.
 * Only the fields the answer depends on are read exactly; the rest of a body that is not JSON makes no
 * difference to it. */
static const char *skip_value(const char *p, const char *end) {
    int depth = 0, escaped;
    do {
        p = skip_blanks(p, end);
        if (p >= end) return NULL;
        if (*p == '"') {
            if (!(p = skip_string(p, end, &escaped))) return NULL;
        } else if (*p == '{' || *p == '[') {
            depth++;
            p++;
        } else if (*p == '}' || *p == ']') {
            if (--depth < 0) return NULL;
            p++;
        } else if (*p == ',' || *p == ':') {
            if (!depth) return NULL;
            p++;
        } else {
            const char *literal = p;
            while (p < end && (isalnum((unsigned char)*p) || *p == '-' || *p == '+' || *p == '.')) p++;
            if (p == literal) return NULL;
        }
    } while (depth);
    return p;
}

/* The top-level "channel", "thread_ts" and "ts" of a JSON object body; 0 if it is not read with certainty. */
static int read_fields(const char *p, size_t len, json_field *channel_field, json_field *thread_field,
                       json_field *ts_field) {
    const char *end = p + len;
    int escaped;
    p = skip_blanks(p, end);
    if (p >= end || *p != '{') return 0;
    p = skip_blanks(p + 1, end);
    if (p < end && *p == '}') return skip_blanks(p + 1, end) == end;
    for (;;) {
        if (p >= end || *p != '"') return 0;
        const char *key = p + 1, *key_end = skip_string(p, end, &escaped);
        if (!key_end) return 0;
        size_t key_len = (size_t)(key_end - 1 - key);
        json_field *field = NULL;
        if (!escaped && key_len == 7 && !memcmp(key, "channel", 7)) field = channel_field;
        else if (!escaped && key_len == 9 && !memcmp(key, "thread_ts", 9)) field = thread_field;
        else if (!escaped && key_len == 2 && !memcmp(key, "ts", 2)) field = ts_field;
        else if (escaped) return 0; /* an escaped key could spell one of the three */
        p = skip_blanks(key_end, end);
        if (p >= end || *p != ':') return 0;
        p = skip_blanks(p + 1, end);
        const char *value = p;
        if (!(p = skip_value(p, end))) return 0;
        if (field) { /* the last of repeated keys wins, as in Python's json */
            field->present = 1;
            field->is_string = *value == '"';
            if (field->is_string) {
                skip_string(value, end, &escaped);
                if (escaped) return 0;
                field->start = value + 1;
                field->len = (size_t)(p - value - 2);
            }
        }
        p = skip_blanks(p, end);
        if (p < end && *p == ',') { p = skip_blanks(p + 1, end); continue; }
        if (p < end && *p == '}') return skip_blanks(p + 1, end) == end;
        return 0;
    }
}

/* --------------------------------------------------------------------------------------------- connections */

typedef struct conn conn;
struct conn {
    int fd;
    int upstream;          /* a connection to the internal server */
    buffer in, out;        /* received / still to send */
    int close_when_sent;   /* close once `out` is sent */
    int eof;               /* the client half-closed: answer what it asked, then close */
    uint32_t watching;     /* its epoll events now */
    int dead;
    conn *peer;            /* client: the upstream relaying for it; upstream: its client */
    /* client: a request whose head is parsed, waiting for its body */
    int have_head, keep_alive, plain, well_formed, continue_sent, expect_continue;
    size_t head_len, body_len;
    char method[16], target[64];
    char content_type[128], authorization[256];
    /* upstream: the request to relay once the counts are delivered (empty: being relayed) */
    buffer after_counts;
    int sending_counts;
    conn *next_dead;
};

static conn *dead_list;

static void watch(conn *c, int op) {
    /* after the client's EOF, reading would report it again and again */
    uint32_t wanted = (c->eof ? 0 : EPOLLIN | EPOLLRDHUP) | (c->out.len ? EPOLLOUT : 0);
    if (op == EPOLL_CTL_MOD && wanted == c->watching) return; /* a syscall saved per answer */
    struct epoll_event event = {.events = wanted, .data.ptr = c};
    if (epoll_ctl(epoll_fd, op, c->fd, &event) < 0) perror("epoll_ctl");
    c->watching = wanted;
}

static void kill_conn(conn *c) {
    if (c->dead) return;
    c->dead = 1;
    epoll_ctl(epoll_fd, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    if (c->peer) {
        c->peer->peer = NULL;
        if (c->upstream) { /* the client waited for this relay: it gets a 502 and is closed */
            static const char bad[] = "HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/plain; charset=utf-8\r\n"
                                      "Content-Length: 28\r\nConnection: close\r\n\r\ninternal server unreachable.";
            buffer_add(&c->peer->out, bad, sizeof bad - 1);
            c->peer->close_when_sent = 1;
            watch(c->peer, EPOLL_CTL_MOD);
        } else {
            kill_conn(c->peer); /* the client went away: its relay is of no use */
        }
    }
    c->next_dead = dead_list; /* freed after this round of events, which may still name it */
    dead_list = c;
}

static void flush_out(conn *c) {
    while (c->out.len) {
        ssize_t n = send(c->fd, c->out.data, c->out.len, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) break;
            if (errno == EINTR) continue;
            kill_conn(c);
            return;
        }
        buffer_drop(&c->out, (size_t)n);
    }
    if (!c->out.len && c->close_when_sent) { kill_conn(c); return; }
    watch(c, EPOLL_CTL_MOD);
}

static void send_error(conn *c, int status, const char *reason, const char *detail) {
    buffer_printf(&c->out, "HTTP/1.1 %d %s\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: %zu\r\n"
                  "Connection: close\r\n\r\n%s", status, reason, strlen(detail), detail);
    c->close_when_sent = 1;
    c->in.len = 0;
}

static conn *new_conn(int fd, int upstream) {
    conn *c = calloc(1, sizeof *c);
    if (!c) { perror("calloc"); exit(1); }
    c->fd = fd;
    c->upstream = upstream;
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    watch(c, EPOLL_CTL_ADD);
    return c;
}

/* ------------------------------------------------------------------------------------------------- relaying */

static int is_header(const char *line, size_t len, const char *name) {
    size_t n = strlen(name);
    return len > n && line[n] == ':' && !strncasecmp(line, name, n);
}

static void start_upstream(conn *client, buffer *request, int counts_first);

/* The client's request as received, alone on its connection: `Connection: close`, no `Keep-Alive`/`Expect`. */
static void relay(conn *client) {
    buffer request = {0};
    const char *head = client->in.data, *end = head + client->head_len - 2; /* up to the blank line */
    const char *line_end = memmem(head, (size_t)(end - head), "\r\n", 2);
    buffer_add(&request, head, (size_t)(line_end + 2 - head));
    for (const char *line = line_end + 2; line < end; line = line_end + 2) {
        line_end = memmem(line, (size_t)(end - line), "\r\n", 2);
        size_t len = (size_t)(line_end - line);
        if (is_header(line, len, "connection") || is_header(line, len, "keep-alive") || is_header(line, len, "expect"))
            continue;
        buffer_add(&request, line, len + 2);
    }
    buffer_add(&request, "Connection: close\r\n\r\n", 21);
    buffer_add(&request, client->in.data + client->head_len, client->body_len);
    buffer_drop(&client->in, client->head_len + client->body_len);
    client->have_head = 0;
    start_upstream(client, &request, counts_pending());
}

static void start_upstream(conn *client, buffer *request, int counts_first) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    struct sockaddr_in address = {.sin_family = AF_INET, .sin_port = htons(upstream_port),
                                  .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    if (fd < 0 || (connect(fd, (struct sockaddr *)&address, sizeof address) < 0 && errno != EINPROGRESS)) {
        perror("connect to the internal server");
        if (fd >= 0) close(fd);
        buffer_free(request);
        send_error(client, 502, "Bad Gateway", "internal server unreachable.");
        flush_out(client);
        return;
    }
    conn *up = new_conn(fd, 1);
    up->peer = client;
    client->peer = up;
    if (counts_first) {
        buffer body = {0};
        take_counts(&body);
        buffer_printf(&up->out, "POST /bench/counts HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: text/plain\r\n"
                      "Content-Length: %zu\r\nConnection: close\r\n\r\n", body.len);
        buffer_add(&up->out, body.data, body.len);
        buffer_free(&body);
        up->after_counts = *request; /* sent on a new connection once the counts are in */
        up->sending_counts = 1;
    } else {
        up->out = *request;
    }
    watch(up, EPOLL_CTL_MOD);
}

/* The internal server's answer (read to its end) for the client, which is closed after it. */
static void upstream_done(conn *up) {
    conn *client = up->peer;
    buffer answer = up->in;
    up->in = (buffer){0};
    if (up->sending_counts) {
        if (answer.len < 12 || memcmp(answer.data + 9, "200", 3))
            fprintf(stderr, "fake_slack_front: POST /bench/counts was not answered 200\n");
        buffer_free(&answer);
        buffer request = up->after_counts;
        up->after_counts = (buffer){0};
        up->peer = NULL;
        kill_conn(up);
        if (client) { client->peer = NULL; start_upstream(client, &request, 0); }
        else buffer_free(&request);
        return;
    }
    up->peer = NULL;
    kill_conn(up);
    if (!client) { buffer_free(&answer); return; }
    client->peer = NULL;
    /* its head's own Connection headers replaced by ours (no interim 1xx: `relay` drops the client's Expect) */
    char *head_end = answer.len ? memmem(answer.data, answer.len, "\r\n\r\n", 4) : NULL;
    if (!head_end) {
        send_error(client, 502, "Bad Gateway", "incomplete answer from the internal server.");
    } else {
        const char *line = answer.data, *end = head_end + 2;
        const char *line_end = memmem(line, (size_t)(end - line), "\r\n", 2);
        buffer_add(&client->out, line, (size_t)(line_end + 2 - line));
        for (line = line_end + 2; line < end; line = line_end + 2) {
            line_end = memmem(line, (size_t)(end - line), "\r\n", 2);
            size_t len = (size_t)(line_end - line);
            if (!is_header(line, len, "connection") && !is_header(line, len, "keep-alive"))
                buffer_add(&client->out, line, len + 2);
        }
        buffer_add(&client->out, "Connection: close\r\n\r\n", 21);
        buffer_add(&client->out, head_end + 4, answer.len - (size_t)(head_end + 4 - answer.data));
        client->close_when_sent = 1;
    }
    buffer_free(&answer);
    flush_out(client);
}

/* ---------------------------------------------------------------------------------------------- requests */

static int token_char(unsigned char c) {
    return isalnum(c) || strchr("!#$%&'*+-.^_`|~", c) != NULL;
}

/* 0: head read (fields set); -1: answered with an error (the connection closes) */
static int parse_head(conn *c, const char *head, size_t len) {
    const char *end = head + len - 4;
    c->plain = 1;
    c->well_formed = 1;
    c->content_type[0] = c->authorization[0] = 0;
    c->expect_continue = c->continue_sent = 0;
    for (const char *p = head; p < end; p++) {
        unsigned char ch = (unsigned char)*p;
        if ((ch == '\r' && (p + 1 >= end || p[1] != '\n')) || (ch == '\n' && (p == head || p[-1] != '\r'))) {
            send_error(c, 400, "Bad Request", "bare CR or LF in the request head");
            return -1;
        }
        if (ch != '\t' && ch != '\r' && ch != '\n' && (ch < 0x20 || ch > 0x7e)) c->plain = 0;
    }
    const char *line_end = memmem(head, len - 2, "\r\n", 2);
    const char *space1 = memchr(head, ' ', (size_t)(line_end - head));
    const char *space2 = space1 ? memchr(space1 + 1, ' ', (size_t)(line_end - space1 - 1)) : NULL;
    int version_ok = space2 && line_end - space2 - 1 == 8 && !memcmp(space2 + 1, "HTTP/1.", 7)
                     && (space2[8] == '0' || space2[8] == '1');
    if (!version_ok || space1 == head || space2 == space1 + 1 || memchr(space2 + 1, ' ', 8)) {
        send_error(c, 400, "Bad Request", "malformed request line");
        return -1;
    }
    for (const char *p = head; p < space1; p++)
        if (!token_char((unsigned char)*p)) { send_error(c, 400, "Bad Request", "malformed request line"); return -1; }
    int http11 = space2[8] == '1';
    snprintf(c->method, sizeof c->method, "%.*s", (int)(space1 - head), head);
    if (space2 - space1 - 1 < (long)sizeof c->target)
        snprintf(c->target, sizeof c->target, "%.*s", (int)(space2 - space1 - 1), space1 + 1);
    else
        c->target[0] = 0, c->plain = 0;
    if (!http11) c->plain = 0;
    long content_length = -1;
    int connection_close = 0, connection_keep_alive = 0;
    int seen_type = 0, seen_auth = 0, seen_connection = 0;
    for (const char *line = line_end + 2; line < end + 2; line = line_end + 2) {
        line_end = memmem(line, (size_t)(end + 2 - line), "\r\n", 2);
        const char *colon = memchr(line, ':', (size_t)(line_end - line));
        int name_ok = colon && colon > line;
        for (const char *p = line; name_ok && p < colon; p++) name_ok = token_char((unsigned char)*p);
        if (!name_ok) { c->well_formed = c->plain = 0; continue; }
        const char *value = colon + 1, *value_end = line_end;
        while (value < value_end && (*value == ' ' || *value == '\t')) value++;
        while (value_end > value && (value_end[-1] == ' ' || value_end[-1] == '\t')) value_end--;
        size_t name_len = (size_t)(colon - line), value_len = (size_t)(value_end - value);
#define NAME_IS(text) (name_len == sizeof(text) - 1 && !strncasecmp(line, text, name_len))
        if (NAME_IS("content-length")) {
            long length = 0;
            int digits = value_len > 0 && value_len < 12;
            for (size_t i = 0; digits && i < value_len; i++) {
                digits = isdigit((unsigned char)value[i]);
                length = length * 10 + (value[i] - '0');
            }
            if (!digits) { send_error(c, 400, "Bad Request", "malformed Content-Length"); return -1; }
            if (content_length >= 0 && content_length != length) {
                send_error(c, 400, "Bad Request", "conflicting Content-Length headers");
                return -1;
            }
            if (content_length >= 0) c->plain = 0;
            content_length = length;
        } else if (NAME_IS("transfer-encoding")) {
            send_error(c, 400, "Bad Request", "unsupported Transfer-Encoding");
            return -1;
        } else if (NAME_IS("content-type")) {
            if (seen_type++) c->plain = 0;
            snprintf(c->content_type, sizeof c->content_type, "%.*s", (int)value_len, value);
        } else if (NAME_IS("authorization")) {
            if (seen_auth++) c->plain = 0;
            snprintf(c->authorization, sizeof c->authorization, "%.*s", (int)value_len, value);
        } else if (NAME_IS("connection")) {
            if (seen_connection++) c->plain = 0;
            for (const char *option = value; option < value_end;) {
                const char *comma = memchr(option, ',', (size_t)(value_end - option));
                const char *option_end = comma ? comma : value_end;
                while (option < option_end && (*option == ' ' || *option == '\t')) option++;
                const char *trimmed = option_end;
                while (trimmed > option && (trimmed[-1] == ' ' || trimmed[-1] == '\t')) trimmed--;
                if (trimmed - option == 5 && !strncasecmp(option, "close", 5)) connection_close = 1;
                if (trimmed - option == 10 && !strncasecmp(option, "keep-alive", 10)) connection_keep_alive = 1;
                option = comma ? comma + 1 : value_end;
            }
        } else if (NAME_IS("expect")) {
            c->plain = 0;
            c->expect_continue = value_len == 12 && !strncasecmp(value, "100-continue", 12);
        } else if (NAME_IS("content-encoding")) {
            c->plain = 0;
        }
#undef NAME_IS
    }
    if (content_length > MAX_BODY) {
        send_error(c, 413, "Request Entity Too Large", "Maximum request body size 8388608 exceeded");
        return -1;
    }
    c->keep_alive = http11 ? !connection_close : connection_keep_alive && !connection_close;
    c->body_len = content_length > 0 ? (size_t)content_length : 0;
    c->head_len = len;
    c->have_head = 1;
    return 0;
}

static int media_type_is_json(const char *value) {
    const char *end = strchr(value, ';');
    size_t len = end ? (size_t)(end - value) : strlen(value);
    while (len && (value[len - 1] == ' ' || value[len - 1] == '\t')) len--;
    return len == 16 && !strncasecmp(value, "application/json", 16);
}

/* The hot answer's JSON, or 0: relay the request. */
static int hot_answer(conn *c, const char *body, size_t len, char *answer, size_t size) {
    int update = !strcmp(c->target, "/api/chat.update");
    if (!c->plain || strcmp(c->method, "POST") || !(update || !strcmp(c->target, "/api/chat.postMessage")))
        return 0;
    if (!c->content_type[0] || !media_type_is_json(c->content_type)) return 0;
    const char *auth = c->authorization;
    if (!strncmp(auth, "Bearer ", 7)) auth += 7;
    while (*auth == ' ' || *auth == '\t') auth++;
    if (strcmp(auth, token)) return 0;
    json_field channel_field = {0}, thread_field = {0}, ts_field = {0};
    if (!read_fields(len ? body : "{}", len ? len : 2, &channel_field, &thread_field, &ts_field)) return 0;
    if (!channel_field.present || !channel_field.is_string || channel_field.len != strlen(channel)
        || memcmp(channel_field.start, channel, channel_field.len))
        return 0;
    char ts[32];
    if (update) {
        if (!ts_field.present)
            snprintf(answer, size, "{\"ok\": true, \"channel\": \"%s\", \"ts\": null}", channel);
        else if (ts_field.is_string && ts_field.len < 200)
            snprintf(answer, size, "{\"ok\": true, \"channel\": \"%s\", \"ts\": \"%.*s\"}", channel,
                     (int)ts_field.len, ts_field.start);
        else
            return 0;
        counts.updates++;
        return 1;
    }
    if (thread_field.present && !thread_field.is_string) return 0;
    next_ts(ts, sizeof ts);
    if (thread_field.present && thread_field.len) counts.replies++;
    else count_card(body, len);
    snprintf(answer, size, "{\"ok\": true, \"channel\": \"%s\", \"ts\": \"%s\"}", channel, ts);
    return 1;
}

static void serve_buffered(conn *c) {
    while (!c->dead && !c->peer && !c->close_when_sent) {
        if (!c->have_head) {
            size_t skip = 0;
            while (c->in.len >= skip + 2 && c->in.data[skip] == '\r' && c->in.data[skip + 1] == '\n') skip += 2;
            if (skip) buffer_drop(&c->in, skip);
            char *head_end = c->in.len ? memmem(c->in.data, c->in.len, "\r\n\r\n", 4) : NULL;
            if (!head_end) {
                if (c->in.len > MAX_HEAD) send_error(c, 431, "Request Header Fields Too Large", "request head too large");
                break;
            }
            if (parse_head(c, c->in.data, (size_t)(head_end + 4 - c->in.data)) < 0) break;
        }
        if (c->in.len < c->head_len + c->body_len) {
            if (c->expect_continue && !c->continue_sent) {
                buffer_add(&c->out, "HTTP/1.1 100 Continue\r\n\r\n", 25);
                c->continue_sent = 1;
            }
            break;
        }
        char answer[512];
        if (hot_answer(c, c->in.data + c->head_len, c->body_len, answer, sizeof answer)) {
            buffer_printf(&c->out, "HTTP/1.1 200 OK\r\nContent-Type: application/json; charset=utf-8\r\n"
                          "Content-Length: %zu\r\n%s\r\n", strlen(answer), c->keep_alive ? "" : "Connection: close\r\n");
            buffer_add(&c->out, answer, strlen(answer));
            buffer_drop(&c->in, c->head_len + c->body_len);
            c->have_head = 0;
            if (!c->keep_alive) c->close_when_sent = 1;
        } else {
            relay(c);
        }
    }
    if (c->dead) return;
    if (c->eof && !c->peer) c->close_when_sent = 1;
    flush_out(c);
}

static void on_event(conn *c, uint32_t events) {
    if (c->dead) return;
    if (events & EPOLLOUT) {
        flush_out(c);
        if (c->dead) return;
    }
    if (events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) {
        if (c->eof) { kill_conn(c); return; } /* not reading any more: this is a hang-up or an error */
        char data[65536];
        for (;;) {
            ssize_t n = recv(c->fd, data, sizeof data, 0);
            if (n > 0) { buffer_add(&c->in, data, (size_t)n); continue; }
            if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
            if (n < 0 && errno == EINTR) continue;
            if (c->upstream) { upstream_done(c); return; } /* its answer is all it sent */
            if (n < 0) { kill_conn(c); return; }
            c->eof = 1;
            break;
        }
        if (!c->upstream) serve_buffered(c);
    }
}

int main(int argc, char **argv) {
    int port = 0;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--port")) port = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--upstream-port")) upstream_port = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--token")) token = argv[i + 1];
        else if (!strcmp(argv[i], "--channel")) channel = argv[i + 1];
    }
    if (!upstream_port || !token || !channel) {
        fprintf(stderr, "usage: %s --port P --upstream-port U --token T --channel C\n", argv[0]);
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    /* Ends with the fake Slack's Python process, however that ends (a SIGTERM skips its clean-up). */
    if (prctl(PR_SET_PDEATHSIG, SIGTERM) < 0 || getppid() == 1) return 1;
    int listener = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    int one = 1;
    setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in address = {.sin_family = AF_INET, .sin_port = htons(port),
                                  .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t size = sizeof address;
    if (bind(listener, (struct sockaddr *)&address, sizeof address) < 0 || listen(listener, 512) < 0
        || getsockname(listener, (struct sockaddr *)&address, &size) < 0) {
        perror("listen");
        return 1;
    }
    epoll_fd = epoll_create1(0);
    struct epoll_event listen_event = {.events = EPOLLIN, .data.ptr = NULL};
    epoll_ctl(epoll_fd, EPOLL_CTL_ADD, listener, &listen_event);
    printf("PORT %d\n", ntohs(address.sin_port));
    fflush(stdout);
    struct epoll_event events[256];
    for (;;) {
        int n = epoll_wait(epoll_fd, events, 256, -1);
        if (n < 0 && errno != EINTR) { perror("epoll_wait"); return 1; }
        for (int i = 0; i < n; i++) {
            if (events[i].data.ptr == NULL) {
                int fd;
                while ((fd = accept4(listener, NULL, NULL, SOCK_NONBLOCK)) >= 0) new_conn(fd, 0);
                continue;
            }
            on_event(events[i].data.ptr, events[i].events);
        }
        while (dead_list) {
            conn *c = dead_list;
            dead_list = c->next_dead;
            buffer_free(&c->in);
            buffer_free(&c->out);
            buffer_free(&c->after_counts);
            free(c);
        }
    }
}
