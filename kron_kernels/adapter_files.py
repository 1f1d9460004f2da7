"""Adapter files: ``save_adapter`` / ``load_adapter`` in safetensors, with what they were made for.

An adapter checkpoint is only meaningful on the model, method and config that trained it:
the same tensor names can carry a different ``scale``, another backbone can have the same
shapes, and a file cut short by a crash or a full disk still starts like a good one. So an
adapter file holds :func:`~kron_kernels.adapt.adapter_state_dict`'s tensors (adapter factors
and the classifier head, names as in ``model.state_dict()``, identical for ``impl="fused"``
and ``impl="reference"``) plus string metadata (safetensors metadata is ``str -> str``; the
structured values are JSON)::

    format                 "pt"                       safetensors' own convention
    kron_kernels.format    "1"                        version of this layout
    kron_kernels.version   "0.1.0"                    kk.__version__ that wrote the file
    kron_kernels.method    "kadaptation"              one of kk.METHODS
    kron_kernels.impl      "fused"                    informational: the file loads into either impl
    kron_kernels.config    {"n": 32, "r": 1, "targets": ["q", "v"], ...}   after defaults
    kron_kernels.model     {"name": "vit_base_patch16_224" | null, "class": "timm....VisionTransformer"}
    kron_kernels.shapes    {"blocks.0.attn.qkv.U_q": [24, 1], ...}
    kron_kernels.sha256    hex digest of every other metadata entry and every tensor's
                           name, dtype, shape and bytes

``load_adapter`` reads and verifies the whole file, then compares method, config, model and
every tensor name and shape with the model, and only then copies (through
:func:`~kron_kernels.adapt.load_adapter_state_dict`, which converts every value before it
copies the first): a load that raises leaves the model as it was. The digest is there
because safetensors has none: a flipped byte in the data or in a metadata value would
otherwise load silently.
"""
from __future__ import annotations

import hashlib
import json
import os
import uuid
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

import torch
from torch import nn

from .adapt import _REGISTRY, _find_shared, _listing, adapter_state_dict, load_adapter_state_dict
from .nn.losa import LoSAModel

__all__ = ["AdapterFileInfo", "save_adapter", "load_adapter", "adapter_file_info"]

FORMAT_VERSION = 1
_KEY = "kron_kernels."
_DIGEST = _KEY + "sha256"
_REQUIRED = ("format", "version", "method", "impl", "config", "model", "shapes", "sha256")


class AdapterFileInfo(NamedTuple):
    """What an adapter file says about itself (``config`` as JSON gives it: tuples are lists)."""

    method: str
    config: Dict[str, Any]
    model_name: Optional[str]  # timm architecture (``pretrained_cfg["architecture"]``), if known
    model_class: str  # module.qualname of the timm model class
    impl: str  # the impl that saved it; the file loads into either
    version: str  # kron_kernels version that wrote it
    shapes: Dict[str, Tuple[int, ...]]


# ----------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------
def _json(value) -> str:
    # allow_nan=False: NaN/inf are not JSON and would not read back as the same config
    return json.dumps(value, sort_keys=True, allow_nan=False)


def _as_json_value(value):
    """``value`` as it reads back from JSON (tuples become lists), for comparisons."""
    return json.loads(_json(value))


def _model_identity(model: nn.Module) -> Dict[str, Optional[str]]:
    """The timm architecture name (set by ``timm.create_model``; None for a ViT built by hand)
    and the class of the timm model (a LoSA wrapper's backbone)."""
    timm_model = model.backbone if isinstance(model, LoSAModel) else model
    cfg = getattr(timm_model, "pretrained_cfg", None) or getattr(timm_model, "default_cfg", None)
    name = cfg.get("architecture") if isinstance(cfg, dict) else None
    cls = type(timm_model)
    return {"name": name if isinstance(name, str) else None, "class": f"{cls.__module__}.{cls.__qualname__}"}


def _digest(metadata: Dict[str, str], tensors: Dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(metadata):
        if key != _DIGEST:
            h.update(_json([key, metadata[key]]).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(_json([name, str(t.dtype), list(t.shape)]).encode())
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


def _write_atomically(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` completely or not at all.

    The bytes go to a new file beside ``path`` (same directory, hence same file system, so
    ``os.replace`` is an atomic rename), are flushed and fsynced, and only then replace
    ``path``; on any failure the temporary file is removed and ``path`` is untouched.
    ``os.open(..., 0o666)`` lets the umask set the permissions, as ``open(path, "wb")`` would
    (``tempfile.mkstemp`` would leave the file 0600).
    """
    directory, base = os.path.split(os.path.abspath(path))
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    tmp = os.path.join(directory, f".{base}.{uuid.uuid4().hex}.tmp")
    fd = os.open(tmp, flags, 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if os.name == "posix":  # make the rename itself durable
        try:
            dir_fd = os.open(directory, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(dir_fd)
        except OSError:
            pass
        finally:
            os.close(dir_fd)


def _corrupt(path: str, why: str) -> ValueError:
    return ValueError(f"{path} is not a valid kron_kernels adapter file: {why}")


def _read(path: str) -> Tuple[AdapterFileInfo, Dict[str, torch.Tensor]]:
    """Read and verify a whole adapter file; any problem with its contents is a ValueError
    naming ``path`` (a missing or unreadable file keeps its OSError)."""
    from safetensors import SafetensorError, safe_open

    with open(path, "rb"):  # FileNotFoundError, IsADirectoryError, PermissionError as they are
        pass
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            missing = [_KEY + key for key in _REQUIRED if _KEY + key not in metadata]
            if missing:
                raise ValueError(
                    f"{path} is a safetensors file without kron_kernels metadata (no {_listing(missing)}): "
                    f"kk.save_adapter did not write it. To load its tensors anyway: "
                    f"kk.load_adapter_state_dict(model, safetensors.torch.load_file(path))"
                )
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except SafetensorError as exc:
        raise _corrupt(path, f"safetensors cannot read it ({exc}): truncated, damaged, or another format") from exc

    def field(key: str, kind: type):
        raw = metadata[_KEY + key]
        try:
            value = raw if kind is str else json.loads(raw)
        except ValueError:
            raise _corrupt(path, f"metadata {_KEY + key} is not JSON: {raw[:80]!r}") from None
        if not isinstance(value, kind):
            raise _corrupt(path, f"metadata {_KEY + key} should be a {kind.__name__}, got {raw[:80]!r}")
        return value

    version_field = field("format", int)
    if type(version_field) is not int or version_field != FORMAT_VERSION:
        raise _corrupt(
            path, f"format {version_field}, this kron_kernels reads format {FORMAT_VERSION} (a newer version wrote it?)"
        )
    model, shapes = field("model", dict), field("shapes", dict)
    if not isinstance(model.get("name", 0), (str, type(None))) or not isinstance(model.get("class"), str):
        raise _corrupt(path, f"metadata {_KEY}model should hold a 'name' (str or null) and a 'class' (str)")
    if not all(isinstance(shape, list) and all(type(n) is int for n in shape) for shape in shapes.values()):
        raise _corrupt(path, f"metadata {_KEY}shapes should map names to lists of ints")
    info = AdapterFileInfo(
        method=field("method", str),
        config=field("config", dict),
        model_name=model["name"],
        model_class=model["class"],
        impl=field("impl", str),
        version=field("version", str),
        shapes={name: tuple(shape) for name, shape in shapes.items()},
    )
    if field("sha256", str) != _digest(metadata, tensors):
        raise _corrupt(path, "its sha256 does not match its contents (damaged or edited after it was written)")
    header = {name: tuple(t.shape) for name, t in tensors.items()}
    if header != info.shapes:  # save_adapter's files always agree; a hand-made one with a fresh digest may not
        raise _corrupt(path, "the tensor shapes in its header and in its metadata disagree")
    return info, tensors


def _mismatches(model: nn.Module, info: AdapterFileInfo, tensors: Dict[str, torch.Tensor]) -> List[str]:
    """Everything in which the file and the model differ, in words (empty: they match)."""
    shared = _find_shared(model)
    problems = []
    here = _model_identity(model)
    if info.model_name is not None and here["name"] is not None:
        if info.model_name != here["name"]:
            problems.append(f"timm model: file {info.model_name!r}, model {here['name']!r}")
    elif info.model_class != here["class"]:
        problems.append(f"model class: file {info.model_class}, model {here['class']}")
    if info.method != shared.method:
        # the configs and tensors of two methods have nothing in common worth listing
        return [f"method: file {info.method!r}, model {shared.method!r}"] + problems
    # "after defaults": a key the file lacks (written before the key existed) means its default
    ours = _as_json_value(shared.config)
    theirs = {**_as_json_value(dict(_REGISTRY[shared.method].defaults)), **info.config}
    for key in sorted(set(ours) | set(theirs)):
        if ours.get(key, "<absent>") != theirs.get(key, "<absent>"):
            problems.append(f"config {key}: file {theirs.get(key, '<absent>')!r}, model {ours.get(key, '<absent>')!r}")
    targets = adapter_state_dict(model)
    missing = [k for k in targets if k not in tensors]
    unexpected = [k for k in tensors if k not in targets]
    shapes = [
        f"{k}: file {tuple(tensors[k].shape)}, model {tuple(t.shape)}"
        for k, t in targets.items()
        if k in tensors and tensors[k].shape != t.shape
    ]
    if missing:
        problems.append(f"tensors missing from the file: {_listing(missing)}")
    if unexpected:
        problems.append(f"tensors the model does not have: {_listing(unexpected)}")
    if shapes:
        problems.append(f"shape mismatch for {_listing(shapes)}")
    return problems


# ----------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------
def save_adapter(model: nn.Module, path) -> None:
    """Write the adapter of a :func:`kk.adapt`-ed model (and its head) to ``path`` (safetensors).

    The tensors are :func:`adapter_state_dict`'s, copied to contiguous CPU tensors of their
    own (safetensors refuses views and tensors that share memory); the metadata records the
    method, impl, config after defaults, the timm model's architecture name when it has one
    (``timm.create_model`` sets it) and its class, ``kk.__version__``, every shape and a
    sha256 (module docstring). The file is written completely or not at all: into a
    temporary file in the same directory, fsynced, then renamed over ``path``.
    """
    from safetensors.torch import save

    from . import __version__

    shared = _find_shared(model)
    tensors = {
        name: t.detach().to("cpu").clone(memory_format=torch.contiguous_format)
        for name, t in adapter_state_dict(model).items()
    }
    metadata = {
        "format": "pt",
        _KEY + "format": str(FORMAT_VERSION),
        _KEY + "version": __version__,
        _KEY + "method": shared.method,
        _KEY + "impl": shared.impl,
        _KEY + "config": _json(shared.config),
        _KEY + "model": _json(_model_identity(model)),
        _KEY + "shapes": _json({name: list(t.shape) for name, t in tensors.items()}),
    }
    metadata[_DIGEST] = _digest(metadata, tensors)
    # serialise in memory (adapters are small) so that one fsynced write makes the file
    _write_atomically(os.fspath(path), save(tensors, metadata=metadata))


def load_adapter(model: nn.Module, path) -> nn.Module:
    """Load an adapter file written by :func:`save_adapter` into ``model``; returns ``model``.

    ``model`` must be adapted with the file's method and config (``kk.adapter_file_info(path)``
    says which), into either impl. Before anything is copied the whole file is read and
    verified -- a truncated, damaged or foreign file raises a ValueError naming ``path`` --
    and the method, config, timm model (architecture name when both sides know it, else the
    class) and every tensor name and shape are compared with the model; a mismatch raises a
    ValueError naming each difference. Values are converted to the model's dtype and device.
    When it raises, the model is exactly as it was (never a partial load).
    """
    path = os.fspath(path)
    info, tensors = _read(path)
    try:
        _find_shared(model)
    except ValueError:
        raise ValueError(
            f"cannot load {path}: the model has no kron_kernels adapters; adapt it first as the file "
            f"was: kk.adapt(model, {info.method!r}, **{info.config!r})"
        ) from None
    problems = _mismatches(model, info, tensors)
    if problems:
        raise ValueError(
            f"cannot load {path} (a {info.method} adapter, config {info.config}) into this model: "
            + "; ".join(problems)
        )
    load_adapter_state_dict(model, tensors)  # converts every value, then copies: all or nothing
    return model


def adapter_file_info(path) -> AdapterFileInfo:
    """Read and verify an adapter file and return what it records, e.g. to adapt a fresh model
    the way the file's was: ``kk.adapt(model, info.method, **info.config)``."""
    return _read(os.fspath(path))[0]
