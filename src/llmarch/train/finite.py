"""Stop a run whose numbers stopped being numbers. A NaN or infinite loss (or gradient norm) ends training with a
message naming the step and the term; weights are checked before every checkpoint, so a non-finite checkpoint is
never written and ``keep_last`` never prunes the last good one."""
from __future__ import annotations

import math

import torch

HINT = ("lower --lr, check norm_eps (--set norm_eps=1e-5) and the initialisation, or train in --precision fp32 "
        "(fp16 overflows first)")


class NonFiniteError(ValueError):
    """Training produced NaN or infinity."""


def check_record(record: dict, run_dir, scaled: bool = False) -> None:
    """Raise :class:`NonFiniteError` if a loss term (or, without a gradient scaler, the gradient norm) of one
    step's record is NaN or infinite. ``record`` values are host floats already (no extra device sync)."""
    # the term that broke first (a named loss term before the total), the gradient norm last
    names = [k for k in record if k.startswith("loss_")] + ["aux_loss", "loss"]
    if not scaled:  # with fp16's scaler an infinite norm is expected now and then: that step is skipped
        names.append("grad_norm")
    bad = [k for k in names if k in record and not math.isfinite(record[k])]
    if not bad:
        return
    from llmarch.train.checkpoints import list_checkpoints

    term, saved = bad[0], list_checkpoints(run_dir)  # none of them is non-finite: they were checked when saved
    where = f"the last good checkpoint is {saved[-1]}" if saved else "no checkpoint was written"
    raise NonFiniteError(f"step {record['step']}: {term} is {record[term]} (non-finite); training stopped and {where}. "
                         f"Hint: {HINT}")


def check_weights(state: dict[str, torch.Tensor], step: int) -> None:
    """Refuse to checkpoint weights with NaN or infinity (names the first such tensor)."""
    for name, t in state.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise NonFiniteError(f"step {step}: weight {name} holds NaN or infinity; no checkpoint was written. "
                                 f"Hint: {HINT}")


def check_shards(state: dict[str, torch.Tensor], step: int, count_bad) -> None:
    """:func:`check_weights` for a sharded run: ``state`` holds this rank's shards, ``count_bad(n)`` sums the
    ranks' counts of bad tensors (collective), so every rank refuses together."""
    bad = [name for name, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if count_bad(len(bad)):
        where = f"weight {bad[0]}" if bad else "a weight on another rank"
        raise NonFiniteError(f"step {step}: {where} holds NaN or infinity; no checkpoint was written. Hint: {HINT}")


__all__ = ["NonFiniteError", "check_record", "check_weights", "check_shards", "HINT"]
