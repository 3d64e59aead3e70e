"""``flatness bench gpu``: correctness, speed and memory of every backend and method on one GPU.

One command, sized to run in at most 8 minutes on one GPU (``--budget-s``, default 420 s, is
the bench's own limit: correctness always runs in full first; a timing block that would overrun
the budget is shrunk or skipped and recorded as skipped), in this order:

1. **Correctness** (:mod:`.gpu_checks`): the FA penalty's Tr(H²) estimate and gradient by every
   backend on the paper's MLP (3072-512-256-100), ResNet-20 with BatchNorm and the CPU
   protocol's ViT (dim 96, depth 4), SAM's and NRS's updates, λ_max and Tr(H) of a small
   ResNet — in float32 on the GPU with TF32 off and on, against float64 on the CPU from the same
   weights and probes, with the tolerances stated there.
2. **The ``gpu`` protocol of cifar100-resnet** (:func:`.gpu_timing.time_protocol_epoch`): a fixed
   number of training steps of ResNet-18 at B = 128 for ``none``, FA (first-order, 5 probes
   every 10 steps: the task's default) and SAM through the training loop, and the projected
   time of the full 200-epoch protocol. Real CIFAR-100 when the data directory has it, else
   synthetic images of its shape (the JSON says which).
3. **Step timing** (:func:`.gpu_timing.time_block`): a plain step, FA (M = 1 every step, M = 5
   every 10 steps; the library's default backend), first-order FA (k = 1 and k = 10), K-FAC FA
   (MLP only: Linear layers), SAM, GNP, NRS and the curvature regulariser on the MLP (B = 128),
   ResNet-18 (B = 128) and ViT-Ti (B = 256), in float32 (PyTorch's default TF32 flags, recorded)
   and under bf16 autocast: milliseconds per step, ratio to the plain step, peak memory.

Everything goes into one JSON file (device, driver, CUDA, cuDNN and torch versions, every
figure); the command exits with status 1 after writing it if any correctness case failed.
``dry_run`` runs the same code on the CPU at tiny sizes (the float32 side on the CPU too) in
well under a minute: the CI's check that the command works before a GPU is available.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ....utils import atomic_write_bytes
from ...world.architectures import ResNet, VisionTransformer, cifar_resnet, resnet18, vit_small, vit_tiny
from ...world.errors import SettingError
from ...world.models import mlp
from ...world.tasks import get_task
from ..platforms import environment
from . import platform_facts
from .gpu_checks import PRECISIONS, References, measure_case, penalty_case, tolerance_notes, update_case
from .gpu_timing import TIMED_CASES, Budget, TimingPlan, time_block, time_protocol_epoch

__all__ = ["GpuSizes", "FULL", "DRY", "run_gpu_bench", "default_out", "summary_lines"]

Builder = Callable[[], nn.Module]

# Backends of each correctness model, and why the others do not apply to it.
BACKENDS: dict[str, tuple[str, ...]] = {
    "mlp": ("autograd", "layerwise", "finite-difference", "kfac", "cv"),
    "resnet20": ("autograd", "finite-difference", "cv"),
    "vit": ("autograd", "finite-difference", "cv"),
}
NOT_APPLICABLE: dict[str, dict[str, str]] = {
    "resnet20": {
        "layerwise": "closed form for an nn.Sequential of Linear layers and activations only",
        "kfac": "K-FAC covers Linear layers only (convolutions, BatchNorm)",
    },
    "vit": {
        "layerwise": "closed form for an nn.Sequential of Linear layers and activations only",
        "kfac": "K-FAC covers Linear layers only (patch convolution, LayerNorm, embeddings)",
    },
}
UPDATE_METHODS: dict[str, dict[str, Any]] = {
    "sam": {"rho": 0.05},
    "nrs": {"eps": 0.1, "alpha": 1.0, "seed": 0},
}
PRECISION_NAMES = {"float32": "float32", "bf16": "bf16 autocast"}


@dataclass(frozen=True)
class GpuSizes:
    """The models and sizes of one run of the bench (:data:`FULL` or the dry run's :data:`DRY`)."""

    check_models: dict[str, Builder]
    check_batch: dict[str, int]
    check_features: dict[str, int]  # input width of each correctness model (and "measure")
    classes: int
    check_probes: int
    update_models: dict[str, Builder]
    measure_model: Builder
    measure_batch: int
    trace_matvecs: int
    timing_models: dict[str, tuple[Builder, int, str]]  # label -> (builder, batch, task for the optimizer)
    timing_features: int
    timing_plan: TimingPlan
    epoch_steps: int
    epoch_warmup: int
    epoch_model: Builder | None = None
    epoch_batch: int | None = None
    describe: dict[str, str] = field(default_factory=dict)


FULL = GpuSizes(
    check_models={
        "mlp": lambda: mlp(3072, 100, (512, 256), 0.3, 0.5),
        "resnet20": lambda: cifar_resnet(20, 16, 100),
        "vit": lambda: vit_small(100),
    },
    check_batch={"mlp": 32, "resnet20": 16, "vit": 16},
    check_features={"mlp": 3072, "resnet20": 3072, "vit": 3072, "measure": 3072},
    classes=100,
    check_probes=2,
    update_models={"mlp": lambda: mlp(3072, 100, (512, 256), 0.0, 0.5), "resnet20": lambda: cifar_resnet(20, 16, 100)},
    measure_model=lambda: cifar_resnet(8, 8, 100),
    measure_batch=64,
    trace_matvecs=20,
    timing_models={
        "mlp": (lambda: get_task("cifar100-mlp").build_model(), 128, "cifar100-mlp"),
        "resnet18": (lambda: resnet18(100), 128, "cifar100-resnet"),
        "vit_tiny": (lambda: vit_tiny(100), 256, "cifar100-vit"),
    },
    timing_features=3072,
    timing_plan=TimingPlan(warmup=2, rounds=3, reps=3),
    epoch_steps=40,
    epoch_warmup=5,
    describe={
        "mlp": "the paper's CIFAR-100 MLP 3072-512-256-100 (ReLU, dropout 0.3, weights ×0.5)",
        "resnet20": "ResNet-20, width 16, BatchNorm (option-A shortcuts)",
        "vit": "ViT of the cpu protocol: patch 4, dim 96, depth 4, 3 heads, MLP ratio 2",
        "updates": "SAM and NRS on the MLP without dropout (the CPU and CUDA dropout streams differ) and ResNet-20",
        "measure": "ResNet-8, width 8, BatchNorm; deployed (eval-mode) function",
        "resnet18": "ResNet-18 (CIFAR variant), SGD momentum 0.9 as the gpu protocol",
        "vit_tiny": "ViT-Ti: dim 192, depth 12, 3 heads, MLP ratio 4; AdamW as the gpu protocol",
    },
)

DRY_IMAGE = (3, 8, 8)  # 8×8 images: the dry run's convolutions and attention cost next to nothing
DRY = GpuSizes(
    check_models={
        "mlp": lambda: mlp(48, 10, (16, 8), 0.3, 0.5),
        "resnet20": lambda: ResNet([1, 1, 1], [2, 4, 8], 10, "A", image_shape=DRY_IMAGE),
        "vit": lambda: VisionTransformer(10, dim=8, depth=1, heads=2, mlp_ratio=2.0, image_shape=DRY_IMAGE),
    },
    check_batch={"mlp": 8, "resnet20": 4, "vit": 4},
    check_features={"mlp": 48, "resnet20": 192, "vit": 192, "measure": 48},
    classes=10,
    check_probes=1,
    update_models={
        "mlp": lambda: mlp(48, 10, (16, 8), 0.0, 0.5),
        "resnet20": lambda: ResNet([1, 1, 1], [2, 4, 8], 10, "A", image_shape=DRY_IMAGE),
    },
    measure_model=lambda: mlp(48, 10, (8,), 0.0),
    measure_batch=8,
    trace_matvecs=4,
    timing_models={
        "mlp": (lambda: mlp(192, 100, (16, 8), 0.3, 0.5), 8, "cifar100-mlp"),
        "resnet18": (lambda: ResNet([1, 1, 1, 1], [2, 4, 8, 16], 100, "B", image_shape=DRY_IMAGE),
                     8, "cifar100-resnet"),
        "vit_tiny": (lambda: vit_tiny(100, dim=8, depth=1, heads=2, mlp_ratio=2.0, image_shape=DRY_IMAGE),
                     8, "cifar100-vit"),
    },
    timing_features=192,
    timing_plan=TimingPlan(warmup=0, rounds=1, reps=1, probe_warmup=0),
    epoch_steps=2,
    epoch_warmup=1,
    epoch_model=lambda: ResNet([1, 1, 1, 1], [2, 4, 8, 16], 100, "B"),
    epoch_batch=8,
    describe={"all": "tiny stand-ins of the full run's models (a dry run checks the code, not the figures)"},
)


def _inputs(sizes: GpuSizes, name: str, batch: int, seed: int) -> tuple[Tensor, Tensor]:
    """A synthetic batch for correctness model ``name``.

    Images flattened, as the image models take them too.
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, sizes.check_features[name], generator=gen)
    return x, torch.randint(0, sizes.classes, (batch,), generator=gen)


def _seeded(build: Builder, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return build()


def run_correctness(sizes: GpuSizes, device: torch.device, seed: int, fault: str | None,
                    log: Callable[[str], None]) -> dict[str, Any]:
    """Every correctness case (:mod:`.gpu_checks`), each at both TF32 settings."""
    refs = References()
    cases: list[dict[str, Any]] = []

    def add(case: dict[str, Any]) -> None:
        cases.append(case)
        log(_case_line(case))

    for name, build in sizes.check_models.items():
        model = _seeded(build, seed)
        x, y = _inputs(sizes, name, sizes.check_batch[name], seed)
        for label in BACKENDS[name]:
            for precision in PRECISIONS:
                add(penalty_case(refs, name, model, x, y, label, precision, device, sizes.check_probes, seed, fault))
    for name, build in sizes.update_models.items():
        model = _seeded(build, seed)
        x, y = _inputs(sizes, name, sizes.check_batch[name], seed)
        for method, hp in UPDATE_METHODS.items():
            for precision in PRECISIONS:
                add(update_case(refs, name, model, x, y, method, hp, precision, device, fault))
    model = _seeded(sizes.measure_model, seed)
    x, y = _inputs(sizes, "measure", sizes.measure_batch, seed)
    for measure in ("lambda_max", "trace"):
        for precision in PRECISIONS:
            add(measure_case(refs, "small", model, x, y, measure, precision, device, sizes.trace_matvecs, fault))
    failures = [c["id"] for c in cases if not c.get("passed")]
    return {
        "passed": not failures,
        "failures": failures,
        "cases": cases,
        "not_applicable": NOT_APPLICABLE,
        "tolerances": tolerance_notes(),
    }


def run_timing(sizes: GpuSizes, device: torch.device, seed: int, budget: Budget,
               log: Callable[[str], None], blocks: dict[str, Any],
               after_block: Callable[[], None] = lambda: None) -> dict[str, Any]:
    """Every timing block into ``blocks``, float32 first (all models), then bf16 autocast.

    ``after_block()`` after each.
    """
    for precision in ("float32", "bf16"):
        for label, (build, batch, task_name) in sizes.timing_models.items():
            config = get_task(task_name).protocol("gpu" if task_name != "cifar100-mlp" else "cpu")
            cases = [c for c in TIMED_CASES if c != "fa_kfac_k1" or label == "mlp"]
            block = time_block(label, build, config, batch, sizes.timing_features, cases, device, precision,
                               sizes.timing_plan, budget, seed)
            block["optimizer"] = config.optimizer
            block["tf32"] = {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32}
            blocks[f"{label}_{precision}"] = block
            log(_block_line(f"{label}_{precision}", block))
            after_block()
    return blocks


def device_facts(device: torch.device) -> dict[str, Any]:
    """The device and software the figures come from."""
    facts: dict[str, Any] = {
        "type": device.type,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "tf32_defaults": {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32},
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        facts.update(
            name=props.name,
            capability=f"{props.major}.{props.minor}",
            memory_gib=props.total_memory / 2**30,
            multiprocessors=props.multi_processor_count,
            driver=_driver_version(),
        )
    else:
        facts.update(name="cpu (dry run)", driver=None)
    return facts


def _driver_version() -> str | None:
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30, check=True)
        return done.stdout.strip().splitlines()[0] or None
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def source_digest() -> str:
    """SHA-256 of the package's Python sources: names the code where no git checkout came along."""
    root = Path(__file__).resolve().parents[3]
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def default_out(device: torch.device, dry: bool) -> Path:
    """``benchmarks/gpu-<date>-<device>.json`` (``-dryrun`` for a dry run)."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"
    date = datetime.date.today().isoformat()
    return Path("benchmarks") / f"gpu-{date}-{slug}{'-dryrun' if dry else ''}.json"


def run_gpu_bench(
    out: str | Path | None = None, budget_s: float = 420.0, data_dir: str | None = None,
    dry_run: bool = False, seed: int = 0, fault: str | None = None,
    log: Callable[[str], None] = print,
) -> tuple[dict[str, Any], Path]:
    """Run the bench (module docs), write the JSON and return ``(result, path)``.

    Without CUDA and without ``dry_run``: a :class:`~flatness.FlatnessError` (nothing is run).
    """
    if not dry_run and not torch.cuda.is_available():
        raise SettingError("flatness bench gpu needs a CUDA device (torch sees none); "
                           "`dry_run` runs it on the CPU at tiny sizes", "dry_run")
    if budget_s <= 0:
        raise SettingError(f"`budget_s` must be > 0, got {budget_s}", "budget_s")
    budget = Budget(budget_s)
    device = torch.device("cpu" if dry_run else "cuda")
    sizes = DRY if dry_run else FULL
    path = Path(out) if out is not None else default_out(device, dry_run)
    if path.is_dir():
        path = path / default_out(device, dry_run).name
    path.parent.mkdir(parents=True, exist_ok=True)  # an unwritable place fails now, not after the run
    threads = torch.get_num_threads()
    if dry_run:
        torch.set_num_threads(1)  # tiny models: a second thread only waits (and a shared CI machine)
    try:
        result = _run(sizes, device, budget, data_dir, dry_run, seed, fault, log, lambda r: _write(path, r))
    finally:
        torch.set_num_threads(threads)
    return result, path


def _write(path: Path, result: dict[str, Any]) -> None:
    text = json.dumps(result, indent=1, sort_keys=True, default=str) + "\n"
    atomic_write_bytes(path, lambda fh: fh.write(text.encode()))


def _run(sizes: GpuSizes, device: torch.device, budget: Budget, data_dir: str | None, dry_run: bool,
         seed: int, fault: str | None, log: Callable[[str], None],
         save: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """The three phases.

    ``save`` writes the JSON after each (``"complete": false`` until the last), so that a run
    stopped from outside keeps what it measured.
    """
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    result: dict[str, Any] = {
        "benchmark": "gpu",
        "dry_run": dry_run,
        "started_at": started,
        "budget_s": budget.seconds,
        "device": device_facts(device),
        "environment": environment(device),
        "platform": platform_facts(),
        "source_sha256": source_digest(),
        "sizes": sizes.describe,
    }
    log(f"flatness bench gpu on {result['device']['name']} (torch {torch.__version__}, CUDA {torch.version.cuda})")
    log("correctness: device float32 (TF32 off, on) against float64 on the CPU")
    result["complete"] = False
    result["correctness"] = run_correctness(sizes, device, seed, fault, log)
    phases = {"correctness": budget.elapsed()}
    result["ok"] = bool(result["correctness"]["passed"])
    save(result)
    log(f"protocol: cifar100-resnet gpu, {sizes.epoch_steps} steps per method")
    result["protocol_epoch"] = time_protocol_epoch(
        sizes.epoch_steps, sizes.epoch_warmup, device, data_dir, seed, budget, build=sizes.epoch_model,
        batch=sizes.epoch_batch, look_for_data=not dry_run or data_dir is not None,
    )
    phases["protocol_epoch"] = budget.elapsed() - sum(phases.values())
    save(result)
    log("step timing (float32, then bf16 autocast)")
    result["timing"] = {}
    run_timing(sizes, device, seed, budget, log, result["timing"], lambda: save(result))
    phases["timing"] = budget.elapsed() - sum(phases.values())
    result["phase_s"] = phases
    result["elapsed_s"] = budget.elapsed()
    result["finished_at"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    result["complete"] = True
    save(result)
    return result


def _case_line(case: dict[str, Any]) -> str:
    verdict = "ok  " if case.get("passed") else "FAIL"
    if "error" in case:
        return f"  {verdict} {case['id']}: {case['error']}"
    parts = [f"{k[:-8]} {case[k]:.1e} (≤ {case[k[:-8] + '_rtol']:.0e})" for k in case if k.endswith("_rel_err")
             and not k.startswith("cpu_")]
    warned = f"; warned: {' | '.join(case['warnings'])}" if case.get("warnings") else ""
    return f"  {verdict} {case['id']}: " + ", ".join(parts) + warned


def _block_line(key: str, block: dict[str, Any]) -> str:
    if block.get("status") != "timed":
        return f"  {key}: skipped ({block.get('reason')})"
    cases = [c for c in block["cases"] if c != "plain" and f"{c}_ratio" in block]
    ratios = ", ".join(f"{c} {block[c + '_ratio']:.2f}" for c in cases)
    return f"  {key}: plain {block['plain_ms']:.2f} ms; ratios: {ratios}"


def summary_lines(result: dict[str, Any], path: Path) -> list[str]:
    """The closing lines: verdict, protocol projection, where the JSON is."""
    lines = []
    correctness = result["correctness"]
    total = len(correctness["cases"])
    failed = correctness["failures"]
    lines.append(f"correctness: {total - len(failed)} of {total} cases passed"
                 + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    epoch = result["protocol_epoch"]
    for name in ("none", "fa", "sam"):
        entry = epoch.get(name, {})
        if entry.get("status") == "timed":
            lines.append(
                f"protocol {epoch['task']} gpu ({epoch['model']}, {epoch['protocol_epochs']} epochs, data: "
                f"{epoch['data'].split(' (')[0]}) {name}: {entry['step_ms']:.1f} ms/step, projected "
                f"{entry['projected_hours']:.2f} h ({entry['projected_train_hours']:.2f} h training)"
            )
        else:
            lines.append(f"protocol {name}: {entry.get('status')} ({entry.get('reason') or entry.get('error')})")
    skipped = [k for k, b in result["timing"].items() if b.get("status") != "timed"]
    if skipped:
        lines.append(f"timing blocks not timed: {', '.join(skipped)}")
    refused = [f"{k}/{case}" for k, b in result["timing"].items() for case in b.get("errors", {})]
    if refused:
        lines.append(f"timing cases that raised (errors in the JSON): {', '.join(refused)}")
    lines.append(f"elapsed {result['elapsed_s']:.0f} s of a {result['budget_s']:.0f} s budget; JSON: {path}")
    return lines
