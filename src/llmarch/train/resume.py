"""``--resume``: continue a run from its own saved settings (``RUN/train.json``, ``RUN/model_config.json``), so
``llmarch train --out RUN --resume --steps N`` extends a run without retyping the original command; flags given
explicitly override those settings and are checked against the checkpoint before the corpus is tokenised."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from llmarch.config import ModelConfig
from llmarch.manifest import read_json_object
from llmarch.train.settings import TrainConfig

TRAIN_FILE = "train.json"
# settings about one invocation, not the run: a resumed run does not inherit them (``--stop-at 2`` then
# ``--resume`` continues to ``--steps``)
PER_INVOCATION = frozenset({"stop_at", "resume"})
MODEL_CONFIG_FILE = "model_config.json"
# the mesh: given any of these on --resume, the saved ones are not inherited (a sharded checkpoint reshards onto
# the mesh given, e.g. `--nproc 1 --tp 1` after a --tp 2 --sp run)
MESH_SETTINGS = frozenset({"dp", "tp", "pp", "ep", "sequence_parallel", "pp_schedule", "microbatches"})


def saved_settings(run_dir: str | Path) -> dict[str, Any] | None:
    """The settings a run was started with (``train.json``), or None for a directory without them."""
    path = Path(run_dir) / TRAIN_FILE
    if not path.is_file():
        return None
    saved = read_json_object(path, "--resume (pass the run's settings as flags instead)")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    return {k: v for k, v in saved.items() if k in known and k not in PER_INVOCATION}


def resume_settings(out: str, given: dict[str, Any]) -> TrainConfig:
    """The run's saved settings overridden by the flags ``given`` (and ``resume=True``); the given ones alone when
    the run has saved none yet. A mesh flag given replaces the whole saved mesh (``MESH_SETTINGS``)."""
    saved = saved_settings(out) or {}
    if MESH_SETTINGS & given.keys():
        saved = {k: v for k, v in saved.items() if k not in MESH_SETTINGS}
    return TrainConfig(**{**saved, **given, "out": out, "resume": True})


def resume_model_config_file(out: str) -> Path:
    """The file of the model config a run was trained with (its ``model_config.json``)."""
    path = Path(out) / MODEL_CONFIG_FILE
    if not path.is_file():
        raise ValueError(f"--resume: {path} does not exist, so the run's model is unknown; give --preset or --config "
                         "(and the --set values) it was started with")
    return path


def check_resumable(loaded: dict, model_cfg: ModelConfig, tc: TrainConfig, path: Path,
                    world: int | None = None) -> None:
    """Refuse a resume whose model config or settings differ from the checkpoint's (with the run's tokenizer);
    on ``world`` processes, another batch size / accumulation that keeps the global batch is allowed."""
    from llmarch.tokenizer import TOKENIZER_FILE, load_tokenizer
    from llmarch.train.setup import fit_model_config

    from llmarch.train.objectives import OBJECTIVES

    cfg, _ = fit_model_config(model_cfg, load_tokenizer(path / TOKENIZER_FILE), tc)
    if tc.objective is not None:  # what the objective trains (a reward model's scalar head)
        cfg = OBJECTIVES[tc.objective].fit_config(cfg)
    if loaded["config"] != cfg:
        theirs = loaded["config"].to_dict()
        diff = sorted(k for k, v in cfg.to_dict().items() if theirs.get(k) != v)
        raise ValueError(f"--resume: the model config differs from the checkpoint's ({path}) in {diff}; resume "
                         "with the run's own config (omit --preset/--config/--set) or choose a new --out")
    changed = tc.changed_for_resume(loaded["state"]["train"], world, loaded["state"].get("world"))
    if changed:
        raise ValueError(f"--resume: settings {changed} differ from the checkpoint's; they would change the run "
                         f"(see {path / 'state.json'}); drop those flags or choose a new --out")


__all__ = ["resume_settings", "resume_model_config_file", "saved_settings", "check_resumable", "TRAIN_FILE",
           "MODEL_CONFIG_FILE"]
