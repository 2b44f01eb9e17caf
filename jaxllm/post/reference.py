"""The cache of DPO's reference log-probs in the workdir.

The reference is the policy's starting point (`jaxllm.train.scaffold.initial_weights`). With `dpo.reference="cached"` its summed response log-probs of
every pair are computed once, before training, and kept as JSON in
`workdir/reference_logps.json`, with a fingerprint of the pairs and the reference they belong
to; a resumed run reads them back instead of computing them again.
"""

import hashlib
import json

import jax
import numpy as np

from jaxllm.config import ConfigError
from jaxllm.post.preferences import TokenizedPair
from jaxllm.train import workdir as workdir_lib
from jaxllm.train.scaffold import Run

CACHE = "reference_logps.json"


def fingerprint(splits: dict[str, list[TokenizedPair]], run: Run) -> str:
    """A digest of the pairs' tokens, the row width and the reference's source."""
    content = {
        "pairs": {name: [[p.prompt, p.chosen, p.rejected] for p in pairs]
                  for name, pairs in splits.items()},
        "seq_len": run.config.train.seq_len,
        "init_from": run.config.init_from,
        "model": repr(run.config.model),
        "seed": run.config.train.seed,
    }
    return hashlib.sha256(json.dumps(content).encode()).hexdigest()


def load(workdir: str | None, key: str) -> dict[str, np.ndarray] | None:
    """The cached [N, 2] (chosen, rejected) log-probs of each split, or None if the workdir
    holds none. A cache of other pairs or another reference is refused."""
    if workdir is None or not (path := workdir_lib.path(workdir, CACHE)).exists():
        return None
    saved = json.loads(path.read_text())
    if saved.get("fingerprint") != key:
        raise ConfigError(f"dpo.reference: {path} holds the log-probs of other pairs or of "
                          "another reference model; delete it to compute them again")
    return {name: np.asarray(rows, np.float32).reshape(-1, 2)
            for name, rows in saved["logps"].items()}


def save(workdir: str | None, table: dict[str, np.ndarray], key: str) -> None:
    """Writes the cache whole, through a temporary file, so no half-written cache is read."""
    if workdir is None or jax.process_index() != 0:
        return
    data = {"fingerprint": key, "logps": {name: rows.tolist() for name, rows in table.items()}}
    partial = workdir_lib.path(workdir, CACHE + ".tmp")
    workdir_lib.write_text(partial, json.dumps(data) + "\n")
    partial.replace(workdir_lib.path(workdir, CACHE))
