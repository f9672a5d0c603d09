"""A disk too small, a disk that fills during a checkpoint, a read-only output folder: real tmpfs mounts in
a private mount namespace (root and `unshare -m`, as on CI), each ending in one line of error, a non-zero
exit and nothing partial."""

import json
import shutil
import subprocess
import sys
import textwrap

import pytest

from survive import CHILD, child_env, task_tree, write_config

# Inside the namespace: mount the tmpfs, run the child `tunesmith train`, and report what is on the disk.
WRAPPER = textwrap.dedent("""
    import json, pathlib, subprocess, sys
    mount, size, options, config, child = sys.argv[1:6]
    subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(filter(None, [f"size={size}", options])), "tmpfs",
                    mount], check=True)
    run = subprocess.run([sys.executable, "-c", child, "train", config], capture_output=True, text=True)
    root = pathlib.Path(mount)
    status = root / "runs" / "tiny" / "status.json"
    print(json.dumps({"rc": run.returncode, "stderr": run.stderr,
                      "files": sorted(str(p.relative_to(root)) for p in root.rglob("*")),
                      "status": json.loads(status.read_text()) if status.is_file() else None}))
""")


def _mounts_work(folder) -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-m", "--propagation", "private", "mount", "-t", "tmpfs", "-o", "size=1m",
                            "tmpfs", str(folder)], capture_output=True)
    return probe.returncode == 0


@pytest.fixture
def small_disk(tmp_path):
    """Run a child `tunesmith train` whose output.dir is on a fresh tmpfs of ``size`` (``options``: ro)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if not _mounts_work(mount):
        pytest.skip("needs root and mount namespaces (unshare -m) to mount a small tmpfs; CI's machine has both")

    def run(tree: dict, size: str, options: str = "", plan: dict | None = None) -> dict:
        tree["output"]["dir"] = str(mount / "runs")
        config = write_config(tree, tmp_path / "run.yaml")
        done = subprocess.run(["unshare", "-m", "--propagation", "private", sys.executable, "-c", WRAPPER,
                               str(mount), size, options, str(config), CHILD], capture_output=True, text=True,
                              timeout=300, env=child_env(plan or {"at": "never", "count": 0}))
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout)
    return run


def _the_error(report: dict) -> str:
    assert "Traceback" not in report["stderr"], report["stderr"][-3000:]
    errors = [line for line in report["stderr"].splitlines() if line.startswith("error:")]
    assert len(errors) == 1, report["stderr"][-3000:]
    return errors[0]


def test_a_disk_too_small_is_refused_before_the_first_step(small_disk, tiny_model_dir, tmp_path):
    tree = task_tree("sft", tiny_model_dir, tmp_path, save_every=2)
    tree["method"]["type"] = "full"  # 3.2 M fp32 weights and two AdamW moments: ~38 MiB a checkpoint
    report = small_disk(tree, "8m")
    assert report["rc"] == 1
    error = _the_error(report)
    assert "runs/tiny: not enough disk space" in error and "need" in error and "free there" in error, error
    assert "training.keep_last" in error and "nothing was trained" in error
    assert not any("checkpoints" in f or f.endswith("metrics.jsonl") or "model" in f for f in report["files"])
    assert report["status"]["status"] == "failed" and "not enough disk space" in report["status"]["reason"]


@pytest.mark.parametrize("when", ["fill_at", "fill_after"])
def test_a_disk_that_fills_during_a_checkpoint_keeps_the_previous_one(when, small_disk, tiny_model_dir, tmp_path):
    """The disk fills before the second checkpoint's weights (safetensors fails), or after them (torch.save of
    the optimizer state fails, in its own words)."""
    tree = task_tree("sft", tiny_model_dir, tmp_path, save_every=2)
    filler = str(tmp_path / "disk" / "filler")
    report = small_disk(tree, "16m", plan={"at": "never", "count": 0, when: 3, "fill": filler})
    assert report["rc"] == 1
    error = _the_error(report)
    assert "checkpoints/step-0000004: cannot write a checkpoint (No space left on device)" in error, error
    assert "the previous checkpoint (step-0000002) is intact" in error
    kept = [f for f in report["files"] if f.startswith("runs/tiny/checkpoints/")]
    assert sorted(f.rsplit("/", 1)[-1] for f in kept if f.count("/") == 4) == [
        "optimizer.pt", "rng.json", "rng.safetensors", "scheduler.json", "trainable.safetensors",
        "trainer_state.json"]
    assert not any(".tmp-" in f for f in report["files"]), "a partial checkpoint was left"
    assert not any(f.startswith("runs/tiny/model") for f in report["files"])


def test_a_read_only_output_folder_is_one_line_and_nothing_else(small_disk, tiny_model_dir, tmp_path):
    report = small_disk(task_tree("sft", tiny_model_dir, tmp_path), "1m", options="ro")
    assert report["rc"] == 1
    error = _the_error(report)
    assert "runs/tiny: cannot write the run folder (Read-only file system)" in error, error
    assert report["files"] == []
