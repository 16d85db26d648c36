"""Add the image-input metadata the MediaPipe Tasks API needs to a bare tflite model.

The Tasks PoseLandmarker reads how to normalize its input from the model's TFLite metadata and
refuses a float model without it. mediapipe 0.10.21's legacy pose pair carries none, and the
metadata writer of mediapipe >= 0.10.30 does not import (it needs a compiled module those wheels
lack). This writes the few tables needed itself, with the flatbuffer classes generated from the
TFLite and metadata schemas that every mediapipe ships (pure Python), so the pose bundle builds
beside any mediapipe. Output is deterministic: the same model gives the same bytes.
"""
from __future__ import annotations

import numpy as np

METADATA_NAME = b"TFLITE_METADATA"  # the model's metadata entry the Tasks API looks up
METADATA_IDENTIFIER = b"M001"
MODEL_IDENTIFIER = b"TFL3"
# The oldest metadata parser that reads image properties and normalization options.
MIN_PARSER_VERSION = b"1.0.0"


def _schemas():
    from mediapipe.tasks.metadata import metadata_schema_py_generated as meta_fb
    from mediapipe.tasks.metadata import schema_py_generated as model_fb

    return meta_fb, model_fb


def _packed(table, identifier: bytes) -> bytes:
    import flatbuffers

    builder = flatbuffers.Builder(1024)
    builder.Finish(table.Pack(builder), file_identifier=identifier)
    return bytes(builder.Output())


def _image_input(meta_fb, mean: float, std: float):
    image = meta_fb.ImagePropertiesT()
    image.colorSpace = meta_fb.ColorSpaceType.RGB
    content = meta_fb.ContentT()
    content.contentPropertiesType = meta_fb.ContentProperties.ImageProperties
    content.contentProperties = image
    normalization = meta_fb.NormalizationOptionsT()
    normalization.mean, normalization.std = [float(mean)], [float(std)]
    unit = meta_fb.ProcessUnitT()
    unit.optionsType = meta_fb.ProcessUnitOptions.NormalizationOptions
    unit.options = normalization
    stats = meta_fb.StatsT()  # the range of the normalized pixels, 0..255 mapped
    stats.min, stats.max = [(0.0 - mean) / std], [(255.0 - mean) / std]
    tensor = meta_fb.TensorMetadataT()
    tensor.name, tensor.description = b"image", b"Input image to be processed."
    tensor.content, tensor.processUnits, tensor.stats = content, [unit], stats
    return tensor


def _feature_output(meta_fb, name: bytes):
    content = meta_fb.ContentT()
    content.contentPropertiesType = meta_fb.ContentProperties.FeatureProperties
    content.contentProperties = meta_fb.FeaturePropertiesT()
    tensor = meta_fb.TensorMetadataT()
    tensor.name, tensor.content, tensor.stats = name, content, meta_fb.StatsT()
    return tensor


def with_image_metadata(model: bytes, *, name: str, mean: float, std: float) -> bytes:
    """``model`` (a tflite flatbuffer with one image input) with metadata saying its input is an
    RGB image normalized as ``(pixel - mean) / std`` and its outputs are plain features. An
    existing metadata entry is replaced."""
    meta_fb, model_fb = _schemas()
    if not model_fb.Model.ModelBufferHasIdentifier(model, 0):
        raise ValueError("not a tflite model (no TFL3 identifier)")
    tree = model_fb.ModelT.InitFromObj(model_fb.Model.GetRootAsModel(model, 0))
    graph = tree.subgraphs[0]
    if len(graph.inputs) != 1:
        raise ValueError(f"expected one image input, the model has {len(graph.inputs)}")
    subgraph = meta_fb.SubGraphMetadataT()
    subgraph.inputTensorMetadata = [_image_input(meta_fb, mean, std)]
    subgraph.outputTensorMetadata = [_feature_output(meta_fb, graph.tensors[i].name) for i in graph.outputs]
    metadata = meta_fb.ModelMetadataT()
    metadata.name, metadata.minParserVersion = name.encode(), MIN_PARSER_VERSION
    metadata.subgraphMetadata = [subgraph]

    buffer = model_fb.BufferT()
    buffer.data = np.frombuffer(_packed(metadata, METADATA_IDENTIFIER), np.uint8)
    tree.metadata = [m for m in (tree.metadata or []) if m.name != METADATA_NAME]
    tree.buffers.append(buffer)
    entry = model_fb.MetadataT()
    entry.name, entry.buffer = METADATA_NAME, len(tree.buffers) - 1
    tree.metadata.append(entry)
    return _packed(tree, MODEL_IDENTIFIER)


def read_image_normalization(model: bytes) -> tuple[float, float] | None:
    """The (mean, std) of the model's first input from its metadata, or None without any."""
    meta_fb, model_fb = _schemas()
    root = model_fb.Model.GetRootAsModel(model, 0)
    for i in range(root.MetadataLength()):
        entry = root.Metadata(i)
        if entry.Name() == METADATA_NAME:
            data = root.Buffers(entry.Buffer()).DataAsNumpy().tobytes()
            meta = meta_fb.ModelMetadataT.InitFromObj(meta_fb.ModelMetadata.GetRootAsModelMetadata(data, 0))
            options = meta.subgraphMetadata[0].inputTensorMetadata[0].processUnits[0].options
            return float(options.mean[0]), float(options.std[0])
    return None
