/* sniproxy.ebpf._handover: the tcp_splice hand-over's BPF-reader path in one C call.
 *
 * Why this exists (issue 14, new-connection CPU): in Python, WorkerSplice.try_relay cost
 * ~180 us of wall time per connection (bench/newconn_breakdown.py -n 3000), most of it glue
 * around ~12 system calls: two socket-state getsockopts, unpacking and checking them, packing
 * two flow-map keys and entries, five bpf() map updates through ctypes, SIOCINQ, the client
 * queue read, the silent close and the hello write. This file makes exactly those calls, in
 * the same order, with the raw bpf(2) syscall on the map fds the Python side opened.
 *
 * The Python path (src/sniproxy/relay/tcpsplice.py: WorkerSplice._try_relay_python,
 * _read_sides, _check_pair, ebpf/tcpsplice.py: flow_entries, TcpSpliceDataPath.insert /
 * claim_slot / update) is the reference: every check, fallback reason, message, rollback and
 * map write here mirrors it step by step, and tests/unit/test_handover_compiled.py checks that
 * the map entries are byte-identical. It also stays the path for everything this call does not
 * answer: sockets the BPF reader does not answer, microsecond TCP timestamps, no reader
 * (TCP_REPAIR), SNI_PROXY_HANDOVER=python, or this extension not built.
 *
 * Not ctypes (ebpf/libbpf.py stays the only ctypes module): plain syscalls, the GIL held
 * throughout (every call is non-blocking), no state kept between calls except a read buffer.
 *
 *   arm(client_sock, backend_fd, flows_fd, state_fd, claims_fd, routes, attached, cursor,
 *       max_flows, ring_index, pid, gen) ->
 *     ("ok", slot, c2b_key, b2c_key, b_write_seq, c_write_seq, data, sent, send_errno)
 *   | ("fallback", reason, message)
 *   | ("route", address_key, address_text)   # routes lacks it: fill routes[key], call again
 *   | ("python",)                            # not answered here: take the Python path
 *
 * routes: {peer address bytes (4 or 16): (out ifindex, has_neighbours)}; attached: the set of
 * ifindexes with the tc programs.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <net/if.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stddef.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
#include <linux/bpf.h>
#include <linux/types.h>

#include "bpf/sni_proxy_tcp_splice.h"
#include "bpf/sni_proxy_sockstate.h"

_Static_assert(sizeof(struct sni_proxy_ts_key) == 40, "sni_proxy_ts_key layout");
_Static_assert(sizeof(struct sni_proxy_ts_dir) == 68, "sni_proxy_ts_dir layout");
_Static_assert(sizeof(struct sni_proxy_ts_flow) == 192, "sni_proxy_ts_flow layout");
_Static_assert(sizeof(struct sni_proxy_sockstate) == 72, "sni_proxy_sockstate layout");

#define TCP_ESTABLISHED_STATE 1
#define TCP_CLOSE_STATE 7
#define TCP_REPAIR_OPT 19
#define READ_CHUNK (256 * 1024)         /* as relay/tcpsplice.py READ_CHUNK */

static const char UNACKED[] = "bytes the proxy sent to the client are not acknowledged yet";

/* --------------------------------------------------------------------------- bpf(2) */
static int map_update(int fd, const void *key, const void *value, __u64 flags)
{
	union bpf_attr attr;

	memset(&attr, 0, sizeof(attr));
	attr.map_fd = fd;
	attr.key = (__u64)(unsigned long)key;
	attr.value = (__u64)(unsigned long)value;
	attr.flags = flags;
	/* as libbpf: the attr up to the last field used */
	if (syscall(__NR_bpf, BPF_MAP_UPDATE_ELEM, &attr,
		    offsetof(union bpf_attr, flags) + sizeof(attr.flags)) < 0)
		return -errno;
	return 0;
}

static int map_lookup(int fd, const void *key, void *value)
{
	union bpf_attr attr;

	memset(&attr, 0, sizeof(attr));
	attr.map_fd = fd;
	attr.key = (__u64)(unsigned long)key;
	attr.value = (__u64)(unsigned long)value;
	if (syscall(__NR_bpf, BPF_MAP_LOOKUP_ELEM, &attr,
		    offsetof(union bpf_attr, flags) + sizeof(attr.flags)) < 0)
		return -errno;
	return 0;
}

static int map_delete(int fd, const void *key)
{
	union bpf_attr attr;

	memset(&attr, 0, sizeof(attr));
	attr.map_fd = fd;
	attr.key = (__u64)(unsigned long)key;
	if (syscall(__NR_bpf, BPF_MAP_DELETE_ELEM, &attr,
		    offsetof(union bpf_attr, key) + sizeof(attr.key)) < 0)
		return -errno;
	return 0;
}

/* Map.delete: ENOENT is "was not there"; anything else raises. */
static int delete_or_raise(int fd, const void *key)
{
	int err = map_delete(fd, key);

	if (err < 0 && err != -ENOENT) {
		PyErr_Format(PyExc_OSError, "deleting a key from map fd %d: %s", fd, strerror(-err));
		return -1;
	}
	return 0;
}

static void raise_update(int fd, int err)
{
	PyObject *exc_args = Py_BuildValue("(iN)", -err, PyUnicode_FromFormat(
		"updating map fd %d: %s", fd, strerror(-err)));

	if (exc_args != NULL) {
		PyErr_SetObject(PyExc_OSError, exc_args);
		Py_DECREF(exc_args);
	}
}

/* --------------------------------------------------------------------------- results */
static PyObject *fallback(const char *reason, PyObject *message)
{
	PyObject *out;

	if (message == NULL)
		return NULL;
	out = Py_BuildValue("(ssN)", "fallback", reason, message);
	return out;
}

static PyObject *python_path(void)
{
	return Py_BuildValue("(s)", "python");
}

/* --------------------------------------------------------------------------- sockets */
/* 0: read; 1: not answered (ENOPROTOOPT, short); -errno: failed */
static int read_state(int fd, struct sni_proxy_sockstate *out)
{
	socklen_t len = sizeof(*out);

	if (getsockopt(fd, IPPROTO_TCP, SNI_PROXY_SOCKSTATE_OPT, out, &len) < 0)
		return errno == ENOPROTOOPT ? 1 : -errno;
	return len == sizeof(*out) ? 0 : 1;
}

static const char *host_text(const struct sni_proxy_sockstate *s, const __u8 *addr16,
			     char *buf, size_t size)
{
	if (s->family == 4)
		return inet_ntop(AF_INET, addr16, buf, size);
	return inet_ntop(AF_INET6, addr16, buf, size);
}

static unsigned snd_wscale(const struct sni_proxy_sockstate *s)
{
	return (s->options & SNI_PROXY_SS_WSCALE) ? (s->wscale & 0x0f) : 0;
}

static unsigned rcv_wscale(const struct sni_proxy_sockstate *s)
{
	return (s->options & SNI_PROXY_SS_WSCALE) ? (s->wscale >> 4) : 0;
}

static void pack_key(struct sni_proxy_ts_key *k, const struct sni_proxy_sockstate *s)
{
	/* packets from the socket's peer to its local address (pack_key(peer, local)) */
	memset(k, 0, sizeof(*k));
	k->family = s->family;
	memcpy(k->saddr, s->peer_addr, 16);
	memcpy(k->daddr, s->local_addr, 16);
	k->sport = htons(s->peer_port);
	k->dport = htons(s->local_port);
}

/* routes[peer] -> (ifindex, neigh): 1 found, 0 missing, -1 error */
static int route_of(PyObject *routes, const struct sni_proxy_sockstate *s, PyObject **key_out,
		    unsigned *ifindex, int *neigh)
{
	PyObject *key = PyBytes_FromStringAndSize((const char *)s->peer_addr,
						  s->family == 4 ? 4 : 16);
	PyObject *hit;

	if (key == NULL)
		return -1;
	hit = PyDict_GetItemWithError(routes, key);
	if (hit == NULL) {
		if (PyErr_Occurred()) {
			Py_DECREF(key);
			return -1;
		}
		*key_out = key;
		return 0;
	}
	Py_DECREF(key);
	if (!PyTuple_Check(hit) || PyTuple_GET_SIZE(hit) != 2) {
		PyErr_SetString(PyExc_TypeError, "routes values are (ifindex, has_neighbours)");
		return -1;
	}
	*ifindex = (unsigned)PyLong_AsUnsignedLong(PyTuple_GET_ITEM(hit, 0));
	*neigh = PyObject_IsTrue(PyTuple_GET_ITEM(hit, 1));
	if (PyErr_Occurred() || *neigh < 0)
		return -1;
	return 1;
}

static PyObject *route_request(PyObject *key, const struct sni_proxy_sockstate *s)
{
	char text[INET6_ADDRSTRLEN];

	host_text(s, s->peer_addr, text, sizeof(text));
	return Py_BuildValue("(sNs)", "route", key, text);
}

static int is_attached(PyObject *attached, unsigned ifindex)
{
	PyObject *idx = PyLong_FromUnsignedLong(ifindex);
	int r;

	if (idx == NULL)
		return -1;
	r = PySet_Contains(attached, idx);
	Py_DECREF(idx);
	return r;
}

static PyObject *not_attached(const char *name, unsigned ifindex)
{
	char ifname[IF_NAMESIZE];

	if (if_indextoname(ifindex, ifname) == NULL)
		return fallback("interface_not_attached", PyUnicode_FromFormat(
			"the %s is reached through ifindex %u, where the tc programs are not attached "
			"(add it to ebpf.tcp_splice.interfaces)", name, ifindex));
	return fallback("interface_not_attached", PyUnicode_FromFormat(
		"the %s is reached through %s, where the tc programs are not attached "
		"(add it to ebpf.tcp_splice.interfaces)", name, ifname));
}

static void fill_dir(struct sni_proxy_ts_dir *d, const struct sni_proxy_sockstate *other,
		     __u32 seq_delta, __u32 ack_delta, __u32 handover_end, __u32 slot,
		     __u32 ifindex, __u32 ts_base, __u8 dir, __u8 flags, __u8 win_in,
		     __u8 win_out, __u32 gen)
{
	/* the rewritten tuple is the other connection's: src = its local, dst = its peer */
	memset(d, 0, sizeof(*d));
	memcpy(d->saddr, other->local_addr, 16);
	memcpy(d->daddr, other->peer_addr, 16);
	d->sport = htons(other->local_port);
	d->dport = htons(other->peer_port);
	d->seq_delta = seq_delta;
	d->ack_delta = ack_delta;
	d->handover_end = handover_end;
	d->flow = slot;
	d->ifindex = ifindex;
	d->ts_base = ts_base;
	d->dir = dir;
	d->flags = flags;
	d->win_shift_in = win_in;
	d->win_shift_out = win_out;
	d->gen = gen;
}

static int ioctl_int(int fd, unsigned long req, int *out)
{
	return ioctl(fd, req, out);
}

/* relay/tcpsplice.py _read_queued: recv until EAGAIN, EOF or an error. */
static char read_buf[READ_CHUNK];

static PyObject *read_queued(int fd)
{
	PyObject *data = NULL;

	for (;;) {
		ssize_t n = recv(fd, read_buf, sizeof(read_buf), MSG_DONTWAIT);

		if (n < 0 && errno == EINTR)
			continue;       /* as Python's recv (PEP 475) */
		if (n <= 0)
			break;
		if (data == NULL) {
			data = PyBytes_FromStringAndSize(read_buf, n);
			if (data == NULL)
				return NULL;
		} else {
			PyObject *chunk = PyBytes_FromStringAndSize(read_buf, n);

			if (chunk == NULL) {
				Py_DECREF(data);
				return NULL;
			}
			PyBytes_ConcatAndDel(&data, chunk);
			if (data == NULL)
				return NULL;
		}
	}
	return data != NULL ? data : PyBytes_FromStringAndSize("", 0);
}

/* ebpf/tcpsplice.py close_silently, on the fd the socket object handed over (detach). */
static void close_silently(int fd)
{
	int on = 1;

	if (setsockopt(fd, IPPROTO_TCP, TCP_REPAIR_OPT, &on, sizeof(on)) < 0) {
		struct linger lg = { .l_onoff = 1, .l_linger = 0 };

		setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
	}
	close(fd);
}

static PyObject *py_close_silently(PyObject *self, PyObject *arg)
{
	int fd = PyLong_AsLong(arg);

	if (fd == -1 && PyErr_Occurred())
		return NULL;
	close_silently(fd);
	Py_RETURN_NONE;
}

/* --------------------------------------------------------------------------- remove */
/* WorkerSplice.remove's map work (TcpSpliceDataPath.delete_keys, then release_slot) for the
 * flow in `slot` of generation `gen`: each key deleted only if its entry still points at
 * (slot, gen) (a new connection on the same tuple may own it now), then the slot's claim.
 * Returns None, or the first error's text (the caller logs it, as the Python path does). */
static PyObject *remove_flow(PyObject *self, PyObject *args)
{
	int flows_fd, claims_fd, err;
	PyObject *keys;
	unsigned slot, gen;
	Py_ssize_t i, n;
	PyObject *problem = NULL;

	if (!PyArg_ParseTuple(args, "iiO!II", &flows_fd, &claims_fd, &PyTuple_Type, &keys,
			      &slot, &gen))
		return NULL;
	n = PyTuple_GET_SIZE(keys);
	for (i = 0; i < n; i++) {
		PyObject *key = PyTuple_GET_ITEM(keys, i);
		struct sni_proxy_ts_dir entry;

		if (!PyBytes_Check(key) || PyBytes_GET_SIZE(key) != sizeof(struct sni_proxy_ts_key)) {
			PyErr_SetString(PyExc_ValueError, "remove: keys are 40-byte flow-map keys");
			Py_XDECREF(problem);
			return NULL;
		}
		err = map_lookup(flows_fd, PyBytes_AS_STRING(key), &entry);
		if (err == -ENOENT)
			continue;
		if (err == 0 && (entry.flow != slot || entry.gen != gen))
			continue;
		if (err == 0)
			err = map_delete(flows_fd, PyBytes_AS_STRING(key));
		if (err < 0 && err != -ENOENT && problem == NULL)
			problem = PyUnicode_FromFormat("flow-map key %zd of flow %u: %s", i, slot,
						       strerror(-err));
	}
	map_delete(claims_fd, &slot);      /* as release_slot's callers: a missing claim is fine */
	if (problem != NULL)
		return problem;
	Py_RETURN_NONE;
}

/* --------------------------------------------------------------------------- arm */
static PyObject *arm(PyObject *self, PyObject *args)
{
	PyObject *client_sock, *routes, *attached, *key, *data, *detached, *out;
	int backend_fd, fw_fd, fl_fd, cl_fd, client_fd, err, r;
	unsigned cursor, max_flows, ring_index, pid, gen, c_out = 0, b_out = 0, slot, i;
	int c_neigh = 0, b_neigh = 0;
	struct sni_proxy_sockstate cs, bs;
	struct sni_proxy_ts_key c2b_key, b2c_key;
	struct sni_proxy_ts_dir c2b, b2c;
	struct sni_proxy_ts_flow flow;
	struct timespec now;
	__u32 claim[2];
	__u8 ts;
	int late;
	Py_ssize_t len, sent;
	int send_errno;
	char ca[INET6_ADDRSTRLEN], ba[INET6_ADDRSTRLEN];

	(void)self;
	if (!PyArg_ParseTuple(args, "OiiiiO!OIIIII:arm", &client_sock, &backend_fd, &fw_fd,
			      &fl_fd, &cl_fd, &PyDict_Type, &routes, &attached, &cursor,
			      &max_flows, &ring_index, &pid, &gen))
		return NULL;
	if (!PyAnySet_Check(attached)) {
		PyErr_SetString(PyExc_TypeError, "attached must be a set of ifindexes");
		return NULL;
	}
	client_fd = PyObject_AsFileDescriptor(client_sock);
	if (client_fd < 0)
		return NULL;

	/* _read_sides: one getsockopt per socket */
	err = read_state(client_fd, &cs);
	if (err < 0)
		return fallback("socket_error", PyUnicode_FromFormat(
			"reading the socket state: [Errno %d] %s", -err, strerror(-err)));
	r = read_state(backend_fd, &bs);
	if (r < 0)
		return fallback("socket_error", PyUnicode_FromFormat(
			"reading the socket state: [Errno %d] %s", -r, strerror(-r)));
	if (err || r || ((cs.options | bs.options) & SNI_PROXY_SS_USEC_TS))
		return python_path();
	if (cs.state == TCP_CLOSE_STATE || bs.state == TCP_CLOSE_STATE)
		return fallback("socket_error", PyUnicode_FromFormat(
			"reading the socket state: the %s connection was reset",
			cs.state == TCP_CLOSE_STATE ? "client" : "backend"));

	/* _check_pair */
	if (cs.state != TCP_ESTABLISHED_STATE || bs.state != TCP_ESTABLISHED_STATE)
		return fallback("not_established", PyUnicode_FromString(
			"a socket is no longer ESTABLISHED (a FIN arrived before the hand-over)"));
	if (cs.family != bs.family) {
		host_text(&cs, cs.peer_addr, ca, sizeof(ca));
		host_text(&bs, bs.peer_addr, ba, sizeof(ba));
		return fallback("family_mismatch", PyUnicode_FromFormat(
			"client %s and backend %s use different IP versions", ca, ba));
	}
	{
		unsigned hdr = cs.family == 4 ? 40 : 60;

		if (cs.advmss + hdr > bs.pmtu || bs.advmss + hdr > cs.pmtu)
			return fallback("mss_mismatch", PyUnicode_FromFormat(
				"segment sizes differ: client side MSS %u/PMTU %u, backend side MSS "
				"%u/PMTU %u", cs.advmss, cs.pmtu, bs.advmss, bs.pmtu));
	}
	key = NULL;
	r = route_of(routes, &cs, &key, &c_out, &c_neigh);
	if (r < 0)
		return NULL;
	if (r == 0)
		return route_request(key, &cs);
	r = route_of(routes, &bs, &key, &b_out, &b_neigh);
	if (r < 0)
		return NULL;
	if (r == 0)
		return route_request(key, &bs);
	r = is_attached(attached, c_out);
	if (r < 0)
		return NULL;
	if (!r)
		return not_attached("client", c_out);
	r = is_attached(attached, b_out);
	if (r < 0)
		return NULL;
	if (!r)
		return not_attached("backend", b_out);
	if (cs.write_seq != cs.snd_una)
		return fallback("client_unacked_data", PyUnicode_FromString(UNACKED));

	/* try_relay */
	if (bs.rcv_nxt != bs.copied_seq)
		return fallback("backend_data_queued", PyUnicode_FromFormat(
			"the backend sent %u bytes before the hand-over",
			(unsigned)(bs.rcv_nxt - bs.copied_seq)));

	/* flow_entries (b2c on hold) */
	ts = ((cs.options & SNI_PROXY_SS_TIMESTAMPS) && (bs.options & SNI_PROXY_SS_TIMESTAMPS))
		? SNI_PROXY_TS_F_TSTAMP : 0;
	pack_key(&c2b_key, &cs);
	pack_key(&b2c_key, &bs);

	/* claim_slot */
	claim[0] = pid;
	claim[1] = ring_index;
	slot = 0;
	err = -E2BIG;           /* max_flows 0: no slot */
	for (i = 0; i < max_flows; i++) {
		__u32 k = (cursor + i) % max_flows;

		err = map_update(cl_fd, &k, claim, BPF_NOEXIST);
		if (err == 0) {
			slot = k;
			break;
		}
		if (err == -EEXIST)
			continue;
		if (err == -E2BIG)
			break;
		raise_update(cl_fd, err);
		return NULL;
	}
	if (err != 0)
		return fallback("map_full", PyUnicode_FromString(
			"no free flow slot (raise ebpf.tcp_splice.max_flows)"));

	fill_dir(&c2b, &bs, bs.write_seq - cs.copied_seq, bs.copied_seq - cs.write_seq, 0, slot,
		 b_out, bs.tsoffset, SNI_PROXY_TS_C2B, ts | (b_neigh ? SNI_PROXY_TS_F_NEIGH : 0),
		 snd_wscale(&cs), rcv_wscale(&bs), gen);
	fill_dir(&b2c, &cs, cs.write_seq - bs.copied_seq, cs.copied_seq - bs.write_seq,
		 bs.write_seq + (cs.rcv_nxt - cs.copied_seq), slot, c_out, cs.tsoffset,
		 SNI_PROXY_TS_B2C, ts | (c_neigh ? SNI_PROXY_TS_F_NEIGH : 0) | SNI_PROXY_TS_F_HOLD,
		 snd_wscale(&bs), rcv_wscale(&cs), gen);

	/* TcpSpliceDataPath.insert: flow state, then both directions with BPF_NOEXIST */
	memset(&flow, 0, sizeof(flow));
	clock_gettime(CLOCK_MONOTONIC, &now);
	flow.ctr[0].last_ns = flow.ctr[1].last_ns =
		(__u64)now.tv_sec * 1000000000ull + (__u64)now.tv_nsec;
	flow.ring = ring_index;
	flow.gen = gen;
	flow.ctr[0].nxt = bs.write_seq;
	flow.ctr[1].nxt = cs.write_seq;
	err = map_update(fl_fd, &slot, &flow, BPF_ANY);
	if (err == 0) {
		err = map_update(fw_fd, &c2b_key, &c2b, BPF_NOEXIST);
		if (err == 0) {
			err = map_update(fw_fd, &b2c_key, &b2c, BPF_NOEXIST);
			if (err != 0 && delete_or_raise(fw_fd, &c2b_key) < 0)
				return NULL;
		}
		if (err == -EEXIST || err == -E2BIG) {
			if (delete_or_raise(cl_fd, &slot) < 0)
				return NULL;
			if (err == -EEXIST)
				return fallback("tuple_busy", PyUnicode_FromString(
					"this 4-tuple is still spliced (lingering flow)"));
			return fallback("map_full", PyUnicode_FromString(
				"the tcp_splice flow map is full (raise ebpf.tcp_splice.max_flows)"));
		}
		if (err != 0) {
			if (delete_or_raise(cl_fd, &slot) < 0)
				return NULL;
			return fallback("map_full", PyUnicode_FromFormat(
				"inserting the flow: updating map fd %d: %s", fw_fd, strerror(-err)));
		}
	} else {
		if (delete_or_raise(cl_fd, &slot) < 0)
			return NULL;
		return fallback("map_full", PyUnicode_FromFormat(
			"inserting the flow: updating map fd %d: %s", fl_fd, strerror(-err)));
	}

	/* Backend bytes that arrived between the read and the insertion (the Python path's
	 * comment says why the queue is final now that b2c is on hold). */
	late = 0;
	if (ioctl_int(backend_fd, FIONREAD, &late) < 0)
		late = 0;
	if (late) {
		if (delete_or_raise(fw_fd, &c2b_key) < 0 || delete_or_raise(fw_fd, &b2c_key) < 0 ||
		    delete_or_raise(cl_fd, &slot) < 0)
			return NULL;
		return fallback("backend_data_queued", PyUnicode_FromFormat(
			"the backend sent %d bytes during the hand-over", late));
	}
	b2c.flags &= ~SNI_PROXY_TS_F_HOLD;
	err = map_update(fw_fd, &b2c_key, &b2c, BPF_ANY);
	if (err) {
		/* still the late check's state: undone losslessly the same way */
		if (delete_or_raise(fw_fd, &c2b_key) < 0 || delete_or_raise(fw_fd, &b2c_key) < 0 ||
		    delete_or_raise(cl_fd, &slot) < 0)
			return NULL;
		return fallback("map_full", PyUnicode_FromFormat(
			"lifting the hold on the flow: updating map fd %d: %s", fw_fd,
			strerror(-err)));
	}
	/* --- the kernel splices from here on: no way back to another relay kind --- */
	data = read_queued(client_fd);
	if (data == NULL)
		return NULL;
	len = PyBytes_GET_SIZE(data);
	if ((__u32)(bs.write_seq + (__u32)len) != b2c.handover_end) {
		b2c.handover_end = bs.write_seq + (__u32)len;
		err = map_update(fw_fd, &b2c_key, &b2c, BPF_ANY);
		if (err) {
			/* the queued bytes are read: the connection ends as an error, and
			 * nothing of it stays in the maps */
			Py_DECREF(data);
			delete_or_raise(fw_fd, &c2b_key);
			delete_or_raise(fw_fd, &b2c_key);
			delete_or_raise(cl_fd, &slot);
			PyErr_Clear();
			raise_update(fw_fd, err);
			return NULL;
		}
	}
	/* The socket object gives its fd up (else it would close it again later). */
	detached = PyObject_CallMethod(client_sock, "detach", NULL);
	if (detached == NULL) {
		Py_DECREF(data);
		return NULL;
	}
	Py_DECREF(detached);
	close_silently(client_fd);
	sent = 0;
	send_errno = 0;
	while (sent < len) {
		ssize_t n = send(backend_fd, PyBytes_AS_STRING(data) + sent, (size_t)(len - sent),
				 MSG_DONTWAIT | MSG_NOSIGNAL);

		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK)
			send_errno = errno;    /* Python logs it (debug), run() meets it too */
		if (n <= 0)
			break;   /* EAGAIN: the rest goes in run() */
		sent += n;
	}
	out = Py_BuildValue("(sIy#y#IINni)", "ok", slot, (const char *)&c2b_key,
			    (Py_ssize_t)sizeof(c2b_key), (const char *)&b2c_key,
			    (Py_ssize_t)sizeof(b2c_key), bs.write_seq, cs.write_seq, data, sent,
			    send_errno);
	return out;
}

static PyMethodDef methods[] = {
	{"arm", arm, METH_VARARGS,
	 "The tcp_splice hand-over of one connection (see the module's C header comment)."},
	{"close_silently", py_close_silently, METH_O,
	 "close_silently(fd): close a TCP socket fd without FIN or RST (ebpf/tcpsplice.py's)."},
	{"remove", remove_flow, METH_VARARGS,
	 "remove(flows_fd, claims_fd, keys, slot, gen) -> None | error text: a flow out of the "
	 "maps (WorkerSplice.remove's delete_keys and release_slot)."},
	{NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
	PyModuleDef_HEAD_INIT, "sniproxy.ebpf._handover",
	"tcp_splice hand-over in one call (issue 14); relay/tcpsplice.py is the reference.", -1,
	methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__handover(void)
{
	PyObject *m = PyModule_Create(&module);

	if (m == NULL)
		return NULL;
	if (PyModule_AddIntConstant(m, "KEY_SIZE", sizeof(struct sni_proxy_ts_key)) < 0 ||
	    PyModule_AddIntConstant(m, "DIR_SIZE", sizeof(struct sni_proxy_ts_dir)) < 0 ||
	    PyModule_AddIntConstant(m, "FLOW_SIZE", sizeof(struct sni_proxy_ts_flow)) < 0 ||
	    PyModule_AddIntConstant(m, "SOCKSTATE_SIZE", sizeof(struct sni_proxy_sockstate)) < 0) {
		Py_DECREF(m);
		return NULL;
	}
	return m;
}
