"""Multitask prompted fine-tuning: tasks drawn by their rates through their templates, the difficulty
curriculum's shares follow training progress, and a mixture trains on the loop."""
from __future__ import annotations

import collections
import json

import llmarch
from llmarch.train import train
from llmarch.train.taskmix import TaskMixture
from tests.posttrain_util import ft_settings, tiny_model_dir, write_jsonl

MIX = """
tasks:
  - name: add
    data: rows.jsonl
    where: {task: add}
    rate: 3
    templates:
      - {prompt: "Add {a} and {b}.", response: "{c}"}
      - {prompt: "What is {a} + {b}?", response: "{a} + {b} = {c}"}
  - name: echo
    data: rows.jsonl
    where: {task: echo}
    rate: 1
curriculum:
  - {simple: 0.7, medium: 0.3, hard: 0.0}
  - {simple: 0.2, medium: 0.6, hard: 0.2}
  - {simple: 0.1, medium: 0.3, hard: 0.6}
"""


def mixture_files(tmp_path):
    rows = []
    for i in range(60):
        level = ("simple", "medium", "hard")[i % 3]
        rows.append({"task": "add", "difficulty": level, "a": i, "b": 2 * i, "c": 3 * i})
        rows.append({"task": "echo", "difficulty": level, "prompt": f"Echo {i}", "response": f"{i}"})
    write_jsonl(tmp_path / "rows.jsonl", rows)
    (tmp_path / "mix.yaml").write_text(MIX)
    return tmp_path / "mix.yaml"


def test_rates_templates_and_curriculum(tmp_path):
    mix = TaskMixture.from_file(str(mixture_files(tmp_path)))
    for progress, shares in ((0.0, (0.7, 0.3, 0.0)), (0.5, (0.2, 0.6, 0.2)), (0.9, (0.1, 0.3, 0.6))):
        draws = [mix.draw(i, progress, "train") for i in range(3000)]
        levels = collections.Counter(level for _, level, _ in draws)
        for level, share in zip(("simple", "medium", "hard"), shares):
            assert abs(levels[level] / 3000 - share) < 0.04, (progress, level)
        tasks = collections.Counter(t.name for t, _, _ in draws)
        assert abs(tasks["add"] / 3000 - 0.75) < 0.04
    prompts = {p["prompt"].split(" ")[0] for t, _, p in draws if t.name == "add"}
    assert prompts == {"Add", "What"}  # both templates used
    t, _, pair = next(d for d in draws if d[0].name == "add" and d[2]["prompt"].startswith("What"))
    a, b = pair["prompt"][len("What is "):-1].split(" + ")
    assert pair["response"] == f"{a} + {b} = {int(a) + int(b)}"
    assert mix.draw(7, 0.3, "train") == mix.draw(7, 0.3, "train")  # reproducible


def test_task_mix_trains_on_the_loop(tmp_path):
    base = tiny_model_dir(tmp_path)
    mix = mixture_files(tmp_path)
    train(llmarch.ModelConfig.from_file(base / "config.json"),
          ft_settings(tmp_path / "run", base, None, objective="sft", task_mix=str(mix), steps=3))
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 3 and records[-1]["loss"] > 0
