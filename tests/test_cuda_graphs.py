"""CUDA graphs: the shape buckets and the cache here; capture, replay and the engine's graph path where CUDA is."""

import pytest
import torch

from lcm_live.cuda_graphs import GraphCache, bucket
from lcm_live.request import Request


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_batches_are_padded_to_powers_of_two():
    assert [bucket(n) for n in (1, 2, 3, 4, 5, 8, 9, 16, 17)] == [1, 2, 4, 4, 8, 8, 16, 16, 32]


def test_a_disabled_cache_calls_the_function_and_queues_nothing():
    calls = []
    cache = GraphCache(lambda x: (calls.append(x.shape[0]) or x * 2,), enabled=False)
    (out,) = cache(torch.ones(3, 2))
    assert torch.equal(out, torch.full((3, 2), 2.0)) and calls == [3] and cache.pending == 0


def test_a_new_shape_runs_eagerly_and_is_queued_once_per_bucket():
    cache = GraphCache(lambda x: (x + 1,), enabled=True)
    (out,) = cache(torch.zeros(3, 2))
    cache(torch.zeros(4, 2))  # the same bucket (4) as 3 rows
    cache(torch.zeros(5, 2))  # bucket 8
    assert torch.equal(out, torch.ones(3, 2))
    assert cache.pending == 2 and cache.eager_calls == 3 and not cache.is_captured(torch.zeros(3, 2))


def test_the_engine_keeps_graphs_off_on_a_cpu(sd15_engine):
    assert not sd15_engine.unet_graphs.enabled and sd15_engine.prepare_graphs() == 0.0
    result = sd15_engine.generate(Request(prompt="no graphs here"))
    assert not result.timings.warming_up and sd15_engine.unet_graphs.pending == 0


@cuda
def test_a_captured_graph_replays_the_function_for_any_batch_of_its_bucket():
    layer = torch.nn.Conv2d(4, 4, 3, padding=1).cuda()
    cache = GraphCache(lambda x: (layer(x),), enabled=True)
    with torch.inference_mode():
        first = torch.randn(3, 4, 8, 8, device="cuda")
        cache(first)
        assert cache.capture_pending() == 1
        for rows in (1, 3, 4):  # 1 row is another bucket: eager, and queued
            x = torch.randn(rows, 4, 8, 8, device="cuda")
            (out,) = cache(x)
            torch.testing.assert_close(out, layer(x))
    assert cache.replays == 2 and cache.pending == 1


@cuda
def test_the_engine_gives_the_same_images_with_and_without_graphs(tiny_models):
    from lcm_live.device import pick_runtime
    from lcm_live.engine import Engine
    from lcm_live.presets import ModelSpec

    paths = tiny_models["sd15"]
    engine = Engine.load(ModelSpec(paths["base"], paths["lora"]), pick_runtime("cuda", "float16"), warmup=False)
    requests = [Request(prompt=f"row {i}", seed=i, guidance_scale=1.0 + 0.5 * (i % 2)) for i in range(3)]

    def run():
        rows = engine.start_many(requests)
        while active := [row for row in rows if not row.done]:
            engine.step(active)
        return [row.latents.float() for row in rows], engine.finish(rows)

    engine.unet_graphs.enabled = engine.decode_graphs.enabled = False
    eager, _ = run()
    engine.unet_graphs.enabled = True
    run()  # queues the shapes
    assert engine.warm(limit=None) >= 1
    graphed, results = run()
    assert engine.unet_graphs.replays > 0
    for a, b in zip(eager, graphed):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)
    assert [r.params["prompt"] for r in results] == ["row 0", "row 1", "row 2"]
