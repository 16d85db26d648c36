"""The Train nodes on ComfyUI's node API: Train FairHuman LoRA, Train FairHuman ControlNet, Train
HG-DPO LoRA. Their schema comes from the declarations (``train_inputs``, the job classes' OUTPUTS
and texts); what they do is ``train_lora``'s job classes. Here: ComfyUI's side of it — the inputs
as lists (so the image lists of ComfyUI's dataset nodes arrive whole), the node's progress text,
the loss plot shown on the node when it is done, and the checks ComfyUI runs before queueing.
"""
from __future__ import annotations

from .job_paths import InputRefused, sanitize_output_name
from .node_api import io, schema_inputs, schema_outputs, ui
from .train_inputs import GRAPH_DATA
from .train_lora import DEVICE, FairHumanTrainControlNet, FairHumanTrainLoRA, HGDPOTrainLoRA


def _model_files(folder: str) -> list:
    import folder_paths

    return folder_paths.get_filename_list(folder)


def _say(node_id):
    """The node's progress text (shown under its title), a line at a time."""
    def say(text: str) -> None:
        from server import PromptServer

        server = PromptServer.instance
        if node_id is not None and hasattr(server, "send_progress_text"):
            server.send_progress_text(text, node_id, server.client_id)

    return say


def _first(value):
    """One value of an input that arrives as a list (``is_input_list``): its first."""
    return value[0] if isinstance(value, list) and value else value


class _TrainNode(io.ComfyNode):
    JOB = FairHumanTrainLoRA  # the job class: inputs, outputs, texts, what the node does
    NODE_ID = ""

    @classmethod
    def define_schema(cls):
        job = cls.JOB
        return io.Schema(
            node_id=cls.NODE_ID, display_name=job.LABEL, category=job.CATEGORY, description=job.DESCRIPTION,
            inputs=schema_inputs(job.INPUTS, _model_files), outputs=schema_outputs(job.OUTPUTS),
            hidden=[io.Hidden.unique_id],
            is_output_node=True,  # it writes a file: runs even when nothing consumes its outputs
            is_input_list=True,  # every input a list: graph data whole, the others taken by _first
        )

    @classmethod
    def validate_inputs(cls, output_name=None, device=None):
        """Before the prompt is queued: what the widgets alone tell (a linked value is checked when
        the node runs)."""
        name, device = _first(output_name), _first(device)
        try:
            if isinstance(name, str):
                sanitize_output_name(name)
        except InputRefused as refused:
            return str(refused)
        if isinstance(device, str) and device.strip() and not DEVICE.match(device.strip()):
            return f"device {device!r}: use cpu, cuda or cuda:N, or leave it empty for ComfyUI's device"
        return True

    @classmethod
    def execute(cls, **inputs):
        values = {name: (value if name in GRAPH_DATA else _first(value)) for name, value in inputs.items()}
        outputs = cls.JOB(say=_say(cls.hidden.unique_id)).train(**values)
        # the loss plot on the node itself (a temp preview, as PreviewImage shows it)
        return io.NodeOutput(*outputs, ui=ui.PreviewImage(outputs[1], cls=cls))


class TrainFairHumanLoRA(_TrainNode):
    JOB, NODE_ID = FairHumanTrainLoRA, "FairHumanTrainLoRA"


class TrainFairHumanControlNet(_TrainNode):
    JOB, NODE_ID = FairHumanTrainControlNet, "FairHumanTrainControlNet"


class TrainHGDPOLoRA(_TrainNode):
    JOB, NODE_ID = HGDPOTrainLoRA, "HGDPOTrainLoRA"


NODES = [TrainFairHumanLoRA, TrainFairHumanControlNet, TrainHGDPOLoRA]
