"""Privacy-attack reports with a model card per client: privacy-attacks.json, .md, .png (and the reconstructions).

Built from ``simulation.privacy_attack.attack_run``'s report (whose summary ``summarize`` makes from the cards):
for each attacked client its tier and data size, its personalized model's gain with the federation report's
interval, its cumulative (epsilon, delta) with the unit and the accountant, what the attacks got out of its
updates and its model, and what is not protected. The reconstructions' grid is written only when the attack
kept them (synthetic data, or the user's explicit flag): it shows pictures of a client's scans.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from edgemri.core.io import save_figure
from edgemri.core.privacy.ledger import span
from edgemri.reports.common import markdown_table, write_report_files

STEM = "privacy-attacks"
RECONSTRUCTIONS_FILE = f"{STEM}-reconstructions.png"


def finite(obj: Any) -> Any:
    """The report with every NaN or infinity as None: strict JSON, which other tools can read."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite(v) for v in obj]
    return obj


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


def _steps_summary(steps: list[tuple[dict[str, Any], int]]) -> dict[str, Any]:
    """How often the single-image attacks single out the attacked scan among the client's (chance: 1/n each),
    recover its label, and their mean margins over the site baseline."""
    return {"steps": len(steps),
            "analytic_identified": sum(bool(s["analytic"].get("matches_true_image")) for s, _ in steps),
            "inversion_identified": sum(bool(s["inversion"]["matches_true_image"]) for s, _ in steps),
            "identified_by_chance": sum(1 / n for _, n in steps),
            "inversion_label_recovered": sum(bool(s["inversion"].get("label_recovered")) for s, _ in steps),
            "inversion_margin_db": _mean([s["inversion"].get("margin_db") for s, _ in steps]),
            "analytic_margin_db": _mean([s["analytic"].get("margin_db") for s, _ in steps])}


def summarize(cards: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The report's summary of its model cards, per tier and overall: the single-image attacks as configured and,
    for DP clients, without DP; the analytic attack on the sent updates; membership AUCs; how many replays matched
    what the clients reported."""
    out = {}
    for group in ("all", *sorted({c["kind"] for c in cards.values()})):
        members = [c for c in cards.values() if group in ("all", c["kind"])]
        updates = [(u, c["n_train"]) for c in members for u in c["updates"]]
        models = [c["membership"] for c in members if "skipped" not in c["membership"]]
        single = {variant: _steps_summary([(u["single_image"][variant], n) for u, n in updates
                                           if variant in u["single_image"]])
                  for variant in ("as_configured", "without_dp")}
        out[group] = {
            "clients": len(members), "updates": len(updates),
            "single_image": {k: v for k, v in single.items() if v["steps"]},
            "analytic_sent_margin_db": _mean([u["sent_update"]["analytic"].get("margin_db") for u, _ in updates]),
            "membership_auc": _mean([m["loss_threshold"]["auc"] for m in models]),
            "calibrated_membership_auc": _mean([m["calibrated"]["auc"] for m in models]),
            "learned_membership_auc": _mean([m["learned"].get("auc") for m in models]),
            "replays_matching": sum(bool(u["replay"]["matches"]) for u, _ in updates)}
    return out


def _db(value: float | None, signed: bool = False) -> str:
    return "—" if value is None else (f"{value:+.1f}" if signed else f"{value:.1f}")


def _pct(value: float | None, signed: bool = False) -> str:
    return "—" if value is None else (f"{100 * value:+.1f}" if signed else f"{100 * value:.1f}")


def _num(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def _yes(value: bool | None) -> str:
    return {True: "yes", False: "no", None: "—"}[value]


def _scored(result: dict[str, Any]) -> str:
    """Best-match PSNR/SSIM, against the random same-site image, and against the attacked scan where known."""
    if not result.get("applicable", True):
        return f"not applicable: {result['why']}"
    text = f"best match {_db(result['psnr'])} dB, SSIM {_num(result['ssim'], '.2f')}"
    if "baseline_psnr" in result:
        text += (f" (random same-site scan: {_db(result['baseline_psnr'])} dB, SSIM "
                 f"{_num(result['baseline_ssim'], '.2f')}; "
                 f"margin {_db(result['margin_db'], True)} dB)")
    if "psnr_true" in result:
        text += (f"; vs the attacked scan {_db(result['psnr_true'])} dB, it is the best match: "
                 f"{_yes(result['matches_true_image'])}")
    if "label_recovered" in result:
        text += f"; label recovered: {_yes(result['label_recovered'])}"
    return text


def _accuracy_line(accuracy: dict[str, Any] | None) -> str:
    if accuracy is None:
        return "— (no federation.json row for this client)"
    text = (f"on its {accuracy['where']}: personalized {_pct(accuracy['personalized'])}%, "
            f"{_pct(accuracy['gain_over_start'], True)} points over the start model, "
            f"{_pct(accuracy['gain_over_global'], True)} over the global model")
    intervals = [f"{key.split(' - ')[1]} {_pct(ci['mean'], True)} [{_pct(ci['low'], True)}, {_pct(ci['high'], True)}]"
                 f" (n={ci['n']})" for key, ci in accuracy["tier_paired"].items()]
    if intervals:
        text += "; its tier's mean gain over " + ", over ".join(intervals) + " (95% bootstrap CI, federation.json)"
    return text


def _privacy_line(privacy: dict[str, Any]) -> str:
    if not privacy["dp"]:
        return "no DP-SGD: its updates leave the device as trained (no epsilon bounds what they reveal)"
    agrees = {True: "privacy.json agrees", False: "privacy.json DISAGREES", None: "no privacy.json entry"}[
        privacy["privacy_json_agrees"]]
    plans = "; ".join(f"{span(s['rounds'])}: noise multiplier {_num(s['noise_multiplier'], '.2f')}, clipping norm "
                      f"{s['max_grad_norm']}, Poisson rate {_num(s['sample_rate'], '.3f')}"
                      for s in privacy["stretches"]) or "no round"
    return (f"({_num(privacy['epsilon'], '.2f')}, {_num(privacy['delta'], '.1e')})-DP for the unit "
            f"*{privacy['unit']}*, {privacy['accountant'].upper()} accountant, cumulative over "
            f"{span(privacy['rounds_trained'])}; {plans}; budget {privacy['budget_epsilon']}; from its "
            f"{privacy['source']} ({agrees})")


def _membership_line(membership: dict[str, Any]) -> str:
    if "skipped" in membership:
        return f"skipped: {membership['skipped']}"
    loss, calibrated = membership["loss_threshold"], membership["calibrated"]
    return (f"AUC {_num(loss['auc'], '.2f')} (loss threshold), {_num(calibrated['auc'], '.2f')} (calibrated on "
            f"the start model); TPR at 1% FPR {_num(loss['tpr_at_1pct_fpr'], '.2f')} / "
            f"{_num(calibrated['tpr_at_1pct_fpr'], '.2f')}; "
            f"{loss['members']} members (its training scans) vs {loss['nonmembers']} non-members (held-out scans "
            f"of its site); accuracy {_pct(membership['member_accuracy'])}% on members, "
            f"{_pct(membership['nonmember_accuracy'])}% on non-members; {_learned_line(membership.get('learned'))}")


def _learned_line(learned: dict[str, Any] | None) -> str:
    if learned is None:
        return "no learned attack in this report"
    if "skipped" in learned:
        return f"learned attack (ART) skipped: {learned['skipped']}"
    return (f"learned attack (ART black box, fitted on half, scored on the other): AUC {_num(learned['auc'], '.2f')}, "
            f"TPR at 1% FPR {_num(learned['tpr_at_1pct_fpr'], '.2f')} on {learned['members']} / "
            f"{learned['nonmembers']}")


def _card(card: dict[str, Any]) -> list[str]:
    privacy = card["privacy"]
    personal = {True: "DP-SGD's own output, so covered by the epsilon above",
                False: f"fine-tuned on the device's raw scans without DP noise ({card['method']}): the epsilon above "
                       f"does not cover it",
                None: "no DP anywhere"}[card["personal_model_under_dp"]]
    rows = [("tier, data", f"{card['kind']} at {card['site']}, {card['n_train']} training scans"),
            ("accuracy gain", _accuracy_line(card["accuracy"])),
            ("privacy (sample-level)", _privacy_line(privacy)),
            ("personalized model", personal)]
    for update in card["updates"]:
        r, check = update["round"], update["replay"]
        replay = {True: "exact (matches the train loss it reported)",
                  False: f"DIFFERS from what it reported (relative {check['relative_difference']:.1e}): the attack "
                         f"below is on a near copy of the sent update",
                  None: "not checked (no reported loss)"}[check["matches"]]
        sent = update["sent_update"]
        label = (f"; label read off the head: {sent['analytic']['label']} (its most frequent class: "
                 f"{_yes(sent['analytic'].get('label_is_majority_class'))})") if sent["analytic"].get("applicable") \
            else ""
        epsilon = f", epsilon after the round {_num(update['epsilon_after_round'], '.2f')}" if update["dp"] else ""
        rows.append((f"round {r}: sent update", f"replay {replay}; {sent['steps']:.0f} optimizer step(s) over "
                     f"{sent['images']} scans{epsilon}; analytic head attack: {_scored(sent['analytic'])}{label}"))
        step = update["single_image"]
        for variant, title in (("as_configured", "as configured"), ("without_dp", "without DP")):
            if variant not in step:
                continue
            result = step[variant]
            rows.append((f"round {r}: single-image step, {title}{' (DP-SGD)' if result['dp'] else ''}",
                         f"analytic: {_scored(result['analytic'])}. Inversion ({result['inversion']['steps']} steps"
                         f"{', label given' if result['inversion']['label_given'] else ''}): "
                         f"{_scored(result['inversion'])}"))
    for r, why in card["skipped_rounds"].items():
        rows.append((f"round {r}", why))
    rows += [("membership inference on its personalized model", _membership_line(card["membership"])),
             ("not protected", card["not_protected"])]
    return [f"### {card['client']}", "", markdown_table(["", ""], rows, align="ll"), ""]


def _single_image_table(summary: dict[str, Any]) -> str:
    rows = [(group if variant == "as_configured" else f"{group}: its DP clients, DP left out", single["steps"],
             single["analytic_identified"], single["inversion_identified"], f"{single['identified_by_chance']:.2f}",
             single["inversion_label_recovered"], _db(single["inversion_margin_db"], True),
             _db(single["analytic_margin_db"], True))
            for group, groups in summary.items() for variant, single in groups["single_image"].items()]
    return markdown_table(["group", "steps", "identified, analytic", "identified, inversion", "by chance",
                           "labels recovered (inversion)", "inversion − random (dB)", "analytic − random (dB)"], rows)


def _sent_and_kept_table(summary: dict[str, Any]) -> str:
    rows = [(group, s["clients"], _db(s["analytic_sent_margin_db"], True), _num(s["membership_auc"], ".2f"),
             _num(s["calibrated_membership_auc"], ".2f"), _num(s.get("learned_membership_auc"), ".2f"),
             f"{s['replays_matching']}/{s['updates']}") for group, s in summary.items()]
    return markdown_table(["group", "clients", "sent update, analytic − random (dB)", "membership AUC (loss)",
                           "membership AUC (calibrated)", "membership AUC (learned, ART)", "replays exact"], rows)


def render_markdown(report: dict[str, Any]) -> str:
    run, settings = report["run"], report["settings"]
    lines = [f"# Privacy attacks: `{run['method']}`, {run['rounds']} rounds, seed {run['seed']}", "",
             f"What an honest-but-curious server could get out of this run: {len(report['clients'])} of "
             f"{run['clients']} clients (sampled with seed {settings['seed']}), each update rebuilt by replaying the "
             "client's own training from the global model it received and checked against the training loss it "
             "reported, then attacked (docs/PRIVACY.md, *edgemri privacy attack*). Each number is what *one* "
             "attack achieved here: a weak result bounds nothing about a stronger attack, and only epsilon is a "
             "guarantee.", "",
             "- *sent update*: the client's real update (several optimizer steps over batches); the analytic "
             "attack reads the head's update as a feature map (exact for one image and one plain SGD step, a "
             "mix otherwise).",
             "- *single-image step*: the worst case, one plain SGD step on one of its scans from the same "
             "model, clipped and noised as its DP-SGD plan says (and without DP, for comparison); inversion: "
             f"Geiping et al.'s gradient inversion, {settings['inversion']['steps']} steps, with the global model.",
             "- *PSNR/SSIM*: of the best match among the client's own training scans (feature maps for the "
             f"analytic attack); *random same-site scan*: the mean of {settings['baseline_images']} held-out scans "
             f"of its site ({settings['nonmembers_from']}) scored the same way. A margin within 1 dB shows "
             "nothing a random scan from that scanner would not.",
             "- *membership*: its personalized model's loss on its training scans against held-out scans of its "
             "site; AUC 0.5 is chance.", "",
             "## Summary", "",
             "Single-image steps. *identified*: the reconstruction's best match among the client's scans is the "
             "attacked scan itself; *by chance*: the expected count if it were a random pick. PSNR alone flatters "
             "smooth or near-constant images (noise can out-score a real scan), so read the margins with SSIM "
             "and identification. *without DP*: the same scans and models, DP-SGD's clipping and noise left out.",
             "", _single_image_table(report["summary"]),
             "", "What the clients sent and kept: the analytic attack on their real updates, membership inference "
                 "on their personalized models, and how many replays reproduced the reported training exactly.", "",
             _sent_and_kept_table(report["summary"])]
    central = report["client_level"]
    lines += ["", "Client-level (central) DP: " + (
        f"({_num(central['epsilon'], '.2f')}, {_num(central['delta'], '.1e')})-DP for one whole client, in the "
        f"global models the server released ({central['side']}-side clipping); it does not hide an update from "
        "the server itself."
        if central["enabled"] and "epsilon" in central else
        "on in the config; privacy.json says what it spent." if central["enabled"] else "off in this run."),
        "", "## Model cards", ""]
    for card in report["clients"].values():
        lines += _card(card)
    if report["reconstructions_written"]:
        lines += [f"![reconstructions]({RECONSTRUCTIONS_FILE})", ""]
    lines += ["![privacy attacks](privacy-attacks.png)", "",
              f"Made in {report['seconds']:.0f} s with edgemri {report['versions'].get('edgemri', '?')}, "
              f"torch {report['versions'].get('torch', '?')}, opacus {report['versions'].get('opacus', '?')}. "
              "Results on synthetic data are not clinical results.", ""]
    return "\n".join(lines)


def _points(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One point per client: final epsilon (None without DP), accuracy gain, and the first update's margins."""
    points = []
    for card in report["clients"].values():
        first = card["updates"][0] if card["updates"] else None
        step = first["single_image"]["as_configured"] if first else None
        points.append({
            "client": card["client"], "kind": card["kind"],
            "epsilon": card["privacy"]["epsilon"] if card["privacy"]["dp"] else None,
            "gain": (card["accuracy"] or {}).get("gain_over_start"),
            "inversion": step["inversion"].get("margin_db") if step else None,
            "analytic_step": step["analytic"].get("margin_db") if step else None,
            "analytic_sent": first["sent_update"]["analytic"].get("margin_db") if first else None})
    return points


def plot_privacy_attacks(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = _points(report)
    finite_eps = [p["epsilon"] for p in points if p["epsilon"] is not None]
    no_dp_x = 2 * max(finite_eps) if finite_eps else 1.0  # clients without DP sit right of every epsilon

    def x(p: dict[str, Any]) -> float:
        return no_dp_x if p["epsilon"] is None else max(p["epsilon"], 1e-3)

    fig, (gain_ax, leak_ax) = plt.subplots(1, 2, figsize=(13, 4.6), layout="constrained")
    margins = [p["inversion"] for p in points if p["inversion"] is not None and p["gain"] is not None]
    limit = max([1.0, *map(abs, margins)])
    for kind, marker in zip(sorted({p["kind"] for p in points}), "osD^v", strict=False):
        shown = [p for p in points if p["kind"] == kind and p["gain"] is not None]
        scatter = gain_ax.scatter([x(p) for p in shown], [100 * p["gain"] for p in shown], marker=marker, s=60,
                                  c=[p["inversion"] if p["inversion"] is not None else 0.0 for p in shown],
                                  cmap="coolwarm", vmin=-limit, vmax=limit, edgecolors="black", label=kind)
        for p in shown:
            gain_ax.annotate(p["client"], (x(p), 100 * p["gain"]), fontsize=6, xytext=(3, 3),
                             textcoords="offset points")
    if gain_ax.collections:
        fig.colorbar(scatter, ax=gain_ax, label="inversion PSNR − random same-site scan (dB)")
        gain_ax.legend(fontsize=8)
    gain_ax.axhline(0, color="black", linewidth=0.8)
    gain_ax.set_ylabel("personalized − start accuracy (points)")
    gain_ax.set_title("Accuracy gain against epsilon; colour: reconstruction leak", fontsize=10)
    for key, label, marker in (("inversion", "inversion (single image)", "o"),
                               ("analytic_step", "analytic (single image)", "^"),
                               ("analytic_sent", "analytic (sent update)", "s")):
        shown = [p for p in points if p[key] is not None]
        leak_ax.scatter([x(p) for p in shown], [p[key] for p in shown], marker=marker, label=label, s=40)
    leak_ax.axhspan(-1, 1, color="grey", alpha=0.2, label="within 1 dB of a random same-site scan")
    leak_ax.set_ylabel("best-match PSNR − random same-site scan (dB)")
    leak_ax.set_title("What the attacks reconstruct, per client (first attacked round)", fontsize=10)
    leak_ax.legend(fontsize=7)
    for ax in (gain_ax, leak_ax):
        ax.set_xscale("log")
        ticks = sorted({float(f"{max(e, 1e-3):.2g}") for e in finite_eps})
        if len(ticks) > 5:  # many clients: a few ticks over their range
            ticks = sorted({float(f"{t:.2g}") for t in np.geomspace(ticks[0], ticks[-1], 4)})
        ax.set_xticks([*ticks, no_dp_x], [*map(str, ticks), "no DP"], fontsize=7)
        ax.minorticks_off()
        ax.set_xlabel("cumulative epsilon (sample-level, per client)")
        ax.grid(alpha=0.3)
    save_figure(path, fig)
    plt.close(fig)


def _display(image: Tensor) -> Any:
    """(3, H, W) as an H x W x 3 array in [0, 1]; a feature map (any range) as its channel mean, min-max scaled."""
    if image.shape[-1] != image.shape[-2] or image.shape[-1] < 64:  # a 32 x 32 feature map
        grey = image.float().mean(0)
        low, high = float(grey.min()), float(grey.max())
        return ((grey - low) / (high - low or 1.0)).numpy()
    return image.float().clamp(0, 1).permute(1, 2, 0).numpy()


def plot_reconstructions(examples: list[Any], path: Path) -> None:
    """One row per attacked round: the scan, its inversions, its feature map and the analytic reconstructions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = (("image", "the client's scan"), ("inversion", "inversion, as configured"),
               ("inversion_without_dp", "inversion without DP"), ("feature_map", "its feature map (head input)"),
               ("analytic_step", "analytic, single-image step"), ("analytic_update", "analytic, sent update"))
    fig, axes = plt.subplots(len(examples), len(columns), figsize=(2.2 * len(columns), 2.3 * len(examples)),
                             squeeze=False)
    for row, example in enumerate(examples):
        for col, (field, title) in enumerate(columns):
            ax = axes[row][col]
            ax.axis("off")
            image = getattr(example, field)
            if image is not None:
                ax.imshow(_display(image), cmap="gray", vmin=0, vmax=1)
            if row == 0:
                ax.set_title(title, fontsize=7)
            if col == 0:
                ax.text(-0.05, 0.5, example.title, transform=ax.transAxes, rotation=90, ha="right", va="center",
                        fontsize=6)
    save_figure(path, fig)
    plt.close(fig)


def write_privacy_attack_report(report: dict[str, Any], out: Path, examples: list[Any] | None = None
                                ) -> dict[str, Path]:
    """privacy-attacks.json/.md/.png in ``out`` (atomically), and the reconstructions' grid when ``examples``."""
    report = finite(report)
    paths = write_report_files(out, STEM, report, render_markdown, plot_privacy_attacks)
    if examples:
        paths["reconstructions"] = out / RECONSTRUCTIONS_FILE
        plot_reconstructions(examples, paths["reconstructions"])
    return paths
