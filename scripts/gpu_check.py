"""The GPU check's driver: scripts/gpu_check.sh runs it (that file's header says how to use it).

It runs with the machine's own Python and needs only the standard library and PyYAML, since depthbench's
dependencies are what it is about to install. In order:

1. venv: a fresh virtual environment layered over the image's site-packages by a .pth file, so that it
   sees torch and the rest but starts without pydantic, as the GPU image does, and the image itself is
   left as it was. The rehearsal layers it over symlinks to .venv's packages less those the image lacks
   (NOT_ON_IMAGE), and fails if pydantic imports before the install.
2. install: `pip install --no-index --find-links WHEELS pydantic pytest-timeout`, then
   `pip install --no-index --find-links WHEELS --no-deps -e .` (setuptools, to build it, comes from WHEELS).
3. env; pytest -k cuda; bench of v2 ResNet-20/110/164/1001 and of a 24-block ViT (precision auto, which
   it records with the attention kernel), graphed and eager step; loss agreement of
   graphed vs eager and bf16 vs fp32 over 200 steps at 110 and 1001 layers (two generated sweeps, every
   run at once on the GPU); bench --concurrent 1,2,4; a sweep SIGKILLed mid-run and resumed, against an
   uninterrupted one trained beside it; a ResNet-20 run of 2,000 steps on the CIFAR-10 JPEGs.

Every part has its own timeout (TIMEOUTS: the GPU's add up to under 8 minutes); a part that fails or runs
out of time is recorded and the next one starts. A part whose depthbench option this checkout lacks is
recorded as n/a. The output folder gets these files and nothing else: summary.txt (a line per part),
results.jsonl (the same parts with all their numbers, a JSON object per line), env.txt, pytest.txt and
log.txt (every command, generated config and output).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import shutil
import signal
import site
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
TARBALL = "cifar10-jpeg.tar.gz"
OUT_FILES = ("summary.txt", "results.jsonl", "env.txt", "pytest.txt", "log.txt")
OUT_LIMIT = 8  # the most files the output folder may hold: a results folder small enough to copy back whole

# Distributions the GPU image lacks (ray and submitit are test extras whose tests skip without them).
# The rehearsal leaves them out of its copy of .venv, and depthbench itself, which the check installs.
NOT_ON_IMAGE = {"pydantic", "pydantic_core", "annotated_types", "typing_inspection", "pytest_timeout",
                "ray", "submitit", "depthbench"}

# Seconds per part. On the GPU they add up to under 8 minutes (tests/test_gpu_check.py checks the sum);
# they are estimates for an H100/H200 with a margin, not measurements.
TIMEOUTS: dict[str, dict[str, float]] = {
    "gpu": {
        "venv": 5, "install": 25, "env": 15, "pytest": 40,
        "bench 20": 15, "bench 110": 18, "bench 164": 18, "bench 1001": 28, "bench vit": 11,  # each, graphed and eager
        "agree": 76, "concurrent": 40, "resume": 45, "realdata": 50,
    },
    # Two busy CPU cores: generous, since a rehearsal is about the plumbing, not the time.
    "rehearse": {
        "venv": 60, "wheels": 120, "install": 180, "env": 60, "pytest": 300,
        "bench 8": 150, "bench vit": 150,
        "agree": 300, "concurrent": 300, "resume": 300, "realdata": 300,
    },
}


@dataclass(frozen=True)
class Sizes:
    """How big each part is: the paper's nets on a GPU, tiny ones for the CPU rehearsal."""

    device: str
    bench_depths: tuple[int, ...]
    bench_steps: dict[int, tuple[int, int]]  # depth -> (timed steps, warmup steps)
    bench_batch: int
    bench_precision: str  # bf16 on the GPU; the rehearsal's CPU may only emulate it, slowly
    bench_images: int  # synthetic training images: speed does not depend on what they show
    bench_vit: tuple[str, ...]  # the ViT that bench --family vit times (32x32 synthetic images), in its options
    agree_depths: tuple[int, ...]
    agree_steps: int
    agree_batch: int
    log_every: int
    width: int
    concurrent: str
    concurrent_depth: int
    resume_depth: int
    resume_steps: int
    resume_kill_at: int
    resume_checkpoint_every: int
    real_depth: int
    real_steps: int
    real_width: int
    real_subsets: tuple[int | None, int | None]  # train, test; None: the whole split
    real_min_acc: float
    synthetic: dict[str, Any] = field(default_factory=dict)
    sweeps_on_real_data: bool = True  # agreement and resume: the CIFAR-10 JPEGs when given, else synthetic

    @property
    def timeouts(self) -> dict[str, float]:
        return TIMEOUTS["gpu" if self.device == "cuda" else "rehearse"]


GPU = Sizes(
    device="cuda",
    bench_depths=(20, 110, 164, 1001),
    bench_steps={20: (20, 3), 110: (20, 3), 164: (20, 3), 1001: (5, 2)},
    bench_batch=128, bench_precision="bf16", bench_images=2048,
    # 24 blocks of width 64 on 17 tokens (16 patches and a class token), as on 8x8 digits with patches of 2.
    bench_vit=("--depth", "24", "--width", "64", "--heads", "4", "--patch", "8", "--steps", "20", "--warmup", "3"),
    agree_depths=(110, 1001), agree_steps=200, agree_batch=128, log_every=10, width=16,
    concurrent="1,2,4", concurrent_depth=20,
    resume_depth=56, resume_steps=600, resume_kill_at=300, resume_checkpoint_every=100,
    real_depth=20, real_steps=2000, real_width=16, real_subsets=(None, None), real_min_acc=0.6,
    synthetic={"name": "synthetic", "train_subset": 5000, "test_subset": 1000},
)
REHEARSAL = Sizes(
    device="cpu",
    bench_depths=(8,),  # the agreement part trains a bottleneck net (11) too
    bench_steps={8: (2, 1)},
    bench_batch=8, bench_precision="fp32", bench_images=64,
    # --no-compile: on a CPU with AMX precision auto is bf16 and compile auto would compile (as for the paper's
    # run), half a minute a bench; on the GPU auto does not compile.
    bench_vit=("--depth", "2", "--width", "16", "--heads", "2", "--patch", "8", "--steps", "2", "--warmup", "1",
               "--no-compile"),
    agree_depths=(8, 11), agree_steps=20, agree_batch=16, log_every=5, width=4,
    concurrent="1,2", concurrent_depth=8,
    resume_depth=8, resume_steps=120, resume_kill_at=40, resume_checkpoint_every=20,
    real_depth=8, real_steps=40, real_width=8, real_subsets=(1000, 200), real_min_acc=0.0,
    synthetic={"name": "synthetic", "train_subset": 512, "test_subset": 128, "image_size": 16},
    sweeps_on_real_data=False,  # 16x16 images: a quarter of the CPU time
)


# ---------------------------------------------------------------------------------------------
# Recording: summary.txt and results.jsonl grow a line per part as it ends, so a check cut short
# still leaves everything it measured.


@dataclass
class Record:
    out: Path
    failures: int = 0

    def __post_init__(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        for name in OUT_FILES:
            (self.out / name).unlink(missing_ok=True)

    def part(self, name: str, status: str, seconds: float, line: str, **data: Any) -> None:
        """status: ok, FAIL, n/a (the checkout lacks the feature) or skip (an input was not given)."""
        self.failures += status == "FAIL"
        text = f"{name:<22} {status:<4} {seconds:6.1f} s  {line}"
        print(text, flush=True)
        with open(self.out / "summary.txt", "a") as f:
            f.write(text + "\n")
        with open(self.out / "results.jsonl", "a") as f:
            f.write(json.dumps({"part": name, "status": status, "seconds": round(seconds, 2), "summary": line,
                                **data}) + "\n")

    def log(self, text: str) -> None:
        with open(self.out / "log.txt", "a") as f:
            f.write(text)

    def write(self, name: str, text: str) -> None:
        (self.out / name).write_text(text)


@dataclass(frozen=True)
class Ran:
    rc: int | None  # None: killed at its timeout
    out: str
    err: str
    seconds: float

    @property
    def ok(self) -> bool:
        return self.rc == 0

    def why(self) -> str:
        """The reason a command failed, in one line: its timeout or the last line it printed."""
        if self.rc is None:
            return f"timed out after {self.seconds:.0f} s"
        lines = [line.strip() for line in (self.err + "\n" + self.out).splitlines() if line.strip()]
        return f"exit {self.rc}: {lines[-1][:300] if lines else 'no output'}"


class Budget:
    """One timeout shared by the commands of a part."""

    def __init__(self, seconds: float) -> None:
        self.start = time.monotonic()
        self.end = self.start + seconds

    def left(self) -> float:
        return max(self.end - time.monotonic(), 1.0)

    def spent(self) -> float:
        return time.monotonic() - self.start


@dataclass
class Started:
    """A command running in its own process group, its output going to files (no pipe to fill up)."""

    cmd: list[str]
    proc: subprocess.Popen
    out: IO[str]
    err: IO[str]
    start: float


# ---------------------------------------------------------------------------------------------
# The check


class Check:
    def __init__(self, args: argparse.Namespace) -> None:
        self.rehearse: bool = args.rehearse
        self.sizes = REHEARSAL if self.rehearse else GPU
        self.t = self.sizes.timeouts
        self.rec = Record(args.out.resolve())
        self.work: Path = args.work.resolve()
        self.venv = self.work / "venv"
        self.py = self.venv / "bin" / "python"
        self.depthbench = str(self.venv / "bin" / "depthbench")
        self.runs = self.work / "runs"
        self.wheels: Path | None = args.wheels.resolve() if args.wheels else None
        self.data_arg: Path | None = args.data
        self.tarball = find_tarball(args.data)
        self.env = {
            **os.environ, "PATH": f"{self.venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
            "VIRTUAL_ENV": str(self.venv), "PYTHONUNBUFFERED": "1", "COLUMNS": "160", "NO_COLOR": "1",
            # Decoded datasets are cached outside the output folder, so that only the results come back.
            "DEPTHBENCH_DATA": os.environ.get("DEPTHBENCH_DATA")
            or str(Path(os.environ.get("TMPDIR", "/tmp")) / "depthbench-data"),
        }
        self.env.pop("PYTHONHOME", None)
        self.bench_help = ""  # `depthbench bench --help`: which of the newer options this checkout has

    # Running commands ---------------------------------------------------------------------------

    def start(self, cmd: Sequence[Any], env: dict[str, str] | None = None) -> Started:
        cmd = [str(c) for c in cmd]
        out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")  # noqa: SIM115  wait() closes them
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env or self.env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                text=True, start_new_session=True)
        return Started(cmd, proc, out, err, time.monotonic())

    def wait(self, started: Started, timeout: float, note: str = "") -> Ran:
        """Wait for ``started``; at its timeout, kill it and every process it started. Logs it to log.txt."""
        try:
            started.proc.wait(timeout=timeout)
            rc: int | None = started.proc.returncode
        except subprocess.TimeoutExpired:
            kill_group(started.proc)
            started.proc.wait()
            rc = None
        seconds = time.monotonic() - started.start
        texts = []
        for f in (started.out, started.err):
            f.seek(0)
            texts.append(f.read())
            f.close()
        ran = Ran(rc, texts[0], texts[1], seconds)
        status = note or ("timed out" if rc is None else f"exit {rc}")
        self.rec.log(f"\n$ {shlex.join(started.cmd)}\n# {status} after {seconds:.1f} s\n")
        for text, label in ((ran.out, ""), (ran.err, "# stderr:\n")):
            if text.strip():
                self.rec.log(label + text + ("" if text.endswith("\n") else "\n"))
        return ran

    def run(self, cmd: Sequence[Any], timeout: float, env: dict[str, str] | None = None) -> Ran:
        return self.wait(self.start(cmd, env), timeout)

    def sweep_cmd(self, config: dict[str, Any], out: Path, *extra: str) -> list[str]:
        """``depthbench sweep`` of ``config``, written as YAML into the scratch folder (and into log.txt)."""
        path = self.work / "configs" / f"{config['name']}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.rec.log(f"\n# {path}:\n{path.read_text()}")
        return [self.depthbench, "sweep", str(path), "--out", str(out), "--device", self.sizes.device, *extra]

    # The parts ----------------------------------------------------------------------------------

    def all(self) -> int:
        start = time.monotonic()
        for directory in (self.venv, self.runs, self.work / "configs", self.work / "image-site"):
            shutil.rmtree(directory, ignore_errors=True)
        self.runs.mkdir(parents=True)
        for step in (self.make_venv, self.get_wheels, self.install, self.environment):
            if not step():  # nothing after these can run without them
                return self.finish(start)
        for part in (self.pytest, self.bench, self.agreement, self.concurrent, self.resume, self.real_data):
            try:
                part()
            except Exception as err:  # noqa: BLE001  a bug of this script's own in one part must not cost the others
                self.rec.part(part.__name__, "FAIL", 0.0, f"the check itself failed: {err!r}")
        return self.finish(start)

    def finish(self, start: float) -> int:
        files = {p.relative_to(self.rec.out).as_posix() for p in self.rec.out.rglob("*") if p.is_file()}
        files = sorted(files | {"summary.txt", "results.jsonl"})
        status = "ok" if len(files) <= OUT_LIMIT else "FAIL"
        self.rec.part("output", status, time.monotonic() - start, f"the whole check; {len(files)} files in "
                      f"{self.rec.out} (at most {OUT_LIMIT}): {', '.join(files)}")
        print(f"{self.rec.failures} part(s) failed" if self.rec.failures else "every part passed or was not available")
        return 1 if self.rec.failures else 0

    def make_venv(self) -> bool:
        """A fresh venv that sees the image's packages, less depthbench's missing ones, as on the GPU."""
        budget = Budget(self.t["venv"])
        ran = self.run([sys.executable, "-m", "venv", "--without-pip", self.venv], budget.left())
        if not ran.ok:
            self.rec.part("venv", "FAIL", budget.spent(), f"python -m venv: {ran.why()}")
            return False
        image = list(dict.fromkeys(Path(p).resolve() for p in site.getsitepackages() if Path(p).is_dir()))
        if self.rehearse:
            image = [strip_missing(p, self.work / "image-site" / str(i)) for i, p in enumerate(image)]
        purelib = self.run([self.py, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], budget.left())
        if not purelib.ok:
            self.rec.part("venv", "FAIL", budget.spent(), f"the new venv's Python does not run: {purelib.why()}")
            return False
        # addsitedir rather than a bare path line: it also runs the image's own .pth files.
        Path(purelib.out.strip(), "gpu_check_image.pth").write_text(
            "".join(f"import site; site.addsitedir({str(p)!r})\n" for p in image))
        probe = self.run([self.py, "-c", VENV_PROBE], budget.left())
        where = f"{self.venv} over {', '.join(map(str, image))}"
        if not probe.ok:
            self.rec.part("venv", "FAIL", budget.spent(), f"{where}: the image's packages are not there: {probe.why()}")
            return False
        had_pydantic = probe.out.strip() == "True"
        if self.rehearse and had_pydantic:
            self.rec.part("venv", "FAIL", budget.spent(), f"{where}: pydantic is there before the install")
            return False
        before = "pydantic already there" if had_pydantic else "no pydantic before the install, as on the image"
        self.rec.part("venv", "ok", budget.spent(), f"{where}; {before}", venv=str(self.venv),
                      image_site=[str(p) for p in image], pydantic_before=had_pydantic)
        return True

    def get_wheels(self) -> bool:
        """The rehearsal fetches wheels for this machine's Python with the companion script."""
        if self.wheels is not None:
            if not self.wheels.is_dir():
                self.rec.part("wheels", "FAIL", 0.0, f"--wheels {self.wheels} is not a folder")
                return False
            return True
        if not self.rehearse:
            self.rec.part("wheels", "FAIL", 0.0, "no --wheels: run scripts/gpu_wheels.sh .whl where pip reaches "
                          "PyPI and pass --wheels .whl (pydantic cannot be installed offline otherwise)")
            return False
        budget = Budget(self.t["wheels"])
        self.wheels = self.work / "wheels"
        shutil.rmtree(self.wheels, ignore_errors=True)
        version = self.run([self.py, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"], budget.left())
        version = version.out.strip()
        ran = self.run(["bash", ROOT / "scripts" / "gpu_wheels.sh", "--python-version", version, self.wheels],
                       budget.left())
        names = sorted(p.name for p in self.wheels.glob("*.whl"))
        self.rec.part("wheels", "ok" if ran.ok else "FAIL", budget.spent(),
                      f"scripts/gpu_wheels.sh --python-version {version}: {len(names)} wheels" if ran.ok else ran.why(),
                      wheels=names)
        return ran.ok

    def install(self) -> bool:
        budget = Budget(self.t["install"])
        pip = [self.py, "-m", "pip", "install", "--disable-pip-version-check", "--no-index", "--find-links", self.wheels]
        # Only the wheel folder, as on the offline GPU machine: no pip.conf, no PIP_FIND_LINKS, no constraints
        # of the machine the rehearsal runs on.
        offline = {**{k: v for k, v in self.env.items() if not k.startswith("PIP_")}, "PIP_CONFIG_FILE": os.devnull}
        done = []
        for what, cmd, env in (
            ("the wheels", [*pip, "pydantic", "pytest-timeout"], offline),
            ("depthbench", [*pip, "--no-deps", "-e", ROOT], offline),  # setuptools, to build it, from the wheels too
            ("the import", [self.py, "-c", VERSIONS_PROBE], None),
            ("the depthbench command", [self.depthbench, "bench", "--help"], None),
        ):
            ran = self.run(cmd, budget.left(), env)
            if not ran.ok:
                self.rec.part("install", "FAIL", budget.spent(), f"{what}: {ran.why()}")
                return False
            done.append(ran)
        versions, self.bench_help = done[2].out.strip(), done[3].out
        self.rec.part("install", "ok", budget.spent(), f"{versions} (editable) from {self.wheels}",
                      wheels=str(self.wheels))
        return True

    def environment(self) -> bool:
        budget = Budget(self.t["env"])
        smi = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm", "--format=csv,noheader"]
        gpu = self.run(smi, budget.left()) if shutil.which("nvidia-smi") else Ran(127, "", "nvidia-smi not found", 0)
        facts = self.run([self.py, "-c", ENV_PROBE], budget.left())
        packages = self.run([self.py, "-m", "pip", "list", "--format=freeze", "--disable-pip-version-check"],
                            budget.left())
        info: dict[str, Any] = last_json(facts.out) or {}
        driver = gpu.out.strip().split(", ")[1] if gpu.ok and gpu.out.count(", ") >= 1 else None
        self.rec.write("env.txt", "\n".join([
            f"date: {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}",
            f"mode: {'rehearsal on CPU' if self.rehearse else 'GPU check'}",
            f"commit: {git_commit()}",
            f"nvidia-smi (name, driver, memory, max SM clock): {gpu.out.strip() or gpu.why()}",
            *(f"{key}: {value}" for key, value in info.items()),
            f"DEPTHBENCH_DATA: {self.env['DEPTHBENCH_DATA']}",
            "", "pip list (the venv and the image beneath it):", packages.out,
        ]))
        if not facts.ok or not info:
            self.rec.part("env", "FAIL", budget.spent(), f"torch does not load: {facts.why()}")
            return False
        line = (f"{info['gpu'] or 'no GPU'}, driver {driver or 'n/a'}; torch {info['torch']}, CUDA {info['cuda']}, "
                f"cuDNN {info['cudnn']}; Python {info['python']}")
        if not self.rehearse and not info["cuda_available"]:
            self.rec.part("env", "FAIL", budget.spent(), f"{line}: no CUDA GPU visible; --rehearse checks the rest on CPU")
            return False
        self.rec.part("env", "ok", budget.spent(), line, driver=driver, **info)
        return True

    def pytest(self) -> None:
        ran = self.run([self.py, "-m", "pytest", "-q", "-k", "cuda", "-p", "no:cacheprovider", "tests"],
                       self.t["pytest"])
        self.rec.write("pytest.txt", ran.out + ran.err)
        # Exit 5: nothing selected. Without a GPU the CUDA tests skip, so on CPU that is no failure.
        ok = ran.rc == 0 or (self.rehearse and ran.rc == 5)
        self.rec.part("pytest -k cuda", "ok" if ok else "FAIL", ran.seconds,
                      last_line(ran.out) if ran.rc is not None else ran.why(), rc=ran.rc)

    def bench(self) -> None:
        s = self.sizes
        if "--cuda-graph" in self.bench_help:
            variants = [("graphed", ["--cuda-graph"]), ("eager", ["--no-cuda-graph"])]
        else:
            self.rec.part("bench graphed/eager", "n/a", 0.0,
                          "depthbench bench has no --cuda-graph/--no-cuda-graph yet: each depth once, default step")
            variants = [("default", [])]
        for depth in s.bench_depths:
            steps, warmup = s.bench_steps[depth]
            for label, flags in variants:
                name = f"bench d{depth} {label}"
                ran = self.run([self.depthbench, "bench", "--version", "v2", "--depth", depth, "--device", s.device,
                                "--precision", s.bench_precision, "--batch-size", s.bench_batch, "--steps", steps,
                                "--warmup", warmup, "--data", "synthetic", "--train-subset", s.bench_images,
                                *flags, "--json"], self.t[f"bench {depth}"])
                result = last_json(ran.out)
                if not ran.ok or result is None:
                    self.rec.part(name, "FAIL", ran.seconds, ran.why() if not ran.ok else "no JSON printed")
                    continue
                self.rec.part(name, "ok", ran.seconds, bench_line(result), bench=result)
        if "--family" not in self.bench_help:
            self.rec.part("bench vit", "n/a", 0.0, "depthbench bench has no --family option yet")
            return
        for label, flags in variants:  # precision auto: the result records what it chose, and the attention kernel
            name = f"bench vit {label}"
            ran = self.run([self.depthbench, "bench", "--family", "vit", *s.bench_vit, "--device", s.device,
                            "--batch-size", s.bench_batch, "--data", "synthetic", "--train-subset", s.bench_images,
                            *flags, "--json"], self.t["bench vit"])
            result = last_json(ran.out)
            if not ran.ok or result is None:
                self.rec.part(name, "FAIL", ran.seconds, ran.why() if not ran.ok else "no JSON printed")
                continue
            self.rec.part(name, "ok", ran.seconds, bench_line(result), bench=result)

    def agreement(self) -> None:
        """Same runs, same seed: graphed vs eager step, bf16 vs fp32, compared on the logged train loss."""
        s = self.sizes
        budget = Budget(self.t["agree"])
        train = {"steps": s.agree_steps, "batch_size": s.agree_batch, "lr": 0.1,
                 "warmup": {"steps": s.agree_steps // 4, "lr": 0.01}, "eval_every": s.agree_steps,
                 "log_every": s.log_every, "checkpoint_every": s.agree_steps, "keep_checkpoint": "none"}

        def config(name: str, precisions: list[str], graph: bool | None) -> dict[str, Any]:
            return {"name": name, "dataset": self.dataset(), "model": {"width": s.width},
                    "train": {**train, **({} if graph is None else {"cuda_graph": graph})},
                    "success": {"metric": "test_acc", "min": 0.0},
                    "grid": {"version": ["v2"], "depth": list(s.agree_depths), "seed": [0],
                             "train.precision": precisions}}

        # train.cuda_graph says how a run executes, so it is left out of the run id: a graphed and an eager
        # run of one config are the same run, and each goes to a sweep folder of its own.
        out = self.runs / "agree"
        configs = {"graphed": config("agree-graphed", ["bf16", "fp32"], graph=True),
                   "eager": config("agree-eager", ["bf16"], graph=False)}
        probe = self.run(self.sweep_cmd(configs["eager"], out, "--dry-run"), budget.left())
        if not probe.ok and "cuda_graph" in probe.out + probe.err:
            self.rec.part("agree graphed/eager", "n/a", probe.seconds,
                          f"train.cuda_graph is not a config key in this checkout ({probe.why()})")
            configs = {"graphed": config("agree-graphed", ["bf16", "fp32"], graph=None)}
        elif not probe.ok:
            self.rec.part("agree", "FAIL", probe.seconds, f"the generated config does not load: {probe.why()}")
            return
        # Every run at once (--jobs): on one GPU they overlap, and the part takes as long as its slowest run.
        started = {label: self.start(self.sweep_cmd(cfg, out, "--jobs", str(len(s.agree_depths) * len(
            cfg["grid"]["train.precision"])))) for label, cfg in configs.items()}
        sweeps = {label: self.wait(run, budget.left()) for label, run in started.items()}
        runs = {key: run for label in sweeps for key, run in read_runs(out / f"agree-{label}", label).items()}
        pairs = [("bf16", "bf16 vs fp32", ("graphed", "bfloat16"), ("graphed", "float32"))]
        if "eager" in sweeps:
            pairs.insert(0, ("graph", "graphed vs eager", ("graphed", "bfloat16"), ("eager", "bfloat16")))
        for depth in s.agree_depths:
            for tag, what, a, b in pairs:
                run_a, run_b = runs.get((*a, depth)), runs.get((*b, depth))
                if run_a is None or run_b is None:
                    label, precision = a if run_a is None else b
                    why = sweeps[label].why() if not sweeps[label].ok else "its sweep ended without it"
                    self.rec.part(f"agree d{depth} {tag}", "FAIL", budget.spent(),
                                  f"{what}: the {label} {precision} run is missing: {why}")
                    continue
                status, line, data = compare_curves(run_a, run_b)
                self.rec.part(f"agree d{depth} {tag}", status, budget.spent(),
                              f"{what}, {s.agree_steps} steps: {line}", **data)

    def concurrent(self) -> None:
        s = self.sizes
        if "--concurrent" not in self.bench_help:
            self.rec.part("concurrent", "n/a", 0.0, "depthbench bench has no --concurrent option yet")
            return
        steps, warmup = s.bench_steps[s.concurrent_depth]
        ran = self.run([self.depthbench, "bench", "--concurrent", s.concurrent, "--version", "v2",
                        "--depth", s.concurrent_depth, "--device", s.device, "--precision", s.bench_precision,
                        "--batch-size", s.bench_batch, "--steps", steps, "--warmup", warmup,
                        "--data", "synthetic", "--train-subset", s.bench_images, "--json"], self.t["concurrent"])
        result = last_json(ran.out)
        if not ran.ok or result is None:
            self.rec.part("concurrent", "FAIL", ran.seconds, ran.why() if not ran.ok else "no JSON printed")
            return
        self.rec.part("concurrent", "ok", ran.seconds, f"v2 ResNet-{s.concurrent_depth}, {concurrent_line(result)}",
                      bench=result)

    def resume(self) -> None:
        """SIGKILL a sweep mid-run, run it again, and compare with an uninterrupted sweep of the same config."""
        s = self.sizes
        budget = Budget(self.t["resume"])
        config = {
            "name": "resume", "dataset": self.dataset(), "model": {"width": s.width},
            "train": {"steps": s.resume_steps, "batch_size": s.agree_batch, "lr": 0.1,
                      "eval_every": s.resume_steps // 2, "log_every": s.log_every * 2,
                      "checkpoint_every": s.resume_checkpoint_every},
            "success": {"metric": "test_acc", "min": 0.0},
            "grid": {"version": ["v2"], "depth": [s.resume_depth], "seed": [0]},
        }
        # The uninterrupted sweep and the one to kill start together: they train the same run in two folders.
        cmd = self.sweep_cmd(config, self.runs / "killed")
        whole = self.start(self.sweep_cmd(config, self.runs / "uninterrupted"))
        killed_at = self.kill_at_step(self.start(cmd), self.runs / "killed" / "resume", s.resume_kill_at, budget)
        again = self.run(cmd, budget.left()) if killed_at is not None else None
        whole_ran = self.wait(whole, budget.left())
        if killed_at is None:
            self.rec.part("resume", "FAIL", budget.spent(), "the sweep was not killed mid-run: it ended, or had not "
                          f"logged step {s.resume_kill_at} in time (log.txt has its output)")
            return
        reference = read_runs(self.runs / "uninterrupted" / "resume", "")
        resumed = read_runs(self.runs / "killed" / "resume", "")
        if not reference or not resumed:
            failed = whole_ran if not reference else again
            self.rec.part("resume", "FAIL", budget.spent(),
                          f"killed at step {killed_at}; a run did not finish: {failed.why()}")
            return
        (a,), (b,) = reference.values(), resumed.values()
        status, line, data = compare_curves(a, b)
        identical = a["rows"] == b["rows"]
        self.rec.part("resume", status, budget.spent(),
                      f"v2 ResNet-{s.resume_depth}, SIGKILL at step {killed_at} of {s.resume_steps} and resumed: "
                      f"{'bit-identical to' if identical else 'differs from'} the uninterrupted run; {line}",
                      killed_at=killed_at, bit_identical=identical, **data)

    def kill_at_step(self, started: Started, sweep_dir: Path, at_step: int, budget: Budget) -> int | None:
        """SIGKILL ``started`` and its children once its run has logged ``at_step``: the step it reached, or
        None when it ended first or ran out of time."""
        reached = None
        while started.proc.poll() is None and time.monotonic() < budget.end:
            logged = [row.get("step", 0) for path in sweep_dir.glob("*/metrics.jsonl") for row in read_jsonl(path)]
            if logged and max(logged) >= at_step and not any(sweep_dir.glob("*/result.json")):
                reached = max(logged)
                break
            time.sleep(0.01)
        note = f"SIGKILL after step {reached}" if reached is not None else None
        kill_group(started.proc)
        self.wait(started, 10, note or "not killed mid-run")
        return reached

    def real_data(self) -> None:
        s = self.sizes
        if self.tarball is None:
            if self.data_arg:
                self.rec.part("realdata", "FAIL", 0.0, f"--data {self.data_arg} holds no {TARBALL}")
            else:
                self.rec.part("realdata", "skip", 0.0, f"no --data folder holding {TARBALL}")
            return
        steps = s.real_steps
        config = {
            "name": "realdata", "dataset": self.dataset(real=True), "model": {"width": s.real_width},
            "train": {"steps": steps, "batch_size": 128, "lr": 0.1, "warmup": {"steps": steps // 20, "lr": 0.01},
                      "eval_every": steps // 4, "log_every": steps // 20, "checkpoint_every": steps // 2},
            "success": {"metric": "test_acc", "min": s.real_min_acc},
            "grid": {"version": ["v2"], "depth": [s.real_depth], "seed": [0]},
        }
        ran = self.run(self.sweep_cmd(config, self.runs), self.t["realdata"])
        results = [json.loads(p.read_text()) for p in (self.runs / "realdata").glob("*/result.json")]
        if not results:
            self.rec.part("realdata", "FAIL", ran.seconds, ran.why() if not ran.ok else "no result.json")
            return
        r = results[0]
        train, test = s.real_subsets
        line = (f"v2 ResNet-{s.real_depth} (width {s.real_width}), {r['steps']} steps, CIFAR-10 JPEGs "
                f"({train or 50_000} train / {test or 10_000} test): test acc {percent(r['test_acc'])}, "
                f"train loss {number(r['train_loss'], '{:.3f}')}, {number(r['wall_s'], '{:.0f}')} s training, "
                f"{number(r['img_per_s'], '{:.0f}')} img/s")
        ok = r["status"] == "completed" and r["success"]
        if not ok:
            line += f": {r['status']}, success needs test acc >= {100 * s.real_min_acc:.0f}%"
        self.rec.part("realdata", "ok" if ok else "FAIL", ran.seconds, line, result=r)

    # Inputs --------------------------------------------------------------------------------------

    def dataset(self, real: bool = False) -> dict[str, Any]:
        """The CIFAR-10 JPEGs when given (one decode, cached, serves every part), else synthetic images."""
        if self.tarball is None or not (real or self.sizes.sweeps_on_real_data):
            return dict(self.sizes.synthetic)
        train, test = self.sizes.real_subsets
        return {"name": "imagefolder", "root": str(self.tarball), "train_subset": train, "test_subset": test,
                "augment": True}


# Run by the fresh venv's Python: are the image's packages there, and is pydantic (it should not be)?
VENV_PROBE = """
import importlib.util
for name in ("torch", "torchvision", "typer", "yaml", "pytest", "pip"):
    if importlib.util.find_spec(name) is None:
        raise SystemExit(f"no {name}")
print(importlib.util.find_spec("pydantic") is not None)
"""

VERSIONS_PROBE = """
import importlib.metadata as m
print(", ".join(f"{d} {m.version(d)}" for d in ("pydantic", "pytest-timeout", "depthbench")))
"""

# The versions env.txt records, printed as JSON by the venv's Python.
ENV_PROBE = """
import json, os, platform, sys
import torch, torchvision
gpu = torch.cuda.is_available()
print(json.dumps({
    "python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
    "torch": torch.__version__, "torchvision": torchvision.__version__, "cuda": torch.version.cuda,
    "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
    "cuda_available": gpu, "gpu": torch.cuda.get_device_name() if gpu else None,
    "capability": ".".join(map(str, torch.cuda.get_device_capability())) if gpu else None,
    "gpu_memory_gb": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if gpu else None,
    "bf16_supported": torch.cuda.is_bf16_supported() if gpu else None,
}))
"""


# ---------------------------------------------------------------------------------------------
# Helpers


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def find_tarball(data: Path | None) -> Path | None:
    """``--data``: a folder holding cifar10-jpeg.tar.gz, or the tarball itself."""
    if data is None:
        return None
    path = data / TARBALL if data.is_dir() else data
    return path.resolve() if path.is_file() else None


def strip_missing(site_dir: Path, copy: Path) -> Path:
    """A folder of symlinks to ``site_dir``'s entries less the distributions the GPU image lacks."""
    copy.mkdir(parents=True)
    for entry in site_dir.iterdir():
        if top_name(entry.name) not in NOT_ON_IMAGE:
            (copy / entry.name).symlink_to(entry)
    return copy


def top_name(entry: str) -> str:
    """The distribution a site-packages entry belongs to: ``pydantic_core-2.5.dist-info`` -> pydantic_core,
    ``pytest_timeout.py`` -> pytest_timeout, ``__editable__.depthbench-0.1.0.pth`` -> depthbench."""
    if entry.startswith("__editable__"):  # an editable install's .pth file and finder module
        return "depthbench" if "depthbench" in entry else entry
    return re.split(r"[-.]", entry, maxsplit=1)[0].lower()


def git_commit() -> str:
    try:
        ran = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], check=False, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown (no git)"
    return ran.stdout.strip() or "unknown (no .git in this copy)"


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def last_json(text: str) -> dict[str, Any] | None:
    for line in reversed(text.splitlines()):
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return rows
    for line in lines:
        try:
            rows.append(json.loads(line))
        except ValueError:  # a line being written
            pass
    return rows


def read_runs(sweep_dir: Path, label: str) -> dict[tuple[Any, ...], dict[str, Any]]:
    """The finished runs of a sweep folder: (label, precision, depth) -> result.json and its metrics rows."""
    runs = {}
    for result_path in sorted(sweep_dir.glob("*/result.json")):
        result = json.loads(result_path.read_text())
        rows = [{k: v for k, v in row.items() if k not in ("img_per_s", "elapsed_s")}  # timings differ every run
                for row in read_jsonl(result_path.parent / "metrics.jsonl")]
        runs[(label, result["precision"], result["depth"])] = {"result": result, "rows": rows}
    return runs


def compare_curves(a: dict[str, Any], b: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
    """Two runs' logged train loss, step by step: (status, one line, numbers)."""
    loss_a = {row["step"]: row["train_loss"] for row in a["rows"]}
    loss_b = {row["step"]: row["train_loss"] for row in b["rows"]}
    steps = sorted(set(loss_a) & set(loss_b))
    finite = [s for s in steps if is_number(loss_a[s]) and is_number(loss_b[s])]
    data = {"steps": steps, "loss_a": [loss_a[s] for s in steps], "loss_b": [loss_b[s] for s in steps],
            "status_a": a["result"]["status"], "status_b": b["result"]["status"],
            "test_acc_a": a["result"].get("test_acc"), "test_acc_b": b["result"].get("test_acc")}
    if not steps or len(finite) < len(steps) or set(loss_a) != set(loss_b):
        return "FAIL", (f"curves do not match up: {len(loss_a)} and {len(loss_b)} log points, "
                        f"{len(steps) - len(finite)} not finite ({data['status_a']}, {data['status_b']})"), data
    diffs = [abs(loss_a[s] - loss_b[s]) for s in steps]
    worst = steps[diffs.index(max(diffs))]
    data.update(max_abs_diff=max(diffs), at_step=worst, final_a=loss_a[steps[-1]], final_b=loss_b[steps[-1]])
    line = (f"max |Δ train loss| {max(diffs):.4f} (step {worst}) over {len(steps)} log points; "
            f"final {loss_a[steps[-1]]:.4f} vs {loss_b[steps[-1]]:.4f}")
    return "ok", line, data


def number(value: Any, fmt: str) -> str:
    return fmt.format(value) if is_number(value) else "n/a"


def percent(value: Any) -> str:
    return f"{100 * value:.1f}%" if is_number(value) else "n/a"


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def bench_line(r: dict[str, Any]) -> str:
    """One bench JSON in a line: speed, memory, the paper's run time, and the graph's host-side figures."""
    step_ms = 1000 * r["step_s"] if is_number(r.get("step_s")) else None
    return (f"{number(step_ms, '{:.1f}')} ms/step, {number(r.get('img_per_s'), '{:.0f}')} img/s, "
            f"peak {number(r.get('peak_mem_mb'), '{:.0f}')} MB, 64k steps {number(r.get('paper_run_h'), '{:.2f}')} h, "
            f"host {number(r.get('host_ms_per_step'), '{:.2f}')} ms/step, "
            f"{number(r.get('kernels_per_step'), '{:.0f}')} kernels/step ({r.get('precision')}, "
            + (f"attention {r['attention']}, " if r.get("attention") else "") +
            f"batch {r.get('batch_size')})")


def concurrent_line(r: dict[str, Any]) -> str:
    """bench --concurrent's JSON in a line: the total images/s of each number of runs at once, and its verdict."""
    rows = [f"{row.get('runs')} at once {number(row.get('total_img_per_s'), '{:.0f}')} img/s "
            f"({number(row.get('speedup'), '{:.2f}')}x)" for row in r.get("rows") or [] if isinstance(row, dict)]
    if not rows:
        return f"no rows in its JSON: {json.dumps(r)[:200]}"
    return "total " + ", ".join(rows) + (f"; {r['verdict']}" if r.get("verdict") else "")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/gpu_check.sh",
        description="Install depthbench offline into a fresh venv on a bare GPU machine and check it on CUDA: "
                    "tests, speed, loss agreement, concurrency, kill-and-resume, a real-data run (under 8 minutes).",
        epilog="e.g. scripts/gpu_check.sh --wheels .whl --data DIR; scripts/gpu_check.sh --rehearse. "
               "docs/gpu.md says more.")
    parser.add_argument("--wheels", type=Path, help="folder of wheels from scripts/gpu_wheels.sh (e.g. .whl)")
    parser.add_argument("--data", type=Path, help=f"folder holding {TARBALL} (or the file itself)")
    parser.add_argument("--out", type=Path, help="results folder (default $OUT, else ./gpu-check)")
    parser.add_argument("--work", type=Path, help="scratch folder: venv, configs, run folders "
                                                  "(default $TMPDIR/depthbench-gpu-check)")
    parser.add_argument("--rehearse", action="store_true",
                        help="the same check on CPU with tiny sizes, in a fresh venv without pydantic")
    args = parser.parse_args(argv)
    suffix = "-rehearsal" if args.rehearse else ""
    if args.out is None:
        args.out = Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / f"gpu-check{suffix}"
    if args.work is None:
        args.work = Path(os.environ.get("TMPDIR", "/tmp")) / f"depthbench-gpu-check{suffix}"
    if args.rehearse and args.data is None:
        shared = ROOT.parent / "shared" / "data"
        args.data = shared if (shared / TARBALL).is_file() else None
    return Check(args).all()


if __name__ == "__main__":
    sys.exit(main())
