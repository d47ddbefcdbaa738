"""Ray clusters for tests and benches that never leave this machine.

* ``loopback_only()``: this process is in a network namespace whose only interface is loopback
  (``.ci/loopback-netns``). Ray tests and benches skip elsewhere.
* ``ray_environment()``: imports ``ray`` with the environment the clusters need: token auth with a
  token made here (nothing read from or written to ~/.ray), no usage stats (which would phone
  home). Ray reads RAY_AUTH_MODE once, when it is imported.
* ``local_ray_cluster(ray, num_cpus)``: ``ray.init(address="local", ...)`` (never a cluster left
  over from elsewhere) bound to 127.0.0.1, in a temp dir of its own; on exit ray.shutdown() and
  ``stop_processes``: every process whose command line names that temp dir is checked gone, and
  killed by its pid (never by name) if it is not.
* ``assert_cluster_on_loopback(ray)``: every address the cluster reports, and every socket listening
  in the namespace, is loopback.
"""
import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time


def interfaces() -> list[str]:
    """Network interfaces of this process's namespace (sysfs would show the host's)."""
    return sorted(name for _, name in socket.if_nameindex())


def loopback_only() -> bool:
    return interfaces() == ["lo"]


NOT_LOOPBACK_ONLY = ("Ray clusters start only in a network namespace with nothing but loopback "
                     f"(this one has {', '.join(interfaces())}): run through .ci/loopback-netns "
                     "(make test-ray / make bench-ray)")


# -- processes and addresses ------------------------------------------------------------------
def _pids_using(marker: str) -> list[int]:
    """Pids of the processes whose command line mentions ``marker`` (a cluster's own temp dir)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
            with open(f"/proc/{entry}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker.encode() in cmdline and state != "Z":
            pids.append(int(entry))
    return pids


def stop_processes(marker: str, popens=(), timeout: float = 30.0) -> list[int]:
    """Stop what a test started: its Popen objects (SIGTERM, then SIGKILL), then every process left
    whose command line names the test's temp dir, each by its pid. Returns the pids that had to be
    killed after the clean shutdown (a test asserts there are none)."""
    for p in popens:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in popens:
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(10)
    deadline = time.monotonic() + timeout
    while _pids_using(marker) and time.monotonic() < deadline:
        time.sleep(0.5)
    leftover = _pids_using(marker)
    for pid in leftover:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return leftover


def _listening_addresses() -> list[str]:
    """Local addresses of every listening TCP socket and bound UDP socket in this namespace."""
    out = []
    for table, states in (("tcp", {"0A"}), ("tcp6", {"0A"}), ("udp", {"07"}), ("udp6", {"07"})):
        with open(f"/proc/net/{table}") as f:
            for line in f.read().splitlines()[1:]:
                fields = line.split()
                if fields[3] in states:
                    out.append(fields[1].split(":")[0])
    return out


def _is_loopback_hex(addr: str) -> bool:
    if len(addr) == 8:                                   # IPv4, little-endian hex
        return socket.inet_ntoa(bytes.fromhex(addr)[::-1]).startswith("127.")
    words = bytes.fromhex(addr)
    ip6 = b"".join(words[i:i + 4][::-1] for i in range(0, 16, 4))
    if ip6 == b"\0" * 15 + b"\1":
        return True
    return ip6[:12] == b"\0" * 10 + b"\xff\xff" and ip6[12] == 127   # ::ffff:127.x.y.z


def _is_loopback(host: str) -> bool:
    host = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    return host.startswith("127.") or host in ("localhost", "::1")


def assert_cluster_on_loopback(ray, serve_replicas: int = 0):
    """Every address the cluster reports is loopback, and so is every socket listening in this
    namespace, except one per Serve replica: Ray Serve (2.60) binds each replica's
    inter-deployment gRPC server to ``[::]:0``, all interfaces, with no setting to change it;
    here that means loopback only, because the namespace has no other interface."""
    reported = [ray.get_runtime_context().gcs_address, ray.util.get_node_ip_address()]
    for node in ray.nodes():
        if node["Alive"]:
            reported += [node["NodeManagerAddress"], node["NodeName"]]
    assert all(_is_loopback(a) for a in reported), f"non-loopback addresses reported: {reported}"
    listening = _listening_addresses()
    wildcard = [a for a in listening if a.strip("0") == ""]
    others = [a for a in listening if a not in wildcard and not _is_loopback_hex(a)]
    assert listening and not others, f"sockets listening on non-loopback addresses: {others}"
    assert len(wildcard) <= serve_replicas, f"{len(wildcard)} sockets bound to all interfaces"
    assert interfaces() == ["lo"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- environment and clusters -----------------------------------------------------------------
@contextlib.contextmanager
def ray_environment():
    import pytest

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_USAGE_STATS_ENABLED", "0")
        mp.setenv("RAY_AUTH_MODE", "token")
        mp.setenv("RAY_AUTH_TOKEN", secrets.token_hex(32))
        mp.setenv("RAY_DISABLE_IMPORT_WARNING", "1")
        already = "ray" in sys.modules
        import ray
        if already:
            pytest.skip("ray was imported before its environment was set; run the Ray tests in a "
                        "pytest process of their own (make test-ray)")
        yield ray


@contextlib.contextmanager
def local_ray_cluster(ray, num_cpus: int = 2):
    """(ray, temp dir) of a local cluster started here; stopped and checked gone on exit."""
    temp_dir = tempfile.mkdtemp(prefix="fastres-ray-")
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
             object_store_memory=200 * 2**20, _temp_dir=temp_dir, log_to_driver=False,
             configure_logging=False)
    try:
        yield ray, temp_dir
    finally:
        try:
            if "ray.serve" in sys.modules:
                sys.modules["ray.serve"].shutdown()
        finally:
            ray.shutdown()
            leftover = stop_processes(temp_dir)
            shutil.rmtree(temp_dir, ignore_errors=True)
        assert not leftover, f"processes still running after ray.shutdown(), killed: {leftover}"
