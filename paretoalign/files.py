"""Atomic file and directory writes: an interrupted job never leaves a half-written file behind."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

logger = logging.getLogger(__name__)


def _read_umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it; done once, at import, not on every write
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def is_int(value, minimum: int) -> bool:
    """Whether ``value`` is an ``int`` (a bool is not one, though Python says it is) of at least ``minimum``."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def check_positive_int(name: str, value, optional: bool = False) -> None:
    """Raise ``ValueError`` naming ``name`` when ``value`` is not a positive integer (a bool is not one); ``optional``:
    ``None`` is allowed too."""
    if optional and value is None:
        return
    if not is_int(value, 1):
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def check_positive_ints(settings, names: Sequence[str], optional: bool = False) -> None:
    """:func:`check_positive_int` for each of ``names`` on ``settings``, the first bad one raising."""
    for name in names:
        check_positive_int(name, getattr(settings, name), optional)


def json_text(data, sort_keys: bool = True) -> str:
    """The text of the project's JSON files: two-space indent, UTF-8 as is (no ``\\u`` escapes), one final newline."""
    return json.dumps(data, indent=2, sort_keys=sort_keys, ensure_ascii=False) + "\n"


def write_json(path: str | os.PathLike, data, sort_keys: bool = True) -> None:
    """Write ``data`` to ``path`` as :func:`json_text`, atomically."""
    text = json_text(data, sort_keys)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def record_run_config(path: str | os.PathLike, config, write: bool = True) -> None:
    """Save a run's config (a dataclass) to ``path``, or check it against the one a run saved there: a resumed run must
    have the same settings. ``output_dir`` is no setting (where the folder is: absolute here, relative in a clone), and
    a field added to the config class since the file was written counts at its default (a new field's default keeps
    the behaviour before it), so an older run still resumes. ``write=False`` only checks (processes other than the
    main one)."""
    path = Path(path)
    current = json.loads(json_text(dataclasses.asdict(config)))
    if path.is_file():
        later = {
            f.name: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            for f in dataclasses.fields(config)
        }
        saved = {**json.loads(json_text(later)), **read_json_object(path, "run config")}
        if any(saved.get(key) != value for key, value in current.items() if key != "output_dir") or set(saved) - set(current):
            raise ValueError(f"{path} holds a different config; use a new output directory or the same settings to resume")
    if write:
        write_json(path, current)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then move it into place in one rename.

    The file gets the usual permissions (``0o666`` less the umask), not ``mkstemp``'s private ``0o600``.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_directory(target: Path, build: Callable[[Path], None], marker: str = "config.json") -> None:
    """Run ``build(tmp_dir)`` and move the finished directory to ``target`` in one rename.

    If another process finished ``target`` first (it holds ``marker``), that result is kept.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build(tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / marker).is_file():  # lost a race only if the winner finished
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_json_object(path: str | os.PathLike, what: str = "file") -> dict:
    """The JSON object in ``path``; a missing, unreadable, damaged or non-object file raises one clear error naming it
    (``FileNotFoundError`` or ``ValueError``), never a parser's traceback."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"{what} {str(path)!r} is not text: the file is damaged or not JSON") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{what} {str(path)!r} is not valid JSON (line {error.lineno}: {error.msg}): the file is damaged") from None
    if not isinstance(data, dict):
        raise ValueError(f"{what} {str(path)!r} must hold a JSON object, got {type(data).__name__}")
    return data


def safetensors_shapes(path: str | os.PathLike, what: str = "weights file") -> dict[str, tuple[int, ...]]:
    """``{name: shape}`` from a safetensors file's header alone (no tensor is read): checks a checkpoint before
    anything large loads. A missing, truncated or foreign file raises one ``FileNotFoundError``/``ValueError``."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            shapes = {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
    except Exception as error:  # safetensors raises its own Rust error types
        raise ValueError(f"{what} {str(path)!r} is not a readable safetensors file ({str(error).splitlines()[0][:120]})") from None
    return shapes


def read_safetensors(path: str | os.PathLike, device: str = "cpu", what: str = "weights file") -> dict:
    """All tensors of a safetensors file (never unpickled); damage raises one clear error naming the file."""
    from safetensors.torch import load_file

    safetensors_shapes(path, what)
    try:
        return load_file(str(path), device=device)
    except Exception as error:  # a header that parses over a body that was cut short
        raise ValueError(f"{what} {str(path)!r} is damaged ({str(error).splitlines()[0][:120]})") from None


@contextlib.contextmanager
def file_lock(path: str | os.PathLike):
    """Hold an exclusive lock on ``path`` (created if missing) while the block runs: another process taking the
    same lock waits. Advisory (``fcntl.flock``) where the platform has it; elsewhere nothing is locked."""
    try:
        import fcntl
    except ImportError:  # Windows: no flock; builds there are not guarded against a second process
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def load_array(path: str | os.PathLike, what: str = "cache file", mmap_mode: str | None = "r"):
    """A ``.npy`` array, memory-mapped by default and never unpickled; a missing, cut-short or foreign file raises
    one clear error naming it."""
    import numpy as np

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist")
    try:
        return np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise ValueError(f"{what} {str(path)!r} is damaged ({str(error).splitlines()[0][:120]})") from None


OPTIMIZER_NAME = "optimizer.safetensors"
TRAINER_STATE_NAME = "trainer_state.json"


def write_optimizer_state(directory: str | os.PathLike, optimizer, scheduler, step: int) -> None:
    """An optimizer's moments (safetensors) and its counters, param groups and the scheduler (JSON), written
    atomically into ``directory``: the part of a resumable training state every trainer shares."""
    import torch
    from safetensors.torch import save_file

    directory = Path(directory)
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, slot in state["state"].items():
        for key, value in slot.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value.detach().to("cpu").contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    atomic_write(directory / OPTIMIZER_NAME, lambda tmp: save_file(tensors, tmp))
    meta = {"step": step, "param_groups": state["param_groups"], "scalars": scalars, "scheduler": scheduler.state_dict()}
    write_json(directory / TRAINER_STATE_NAME, meta, sort_keys=False)


def read_optimizer_state(directory: str | os.PathLike, optimizer, scheduler, device: str = "cpu") -> int:
    """Restore what :func:`write_optimizer_state` wrote (checked readers, never unpickled); returns the step."""
    directory = Path(directory)
    meta = read_json_object(directory / TRAINER_STATE_NAME, "training state")
    missing = [key for key in ("step", "param_groups", "scalars", "scheduler") if key not in meta]
    if missing:
        raise ValueError(f"training state {str(directory / TRAINER_STATE_NAME)!r} lacks {missing}: the file is damaged")
    slots: dict[int, dict] = {}
    for key, value in [*read_safetensors(directory / OPTIMIZER_NAME, device, "optimizer state").items(), *meta["scalars"].items()]:
        index, name = key.split(".", 1)
        slots.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": slots, "param_groups": meta["param_groups"]})
    scheduler.load_state_dict(meta["scheduler"])
    return int(meta["step"])


LATEST_NAME = "latest.json"


def write_checkpoint(root: str | os.PathLike, name: str, write: Callable[[Path], None]) -> Path:
    """Write a multi-file checkpoint so that a kill at any instant leaves the previous one or this one, never a mix.

    ``write(folder)`` fills a temporary folder, which is renamed to ``root/name``; then ``root/latest.json`` is
    pointed at it in one atomic write, and only then are older checkpoints removed.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    target = root / name
    if target.exists():
        shutil.rmtree(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    text = json.dumps({"checkpoint": name})
    atomic_write(root / LATEST_NAME, lambda path: Path(path).write_text(text))
    for entry in root.iterdir():
        if entry.is_dir() and entry.name != name:
            shutil.rmtree(entry, ignore_errors=True)  # older checkpoints, and temporary folders of killed writes
    return target


def latest_checkpoint(root: str | os.PathLike, marker: str) -> Path | None:
    """The checkpoint ``root/latest.json`` points at; ``root`` itself when it holds ``marker`` (the older one-folder
    layout); ``None`` when there is none."""
    root = Path(root)
    pointer = root / LATEST_NAME
    if pointer.is_file():
        folder = root / read_json_object(pointer, "checkpoint pointer")["checkpoint"]
        if not (folder / marker).is_file():
            raise ValueError(f"checkpoint pointer {str(pointer)!r} names {folder.name!r}, which holds no {marker}: the checkpoint is damaged")
        return folder
    return root if (root / marker).is_file() else None


def read_results(path: str | os.PathLike, repair: bool = False) -> list[dict]:
    """The complete rows of a JSON-lines file written by :func:`append_rows` (a sweep's ``results.jsonl``, sampled replies).

    A last line without its newline is a write that was cut off: it is dropped (and, with ``repair``,
    cut from the file so appending continues cleanly). A broken line elsewhere raises ``ValueError``.
    """
    path = Path(path)
    if not path.is_file():
        return []
    data = path.read_bytes()
    *lines, tail = data.split(b"\n")
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: line {number} is not valid JSON ({error.msg}); the file is damaged") from None
        except UnicodeDecodeError:
            raise ValueError(f"{path}: line {number} is not UTF-8 text; the file is damaged") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}: line {number} holds a JSON {type(row).__name__}, not a row object; the file is damaged")
        rows.append(row)
    if tail.strip():
        logger.warning("%s: dropping a partly written last line (%d bytes) from an interrupted write", path, len(tail))
        if repair:
            with open(path, "r+b") as handle:
                handle.truncate(len(data) - len(tail))
                handle.flush()
                os.fsync(handle.fileno())
    return rows


def append_rows(path: Path, rows: Sequence[dict]) -> None:
    """Append ``rows`` as JSON lines in one write, then flush and fsync: a crash loses at most this batch."""
    payload = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")
    with open(path, "ab") as handle:
        handle.write(payload)
        handle.flush()
        os.fsync(handle.fileno())
