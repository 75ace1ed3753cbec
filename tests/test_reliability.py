"""Nothing lost, nothing confusing (training side): every bad setting is refused before the run folder
exists, with the flag named; runs are never merged; damaged checkpoints are caught; a resumed log
has no step twice; signals and exit statuses; checkpoint retention."""
import errno
import os
import signal

import pytest
import torch

from erw_fast.engine import train
from erw_fast.models.checkpoint import CorruptCheckpointError, read_checkpoint
from erw_fast.train import main
from run_helpers import log_rows as rows, tiny_cfg as cfg  # tests/ is on the path

pytestmark = pytest.mark.filterwarnings("ignore:decoder_hidden_size")


BAD = [
    (["--sample-steps", "0"], "--sample-steps"),
    (["--samples-per-class", "0"], "--samples-per-class"),
    (["--cfg-scale", "nan"], "--cfg-scale"),
    (["--cfg-scale", "-1"], "--cfg-scale"),
    (["--class-dropout", "0"], "--class-dropout"),          # guidance (default cfg 2) needs a null class
    (["--half-life", "0"], "--half-life"),
    (["--lr", "nan"], "--lr"),
    (["--lr", "0"], "--lr"),
    (["--log-every", "0"], "--log-every"),
    (["--threads", "-1"], "--threads"),
    (["--ema-decay", "1"], "--ema-decay"),
    (["--batch-size", "0"], "--batch-size"),
    (["--steps", "0", "--warmup-steps", "0"], "nothing to train"),
    (["--method", "repa", "--steps", "0"], "nothing to train"),
    (["--keep-last", "-2"], "--keep-last"),
    (["--ckpt-every-minutes", "0"], "--ckpt-every-minutes"),
    (["--attn-backend", "flash"], "--attn-backend"),
    (["--device", "cuda"], "--device"),
]


@pytest.mark.parametrize("flags,match", BAD, ids=[" ".join(f) for f, _ in BAD])
def test_bad_settings_fail_before_anything_is_written(tmp_path, capsys, flags, match):
    out = tmp_path / "never"
    assert main(flags + ["--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and match in err[0], err
    assert not out.exists()


def test_fused_triton_without_triton_is_refused(tmp_path, monkeypatch, capsys):
    from erw_fast import ops

    monkeypatch.setattr(ops, "triton_available", lambda: False)
    assert main(["--fused", "triton", "--out", str(tmp_path / "x"), "--no-progress"]) == 2
    assert "--fused triton" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_resume_never_merges_two_runs(tmp_path):
    a = train(cfg(tmp_path, "a"))
    train(cfg(tmp_path, "b"))
    before = open(os.path.join(tmp_path, "b", "config.json")).read()
    with pytest.raises(ValueError, match=r"belongs to another run.*--out .*b"):
        train(cfg(tmp_path, "b", resume=a.checkpoint))
    assert open(os.path.join(tmp_path, "b", "config.json")).read() == before
    fork = train(cfg(tmp_path, "c", resume=a.checkpoint, steps=4))  # an empty --out may continue A
    assert fork.status == "finished" and fork.steps == 6


def _damage(path):
    """Overwrite up to 100 KB inside the largest tensor record (the file keeps its size and still loads)."""
    import zipfile

    with zipfile.ZipFile(path) as z:
        rec = max(z.infolist(), key=lambda i: i.file_size)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(rec.header_offset + 26)
        name_len, extra_len = (int.from_bytes(f.read(2), "little") for _ in range(2))
        start = rec.header_offset + 30 + name_len + extra_len
        n = min(100_000, rec.file_size)
        f.seek(start + (rec.file_size - n) // 2)
        f.write(os.urandom(n))
    assert os.path.getsize(path) == size
    torch.load(path, weights_only=True)  # still loads: only the checksum can tell


def test_damaged_checkpoint_is_caught_and_resume_falls_back(tmp_path, capsys):
    r = train(cfg(tmp_path, ckpt_every=1))
    ckpts = sorted(os.listdir(os.path.join(r.out, "checkpoints")))
    last = os.path.join(r.out, "checkpoints", ckpts[-1])
    _damage(last)
    with pytest.raises((CorruptCheckpointError, ValueError), match=ckpts[-1]):
        read_checkpoint(last)
    res = train(cfg(tmp_path, ckpt_every=1, resume="auto", steps=4))
    assert "trying the previous checkpoint" in capsys.readouterr().err
    assert res.status == "finished"
    # a file written without a checksum (REPA's, ERW's) still loads
    plain = torch.load(os.path.join(r.out, "checkpoints", ckpts[0]), weights_only=True)
    plain.pop("checksum")
    torch.save(plain, tmp_path / "repa_style.pt")
    assert read_checkpoint(str(tmp_path / "repa_style.pt"))["steps"] == plain["steps"]


def test_resumed_log_has_no_step_twice_and_temp_files_go(tmp_path):
    c = cfg(tmp_path, ckpt_at=(3,))
    train(c)  # steps 1..5 logged; checkpoints at 2 (warmup end), 3 and 5
    open(os.path.join(c.out, "checkpoints", "0000005.pt.tmp123"), "wb").write(b"partial")
    train(cfg(tmp_path, resume=os.path.join(c.out, "checkpoints", "0000003.pt")))
    steps = [r["step"] for r in rows(c.out) if "loss" in r]
    assert steps == sorted(set(steps)) == [1, 2, 3, 4, 5]
    assert not any(".tmp" in n for n in os.listdir(os.path.join(c.out, "checkpoints")))


def test_failed_start_folder_is_reused(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "metrics.jsonl").write_text('{"phase": "warmup", "step": 1, "loss": 1.0}\n')
    res = train(cfg(tmp_path))
    assert res.status == "finished" and "reusing it" in capsys.readouterr().err
    assert [r["step"] for r in rows(str(out)) if "loss" in r] == [1, 2, 3, 4, 5]


def test_mismatched_weights_on_resume_write_no_resume_event(tmp_path):
    c = cfg(tmp_path)
    r = train(c)
    ck = torch.load(r.checkpoint, weights_only=True)
    ck["model"]["pos_embed"] = torch.zeros(1, 3, 3)
    ck.pop("checksum")
    torch.save(ck, r.checkpoint)
    n = len(rows(c.out))
    with pytest.raises(ValueError, match="do not fit"):
        train(cfg(tmp_path, resume="auto", steps=4))
    assert not any(x.get("event") == "resume" for x in rows(c.out)[n:])


def test_full_disk_names_the_path(tmp_path, monkeypatch, capsys):
    from erw_fast.engine import checkpoint as ck

    def full(obj, f, *a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc:778] . unexpected pos 7473664 vs 7473552")

    monkeypatch.setattr(ck.torch, "save", full)
    monkeypatch.setattr(ck.shutil, "disk_usage", lambda p: os.statvfs_result((0,) * 10) and type("U", (), {"free": 0})())
    with pytest.raises(OSError) as e:
        ck.save_atomic({"a": torch.ones(1)}, str(tmp_path / "checkpoints" / "0000001.pt"))
    assert e.value.errno == errno.ENOSPC and e.value.filename.endswith("0000001.pt")
    assert main(["--out", str(tmp_path / "r"), "--warmup-steps", "1", "--steps", "1", "--batch-size", "4",
                 "--no-progress"]) == 2
    assert "no space left on device writing" in capsys.readouterr().err


def test_sighup_checkpoints_and_exit_status_says_stopped(tmp_path, monkeypatch, capsys):
    from erw_fast.method import objective as objective_mod

    calls = {"n": 0}
    real = objective_mod.velocity_loss

    def fake(*a):
        calls["n"] += 1
        if calls["n"] == 3:
            signal.raise_signal(signal.SIGHUP)
        return real(*a)

    monkeypatch.setattr(objective_mod, "velocity_loss", fake)
    out = str(tmp_path / "run")
    code = main(["--method", "vanilla", "--steps", "6", "--batch-size", "8", "--out", out, "--no-progress",
                 "--sample-steps", "2", "--samples-per-class", "1"])
    assert code == 128 + signal.SIGHUP
    assert "stopped at step 2" in capsys.readouterr().err
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["0000002.pt"]


def test_keep_last_keeps_the_warmup_and_ckpt_at_checkpoints(tmp_path):
    r = train(cfg(tmp_path, steps=6, ckpt_every=1, keep_last=2, ckpt_at=(4,)))
    names = sorted(os.listdir(os.path.join(r.out, "checkpoints")))
    assert names == ["0000002.pt", "0000004.pt", "0000007.pt", "0000008.pt"]


def test_ckpt_every_minutes(tmp_path):
    r = train(cfg(tmp_path, method="vanilla", steps=3, ckpt_every_minutes=1e-9))
    assert sorted(os.listdir(os.path.join(r.out, "checkpoints"))) == ["0000001.pt", "0000002.pt", "0000003.pt"]
