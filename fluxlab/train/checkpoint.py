"""Checkpoints that survive being killed mid-save.

Each checkpoint is a folder ``checkpoints/step_XXXXXXX`` holding the weights as safetensors (model
and EMA), a JSON description (run config, model params, step) and the training state (optimizer,
schedule, RNG, data position) for ``--resume``. It is written under a temporary name, flushed and
renamed, and the manifest ``meta.json`` is written last: a folder without a readable manifest is
incomplete and skipped. The manifest holds each file's size (a cheap check for truncation) and
sha256 (corruption in place, same size, is caught when a checkpoint is loaded).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

CHECKPOINT_DIR = "checkpoints"
PREFIX = "step_"
# FSDP/HSDP runs store model and EMA weights as DCP shards in this folder, keys "model.<name>" and
# "ema.<name>", instead of two gathered safetensors files; ``load_weights`` reads both layouts.
SHARDED_WEIGHTS = "weights"


# Checkpoints this process has found intact by their checksums, with each file's mtime: a load
# that resolves a checkpoint and then reads it hashes its gigabytes once, not twice.
_VERIFIED: dict[Path, tuple[tuple[str, int], ...]] = {}


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def file_sha256(path: Path) -> str:
    """The sha256 of a file, read in 1 MiB chunks (checkpoints can be many GB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _contiguous(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in sd.items()}


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    """Where checkpoint ``step`` of a run lives (whether or not it exists yet)."""
    return Path(run_dir) / CHECKPOINT_DIR / f"{PREFIX}{step:07d}"


def staging_path(run_dir: str | Path, step: int, name: str, owner_pid: int) -> Path:
    """A folder that ranks fill before ``save_checkpoint`` moves it in; named like a temporary of
    ``owner_pid`` (rank 0), so a save killed half-way leaves nothing the next save keeps."""
    final = checkpoint_path(run_dir, step)
    return final.parent / f".tmp-{final.name}-{name}-{owner_pid}"


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model_state: dict[str, torch.Tensor] | None,
    ema_state: dict[str, torch.Tensor] | None,
    description: dict[str, Any],
    train_state: dict[str, Any] | None,
    keep_last: int = 3,
    staged: dict[str, Path] | None = None,
) -> Path:
    """Writes checkpoint ``step`` atomically, then prunes all but the newest ``keep_last``.

    ``staged`` folders (written beforehand, e.g. by every rank's DCP shards) move in under the
    given names and join the manifest file by file, so a truncated shard is caught like a truncated
    weight file. Without ``model_state`` the weights must be among them (``SHARDED_WEIGHTS``)."""
    if model_state is None and SHARDED_WEIGHTS not in (staged or {}):
        raise ValueError(
            f"a checkpoint needs its weights: a model state or a staged {SHARDED_WEIGHTS!r} folder"
        )
    final = checkpoint_path(run_dir, step)
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    files = ["config.json"]
    if model_state is not None:
        save_file(_contiguous(model_state), tmp / "model.safetensors")
        files.append("model.safetensors")
    if ema_state is not None:
        save_file(_contiguous(ema_state), tmp / "ema.safetensors")
        files.append("ema.safetensors")
    (tmp / "config.json").write_text(json.dumps({**description, "step": step}, indent=2) + "\n")
    if train_state is not None:
        torch.save(train_state, tmp / "train_state.pt")
        files.append("train_state.pt")
    for name, folder in (staged or {}).items():
        os.replace(folder, tmp / name)
        files += sorted(str(f.relative_to(tmp)) for f in (tmp / name).rglob("*") if f.is_file())
    for name in files:
        _fsync_file(tmp / name)
    # Sizes let pruning spot a truncated file without reading gigabytes of weights; checksums let
    # a load spot a file corrupted in place.
    sizes = {name: (tmp / name).stat().st_size for name in files}
    sha256 = {name: file_sha256(tmp / name) for name in files}
    manifest = {"step": step, "files": files, "sizes": sizes, "sha256": sha256}
    (tmp / "meta.json").write_text(json.dumps(manifest) + "\n")
    _fsync_file(tmp / "meta.json")
    _fsync_dir(tmp)
    if final.exists():  # re-saving the same step (e.g. after a resume): replace it whole
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    if keep_last > 0:
        prune_checkpoints(run_dir, keep_last, final)
    _remove_stale_temporaries(root)
    return final


def prune_checkpoints(
    run_dir: str | Path, keep_last: int, just_saved: Path | None = None
) -> list[Path]:
    """Deletes all but the newest ``keep_last`` *valid* checkpoints and returns what it deleted.

    Validity, not the folder name, decides: a corrupt ``step_9`` left by an earlier crash must
    not push the only good checkpoints out. Corrupt folders older than the newest kept one go too;
    newer corrupt ones stay (a resume warns about them) until a save of that step replaces them.
    """
    found = list_checkpoints(run_dir)
    valid = [p for p in found if p == just_saved or verify_checkpoint(p, full=False) is None]
    kept = valid[-keep_last:]
    if not kept:
        return []
    doomed = [p for p in found if p not in kept and p.name < kept[-1].name]
    for old in doomed:
        shutil.rmtree(old, ignore_errors=True)
    return doomed


def _remove_stale_temporaries(root: Path) -> None:
    """Half-written folders of saves killed mid-way (other pids): never loadable, often huge."""
    for tmp in root.glob(f".tmp-{PREFIX}*"):
        if not tmp.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(tmp, ignore_errors=True)


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Finished-looking checkpoint folders, oldest first (temporary folders are ignored)."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX)]
    return sorted(found, key=lambda p: p.name)


def verify_checkpoint(path: Path, full: bool = True) -> str | None:
    """None if the checkpoint is complete and readable, else a reason.

    ``full=False`` checks only the manifest and file sizes (cheap enough to run on every save);
    ``full=True`` also reads every file: against its checksum, or (older checkpoints without
    checksums) by decoding it.
    """
    meta = path / "meta.json"
    try:
        info = json.loads(meta.read_text())
    except (OSError, json.JSONDecodeError):
        return "no readable meta.json (interrupted save?)"
    if not isinstance(info, dict) or not isinstance(info.get("files"), list):
        return "meta.json lists no files"
    sizes = info.get("sizes", {})
    for name in info["files"]:
        f = path / name
        if not f.is_file() or f.stat().st_size == 0:
            return f"{name} is missing or empty"
        if name in sizes and f.stat().st_size != sizes[name]:
            return (
                f"{name} has {f.stat().st_size} bytes, the manifest says {sizes[name]} (truncated?)"
            )
    if not full:
        return None
    checksums = info.get("sha256")
    if isinstance(checksums, dict):  # written with checksums: they say more than decoding would
        stamp = tuple((name, (path / name).stat().st_mtime_ns) for name in info["files"])
        if _VERIFIED.get(path.resolve()) == stamp:  # read in full already, unchanged since
            return None
        for name in info["files"]:
            if name in checksums and file_sha256(path / name) != checksums[name]:
                return f"{name} does not match its sha256 in meta.json (corrupted in place?)"
        _VERIFIED[path.resolve()] = stamp
        return None
    try:  # an older checkpoint without checksums: each file must at least decode
        for name in info["files"]:
            if name.endswith(".safetensors"):
                load_file(path / name)
            elif name.endswith(".json"):
                json.loads((path / name).read_text())
            elif name.endswith(".pt"):
                torch.load(path / name, map_location="cpu", weights_only=False)
    except Exception as e:  # any decode failure means the file is unusable
        return f"{name} cannot be read: {e}"
    return None


def checkpoint_problem(path: Path, need_train_state: bool = False) -> str | None:
    """None if checkpoint ``path`` loads (and, with ``need_train_state``, resumes), else why not."""
    problem = verify_checkpoint(path)
    if problem is None and need_train_state and not (path / "train_state.pt").is_file():
        problem = "it has no training state"
    return problem


def latest_checkpoint(run_dir: str | Path, need_train_state: bool = False) -> Path | None:
    """The newest valid checkpoint; corrupt or partial ones are skipped with a warning."""
    for path in reversed(list_checkpoints(run_dir)):
        problem = checkpoint_problem(path, need_train_state)
        if problem is None:
            return path
        warnings.warn(
            f"skipping checkpoint {path}: {problem}; falling back to the one before", stacklevel=2
        )
    return None


def describe_problems(paths: list[Path], need_train_state: bool = False) -> str:
    """``step_A: why; step_B: why`` for checkpoints that all failed to load."""
    return "; ".join(f"{p.name}: {checkpoint_problem(p, need_train_state)}" for p in paths)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a run folder (→ its newest valid checkpoint)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint {p} does not exist")
    if (p / "meta.json").is_file():
        problem = verify_checkpoint(p)
        if problem:
            raise ValueError(f"checkpoint {p} is unusable: {problem}")
        return p
    found = latest_checkpoint(p)
    if found is None:
        if broken := list_checkpoints(p):
            raise ValueError(f"no checkpoint in {p} is usable: {describe_problems(broken)}")
        raise FileNotFoundError(
            f"{p} holds no complete checkpoint (expected {p}/{CHECKPOINT_DIR}/{PREFIX}*/)"
        )
    return found


def read_description(path: Path) -> dict[str, Any]:
    return json.loads((path / "config.json").read_text())


def load_weights(path: Path, ema: bool = True) -> dict[str, torch.Tensor]:
    """The EMA weights when present (what we sample with), else the model's; whole, on the CPU."""
    if (path / SHARDED_WEIGHTS).is_dir():
        return read_sharded_weights(path / SHARDED_WEIGHTS, "ema" if ema else "model")
    f = path / "ema.safetensors"
    return load_file(f if ema and f.is_file() else path / "model.safetensors")


def read_sharded_weights(folder: Path, which: str) -> dict[str, torch.Tensor]:
    """``which`` ("model" or "ema", the model's when there is no EMA) of a DCP weights folder,
    consolidated in this one process: any world size wrote it, a laptop reads it."""
    # Imported here: slow to import and only sharded checkpoints need it (`fluxlab sample`).
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    tensors = FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    if not any(k.startswith(f"{which}.") for k in tensors):
        which = "model"
    state = {
        k: torch.empty(tuple(m.size), dtype=m.properties.dtype)
        for k, m in tensors.items()
        if k.startswith(f"{which}.")
    }
    if not state:
        raise ValueError(f"{folder} holds no model weights (keys: {sorted(tensors)[:5]}...)")
    dcp.load(state, checkpoint_id=str(folder), no_dist=True)
    return {k[len(which) + 1 :]: v for k, v in state.items()}


def forget_log_after(run_dir: str | Path, step: int) -> None:
    """Drops ``log.jsonl`` lines past ``step``: they belong to a run that died before its next
    checkpoint. A line torn by the kill is dropped too."""
    log = Path(run_dir) / "log.jsonl"
    if not log.is_file():
        return

    def keep(line: str) -> bool:
        try:
            return json.loads(line).get("step", 0) <= step
        except json.JSONDecodeError:  # a line torn by the kill
            return False

    lines = log.read_text().splitlines(keepends=True)
    kept = [line if line.endswith("\n") else line + "\n" for line in lines if keep(line)]
    if kept != lines:
        tmp = log.with_suffix(".tmp")
        tmp.write_text("".join(kept))
        tmp.replace(log)
