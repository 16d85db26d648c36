"""FairHuman on Z-Image, what is Z-Image's own: masks on the token grid, conditioning and
objective as ZImagePipeline has them, the LoRA file's keys, and rendering with ZImagePipeline's
guidance convention (training, exact resume, rendering during training and with the LoRA:
test_flow_training.py)."""
from __future__ import annotations

import re

import pytest
import torch

from flow_helpers import (assert_diffusers_loader_reproduces, assert_one_guided_step_is_classifier_free,
                          assert_one_pixel_face_owns_its_token, assert_render_under_autocast_is_the_pipelines,
                          lora_module_names, train_lora_in_process)
from train_helpers import lora_tensors

# In CI's tier: about 30 s on two cores (training and resume: test_flow_training.py, slow).

# The diffusers module paths of a Z-Image transformer that ComfyUI 0.33's Z-Image LoRA key map takes
# (comfy/utils.py z_image_to_diffusers, under "diffusion_model." in comfy/lora.py's Lumina2 branch): the
# attention of the main layers and of both refiners; q, k and v go into ComfyUI's fused qkv.
COMFYUI_ZIMAGE_ATTENTION = re.compile(r"(layers|noise_refiner|context_refiner)\.\d+\.attention\.(to_q|to_k|to_v|to_out\.0)")
PROMPTS = ["a photo of a person", "two friends waving hands in the park, close up, high quality"]


def test_one_pixel_face_owns_exactly_its_token_after_flip_and_crop(tmp_path):
    """The face loss's gradient reaches the transformer's final layer only at the image token
    (2×2 latent cells, 16×16 pixels) holding the face pixel, and at all of that token's features;
    the caption tokens and the padding after the image tokens get none."""
    def final_layer_tokens(transformer):  # its unified sequence: image tokens first, row-major
        outputs = []
        transformer.all_final_layer["2-1"].register_forward_hook(lambda module, args, out: outputs.append(out))
        return outputs

    assert_one_pixel_face_owns_its_token("tiny-zimage", tmp_path / "data", final_layer_tokens)


def test_conditioning_is_the_pipelines_and_keeps_each_prompts_length():
    """The training conditioning of prompts of different lengths, batched and cached, gives the
    transformer per prompt exactly what ``ZImagePipeline.encode_prompt`` gives it."""
    from core.tiny_models import build_tiny_pipeline
    from trainers.model import TrainableModel

    model = TrainableModel(build_tiny_pipeline("tiny-zimage"), rank=4)
    reference, _ = model.pipe.encode_prompt(list(PROMPTS), do_classifier_free_guidance=False,
                                            max_sequence_length=model.family.max_sequence_length)
    assert len({len(r) for r in reference}) == 2, "the prompts must differ in token count"
    model.conditioning(PROMPTS[:1])  # one prompt cached before the batch
    cond = model.conditioning([PROMPTS[1], PROMPTS[0], PROMPTS[1]])
    rows = [hidden for hidden, _ in cond.rows()]
    for got, want in zip(rows, [reference[1], reference[0], reference[1]]):
        assert torch.equal(got, want)
    assert cond.mask is not None and cond.mask.sum(1).tolist() == [len(r) for r in (reference[1], reference[0],
                                                                                     reference[1])]


def test_x0_prediction_equals_one_euler_step_of_the_pipeline():
    """Timestep convention and sign of the objective: the x0 the family reads off the transformer at
    σ equals ZImagePipeline's own one-step sample from σ (its Euler step to σ = 0)."""
    from core.families import family_of
    from core.tiny_models import build_tiny_pipeline

    pipe = build_tiny_pipeline("tiny-zimage")
    family = family_of(pipe)
    noisy = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(3))
    sampled = pipe(prompt=list(PROMPTS), height=64, width=64, latents=noisy.clone(), sigmas=[0.7], guidance_scale=0.0,
                   output_type="latent").images
    sigma = pipe.scheduler.sigmas[0].expand(2)  # 0.7 after the scheduler's shift
    assert 0.7 < float(sigma[0]) < 1
    with torch.no_grad():
        pred = family.predict(noisy, sigma, family.encode_prompts(PROMPTS, torch.float32), None, None, None)
    x0, eps = family.predicted_x0_and_eps(noisy, sigma, pred)
    assert (x0 - sampled).abs().max() <= 1e-5
    assert torch.allclose(family.add_noise(x0, eps, sigma), noisy, atol=1e-5)


def test_lora_keys_are_the_ones_comfyui_maps_for_zimage(region_dataset_64, tmp_path):
    """Every key of the exported LoRA is ``diffusion_model.<module>`` of an attention projection
    ComfyUI's Z-Image map names, every such projection of the tiny model has one, and diffusers'
    Z-Image loader, given the file, reproduces the trained transformer's output."""
    from core.lora_format import read_lora_metadata
    from core.tiny_models import build_tiny_pipeline

    result = train_lora_in_process("tiny-zimage", region_dataset_64, tmp_path)
    tensors = lora_tensors(result["lora"])
    modules = [name for name, _ in build_tiny_pipeline("tiny-zimage").transformer.named_modules()]
    expected = {f"diffusion_model.{name}" for name in modules if COMFYUI_ZIMAGE_ATTENTION.fullmatch(name)}
    assert len(expected) == 4 * (2 + 2 + 2)  # four projections in 2 layers, 2 noise and 2 context refiners
    names = lora_module_names(tensors)
    assert names == expected
    assert len(tensors) == 3 * len(expected)  # lora_down, lora_up and alpha of each
    assert all(float(tensors[f"{n}.alpha"]) == 2.0 for n in names)
    assert read_lora_metadata(result["lora"])["fairhuman.base_arch"] == "zimage"
    assert_diffusers_loader_reproduces(result, "tiny-zimage")



def test_render_under_autocast_decodes_as_the_pipeline():
    """The mixed-precision path decodes as ZImagePipeline does (Flux's scaling and shift factors),
    with a negative prompt and guidance."""
    assert_render_under_autocast_is_the_pipelines("tiny-zimage", cfg=3.0, negative="blurry")


@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_one_guided_step_is_classifier_free_guidance(cfg):
    """ZImagePipeline guides as pos + w·(pos − neg): the family turns the pack's scale into w = cfg − 1
    (cfg 1: no guidance, as Z-Image-Turbo samples)."""
    assert_one_guided_step_is_classifier_free("tiny-zimage", cfg)
