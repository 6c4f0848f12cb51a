"""An instruction set that exists without a download: tasks built deterministically from the Python standard
library's functions (write the function for this docstring, complete the body, write the docstring, name the
function, what does it return, list its parameters), with difficulty levels by length, a held-out split by file, and a programmatic
verifier per task usable as a reward (FLAN / BLOOMZ-style prompted tasks, Wei et al. 2022; Muennighoff et al. 2023).

A row: ``{"task", "difficulty", "split", "file", "name", "prompt", "response"}`` plus the fields the templates
read (``signature``, ``docstring``, ``code``, ``body``, ``returns``), so a task mixture can re-render it.
"""
from __future__ import annotations

import ast
import json
import os
import re
import textwrap
from pathlib import Path
from typing import Callable

from llmarch.registry import Registry

# difficulty by the function's length in lines (docstring included)
LEVELS = (("simple", 8), ("medium", 20), ("hard", 10**9))
TASKS: Registry["Task"] = Registry("instruction task")
VERIFIERS: Registry[Callable[[dict, str], float]] = Registry("verifier")


def difficulty(n_lines: int) -> str:
    return next(name for name, most in LEVELS if n_lines <= most)


def functions(path: Path, root: Path) -> list[dict]:
    """Fields of every function and method with a docstring in one source file (none when it does not parse)."""
    try:
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source)
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    out = []
    nodes = [n for top in tree.body for n in ([top] if not isinstance(top, ast.ClassDef) else top.body)]
    for node in nodes:  # module functions and methods with a docstring (not dunder methods)
        if not isinstance(node, ast.FunctionDef) or node.name.startswith("__") or not ast.get_docstring(node):
            continue
        code = ast.get_source_segment(source, node)
        if code is None or node.decorator_list:
            continue
        code = textwrap.dedent(" " * node.col_offset + code)  # methods: as if defined at module level
        first = node.body[0]
        lines = code.splitlines()
        header = "\n".join(lines[:node.body[0].lineno - node.lineno])  # the def line(s)
        body_lines = lines[first.end_lineno - node.lineno + 1:]  # after the docstring
        if not body_lines:
            continue
        returns = [n.value for n in ast.walk(node) if isinstance(n, ast.Return) and n.value is not None]
        a = node.args
        params = [x.arg for x in a.posonlyargs + a.args] + ([f"*{a.vararg.arg}"] if a.vararg else []) + \
            [x.arg for x in a.kwonlyargs] + ([f"**{a.kwarg.arg}"] if a.kwarg else [])
        docstring = ast.get_docstring(node)
        out.append({"file": path.relative_to(root).as_posix(), "name": node.name, "signature": header.strip(),
                    "docstring": docstring.strip().split("\n\n")[0].strip(), "code": code,
                    "body": "\n".join(body_lines), "doc_lines": "\n".join(lines[:first.end_lineno - node.lineno + 1]),
                    "returns": ast.unparse(returns[0]) if len(returns) == 1 else None, "params": ", ".join(params),
                    "difficulty": difficulty(len(lines))})
    return out


def strip_docstring(fn: dict) -> str:
    """The function's code without its docstring."""
    return fn["signature"] + "\n" + fn["body"]


class Task:
    """One prompted task: ``render(fn) -> (prompt, response)`` (None when the function does not suit it) and
    ``verify(row, answer) -> score in [0, 1]``."""

    name = "task"

    def render(self, fn: dict) -> tuple[str, str] | None:
        raise NotImplementedError

    def verify(self, row: dict, answer: str) -> float:
        raise NotImplementedError

    def follows(self, answer: str) -> bool:
        """Whether the answer has the requested form (instruction following, right or wrong)."""
        return bool(answer.strip())


def defines(code: str, name: str, min_statements: int = 1) -> bool:
    """``code`` parses and defines a function ``name`` with at least ``min_statements`` statements in its body."""
    try:
        tree = ast.parse(textwrap.dedent(code))
    except (SyntaxError, ValueError):
        return False
    return any(isinstance(n, ast.FunctionDef) and n.name == name and len(n.body) >= min_statements
               for n in ast.walk(tree))


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9]+", text.lower()))


@TASKS.register("implement")
class Implement(Task):
    """Write the function for this docstring. Verified: the answer parses and defines the asked name."""

    def render(self, fn):
        return (f"Write the Python function `{fn['name']}` for this docstring:\n{fn['docstring']}",
                strip_docstring(fn))

    def verify(self, row, answer):  # half credit: a definition of the asked name that does not parse
        if defines(answer, row["name"]):
            return 1.0
        return 0.5 * answer.lstrip().startswith(f"def {row['name']}(")

    def follows(self, answer):
        return answer.lstrip().startswith("def ")


@TASKS.register("complete")
class Complete(Task):
    """Complete the body of a function given its signature and docstring. Verified: the answer is indented, and
    prompt code + answer parses and defines the function with statements after its docstring."""

    def render(self, fn):
        return f"Complete the body of this function:\n{fn['doc_lines']}", fn["body"]

    def verify(self, row, answer):  # the body: statements after the docstring; half credit: indented, no parse
        if not self.follows(answer):
            return 0.0
        return 1.0 if defines(row["doc_lines"] + "\n" + answer, row["name"], 2) else 0.5

    def follows(self, answer):  # indented lines: a body, not a new definition
        lines = [x for x in answer.splitlines() if x.strip()]
        return bool(lines) and all(x[:1] in " \t" for x in lines)


@TASKS.register("docstring")
class Docstring(Task):
    """Write a one-line docstring for a function. Verified: word overlap (F1) with the original docstring."""

    def render(self, fn):
        return f"Write a one-line docstring for this function:\n{strip_docstring(fn)}", fn["docstring"].split("\n")[0]

    def follows(self, answer):
        return bool(answer.strip()) and "\n" not in answer.strip() and not answer.lstrip().startswith("def ")

    def verify(self, row, answer):
        ref, got = words(row["response"]), words(answer)
        common = len(ref & got)
        return 0.0 if not common else 2 * common / (len(ref) + len(got))


@TASKS.register("name")
class Name(Task):
    """Name the function from its body. Verified: the answer is the original name."""

    def render(self, fn):
        code = strip_docstring(fn).replace(f"def {fn['name']}(", "def ___(", 1)
        return f"What is a good name for this function? Answer with the name only.\n{code}", fn["name"]

    def verify(self, row, answer):  # half credit: a single identifier, another name
        return 1.0 if answer.strip().strip("`") == row["name"] else 0.5 * self.follows(answer)

    def follows(self, answer):
        return answer.strip().strip("`").isidentifier()


@TASKS.register("returns")
class Returns(Task):
    """What does this function return (functions with one return statement). Verified: the answer parses to
    the same expression."""

    def render(self, fn):
        if fn["returns"] is None:
            return None
        return f"What does this function return? Answer with the expression.\n{strip_docstring(fn)}", fn["returns"]

    def verify(self, row, answer):
        if not self.follows(answer):
            return 0.0  # half credit: an expression, another one
        same = ast.dump(ast.parse(answer.strip(), mode="eval")) == ast.dump(ast.parse(row["response"], mode="eval"))
        return 1.0 if same else 0.5

    def follows(self, answer):
        try:
            ast.parse(answer.strip(), mode="eval")
            return "\n" not in answer.strip()
        except (SyntaxError, ValueError):
            return False


@TASKS.register("arguments")
class Arguments(Task):
    """List the function's parameters in order (``*args`` / ``**kwargs`` marked). Verified: the same list."""

    def render(self, fn):
        if not fn["params"]:
            return None
        return f"List the parameters of this function, separated by commas.\n{strip_docstring(fn)}", fn["params"]

    def follows(self, answer):
        return all(p.strip().lstrip("*").isidentifier() for p in answer.split(",")) and "\n" not in answer.strip()

    def verify(self, row, answer):  # half credit: a list of names, another one
        if not self.follows(answer):
            return 0.0
        return 1.0 if [p.strip() for p in answer.split(",")] == row["response"].split(", ") else 0.5


def is_held_out(file: str, val_fraction: float) -> bool:
    from llmarch.data import is_validation

    return is_validation(file, val_fraction)


def build_instructions(files: list[Path] | None = None, root: Path | None = None, tasks=None,
                       val_fraction: float = 0.1, max_lines: int | None = None) -> list[dict]:
    """Rows of every task for every suitable function of ``files`` (default: the standard library), in a fixed
    order; ``split`` is "test" for files held out by a hash of their path, else "train"."""
    if files is None:
        from llmarch.data import stdlib_files

        root, files = stdlib_files()
    rows = []
    for path in files:
        for fn in functions(path, root or path.parent):
            if max_lines is not None and len(fn["code"].splitlines()) > max_lines:
                continue
            split = "test" if is_held_out(fn["file"], val_fraction) else "train"
            for task in tasks or TASKS.names():
                rendered = TASKS[task]().render(fn)
                if rendered is not None:
                    rows.append({"task": task, "difficulty": fn["difficulty"], "split": split, "file": fn["file"],
                                 "name": fn["name"], "prompt": rendered[0], "response": rendered[1],
                                 **{k: fn[k] for k in ("signature", "docstring", "code", "body", "doc_lines",
                                                       "returns", "params")}})
    return rows


def write_jsonl(rows: list[dict], path: str | os.PathLike) -> Path:
    """Write rows as JSONL atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)
    return path


@VERIFIERS.register("stdlib")
def verify(row: dict, answer: str) -> float:
    """Score of ``answer`` to an instruction row, by its task's verifier: 1 = correct, 0.5 = the requested form
    but wrong (a reward for rejection sampling), 0 = neither; word-overlap F1 for docstrings."""
    return task_of(row).verify(row, answer)


def follows(row: dict, answer: str) -> bool:
    """Whether ``answer`` has the form the row's task asks for (instruction following)."""
    return task_of(row).follows(answer)


def task_of(row: dict) -> "Task":
    """The task that wrote an instruction row (its ``task`` field), or a ValueError saying what the verifier needs."""
    name = row.get("task") if isinstance(row, dict) else None
    if name not in TASKS:
        raise ValueError(f"verifier stdlib: each row needs a 'task' field naming one of {sorted(TASKS)} (rows of "
                         f"`llmarch data instructions`), got {name!r}; score other rows with --reward-model")
    return TASKS[name]()


__all__ = ["TASKS", "VERIFIERS", "Task", "build_instructions", "write_jsonl", "verify", "follows", "functions",
           "defines", "difficulty"]
