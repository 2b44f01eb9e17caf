"""Checkpoints: exact resume, restore onto another mesh, SIGKILL during a save, SIGTERM, and
clear errors for corrupt or incompatible checkpoints."""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest

from helpers import tiny_model
from jaxllm import Config, MeshConfig
from jaxllm.cli import main
from jaxllm.train.checkpoint import CheckpointError
from jaxllm.train.loop import pretrain
from jaxllm.train.metrics import read_jsonl
from runs import STEPS, compilation_cache, logged_steps, losses, quiet, run_config, saved_steps

STOP = 4  # the stopped run's last step: not a multiple of checkpoint.every


@pytest.fixture(scope="module", autouse=True)
def cache_env(tmp_path_factory):
    """Runs of one config compile once; later runs, subprocesses too, load the executables."""
    with compilation_cache(tmp_path_factory.getbasetemp() / "xla_cache") as env:
        yield env


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> list[float]:
    """The losses of all STEPS steps, uninterrupted."""
    history = pretrain(run_config(tmp_path_factory.mktemp("reference")), log=quiet)
    assert [r["step"] for r in history] == list(range(1, STEPS + 1))
    return losses(history)


@pytest.fixture(scope="module")
def stopped(tmp_path_factory) -> tuple[Path, list[float]]:
    """A workdir stopped after step STOP, with checkpoints at steps 3 and 4; its losses."""
    workdir = tmp_path_factory.mktemp("stopped")
    history = pretrain(run_config(workdir), log=quiet, stop_after=STOP)
    assert saved_steps(workdir) == [3, STOP]
    return workdir, losses(history)


def copy_of(workdir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(workdir, tmp_path / "run"))


@pytest.mark.parametrize("k", [3, 5])  # a multiple of checkpoint.every, and not
def test_stopping_after_k_steps_and_resuming_is_bitwise_exact(k, reference, tmp_path):
    first = pretrain(run_config(tmp_path), log=quiet, stop_after=k)
    lines = []
    second = pretrain(run_config(tmp_path), log=lines.append)
    assert f"resumed from the checkpoint at step {k} in {tmp_path / 'checkpoints'}" in lines
    assert losses(first) + losses(second) == reference
    assert logged_steps(tmp_path) == list(range(1, STEPS + 1))
    assert saved_steps(tmp_path) == [6, 7]  # every 3 steps and the last, keeping 2


def test_resume_from_an_earlier_step_is_bitwise_exact(reference, stopped, tmp_path):
    workdir, first = stopped
    assert first == reference[:STOP]
    workdir = copy_of(workdir, tmp_path)
    history = pretrain(run_config(workdir, resume_step=3), log=quiet)
    assert losses(history) == reference[3:]
    assert logged_steps(workdir) == list(range(1, STEPS + 1))
    assert saved_steps(workdir) == [6, 7]


def test_restarting_a_branch_continues_it_instead_of_branching_again(reference, stopped,
                                                                    tmp_path):
    """The same command (`resume_step=3`) run again after the branch saved step 5 resumes at
    5: a preempted branch restarted as it was launched loses nothing."""
    workdir = copy_of(stopped[0], tmp_path)
    first = pretrain(run_config(workdir, resume_step=3), log=quiet, stop_after=5)
    lines = []
    second = pretrain(run_config(workdir, resume_step=3), log=lines.append)
    assert f"resumed from the checkpoint at step 5 in {workdir / 'checkpoints'}" in lines
    assert losses(first) + losses(second) == reference[3:]
    assert saved_steps(workdir) == [6, 7]


def test_restore_onto_another_mesh_reshards_and_continues(reference, stopped, tmp_path):
    workdir = copy_of(stopped[0], tmp_path)
    history = pretrain(run_config(workdir, MeshConfig(data=1, fsdp=4, tensor=2)), log=quiet)
    np.testing.assert_allclose(losses(history), reference[STOP:], rtol=1e-5, atol=1e-5)


def write_experiment(path: Path, config: Config) -> Path:
    """An experiment file whose config() returns `config` (a dataclass repr is its source)."""
    path.write_text(f"from jaxllm.config import *\n\n\ndef config():\n    return {config!r}\n")
    return path


def test_corrupt_checkpoint_gets_a_message_with_step_and_reason(stopped, tmp_path, capsys,
                                                                monkeypatch):
    workdir = copy_of(stopped[0], tmp_path)
    for chunk in (workdir / "checkpoints" / str(STOP) / "state").rglob("d/*"):
        chunk.write_bytes(b"garbage")
    experiment = write_experiment(tmp_path / "experiment.py", run_config(workdir))
    reported = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: reported.append(u.exc_value))
    assert main(["pretrain", str(experiment)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"jaxllm: checkpoint error: the checkpoint at step {STOP} in ")
    assert "cannot be restored: ValueError: OUT_OF_RANGE" in err
    assert "Traceback" not in err
    # The failed restore's abandoned reads end within the second; their "Event loop is
    # closed" errors are dropped, and any other unraisable error is still reported.
    time.sleep(1)
    for error in (RuntimeError("Event loop is closed"), ValueError("other")):
        sys.unraisablehook(types.SimpleNamespace(exc_value=error))
    assert [str(e) for e in reported] == ["other"]


def test_checkpoint_of_another_model_names_the_fields(stopped, tmp_path):
    config = dataclasses.replace(
        run_config(copy_of(stopped[0], tmp_path)), model=tiny_model(mlp_dim=96)
    )
    with pytest.raises(CheckpointError, match=f"step {STOP} .* holds another model: "
                                              "model.mlp_dim: 128 in the checkpoint, 96 now"):
        pretrain(config, log=quiet)


def test_a_model_field_added_since_the_save_takes_its_default(stopped, tmp_path):
    workdir = copy_of(stopped[0], tmp_path)
    for metadata in (workdir / "checkpoints").glob("*/run/metadata"):
        run = json.loads(metadata.read_text())
        del run["config"]["model"]["remat"]  # as if saved before `remat` existed
        metadata.write_text(json.dumps(run))
    assert pretrain(run_config(workdir, steps=STOP + 1), log=quiet)[0]["step"] == STOP + 1


def test_a_checkpoint_saved_before_an_empty_state_field_existed_resumes(stopped, tmp_path):
    """A checkpoint written before `TrainState.fp8_meta` existed lacks it; a model that
    leaves it empty resumes from that checkpoint."""
    import orbax.checkpoint as ocp

    workdir = copy_of(stopped[0], tmp_path)
    step_dir = workdir / "checkpoints" / str(STOP)
    state = ocp.StandardCheckpointer().restore(step_dir / "state")
    assert state.pop("fp8_meta") == {}
    run = json.loads((step_dir / "run" / "metadata").read_text())
    shutil.rmtree(workdir / "checkpoints")
    with ocp.CheckpointManager(workdir / "checkpoints", item_names=("state", "run")) as old:
        old.save(STOP, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                               run=ocp.args.JsonSave(run)))
    assert pretrain(run_config(workdir, steps=STOP + 1), log=quiet)[0]["step"] == STOP + 1


def test_resume_step_without_a_checkpoint_lists_the_saved_steps(stopped, tmp_path):
    config = run_config(copy_of(stopped[0], tmp_path), resume_step=2)
    with pytest.raises(CheckpointError, match=r"resume_step=2: .* holds steps \[3, 4\]"):
        pretrain(config, log=quiet)


# ---------------------------------------------------------------------------------------
# Stopped by signals: SIGKILL during a save (of a `python -m jaxllm pretrain` subprocess), SIGTERM


def start_run(tmp_path: Path, config: Config, env: dict) -> subprocess.Popen:
    """`python -m jaxllm pretrain` of `config`, its output going to tmp_path/output.txt."""
    experiment = write_experiment(tmp_path / "experiment.py", config)
    with open(tmp_path / "output.txt", "w") as output:
        return subprocess.Popen(
            [sys.executable, "-m", "jaxllm", "pretrain", str(experiment)],
            stdout=output, stderr=subprocess.STDOUT, env={**os.environ, **env},
        )


def wait_for(condition, process: subprocess.Popen, timeout: float = 120, poll: float = 0.002):
    """Polls `condition` until it holds; fails if the process ends or time runs out first."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"the run ended with code {process.returncode}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(poll)


def test_sigkill_during_a_save_resumes_from_the_last_complete_checkpoint(
    tmp_path, cache_env
):
    workdir = tmp_path / "run"
    process = start_run(tmp_path, run_config(workdir, every=2), cache_env)
    checkpoints = workdir / "checkpoints"

    def saving_after_a_complete_one():
        names = [p.name for p in checkpoints.iterdir()] if checkpoints.exists() else []
        return any(n.isdigit() for n in names) and any("tmp" in n for n in names)

    wait_for(saving_after_a_complete_one, process)
    process.kill()
    process.wait()
    half_written = [p.name for p in checkpoints.iterdir() if not p.name.isdigit()]
    assert half_written, "the save finished before the kill; nothing was tested"
    complete = saved_steps(workdir)[-1]
    killed = {r["step"]: r["loss"] for r in read_jsonl(workdir / "metrics.jsonl")}

    lines = []
    pretrain(run_config(workdir, every=2), log=lines.append)
    assert f"resumed from the checkpoint at step {complete} in {checkpoints}" in lines
    resumed = {r["step"]: r["loss"] for r in read_jsonl(workdir / "metrics.jsonl")}
    assert sorted(resumed) == list(range(1, STEPS + 1))
    redone = [step for step in killed if step > complete]
    assert redone, "the killed run logged no step after its last complete checkpoint"
    assert [resumed[s] for s in redone] == [killed[s] for s in redone]


def test_a_run_with_checkpoints_shuts_down_cleanly(tmp_path, cache_env):
    """Every async save has finished and the manager is closed before the process exits:
    orbax reports no error or closed event loop at shutdown."""
    process = start_run(tmp_path, run_config(tmp_path / "run", every=1), cache_env)
    assert process.wait(timeout=300) == 0
    output = (tmp_path / "output.txt").read_text()
    assert f"step {STEPS:6d}/{STEPS}" in output
    for sign in ("Event loop is closed", "Traceback", "ERROR:absl", "wait_until_finished"):
        assert sign not in output, output
    assert saved_steps(tmp_path / "run") == [STEPS - 1, STEPS]


def test_sigterm_saves_at_the_current_step_and_returns(reference, tmp_path):
    def log(line: str) -> None:
        lines.append(line)
        if line.startswith("step      1/"):
            os.kill(os.getpid(), signal.SIGTERM)

    lines, handler = [], signal.getsignal(signal.SIGTERM)
    history = pretrain(run_config(tmp_path), log=log)
    assert "stopped at step 2 on a preemption notice (SIGTERM)" in lines
    assert losses(history) == reference[:2]
    assert saved_steps(tmp_path) == [2]
    assert signal.getsignal(signal.SIGTERM) is handler
