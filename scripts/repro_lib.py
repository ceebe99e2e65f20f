"""repro_lib.py: the machinery shared by the paper-table reproductions (scripts/repro_*.py).

Not run directly. A reproduction script describes its table as *stages* and *rows*:

  - a Stage is one program run that makes a directory under the runs root: a training run of
    ./train_moe (or ./train_moe_gpu), one ./upcycle call, or an evaluation without training
    (./train_moe --ensemble: one eval record in metrics.jsonl). Stages are named; a stage with the
    same name and the same command is shared by every row and every table that uses it (the
    dense base is trained once for all three tables).
  - a Row is one line of the table: the stages it owns (their wall time is its wall time) and
    the training stage whose metrics.jsonl gives its numbers.

Runner.run() runs the stages in order and never redoes work: a finished training stage (its
final checkpoint step_<steps> is named by `latest` and metrics.jsonl has the final eval) or
upcycle stage (config.json + model.safetensors written; upcycle writes atomically) is skipped;
an unfinished training stage continues from its latest checkpoint with --resume, which the
trainer makes bit-identical to an uninterrupted run. Each stage's command, accumulated wall
time, device and commit are kept in <runs>/_meta/<stage>.json; a stage whose recorded command
differs from the current one is an error (delete it or use another --runs directory), so a
changed preset never mixes with old runs silently.

Before the first stage, run() prints a wall-time estimate of the stages left from the preset's
rate (PRESETS[...]["step_s"], a measured or stated seconds per dense step; Stage.cost for stages
dearer than the preset's MoE step); after each stage it prints an ETA from this run's own speed.

report() writes the table (table.md), results.json, loss_curves.png and expert_load.png into
the results directory, each to a temporary name first and then renamed. A table may add an
analysis (notes under the table, an "analysis" object in results.json: the scaling-law fits)
and its own plots instead of the two standard ones (Table.analysis, Table.plots).
"""
from __future__ import annotations

import argparse
import datetime
import fcntl
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ReproError(Exception):
    """A problem the user can fix; printed as one 'error:' line without a traceback."""


# ---------------------------------------------------------------------------------------------
# presets: the recipe shared by every row of every table

# tiny: the CPU preset (data/tiny, vocab 2048; model "tiny" = d 64, L 2, 4 heads, F 256:
# 0.39M dense parameters, 1.08M as 8 experts). Measured on 2 cores of this machine: ~9k tok/s
# dense, ~6k tok/s as an 8-expert top-2 MoE, so one 200-step MoE row (102k tokens) is ~20 s.
# small: the H100 preset; its budget arithmetic is in each script's docstring and in
# docs/REPRODUCTIONS.md. smoke: tiny with a few steps, for scripts/test_scripts.sh.
PRESETS = {
    "tiny": dict(
        data="data/tiny", model="tiny", batch=8, seq=64, grad_accum=1,
        lr=3e-3, warmup_dense=20, warmup_moe=20,
        dense_steps=400,        # 205k tokens: ~0.6 epoch of the 350k-token tiny train split
        moe_steps=200,          # 102k tokens: half the dense budget, as in Drop-Upcycling
        branch_steps=100,       # BTX: each domain branch
        p1_steps=100, p2_steps=150,   # expert upcycling: 4-expert phase, then the expanded phase
        eval_every=25, save_every=50, eval_batches=8, log_every=50,
        trainer="auto", results_sub="tiny",
        # the wall-time estimate printed before a run starts (Runner.estimate): seconds per dense
        # step with this preset's evals and checkpoints, per trainer; an MoE step costs moe_cost
        # dense steps (unless its Stage says otherwise), a stage stage_s more. Measured
        # 2026-12-02 on this machine, CPU trainer, 1 thread (the 400-step dense base took 13.3 s,
        # an 8-expert top-2 MoE 400 steps 13.5 s, G = 8 granular 19.2 s): 2 threads are faster
        # when the machine is idle.
        step_s={"cpu": 0.033}, moe_cost=1.1, stage_s=0.3, rate_source="measured, CPU trainer, 1 thread"),
    "small": dict(
        data="data/full", model="d512", batch=32, seq=1024, grad_accum=1,   # 32768 tokens/step
        lr=1e-3, warmup_dense=100, warmup_moe=50,
        dense_steps=1200,       # 39.3M tokens (~1.8 epochs of the 21.3M-token train split)
        moe_steps=600,          # 19.7M tokens: half the dense budget
        branch_steps=200,       # BTX: 6.6M tokens per domain branch
        p1_steps=300, p2_steps=300,   # expert upcycling: 9.8M + 9.8M tokens
        eval_every=100, save_every=100, eval_batches=16, log_every=25,
        trainer="gpu", results_sub="",
        # not measured (the GPU trainer has not run on a GPU yet): 32768 tokens x 0.43 GFLOP per
        # dense token at an assumed 50 TFLOP/s sustained; an 8x top-2 MoE token is ~0.65 GFLOP
        step_s={"gpu": 0.28}, moe_cost=1.5, stage_s=20.0, rate_source="assumed 50 TFLOP/s, not measured"),
}
# tiny_long: tiny with a 5x longer MoE phase (1000 steps = 512k tokens, 2.5x the dense base;
# the tiny train split is 350k tokens, so ~1.5 epochs), to see whether the end-of-run order
# moves towards the paper's ("DU 0.5 lowest if the MoE phase is long enough"). CPU, ~10 minutes
# for Table 1 on 2 cores.
PRESETS["tiny_long"] = dict(PRESETS["tiny"], moe_steps=1000, p2_steps=750, eval_every=100, save_every=250,
                            log_every=250, results_sub="tiny_long")
# gpu_short: every table in at most 4 minutes on one H200, so that any GPU session's prepared
# script (dev/gpu_session.sh, part repro) can also produce a small-scale table: data/full
# (carried as data/pack/corpus-full.tar.xz), model "small" (d 256, L 4, 8 heads, F 1024;
# 8.4M dense parameters with the 16384-token LM head), 16 x 512 = 8192 tokens per step.
# Table 1: 1200 dense steps (9.8M tokens, 0.46 epoch), MoE rows 600 steps (4.9M tokens), BTX
# branches 3 x 200. Budget (predicted; the GPU trainer's speed at this size is not measured):
# ~53 MFLOP/token dense, ~72 MFLOP/token as 8 x top-2, so Table 1 is 3.1 PFLOP (31 s at 100
# TFLOP/s sustained) in 6000 optimizer steps (30 s at a floor of 5 ms per step for the ~300
# kernel launches of a small MoE step), plus ~13 process starts and 60 evaluations: about 2
# minutes predicted, 4 minutes if the GPU runs at half that. Each stage prints its tok/s and
# the runner its ETA: the first GPU run checks the prediction (docs/REPRODUCTIONS.md).
PRESETS["gpu_short"] = dict(
    data="data/full", model="small", batch=16, seq=512, grad_accum=1,
    lr=2e-3, warmup_dense=100, warmup_moe=50,
    dense_steps=1200, moe_steps=600, branch_steps=200, p1_steps=300, p2_steps=300,
    eval_every=100, save_every=600, eval_batches=8, log_every=50,   # few checkpoints: each MoE one is ~0.4 GB
    trainer="gpu", results_sub="gpu_short",
    # the estimate before the start: the prediction above (~2 minutes for Table 1's ~6000 steps and
    # ~13 stages), not a measurement
    step_s={"gpu": 0.015}, moe_cost=1.4, stage_s=3.0, rate_source="predicted for one H200, not measured")
PRESETS["smoke"] = dict(PRESETS["tiny"], dense_steps=20, moe_steps=10, branch_steps=5, p1_steps=5, p2_steps=10,
                        warmup_dense=2, warmup_moe=2, eval_every=5, save_every=5, eval_batches=1, log_every=5,
                        results_sub="smoke")

MOE_LOSSES = ["--aux-loss", "pooled", "--aux-coef", "0.02", "--z-coef", "0"]   # docs/METHODS.md 3
# options that only shape a new model; a resumed run takes its shape from the checkpoint
SHAPE_OPTS = {"--model": 1, "--init": 1, "--init-optimizer": 0, "--experts": 1, "--topk": 1, "--expert-width": 1,
              "--routing": 1, "--tie": 0, "--vocab": 1, "--init-std": 1}


def train_args(cfg: dict, steps: int, warmup: int, out: str, seed: int | None = None) -> list[str]:
    """The trainer options every training stage shares (schedule: linear warmup + cosine to lr/10)."""
    return ["--data", cfg["data"], "--batch", str(cfg["batch"]), "--seq", str(cfg["seq"]),
            "--grad-accum", str(cfg["grad_accum"]), "--steps", str(steps), "--lr", str(cfg["lr"]),
            "--lr-schedule", "cosine", "--warmup", str(warmup), "--eval-every", str(cfg["eval_every"]),
            "--eval-batches", str(cfg["eval_batches"]), "--save-every", str(cfg["save_every"]),
            "--log-every", str(cfg["log_every"]), "--seed", str(cfg["seed"] if seed is None else seed),
            "--sample-tokens", "0", "--out", out]


# ---------------------------------------------------------------------------------------------
# stages and rows


@dataclass
class Stage:
    name: str                      # directory name under the runs root
    kind: str                      # "train", "upcycle" or "eval" (./train_moe --ensemble)
    args: list                     # program arguments; paths are relative to the repository root
    steps: int = 0                 # train: total optimizer steps
    moe: bool = False              # train: an MoE (costs the preset's moe_cost dense steps: estimates only)
    needs: list = field(default_factory=list)   # stages that must be finished first
    cpu_only: bool = False         # train: always ./train_moe (an option the GPU trainer lacks, e.g. dpsl)
    cost: float = 0.0              # train: cost of one step in dense steps, if not the default (estimates only)


@dataclass
class Row:
    key: str                       # short id (used with --rows)
    label: str                     # the method column of the table
    stages: list                   # the stages this row owns (its wall time), in order
    run: str                       # the training stage whose metrics are this row's numbers
    moe: bool = True
    before: list = field(default_factory=list)  # training stages whose tokens precede `run` (x offset of the plot)
    extra: list = field(default_factory=list)   # training stages besides `run` whose tokens the row also spent


@dataclass
class Table:
    key: str                       # docs/results/<key>/
    title: str
    stages: list                   # every Stage, in an order that satisfies `needs`
    rows: list                     # Rows, in table order
    notes: list = field(default_factory=list)   # lines printed under the table
    extra_columns: object = None   # optional fn(results) -> (headers, {row key: [cells]}, notes)
    # optional fn(results) -> {"notes": [lines under the table], "data": JSON for results.json's "analysis"}
    analysis: object = None
    # optional fn(results, analysis, out_dir, subtitle) -> [PNG file names it wrote]; instead of the two
    # standard plots when standard_plots is False
    plots: object = None
    standard_plots: bool = True


def run_dir(root: str, name: str) -> str:
    return os.path.join(root, name)


def final_ckpt(root: str, stage: Stage) -> str:
    return os.path.join(root, stage.name, f"step_{stage.steps:06d}")


DOMAINS = ["en", "code", "de"]   # the corpus's domains (dev/data/README.md)


def train_stage(root: str, name: str, cfg: dict, head: list, steps: int, warmup: int, moe: bool,
                needs: list | None = None, seed: int | None = None, tail: list | None = None,
                losses: list | None = None) -> Stage:
    """A training stage: `head` says where the model comes from (--model ... or --init ...).
    An MoE stage trains with MOE_LOSSES, or with `losses` in their place."""
    moe_losses = (MOE_LOSSES if losses is None else list(losses)) if moe else []
    return Stage(name, "train", list(head) + train_args(cfg, steps, warmup, os.path.join(root, name), seed) +
                 moe_losses + list(tail or []), steps, moe, list(needs or []))


def upcycle_stage(root: str, name: str, cfg: dict, args: list, needs: list) -> Stage:
    return Stage(name, "upcycle", list(args) + ["--seed", str(cfg["seed"]), "--out", os.path.join(root, name)],
                 needs=list(needs))


def ensemble_stage(root: str, name: str, cfg: dict, members: list, needs: list) -> Stage:
    """The uniform mixture of `members`' next-token distributions evaluated on the validation
    batches every training stage evaluates on (docs/METHODS.md 2.10); no training, CPU trainer."""
    return Stage(name, "eval", ["--ensemble", ",".join(members), "--data", cfg["data"], "--batch", str(cfg["batch"]),
                                "--seq", str(cfg["seq"]), "--eval-batches", str(cfg["eval_batches"]), "--seed",
                                str(cfg["seed"]), "--out", os.path.join(root, name)], needs=list(needs), cpu_only=True)


def dense_base(root: str, cfg: dict) -> tuple[Stage, Row, str]:
    """The dense model every table starts from (the same stage, so trained once per runs root).
    Returns the stage, its row and its final checkpoint directory."""
    s = train_stage(root, "dense_base", cfg, ["--model", cfg["model"]], cfg["dense_steps"], cfg["warmup_dense"], False)
    return s, Row("dense", "Dense (base)", ["dense_base"], "dense_base", moe=False), final_ckpt(root, s)


def dense_continued(root: str, cfg: dict, base: str) -> tuple[Stage, Row]:
    """The dense base trained on for the MoE phase's budget with the MoE rows' recipe (fresh optimizer)."""
    s = train_stage(root, "dense_continued", cfg, ["--init", base], cfg["moe_steps"], cfg["warmup_moe"], False,
                    ["dense_base"])
    return s, Row("dense_cont", "Dense (continued)", [s.name], s.name, moe=False, before=["dense_base"])


# ---------------------------------------------------------------------------------------------
# reading runs


def read_metrics(path: str) -> list[dict]:
    recs = []
    if not os.path.exists(path):
        return recs
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    recs.append(json.loads(line))
                except json.JSONDecodeError:   # a line cut by an interruption; the trainer truncates it on resume
                    pass
    return recs


def evals_of(recs: list[dict]) -> list[dict]:
    return [r for r in recs if "val" in r]


def latest_step(d: str) -> int | None:
    p = os.path.join(d, "latest")
    if not os.path.exists(p):
        return None
    name = open(p).read().strip()
    m = re.fullmatch(r"step_(\d+)", name)
    if not m or not os.path.exists(os.path.join(d, name, "trainer_state.json")):
        return None
    return int(m.group(1))


def train_finished(d: str, steps: int) -> bool:
    if latest_step(d) != steps:
        return False
    ev = evals_of(read_metrics(os.path.join(d, "metrics.jsonl")))
    return bool(ev) and ev[-1]["step"] == steps


def eval_finished(d: str) -> bool:
    return bool(evals_of(read_metrics(os.path.join(d, "metrics.jsonl"))))


def stage_finished(d: str, stage: Stage) -> bool:
    if stage.kind == "train":
        return train_finished(d, stage.steps)
    return eval_finished(d) if stage.kind == "eval" else upcycle_finished(d)


def upcycle_finished(d: str) -> bool:
    return all(os.path.exists(os.path.join(d, f)) for f in ("config.json", "model.safetensors"))


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def fmt_duration(s: float) -> str:
    s = int(round(s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def fmt_tokens(n: float) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.2f}B"
    if n >= 1e6:
        return f"{n / 1e6:.1f}M"
    if n >= 1e3:
        return f"{n / 1e3:.0f}k"
    return str(int(n))


def write_atomic(path: str, text: str) -> None:
    tmp = os.path.join(os.path.dirname(path) or ".", "." + os.path.basename(path) + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# the runner


def gpu_available() -> bool:
    if not shutil.which("nvidia-smi"):
        return False
    try:
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def device_name(trainer: str, threads: int) -> str:
    if trainer == "gpu":
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                 text=True, timeout=30).stdout.strip().splitlines()
            return out[0] if out else "GPU"
        except (OSError, subprocess.TimeoutExpired):
            return "GPU"
    model = "CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {threads} threads" if threads else model


def make(targets: list[str], quiet: bool = True) -> bool:
    r = subprocess.run(["make", "--no-print-directory"] + targets, cwd=ROOT, capture_output=quiet, text=True)
    if r.returncode != 0 and quiet:
        sys.stderr.write((r.stdout or "") + (r.stderr or ""))
    return r.returncode == 0


class Runner:
    def __init__(self, table: Table, root: str, trainer: str, threads: int, prefix: str, cfg: dict | None = None):
        self.t, self.root, self.trainer, self.threads, self.prefix = table, root, trainer, threads, prefix
        self.cfg = cfg or {}
        self.by_name = {s.name: s for s in table.stages}
        self.meta_dir = os.path.join(root, "_meta")
        self.log_dir = os.path.join(root, "_logs")
        self.device = device_name(trainer, threads if trainer == "cpu" else 0)
        self.ran = []        # stages this invocation ran (fully or resumed)
        self.skipped = []    # stages found finished

    # -- bookkeeping --
    def binary(self, stage: Stage) -> str:
        if stage.kind == "upcycle":
            return "./upcycle"
        return "./train_moe_gpu" if self.trainer == "gpu" and not stage.cpu_only else "./train_moe"

    def on_cpu(self, stage: Stage) -> bool:
        return self.binary(stage) != "./train_moe_gpu"

    def command(self, stage: Stage) -> list[str]:
        cmd = [self.binary(stage)] + list(stage.args)
        if self.on_cpu(stage):
            cmd += ["--threads", str(self.threads)]
        return cmd

    @staticmethod
    def comparable(cmd: list[str]) -> list[str]:
        """The command without --threads (results do not depend on the thread count)."""
        out, i = [], 0
        while i < len(cmd):
            if cmd[i] == "--threads":
                i += 2
                continue
            out.append(cmd[i])
            i += 1
        return out

    def meta_path(self, name: str) -> str:
        return os.path.join(self.meta_dir, name + ".json")

    def meta(self, name: str) -> dict:
        p = self.meta_path(name)
        return json.load(open(p)) if os.path.exists(p) else {}

    def save_meta(self, name: str, m: dict) -> None:
        os.makedirs(self.meta_dir, exist_ok=True)
        write_atomic(self.meta_path(name), json.dumps(m, indent=1) + "\n")

    def finished(self, stage: Stage) -> bool:
        return stage_finished(run_dir(self.root, stage.name), stage)

    def check_command(self, stage: Stage) -> None:
        m = self.meta(stage.name)
        if m and self.comparable(m["cmd"]) != self.comparable(self.command(stage)):
            raise ReproError(
                f"{run_dir(self.root, stage.name)} was made by another command:\n  {' '.join(m['cmd'])}\n"
                f"this run would use:\n  {' '.join(self.command(stage))}\n"
                f"delete that directory and {self.meta_path(stage.name)}, or give another --runs directory")

    # -- running --
    def run_stage(self, stage: Stage) -> str:
        """Runs (or resumes) one stage; returns 'ran' or 'resumed'."""
        d = run_dir(self.root, stage.name)
        for n in stage.needs:
            if not self.finished(self.by_name[n]):
                raise ReproError(f"stage {stage.name} needs {n}, which is not finished")
        cmd = self.command(stage)
        how = "ran"
        if stage.kind == "train":
            step = latest_step(d)
            if step is not None:   # resume: the shape comes from the checkpoint
                how = "resumed"
                rest, i = [], 0
                while i < len(cmd):
                    if cmd[i] in SHAPE_OPTS:
                        i += 1 + SHAPE_OPTS[cmd[i]]
                        continue
                    rest.append(cmd[i])
                    i += 1
                run_cmd = rest + ["--resume", d]
            else:
                if os.path.isdir(d):   # started but no checkpoint yet: start over
                    shutil.rmtree(d)
                run_cmd = cmd
        else:                          # upcycle or eval: all or nothing
            if os.path.isdir(d):       # not finished (checked by the caller): start over
                shutil.rmtree(d)
            run_cmd = cmd
        m = self.meta(stage.name) or {"cmd": cmd, "wall_s": 0.0}
        device = self.device if self.on_cpu(stage) == (self.trainer == "cpu") else device_name("cpu", self.threads)
        m.update(cmd=cmd, device=device, commit=git_commit())
        self.save_meta(stage.name, m)
        os.makedirs(self.log_dir, exist_ok=True)
        log_path = os.path.join(self.log_dir, stage.name + ".log")
        t0 = time.time()
        rc = None
        with open(log_path, "a") as log:
            log.write(f"\n$ {' '.join(run_cmd)}\n")
            log.flush()
            # line-buffered stdout in the child (the trainer's stdio buffers fully into a pipe)
            unbuf = ["stdbuf", "-oL"] if shutil.which("stdbuf") else []
            # OpenMP threads sleep instead of spinning while they wait: on a busy 2-core machine spinning
            # threads make the CPU trainer ~6x slower (measured); results do not depend on it
            env = dict(os.environ)
            env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
            proc = subprocess.Popen(unbuf + run_cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    bufsize=1)
            tail = []
            try:
                for line in proc.stdout:
                    log.write(line)
                    tail = (tail + [line.rstrip()])[-15:]
                    if line.startswith(("step ", "eval step", "error", "warning", "wrote", "run:")):
                        print(f"{self.prefix}   {stage.name}: {line.rstrip()}", flush=True)
                rc = proc.wait()
            except KeyboardInterrupt:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                raise
            finally:
                m["wall_s"] = m.get("wall_s", 0.0) + (time.time() - t0)
                self.save_meta(stage.name, m)
        if rc != 0:
            raise ReproError(f"{stage.name} failed (exit code {rc}): {' '.join(run_cmd)}\n  "
                             + "\n  ".join(tail[-8:]) + f"\nfull log: {log_path}")
        if not self.finished(stage):
            raise ReproError(f"{stage.name}: the program exited normally but its output is incomplete ({d}); "
                             f"see {log_path}")
        m["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
        self.save_meta(stage.name, m)
        return how

    def weight(self, s: Stage) -> float:
        """A stage's cost in dense steps (upcycle and eval stages: a second or so, like a few steps)."""
        if s.kind != "train":   # upcycle, eval
            return 5.0
        return s.steps * (s.cost or (self.cfg.get("moe_cost", 1.5) if s.moe else 1.0))

    def estimate(self, stages: list) -> str:
        """The wall time of the unfinished stages from the preset's rate, said before the run starts."""
        todo = [s for s in stages if not self.finished(s)]
        rate = self.cfg.get("step_s", {}).get(self.trainer)
        if not todo:
            return "nothing to run"
        # an unfinished training stage resumes from its latest checkpoint: only its remaining steps count
        w = 0.0
        for s in todo:
            left = s.steps - (latest_step(run_dir(self.root, s.name)) or 0) if s.kind == "train" else 0
            w += self.weight(s) * (left / s.steps if s.kind == "train" and s.steps else 1.0)
        head = f"{len(todo)} of {len(stages)} stages to run"
        if rate is None:
            return (f"{head}; no rate for the {self.trainer} trainer in this preset, so no estimate before the first "
                    f"stage (the ETA printed after each stage uses this run's own speed)")
        sec = w * rate + len(todo) * self.cfg.get("stage_s", 0.0)
        return (f"{head}, about {fmt_duration(sec)} ({w:.0f} dense-step equivalents x {rate} s + "
                f"{self.cfg.get('stage_s', 0.0)} s per stage; rate {self.cfg.get('rate_source', '?')}; a busy "
                f"machine is slower)")

    def rows_done(self) -> int:
        def done(name, seen=()):
            s = self.by_name[name]
            return self.finished(s) and all(done(n) for n in s.needs)
        return sum(all(done(n) for n in r.stages + [r.run]) for r in self.t.rows)

    def run(self, only: set | None = None) -> None:
        stages = self.t.stages
        if only:   # the rows asked for, and everything they need
            want, todo = set(), [n for r in self.t.rows if r.key in only for n in r.stages + [r.run]]
            while todo:
                n = todo.pop()
                if n not in want:
                    want.add(n)
                    todo += self.by_name[n].needs
            stages = [s for s in stages if s.name in want]
        print(f"{self.prefix} wall time estimate: {self.estimate(stages)}", flush=True)
        total_w = sum(self.weight(s) for s in stages)
        done_w, work_w, work_s = 0.0, 0.0, 0.0
        n = len(stages)
        for i, s in enumerate(stages):
            self.check_command(s)
            if self.finished(s):
                self.skipped.append(s.name)
                done_w += self.weight(s)
                print(f"{self.prefix} [{i + 1}/{n}] {s.name}: finished earlier, skipped", flush=True)
                continue
            print(f"{self.prefix} [{i + 1}/{n}] {s.name}: {' '.join(self.command(s))}", flush=True)
            t0 = time.time()
            how = self.run_stage(s)
            dt = time.time() - t0
            self.ran.append((s.name, how))
            done_w += self.weight(s)
            work_w += self.weight(s)
            work_s += dt
            left = total_w - done_w
            eta = work_s / work_w * left if work_w > 0 else 0.0
            print(f"{self.prefix} [{i + 1}/{n}] {s.name}: {how} in {fmt_duration(dt)} | rows done "
                  f"{self.rows_done()}/{len(self.t.rows)} | stages {i + 1}/{n} | ETA {fmt_duration(eta)}", flush=True)


# ---------------------------------------------------------------------------------------------
# the report: table, results.json, plots


def collect(table: Table, root: str, runner: Runner) -> list[dict]:
    """One dict per row that has a finished run: its numbers from metrics.jsonl and _meta."""
    out = []
    by = {s.name: s for s in table.stages}
    for r in table.rows:
        s = by[r.run]
        d = run_dir(root, s.name)
        if not stage_finished(d, s):
            continue
        ev = evals_of(read_metrics(os.path.join(d, "metrics.jsonl")))
        first, last = ev[0], ev[-1]
        offset = sum(evals_of(read_metrics(os.path.join(run_dir(root, b), "metrics.jsonl")))[-1]["tokens"]
                     for b in r.before)
        extra = sum(evals_of(read_metrics(os.path.join(run_dir(root, b), "metrics.jsonl")))[-1]["tokens"]
                    for b in r.extra)
        metas = [runner.meta(n) for n in r.stages]
        m_run = runner.meta(r.run)
        out.append(dict(
            key=r.key, label=r.label, moe=r.moe, run=d,
            step0=first["val_loss"] if first["step"] == 0 else None,
            step0_val=first["val"] if first["step"] == 0 else None,
            val=last["val"], val_loss=last["val_loss"], tokens=last["tokens"], extra_tokens=extra,
            offset_tokens=offset,
            curve=[(e["tokens"] + offset, e["val_loss"]) for e in ev],
            expert_load=last.get("expert_load"),
            wall_s=sum(m.get("wall_s", 0.0) for m in metas),
            device=m_run.get("device", "?"), commit=m_run.get("commit", "?"),
            date=(m_run.get("finished") or "")[:10]))
    return out


def markdown_table(table: Table, res: list[dict], preset: str, cfg: dict, analysis_notes: list | None = None) -> str:
    domains = sorted({d for r in res for d in r["val"]})
    extra_h, extra_cells, extra_notes = (table.extra_columns(res) if table.extra_columns else ([], {}, []))
    head = (["method", "step-0 val loss"] + [f"val {d}" for d in domains] + ["val mean"] + extra_h +
            ["tokens", "wall time", "device", "commit"])
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 4) +
                                                             ["---:", "---", "---"]) + "|"]
    best = min((r["val_loss"] for r in res if r["moe"]), default=None)
    for r in res:
        vm = f"{r['val_loss']:.4f}"
        if best is not None and r["moe"] and r["val_loss"] == best:
            vm = f"**{vm}**"
        tok = fmt_tokens(r["tokens"]) + (f" (+{fmt_tokens(r['extra_tokens'])})" if r["extra_tokens"] else "")
        cells = ([r["label"], "-" if r["step0"] is None else f"{r['step0']:.4f}"] +
                 [f"{r['val'][d]:.4f}" if d in r["val"] else "-" for d in domains] + [vm] +
                 extra_cells.get(r["key"], [""] * len(extra_h)) +
                 [tok, fmt_duration(r["wall_s"]), r["device"], r["commit"]])
        lines.append("| " + " | ".join(cells) + " |")
    when = max((r["date"] for r in res), default="")
    notes = [f"Preset `{preset}`: data `{cfg['data']}`, model `{cfg['model']}`, {cfg['batch']} x {cfg['seq']} x "
             f"{cfg['grad_accum']} tokens per step, peak LR {cfg['lr']} (linear warmup, cosine to LR/10), "
             f"seed {cfg['seed']}; runs finished {when}."]
    notes += table.notes + extra_notes + list(analysis_notes or [])
    notes.append("Val losses: mean cross-entropy (nats/token) on each domain's validation split at the final step; "
                 "val mean: their mean. Step-0: the same at step 0 of the row's own run (after its init). Bold: lowest "
                 "MoE val mean. Tokens: the row's own run (+ tokens it spent in other stages of its own, e.g. BTX "
                 "branches). Wall time: the row's own stages (the shared dense base is its own row).")
    return f"# {table.title}\n\n" + "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        raise ReproError("matplotlib is not installed: python3 -m pip install -r requirements.txt")


def save_fig(fig, path: str) -> None:
    tmp = os.path.join(os.path.dirname(path), "." + os.path.basename(path) + ".tmp")
    fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    os.replace(tmp, path)


def plot_curves(table: Table, res: list[dict], path: str, subtitle: str) -> None:
    """Validation loss against tokens: every row (left) and the phase after the dense base, zoomed (right).
    A row's x is its own tokens plus those of the stages before it (Row.before); colours follow the table."""
    plt = _pyplot()
    later = [r for r in res if r["offset_tokens"] > 0]
    panels = 2 if later and len(later) < len(res) else 1
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4.6), squeeze=False)
    styles = ["-", "--", "-.", ":"]
    for pi, ax in enumerate(axes[0]):
        rows = res if pi == 0 else later
        for r in rows:
            i = res.index(r)
            x = [t for t, _ in r["curve"]]
            y = [v for _, v in r["curve"]]
            single = len(x) == 1   # an evaluation without training (e.g. the BTM ensemble): one large dot
            ax.plot(x, y, styles[(i // 10) % 4], marker="o" if single else ".", ms=7 if single else 4, lw=1.3,
                    label=r["label"], color=f"C{i % 10}")
        ax.set_xlabel("tokens (cumulative, from the dense base's start)")
        ax.set_ylabel("validation loss (mean over domains)")
        ax.grid(alpha=0.3)
        if pi == 1:
            ax.set_xlim(left=min(r["offset_tokens"] for r in later))
            finals = sorted(r["val_loss"] for r in later)
            lo, med = min(v for r in later for _, v in r["curve"]), finals[len(finals) // 2]
            ax.set_ylim(lo - 0.02, med + 3 * (med - finals[0]) + 0.05)
            ax.set_title("after the dense base (zoom; higher values clipped)", fontsize=10)
        else:
            ax.set_title(f"{table.title}\n{subtitle}", fontsize=10)
            ax.legend(fontsize=8)
    save_fig(fig, path)
    plt.close(fig)


def plot_load(table: Table, res: list[dict], path: str, subtitle: str) -> bool:
    plt = _pyplot()
    rows = [r for r in res if r["moe"] and r["expert_load"]]
    if not rows:
        return False
    n = len(rows)
    ncol = min(4, n)
    nrow = math.ceil(n / ncol)
    n_lines = max(len(r["expert_load"]) * len(next(iter(r["expert_load"].values()))) for r in rows)
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.8 * ncol, (1.4 + 0.22 * n_lines) * nrow + 0.8), squeeze=False,
                             layout="constrained")
    vmax = max(v for r in rows for dom in r["expert_load"].values() for layer in dom for v in layer)
    im = None
    for i, r in enumerate(rows):
        ax = axes[i // ncol][i % ncol]
        doms = sorted(r["expert_load"])
        L = len(r["expert_load"][doms[0]])
        mat, labels = [], []
        for layer in range(L):
            for dm in doms:
                mat.append(r["expert_load"][dm][layer])
                labels.append(f"L{layer} {dm}")
        im = ax.imshow(mat, aspect="auto", cmap="viridis", vmin=0, vmax=vmax, interpolation="nearest")
        ax.set_yticks(range(len(labels)))
        ax.set_yticklabels(labels, fontsize=6 if len(labels) > 12 else 7)
        E = len(mat[0])
        ax.set_xticks(range(0, E, max(1, E // 8)))
        ax.tick_params(axis="x", labelsize=7)
        ax.set_xlabel("expert", fontsize=8)
        ax.set_title(r["label"], fontsize=9)
        for layer in range(1, L):
            ax.axhline(layer * len(doms) - 0.5, color="white", lw=0.8)
    for j in range(n, nrow * ncol):
        axes[j // ncol][j % ncol].axis("off")
    fig.suptitle(f"{table.title}: fraction of each domain's (token, slot) pairs routed to each expert, final eval\n"
                 f"{subtitle}", fontsize=10)
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label="load fraction")
    save_fig(fig, path)
    plt.close(fig)
    return True


def report(table: Table, root: str, runner: Runner, out_dir: str, preset: str, cfg: dict,
           plots: bool = True) -> tuple[list[dict], list[str]]:
    """Writes table.md, results.json and the plots; returns the rows and the names of the PNGs written."""
    res = collect(table, root, runner)
    if not res:
        raise ReproError(f"no finished rows under {root}")
    os.makedirs(out_dir, exist_ok=True)
    analysis = table.analysis(res) if table.analysis else {}
    md = markdown_table(table, res, preset, cfg, analysis.get("notes", []))
    write_atomic(os.path.join(out_dir, "table.md"), md)
    slim = [{k: v for k, v in r.items() if k != "curve"} | {"curve": r["curve"]} for r in res]
    doc = dict(table=table.key, preset=preset, config=cfg, rows=slim)
    if table.analysis:
        doc["analysis"] = analysis.get("data", {})
    write_atomic(os.path.join(out_dir, "results.json"), json.dumps(doc, indent=1) + "\n")
    sub = f"preset {preset}: {cfg['model']} on {cfg['data']}, {res[-1]['device']}, commit {res[-1]['commit']}"
    written = []
    if plots:
        if table.standard_plots:
            plot_curves(table, res, os.path.join(out_dir, "loss_curves.png"), sub)
            written.append("loss_curves.png")
            if plot_load(table, res, os.path.join(out_dir, "expert_load.png"), sub):
                written.append("expert_load.png")
        if table.plots:
            written += table.plots(res, analysis, out_dir, sub)
    return res, written


# ---------------------------------------------------------------------------------------------
# the command line every reproduction script shares


def check_data(data: str) -> None:
    d = os.path.join(ROOT, data)
    if not os.path.isdir(d) or not any(f.endswith(".bin") and "_train_" in f for f in os.listdir(d)):
        hint = "make data-tiny" if "tiny" in data else "make data (or make data-unpack from data/pack/)"
        raise ReproError(f"no token shards in {data}: run `{hint}` first")


def main(description: str, build_table, default_key: str,
         presets: tuple = ("tiny", "tiny_long", "gpu_short", "small")) -> int:
    """Parses the shared options, builds the table with build_table(cfg), runs it and reports.
    cfg is the preset's dict plus seed and preset (the preset's name: "smoke" under --smoke)."""
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=list(presets), default="tiny",
                    help="tiny: CPU, minutes, data/tiny; tiny_long: tiny with a 5x longer MoE phase (CPU, ~10 "
                         "minutes a table); gpu_short: one H200, <= 4 minutes a table (predicted), data/full; "
                         "small: one H100 with ./train_moe_gpu, data/full, about an hour a table (default tiny; "
                         f"this script: {', '.join(presets)})")
    ap.add_argument("--smoke", action="store_true", help="tiny with a few steps per stage (the smoke test)")
    ap.add_argument("--runs", help="runs root (default runs/repro/<preset>); shared by the tables of one preset")
    ap.add_argument("--results", help=f"where the table and plots go (default docs/results/{default_key}/"
                                      "[tiny/ or smoke/]; small writes docs/results/<table>/ itself)")
    ap.add_argument("--trainer", choices=["auto", "cpu", "gpu"], help="cpu: ./train_moe, gpu: ./train_moe_gpu; "
                    "auto: gpu if nvidia-smi works and ./train_moe_gpu builds (default: small gpu, tiny auto)")
    ap.add_argument("--threads", type=int, help="CPU threads of the CPU trainer and upcycle (default: 2 for tiny, "
                                                "every core for small)")
    ap.add_argument("--seed", type=int, default=1337, help="seed of inits and data order, the same for every row")
    ap.add_argument("--rows", help="comma-separated row keys to run (default all; their prerequisites run too)")
    ap.add_argument("--report-only", action="store_true", help="rebuild the table and plots from finished runs")
    ap.add_argument("--no-plots", action="store_true", help="write the table without the PNGs (no matplotlib)")
    ap.add_argument("--no-build", action="store_true", help="do not run make for the programs")
    ap.add_argument("--list", action="store_true", help="print the stages (commands) and rows and exit")
    a = ap.parse_args()
    # Ctrl-C and kill (SIGTERM) stop cleanly, also when started in the background (SIGINT ignored there)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    preset = "smoke" if a.smoke else a.preset
    if a.smoke and a.preset != "tiny":
        ap.error("--smoke goes with --preset tiny")
    cfg = dict(PRESETS[preset], seed=a.seed, preset=preset)
    if a.threads is None:
        a.threads = 2 if preset not in ("small", "gpu_short") else (os.cpu_count() or 2)
    root = a.runs or os.path.join("runs", "repro", preset)
    table = build_table(cfg, root)
    sub = cfg["results_sub"]
    out = a.results or os.path.join("docs", "results", table.key, sub).rstrip("/")
    prefix = f"[{table.key}/{preset}]"
    try:
        os.chdir(ROOT)
        trainer = a.trainer or cfg["trainer"]
        if a.list:
            trainer = "cpu" if trainer == "auto" else trainer
        elif trainer in ("auto", "gpu") and not a.report_only:
            ok = gpu_available() and (a.no_build or make(["train_moe_gpu"]))
            ok = ok and os.path.exists(os.path.join(ROOT, "train_moe_gpu"))
            if trainer == "gpu" and not ok:
                raise ReproError("the GPU trainer is not usable here (nvidia-smi fails or `make train_moe_gpu` fails); "
                                 f"the {preset} preset needs an NVIDIA GPU (or force --trainer cpu, which takes hours to days)")
            trainer = "gpu" if ok else "cpu"
        elif trainer == "auto":
            trainer = "cpu"
        runner = Runner(table, root, trainer, a.threads, prefix, cfg)
        if a.list:
            for s in table.stages:
                print(f"stage {s.name}: {' '.join(runner.command(s))}")
            for r in table.rows:
                print(f"row {r.key}: {r.label} <- {r.run} (owns {', '.join(r.stages)})")
            print(f"wall time estimate ({trainer} trainer): {runner.estimate(table.stages)}")
            return 0
        if not a.report_only:
            check_data(cfg["data"])
            if not a.no_build:
                need = ["train_moe"] + (["upcycle"] if any(s.kind == "upcycle" for s in table.stages) else [])
                if "upcycle" in need and not os.path.exists(os.path.join(ROOT, "upcycle.cu")):
                    raise ReproError("upcycle.cu is missing: the upcycled rows need ./upcycle")
                if not make(need):
                    raise ReproError(f"make {' '.join(need)} failed (output above)")
            print(f"{prefix} {table.title}: {len(table.rows)} rows, {len(table.stages)} stages, trainer "
                  f"{runner.binary(Stage('x', 'train', []))}, runs in {root}/, results in {out}/", flush=True)
            os.makedirs(root, exist_ok=True)
            lock = open(os.path.join(root, ".lock"), "w")
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raise ReproError(f"another reproduction is running in {root}/ (it holds {root}/.lock); wait for it "
                                 "or give another --runs directory")
            t0 = time.time()
            runner.run(set(a.rows.split(",")) if a.rows else None)
            print(f"{prefix} stages run: {len(runner.ran)} ({', '.join(n + ' ' + h for n, h in runner.ran) or 'none'}); "
                  f"skipped as finished: {len(runner.skipped)}; {fmt_duration(time.time() - t0)}", flush=True)
        _, written = report(table, root, runner, out, preset, cfg, plots=not a.no_plots)
        print(open(os.path.join(out, "table.md")).read())
        print(f"{prefix} wrote {out}/table.md, results.json" + "".join(", " + f for f in written))
        return 0
    except ReproError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\n{prefix} interrupted: run the same command again to continue (finished stages are kept, the "
              f"unfinished one resumes from its latest checkpoint)", file=sys.stderr)
        return 130
