"""Checkpoint folders: settings as JSON, weights as safetensors, the tokenizer as a Hugging Face folder.

Every file is written to a temporary name and renamed into place, so a kill at any moment leaves either the old or
the new file. Resume state lives in `state-<step>/` folders named by a pointer file (`state.json`) that is replaced
atomically last: a half-written state folder is never pointed at. Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from training.errors import VillesError


def atomic_write_text(path: Path | str, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path | str, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def atomic_save_tensors(tensors: dict[str, torch.Tensor], path: Path | str, metadata: dict | None = None) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json(path: Path | str) -> dict:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise VillesError(f"checkpoint file missing: {path}") from None
    except (OSError, ValueError) as e:
        raise VillesError(f"cannot read {path}: {e}") from None


def check_replaceable_out(out: Path, marker: str, fmt: str, what: str) -> None:
    """An --out folder that a command rewrites whole: new, empty, or an earlier `what` folder (its `marker` JSON file
    says "format": fmt); never a file or other data."""
    if out.exists() and not out.is_dir():
        raise VillesError(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()):
        try:
            found = json.loads((out / marker).read_text(encoding="utf-8")).get("format")
        except (OSError, ValueError, AttributeError):
            found = None
        if found != fmt:
            raise VillesError(f"--out {out} holds something that is not a {what} folder: refusing to replace it")


def load_tensors(path: Path | str) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise VillesError(f"checkpoint file missing: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise VillesError(f"cannot read weights {path}: {e}") from None


def load_state_dict_strict(module: torch.nn.Module, tensors: dict[str, torch.Tensor], where: Path | str) -> None:
    """load_state_dict with a one-line error when names or shapes differ from the config's model."""
    own = module.state_dict()
    missing = sorted(set(own) - set(tensors))
    extra = sorted(set(tensors) - set(own))
    wrong = [k for k in own if k in tensors and own[k].shape != tensors[k].shape]
    if missing or extra or wrong:
        detail = (
            f"missing {missing[:3]}"
            if missing
            else f"unexpected {extra[:3]}"
            if extra
            else f"{wrong[0]} is {tuple(tensors[wrong[0]].shape)}, config says {tuple(own[wrong[0]].shape)}"
        )
        raise VillesError(f"weights in {where} do not match its config: {detail}")
    module.load_state_dict(tensors)


# --- resume state -------------------------------------------------------------------------------------------------
def save_state(folder: Path, step: int, tensors: dict[str, torch.Tensor], info: dict) -> None:
    """Write state-<step>/ completely, then point state.json at it, then delete older state folders."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder, prefix=".state-tmp-"))
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / "state.safetensors"))
        (tmp / "info.json").write_text(json.dumps(info), encoding="utf-8")
        final = folder / f"state-{step}"
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    atomic_write_json(folder / "state.json", {"current": final.name})
    for old in folder.glob("state-*"):
        if old.name != final.name:
            shutil.rmtree(old, ignore_errors=True)


def load_state(folder: Path) -> tuple[dict[str, torch.Tensor], dict] | None:
    pointer = folder / "state.json"
    if not pointer.exists():
        return None
    current = folder / read_json(pointer)["current"]
    return load_tensors(current / "state.safetensors"), read_json(current / "info.json")


def clear_state(folder: Path) -> None:
    (folder / "state.json").unlink(missing_ok=True)
    for old in folder.glob("state-*"):
        shutil.rmtree(old, ignore_errors=True)
    for tmp in folder.glob(".state-tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)
