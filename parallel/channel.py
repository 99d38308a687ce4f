"""The host <-> rank 0 control channel, which nobody else can use: a Unix socket in a fresh 0700 directory, and a
random key that only rank 0 is given (through its environment). Both ends prove they hold the key before
anything received is unpickled, exactly as multiprocessing.connection.Listener/Client do.

A message is wire.pack()ed, not sent with Connection.send(): its structure goes as one frame, which says how many bytes
of tensors follow, and the tensors' bytes go through the socket as they are, read straight into the received tensors'
memory (Connection's own frames copy what they receive twice more; a decoded 1024x1024 image is 12.6 MB).
Connection.send() would also pickle with multiprocessing's pickler, where torch's reductions pass tensors as file
descriptors through multiprocessing's own side channel, which processes that multiprocessing did not start cannot use.

The host side is Listener.accept() taken apart so that accepting can time out: while it waits for rank 0 the host
must keep checking whether a worker died during start-up, and Listener.accept() blocks with no way out."""
from __future__ import annotations

import os
import pickle
import select
import shutil
import socket
import tempfile
from multiprocessing.connection import Client, Connection, answer_challenge, deliver_challenge

import torch

from . import wire

ADDRESS_ENV = "PARALLEL_DIFFUSION_CHANNEL"
KEY_ENV = "PARALLEL_DIFFUSION_CHANNEL_KEY"


class Channel:
    """One authenticated connection carrying pickled messages."""

    def __init__(self, conn: Connection):
        self._conn = conn

    def send(self, message: object) -> None:
        header, tensors = wire.pack(message)
        self._conn.send_bytes(pickle.dumps((header, [t.numel() for t in tensors])))
        for tensor in tensors:
            view = memoryview(tensor.numpy())
            while view:
                view = view[os.write(self._conn.fileno(), view):]

    def recv(self) -> object:
        """EOFError or OSError when the other end is gone; anything else: the message could not be unpickled."""
        header, sizes = pickle.loads(self._conn.recv_bytes())
        tensors = [torch.empty(size, dtype=torch.uint8) for size in sizes]
        for tensor in tensors:
            view = memoryview(tensor.numpy())
            while view:
                got = os.readv(self._conn.fileno(), [view])
                if not got:
                    raise EOFError("the other end closed the channel inside a message")
                view = view[got:]
        return wire.unpack(header, tensors)

    def poll(self, timeout: float) -> bool:
        return self._conn.poll(timeout)

    def close(self) -> None:
        self._conn.close()


class HostChannel:
    """The listening end. `directory` is private to this user (mkdtemp makes it 0700), so the group keeps its
    worker logs there too; close() removes it."""

    def __init__(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="parallel-diffusion-")
        self.address = os.path.join(self.directory, "control.sock")
        self._key = os.urandom(32)
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._socket.bind(self.address)
        self._socket.listen(1)

    def env(self) -> dict[str, str]:
        """What rank 0's environment needs to connect."""
        return {ADDRESS_ENV: self.address, KEY_ENV: self._key.hex()}

    def accept(self, timeout: float) -> Channel | None:
        """The authenticated connection of rank 0, or None when nobody connected within `timeout` seconds."""
        if not select.select([self._socket], [], [], timeout)[0]:
            return None
        sock, _ = self._socket.accept()
        conn = Connection(sock.detach())
        deliver_challenge(conn, self._key)  # the order of Listener.accept(), which Client() expects
        answer_challenge(conn, self._key)
        return Channel(conn)

    def close(self) -> None:
        self._socket.close()
        shutil.rmtree(self.directory, ignore_errors=True)


def connect_to_host() -> Channel:
    """Rank 0's end. The key leaves the environment at once, so nothing a stage starts can inherit it."""
    address = os.environ.pop(ADDRESS_ENV)
    key = bytes.fromhex(os.environ.pop(KEY_ENV))
    return Channel(Client(address, family="AF_UNIX", authkey=key))
