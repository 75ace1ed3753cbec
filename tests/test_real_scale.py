"""Real-scale inputs, tested offline with tiny random models: DINOv2 encoders (transformers and
torch.hub routes), SD-VAE latent shards (preprocess, reader, REPA layout), pre-extracted features,
and their bad-input errors. Needs the test extra (transformers, diffusers, pillow)."""
import json
import os
import shutil
import sys

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")
PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

from erw_fast.data import prepare as pp_lib  # noqa: E402
from erw_fast.data import features as ef_lib  # noqa: E402
from erw_fast.data.latents import LatentData, LatentDataset  # noqa: E402
from erw_fast.data.shards import (CorruptShardError, LabelCountError, LatentDataError, LatentShards,  # noqa: E402
                                  PreprocessError, RepaLayout, open_latents)
from erw_fast.data.vae import SD_VAE_SCALE, encode_moments, load_vae  # noqa: E402
from erw_fast.encoders import build_encoder, check_token_grid  # noqa: E402
from erw_fast.encoders.dinov2 import DINOv2Encoder, EncoderWeightsError  # noqa: E402
from erw_fast import preprocess as pp  # noqa: E402
from erw_fast import extract_features as ef  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:dinov2-vit")  # tiny random DINOv2s have odd widths

RES = 32          # image side; the tiny VAE downsamples 8x → 4x4 latents → 2x2 tokens at patch 2
GRID = 2
N_PER_CLASS = 3
CLASSES = ("cat", "dog", "fox")


# --------------------------------------------------------------------------------------------
# fixtures: a handful of generated images (the tiny VAE and DINOv2: tests/conftest.py)
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("imagenet")
    sizes = [(40, 50), (70, 33), (130, 90)]
    for c, name in enumerate(CLASSES):
        os.makedirs(root / name)
        for i in range(N_PER_CLASS):
            w, h = sizes[i]
            arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            arr[..., c] = 255 - (np.arange(w)[None, :] * 2 % 256).astype(np.uint8)  # a class-specific pattern
            Image.fromarray(arr).save(root / name / f"img{i}.{'png' if i % 2 else 'jpg'}")
    return str(root)


def _run_preprocess(images, out, vae, **kw):
    kw.setdefault("shard_size", 4)
    return pp_lib.preprocess(images=images, out=str(out), resolution=RES, vae=vae, batch_size=3, workers=0,
                         progress=False, device="cpu", **kw)


@pytest.fixture(scope="module")
def latents_dir(tmp_path_factory, image_folder, tiny_vae_dir):
    out = tmp_path_factory.mktemp("latents")
    _run_preprocess(image_folder, out, tiny_vae_dir)
    return str(out)


# --------------------------------------------------------------------------------------------
# DINOv2 encoders
# --------------------------------------------------------------------------------------------
def _raw_images(b=2, side=RES, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 3, side, side), generator=g, dtype=torch.uint8)


def test_dinov2_transformers_local_folder(tiny_dinov2_dir):
    enc = build_encoder("dinov2-vit-b", path=tiny_dinov2_dir, input_size=4)  # 4x4 latent, patch 2 → 2x2
    assert isinstance(enc, DINOv2Encoder) and enc.kind == "transformers"
    assert (enc.dim, enc.token_grid, enc.image_size) == (32, GRID, 28)
    x = _raw_images()
    f = enc(x)
    assert f.shape == (2, GRID * GRID, 32) and f.dtype == torch.float32
    # reference: ÷255, ImageNet mean/std, bicubic to 28 px, patch tokens after the final LayerNorm
    ref_x = (x.float() / 255 - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor(
        [0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    ref_x = torch.nn.functional.interpolate(ref_x, size=(28, 28), mode="bicubic", align_corners=False)
    model = transformers.Dinov2Model.from_pretrained(tiny_dinov2_dir).eval()
    with torch.no_grad():
        ref = model(pixel_values=ref_x).last_hidden_state[:, 1:]
    torch.testing.assert_close(f, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(enc(x.float()), f)  # [0, 255] floats = uint8
    assert not any(p.requires_grad for p in enc.parameters())
    # another grid: the position embedding is resampled once at build time (4x4 tokens = 56 px)
    enc4 = build_encoder("dinov2-vit-b", path=tiny_dinov2_dir, token_grid=4)
    assert enc4.model.embeddings.position_embeddings.shape == (1, 1 + 16, 32)
    assert enc4(x).shape == (2, 16, 32)
    from erw_fast.encoders.dinov2 import resample_pos_embed

    pos = model.embeddings.position_embeddings.data
    assert resample_pos_embed(pos, 2) is pos
    torch.testing.assert_close(enc4.model.embeddings.position_embeddings.data, resample_pos_embed(pos, 4))
    torch.testing.assert_close(enc4.model.embeddings.position_embeddings.data[:, :1], pos[:, :1])
    check_token_grid([enc4], 16)
    with pytest.raises(ValueError, match="tokens but the model"):
        check_token_grid([enc], 16)


def test_dinov2_with_registers(tmp_path):
    cfg = transformers.Dinov2WithRegistersConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                                 mlp_ratio=2, patch_size=14, image_size=28, num_register_tokens=3)
    model = transformers.Dinov2WithRegistersModel(cfg).eval()
    model.save_pretrained(tmp_path)
    enc = build_encoder("dinov2-vit-s_reg", path=str(tmp_path), token_grid=GRID)
    assert enc.num_prefix_tokens == 4
    x = _raw_images()
    with torch.no_grad():
        full = model(pixel_values=enc.preprocess(x)).last_hidden_state
    assert full.shape[1] == 1 + 3 + GRID * GRID
    torch.testing.assert_close(enc(x), full[:, 4:], atol=1e-5, rtol=1e-5)


HUBCONF = '''
import torch, torch.nn as nn
class Tiny(nn.Module):
    def __init__(self, fixed=False):
        super().__init__()
        self.patch_size, self.embed_dim, self.fixed = 14, 16, fixed
        self.proj = nn.Conv2d(3, 16, 14, 14)
        self.norm = nn.LayerNorm(16)
    def forward_features(self, x):
        if self.fixed:
            x = torch.nn.functional.interpolate(x, size=(42, 42))
        t = self.proj(x).flatten(2).transpose(1, 2)
        cls = t.mean(1, keepdim=True)
        h = self.norm(torch.cat([cls, t], 1))
        return {"x_norm_clstoken": h[:, 0], "x_norm_patchtokens": h[:, 1:]}
def dinov2_vitb14(pretrained=True, **kw):
    torch.manual_seed(0)
    return Tiny()
def dinov2_vits14(pretrained=True, **kw):
    return Tiny(fixed=True)
dinov2_vitl14 = dinov2_vitb14
'''


@pytest.fixture(scope="module")
def fake_hub_repo(tmp_path_factory):
    d = tmp_path_factory.mktemp("dinov2_repo")
    (d / "hubconf.py").write_text(HUBCONF)
    return str(d)


def test_dinov2_torch_hub_local_repo(fake_hub_repo):
    enc = build_encoder("dinov2-vit-b", path=fake_hub_repo, token_grid=GRID)  # auto: hubconf.py → hub
    assert enc.kind == "hub" and enc.dim == 16 and enc.patch_size == 14
    x = _raw_images()
    f = enc(x)
    assert f.shape == (2, 4, 16)
    with torch.no_grad():
        ref = enc.model.forward_features(enc.preprocess(x))["x_norm_patchtokens"]
    torch.testing.assert_close(f, ref)
    # a model whose grid cannot follow the requested one → clear error with the sizes
    bad = build_encoder("dinov2-vit-s", path=fake_hub_repo, source="hub", token_grid=GRID)
    with pytest.raises(ValueError, match=r"returned 9 patch tokens .* expected 2x2 = 4"):
        bad(x)


CACHE_SCRIPT = r"""
import json
from erw_fast.encoders import build_encoder
out = {}
a = build_encoder("dinov2-vit-b", token_grid=2)            # auto: the HF cache holds facebook/dinov2-base
out["b"] = [a.kind, a.dim]
b = build_encoder("dinov2-vit-l", token_grid=2)            # auto: not in the HF cache → the torch hub cache
out["l"] = [b.kind, b.dim]
c = build_encoder("dinov2-vit-b", source="hub", token_grid=2)
out["hub"] = [c.kind, c.dim]
print("RESULT" + json.dumps(out))
"""


def test_fd_dinov2_uses_the_cls_token(tiny_dinov2_dir):
    """fd_dinov2 (Stein et al. / EDM2): one vector per image, DINOv2's final-norm CLS token, computed from
    [-1, 1] images (greyscale expanded to RGB, mapped to [0, 255] as the trainer feeds the encoder)."""
    from erw_fast.metrics import EncoderFeatures, feature_stats, fid_from_images

    enc = build_encoder("dinov2-vit-b", path=tiny_dinov2_dir, token_grid=2)
    net = EncoderFeatures(enc)
    assert net.pooling == "global" and net.name == "fd_dinov2-vit-b"
    x = torch.rand(5, 1, 20, 20) * 2 - 1
    f = net.features(x)
    raw = ((x + 1) * 127.5).round().expand(-1, 3, -1, -1)
    ref_x = (raw / 255 - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor(
        [0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    ref_x = torch.nn.functional.interpolate(ref_x, size=(28, 28), mode="bicubic", align_corners=False)
    model = transformers.Dinov2Model.from_pretrained(tiny_dinov2_dir).eval()
    with torch.no_grad():
        ref = model(pixel_values=ref_x).pooler_output  # the final-norm CLS token
    assert f.shape == (5, 32)
    torch.testing.assert_close(f, ref, atol=1e-5, rtol=1e-5)
    assert fid_from_images(x, feature_stats(f), net) == pytest.approx(0.0, abs=1e-6)


def test_dinov2_from_caches_offline(tmp_path, tiny_dinov2_dir, fake_hub_repo):
    """No path: the facebook/dinov2-* id from the local HF cache, else the torch hub cache (offline)."""
    import subprocess

    rev = "0" * 40
    repo = tmp_path / "hf" / "hub" / "models--facebook--dinov2-base"
    os.makedirs(repo / "refs")
    (repo / "refs" / "main").write_text(rev)
    shutil.copytree(tiny_dinov2_dir, repo / "snapshots" / rev)
    shutil.copytree(fake_hub_repo, tmp_path / "torch" / "hub" / "facebookresearch_dinov2_main")
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", TORCH_HOME=str(tmp_path / "torch"))
    env.pop("HF_HUB_CACHE", None)
    proc = subprocess.run([sys.executable, "-c", CACHE_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert res == {"b": ["transformers", 32], "l": ["hub", 16], "hub": ["hub", 16]}


def test_dinov2_errors(tmp_path, monkeypatch, tiny_dinov2_dir):
    # missing local weights while offline: names the HF id and the flag
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    import torch.hub

    monkeypatch.setattr(torch.hub, "_hub_dir", None, raising=False)
    with pytest.raises(EncoderWeightsError, match=r"facebook/dinov2-base.*--encoder-path"):
        build_encoder("dinov2-vit-b", source="transformers")
    with pytest.raises(EncoderWeightsError, match=r"no cached dinov2 repository.*--encoder-path"):
        build_encoder("dinov2-vit-b", source="hub")
    missing = str(tmp_path / "nowhere")
    with pytest.raises(EncoderWeightsError, match="nowhere"):
        build_encoder("dinov2-vit-l", path=missing)
    with pytest.raises(EncoderWeightsError, match="nowhere"):
        build_encoder("dinov2-vit-l", path=missing, source="transformers")
    with pytest.raises(ValueError, match="token grid must be >= 1"):
        build_encoder("dinov2-vit-b", path=tiny_dinov2_dir, token_grid=0)
    # missing transformers: names the package and the extra
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match=r"transformers.*erw_fast\[data\]"):
        build_encoder("dinov2-vit-b", path=tiny_dinov2_dir)
    # wrong input (latents instead of raw pixels)
    monkeypatch.delitem(sys.modules, "transformers")


def test_dinov2_rejects_latents(tiny_dinov2_dir):
    enc = build_encoder("dinov2-vit-b", path=tiny_dinov2_dir, token_grid=GRID)
    with pytest.raises(ValueError, match="encoder_images"):
        enc(torch.zeros(2, 4, 4, 4))


# --------------------------------------------------------------------------------------------
# ADM centre crop and preprocessing
# --------------------------------------------------------------------------------------------
def test_adm_center_crop():
    im = Image.fromarray(np.full((300, 200, 3), 77, np.uint8))
    out = pp_lib.adm_center_crop(im, 32)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8 and (out == 77).all()
    # horizontal gradient: the centre crop keeps the middle columns
    grad = np.tile(np.linspace(0, 255, 160).astype(np.uint8)[None, :, None], (64, 1, 3))
    out = pp_lib.adm_center_crop(Image.fromarray(grad), 32)
    assert out.shape == (32, 32, 3)
    assert abs(int(out[:, 16].mean()) - 127) < 8 and out[0, 0, 0] < out[0, -1, 0]
    with pytest.raises(pp_lib.ImageTooSmallError,
                       match=r"tiny\.png is 20x40, smaller than the 32-px crop.*--small-images"):
        pp_lib.adm_center_crop(Image.new("RGB", (20, 40)), 32, name="tiny.png")
    assert pp_lib.adm_center_crop(Image.new("RGB", (20, 40)), 32, allow_upscale=True).shape == (32, 32, 3)


def test_preprocess_shards(latents_dir, image_folder, tiny_vae_dir):
    with open(os.path.join(latents_dir, "index.json")) as f:
        index = json.load(f)
    n = len(CLASSES) * N_PER_CLASS
    assert index["count"] == n and [s["count"] for s in index["shards"]] == [4, 4, 1]
    assert index["moments_shape"] == [8, 4, 4] and index["image_shape"] == [3, RES, RES]
    assert index["classes"] == list(CLASSES) and index["scale"] == SD_VAE_SCALE
    store = open_latents(latents_dir)
    assert isinstance(store, LatentShards) and len(store) == n
    files, labels, _ = pp_lib.list_image_folder(image_folder)
    assert store.labels.tolist() == labels == [c for c in range(3) for _ in range(N_PER_CLASS)]
    idx = np.array([8, 0, 5, 4])  # across shards, unsorted
    imgs = store.images(idx)
    for r, i in enumerate(idx):
        with Image.open(os.path.join(image_folder, files[i])) as im:
            ref = pp_lib.adm_center_crop(im, RES, allow_upscale=False)
        np.testing.assert_array_equal(imgs[r], ref.transpose(2, 0, 1))
    vae = load_vae(tiny_vae_dir)
    ref_m = encode_moments(vae, torch.from_numpy(imgs))
    mom = store.moments(idx)
    assert mom.dtype == np.float16
    torch.testing.assert_close(torch.from_numpy(mom).float(), ref_m, atol=2e-3, rtol=2e-3)
    assert (mom[:, 4:] > 0).all()  # std half

    # the training view: fresh posterior sample from the caller's ε, scaled by 0.18215
    data = LatentData(latents_dir)
    assert (data.input_size, data.channels, data.num_classes, data.image_size) == (4, 4, 3, RES)
    eps = data.posterior_noise(seed=0, step=3, sample_ids=range(4))
    torch.testing.assert_close(eps, data.posterior_noise(0, 3, [0, 1, 2, 3]))
    assert not torch.equal(eps, data.posterior_noise(0, 4, range(4)))
    z, y, enc_imgs = data.read(torch.from_numpy(idx), eps)
    m = torch.from_numpy(mom).float()
    torch.testing.assert_close(z, (m[:, :4] + m[:, 4:] * eps) * SD_VAE_SCALE)
    assert y.tolist() == store.labels[idx].tolist() and enc_imgs.dtype == torch.uint8
    assert data.read(idx, eps, with_images=False)[2] is None
    ds = LatentDataset(latents_dir, eps_fn=lambda i: torch.ones(4, 4, 4))
    z1, img1, y1 = ds[5]
    torch.testing.assert_close(z1, (m[2, :4] + m[2, 4:]) * SD_VAE_SCALE)
    assert img1.shape == (3, RES, RES) and int(y1) == store.labels[5]


def test_preprocess_resume_keeps_finished_shards(tmp_path, image_folder, tiny_vae_dir, latents_dir):
    out = tmp_path / "lat"
    assert _run_preprocess(image_folder, out, tiny_vae_dir, _stop_after_shards=1) is None  # "interrupted"
    assert os.path.exists(out / "shard-00000.json") and not os.path.exists(out / "index.json")
    with pytest.raises(LatentDataError, match="did not finish"):
        open_latents(str(out))
    # a partial shard 1 left by the interruption (tmp files, a truncated file, no marker)
    (out / "shard-00001.moments.npy.tmp").write_bytes(b"garbage")
    np.save(out / "shard-00001.labels.npy", np.zeros(4, np.int64))
    before = {f: os.stat(out / f).st_mtime_ns for f in os.listdir(out) if f.startswith("shard-00000")}
    _run_preprocess(image_folder, out, tiny_vae_dir)
    after = {f: os.stat(out / f).st_mtime_ns for f in os.listdir(out) if f.startswith("shard-00000")}
    assert before == after  # kept, not redone
    a, b = LatentShards(str(out)), LatentShards(latents_dir)
    np.testing.assert_array_equal(a.moments(range(9)), b.moments(range(9)))
    np.testing.assert_array_equal(a.images(range(9)), b.images(range(9)))
    assert not any(f.endswith(".tmp") for f in os.listdir(out))
    # other settings into the same folder are refused, not mixed
    with pytest.raises(PreprocessError, match="other settings"):
        _run_preprocess(image_folder, out, tiny_vae_dir, shard_size=5)


def test_preprocess_from_another_folder_with_the_same_counts_is_refused(tmp_path, image_folder, tiny_vae_dir,
                                                                        latents_dir):
    """Issue 25: a different image folder with the same counts rewrote index.json / files.txt and kept the
    old arrays. The shards and index.json record the source's identity (paths + sizes) and check it."""
    index = json.load(open(os.path.join(latents_dir, "index.json")))
    assert len(index["source_id"]) == 16
    out = tmp_path / "lat"
    shutil.copytree(latents_dir, out)
    other = tmp_path / "other"
    rng = np.random.default_rng(5)
    for name in CLASSES:  # same classes, same counts, other images (other names and sizes)
        os.makedirs(other / name)
        for i in range(N_PER_CLASS):
            Image.fromarray(rng.integers(0, 256, (40 + i, 45, 3), dtype=np.uint8)).save(other / name / f"x{i}.png")
    before = open(out / "files.txt").read()
    with pytest.raises(PreprocessError, match=r"holds latents of another source .*use another --out"):
        _run_preprocess(str(other), out, tiny_vae_dir)
    assert open(out / "files.txt").read() == before  # nothing rewritten
    # the same folder again: every shard is kept (the identity matches)
    stamp = {f: os.stat(out / f).st_mtime_ns for f in os.listdir(out) if f.startswith("shard-")}
    _run_preprocess(image_folder, out, tiny_vae_dir)
    assert stamp == {f: os.stat(out / f).st_mtime_ns for f in os.listdir(out) if f.startswith("shard-")}


def test_preprocess_ranks_write_their_own_shards(tmp_path, monkeypatch, image_folder, tiny_vae_dir, latents_dir):
    """torchrun-style: rank r encodes shards k ≡ r (mod world); rank 0 writes the index once all exist."""
    out = tmp_path / "ranks"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert _run_preprocess(image_folder, out, tiny_vae_dir) is None
    assert sorted(f for f in os.listdir(out) if f.endswith(".json")) == ["shard-00001.json"]
    monkeypatch.setenv("RANK", "0")
    index = _run_preprocess(image_folder, out, tiny_vae_dir)
    assert index["count"] == 9 and len(index["shards"]) == 3
    np.testing.assert_array_equal(LatentShards(str(out)).moments(range(9)), LatentShards(latents_dir).moments(range(9)))


def test_bad_shards_are_named_and_redone(tmp_path, latents_dir, image_folder, tiny_vae_dir):
    out = tmp_path / "copy"
    shutil.copytree(latents_dir, out)
    path = out / "shard-00001.images.npy"
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 100)
    with pytest.raises(CorruptShardError, match=rf"shard-00001\.images\.npy is truncated .* = {size} bytes, "
                                                rf"the file has {size - 100} bytes"):
        LatentShards(str(out))
    np.save(out / "shard-00002.labels.npy", np.zeros(3, np.int64))  # shard 2 holds 1 sample
    mtime0 = os.stat(out / "shard-00000.moments.npy").st_mtime_ns
    _run_preprocess(image_folder, out, tiny_vae_dir)  # redoes shards 1 and 2 only
    assert os.stat(out / "shard-00000.moments.npy").st_mtime_ns == mtime0
    np.testing.assert_array_equal(LatentShards(str(out)).images(range(9)), LatentShards(latents_dir).images(range(9)))
    # label count mismatch inside a finished dataset
    np.save(out / "shard-00002.labels.npy", np.zeros(3, np.int64))
    with pytest.raises(LabelCountError, match=r"shard-00002\.labels\.npy holds 3 samples but the index says 1"):
        LatentShards(str(out))


def test_preprocess_bad_inputs(tmp_path, tiny_vae_dir, monkeypatch):
    small = tmp_path / "small" / "c0"
    os.makedirs(small)
    Image.new("RGB", (64, 64)).save(small / "a.png")
    Image.new("RGB", (20, 48)).save(small / "b.png")
    with pytest.raises(pp_lib.ImageTooSmallError, match=r"b\.png is 20x48"):
        _run_preprocess(str(tmp_path / "small"), tmp_path / "o1", tiny_vae_dir)
    idx = _run_preprocess(str(tmp_path / "small"), tmp_path / "o1", tiny_vae_dir, small_images="upscale")
    assert idx["count"] == 2
    flat = tmp_path / "flat"
    os.makedirs(flat)
    Image.new("RGB", (64, 64)).save(flat / "a.png")
    with pytest.raises(PreprocessError, match="one sub-folder per class"):
        _run_preprocess(str(flat), tmp_path / "o2", tiny_vae_dir)
    with pytest.raises(FileNotFoundError, match="no_vae_here"):
        load_vae(str(tmp_path / "no_vae_here"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(FileNotFoundError, match=r"stabilityai/sd-vae-ft-mse.*--vae DIR"):
        load_vae("stabilityai/sd-vae-ft-mse")
    assert pp.main(["--images", str(tmp_path / "small"), "--out", str(tmp_path / "o3"), "--vae",
                    str(tmp_path / "no_vae_here"), "--no-progress"]) == 2
    monkeypatch.setitem(sys.modules, "diffusers", None)
    with pytest.raises(ImportError, match=r"diffusers.*pip install 'erw_fast\[data\]'"):
        load_vae(tiny_vae_dir)


def _write_repa_layout(root, store):
    """REPA's layout from our shards: images/00000/img%08d.png, vae-sd/00000/img-mean-std-%08d.npy."""
    os.makedirs(root / "images" / "00000")
    os.makedirs(root / "vae-sd" / "00000")
    labels = []
    for i in range(len(store)):
        Image.fromarray(store.images([i])[0].transpose(1, 2, 0)).save(root / "images" / "00000" / f"img{i:08d}.png")
        fn = f"00000/img-mean-std-{i:08d}.npy"
        np.save(root / "vae-sd" / fn, store.moments([i])[0].astype(np.float32))
        labels.append([fn, int(store.labels[i])])
    with open(root / "vae-sd" / "dataset.json", "w") as f:
        json.dump({"labels": labels}, f)


def test_repa_layout_read_and_convert(tmp_path, latents_dir):
    ours = LatentShards(latents_dir)
    repa = tmp_path / "repa"
    _write_repa_layout(repa, ours)
    store = open_latents(str(repa))
    assert isinstance(store, RepaLayout) and len(store) == 9
    idx = [7, 1, 3]
    np.testing.assert_array_equal(store.moments(idx), ours.moments(idx))
    np.testing.assert_array_equal(store.images(idx), ours.images(idx))
    assert store.labels.tolist() == ours.labels.tolist()
    data = LatentData(str(repa))
    assert (data.input_size, data.channels, data.num_classes) == (4, 4, 3)
    # convert to shards without the VAE
    conv = tmp_path / "conv"
    pp_lib.preprocess(from_repa=str(repa), out=str(conv), shard_size=4, progress=False)
    np.testing.assert_array_equal(LatentShards(str(conv)).moments(range(9)), ours.moments(range(9)))
    # label count mismatch
    with open(repa / "vae-sd" / "dataset.json") as f:
        meta = json.load(f)
    meta["labels"] = meta["labels"][:-1]
    with open(repa / "vae-sd" / "dataset.json", "w") as f:
        json.dump(meta, f)
    with pytest.raises(LabelCountError, match=r"dataset\.json lists 8 labels but .*vae-sd holds 9"):
        open_latents(str(repa))
    os.remove(repa / "images" / "00000" / "img00000000.png")
    with pytest.raises(LabelCountError, match="8 images .* but 9 latent files"):
        open_latents(str(repa))


# --------------------------------------------------------------------------------------------
# Pre-extracted features
# --------------------------------------------------------------------------------------------
def test_extract_features_and_alignment_equivalence(tmp_path, latents_dir, tiny_dinov2_dir):
    from erw_fast.erw import alignment_loss

    data_dir = tmp_path / "data"
    shutil.copytree(latents_dir, data_dir)
    ef_lib.extract_features(str(data_dir), "dinov2-vit-b", encoder_path=tiny_dinov2_dir, batch_size=3,
                        progress=False, device="cpu", _stop_after_shards=1)
    first = os.stat(data_dir / "features" / "dinov2-vit-b" / "shard-00000.npy").st_mtime_ns
    with pytest.raises(ef_lib.FeatureStoreError, match="extract_features --data"):
        ef_lib.FeatureStore(str(data_dir), "dinov2-vit-b")
    index = ef_lib.extract_features(str(data_dir), "dinov2-vit-b", encoder_path=tiny_dinov2_dir, batch_size=3,
                                progress=False, device="cpu")
    assert os.stat(data_dir / "features" / "dinov2-vit-b" / "shard-00000.npy").st_mtime_ns == first  # kept
    assert (index["count"], index["token_grid"], index["dim"]) == (9, GRID, 32)

    data = LatentData(str(data_dir))
    pre = ef_lib.FeatureStore(str(data_dir), "dinov2-vit-b", expected_count=len(data))
    stub = ef_lib.precomputed_encoders(str(data_dir), "dinov2-vit-b", expected_count=9)[0]
    assert (stub.name, stub.dim, stub.token_grid) == ("dinov2-vit-b", 32, GRID)
    enc = build_encoder("dinov2-vit-b", path=tiny_dinov2_dir, input_size=data.input_size)
    idx = torch.tensor([8, 2, 5, 0, 4])
    online = enc(data.encoder_images(idx))
    stored = stub.features(idx)
    assert pre.get(idx).dtype == torch.float16
    torch.testing.assert_close(stored, online, atol=2e-2, rtol=1e-2)  # fp16 storage
    torch.manual_seed(1)
    z_pred = torch.randn(5, GRID * GRID, 32)
    for kind in ("cosine", "ntxent"):
        a, b = alignment_loss([z_pred], [online], kind), alignment_loss([z_pred], [stored], kind)
        assert abs(float(a) - float(b)) < 1e-3, (kind, float(a), float(b))
    # a truncated feature shard is named
    p = data_dir / "features" / "dinov2-vit-b" / "shard-00001.npy"
    with open(p, "r+b") as f:
        f.truncate(os.path.getsize(p) - 10)
    with pytest.raises(CorruptShardError, match=r"features/dinov2-vit-b/shard-00001\.npy is truncated"):
        ef_lib.FeatureStore(str(data_dir), "dinov2-vit-b")
    ef_lib.extract_features(str(data_dir), "dinov2-vit-b", encoder_path=tiny_dinov2_dir, progress=False, device="cpu")
    ef_lib.FeatureStore(str(data_dir), "dinov2-vit-b", expected_count=9)


# --------------------------------------------------------------------------------------------
# End to end: preprocess → extract features → train (ERW warmup + transfer + full) on latents
# --------------------------------------------------------------------------------------------
def test_train_end_to_end_on_latents(tmp_path, image_folder, tiny_vae_dir, tiny_dinov2_dir):
    from erw_fast import train as train_cli

    data = tmp_path / "in32"
    # the documented sequence, through the command-line entry points
    assert pp.main(["--images", image_folder, "--out", str(data), "--resolution", str(RES), "--vae", tiny_vae_dir,
                    "--batch-size", "4", "--shard-size", "4", "--workers", "0", "--device", "cpu",
                    "--no-progress"]) == 0
    assert ef.main(["--data", str(data), "--encoder", "dinov2-vit-b", "--encoder-path", tiny_dinov2_dir,
                    "--device", "cpu", "--no-progress"]) == 0
    common = ["--data", str(data), "--model", "SiT-D/2", "--encoder", "dinov2-vit-b", "--warmup-steps", "2",
              "--steps", "2", "--batch-size", "4", "--projector-dim", "32", "--log-every", "1",
              "--sample-steps", "2", "--samples-per-class", "1", "--device", "cpu", "--no-progress",
              "--lambda0", "6", "--half-life", "2"]
    runs = {}
    for name, mode, extra in (("online", "online", ["--encoder-path", tiny_dinov2_dir]),
                              ("precomputed", "precomputed", []),
                              ("online-sync", "online", ["--encoder-path", tiny_dinov2_dir, "--prefetch", "0"]),
                              ("precomputed-sync", "precomputed", ["--prefetch", "0"])):
        out = tmp_path / f"run-{name}"
        assert train_cli.main(common + extra + ["--out", str(out), "--features", mode]) == 0
        with open(out / "metrics.jsonl") as f:
            recs = [json.loads(line) for line in f]
        runs[name] = [r for r in recs if "loss" in r and "event" not in r]
        assert any(r.get("event") == "transfer" for r in recs)
        assert os.path.exists(out / "samples.png")  # decoded with the dataset's VAE
        assert list((out / "samples").glob("*.pt"))
        cfg = json.load(open(out / "config.json"))
        assert cfg["encoder"] == "dinov2-vit-b" and cfg["features"] == mode
    # features extracted for a 2x2 grid cannot feed SiT-D/4 (1x1 tokens): a clear error, nothing trained
    bad = [a if a != "SiT-D/2" else "SiT-D/4" for a in common] + ["--features", "precomputed", "--out",
                                                                 str(tmp_path / "run-bad")]
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stderr(buf):
        assert train_cli.main(bad) == 2
    assert "2x2 = 4 tokens but the model SiT-D/4 has 1 patch tokens" in buf.getvalue(), buf.getvalue()
    on, pre = runs["online"], runs["precomputed"]
    # reading batches ahead in a thread (the default, --prefetch 2) changes nothing: same losses as in line
    for name in ("online", "precomputed"):
        key = ("loss", "loss_align", "loss_velocity", "grad_norm")
        assert [[r[q] for q in key] for r in runs[name]] == [[r[q] for q in key] for r in runs[name + "-sync"]]
    assert [r["phase"] for r in on] == ["warmup"] * 2 + ["train"] * 2 and len(pre) == len(on)
    # the first step sees the same batch and weights: the alignment loss agrees to fp16 tolerance
    assert abs(on[0]["loss_align"] - pre[0]["loss_align"]) < 2e-3
    assert all(np.isfinite(r["loss"]) for r in on + pre)
