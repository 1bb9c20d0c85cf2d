"""The backend of the one-off tc splice bench scripts (tcp_splice_veth_sanity.py,
tcp_splice_prog_cost.py): it reads the ClientHello, answers b"k", then by the client's next
byte either swallows a bulk upload to EOF and answers b"done" (b"B") or echoes byte by byte
(anything else: a ping-pong)."""
import socket
import threading


def start_hello_backend(host: str, port: int, hello: bytes) -> None:
    """Listen on (host, port) in the calling thread's network namespace; serve in threads."""
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind((host, port))
    ls.listen(16)

    def serve(c: socket.socket) -> None:
        n = 0
        while n < len(hello):
            n += len(c.recv(65536))
        c.sendall(b"k")
        if c.recv(1) == b"B":
            buf = bytearray(1 << 20)
            while c.recv_into(buf):
                pass
            c.sendall(b"done")
        else:
            while True:
                d = c.recv(1)
                if not d:
                    break
                c.sendall(d)
        c.close()

    def loop() -> None:
        while True:
            c, _ = ls.accept()
            threading.Thread(target=serve, args=(c,), daemon=True).start()

    threading.Thread(target=loop, daemon=True).start()
