"""Prompt and subject fidelity from pixels; DINO / CLIP scorers on tiny random models."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from toyworld.embeddings import ClipScorer, DinoScorer
from toyworld.metrics import (
    analyse,
    classify_pattern,
    classify_shape,
    interior,
    prompt_fidelity,
    subject_fidelity,
    to_world_array,
)
from toyworld.subjects import SUBJECTS, subject_contexts
from toyworld.world import (
    COLOUR_NAMES,
    COLOURS,
    IMAGE_SIZE,
    POSITIONS,
    Scene,
    caption,
    pattern_mask,
    render,
    sample_scene,
)


def _scenes(count: int, seed: int = 0) -> list[Scene]:
    rng = np.random.default_rng(seed)
    return [sample_scene(rng) for _ in range(count)]


def test_analysis_recovers_ground_truth_exactly():
    for scene in _scenes(150):
        truth = render(scene)
        a = analyse(truth.image)
        assert a.background == scene.background
        assert a.object_colour == scene.colour
        assert a.position == scene.position
        assert np.array_equal(a.object_mask, truth.object_mask)
        assert np.array_equal(a.shade & a.object_mask, truth.pattern_mask)
        assert classify_shape(a.object_mask) == scene.shape


def test_classify_pattern_reads_rendered_patterns_and_catches_wrong_ones():
    for scene in _scenes(150, seed=4):
        truth = render(scene)
        a = analyse(truth.image)
        assert classify_pattern(a.object_mask, a.shade) == scene.pattern
    scene = replace(_scenes(1)[0], pattern="striped", size=14)
    truth = render(scene)
    main, shade = (np.array(c, dtype=np.uint8) for c in COLOURS[scene.colour])
    flat = truth.image.copy()
    flat[truth.object_mask] = main  # stripes lost: reads as plain
    a = analyse(flat)
    assert classify_pattern(a.object_mask, a.shade) == "plain"
    checked = flat.copy()
    checked[truth.object_mask & pattern_mask("checkered", 0, 0)] = shade
    a = analyse(checked)
    assert classify_pattern(a.object_mask, a.shade) == "checkered"
    empty = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
    assert classify_pattern(empty, empty) is None


def test_prompt_fidelity_is_one_on_truth_and_catches_each_wrong_attribute():
    for scene in _scenes(40, seed=1):
        image = render(scene).image
        assert prompt_fidelity(image, caption(scene)).score == 1.0
        # another background colour (not the object's)
        other_bg = next(c for c in COLOUR_NAMES if c not in (scene.background, scene.colour))
        wrong = prompt_fidelity(render(replace(scene, background=other_bg)).image, caption(scene))
        assert (wrong.background_ok, wrong.colour_ok, wrong.position_ok) == (False, True, True)
        assert not wrong.colours_ok and wrong.score == 0.75
        # object and background colours swapped
        swapped = replace(scene, colour=scene.background, background=scene.colour)
        wrong = prompt_fidelity(render(swapped).image, caption(scene))
        assert (wrong.background_ok, wrong.colour_ok) == (False, False)
        # the opposite position
        opposite = {name: n2 for name, (x, y) in POSITIONS.items()
                    for n2, (x2, y2) in POSITIONS.items() if (x2, y2) == (32 - x, 32 - y)}
        if scene.position != "center":
            moved = replace(scene, position=opposite[scene.position],
                            centre_x=32 - scene.centre_x, centre_y=32 - scene.centre_y)
            assert prompt_fidelity(render(moved).image, caption(scene)).position_ok is False
    # only what the prompt asks is checked
    scene = _scenes(1)[0]
    partial = prompt_fidelity(render(scene).image, f"a {scene.colour} {scene.shape}")
    assert partial.checks == {"colour": True, "shape": True}


def test_prompt_fidelity_of_subject_prompts_uses_the_subject_colour():
    subject = SUBJECTS[0]
    scene = subject_contexts(subject)[1][0]
    image = render(scene).image
    prompt = caption(scene, token=subject.token)
    assert prompt_fidelity(image, prompt, subject=subject).score == 1.0
    assert prompt_fidelity(image, prompt).colour_ok is None  # no subject: colour not asked


def test_fidelity_survives_noise_and_resizing():
    rng = np.random.default_rng(0)
    for scene in _scenes(30, seed=2):
        image = render(scene).image
        noisy = np.clip(image + rng.normal(0, 12, image.shape), 0, 255).astype(np.uint8)
        assert prompt_fidelity(noisy, caption(scene)).colours_ok
        big = Image.fromarray(image).resize((4 * IMAGE_SIZE,) * 2, Image.Resampling.NEAREST)
        assert np.array_equal(to_world_array(big), image)
        assert np.array_equal(to_world_array(image.astype(np.float32) / 255.0), image)


def test_subject_fidelity_is_one_on_the_subject_and_low_on_others():
    for subject in SUBJECTS:
        train, evaluation = subject_contexts(subject)
        for scene in train + evaluation:
            fidelity = subject_fidelity(render(scene).image, subject)
            assert (fidelity.colour, fidelity.shape, fidelity.pattern, fidelity.shape_iou) == (
                1.0, 1.0, 1.0, 1.0)
            assert (fidelity.interior_colour, fidelity.interior_pattern) == (1.0, 1.0)
        scene = train[0]
        other_colour = next(c for c in COLOUR_NAMES if c not in (subject.colour, scene.background))
        recoloured = subject_fidelity(render(replace(scene, colour=other_colour)).image, subject)
        assert recoloured.colour == 0.0 and recoloured.shape == 1.0 and recoloured.score < 0.7
        assert recoloured.interior_colour == 0.0 and recoloured.interior_score < 0.7
        plain = subject_fidelity(render(replace(scene, pattern="plain")).image, subject)
        assert plain.pattern == 0.0 and plain.score < 0.7
        assert plain.interior_pattern == 0.0 and plain.interior_score < 0.7
        other_shape = next(s for s in ("circle", "cross") if s != subject.shape)
        reshaped = subject_fidelity(render(replace(scene, shape=other_shape)).image, subject)
        assert reshaped.shape == 0.0 and reshaped.shape_iou < 0.95 and reshaped.score < 0.7
        # a different object of the base's world: wrong colour, shape and pattern
        stranger = replace(scene, colour=other_colour, shape=other_shape, pattern="plain")
        assert subject_fidelity(render(stranger).image, subject).score < 0.3
    blank = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    assert subject_fidelity(blank, SUBJECTS[0]).score == 0.0
    assert analyse(blank).object_colour is None


def test_interior_drops_the_outline_and_keeps_thin_masks_whole():
    square = np.zeros((8, 8), bool)
    square[2:6, 1:6] = True  # 4 x 5
    inner = interior(square)
    assert inner.sum() == 2 * 3 and inner[3:5, 2:5].all()
    line = np.zeros((8, 8), bool)
    line[3, 1:7] = True
    assert np.array_equal(interior(line), line)


def test_soft_edges_cost_the_score_but_not_the_interior_reading():
    # A generated edge pixel is often a blend of object and background that the palette
    # names a third colour: purple on green reads as black's shade (grey).
    subject = next(s for s in SUBJECTS if s.subject_id == "checkered-star")
    scene = replace(subject_contexts(subject)[0][0], background="green")
    rendered = render(scene)
    image = rendered.image.copy()
    outline = rendered.object_mask & ~interior(rendered.object_mask)
    blend = (np.array(COLOURS["purple"][0]) + np.array(COLOURS["green"][0])) // 2
    image[outline] = blend
    sharp, soft = subject_fidelity(rendered.image, subject), subject_fidelity(image, subject)
    assert sharp.score == 1.0
    assert soft.shape == 1.0 and soft.colour < 0.7 and soft.score < 0.85
    assert (soft.interior_colour, soft.interior_pattern, soft.interior_score) == (1.0, 1.0, 1.0)


@pytest.fixture(scope="module")
def tiny_dino(tmp_path_factory):
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    folder = tmp_path_factory.mktemp("dino")
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=64)
    ViTModel(config, add_pooling_layer=False).save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTextConfig,
        CLIPTokenizer,
        CLIPVisionConfig,
    )

    from toyworld.world import VOCABULARY
    from tuneqdm.testing import write_clip_tokenizer_files

    folder = tmp_path_factory.mktemp("clip")
    tokenizer = CLIPTokenizer.from_pretrained(str(write_clip_tokenizer_files(folder, VOCABULARY)))
    text = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                          num_hidden_layers=2, num_attention_heads=4,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id)
    vision = CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=2, num_attention_heads=4)
    CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                         projection_dim=16)).save_pretrained(folder)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32},
                                         crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def test_dino_scores(tiny_dino):
    scorer = DinoScorer(tiny_dino)
    images = [render(s).image for s in _scenes(3)]
    embeddings = scorer.embed(images)
    assert embeddings.shape == (3, 32)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, rtol=1e-5)
    same = scorer.similarity(images[:1], images[:1])
    np.testing.assert_allclose(same, [1.0], rtol=1e-5)
    scores = scorer.similarity(images, images[1:])
    assert scores.shape == (3,) and (np.abs(scores) <= 1.0 + 1e-6).all()


def test_clip_image_and_text_scores(tiny_clip):
    scorer = ClipScorer(tiny_clip)
    scenes = _scenes(3)
    images = [Image.fromarray(render(s).image) for s in scenes]
    np.testing.assert_allclose(scorer.image_similarity(images[:1], images[:1]), [1.0], rtol=1e-5)
    clip_i = scorer.image_similarity(images, images)
    assert clip_i.shape == (3,) and (np.abs(clip_i) <= 1.0 + 1e-6).all()
    clip_t = scorer.text_similarity(images, [caption(s) for s in scenes])
    assert clip_t.shape == (3,) and (np.abs(clip_t) <= 1.0 + 1e-6).all()
    assert scorer.embed_texts(["a red star"]).shape == (1, 16)
    with pytest.raises(ValueError, match="3 images but 2 prompts"):
        scorer.text_similarity(images, ["a", "b"])
