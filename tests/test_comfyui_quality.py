"""The "Hand/Face Quality" node in a real ComfyUI: the shipped workflow scores the sample photos."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from comfyui_harness import workflow_to_api
from core.masks import load_rgb
from core.metrics import confidence_metrics

pytestmark = [pytest.mark.comfyui, pytest.mark.slow]

WORKFLOW = Path(__file__).resolve().parents[1] / "workflows" / "hand_face_quality.json"


def test_node_is_described(comfy_server):
    info = comfy_server.object_info()["FairHumanQuality"]
    assert info["display_name"] == "Hand/Face Quality" and info["category"] == "FairHuman"
    assert info["output_name"] == ["report", "face_confidence", "hand_confidence", "face_detection_rate",
                                   "hand_detection_rate"]
    assert all(spec[1]["tooltip"] for spec in info["input"]["required"].values())


@pytest.mark.parametrize("name", ["sample2.jpg", "sample4.jpg"])
def test_shipped_workflow_scores_a_sample_photo_as_the_engine_does(comfy_server, sample_photos, name):
    # The photo as a lossless PNG: ComfyUI 0.33's LoadImage decodes JPEG with PyAV (ffmpeg), other
    # versions with PIL, and the two decoders' pixels differ enough to move a confidence by 0.01.
    # The point here is the node on the pixels it is given, so the engine gets the very same pixels.
    pixels = load_rgb(next(p for p in sample_photos if p.name == name))
    inputs = comfy_server.base_dir / "input"
    inputs.mkdir(exist_ok=True)
    name = Path(name).with_suffix(".png").name
    Image.fromarray(pixels).save(inputs / name)
    info = comfy_server.object_info()
    workflow = json.loads(WORKFLOW.read_text())
    prompt = workflow_to_api(workflow, info)
    load = next(k for k, v in prompt.items() if v["class_type"] == "LoadImage")
    prompt[load]["inputs"]["image"] = name
    entry = comfy_server.run(prompt)
    shown = {node: out["text"][0] for node, out in entry["outputs"].items() if "text" in out}
    report_text, face, hand = (shown[k] for k in sorted(shown, key=int))  # report, face, hand previews

    expected = confidence_metrics([pixels])  # the engine on the same pixels, one whole-image pass
    assert float(face) == pytest.approx(expected.face_confidence or 0.0, abs=1e-3)
    assert float(hand) == pytest.approx(expected.hand_confidence or 0.0, abs=1e-3)
    assert expected.faces >= 1
    rows = report_text.splitlines()
    assert rows[0].startswith("image | faces") and rows[1].split("|")[1].strip() == str(expected.faces)
    assert f"faces found in {expected.face_detection_rate:.0%}" in rows[-1]
