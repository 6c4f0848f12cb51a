#!/usr/bin/env bash
# The newcomer's tour: after `make demo`, run every command shown in README.md and docs/*.md as written, and print
# PASS / FAIL / SKIP per command and a summary. Not run by CI (it trains; minutes on 2 cores).
#
#   examples/tour.sh                      # from the repository root, after `make demo`
#   TOUR_STEPS=3 TOUR_DIR=/tmp/tour TOUR_ONLY='README|training' examples/tour.sh
#
# The commands are read from the fenced code blocks of the docs (lines starting with `llmarch `, `python`,
# `PYTHONPATH=`), continuation lines joined, `# comments` dropped. Each document runs in its own fresh workspace
# (so README's runs/a and docs/training.md's runs/a do not collide), in the order written. Rewrites, all of them
# here and nothing else:
#   - `[...]` optional parts are dropped;
#   - `llmarch train` / `llmarch ablate` / `llmarch finetune`: `--steps N` becomes `--steps $TOUR_STEPS` (added when missing; twice that
#     with `--resume`, so the resumed run has steps left); without `--data`, `--max-data-mb $TOUR_MAX_DATA_MB` is
#     added (empty TOUR_MAX_DATA_MB = the whole standard library, as written);
#   - placeholders are files the workspace provides: PATH / notes.txt / held_out.txt / corpus/ / wiki/ (text), DIR
#     (an index directory name), path/to/hf_dir, hf_llama_dir, hf_model/ and hf/Llama-3.2-1B (a tiny Hugging Face llama saved
#     in transformers' layout), my.yaml (the llama-tiny config), my_study.yaml (benchmarks/studies/norm.yaml),
#     RUN_DIR (runs/a), runs/r0 (a run's tokenizer.json), pairs.jsonl / prompts.jsonl / chats.jsonl (three rows each), digit.png, runs/demo (the repository's `make demo` run, else a
#     short demo run made once), my_tasks/data.jsonl (two records of the documented form); a code block whose first
#     line is a comment naming a file (`# my_tasks/my_task.yaml`) is written to that file;
#   - `llmarch chat` reads "/quit" from stdin;
#   - benchmark and example scripts (python benchmarks/*, examples/retro_vs_base.py) are SKIP unless TOUR_SLOW=1;
#     `make ...` and `pip install` lines are SKIP (the tour runs after `make demo`), multi-node torchrun lines
#     (`--rdzv_endpoint HOST`) are SKIP.
set -u
REPO="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PY:-$REPO/.venv/bin/python}"
[ -x "$PY" ] || PY="$(command -v python3)"
STEPS="${TOUR_STEPS:-3}"
MAXMB="${TOUR_MAX_DATA_MB-2}"
TIMEOUT="${TOUR_TIMEOUT:-900}"
SLOW="${TOUR_SLOW:-0}"
ONLY="${TOUR_ONLY:-}"  # a regex: only the documents whose path matches (e.g. TOUR_ONLY=training)
TOUR="${TOUR_DIR:-$(mktemp -d /tmp/llmarch-tour.XXXXXX)}"
mkdir -p "$TOUR"
export PYTHONPATH="$REPO/src${PYTHONPATH:+:$PYTHONPATH}"
LOG="$TOUR/tour.log"
: >"$LOG"
echo "tour: workspace $TOUR, log $LOG, python $PY, steps $STEPS, max-data-mb ${MAXMB:-all}"

# --- the commands: "doc<TAB>command" lines ---------------------------------------------------------------------
COMMANDS="$("$PY" - "$REPO" <<'EOF'
import pathlib, re, sys
repo = pathlib.Path(sys.argv[1])
for doc in [repo / "README.md", *sorted((repo / "docs").glob("*.md"))]:
    lines, block, cmd = doc.read_text().splitlines(), False, ""
    for n, line in enumerate(lines):
        if line.lstrip().startswith("```"):
            block, cmd = not block, ""
            named = re.match(r"^#\s+([\w./-]+\.\w+)\s*$", lines[n + 1].strip()) if block and n + 1 < len(lines) else None
            if named:  # a file shown in full: "FILE<TAB>doc<TAB>path<TAB>line index of its content"
                print(f"FILE\t{doc.relative_to(repo)}\t{named.group(1)}\t{n + 2}")
            continue
        if not block:
            continue
        text = (cmd + " " + line.strip()) if cmd else line.strip()
        if text.endswith("\\"):
            cmd = text[:-1].rstrip()
            continue
        cmd = ""
        if re.match(r"^(llmarch\s|python3?\s|PYTHONPATH=|make\s|pip\s|torchrun\s)", text):
            text = re.sub(r"\s+#\s.*$", "", text).strip()  # a trailing comment
            print(f"CMD\t{doc.relative_to(repo)}\t{text}")
EOF
)"

# --- fixtures of one workspace ----------------------------------------------------------------------------------
fixtures() {
    local ws="$1"
    mkdir -p "$ws/corpus/sub" "$ws/runs/r0"
    ln -sfn "$REPO/src" "$ws/src"; ln -sfn "$REPO/benchmarks" "$ws/benchmarks"; ln -sfn "$REPO/examples" "$ws/examples"
    "$PY" - "$ws" <<'EOF'
import pathlib, sys, inspect, textwrap
import llmarch, torch
from llmarch.tokenizer import train_tokenizer
ws = pathlib.Path(sys.argv[1])
texts = [inspect.getsource(m) for m in (pathlib, textwrap, inspect)]
for i, t in enumerate(texts):  # .txt for `--data 'corpus/**/*.txt'`, .py for index build's default pattern
    for suffix in (".txt", ".py"):
        (ws / "corpus" / ("sub" if i else ".") / f"doc{i}{suffix}").write_text(t)
(ws / "notes.txt").write_text(texts[0])
(ws / "held_out.txt").write_text(texts[2])
(ws / "wiki").mkdir(exist_ok=True)
(ws / "wiki" / "a.txt").write_text(texts[1])
(ws / "my_tasks").mkdir(exist_ok=True)
(ws / "my_tasks" / "data.jsonl").write_text('{"q": "the quick brown", "choices": [" fox", " dog"], "answer": 0}\n'
                                            '{"q": "def f(x): return", "choices": [" x", " fox"], "answer": 0}\n')
(ws / "PATH").write_text(texts[1])
from PIL import Image, ImageDraw  # digit.png: an image for `generate --image`
img = Image.new("RGB", (64, 64), "white")
ImageDraw.Draw(img).text((26, 24), "7", fill="black")
img.save(ws / "digit.png")
import json  # the JSONL shapes of docs/posttraining.md: preference pairs, prompts, conversations
rows = [("Name a colour.", "Blue.", "Dog."), ("What is 2 + 2?", "4", "5"), ("Say hi.", "hi", "bye")]
(ws / "pairs.jsonl").write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n" for p, c, r in rows))
(ws / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p, "response": c}) + "\n" for p, c, _ in rows))
(ws / "chats.jsonl").write_text("".join(json.dumps({"messages": [{"role": "user", "content": p},
                                                             {"role": "assistant", "content": c}]}) + "\n"
                                        for p, c, _ in rows))
train_tokenizer(texts, 2048).save(ws / "runs/r0/tokenizer.json")
llmarch.preset("llama-tiny").to_file(ws / "my.yaml")
torch.manual_seed(0)
llmarch.hf.save(llmarch.build(llmarch.preset("llama-tiny")), ws / "hf_dir")
(ws / "hf_dir" / "tokenizer.json").write_bytes((ws / "runs/r0/tokenizer.json").read_bytes())  # V fits the model
EOF
    mkdir -p "$ws/path/to" "$ws/hf"; ln -sfn "$ws/hf_dir" "$ws/path/to/hf_dir"; ln -sfn "$ws/hf_dir" "$ws/hf_model"
    ln -sfn "$ws/hf_dir" "$ws/hf_llama_dir"
    ln -sfn "$ws/hf_dir" "$ws/hf/Llama-3.2-1B"
    if [ ! -d "$REPO/runs/demo" ] && [ ! -d "$TOUR/_demo" ]; then  # `make demo` was not run here: a short one
        (cd "$REPO" && "$PY" examples/demo.py --out "$TOUR/_demo" --steps "$STEPS" --max-data-mb "${MAXMB:-8}")
    fi
    ln -sfn "$([ -d "$REPO/runs/demo" ] && echo "$REPO/runs/demo" || echo "$TOUR/_demo")" "$ws/runs/demo"
    cp "$REPO/benchmarks/studies/norm.yaml" "$ws/my_study.yaml" 2>/dev/null || true
}

rewrite() {  # the command as run (see the header)
    local c="$1"
    c="$(sed -E 's/ \[[^]]*\]//g' <<<"$c")"
    c="${c//path\/to\/hf_dir/hf_dir}"
    c="$(sed -E 's/(--data|--out) DIR/\1 idx/g; s/--index DIR/--index idx/g; s/ RUN_DIR/ runs\/a/g' <<<"$c")"
    if [[ "$c" =~ ^llmarch\ (train|ablate|finetune)\  ]]; then
        local n="$STEPS"
        [[ "$c" == *"--resume"* ]] && n=$((2 * STEPS))
        if [[ "$c" == *"--steps "* ]]; then c="$(sed -E "s/--steps [0-9]+/--steps $n/" <<<"$c")"; else c="$c --steps $n"; fi
        [[ -n "$MAXMB" && ! "$c" =~ ^llmarch\ finetune && "$c" != *"--data "* && "$c" != *"--max-data-mb"* ]] && \
            c="$c --max-data-mb $MAXMB"
        [[ "$c" =~ ^llmarch\ train && "$c" != *"--no-progress"* ]] && c="$c --no-progress"
    fi
    printf '%s' "$c"
}

llmarch() { "$PY" -m llmarch "$@"; }
python() { "$PY" "$@"; }
python3() { "$PY" "$@"; }
export -f llmarch python python3 2>/dev/null; export PY

pass=0; fail=0; skip=0; failed=()
current=""
while IFS=$'\t' read -r kind doc cmd line; do
    [ -z "$doc" ] && continue
    [[ -n "$ONLY" && ! "$doc" =~ $ONLY ]] && continue
    ws="$TOUR/$(tr '/.' '__' <<<"$doc")"
    if [ "$doc" != "$current" ]; then
        current="$doc"; rm -rf "$ws"; mkdir -p "$ws"; fixtures "$ws" >>"$LOG" 2>&1
        echo "== $doc"
        while IFS=$'\t' read -r k d path start; do  # the files the document shows, wherever they are in it
            [ "$k" = FILE ] && [ "$d" = "$doc" ] || continue
            mkdir -p "$(dirname "$ws/$path")"
            awk -v start="$start" 'NR > start && /^```/ {exit} NR > start' "$REPO/$doc" >"$ws/$path"
        done <<<"$COMMANDS"
    fi
    [ "$kind" = FILE ] && continue
    if [[ "$cmd" =~ ^(make|pip)\  || "$cmd" == *"-m venv"* ]]; then
        echo "SKIP  $cmd   (setup: the tour runs after make demo)"; skip=$((skip + 1)); continue
    fi
    if [[ "$cmd" == *"--rdzv_endpoint HOST"* ]]; then
        echo "SKIP  $cmd   (several nodes)"; skip=$((skip + 1)); continue
    fi
    if [[ "$SLOW" != 1 && ( "$cmd" == *"benchmarks/"* || "$cmd" == *"examples/retro_vs_base"* ) ]]; then
        echo "SKIP  $cmd   (slow; TOUR_SLOW=1 runs it)"; skip=$((skip + 1)); continue
    fi
    run="$(rewrite "$cmd")"
    input=""
    [[ "$run" =~ ^llmarch\ chat ]] && input="/quit"
    { echo "### $doc: $run"; } >>"$LOG"
    start=$SECONDS
    (cd "$ws" && timeout "$TIMEOUT" bash -c "$run" <<<"$input") >>"$LOG" 2>&1
    rc=$?
    took=$((SECONDS - start))
    if [ $rc -eq 0 ]; then
        echo "PASS  $run   (${took}s)"; pass=$((pass + 1))
    else
        echo "FAIL  $run   (exit $rc, ${took}s; see $LOG)"; fail=$((fail + 1)); failed+=("$doc: $run")
        grep -av '^\s*$' "$LOG" | tail -n 2 | cut -c1-300 | sed 's/^/        /'
    fi
done <<<"$COMMANDS"

echo
echo "tour summary: $pass passed, $fail failed, $skip skipped (workspace $TOUR)"
for f in "${failed[@]+"${failed[@]}"}"; do echo "  FAIL $f"; done
[ "$fail" -eq 0 ]
