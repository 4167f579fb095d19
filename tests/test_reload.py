"""Reload (issue 27 item 3): `llmsup reload` (SIGHUP) re-reads the config file against a real
llmsup; live settings change at once without failing a request in flight or queued, the
others are named as needing a restart, a bad file changes nothing, and the gateway takes a
new API key. The replacing of workers moved to `llmsup restart-workers` (test_daemon.py)."""

from __future__ import annotations

import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from llmsup.protocol.client import LlmsupError

from .conftest import wait_until

pytestmark = pytest.mark.timeout(300)

SMOL = ("--model", "smollm2-135m-instruct")
GREEDY = {"temperature": 0.0}


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o600)
    return path


def stream_requests(inst, n: int, max_tokens: int):
    """n completions on their own connections; (threads, results, errors) to join and check."""
    results: list[str] = []
    errors: list[str] = []

    def one(i: int) -> None:
        try:
            with inst.client(timeout=120) as client:
                results.append(
                    client.complete(f"Story {i}:", max_tokens=max_tokens, **GREEDY).text()
                )
        except (LlmsupError, OSError) as exc:  # collected: asserted by the test
            errors.append(repr(exc))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    return threads, results, errors


def test_reload_changes_live_settings_under_load_and_fails_nothing(instance_factory, tmp_path):
    config = write(tmp_path / "llmsup.toml", "queue-size = 6\nstall-timeout = 30\n")
    inst = instance_factory(
        *SMOL, "--config", str(config), "--workers", "1", "--slots-per-worker", "2"
    )
    assert inst.start().returncode == 0
    assert inst.status()["queue"]["limit"] == 6 and inst.status()["reload"] is None
    threads, results, errors = stream_requests(inst, 6, max_tokens=48)  # 2 run, 4 wait
    wait_until(lambda: inst.status()["queue"]["depth"] >= 2, timeout=30)
    write(
        config,
        "queue-size = 3\nqueue-tokens = 5000\nstall-timeout = 45\nkeep-alive = 60\n"
        'log-level = "warning"\nctx-size = 1024\n',
    )
    reloaded = inst.cli("reload")
    assert reloaded.returncode == 0, reloaded.stderr
    assert "reloaded: changed keep-alive, log-level, queue-size, queue-tokens, stall-timeout" in (
        reloaded.stdout
    )
    assert "needs a restart to change: ctx-size" in reloaded.stdout
    status = inst.status()
    assert status["queue"]["limit"] == 3 and status["queue"]["prompt_token_limit"] == 5000
    assert status["queue"]["per_client_limit"] == 1  # follows the queue size when unset
    assert status["reload"]["ok"] and status["reload"]["restart_needed"] == ["ctx-size"]
    for t in threads:
        t.join(timeout=240)
    # A queue longer than the new limit drained as it was: nothing in it was refused.
    assert not errors, errors
    assert len(results) == 6 and all(results)
    log = inst.log()
    assert "reload: needs a restart to change: ctx-size" in log
    assert "reload: changed" not in log  # an INFO line, and the level is now warning
    assert inst.stop().returncode == 0


def test_a_file_that_does_not_parse_changes_nothing(instance_factory, tmp_path):
    config = write(tmp_path / "llmsup.toml", "queue-size = 6\n")
    inst = instance_factory(*SMOL, "--config", str(config), "--workers", "1")
    assert inst.start().returncode == 0
    write(config, 'queue-size = 9\nqueue-tokens = "lots"\n')
    reloaded = inst.cli("reload")
    assert reloaded.returncode == 1
    assert f"{config}:2: 'queue-tokens' must be an integer, not 'lots'" in reloaded.stderr
    status = inst.status()
    assert status["queue"]["limit"] == 6 and not status["reload"]["ok"]
    assert "reload: nothing changed" in inst.log()
    with inst.client(timeout=60) as client:
        assert client.complete("Hello", max_tokens=4, **GREEDY).text()
    # Flags given to start still win over the file on reload.
    assert inst.stop().returncode == 0


def test_flags_still_win_on_reload(instance_factory, tmp_path):
    config = write(tmp_path / "llmsup.toml", "queue-size = 6\n")
    inst = instance_factory(*SMOL, "--config", str(config), "--workers", "1", "--queue-size", "5")
    assert inst.start().returncode == 0
    write(config, "queue-size = 9\nmax-requests = 100\n")
    reloaded = inst.cli("reload")
    assert reloaded.returncode == 0 and "changed max-requests" in reloaded.stdout
    assert inst.status()["queue"]["limit"] == 5
    assert inst.stop().returncode == 0


def http_code(url: str, key: str | None = None) -> int:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_the_gateway_takes_a_new_key_without_a_restart(instance_factory, tmp_path):
    from testkit import free_port

    port = free_port()
    config = write(tmp_path / "llmsup.toml", f'http = "127.0.0.1:{port}"\n')
    inst = instance_factory(*SMOL, "--config", str(config), "--workers", "1")
    assert inst.start().returncode == 0
    url = f"http://127.0.0.1:{port}/v1/models"
    assert http_code(url) == 200
    gateway_pid = inst.status()["gateway"]["pid"]
    write(config, f'http = "127.0.0.1:{port}"\napi-key = "first-key"\n')
    assert inst.cli("reload").returncode == 0
    assert wait_until(lambda: http_code(url) == 401, timeout=10)
    assert http_code(url, "first-key") == 200
    key_file = write(tmp_path / "key", "second-key\n")
    write(config, f'http = "127.0.0.1:{port}"\napi-key-file = "{key_file}"\n')
    assert inst.cli("reload").returncode == 0
    assert wait_until(lambda: http_code(url, "second-key") == 200, timeout=10)
    assert http_code(url, "first-key") == 401
    assert inst.status()["gateway"]["pid"] == gateway_pid  # the same process throughout
    assert inst.stop().returncode == 0
