"""`villes train sae` and `villes eval-sae`: thin faces over training.sae. Kept apart from it so that building the
parser imports neither SAELens nor TransformerLens (`villes --help` stays fast)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from training.errors import VillesError

SHOWN = (
    "l0",
    "explained_variance",
    "loss_recovered",
    "kl",
    "dead_fraction",
    "dense_fraction",
    "l2_ratio",
    "ce_loss_clean",
    "ce_loss_spliced",
    "ce_loss_zero_ablation",
)


def _table(metrics: dict, extra: tuple[str, ...] = ()) -> str:
    from training.cli import format_table

    rows = [
        {"metric": k, "value": f"{metrics[k]:.4f}" if isinstance(metrics[k], float) else metrics[k]}
        for k in (*SHOWN, *extra)
        if k in metrics
    ]
    return format_table(rows, ["metric", "value"])


def cmd_train_sae(args) -> int:
    from training.sae import METRICS_FILE, SAESettings, read_sae_state, train_sae_to_folder

    fields = ("hook", "arch", "d_sae", "expansion", "k", "l1", "tokens", "lr", "batch_size", "seed")
    given = {f: getattr(args, f) for f in fields if getattr(args, f) is not None}
    out, checkpoint = args.resume or args.out, args.checkpoint
    if args.resume:  # the interrupted run's own settings and model; flags given too must agree with them
        info = read_sae_state(out)
        if info is None:
            if not (out / METRICS_FILE).is_file():
                raise VillesError(f"{out} holds no interrupted SAE run (no state.json): start one with --out")
            from training.checkpoint import read_json

            return _report_training(read_json(out / METRICS_FILE), out, args.json)  # finished already
        given = {**info["run"]["settings"], **given}
        checkpoint = checkpoint or _resolve_checkpoint(info["run"]["metadata"]["model_checkpoint"])
    elif checkpoint is None:
        raise VillesError("--checkpoint is required for a new run (or --resume DIR to continue one)")
    metrics = train_sae_to_folder(
        checkpoint, SAESettings(**given), out, not args.json, checkpoint_every=args.checkpoint_every
    )
    return _report_training(metrics, out, args.json)


def _report_training(metrics: dict, out: Path, as_json: bool) -> int:
    if as_json:
        print(json.dumps(metrics, ensure_ascii=False))
        return 0
    print(
        f"{metrics['architecture']} SAE {metrics['d_in']}->{metrics['d_sae']} on {metrics['hook_name']} of "
        f"{metrics['model_checkpoint']}, in {out} (validation split):"
    )
    print(_table(metrics, ("tokens_per_second",)))
    return 0


def _resolve_checkpoint(recorded: str) -> Path:
    from training.sae import REPO_ROOT

    path = Path(recorded)
    return path if path.is_absolute() or path.exists() else REPO_ROOT / path


def cmd_eval_sae(args) -> int:
    from training.checkpoint import read_json
    from training.data import load_corpus
    from training.sae import evaluate_sae, load_sae

    sae = load_sae(args.sae)
    checkpoint = args.checkpoint
    if checkpoint is None:
        recorded = sae.cfg.metadata.get("model_checkpoint")
        if not recorded:
            raise VillesError(f"{args.sae} does not record its model checkpoint: pass --checkpoint")
        checkpoint = _resolve_checkpoint(recorded)
    sae = load_sae(args.sae, checkpoint)  # checks hook, width and weights against that checkpoint
    from training.transformer import load_model

    model = load_model(checkpoint)
    info = read_json(Path(checkpoint) / "config.json").get("corpus", {})
    corpus = load_corpus(info.get("names_file"), lowercase=info.get("lowercase", True))
    metrics = evaluate_sae(model, sae, corpus.split_names(args.split))
    if args.json:
        print(json.dumps({"sae": str(args.sae), "checkpoint": str(checkpoint), "split": args.split, **metrics}))
        return 0
    print(f"{sae.cfg.architecture()} SAE {args.sae} on {sae.cfg.metadata.hook_name} of {checkpoint} ({args.split}):")
    print(_table(metrics))
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def add_sae_parsers(verbs, train_kinds) -> None:
    """`train sae` under `villes train`'s kinds, and the `eval-sae` verb."""
    from training.sae import ARCHS, DEFAULT_K, DEFAULT_L1, SAESettings

    d = SAESettings()

    q = train_kinds.add_parser("sae", help="train a sparse autoencoder (SAELens) on a hook of a transformer checkpoint")
    q.add_argument(
        "--checkpoint", type=Path, default=None, help="transformer checkpoint folder (--resume: the run's own)"
    )
    q.add_argument("--hook", default=None, help="TransformerLens hook name (default blocks.{last}.hook_resid_post)")
    q.add_argument("--arch", choices=ARCHS, default=None, help=f"(default {d.arch})")
    width = q.add_mutually_exclusive_group()
    width.add_argument("--d-sae", type=_positive_int, default=None, help="number of latents")
    width.add_argument(
        "--expansion", type=_positive_int, default=None, help=f"latents per input dimension (default {d.expansion})"
    )
    sparsity = q.add_mutually_exclusive_group()
    sparsity.add_argument(
        "--k",
        type=float,
        default=None,
        help=f"topk/batchtopk: active latents; jumprelu: target L0 (default {DEFAULT_K:g})",
    )
    sparsity.add_argument(
        "--l1",
        type=float,
        default=None,
        help=f"standard: L1 coefficient (default {DEFAULT_L1:g}); jumprelu: L0 coefficient",
    )
    q.add_argument("--tokens", type=_positive_int, default=None, help=f"training samples (default {d.tokens:,})")
    q.add_argument("--lr", type=float, default=None, help=f"(default {d.lr:g})")
    q.add_argument("--batch-size", type=_positive_int, default=None, help=f"(default {d.batch_size})")
    q.add_argument("--seed", type=int, default=None, help=f"(default {d.seed})")
    where = q.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--out",
        type=Path,
        help="SAE folder to write (new, empty, or an SAE folder); the same command again continues an interrupted run",
    )
    where.add_argument(
        "--resume", type=Path, help="continue the interrupted run in this folder, with its settings and checkpoint"
    )
    q.add_argument(
        "--checkpoint-every",
        type=_positive_int,
        default=None,
        help="steps between saves of the resume state (default: a tenth of the run)",
    )
    q.add_argument("--json", action="store_true", help="print the metrics as JSON (and no progress bar)")
    q.set_defaults(func=cmd_train_sae)

    p = verbs.add_parser("eval-sae", help="measure an SAE folder on a split (L0, explained variance, loss recovered…)")
    p.add_argument("--sae", type=Path, required=True, help="SAELens SAE folder")
    p.add_argument("--checkpoint", type=Path, default=None, help="model checkpoint (default: the one the SAE records)")
    p.add_argument("--split", default="val", choices=["train", "val", "test"])
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval_sae)
