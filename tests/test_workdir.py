"""A gs:// workdir: the config, the JSONL and TensorBoard logs and the plots reach the bucket,
and a resumed run keeps what the earlier one logged.

No network: `gs://` paths go through etils.epath's fsspec backend to an in-memory stand-in
for GCS that, like GCS, refuses appends. A write that bypassed epath (pathlib, `open`,
tensorboardX) would land in a local `gs:` directory instead, which the tests check is absent.
"""

import importlib
import json
import struct
import time

import pytest
from etils import epath
from etils.epath import backend, gpath
from fsspec.implementations.memory import MemoryFileSystem
from tensorboardX.proto import event_pb2

from jaxllm.plot import plot_run
from jaxllm.train import scaffold
from jaxllm.train import workdir as workdir_lib
from jaxllm.train.checkpoint import Checkpointer
from jaxllm.train.loop import pretrain
from jaxllm.train.metrics import MetricsWriter, read_jsonl
from jaxllm.train.run import read_config
from runs import compilation_cache, quiet, run_config

REMOTE = "gs://bucket/run"


class FakeGCS(MemoryFileSystem):
    """An in-memory bucket that, like GCS, cannot append to an object."""

    protocol = ("gs", "gcs")

    def _open(self, path, mode="rb", **kwargs):
        if "a" in mode:
            raise NotImplementedError(f"GCS objects cannot be appended to: {path}")
        return super()._open(path, mode, **kwargs)


@pytest.fixture
def fake_gcs(monkeypatch, tmp_path):
    """gs:// through epath's fsspec backend into a fresh FakeGCS; the cwd is `tmp_path`, so a
    write that takes gs://bucket for a local path shows up as `tmp_path/gs:`."""
    registry = importlib.import_module("fsspec.registry")
    for name in FakeGCS.protocol:
        monkeypatch.setitem(registry._registry, name, FakeGCS)
    monkeypatch.setattr(FakeGCS, "store", {})
    monkeypatch.setattr(FakeGCS, "pseudo_dirs", [""])
    monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)  # no tf.io.gfile for gs://
    monkeypatch.setattr(workdir_lib, "_mirrors", {})  # a fresh process's mirrors
    monkeypatch.chdir(tmp_path)
    backend.fsspec_backend._get_filesystem.cache_clear()
    yield FakeGCS.store
    backend.fsspec_backend._get_filesystem.cache_clear()
    assert not list(tmp_path.glob("gs*")), "something wrote gs:// as a local path"


def remote(*parts: str) -> epath.Path:
    return epath.Path(REMOTE, *parts)


def tensorboard_scalars(directory: epath.Path) -> dict[str, dict[int, float]]:
    """tag -> {step: value} from the event files (TFRecord framing around Event protos), as
    TensorBoard reads them: a run's SessionLog.START at its purge step drops the steps from
    there on that an earlier run logged."""
    scalars = {}
    for path in sorted(directory.iterdir()):  # the names start with the creation time
        data = path.read_bytes()
        while data:
            (length,) = struct.unpack("<Q", data[:8])
            event = event_pb2.Event.FromString(data[12:12 + length])
            data = data[16 + length:]
            if event.session_log.status == event_pb2.SessionLog.START:
                for values in scalars.values():
                    for step in [s for s in values if s >= event.step]:
                        del values[step]
            for value in event.summary.value:
                scalars.setdefault(value.tag, {})[event.step] = value.simple_value
    return scalars


def test_only_urls_are_remote(tmp_path):
    assert workdir_lib.is_remote("gs://bucket/run") and workdir_lib.is_remote("s3://b/r")
    assert not workdir_lib.is_remote("runs/demo") and not workdir_lib.is_remote(tmp_path)
    assert workdir_lib.local_dir(tmp_path / "run") == tmp_path / "run"
    assert (tmp_path / "run").is_dir()
    assert str(workdir_lib.path("gs://bucket/run", "tb")) == "gs://bucket/run/tb"


def test_metrics_writer_mirrors_each_flush_and_keeps_lines_on_resume(fake_gcs, monkeypatch):
    writer = MetricsWriter(REMOTE, start_step=0)
    for step in range(1, 6):
        writer.write({"step": step, "loss": float(step)})
        assert [r["step"] for r in read_jsonl(remote("metrics.jsonl"))] == list(range(1, step + 1))
        assert list(remote("tb").iterdir())  # tensorboardX writes its queue from a thread:
    writer.close()  # each copy takes what it wrote by then, the last one all of it
    assert tensorboard_scalars(remote("tb"))["loss"] == {s: s for s in range(1, 6)}
    assert workdir_lib.local_dir(REMOTE) != remote()

    monkeypatch.setattr(workdir_lib, "_mirrors", {})  # resumed on another machine,
    time.sleep(1.1)  # in another second: event file names hold the second of their creation
    writer = MetricsWriter(REMOTE, start_step=3)
    writer.write({"step": 4, "loss": 40.0})
    writer.close()
    assert read_jsonl(remote("metrics.jsonl")) == [
        {"step": 1, "loss": 1.0}, {"step": 2, "loss": 2.0}, {"step": 3, "loss": 3.0},
        {"step": 4, "loss": 40.0},
    ]
    assert len(list(remote("tb").iterdir())) == 2  # one event file per run, as locally
    assert tensorboard_scalars(remote("tb"))["loss"] == {1: 1, 2: 2, 3: 3, 4: 40}


@pytest.mark.slow
def test_a_run_on_a_gs_workdir_logs_there_and_resumes(fake_gcs, monkeypatch, tmp_path):
    # Orbax would write gs:// through tensorstore's own GCS driver, which needs the
    # network: only the checkpoints stay local here.
    monkeypatch.setattr(scaffold, "checkpointer",
                        lambda config: Checkpointer(tmp_path / "checkpoints", config.checkpoint))
    config = run_config(REMOTE, steps=5, every=2)
    with compilation_cache(tmp_path / "xla_cache"):
        first = pretrain(config, log=quiet, stop_after=3)
        assert [r["step"] for r in read_jsonl(remote("metrics.jsonl"))] == [1, 2, 3]
        monkeypatch.setattr(workdir_lib, "_mirrors", {})  # resumed on another machine
        resumed = pretrain(config, log=quiet)

    assert read_config(REMOTE) == config
    assert json.loads(remote("config.json").read_text())["workdir"] == REMOTE
    logged = read_jsonl(remote("metrics.jsonl"))
    assert [r["step"] for r in logged] == [1, 2, 3, 4, 5]  # resumed from step 3's checkpoint
    assert [r["loss"] for r in logged] == [r["loss"] for r in first] + [
        r["loss"] for r in resumed
    ]
    scalars = tensorboard_scalars(remote("tb"))
    assert sorted(scalars["loss"]) == [1, 2, 3, 4, 5]

    written = plot_run(REMOTE)
    assert {p.name for p in remote("plots").iterdir()} == {p.name for p in written} >= {
        "loss.png", "learning_rate.png"}
    assert remote("plots", "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
