"""Sparse autoencoders on any hook of a HookedTransformer, built, trained and measured with SAELens.

Positions. An SAE here reads the activations of the *character* positions of a name only. Of `<bos> c1 … cn <eos>
<pad>…`, the `<bos>` position is left out because its activation is one constant vector at every hook (position 0
attends only to itself), which would cost a latent and flatter every score; the `<eos>` position because nothing
reads it (its prediction, the symbol after `<eos>`, is never a target); padding because it is not text. Splicing
(reconstruction or zero-ablation) touches exactly the same positions and leaves the others clean, so the prediction
made at `<bos>` (the first character) is identical in every run. `sae_positions(tokens)` is that mask, for the
interp modules to use too.

Speed. The train split's activations are cached once (≈ 300k vectors: a few hundred MB at most) and SAELens's own
`SAETrainer` draws shuffled batches from that cache, so training runs at memory speed instead of SAELens's
streaming path (≈ 3,000 tokens/s here). TopK decodes, during training only, with one gather-sum of the k kept
decoder rows (`_GatherTopKTrainingSAE`); the shipped weights are SAELens's plain TopK SAE.

Folder (`train_sae_to_folder`):
    cfg.json, sae_weights.safetensors   SAELens's inference folder: `sae_lens.SAE.load_from_disk(DIR)` loads it as is.
                                        Its metadata names the hook, the model checkpoint and the sha256 of its weights.
    metrics.json                        validation metrics (see `evaluate_sae`) and training speed
    state.json, state-<step>/           resume state while training (`training.checkpoint.save_state`): the training
                                        SAE, Adam, the schedulers, the trainer's counters and dead-latent statistics,
                                        the activation scale and the position in the batch stream, as safetensors and
                                        JSON. A rerun continues from it with bit-identical results; the finished folder
                                        replaces the whole folder, state included.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

from training import checkpoint as ckpt
from training.errors import VillesError
from training.tokenizer import BOS_ID, EOS_ID, PAD_ID, SPECIALS, CharTokenizer, replace_dir

if TYPE_CHECKING:
    from sae_lens import SAE, TrainingSAE
    from transformer_lens import HookedTransformer

ARCHS = ("standard", "topk", "batchtopk", "jumprelu")
K_ARCHS = ("topk", "batchtopk", "jumprelu")  # jumprelu reads k as its target L0
L1_ARCHS = ("standard", "jumprelu")  # jumprelu reads l1 as its L0 coefficient
DEFAULT_K = 8.0
DEFAULT_L1 = 2.0  # standard
# dense activations (the gather decode below replaces SAELens's dense or COO-sparse decoder matmul while training)
TOPK = {"use_sparse_activations": False, "rescale_acts_by_decoder_norm": False}
# JumpReLU at this scale (inputs of mean norm sqrt(d_in)): SAELens's defaults (threshold 0.01, bandwidth 0.05) leave
# the threshold's gradient window so narrow that L0 never comes down to its target; these came from a short search
# on a 2-layer d_model 128 model (pre_act_loss is Anthropic's push on dead latents, applied to dead ones only).
JUMPRELU = {"jumprelu_init_threshold": 0.3, "jumprelu_bandwidth": 0.3, "pre_act_loss_coefficient": 0.1}
JUMPRELU_TARGET_COEFFICIENT = 0.5  # weight of the quadratic pull towards the target L0 (k)
DENSE_THRESHOLD = 0.1  # a latent active on more than this fraction of tokens counts as dense
REPO_ROOT = Path(__file__).resolve().parent.parent
METRICS_FILE = "metrics.json"


@dataclass(frozen=True)
class SAESettings:
    hook: str | None = None  # None: the residual stream after the last block, blocks.{last}.hook_resid_post
    arch: str = "topk"  # standard (ReLU + L1), topk, batchtopk (saved as jumprelu), jumprelu
    d_sae: int | None = None  # latents; None: expansion * d_in
    expansion: int = 16  # 2048 latents on d_model 128: at k=8, 4x gave 0.963 loss recovered, 8x 0.970, 16x 0.974
    k: float | None = None  # topk/batchtopk: active latents per token; jumprelu: target L0. None: 8 (k archs)
    l1: float | None = None  # standard: L1 coefficient; jumprelu without k: L0 coefficient (inputs are normalized
    # to mean norm sqrt(d_in) while training, so a coefficient carries over between models and hooks)
    tokens: int = 8_000_000  # training samples drawn from the cache (about 25 passes over the train split)
    lr: float = 3e-3
    batch_size: int = 4096
    b_dec_init: str = "mean"  # mean: the decoder bias starts at the mean activation (centred inputs); or zeros
    seed: int = 0

    def width(self, d_in: int) -> int:
        return self.d_sae or self.expansion * d_in

    def validate(self, d_in: int | None = None) -> None:
        """Bad settings as one VillesError, before anything is loaded or written."""
        if self.arch not in ARCHS:
            raise VillesError(f"unknown SAE architecture {self.arch!r}: choose one of {', '.join(ARCHS)}")
        if self.d_sae is not None and self.d_sae <= 0:
            raise VillesError(f"--d-sae must be positive, got {self.d_sae}")
        if self.expansion <= 0:
            raise VillesError(f"--expansion must be positive, got {self.expansion}")
        if self.k is not None and self.arch not in K_ARCHS:
            raise VillesError(f"--k applies to {', '.join(K_ARCHS)}, not to {self.arch} (use --l1)")
        if self.l1 is not None and self.arch not in L1_ARCHS:
            raise VillesError(f"--l1 applies to {', '.join(L1_ARCHS)}, not to {self.arch} (use --k)")
        if self.k is not None and self.l1 is not None:
            raise VillesError("give --k or --l1, not both")
        if self.l1 is not None and not (math.isfinite(self.l1) and self.l1 > 0):
            raise VillesError(f"--l1 must be a positive finite number, got {self.l1}")
        if self.k is not None and not math.isfinite(self.k):
            raise VillesError(f"--k must be finite, got {self.k}")
        if self.arch == "topk" and self.k is not None and self.k != int(self.k):
            raise VillesError(f"topk needs a whole number of active latents, got --k {self.k}")
        for name in ("tokens", "batch_size"):
            if getattr(self, name) <= 0:
                raise VillesError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.tokens < self.batch_size:
            raise VillesError(f"--tokens {self.tokens} is less than one batch ({self.batch_size})")
        if self.b_dec_init not in ("mean", "zeros"):
            raise VillesError(f"b_dec_init must be mean or zeros, got {self.b_dec_init!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise VillesError(f"--lr must be a positive finite number, got {self.lr}")
        if d_in is not None and self.arch in K_ARCHS:
            k, width = self.sparsity_k(), self.width(d_in)
            if not 0 < k <= width:
                raise VillesError(f"--k must be in 1..d_sae ({width}), got {k:g}")

    def sparsity_k(self) -> float:
        return DEFAULT_K if self.k is None else self.k


# --- the model side: hooks, positions, activations ------------------------------------------------------------------
def default_hook(model: HookedTransformer) -> str:
    return f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"


def sae_positions(tokens: Int[Tensor, "batch pos"]) -> Bool[Tensor, "batch pos"]:
    """The positions an SAE reads and splices: the characters of each name (not <bos>, <eos> or padding)."""
    return (tokens != PAD_ID) & (tokens != BOS_ID) & (tokens != EOS_ID)


def char_tokenizer(model: HookedTransformer) -> CharTokenizer:
    """The CharTokenizer behind a villes model's Hugging Face tokenizer (same ids, checked)."""
    hf = getattr(model, "tokenizer", None)
    if hf is None:
        raise VillesError("the model has no tokenizer attached: load it with training.load_model")
    vocab = hf.get_vocab()
    tok = CharTokenizer(s for s in vocab if s not in SPECIALS)
    if tok.stoi != vocab:
        raise VillesError("the model's tokenizer is not a villes character tokenizer")
    return tok


def _stop_layer(hook: str) -> int | None:
    """Run blocks only up to the hook's own: later blocks cannot change it."""
    m = re.match(r"blocks\.(\d+)\.", hook)
    return int(m.group(1)) + 1 if m else None


def hook_width(model: HookedTransformer, hook: str) -> int:
    """d_in of a hook that gives one vector per position; a clear VillesError for anything else."""
    if hook not in model.hook_dict:
        near = [h for h in model.hook_dict if h.endswith(hook.rsplit(".", 1)[-1])][:4]
        hint = f" (e.g. {', '.join(near)})" if near else f" (e.g. {default_hook(model)})"
        raise VillesError(f"unknown hook {hook!r}: not a hook of this model{hint}")
    tokens = torch.tensor([[BOS_ID, len(SPECIALS), EOS_ID]])
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=hook, stop_at_layer=_stop_layer(hook))
    shape = tuple(cache[hook].shape)
    if len(shape) != 3 or shape[:2] != tuple(tokens.shape):
        raise VillesError(
            f"hook {hook!r} gives activations of shape {list(shape)}: an SAE here needs one vector per "
            "position ([batch, pos, d]), e.g. a residual stream, an MLP or attention output"
        )
    return shape[-1]


def _batches_of_names(names: Sequence[str], batch_size: int) -> Iterator[list[str]]:
    order = sorted(range(len(names)), key=lambda i: len(names[i]))  # similar lengths together: little padding
    for start in range(0, len(order), batch_size):
        yield [names[i] for i in order[start : start + batch_size]]


@torch.no_grad()
def collect_activations(
    model: HookedTransformer, names: Sequence[str], hook: str, batch_size: int = 1024
) -> Float[Tensor, "tokens d_in"]:
    """The hook's activations at every character position of `names` (see `sae_positions`), float32, in one tensor."""
    tok = char_tokenizer(model)
    hook_width(model, hook)
    stop = _stop_layer(hook)
    chunks = []
    for batch in _batches_of_names(names, batch_size):
        tokens = tok.batch(batch)
        _, cache = model.run_with_cache(tokens, names_filter=hook, stop_at_layer=stop)
        chunks.append(cache[hook][sae_positions(tokens)].float())
    return torch.cat(chunks)


# --- training ------------------------------------------------------------------------------------------------------
def cached_batches(
    acts: Float[Tensor, "tokens d_in"], batch_size: int, seed: int = 0, start: int = 0
) -> Iterator[Float[Tensor, "batch d_in"]]:
    """Endless shuffled batches from an in-memory cache (a SAELens DataProvider); each pass is a new permutation.
    `start`: begin at that batch of the stream (a resumed run): the skipped passes' permutations are drawn, not used."""
    gen = torch.Generator().manual_seed(seed)
    skipped_passes, offset = divmod(start, len(acts) // batch_size)
    for _ in range(skipped_passes):
        torch.randperm(len(acts), generator=gen)
    while True:
        perm = torch.randperm(len(acts), generator=gen)
        for first in range(offset * batch_size, len(acts) - batch_size + 1, batch_size):
            yield acts[perm[first : first + batch_size]]
        offset = 0


@functools.cache
def _gather_topk_sae_class() -> type:
    """SAELens's TopK training SAE, decoding with one gather-sum of the k kept decoder rows.

    Written by hand because SAELens offers only two decoders while training: the dense `acts @ W_dec` (a
    batch × d_sae × d_in matmul forward and two more backward, mostly multiplying zeros) and a COO sparse matmul
    whose sorting and coalescing cost more than they save at these widths. `F.embedding_bag` with per-sample weights
    is the standard sparse gather-sum kernel and differentiates in both the weights and the decoder rows. The
    activation still returns SAELens's dense activations (the trainer's L0 and dead-latent statistics read them);
    the saved model is SAELens's plain `TopKSAE`, since only the training-time decode path differs.
    """
    from sae_lens.saes import TopKTrainingSAE
    from sae_lens.saes.topk_sae import TopK

    class KeptTopK(TopK):
        kept: tuple[Tensor, Tensor, Tensor] | None = None  # (dense acts, values, indices) of the last call

        def forward(self, x: Tensor) -> Tensor:
            values, indices = torch.topk(x, k=self.k, dim=-1, sorted=False)
            values = values.relu()
            dense = torch.zeros_like(x).scatter_(-1, indices, values)
            self.kept = (dense, values, indices)
            return dense

    class GatherTopKTrainingSAE(TopKTrainingSAE):
        def get_activation_fn(self):
            return KeptTopK(self.cfg.k)

        def decode(self, feature_acts: Tensor) -> Tensor:
            kept = self.activation_fn.kept
            if kept is None or kept[0] is not feature_acts or feature_acts.ndim != 2:
                return super().decode(feature_acts)  # acts that did not come from the last encode: the plain path
            _, values, indices = kept
            out = F.embedding_bag(indices, self.W_dec, per_sample_weights=values, mode="sum") + self.b_dec
            out = self.run_time_activation_norm_fn_out(self.hook_sae_recons(out))
            return self.reshape_fn_out(out, self.d_head)

    return GatherTopKTrainingSAE


def build_training_sae(settings: SAESettings, d_in: int, metadata: dict[str, Any] | None = None) -> TrainingSAE:
    """A fresh SAELens TrainingSAE of the settings' architecture (seeded)."""
    from sae_lens.saes import (
        BatchTopKTrainingSAE,
        BatchTopKTrainingSAEConfig,
        JumpReLUTrainingSAE,
        JumpReLUTrainingSAEConfig,
        StandardTrainingSAE,
        StandardTrainingSAEConfig,
        TopKTrainingSAEConfig,
    )
    from sae_lens.saes.sae import SAEMetadata

    settings.validate(d_in)
    steps = settings.tokens // settings.batch_size
    common = {
        "d_in": d_in,
        "d_sae": settings.width(d_in),
        # trained on inputs scaled to mean norm sqrt(d_in); SAETrainer folds the factor into the weights at the end
        "normalize_activations": "expected_average_only_in",
        "metadata": SAEMetadata(**(metadata or {})),
    }
    warm = max(1, steps // 20)  # sparsity penalties ramp up over the first 5% of steps
    torch.manual_seed(settings.seed)
    if settings.arch == "topk":
        return _gather_topk_sae_class()(TopKTrainingSAEConfig(**common, **TOPK, k=int(settings.sparsity_k())))
    if settings.arch == "batchtopk":
        return BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(**common, k=settings.sparsity_k()))
    if settings.arch == "standard":
        l1 = settings.l1 if settings.l1 is not None else DEFAULT_L1
        return StandardTrainingSAE(StandardTrainingSAEConfig(**common, l1_coefficient=l1, l1_warm_up_steps=warm))
    if settings.l1 is not None:  # jumprelu with a plain L0 penalty
        cfg = JumpReLUTrainingSAEConfig(**common, **JUMPRELU, l0_coefficient=settings.l1, l0_warm_up_steps=warm)
    else:  # jumprelu pulled towards a target L0 (Gemma Scope 2's quadratic penalty)
        cfg = JumpReLUTrainingSAEConfig(
            **common,
            **JUMPRELU,
            jumprelu_sparsity_loss_mode="quadratic",
            target_l0=settings.sparsity_k(),
            l0_coefficient=JUMPRELU_TARGET_COEFFICIENT,
            l0_warm_up_steps=warm,
        )
    return JumpReLUTrainingSAE(cfg)


@contextmanager
def _quiet_trainer(progress: bool):
    """SAETrainer.fit and its norm estimate open tqdm bars with no switch: to silence them when asked, swap the name
    those modules look up."""
    from sae_lens.training import activation_scaler, sae_trainer

    modules = (sae_trainer, activation_scaler)
    originals = [m.tqdm for m in modules]
    if not progress:
        for m, original in zip(modules, originals, strict=True):
            m.tqdm = lambda *a, _bar=original, **k: _bar(*a, **{**k, "disable": True})
    try:
        yield
    finally:
        for m, original in zip(modules, originals, strict=True):
            m.tqdm = original


# --- resume state ---------------------------------------------------------------------------------------------------
STATE_FORMAT = "villes-sae-state-1"


@dataclass
class _StateWriter:
    """Writes resume state into `folder` every `every` steps and after the last one."""

    folder: Path
    every: int
    steps: int
    run: dict
    started: tuple[float, float]  # perf_counter and process_time when the run began, earlier sessions included

    def after_step(self, trainer, step: int) -> None:
        if step % self.every and step != self.steps:
            return
        tensors, info = _trainer_state(trainer, step)
        info |= {
            "format": STATE_FORMAT,
            "run": self.run,
            "seconds": time.perf_counter() - self.started[0],
            "cpu_seconds": time.process_time() - self.started[1],
        }
        ckpt.save_state(self.folder, step, tensors, info)


@functools.cache
def _resumable_trainer_class() -> type:
    """SAELens's SAETrainer, writing villes resume state at its own per-step checkpoint seam.

    SAETrainer calls `_checkpoint_if_needed` after each step (weights, Adam, schedulers and statistics updated, the
    step not yet counted). Its own checkpoints pickle the trainer state (torch.save); this one writes safetensors and
    JSON through `_StateWriter`, and nothing at all without one (in-memory training)."""
    from sae_lens.training.sae_trainer import SAETrainer

    class ResumableSAETrainer(SAETrainer):
        writer: _StateWriter | None = None

        def _checkpoint_if_needed(self) -> None:
            if self.writer is not None:
                self.writer.after_step(self, self.n_training_steps + 1)

    return ResumableSAETrainer


def _trainer_state(trainer, step: int) -> tuple[dict[str, Tensor], dict]:
    """All a SAETrainer carries from one step to the next: what its save_trainer_state pickles, the training SAE
    (buffers included, e.g. BatchTopK's threshold), the activation scale and the global RNG; tensors and JSON."""
    from training.lm import _optimizer_tensors

    tensors = {f"sae.{k}": v for k, v in trainer.sae.state_dict().items()}
    tensors |= _optimizer_tensors(trainer.optimizer)
    tensors |= {
        "act_freq_scores": trainer.act_freq_scores,
        "n_forward_passes_since_fired": trainer.n_forward_passes_since_fired,
        "rng.torch": torch.get_rng_state(),
    }
    info = {
        "n_training_steps": step,  # also the number of batches drawn from the stream
        "n_training_samples": trainer.n_training_samples,
        "n_frac_active_samples": trainer.n_frac_active_samples,
        "started_fine_tuning": trainer.started_fine_tuning,
        "scaling_factor": trainer.activation_scaler.scaling_factor,
        "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in trainer.optimizer.param_groups],
        "lr_scheduler": trainer.lr_scheduler.state_dict(),
        "coefficient_schedulers": {name: c.state_dict() for name, c in trainer.coefficient_schedulers.items()},
    }
    return tensors, info


def _restore_trainer(trainer, tensors: dict[str, Tensor], info: dict, where: Path) -> None:
    from training.lm import _load_optimizer

    sae_tensors = {k.removeprefix("sae."): v for k, v in tensors.items() if k.startswith("sae.")}
    ckpt.load_state_dict_strict(trainer.sae, sae_tensors, where)
    _load_optimizer(trainer.optimizer, tensors)
    for group, saved in zip(trainer.optimizer.param_groups, info["param_groups"], strict=True):
        group.update({k: tuple(v) if isinstance(group.get(k), tuple) else v for k, v in saved.items()})
    trainer.lr_scheduler.load_state_dict(info["lr_scheduler"])
    for name, scheduler in trainer.coefficient_schedulers.items():
        scheduler.load_state_dict(info["coefficient_schedulers"][name])
    trainer.act_freq_scores = tensors["act_freq_scores"]
    trainer.n_forward_passes_since_fired = tensors["n_forward_passes_since_fired"]
    for name in ("n_training_steps", "n_training_samples", "n_frac_active_samples", "started_fine_tuning"):
        setattr(trainer, name, info[name])
    trainer.activation_scaler.scaling_factor = info["scaling_factor"]
    torch.set_rng_state(tensors["rng.torch"])


def _run_identity(settings: SAESettings, d_in: int, metadata: dict[str, Any] | None) -> dict:
    """What a resumed run must share with the interrupted one (as JSON reads it back)."""
    return json.loads(json.dumps({"settings": asdict(settings), "d_in": d_in, "metadata": metadata or {}}))


def _first_difference(old: Any, new: Any, where: str = "") -> str | None:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in [*new, *(k for k in old if k not in new)]:  # the settings first
            found = _first_difference(old.get(key), new.get(key), f"{where}{key}.")
            if found:
                return found
        return None
    return None if old == new else f"{where.rstrip('.') or 'run'} was {str(old)[:40]!r}, now {str(new)[:40]!r}"


def check_same_run(folder: Path, info: dict, run: dict) -> None:
    """A VillesError naming the first difference when `folder`'s interrupted run is not `run`."""
    difference = _first_difference(info.get("run"), run)
    if difference:
        raise VillesError(
            f"{folder} holds an interrupted SAE run that differs from this one ({difference}): continue it with "
            f"`villes train sae --resume {folder}`, or delete its state (state.json, state-*/) to start over"
        )


def read_sae_state(folder: Path | str) -> dict | None:
    """The info of the SAE resume state in `folder` (step, run settings, ...); None when it holds none."""
    folder = Path(folder)
    if not (folder / "state.json").is_file():
        return None
    info = ckpt.read_json(folder / ckpt.read_json(folder / "state.json").get("current", "?") / "info.json")
    return info if info.get("format") == STATE_FORMAT else None


def _load_sae_state(folder: Path, run: dict, scale: float) -> tuple[dict[str, Tensor], dict] | None:
    """The resume state in `folder` if it is this run's (on these activations), None if there is none."""
    if read_sae_state(folder) is None:
        if (folder / "state.json").is_file():
            raise VillesError(f"{folder} holds resume state that is not an SAE's: choose another folder")
        return None
    tensors, info = ckpt.load_state(folder)
    check_same_run(folder, info, run)
    if not math.isclose(info["scaling_factor"], scale, rel_tol=1e-4):
        raise VillesError(
            f"{folder} holds an interrupted SAE run on other activations (their mean norm changed): delete its "
            "state (state.json, state-*/) to start over"
        )
    return tensors, info


def train_sae(
    acts: Float[Tensor, "tokens d_in"],
    settings: SAESettings,
    metadata: dict[str, Any] | None = None,
    progress: bool = True,
    state_dir: Path | None = None,
    checkpoint_every: int | None = None,
) -> tuple[TrainingSAE, dict]:
    """Train an SAE on cached activations with SAELens's SAETrainer; returns it and its speed.

    With `state_dir`, resume state is written there every `checkpoint_every` steps (default: a tenth of the run) and
    after the last step, and a run interrupted there is continued, with the very weights an uninterrupted run gives
    (it must be the same run: settings, metadata and activations). Without it, nothing is written."""
    from sae_lens.config import SAETrainerConfig

    if len(acts) < settings.batch_size:
        raise VillesError(f"only {len(acts)} activations for batches of {settings.batch_size}: lower --batch-size")
    if checkpoint_every is not None and checkpoint_every <= 0:
        raise VillesError(f"--checkpoint-every must be positive, got {checkpoint_every}")
    sae = build_training_sae(settings, acts.shape[-1], metadata)
    steps = settings.tokens // settings.batch_size
    window = max(10, math.ceil(1_000_000 / settings.batch_size))  # "dead" = silent for about 1M tokens (3 passes)
    cfg = SAETrainerConfig(
        total_training_samples=steps * settings.batch_size,
        train_batch_size_samples=settings.batch_size,
        lr=settings.lr,
        lr_end=settings.lr,
        lr_warm_up_steps=max(1, steps // 100),
        lr_decay_steps=max(1, steps // 5),  # linear decay to 0 over the last 20%
        adam_beta1=0.9,
        adam_beta2=0.999,
        dead_feature_window=window,
        feature_sampling_window=window,
    )
    # The scale to mean norm sqrt(d_in), exact over the whole cache (fit() estimates it only when unset, and folds
    # it into the weights at the end). A residual stream has a large mean: starting b_dec there lets the latents
    # see centred data from the first step.
    scale = math.sqrt(acts.shape[-1]) / acts.norm(dim=-1).mean().clamp(min=1e-8).item()
    run = _run_identity(settings, acts.shape[-1], metadata)
    resumed = _load_sae_state(state_dir, run, scale) if state_dir is not None else None
    done = resumed[1]["n_training_steps"] if resumed else 0
    trainer = _resumable_trainer_class()(cfg, sae, cached_batches(acts, settings.batch_size, settings.seed, done))
    trainer.activation_scaler.scaling_factor = scale
    if settings.b_dec_init == "mean":
        with torch.no_grad():
            sae.b_dec.copy_(acts.mean(0) * scale)
    past = (0.0, 0.0)
    if resumed:
        _restore_trainer(trainer, *resumed, state_dir)
        past = (resumed[1]["seconds"], resumed[1]["cpu_seconds"])
        if progress:
            print(f"continuing the SAE run in {state_dir} from step {done} of {steps}", file=sys.stderr)
    with _quiet_trainer(progress):
        start, cpu_start = time.perf_counter() - past[0], time.process_time() - past[1]
        if state_dir is not None:
            every = checkpoint_every or max(1, steps // 10)
            trainer.writer = _StateWriter(Path(state_dir), every, steps, run, (start, cpu_start))
        trainer.fit()
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    sae.eval()
    samples = trainer.n_training_samples
    return sae, {
        "train_tokens": samples,
        "train_seconds": round(seconds, 2),
        "tokens_per_second": samples / seconds,
        # CPU time of this process, all its threads: a figure that other programs sharing the machine do not halve
        "tokens_per_cpu_second": samples / max(cpu_seconds, 1e-9),
        "torch_threads": torch.get_num_threads(),
    }


def to_inference(sae: TrainingSAE) -> SAE:
    """The inference SAE exactly as it is shipped (TopK norms folded, BatchTopK as JumpReLU): saved, loaded back."""
    from sae_lens import SAE

    with tempfile.TemporaryDirectory() as tmp:
        sae.save_inference_model(tmp)
        return SAE.load_from_disk(tmp)


# --- evaluation ----------------------------------------------------------------------------------------------------
def _splice(hook: str, mask: Bool[Tensor, "batch pos"], values: Float[Tensor, "n d"]) -> list:
    """Forward hooks that put `values` at the masked positions of `hook` and leave every other position clean."""

    def put(act: Tensor, hook) -> Tensor:
        act = act.clone()
        act[mask] = values.to(act.dtype)
        return act

    return [(hook, put)]


@torch.no_grad()
def evaluate_sae(
    model: HookedTransformer,
    sae: SAE,
    names: Sequence[str],
    hook: str | None = None,
    batch_size: int = 512,
) -> dict[str, float]:
    """The field's SAE metrics on `names`:

    l0, explained_variance (SAELens's ExplainedVarianceCalculator), mse, cossim, l2_ratio (shrinkage: mean
    ||x̂||/||x||) and relative_reconstruction_bias over the SAE's positions; ce_loss_clean / ce_loss_spliced (the
    reconstruction in place of the activation, no error term) / ce_loss_zero_ablation in nats per predicted symbol,
    with the project's masked distribution (so ce_loss_clean is the model's validation NLL); loss_recovered =
    (zero - spliced) / (zero - clean); kl = KL(clean || spliced) per predicted symbol; dead_fraction (never active
    on these names) and dense_fraction (active on more than 10% of their tokens).
    """
    from sae_lens.evals import ExplainedVarianceCalculator

    from training.lm import log_probs, token_nll

    hook = hook or sae.cfg.metadata.hook_name or default_hook(model)
    check_sae_fits(model, sae, hook)
    tok = char_tokenizer(model)
    sae.eval()
    ev = ExplainedVarianceCalculator()
    fired = torch.zeros(sae.cfg.d_sae)
    sums = dict.fromkeys(("l0", "cossim", "l2_ratio", "xhat_sq", "x_dot_xhat", "clean", "spliced", "zero", "kl"), 0.0)
    n_tokens = n_predictions = 0
    for batch in _batches_of_names(names, batch_size):
        tokens = tok.batch(batch)
        mask = sae_positions(tokens)
        logits, cache = model.run_with_cache(tokens, names_filter=hook)
        x = cache[hook][mask].float()
        acts = sae.encode(x)
        xhat = sae.decode(acts)

        spliced = model.run_with_hooks(tokens, fwd_hooks=_splice(hook, mask, xhat))
        zeroed = model.run_with_hooks(tokens, fwd_hooks=_splice(hook, mask, torch.zeros_like(xhat)))
        active = acts != 0
        fired += active.sum(0).float()
        ev.add_batch(sae_output=xhat, hidden_acts=x)
        x_norm, xhat_norm = x.norm(dim=-1), xhat.norm(dim=-1)
        sums["l0"] += active.sum().item()
        sums["cossim"] += torch.nn.functional.cosine_similarity(x, xhat, dim=-1).sum().item()
        sums["l2_ratio"] += (xhat_norm / x_norm.clamp(min=1e-4)).sum().item()
        sums["xhat_sq"] += xhat_norm.pow(2).sum().item()
        sums["x_dot_xhat"] += (x * xhat).sum().item()
        for key, out in (("clean", logits), ("spliced", spliced), ("zero", zeroed)):
            sums[key] += token_nll(out, tokens).sum().item()
        target = tokens[:, 1:] != PAD_ID
        # KL over the symbols a model can predict: <pad> and <bos> columns are -inf in both and would give NaN
        lp_clean = log_probs(logits[:, :-1])[..., len(SPECIALS) - 1 :]
        lp_spliced = log_probs(spliced[:, :-1])[..., len(SPECIALS) - 1 :]
        kl = (lp_clean.exp() * (lp_clean - lp_spliced)).sum(-1)
        sums["kl"] += kl[target].sum().item()
        n_tokens += int(mask.sum())
        n_predictions += int(target.sum())
    clean, spliced_ce, zero = (sums[k] / n_predictions for k in ("clean", "spliced", "zero"))
    frequency = fired / max(n_tokens, 1)
    return {
        "l0": sums["l0"] / n_tokens,
        "explained_variance": ev.compute(),
        "mse": ev.sum_squared_residual / n_tokens,
        "cossim": sums["cossim"] / n_tokens,
        "ce_loss_clean": clean,
        "ce_loss_spliced": spliced_ce,
        "ce_loss_zero_ablation": zero,
        "loss_recovered": (zero - spliced_ce) / (zero - clean) if zero != clean else float("nan"),
        "kl": sums["kl"] / n_predictions,
        "dead_fraction": (frequency == 0).float().mean().item(),
        "dense_fraction": (frequency > DENSE_THRESHOLD).float().mean().item(),
        "l2_ratio": sums["l2_ratio"] / n_tokens,
        "relative_reconstruction_bias": sums["xhat_sq"] / sums["x_dot_xhat"],
        "n_names": len(names),
        "n_tokens": n_tokens,
        "n_predictions": n_predictions,
    }


# --- folders -------------------------------------------------------------------------------------------------------
def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _portable(path: Path) -> str:
    """A path inside the repository is recorded relative to its root, so shipped folders do not name this machine."""
    resolved = path.resolve()
    try:
        return str(resolved.relative_to(REPO_ROOT))
    except ValueError:
        return str(resolved)


def _is_sae_folder(folder: Path) -> bool:
    try:
        return "architecture" in json.loads((folder / "cfg.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False


def check_output_folder(out: Path, checkpoint: Path | None = None) -> None:
    """--out may be new, empty, an SAE folder (replaced atomically) or an interrupted SAE run (continued); never a
    model checkpoint or other data."""
    if checkpoint is not None and out.resolve() == checkpoint.resolve():
        raise VillesError(f"--out {out} is the model checkpoint itself: choose another folder")
    if out.exists() and not out.is_dir():
        raise VillesError(f"--out {out} is a file, not a folder")
    # .state-tmp-*: a state folder a kill left half-written (never pointed at)
    if out.is_dir() and any(not p.name.startswith(".state-tmp-") for p in out.iterdir()) and not _is_sae_folder(out):
        if read_sae_state(out) is None:
            raise VillesError(f"--out {out} holds something that is not an SAE folder: refusing to replace it")


def train_sae_to_folder(
    checkpoint: Path | str,
    settings: SAESettings,
    out: Path | str,
    progress: bool = True,
    acts: Float[Tensor, "tokens d_in"] | None = None,
    checkpoint_every: int | None = None,
) -> dict:
    """Train an SAE on a model checkpoint's train split and write its folder (metrics on the val split). `acts`:
    that split's activations at the hook when the caller has them cached already (a sweep). Resume state goes into
    `out` every `checkpoint_every` steps (see `train_sae`); a run interrupted there is continued."""
    from training.data import load_corpus
    from training.neural import load_checkpoint

    checkpoint, out = Path(checkpoint), Path(out)
    settings.validate()
    check_output_folder(out, checkpoint)
    model, _, config = load_checkpoint(checkpoint)
    if config.get("kind") != "transformer":
        raise VillesError(f"{checkpoint} holds a {config.get('kind')} model: SAEs need a transformer checkpoint")
    hook = settings.hook or default_hook(model)
    d_in = hook_width(model, hook)
    settings = replace(settings, hook=hook)
    settings.validate(d_in)
    info = config.get("corpus", {})
    corpus = load_corpus(info.get("names_file"), lowercase=info.get("lowercase", True))
    metadata = {
        "model_name": f"villes/{checkpoint.name}",
        "hook_name": hook,
        "context_size": model.cfg.n_ctx,
        "prepend_bos": True,
        "model_checkpoint": _portable(checkpoint),
        "model_sha256": sha256_file(checkpoint / "model.safetensors"),
        "villes_positions": "characters (not <bos>, <eos> or padding): training.sae.sae_positions",
        "villes_settings": asdict(settings),
    }
    interrupted = read_sae_state(out)
    if interrupted is not None:  # before the activations are computed: a mismatch fails at once
        check_same_run(out, interrupted, _run_identity(settings, d_in, metadata))
    if acts is None:
        acts = collect_activations(model, corpus.split_names("train"), hook)
    elif acts.shape[-1] != d_in:
        raise VillesError(f"cached activations are {acts.shape[-1]} wide, hook {hook!r} is {d_in}")
    training_sae, speed = train_sae(acts, settings, metadata, progress, out, checkpoint_every)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        training_sae.save_inference_model(tmp)
        sae = load_sae(tmp, model)
        metrics = {
            "hook_name": hook,
            "model_checkpoint": metadata["model_checkpoint"],
            "model_sha256": metadata["model_sha256"],
            "architecture": settings.arch,
            "saved_architecture": sae.cfg.architecture(),
            "d_in": d_in,
            "d_sae": sae.cfg.d_sae,
            "split": "val",
            **evaluate_sae(model, sae, corpus.split_names("val"), hook),
            **speed,
            "train_activations": len(acts),
            "settings": asdict(settings),
        }
        ckpt.atomic_write_json(tmp / METRICS_FILE, metrics)
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return metrics


def check_sae_fits(model: HookedTransformer, sae: SAE, hook: str | None = None) -> None:
    hook = hook or sae.cfg.metadata.hook_name
    if hook is None:
        raise VillesError("the SAE does not name its hook (cfg.json metadata.hook_name): pass hook=")
    width = hook_width(model, hook)
    if width != sae.cfg.d_in:
        raise VillesError(
            f"SAE/model mismatch: the SAE reads d_in={sae.cfg.d_in} but hook {hook!r} of this model gives {width}"
        )


def load_sae(
    folder: Path | str, model: HookedTransformer | Path | str | None = None, *, trained_on: Path | str | None = None
) -> SAE:
    """An SAELens SAE from its folder (weights from safetensors). With a model (a HookedTransformer or a checkpoint
    folder), check that it fits: the SAE's hook exists there and has the SAE's d_in; for a checkpoint folder, also
    that its weights are those the SAE was trained on. `trained_on` (a checkpoint folder) makes only that last check,
    without loading the model."""
    from sae_lens import SAE

    folder = Path(folder)
    if not (folder / "cfg.json").is_file() or not (folder / "sae_weights.safetensors").is_file():
        raise VillesError(f"{folder} is not a SAELens SAE folder (needs cfg.json and sae_weights.safetensors)")
    try:
        sae = SAE.load_from_disk(folder)
    except (KeyError, ValueError, TypeError, RuntimeError, OSError) as e:
        raise VillesError(f"{folder} is not a loadable SAELens SAE folder: {str(e).splitlines()[0][:200]}") from None
    sae.eval()
    for path in (Path(p) for p in (trained_on, model) if isinstance(p, str | Path)):
        recorded = sae.cfg.metadata.get("model_sha256")
        if recorded and (path / "model.safetensors").is_file() and sha256_file(path / "model.safetensors") != recorded:
            raise VillesError(f"SAE/model mismatch: {folder} was trained on other weights than {path}'s")
    if isinstance(model, str | Path):
        path = Path(model)
        from training.transformer import load_model

        model = load_model(path)
    if model is not None:
        check_sae_fits(model, sae)
    return sae
