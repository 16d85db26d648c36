"""Where the pack follows the papers to the letter, checked by hand: HG-DPO trains at the pairs'
own size (SDXL's size conditioning from it), FairHuman's ``--local-scale 1`` is Eq. 2's masked
MSE, and the literal statistic loss is Eq. 8's squared norm of the channel-mean difference."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from train_helpers import make_region_dataset


def pairs_folder(folder, width, height, prompts=2):
    """A build-pairs output of random width × height winner/loser images (no generation)."""
    rng = np.random.default_rng(0)
    (folder / "images").mkdir(parents=True)
    rows = []
    for k in range(prompts):
        names = [f"images/{k}_{side}.png" for side in ("w", "l")]
        for name in names:
            Image.fromarray((rng.random((height, width, 3)) * 255).astype(np.uint8)).save(folder / name)
        rows.append({"prompt": f"a photo of a person {k}", "status": "ok", "winner": names[0], "loser": names[1],
                     "winner_score": 1.0, "loser_score": 0.0, "images": names, "scores": [1.0, 0.0]})
    (folder / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def _method(base, data, **options):
    from trainers.config import TrainConfig
    from trainers.methods import method_module
    from trainers.train_job import build_model

    name = options.pop("method", "hg-dpo")
    module = method_module(name)
    cfg = TrainConfig(**{**module.METHOD.defaults, "method": name, "base": base, "data": str(data),
                         "eval_pairs": 0, **options})
    return module.METHOD(cfg, build_model(cfg))


def _recording_predict(model):
    """Wrap ``model.predict`` to record the latent batch and the time ids of every call."""
    calls, predict = [], model.predict

    def record(noisy, t, cond, time_ids=None, *rest, **kw):
        calls.append((tuple(noisy.shape), None if time_ids is None else time_ids.clone()))
        return predict(noisy, t, cond, time_ids, *rest, **kw)

    model.predict = record
    return calls


def test_hgdpo_pairs_of_64_by_96_train_at_64_by_96(tmp_path):
    method = _method("tiny-sd15", pairs_folder(tmp_path / "pairs", 64, 96))
    batch = method.batch(0, 0)
    assert batch["winner"].shape == (1, 3, 96, 64) and batch["loser"].shape == (1, 3, 96, 64)
    calls = _recording_predict(method.model)
    out = method.losses(batch, torch.Generator().manual_seed(0))
    assert torch.isfinite(out.losses).all()
    # the reference's and the tuned model's forwards: winner and loser latents at 96 × 64 / 8
    assert [shape for shape, _ in calls] == [(2, 4, 12, 8), (2, 4, 12, 8)]
    # the fixed-probe evaluation measures the pairs at the same size
    calls.clear()
    method.cfg.eval_pairs = 1
    assert method.evaluate(probes=2)["pair_margin"] == pytest.approx(0.0, abs=1e-6)  # tuned = reference
    assert {shape for shape, _ in calls} == {(4, 4, 12, 8)}


def test_sdxl_pairs_keep_their_size_conditioning(tmp_path):
    method = _method("tiny-sdxl", pairs_folder(tmp_path / "pairs", 64, 96))
    calls = _recording_predict(method.model)
    method.losses(method.batch(0, 0), torch.Generator().manual_seed(0))
    for shape, time_ids in calls:
        assert shape == (2, 4, 12, 8)
        # original (h, w), crop top-left, target (h, w): the pair's real size, not --resolution
        assert time_ids.tolist() == [[96.0, 64.0, 0.0, 0.0, 96.0, 64.0]] * 2


def test_resolution_only_caps_the_training_size():
    from trainers.methods.hg_dpo import training_size

    assert training_size(64, 96, 1024) == (64, 96)  # small enough: its own size
    assert training_size(704, 1024, 1024) == (704, 1024)  # the paper's SD1.5 generation size
    assert training_size(1024, 1024, 1024) == (1024, 1024)  # SDXL's, no longer 512
    assert training_size(100, 70, 1024) == (96, 64)  # sides rounded down to the latent grid
    # above resolution² pixels: the nearest aspect bucket of about that area (multiples of 64)
    assert training_size(256, 384, 256) == (192, 320)
    assert training_size(2048, 2048, 1024) == (1024, 1024)


def test_an_sdxl_pair_above_the_cap_is_conditioned_on_its_real_size(tmp_path):
    method = _method("tiny-sdxl", pairs_folder(tmp_path / "pairs", 256, 384, prompts=1), resolution=256)
    batch = method.batch(0, 0)
    assert batch["winner"].shape == (1, 3, 320, 192)
    assert batch["time_ids"].tolist() == [[384.0, 256.0, 0.0, 0.0, 320.0, 192.0]]


def test_pairs_of_two_sizes_are_batched_by_size(tmp_path):
    folder = pairs_folder(tmp_path / "pairs", 64, 96, prompts=2)
    for side in ("w", "l"):  # the second pair: 96 × 64
        Image.fromarray(np.zeros((64, 96, 3), np.uint8)).save(folder / f"images/1_{side}.png")
    method = _method("tiny-sd15", folder, batch_size=2)
    shapes = {tuple(method.batch(step, 0)["winner"].shape) for step in range(4)}
    assert shapes == {(2, 3, 96, 64), (2, 3, 64, 96)}


def test_local_scale_1_is_eq_2s_masked_mse():
    from core.objectives import regional_losses

    # B = 1, C = 2, 2 × 2 latent; residual pred − target written out
    residual = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[0.0, 1.0], [-1.0, 2.0]]]])
    target = torch.full_like(residual, 0.5)
    face = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    hand = torch.tensor([[[[0.0, 1.0], [0.0, 0.0]]]])
    losses, active = regional_losses(target + residual, target, face, hand, local_scale=1.0)
    # global: (1 + 4 + 9 + 16 + 0 + 1 + 1 + 4) / 8; face: (1 + 16 + 0 + 4) / 8; hand: (4 + 1) / 8
    assert losses.tolist() == pytest.approx([36 / 8, 21 / 8, 5 / 8], rel=1e-6)
    assert active.tolist() == [True, True, True]
    release, _ = regional_losses(target + residual, target, face, hand, local_scale=5.0)
    assert release.tolist() == pytest.approx([36 / 8, 25 * 21 / 8, 25 * 5 / 8], rel=1e-6)


def test_local_scale_reaches_fairhumans_losses(tmp_path):
    data = make_region_dataset(tmp_path / "data", count=2, size=64)
    paper = _method("tiny-sd15", data, method="fairhuman", resolution=64, local_scale=1.0)
    release = _method("tiny-sd15", data, method="fairhuman", resolution=64, local_scale=5.0)
    a = paper.losses(paper.batch(0, 0), torch.Generator().manual_seed(0)).losses.detach()
    b = release.losses(release.batch(0, 0), torch.Generator().manual_seed(0)).losses.detach()
    assert float(a[1]) > 0 and float(a[2]) > 0
    assert b.tolist() == pytest.approx([float(a[0]), 25 * float(a[1]), 25 * float(a[2])], rel=1e-5)


def test_the_literal_statistic_loss_is_the_squared_norm_of_the_channel_mean_difference():
    from core.dpo import stat_matching_loss

    # B = 2, C = 4, two latent pixels per channel
    tuned = torch.tensor([[[[1.0, 3.0]], [[0.0, 0.0]], [[-1.0, 1.0]], [[2.0, 2.0]]],
                          [[[0.0, 0.0]], [[4.0, 0.0]], [[0.0, 0.0]], [[0.0, 0.0]]]])
    reference = torch.tensor([[[[1.0, 1.0]], [[1.0, -1.0]], [[0.0, 0.0]], [[0.0, 1.0]]],
                              [[[0.0, 0.0]], [[0.0, 0.0]], [[0.0, 0.0]], [[0.0, 0.0]]]])
    # channel means: sample 1 tuned (2, 0, 0, 2), reference (1, 0, 0, 0.5): difference (1, 0, 0, 1.5),
    # squared norm 1 + 2.25 = 3.25; sample 2 difference (0, 2, 0, 0), squared norm 4
    literal = stat_matching_loss(tuned, reference, reduction="squared-norm")
    assert float(literal) == pytest.approx((3.25 + 4.0) / 2, rel=1e-6)
    assert float(stat_matching_loss(tuned, reference, reduction="channel-mean")) == pytest.approx(
        (3.25 + 4.0) / 2 / 4, rel=1e-6)
    with pytest.raises(ValueError, match="unknown statistic-loss reduction"):
        stat_matching_loss(tuned, reference, reduction="sum")


def test_stat_reduction_reaches_hgdpos_loss(tmp_path):
    folder = pairs_folder(tmp_path / "pairs", 64, 64, prompts=1)
    mean = _method("tiny-sd15", folder, stat_reduction="channel-mean")
    norm = _method("tiny-sd15", folder, stat_reduction="squared-norm")
    with torch.no_grad():  # move the tuned model off the reference, so the loss is not 0
        for method in (mean, norm):
            for p in method.model.trainable.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    a = mean.losses(mean.batch(0, 0), torch.Generator().manual_seed(1)).losses.detach()
    b = norm.losses(norm.batch(0, 0), torch.Generator().manual_seed(1)).losses.detach()
    assert float(a[1]) > 0
    assert float(b[0]) == pytest.approx(float(a[0]), rel=1e-6)  # the DPO loss does not change
    assert float(b[1]) == pytest.approx(4 * float(a[1]), rel=1e-5)  # 4 latent channels
