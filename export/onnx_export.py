"""torch module -> ONNX file with the project's metadata, checked against torch on the spot."""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from monitor.errors import ParityError
from monitor.scoring.metadata import BackboneMetadata

log = logging.getLogger(__name__)

EXPORTER_VERSION = "1"
OPSET = 18
PARITY_RTOL = 1e-4
PRECISIONS = ("fp32", "fp16", "int8")
# Reduced precision cannot meet PARITY_RTOL; its check is the cosine similarity of each embedding
# to torch's float32 one, which is what KNN scoring on normalised embeddings sees. Thresholds
# measured on the built-in and random-weight exports (see benchmarks/precision.py).
MIN_COSINE = {"fp16": 0.999, "int8": 0.99}
# Above this many bytes of weights the graph keeps them in ``<file>.data`` (protobuf's limit is 2 GiB).
EXTERNAL_DATA_BYTES = 1_800_000_000
DATA_SUFFIX = ".data"
# Layers dynamic int8 quantisation rewrites (weights int8, activations quantised at run time): the
# linear layers that carry a transformer's weight. Convolutions stay float: onnxruntime's
# ConvInteger was measured slower than the float Conv on this CPU (M2D, MuQ) and cost aisfx's CNN
# accuracy (cosine 0.978 to float32); see benchmarks/precision.py.
QUANTIZED_OPS = ("MatMul", "Gemm")


def model_digest(module: torch.nn.Module, settings: str) -> str:
    """A stable id of weights + frontend settings (a bank is only valid for the same id)."""
    digest = hashlib.sha256(settings.encode())
    for key, tensor in sorted(module.state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def relative_error(reference: np.ndarray, candidate: np.ndarray) -> float:
    """max |a - b| / max |a|: one number that is meaningful whatever the embedding's scale."""
    scale = float(np.max(np.abs(reference))) or 1.0
    return float(np.max(np.abs(reference - candidate))) / scale


def export_backbone(
    module: torch.nn.Module,
    meta: BackboneMetadata,
    out_dir: Path,
    parity_batch: int = 2,
    precision: str = "fp32",
    external_data: bool | None = None,
) -> Path:
    """Export ``module`` (waveform [B, window] -> embedding [B, D]) to ``out_dir/<name>.onnx``.

    A module that also returns further [B, D_i] tensors names them in its ``extra_outputs``
    attribute (see ``output_names``): they become graph outputs after the embedding, from the
    same pass, and are checked against torch like it. The runtime finds them in the graph.

    The batch axis stays dynamic. The time axis is fixed to one window unless
    ``meta.min_seconds`` > 0 (the module accepts any length from there up to the window):
    transformers whose positional terms depend on length must keep it fixed. The file is
    written to a temporary name and renamed, so an interrupted export never leaves a truncated
    model where the daemon would load it. Raises ParityError if onnxruntime's output differs
    from torch's by more than ``PARITY_RTOL`` (relative to the output's scale).

    Weights over ``EXTERNAL_DATA_BYTES`` (or always, with ``external_data=True``) go to
    ``<file>.data`` beside the graph (protobuf cannot hold 2 GiB); see ``_install`` for how the
    pair replaces a previous export. ``precision`` "fp16" (for GPUs) or "int8" (dynamic
    quantisation, for CPUs) converts the exported graph and writes ``<name>-fp16.onnx`` /
    ``<name>-int8.onnx``, checked by cosine similarity against torch (``MIN_COSINE``).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    module = module.eval()
    settings = meta.frontend if precision == "fp32" else f"{meta.frontend}; precision {precision}"
    meta = replace(meta, model_id=model_digest(module, settings), exporter_version=EXPORTER_VERSION, precision=precision)
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / (f"{meta.name}.onnx" if precision == "fp32" else f"{meta.name}-{precision}.onnx")
    weight_bytes = sum(t.numel() * t.element_size() for t in module.state_dict().values())
    raw_external = bool(external_data) or weight_bytes > EXTERNAL_DATA_BYTES
    final_bytes = weight_bytes * {"fp32": 1.0, "fp16": 0.5, "int8": 0.3}[precision]
    final_external = external_data if external_data is not None else final_bytes > EXTERNAL_DATA_BYTES
    generator = torch.Generator().manual_seed(0)
    example = 0.1 * torch.randn(parity_batch, meta.window_samples, generator=generator)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        raw = Path(tmp) / "raw.onnx"
        torch.onnx.export(
            module,
            (example,),
            str(raw),
            dynamo=True,
            opset_version=OPSET,
            input_names=[meta.input_name],
            output_names=output_names(module, meta),
            dynamic_shapes={"waveform": _dynamic_axes(meta)},
            external_data=raw_external,
            verbose=False,
        )
        model = onnx.load(str(raw), load_external_data=False)
        staged = Path(tmp) / final.name
        if precision == "fp32":
            if raw_external:
                _relocate_external_data(model, raw.parent, staged.name + DATA_SUFFIX)
            _save(model, meta, staged, external=False)  # tensors already external (or inline)
        else:
            frontend = frontend_nodes(model, {name for name, _ in module.named_parameters()})
            if precision == "fp16":
                types = {v.name: v.type.tensor_type.elem_type
                         for v in onnx.shape_inference.infer_shapes(model).graph.value_info}
                onnx.load_external_data_for_model(model, str(raw.parent))
                model = _to_fp16(model, frontend, types)
                _save(model, meta, staged, external=final_external)
            else:
                skip = set(frontend)
                if not any(n.op_type in QUANTIZED_OPS and n.name not in skip for n in model.graph.node):
                    raise ValueError(f"{meta.name}: int8 has nothing to quantise (no {'/'.join(QUANTIZED_OPS)} "
                                     "layers with weights); export it as fp32")
                del model  # the quantiser reads the raw file itself: one copy of the weights less
                _quantize_int8(raw, frontend, meta, staged, final_external)
        model = None
        check = check_parity if precision == "fp32" else check_similarity
        session = ort.InferenceSession(str(staged), providers=["CPUExecutionProvider"])
        check(module, staged, meta, example, session)
        if meta.min_samples is not None:
            check(module, staged, meta, example[:, : meta.min_samples], session)
            check(module, staged, meta, example[:, : (meta.min_samples + meta.window_samples) // 2], session)
        del session
        _install(staged, final)
    log.info("exported %s to %s (model_id %s, %s)", meta.name, final, meta.model_id, precision)
    return final


def _save(model: onnx.ModelProto, meta: BackboneMetadata, path: Path, external: bool) -> None:
    """Stamp producer and ``asd.*`` metadata and write; ``external`` moves every tensor to
    ``<path>.data`` (tensors that are already external stay where they point)."""
    model.producer_name = "asd-export"
    model.producer_version = EXPORTER_VERSION
    del model.metadata_props[:]
    for key, value in sorted(meta.to_props().items()):
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + DATA_SUFFIX, size_threshold=1024)
    else:
        onnx.save_model(model, str(path))


def _all_tensors(graph: onnx.GraphProto):
    """Initializers and tensor attributes of ``graph`` and its subgraphs."""
    yield from graph.initializer
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            if attribute.HasField("g"):
                yield from _all_tensors(attribute.g)
            for sub in attribute.graphs:
                yield from _all_tensors(sub)


def _relocate_external_data(model: onnx.ModelProto, folder: Path, location: str) -> None:
    """Point every external tensor at ``folder/location`` and move the (single) data file there,
    without reading the weights into memory."""
    sources = set()
    for tensor in _all_tensors(model.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        for entry in tensor.external_data:
            if entry.key == "location":
                sources.add(entry.value)
                entry.value = location
    if len(sources) > 1:
        raise RuntimeError(f"exporter wrote weights to {len(sources)} files ({sorted(sources)}), expected one")
    for source in sources:
        os.replace(folder / source, folder / location)


def frontend_nodes(model: onnx.ModelProto, parameter_names: set[str]) -> list[str]:
    """Names of the nodes that do not depend on any learned parameter: the signal-processing
    frontend (framing, FFT, mel, log, its clamps and floors) and shape arithmetic.

    These stay float32 under fp16 and int8: a power spectrum exceeds fp16's range (65504) and a
    1e-10 floor underflows it, and a uint8-quantised mel product would crush the spectrum's
    dynamic range. The first layer with weights (a convolution, a BatchNorm) keeps its
    parameter's name in the exported graph, which is where the frontend ends.
    """
    learned = {init.name for init in model.graph.initializer if init.name in parameter_names}
    if not learned:
        return [node.name for node in model.graph.node]
    dependent: set[str] = set(learned)
    frontend = []
    for node in model.graph.node:  # ONNX graphs are topologically sorted
        if any(name in dependent for name in node.input):
            dependent.update(node.output)
        else:
            frontend.append(node.name)
    return frontend


def _to_fp16(model: onnx.ModelProto, frontend: list[str], types: dict[str, int]) -> onnx.ModelProto:
    """Half precision for every node outside ``frontend``, float32 at the graph's input and
    output and throughout the frontend.

    Written here rather than with onnxruntime's converter, whose ``node_block_list`` still
    passes the tensors *between* two kept-float nodes through float16 casts (a power spectrum
    of 1e6 becomes inf). ``types``: element type of every tensor (from shape inference).
    """
    from onnx import numpy_helper

    graph = model.graph
    keep = set(frontend)
    network = [n for n in graph.node if n.name not in keep]
    for node in network:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            raise ValueError(f"fp16: node {node.name} ({node.op_type}) has a subgraph, which is not supported")
    float_ = onnx.TensorProto.FLOAT
    half = onnx.TensorProto.FLOAT16
    network_outputs = {o for n in network for o in n.output}
    frontend_inputs = {i for n in graph.node if n.name in keep for i in n.input}
    initializers = {i.name: i for i in graph.initializer}
    # Weights only the network reads become float16; anything else float it reads gets a Cast.
    for name, tensor in initializers.items():
        if tensor.data_type == float_ and name not in frontend_inputs and any(name in n.input for n in network):
            converted = numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float16), name)
            tensor.CopyFrom(converted)
    casts: dict[str, str] = {}
    new_nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        if node.name in keep:
            new_nodes.append(node)
            continue
        for index, name in enumerate(node.input):
            if not name or name in network_outputs:
                continue
            is_float = (initializers[name].data_type == float_) if name in initializers else types.get(name) == float_
            if is_float:
                if name not in casts:
                    casts[name] = f"{name}__fp16"
                    new_nodes.append(onnx.helper.make_node("Cast", [name], [casts[name]], to=half, name=f"{name}__to_fp16"))
                node.input[index] = casts[name]
        _half_attributes(node)
        new_nodes.append(node)
    # The embedding goes out as float32.
    for output in graph.output:
        if output.name in network_outputs and output.type.tensor_type.elem_type == float_:
            inner = f"{output.name}__fp16"
            for node in new_nodes:
                node.output[:] = [inner if o == output.name else o for o in node.output]
                node.input[:] = [inner if i == output.name else i for i in node.input]
            new_nodes.append(onnx.helper.make_node("Cast", [inner], [output.name], to=float_, name=f"{output.name}__to_fp32"))
    del graph.node[:]
    graph.node.extend(new_nodes)
    kept = [v for v in graph.value_info if v.name not in network_outputs]
    del graph.value_info[:]
    graph.value_info.extend(kept)
    return model


def _half_attributes(node: onnx.NodeProto) -> None:
    """Constants and casts inside the half-precision part produce float16 instead of float32."""
    from onnx import numpy_helper

    for attribute in node.attribute:
        if node.op_type == "Cast" and attribute.name == "to" and attribute.i == onnx.TensorProto.FLOAT:
            attribute.i = onnx.TensorProto.FLOAT16
        elif attribute.type == onnx.AttributeProto.TENSOR and attribute.t.data_type == onnx.TensorProto.FLOAT:
            attribute.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(attribute.t).astype(np.float16),
                                                          attribute.t.name))
        elif node.op_type == "Constant" and attribute.name in ("value_float", "value_floats"):
            values = [attribute.f] if attribute.name == "value_float" else list(attribute.floats)
            array = np.array(values[0] if attribute.name == "value_float" else values, dtype=np.float16)
            attribute.CopyFrom(onnx.helper.make_attribute("value", numpy_helper.from_array(array)))


def _quantize_int8(source: Path, frontend: list[str], meta: BackboneMetadata, staged: Path, external: bool) -> None:
    """Dynamic quantisation (int8 weights, activations quantised per call) of the layers with
    weights: ``QUANTIZED_OPS`` outside the frontend."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantized = staged.with_name("q-" + staged.name)
    quantize_dynamic(source, quantized, op_types_to_quantize=list(QUANTIZED_OPS), weight_type=QuantType.QInt8,
                     nodes_to_exclude=frontend, use_external_data_format=external)
    _save(onnx.load(str(quantized)), meta, staged, external=external)


def _install(staged: Path, final: Path) -> None:
    """Move a staged model (and its ``.data``) to ``final``.

    A single file replaces the old one atomically. A graph with external data is a pair that no
    rename swaps at once, so the old graph is removed first, then the data and the graph are
    moved in: a reader meets the old pair, no model, or the new pair, never a graph pointing
    into the wrong weights. A stale ``.data`` of an earlier large export is removed.
    """
    data, final_data = Path(str(staged) + DATA_SUFFIX), Path(str(final) + DATA_SUFFIX)
    if data.exists():
        final.unlink(missing_ok=True)
        os.replace(data, final_data)
        os.replace(staged, final)
    else:
        os.replace(staged, final)
        final_data.unlink(missing_ok=True)


def _dynamic_axes(meta: BackboneMetadata) -> dict[int, torch.export.Dim]:
    axes = {0: torch.export.Dim("batch", min=1, max=1024)}
    if meta.min_samples is not None:
        axes[1] = torch.export.Dim("samples", min=meta.min_samples, max=meta.window_samples)
    return axes


def output_names(module: torch.nn.Module, meta: BackboneMetadata) -> list[str]:
    """The graph's outputs, in the order ``module`` returns them: the embedding
    (``meta.output_name``) first, then the names in the module's ``extra_outputs``, if any."""
    return [meta.output_name, *getattr(module, "extra_outputs", ())]


def check_parity(
    module: torch.nn.Module, path: Path, meta: BackboneMetadata, waveform: torch.Tensor,
    session: ort.InferenceSession | None = None,
) -> float:
    """Run torch and onnxruntime (CPU) on the same input; return the largest relative error
    over the graph's outputs."""
    errors = {name: relative_error(expected, got)
              for name, expected, got in _both_outputs(module, path, meta, waveform, session)}
    name = max(errors, key=errors.__getitem__)
    if not errors[name] < PARITY_RTOL:
        raise ParityError(f"{path}: output {name!r}: relative error {errors[name]:.2e} against torch exceeds "
                          f"{PARITY_RTOL:.0e}")
    log.info("parity %s: relative error %s", path.name, ", ".join(f"{n} {e:.2e}" for n, e in errors.items()))
    return errors[name]


def _both_outputs(
    module: torch.nn.Module, path: Path, meta: BackboneMetadata, waveform: torch.Tensor,
    session: ort.InferenceSession | None,
) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(output name, torch's, onnxruntime's (CPU)) for every graph output on the same input,
    shapes checked."""
    with torch.no_grad():
        returned = module(waveform)
    expected = [t.numpy() for t in (returned if isinstance(returned, tuple) else (returned,))]
    names = output_names(module, meta)
    session = session or ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(names, {meta.input_name: waveform.numpy()})
    for name, want, have in zip(names, expected, got):
        if have.shape != want.shape:
            raise ParityError(f"{path}: output {name!r} shape {have.shape} != torch {want.shape}")
    return list(zip(names, expected, got))


def cosine_similarity(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two [B, D] arrays."""
    dot = np.sum(reference * candidate, axis=1)
    norms = np.linalg.norm(reference, axis=1) * np.linalg.norm(candidate, axis=1)
    return dot / np.maximum(norms, 1e-30)


def check_similarity(
    module: torch.nn.Module, path: Path, meta: BackboneMetadata, waveform: torch.Tensor,
    session: ort.InferenceSession | None = None,
) -> float:
    """The reduced-precision check: every embedding's (of every graph output) cosine
    similarity to torch's float32 one at least ``MIN_COSINE[meta.precision]``; returns the
    smallest."""
    threshold = MIN_COSINE[meta.precision]
    smallest = 1.0
    for name, expected, got in _both_outputs(module, path, meta, waveform, session):
        similarity = float(np.min(cosine_similarity(expected.astype(np.float64), got.astype(np.float64))))
        if not similarity >= threshold:
            raise ParityError(f"{path}: output {name!r}: {meta.precision} embeddings' cosine similarity to torch "
                              f"float32 is {similarity:.5f}, below {threshold}")
        log.info("parity %s (%s) %s: min cosine %.6f, relative error %.2e", path.name, meta.precision, name,
                 similarity, relative_error(expected, got))
        smallest = min(smallest, similarity)
    return smallest
