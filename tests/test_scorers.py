"""The model-based scorers (hps, imagereward) on tiny randomly initialized models saved in the
documented folder layouts, the official-checkpoint conversions, composites and the CLI flag."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from train_helpers import run_trainers

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


# Official layouts, written out from the official model definitions rather than from this
# pack's conversion tables: open_clip's transformer.py (VisionTransformer, TextTransformer,
# ResidualAttentionBlock: x + attn(ln_1(x)), x + mlp(ln_2(x)), nn.MultiheadAttention with a
# fused in_proj in q, k, v order, projections applied as x @ P) and BLIP's vit.py (timm-style
# Block: norm1, fused attn.qkv, attn.proj, norm2, mlp.fc1/fc2; cls_token, pos_embed, norm).
# The reference forwards below compute on those names directly, so a wrong table entry in the
# pack (ln_1/ln_2 swapped, q/k/v order, a missing transpose) changes the numbers.
CLIP_WIDTH, CLIP_HEADS, CLIP_LAYERS, CLIP_MLP, CLIP_PATCH, CLIP_IMAGE, CLIP_EMBED, CONTEXT = 32, 2, 2, 64, 14, 56, 16, 77


def _random(gen, *shape, base=0.0, scale=0.05):
    return base + scale * torch.randn(*shape, generator=gen)


def _resblock_tensors(gen, prefix, width, mlp, names):
    out = {}
    for i in range(CLIP_LAYERS):
        for norm in names["norms"]:
            out[f"{prefix}{i}.{norm}.weight"] = _random(gen, width, base=1.0, scale=0.3)
            out[f"{prefix}{i}.{norm}.bias"] = _random(gen, width)
        for name, shape in names["linears"](width, mlp).items():
            out[f"{prefix}{i}.{name}"] = _random(gen, *shape, scale=0.2)
    return out


def _official_open_clip(vocab: int, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    w, grid = CLIP_WIDTH, CLIP_IMAGE // CLIP_PATCH
    block = {"norms": ("ln_1", "ln_2"), "linears": lambda w, m: {
        "attn.in_proj_weight": (3 * w, w), "attn.in_proj_bias": (3 * w,), "attn.out_proj.weight": (w, w),
        "attn.out_proj.bias": (w,), "mlp.c_fc.weight": (m, w), "mlp.c_fc.bias": (m,), "mlp.c_proj.weight": (w, m),
        "mlp.c_proj.bias": (w,)}}
    sd = {"visual.conv1.weight": _random(gen, w, 3, CLIP_PATCH, CLIP_PATCH, scale=0.1),
          "visual.class_embedding": _random(gen, w, scale=0.5),
          "visual.positional_embedding": _random(gen, grid * grid + 1, w, scale=0.5),
          "visual.proj": _random(gen, w, CLIP_EMBED, scale=0.3),
          "token_embedding.weight": _random(gen, vocab, w, scale=0.5),
          "positional_embedding": _random(gen, CONTEXT, w, scale=0.5),
          "text_projection": _random(gen, w, CLIP_EMBED, scale=0.3),
          "logit_scale": torch.tensor(math.log(1 / 0.07)),
          "attn_mask": torch.full((CONTEXT, CONTEXT), float("-inf")).triu(1)}
    for norm in ("visual.ln_pre", "visual.ln_post", "ln_final"):
        sd[f"{norm}.weight"], sd[f"{norm}.bias"] = _random(gen, w, base=1.0, scale=0.3), _random(gen, w)
    sd.update(_resblock_tensors(gen, "visual.transformer.resblocks.", w, CLIP_MLP, block))
    sd.update(_resblock_tensors(gen, "transformer.resblocks.", w, CLIP_MLP, block))
    return sd


def _ln(sd, name, x, eps=1e-5):
    return F.layer_norm(x, x.shape[-1:], sd[f"{name}.weight"], sd[f"{name}.bias"], eps)


def _open_clip_resblocks(sd, prefix, x, mask=None):
    for i in range(CLIP_LAYERS):
        p = f"{prefix}{i}."
        attn = torch.nn.MultiheadAttention(x.shape[-1], CLIP_HEADS, batch_first=True)
        attn.load_state_dict({k: sd[p + "attn." + k] for k in
                              ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")})
        h = _ln(sd, p + "ln_1", x)
        x = x + attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        h = F.gelu(F.linear(_ln(sd, p + "ln_2", x), sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"]))
        x = x + F.linear(h, sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"])
    return x


@torch.no_grad()
def _open_clip_image_features(sd, pixels):
    x = F.conv2d(pixels, sd["visual.conv1.weight"], stride=CLIP_PATCH).flatten(2).transpose(1, 2)
    x = torch.cat([sd["visual.class_embedding"].expand(x.shape[0], 1, -1), x], 1) + sd["visual.positional_embedding"]
    x = _open_clip_resblocks(sd, "visual.transformer.resblocks.", _ln(sd, "visual.ln_pre", x))
    return _ln(sd, "visual.ln_post", x[:, 0]) @ sd["visual.proj"]


@torch.no_grad()
def _open_clip_text_features(sd, ids):
    x = sd["token_embedding.weight"][ids] + sd["positional_embedding"]
    x = _ln(sd, "ln_final", _open_clip_resblocks(sd, "transformer.resblocks.", x, mask=sd["attn_mask"]))
    return x[torch.arange(len(ids)), ids.argmax(-1)] @ sd["text_projection"]  # the end token has the top id


def test_open_clip_names_map_as_the_official_definition_names_them():
    from core.scorers.hps import open_clip_to_transformers

    expected = {  # official name -> transformers CLIPModel name, each written out by hand
        "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
        "visual.class_embedding": "vision_model.embeddings.class_embedding",
        "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
        "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
        "visual.ln_post.bias": "vision_model.post_layernorm.bias",
        "visual.transformer.resblocks.1.ln_1.weight": "vision_model.encoder.layers.1.layer_norm1.weight",
        "visual.transformer.resblocks.0.ln_2.bias": "vision_model.encoder.layers.0.layer_norm2.bias",
        "visual.transformer.resblocks.0.attn.out_proj.weight": "vision_model.encoder.layers.0.self_attn.out_proj.weight",
        "transformer.resblocks.0.mlp.c_fc.weight": "text_model.encoder.layers.0.mlp.fc1.weight",
        "transformer.resblocks.1.mlp.c_proj.bias": "text_model.encoder.layers.1.mlp.fc2.bias",
        "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
        "positional_embedding": "text_model.embeddings.position_embedding.weight",
        "ln_final.weight": "text_model.final_layer_norm.weight",
        "logit_scale": "logit_scale",
    }
    for official, name in expected.items():
        value = torch.randn(3, 2)
        converted = open_clip_to_transformers({official: value})
        assert list(converted) == [name] and torch.equal(converted[name], value), official
    q, k, v = torch.randn(3, 4, 4).unbind()
    converted = open_clip_to_transformers({"transformer.resblocks.0.attn.in_proj_weight": torch.cat([q, k, v])})
    for part, value in zip(("q_proj", "k_proj", "v_proj"), (q, k, v)):
        assert torch.equal(converted[f"text_model.encoder.layers.0.self_attn.{part}.weight"], value)
    p = torch.randn(4, 2)  # open_clip applies x @ P, a transformers Linear x @ Wᵀ
    assert torch.equal(open_clip_to_transformers({"visual.proj": p})["visual_projection.weight"], p.T)
    assert open_clip_to_transformers({"attn_mask": torch.zeros(2, 2)}) == {}  # a buffer, rebuilt
    with pytest.raises(KeyError, match="unknown open_clip key"):
        open_clip_to_transformers({"visual.attnpool.weight": torch.zeros(1)})


def _open_clip_folder(folder, official):
    from core.tiny_tokenizer import tiny_clip_tokenizer

    folder.mkdir()
    torch.save({"state_dict": official}, folder / "HPS_v2_compressed.pt")
    _tiny_clip_config().save_pretrained(folder)  # config.json only
    tiny_clip_tokenizer().save_pretrained(folder)
    return folder


def test_an_open_clip_checkpoint_scores_what_open_clip_computes(tmp_path, sample_photos):
    from core.scorers import get_scorer
    from core.scorers.hps import load_clip
    from core.scorers.pixels import clip_pixels
    from core.tiny_tokenizer import tiny_clip_tokenizer, vocabulary

    official = _official_open_clip(len(vocabulary()[0]))
    folder = _open_clip_folder(tmp_path / "hps-official", official)
    images = [Image.open(p).convert("RGB") for p in sample_photos[:2]]
    pixels = clip_pixels(images, CLIP_IMAGE)
    ids = tiny_clip_tokenizer()(PROMPTS, padding="max_length", max_length=CONTEXT, return_tensors="pt").input_ids
    img, txt = _open_clip_image_features(official, pixels), _open_clip_text_features(official, ids)

    model = load_clip(folder)
    with torch.no_grad():
        assert torch.allclose(embedding_of(model.get_image_features(pixel_values=pixels)), img, atol=1e-5)
        assert torch.allclose(embedding_of(model.get_text_features(input_ids=ids)), txt, atol=1e-5)
    scores = get_scorer("hps", model=str(folder)).score(images, PROMPTS)
    assert scores == pytest.approx(F.cosine_similarity(img, txt).tolist(), abs=1e-5)
    assert scores[0] != scores[1]


def embedding_of(out):
    return out if isinstance(out, torch.Tensor) else out.pooler_output


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


def _official_blip_vision(config, seed: int = 0) -> dict:
    """Random tensors under BLIP vit.py's names and shapes (the official ImageReward.pt's
    ``blip.visual_encoder.*``)."""
    gen = torch.Generator().manual_seed(seed)
    w, m, p = config.hidden_size, config.intermediate_size, config.patch_size
    grid = config.image_size // p
    sd = {"cls_token": _random(gen, 1, 1, w, scale=0.5), "pos_embed": _random(gen, 1, grid * grid + 1, w, scale=0.5),
          "patch_embed.proj.weight": _random(gen, w, 3, p, p, scale=0.1), "patch_embed.proj.bias": _random(gen, w),
          "norm.weight": _random(gen, w, base=1.0, scale=0.3), "norm.bias": _random(gen, w)}
    sd.update(_resblock_tensors(gen, "blocks.", w, m, {"norms": ("norm1", "norm2"), "linears": lambda w, m: {
        "attn.qkv.weight": (3 * w, w), "attn.qkv.bias": (3 * w,), "attn.proj.weight": (w, w), "attn.proj.bias": (w,),
        "mlp.fc1.weight": (m, w), "mlp.fc1.bias": (m,), "mlp.fc2.weight": (w, m), "mlp.fc2.bias": (w,)}}))
    return {"blip.visual_encoder." + k: v for k, v in sd.items()}


@torch.no_grad()
def _blip_vision_states(sd, config, pixels):
    """BLIP's VisionTransformer.forward on the official names: every token, after the last norm."""
    sd = {k[len("blip.visual_encoder."):]: v for k, v in sd.items()}
    eps, heads = config.layer_norm_eps, config.num_attention_heads
    x = F.conv2d(pixels, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=config.patch_size)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([sd["cls_token"].expand(x.shape[0], -1, -1), x], 1) + sd["pos_embed"]
    b, n, w = x.shape
    for i in range(CLIP_LAYERS):
        p = f"blocks.{i}."
        qkv = F.linear(_ln(sd, p + "norm1", x, eps), sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"])
        q, k, v = qkv.reshape(b, n, 3, heads, w // heads).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-2, -1) * (w // heads) ** -0.5, dim=-1) @ v
        x = x + F.linear(a.transpose(1, 2).reshape(b, n, w), sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
        h = F.gelu(F.linear(_ln(sd, p + "norm2", x, eps), sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"]))
        x = x + F.linear(h, sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
    return _ln(sd, "norm", x, eps)


def test_imagereward_names_map_as_the_official_checkpoint_names_them(reward_model_and_folder):
    from core.scorers.image_reward import official_to_pack

    model, _ = reward_model_and_folder
    expected = {  # official name -> this pack's, each written out by hand
        "blip.visual_encoder.cls_token": "vision.embeddings.class_embedding",
        "blip.visual_encoder.pos_embed": "vision.embeddings.position_embedding",
        "blip.visual_encoder.patch_embed.proj.weight": "vision.embeddings.patch_embedding.weight",
        "blip.visual_encoder.norm.bias": "vision.post_layernorm.bias",
        "blip.visual_encoder.blocks.1.norm1.weight": "vision.encoder.layers.1.layer_norm1.weight",
        "blip.visual_encoder.blocks.0.norm2.bias": "vision.encoder.layers.0.layer_norm2.bias",
        "blip.visual_encoder.blocks.0.attn.qkv.weight": "vision.encoder.layers.0.self_attn.qkv.weight",
        "blip.visual_encoder.blocks.1.attn.proj.bias": "vision.encoder.layers.1.self_attn.projection.bias",
        "blip.visual_encoder.blocks.1.mlp.fc2.weight": "vision.encoder.layers.1.mlp.fc2.weight",
        "blip.text_encoder.embeddings.word_embeddings.weight": "text.embeddings.word_embeddings.weight",
        "blip.text_encoder.encoder.layer.1.crossattention.self.key.weight":
            "text.encoder.layer.1.crossattention.self.key.weight",
        "blip.text_encoder.encoder.layer.0.output.LayerNorm.bias": "text.encoder.layer.0.output.LayerNorm.bias",
        "mlp.layers.0.weight": "head.layers.0.weight",  # Linear(768, 1024)
        "mlp.layers.6.bias": "head.layers.6.bias",  # Linear(64, 16), after three dropouts
        "mlp.layers.7.weight": "head.layers.7.weight",  # Linear(16, 1)
    }
    names = set(model.state_dict())
    for official, name in expected.items():
        value = torch.randn(2)
        assert official_to_pack({official: value}) == {name: value}, official
        assert name in names, name  # the pack's model really has it
    assert official_to_pack({"blip.text_proj.weight": torch.zeros(1), "blip.vision_proj.bias": torch.zeros(1)}) == {}
    with pytest.raises(KeyError, match="unknown ImageReward vision key"):
        official_to_pack({"blip.visual_encoder.blocks.0.ls1.gamma": torch.zeros(1)})


def test_an_official_imagereward_checkpoint_scores_what_blip_computes(reward_model_and_folder, tmp_path,
                                                                     sample_photos):
    from transformers import BertTokenizer

    from core.scorers import get_scorer
    from core.scorers.image_reward import MAX_TOKENS, MEAN, STD
    from core.scorers.pixels import clip_pixels

    model, folder = reward_model_and_folder
    vision = model.config.vision_config
    official = _official_blip_vision(vision)
    # the text encoder and the head keep their names under a prefix (checked name by name above)
    official.update({"blip.text_encoder." + k[5:]: v for k, v in model.state_dict().items() if k.startswith("text.")})
    official.update({"mlp." + k[5:]: v for k, v in model.state_dict().items() if k.startswith("head.")})
    target = tmp_path / "ir-official"
    target.mkdir()
    torch.save({"state_dict": official}, target / "ImageReward.pt")
    for name in ("config.json", "vocab.txt"):
        (target / name).write_bytes((folder / name).read_bytes())

    images = [Image.open(p).convert("RGB") for p in sample_photos[:2]]
    image = _blip_vision_states(official, vision, clip_pixels(images, vision.image_size))
    tokens = BertTokenizer(str(folder / "vocab.txt"))(PROMPTS, padding="max_length", truncation=True,
                                                      max_length=MAX_TOKENS, return_tensors="pt")
    with torch.no_grad():
        text = model.text(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                          encoder_hidden_states=image).last_hidden_state
        expected = ((model.head(text[:, 0]).squeeze(-1) - MEAN) / STD).tolist()
    scores = get_scorer("imagereward", model=str(target)).score(images, PROMPTS)
    assert scores == pytest.approx(expected, abs=1e-5) and scores[0] != scores[1]


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
    _, ir_folder = reward_model_and_folder
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS))
    result = run_trainers("build-pairs", "--base", "tiny-sd15", "--prompts", tmp_path / "prompts.txt", "--n", 2,
                          "--steps", 2, "--size", 64, "--output", tmp_path, "--scorer", "anatomy:1,hps:5,imagereward:1",
                          "--scorer-model", f"hps={hps_folder}", "--scorer-model", f"imagereward={ir_folder}")
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
