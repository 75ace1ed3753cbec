"""The study's report: the markdown (generated tables; the hand-written notes between
``<!-- notes:start -->`` and ``<!-- notes:end -->`` are kept when it is rewritten) and the PNG plot."""
from __future__ import annotations

import os
from typing import Dict, List, Sequence

import numpy as np

from .plan import compute_ratios, curve, format_ratio, mean_std, reach_rows, relative_rows

NOTES_START, NOTES_END = "<!-- notes:start -->", "<!-- notes:end -->"


def arm_style(name: str, warmup: float) -> dict:
    """Colour and line of an arm in the plots (the ERW sweep darker with a longer warmup)."""
    if name.startswith("erw-w"):
        import matplotlib

        shade = matplotlib.colormaps["Reds"](0.35 + 0.6 * min(1.0, warmup / 0.4))
        return dict(color=shade, ls="--" if name.endswith("-stop") else "-")
    base = {"vanilla": "#7f7f7f", "repa": "#1f77b4", "repa-stop": "#1f77b4", "erw-nowarmup": "#ff7f0e"}
    return dict(color=base.get(name, "#2ca02c"), ls="--" if name.endswith("-stop") else "-")


def _pm(vals: Sequence[float], fmt: str = "{:.2f}") -> str:
    m, s = mean_std(vals)
    return (fmt.format(m) + " ± " + fmt.format(s)) if len(vals) > 1 else fmt.format(m)


def _keep_notes(path: str) -> str:
    if path and os.path.exists(path):
        text = open(path, encoding="utf-8").read()
        if NOTES_START in text and NOTES_END in text:
            return text[text.index(NOTES_START):text.index(NOTES_END) + len(NOTES_END)]
    return f"{NOTES_START}\n_(no notes yet)_\n{NOTES_END}"


def finals(results: List[dict], arm: str, seeds: Sequence[int]) -> List[dict]:
    """The evaluation at the end of the budget of ``arm``, in each seed that has one."""
    return [r for s in seeds for r in curve(results, arm, s) if r["fraction"] == 1.0]


# --------------------------------------------------------------------------------------------
# Plot
# --------------------------------------------------------------------------------------------
def _curve_panel(ax, results, study, names, key, scale):
    arms = study["arms"]
    for name in names:
        groups: Dict[float, List[dict]] = {}
        for r in results:
            if r["arm"] == name and r.get(key) is not None:
                groups.setdefault(round(r["fraction"], 6), []).append(r)
        if not groups:
            continue
        groups = dict(sorted(groups.items()))
        x = np.array([np.mean([r["flops"] for r in g]) for g in groups.values()]) / 1e12
        vals = [np.array([r[key] for r in g]) * scale for g in groups.values()]
        st = arm_style(name, arms[name]["warmup"])
        ax.plot(x, [v.mean() for v in vals], marker="o", ms=3.5, label=arms[name]["label"], **st)
        if max(len(v) for v in vals) > 1:
            ax.fill_between(x, [v.min() for v in vals], [v.max() for v in vals], color=st["color"], alpha=0.12, lw=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_xlabel("training compute (TFLOP; extraction and warmup included)")


def _sweep_panel(ax, results, study):
    sweep = study["sweep"]
    seeds = study["seeds"]
    xs, means, lo, hi = [], [], [], []
    for name in sweep:
        f = [r[study.get("metric", "fid")] for r in finals(results, name, seeds)]
        if f:
            xs.append(study["arms"][name]["warmup"] * 100)
            means.append(np.mean(f))
            lo.append(np.mean(f) - min(f))
            hi.append(max(f) - np.mean(f))
    if xs:
        ax.errorbar(xs, means, yerr=[lo, hi], marker="o", color="#d62728", capsize=3,
                    label=relabel("ERW final FID (min–max)", study))
    for ref, st in (("repa", dict(color="#1f77b4")), ("vanilla", dict(color="#7f7f7f"))):
        f = [r[study.get("metric", "fid")] for r in finals(results, ref, seeds)]
        if f:
            ax.axhline(np.mean(f), ls=":", label=relabel(f"{study['arms'][ref]['label']} final FID", study), **st)
    ax.set(xlabel="ERW warmup share of the budget (%)", ylabel=relabel("final FID", study),
           title="warmup sweep at equal compute")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def write_plot(path: str, results: List[dict], study: dict) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(17, 8.5), dpi=100)
    main, sweep, fd = study["main_arms"], ["vanilla", "repa"] + list(study["sweep"]), study["fd_key"]
    m = study.get("metric", "fid")
    net = {"digits classifier": "FID (digits classifier features)", "Inception": "FID (Inception features)"}.get(
        study.get("fid_network", "digits classifier"), f"{fd} (no FID network)")
    _curve_panel(axes[0, 0], results, study, main, m, 1.0)
    axes[0, 0].set(ylabel=net, title=relabel("FID vs compute (lower is better)", study), yscale="log")
    _curve_panel(axes[0, 1], results, study, sweep, m, 1.0)
    axes[0, 1].set(ylabel=net, title=relabel("FID: ERW's warmup share", study), yscale="log")
    _curve_panel(axes[0, 2], results, study, main, "accuracy", 100.0)
    axes[0, 2].set(ylabel="classifier accuracy (%)", title="samples read as the requested digit")
    _curve_panel(axes[1, 0], results, study, main, fd, 1.0)
    axes[1, 0].set(ylabel=f"{fd} (target encoder's features)", title=f"{fd} vs compute (favours the aligned arms?)",
                   yscale="log")
    _curve_panel(axes[1, 1], results, study, sweep, fd, 1.0)
    axes[1, 1].set(ylabel=f"{fd} (target encoder's features)", title=f"{fd}: ERW's warmup share", yscale="log")
    _sweep_panel(axes[1, 2], results, study)
    for ax in (axes[0, 0], axes[0, 1], axes[1, 0], axes[1, 1]):
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    s = study["settings"]
    fig.suptitle(f"{s['model']}, budget {s['budget_steps']} REPA steps + extraction; mean over seeds "
                 f"{', '.join(map(str, study['seeds']))} (band/bars = min–max)", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------
def _conditions(study: dict) -> str:
    cond = study["conditions"]
    text = ", ".join(f"{j} run(s) at a time with {t} CPU thread(s) each" for j, t in cond)
    if len(cond) > 1:
        text = f"under different loads ({text}): their seconds do not compare"
    return text or "no finished run"


def _head(study: dict) -> List[str]:
    m, inv = study["machine"], study["invocations"]
    cmds = list(dict.fromkeys(i["command"] for i in inv))
    runs = "; ".join(f"{i['date']}: {i['minutes']:.1f} min, {i['trained']} run(s) trained"
                     + (f" ({i['status']})" if i.get("status", "finished") != "finished" else "")
                     for i in inv if i["trained"] or i.get("status") == "failed")
    return ["# Convergence at the paper's proportions: vanilla SiT, REPA and ERW at equal compute\n",
            "Written by `python -m erw_fast.convergence` (the numbers, tables and plot); the notes section is "
            "written by hand and kept when the study is rerun. The commands that produced this folder's runs:\n",
            "```bash\n" + "\n".join(cmds) + "\n```\n",
            f"Wall clock of the calls that trained runs: {runs or 'none'}. Training took {study['train_minutes']:.1f} "
            f"min and evaluation {study['eval_minutes']:.1f} min, summed over runs, {_conditions(study)}, on "
            f"{m['cores']} cores ({m['cpu']}), torch {m['torch']}, Python {m['python']}. A rerun skips finished runs "
            "and evaluations.\n"]


def _model_lines(study: dict, data_desc: str) -> List[str]:
    s, f, budget = study["settings"], study["flops"], study["budget"]
    per = lambda v: f"{v / 1e9:.2f} GFLOP"  # noqa: E731
    L = [f"- Model `{s['model']}` ({study['model_desc']}), warmup region L = {study['l2r_depth']} block(s), "
         f"alignment at block {study['encoder_depth']}, projector width {s['projector_dim']}; the same data "
         f"({data_desc}), batch, lr, EMA and seeds for every arm.",
         f"- One architecture for every arm, on purpose: RoPE {'on' if study.get('rope', True) else 'off'}, the "
         f"alignment at block {study['encoder_depth']} and λ0 {study.get('lambda0', 1.0):g} (ERW's values for this "
         "size) also for REPA and vanilla SiT, so that the arms differ only in their training recipe. `--method "
         "repa` alone trains REPA's own recipe (constant λ 0.5 at a third of the depth, no RoPE) and vanilla SiT "
         "has no RoPE; neither is what these arms ran.",
         f"- FLOPs per step, counted as the trainer counts them: full REPA/ERW step {per(f['full'])}, ERW warmup step "
         f"{per(f['warmup'])} (**{f['warmup'] / f['full'] * 100:.0f}%** of a full step; the paper: 42.2K of 224.8K "
         f"GFLOPs, 19%), vanilla step {per(f['vanilla'])}, a step after the alignment stopped {per(f['unaligned'])}.",
         f"- Target encoder: `{study['encoder']}` ({study['encoder_desc']}).",
         f"- Target features: {s['features']}" + (f"; the one-off extraction ({per(f['features'])}) is charged to every "
                                                   "arm that aligns" if f.get("features") else "") + ".",
         f"- Budget per arm: {s['budget_steps']} REPA steps" + (" + the extraction" if f.get("features") else "") +
         f" = **{budget / 1e12:.2f} TFLOP**.\n",
         "| arm | λ | warmup steps | full steps (aligned + after the stop) | evaluated at total steps |",
         "|---|---|---|---|---|"]
    for name in study["present"]:
        p, a = study["plans"][name], study["arms"][name]
        full = str(p["steps"]) if p["align_until"] is None else f"{p['steps']} ({p['align_until']} + " \
                                                                   f"{p['steps'] - p['align_until']})"
        L.append(f"| {a['label']} | {a['lam']} | {p['warmup_steps']} | {full} | {', '.join(map(str, p['eval_steps']))} |")
    return L


def _setup(study: dict) -> List[str]:
    s = study["settings"]
    L = ["## Setup\n"] + _model_lines(study, "1,797 embedded digits, 16×16")
    fl, fs = study["floor"]
    L += ["", f"- Evaluation: EMA weights, {s['num_samples']} samples per checkpoint ({s['sampler']}, "
          f"{s['sample_steps']} steps, guidance {s['cfg_scale']:g}; the same per-index noise and balanced classes "
          "for every checkpoint). FID against all 1,797 digits in the feature space of the project's digits "
          "classifier (trained with the labels; not the target encoder); accuracy: the share of samples that "
          f"classifier reads as the requested digit. `{study['fd_key']}`: the Fréchet distance against the same "
          "1,797 digits in the target encoder's space (mean-pooled tokens; `erw_fast.metrics.EncoderFeatures`), as "
          "FD_DINOv2 is for DINOv2 — the aligned arms were trained towards that space and may be favoured by it, "
          "so the independent classifier's FID stands beside it.",
          f"- Floor: {s['num_samples']} *real* digits score FID {fl:.2f} ± {fs:.2f} against the same reference.\n"]
    return L


def _setup_other(study: dict) -> List[str]:
    """The setup of a study on an image folder or latents: FID from a local Inception file, or none."""
    s, fd = study["settings"], study["fd_key"]
    latents = "reference_images" in s
    ref = (f"{s['reference_images']} of the images the latent dataset stores (its source images, centre-cropped "
           "by preprocess; evenly spaced, at most 5,000)" if latents else "every image of the folder")
    L = ["## Setup\n"] + _model_lines(study, f"the {'latents' if latents else 'images'} of `{study['data']}`")
    if latents:
        L += [f"- Latent preset: lr {s['lr']:g}, EMA {s['ema_decay']:g}, λ half-life {s['half_life']} steps, taken from "
              "the digits preset (the trainer's latent defaults are the 400K-step ImageNet recipe); every sample is "
              "decoded with the dataset's VAE before it is scored."]
    fid = (f"FID in the feature space of the local Inception file against {ref}" if
           study.get("fid_network") else "**no FID**: no Inception file was given (`--inception`), so FID is null and "
           f"the speed figure, the targets τ and the verdict use `{fd}` instead")
    L += ["", f"- Evaluation: EMA weights, {s['num_samples']} samples per checkpoint ({s['sampler']}, "
          f"{s['sample_steps']} steps, guidance {s['cfg_scale']:g}; the same per-index noise and balanced classes for "
          f"every checkpoint). {fid}. `{fd}`: the Fréchet distance against {ref} in the target "
          "encoder's space (DINOv2: its CLS token, as FD_DINOv2 of Stein et al. / EDM2; "
          "`erw_fast.metrics.EncoderFeatures`) — the aligned arms were trained towards that space and may be "
          "favoured by it.\n"]
    return L


def _by_fraction_tables(results: List[dict], study: dict) -> List[str]:
    budget, seeds = study["budget"], study["seeds"]
    fracs = sorted({round(r["fraction"], 6) for r in results})
    L = []
    fd = study["fd_key"]
    for key, title, fmt, scale in (("fid", "FID", "{:.2f}", 1.0), (fd, f"{fd} (FD in the target encoder's space)",
                                                                  "{:.3g}", 1.0), ("accuracy", "accuracy %", "{:.1f}", 100.0)):
        if not any(r.get(key) is not None for r in results):
            continue
        L += [f"**{title}** (mean ± std over seeds {', '.join(map(str, seeds))}; \"–\": inside the warmup)\n",
              "| arm | " + " | ".join(f"{q * 100:.0f}% ({q * budget / 1e12:.2f} TF)" for q in fracs) + " |",
              "|---|" + "---|" * len(fracs)]
        for name in study["present"]:
            cells = []
            for q in fracs:
                g = [r[key] * scale for r in results if r["arm"] == name and round(r["fraction"], 6) == q
                     and r.get(key) is not None]
                cells.append(_pm(g, fmt) if g else "–")
            L.append(f"| {study['arms'][name]['label']} | " + " | ".join(cells) + " |")
        L.append("")
    return L


def _ratio_table(results: List[dict], study: dict) -> List[str]:
    budget, seeds, arms = study["budget"], study["seeds"], study["arms"]
    L = ["## Compute to reach REPA's and vanilla's final FID\n",
         "Share of the budget (FLOPs, extraction and warmup included) at which each arm first reaches the final FID "
         "of REPA / of vanilla SiT with the same seed; seconds over REPA's whole run. Linear interpolation between "
         "evaluations; \"≤\": already there at the first evaluation.\n",
         "| arm | to REPA's final FID: FLOPs | seconds | to vanilla's final FID: FLOPs | seconds |",
         "|---|---|---|---|---|"]
    for name in study["present"]:
        cells = []
        for target in ("repa", "vanilla"):
            if target not in study["present"] or name == target:
                cells += ["–", "–"]
                continue
            rows = compute_ratios(results, budget, seeds, name, target, key=study.get("metric", "fid"))
            cells += [format_ratio(rows), format_ratio(rows, "seconds_ratio")]
        L.append(f"| {arms[name]['label']} | " + " | ".join(cells) + " |")
    return L + [""]


def _targets_table(results: List[dict], study: dict) -> List[str]:
    """Compute and wall time to reach each fixed FID target τ, per arm, mean ± std over seeds."""
    budget, seeds, arms, targets = study["budget"], study["seeds"], study["arms"], study["fid_targets"]
    if not targets:
        return []
    L = ["## Compute to reach fixed FID targets\n",
         f"Targets τ: {', '.join(f'{t:g}' for t in targets)} ({study['target_rule']}). Per arm and seed: the share of "
         "the budget (FLOPs, extraction and warmup included) and the training seconds at which the FID curve first "
         "reaches τ, linearly interpolated between evaluations, never extrapolated: a seed whose last evaluation is "
         "above τ is \"not reached\"; \"≤\": already there at the first evaluation.\n",
         "| arm | " + " | ".join(f"FID ≤ {t:g}: compute | seconds" for t in targets) + " |",
         "|---|" + "---|---|" * len(targets)]
    for name in study["present"]:
        cells = []
        for t in targets:
            rows = reach_rows(results, budget, seeds, name, t, study.get("metric", "fid"))
            cells += [format_ratio(rows), format_ratio(rows, "seconds", "{:.0f}")]
        L.append(f"| {arms[name]['label']} | " + " | ".join(cells) + " |")
    return L + [""]


def _best_warmup(results: List[dict], study: dict):
    """The ERW sweep arm with the lowest mean final FID (None without one)."""
    m = study.get("metric", "fid")
    fins = {n: [r[m] for r in finals(results, n, study["seeds"])] for n in study["sweep"] if n in study["present"]}
    fins = {n: np.mean(v) for n, v in fins.items() if v}
    return min(fins, key=fins.get) if fins else None


def verdict(results: List[dict], study: dict) -> dict:
    """The headline: the best warmup share Y (by mean final FID), the lowest target τ that it and REPA
    reach in every seed, its compute over REPA's to reach τ (X ± s, per seed), and the encoder's fit Z
    (CKNNA at the aligned block after that arm's warmup, mean ± std over seeds)."""
    seeds, budget, best = study["seeds"], study["budget"], _best_warmup(results, study)
    out = dict(arm=best, warmup=None, target=None, ratio=None, fit=None)
    if best is None:
        out["line"] = "no ERW warmup arm was evaluated: no verdict"
        return out
    out["warmup"] = study["arms"][best]["warmup"]
    fits = [f["cknna"] for f in study.get("fits", {}).get(best, {}).values()]
    out["fit"] = _pm(fits, "{:.3f}") if fits else "n/a"
    for t in sorted(study["fid_targets"]) if "repa" in study["present"] else []:  # the lowest both reach in every seed
        m = study.get("metric", "fid")
        mine, ref = reach_rows(results, budget, seeds, best, t, m), reach_rows(results, budget, seeds, "repa", t, m)
        rel = relative_rows(mine, ref)
        if rel and len(rel) == len(mine) == len(ref):
            out.update(target=t, ratio=format_ratio(rel).replace("**", ""))
            break
    share = f"{out['warmup'] * 100:g}%"
    if out["target"] is None:
        head = ("REPA was not evaluated" if "repa" not in study["present"] else
                f"ERW (warmup {share}) and REPA reached none of the FID targets "
                f"{', '.join(f'{t:g}' for t in study['fid_targets']) or '(none)'} together in every seed")
    else:
        head = f"ERW (warmup {share}) reached FID {out['target']:g} with {out['ratio']} of REPA's compute (warmup counted)"
    out["line"] = relabel(f"on this data {head}; best warmup share {share}; the target encoder's fit (CKNNA at the "
                          f"aligned block after the warmup) {out['fit']}", study)
    return out


def relabel(text: str, study: dict) -> str:
    """The report's words for the speed metric: "FID", or, in a study without an FID network (an image
    folder without --inception), the name of the FD in the target encoder's space that stands in for it."""
    m = study.get("metric", "fid")
    return text if m == "fid" else text.replace("FID", m)


def _verdict_block(results: List[dict], study: dict) -> List[str]:
    v = verdict(results, study)
    return ["## Verdict\n", v["line"] + ".\n",
            relabel("Best warmup share: the ERW sweep arm with the lowest mean final FID; τ: the lowest of the targets "
                    "above that it and REPA reach in every seed; the ratio per seed is its FLOPs to τ over REPA's (same "
                    "seed). ", study) + f"The fit: CKNNA ({study['encoder']}, {study['fit_desc']}) of the arm's end-of-warmup checkpoint. "
            f"{study['fd_key']} is measured in the space of the encoder the aligned arms were trained towards and "
            "may favour them; " + {"digits classifier": "the FID beside it comes from the independent digits "
                                    "classifier.\n", "Inception": "the FID beside it comes from the independent "
                                    "Inception network.\n"}.get(study.get("fid_network", "digits classifier"),
                                                                 "no independent network scored this study (no "
                                                                 "--inception), so read it with that caution.\n")]


def _sweep_table(results: List[dict], study: dict) -> List[str]:
    budget, seeds, arms = study["budget"], study["seeds"], study["arms"]
    sweep = [n for n in study["sweep"] if n in study["present"]]
    if not sweep:
        return []
    L = ["## How long should the warmup be?\n",
         "| warmup share | warmup steps | final FID | accuracy % | to REPA's final FID (FLOPs) | run seconds |",
         "|---|---|---|---|---|---|"]
    best_fid, best_reach, m = {}, {}, study.get("metric", "fid")
    for name in sweep:
        fin = finals(results, name, seeds)
        rows = compute_ratios(results, budget, seeds, name, "repa", key=m) if "repa" in study["present"] else []
        got = [r["ratio"] for r in rows if r["ratio"] is not None]
        best_fid[name] = np.mean([r[m] for r in fin])
        best_reach[name] = (len(rows) - len(got), np.mean(got) if got else np.inf)
        acc = _pm([r['accuracy'] * 100 for r in fin], '{:.1f}') if all("accuracy" in r for r in fin) else "–"
        L.append(f"| {arms[name]['warmup'] * 100:g}% | {study['plans'][name]['warmup_steps']} | "
                 f"{_pm([r[m] for r in fin])} | {acc} | "
                 f"{format_ratio(rows) if rows else '–'} | {_pm([r['seconds'] for r in fin], '{:.0f}')} |")
    by_fid = min(best_fid, key=best_fid.get)
    by_reach = min(best_reach, key=best_reach.get)
    reach = f"**{arms[by_reach]['warmup'] * 100:g}%**" if np.isfinite(best_reach[by_reach][1]) else \
        "none (no warmup share reached it in every seed)"
    per_seed = []
    for s in seeds:
        f = {n: finals(results, n, [s]) for n in sweep}
        f = {n: v[0][m] for n, v in f.items() if v}
        if f:
            per_seed.append(f"seed {s}: {arms[min(f, key=f.get)]['warmup'] * 100:g}%")
    L += ["", f"Compute-optimal warmup share, by mean final FID: **{arms[by_fid]['warmup'] * 100:g}%** (best per seed: "
          f"{'; '.join(per_seed)}); by the compute to reach REPA's final FID: {reach}.\n"]
    return L


def _per_seed_table(results: List[dict], study: dict) -> List[str]:
    L = ["## Per seed (final checkpoint)\n",
         f"| arm | seed | FID | {study['fd_key']} | accuracy % | seconds | final velocity loss | final alignment loss | "
         "CKNNA after the warmup |",
         "|---|---|---|---|---|---|---|---|---|"]
    for name in study["present"]:
        for s in study["seeds"]:
            cv = finals(results, name, [s])
            if not cv:
                continue
            lo = study["losses"].get(name, {}).get(str(s)) or {}
            al = f"{lo['align']:.3f}" if lo and study["arms"][name]["method"] != "vanilla" and \
                study["arms"][name]["stop"] is None else "–"
            fd, fit = cv[-1].get(study["fd_key"]), study.get("fits", {}).get(name, {}).get(str(s))
            fid, acc = cv[-1]["fid"], cv[-1].get("accuracy")
            L.append(f"| {study['arms'][name]['label']} | {s} | {'–' if fid is None else format(fid, '.2f')} | "
                     f"{'–' if fd is None else format(fd, '.3g')} | {'–' if acc is None else format(acc * 100, '.1f')} | "
                     f"{cv[-1]['seconds']:.0f} | {lo.get('velocity', float('nan')):.4f} | {al} | "
                     f"{'–' if not fit else format(fit['cknna'], '.3f')} |")
    return L + ["", "Losses: mean of the single-batch values logged in the last 10% of full training. Seconds: the "
                "run's training wall clock (extraction and warmup included).\n"]


def write_doc(path: str, results: List[dict], study: dict) -> str:
    L = _head(study) + (_setup(study) if study.get("data", "digits") == "digits" else _setup_other(study))
    if study["config"]["plot"]:
        rel = os.path.relpath(study["config"]["plot"], os.path.dirname(os.path.abspath(path)) or ".")
        L.append(f"![FID and accuracy against training compute, and the warmup sweep]({rel})\n")
    R = _targets_table(results, study) + _ratio_table(results, study) + _sweep_table(results, study)
    L += ["## Results\n"] + _by_fraction_tables(results, study) + [relabel(line, study) for line in R]
    L += _per_seed_table(results, study)
    L += ["## Notes\n", _keep_notes(path), ""] + _verdict_block(results, study)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(L))
    return path
