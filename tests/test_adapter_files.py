"""kk.save_adapter / kk.load_adapter / kk.adapter_file_info: safetensors adapter files that
round-trip exactly, load into either impl, refuse another method, config or model, and never
half-load (issue "Train the way users train", part 4)."""
import json
import os
import struct

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer
from torch import nn

import kron_kernels as kk
from kron_kernels import adapter_files
from test_adapt import METHOD_IMPLS, RTOL, TINY_CONFIG, adapted, assert_rel_close, images, perturb, tiny_vit
from test_bad_input import assert_unchanged, snapshot


def saved(tmp_path, method="kadaptation", impl="fused", seed=5, name="adapter.safetensors", **config):
    """A perturbed (nonzero-increment) adapted tiny ViT and the file it was saved to."""
    model = adapted(method, impl, **config)
    perturb(model, seed=seed)
    path = tmp_path / name
    kk.save_adapter(model, path)
    return model, path


def assert_same_adapter(got, want):
    got, want = kk.adapter_state_dict(got), kk.adapter_state_dict(want)
    assert got.keys() == want.keys()
    for key in want:
        assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), key


def requires_grad(model):
    return {name: p.requires_grad for name, p in model.named_parameters()}


# ---------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("method, impl", METHOD_IMPLS)
def test_round_trip_is_bitwise(tmp_path, method, impl):
    """save -> load into a freshly adapted model of the same config (other adapter init):
    every adapter and head tensor bitwise equal, the whole state dict and the outputs too, and
    the trainable set unchanged."""
    model, path = saved(tmp_path, method, impl)
    fresh = adapted(method, impl, adapt_seed=9)
    flags = requires_grad(fresh)
    x = images()
    assert not torch.equal(fresh(x), model(x))
    assert kk.load_adapter(fresh, path) is fresh
    assert_same_adapter(fresh, model)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in model.state_dict().items())
    assert requires_grad(fresh) == flags
    assert torch.equal(fresh(x), model(x))


@pytest.mark.parametrize("method", kk.METHODS)
@pytest.mark.parametrize("source, target", [("fused", "reference"), ("reference", "fused")], ids=["f2r", "r2f"])
def test_loads_into_the_other_impl(tmp_path, method, source, target):
    """The names are the same for both impls: a file from one impl loads into the other with
    the same tensors bitwise, and (float64) the two models compute the same outputs."""
    model = adapted(method, source, dtype=torch.float64)
    perturb(model, seed=5)
    kk.save_adapter(model, tmp_path / "a.safetensors")
    other = adapted(method, target, dtype=torch.float64, adapt_seed=9)
    kk.load_adapter(other, tmp_path / "a.safetensors")
    assert_same_adapter(other, model)
    x = images(torch.float64)
    assert_rel_close(other(x), model(x), RTOL[torch.float64])


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["f64", "bf16"])
def test_round_trip_keeps_dtypes(tmp_path, dtype):
    """A float64 model (float64 factors) and a bf16 one (fp32 factors, bf16 head) read back
    bitwise, in their own dtypes."""
    model, path = saved(tmp_path, "kadaptation", dtype=dtype)
    fresh = adapted("kadaptation", dtype=dtype, adapt_seed=9)
    kk.load_adapter(fresh, path)
    assert_same_adapter(fresh, model)
    assert kk.adapter_state_dict(fresh)["head.weight"].dtype == dtype


def test_saves_views_and_leaves_the_model_alone(tmp_path):
    """Tensors are saved as contiguous copies of their own (safetensors refuses non-contiguous
    and memory-sharing tensors), and saving changes nothing on the model."""
    model = adapted("kadaptation")
    perturb(model, seed=5)
    weight = model.head.weight
    model.head.weight = nn.Parameter(weight.detach().t().contiguous().t())  # transposed storage
    assert not model.head.weight.is_contiguous()
    before = snapshot(model)
    kk.save_adapter(model, tmp_path / "a.safetensors")
    assert_unchanged(model, before)
    fresh = adapted("kadaptation", adapt_seed=9)
    kk.load_adapter(fresh, tmp_path / "a.safetensors")
    assert_same_adapter(fresh, model)


# ---------------------------------------------------------------------------- metadata
def test_metadata_format(tmp_path):
    """The documented keys, str -> str, JSON where structured; config after defaults (tuples
    become lists); adapter_file_info reads the same back."""
    model, path = saved(tmp_path, "kadaptation", targets=("q", "k"))
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        names = set(f.keys())
    assert names == set(kk.adapter_state_dict(model))
    assert meta["format"] == "pt" and meta["kron_kernels.format"] == "1"
    assert meta["kron_kernels.version"] == kk.__version__
    assert meta["kron_kernels.method"] == "kadaptation" and meta["kron_kernels.impl"] == "fused"
    config = dict(n=8, r=1, targets=["q", "k"], bias=False, scale=1.0)
    assert json.loads(meta["kron_kernels.config"]) == config
    assert json.loads(meta["kron_kernels.model"]) == {
        "name": None, "class": "timm.models.vision_transformer.VisionTransformer"}
    shapes = {k: list(v.shape) for k, v in kk.adapter_state_dict(model).items()}
    assert json.loads(meta["kron_kernels.shapes"]) == shapes
    assert len(meta["kron_kernels.sha256"]) == 64
    info = kk.adapter_file_info(path)
    assert info == kk.AdapterFileInfo(
        method="kadaptation", config=config, model_name=None,
        model_class="timm.models.vision_transformer.VisionTransformer", impl="fused",
        version=kk.__version__, shapes={k: tuple(v) for k, v in shapes.items()})


def tiny_timm(name, **kwargs):
    """A small model through timm.create_model (no download): it records its architecture name."""
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, img_size=32, depth=1, num_classes=3, **kwargs).eval()


@pytest.mark.parametrize("method", ["kadaptation", "losa"])
def test_records_the_timm_model_name(tmp_path, method):
    """timm.create_model's architecture name (the backbone's, under a LoSA wrapper) is recorded
    and a file adapts a fresh model from adapter_file_info alone."""
    model = kk.adapt(tiny_timm("vit_tiny_patch16_224"), method, **TINY_CONFIG[method])
    perturb(model, seed=5)
    kk.save_adapter(model, tmp_path / "a.safetensors")
    info = kk.adapter_file_info(tmp_path / "a.safetensors")
    assert info.model_name == "vit_tiny_patch16_224"
    fresh = kk.adapt(tiny_timm("vit_tiny_patch16_224"), info.method, **info.config)
    kk.load_adapter(fresh, tmp_path / "a.safetensors")
    assert_same_adapter(fresh, model)


# ---------------------------------------------------------------------------- atomic writes
@pytest.mark.parametrize("fail_at", ["fsync", "replace"])
@pytest.mark.parametrize("exists", [True, False], ids=["over-old-file", "new-file"])
def test_written_completely_or_not_at_all(tmp_path, monkeypatch, fail_at, exists):
    """A save that fails after writing part of the data leaves the old file (or no file) and
    no temporary file behind."""
    path = tmp_path / "a.safetensors"
    if exists:
        kk.save_adapter(adapted("kadaptation"), path)
    old = path.read_bytes() if exists else None

    def broken(*args, **kwargs):
        raise OSError(f"simulated {fail_at} failure")

    model = adapted("kadaptation")
    perturb(model, seed=5)
    monkeypatch.setattr(adapter_files.os, fail_at, broken)
    with pytest.raises(OSError, match="simulated"):
        kk.save_adapter(model, path)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == (["a.safetensors"] if exists else [])
    if exists:
        assert path.read_bytes() == old


def test_save_needs_an_adapted_model(tmp_path):
    with pytest.raises(ValueError, match="kk.adapt"):
        kk.save_adapter(tiny_vit(), tmp_path / "a.safetensors")
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------- refusals
TINY_VIT = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=5)  # as tiny_vit
MISMATCHES = [
    pytest.param("compacter", {}, None, r"method: file 'kadaptation', model 'compacter'", id="other-method"),
    pytest.param("kadaptation", dict(scale=0.5), None, r"config scale: file 1\.0, model 0\.5$", id="other-scale"),
    pytest.param("kadaptation", dict(r=2), None,
                 r"config r: file 1, model 2; shape mismatch for blocks\.0\.attn\.qkv\.U_q: file \(8, 8, 1\), "
                 r"model \(8, 8, 2\)", id="other-rank"),
    pytest.param("kadaptation", dict(targets=("q", "k")), None,
                 r"config targets: file \['q', 'v'\], model \['q', 'k'\]; tensors missing from the file: "
                 r"blocks\.0\.attn\.qkv\.U_k.*kk_shared\.A_k; tensors the model does not have: .*kk_shared\.A_v$", id="other-targets"),
    pytest.param("kadaptation", {}, dict(depth=3), r"tensors missing from the file: blocks\.2\.", id="deeper-model"),
    pytest.param("kadaptation", {}, dict(num_classes=7), r"head\.weight: file \(5, 64\), model \(7, 64\)",
                 id="other-head"),
    pytest.param("kadaptation", {}, "merged", "the model is merged", id="merged"),
]


@pytest.mark.parametrize("method, config, change, match", MISMATCHES)
def test_mismatch_raises_naming_it_and_changes_nothing(tmp_path, method, config, change, match):
    """Every difference is named, nothing is copied, requires_grad untouched."""
    _, path = saved(tmp_path, "kadaptation")
    if isinstance(change, dict):
        torch.manual_seed(0)
        backbone = VisionTransformer(**{**TINY_VIT, **change}).eval()
        model = kk.adapt(backbone, method, **{**TINY_CONFIG[method], **config})
    else:
        model = adapted(method, **config)
    if change == "merged":
        perturb(model, seed=7)
        kk.merge(model)
    before = snapshot(model)
    with pytest.raises(ValueError, match=match) as error:
        kk.load_adapter(model, path)
    if change != "merged":
        assert str(path) in str(error.value)
    assert_unchanged(model, before)


def test_other_timm_model_of_the_same_shapes_is_refused(tmp_path):
    """Two timm architectures whose adapters have identical shapes: the name tells them apart."""
    model = kk.adapt(tiny_timm("vit_tiny_patch16_224"), "kadaptation", n=8)
    kk.save_adapter(model, tmp_path / "a.safetensors")
    other = kk.adapt(tiny_timm("vit_tiny_patch16_384"), "kadaptation", n=8)
    before = snapshot(other)
    with pytest.raises(ValueError, match="timm model: file 'vit_tiny_patch16_224', model 'vit_tiny_patch16_384'"):
        kk.load_adapter(other, tmp_path / "a.safetensors")
    assert_unchanged(other, before)


def test_unadapted_model_is_told_how_to_adapt(tmp_path):
    _, path = saved(tmp_path, "kadaptation")
    model = tiny_vit()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"has no kron_kernels adapters.*kk\.adapt\(model, 'kadaptation', \*\*\{"):
        kk.load_adapter(model, path)
    assert_unchanged(model, before)


def test_older_file_without_a_config_key_loads_when_it_is_the_default(tmp_path):
    """Config is compared after defaults: a key absent from the file means the method's default."""
    model, path = saved(tmp_path, "kadaptation")
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    config = json.loads(meta["kron_kernels.config"])
    del config["bias"]  # as if written before `bias` existed
    meta["kron_kernels.config"] = json.dumps(config)
    meta["kron_kernels.sha256"] = adapter_files._digest(meta, tensors)
    save_file(tensors, str(path), metadata=meta)
    fresh = adapted("kadaptation", adapt_seed=9)
    kk.load_adapter(fresh, path)
    assert_same_adapter(fresh, model)
    with pytest.raises(ValueError, match=r"config bias: file False, model True"):
        kk.load_adapter(adapted("kadaptation", bias=True), path)


# ---------------------------------------------------------------------------- damaged files
def _header_end(data: bytes) -> int:
    return 8 + struct.unpack("<Q", data[:8])[0]


def _flip(data: bytes, position: int, mask: int = 0x01) -> bytes:
    out = bytearray(data)
    out[position] ^= mask
    return bytes(out)


def _foreign_metadata(path, edit):
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    return tensors, edit(meta)


DAMAGES = [
    pytest.param(lambda data, path: data[:-1], "truncated", id="truncated-last-byte"),
    pytest.param(lambda data, path: data[: _header_end(data)], "truncated", id="truncated-after-header"),
    pytest.param(lambda data, path: data[: _header_end(data) // 2], "truncated", id="truncated-in-header"),
    pytest.param(lambda data, path: data[:5], "truncated", id="truncated-to-5-bytes"),
    pytest.param(lambda data, path: b"", "truncated", id="empty"),
    pytest.param(lambda data, path: data + b"\0" * 8, "truncated", id="trailing-bytes"),
    pytest.param(lambda data, path: _flip(data, 8, 0xFF), "truncated", id="header-first-byte"),
    pytest.param(lambda data, path: _flip(data, 2), "truncated", id="header-length"),
    pytest.param(lambda data, path: _flip(data, len(data) - 1), "sha256 does not match", id="last-data-byte"),
    pytest.param(lambda data, path: _flip(data, _header_end(data)), "sha256 does not match", id="first-data-byte"),
    pytest.param(lambda data, path: b"not a safetensors file, just some text", "another format", id="text"),
    pytest.param("torch.save", "another format", id="torch-save-file"),
    pytest.param("no-metadata", "without kron_kernels metadata", id="plain-safetensors"),
    pytest.param("other-metadata", "without kron_kernels metadata", id="other-metadata"),
    pytest.param("bad-json", "metadata kron_kernels.config is not JSON", id="metadata-not-json"),
    pytest.param("newer-format", "format 2, this kron_kernels reads format 1", id="newer-format"),
    pytest.param("edited-config", "sha256 does not match", id="edited-config"),
]


def _damage(how, data, path, model):
    if callable(how):
        path.write_bytes(how(data, path))
    elif how == "torch.save":
        torch.save(kk.adapter_state_dict(model), path)
    elif how == "no-metadata":
        save_file({k: v.clone() for k, v in kk.adapter_state_dict(model).items()}, str(path))
    else:
        edits = {
            "other-metadata": lambda m: {"format": "pt", "producer": "someone else"},
            "bad-json": lambda m: {**m, "kron_kernels.config": "{n: 8"},
            "newer-format": lambda m: {**m, "kron_kernels.format": "2"},
            "edited-config": lambda m: {**m, "kron_kernels.config": m["kron_kernels.config"].replace("1.0", "2.0")},
        }
        tensors, meta = _foreign_metadata(path, edits[how])
        save_file(tensors, str(path), metadata=meta)


@pytest.mark.parametrize("how, match", DAMAGES)
def test_damaged_file_raises_naming_the_path(tmp_path, how, match):
    _, path = saved(tmp_path, "kadaptation")
    model = adapted("kadaptation", adapt_seed=9)
    _damage(how, path.read_bytes(), path, model)
    before = snapshot(model)
    for call in (lambda: kk.load_adapter(model, path), lambda: kk.adapter_file_info(path)):
        with pytest.raises(ValueError, match=match) as error:
            call()
        assert str(path) in str(error.value)
    assert_unchanged(model, before)


def test_every_single_bit_flip_in_the_header_is_caught(tmp_path):
    """Flipping the lowest bit of any byte of the length prefix or the JSON header (which keeps
    ASCII ASCII: '1' <-> '0', 'q' <-> 'p', ' ' <-> '!') is refused: safetensors' checks catch
    the structure, the sha256 every name, dtype, shape and metadata value."""
    _, path = saved(tmp_path, "kadaptation")
    data = path.read_bytes()
    model = adapted("kadaptation", adapt_seed=9)
    before = snapshot(model)
    for position in range(_header_end(data)):
        path.write_bytes(_flip(data, position))
        with pytest.raises(ValueError, match="not a valid kron_kernels adapter file|without kron_kernels metadata"):
            kk.load_adapter(model, path)
    assert_unchanged(model, before)


def test_missing_file_keeps_its_os_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        kk.load_adapter(adapted("kadaptation"), tmp_path / "absent.safetensors")
