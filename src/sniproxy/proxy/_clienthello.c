/* sniproxy.proxy._clienthello: the common case of the ClientHello parse, compiled.
 *
 * Why this exists (issue 14, new-connection CPU): the worker parses every new connection's
 * hello, and the Python parser (src/sniproxy/proxy/clienthello.py) cost ~17 us hot and 30-50 us
 * in situ on a real 517-byte hello, 10-15 % of the worker's CPU per connection; nginx's
 * ssl_preread spends about 1 us. This file does the same work for the one shape nearly every
 * client sends.
 *
 * The Python parser is the reference and the documentation of the format. This file answers
 * ONLY when the whole hello is in ONE complete handshake record at the start of the buffer
 * (the conditions of `_parse`'s "Fast path" block) and `_parse_body` would accept it; then it
 * returns exactly the ClientHello Python would. For every other input (shorter, split over
 * records, not a handshake, anything Python rejects, whatever the reason) it returns None and
 * the Python parser decides, so every rejection keeps Python's reason and message, and nothing
 * here needs to know the order in which Python checks things. It never raises for bytes-like
 * input. tests/unit/test_clienthello_compiled.py checks it against the Python parser
 * (differential, hypothesis) and that it really answers for well-formed hellos.
 *
 * The input is hostile: every read is checked against the length of what contains it. The
 * only allocations are the result objects.
 *
 *   configure(result_type, field_names)  the ClientHello class and its 7 field names, in the
 *       order (sni, alpn, versions, legacy_version, consumed, records, extension_types);
 *       parse() builds instances with object.__new__ and object.__setattr__, which is what the
 *       frozen dataclass's __init__ does (it has no __post_init__).
 *   parse(buf, limit) -> ClientHello | None
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <string.h>

/* As in clienthello.py (the reference): */
#define HANDSHAKE 22
#define CLIENT_HELLO 1
#define MAX_RECORD_PAYLOAD 16384
#define MIN_BODY (2 + 32 + 1 + 4 + 2)
#define MAX_HOST_NAME 253
#define MAX_LABEL 63
#define EXT_SERVER_NAME 0
#define EXT_ALPN 16
#define EXT_SUPPORTED_VERSIONS 43
#define HOST_NAME 0
/* An extension takes at least its 4-byte header, so one record holds fewer than this many. */
#define MAX_EXTENSIONS (MAX_RECORD_PAYLOAD / 4)
#define N_FIELDS 7

static PyObject *result_type;                 /* the ClientHello class, once configured */
static PyObject *field_names[N_FIELDS];
static PyObject *empty_tuple;
static PyObject *one;                          /* records: always 1 here */

/* Extension types seen in the hello being parsed: one bit per type. walk_extensions clears
 * the bits it set before it returns, so no parse pays for clearing 8 KiB, and it makes no
 * Python call in between (the GIL is held), so no other parse can run while they are set. */
static uint8_t seen[65536 / 8];

static inline unsigned u16_at(const uint8_t *p)
{
	return ((unsigned)p[0] << 8) | p[1];
}

static inline int version_ok(unsigned v)
{
	return v >= 0x0300 && v <= 0x0304;
}

static inline int is_grease(unsigned v)
{
	return (v & 0x0F0F) == 0x0A0A && (v >> 8) == (v & 0xFF);
}

static inline int host_char(uint8_t c)
{
	return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
	       c == '-' || c == '_';
}

/* _validate_host_name's acceptance: ASCII, at most MAX_HOST_NAME without the trailing dots,
 * and _HOST_NAME_RE = (?:[A-Za-z0-9_-]{1,63}\.)*[A-Za-z0-9_-]{1,63}\.? in full. Returns the
 * length without the (single, optional) trailing dot, or -1 where Python rejects. */
static Py_ssize_t host_name_length(const uint8_t *p, Py_ssize_t n)
{
	Py_ssize_t label = 0, i;

	if (n == 0)
		return -1;
	if (p[n - 1] == '.')
		n--;                    /* one trailing dot; a second one is an empty label */
	if (n == 0 || n > MAX_HOST_NAME)
		return -1;
	for (i = 0; i < n; i++) {
		if (p[i] == '.') {
			if (label == 0)
				return -1;
			label = 0;
		} else if (host_char(p[i])) {
			if (++label > MAX_LABEL)
				return -1;
		} else {
			return -1;      /* not a host character, non-ASCII included */
		}
	}
	return label == 0 ? -1 : n;
}

/* _parse_server_name's acceptance, _validate_host_name's included: 0 with *host / *host_len
 * the name to return (without its trailing dot; *host NULL when no host_name entry), or -1
 * where Python rejects. */
static int check_server_name(const uint8_t *d, Py_ssize_t n, const uint8_t **host,
			     Py_ssize_t *host_len)
{
	Py_ssize_t pos = 2;
	const uint8_t *found = NULL;
	Py_ssize_t found_len = 0;

	if (n < 2 || (Py_ssize_t)u16_at(d) + 2 != n || u16_at(d) == 0)
		return -1;
	while (pos < n) {
		unsigned name_type, name_len;

		if (pos + 3 > n)
			return -1;
		name_type = d[pos];
		name_len = u16_at(d + pos + 1);
		pos += 3;
		if (pos + (Py_ssize_t)name_len > n)
			return -1;
		if (name_type == HOST_NAME) {
			if (found != NULL)
				return -1;      /* two host_name entries */
			found = d + pos;
			found_len = name_len;
		}
		pos += name_len;        /* other name types are skippable */
	}
	if (found == NULL)
		return 0;
	found_len = host_name_length(found, found_len);
	if (found_len < 0)
		return -1;
	*host = found;
	*host_len = found_len;
	return 0;
}

/* The SNI as Python returns it: lower-cased ASCII (validated by check_server_name). */
static PyObject *host_name_str(const uint8_t *host, Py_ssize_t n)
{
	PyObject *s = PyUnicode_New(n, 127);
	Py_UCS1 *out;
	Py_ssize_t i;

	if (s == NULL)
		return NULL;
	out = PyUnicode_1BYTE_DATA(s);
	for (i = 0; i < n; i++) {
		uint8_t c = host[i];

		out[i] = (c >= 'A' && c <= 'Z') ? (Py_UCS1)(c + ('a' - 'A')) : c;
	}
	return s;
}

/* _parse_alpn's acceptance: 0, or -1 where Python rejects. */
static int check_alpn(const uint8_t *d, Py_ssize_t n)
{
	Py_ssize_t pos = 2;

	if (n < 2 || (Py_ssize_t)u16_at(d) + 2 != n || u16_at(d) < 2)
		return -1;
	while (pos < n) {
		unsigned name_len = d[pos++];

		if (name_len == 0 || pos + (Py_ssize_t)name_len > n)
			return -1;
		pos += name_len;
	}
	return 0;
}

/* The protocol names (a list check_alpn accepted), a new tuple of str. */
static PyObject *alpn_tuple(const uint8_t *d, Py_ssize_t n)
{
	Py_ssize_t pos, count = 0, i;
	PyObject *t;

	for (pos = 2; pos < n; pos += 1 + d[pos])
		count++;
	t = PyTuple_New(count);
	if (t == NULL)
		return NULL;
	for (pos = 2, i = 0; i < count; i++) {
		unsigned name_len = d[pos++];
		/* Python: .decode("ascii", "backslashreplace"); the same codec here. */
		PyObject *s = PyUnicode_DecodeASCII((const char *)d + pos, name_len,
						    "backslashreplace");

		if (s == NULL) {
			Py_DECREF(t);
			return NULL;
		}
		PyTuple_SET_ITEM(t, i, s);
		pos += name_len;
	}
	return t;
}

/* _parse_supported_versions' acceptance: 0, or -1 where Python rejects. */
static int check_supported_versions(const uint8_t *d, Py_ssize_t n)
{
	return (n < 1 || d[0] + 1 != n || d[0] < 2 || d[0] % 2) ? -1 : 0;
}

/* The versions minus GREASE (a list check_supported_versions accepted), a new tuple. */
static PyObject *versions_tuple(const uint8_t *d, Py_ssize_t n)
{
	Py_ssize_t count = 0, i, j;
	PyObject *t;

	for (i = 1; i + 1 < n; i += 2)
		count += !is_grease(u16_at(d + i));
	t = PyTuple_New(count);
	if (t == NULL)
		return NULL;
	for (i = 1, j = 0; i + 1 < n; i += 2) {
		unsigned v = u16_at(d + i);
		PyObject *o;

		if (is_grease(v))
			continue;
		o = PyLong_FromLong(v);
		if (o == NULL) {
			Py_DECREF(t);
			return NULL;
		}
		PyTuple_SET_ITEM(t, j++, o);
	}
	return t;
}

/* The fixed part of the body up to the extensions: the offset of the extensions length, or
 * -1 where _parse_body / _skip_vector reject. `b` has `n` >= MIN_BODY bytes. */
static Py_ssize_t skip_fixed_part(const uint8_t *b, Py_ssize_t n)
{
	Py_ssize_t pos = 34, len;

	if (!version_ok(u16_at(b)))
		return -1;
	if (b[pos] > 32)                /* session_id */
		return -1;
	pos += 1 + b[pos];
	if (pos + 2 > n)                /* cipher_suites<2..2^16-2>, even */
		return -1;
	len = u16_at(b + pos);
	pos += 2;
	if (pos + len > n || len < 2 || len % 2)
		return -1;
	pos += len;
	if (pos + 1 > n)                /* compression_methods<1..2^8-1> */
		return -1;
	len = b[pos];
	pos += 1;
	if (pos + len > n || len < 1)
		return -1;
	return pos + len;
}

static PyObject *build(PyObject *values[N_FIELDS])
{
	PyObject *obj = PyBaseObject_Type.tp_new((PyTypeObject *)result_type, empty_tuple, NULL);
	int i;

	if (obj == NULL)
		return NULL;
	for (i = 0; i < N_FIELDS; i++) {
		/* object.__setattr__, as the frozen dataclass's own __init__ */
		if (PyObject_GenericSetAttr(obj, field_names[i], values[i]) < 0) {
			Py_DECREF(obj);
			return NULL;
		}
	}
	return obj;
}

/* A span of the body: an extension's data. */
struct span {
	const uint8_t *p;
	Py_ssize_t n;
};

/* The extensions block of a body of `n` bytes starting at `pos` (its 2-byte length): 0 with
 * the types in wire order in types[] / *ntypes and the three extensions read, or -1 where
 * _parse_body rejects (a length that does not add up, an overrun, a duplicate). Makes no
 * Python call, so no other parse can run while `seen` holds this one's bits. */
static int walk_extensions(const uint8_t *b, Py_ssize_t n, Py_ssize_t pos, uint16_t *types,
			   Py_ssize_t *ntypes, struct span *sni, struct span *alpn,
			   struct span *versions)
{
	Py_ssize_t count = 0, i;
	int ok = 1;

	if (pos + 2 > n || pos + 2 + (Py_ssize_t)u16_at(b + pos) != n)
		return -1;
	pos += 2;
	while (pos < n) {
		unsigned etype, elen;

		if (pos + 4 > n || count >= MAX_EXTENSIONS) {
			ok = 0;
			break;
		}
		etype = u16_at(b + pos);
		elen = u16_at(b + pos + 2);
		pos += 4;
		if (pos + (Py_ssize_t)elen > n || (seen[etype >> 3] & (1u << (etype & 7)))) {
			ok = 0;         /* an overrun, or a duplicate (RFC 8446 section 4.2) */
			break;
		}
		seen[etype >> 3] |= (uint8_t)(1u << (etype & 7));
		types[count++] = (uint16_t)etype;
		if (etype == EXT_SERVER_NAME)
			*sni = (struct span){b + pos, elen};
		else if (etype == EXT_ALPN)
			*alpn = (struct span){b + pos, elen};
		else if (etype == EXT_SUPPORTED_VERSIONS)
			*versions = (struct span){b + pos, elen};
		pos += elen;
	}
	for (i = 0; i < count; i++)     /* only the bytes this parse set bits in */
		seen[types[i] >> 3] = 0;
	*ntypes = count;
	return ok ? 0 : -1;
}

/* _parse_body for a body of `n` bytes inside one record: the ClientHello, Py_None (new
 * reference) where Python rejects, NULL on a Python error. Everything that can reject is
 * checked before the first object is made. */
static PyObject *parse_body(const uint8_t *b, Py_ssize_t n, Py_ssize_t consumed)
{
	uint16_t types[MAX_EXTENSIONS];
	struct span sni_ext = {NULL, 0}, alpn_ext = {NULL, 0}, versions_ext = {NULL, 0};
	Py_ssize_t ntypes = 0, pos, i, host_len = -1;
	const uint8_t *host = NULL;
	PyObject *sni = NULL, *alpn = NULL, *versions = NULL, *ext_types = NULL;
	PyObject *legacy = NULL, *cons = NULL, *result = NULL;

	pos = skip_fixed_part(b, n);
	if (pos < 0)
		Py_RETURN_NONE;
	if (pos < n &&                  /* extensions are optional before TLS 1.3 */
	    walk_extensions(b, n, pos, types, &ntypes, &sni_ext, &alpn_ext, &versions_ext) < 0)
		Py_RETURN_NONE;
	if ((sni_ext.p != NULL && check_server_name(sni_ext.p, sni_ext.n, &host, &host_len) < 0) ||
	    (alpn_ext.p != NULL && check_alpn(alpn_ext.p, alpn_ext.n) < 0) ||
	    (versions_ext.p != NULL && check_supported_versions(versions_ext.p, versions_ext.n) < 0))
		Py_RETURN_NONE;

	if (host != NULL && (sni = host_name_str(host, host_len)) == NULL)
		goto out;
	if (alpn_ext.p != NULL && (alpn = alpn_tuple(alpn_ext.p, alpn_ext.n)) == NULL)
		goto out;
	if (versions_ext.p != NULL)
		versions = versions_tuple(versions_ext.p, versions_ext.n);
	else                            /* supported_versions absent: (legacy_version,) */
		versions = Py_BuildValue("(I)", u16_at(b));
	if (versions == NULL)
		goto out;
	ext_types = PyTuple_New(ntypes);
	if (ext_types == NULL)
		goto out;
	for (i = 0; i < ntypes; i++) {
		PyObject *o = PyLong_FromLong(types[i]);

		if (o == NULL)
			goto out;
		PyTuple_SET_ITEM(ext_types, i, o);
	}
	legacy = PyLong_FromLong(u16_at(b));
	cons = PyLong_FromSsize_t(consumed);
	if (legacy != NULL && cons != NULL) {
		PyObject *values[N_FIELDS] = {
			sni != NULL ? sni : Py_None, alpn != NULL ? alpn : empty_tuple, versions,
			legacy, cons, one, ext_types,
		};
		result = build(values);
	}
out:
	Py_XDECREF(sni);
	Py_XDECREF(alpn);
	Py_XDECREF(versions);
	Py_XDECREF(ext_types);
	Py_XDECREF(legacy);
	Py_XDECREF(cons);
	return result;
}

/* _parse's fast-path conditions, then the body. */
static PyObject *parse_buffer(const uint8_t *buf, Py_ssize_t n, Py_ssize_t limit)
{
	unsigned rlength;
	Py_ssize_t body_len;

	if (n < 9 || buf[0] != HANDSHAKE || !version_ok(u16_at(buf + 1)))
		Py_RETURN_NONE;
	rlength = u16_at(buf + 3);
	if (rlength < 4 || rlength > MAX_RECORD_PAYLOAD || n < 5 + (Py_ssize_t)rlength ||
	    buf[5] != CLIENT_HELLO)
		Py_RETURN_NONE;
	body_len = ((Py_ssize_t)buf[6] << 16) | ((Py_ssize_t)buf[7] << 8) | buf[8];
	if (body_len < MIN_BODY || body_len > limit || 4 + body_len > (Py_ssize_t)rlength)
		Py_RETURN_NONE;
	return parse_body(buf + 9, body_len, 5 + (Py_ssize_t)rlength);
}

static PyObject *py_parse(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
	Py_ssize_t limit;
	Py_buffer view;
	PyObject *result;

	if (nargs != 2) {
		PyErr_SetString(PyExc_TypeError, "parse(buf, limit) takes 2 arguments");
		return NULL;
	}
	if (result_type == NULL) {
		PyErr_SetString(PyExc_RuntimeError,
				"_clienthello.configure(ClientHello, field_names) was not called");
		return NULL;
	}
	limit = PyLong_AsSsize_t(args[1]);
	if (limit == -1 && PyErr_Occurred()) {
		PyErr_Clear();          /* Python decides what such a limit means */
		Py_RETURN_NONE;
	}
	if (PyBytes_CheckExact(args[0]))
		return parse_buffer((const uint8_t *)PyBytes_AS_STRING(args[0]),
				    PyBytes_GET_SIZE(args[0]), limit);
	/* Any other exporter: only a flat buffer of bytes, which len() and [i] see as bytes. */
	if (PyObject_GetBuffer(args[0], &view, PyBUF_ND | PyBUF_FORMAT) < 0) {
		PyErr_Clear();
		Py_RETURN_NONE;
	}
	if (view.ndim > 1 || view.itemsize != 1 ||
	    (view.format != NULL && strcmp(view.format, "B") != 0 && strcmp(view.format, "b") != 0 &&
	     strcmp(view.format, "c") != 0))
		result = Py_NewRef(Py_None);
	else
		result = parse_buffer((const uint8_t *)view.buf, view.len, limit);
	PyBuffer_Release(&view);
	return result;
}

static PyObject *py_configure(PyObject *self, PyObject *args)
{
	PyObject *type, *names;
	Py_ssize_t i;

	if (!PyArg_ParseTuple(args, "O!O!", &PyType_Type, &type, &PyTuple_Type, &names))
		return NULL;
	if (PyTuple_GET_SIZE(names) != N_FIELDS) {
		PyErr_Format(PyExc_ValueError, "configure: %d field names expected, got %zd",
			     N_FIELDS, PyTuple_GET_SIZE(names));
		return NULL;
	}
	for (i = 0; i < N_FIELDS; i++) {
		if (!PyUnicode_Check(PyTuple_GET_ITEM(names, i))) {
			PyErr_SetString(PyExc_TypeError, "configure: field names must be str");
			return NULL;
		}
	}
	for (i = 0; i < N_FIELDS; i++) {
		PyObject *name = Py_NewRef(PyTuple_GET_ITEM(names, i));

		PyUnicode_InternInPlace(&name);
		Py_XSETREF(field_names[i], name);
	}
	Py_XSETREF(result_type, Py_NewRef(type));
	Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
	{"parse", (PyCFunction)(void (*)(void))py_parse, METH_FASTCALL,
	 "parse(buf, limit) -> ClientHello | None: the whole hello in one complete record, as "
	 "clienthello._parse would return it; None for anything else (the Python parser decides)."},
	{"configure", py_configure, METH_VARARGS,
	 "configure(result_type, field_names): the class parse() returns and its 7 field names."},
	{NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
	PyModuleDef_HEAD_INIT, "_clienthello",
	"The compiled common case of sniproxy.proxy.clienthello (issue 14).", -1, methods,
	NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__clienthello(void)
{
	PyObject *m;

	empty_tuple = PyTuple_New(0);
	one = PyLong_FromLong(1);
	if (empty_tuple == NULL || one == NULL)
		return NULL;
	m = PyModule_Create(&module);
	if (m == NULL)
		return NULL;
	if (PyModule_AddIntConstant(m, "MAX_RECORD_PAYLOAD", MAX_RECORD_PAYLOAD) < 0 ||
	    PyModule_AddIntConstant(m, "MIN_BODY", MIN_BODY) < 0 ||
	    PyModule_AddIntConstant(m, "MAX_HOST_NAME", MAX_HOST_NAME) < 0) {
		Py_DECREF(m);
		return NULL;
	}
	return m;
}
