"""Multitask prompted fine-tuning (BLOOMZ / xP3, Muennighoff et al. 2023; FLAN, Wei et al. 2022): a mixture of
named tasks with mixing rates, each rendering its rows through prompt templates, and a task-difficulty
curriculum whose shares of simple / medium / hard examples change with training progress.

A mixture file (YAML or JSON)::

    tasks:
      - name: implement
        data: instructions.jsonl        # JSONL rows (a path relative to this file)
        where: {task: implement}        # optional: rows whose fields equal these
        rate: 0.5                       # mixing rate (normalised over tasks)
        templates:                      # optional (default: the rows' prompt / response)
          - {prompt: "Write `{name}`:\\n{docstring}", response: "{signature}\\n{body}"}
    curriculum:                         # optional: stages spread evenly over the run
      - {simple: 0.7, medium: 0.3, hard: 0.0}
      - {simple: 0.2, medium: 0.6, hard: 0.2}
      - {simple: 0.1, medium: 0.3, hard: 0.6}

Rows carry ``difficulty`` (simple | medium | hard; default medium) and ``split`` ("test" = held out; default by a
hash of the line). Sample ``i`` of the stream is drawn from a generator seeded by ``i``: reproducible, and the
same on resume.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from llmarch.train import chat_data as cd

LEVELS = ("simple", "medium", "hard")


@dataclass
class Task:
    name: str
    rate: float
    templates: list[dict]  # [{"prompt": str, "response": str}] format strings over the row's fields
    rows: dict[str, dict[str, list]]  # split -> difficulty -> rows

    def render(self, row: dict, template: int) -> dict:
        """The row as a prompt/response pair through template ``template`` (or its own fields)."""
        if not self.templates:
            return {"prompt": row["prompt"], "response": row["response"]}
        t = self.templates[template % len(self.templates)]
        try:
            return {"prompt": t["prompt"].format(**row), "response": t["response"].format(**row)}
        except (KeyError, IndexError) as e:
            raise ValueError(f"task {self.name!r}: template field {e} is missing from a row") from None


def _load(path: Path) -> dict:
    import yaml

    try:
        obj = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"--task-mix {path}: not valid YAML/JSON ({e})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("tasks"), list) or not obj["tasks"]:
        raise ValueError(f"--task-mix {path}: expected a mapping with a non-empty 'tasks' list")
    return obj


class TaskMixture:
    """Named tasks with rates and templates, and an optional difficulty curriculum (a list of stage shares)."""

    def __init__(self, tasks: list[Task], curriculum: list[dict[str, float]] | None = None):
        self.tasks, self.curriculum = tasks, curriculum
        total = sum(t.rate for t in tasks)
        if total <= 0 or any(t.rate < 0 for t in tasks):
            raise ValueError("task_mix: rates must be >= 0 with a positive sum")
        for i, stage in enumerate(curriculum or []):
            if set(stage) - set(LEVELS) or sum(stage.values()) <= 0 or min(stage.values()) < 0:
                raise ValueError(f"task_mix: curriculum stage {i} must give shares >= 0 of {list(LEVELS)}")

    @classmethod
    def from_file(cls, path: str) -> "TaskMixture":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"--task-mix {path}: no such file")
        spec = _load(path)
        tasks = []
        for i, t in enumerate(spec["tasks"]):
            if not isinstance(t, dict) or "name" not in t or "data" not in t:
                raise ValueError(f"--task-mix {path}: task {i} needs 'name' and 'data'")
            where = t.get("where", {})
            rows = [(n, r) for n, r in cd.read_jsonl(path.parent / t["data"])
                    if all(r.get(k) == v for k, v in where.items())]
            if not rows:
                raise ValueError(f"--task-mix {path}: task {t['name']!r} has no rows in {t['data']} {where or ''}")
            train, val = cd.split_rows(rows, 0.1)
            pools = {}
            for split, part in (("train", train), ("val", val)):
                pools[split] = {lv: [r for _, r in part if r.get("difficulty", "medium") == lv] for lv in LEVELS}
            tasks.append(Task(t["name"], float(t.get("rate", 1.0)), list(t.get("templates", [])), pools))
        return cls(tasks, spec.get("curriculum"))

    def shares(self, progress: float) -> dict[str, float]:
        """Difficulty shares at ``progress`` in [0, 1] (uniform over levels without a curriculum)."""
        if not self.curriculum:
            return {lv: 1.0 for lv in LEVELS}
        stage = self.curriculum[min(int(progress * len(self.curriculum)), len(self.curriculum) - 1)]
        return {lv: float(stage.get(lv, 0.0)) for lv in LEVELS}

    def draw(self, i: int, progress: float, split: str, seed: int = 0) -> tuple[Task, str, dict]:
        """Sample ``i``: (task by rate, difficulty by the curriculum among the task's non-empty levels, row)."""
        rng = random.Random(seed * 1_000_003 + i)
        live = [t for t in self.tasks if any(t.rows[split].values())]
        if not live:
            raise ValueError(f"task_mix: no {split} rows in any task")
        task = rng.choices(live, weights=[t.rate for t in live])[0]
        shares = self.shares(progress)
        levels = [lv for lv in LEVELS if task.rows[split][lv]]
        weights = [shares[lv] for lv in levels]
        level = rng.choices(levels, weights=weights if sum(weights) > 0 else None)[0]
        pool = task.rows[split][level]
        row = pool[rng.randrange(len(pool))]
        return task, level, task.render(row, rng.randrange(max(1, len(task.templates))))

    def sources(self, objective, tc) -> tuple:
        total = tc.steps * tc.batch_size * tc.grad_accum
        return MixtureSource(self, objective, tc, "train", total), MixtureSource(self, objective, tc, "val", None)


class MixtureSource:
    """The mixture as a stream of SFT rows; training progress = sample index / samples of the run."""

    def __init__(self, mixture: TaskMixture, objective, tc, split: str, total: int | None):
        self.mixture, self.objective, self.split, self.total, self.seed = mixture, objective, split, total, tc.seed
        self.limit = tc.seq_len + objective.extra_tokens
        self.cuts = cd.Cuts()
        self.drawn: dict[str, int] = {}  # difficulty -> samples drawn (for logs and tests)

    def row(self, i: int) -> cd.Row:
        for attempt in range(100):  # a row whose answer does not fit is skipped (counted), the next drawn
            progress = 1.0 if self.total is None else min(1.0, i / self.total)
            task, level, pair = self.mixture.draw(i * 101 + attempt, progress, self.split, self.seed)
            try:
                ids, mask = self.objective.encode(pair)
            except ValueError as e:
                raise ValueError(f"task {task.name!r}: {e}") from None
            before = self.cuts.rows + self.cuts.dropped
            fitted = cd.fit(ids, mask, self.limit, self.cuts, f"{task.name} sample {i}")
            after = self.cuts.rows + self.cuts.dropped
            if after > before and after & (after - 1) == 0:  # report at 1, 2, 4, 8, ... cuts
                self.cuts.report(f"task mixture ({self.split})")
            if fitted is not None:
                self.drawn[level] = self.drawn.get(level, 0) + 1
                return cd.Row(fitted[0], fitted[1], [1] * len(fitted[0]))
        raise ValueError(f"task_mix: 100 draws in a row left no answer within --seq-len {self.limit - 1}; raise it")

    def batch(self, start: int, size: int) -> list:
        return [self.row(i) for i in range(start, start + size)]

    def take(self, start: int, size: int, length: int) -> list:
        return self.batch(start, size)


__all__ = ["TaskMixture", "MixtureSource", "LEVELS"]
