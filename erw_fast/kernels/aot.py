"""Ahead-of-time compile of every ``erw_fast.kernels`` Triton kernel for sm_80 and sm_90, no GPU.

Proves on a CPU-only machine (CI) that the CUDA path compiles, and reports what ``ptxas`` made of
each kernel: registers, spills, shared memory and the occupancy that implies.

How: for each kernel, SiT-XL/2 size (and odd test sizes), dtype case and target, the launch the
launchers would make on a CUDA device with ``SMS`` SMs is rebuilt from their own
``cuda_launch_config`` helpers (tile sizes, num_warps, T-splits).  Triton's own argument binder
(with a backend made for the target, so no driver) turns that launch into the signature,
constexprs and specialization attributes (16-byte alignment / divisibility) a real launch would
get, and ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` runs the whole
pipeline through the wheel's ``ptxas``.  Registers / spills come from that ``ptxas -v`` run's log
(``triton.knobs.nvidia.dump_ptxas_log``; ``CompiledKernel.n_regs``/``n_spills`` only exist once a
driver loads the cubin), shared memory from the compiled kernel's metadata (``shared``: the
dynamic shared memory Triton launches with; ptxas reports no static shared memory for them).

``TRITON_INTERPRET`` must be unset before triton is imported (Triton picks interpreted vs compiled
kernels when a function is defined, its own ``tl.standard`` helpers included), and torch 2.13
imports triton itself: so when the variable is set, ``main`` re-runs this module in a subprocess
without it, and ``compile_job`` refuses interpreted kernels.  Importing this module has no side
effects::

    python -m erw_fast.kernels.aot --markdown            # the docs/BENCHMARKS.md section
    python -m erw_fast.kernels.aot --update-doc docs/BENCHMARKS.md
    python -m erw_fast.kernels.aot --json OUT.json       # what tests/test_kernels_aot.py reads
"""
import argparse
import contextlib
import dataclasses
import importlib
import io
import json
import math
import multiprocessing
import os
import re
import sys
import tempfile
import time
import warnings

SMS = 132  # H100 SXM; the launchers size T-splits from the SM count
ARCHS = (80, 90)
REGS_PER_SM = 65536  # sm_80 and sm_90: 4 sub-partitions of 16K 32-bit registers
MAX_WARPS_PER_SM = 64
MAX_CTAS_PER_SM = 32
SMEM_PER_SM = {80: 164 * 1024, 90: 228 * 1024}  # max carveout
SMEM_OPTIN = {80: 163 * 1024, 90: 227 * 1024}  # per-block opt-in maximum
SMEM_DEFAULT = 48 * 1024  # per block without cuFuncSetAttribute opt-in
SMEM_RESERVED = 1024  # per CTA, reserved by CUDA on sm_80+
SECTION = "## Ahead-of-time compile (no GPU)"

# (B, T, D) for the token ops; (N, K, Z) for the projection-cosine loss
SIZES = {
    "XL": dict(B=256, T=256, D=1152, N=65536, K=2048, Z=768),  # SiT-XL/2, batch 256, 256 tokens
    "odd": dict(B=1, T=1001, D=97, N=1001, K=97, Z=97),
}
ODD_CASES = ("fp32", "bf16")  # the odd shapes check masking / unaligned code paths, not dtype mixes


def cases_for(size_name):
    """The dtype cases compiled at a size: all at XL, fp32 and bf16 at the odd shapes."""
    return tuple(dtype_cases()) if size_name == "XL" else ODD_CASES


def dtype_cases():
    """name -> dtypes of the tensors the ops hand to the kernels.

    x: LayerNorm input / residual stream; y: gated branch; mod: shift/scale/gate; z/tgt: the
    projected chunk and the target of the cosine loss.  "mixed": bf16 activations with fp32
    modulation (and z promoted to fp32 by fp32 projector weights); "amp": what a bf16-autocast SiT
    hands in (fp32 residual stream, bf16 adaLN outputs and branch; z cast to bf16, fp32 targets).
    """
    import torch

    f32, bf16 = torch.float32, torch.bfloat16
    return {
        "fp32": dict(x=f32, y=f32, mod=f32, z=f32, tgt=f32),
        "bf16": dict(x=bf16, y=bf16, mod=bf16, z=bf16, tgt=bf16),
        "mixed": dict(x=bf16, y=bf16, mod=f32, z=f32, tgt=bf16),
        "amp": dict(x=f32, y=bf16, mod=bf16, z=bf16, tgt=f32),
    }


@dataclasses.dataclass
class Job:
    """One kernel launch to compile: pointers are given as torch dtypes, the rest as values."""
    name: str
    module: str
    kernel: str
    size: str
    dtype: str
    arch: int
    args: list
    constexprs: dict
    num_warps: int
    grid: tuple
    dtypes: str  # e.g. "x bf16, mod fp32 -> out fp32", for the report


def _dname(dt):
    return str(dt).replace("torch.", "").replace("float32", "fp32").replace("bfloat16", "bf16")


def _token_launches(size, dt):
    """(name, module, kernel, args, cfg, dtypes) of the four token-op kernels, as the ops launch them."""
    import torch

    from . import gated_residual as gr
    from . import layernorm_modulate as ln

    f32 = torch.float32
    B, T, D = size["B"], size["T"], size["D"]
    x, y, mod = dt["x"], dt["y"], dt["mod"]
    out = torch.promote_types(x, mod)  # layernorm_modulate's output dtype; its dy has it too
    cfg = ln.cuda_launch_config(B, T, D, SMS)
    yield ("layernorm_modulate_fwd", ln, "_lnmod_fwd_kernel",
           [x, mod, mod, out, T, D, T * D, D, D, D, T * D, D, 1e-6], cfg,
           f"x {_dname(x)}, shift/scale {_dname(mod)} -> out {_dname(out)}")
    cfg = ln.cuda_launch_config(B, T, D, SMS, backward=True)
    S = cfg["grid"][0]
    yield ("layernorm_modulate_bwd", ln, "_lnmod_bwd_kernel",
           [out, x, mod, x, f32, f32, T, D, cfg["rows_per_split"],
            T * D, D, T * D, D, D, T * D, D, S * D, D, 1e-6], cfg,
           f"dy {_dname(out)}, x {_dname(x)}, scale {_dname(mod)} -> dx {_dname(x)}")
    out = torch.promote_types(torch.promote_types(x, mod), y)  # gated_residual's output dtype
    cfg = gr.cuda_launch_config(B, T, D, SMS)
    yield ("gated_residual_fwd", gr, "_gres_fwd_kernel",
           [x, mod, y, out, T, D, T * D, D, D, T * D, D, T * D, D], cfg,
           f"x {_dname(x)}, gate {_dname(mod)}, y {_dname(y)} -> out {_dname(out)}")
    cfg = gr.cuda_launch_config(B, T, D, SMS, backward=True)
    S = cfg["grid"][0]
    yield ("gated_residual_bwd", gr, "_gres_bwd_kernel",
           [out, mod, y, y, f32, T, D, cfg["rows_per_split"], T * D, D, D, T * D, D, T * D, D, S * D, D],
           cfg, f"dout {_dname(out)}, gate {_dname(mod)}, y {_dname(y)} -> dy {_dname(y)}")


def _cosine_launches(size, dt):
    """The row kernel on one chunk of ``projection_cosine_loss`` (chunk rows from the op's default)."""
    import torch

    from erw_fast.ops.projection_cosine import default_chunk_size  # read-only: the op's chunking

    from . import projection_cosine as pc

    N, K, Z = size["N"], size["K"], size["Z"]
    R = default_chunk_size(N, K, Z)
    z, tgt = dt["z"], dt["tgt"]
    cfg = pc.cuda_launch_config(R, Z)
    yield ("cosine_loss_grad_rows", pc, "_cos_loss_grad_kernel",
           [z, tgt, z, torch.float32, R, Z, Z, Z, Z, 1.0 / N, 1e-12], cfg,
           f"z {_dname(z)}, target {_dname(tgt)} -> dz {_dname(z)} (chunk of {R} rows)")


def jobs(sizes=None, cases=None, archs=ARCHS):
    """Every (kernel, size, dtype case, target) to compile."""
    out = []
    all_cases = dtype_cases()
    for size_name in sizes or SIZES:
        size = SIZES[size_name]
        for case in [c for c in cases_for(size_name) if not cases or c in cases]:
            dt = all_cases[case]
            for name, mod, kernel, args, cfg, dtypes in [*_token_launches(size, dt), *_cosine_launches(size, dt)]:
                constexprs = {k: v for k, v in cfg.items() if k.isupper()}
                for arch in archs:
                    out.append(Job(name, mod.__name__, kernel, size_name, case, arch, list(args), constexprs,
                                   cfg["num_warps"], tuple(cfg["grid"]), dtypes))
    return out


_PTXAS = {
    "regs": r"Used (\d+) registers",
    "stack": r"(\d+) bytes stack frame",
    "spill_stores": r"(\d+) bytes spill stores",
    "spill_loads": r"(\d+) bytes spill loads",
    "static_smem": r"(\d+) bytes smem",
}


def parse_ptxas_log(log):
    """Numbers from a ``ptxas -v`` log of one kernel (absent entries are 0)."""
    if not re.search(_PTXAS["regs"], log):
        raise RuntimeError(f"no register count in the ptxas log:\n{log}")
    return {k: int(m.group(1)) if (m := re.search(p, log)) else 0 for k, p in _PTXAS.items()}


def _bind(kernel, backend, job):
    """Triton's own binder: launch args -> (options, signature, constexprs, attrs), as ``JITFunction.run``."""
    import torch
    from triton import knobs
    from triton.runtime.jit import MockTensor, create_function_from_signature

    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    args = [MockTensor(a) if isinstance(a, torch.dtype) else a for a in job.args]  # 16-B aligned ptrs
    kwargs = dict(job.constexprs, num_warps=job.num_warps, debug=kernel.debug or knobs.runtime.debug)
    # the compilation knobs JITFunction.run passes: instrumentation_mode (Triton 3.6 and 3.9), and
    # fpsan_homomorphic_casts only where this Triton has it (3.9, not 3.6, the GPU machine's)
    for name in ("instrumentation_mode", "fpsan_homomorphic_casts"):
        if hasattr(knobs.compilation, name):
            kwargs[name] = getattr(knobs.compilation, name)
    bound, specialization, options = binder(*args, **kwargs)
    return kernel._pack_args(backend, kwargs, bound, specialization, options)


def compile_job(job):
    """Compile one job for its target; -> a result dict (regs, smem, spills, occupancy, ...)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend

    kernel = getattr(importlib.import_module(job.module), job.kernel)
    if not isinstance(kernel, triton.runtime.jit.JITFunction):
        raise RuntimeError(f"{job.module}.{job.kernel} is {type(kernel).__name__}, not a JITFunction: "
                           "the kernel modules were imported with TRITON_INTERPRET set")
    target = GPUTarget("cuda", job.arch, 32)
    backend = make_backend(target)
    log = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        stack.enter_context(triton.knobs.nvidia.scope())
        stack.enter_context(triton.knobs.compilation.scope())
        stack.enter_context(contextlib.redirect_stdout(log))
        stack.enter_context(warnings.catch_warnings())
        warnings.simplefilter("ignore")  # TRITON_DEFAULT_FP_FUSION notice: we keep the default
        triton.knobs.nvidia.dump_ptxas_log = True  # make_cubin prints the ptxas -v log it parsed
        triton.knobs.compilation.always_compile = True  # a cache hit would skip ptxas (and its log)
        options, signature, constexprs, attrs = _bind(kernel, backend, job)
        compiled = triton.compile(triton.compiler.ASTSource(kernel, signature, constexprs, attrs),
                                  target=target, options=options.__dict__)
    seconds = time.perf_counter() - t0
    stats = parse_ptxas_log(log.getvalue())
    md = compiled.metadata
    smem = md.shared + stats["static_smem"]
    res = dataclasses.asdict(job)
    res.pop("args")
    res.update(stats, smem=smem, warps=md.num_warps, fp_fusion=md.enable_fp_fusion, compile_s=round(seconds, 3),
               ptxas_log=log.getvalue().strip(), cubin_bytes=len(compiled.asm["cubin"]),
               signature={k: v for k, v in signature.items() if v != "constexpr"})
    res.update(occupancy(job.arch, stats["regs"], md.num_warps, smem))
    res.update(cubin_resources(compiled.asm["cubin"]))
    return res


def cubin_resources(cubin):
    """Second opinion from the binary itself: the wheel's ``cuobjdump --dump-resource-usage``."""
    import subprocess

    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([knobs.nvidia.cuobjdump.path, "--dump-resource-usage", f.name],
                             capture_output=True, text=True, check=True).stdout
    fields = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", out.split("Function", 1)[-1]))
    return {f"cubin_{k.lower()}": int(v) for k, v in fields.items()}


def occupancy(arch, regs, warps, smem):
    """CTAs and warps per SM (the rules of CUDA's cuda_occupancy.h for sm_80 / sm_90)."""
    regs_per_warp = -(-regs * 32 // 256) * 256  # allocated per warp in 256-register units
    warps_by_regs = (REGS_PER_SM // 4 // regs_per_warp) * 4  # per sub-partition, 4 of them
    smem_per_cta = -(-(smem + SMEM_RESERVED) // 128) * 128
    limits = {
        "regs": warps_by_regs // warps,
        "smem": SMEM_PER_SM[arch] // smem_per_cta,
        "warps": MAX_WARPS_PER_SM // warps,
        "ctas": MAX_CTAS_PER_SM,
    }
    ctas = min(limits.values())
    limiter = "/".join(k for k, v in limits.items() if v == ctas)
    return dict(ctas_per_sm=ctas, warps_per_sm=ctas * warps, occupancy=ctas * warps / MAX_WARPS_PER_SM,
                limiter=limiter)


def _compile_or_error(job):
    """``compile_job``, or the job's fields plus ``error`` when it fails (reported, not raised)."""
    try:
        return compile_job(job)
    except Exception as e:  # noqa: BLE001 - every failure becomes a line of the report
        res = dataclasses.asdict(job)
        res.pop("args")
        return dict(res, error=f"{type(e).__name__}: {e}"[-4000:])


def compile_all(job_list, workers=None):
    """Compile every job (in ``workers`` processes, default: all CPUs) in a fresh cache dir.

    -> (results, errors): one dict per compiled job; one per job that failed to compile.
    """
    workers = max(1, min(workers or os.cpu_count() or 1, len(job_list)))
    saved = os.environ.get("TRITON_CACHE_DIR")
    with tempfile.TemporaryDirectory(prefix="erw_aot_cache_") as cache:
        os.environ["TRITON_CACHE_DIR"] = cache  # read by triton at each compile; inherited by workers
        try:
            if workers == 1:
                results = [_compile_or_error(j) for j in job_list]
            else:
                ctx = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
                with ctx.Pool(workers) as pool:
                    results = pool.map(_compile_or_error, job_list, chunksize=1)
        finally:
            if saved is None:
                os.environ.pop("TRITON_CACHE_DIR", None)
            else:
                os.environ["TRITON_CACHE_DIR"] = saved
    errors = [r for r in results if "error" in r]
    results = [r for r in results if "error" not in r]
    for r in results:
        r["ctas"] = math.prod(r["grid"])
        r["waves"] = round(r["ctas"] / (r["ctas_per_sm"] * SMS), 2)  # full-machine waves at SMS SMs
    return results, errors


def environment():
    """Versions that determine the numbers (triton, the wheel's ptxas binaries)."""
    import subprocess

    import triton
    from triton import knobs

    def version(tool):
        out = subprocess.run([tool.path, "--version"], capture_output=True, text=True).stdout
        m = re.search(r"release ([\d.]+), V([\d.]+)", out)
        return f"{os.path.basename(tool.path)} {m.group(2) if m else out.strip()}"

    return dict(triton=triton.__version__, python=sys.version.split()[0],
                ptxas_sm80=version(knobs.nvidia.ptxas), ptxas_sm90=version(knobs.nvidia.ptxas_blackwell))


def check(results):
    """Failures (strings) against what the CUDA path needs; [] when all is well.

    Every kernel: shared memory <= the sm_80 per-block opt-in maximum (163 KB; Triton's launcher
    opts in by itself above 48 KB, so that is the hard limit) and at least one CTA per SM.  At the
    XL defaults also: no spills, no stack frame, and <= 48 KB shared memory (no opt-in needed).
    """
    bad = []
    for r in results:
        where = f"{r['name']} {r['size']} {r['dtype']} sm_{r['arch']}"
        if r["smem"] > SMEM_OPTIN[80]:
            bad.append(f"{where}: {r['smem']} B shared > {SMEM_OPTIN[80]} B (sm_80 opt-in max)")
        if r.get("cubin_reg") != r["regs"]:
            bad.append(f"{where}: ptxas log says {r['regs']} registers, cuobjdump of the cubin {r.get('cubin_reg')}")
        if r["ctas_per_sm"] < 1:
            bad.append(f"{where}: no CTA fits an SM ({r['regs']} regs x {r['warps']} warps, {r['smem']} B)")
        if r["size"] == "XL":
            if r["spill_stores"] or r["spill_loads"] or r["stack"]:
                bad.append(f"{where}: spills {r['spill_stores']}/{r['spill_loads']} B, stack {r['stack']} B")
            if r["smem"] > SMEM_DEFAULT:
                bad.append(f"{where}: {r['smem']} B shared > 48 KB default")
    return bad


def _block(r):
    c = r["constexprs"]
    return "×".join(str(v) for v in c.values())


def _order(results):
    """Rows grouped by kernel, then dtype case, then target."""
    names = list(dict.fromkeys(r["name"] for r in results))
    cases = list(dtype_cases())
    return sorted(results, key=lambda r: (names.index(r["name"]), cases.index(r["dtype"]), r["arch"]))


def _table(rows):
    head = ("| kernel | target | dtype | tile | warps | regs | smem B | spills st/ld B | CTAs/SM (limit) "
            "| warps/SM (occ.) | grid CTAs | waves@132 |")
    lines = [head, "|" + "---|" * 3 + "---:|" * 9]
    for r in rows:
        lines.append(f"| {r['name']} | sm_{r['arch']} | {r['dtype']} | {_block(r)} | {r['warps']} | {r['regs']} "
                     f"| {r['smem']} | {r['spill_stores']}/{r['spill_loads']} | {r['ctas_per_sm']} ({r['limiter']}) "
                     f"| {r['warps_per_sm']} ({r['occupancy']:.0%}) | {r['ctas']} | {r['waves']} |")
    return lines


def _occupancy_notes(results):
    """One line per kernel: the occupancy it gets at the XL defaults, per dtype case (sm_80 / sm_90)."""
    notes = []
    for name in dict.fromkeys(r["name"] for r in results):
        rs = {(r["dtype"], r["arch"]): r for r in results if r["name"] == name and r["size"] == "XL"}
        if not rs:
            continue
        first = next(iter(rs.values()))
        parts = []
        for case in cases_for("XL"):
            pair = [rs[(case, a)] for a in ARCHS if (case, a) in rs]
            if pair:
                regs = "/".join(str(r["regs"]) for r in pair)
                ctas = "/".join(str(r["ctas_per_sm"]) for r in pair)
                warps = "/".join(str(r["warps_per_sm"]) for r in pair)
                parts.append(f"{case} {regs} regs → {ctas} CTAs = {warps} warps/SM")
        limiters = sorted({r["limiter"] for r in rs.values()})
        notes.append(f"- `{name}` (tile {_block(first)}, {first['warps']} warps, {first['ctas']} CTAs): "
                     + "; ".join(parts) + f" (limited by {', '.join(limiters)}).")
    return notes


def _intro(results, env, seconds):
    """The section's prose: machine, method, limits, dtype cases."""
    xl = [r for r in results if r["size"] == "XL"]
    fusion = "on" if all(r["fp_fusion"] for r in results) else "off"
    return [
        "Generated by `python -m erw_fast.kernels.aot --update-doc docs/BENCHMARKS.md` (checked by "
        "`tests/test_kernels_aot.py`) on this project's 2-core CPU machine, no GPU and no CUDA driver: "
        f"triton {env['triton']}, the wheel's own {env['ptxas_sm80']} (sm_80) and {env['ptxas_sm90']} "
        f"(sm_90a), Python {env['python']}, FP fusion {fusion} (Triton's default); {len(results)} compiles "
        f"in {seconds:.0f} s.", "",
        "**How.** Each kernel is compiled with `triton.compile(ASTSource(fn, signature, constexprs, attrs), "
        "target=GPUTarget(\"cuda\", 80|90, 32))` for the launch its launcher makes on a CUDA device: tile "
        f"sizes, `num_warps` and T-splits from the launchers' `cuda_launch_config` ({SMS} SMs assumed), "
        "the signature and the 16-byte alignment / divisibility specialization from Triton's own argument "
        "binder (contiguous tensors), the op's output dtypes (`result_type` of the inputs, gradients in "
        "their input's dtype) and, for the cosine loss, the op's default chunk of rows. Registers, stack "
        "and spills are read from the `ptxas -v` log of the very ptxas run that built the cubin "
        "(`knobs.nvidia.dump_ptxas_log`) and cross-checked against the cubin itself (`cuobjdump "
        "--dump-resource-usage`: REG, STACK, LOCAL); `CompiledKernel.n_regs` / `n_spills` are only set "
        "when a driver loads the cubin, so they do not exist here. Shared memory is the compiled kernel's "
        "`metadata.shared` (the dynamic shared memory Triton launches with: cross-warp reduction and "
        "layout-conversion scratch; ptxas reports no static shared memory).", "",
        "**Limits.** Asserted for every kernel: shared memory ≤ 163 KB, the sm_80 per-block opt-in "
        "maximum (Triton's CUDA launcher opts in by itself, `cuFuncSetAttribute`, above 48 KB, so 163 KB "
        "is what decides whether a launch works on an A100). At the XL defaults also: 0 spills, a 0-byte "
        "stack frame and ≤ 48 KB, the default limit that needs no opt-in (largest here: "
        f"{max(r['smem'] for r in (xl or results))} B). "
        "Occupancy follows `cuda_occupancy.h`: registers are allocated per warp in units of 256 from "
        "four 16K-register sub-partitions (64K registers/SM); 1 KB reserved shared memory per CTA against "
        "164 KB (sm_80) / 228 KB (sm_90) per SM; at most 64 warps and 32 CTAs per SM. `limit` names what "
        f"caps CTAs/SM; `waves@{SMS}` = grid CTAs / (CTAs/SM × {SMS} SMs).", "",
        "**dtype cases** (what the ops hand the kernels): `fp32`; `bf16`; `mixed` = bf16 activations with "
        "fp32 modulation (outputs promote to fp32; z fp32 from fp32 projector weights, bf16 targets); `amp` "
        "= a bf16-autocast SiT (fp32 residual stream, bf16 adaLN outputs and branch; z bf16, fp32 targets).",
    ]


def _limit_summary(rows):
    """Which resource caps CTAs/SM, over ``rows``."""
    count = {k: sum(k in r["limiter"].split("/") for r in rows) for k in ("regs", "smem", "warps", "ctas")}
    said = [f"{k} in {n} of {len(rows)}" for k, n in count.items() if n]
    return "CTAs/SM are capped by " + ", ".join(said) + " configurations" + (
        "; shared memory caps none." if not count["smem"] else ".")


def markdown(results, env, seconds):
    """The "Ahead-of-time compile (no GPU)" section of docs/BENCHMARKS.md."""
    xl, odd = SIZES["XL"], SIZES["odd"]
    xl_rows = [r for r in results if r["size"] == "XL"]
    odd_rows = [r for r in results if r["size"] == "odd"]
    lines = [SECTION, "", *_intro(results, env, seconds), ""]
    if xl_rows:
        lines += _xl_part(xl_rows, results, xl)
    if odd_rows:
        lines += ["", f"### Odd test shapes: B·T = {odd['B']}·{odd['T']}, D = {odd['D']}; cosine loss N = "
                  f"{odd['N']:,}, Z = {odd['Z']}", "", "fp32 and bf16; checked for compile, the 163 KB limit and "
                  "≥ 1 CTA/SM (spills are reported, not asserted).", ""]
        lines += _table(_order(odd_rows))
    return "\n".join(lines) + "\n"


def _xl_part(xl_rows, results, xl):
    low = min(xl_rows, key=lambda r: (r["occupancy"], -r["regs"]))
    lines = [f"### SiT-XL/2: B·T = {xl['B']}·{xl['T']} = {xl['B'] * xl['T']:,} tokens, D = {xl['D']}; "
             f"cosine loss N = {xl['N']:,}, K = {xl['K']}, Z = {xl['Z']}", "",
             "Occupancy each kernel gets (pairs are sm_80/sm_90; 64 warps/SM is 100%):", "",
             *_occupancy_notes(results), "",
             f"Lowest: `{low['name']}` {low['dtype']} on sm_{low['arch']}, {low['regs']} registers × "
             f"{low['warps']} warps → {low['ctas_per_sm']} CTA ({low['warps_per_sm']} warps, "
             f"{low['occupancy']:.0%}) per SM. " + _limit_summary(xl_rows), ""]
    return lines + _table(_order(xl_rows))


def update_doc(path, section):
    """Replace (or append) the AOT section of ``path``; other sections are left as they are."""
    text = open(path, encoding="utf-8").read() if os.path.exists(path) else "# Benchmarks\n"
    start = text.find(SECTION + "\n")
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        nxt = re.search(r"^## ", text[start + len(SECTION):], flags=re.M)
        end = start + len(SECTION) + nxt.start() if nxt else len(text)
        text = text[:start] + section + ("\n" + text[end:] if nxt else "")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", help="write the results (and environment) as JSON here")
    p.add_argument("--markdown", action="store_true", help="print the docs/BENCHMARKS.md section")
    p.add_argument("--update-doc", metavar="PATH", help="write the section into PATH (e.g. docs/BENCHMARKS.md)")
    p.add_argument("--sizes", nargs="*", choices=list(SIZES), help="default: all")
    p.add_argument("--dtypes", nargs="*", choices=list(dtype_cases()), help="default: all")
    p.add_argument("--archs", nargs="*", type=int, default=list(ARCHS), choices=list(ARCHS))
    p.add_argument("--workers", type=int, default=None, help="compile processes (default: all CPUs)")
    a = p.parse_args(argv)
    if a.update_doc and (a.sizes or a.dtypes or sorted(a.archs) != list(ARCHS)):
        p.error("--update-doc writes the full table: drop --sizes / --dtypes / --archs")
    if "TRITON_INTERPRET" in os.environ:  # triton (imported by torch) already saw it: start afresh
        import subprocess

        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        argv = sys.argv[1:] if argv is None else list(argv)
        return subprocess.call([sys.executable, "-m", "erw_fast.kernels.aot", *argv], env=env)
    t0 = time.perf_counter()
    results, errors = compile_all(jobs(a.sizes, a.dtypes, a.archs), a.workers)
    seconds = time.perf_counter() - t0
    env = environment()
    failures = [f"{r['name']} {r['size']} {r['dtype']} sm_{r['arch']}: does not compile: {r['error']}"
                for r in errors] + check(results)
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump(dict(env=env, seconds=seconds, failures=failures, results=results, errors=errors), f,
                      indent=1, default=str)
    if (a.markdown or a.update_doc) and results and not errors:  # never write a table with holes
        section = markdown(results, env, seconds)
        if a.markdown:
            print(section, end="")
        if a.update_doc:
            update_doc(a.update_doc, section)
    if not (a.json or a.markdown or a.update_doc):
        print("\n".join(_table(_order(results))))
    for msg in failures:
        print("FAIL:", msg, file=sys.stderr)
    print(f"{len(results)} kernels compiled in {seconds:.1f} s, {len(failures)} failures", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
