"""`villes attribute NAME`: which concepts (SAE features) made each predicted letter of a name, and how far to trust
the numbers. A thin face over `interp.attribution` (imports stay lazy so `villes --help` stays fast)."""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

from training.errors import VillesError

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CHECKPOINT = ROOT / "checkpoints" / "transformer"
DEFAULT_SAE = ROOT / "checkpoints" / "sae"
METHOD_NAMES = ("direct", "gxa", "atp", "ig", "ablation")  # interp.attribution.METHODS (checked by the tests)
MEAN_NAMES = 2000  # train names whose feature means make the "mean" baseline


def add_attribute_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "attribute",
        help="which concepts (SAE features) made a predicted letter, with faithfulness checks",
        description="Attribute the prediction of each letter of NAME (or of --position) to SAE features: direct "
        "(exact, through the frozen final norm), gradient x activation, attribution patching, integrated gradients "
        "and exact ablation, with Spearman vs ablation, error share and the keep-top-k curve.",
    )
    p.add_argument("name", help="a commune name, e.g. saint-malo")
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT, help="model checkpoint folder")
    p.add_argument(
        "--sae", type=Path, action="append", default=None, help="SAELens SAE folder; repeat for several hooks"
    )
    p.add_argument("--position", type=int, default=None, help="index of the predicted character (len(name): the end)")
    p.add_argument("--target", default=None, help="character to attribute (default: the actual next one; <eos>)")
    p.add_argument("--versus", default=None, help="the target becomes logit(target) - logit(versus)")
    p.add_argument("--kind", choices=["logprob", "logit"], default="logprob", help="log-probability or logit")
    p.add_argument("--method", action="append", choices=METHOD_NAMES, default=None, help="repeat; default: all")
    p.add_argument("--baseline", choices=["mean", "zero"], default="mean", help="value a feature is ablated to")
    p.add_argument("--ig-steps", type=int, default=16)
    p.add_argument("--top", type=int, default=10, help="features shown in the table")
    p.add_argument("--graph", action="store_true", help="attribution graph (default when several SAEs)")
    p.add_argument("--json", action="store_true", help="everything as JSON on stdout")
    p.add_argument("--html", type=Path, default=None, help="write an offline page (plotly.min.js beside it)")
    p.add_argument("--feature-link", default="features/{index}.html", help="dashboard page of a feature")
    p.add_argument(
        "--labels",
        type=Path,
        default=None,
        metavar="DIR",
        help="a `villes monosemanticity --out` folder of these SAEs: label each feature with its best concept, Mono1",
    )
    p.set_defaults(func=cmd_attribute)
    return p


def cmd_attribute(args) -> int:
    import torch

    from interp.attribution import Target, attribute, feature_means, format_attribution, write_html
    from training.data import load_corpus, normalize
    from training.neural import load_checkpoint
    from training.sae import load_sae

    if args.top <= 0:
        raise VillesError(f"--top must be positive, got {args.top}")
    if args.ig_steps <= 0:
        raise VillesError(f"--ig-steps must be positive, got {args.ig_steps}")
    if args.html is not None and args.html.is_dir():
        raise VillesError(f"--html {args.html} is a folder: give a file name")
    model, tok, config = load_checkpoint(args.checkpoint)
    if config.get("kind") != "transformer":
        raise VillesError(f"{args.checkpoint} holds a {config.get('kind')} model: attribution needs a transformer")
    corpus_info = config.get("corpus", {})
    name = normalize(args.name) if corpus_info.get("lowercase", True) else args.name.strip()
    saes = [load_sae(folder, trained_on=args.checkpoint) for folder in (args.sae or [DEFAULT_SAE])]
    labels = None
    if args.labels is not None:  # checked against the SAEs before any model work
        from interp.monosemanticity import sae_labels

        labels = {}
        for sae in saes:
            hook = sae.cfg.metadata.hook_name
            labels.update({(hook, i): v for i, v in sae_labels(args.labels, sae, hook).items()})
    kind = "logit_diff" if args.versus is not None else args.kind
    if args.versus is not None and args.kind != "logprob":
        raise VillesError("--versus makes a logit difference: leave --kind out")
    target = Target(char=args.target, kind=kind, versus=args.versus)
    means = None
    torch.set_grad_enabled(True)
    if args.baseline == "mean":
        tok.encode(name)  # an unknown character is reported before the corpus pass
        corpus = load_corpus(corpus_info.get("names_file"), lowercase=corpus_info.get("lowercase", True))
        train = corpus.split_names("train")
        ref = random.Random(0).sample(train, min(MEAN_NAMES, len(train)))
        means = feature_means(model, saes, ref, tokenizer=tok)
    result = attribute(
        model,
        saes,
        name,
        position=args.position,
        target=target,
        methods=args.method,
        tokenizer=tok,
        baseline=args.baseline,
        means=means,
        ig_steps=args.ig_steps,
        graph=True if args.graph else None,
        feature_link=args.feature_link,
        labels=labels,
    )
    if args.html is not None:
        path = write_html(result, args.html, start=args.position)
        print(f"wrote {path}", file=sys.stderr)
    if args.json:
        print(result.to_json())
    else:
        print(format_attribution(result, args.position, top=args.top))
        if args.position is None and len(result.predictions) > 1:
            print("\n(--position P for the ranked table of one prediction; --html FILE for all of them)")
    return 0
