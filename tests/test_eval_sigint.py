"""``vtoken eval`` stopped by a real SIGINT (Ctrl-C) in a subprocess, then run again: it exits 130
with the resume hint, keeps every finished line, and the second run computes exactly the questions
the first did not (issue 15). The model is a fake backend (see tests/test_eval_runner.py) so the
test is fast; data loading, the CLI, the part files, resume and merge are the real ones."""

import collections
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parent

DRIVER = r'''
import functools, hashlib, json, os, sys, time
sys.path.insert(0, os.environ["VT_TESTS"])
from test_eval_runner import FakeBackend
from vtoken.eval import cli, runner


class Backend(FakeBackend):
    batches = 0

    def _answer(self, question):
        return "yes"

    def generate(self, images, questions):
        pause = int(os.environ.get("VT_PAUSE_AFTER", "0"))
        if pause and self.batches >= pause:
            open(os.environ["VT_READY"], "w").close()
            time.sleep(300)  # the test's SIGINT lands here, in the middle of a batch
        self.batches += 1
        with open(os.environ["VT_LOG"], "a") as f:
            for image, q in zip(images, questions):
                f.write(json.dumps([self.method, str(self.keep), q, hashlib.sha1(image.tobytes()).hexdigest()]) + "\n")
        return super().generate(images, questions)


cli.run_eval = functools.partial(runner.run_eval, backend=Backend())
sys.exit(cli.main(sys.argv[1:]))
'''

LIMIT, METHODS = 6, ["fastv", "random"]  # + the unpruned run: 3 configurations of 6 questions, batches of 2


def _env(tmp_path, log, **extra):
    env = dict(os.environ, VT_TESTS=str(TESTS), VT_LOG=str(log), VT_READY=str(tmp_path / "ready"), **extra)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS), env.get("PYTHONPATH")) if p)
    return env


def _log(path):
    if not path.exists():
        return collections.Counter()
    return collections.Counter(tuple(json.loads(line)) for line in path.read_text().splitlines())


def _default_sigint():
    """In the child: Ctrl-C's default action, as in a terminal. A test run started in the background
    of a non-interactive shell inherits SIGINT ignored, and Python then installs no
    KeyboardInterrupt handler, so the signal would never reach the eval."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_sigint_mid_run_then_resume(tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    out = tmp_path / "out"
    args = [sys.executable, str(driver), "--data", "synthetic", "--limit", str(LIMIT), "--methods", ",".join(METHODS),
            "--keep", "64", "--batch-size", "2", "--out", str(out), "--no-progress"]
    first_log, second_log = tmp_path / "first.log", tmp_path / "second.log"

    proc = subprocess.Popen(args, env=_env(tmp_path, first_log, VT_PAUSE_AFTER="4"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint)
    deadline = time.time() + 120
    while not (tmp_path / "ready").exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "the eval never reached its fifth batch"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)  # Ctrl-C
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "run the same command again to resume" in err
    assert "Traceback" not in err

    part = out / "predictions.part-0.jsonl"
    killed_lines = part.read_text(encoding="utf-8").splitlines()
    killed = [json.loads(line) for line in killed_lines]  # every line whole
    first = _log(first_log)
    assert sum(first.values()) == 8 == len(killed)  # four batches of two finished, all on disk
    assert not (out / "predictions.jsonl").exists()

    done = subprocess.run(args, env=_env(tmp_path, second_log), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    second = _log(second_log)
    assert not (set(first) & set(second)), "a finished question was computed again"
    total = LIMIT * (1 + len(METHODS))
    assert sum(first.values()) + sum(second.values()) == total and max((first + second).values()) == 1

    final = [json.loads(line) for line in (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(final) == total
    keys = {(r["dataset"], r["id"], r["method"], r["keep"]) for r in final}
    assert len(keys) == total
    for rec in killed:  # nothing the killed run wrote is lost or changed
        assert rec in final
    assert not list(out.glob("*.part-*.jsonl"))
