"""Hostile generated code, each case through the real scorer (`score_code`).

Every program starts with a correct `square` and the hidden tests are correct, so only the hostile
part can make a program fail. Each case must be scored as a failure within its time limit, leave no
process behind (none of the run's sandbox uid, none with the case's marker in its command line), and
change nothing outside its temporary folder (sentinel files in a root-owned folder under /tmp and in
one outside /tmp stay as they were; no new file appears there or in /tmp).

Which guarantees hold depends on `isolation_mode()` (see `opd_bench/scoring/sandbox.py`): all of
them in "namespaces" (root with `unshare`, as on the reference machine); cases that need more than
the mode gives are skipped with the reason.
"""

from __future__ import annotations

import os
import resource
import secrets
import shutil
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from opd_bench.scoring import sandbox
from opd_bench.scoring.sandbox import DROP_PRIVILEGES, NAMESPACES, isolation_mode, score_code

SOLUTION = "def square(x):\n    return x * x\n"
TESTS = "assert square(3) == 9\nassert square(-2) == 4\n"
TIMEOUT_S = 2.0
SLACK_S = 2.0  # start-up, kill and clean-up on a loaded machine
REPO = Path(__file__).resolve().parents[1]

MODE = isolation_mode()
PRIVILEGED = {NAMESPACES, DROP_PRIVILEGES}  # the program runs as a throwaway uid


def requires(*modes: str):
    reason = f"needs sandbox mode {modes}, this machine has {MODE!r}"
    return pytest.mark.skipif(MODE not in modes, reason=reason)


# ----------------------------------------------------------------------------- fixtures


@dataclass
class Outside:
    """Places outside the sandbox the programs go after."""

    dirs: list[Path]  # root-owned: one under /tmp, one outside it (git-ignored)
    sentinels: list[Path]  # one per dir, content "original"
    tmp_target: Path  # a fresh name directly in the world-writable /tmp
    snapshot: dict

    def state(self) -> dict:
        listing = {str(d): sorted(os.listdir(d)) for d in self.dirs}
        files = {str(p): (p.read_text(), p.stat().st_mtime_ns) for p in self.sentinels if p.exists()}
        return {"listing": listing, "files": files, "tmp_target": self.tmp_target.exists()}

    def assert_unchanged(self) -> None:
        assert self.state() == self.snapshot


@pytest.fixture
def outside(tmp_path):
    token = secrets.token_hex(6)
    cache = REPO / ".pytest_cache"
    cache.mkdir(exist_ok=True)
    dirs = [tmp_path, cache / f"opd_hostile_{token}"]
    dirs[1].mkdir()
    for d in dirs:
        d.chmod(0o755)  # others may look, only root may write
        (d / "sentinel.txt").write_text("original")
    place = Outside(dirs, [d / "sentinel.txt" for d in dirs], Path("/tmp") / f"opd_hostile_{token}", {})
    place.snapshot = place.state()
    yield place
    shutil.rmtree(dirs[1], ignore_errors=True)
    if place.tmp_target.is_dir():
        shutil.rmtree(place.tmp_target, ignore_errors=True)
    elif place.tmp_target.exists():
        place.tmp_target.unlink()


@dataclass
class Run:
    uids: list[int]  # the sandbox uids the scorer used (one per program run)
    results: list  # the ProgramResults behind the verdicts


@pytest.fixture
def run(monkeypatch):
    """Records, around the real scorer, which uid each program ran as and what it printed."""
    record = Run([], [])
    next_uid, run_program = sandbox._next_uid, sandbox.run_program

    def recording_next_uid():
        uid = next_uid()
        record.uids.append(uid)
        return uid

    def recording_run_program(*args, **kwargs):
        result = run_program(*args, **kwargs)
        record.results.append(result)
        return result

    monkeypatch.setattr(sandbox, "_next_uid", recording_next_uid)
    monkeypatch.setattr(sandbox, "run_program", recording_run_program)
    return record


def _live_processes() -> list[tuple[int, int, bytes]]:
    """(pid, real uid, command line) of every process that is neither a zombie nor dead."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if fields["State"].split()[0] not in ("Z", "X"):
            found.append((int(entry.name), int(fields["Uid"].split()[0]), cmdline))
    return found


def _survivors(uids: list[int], marker: str) -> list[str]:
    """Processes of the run's uid or with the marker, after up to 2 s for SIGKILL to land."""
    deadline = time.monotonic() + 2.0
    while True:
        left = [f"pid {pid} uid {uid} {cmd[:120]!r}" for pid, uid, cmd in _live_processes()
                if uid in uids or (marker and marker.encode() in cmd)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


def score(program: str, run: Run, outside: Outside | None = None, *, marker: str = "",
          timeout_s: float = TIMEOUT_S, expect: str | None = None, case: str = ""):
    """Score SOLUTION + `program` against TESTS and check the common guarantees."""
    start = time.monotonic()
    verdict = score_code(SOLUTION + program, TESTS, timeout_s=timeout_s)
    elapsed = time.monotonic() - start
    print(f"\n{case or program[:40]!r} | {verdict.detail} | {elapsed:.2f} s")
    assert not verdict.correct, verdict
    if expect is not None:
        assert expect in verdict.detail, verdict.detail
    assert elapsed < timeout_s + SLACK_S
    if MODE in PRIVILEGED:
        assert run.uids  # ran as a throwaway uid (one per program run)
        assert not _survivors(run.uids, marker)
    elif marker:
        assert not _survivors([], marker)
    if outside is not None:
        outside.assert_unchanged()
    return verdict


# ----------------------------------------------------------------------------- cases


def test_infinite_loop(run, outside):
    score("while True:\n    pass\n", run, outside, expect="timeout", case="infinite loop")


# Forks up to 200 sleeping children until the process limit refuses, then prints how many it got.
FORK_SLEEPERS = (
    "n = 0\n"
    "for _ in range(200):\n"
    "    try:\n"
    "        pid = os.fork()\n"
    "    except OSError:\n"
    "        break\n"
    "    if pid == 0:\n"
    "        time.sleep(30)\n"
    "        os._exit(0)\n"
    "    n += 1\n"
    "print('forked', n, flush=True)\n"
)


@requires(*PRIVILEGED)
def test_process_limit_holds(run):
    """Before any fork bomb: forking sleeping children stops at PROCESS_LIMIT, and all of them die."""
    program = (
        "import os, sys, time\n"
        + FORK_SLEEPERS +
        "sys.exit(0)\n"
    )
    score(program, run, expect="no nonce", case="fork 200 sleepers")
    assert run.results[0].stdout.split()[:2] == ["forked", str(sandbox.PROCESS_LIMIT - 1)]


@requires(*PRIVILEGED)
def test_fork_bomb(run, outside):
    program = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    score(program, run, outside, expect="timeout", case="fork bomb")


def test_memory_bomb(run, outside):
    program = "hog = []\nwhile True:\n    hog.append(b'x' * (64 << 20))\n"
    score(program, run, outside, expect="MemoryError", case="memory bomb")


@pytest.mark.parametrize("escape", ["import sys\nsys.exit(0)\n", "import os\nos._exit(0)\n"],
                         ids=["sys.exit", "os._exit"])
def test_exit_before_the_tests(run, outside, escape):
    score(escape, run, outside, expect="no nonce", case=escape.split("\n")[1])


def test_guessed_success_markers(run, outside):
    program = (
        "import os, secrets\n"
        "for marker in ['OK', 'passed', 'PASSED', 'All tests passed', '0' * 32, secrets.token_hex(16)]:\n"
        "    print(marker)\n"
        "os._exit(0)\n"
    )
    score(program, run, outside, expect="no nonce", case="guessed success markers")


@requires(*PRIVILEGED)
def test_writing_files_outside(run, outside):
    """Tries everything, then fails loudly if anything was refused (as a careless program would)."""
    targets = [outside.tmp_target, *outside.sentinels, *(d / "new.txt" for d in outside.dirs)]
    program = (
        "import os\n"
        "refused = []\n"
        f"for path in {[str(t) for t in targets] + ['../escaped.txt']!r}:\n"
        "    for mode in ('a', 'w'):\n"
        "        try:\n"
        "            with open(path, mode) as f:\n"
        "                f.write('escaped')\n"
        "        except OSError as e:\n"
        "            refused.append(f'{path}: {e.strerror}')\n"
        "print(refused)\n"
        "if refused:\n"
        "    raise SystemExit(f'refused {len(refused)}')\n"
    )
    score(program, run, outside, expect="exit 1: refused", case="write outside")
    assert not outside.tmp_target.exists()


@requires(*PRIVILEGED)
def test_deleting_files_outside(run, outside):
    program = "import os\n" + "".join(f"os.remove({str(p)!r})\n" for p in reversed(outside.sentinels))
    score(program, run, outside, expect="exit 1", case="delete outside")


@requires(NAMESPACES)
def test_filling_the_disk(run, outside):
    program = (
        "for i in range(10_000):\n"
        "    with open(f'fill{i}', 'wb') as f:\n"
        "        f.write(b'x' * (8 << 20))\n"
    )
    score(program, run, outside, expect="No space left", case="fill the disk")


def test_reading_environment_and_secrets(run, outside, monkeypatch):
    secret = secrets.token_hex(16)
    monkeypatch.setenv("OPD_TEST_SECRET", secret)
    program = (
        "import glob, os\n"
        "seen = {k: v for k, v in os.environ.items() if 'SECRET' in k}\n"
        f"for path in glob.glob('/proc/*/environ') + ['/proc/{os.getpid()}/environ', '/etc/shadow']:\n"
        "    try:\n"
        "        data = open(path, 'rb').read()\n"
        "    except OSError:\n"
        "        continue\n"
        "    if b'OPD_TEST_SECRET' in data or path == '/etc/shadow':\n"
        "        seen[path] = data.decode(errors='replace')\n"
        "print(seen)\n"
        "assert seen, 'nothing secret in sight'\n"
    )
    score(program, run, outside, expect="nothing secret in sight", case="read env and secrets")
    result = run.results[0]
    assert secret not in result.stdout + result.stderr


@requires(NAMESPACES)
def test_network_connection(run, outside):
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    received = []

    def serve():  # bounded: gives up after 10 s even if the test hangs
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and server.fileno() >= 0:
            try:
                conn, _ = server.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            received.append(conn.recv(100))
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    port = server.getsockname()[1]
    try:
        program = (
            "import socket\n"
            f"s = socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
            "s.sendall(b'exfiltrated')\n"
        )
        score(program, run, outside, expect="exit 1", case="network connection")
        assert "OSError" in run.results[0].stderr  # unreachable, not a timeout or a refusal
        time.sleep(0.3)
        assert received == []
    finally:
        server.close()
        thread.join(timeout=2)


@requires(NAMESPACES)
def test_unix_socket_outside(run, outside):
    """No network namespace covers a socket file: it must be out of sight instead."""
    path = outside.dirs[1] / "service.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    path.chmod(0o777)  # anyone may connect, as with some system daemons' sockets
    server.listen(1)
    server.settimeout(3)  # bounded
    received = []

    def serve():
        try:
            received.append(server.accept()[0].recv(100))
        except OSError:  # timed out, or closed at the end of the test
            pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        program = (
            "import socket\n"
            "s = socket.socket(socket.AF_UNIX)\n"
            f"s.connect({str(path)!r})\n"
            "s.sendall(b'exfiltrated')\n"
        )
        score(program, run, case="unix socket outside", expect="exit 1")
        thread.join(timeout=0.3)
        assert received == []
    finally:
        server.close()
        path.unlink()
    thread.join(timeout=5)


@requires(NAMESPACES)
def test_reading_files_outside(run, outside):
    """Project files, data sets and weights are not in the program's view (e.g. an answer key)."""
    program = f"print(open({str(outside.sentinels[1])!r}).read())\n"
    score(program, run, outside, expect="FileNotFoundError", case="read outside (answer key)")
    program = f"import os\nprint(os.listdir({str(REPO)!r}))\n"
    score(program, run, outside, expect="FileNotFoundError", case="list the project folder")
    assert all("original" not in r.stdout + r.stderr for r in run.results)


_LATE_WRITER = "import sys, time; time.sleep(0.3); open(sys.argv[1], 'w').write('late'); time.sleep(30)"


@requires(*PRIVILEGED)
@pytest.mark.parametrize("how", ["popen", "new session", "double fork"])
def test_background_process_outliving_the_check(run, outside, how):
    marker = f"opd_daemon_{secrets.token_hex(4)}"
    target = str(outside.tmp_target)
    argv = f"[sys.executable, '-c', {_LATE_WRITER!r}, {target!r}, {marker!r}]"
    spawn = {
        "popen": f"subprocess.Popen({argv})\n",
        "new session": f"subprocess.Popen({argv}, start_new_session=True)\n",
        "double fork": (
            "if os.fork() == 0:\n"
            "    os.setsid()\n"
            "    if os.fork() == 0:\n"
            f"        os.execv(sys.executable, {argv})\n"
            "    os._exit(0)\n"
            "os.wait()\n"
        ),
    }[how]
    program = "import os, subprocess, sys\n" + spawn + "sys.exit(0)\n"
    score(program, run, outside, marker=marker, expect="no nonce", case=f"background: {how}")
    time.sleep(0.5)  # had it survived, it would have written by now
    assert not outside.tmp_target.exists()
    outside.assert_unchanged()


@pytest.mark.parametrize("stream", ["stdout", "stderr"])
def test_huge_output(run, outside, stream):
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    program = (
        "import sys\n"
        "chunk = 'x' * (1 << 20)\n"
        "for _ in range(1024):  # 1 GiB\n"
        f"    sys.{stream}.write(chunk)\n"
    )
    score(program, run, outside, case=f"huge output ({stream})")
    result = run.results[0]
    assert len(result.stdout) <= 1_000_000 and len(result.stderr) <= 1_000_000
    assert "File too large" in result.stderr or stream == "stderr"
    # The scorer reads at most max_output_bytes per stream: no blow-up on our side (KiB).
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - maxrss_before < 100_000


@requires(*PRIVILEGED)
def test_signalling_and_privileges(run, outside):
    program = (
        "import os, signal\n"
        "for pid in (-1, 1, os.getppid()):\n"
        "    try:\n"
        "        os.kill(pid, signal.SIGKILL)\n"
        "    except OSError:\n"
        "        pass\n"
        f"os.kill({os.getpid()}, signal.SIGKILL)  # the scorer itself\n"
    )
    score(program, run, outside, expect="exit 1", case="kill the scorer")
    program = "import os\nos.setuid(0)\n"
    score(program, run, outside, expect="PermissionError", case="setuid(0)")


@pytest.mark.skipif(os.geteuid() != 0, reason="the drop-privileges mode is for root")
def test_drop_privileges_mode_without_namespaces(run, outside, monkeypatch):
    """The fallback for root without `unshare` (e.g. a default Docker container), forced here."""
    monkeypatch.setattr(sandbox, "isolation_mode", lambda: DROP_PRIVILEGES)

    def works() -> bool:
        try:
            result = sandbox._run("import os\nprint(os.getuid() != 0)\n", DROP_PRIVILEGES)
            return result.stdout.strip() == "True"
        except OSError:
            return False

    if not works():
        # Our interpreter may sit where others cannot reach it (pyenv under /root): use the system's.
        python = shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")
        monkeypatch.setattr(sandbox, "_interpreter", lambda: os.path.realpath(python or "python3"))
        if python is None or not works():
            pytest.skip("no Python here that an unprivileged uid can start")
    run.uids.clear()
    marker = f"opd_daemon_{secrets.token_hex(4)}"
    program = (
        "import os, sys, time\n"
        f"open({str(outside.tmp_target)!r}, 'w').write('escaped')  # allowed, removed afterwards\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        f"        os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(30)',\n"
        f"                                  {marker!r}])\n"
        "    os._exit(0)\n"
        "os.wait()\n"
        + FORK_SLEEPERS +
        f"open({str(outside.sentinels[1])!r}, 'w').write('overwritten')\n"
    )
    score(program, run, outside, marker=marker, expect="PermissionError", case="drop-privileges mode")
    # 64 processes for the uid: the program, the daemon and 62 sleepers.
    assert run.results[0].stdout.split() == ["forked", str(sandbox.PROCESS_LIMIT - 2)]


@pytest.mark.xfail(strict=True, reason="known hole: the nonce is in the program's own script (and memory)")
def test_reading_the_nonce_from_its_own_source(run):
    program = (
        "import os, re\n"
        "text = open(__file__).read()\n"
        "print(re.findall(r'\\\\n([0-9a-f]{32})\\\\n', text)[-1], flush=True)\n"
        "os._exit(0)\n"
    )
    verdict = score_code(SOLUTION + program, TESTS)
    assert not verdict.correct, verdict
