import subprocess
import sys

import pytest

from tests.conftest import REPO
from modules.errors import UserError
from modules.files import atomic_write_text, exclusive_output


def test_atomic_write_replaces_whole_file(tmp_path):
    path = tmp_path / "out" / "a.json"
    atomic_write_text(path, "one")
    atomic_write_text(path, "two")
    assert path.read_text() == "two" and [p.name for p in path.parent.iterdir()] == ["a.json"]


def test_second_writer_refuses_while_the_first_runs_and_stale_locks_are_taken_over(tmp_path):
    out = tmp_path / "model.pt"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from modules.files import exclusive_output\n"
         f"with exclusive_output({str(out)!r}):\n    print('held', flush=True); time.sleep(60)"],
        cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=f"process {holder.pid}.*choose another output"):
            with exclusive_output(out):
                pass
    finally:
        holder.kill()
        holder.wait()
    with exclusive_output(out):  # the holder died without cleaning up: its lock is stale
        assert (tmp_path / "model.pt.lock").is_file()
    assert not (tmp_path / "model.pt.lock").exists()
