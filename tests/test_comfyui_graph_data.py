"""Training data from the graph, in a real ComfyUI: images loaded by ComfyUI's own nodes (LoadImage
everywhere; on 0.33 its dataset nodes, whose image list arrives whole) and masks from a mask node
train through Train FairHuman LoRA to a LoRA that LoraLoader lists, and the job's dataset records
carry the given masks; mismatched counts and sizes are refused before anything is written."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = [pytest.mark.comfyui, pytest.mark.slow]

TRAIN = {"steps": 1, "resolution": 64, "rank": 4, "learning_rate": 1e-3, "mixed_precision": "auto", "seed": 0,
         "checkpoint_every": 0, "weighting": "mpd", "mode": "wait", "dataset": ""}
SIDE = 64


@pytest.fixture(scope="module")
def server(comfy_server, comfy_sd15_checkpoint, sample_photos):
    ckpt = comfy_server.add_model("checkpoints", comfy_sd15_checkpoint)
    folder = comfy_server.base_dir / "input" / "graph set"
    folder.mkdir(parents=True, exist_ok=True)
    for i, path in enumerate(sample_photos[:2]):
        Image.open(path).convert("RGB").resize((SIDE + 16 * i, SIDE)).save(folder / f"photo{i}.png")
        (folder / f"photo{i}.txt").write_text(f"caption {i}")
    shutil.copy(folder / "photo0.png", comfy_server.base_dir / "input" / "graph photo.png")
    Image.new("RGB", (32, 32)).save(comfy_server.base_dir / "input" / "small.png")
    return comfy_server, ckpt


def train(ckpt, name, **links):
    return {"class_type": "FairHumanTrainLoRA", "inputs": {"ckpt_name": ckpt, "output_name": name, **TRAIN, **links}}


def runs(server) -> Path:
    return server.base_dir / "output" / "fairhuman_runs"


def red(image: str) -> dict:
    """ComfyUI's ImageToMask: the red channel of an image as its mask (a mask of the image's size)."""
    return {"class_type": "ImageToMask", "inputs": {"image": [image, 0], "channel": "red"}}


def records(server, name) -> list[dict]:
    return [json.loads(line) for line in (runs(server) / name / "dataset" / "metadata.jsonl").open()]


def mask_of(record: dict, server, name) -> np.ndarray:
    return np.asarray(Image.open(runs(server) / name / "dataset" / record["mask_face"]))


@pytest.mark.parametrize("graph, expected", [
    ({"9": {"class_type": "ImageBatch", "inputs": {"image1": ["1", 0], "image2": ["1", 0]}},
      "images": ["9", 0], "face_masks": ["2", 0]}, "face_masks: 1 masks for 2 images"),
    ({"images": ["1", 0], "face_masks": ["4", 0]}, "face_masks: mask 0 is 32x32, its image is 64x64"),
    ({"face_masks": ["2", 0]}, "face_masks given without images"),
], ids=["count", "size", "no-images"])
def test_mismatched_graph_data_is_refused_and_nothing_is_written(server, graph, expected):
    server, ckpt = server
    links = {k: v for k, v in graph.items() if k in ("images", "face_masks")}
    extra = {k: v for k, v in graph.items() if k not in links}
    prompt = {"1": {"class_type": "LoadImage", "inputs": {"image": "graph photo.png"}}, "2": red("1"),
              "3": {"class_type": "LoadImage", "inputs": {"image": "small.png"}}, "4": red("3"),
              **extra, "5": train(ckpt, "refused graph", **links)}
    with pytest.raises(RuntimeError) as caught:
        server.run(prompt, timeout=300)
    assert expected in str(caught.value)
    assert not (runs(server) / "refused graph").exists()
    assert not (runs(server) / ".graph_data" / "refused graph").exists()


def _trains_to_a_listed_lora(server, ckpt, name, prompt, count):
    entry = server.run({**prompt, "8": {"class_type": "PreviewAny", "inputs": {"source": ["5", 0]}}}, timeout=1800)
    listed = entry["outputs"]["8"]["text"][0]
    assert listed.endswith(f"{name}.safetensors")
    loras = server.get("/object_info/LoraLoader")["LoraLoader"]["input"]["required"]["lora_name"]
    assert listed in (loras[0] if isinstance(loras[0], list) else loras[1]["options"])
    assert entry["outputs"]["5"]["images"], "no loss plot on the node"  # the node's own preview
    rows = records(server, name)
    assert len(rows) == count and all(r["status"] in ("ok", "no_people") for r in rows)
    return rows


@pytest.mark.heavy
def test_load_image_and_a_mask_node_train_and_the_records_carry_the_masks(server):
    server, ckpt = server
    prompt = {"1": {"class_type": "LoadImage", "inputs": {"image": "graph photo.png"}}, "2": red("1"),
              "5": train(ckpt, "graph lora", images=["1", 0], face_masks=["2", 0])}
    (row,) = _trains_to_a_listed_lora(server, ckpt, "graph lora", prompt, 1)
    photo = np.asarray(Image.open(server.base_dir / "input" / "graph photo.png").convert("RGB"))
    assert "user's face mask" in (row["reason"] or "")  # kept, not detected
    assert np.abs(mask_of(row, server, "graph lora").astype(int) - photo[..., 0]).max() <= 1
    assert row["mask_hand"] and "user's hand mask" not in (row["reason"] or "")  # hands: detected


@pytest.mark.heavy
def test_comfyuis_dataset_nodes_feed_the_train_node(server):
    server, ckpt = server
    if "LoadImageTextDataSetFromFolder" not in server.object_info():
        pytest.skip("this ComfyUI has no dataset nodes (0.33 and later)")
    prompt = {"1": {"class_type": "LoadImageTextDataSetFromFolder", "inputs": {"folder": "graph set"}},
              "2": red("1"),  # ComfyUI maps it over the list: one mask per image, each of its size
              "5": train(ckpt, "dataset lora", images=["1", 0], captions=["1", 1], face_masks=["2", 0])}
    rows = _trains_to_a_listed_lora(server, ckpt, "dataset lora", prompt, 2)
    assert sorted(r["text"] for r in rows) == ["caption 0", "caption 1"]
    assert sorted((r["width"], r["height"]) for r in rows) == [(SIDE, SIDE), (SIDE + 16, SIDE)]
    for row in rows:
        image = np.asarray(Image.open(runs(server) / "dataset lora" / "dataset" / row["image"]).convert("RGB"))
        assert np.abs(mask_of(row, server, "dataset lora").astype(int) - image[..., 0]).max() <= 1
