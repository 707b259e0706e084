"""Network failures for the tests (issue 11 item 13): a TCP proxy in pure Python, and a private network
namespace in which the daemon runs so that a partition really loses packets.

A proxy in user space cannot lose packets by itself: its kernel ACKs everything the daemon sends, so
the daemon's keepalives and tcp_user_timeout would never fire. The daemon therefore runs in its own
network namespace, reaching each proxy over its own veth pair; `blackhole` takes our end of that pair down
(the packets vanish, nothing is refused or reset) and the test stops the proxy forwarding; `heal`
undoes both. Everything stays inside the namespace and its veth pairs, which `ip netns del`
removes: nothing else on the machine changes.

When the daemon's side of a connection ends (or the proxy's keepalives find it vanished), the proxy
abandons the server's side silently (closed in TCP repair mode: no FIN, no RST), as a host that
crashed or left the network would: only the server's own keepalives can find out.
"""
import contextlib
import itertools
import os
import select
import socket
import subprocess
import threading
import time

TCP_REPAIR = 19
_sequence = itertools.count()
LIFETIME = 300.0        # a proxy stops by itself after this many seconds


def vanish(sock):
    """Close without telling the peer (no FIN, no RST): needs CAP_NET_ADMIN."""
    time.sleep(1.0)     # let the server's delayed ACKs arrive first: any segment after the close gets a RST
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, 1)
    sock.close()


def can_vanish():
    server = socket.create_server(("127.0.0.1", 0))
    try:
        with socket.create_connection(server.getsockname()) as client:
            client.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, 1)
            client.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, 0)
        return True
    except OSError:
        return False
    finally:
        server.close()


class Proxy:
    """Forwards listen_host:port to 127.0.0.1:target_port, one thread per connection."""

    def __init__(self, listen_host, target_port, lifetime=LIFETIME):
        self.target = ("127.0.0.1", target_port)
        self.server = socket.create_server((listen_host, 0))
        self.server.settimeout(0.2)
        self.host, self.port = listen_host, self.server.getsockname()[1]
        self.deadline = time.monotonic() + lifetime
        self.blackholed = False
        self.pairs = []         # [client, upstream] of the live connections
        self.lock = threading.Lock()
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def dsn(self, dbname, user="postgres"):
        return f"host={self.host} port={self.port} dbname={dbname} user={user}"

    def _running(self):
        return not self.closed and time.monotonic() < self.deadline

    def _accept(self):
        while self._running():
            try:
                client, _ = self.server.accept()
            except socket.timeout:
                continue
            except OSError:
                break
            # our own keepalives find a daemon that vanished (its host gone, or a partition)
            client.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            for option, value in ((socket.TCP_KEEPIDLE, 1), (socket.TCP_KEEPINTVL, 1), (socket.TCP_KEEPCNT, 2)):
                client.setsockopt(socket.IPPROTO_TCP, option, value)
            upstream = socket.create_connection(self.target)
            pair = [client, upstream]
            with self.lock:
                self.pairs.append(pair)
            threading.Thread(target=self._pump, args=(pair,), daemon=True).start()
        self.server.close()

    def _pump(self, pair):
        client, upstream = pair
        try:
            while self._running() and pair[0] is not None:
                readable, _, _ = select.select([client, upstream], [], [], 0.2)
                if self.blackholed:
                    # nothing forwarded, nothing closed; our keepalives may still find the client gone
                    if client.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                        break
                    time.sleep(0.2)
                    continue
                for sock in readable:
                    data = sock.recv(65536)
                    if not data:
                        raise ConnectionResetError
                    (upstream if sock is client else client).sendall(data)
        except OSError:
            pass
        finally:
            self._forget(pair)

    def _forget(self, pair):
        with self.lock:
            if pair in self.pairs:
                self.pairs.remove(pair)
        client, upstream = pair
        if client is not None:
            client.close()
        vanish(upstream)        # the server is never told: the daemon's side just went away

    def cut(self):
        """Drop the daemon's side of every connection; the server's side stays open (half-open)."""
        with self.lock:
            pairs = list(self.pairs)
        for pair in pairs:
            client, pair[0] = pair[0], None
            with contextlib.suppress(OSError):
                client.shutdown(socket.SHUT_RDWR)
            client.close()

    def close(self):
        self.closed = True


def ip(*args, ns=None):
    prefix = ["ip", "netns", "exec", ns] if ns else []
    done = subprocess.run([*prefix, "ip", *args], capture_output=True, text=True, timeout=10)
    if done.returncode:
        raise OSError(f"ip {' '.join(args)}: {done.stderr.strip()}")


class Netns:
    """A network namespace joined to ours by one veth pair per proxy: the daemon inside, proxies outside.

    Pair i is the subnet prefix.(4i)/30: our side .(4i+1) (a proxy listens there), the namespace's
    .(4i+2). A partition takes our side's end of the pair down: the daemon's packets (and its
    replies to the proxy) are dropped silently by the veth, while the daemon's kernel sees no error,
    exactly as when a cable or a router between two hosts fails."""

    def __init__(self, pairs=2):
        tag = (os.getpid() * 10 + next(_sequence)) % 100000
        self.name = f"pyrnet{tag}"
        prefix = f"10.{200 + tag // 250 % 50}.{tag % 250}"
        self.links = [(f"pyr{tag}o{i}", f"pyr{tag}i{i}", f"{prefix}.{4 * i + 1}", f"{prefix}.{4 * i + 2}")
                      for i in range(pairs)]
        self.addresses = [outer_address for _, _, outer_address, _ in self.links]

    def __enter__(self):
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)     # left over by a killed run
        ip("netns", "add", self.name)
        try:
            ip("link", "set", "lo", "up", ns=self.name)
            for outer, inner, outer_address, inner_address in self.links:
                ip("link", "add", outer, "type", "veth", "peer", "name", inner, "netns", self.name)
                ip("addr", "add", f"{outer_address}/30", "dev", outer)
                ip("link", "set", outer, "up")
                ip("addr", "add", f"{inner_address}/30", "dev", inner, ns=self.name)
                ip("link", "set", inner, "up", ns=self.name)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc):
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)     # the veth pairs go too

    def command(self, argv):
        return ["ip", "netns", "exec", self.name, *argv]

    def _outer(self, address):
        return next(outer for outer, _, outer_address, _ in self.links if outer_address == address)

    def blackhole(self, address):
        ip("link", "set", self._outer(address), "down")

    def heal(self, address):
        ip("link", "set", self._outer(address), "up")


def netns_available():
    if os.geteuid() != 0:
        return "needs root (a network namespace and TCP repair mode)"
    try:
        with Netns():
            pass
    except (OSError, subprocess.SubprocessError) as e:
        return f"no network namespaces here: {e}"
    if not can_vanish():
        return "TCP repair mode (CAP_NET_ADMIN) unavailable"
    return None
