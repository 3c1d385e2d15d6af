"""Cache locks in Redis (`LORAFLOW_LOCK_URL`), against a real `redis-server` on loopback: runs
with separate `LORAFLOW_HOME`s (as on separate hosts, so no lock file is shared) compute each stage
once, a killed holder's lock lapses, and a server that is not there is one clear error."""

from __future__ import annotations

import json
import shutil
import subprocess
import time

import pytest

from loraflow.builtin import builtin_path
from loraflow.locks import lock_manager
from tests.conftest import free_port
from tests.helpers import (STAGES, computed, finish, kill_while_training, session_env, small_config, start_cli,
                           task_states)


@pytest.fixture(scope="module")
def redis_server():
    """`redis-server` on a free loopback port, in memory only; yields its port."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    import redis

    port = free_port()
    server = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                               "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port)
    deadline = time.monotonic() + 30
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            assert server.poll() is None and time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.1)
    try:
        yield port
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture
def redis_db(redis_server):
    """The server's URL, emptied for this test, and a client of it."""
    import redis

    url = f"redis://127.0.0.1:{redis_server}/0"
    client = redis.Redis.from_url(url)
    client.flushdb()
    return url, client


def run_env(tmp_path, name: str, url: str, lease: str, **extra: str) -> dict[str, str]:
    """A run of its own `LORAFLOW_HOME` (as on another host), locking in Redis with `lease` seconds."""
    return session_env(LORAFLOW_HOME=str(tmp_path / f"home-{name}"), LORAFLOW_LOCK_URL=url,
                       LORAFLOW_LOCK_LEASE_SECONDS=lease, **extra)


def no_lock_files(tmp_path) -> bool:
    return not any(tmp_path.glob("home-*/locks/*.lock"))


def test_runs_on_two_homes_compute_each_stage_once(shapes, tmp_path, redis_db):
    """With a 1 s lease, training outlasts many leases: the holder's renewals in Redis keep the
    other run out, though the two share no lock directory."""
    url, client = redis_db
    model = str(builtin_path("tiny-sd"))  # one prebuilt folder for both homes
    cfg = small_config(tmp_path / "store", shapes, model={"source": model},
                       train={"steps": 300, "checkpoint_every": 100})
    # Two torch processes on a small machine: one thread each, or OpenMP's spinning threads starve both.
    runs = [start_cli(cfg, tmp_path, name, run_env(tmp_path, name, url, "1", OMP_NUM_THREADS="1"))
            for name in ("a", "b")]
    for proc in runs:
        finish(proc)
    reports = [json.loads((tmp_path / f"{name}.json").read_text()) for name in ("a", "b")]
    both = [task_states(r["flow_run_id"]) for r in reports]
    for stage in STAGES:
        assert sorted(states[stage] for states in both) == ["Cached", "Completed"], stage
    assert max(row["seconds"] for r in reports for row in r["tasks"] if row["task"] == "train") > 1  # > the lease
    assert computed(reports)["latents"] == len(list(shapes.glob("*.png")))  # each latent encoded once, in all
    assert no_lock_files(tmp_path) and client.keys("lock:*") == []  # locked in Redis, all released


@pytest.mark.slow
def test_lock_of_a_killed_run_lapses(shapes, tmp_path, redis_db):
    """A run SIGKILLed while training leaves its train lock in Redis. The next run, on another
    home, waits at most one lease for it, then trains, resuming from the killed run's checkpoint."""
    url, client = redis_db
    lease = "3"
    cfg = small_config(tmp_path / "store", shapes, model={"source": str(builtin_path("tiny-sd"))},
                       train={"steps": 400, "checkpoint_every": 10})
    kill_while_training(cfg, tmp_path, run_env(tmp_path, "killed", url, lease))
    held = client.keys("lock:*")
    assert held and all(0 < client.pttl(key) <= 3000 for key in held)  # left behind, expiring within a lease

    second = start_cli(cfg, tmp_path, "next", run_env(tmp_path, "next", url, lease))
    out = finish(second)
    assert "resuming from step" in out
    assert task_states(json.loads((tmp_path / "next.json").read_text())["flow_run_id"])["train"] == "Completed"
    assert no_lock_files(tmp_path)


def test_renewal_keeps_a_lock_past_several_leases(redis_db, tmp_path):
    url, client = redis_db
    mine, other = (lock_manager(tmp_path, 0.5, url) for _ in range(2))
    assert mine.acquire_lock("k", "me")
    time.sleep(2)  # four leases
    assert client.get("lock:k") == b"me"
    assert not other.acquire_lock("k", "other", acquire_timeout=0.3)
    mine.release_lock("k", "me")
    assert not other.is_locked("k") and other.acquire_lock("k", "other", acquire_timeout=0.3)
    other.release_lock("k", "other")


def test_renewal_never_extends_a_lock_another_holder_took(redis_db, tmp_path):
    url, client = redis_db
    mine = lock_manager(tmp_path, 0.5, url)
    assert mine.acquire_lock("k", "me")
    client.set("lock:k", "other", px=10_000)  # as if ours lapsed and another run took it
    mine._renew("k", "me")
    assert client.get("lock:k") == b"other" and client.pttl("lock:k") > 5_000  # untouched
    assert "k" not in mine._held


def test_bad_lock_url_is_one_clear_error(tmp_path):
    with pytest.raises(ValueError, match="LORAFLOW_LOCK_URL is not a Redis URL"):
        lock_manager(tmp_path, 1, "http://127.0.0.1:6379")


def test_unreachable_redis_fails_the_run_at_once(shapes, tmp_path):
    """No server at LORAFLOW_LOCK_URL: the run stops before any work, with one line naming it."""
    url = f"redis://127.0.0.1:{free_port()}/0"
    cfg = small_config(tmp_path / "store", shapes)
    start = time.monotonic()
    proc = start_cli(cfg, tmp_path, "unreachable", session_env(LORAFLOW_LOCK_URL=url))
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1, out
    assert "loraflow: run failed: LORAFLOW_LOCK_URL: no Redis server answers there" in out, out
    assert "Traceback" not in out and time.monotonic() - start < 60
    assert not (tmp_path / "store" / "objects").exists()
