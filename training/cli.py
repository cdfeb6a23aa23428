"""`villes <verb> …`: a thin face over training/ and interp/. Flags map onto the settings dataclasses; bad input
exits with status 2 and one line on stderr, before anything is written."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

from training.errors import VillesError


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, status 2 (argparse's default prints the usage block too)
        self.exit(2, f"{self.prog}: error: {message}\n")


def _positive_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}")
    return value


def add_dataclass_flags(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = (), defaults: dict | None = None):
    """One --flag per field of a settings dataclass (underscores become hyphens); unset flags stay None."""
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        default = (defaults or {}).get(f.name, f.default)
        kind = type(default) if default is not None else (int if "int" in str(f.type) else str)
        if kind is bool:
            parser.add_argument(
                f"--{f.name.replace('_', '-')}",
                type=lambda s: s.lower() in ("1", "true", "yes"),
                default=None,
                metavar="BOOL",
                help=f"(default {default})",
            )
        else:
            parser.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=None, help=f"(default {default})")


def dataclass_from_flags(cls, args: argparse.Namespace, defaults: dict | None = None):
    values = dict(defaults or {})
    for f in dataclasses.fields(cls):
        v = getattr(args, f.name, None)
        if v is not None:
            values[f.name] = v
    return cls(**values)


def _corpus(args):
    from training.data import load_corpus

    return load_corpus(getattr(args, "names_file", None), lowercase=not getattr(args, "keep_case", False))


def _model_flags(p: argparse.ArgumentParser, split: bool = False) -> None:
    from training.ladder import LEVELS

    p.add_argument("--model", required=True, choices=list(LEVELS))
    p.add_argument("--order", type=int, default=None, help="n-gram order for --model ngram (default 5)")
    p.add_argument("--checkpoint", type=Path, default=None, help="checkpoint folder for mlp/transformer")
    p.add_argument("--names-file", type=Path, default=None, help="one name per line: replaces the default corpus")
    p.add_argument("--keep-case", action="store_true", help="do not lowercase names")


def cmd_generate(args) -> int:
    from training.ladder import load_level
    from training.sampling import SampleSettings

    if args.n <= 0:
        raise VillesError(f"--n must be positive, got {args.n}")
    lm = load_level(args.model, _corpus(args), args.order, args.checkpoint)
    s = SampleSettings(n=args.n, seed=args.seed, temperature=args.temperature, top_k=args.top_k, prefix=args.prefix)
    print("\n".join(lm.sample(s)))
    return 0


def cmd_eval(args) -> int:
    from training.ladder import load_level

    corpus = _corpus(args)
    names = corpus.split_names(args.split)
    lm = load_level(args.model, corpus, args.order, args.checkpoint)
    total, count = lm.nll(names)
    result = {"model": args.model, "split": args.split, "nll": total / count, "n_chars": count, "n_names": len(names)}
    print(
        json.dumps(result)
        if args.json
        else f"{args.model} {args.split}: {result['nll']:.4f} nats/char over {count} predictions ({len(names)} names)"
    )
    return 0


def format_table(rows: list[dict], columns: list[str]) -> str:
    cells = [[str(r[c]) for c in columns] for r in rows]
    widths = [max(len(c), *(len(x[i]) for x in cells)) for i, c in enumerate(columns)]
    line = lambda xs: "  ".join(x.ljust(w) for x, w in zip(xs, widths, strict=False))  # noqa: E731
    return "\n".join([line(columns), line(["-" * w for w in widths]), *map(line, cells)])


def cmd_ladder(args) -> int:
    from training.ladder import ladder

    ckpts = {k: v for k, v in {"mlp": args.mlp, "transformer": args.transformer}.items() if v}
    rows, notes = ladder(_corpus(args), args.order, ckpts, seed=args.seed, progress=not args.json)
    for note in notes:
        print(note, file=sys.stderr)
    if args.json:
        print(json.dumps([dataclasses.asdict(r) for r in rows], ensure_ascii=False, indent=1))
        return 0
    table = [r.display() for r in rows]
    print(format_table(table, list(table[0])))
    return 0


def cmd_train(args) -> int:
    from training.lm import TrainSettings
    from training.mlp import MLPSettings
    from training.neural import train_to_folder
    from training.transformer import TransformerSettings

    model_cls = {"mlp": MLPSettings, "transformer": TransformerSettings}[args.kind]
    if args.resume:
        out, resume = args.resume, True
    elif args.out:
        out, resume = args.out, False
    else:
        raise VillesError("give --out DIR for a new run or --resume DIR to continue one")
    defaults = TRAIN_DEFAULTS[args.kind]
    settings = dataclass_from_flags(TrainSettings, args, defaults)
    model_settings = dataclasses.asdict(dataclass_from_flags(model_cls, args, MODEL_DEFAULTS[args.kind]))
    model_settings.pop("d_vocab", None)
    if resume and args.names_file is None:  # continue on the corpus the run started on
        from training.checkpoint import read_json

        corpus_info = read_json(out / "config.json").get("corpus", {})
        args.names_file = corpus_info.get("names_file")
        args.keep_case = not corpus_info.get("lowercase", True)
    metrics = train_to_folder(args.kind, model_settings, settings, _corpus(args), out, resume=resume)
    print(
        f"{args.kind} in {out}: val {metrics['val_nll']:.4f} nats/char, train {metrics['train_nll']:.4f}, "
        f"{metrics['steps']} steps, {metrics['params']} params"
    )
    return 0


def cmd_demo(args) -> int:
    from training.demo import run_demo

    print(run_demo(args.out))
    return 0


# The shipped checkpoints' settings (`villes train transformer --out DIR` reproduces checkpoints/transformer)
TRAIN_DEFAULTS = {
    "mlp": {"lr": 2e-3, "dropout": 0.2, "ema": 0.999, "steps": 15_000, "batch_size": 128, "eval_every": 500},
    "transformer": {
        "lr": 3e-3,
        "dropout": 0.1,
        "ema": 0.999,
        "steps": 6_000,
        "warmup": 200,
        "batch_size": 128,
        "eval_every": 500,
        "patience": 4,
    },
}
MODEL_DEFAULTS = {"mlp": {}, "transformer": {}}


def build_parser() -> argparse.ArgumentParser:
    from training.lm import TrainSettings
    from training.mlp import MLPSettings
    from training.transformer import TransformerSettings

    parser = _Parser(
        prog="villes", description="French commune names: a ladder of generators and the tools to open them"
    )
    sub = parser.add_subparsers(dest="verb", required=True, parser_class=_Parser)

    p = sub.add_parser("generate", help="sample names from a level of the ladder")
    _model_flags(p)
    p.add_argument("--n", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prefix", default="")
    p.add_argument("--temperature", type=_positive_float, default=1.0)
    p.add_argument("--top-k", type=int, default=None)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("eval", help="NLL in nats per predicted character on a split")
    _model_flags(p)
    p.add_argument("--split", default="val", choices=["train", "val", "test", "all"])
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("ladder", help="every level: params, train/val NLL, novelty, samples")
    p.add_argument("--order", type=int, default=5, help="order of the n-gram level")
    p.add_argument("--mlp", type=Path, default=None, help="MLP checkpoint (default checkpoints/mlp)")
    p.add_argument(
        "--transformer", type=Path, default=None, help="Transformer checkpoint (default checkpoints/transformer)"
    )
    p.add_argument("--names-file", type=Path, default=None)
    p.add_argument("--keep-case", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_ladder)

    p = sub.add_parser("demo", help="the main job on the shipped checkpoints: ladder, SAE, dashboards, ... under --out")
    p.add_argument("--out", type=Path, default=Path("out"))
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("train", help="train a neural level (mlp, transformer) into a checkpoint folder")
    tsub = p.add_subparsers(dest="kind", required=True, parser_class=_Parser)
    for kind, cls in (("mlp", MLPSettings), ("transformer", TransformerSettings)):
        q = tsub.add_parser(kind, help=f"train the {kind} level")
        q.add_argument("--out", type=Path, help="new checkpoint folder")
        q.add_argument("--resume", type=Path, help="continue an interrupted run in this folder")
        q.add_argument("--names-file", type=Path, default=None)
        q.add_argument("--keep-case", action="store_true")
        add_dataclass_flags(q, cls, skip=("d_vocab", "n_ctx", "seed", "dropout"), defaults=MODEL_DEFAULTS[kind])
        add_dataclass_flags(q, TrainSettings, defaults=TRAIN_DEFAULTS[kind])
        q.set_defaults(func=cmd_train)
    from training.sae_cli import add_sae_parsers

    add_sae_parsers(sub, tsub)
    from interp.steering import add_steer_parser

    add_steer_parser(sub)
    from interp.attribution_cli import add_attribute_parser

    add_attribute_parser(sub)
    from interp.dashboards import add_dashboards_parser

    add_dashboards_parser(sub)
    from interp.monosemanticity import add_monosemanticity_parser

    add_monosemanticity_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except VillesError as e:
        print(f"villes: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("villes: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
