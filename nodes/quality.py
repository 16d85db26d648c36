"""The "Hand/Face Quality" node: FairHuman's Face Confi. / Hand Confi. of an image batch, so two
graphs (a base and a LoRA, two strengths) can be compared side by side in ComfyUI."""
from __future__ import annotations

from ..core.metrics import confidence_metrics
from .masks_preview import (MODELS_KIND, folder_paths,  # importing it registers models/mediapipe
                            min_confidence_input, tiles_input)
from .node_api import io


def report_table(report) -> str:
    """Per-image rows and the means, as a plain-text table."""
    def num(value):
        return "  n/a " if value is None else f"{value:.4f}"

    lines = ["image | faces | Face Confi. | hands | Hand Confi."]
    for row in report.per_image:
        face = sum(row.face_scores) / len(row.face_scores) if row.face_scores else None
        hand = sum(row.hand_scores) / len(row.hand_scores) if row.hand_scores else None
        lines.append(f"{row.image:>5} | {len(row.face_scores):>5} | {num(face):>11} | {len(row.hand_scores):>5} | "
                     f"{num(hand):>11}")
    lines.append(f"mean  | {report.faces:>5} | {num(report.face_confidence):>11} | {report.hands:>5} | "
                 f"{num(report.hand_confidence):>11}")
    lines.append(f"faces found in {report.face_detection_rate:.0%} and hands in {report.hand_detection_rate:.0%} "
                 f"of {report.images} images")
    return "\n".join(lines)


class HandFaceQuality(io.ComfyNode):
    """Scores how confidently faces and hands are detected in generated images."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FairHumanQuality", display_name="Hand/Face Quality", category="FairHuman", inputs=[
                io.Image.Input("images",
                               tooltip="Generated images to score (a batch: one row each, and the means)."),
                min_confidence_input("Minimum detection confidence for a face or hand to count."),
                tiles_input(False, "Also detect on tiles (counts small faces and hands). Off: one whole-image pass, "
                                   "as in the FairHuman paper's evaluation."),
            ],
            outputs=[
                io.String.Output(display_name="report", tooltip="Per-image faces/hands found and their mean "
                                                                "confidences, then the batch means and detection "
                                                                "rates."),
                io.Float.Output(display_name="face_confidence", tooltip="Face Confi.: mean face-detection score over "
                                                                        "the faces found (0 when none was found)."),
                io.Float.Output(display_name="hand_confidence", tooltip="Hand Confi.: mean handedness confidence over "
                                                                        "the hands found (0 when none was found)."),
                io.Float.Output(display_name="face_detection_rate",
                                tooltip="Share of images in which at least one face was found."),
                io.Float.Output(display_name="hand_detection_rate",
                                tooltip="Share of images in which at least one hand was found."),
            ],
            description="FairHuman's Face Confi. and Hand Confi. (mediapipe) of an image batch, with detection rates: "
                        "compare a base model and a LoRA on the same prompts and seeds. Each image is scored on its "
                        "own.")

    @classmethod
    def execute(cls, images, min_confidence, tiles):
        import comfy.utils

        from ..core.masks import as_rgb_array

        bar = comfy.utils.ProgressBar(images.shape[0])  # its update is also where an interrupt lands
        arrays = [as_rgb_array(frame.cpu().float().numpy()) for frame in images]
        report = confidence_metrics(arrays, names=[str(i) for i in range(len(arrays))],
                                    min_confidence=min_confidence, tiles=tiles,
                                    models_dir=list(folder_paths.get_folder_paths(MODELS_KIND)) or None,
                                    progress=lambda done: bar.update_absolute(done, len(arrays)))
        return io.NodeOutput(report_table(report), float(report.face_confidence or 0.0),
                             float(report.hand_confidence or 0.0), float(report.face_detection_rate),
                             float(report.hand_detection_rate))


NODES = [HandFaceQuality]
