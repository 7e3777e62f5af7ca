"""Served throughput per budget, measured with vLLM's own ``vllm bench serve``.

One ``vllm-elastic serve`` server on the elastic checkpoint serves every budget (each
``vllm bench serve`` run sends ``--extra-body '{"vllm_xargs": {"elastic_budget": B}}'``);
then one plain vLLM server per sliced checkpoint, at vLLM's default settings (compiled),
gets the same ``vllm bench serve`` run without the extra body. Same random dataset and
seed, ``--ignore-eos``, greedy, requests sent at once (``--request-rate inf``) under each
load of ``LOADS``: the saturated batch, and the latency regime at ``--max-concurrency`` 1
and 4. Reported: output tokens/s, mean TTFT and TPOT from vLLM's result JSON; ratios =
elastic / stock speed (output tokens/s; stock / elastic for TTFT and TPOT), target >= 0.95.

Servers are real OpenAI servers (three processes each, started with
``python -m vllm_elastic.cli serve``, which is ``vllm serve`` on the CPU wheel too);
``vllm bench serve`` runs as ``python -m vllm_elastic.cli vllm bench serve``.

    python benchmarks/bench_serve.py [--quick]
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import common as c

TARGET = 0.95
SERVED = "model"
METRICS = ("output_throughput", "mean_ttft_ms", "mean_tpot_ms", "completed", "duration")


@dataclass(frozen=True)
class Load:
    """One ``vllm bench serve`` load: how many prompts, how many in flight at most."""

    name: str
    num_prompts: int | None  # None: the workload's
    max_concurrency: int | None  # None: all at once

    def args(self, work: c.Workload) -> list[str]:
        args = ["--num-prompts", str(self.num_prompts or work.num_prompts)]
        if self.max_concurrency is not None:
            args += ["--max-concurrency", str(self.max_concurrency)]
        return args


LOADS = (Load("saturated", None, None), Load("concurrency 1", 8, 1), Load("concurrency 4", 16, 4))
# quick (CI: serving works end to end, no speed asserted): one load, no warm-up runs
QUICK_LOADS = (Load("saturated", None, None),)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "vllm_elastic.cli", *args]


def _server_env() -> dict[str, str]:
    """The benchmark process runs vLLM in-process; servers use vLLM's default processes."""
    env = dict(os.environ)
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    env["VLLM_LOGGING_LEVEL"] = "WARNING"
    return env


@contextmanager
def server(model: Path, log_path: Path, elastic: bool) -> Iterator[str]:
    """A running server on ``model``; yields its base URL; stops it afterwards."""
    port = _free_port()
    kw = c.ENGINE_KWARGS
    cmd = _cli(
        "serve", str(model), "--host", "127.0.0.1", "--port", str(port),
        "--served-model-name", SERVED, "--dtype", kw["dtype"],
        "--kv-cache-memory-bytes", str(kw["kv_cache_memory_bytes"]),
        "--max-num-seqs", str(kw["max_num_seqs"]), "--max-model-len", str(kw["max_model_len"]),
        "--no-enable-prefix-caching", "--seed", "0",
    )  # fmt: skip
    if elastic and c.WEIGHT_PACKING:
        cmd += ["--elastic-weight-packing", c.WEIGHT_PACKING]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_server_env())
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(base, proc, log_path)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def _wait_ready(base: str, proc: subprocess.Popen, log_path: Path, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            tail = log_path.read_text()[-3000:]
            raise RuntimeError(f"server exited ({proc.returncode}):\n{tail}")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise RuntimeError(f"server did not start in {timeout:.0f} s: {log_path}")


def bench_serve(
    base: str, tokenizer: Path, work: c.Workload, out: Path, budget: str | None, load: Load
) -> dict[str, Any]:
    """One ``vllm bench serve`` run; returns the headline metrics of its result JSON."""
    cmd = _cli(
        "vllm", "bench", "serve", "--backend", "vllm", "--base-url", base,
        "--model", SERVED, "--tokenizer", str(tokenizer), "--dataset-name", "random",
        "--random-input-len", str(work.prompt_len), "--random-output-len", str(work.max_tokens),
        "--random-range-ratio", "0", *load.args(work), "--request-rate", "inf",
        "--ignore-eos", "--temperature", "0", "--seed", "0",
        "--save-result", "--result-dir", str(out.parent), "--result-filename", out.name,
        "--disable-tqdm",
    )  # fmt: skip
    if budget is not None:
        cmd += ["--extra-body", json.dumps({"vllm_xargs": {"elastic_budget": budget}})]
    done = subprocess.run(cmd, capture_output=True, text=True, env=_server_env(), timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"vllm bench serve failed:\n{done.stdout[-2000:]}{done.stderr[-3000:]}")
    result = json.loads(out.read_text())
    if result.get("failed", 0):
        raise RuntimeError(f"{result['failed']} requests failed in {out}")
    return {k: result[k] for k in METRICS}


def best(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the highest output throughput, plus every run's throughput."""
    top = max(runs, key=lambda r: r["output_throughput"])
    return {**top, "runs_output_throughput": [r["output_throughput"] for r in runs]}


def run_all(
    ckpt: c.Checkpoint,
    work: c.Workload,
    loads: tuple[Load, ...],
    repeats: int,
    raw: Path,
    warm_up: bool = True,
) -> dict[str, Any]:
    """Elastic server (every budget, interleaved rounds), then one stock server per
    budget; returns {"elastic"|"stock": {load: {budget: best run}}}."""

    def runs_on(base: str, tokenizer: Path, label: str, budgets: dict[str, str | None]) -> dict:
        for b in budgets.values() if warm_up else ():  # first-use costs (oneDNN primitives)
            bench_serve(base, tokenizer, work, raw / "warmup.json", b, loads[0])
        out: dict[str, dict[str, list]] = {ld.name: {b: [] for b in budgets} for ld in loads}
        for ld in loads:
            for r in range(repeats):
                for name, b in budgets.items():
                    path = raw / f"{label}_{name}_{ld.name.replace(' ', '')}_{r}.json"
                    out[ld.name][name].append(bench_serve(base, tokenizer, work, path, b, ld))
        return {ld: {b: best(v) for b, v in per.items()} for ld, per in out.items()}

    c.log(f"elastic server: {ckpt.path}")
    with server(ckpt.path, raw / "elastic.log", elastic=True) as base:
        elastic = runs_on(base, ckpt.path, "elastic", {b: b for b in ckpt.budgets})
    stock: dict[str, dict[str, Any]] = {ld.name: {} for ld in loads}
    for b in ckpt.budgets:
        c.log(f"stock server: {ckpt.sliced[b]}")
        with server(ckpt.sliced[b], raw / f"stock_{b}.log", elastic=False) as base:
            for ld, per in runs_on(base, ckpt.sliced[b], "stock", {b: None}).items():
                stock[ld].update(per)
    return {"elastic": elastic, "stock": stock}


def rows_of(ckpt: c.Checkpoint, runs: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for load, per in runs["elastic"].items():
        for b in ckpt.budgets:
            e, s = per[b], runs["stock"][load][b]
            ratio = e["output_throughput"] / s["output_throughput"]
            rows.append(
                {
                    "load": load,
                    "budget": b,
                    "fraction": ckpt.budget(b)["fraction"],
                    "elastic": e,
                    "stock": s,
                    "throughput_ratio": round(ratio, 4),
                    "ttft_ratio": round(s["mean_ttft_ms"] / e["mean_ttft_ms"], 4),
                    "tpot_ratio": round(s["mean_tpot_ms"] / e["mean_tpot_ms"], 4),
                    "target": TARGET,
                    "pass": ratio >= TARGET,
                }
            )
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    return c.md_table(
        [
            "load",
            "budget",
            "params frac",
            "elastic tok/s",
            "stock tok/s",
            "ratio",
            "elastic TTFT ms",
            "stock TTFT ms",
            "elastic TPOT ms",
            "stock TPOT ms",
            "TTFT ratio",
            "TPOT ratio",
            f">= {TARGET}",
        ],
        [
            (
                r["load"],
                r["budget"],
                r["fraction"],
                r["elastic"]["output_throughput"],
                r["stock"]["output_throughput"],
                r["throughput_ratio"],
                r["elastic"]["mean_ttft_ms"],
                r["stock"]["mean_ttft_ms"],
                r["elastic"]["mean_tpot_ms"],
                r["stock"]["mean_tpot_ms"],
                r["ttft_ratio"],
                r["tpot_ratio"],
                c.verdict(r["throughput_ratio"], TARGET),
            )
            for r in rows
        ],
    )


def main() -> None:
    settings, _ = c.parse_settings(__doc__.splitlines()[0])
    ckpt = c.prepare_checkpoint(settings)
    work = c.Workload.for_settings(settings)
    raw = settings.out_dir / "serve_raw"
    loads = QUICK_LOADS if settings.quick else LOADS
    runs = run_all(ckpt, work, loads, settings.repeats, raw, warm_up=not settings.quick)
    rows = rows_of(ckpt, runs)
    md = table(rows)
    print(md)
    intro = (
        f"`vllm bench serve --dataset-name random`: {work.num_prompts} prompts x "
        f"{work.prompt_len} tokens -> {work.max_tokens} tokens (ignore_eos, greedy, request "
        "rate inf; low-concurrency loads send fewer prompts, at most N in flight), "
        "against `vllm-elastic serve` (budget per request via `vllm_xargs`) and "
        "a plain vLLM server per sliced checkpoint. Best of the timed runs; raw result "
        "JSONs in `serve_raw/`."
    )
    plot = c.bar_plot(
        settings.out_dir / "serve.png",
        ckpt.budgets,
        {
            f"{ld.name}: elastic / stock": [
                r["throughput_ratio"] for r in rows if r["load"] == ld.name
            ]
            for ld in loads
        },
        "output throughput ratio",
        "Served throughput, vllm bench serve",
        target=TARGET,
    )
    c.write_results(
        settings,
        ckpt,
        "serve",
        "Served throughput per budget (vllm bench serve)",
        {"workload": work.__dict__, "loads": [ld.__dict__ for ld in loads], "rows": rows},
        [intro, md],
        [plot],
    )


if __name__ == "__main__":
    main()
