#!/usr/bin/env bash
# One bounded GPU check of stein_core and the training loop (issue 12), for a machine with CUDA but without the
# orchestration stack (no Prefect, Ray, MLflow, DVC): everything here imports only stein_core, tasks.{config,
# families, training, evaluation, io, sampling, bench}, flows.registry and the bench/ scripts that need none of them.
#
#   bash bench/gpu_check.sh 2>&1 | tee "$OUT/log"      (OUT: where results go; default bench/out/gpu_check)
#
# Sections, in this order, each under `timeout` and under one overall deadline (GPU_CHECK_BUDGET s, default 360):
#   env        nvidia-smi, torch/CUDA versions and device properties
#   pytest_gpu pytest -m gpu tests/unit and the loop's sync test (the CUDA cases of the sampler and goodness-of-fit
#              tests; issue 24: a training step syncs the host only at its log and checkpoint boundaries)
#   train      tasks.stages.train.loop.fit: digits (conv NCSN) and gmm2d (MLP NCSN), cuda vs CPU; every other pipeline's
#              family a few steps on cuda; a cuda-trained model saved and loaded on the CPU and on cuda
#   sample     annealed Langevin from models/digits/model.pt, cuda vs CPU
#   evalckpt   tasks.stages.evaluate.metrics.evaluate_checkpoint (the evaluate stage's per-checkpoint task), cuda vs CPU
#   ksd        bench/bench_ksd.py on cuda (full grid) and on the CPU (--quick grid): the ratio to one n x n x d GEMM
#   mmd        bench/bench_mmd.py: the blocked MMD beside a torch.cdist one, cuda and CPU (issue 24)
#   compile    bench/bench_training_loop.py --compile: ncsn's MLP and conv U-Net, train.compile off and on (issue 24)
#   samplers   bench/bench_samplers.py --quick, cuda and CPU
#   sm         bench/bench_score_matching.py (d 2, 32, 512), cuda and CPU
#   gen        bench/bench_generators.py (n 100, 1000; d 2, 64), cuda and CPU: the median heuristic's share of a step
#   features   bench/bench_features.py (LeNet and the random-weight FID Inception), cuda and CPU
#   fid        stein_core.frechet_distance at d = 2048, cuda vs CPU (float64)
#   unit       the rest of tests/unit (not slow, not gpu) on this machine's Python, pytest-xdist if present
# train, sample and evalckpt read data/ and models/ (DVC outputs, git-ignored: carry them). GPU_CHECK_DEVICE=cpu
# runs every section on the CPU (a dry run on a machine without a GPU).
# The JSON of every section is gathered into $OUT/results.json; $OUT/sections.tsv lists each section's exit code
# and seconds. CPU runs use all cores' threads (the device's CPU at its best) unless stated.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out/gpu_check}
mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/gpu_check.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
PY=${PY:-python3}
DEV=${GPU_CHECK_DEVICE:-cuda}  # cpu: a dry run of every section on a machine without a GPU
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
T0=$(date +%s)
DEADLINE=$((T0 + ${GPU_CHECK_BUDGET:-480}))
NCPU=$(nproc)
: > "$OUT/sections.tsv"

# pydantic and pydantic-settings (tasks.config.sections, tasks.infra.runtime) travel as wheels in .whl/ where they are missing
if ! $PY -c "import pydantic, pydantic_settings" 2>/dev/null; then
    if ls .whl/*.whl >/dev/null 2>&1; then
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
            && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

section() {  # section NAME LIMIT_S CMD...: run CMD under min(LIMIT_S, time to the deadline)
    local name=$1 limit=$2 left rc t
    shift 2
    left=$((DEADLINE - $(date +%s)))
    if [ "$left" -lt 15 ]; then
        echo "=== $name: SKIPPED (deadline)"; printf '%s\tskipped\t0\n' "$name" >> "$OUT/sections.tsv"; return
    fi
    [ "$left" -lt "$limit" ] && limit=$left
    echo "=== $name (limit ${limit}s, $(( $(date +%s) - T0 ))s in)"
    t=$(date +%s%N)
    timeout --kill-after=5 "$limit" "$@"
    rc=$?
    t=$(( ($(date +%s%N) - t) / 1000000 ))
    t=$(printf '%d.%03d' $((t / 1000)) $((t % 1000)))
    echo "=== $name: rc=$rc, ${t}s"
    printf '%s\t%s\t%s\n' "$name" "$rc" "$t" >> "$OUT/sections.tsv"
}

env_info() {
    nvidia-smi || true
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
    lscpu | grep -E '^(Model name|CPU\(s\)|Thread|Core)' || true
    $PY - <<'EOF'
import json, os, platform, sys
import numpy, torch
out = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
       "cudnn": torch.backends.cudnn.version(), "numpy": numpy.__version__, "cpu_count": os.cpu_count(),
       "torch_threads": torch.get_num_threads(), "machine": platform.machine(), "cuda_available": torch.cuda.is_available()}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    out |= {"gpu": p.name, "gpu_memory_gib": round(p.total_memory / 2**30, 1), "sm_count": p.multi_processor_count,
            "capability": f"{p.major}.{p.minor}"}
try:
    import pydantic, pydantic_settings
    out["pydantic"] = f"{pydantic.VERSION} (settings {pydantic_settings.__version__}) from {os.path.dirname(pydantic.__file__)}"
except ImportError as exc:
    out["pydantic"] = f"missing: {exc}"
for mod in ("prefect", "ray", "mlflow", "dvc"):
    try:
        __import__(mod)
        out[mod] = "present"
    except ImportError:
        out[mod] = "missing"
print(json.dumps(out, indent=1))
open(os.path.join(os.environ["WORK"], "env.json"), "w").write(json.dumps(out))
EOF
}
export WORK DEV PY
export -f env_info

# ------------------------------------------------------------------------------------------------------ sections
section env 60 bash -c env_info

section pytest_gpu 150 $PY -m pytest -m gpu tests/unit tests/stages/test_sync_free_loop.py -p no:cacheprovider -q -rA --junitxml="$OUT/pytest_gpu.xml"

cat > "$WORK/train.py" <<'EOF'
import json, os, statistics, tempfile, time
from pathlib import Path
import torch
from flows.registry import PIPELINES, get_pipeline
from tasks.families import FAMILIES, load_model, model_payload
from tasks.data.io import read_dataset, save_torch
from tasks.stages.train.loop import fit

REPO, WORK, DEV = Path.cwd(), Path(os.environ["WORK"]), os.environ["DEV"]
ncpu = os.cpu_count()
SCALE = float(os.environ.get("GPU_CHECK_SCALE", "1"))  # < 1: fewer steps, for a dry run
out = {"rows": [], "smoke": [], "threads_cpu": ncpu}

def data_of(name):
    p = get_pipeline(name).paths(REPO)
    if p.train.is_file():
        ds = read_dataset(p.train)
        return torch.from_numpy(ds.x), tuple(ds.shape), "data/" + p.source
    raise SystemExit(f"no {p.train}: carry data/ (the prepare stage needs Prefect)")

def timed_fit(name, device, steps, threads):
    steps = max(2, int(steps * SCALE))
    cfg = get_pipeline(name).load_config(REPO).train
    torch.set_num_threads(threads)
    x, shape, src = data_of(name)
    fam = FAMILIES[cfg.family]
    warm = cfg.model_copy(update={"n_steps": 10, "checkpoint_every": 10, "log_every": 10})
    fit(fam, warm, x.to(device), shape, device=torch.device(device))  # warm-up: cuDNN/cuBLAS handles, allocator
    run = cfg.model_copy(update={"n_steps": steps, "checkpoint_every": steps, "log_every": min(cfg.log_every, steps)})
    t0 = time.perf_counter()
    state = fit(fam, run, x.to(device), shape, device=torch.device(device))
    s = time.perf_counter() - t0
    last = {k: v for k, v in state["history"][-1].items() if k != "step"}
    row = {"pipeline": name, "family": cfg.family, "device": device, "threads": threads, "steps": steps,
           "batch": cfg.batch_size, "seconds": s, "ms_per_step": 1000 * s / steps,
           "samples_per_s": steps * cfg.batch_size / s, "last_metrics": last, "data": src}
    print(f"fit {name:<10} {device:<4} {threads:>2} thr: {steps} steps in {s:.2f} s = {row['ms_per_step']:.2f} ms/step, "
          f"{row['samples_per_s']:,.0f} samples/s; {last}", flush=True)
    out["rows"].append(row)
    return cfg, fam, state

# digits (the conv U-Net, batch 128) and gmm2d (the MLP, batch 256): cuda vs CPU
cfg, fam, state = timed_fit("digits", DEV, 600, 1)
timed_fit("digits", "cpu", 150, ncpu)
timed_fit("gmm2d", DEV, 1000, 1)
timed_fit("gmm2d", "cpu", 1000, 1)
timed_fit("gmm2d", "cpu", 1000, ncpu)

# a cuda-trained state -> model checkpoint -> loaded on the CPU and on cuda (what the sample stage does after a
# GPU training): same weights, every tensor on the device asked for, the score agrees
with tempfile.TemporaryDirectory() as d:
    path = Path(d) / "model.pt"
    save_torch(path, model_payload(fam, cfg, state))
    m_cpu, m_gpu = load_model(path, device="cpu"), load_model(path, device=DEV)
    x = torch.rand(64, 64)
    with torch.no_grad():
        s_cpu, s_gpu = m_cpu.score(x), m_gpu.score(x.to(DEV))
    out["roundtrip"] = {"score_max_abs_diff": float((s_cpu - s_gpu.cpu()).abs().max()),
                        "score_max_abs": float(s_cpu.abs().max()), "gpu_score_device": str(s_gpu.device)}
    print("cuda-trained digits model loaded on cpu and cuda:", out["roundtrip"], flush=True)

# every other pipeline's family on cuda, a few steps each (the GPU paths of the generator families)
for name in sorted(PIPELINES):
    if name in ("digits", "gmm2d"):
        continue
    cfg = get_pipeline(name).load_config(REPO)
    if not hasattr(cfg, "train"):
        continue
    t0 = time.perf_counter()
    try:
        x, shape, src = data_of(name)
        k = max(2, int(40 * SCALE))
        run = cfg.train.model_copy(update={"n_steps": k, "checkpoint_every": k, "log_every": k})
        st = fit(FAMILIES[run.family], run, x.to(DEV), shape, device=torch.device(DEV))
        r = {"pipeline": name, "family": run.family, "ok": True, "steps": k, "seconds": time.perf_counter() - t0,
             "last_metrics": {k: v for k, v in st["history"][-1].items() if k != "step"}}
    except Exception as exc:  # reported, the other families still run
        import traceback
        traceback.print_exc()
        r = {"pipeline": name, "ok": False, "error": f"{type(exc).__name__}: {exc}"}
    print("smoke", r, flush=True)
    out["smoke"].append(r)
(WORK / "train.json").write_text(json.dumps(out, indent=1))
EOF
section train 120 $PY "$WORK/train.py"

cat > "$WORK/sample.py" <<'EOF'
import json, os, time
from pathlib import Path
import torch
from flows.registry import get_pipeline
from tasks.families import load_model
from tasks.families.sampling import draw_in_batches

REPO, WORK, DEV = Path.cwd(), Path(os.environ["WORK"]), os.environ["DEV"]
spec = get_pipeline("digits")
cfg, p = spec.load_config(REPO), spec.paths(REPO)
out = {"model": str(p.model.relative_to(REPO)), "rows": []}
SCALE = float(os.environ.get("GPU_CHECK_SCALE", "1"))
torch.set_num_threads(os.cpu_count())
for dev, steps_each in ((DEV, 5), (DEV, cfg.sample.n_steps_each), ("cpu", 5)):
    sc = cfg.sample.model_copy(update={"n_steps_each": max(1, int(steps_each * SCALE)),
                                       "n_samples": max(8, int(cfg.sample.n_samples * SCALE))})
    steps_each = sc.n_steps_each
    model = load_model(p.model, device=dev, sampler=sc)
    gen = torch.Generator(device=dev).manual_seed(sc.seed)
    draw_in_batches(16, 16, lambda m: model.sample(m, generator=gen))  # warm-up
    gen = torch.Generator(device=dev).manual_seed(sc.seed)
    t0 = time.perf_counter()
    x = draw_in_batches(sc.n_samples, sc.batch_size, lambda m: model.sample(m, generator=gen))
    s = time.perf_counter() - t0
    evals = cfg.train.n_sigmas * steps_each * -(-sc.n_samples // sc.batch_size)
    row = {"device": dev, "n_samples": sc.n_samples, "n_steps_each": steps_each, "score_evals_of_batch": evals,
           "seconds": s, "ms_per_eval": 1000 * s / evals, "finite": bool(torch.isfinite(x).all()),
           "mean": float(x.mean()), "std": float(x.std())}
    print("sample digits", row, flush=True)
    out["rows"].append(row)
(WORK / "sample.json").write_text(json.dumps(out, indent=1))
EOF
section sample 60 $PY "$WORK/sample.py"

cat > "$WORK/evalckpt.py" <<'EOF'
import json, os, time
from pathlib import Path
import torch
from flows.registry import get_pipeline
from tasks.stages.evaluate.metrics import EvalInputs, evaluate_checkpoint

REPO, WORK, DEV = Path.cwd(), Path(os.environ["WORK"]), os.environ["DEV"]
out = {"rows": []}
for name in ("digits", "gmm2d"):
    spec = get_pipeline(name)
    cfg, p = spec.load_config(REPO), spec.paths(REPO)
    ev = cfg.evaluate
    SCALE = float(os.environ.get("GPU_CHECK_SCALE", "1"))
    if SCALE < 1 and ev.checkpoints is not None:
        ev = ev.model_copy(update={"checkpoints": ev.checkpoints.model_copy(
            update={"n_samples": max(50, int(ev.checkpoints.n_samples * SCALE))})})
    sampler = getattr(cfg, ev.checkpoints.sampler) if ev.checkpoints is not None else None
    if SCALE < 1 and sampler is not None and hasattr(sampler, "n_steps_each"):
        sampler = sampler.model_copy(update={"n_steps_each": max(1, int(sampler.n_steps_each * SCALE))})
    ckpts = sorted(p.checkpoints.glob("step_*.pt"))
    if ev.checkpoints is None or not ckpts:
        print(f"{name}: no checkpoints under {p.checkpoints}: skipped", flush=True)
        continue
    kwargs = {"cfg": ev.model_dump(), "sampler": sampler.model_dump(),
              "inputs": EvalInputs.from_paths(p)}
    for dev in (DEV, "cpu"):
        # the evaluate stage's task on the last checkpoint; on the GPU after one warm-up call on the first
        threads = 1 if dev != "cpu" else os.cpu_count()
        if dev != "cpu":
            evaluate_checkpoint(ckpts[0], threads=threads, device=dev, **kwargs)
        t0 = time.perf_counter()
        row = evaluate_checkpoint(ckpts[-1], threads=threads, device=dev, **kwargs)
        s = time.perf_counter() - t0
        r = {"pipeline": name, "device": dev, "threads": threads, "checkpoint": ckpts[-1].name, "seconds": s,
             "n_samples": ev.checkpoints.n_samples, "metrics": row}
        print("evaluate_checkpoint", r, flush=True)
        out["rows"].append(r)
(WORK / "evalckpt.json").write_text(json.dumps(out, indent=1))
EOF
section evalckpt 90 $PY "$WORK/evalckpt.py"

section ksd_cuda 120 $PY bench/bench_ksd.py --device $DEV --json "$WORK/ksd_cuda.json"
section ksd_cpu 60 $PY bench/bench_ksd.py --device cpu --quick --json "$WORK/ksd_cpu.json"
section mmd_cuda 60 $PY bench/bench_mmd.py --device $DEV --sizes 4096x64 16384x64 --repeats 3
section mmd_cpu 60 $PY bench/bench_mmd.py --device cpu --sizes 4096x64 --repeats 3
section compile_cuda 150 $PY bench/bench_training_loop.py --compile --device $DEV --setups mlp,conv --steps 200 --repeats 1

section samplers_cuda 40 $PY bench/bench_samplers.py --quick --device $DEV --json "$WORK/samplers_cuda.json"
section samplers_cpu 40 $PY bench/bench_samplers.py --quick --device cpu --threads "$NCPU" --json "$WORK/samplers_cpu.json"

SM="--dims 2 32 512 --budget 0.3 --min-steps 5"
section sm_cuda 40 $PY bench/bench_score_matching.py $SM --device $DEV --threads 1 --json "$WORK/sm_cuda.json"
section sm_cpu 40 $PY bench/bench_score_matching.py $SM --device cpu --threads "$NCPU" --json "$WORK/sm_cpu.json"

GEN="--batches 100 1000 --dims 2 64 --repeats 5"
section gen_cuda 40 $PY bench/bench_generators.py $GEN --device $DEV --threads 1 --json "$WORK/gen_cuda.json"
section gen_cpu 40 $PY bench/bench_generators.py $GEN --device cpu --threads "$NCPU" --json "$WORK/gen_cpu.json"

section features_cuda 40 $PY bench/bench_features.py --device $DEV
section features_cpu 40 $PY bench/bench_features.py --device cpu

cat > "$WORK/fid.py" <<'EOF'
import json, os, statistics, time
import numpy as np, torch
from stein_core import frechet_distance
d, rng = 2048, np.random.default_rng(0)
def spd():
    a = rng.normal(size=(d, 2 * d)) / np.sqrt(2 * d)
    return a @ a.T + 1e-3 * np.eye(d)
args = [torch.from_numpy(a) for a in (rng.normal(size=d), spd(), rng.normal(size=d), spd())]
out = {}
DEV = os.environ["DEV"]
for dev in (DEV, "cpu") if DEV != "cpu" else ("cpu",):
    a = [t.to(dev) for t in args]
    sync = torch.cuda.synchronize if dev.startswith("cuda") else (lambda: None)
    float(frechet_distance(*a)); sync()  # warm-up (cuSOLVER/MAGMA handles)
    ts = []
    for _ in range(3):
        t0 = time.perf_counter(); v = float(frechet_distance(*a)); sync(); ts.append(time.perf_counter() - t0)
    out[dev] = {"seconds": statistics.median(ts), "value": v, "device_of_result": str(frechet_distance(*a).device)}
    print(f"frechet_distance d={d} float64 on {dev}: {out[dev]['seconds']:.3f} s (median of 3), FID {v:.10g}")
if DEV != "cpu":
    out["relative_difference"] = abs(out[DEV]["value"] - out["cpu"]["value"]) / abs(out["cpu"]["value"])
    out["cpu_over_gpu"] = out["cpu"]["seconds"] / out[DEV]["seconds"]
    print(f"cpu/{DEV} {out['cpu_over_gpu']:.1f}x, relative difference {out['relative_difference']:.1e}")
open(os.path.join(os.environ["WORK"], "fid.json"), "w").write(json.dumps(out, indent=1))
EOF
section fid 60 $PY "$WORK/fid.py"

XDIST=""
$PY -c "import xdist" 2>/dev/null && XDIST="-n 8"
section unit 120 $PY -m pytest tests/unit -m "not slow and not gpu" -p no:cacheprovider -q $XDIST

# ------------------------------------------------------------------------------------------------------ gather
$PY - "$WORK" "$OUT" <<'EOF'
import json, sys
from pathlib import Path
work, out = Path(sys.argv[1]), Path(sys.argv[2])
res = {p.stem: json.loads(p.read_text()) for p in sorted(work.glob("*.json"))}
res["sections"] = [dict(zip(("name", "rc", "seconds"), l.split("\t"))) for l in (out / "sections.tsv").read_text().splitlines()]
(out / "results.json").write_text(json.dumps(res, indent=1) + "\n")
print("sections:", ", ".join(f"{s['name']}={s['rc']}" for s in res["sections"]))
EOF
echo "total $(( $(date +%s) - T0 ))s"
