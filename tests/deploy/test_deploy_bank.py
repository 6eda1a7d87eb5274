"""ScaleBank and Engine without Ray: a subject swap writes scale rows in place and
never touches the base; one UNet batch mixing subjects gives each request the images
that tuneqdm.generate gives for that subject alone."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from deploy_testkit import PROMPT, STEPS, SUBJECTS, assert_close

from deploy.bank import BankFullError, ScaleBank
from deploy.engine import Engine, GenerationRequest, LoadedSubject
from deploy.params import GenerationParams, fill_prompt
from deploy.store import SubjectStore
from tuneqdm.model import quantized_layers
from tuneqdm.scaleset import ScaleSetError


def _prompt(subject: str) -> str:
    class_noun, token = SUBJECTS[subject]
    return fill_prompt(PROMPT, token, class_noun)


@pytest.fixture(scope="module")
def engine(trained_output, base_dir):
    store = SubjectStore(str(trained_output))
    return Engine(base_dir, store.base.fingerprint, capacity=3)


@pytest.fixture(scope="module")
def loaded(trained_output):
    store = SubjectStore(str(trained_output))
    out = {}
    for subject in SUBJECTS:
        scale_set, info = store.read_scale_set(subject)
        out[subject] = LoadedSubject(info, scale_set)
    return out


def test_bank_writes_rows_in_place_and_leaves_the_base_alone(base_dir, scale_sets):
    from tuneqdm.base import load_quantized_pipeline

    unet = load_quantized_pipeline(base_dir).unet
    frozen = {k: v.clone() for k, v in unet.state_dict().items()
              if not k.endswith((".scale_out", ".scale_in"))}
    bank = ScaleBank(unet, capacity=2)
    layers = quantized_layers(unet)
    n = unet.tuneqdm_config.num_experts
    storage = {name: (layer.scale_out.data_ptr(), layer.scale_in.data_ptr())
               for name, layer in layers.items()}
    first = next(iter(layers))
    assert layers[first].scale_out.shape == (2 * n, layers[first].out_features)

    assert bank.acquire([("dog", scale_sets["dog"])]) == [0]
    assert bank.acquire([("cat", scale_sets["cat"])]) == [1]
    # full: backpack takes the least recently used slot (dog's)
    assert bank.acquire([("backpack", scale_sets["backpack"])]) == [0]
    assert bank.resident() == ["cat", "backpack"] and bank.writes == 3

    for name, layer in layers.items():
        assert (layer.scale_out.data_ptr(), layer.scale_in.data_ptr()) == storage[name]
        for subject, slot in (("backpack", 0), ("cat", 1)):
            rows = slice(slot * n, slot * n + n)
            assert torch.equal(layer.scale_out[rows],
                               scale_sets[subject].tensors[f"{name}.scale_out"])
            assert torch.equal(layer.scale_in[rows],
                               scale_sets[subject].tensors[f"{name}.scale_in"])
    after = unet.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items())
    assert bank.bytes_per_slot == scale_sets["dog"].num_scales * 4


def test_bank_pins_the_batch_and_refuses_what_does_not_fit(base_dir, scale_sets, trained_output):
    from tuneqdm.base import load_quantized_pipeline
    from tuneqdm.scaleset import ScaleSet

    bank = ScaleBank(load_quantized_pipeline(base_dir).unet, capacity=2)
    assert bank.acquire([("dog", scale_sets["dog"]), ("cat", scale_sets["cat"]),
                         ("dog", scale_sets["dog"])]) == [0, 1, 0]
    # dog is the LRU, but it is in the batch: backpack must take cat's slot
    assert bank.acquire([("backpack", scale_sets["backpack"]), ("dog", scale_sets["dog"])]
                        ) == [1, 0]
    with pytest.raises(BankFullError, match="3 distinct subjects"):
        bank.acquire([(s, scale_sets[s]) for s in SUBJECTS])
    writes = bank.writes
    alien = ScaleSet.load(trained_output / "subjects" / "alien" / "scales.safetensors")
    with pytest.raises(ScaleSetError, match="trained on base 0000"):
        bank.acquire([("alien", alien)])
    assert bank.writes == writes and "alien" not in bank.resident()
    bank.demote("dog")
    assert bank.resident()[0] == "dog"
    bank.discard("dog")
    assert bank.acquire([("cat", scale_sets["cat"])]) == [0]  # the freed slot


def test_mixed_batch_is_one_unet_batch_and_matches_offline(engine, loaded, offline_images):
    calls = []
    hook = engine.pipe.unet.register_forward_pre_hook(
        lambda module, args: calls.append(args[0].shape[0]))
    requests = [
        GenerationRequest(loaded["dog"], GenerationParams(_prompt("dog"), seed=11,
                                                          num_inference_steps=STEPS,
                                                          height=16, width=16)),
        GenerationRequest(loaded["cat"], GenerationParams(_prompt("cat"), seed=22,
                                                          num_inference_steps=STEPS,
                                                          height=16, width=16, num_images=2)),
        GenerationRequest(loaded["backpack"], GenerationParams(_prompt("backpack"), seed=33,
                                                               num_inference_steps=STEPS,
                                                               height=16, width=16)),
    ]
    try:
        results = engine.run(requests)
    finally:
        hook.remove()
    assert calls == [2 * 4] * STEPS  # 4 images, doubled by classifier-free guidance
    assert [len(r.images) for r in results] == [1, 2, 1]
    assert all(r.batch_images == 4 and r.batch_subjects == 3 for r in results)
    assert results[1].seeds == (22, 23)
    for request, result in zip(requests, results, strict=True):
        subject = request.subject.info.subject_id
        reference = offline_images(subject, request.params.prompt, request.params.seed,
                                   request.params.num_images)
        for image, ref in zip(result.images, reference, strict=True):
            assert image.size == (16, 16)
            assert_close(image, ref)


def test_mixed_strengths_in_one_batch_match_each_alone(engine, loaded):
    def request(subject: str, strength: float, seed: int) -> GenerationRequest:
        return GenerationRequest(loaded[subject], GenerationParams(
            _prompt(subject), seed=seed, num_inference_steps=STEPS, height=16, width=16,
            strength=strength))

    requests = [request("dog", 0.5, 11), request("cat", 1.5, 22), request("dog", 1.0, 33)]
    together = engine.run(requests)
    assert all(r.batch_subjects == 2 and r.batch_images == 3 for r in together)
    for req, result in zip(requests, together, strict=True):
        alone = engine.run([req])[0].images[0]
        assert_close(result.images[0], np.asarray(alone).astype(np.int16))
    full = engine.run([request("dog", 1.0, 11)])[0].images[0]
    base = engine.run([request("dog", 0.0, 11)])[0].images[0]
    half = np.asarray(together[0].images[0]).astype(np.int16)
    for other in (full, base):  # alpha 0.5 is neither the subject nor the base
        assert np.abs(half - np.asarray(other).astype(np.int16)).mean() > 0.5


def test_subjects_give_different_images(offline_images, engine, loaded):
    """The check above is discriminating: the wrong subject's scales change the image."""
    params = GenerationParams(_prompt("dog"), seed=11, num_inference_steps=STEPS, height=16,
                              width=16)
    as_cat = engine.run([GenerationRequest(loaded["cat"], params)])[0].images[0]
    reference = offline_images("dog", params.prompt, 11)[0]
    assert np.abs(np.asarray(as_cat).astype(np.int16) - reference).max() > 8


def test_engine_refuses_incompatible_requests_in_one_batch(engine, loaded):
    a = GenerationParams("a", num_inference_steps=2, height=16, width=16)
    b = GenerationParams("b", num_inference_steps=3, height=16, width=16)
    with pytest.raises(ValueError, match="share steps, guidance and size"):
        engine.run([GenerationRequest(loaded["dog"], a), GenerationRequest(loaded["cat"], b)])


def test_evicted_subject_demotes_its_slot(engine, loaded):
    subject = LoadedSubject(loaded["dog"].info, loaded["dog"].scale_set,
                            on_evict=engine.bank.demote)
    engine.bank.acquire([(subject.key, subject.scale_set),
                         (loaded["cat"].key, loaded["cat"].scale_set)])
    subject.__del__()  # what Serve's LRU calls on eviction (and Python again later)
    subject.__del__()
    assert engine.bank.resident()[0] == subject.key


def test_cached_weights_serve_the_same_images(engine, loaded, trained_output, base_dir):
    """serve --cache-weights: the centred weights kept expanded (one cache for every
    subject, since scales act on activations) give the images of the per-call path;
    the memory it holds is reported: 4 bytes per weight in fp32."""
    store = SubjectStore(str(trained_output))
    cached = Engine(base_dir, store.base.fingerprint, capacity=3, cache_weights=True)
    weights = sum(math.prod(layer.weight_shape)
                  for layer in quantized_layers(cached.pipe.unet).values())
    assert cached.weight_cache_bytes == 4 * weights
    assert engine.weight_cache_bytes == 0
    requests = [GenerationRequest(loaded[s], GenerationParams(
        _prompt(s), seed=5, num_inference_steps=STEPS, height=16, width=16))
        for s in ("dog", "cat")]
    for plain, fast in zip(engine.run(requests), cached.run(requests), strict=True):
        assert_close(fast.images[0], np.asarray(plain.images[0]).astype(np.int16))
