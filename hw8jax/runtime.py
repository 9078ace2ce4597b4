"""What training and scoring share: processes, devices, mesh, keys, dtypes, compilation cache.

The processes and devices a run runs on, its mesh and shardings, its random keys, its compute
dtypes and the compilation cache. (CPU tuning is apart, in `hw8jax.cpu_tuning`.)"""

from __future__ import annotations

import contextlib
import os
import socket
import time

import jax
import jax.numpy as jnp
from jax.experimental.compilation_cache import compilation_cache as cc

from hw8jax.errors import UserError

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compilation_cache_dir(setting: str) -> str:
  """The folder of the persistent compilation cache for the config's `compilation_cache`
  ("" when off). "auto" keeps a folder JAX was already given (JAX_COMPILATION_CACHE_DIR)."""
  if setting != "auto":
    return os.path.expanduser(setting)
  if jax.config.jax_compilation_cache_dir:
    return jax.config.jax_compilation_cache_dir
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "hw8jax", "xla")


def use_compilation_cache(setting: str) -> None:
  """Keep compiled programs across processes, so that a resumed run, a rescoring or the next
  run of the same model loads its programs instead of compiling them again (docs/performance.md).
  Programs that compile in under 0.2 s are not kept: loading one costs about as much. JAX reads
  the folder once, at the next compilation; a different folder later in the same process starts
  it afresh."""
  path = compilation_cache_dir(setting)
  if path == (jax.config.jax_compilation_cache_dir or ""):
    return
  if path:
    try:
      os.makedirs(path, exist_ok=True)
    except OSError as e:
      raise UserError(f"compilation_cache={setting!r}: cannot create {path}: {e.strerror}; "
                      "name another folder, or '' to turn the cache off") from None
  jax.config.update("jax_compilation_cache_dir", path or None)
  if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
  cc.reset_cache()


def init_distributed(config) -> None:
  """Join a multi-process run when the config names a coordinator (each process is started
  with its own process_id). CPU processes exchange collectives through gloo.

  JAX's own wait for the other processes ends, at its timeout, in a C++ check failure that
  kills the process (exit 134, minutes later, silently). So the processes first meet on the
  coordinator's port in plain Python (`_rendezvous`), saying what they wait for and stopping
  in one line after `distributed_timeout` seconds; JAX starts only once all are there."""
  if not config.coordinator_address or jax.distributed.is_initialized():
    return
  deadline = time.monotonic() + config.distributed_timeout
  _rendezvous(config.coordinator_address, config.num_processes, config.process_id, deadline,
              config.distributed_timeout)
  if os.environ.get("JAX_PLATFORMS", "cpu") == "cpu":
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(config.coordinator_address, num_processes=config.num_processes,
                             process_id=config.process_id,
                             initialization_timeout=max(int(deadline - time.monotonic()), 10))


def _address(address: str) -> tuple[str, int]:
  host, _, port = address.rpartition(":")
  if not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise UserError(f"coordinator_address={address!r}: use host:port")
  return host.strip("[]"), int(port)


def _rendezvous(address: str, num_processes: int, process_id: int, deadline: float,
                timeout: float) -> None:
  """Process 0 listens on the coordinator's port until every other process has connected and
  sent its id, then tells each to go on; the others connect (again and again while nothing
  listens) and wait for that word. Then all close: the port is free for JAX's coordinator."""
  host, port = _address(address)
  where = f"coordinator_address={address}"
  if process_id == 0:
    log_all(f"process 0 of {num_processes}: waiting up to {timeout:g} s "
            f"(distributed_timeout) for the other processes at {address}")
    try:
      dual = socket.has_dualstack_ipv6()  # "[::1]:port" as well as "127.0.0.1:port"
      server = socket.create_server(("", port), family=socket.AF_INET6 if dual else
                                    socket.AF_INET, dualstack_ipv6=dual)
    except OSError as e:
      raise UserError(f"{where}: process 0 cannot listen on port {port} ({e.strerror})") \
          from None
    peers = {}
    with server:
      while len(peers) < num_processes - 1:
        server.settimeout(max(deadline - time.monotonic(), 0.01))
        try:
          conn, _ = server.accept()
        except TimeoutError:
          missing = sorted(set(range(1, num_processes)) - set(peers))
          raise UserError(f"{where}: waited {timeout:g} s (distributed_timeout) for process(es) "
                          f"{', '.join(map(str, missing))} of {num_processes}; start each "
                          "with its --config.process_id") from None
        conn.settimeout(max(deadline - time.monotonic(), 0.01))
        try:
          said = conn.recv(64).decode("ascii", "replace").strip()
        except OSError:
          said = ""
        if said.isdigit() and 0 < int(said) < num_processes and int(said) not in peers:
          peers[int(said)] = conn
        else:
          conn.close()  # not one of ours (or a second process with the same id)
      for conn in peers.values():
        conn.sendall(b"go\n")
      for conn in peers.values():  # each closes first: the port's leftovers stay on their side
        with contextlib.suppress(OSError):
          conn.recv(8)
        conn.close()
    return
  log_all(f"process {process_id} of {num_processes}: waiting up to {timeout:g} s "
          f"(distributed_timeout) for process 0 at {address}")
  while True:
    left = deadline - time.monotonic()
    try:
      with socket.create_connection((host, port), timeout=max(min(left, 5.0), 0.01)) as conn:
        conn.settimeout(max(left, 0.01))
        conn.sendall(f"{process_id}\n".encode())
        if conn.recv(8).startswith(b"go"):
          return
    except OSError:
      pass
    if time.monotonic() >= deadline:
      raise UserError(f"{where}: process 0 did not answer within {timeout:g} s "
                      "(distributed_timeout); start it, or check the host and port")
    time.sleep(min(0.5, max(deadline - time.monotonic(), 0)))


def make_mesh() -> jax.sharding.Mesh:
  """One `data` axis over every device of every process."""
  return jax.make_mesh((jax.device_count(),), ("data",))


def replicated(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def batch_sharded(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))


def run_keys(seed: int) -> dict:
  """Every key of a run, from the config's one seed: model init, training noise (folded with
  the step) and scoring noise (folded with each image's index in the test file)."""
  init, noise, score = _split_seed(seed)
  return {"init": init, "noise": noise, "score": score}


@jax.jit
def _split_seed(seed):
  # One program: op by op, the key, the split and the unstacking compiled four.
  return tuple(jax.random.split(jax.random.key(seed), 3))


def is_main_process() -> bool:
  return jax.process_index() == 0


def log_all(message: str) -> None:
  """A line from every process (what each one is waiting for), before JAX knows which is 0."""
  print(message, flush=True)


def log(message: str) -> None:
  """A progress line, printed once per run (by process 0)."""
  if is_main_process():
    print(message, flush=True)
