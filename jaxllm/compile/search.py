"""A search over remat policy, gradient accumulation and mesh split for a TPU slice.

Each candidate is compiled ahead of time (`aot.compile_for`) for its memory; those that fit
are then costed with every layer counted and ranked by the compiler's estimated step time
(an estimate), then by the HBM they leave free. The winner comes back as `key=value` overrides.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterator

from jaxllm import config as config_lib
from jaxllm.compile import aot
from jaxllm.compile.topology import NotFitting, Topology

REMAT_POLICIES = ("none", "save_dots", "full")
GRAD_ACCUM = (1, 2, 4, 8)
TENSOR = (1, 2, 4, 8)
EXPERT = (1, 2, 4, 8, 16)


@dataclasses.dataclass(frozen=True)
class Candidate:
    remat: str
    grad_accum: int
    fsdp: int
    tensor: int
    expert: int

    def overrides(self, data: int) -> list[str]:
        return [f"model.remat={self.remat}", f"train.grad_accum={self.grad_accum}",
                f"mesh.data={data}", f"mesh.fsdp={self.fsdp}", f"mesh.tensor={self.tensor}",
                f"mesh.expert={self.expert}", "mesh.context=1"]


def candidates(config: config_lib.Config, topology: Topology, *, remat=REMAT_POLICIES,
               grad_accum=GRAD_ACCUM, tensor=TENSOR, expert=EXPERT) -> Iterator[Candidate]:
    """Every candidate the config allows on the slice: data spans the slices, and each slice's
    chips split into fsdp x tensor x expert, tensor dividing both head counts, expert the
    expert count; the batch must split over the data and fsdp shards and micro-batches."""
    model = config.model
    per_slice = topology.chips // topology.slices
    experts = model.moe.num_experts if model.moe else 1
    for policy, accum, tp, ep in itertools.product(remat, grad_accum, tensor, expert):
        fsdp, rest = divmod(per_slice, tp * ep)
        rows = config.train.batch_size
        if (rest or model.num_heads % tp or model.num_kv_heads % tp
                or experts % ep or rows % (accum * topology.slices * fsdp)):
            continue
        yield Candidate(policy, accum, fsdp, tp, ep)


def apply(config: config_lib.Config, candidate: Candidate, data: int) -> config_lib.Config:
    return config_lib.apply_overrides(config, candidate.overrides(data))


def search(config: config_lib.Config, topology: Topology, log: Callable[[str], None] = print,
           **space) -> list[tuple[Candidate, aot.Report]]:
    """(candidate, report) of the candidates that fit, fastest estimate first. For each remat
    policy and mesh split only the fewest micro-batches that fit are kept: more would cost the
    same FLOPs in smaller matmuls. `space` narrows the candidates (see `candidates`)."""
    fitting: dict[tuple, tuple[Candidate, aot.Report]] = {}
    found = list(candidates(config, topology, **space))
    for i, candidate in enumerate(sorted(found, key=lambda c: c.grad_accum), 1):
        key = (candidate.remat, candidate.fsdp, candidate.tensor, candidate.expert)
        if key in fitting:
            continue
        try:
            report = aot.compile_for(apply(config, candidate, topology.slices), topology,
                                     cost=False)
        except NotFitting:
            log(f"[{i}/{len(found)}] {candidate}: does not fit (the compiler ran out of memory)")
            continue
        log(f"[{i}/{len(found)}] {candidate}: {aot.gib(report.memory.total)} of "
            f"{aot.gib(report.hbm_bytes)}{'' if report.fits else ', does not fit'}")
        if report.fits:
            fitting[key] = (candidate, report)
    ranked = [(c, aot.with_cost(r, apply(config, c, topology.slices), topology))
              for c, r in fitting.values()]
    ranked.sort(key=lambda item: (item[1].step_seconds or float("inf"), -item[1].margin_bytes))
    return ranked


def format_ranking(ranked: list[tuple[Candidate, aot.Report]]) -> str:
    """The fitting candidates as a markdown table, best first."""
    lines = ["| rank | remat | grad_accum | fsdp | tensor | expert | GiB/device | est. step s "
             "| est. MFU bound |", "|---|---|---|---|---|---|---|---|---|"]
    for rank, (c, r) in enumerate(ranked, 1):
        step = f"{r.step_seconds:.3g}" if r.step_seconds else "-"
        mfu = f"{r.mfu_bound:.1%}" if r.mfu_bound else "-"
        lines.append(f"| {rank} | {c.remat} | {c.grad_accum} | {c.fsdp} | {c.tensor} | "
                     f"{c.expert} | {r.memory.total / 2**30:.1f} | {step} | {mfu} |")
    return "\n".join(lines)
