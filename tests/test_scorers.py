"""The model-based scorers (hps, imagereward) on tiny randomly initialized models saved in the
documented folder layouts, the official-checkpoint conversions, composites and the CLI flag."""
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from train_helpers import ROOT, offline_env

PROMPTS = ["a woman waving both hands", "two people shaking hands"]


def _tiny_clip_config():
    from transformers import CLIPConfig

    from core.tiny_tokenizer import vocabulary

    vocab, _ = vocabulary()
    text = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, hidden_act="gelu", bos_token_id=vocab["<|startoftext|>"],
                eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"])
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=56, patch_size=14, hidden_act="gelu")
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)


@pytest.fixture(scope="module")
def clip_model():
    from transformers import CLIPModel

    torch.manual_seed(0)
    return CLIPModel(_tiny_clip_config()).eval()


@pytest.fixture(scope="module")
def hps_folder(tmp_path_factory, clip_model):
    from core.tiny_tokenizer import tiny_clip_tokenizer

    folder = tmp_path_factory.mktemp("hps")
    clip_model.save_pretrained(folder)
    tiny_clip_tokenizer().save_pretrained(folder)
    return folder


def _open_clip_names(model) -> dict:
    """A transformers CLIPModel's tensors under open_clip's names (from open_clip's model.py:
    token_embedding, positional_embedding, transformer.resblocks.N.{ln_1, attn.in_proj_*,
    attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}, ln_final, text_projection (x @ P), the same under
    visual. with conv1, class_embedding, ln_pre, ln_post, proj, and logit_scale)."""
    sd = model.state_dict()
    out = {"logit_scale": sd["logit_scale"], "text_projection": sd["text_projection.weight"].t(),
           "visual.proj": sd["visual_projection.weight"].t()}
    singles = {"text_model.embeddings.token_embedding.weight": "token_embedding.weight",
               "text_model.embeddings.position_embedding.weight": "positional_embedding",
               "text_model.final_layer_norm": "ln_final",
               "vision_model.embeddings.class_embedding": "visual.class_embedding",
               "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
               "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
               "vision_model.pre_layrnorm": "visual.ln_pre", "vision_model.post_layernorm": "visual.ln_post"}
    block = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
             "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    for key, value in sd.items():
        m = re.match(r"(text|vision)_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$", key)
        if m:
            prefix = f"{'visual.' if m.group(1) == 'vision' else ''}transformer.resblocks.{m.group(2)}"
            if m.group(3) == "self_attn.q_proj":
                parts = [sd[key.replace("q_proj", p)] for p in ("q_proj", "k_proj", "v_proj")]
                out[f"{prefix}.attn.in_proj_{m.group(4)}"] = torch.cat(parts)
            elif m.group(3) in block:
                out[f"{prefix}.{block[m.group(3)]}.{m.group(4)}"] = value
            continue
        for hf, oc in singles.items():
            if key == hf:
                out[oc] = value
            elif key.startswith(hf + "."):
                out[oc + key[len(hf):]] = value
    return out


def test_hps_is_the_cosine_of_the_models_own_embeddings(hps_folder, clip_model, sample_photos):
    from core.scorers import get_scorer
    from core.scorers.pixels import clip_pixels
    from core.tiny_tokenizer import tiny_clip_tokenizer

    images = [Image.open(p).convert("RGB") for p in sample_photos[:2]]
    scores = get_scorer("hps", model=str(hps_folder)).score(images, PROMPTS)
    tokens = tiny_clip_tokenizer()(PROMPTS, padding="max_length", max_length=77, return_tensors="pt")
    with torch.no_grad():
        img = clip_model.get_image_features(pixel_values=clip_pixels(images, 56))
        txt = clip_model.get_text_features(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)
    img, txt = (x if isinstance(x, torch.Tensor) else x.pooler_output for x in (img, txt))
    expected = torch.nn.functional.cosine_similarity(img, txt).tolist()
    assert scores == pytest.approx(expected, abs=1e-5)
    assert all(-1.0 <= s <= 1.0 for s in scores) and scores[0] != scores[1]
    # one batch or one at a time: the same numbers
    scorer = get_scorer("hps", model=str(hps_folder), batch_size=1)
    assert scorer.score(images, PROMPTS) == pytest.approx(scores, abs=1e-5)


def test_open_clip_checkpoint_converts_to_the_same_model(hps_folder, clip_model, tmp_path, sample_photos):
    from core.scorers import get_scorer
    from core.scorers.hps import open_clip_to_transformers

    official = _open_clip_names(clip_model)
    official["attn_mask"] = torch.full((77, 77), float("-inf")).triu(1)  # a buffer open_clip saves
    converted = open_clip_to_transformers(official)
    expected = clip_model.state_dict()
    assert set(converted) == {k for k in expected if not k.endswith("position_ids")}
    for key, value in converted.items():
        assert torch.equal(value, expected[key]), key
    with pytest.raises(KeyError, match="unknown open_clip key"):
        open_clip_to_transformers({"visual.attnpool.weight": torch.zeros(1)})

    folder = tmp_path / "hps-official"
    folder.mkdir()
    torch.save({"state_dict": official}, folder / "HPS_v2_compressed.pt")
    for path in hps_folder.iterdir():  # config and tokenizer files, not the transformers weights
        if path.suffix != ".safetensors":
            (folder / path.name).write_bytes(path.read_bytes())
    images = [Image.open(p).convert("RGB") for p in sample_photos[:2]]
    a = get_scorer("hps", model=str(folder)).score(images, PROMPTS)
    b = get_scorer("hps", model=str(hps_folder)).score(images, PROMPTS)
    assert a == pytest.approx(b, abs=1e-6)


def _bert_vocab(folder):
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "[ENC]"]
    words += sorted({w for p in PROMPTS for w in p.split()}) + list("abcdefghijklmnopqrstuvwxyz")
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    return len(words)


@pytest.fixture(scope="module")
def reward_model_and_folder(tmp_path_factory):
    from transformers import BlipConfig

    from core.scorers.image_reward import ImageRewardModel, save_image_reward

    folder = tmp_path_factory.mktemp("imagereward")
    size = _bert_vocab(folder)
    config = BlipConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=16),
        text_config=dict(vocab_size=size, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=2, encoder_hidden_size=32, pad_token_id=0))
    torch.manual_seed(0)
    model = ImageRewardModel(config).eval()
    save_image_reward(model, folder)
    return model, folder


def test_imagereward_is_the_standardized_head_on_the_cross_attended_cls(reward_model_and_folder, sample_photos):
    from transformers import BertTokenizer

    from core.scorers import get_scorer
    from core.scorers.image_reward import MEAN, STD
    from core.scorers.pixels import clip_pixels

    model, folder = reward_model_and_folder
    images = [Image.open(p).convert("RGB") for p in sample_photos[:2]]
    scores = get_scorer("imagereward", model=str(folder)).score(images, PROMPTS)

    tokens = BertTokenizer(str(folder / "vocab.txt"))(PROMPTS, padding="max_length", truncation=True,
                                                      max_length=35, return_tensors="pt")
    assert (tokens.input_ids[:, 0] == 2).all()  # [CLS] first: no [ENC] substitution when scoring
    with torch.no_grad():
        image = model.vision(pixel_values=clip_pixels(images, 32)).last_hidden_state
        text = model.text(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                          encoder_hidden_states=image).last_hidden_state
        h = text[:, 0]
        for layer in model.head.layers:
            h = layer(h)  # the dropouts are identity in eval
    expected = ((h.squeeze(-1) - MEAN) / STD).tolist()
    assert scores == pytest.approx(expected, abs=1e-5) and scores[0] != scores[1]
    assert get_scorer("imagereward", model=str(folder), batch_size=1).score(images, PROMPTS) == pytest.approx(
        scores, abs=1e-5)


def test_official_imagereward_names_map_to_the_same_model(reward_model_and_folder, tmp_path, sample_photos):
    from core.scorers import get_scorer

    model, folder = reward_model_and_folder
    # the official checkpoint's names (BLIP's timm-style ViT, med.py's BERT, ImageReward's MLP)
    vision_names = [(r"^embeddings\.class_embedding$", "cls_token"), (r"^embeddings\.position_embedding$", "pos_embed"),
                    (r"^embeddings\.patch_embedding\.", "patch_embed.proj."), (r"^post_layernorm\.", "norm."),
                    (r"^encoder\.layers\.(\d+)\.layer_norm1\.", r"blocks.\1.norm1."),
                    (r"^encoder\.layers\.(\d+)\.layer_norm2\.", r"blocks.\1.norm2."),
                    (r"^encoder\.layers\.(\d+)\.self_attn\.qkv\.", r"blocks.\1.attn.qkv."),
                    (r"^encoder\.layers\.(\d+)\.self_attn\.projection\.", r"blocks.\1.attn.proj."),
                    (r"^encoder\.layers\.(\d+)\.mlp\.", r"blocks.\1.mlp.")]
    official = {"blip.text_proj.weight": torch.zeros(4, 48)}  # unused by scoring: dropped
    for key, value in model.state_dict().items():
        if key.startswith("head."):
            official["mlp." + key[5:]] = value
        elif key.startswith("text."):
            official["blip.text_encoder." + key[5:]] = value
        else:
            name = key[len("vision."):]
            for pattern, repl in vision_names:
                name, count = re.subn(pattern, repl, name)
                if count:
                    break
            official["blip.visual_encoder." + name] = value
    target = tmp_path / "ir-official"
    target.mkdir()
    torch.save({"state_dict": official}, target / "ImageReward.pt")
    for name in ("config.json", "vocab.txt"):
        (target / name).write_bytes((folder / name).read_bytes())
    images = [Image.open(p).convert("RGB") for p in sample_photos[:2]]
    a = get_scorer("imagereward", model=str(target)).score(images, PROMPTS)
    b = get_scorer("imagereward", model=str(folder)).score(images, PROMPTS)
    assert a == pytest.approx(b, abs=1e-6)


def test_composite_is_the_weighted_sum_and_errors_name_the_flag(hps_folder, reward_model_and_folder, sample_photos):
    from core.scorers import get_scorer

    _, ir_folder = reward_model_and_folder
    images = [np.array(Image.open(p).convert("RGB")) for p in sample_photos[:2]]
    models = {"hps": str(hps_folder), "imagereward": str(ir_folder)}
    hps = get_scorer("hps", models=models).score(images, PROMPTS)
    ir = get_scorer("imagereward", models=models).score(images, PROMPTS)
    both = get_scorer("hps:5,imagereward:0.5", models=models).score(images, PROMPTS)
    assert both == pytest.approx([5 * h + 0.5 * r for h, r in zip(hps, ir)], abs=1e-6)
    with pytest.raises(FileNotFoundError, match=r"--scorer-model hps=FOLDER"):
        get_scorer("anatomy:1,hps:5")
    with pytest.raises(FileNotFoundError, match="neither transformers CLIP weights"):
        get_scorer("hps", model=str(ir_folder))


@pytest.mark.slow
def test_build_pairs_with_a_composite_of_local_models(hps_folder, reward_model_and_folder, tmp_path):
    import subprocess
    import sys

    _, ir_folder = reward_model_and_folder
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS))
    result = subprocess.run(
        [sys.executable, "-m", "trainers", "build-pairs", "--base", "tiny-sd15", "--prompts", str(tmp_path / "prompts.txt"),
         "--n", "2", "--steps", "2", "--size", "64", "--output", str(tmp_path), "--scorer", "anatomy:1,hps:5,imagereward:1",
         "--scorer-model", f"hps={hps_folder}", "--scorer-model", f"imagereward={ir_folder}"],
        cwd=ROOT, env=offline_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert all(r["winner_score"] > r["loser_score"] for r in rows)


def test_pickscore_is_logit_scale_times_cosine(hps_folder, clip_model, tmp_path, sample_photos):
    from transformers import CLIPImageProcessor, CLIPProcessor

    from core.scorers import get_scorer
    from core.tiny_tokenizer import tiny_clip_tokenizer

    folder = tmp_path / "pickscore"
    clip_model.save_pretrained(folder)
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 56},
                                                                 crop_size={"height": 56, "width": 56}),
                              tokenizer=tiny_clip_tokenizer())
    processor.save_pretrained(folder)
    images = [Image.open(p).convert("RGB") for p in sample_photos[:2]]
    scores = get_scorer("pickscore", model=str(folder)).score(images, PROMPTS)
    cosines = get_scorer("hps", model=str(hps_folder)).score(images, PROMPTS)  # same weights
    scale = float(clip_model.logit_scale.detach().exp())
    # the two preprocessings differ slightly (resampling), so compare loosely
    assert scores == pytest.approx([scale * c for c in cosines], abs=0.05 * scale)
