"""A run's workdir, local or remote (`gs://` or any other `etils.epath` URL).

One-shot files (config.json, plots, sweep tables) are written straight through `epath`.
Files that grow while the run goes (metrics.jsonl, TensorBoard events, the RL samples log,
the profiler trace) cannot: a GCS object cannot be appended to. For a remote workdir they
are written into a local mirror directory instead, and `sync` copies each file that changed
since its last copy to the workdir, whole: the logs are small, and the profiler trace is
copied once, when it stops. A local workdir is its own mirror, and `sync` does nothing.
"""

import atexit
import io
import re
import shutil
import tempfile
from pathlib import Path

from etils import epath

from jaxllm import config as config_lib

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")

_mirrors: dict[str, Path] = {}  # remote workdir -> its local mirror, one per process
_copied: dict[Path, tuple[int, int]] = {}  # mirror file -> (size, mtime) when last copied


def is_remote(workdir: str | Path | epath.Path) -> bool:
    """Whether `workdir` is a URL such as gs://bucket/run rather than a local path."""
    return bool(_SCHEME.match(str(workdir)))


def path(workdir: str | Path | epath.Path, *parts: str) -> epath.Path:
    """`workdir/parts...` as an epath, which keeps the `gs://` of a remote workdir."""
    return epath.Path(workdir).joinpath(*parts)


def local_dir(workdir: str | Path) -> Path:
    """The local directory to write the workdir's growing files into: the workdir itself if
    it is local (created if missing), else this process's mirror of it."""
    if not is_remote(workdir):
        Path(workdir).mkdir(parents=True, exist_ok=True)
        return Path(workdir)
    key = str(workdir).rstrip("/")
    if key not in _mirrors:
        _mirrors[key] = Path(tempfile.mkdtemp(prefix="jaxllm-workdir-"))
        atexit.register(shutil.rmtree, _mirrors[key], ignore_errors=True)
    return _mirrors[key]


def _stamp(file: Path) -> tuple[int, int]:
    stat = file.stat()
    return stat.st_size, stat.st_mtime_ns


def pull(workdir: str | Path, name: str) -> Path:
    """The mirror's copy of `workdir/name`, first downloaded from a remote workdir (or
    removed from the mirror if the workdir has none), so a resumed run appends to it."""
    local = local_dir(workdir) / name
    if is_remote(workdir):
        remote = path(workdir, name)
        if remote.exists():
            local.parent.mkdir(parents=True, exist_ok=True)
            local.write_bytes(remote.read_bytes())
            _copied[local] = _stamp(local)
        elif local.exists():
            local.unlink()
    return local


def sync(workdir: str | Path | None) -> None:
    """Copies every mirror file that changed since its last copy to the remote workdir."""
    if workdir is None or not is_remote(workdir):
        return
    mirror = local_dir(workdir)
    for file in sorted(p for p in mirror.rglob("*") if p.is_file()):
        stamp = _stamp(file)
        if _copied.get(file) == stamp:
            continue
        write_bytes(path(workdir, *file.relative_to(mirror).parts), file.read_bytes())
        _copied[file] = stamp


def write_bytes(target: str | Path | epath.Path, data: bytes) -> None:
    """Writes the file `target`, local or remote, creating its directory."""
    target = epath.Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)


def write_text(target: str | Path | epath.Path, text: str) -> None:
    write_bytes(target, text.encode())


def save_config(config: config_lib.Config, workdir: str | Path) -> None:
    """`workdir/config.json`, in a local or remote workdir."""
    config_lib.save(config, path(workdir, "config.json"))


def save_figure(figure, target: str | Path | epath.Path) -> epath.Path:
    """A matplotlib figure as a PNG at `target`, local or remote; returns `target`."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    write_bytes(target, buffer.getvalue())
    return epath.Path(target)
