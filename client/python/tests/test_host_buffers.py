"""The host backend's buffers: those of a process that is gone are removed
by the next load, those of a live process are kept."""

import os
import subprocess

from sllm_client.host import new_buffer_path, remove_orphan_buffers


def test_buffers_of_dead_processes_are_removed_and_live_ones_kept(tmp_path):
    live = new_buffer_path(str(tmp_path))
    open(live, "wb").close()
    # A process that has exited: a child that ran and was reaped.
    child = subprocess.Popen(["true"])
    child.wait()
    dead = tmp_path / f"sllm-buffer-{child.pid}-1-x"
    dead.write_bytes(b"left behind")
    # This process's pid with a start time it does not have: a reused pid.
    reused = tmp_path / f"sllm-buffer-{os.getpid()}-1-x"
    reused.write_bytes(b"left behind")
    other = tmp_path / "sllm-buffer-not-ours"
    other.write_bytes(b"unknown name")

    remove_orphan_buffers(str(tmp_path))

    assert not dead.exists()
    assert not reused.exists()
    assert other.exists()
    assert os.path.exists(live)
