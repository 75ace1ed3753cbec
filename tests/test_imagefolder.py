"""Bring your own images (``erw_fast.data.imagefolder``): a folder of class sub-folders as pixel-space
training data. A generated folder (3 classes x 12 coloured shapes, 40x40 px) is trained on end to end
— ERW with a tiny random-weight DINOv2 from a local folder, and vanilla with ``--encoder none`` —
then probed and evaluated; the bad inputs, the deterministic order and the seeded flip are checked."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from erw_fast.data import ImageFolderData, ImageFolderError, class_names_of, image_folder_path, load_train_data
from erw_fast.data import imagefolder as imf
from erw_fast.engine import TrainConfig, resolve_config, train
from erw_fast.utils.cli import run_cli

CLASSES = ("circle", "square", "triangle")
PER_CLASS = 12
SIDE = 40
TINY = dict(model="SiT-D/4", batch_size=8, projector_dim=64, sample_steps=2, samples_per_class=2, log_every=1, progress=False,
            lr=1e-3, threads=1)


def _shape(kind: str, rng, side=SIDE, mode="RGB"):
    bg = tuple(int(v) for v in rng.integers(0, 80, 3))
    fg = tuple(int(v) for v in rng.integers(120, 256, 3))
    im = Image.new("RGB", (side, side), bg)
    d = ImageDraw.Draw(im)
    x, y = (int(v) for v in rng.integers(2, side // 3, 2))
    s = int(rng.integers(side // 3, side // 2))
    if kind == "circle":
        d.ellipse([x, y, x + s, y + s], fill=fg)
    elif kind == "square":
        d.rectangle([x, y, x + s, y + s], fill=fg)
    else:
        d.polygon([(x, y + s), (x + s, y + s), (x + s // 2, y)], fill=fg)
    return im.convert(mode)


def make_folder(root, classes=CLASSES, per_class=PER_CLASS, side=SIDE, seed=0, mode="RGB"):
    rng = np.random.default_rng(seed)
    for kind in classes:
        os.makedirs(os.path.join(root, kind), exist_ok=True)
        for i in range(per_class):
            _shape(kind, rng, side, mode).save(os.path.join(root, kind, f"{i:02d}.png"))
    return str(root)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("shapes"))


@pytest.fixture(scope="module")
def erw_run(tmp_path_factory, shapes, tiny_dinov2_dir):
    out = tmp_path_factory.mktemp("runs") / "erw"
    cfg = TrainConfig(method="erw", data=f"imagefolder:{shapes}", encoder="dinov2-vit-b", encoder_path=tiny_dinov2_dir,
                      warmup_steps=2, steps=2, out=str(out), hflip=True, **TINY)
    return train(cfg), str(out)


# --------------------------------------------------------------------------------------------
# End to end
# --------------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:dinov2-vit")
def test_erw_end_to_end_with_a_local_dinov2(erw_run, shapes):
    result, out = erw_run
    assert result.status == "finished" and result.steps == 4
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["class_names"] == list(CLASSES) and cfg["resolution"] == 32 and cfg["hflip"] is True
    ckpt = torch.load(result.checkpoint, weights_only=True)
    assert list(ckpt["args"]["class_names"]) == list(CLASSES) and ckpt["args"]["num_classes"] == 3
    assert ckpt["args"]["model_config"]["in_channels"] == 3 and ckpt["args"]["model_config"]["input_size"] == 32
    events = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert any(e.get("event") == "transfer" for e in events)
    assert all(np.isfinite(e["loss"]) for e in events if "loss" in e)
    grid = np.asarray(Image.open(os.path.join(out, "samples.png")))
    assert grid.ndim == 3 and grid.shape[2] == 3  # RGB, one row per class


def test_vanilla_without_encoder_from_the_command_line(tmp_path, shapes, capsys):
    import importlib

    train_cli = importlib.import_module("erw_fast.train")

    out = tmp_path / "vanilla"
    argv = ["--data", shapes, "--method", "vanilla", "--encoder", "none", "--model", "SiT-D/4", "--steps", "3",
            "--batch-size", "8", "--sample-steps", "2", "--samples-per-class", "2", "--out", str(out),
            "--no-progress", "--threads", "1"]
    assert run_cli(train_cli._main, argv) == 0
    assert (out / "samples.png").is_file() and (out / "checkpoints" / "0000003.pt").is_file()
    cfg = json.load(open(out / "config.json"))
    assert cfg["data"] == shapes and cfg["class_names"] == list(CLASSES) and cfg["encoder"] == "none"
    assert f"vanilla (SiT's recipe) | SiT-D/4 on {shapes}" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:dinov2-vit")
def test_probe_reads_the_folder(erw_run, shapes):
    from erw_fast.evaluation.probe import probe_checkpoint

    result, _ = erw_run
    res = probe_checkpoint(result.checkpoint, data=f"imagefolder:{shapes}", num_images=12, topk=3,
                           noise_levels=(0.5,))
    assert res["encoder"] == "dinov2-vit-b" and res["num_images"] == 12 and len(res["blocks"]) == 4
    assert "evenly spaced" in res["held_out"]
    assert all(np.isfinite(v) for row in res["blocks"] for v in row["cknna"].values())


class _TinyFeatures(torch.nn.Module):
    """Stands in for a TorchScript Inception: (N, 3, H, W) in [0, 255] → (N, 6)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 6, 3)

    def forward(self, x):
        return self.conv(x / 255.0).mean(dim=(2, 3))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit, as the Inception files need
def test_fid_against_the_folder(erw_run, shapes, tmp_path):
    from erw_fast import evaluate

    result, out = erw_run
    ref = tmp_path / "ref.npz"
    assert imf.write_reference_npz(f"imagefolder:{shapes}", str(ref)) == 36
    with np.load(ref) as f:
        assert f["arr_0"].shape == (36, 32, 32, 3) and f["arr_0"].dtype == np.uint8
        assert list(f["class_names"]) == list(CLASSES) and f["labels"].tolist() == sorted(f["labels"].tolist())
    net = tmp_path / "net.pt"
    torch.jit.save(torch.jit.script(_TinyFeatures()), str(net))
    res = evaluate.main(["--ckpt", out, "--num-samples", "9", "--steps", "2", "--feature-net", "inception",
                         "--inception", str(net), "--ref", str(ref), "--no-progress", "--device", "cpu"])
    assert np.isfinite(res["fid"]) and res["num_samples"] == 9
    # the folder against itself: FID 0
    self_fid = evaluate.main(["--npz", str(ref), "--feature-net", "inception", "--inception", str(net), "--ref",
                              str(ref)])
    assert abs(self_fid["fid"]) < 1e-6


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_online_fid_against_the_folder(shapes, tmp_path):
    ref, net = tmp_path / "ref.npz", tmp_path / "net.pt"
    imf.write_reference_npz(shapes, str(ref))
    torch.jit.save(torch.jit.script(_TinyFeatures()), str(net))
    out = tmp_path / "run"
    train(TrainConfig(method="vanilla", encoder="none", data=shapes, steps=2, out=str(out), eval_every=2,
                      eval_samples=6, eval_batch=6, inception=str(net), eval_ref=str(ref), **TINY))
    evals = [e for e in map(json.loads, open(out / "metrics.jsonl")) if e.get("event") == "eval"]
    assert len(evals) == 1 and np.isfinite(evals[0]["fid"]) and "sample_accuracy" not in evals[0]


# --------------------------------------------------------------------------------------------
# The data: order, labels, flip, channels, sizes
# --------------------------------------------------------------------------------------------
def test_order_labels_and_pixels(shapes):
    a = ImageFolderData(shapes, resolution=32)
    b = ImageFolderData(f"{shapes}", resolution=32, workers=1)
    assert a.files == b.files == [f"{c}/{i:02d}.png" for c in CLASSES for i in range(PER_CLASS)]
    assert a.class_names == list(CLASSES) and a.labels.tolist() == [c for c in range(3) for _ in range(PER_CLASS)]
    assert torch.equal(a.images, b.images) and a.images.dtype == torch.uint8
    assert (a.num_samples, a.num_classes, a.channels, a.input_size, a.is_latent) == (36, 3, 3, 32, False)
    idx = torch.tensor([0, 13, 35])
    x, y, pixels = a.batch(idx, seed=0, step=0, sample_ids=[0, 1, 2])
    assert x.shape == (3, 3, 32, 32) and x.dtype == torch.float32 and -1 <= x.min() and x.max() <= 1
    assert y.tolist() == [0, 1, 2] and pixels.dtype == torch.uint8 and pixels.shape == (3, 3, 32, 32)
    assert torch.equal(pixels, a.images[idx]) and torch.allclose(x, pixels.float() / 127.5 - 1)
    assert a.batch(idx, 0, 0, [0, 1, 2], with_pixels=False)[2] is None
    assert a.sample_classes() is None and torch.equal(a.decode(x), x)
    expected = imf.center_crop(Image.open(os.path.join(shapes, "square", "01.png")).convert("RGB"), 32)
    assert np.array_equal(a.images[13].permute(1, 2, 0).numpy(), np.asarray(expected))
    idx, desc, n = a.probe_indices(4)
    assert idx.tolist() == [0, 11, 23, 35] and n == 36 and "evenly spaced" in desc


def test_flip_is_seeded_per_seed_step_and_sample(shapes):
    data = ImageFolderData(shapes, resolution=32, hflip=True)
    plain = ImageFolderData(shapes, resolution=32)
    idx = torch.arange(36)
    ids = list(range(36))
    x1, _, p1 = data.batch(idx, 7, 3, ids)
    x2, _, _ = data.batch(idx, 7, 3, ids)
    assert torch.equal(x1, x2)  # the same (seed, step, sample ids): the same flips
    mask = imf.flip_mask(7, 3, ids)
    assert mask == [bool(imf.mix_seed(7, imf.STREAM_HFLIP, 3, i) & 1) for i in ids] and 8 < sum(mask) < 28
    ref = plain.images
    for i, m in enumerate(mask):
        assert torch.equal(p1[i], ref[i].flip(-1) if m else ref[i])
    # a sample's flip depends on its own id, not on the rest of the batch (any split into processes)
    x_part, _, _ = data.batch(idx[10:20], 7, 3, ids[10:20])
    assert torch.equal(x_part, x1[10:20])
    assert imf.flip_mask(7, 4, ids) != mask and imf.flip_mask(8, 3, ids) != mask
    assert torch.equal(plain.batch(idx, 7, 3, ids)[0], ref.float() / 127.5 - 1)  # hflip off: never


def test_grey_majority_and_resolution(tmp_path):
    root = tmp_path / "grey"
    make_folder(root, classes=("a", "b"), per_class=3, mode="L")
    _shape("circle", np.random.default_rng(1), mode="RGB").save(root / "a" / "colour.png")
    data = ImageFolderData(str(root), resolution=64)
    assert data.channels == 1 and data.images.shape == (7, 1, 64, 64)
    assert any("1 of 7 images are colour; converted to grey" in n for n in data.notes)
    assert any("smaller than --resolution 64 were upscaled" in n for n in data.notes)  # 40 px → 64 px
    x, _, pixels = data.batch(torch.arange(2), 0, 0, [0, 1])
    assert x.shape == (2, 1, 64, 64) and pixels.shape == (2, 3, 64, 64)
    assert torch.equal(pixels[:, 0], pixels[:, 2])
    # a tie goes to RGB
    tie = tmp_path / "tie"
    make_folder(tie, classes=("a",), per_class=2, mode="L")
    make_folder(tie, classes=("b",), per_class=2, mode="RGB")
    assert ImageFolderData(str(tie)).channels == 3
    # 16-bit grey is scaled, not clipped
    big = tmp_path / "sixteen"
    os.makedirs(big / "c")
    for i in range(2):
        Image.fromarray(np.full((40, 40), 40000 + i, np.uint16)).save(big / "c" / f"{i}.png")
    img = ImageFolderData(str(big)).images
    assert img.shape == (2, 1, 32, 32) and 150 < int(img.float().mean()) < 160  # 40000 / 257


def test_what_counts_as_an_image_folder(tmp_path, shapes):
    assert image_folder_path(f"imagefolder:{shapes}") == shapes and image_folder_path(shapes) == shapes
    assert image_folder_path("digits") is None and image_folder_path(str(tmp_path / "missing")) is None
    latent = tmp_path / "latent"
    make_folder(latent, classes=("features",), per_class=2)
    (latent / "index.json").write_text("{}")
    assert image_folder_path(str(latent)) is None  # a latent dataset has index.json (or shard-*, vae-sd/)
    (latent / "index.json").unlink()
    (latent / "shard-00000.labels.npy").write_bytes(b"")
    assert image_folder_path(str(latent)) is None
    assert resolve_config(TrainConfig(data=shapes)).model == "SiT-S/2"  # the image-folder defaults
    c = resolve_config(TrainConfig(data=f"imagefolder:{shapes}"))
    assert (c.resolution, c.encoder, c.steps) == (32, "dinov2-vit-b", 20_000)
    assert isinstance(load_train_data(shapes, "cpu", resolution=64), ImageFolderData)


# --------------------------------------------------------------------------------------------
# Bad input: one ValueError naming the folder, file or flag, before the run folder exists
# --------------------------------------------------------------------------------------------
def _refused(tmp_path, match, **kw):
    out = tmp_path / "run"
    kw = {**TINY, "method": "vanilla", "encoder": "none", "steps": 1, **kw}
    with pytest.raises(ValueError, match=match):
        train(TrainConfig(out=str(out), **kw))
    assert not out.exists()


def test_bad_layouts(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    _refused(tmp_path, r"imagefolder:.*empty: the folder is empty; put each class's images", data=f"imagefolder:{empty}")
    _refused(tmp_path, r"the folder is empty; expected class sub-folders", data=str(empty))
    _refused(tmp_path, r"is not a folder", data=f"imagefolder:{tmp_path / 'missing'}")
    flat = tmp_path / "flat"
    flat.mkdir()
    _shape("circle", np.random.default_rng(0)).save(flat / "a.png")
    _shape("circle", np.random.default_rng(0)).save(flat / "b.png")
    _refused(tmp_path, r"no class sub-folders \(it holds 2 image\(s\) directly\)", data=str(flat))
    hollow = tmp_path / "hollow"
    make_folder(hollow, classes=("a",), per_class=2)
    os.makedirs(hollow / "b")
    (hollow / "b" / "notes.txt").write_text("x")
    _refused(tmp_path, r"class folder .*hollow/b holds no images", data=f"imagefolder:{hollow}")
    single = tmp_path / "single"
    make_folder(single, classes=("a",), per_class=3)
    make_folder(single, classes=("b",), per_class=1)
    _refused(tmp_path, r"class 'b' has only 1 image \(.*single/b/00.png\); each class needs at least 2",
             data=f"imagefolder:{single}")


def test_unreadable_and_truncated_images_are_named(tmp_path):
    root = tmp_path / "broken"
    make_folder(root, classes=("a", "b"), per_class=3)
    (root / "a" / "zz_not_an_image.png").write_bytes(b"this is text")
    whole = open(root / "b" / "00.png", "rb").read()
    (root / "b" / "00.png").write_bytes(whole[: len(whole) // 2])
    (root / "b" / "._00.png").write_bytes(b"AppleDouble")  # hidden: ignored
    with pytest.raises(ImageFolderError) as e:
        ImageFolderData(str(root))
    msg = str(e.value)
    assert "2 image(s) cannot be read" in msg and "a/zz_not_an_image.png (UnidentifiedImageError" in msg
    assert "b/00.png (" in msg and "._00.png" not in msg and "none is skipped" in msg
    _refused(tmp_path, r"2 image\(s\) cannot be read", data=f"imagefolder:{root}")


def test_bad_flags(tmp_path, shapes):
    _refused(tmp_path, r"--resolution 50: use a multiple of SiT-D/4's patch size 4", data=f"imagefolder:{shapes}",
             resolution=50)
    _refused(tmp_path, r"--resolution / --hflip apply to image folders", data="digits", resolution=32)
    _refused(tmp_path, r"--resolution / --hflip apply to image folders", data="digits", hflip=True)
    _refused(tmp_path, r"--encoder none: --method erw aligns to a target encoder; use --method vanilla",
             data=f"imagefolder:{shapes}", method="erw")
    _refused(tmp_path, r"--features precomputed needs a latent dataset", data=f"imagefolder:{shapes}",
             features="precomputed")


def test_an_encoder_that_is_not_available_offline(tmp_path, shapes, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    _refused(tmp_path, r"--encoder-path", data=f"imagefolder:{shapes}", method="repa", encoder="dinov2-vit-b")
    _refused(tmp_path, r"--encoder-path 'nowhere'", data=f"imagefolder:{shapes}", method="repa",
             encoder="dinov2-vit-b", encoder_path="nowhere")


def test_resume_keeps_the_folder_settings_and_refuses_changed_classes(tmp_path, shapes):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(shapes, root)
    out = tmp_path / "run"
    kw = {**TINY, "method": "vanilla", "encoder": "none", "data": f"imagefolder:{root}", "out": str(out)}
    assert train(TrainConfig(steps=3, stop_after=1, hflip=True, **kw)).status == "stopped"
    os.rename(root / "square", root / "box")
    with pytest.raises(ValueError, match=r"the classes are now \['box', 'circle', 'triangle'\]"):
        train(TrainConfig(resume="auto", **kw))
    os.rename(root / "box", root / "square")
    result = train(TrainConfig(resume="auto", **kw))
    assert result.status == "finished" and result.steps == 3
    args = torch.load(result.checkpoint, weights_only=True)["args"]
    assert args["hflip"] is True and args["resolution"] == 32 and list(args["class_names"]) == list(CLASSES)


def test_class_names_of(shapes):
    data = ImageFolderData(shapes)
    assert class_names_of(data) == list(CLASSES) and class_names_of(data, CLASSES) == list(CLASSES)
    with pytest.raises(ValueError, match=r"the classes are now .* but the run was started with"):
        class_names_of(data, ["circle", "square"])
    assert class_names_of(object()) is None


# --------------------------------------------------------------------------------------------
# Nothing skipped silently (issue 25, class 6)
# --------------------------------------------------------------------------------------------
def _cluttered(root):
    make_folder(root, classes=("a", "b"), per_class=3)
    rng = np.random.default_rng(1)
    frames = [_shape("circle", rng) for _ in range(3)]
    frames[0].save(root / "a" / "anim.gif", save_all=True, append_images=frames[1:])
    frames[0].save(root / "b" / "moving.png", save_all=True, append_images=frames[1:])  # an animated PNG
    (root / "a" / "readme.txt").write_text("x")
    (root / "a" / ".DS_Store").write_bytes(b"x")
    (root / "notes.txt").write_text("x")
    _shape("square", rng).save(root / "loose.png")
    other = root.parent / "elsewhere"
    make_folder(other, classes=("c",), per_class=2)
    os.symlink(other / "c", root / "a" / "linked")
    os.symlink(root / "a" / "missing.png", root / "b" / "gone.jpeg.bak")
    return root


def test_every_entry_not_used_is_named_in_a_note(tmp_path, capsys):
    root = _cluttered(tmp_path / "clutter")
    data = ImageFolderData(str(root))
    assert data.num_samples == 7 and data.class_names == ["a", "b"]  # 3 + 3 + the animated PNG
    notes = "\n".join(data.notes)
    assert "2 entries not used, beside the class folders (only sub-folders are classes): loose.png, notes.txt" in notes
    assert "not of a type read here" in notes and "a/anim.gif" in notes and "a/readme.txt" in notes
    assert "symlinks to something that does not exist: b/gone.jpeg.bak" in notes
    assert "symlinked folders inside a class folder (not followed): a/linked/" in notes
    assert "hidden (names starting with '.'): a/.DS_Store" in notes
    assert "1 image(s) have several frames (animated); the first frame is used: b/moving.png" in notes
    assert "note: " in capsys.readouterr().err


def test_preprocess_listing_names_the_same_entries(tmp_path, capsys):
    from erw_fast.data.prepare import list_image_folder

    root = _cluttered(tmp_path / "clutter")
    os.makedirs(root / "empty_class")
    files, labels, classes = list_image_folder(str(root))
    assert classes == ["a", "b", "empty_class"] and len(files) == 7
    err = capsys.readouterr().err
    assert f"note: --images {root}: 2 entries not used" in err and "a/anim.gif" in err
    assert "1 class folder(s) hold no images (their labels get no samples): empty_class" in err


def test_a_dangling_class_folder_is_refused(tmp_path):
    root = tmp_path / "dangling"
    make_folder(root, classes=("a", "c"), per_class=2)
    os.symlink(tmp_path / "not_there", root / "b")
    _refused(tmp_path, r"dangling/b is a symlink to .*not_there, which does not exist; a class folder that cannot "
             r"be read would shift every label", data=f"imagefolder:{root}")
    from erw_fast.data.prepare import list_image_folder

    with pytest.raises(ValueError, match=r"--images .*dangling/b is a symlink"):
        list_image_folder(str(root))
