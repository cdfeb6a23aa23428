"""What every neural rung shares: tokens [batch, pos] -> logits [batch, pos, vocab], the masked NLL, evaluation and
the training loop (AdamW with decay on matrices only, warm-up + cosine, clipping, weight averaging, early stopping on
validation, atomic resumable checkpoints).

<pad> and <bos> are never a target; their logits are masked to -inf before the softmax, so every model is a
distribution over the characters and <eos> only, exactly what the counting models of the ladder are.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from training import checkpoint as ckpt
from training.tokenizer import BOS_ID, PAD_ID, CharTokenizer


@dataclass(frozen=True)
class TrainSettings:
    steps: int = 10_000  # at most; early stopping may end sooner
    batch_size: int = 64  # names per step
    lr: float = 2e-3
    min_lr_ratio: float = 0.05  # cosine decays to lr * min_lr_ratio
    warmup: int = 300
    weight_decay: float = 0.1  # matrices only, never biases, norms or embeddings of positions
    grad_clip: float = 1.0
    dropout: float = 0.0
    ema: float = 0.0  # decay of an exponential moving average of the weights; 0 = off. Evaluated and shipped if on
    eval_every: int = 500
    patience: int = 6  # evaluations without improvement before stopping
    seed: int = 0


def mask_specials(logits: Float[Tensor, "... vocab"]) -> Float[Tensor, "... vocab"]:
    bias = torch.zeros(logits.shape[-1], dtype=logits.dtype, device=logits.device)
    bias[[PAD_ID, BOS_ID]] = float("-inf")
    return logits + bias


def log_probs(logits: Float[Tensor, "... vocab"]) -> Float[Tensor, "... vocab"]:
    return torch.log_softmax(mask_specials(logits.float()), dim=-1)


def token_nll(
    logits: Float[Tensor, "batch pos vocab"], tokens: Int[Tensor, "batch pos"]
) -> Float[Tensor, "batch pos-1"]:
    """NLL of each next token; 0 where the target is padding (so padding never changes a loss)."""
    targets = tokens[:, 1:]
    lp = log_probs(logits[:, :-1])
    nll = -lp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return nll.masked_fill(targets == PAD_ID, 0.0)


def mean_nll(logits: Float[Tensor, "batch pos vocab"], tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, ""]:
    return token_nll(logits, tokens).sum() / (tokens[:, 1:] != PAD_ID).sum()


@torch.no_grad()
def evaluate_nll(
    model: torch.nn.Module, tokenizer: CharTokenizer, names: Sequence[str], batch_size: int = 1024
) -> tuple[float, int]:
    """(summed NLL in nats, predicted symbols) over names; the model is put in eval mode and restored."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    order = sorted(range(len(names)), key=lambda i: len(names[i]))  # similar lengths together: less padding
    for start in range(0, len(names), batch_size):
        tokens = tokenizer.batch([names[i] for i in order[start : start + batch_size]])
        total += token_nll(model(tokens), tokens).sum().item()
        count += int((tokens[:, 1:] != PAD_ID).sum())
    model.train(was_training)
    return total, count


def lr_at(step: int, s: TrainSettings) -> float:
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    progress = min(1.0, (step - s.warmup) / max(1, s.steps - s.warmup))
    return s.lr * (s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model: torch.nn.Module, s: TrainSettings) -> torch.optim.AdamW:
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "pos" not in n.lower()]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "pos" not in n.lower())]
    groups = [{"params": decay, "weight_decay": s.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=s.lr, betas=(0.9, 0.99))


def _optimizer_tensors(opt: torch.optim.Optimizer) -> dict[str, Tensor]:
    return {f"opt.{i}.{k}": v for i, st in opt.state_dict()["state"].items() for k, v in st.items()}


def _load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, Tensor]) -> None:
    sd = opt.state_dict()
    state: dict[int, dict[str, Tensor]] = {}
    for key, v in tensors.items():
        if key.startswith("opt."):
            _, i, k = key.split(".", 2)
            state.setdefault(int(i), {})[k] = v
    sd["state"] = state
    opt.load_state_dict(sd)


@contextmanager
def swapped_weights(model: torch.nn.Module, weights: dict[str, Tensor] | None):
    """Temporarily copy `weights` (e.g. the moving average of the parameters) into the model's parameters."""
    if weights is None:
        yield
        return
    params = dict(model.named_parameters())
    backup = {k: params[k].detach().clone() for k in weights}
    with torch.no_grad():
        for k, v in weights.items():
            params[k].copy_(v)
    try:
        yield
    finally:
        with torch.no_grad():
            for k, v in backup.items():
                params[k].copy_(v)


def train_lm(
    model: torch.nn.Module,
    tokenizer: CharTokenizer,
    train_names: Sequence[str],
    val_names: Sequence[str],
    settings: TrainSettings,
    save_best: Callable[[dict[str, Tensor], dict], None],
    state_dir: Path | None = None,
    progress: bool = True,
    forward: Callable[[Tensor], Tensor] | None = None,
) -> dict:
    """Train `model` in place and return its metrics. `save_best(weights, metrics)` is called at each new best
    validation NLL; `state_dir` holds resume state (written every evaluation, resumed from if present)."""
    s = settings
    forward = forward or model
    torch.manual_seed(s.seed)
    gen = torch.Generator().manual_seed(s.seed)
    data = tokenizer.batch(train_names)
    lengths = (data != PAD_ID).sum(1)
    opt = make_optimizer(model, s)
    # the average covers parameters only (buffers such as TransformerLens's -inf IGNORE must not be averaged)
    ema = {k: p.detach().clone() for k, p in model.named_parameters()} if s.ema else None
    step, best, bad_evals, history, elapsed, train_loss = 0, float("inf"), 0, [], 0.0, float("nan")
    resumed = ckpt.load_state(state_dir) if state_dir else None
    if resumed:
        tensors, info = resumed
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, strict=False)
        if ema is not None:
            ema = {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}
        _load_optimizer(opt, tensors)
        torch.set_rng_state(tensors["rng.torch"])
        gen.set_state(tensors["rng.batches"])
        step, best, bad_evals, history, elapsed = (info[k] for k in ("step", "best", "bad_evals", "history", "elapsed"))
        train_loss = info.get("train_loss", float("nan"))
    model.train()
    bar = tqdm(total=s.steps, initial=step, disable=not progress, desc="train", dynamic_ncols=True)
    t0 = time.perf_counter() - elapsed
    while step < s.steps and bad_evals < s.patience:
        idx = torch.randint(len(data), (s.batch_size,), generator=gen)
        tokens = data[idx, : int(lengths[idx].max())]
        for g in opt.param_groups:
            g["lr"] = lr_at(step, s)
        loss = mean_nll(forward(tokens), tokens)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if s.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
        opt.step()
        if ema is not None:
            with torch.no_grad():
                decay = min(s.ema, (1 + step) / (10 + step))  # warm-up: early averages forget the random init
                for k, p in model.named_parameters():
                    ema[k].lerp_(p, 1 - decay)
        step += 1
        train_loss = loss.item() if math.isnan(train_loss) else 0.98 * train_loss + 0.02 * loss.item()
        bar.update(1)
        if step % s.eval_every == 0 or step == s.steps:
            with swapped_weights(model, ema):
                val_sum, val_n = evaluate_nll(model, tokenizer, val_names)
                val = val_sum / val_n
                if val < best - 1e-4:
                    best, bad_evals = val, 0
                    save_best(
                        {k: v.detach().clone() for k, v in model.state_dict().items()},
                        {"step": step, "val_nll": val, "train_loss_smoothed": train_loss},
                    )
                else:
                    bad_evals += 1
            history.append({"step": step, "train_loss": round(train_loss, 4), "val_nll": round(val, 4)})
            bar.set_postfix(train=f"{train_loss:.3f}", val=f"{val:.3f}", best=f"{best:.3f}")
            if state_dir:
                tensors = {f"model.{k}": v for k, v in model.named_parameters()}
                tensors |= {f"ema.{k}": v for k, v in (ema or {}).items()}
                tensors |= _optimizer_tensors(opt)
                tensors |= {"rng.torch": torch.get_rng_state(), "rng.batches": gen.get_state()}
                info = {
                    "step": step,
                    "best": best,
                    "bad_evals": bad_evals,
                    "history": history,
                    "train_loss": train_loss,
                }
                info["elapsed"] = time.perf_counter() - t0
                info["settings"] = asdict(s)
                ckpt.save_state(state_dir, step, tensors, info)
    bar.close()
    seconds = time.perf_counter() - t0
    return {
        "steps": step,
        "best_val_nll": best,
        "history": history,
        "seconds": round(seconds, 1),
        "ms_per_step": round(1000 * seconds / max(step, 1), 2),
        "stopped_early": bad_evals >= s.patience,
    }
