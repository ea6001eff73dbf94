"""The embedded demo model: world, tokenizer, judge, smoke training, and the shipped export."""

from pathlib import Path

import numpy as np
import pytest
import torch

from lcm_live.demo_model import judge, world
from lcm_live.demo_model.tokenizer import make_tokenizer


EXPORT = Path(__file__).resolve().parents[1] / "assets" / "demo-model"


def test_world_is_seeded_and_vectorised():
    a = world.batch(np.random.default_rng(3), 16, drop=0.2)
    b = world.batch(np.random.default_rng(3), 16, drop=0.2)
    assert (a[0] == b[0]).all() and a[1] == b[1]
    assert a[0].shape == (16, 64, 64, 3) and a[0].dtype == np.uint8
    one = np.stack([world.render(attrs) for attrs in a[2]])
    assert (one == world.render_batch(a[2])).all()
    assert world.caption(a[2][0]).startswith("a ")


def test_tokenizer_handles_any_text():
    tok = make_tokenizer()
    assert tok.model_max_length == 77
    assert len({tok.bos_token_id, tok.eos_token_id}) == 2 and tok.pad_token_id is not None
    for word in world.WORDS:  # every grammar word is one token
        assert len(tok(word).input_ids) == 3, word
    for text in [
        "",
        "Ünïcödé façade naïve",
        "emoji 🌈🔥👩‍🚀 and 中文 и кириллица",
        "x" * 500,
        "a " * 300,
        "\x00\x01\t\n tabs",
        "a small red circle on the left, blue background",
    ]:
        ids = tok(text, padding="max_length", max_length=77, truncation=True).input_ids
        assert len(ids) == 77 and ids[0] == tok.bos_token_id
        assert all(0 <= i < len(tok) for i in ids)
        assert tok.unk_token_id not in tok(text).input_ids[1:-1] or tok.unk_token_id == tok.eos_token_id


def test_judge_accepts_real_samples_and_rejects_wrong_prompts():
    images, _, attrs = world.batch(np.random.default_rng(7), 300)
    assert judge.rates([judge.score(i, a) for i, a in zip(images, attrs)])["all"] == 1.0
    wrong = []
    for img, a in zip(images[:50], attrs[:50]):
        other = dict(a, shape=world.SHAPES[(world.SHAPES.index(a["shape"]) + 1) % 3])
        wrong.append(judge.score(img, other)["all"])
    assert not any(wrong)
    assert judge.score(images[0], {"color": attrs[0]["color"]}) == {"color": True, "all": True}


def test_smoke_training_runs_end_to_end(tmp_path, capsys):
    from lcm_live.demo_model.__main__ import main

    main(["train", "--smoke"])
    out = capsys.readouterr().out
    assert "train: done" in out and "LoRA layers in memory" in out
    folder = Path(out.strip().split("-> ")[-1])
    assert (folder / "base" / "model_index.json").exists()
    assert (folder / "lcm-lora" / "pytorch_lora_weights.safetensors").exists()


@pytest.mark.skipif(not (EXPORT / "base").exists(), reason="no exported demo model")
def test_shipped_export_follows_prompts_in_4_steps():
    from diffusers import LCMScheduler, StableDiffusionPipeline

    size = sum(f.stat().st_size for f in EXPORT.rglob("*") if f.is_file())
    assert size <= 20e6
    pipe = StableDiffusionPipeline.from_pretrained(EXPORT / "base", dtype=torch.float32)
    pipe.load_lora_weights(EXPORT / "lcm-lora")
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    asks = [
        dict(shape="circle", color="red", background="blue", size="large", position="center"),
        dict(shape="square", color="yellow", background="black", size="large", position="left"),
        dict(shape="triangle", color="white", background="green", size="large", position="bottom"),
        dict(shape="circle", color="orange", background="purple", size="large", position="right"),
    ]
    ok = []
    for attrs in asks:
        gens = [torch.Generator().manual_seed(s) for s in range(3)]
        images = pipe(
            [world.caption(attrs)] * 3, num_inference_steps=4, guidance_scale=1.0, height=64, width=64, generator=gens
        ).images
        ok += [judge.score(im, attrs)["all"] for im in images]
    assert sum(ok) >= len(ok) // 2, ok
