"""Fair DPO: regional Diffusion-DPO losses (hand-computed), the fair combination of their
gradients, masks for pairs, and a short run on build-pairs output whose regional margins rise."""
import dataclasses
import json
import math
import shutil

import pytest
import torch
from PIL import Image

from core.dpo import diffusion_dpo_loss, per_sample_error, regional_dpo_losses
from fixtures_pairs import ONE_THREAD, PROMPTS
from train_helpers import assert_killed_run_resumes_exactly, make_pairs_folder, run_trainers


def f(x: float) -> float:
    """−log σ(x)"""
    return math.log1p(math.exp(-x))


def test_regional_dpo_losses_equal_hand_computed_values():
    # 2 pairs, 1 channel, 2x2 latents, target 0: an image's error map is its prediction squared.
    # order: winner 1, winner 2, loser 1, loser 2
    pred = torch.tensor([[[1., 2.], [3., 4.]], [[1., 1.], [1., 1.]],
                         [[0., 1.], [1., 0.]], [[0., 0.], [0., 0.]]])[:, None]
    ref = torch.tensor([[[1., 1.], [1., 1.]], [[0., 0.], [0., 0.]],
                        [[2., 0.], [0., 2.]], [[0., 0.], [0., 0.]]])[:, None]
    face = torch.tensor([[[1., 0.], [0., 0.]], [[0., 0.], [0., 0.]],  # pair 2: no face anywhere
                         [[1., 1.], [0., 0.]], [[0., 0.], [0., 0.]]])
    hand = torch.tensor([[[0., 0.], [0., 0.]], [[0., 0.], [0., 1.]],  # pair 1: no hand anywhere
                         [[0., 0.], [0., 0.]], [[0., 0.], [0., 0.]]])  # pair 2: in the winner only
    beta = 0.1
    losses, active, metrics = regional_dpo_losses(pred, ref, torch.zeros_like(pred),
                                                  torch.stack([face, hand], dim=1), beta)
    # global, pair 1: e(w) = (1+4+9+16)/4 = 7.5, e(l) = 2/4, ref 1 and 8/4: Δ = 7 + 1 = 8 → −β/2·Δ = −0.4
    #         pair 2: e(w) = 1, e(l) = 0, ref 0 and 0: Δ = 1 → −0.05
    # face,   pair 1: e(w) = 1 (its one cell), e(l) = (0+1)/2, ref 1 and (4+0)/2: Δ = 0.5 + 1 = 1.5 → −0.075
    # hand,   pair 2: e(w) = 1 (bottom-right), the loser has no hand (0), ref 0: Δ = 1 → −0.05
    expected = [(f(-0.4) + f(-0.05)) / 2, f(-0.075), f(-0.05)]
    assert losses.tolist() == pytest.approx(expected, rel=1e-6)
    assert active.tolist() == [True, True, True]
    assert [float(m["pairs"]) for m in metrics] == [2, 1, 1]
    assert [float(m["reward_margin"]) for m in metrics] == pytest.approx([-0.225, -0.075, -0.05], rel=1e-6)

    # no hand in the batch: the hand objective is inactive and exactly 0, with no gradient
    pred = pred.clone().requires_grad_(True)
    losses, active, _ = regional_dpo_losses(pred, ref, torch.zeros_like(pred),
                                            torch.stack([face, torch.zeros_like(hand)], dim=1), beta)
    assert active.tolist() == [True, True, False] and float(losses[2].detach()) == 0.0
    (grad,) = torch.autograd.grad(losses[2], pred)
    assert float(grad.abs().sum()) == 0.0
    # an image without the region beside one with it: finite gradients at the paper's β
    losses, _, _ = regional_dpo_losses(pred, ref, torch.zeros_like(pred), torch.stack([face, hand], dim=1), 2500.0)
    (grad,) = torch.autograd.grad(losses.sum(), pred)
    assert bool(torch.isfinite(grad).all())


def test_with_full_masks_all_three_are_the_plain_dpo_loss_and_log2_at_init():
    g = torch.Generator().manual_seed(0)
    pred, ref, target = (torch.randn(6, 4, 8, 8, generator=g) for _ in range(3))
    full = torch.ones(6, 2, 8, 8)
    losses, active, _ = regional_dpo_losses(pred, ref, target, full, beta=2500.0)
    err, ref_err = per_sample_error(pred, target), per_sample_error(ref, target)
    plain, _ = diffusion_dpo_loss(err[:3], err[3:], ref_err[:3], ref_err[3:], 2500.0)
    assert losses.tolist() == pytest.approx([float(plain)] * 3, rel=1e-5)
    # the tuned model is the reference (LoRA B = 0 at the start): Δ = 0, every loss log 2
    part = torch.zeros(6, 2, 8, 8)
    part[:, 0, :4] = 1
    part[0, 1, 5:, 5:] = 1
    losses, active, _ = regional_dpo_losses(ref, ref, target, part, beta=2500.0)
    assert losses.tolist() == pytest.approx([math.log(2)] * 3, rel=1e-7) and bool(active.all())


def test_mpd_pushes_hardest_on_the_objective_with_the_smallest_gradient():
    """Why the statistic-matching loss is not a fourth objective: under MPD (α = 2) an
    objective's contribution to the update grows as its gradient shrinks, as a satisfied
    constraint's does (its gradient is exactly 0 at the start)."""
    from core.weighting import mpd_weights

    contributions = []
    for c in (1.0, 1e-2, 1e-4):  # orthogonal gradients of norms 1, 1 and c
        w = mpd_weights(torch.diag(torch.tensor([1.0, 1.0, c * c], dtype=torch.float64)))
        contributions.append(float(w[2]) * c)  # |w_3 g_3|
    assert contributions[0] < contributions[1] < contributions[2]
    assert contributions[2] / contributions[0] == pytest.approx(1e-4 ** (-1 / 3), rel=1e-3)


# ---- the method on the tiny SD1.5 -------------------------------------------------------------
@pytest.fixture
def fair_method(tmp_path, tiny_sd15):
    import copy

    from trainers.config import TrainConfig
    from trainers.methods.fair_dpo import FairDPO
    from trainers.model import TrainableModel

    folder = make_pairs_folder(tmp_path / "pairs")
    cfg = TrainConfig(method="fair-dpo", base="tiny-sd15", data=str(folder), output=str(tmp_path / "run"),
                      steps=1, resolution=64, batch_size=2, rank=4, eval_pairs=0)
    model = TrainableModel(copy.deepcopy(tiny_sd15), rank=4)
    with torch.no_grad():  # a LoRA away from the reference: the three gradients differ in A and B
        g = torch.Generator().manual_seed(1)
        for name, p in model.trainable.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return FairDPO(cfg, model)


def test_combined_update_is_the_weighted_sum_of_the_three_regional_gradients(fair_method):
    from trainers.loop import Distributed, StepGradients, step_generator
    from trainers.methods.hg_dpo import HGDPO

    method, model = fair_method, fair_method.model
    params = model.trainable.parameters()
    batch = method.batch(0, 0)
    assert batch["masks"].shape == (2, 2, 2, 64, 64)  # pairs, winner/loser, face/hand, pixels

    out = method.losses(batch, step_generator(0, 0))
    assert out.active.tolist() == [True, True, True]
    grads = [torch.cat([g.flatten() for g in torch.autograd.grad(out.losses[i], params, retain_graph=True)])
             for i in range(3)]

    combiner = StepGradients(method, params, method.cfg, Distributed())
    combiner.backward(method.losses(batch, step_generator(0, 0)), 1.0)
    weights = combiner.finish(step_generator(0, 0, 1))
    update = torch.cat([p.grad.flatten() for p in params])
    assert bool((weights > 0).all())
    expected = sum(w * g for w, g in zip(weights, grads))
    assert torch.allclose(update, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))

    # not the plain DPO gradient (HG-DPO's dpo + λ·stat, which the global objective equals)
    hg = HGDPO(dataclasses.replace(method.cfg, method="hg-dpo"), model).losses(batch, step_generator(0, 0))
    assert float(out.losses[0]) == pytest.approx(float(hg.losses[0] + method.cfg.lambda_stat * hg.losses[1]),
                                                 rel=1e-5)
    plain = grads[0]
    cosine = float(update @ plain / (update.norm() * plain.norm()))
    assert cosine < 0.99, cosine
    assert float(grads[1] @ grads[2] / (grads[1].norm() * grads[2].norm())) < 0.99  # face and hand differ


def test_step_metrics_name_each_region(fair_method):
    from trainers.loop import step_generator

    out = fair_method.losses(fair_method.batch(0, 0), step_generator(0, 0))
    keys = {"dpo_loss", "stat_loss", "reward_margin", "accuracy"}
    keys |= {f"{r}_{m}" for r in ("face", "hand") for m in ("loss", "margin", "accuracy", "pairs")}
    assert keys <= set(out.metrics)
    assert float(out.metrics["face_pairs"]) == 2 and float(out.metrics["hand_pairs"]) == 2
    assert float(out.metrics["face_loss"]) == pytest.approx(float(out.losses[1]))


def test_old_pairs_folder_is_annotated_on_first_use(tmp_path, sample_photos):
    """A folder built before build-pairs stored masks: its kept images are detected and their
    masks written once; a deleted mask is made again."""
    from trainers.build_pairs import annotate_pairs
    from trainers.methods.hg_dpo import pair_masks

    folder = tmp_path / "pairs"
    (folder / "images").mkdir(parents=True)
    photo = next(p for p in sample_photos if p.name == "sample2.jpg")
    shutil.copy(photo, folder / "images" / "w.jpg")
    Image.new("RGB", Image.open(photo).size, (90, 90, 90)).save(folder / "images" / "l.png")
    record = {"prompt": "people", "status": "ok", "winner": "images/w.jpg", "loser": "images/l.png"}
    (folder / "pairs.jsonl").write_text(json.dumps(record) + "\n")

    assert annotate_pairs(folder) == 1
    stored = json.loads((folder / "pairs.jsonl").read_text())
    entry = stored["masks"]["images/w.jpg"]
    assert entry["faces"] and entry["hands"] and entry["mask_face"] == "masks/w_face.png"
    masks = pair_masks(folder, stored, (64, 64))
    assert masks.shape == (2, 2, 64, 64)
    assert float(masks[0, 0].sum()) > 0 and float(masks[0, 1].sum()) > 0  # the photo's faces, hands
    assert float(masks[1].sum()) == 0  # a grey image has neither
    assert annotate_pairs(folder) == 0
    (folder / "masks" / "w_hand.png").unlink()
    assert annotate_pairs(folder) == 1 and (folder / "masks" / "w_hand.png").is_file()


# ---- end to end: build-pairs, then fair-dpo ---------------------------------------------------
@pytest.mark.slow
def test_build_pairs_stores_the_kept_images_masks(pairs_dir):
    rows = [json.loads(line) for line in (pairs_dir / "pairs.jsonl").read_text().splitlines()]
    assert len(rows) == len(PROMPTS) and all(r["status"] == "ok" for r in rows)
    for row in rows:
        assert set(row["masks"]) == {row["winner"], row["loser"]}
        for entry in row["masks"].values():
            assert entry["min_confidence"] == 0.1
            assert (pairs_dir / entry["mask_face"]).is_file() and (pairs_dir / entry["mask_hand"]).is_file()
    assert any(e["faces"] for r in rows for e in r["masks"].values())
    assert any(e["hands"] for r in rows for e in r["masks"].values())


@pytest.mark.slow
def test_fair_dpo_raises_the_regional_margins_from_zero(pairs_dir, tmp_path):
    from core.fileio import read_events
    from core.lora_format import read_lora_metadata

    run = tmp_path / "run"
    trained = run_trainers("train", "--method", "fair-dpo", "--base", "tiny-sd15", "--data", pairs_dir, "--output",
                           run, "--steps", 40, "--resolution", 64, "--batch-size", 8, "--lr", "1e-3", "--seed", 0,
                           "--checkpoint-every", 0, env=ONE_THREAD)
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-3000:]
    events = read_events(run / "events.jsonl")
    progress = [e for e in events if e["event"] == "progress"]
    assert progress[0]["losses"]["face"] == pytest.approx(math.log(2), abs=1e-4)  # LoRA B = 0: log 2
    assert len(progress[-1]["weights"]) == 3
    assert {"face_loss", "face_margin", "face_accuracy", "hand_margin", "hand_pairs"} <= set(progress[-1])
    evals = {e["step"]: e for e in events if e["event"] == "eval"}
    assert sorted(evals) == [0, 40]
    assert evals[0]["face_margin"] == 0.0 and evals[0]["hand_margin"] == 0.0  # the tuned model is the reference
    assert evals[0]["face_pairs"] == 8 and evals[0]["hand_pairs"] >= 1
    assert evals[40]["face_margin"] > 0 and evals[40]["hand_margin"] > 0, evals[40]
    meta = read_lora_metadata(run / "fairdpo_sd15.safetensors")
    assert meta["fairhuman.method"] == "fair-dpo" and meta["fairhuman.objectives"] == ["global", "face", "hand"]


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted(tmp_path):
    folder = make_pairs_folder(tmp_path / "pairs", pairs=3)
    common = ["--method", "fair-dpo", "--base", "tiny-sd15", "--data", folder, "--resolution", 64,
              "--batch-size", 2, "--lr", "1e-3", "--eval-pairs", 0, "--steps", 6, "--checkpoint-every", 2]
    assert_killed_run_resumes_exactly(common, tmp_path, kill_at=4)
