"""The `python3` of kfp.local's tasks during a local run: hands the task to the warm task server (warm_tasks.py).

    python -S -E warm_task_client.py SOCKET -m kfp.dsl.executor_main ARGS...

Started without site-packages or PYTHON* variables (-S -E) so it costs ~20 ms; standard library only. It sends
the server its arguments, working directory and environment with its stdin, stdout and stderr, forwards SIGTERM
and SIGINT to the forked task, and exits with the task's exit status. When the server cannot be reached, or
declines (its reason goes to stderr), it becomes the interpreter it stands in for: `python ARGS...`.
"""

import json
import os
import signal
import socket
import struct
import sys

# the protocol, shared with the server (warm_tasks.py imports it from here, since this file may import nothing
# but the standard library): the client sends SIZE (+ its three fds), then SIZE bytes of JSON {argv, cwd, env};
# the server answers STATUS = the task's pid and later its exit status, or -1, SIZE and a reason to start cold
SIZE = struct.Struct("!I")
STATUS = struct.Struct("!i")


def _cold(argv, why):
    """Start the task the ordinary way, in this process."""
    if why:
        print(f"[tuneloop] this task starts in a fresh interpreter: {why}", file=sys.stderr, flush=True)
    os.execv(sys.executable, [sys.executable, *argv])


def read_exactly(conn, size):
    """SIZE bytes from the socket, or None when it closes first."""
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def main():
    path, argv = sys.argv[1], sys.argv[2:]
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(path)
        body = json.dumps({"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ)}).encode()
        socket.send_fds(conn, [SIZE.pack(len(body))], [0, 1, 2])
        conn.sendall(body)
        head = read_exactly(conn, STATUS.size)  # blocks while the server still imports
    except OSError as e:
        conn.close()
        _cold(argv, f"the warm task server is not reachable ({e})")
        return
    if head is None:
        _cold(argv, "the warm task server closed the connection")
        return
    (pid,) = STATUS.unpack(head)
    if pid == -1:
        size = read_exactly(conn, SIZE.size)
        why = read_exactly(conn, SIZE.unpack(size)[0]).decode() if size else "no reason given"
        conn.close()
        _cold(argv, why)
        return

    def forward(signum, frame):
        try:
            os.kill(pid, signum)
        except OSError:
            pass

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    head = read_exactly(conn, STATUS.size)
    if head is None:
        print(f"[tuneloop] the warm task server went away while task process {pid} ran; its exit status is "
              "unknown", file=sys.stderr, flush=True)
        sys.exit(1)
    sys.exit(STATUS.unpack(head)[0])


if __name__ == "__main__":
    main()
