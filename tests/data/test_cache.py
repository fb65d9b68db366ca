"""The latent cache: round trip, resume, fingerprint, bad images, training from it, bench-cache."""

import json
from itertools import islice
from pathlib import Path

import pytest
import torch
from PIL import Image

from fluxlab.cli import main
from fluxlab.conditioning.text_encoders import build_text_encoder
from fluxlab.config.loading import load_config
from fluxlab.data import build_dataset, cache_writer
from fluxlab.data.cache import check_cache, open_cache
from fluxlab.data.cache_writer import build_cache_codec, write_cache
from fluxlab.data.samplers import InfiniteBatchSampler
from fluxlab.models.weights.autoencoder_spec import load_autoencoder
from fluxlab.train.trainer import Trainer

CPU = torch.device("cpu")


def _cfg(cache: Path, *extra: str):
    return load_config("latent-debug", [f"--data.cache_dir={cache}", "--train.device=cpu", *extra])


@pytest.fixture(scope="module")
def encoders():
    cfg = _cfg(Path("unused"))
    return build_cache_codec(cfg, CPU), build_text_encoder(
        "minilm", cfg.encoding.text_max_length, CPU
    )


@pytest.fixture(scope="module")
def cached(tmp_path_factory, encoders):
    root = tmp_path_factory.mktemp("cache") / "straight"
    cfg = _cfg(root)
    report = write_cache(cfg, CPU, *encoders, progress=False)
    return cfg, root, report


def test_round_trip_equals_the_encoders(cached, encoders) -> None:
    cfg, root, report = cached
    assert report.encoded == 48 and not report.bad and report.images_per_s > 0
    ds = open_cache(cfg, "train")
    source = build_dataset(
        "openmoji", resolution=16, split="train", val_fraction=0.1, seed=0, limit=48
    )
    assert len(ds) == len(source) and ds.captions == list(source.captions)
    images = torch.stack([source[i]["image"] for i in range(len(source))])
    ae = load_autoencoder("preset:ae-tiny")
    batch = ds.batch(list(range(len(ds))))
    torch.testing.assert_close(batch["latent"], ae.encode(images), atol=1e-5, rtol=1e-5)
    assert tuple(batch["latent"].shape[1:]) == (4, 8, 8) and ds.latent_hw == [(8, 8)]
    txt, vec = encoders[1].encode(list(source.captions))
    torch.testing.assert_close(batch["txt"], txt, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batch["vec"], vec, atol=1e-5, rtol=1e-5)
    assert (
        len(open_cache(cfg, "val"))
        == json.loads((root / "index.json").read_text())["splits"]["val"]["count"]
    )


def test_interrupted_run_resumes_to_identical_shards(
    cached, encoders, tmp_path, monkeypatch
) -> None:
    cfg, straight, _ = cached
    resumed = tmp_path / "resumed"
    real_write, calls = cache_writer._write_shard, []

    def dies_on_third_shard(path, tensors, metadata):
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt  # as if killed mid-run
        real_write(path, tensors, metadata)

    monkeypatch.setattr(cache_writer, "_write_shard", dies_on_third_shard)
    with pytest.raises(KeyboardInterrupt):
        write_cache(_cfg(resumed), CPU, *encoders, progress=False)
    with pytest.raises(ValueError, match="unfinished"):
        check_cache(_cfg(resumed))
    monkeypatch.setattr(cache_writer, "_write_shard", real_write)
    report = write_cache(_cfg(resumed), CPU, *encoders, progress=False)
    assert report.reused_shards == 2 and report.written_shards == 2
    files = sorted(p.relative_to(straight) for p in straight.rglob("*") if p.is_file())
    assert files == sorted(
        p.relative_to(resumed) for p in resumed.rglob("*") if p.is_file()
    )  # no stray .tmp
    for rel in files:
        assert (straight / rel).read_bytes() == (resumed / rel).read_bytes(), rel


def test_fingerprint_mismatch_names_the_difference(cached, encoders) -> None:
    _, root, _ = cached
    changed = _cfg(root, "--encoding.text_max_length=9")
    with pytest.raises(ValueError, match="text_encoder"):
        check_cache(changed)
    with pytest.raises(ValueError, match="other settings"):
        write_cache(_cfg(root, "--cache.dtype=bfloat16"), CPU, *encoders, progress=False)


def test_bad_images_are_skipped_and_named_with_buckets(tmp_path, encoders) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    sizes = [(40, 40), (30, 60), (60, 30), (50, 52), (20, 44)]  # (width, height)
    for i, (w, h) in enumerate(sizes):
        Image.new("RGB", (w, h), (40 * i, 100, 200)).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"picture {i}")
    good = (folder / "img0.png").read_bytes()
    (folder / "truncated.png").write_bytes(good[: len(good) // 2])  # header fine, pixels missing
    (folder / "junk.png").write_bytes(b"not an image at all")
    cfg = _cfg(
        tmp_path / "c",
        f"--data.dataset={folder}",
        "--data.limit=null",
        "--data.val_fraction=0",
        "--data.buckets=[[16,16],[16,32],[32,16]]",
    )
    report = write_cache(cfg, CPU, *encoders, progress=False)
    assert len(report.bad) == 2 and any("junk.png" in b for b in report.bad)
    assert any("truncated.png" in b for b in report.bad)
    index = json.loads((tmp_path / "c" / "index.json").read_text())
    assert index["splits"]["train"]["count"] == 5 and len(index["bad_images"]) == 2
    ds = open_cache(cfg, "train")
    assert sorted(ds.buckets) == [(16, 16), (16, 32), (32, 16)]
    for indices in ds.eval_batches(4):
        batch = ds.batch(indices)
        h, w = ds.buckets[ds.bucket_of[indices[0]]]
        assert tuple(batch["latent"].shape[2:]) == (h // 2, w // 2)  # ae-tiny downsamples 2×


def test_one_bucket_serves_the_pixel_loaders_full_batches(cached) -> None:
    # A short last batch would cost a compiled run a recompile; with one bucket the cache deals the
    # same full batches, epoch after epoch, as the pixel path's sampler.
    cfg = cached[0]
    ds = open_cache(cfg, "train")
    bs = 7
    assert len(ds) % bs and len(ds.buckets) == 1
    steps = 3 * (len(ds) // bs) + 1  # into a fourth epoch
    got = [b["index"].tolist() for b in islice(ds.batches(bs, seed=3, start_batch=2), steps)]
    want = list(islice(iter(InfiniteBatchSampler(len(ds), bs, seed=3, start_batch=2)), steps))
    assert got == want and {len(b) for b in got} == {bs}


def test_training_from_the_cache_matches_on_the_fly(cached, tmp_path, monkeypatch) -> None:
    cfg, root, _ = cached
    common = [
        "--optim.steps=2",
        "--data.caption_dropout=0.5",
        "--train.sample_every=1000",
        "--train.checkpoint_every=1000",
    ]
    import fluxlab.conditioning.text_encoders
    import fluxlab.pipelines.build
    import fluxlab.tasks.cached  # imported now, so they bind the real functions (patched below)
    import fluxlab.tasks.text_to_image

    def forbidden(*args, **kwargs):
        raise AssertionError("training from the cache built an encoder")

    # no autoencoder or text encoder while setting up cached training
    with monkeypatch.context() as m:
        m.setattr(fluxlab.conditioning.text_encoders, "build_text_encoder", forbidden)
        m.setattr("fluxlab.tasks.cached.build_text_encoder", forbidden)
        m.setattr(fluxlab.pipelines.build, "build_codec", forbidden)
        m.setattr("fluxlab.tasks.cached.build_codec", forbidden)
        fast = Trainer(_cfg(root, f"--train.output_dir={tmp_path / 'cached'}", *common), quiet=True)
    slow = Trainer(
        load_config(
            "latent-debug",
            [
                "--data.cache_dir=null",
                "--train.device=cpu",
                f"--train.output_dir={tmp_path / 'fly'}",
                *common,
            ],
        ),
        quiet=True,
    )
    # Same initial weights without copying: autoencoder and text encoder builds leave the global
    # RNG alone.
    for a, b in zip(fast.model.state_dict().values(), slow.model.state_dict().values()):
        assert torch.equal(a, b)
    fast.train()
    slow.train()
    losses = [
        [
            json.loads(line)["loss"]
            for line in (tmp_path / run / "log.jsonl").read_text().splitlines()
        ]
        for run in ("cached", "fly")
    ]
    # Same batches, caption dropout, t and noise. Not asserted bitwise: the on-the-fly caption table
    # stores text tokens in float16 (fluxlab.conditioning.text_cache) while latent-debug caches
    # float32. (Within a few steps of the adaLN-Zero init the text barely reaches the output, and
    # the losses come out identical here.)
    assert all(torch.isfinite(torch.tensor(x)).all() for x in losses)
    torch.testing.assert_close(
        torch.tensor(losses[0]), torch.tensor(losses[1]), rtol=1e-4, atol=1e-6
    )
    assert (
        tmp_path / "cached" / "samples" / "step_0000002.png"
    ).is_file()  # the decoder loaded lazily


def test_posterior_samples_and_bench_cache_on_cpu(tmp_path, encoders, capsys) -> None:
    cfg = _cfg(
        tmp_path / "s",
        "--cache.latents=sample",
        "--data.limit=24",
        "--optim.steps=1",
        f"--train.output_dir={tmp_path / 'run'}",
        "--train.sample_every=1000",
    )
    write_cache(cfg, CPU, *encoders, progress=False)
    ds = open_cache(cfg, "train")
    item = ds[0]
    assert set(item) >= {"mean", "logvar"} and "latent" not in item
    trainer = Trainer(cfg, quiet=True)
    gen = torch.Generator().manual_seed(0)
    a, _ = trainer.task.loss(
        trainer.model,
        ds.batch([0, 1]),
        gen,
        t=torch.full((2,), 0.5),
        noise=lambda s: torch.zeros(s),
    )
    b, _ = trainer.task.loss(
        trainer.model,
        ds.batch([0, 1]),
        gen,
        t=torch.full((2,), 0.5),
        noise=lambda s: torch.zeros(s),
    )
    torch.testing.assert_close(a, b)  # measuring uses the posterior mean: deterministic
    out = tmp_path / "bench.json"
    assert (
        main(
            [
                "bench-cache",
                "--config",
                "latent-debug",
                "--steps",
                "2",
                "--warmup",
                "1",
                "--device",
                "cpu",
                "--workdir",
                str(tmp_path / "bench"),
                "--json",
                str(out),
                "--data.limit=24",
            ]
        )
        == 0
    )
    result = json.loads(out.read_text())
    assert result["cache"]["images_per_s"] > 0 and result["speedup"] > 0
    assert "(b)/(c)" in capsys.readouterr().out
