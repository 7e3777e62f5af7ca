"""Shared helpers of the elastic-vs-stock benchmarks (import this before vLLM).

Everything runs in one process: ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` is set here, before
any vLLM import, so the engine core and the worker live in this interpreter, the model is
reachable through ``LLM.apply_model`` and engines are created one after another
(``open_engine`` / ``close_engine``).

Timing: every measurement is a warm-up run followed by timed runs of exactly the same
requests, driven through ``LLMEngine.add_request`` / ``step`` so each request's finish
time (and, when streaming, its first-token time) is known. The reported time is the
fastest timed run; each run also records how many cores *other* processes used meanwhile
(``foreign_cores``, from ``/proc/stat``), and runs disturbed by them are retried.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import itertools
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vllm_elastic.spec.engine_options import PACKINGS

THREAD_ENV_KEYS = (
    "OMP_NUM_THREADS",
    "VLLM_CPU_OMP_THREADS_BIND",
    "VLLM_CPU_NUM_OF_RESERVED_CPU",
    "VLLM_CPU_KVCACHE_SPACE",
    "VLLM_ENABLE_V1_MULTIPROCESSING",
    "LD_PRELOAD",
)
ENV_AT_START = {k: os.environ.get(k) for k in THREAD_ENV_KEYS}

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
QUICK_RESULTS_DIR = RESULTS_DIR / "quick"
MODELS_DIR = RESULTS_DIR / "models"

FULL_PRESET = "bench"
QUICK_PRESET = "small"  # the smallest preset with three budgets (needed for 1/3 mixes)
FIRST_WORD_ID = 9  # ids 0..8 are the tokenizer's special tokens
NOISE_LIMIT = 0.25  # a run during which other processes used more cores is retried
RETRIES = 3  # extra timed runs allowed per measurement while all runs were disturbed
DEFAULT_QUIET_WAIT_S = 60.0  # longest wait for other processes to go quiet before a run
QUIET_WAIT_S = DEFAULT_QUIET_WAIT_S
WEIGHT_PACKING: str | None = None  # --weight-packing: the elastic engines' weight storage
ELASTIC_OPTIONS: dict[str, Any] = {}  # --elastic-option KEY=VALUE: more engine options

# Stock engines run in each mode; the anchor is stock vLLM at its default settings
# (torch.compile on CPU, CUDA graphs + compile on GPU), eager mode is an extra column.
# Elastic engines get no mode (the plugin picks what elastic models support).
STOCK_MODES: dict[str, dict[str, Any]] = {"default": {}, "eager": {"enforce_eager": True}}
# quick mode compiles the way vLLM's own CPU CI does (set it to 0 to compile with Inductor):
# dynamo traces every engine's forward, elastic budget graphs included, and runs the graph
# eagerly, without Inductor's code generation (minutes per engine on a cold cache) or a
# warm-up. Quick mode measures no speed; tests/test_exactness.py checks Inductor's graphs.
CPU_CI_ENV = "VLLM_CPU_CI_ENV"
QUICK_COMPILE_NOTE = f"{CPU_CI_ENV}=1: compiled engines trace with dynamo, eager backend"
ANCHOR_MODE = "default"

ENGINE_KWARGS: dict[str, Any] = dict(
    dtype="float32",
    kv_cache_memory_bytes=1 << 30,
    max_num_seqs=64,
    max_model_len=1024,
    # identical prompts repeat across warm-up and timed runs: no prefix-cache hits
    enable_prefix_caching=False,
    seed=0,
)


# --------------------------------------------------------------------------- settings


@dataclass
class Settings:
    """Command-line settings shared by every benchmark."""

    quick: bool
    preset: str
    model_dir: Path
    out_dir: Path
    repeats: int
    threads: int | None
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["model_dir"], out["out_dir"] = str(self.model_dir), str(self.out_dir)
        return out


def parse_settings(description: str, extra: Any = None) -> tuple[Settings, argparse.Namespace]:
    """Parse the common flags (plus ``extra(parser)``'s) and apply the thread setting."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="tiny shapes for CI (< 1 min)")
    parser.add_argument("--preset", help="checkpoint preset (default: bench, quick: small)")
    parser.add_argument("--model-dir", type=Path, default=MODELS_DIR, help="checkpoint cache")
    parser.add_argument("--out-dir", type=Path, help="results folder")
    parser.add_argument("--repeats", type=int, help="timed runs per measurement")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads before the engines")
    parser.add_argument(
        "--quiet-wait",
        type=float,
        help=f"max seconds to wait for other processes to go quiet before a timed run "
        f"(default {DEFAULT_QUIET_WAIT_S:.0f}, quick 0)",
    )
    parser.add_argument(
        "--weight-packing",
        choices=PACKINGS,
        help="elastic engines' additional_config elastic.weight_packing (default: auto)",
    )
    parser.add_argument(
        "--elastic-option",
        action="append",
        default=[],
        metavar="KEY=JSON",
        help="another additional_config elastic option of the elastic engines (repeatable)",
    )
    parser.add_argument(
        "--serve-budgets",
        metavar="B1,B2,...",
        help="elastic engines serve only these budgets (engine option serve_budgets; must "
        "include the full one); the script runs only them",
    )
    if extra is not None:
        extra(parser)
    args = parser.parse_args()
    settings = Settings(
        quick=args.quick,
        preset=args.preset or (QUICK_PRESET if args.quick else FULL_PRESET),
        model_dir=args.model_dir,
        out_dir=args.out_dir or (QUICK_RESULTS_DIR if args.quick else RESULTS_DIR),
        repeats=args.repeats or (1 if args.quick else 2),
        threads=args.threads,
    )
    set_threads(settings.threads)
    global RETRIES, QUIET_WAIT_S, WEIGHT_PACKING
    WEIGHT_PACKING = args.weight_packing
    for item in args.elastic_option:
        key, _, value = item.partition("=")
        ELASTIC_OPTIONS[key] = json.loads(value)
        settings.notes.append(f"elastic option {key}={value}")
    if args.weight_packing:
        settings.notes.append(f"elastic weight packing: {args.weight_packing}")
    if args.serve_budgets:
        ELASTIC_OPTIONS["serve_budgets"] = [b.strip() for b in args.serve_budgets.split(",")]
        settings.notes.append(f"elastic engines serve only {args.serve_budgets}")
    if settings.quick:  # quick mode asserts no speed: never wait or retry
        RETRIES, QUIET_WAIT_S = 0, 0.0
        if os.environ.setdefault(CPU_CI_ENV, "1") == "1":
            settings.notes.append(QUICK_COMPILE_NOTE)
    if args.quiet_wait is not None:
        QUIET_WAIT_S = args.quiet_wait
    return settings, args


def set_threads(threads: int | None) -> None:
    """Set torch's intra-op threads once, before any engine (vLLM's CPU worker replaces
    ``torch.set_num_threads`` with a no-op when it starts)."""
    if threads:
        import torch

        torch.set_num_threads(threads)


# --------------------------------------------------------------------------- machine


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                wanted = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "fma")
                return [f for f in wanted if f in flags]
    except OSError:
        pass
    return []


def _git_state() -> dict[str, Any]:
    """Commit, dirty flag (of everything but ``benchmarks/results``) and a hash of the
    ``vllm_elastic`` sources actually measured."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=REPO_DIR, capture_output=True, text=True, check=False
        ).stdout.strip()

    import vllm_elastic

    digest = hashlib.sha256()
    root = Path(list(vllm_elastic.__path__)[0])
    for path in sorted([*root.rglob("*.py"), *root.rglob("*.cpp")]):
        digest.update(path.read_bytes())
    return {
        "commit": git("rev-parse", "HEAD"),
        # results written by this run (or an earlier one) do not make the code dirty
        "dirty": bool(git("status", "--porcelain", "--", ".", ":!benchmarks/results")),
        "vllm_elastic_sources_sha256": digest.hexdigest()[:16],
    }


def machine_info() -> dict[str, Any]:
    """CPU, cores, threads, library versions and the env vars that steer CPU threading."""
    import torch
    import transformers
    import vllm

    mem_kb = 0
    try:
        first = Path("/proc/meminfo").read_text().splitlines()[0]
        mem_kb = int(first.split()[1])
    except (OSError, IndexError, ValueError):
        pass
    return {
        "cpu_model": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "memory_gib": round(mem_kb / 2**20, 1),
        "torch_threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "vllm": vllm.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "env": ENV_AT_START,
        "env_after_vllm_start": {k: os.environ.get(k) for k in THREAD_ENV_KEYS},
        "git": _git_state(),
    }


# --------------------------------------------------------------------------- checkpoints


@dataclass
class Checkpoint:
    """An elastic checkpoint, its budgets' sliced plain checkpoints, and their shapes."""

    preset: str
    path: Path
    sliced: dict[str, Path]
    info: dict[str, Any]

    @property
    def budgets(self) -> list[str]:
        return list(self.sliced)

    def budget(self, name: str) -> dict[str, Any]:
        return next(b for b in self.info["budgets"] if b["name"] == name)

    def flops(self, name: str) -> int:
        return int(self.budget(name)["matmul_flops_per_token"])

    def reuse_state_flops(self, think: str, answer: str) -> int:
        """Extra matmul FLOPs of a ``reuse`` thinking token writing the answer budget's
        Mamba state (``vllm_elastic.spec.cost.reuse_state_write_flops``)."""
        from vllm_elastic.checkpoint import load_elastic_config
        from vllm_elastic.spec.cost import reuse_state_write_flops

        cfg = load_elastic_config(self.path)
        spec = cfg.elastic_spec
        return reuse_state_write_flops(cfg, spec.get(think), spec.get(answer))


def _source_hash() -> str:
    """Hash of the code that writes checkpoints: a change invalidates the cache."""
    import vllm_elastic.checkpoint as ckpt_pkg

    digest = hashlib.sha256()
    for path in sorted(Path(ckpt_pkg.__file__).parent.glob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def prepare_checkpoint(settings: Settings) -> Checkpoint:
    """Build (or reuse) the preset's elastic checkpoint and slice every budget.

    Deterministic: ``build_random_checkpoint(**PRESETS[preset])`` with its default seed.
    Cached under ``model_dir/preset`` keyed on the preset and the checkpoint code's hash.
    """
    from vllm_elastic.checkpoint import PRESETS, budget_report, build_random_checkpoint

    root = settings.model_dir / settings.preset
    parent = root / "elastic"
    stamp = {"preset": PRESETS[settings.preset], "code": _source_hash()}
    stamp_path = root / "stamp.json"
    fresh = stamp_path.is_file() and json.loads(stamp_path.read_text()) == stamp
    if not fresh:
        build_random_checkpoint(parent, **PRESETS[settings.preset])
    rows = budget_report(parent)
    served = ELASTIC_OPTIONS.get("serve_budgets")  # --serve-budgets: run only these
    sliced = {
        r["name"]: _slice(parent, r["name"], root / "sliced", fresh)
        for r in rows
        if served is None or r["name"] in served
    }
    if not fresh:
        stamp_path.write_text(json.dumps(stamp, indent=1))
    return Checkpoint(settings.preset, parent, sliced, model_info(parent, rows))


def _slice(parent: Path, name: str, out_root: Path, fresh: bool) -> Path:
    from vllm_elastic.checkpoint import slice_checkpoint

    out = out_root / name
    if not (fresh and (out / "config.json").is_file()):
        slice_checkpoint(parent, name, out)
    return out


def _layer_pattern(kinds: Sequence[str]) -> str:
    """NemotronH's pattern string (``M-M*E``), else runs of a kind (``4 x decoder``)."""
    if all(len(k) == 1 for k in kinds):
        return "".join(kinds)
    return ", ".join(f"{len(list(run))} x {k}" for k, run in itertools.groupby(kinds))


def model_info(parent: Path, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Parent shape plus each budget's shape and cost (``vllm_elastic.spec.cost``:
    parameters, matmul FLOPs, KV and Mamba-state bytes)."""
    from vllm_elastic.checkpoint import load_elastic_config
    from vllm_elastic.spec.cost import budget_cost

    cfg = load_elastic_config(parent)
    spec = cfg.elastic_spec
    budgets = []
    for r in rows:
        b = {k: r[k] for k in r if not k.endswith("_sizes") and k not in ("default", "full")}
        b.update(budget_cost(cfg, spec.get(r["name"])))
        budgets.append(b)
    return {
        "family": cfg.model_type,
        **{k: r for k, r in spec.parent.sizes.items()},
        "layer_kinds": _layer_pattern(spec.parent.layer_kinds),
        "vocab_size": cfg.vocab_size,
        "tie_word_embeddings": cfg.family.tied(cfg),
        "dtype": rows[0]["dtype"],
        "budgets": budgets,
    }


# --------------------------------------------------------------------------- engines


def is_elastic(model: Path | str) -> bool:
    """Whether ``model`` is an elastic checkpoint (``model_type: elastic_*``)."""
    config = Path(model) / "config.json"
    return config.is_file() and json.loads(config.read_text()).get("model_type", "").startswith(
        "elastic_"
    )


def open_engine(model: Path | str, **overrides: Any) -> Any:
    """An in-process ``vllm.LLM`` with the benchmark defaults (``ENGINE_KWARGS``).

    Elastic checkpoints get ``--weight-packing`` and ``--elastic-option`` in
    ``additional_config["elastic"]``.
    """
    from vllm import LLM

    kwargs = {**ENGINE_KWARGS, **overrides}
    options = dict(ELASTIC_OPTIONS)
    if WEIGHT_PACKING is not None:
        options["weight_packing"] = WEIGHT_PACKING
    if options and is_elastic(model):
        extra = dict(kwargs.get("additional_config") or {})
        extra["elastic"] = {**options, **extra.get("elastic", {})}
        kwargs["additional_config"] = extra
    start = time.perf_counter()
    llm = LLM(str(model), **kwargs)
    llm.bench_startup_s = round(time.perf_counter() - start, 2)  # incl. compile / capture
    return llm


def close_engine(llm: Any) -> None:
    """Shut the engine down now (in-process engines share global parallel state)."""
    llm.llm_engine.engine_core.shutdown()
    gc.collect()


@contextmanager
def engine(model: Path | str, **overrides: Any) -> Iterator[Any]:
    """``open_engine`` as a context manager that always closes the engine."""
    llm = open_engine(model, **overrides)
    try:
        yield llm
    finally:
        close_engine(llm)
        del llm
        gc.collect()


def stock_engines(ckpt: Checkpoint, **overrides: Any) -> Iterator[tuple[str, str, Any]]:
    """Each budget's slice on stock vLLM in each of ``STOCK_MODES``, opened and closed in
    turn: yields ``(mode, budget, llm)``."""
    for b in ckpt.budgets:
        for mode, mode_overrides in STOCK_MODES.items():
            log(f"stock engine ({mode}): {ckpt.sliced[b]}")
            with engine(ckpt.sliced[b], **overrides, **mode_overrides) as llm:
                yield mode, b, llm


def engine_info(llm: Any) -> dict[str, Any]:
    """The scheduler settings an engine actually runs with, and torch's thread count."""
    import torch

    cfg = llm.llm_engine.vllm_config
    eager = cfg.model_config.enforce_eager
    info = {
        "max_num_seqs": cfg.scheduler_config.max_num_seqs,
        "max_num_batched_tokens": cfg.scheduler_config.max_num_batched_tokens,
        "max_model_len": cfg.model_config.max_model_len,
        "torch_threads": torch.get_num_threads(),
        "enforce_eager": eager,
        "compilation_mode": str(cfg.compilation_config.mode),
        "compile_backend": None if eager else cfg.compilation_config.backend,
        "startup_s": getattr(llm, "bench_startup_s", None),
    }
    packing = llm.apply_model(lambda model: getattr(model, "weight_packing", None))[0]
    if packing:
        info["weight_packing"] = packing
    graphs = llm.apply_model(
        lambda m: getattr(getattr(m, "budget_graphs", None), "compile_s", None)
    )[0]
    if graphs is not None:
        info["budget_graph_compile_s"] = graphs  # part of startup_s
    return info


# --------------------------------------------------------------------------- requests


def make_prompts(n: int, length: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    """``n`` fixed prompts of ``length`` word-token ids (no special tokens)."""
    rng = random.Random(seed)
    return [[rng.randrange(FIRST_WORD_ID, vocab_size) for _ in range(length)] for _ in range(n)]


def sampling(max_tokens: int, extra_args: dict[str, Any] | None = None, **kw: Any) -> Any:
    """Greedy, ``ignore_eos`` sampling params of exactly ``max_tokens`` output tokens."""
    from vllm import SamplingParams

    return SamplingParams(
        max_tokens=max_tokens,
        temperature=0.0,
        ignore_eos=True,
        detokenize=False,
        extra_args=extra_args,
        **kw,
    )


def budget_args(budget: str | None) -> dict[str, Any] | None:
    """``extra_args`` selecting one elastic budget (None: the engine's default)."""
    return None if budget is None else {"elastic_budget": budget}


Request = tuple[list[int], Any]  # (prompt token ids, SamplingParams)


def requests_for(prompts: Sequence[list[int]], params: Any | Sequence[Any]) -> list[Request]:
    """Pair prompts with one shared SamplingParams or one per prompt."""
    if not isinstance(params, Sequence):
        params = [params] * len(prompts)
    return list(zip(prompts, params, strict=True))


# --------------------------------------------------------------------------- timing


def _busy_jiffies() -> int:
    """All CPUs' non-idle jiffies since boot."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return user + nice + system + irq + softirq + steal


def _own_jiffies() -> int:
    fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime (all threads)


def calibrate(blocks: int = 4, seconds: float = 0.03) -> float:
    """GFLOP/s of a fixed fp32 GEMM (64 x 1024 @ 1024 x 4096, ``F.linear``), best of
    ``blocks`` blocks of about ``seconds``: a speed index of the machine right now, recorded
    with every timed run (other VMs on the host can slow it down without showing up in
    /proc/stat)."""
    import torch
    import torch.nn.functional as F

    global _CALIB
    if _CALIB is None:
        gen = torch.Generator().manual_seed(0)
        _CALIB = (torch.randn(64, 1024, generator=gen), torch.randn(4096, 1024, generator=gen))
    x, w = _CALIB
    F.linear(x, w)
    best = 0.0
    for _ in range(blocks):
        calls, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            F.linear(x, w)
            calls += 1
        best = max(best, calls * 2 * 64 * 1024 * 4096 / (time.perf_counter() - t0) / 1e9)
    return round(best, 1)


_CALIB: tuple[Any, Any] | None = None


def wait_for_quiet(max_wait: float | None = None, window: float = 0.5) -> float:
    """Sleep until other processes use < NOISE_LIMIT cores over ``window`` seconds (or
    ``max_wait``, default QUIET_WAIT_S, has passed); returns the seconds waited."""
    max_wait = QUIET_WAIT_S if max_wait is None else max_wait
    t0 = time.perf_counter()
    while max_wait > 0:
        probe = NoiseProbe()
        time.sleep(window)
        if probe.stop()["foreign_cores"] < NOISE_LIMIT:
            break
        if time.perf_counter() - t0 > max_wait:
            break
    return round(time.perf_counter() - t0, 1)


class NoiseProbe:
    """CPU used by this process and by everything else between start() and stop()."""

    def __init__(self) -> None:
        self.hz = os.sysconf("SC_CLK_TCK")
        self.t0 = time.perf_counter()
        self.busy0, self.own0 = _busy_jiffies(), _own_jiffies()

    def stop(self) -> dict[str, float]:
        wall = max(time.perf_counter() - self.t0, 1e-9)
        busy = (_busy_jiffies() - self.busy0) / self.hz
        own = (_own_jiffies() - self.own0) / self.hz
        return {
            "own_cores": round(own / wall, 2),
            "foreign_cores": round(max(busy - own, 0.0) / wall, 2),
            "loadavg_1m": float(Path("/proc/loadavg").read_text().split()[0]),
        }


@dataclass
class BatchRun:
    """One pass over a list of requests, all submitted at t=0."""

    wall_s: float
    prompt_tokens: int
    output_tokens: int
    latency_s: list[float]  # finish time per request (request order)
    ttft_s: list[float]  # first-token time per request (streaming runs only)
    outputs: list[list[int]]
    noise: dict[str, float]

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.wall_s

    def summary(self) -> dict[str, Any]:
        out = {
            "wall_s": round(self.wall_s, 4),
            "output_tokens": self.output_tokens,
            "prompt_tokens": self.prompt_tokens,
            "tokens_per_s": round(self.tokens_per_s, 2),
            "latency_mean_s": round(statistics.fmean(self.latency_s), 4),
            "latency_p50_s": round(percentile(self.latency_s, 50), 4),
            "latency_p90_s": round(percentile(self.latency_s, 90), 4),
            **self.noise,
        }
        if self.ttft_s:
            out["ttft_max_s"] = round(max(self.ttft_s), 4)
        return out


_REQUEST_IDS = itertools.count()


def run_batch(
    llm: Any, requests: Sequence[Request], stream: bool = False, quiet: bool = True
) -> BatchRun:
    """Submit every request at once and step the engine until all finish.

    ``stream=True`` asks for per-step deltas so first-token times are known (costs a
    little output processing per step, the same for every engine). ``quiet=True`` first
    waits (up to QUIET_WAIT_S) for other processes to go quiet.
    """
    from vllm.sampling_params import RequestOutputKind

    waited = wait_for_quiet() if quiet else 0.0
    calib = calibrate() if quiet else 0.0
    eng = llm.llm_engine
    kind = RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY
    probe = NoiseProbe()
    t0 = time.perf_counter()
    order = []
    for prompt, params in requests:
        params = params.clone()
        params.output_kind = kind
        rid = f"bench-{next(_REQUEST_IDS)}"
        eng.add_request(rid, {"prompt_token_ids": list(prompt)}, params)
        order.append(rid)
    first: dict[str, float] = {}
    done: dict[str, float] = {}
    tokens: dict[str, list[int]] = {rid: [] for rid in order}
    while eng.has_unfinished_requests():
        for out in eng.step():
            now = time.perf_counter() - t0
            new = list(out.outputs[0].token_ids) if out.outputs else []
            if new and out.request_id not in first:
                first[out.request_id] = now
            tokens[out.request_id] = tokens[out.request_id] + new if stream else new
            if out.finished:
                done[out.request_id] = now
    wall = time.perf_counter() - t0
    return BatchRun(
        wall_s=wall,
        prompt_tokens=sum(len(p) for p, _ in requests),
        output_tokens=sum(len(t) for t in tokens.values()),
        latency_s=[done[r] for r in order],
        ttft_s=[first[r] for r in order] if stream else [],
        outputs=[tokens[r] for r in order],
        noise={**probe.stop(), "waited_for_quiet_s": waited, "calib_gflops": calib},
    )


@dataclass
class Measurement:
    """Warm-up + timed runs of one request list; ``best`` is the fastest timed run."""

    best: BatchRun
    runs: list[BatchRun]

    @classmethod
    def of(cls, runs: Sequence[BatchRun]) -> Measurement:
        return cls(best=min(runs, key=lambda r: r.wall_s), runs=list(runs))

    def merged(self, other: Measurement) -> Measurement:
        """Both measurements' runs as one (e.g. before and after another engine's)."""
        return Measurement.of(self.runs + other.runs)

    @property
    def wall_s(self) -> float:
        return self.best.wall_s

    @property
    def tokens_per_s(self) -> float:
        return self.best.tokens_per_s

    def summary(self) -> dict[str, Any]:
        walls = [r.wall_s for r in self.runs]
        return {
            **self.best.summary(),
            "median_wall_s": round(statistics.median(walls), 4),
            "runs_wall_s": [round(w, 4) for w in walls],
            "runs_foreign_cores": [r.noise["foreign_cores"] for r in self.runs],
            "runs_calib_gflops": [r.noise["calib_gflops"] for r in self.runs],
        }


def measure(
    llm: Any,
    requests: Sequence[Request],
    repeats: int,
    warmup: int = 1,
    stream: bool = False,
) -> Measurement:
    """Warm up, then time ``repeats`` runs (see ``measure_interleaved``)."""
    return measure_interleaved(llm, {"_": requests}, repeats, warmup, stream)["_"]


def measure_interleaved(
    llm: Any,
    named: dict[str, Sequence[Request]],
    repeats: int,
    warmup: int = 1,
    stream: bool = False,
) -> dict[str, Measurement]:
    """Time several request lists on one engine in rounds (A B C, A B C, ...), so a slow
    drift of the machine's speed hits all of them alike.

    Each list gets ``warmup`` untimed runs first. A list all of whose timed runs were
    disturbed by other processes gets up to RETRIES more runs.
    """
    for reqs in named.values():
        for _ in range(warmup):
            run_batch(llm, reqs, stream, quiet=False)
    runs: dict[str, list[BatchRun]] = {name: [] for name in named}
    for _ in range(repeats):
        for name, reqs in named.items():
            runs[name].append(run_batch(llm, reqs, stream))
    for name, reqs in named.items():
        for _ in range(RETRIES):
            if not all(r.noise["foreign_cores"] > NOISE_LIMIT for r in runs[name]):
                break
            runs[name].append(run_batch(llm, reqs, stream))
    return {name: Measurement.of(rs) for name, rs in runs.items()}


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile ``q`` (0..100) of ``values``."""
    xs = sorted(values)
    if not xs:
        return math.nan
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def same_outputs(a: Sequence[list[int]], b: Sequence[list[int]]) -> float:
    """Fraction of requests whose output token ids are identical in ``a`` and ``b``."""
    return sum(x == y for x, y in zip(a, b, strict=True)) / max(len(a), 1)


def log(msg: str) -> None:
    """Progress line on stderr (stdout stays free for the result tables)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- results


def md_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub markdown table; floats get 3 significant decimals."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def verdict(value: float, target: float) -> str:
    return "PASS" if value >= target else "FAIL"


def _meta_markdown(meta: dict[str, Any]) -> str:
    from vllm_elastic.spec.axes import AXES

    m, model = meta["machine"], meta["model"]
    axes = [a for a in AXES.values() if a.field in model]
    budgets = md_table(
        ["budget", *[a.alias for a in axes], "layers", "params", "active", "fraction",
         "GFLOP/tok"],
        [
            (
                b["name"], *[b[a.field] for a in axes], b["num_layers"], b["parameters"],
                b["active_parameters"], b["fraction"], b["matmul_flops_per_token"] / 1e9,
            )
            for b in model["budgets"]
        ],
    )  # fmt: skip
    shape = ", ".join(f"{a.alias} {model[a.field]}" for a in axes)
    lines = [
        f"- machine: {m['cpu_model']} ({m['usable_cpus']} usable CPUs, "
        f"{', '.join(m['cpu_flags'])}), {m['memory_gib']} GiB",
        f"- vLLM {m['vllm']}, torch {m['torch']}, transformers {m['transformers']}, "
        f"python {m['python']}; torch threads {m['torch_threads']}; "
        f"OMP_NUM_THREADS={m['env']['OMP_NUM_THREADS']}, "
        f"VLLM_CPU_OMP_THREADS_BIND={m['env']['VLLM_CPU_OMP_THREADS_BIND']}",
        f"- repo commit {m['git']['commit'][:10]}{' (dirty)' if m['git']['dirty'] else ''}, "
        f"vllm_elastic sources sha256 {m['git']['vllm_elastic_sources_sha256']}",
        f"- model: preset `{meta['settings']['preset']}`, {model['family']}, layers "
        f"`{model['layer_kinds']}`, {shape}, vocab {model['vocab_size']}, {model['dtype']}",
        f"- mode: {'quick' if meta['settings']['quick'] else 'full'}; "
        f"timed runs per point: {meta['settings']['repeats']} (best reported)",
    ]
    lines += [f"- note: {n}" for n in meta["settings"]["notes"]]
    return "\n".join(lines) + "\n\n" + budgets


def write_results(
    settings: Settings,
    ckpt: Checkpoint,
    name: str,
    title: str,
    data: dict[str, Any],
    sections: Sequence[str],
    plots: Sequence[Path] = (),
) -> tuple[Path, Path]:
    """``<out>/<name>.json`` (meta + data) and ``<out>/<name>.md`` (meta + sections)."""
    settings.out_dir.mkdir(parents=True, exist_ok=True)
    meta = {
        "benchmark": name,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": machine_info(),
        "settings": settings.to_json(),
        "model": ckpt.info,
    }
    json_path = settings.out_dir / f"{name}.json"
    json_path.write_text(json.dumps({"meta": meta, **data}, indent=1) + "\n")
    md = [f"# {title}", "", _meta_markdown(meta), ""]
    for section in sections:
        md += [section, ""]
    md += [f"![{p.stem}]({p.name})" for p in plots]
    md_path = settings.out_dir / f"{name}.md"
    md_path.write_text("\n".join(md).rstrip() + "\n")
    log(f"wrote {json_path} and {md_path}")
    return json_path, md_path


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def bar_plot(
    path: Path,
    categories: Sequence[str],
    series: dict[str, Sequence[float]],
    ylabel: str,
    title: str,
    target: float | None = None,
) -> Path:
    """Grouped bars, one group per category, one bar per series; optional target line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(categories)), 3.6))
    width = 0.8 / max(len(series), 1)
    for i, (label, values) in enumerate(series.items()):
        xs = [c + (i - (len(series) - 1) / 2) * width for c in range(len(categories))]
        ax.bar(xs, values, width, label=label)
    if target is not None:
        ax.axhline(target, color="red", linestyle="--", linewidth=1, label=f"target {target}")
    ax.set_xticks(range(len(categories)), [textwrap.fill(x, 14) for x in categories])
    return _save_figure(plt, fig, ax, path, ylabel, title)


def _save_figure(plt: Any, fig: Any, ax: Any, path: Path, ylabel: str, title: str) -> Path:
    """Label, lay out and write a figure as PNG; close it."""
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def line_plot(
    path: Path,
    xs: Sequence[float],
    series: dict[str, Sequence[float]],
    xlabel: str,
    ylabel: str,
    title: str,
    logx: bool = True,
) -> Path:
    """One line per series over ``xs``."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for label, values in series.items():
        ax.plot(xs, values, marker="o", label=label)
    if logx:
        ax.set_xscale("log", base=2)
    ax.set_xticks(list(xs), [str(x) for x in xs])
    ax.set_xlabel(xlabel)
    return _save_figure(plt, fig, ax, path, ylabel, title)


# --------------------------------------------------------------------------- workloads


@dataclass(frozen=True)
class Workload:
    """The fixed request batch of the throughput benchmarks."""

    num_prompts: int
    prompt_len: int
    max_tokens: int

    @classmethod
    def for_settings(cls, settings: Settings) -> Workload:
        return cls(8, 16, 8) if settings.quick else cls(64, 32, 32)

    def prompts(self, ckpt: Checkpoint) -> list[list[int]]:
        return make_prompts(self.num_prompts, self.prompt_len, ckpt.info["vocab_size"])


def workload_requests(ckpt: Checkpoint, work: Workload, budget: str | None = None) -> list[Request]:
    """The workload's requests, all at ``budget`` (None: the model's own)."""
    return requests_for(work.prompts(ckpt), sampling(work.max_tokens, budget_args(budget)))
